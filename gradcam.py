"""Grad-CAM heat maps (the `grad-cam` package) and the pointing game, which scores a map's peak against
the boxes where the synthetic generator drew each finding.
"""
import os
from dataclasses import dataclass

import numpy as np
import torch

import image_io
import model_ssl
import utils
from classification_metrics import bootstrap_weights, fmt, resampling_unit, wilson_interval, with_ci
from evaluated_model import Evaluated
from plots import class_colors, pyplot

# Heat maps come from the maintained `grad-cam` package (pytorch_grad_cam). Its GradCAM upsamples the
# map of one layer to the input size and scales each image's map to [0, 1].

CAM_LAYERS = ("layer4", "layer3", "layer2")

CAM_MIN_SIDE = 7           # deepest ResNet stage whose map is at least this many cells a side (7 at 224 px)

RANDOM_INIT_NAME = "random init"


def cam_layer_name(config: model_ssl.ModelConfig, image_size: int, choice: str = "auto") -> str:
    """The ResNet stage Grad-CAM reads. 'auto': the deepest with a map of at least CAM_MIN_SIDE cells: layer4
    at 224 px, but at 64 px layer4 is 2x2 cells, too coarse to say where a finding is, so layer2 (8x8)."""
    if choice != "auto":
        return choice
    for name in CAM_LAYERS:
        if config.feature_map_side(image_size, name) >= CAM_MIN_SIDE:
            return name
    return CAM_LAYERS[-1]


def random_init_classifier(config: model_ssl.ModelConfig, num_classes: int, seed: int) -> model_ssl.Classifier:
    """The same network untrained: the reference a heat map must beat to say anything (Adebayo et al. 2018)."""
    torch.manual_seed(seed)
    return model_ssl.Classifier(config, num_classes).eval()


def grad_cams(model, images: torch.Tensor, targets, layer: str, prepare, device, batch_size: int) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] of `images` uint8 (N, C, S, S) for the class indices `targets`."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = model.to(device).eval()
    maps = []
    with GradCAM(model=model, target_layers=[getattr(model.encoder, layer)[-1]]) as cam:
        for start in range(0, len(images), batch_size):
            x = prepare(images[start:start + batch_size].to(device))
            batch_targets = [ClassifierOutputTarget(int(t)) for t in targets[start:start + batch_size]]
            maps.append(cam(input_tensor=x, targets=batch_targets))
    model.cpu()
    return np.concatenate(maps) if maps else np.zeros((0,) + tuple(images.shape[2:]))


def cam_peaks(cams: np.ndarray):
    """(row, col) of each map's maximum, and whether the map is blank (all zero: it points nowhere)."""
    flat = cams.reshape(len(cams), -1)
    rows, cols = np.unravel_index(flat.argmax(1), cams.shape[1:])
    return np.stack([rows, cols], 1), flat.max(1) <= 0


# A peak this close to the finding still counts (Zhang et al. 2018, "Top-down neural attention by excitation
# backprop": 15 px at 224 px). A ResNet stage's map is coarse (8x8 cells at 64 px) and its peak often sits
# on the finding's edge, a pixel outside; chance is computed with the same widened boxes.
POINTING_TOLERANCE = 15 / 224      # of the image's longer side


def box_mask(boxes: list, width: int, height: int, margin: int = 0) -> np.ndarray:
    """The pixels inside any of the boxes, each widened by `margin` pixels on every side."""
    mask = np.zeros((height, width), bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0 - margin):max(0, y1 + margin), max(0, x0 - margin):max(0, x1 + margin)] = True
    return mask


def peak_pixel(row: int, col: int, cam_side: tuple, size: tuple) -> tuple:
    """(y, x) pixel of an image of `size` (width, height) at the centre of map cell (row, col)."""
    (side_y, side_x), (w, h) = cam_side, size
    return min(h - 1, int((row + 0.5) * h / side_y)), min(w - 1, int((col + 0.5) * w / side_x))


