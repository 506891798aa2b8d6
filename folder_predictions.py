"""Predictions for a folder of new, unlabelled images (evaluate.py --images): predictions.csv,
summary.md and Grad-CAM examples.
"""
import csv
import io
import os

import numpy as np
import torch

import checkpoints
import data_loader
import image_io
import tasks
import utils
from checkpoints import Checkpoint, ClassifierCheckpoint
from gradcam import Explained, cam_layer_name, decode_images, grad_cams, overlay, plot_cam_grid
from scoring import classifier_class_names, normalizer
from utils import UserError


def check_predict_checkpoint(ckpt: Checkpoint, path: str) -> None:
    if ckpt.kind == "ssl":
        raise UserError(f"--checkpoint {path}: is an SSL encoder, which predicts no class; pass the classifier "
                        f"fine_tune.py wrote (best_finetuned_model.pth or best_baseline_model.pth) with --images")


@torch.no_grad()
def predict_store(model, store, prepare, device, autocast_dtype, batch_size: int, task=tasks.SINGLE_LABEL,
                  temperature: torch.Tensor | float = 1.0):
    """Probabilities (N, K) of every image in `store`, batched, with a progress bar: softmax over the
    classes, or one sigmoid per finding for a multi-label classifier, of the logits divided by `temperature`
    (a scalar or (K,))."""
    from tqdm import tqdm

    model = model.to(device).eval()
    loader = data_loader.BatchLoader(store, np.arange(len(store)), batch_size=batch_size)
    probs = []
    for images, _, _ in tqdm(loader, desc="predict", unit="batch", dynamic_ncols=True):
        with utils.autocast(device.type, autocast_dtype):
            logits = model(prepare(images.to(device)))
        probs.append(task.probabilities(logits.float().cpu() / temperature))
    model.cpu()
    return torch.cat(probs).double().numpy()