def widened_masks(boxes: list, sizes: list, tolerance: float) -> list:
    """Per image, the pixels inside one of its boxes widened by `tolerance` x its longer side."""
    return [box_mask(b, w, h, int(round(tolerance * max(w, h)))) for b, (w, h) in zip(boxes, sizes)]


def pointing_hits(cams: np.ndarray, boxes: list, sizes: list, tolerance: float = POINTING_TOLERANCE):
    """Per image: whether the map's peak lies in one of its finding boxes, widened by `tolerance` x the image
    side (boxes in the file's own pixels, `sizes` its (width, height)); the share of the image the widened
    boxes cover (a random peak's hit rate); and which maps are blank."""
    peaks, blank = cam_peaks(cams)
    masks = widened_masks(boxes, sizes, tolerance)
    hits = np.array([m[peak_pixel(r, c, cams.shape[1:], s)] for (r, c), m, s in zip(peaks, masks, sizes)], bool)
    chance = np.array([m.mean() for m in masks])
    return hits & ~blank, chance, blank


def permutation_baseline(cams: np.ndarray, boxes: list, sizes: list, classes,
                         tolerance: float = POINTING_TOLERANCE) -> np.ndarray:
    """Per image: the share of the OTHER images of its class whose widened boxes its map's peak would hit
    (NaN where its class has no other image). A map that points where this class's findings usually lie,
    without looking at the image, scores as well here as on its own boxes; a blank map scores 0."""
    peaks, blank = cam_peaks(cams)
    classes = np.asarray(classes)
    hit_sum, others = np.zeros(len(cams)), np.zeros(len(cams))
    for j, (mask, size) in enumerate(zip(widened_masks(boxes, sizes, tolerance), sizes)):
        rows = np.flatnonzero((classes == classes[j]) & (np.arange(len(cams)) != j))
        pixels = np.array([peak_pixel(r, c, cams.shape[1:], size) for r, c in peaks[rows]], dtype=np.int64)
        pixels = pixels.reshape(-1, 2)
        hit_sum[rows] += mask[pixels[:, 0], pixels[:, 1]] & ~blank[rows]
        others[rows] += 1
    return np.where(others > 0, hit_sum / np.maximum(others, 1), np.nan)


def mean_with_ci(values, resamples: int, seed: int, groups=None) -> dict:
    """Mean of per-image values (NaN ones left out) with a percentile bootstrap 95% interval, resampling
    patients when `groups` is given; the same seed draws the same resamples for every model."""
    values = np.asarray(values, dtype=np.float64)
    keep = np.isfinite(values)
    if not keep.any():
        return {"value": float("nan"), "low": float("nan"), "high": float("nan")}
    n, x = len(values), np.where(keep, values, 0.0)
    draws = []
    for w in bootstrap_weights(n, resamples, seed, 500, groups):
        w = w * keep
        with np.errstate(invalid="ignore", divide="ignore"):
            draws.append(w @ x / w.sum(1))
    samples = np.concatenate(draws) if draws else np.zeros(0)
    samples = samples[np.isfinite(samples)]
    low, high = np.percentile(samples, (2.5, 97.5)) if len(samples) else (np.nan, np.nan)
    return {"value": float(x[keep].mean()), "low": float(low), "high": float(high)}


def rate_with_ci(hits, resamples: int, seed: int, groups=None) -> dict:
    """Hit rate with its bootstrap 95% interval (mean_with_ci). Where every image is a hit, or none is,
    resampling cannot move it and the interval would have zero width: Wilson's interval over the resampling
    units (patients, or images) is given instead."""
    hits = np.asarray(hits, bool)
    out = mean_with_ci(hits, resamples, seed, groups)
    if resamples and len(hits) and (hits.all() or not hits.any()):
        units = resampling_unit(groups, len(hits))["units"]
        low, high = wilson_interval(np.float64(hits.all()), np.float64(units))
        out |= {"low": float(low), "high": float(high), "interval": "Wilson (all hits or none)"}
    return out


@dataclass
class Explained:
    """Grad-CAM inputs of one scored classifier: the network, its preprocessing and the images it scored."""
    model: torch.nn.Module
    prepare: object
    layer: str
    root: str
    image_size: int
    channels: int


def decode_images(root: str, filenames: list, ex: Explained) -> torch.Tensor:
    return image_io.decode_files(root, filenames, ex.image_size, ex.channels)


def image_sizes(root: str, filenames: list) -> list:
    return image_io.source_sizes(root, filenames)


def pointing_game(evaluated: list, findings: dict, args, device) -> list:
    """Pointing-game rows for every classifier scored (Grad-CAM of the true class on each split image with a
    finding) and for the same network at random init; [] when no scored image has a finding box. Each row
    after the first holds its paired difference from the first model on the same images."""
    models = [(ev.name, ev) for ev in evaluated if ev.explained is not None]
    if not models or findings is None:
        return []
    first = models[0][1]
    ex0 = first.explained
    keep = [i for i, f in enumerate(first.filenames) if findings.get(f)]
    if not keep:
        return []
    files = [first.filenames[i] for i in keep]
    images, sizes = decode_images(ex0.root, files, ex0), image_sizes(ex0.root, files)
    boxes, targets = [findings[f] for f in files], first.y_true[keep]
    groups = None if first.patient_ids is None else np.asarray(first.patient_ids)[keep]
    config, k = ex0.model.config, len(first.class_names)
    random_model = Explained(random_init_classifier(config, k, args.seed), ex0.prepare, ex0.layer, ex0.root,
                             ex0.image_size, ex0.channels)
    rows, per_image = [], []
    for name, ex in [(n, ev.explained) for n, ev in models] + [(RANDOM_INIT_NAME, random_model)]:
        if (ex.image_size, ex.channels) != (ex0.image_size, ex0.channels):
            continue                                         # another resolution: not the same images
        print(f"pointing game: Grad-CAM ({ex.layer}) of {name} on {len(files)} images with a finding ...")
        cams = grad_cams(ex.model, images, targets, ex.layer, ex.prepare, device, args.batch_size)
        hits, chance, blank = pointing_hits(cams, boxes, sizes)
        baseline = permutation_baseline(cams, boxes, sizes, targets)
        rows.append({"model": name, "layer": ex.layer, "chance": float(chance.mean()),
                     **pointing_scores(hits, baseline, blank, groups, args.bootstrap, args.seed)})
        per_image.append(hits)
    for row, hits in zip(rows[1:], per_image[1:]):
        diff = mean_with_ci(per_image[0].astype(float) - hits, args.bootstrap, args.seed, groups)
        row["paired_with_first"] = {"model_a": rows[0]["model"], "model_b": row["model"], **diff}
    return rows


def pointing_scores(hits, baseline, blank, groups, resamples: int, seed: int) -> dict:
    """One model's pointing-game numbers: hit rate, permutation baseline, their paired difference, and the
    hit rate among non-blank maps, each with a bootstrap 95% interval over patients (images without ids)."""
    n = len(hits)
    resampled = resampling_unit(groups, n)
    unit, units = resampled["unit"], resampled["units"]
    shown = ~blank
    nonblank_groups = None if groups is None else np.asarray(groups)[shown]
    return {"images": n, "hits": int(hits.sum()), "blank_maps": int(blank.sum()),
            **rate_with_ci(hits, resamples, seed, groups),
            "unit": unit, "units": units, "resamples": resamples,
            "permutation_baseline": float(np.nanmean(baseline)) if np.isfinite(baseline).any() else float("nan"),
            "above_baseline": mean_with_ci(hits - baseline, resamples, seed, groups),
            "nonblank": {"images": int(shown.sum()), "hits": int(hits[shown].sum()),
                         **rate_with_ci(hits[shown], resamples, seed, nonblank_groups)}}