def write_folder_predictions(filenames: list, prob: np.ndarray, class_names: list, path: str,
                             thresholds=None) -> None:
    """predictions.csv: the predicted class (multi-label: the |-joined findings at or above their recorded val
    thresholds, "No Finding" for none) and one probability column per class."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["filename", "predicted"] + [f"prob_{c}" for c in class_names])
    for f, p in zip(filenames, prob):
        if thresholds is None:
            predicted = class_names[int(p.argmax())]
        else:
            predicted = "|".join(c for c, v, t in zip(class_names, p, thresholds) if v >= t) or "No Finding"
        w.writerow([f, predicted] + [f"{v:.9f}" for v in p])
    utils.atomic_write_text(path, out.getvalue())


def write_folder_gradcam(filenames, prob, class_names, ex: Explained, args, device, per_class: int = 3):
    """gradcam.png for --images: the `per_class` most confident images of each predicted class."""
    pred, conf = prob.argmax(1), prob.max(1)
    picks = [i for c in range(len(class_names)) for i in np.flatnonzero(pred == c)[np.argsort(-conf[pred == c])][:per_class]]
    files = [filenames[i] for i in picks]
    images = decode_images(ex.root, files, ex)
    cams = grad_cams(ex.model, images, pred[picks], ex.layer, ex.prepare, device, args.batch_size)
    panels = [(overlay(im, cam), f"{f[-28:]}\npred {class_names[pred[i]]} (p={conf[i]:.2f})", [])
              for i, f, im, cam in zip(picks, files, images, cams)]
    plot_cam_grid(panels, os.path.join(args.output_dir, "gradcam.png"),
                  f"Grad-CAM ({ex.layer}) of the predicted class: the {per_class} most confident images per class")


def write_folder_summary(args, ckpt, names, filenames, skipped, prob, has_cam: bool) -> str:
    pred, conf = prob.argmax(1), prob.max(1)
    lines = [f"# Predictions for {os.path.abspath(args.images)}", "",
             f"**Summary:** {len(filenames)} image(s) scored by `{os.path.basename(args.checkpoint[0])}` "
             f"({describe_checkpoint(ckpt)}); {len(skipped)} unreadable file(s) skipped.", "",
             "| predicted class | images | mean probability |", "|---|---:|---:|"]
    for c, name in enumerate(names):
        chosen = pred == c
        mean = f"{conf[chosen].mean():.3f}" if chosen.any() else "-"
        lines.append(f"| {name} | {int(chosen.sum())} | {mean} |")
    unsure = int((conf < 0.5).sum())
    lines += ["", f"- {unsure} image(s) have a top probability below 0.5: look at them yourself.",
              f"- preprocessing: resized to {ckpt.image_size} px, {ckpt.channels or 3} channel(s), the "
              f"checkpoint's normalisation; {calibration_words(ckpt)}",
              "- all predictions: [predictions.csv](predictions.csv)"]
    if skipped:
        lines += ["", "## Skipped (unreadable)", ""] + [f"- `{f}`" for f in skipped]
    if has_cam:
        lines += ["", "## Grad-CAM", "", "![Grad-CAM](gradcam.png)"]
    utils.atomic_write_text(os.path.join(args.output_dir, "summary.md"), "\n".join(lines) + "\n")
    return lines[2]


def calibration_words(ckpt: ClassifierCheckpoint) -> str:
    t = ckpt.temperature
    if t == 1.0:
        return "probabilities are the model's, not calibrated risks (the checkpoint records no temperature)."
    shown = f"{t:.3f}" if not isinstance(t, list) else ", ".join(f"{v:.2f}" for v in t)
    return (f"probabilities are temperature-scaled (T = {shown}, fitted on the val split), which makes them "
            f"better calibrated on images like those; they are not risks for other populations.")


def describe_checkpoint(ckpt: ClassifierCheckpoint) -> str:
    init = {"ssl": "SSL init", "scratch": "from scratch"}.get(ckpt.init, ckpt.init or "classifier")
    epochs = ckpt.num_epochs
    return init + (f", best epoch {ckpt.epoch} of {epochs}" if ckpt.epoch and epochs else "")


def outside_output_dir(filenames: list, images: str, output_dir: str) -> list:
    """The files of --images that are not under --output_dir (a subfolder of it holds this tool's own
    gradcam.png, from this or an earlier run: not a scan)."""
    inside = os.path.relpath(os.path.realpath(output_dir), os.path.realpath(images)).replace(os.sep, "/")
    if inside == ".." or inside.startswith("../"):
        return filenames
    kept = [f for f in filenames if not f.startswith(inside + "/")]
    if len(kept) < len(filenames):
        print(f"note: {len(filenames) - len(kept)} image(s) under --output_dir {output_dir} (inside --images) are "
              f"outputs, not scans: left out")
    if not kept:
        raise UserError(f"--images {images}: no images found outside --output_dir {output_dir}")
    return kept


def predict_folder(args, device, autocast_dtype) -> dict:
    """--images: class probabilities for every readable image under the folder; no labels needed."""
    path = args.checkpoint[0]
    ckpt = checkpoints.read_checkpoint(path, ("classifier", "ssl"))
    check_predict_checkpoint(ckpt, path)
    names = classifier_class_names(ckpt, args.label_file)
    all_files = outside_output_dir(image_io.list_images(args.images, "--images"), args.images, args.output_dir)
    store = data_loader.ImageStore(args.images, all_files, ckpt.image_size, args.cache_gb, ckpt.channels,
                                   skip_unreadable=True)
    kept = set(store.filenames)
    skipped = [f for f in all_files if f not in kept]
    model, prepare = ckpt.build_model(), normalizer(ckpt)
    print(f"predicting {len(store)} image(s) at {ckpt.image_size} px on {device} ...")
    task = tasks.of(ckpt.task)
    prob = predict_store(model, store, prepare, device, autocast_dtype, args.batch_size, task,
                         ckpt.temperature_tensor())
    thresholds = task.decision_thresholds(ckpt)
    write_folder_predictions(store.filenames, prob, names, os.path.join(args.output_dir, "predictions.csv"),
                             thresholds)
    ex = Explained(model, prepare, cam_layer_name(model.config, ckpt.image_size, args.cam_layer), args.images,
                   ckpt.image_size, store.channels)
    if args.gradcam:
        write_folder_gradcam(store.filenames, prob, names, ex, args, device)
    summary = write_folder_summary(args, ckpt, names, store.filenames, skipped, prob, args.gradcam)
    print(summary.replace("**", ""))
    print(f"predictions: {os.path.join(args.output_dir, 'predictions.csv')}")
    return {"filenames": store.filenames, "skipped": skipped, "prob": prob, "class_names": names}