def pointing_sentences(rows: list) -> list:
    if not rows:
        return []
    r0 = rows[0]
    over = (f"the {r0['units']} patients (all images of a patient drawn together)" if r0["unit"] == "patient"
            else "images (no patient ids)")
    lines = [f"Pointing game: the share of the {r0['images']} split images with a drawn finding (findings.csv) whose "
             f"Grad-CAM peak, for the true class, falls inside the finding's box (widened by "
             f"{POINTING_TOLERANCE:.1%} of the image side, 15 px at 224 px, as Zhang et al. 2018). Two baselines: "
             f"the area share ({r0['chance']:.3f}: the share of the image the widened boxes cover, a peak placed "
             f"anywhere at random), and the permutation baseline: each model's peaks scored against the boxes of "
             f"the other images of the same class, the hit rate of a map that points where this class's findings "
             f"usually are without finding them in this image. The area share is easy to beat by pointing at the "
             f"chest; beating the permutation baseline is what says the map found the finding. 95% bootstrap "
             f"intervals ({r0['resamples']} resamples) over {over}.", "",
             "| model | Grad-CAM layer | hits | pointing accuracy [95% CI] | permutation baseline "
             "| hits - baseline [95% CI] | blank maps | non-blank maps: hits | non-blank: accuracy [95% CI] |",
             "|---|---|---:|---|---:|---|---:|---:|---|"]
    for r in rows:
        nb = r["nonblank"]
        lines.append(f"| {r['model']} | {r['layer']} | {r['hits']}/{r['images']} | {with_ci(r)} | "
                     f"{fmt(r['permutation_baseline'])} | {signed_with_ci(r['above_baseline'])} | {r['blank_maps']} | "
                     f"{nb['hits']}/{nb['images']} | {with_ci(nb)} |")
    paired = [r["paired_with_first"] for r in rows if "paired_with_first" in r]
    if paired:
        lines += ["", "Paired differences in pointing accuracy (both models' maps on the same images, resampled "
                      "together; an interval that includes 0: no difference detected):", ""]
        lines += [f"- {p['model_a']} - {p['model_b']}: {signed_with_ci(p)}" for p in paired]
    lines += ["", "A blank map (Grad-CAM zero everywhere) points nowhere and counts as a miss; the non-blank "
                  "columns leave those images out."]
    if any("interval" in r or "interval" in r["nonblank"] for r in rows):
        lines += ["", "Where every image is a hit (or none is), resampling cannot move the share, so its interval "
                      "is Wilson's over the resampling units instead."]
    return lines + ["", "![Pointing game](pointing_game.png)"]
    return lines


def signed_with_ci(m: dict) -> str:
    """'+0.125 [+0.031, +0.219]', or 'n/a'."""
    if not np.isfinite(m["value"]):
        return "n/a"
    ci = f" [{m['low']:+.3f}, {m['high']:+.3f}]" if np.isfinite(m["low"]) else ""
    return f"{m['value']:+.3f}{ci}"


def plot_pointing_game(rows: list, path: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(rows) + 2.5, 4))
    values = np.array([r["value"] for r in rows])
    errors = np.array([[r["value"] - r["low"], r["high"] - r["value"]] for r in rows]).T
    colors = ["tab:grey" if r["model"] == RANDOM_INIT_NAME else c for r, c in zip(rows, class_colors(len(rows)))]
    ax.bar(range(len(rows)), values, color=colors, yerr=np.nan_to_num(errors), capsize=6, edgecolor="black")
    ax.axhline(rows[0]["chance"], color="black", ls=":", label=f"area share ({rows[0]['chance']:.2f}: a peak anywhere)")
    ax.hlines([r["permutation_baseline"] for r in rows], np.arange(len(rows)) - 0.45, np.arange(len(rows)) + 0.45,
              color="tab:red", lw=2.5, label="permutation baseline (other images' boxes)")
    ax.set_xticks(range(len(rows)), [r["model"] for r in rows])
    ax.set(ylim=(0, 1.02), ylabel="Grad-CAM peak inside the finding",
           title=f"Pointing game on {rows[0]['images']} images with a finding\n(95% bootstrap CI over "
                 f"{rows[0]['unit']}s)")
    ax.legend(fontsize=8, loc="upper right")
    utils.atomic_savefig(fig, path)


def gradcam_examples(ev: Evaluated) -> list:
    """Split indices, two per true class (row): the most confident correct and the most confident wrong
    prediction, None where the split has no such image."""
    pred, conf = ev.prob.argmax(1), ev.prob.max(1)
    picks = []
    for c in range(len(ev.class_names)):
        for correct in (True, False):
            idx = np.flatnonzero((ev.y_true == c) & ((pred == c) == correct))
            picks.append(int(idx[np.argmax(conf[idx])]) if len(idx) else None)
    return picks


def overlay(image: torch.Tensor, cam: np.ndarray) -> np.ndarray:
    from pytorch_grad_cam.utils.image import show_cam_on_image

    rgb = image.float().div(255).expand(3, -1, -1).permute(1, 2, 0).numpy()
    return show_cam_on_image(rgb, cam, use_rgb=True, image_weight=0.55)


def plot_cam_grid(panels: list, path: str, title: str, ncols: int = 4) -> None:
    """panels: (overlay RGB or None for an empty cell, panel title, finding boxes in input pixels) -> a grid."""
    from matplotlib.patches import Rectangle

    plt = pyplot()
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.0 * ncols + 1.0, 3.3 * nrows + 0.8), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rgb, text, boxes) in zip(axes.flat, panels):
        if rgb is None:
            ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, color="0.4", transform=ax.transAxes)
            continue
        ax.imshow(rgb)
        for x0, y0, x1, y1 in boxes:
            ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="white", lw=1.2, ls="--"))
        ax.set_title(text, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    utils.atomic_savefig(fig, path)


def scaled_boxes(boxes: list, size: tuple, side: int) -> list:
    """Finding boxes in the file's pixels -> in the model input's pixels."""
    w, h = size
    return [(x0 * side / w, y0 * side / h, x1 * side / w, y1 * side / h) for x0, y0, x1, y1 in boxes]


def write_gradcam_figure(ev: Evaluated, findings, folder: str, device, batch_size: int) -> str | None:
    """gradcam.png: for each class the most confident correct and wrong images with the heat map of the
    predicted class; returns why it was skipped, or None."""
    ex = ev.explained
    slots = gradcam_examples(ev)
    picks = [i for i in slots if i is not None]
    if ex is None or not picks:
        return None
    files = [ev.filenames[i] for i in picks]
    images = decode_images(ex.root, files, ex)
    pred = ev.prob[picks].argmax(1)
    cams = dict(zip(picks, grad_cams(ex.model, images, pred, ex.layer, ex.prepare, device, batch_size)))
    images, files = dict(zip(picks, images)), dict(zip(picks, files))
    panels = []
    for slot, i in enumerate(slots):
        name = ev.class_names[slot // 2]
        if i is None:
            panels.append((None, f"true {name}:\nno {'correct' if slot % 2 == 0 else 'wrong'} prediction", []))
            continue
        p = ev.class_names[int(ev.prob[i].argmax())]
        boxes = findings.get(files[i], []) if findings else []
        boxes = scaled_boxes(boxes, image_sizes(ex.root, [files[i]])[0], ex.image_size) if boxes else []
        panels.append((overlay(images[i], cams[i]), f"{'correct' if slot % 2 == 0 else 'WRONG'}: true {name}\n"
                                                    f"pred {p} (p={ev.prob[i].max():.2f})", boxes))
    plot_cam_grid(panels, os.path.join(folder, "gradcam.png"),
                  f"Grad-CAM ({ex.layer}) of the predicted class: {ev.name}\nper true class, the most confident "
                  f"correct and wrong prediction" + ("; dashed: where the finding was drawn" if findings else ""),
                  ncols=2)
    return "gradcam.png"
