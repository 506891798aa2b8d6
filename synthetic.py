"""Synthetic chest X-rays: one-label classes (normal, consolidation, nodules, effusion, cardiomegaly) or
several findings per patient, 2-4 images a patient, with the boxes where each finding was drawn.

    generate_dataset("data/medical_images", num_images=500, num_classes=3, image_size=64, seed=42)
"""
import os
import sys

import numpy as np
from PIL import Image

from image_io import list_images, load_image
from label_tables import FINDINGS_FILE
from utils import UserError

#
# A posterior-anterior chest radiograph drawn in normalised coordinates (x right, y down, both in
# [-1, 1]; the patient's left is on the image right, so the heart bulges to the right). Classes:
CLASS_DESCRIPTIONS = (
    "normal: clear lung fields, heart width under half the thorax, sharp costophrenic angles",
    "consolidation: a patchy airspace opacity filling part of one lung zone",
    "nodules: two to five small round opacities scattered in the lungs",
    "pleural effusion: fluid at one lung base, blunting the costophrenic angle with a meniscus",
    "cardiomegaly: heart wider than half the thorax (cardiothoracic ratio about 0.55-0.65)",
)

MAX_SYNTHETIC_CLASSES = len(CLASS_DESCRIPTIONS)

CLASS_NAMES = tuple(d.split(":")[0] for d in CLASS_DESCRIPTIONS)

# Scales the density every finding adds (and the heart enlargement). At 1.0 findings are visible by
# eye but small next to ribs, noise and exposure, too faint for a classifier to learn from 10% of the
# labels at 64 px (CHANGELOG.md); 1.8 makes them clearly visible at 64 px.
FINDING_STRENGTH = 1.8

IMAGES_PER_PATIENT = (2, 4)      # inclusive range; a patient's images share anatomy and class


def _smoothstep(edge_width: float, signed_distance: np.ndarray) -> np.ndarray:
    """A soft 0/1 mask: 1 where signed_distance < 0, with a ramp `edge_width` wide."""
    return np.clip(0.5 - signed_distance / edge_width, 0.0, 1.0)


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a cells x cells grid upsampled bicubically to size x size."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC))


def _patient_anatomy(rng: np.random.Generator, label: int) -> dict:
    """Body habitus and organ geometry shared by every image of one patient."""
    lung_x = rng.uniform(0.34, 0.39)
    lung_w = rng.uniform(0.25, 0.30)
    ctr = rng.uniform(0.40, 0.49)                 # cardiothoracic ratio of a normal heart
    enlargement = rng.uniform(0.12, 0.18)         # drawn for every class so the other draws line up
    ctr += FINDING_STRENGTH * enlargement * (4 in _findings_of(label))
    return dict(
        body_w=rng.uniform(0.80, 0.95), body_h=rng.uniform(1.2, 1.4), tissue=rng.uniform(0.42, 0.55),
        lung_x=lung_x, lung_w=lung_w, apex=rng.uniform(-0.78, -0.66), dome=rng.uniform(0.42, 0.56),
        dome_lift=rng.uniform(0.03, 0.07), dome_h=rng.uniform(0.10, 0.16),
        heart_w=ctr * (lung_x + lung_w), heart_x=rng.uniform(0.11, 0.16), heart_h=rng.uniform(0.27, 0.33),
        spine_w=rng.uniform(0.06, 0.08), rib_gap=rng.uniform(0.13, 0.16), rib_bend=rng.uniform(0.45, 0.75),
        rib_phase=rng.uniform(0, 1), air=rng.uniform(0.26, 0.34),
    )


def _findings_of(label) -> tuple:
    """A class index (one label) or a tuple of them (several findings, data_loader --multi_label) as a tuple."""
    return tuple(label) if isinstance(label, (tuple, list, frozenset, set)) else (label,)


def _coordinates(rng: np.random.Generator, size: int) -> tuple:
    """The pixel grid in patient coordinates, after a per-image shift, scale and small rotation."""
    t = ((np.arange(size) + 0.5) / size * 2 - 1).astype(np.float32)   # float32: faster (docs/performance.md)
    y, x = np.meshgrid(t, t, indexing="ij")
    angle = np.float32(np.deg2rad(np.clip(rng.normal(0, 3), -7, 7)))
    scale = np.float32(rng.uniform(0.92, 1.05))
    dx, dy = rng.normal(0, 0.04, size=2).astype(np.float32)
    xr = (np.cos(angle) * x + np.sin(angle) * y) * scale + dx
    yr = (-np.sin(angle) * x + np.cos(angle) * y) * scale + dy
    return xr, yr


def _lungs(a: dict, x: np.ndarray, y: np.ndarray, edge: float) -> tuple:
    """Soft masks (lungs, abdomen below the diaphragm domes) and the dome height per pixel."""
    side = (x < 0).astype(np.float32)                             # the right hemidiaphragm sits higher
    u = (np.abs(x) - a["lung_x"]) / a["lung_w"]                   # -1 medial edge, +1 lateral edge
    dome = a["dome"] - side * a["dome_lift"] - a["dome_h"] * (1 - np.clip(u + 0.2, 0, 1) ** 2)
    top, bottom = a["apex"], a["dome"] + 0.15
    v = (y - (top + bottom) / 2) / ((bottom - top) / 2)
    shape = np.sqrt(u ** 2 + np.clip(v, None, 0) ** 2 + np.clip(v, 0, None) ** 8) - 1
    lungs = _smoothstep(edge, shape * a["lung_w"]) * _smoothstep(edge, y - dome)
    abdomen = _smoothstep(edge, dome - y) * (np.abs(x) < a["body_w"])
    return lungs, abdomen, dome


def _ribs(a: dict, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Posterior ribs as curved bands falling laterally, plus the clavicles."""
    phase = (y - a["rib_bend"] * (np.abs(x) - 0.05) ** 2) / a["rib_gap"] + a["rib_phase"]
    ribs = np.clip(np.cos(2 * np.pi * phase) - 0.2, 0, 1) ** 1.5
    ribs *= (np.abs(x) > a["spine_w"]) * (y > a["apex"] - 0.05) * (y < a["dome"])
    clavicle = np.exp(-((y - (a["apex"] + 0.04 + 0.12 * np.abs(x))) / 0.035) ** 2) * (np.abs(x) < 0.55)
    return ribs + clavicle


def _consolidation(rng, a, x, y, lungs, size):
    """A patchy opacity: thresholded smooth noise inside a blob in one lung zone."""
    side = int(rng.choice([-1, 1]))
    cx = side * (a["lung_x"] + rng.uniform(-0.4, 0.4) * a["lung_w"])
    cy = rng.uniform(a["apex"] + 0.25, a["dome"] - 0.1)
    radius = rng.uniform(0.18, 0.28)
    blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
    patches = np.clip(_smooth_field(rng, size, 9) * 0.8 + 0.6, 0, 1)
    return 0.26 * blob * patches * lungs


def _nodules(rng, a, x, y, lungs, size, parts=None):
    """Two to five round opacities, at least 1.5 px in radius so augmentation cannot erase them.
    `parts`, when given, receives each nodule's own field (for its box in findings.csv)."""
    out = np.zeros_like(x)
    mask = np.clip(lungs * 1.5, 0, 1)
    for _ in range(rng.integers(2, 6)):
        side = int(rng.choice([-1, 1]))
        cx = side * (a["lung_x"] + rng.uniform(-0.6, 0.6) * a["lung_w"])
        cy = rng.uniform(a["apex"] + 0.15, a["dome"] - 0.15)
        r = max(rng.uniform(0.035, 0.06), 3.0 / size)
        d2 = ((x - cx) ** 2 + (y - cy) ** 2) / r ** 2
        nodule = 0.22 * np.sqrt(np.clip(1 - d2, 0, 1))
        out += nodule
        if parts is not None:
            parts.append(nodule * mask)
    return out * mask


def _effusion(rng, a, x, y, lungs, dome):
    """Fluid filling one lung base, its surface a meniscus rising toward the lateral chest wall."""
    side = int(rng.choice([-1, 1]))
    u = np.clip((side * x - a["lung_x"]) / a["lung_w"], -1, 1)
    depth = rng.uniform(0.12, 0.22)
    surface = dome - depth - 0.10 * (u + 1) ** 2
    fluid = _smoothstep(0.04, surface - y) * (side * x > 0)
    return 0.20 * fluid * lungs


def render_chest_xray(anatomy: dict, label, rng: np.random.Generator, size: int,
                      boxes: list | None = None) -> np.ndarray:
    """One radiograph as uint8 (size, size); `rng` draws this image's position, exposure and finding(s).
    `label` is a class index, or a tuple of them for an image with several findings.

    `boxes`, when given, receives where the findings were drawn: one (x0, y0, x1, y1) pixel box per
    region (each nodule its own; x1, y1 exclusive), none for a normal image. Passing it draws nothing
    differently."""
    a = anatomy
    x, y = _coordinates(rng, size)
    edge = max(2.0 / size, 0.012)
    r = ((x / a["body_w"]) ** 4 + (y / a["body_h"]) ** 4) ** 0.25
    body = _smoothstep(edge * 3, r - 1) * np.clip(1 - r ** 2, 0.05, 1) ** 0.25
    lungs, abdomen, dome = _lungs(a, x, y, edge * 2)
    heart = _smoothstep(edge * 3, np.sqrt(((x - a["heart_x"]) / a["heart_w"]) ** 2
                                          + ((y - a["dome"] + 0.6 * a["heart_h"]) / a["heart_h"]) ** 2) - 1)
    heart *= 1 - abdomen
    trachea = _smoothstep(edge, np.abs(x) - 0.035) * _smoothstep(edge * 2, y - a["apex"] - 0.3)
    spine = _smoothstep(edge, np.abs(x) - a["spine_w"]) * (0.8 + 0.2 * np.cos(2 * np.pi * y / 0.09))
    mediastinum = _smoothstep(edge * 4, np.abs(x - 0.02) - 0.11) * (y < a["dome"])
    markings = _smooth_field(rng, size, 24) * 0.04 * np.exp(-((np.abs(x) - 0.12) / 0.25) ** 2)
    density = (0.04 + body * (a["tissue"] + 0.10 * abdomen) + 0.10 * spine + 0.08 * mediastinum - 0.08 * trachea
               + 0.10 * _ribs(a, x, y) * body - a["air"] * lungs * (1 - heart) + markings * lungs
               + 0.06 * heart)
    parts = []                                    # the finding's regions, for `boxes`
    findings = {1: lambda: _consolidation(rng, a, x, y, lungs, size),
                2: lambda: _nodules(rng, a, x, y, lungs, size, parts),
                3: lambda: _effusion(rng, a, x, y, lungs, dome)}
    regions = []
    for finding in _findings_of(label):     # one label draws exactly what it drew before several could
        if finding in findings:
            parts.clear()
            field = findings[finding]()
            density = density + FINDING_STRENGTH * field * (1 - heart)
            regions += [p * (1 - heart) for p in parts] if parts else [field * (1 - heart)]
        elif finding == 4:                        # cardiomegaly: the enlarged heart is the finding
            regions.append(heart)
    if boxes is not None:
        boxes.extend(b for b in map(region_box, regions) if b is not None)
    return _expose(rng, density)


FINDING_BOX_LEVEL = 0.25   # a region's box holds the pixels above this fraction of its peak density


def region_box(field: np.ndarray):
    """(x0, y0, x1, y1) pixel box, ends exclusive, of where `field` exceeds FINDING_BOX_LEVEL of its
    peak; None where nothing was drawn (a nodule the lung mask hid)."""
    peak = float(field.max())
    if peak <= 0:
        return None
    rows, cols = np.nonzero(field >= FINDING_BOX_LEVEL * peak)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def _expose(rng: np.random.Generator, density: np.ndarray) -> np.ndarray:
    """Detector response: gamma, noise, then a histogram set to a random mean and spread.

    Real CR/DR processing normalises each image's histogram; drawing the target mean and spread
    independently of the class is what makes global intensity useless as a shortcut."""
    x = np.clip(density, 0, None) ** rng.uniform(0.75, 1.35)
    x = x + rng.standard_normal(x.shape, dtype=np.float32) * np.float32(rng.uniform(0.008, 0.03))
    x = (x - x.mean()) / (x.std() + 1e-8) * rng.uniform(0.17, 0.24) + rng.uniform(0.36, 0.52)
    return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)


def plan_patients(num_images: int, num_classes: int, seed: int, stream: int = 0) -> list:
    """(patient_id, label, image count) per patient, classes balanced over patients, deterministic."""
    rng = np.random.default_rng([seed, stream + 1])
    counts = []
    while sum(counts) < num_images:
        counts.append(int(rng.integers(IMAGES_PER_PATIENT[0], IMAGES_PER_PATIENT[1] + 1)))
    counts[-1] -= sum(counts) - num_images
    if len(counts) < num_classes:          # too few images for whole patients of every class
        counts = [1] * num_images
    labels = rng.permutation(np.arange(len(counts)) % num_classes)
    prefix = "P" if stream == 0 else "U"
    return [(f"{prefix}{i:05d}", int(labels[i]), n) for i, n in enumerate(counts)]


def generate_images(out_dir: str, subdir: str, num_images: int, num_classes: int, image_size: int,
                    seed: int, stream: int, plan: list | None = None, findings: list | None = None) -> list:
    """Render and save a cohort (`plan`: plan_patients' rows, or plan_multilabel_patients'); returns rows
    (filename, label, patient_id) in file order. `findings`, when given, receives (filename, finding, x0, y0,
    x1, y1) per drawn region of a one-label cohort."""
    rows = []
    for p, (patient, label, count) in enumerate(plan or plan_patients(num_images, num_classes, seed, stream)):
        anatomy = _patient_anatomy(np.random.default_rng([seed, stream + 1, p + 1]), label)
        for k in range(count):
            boxes = []
            image = render_chest_xray(anatomy, label, np.random.default_rng([seed, stream + 1, p + 1, k + 1]),
                                      image_size, boxes)
            name = (os.path.join(subdir, f"{patient}_{k}.png") if subdir else f"{patient}_{k}.png").replace(os.sep, "/")
            Image.fromarray(image).save(os.path.join(out_dir, name))
            rows.append((name, label, patient))
            if findings is not None:
                findings.extend((name, CLASS_NAMES[label], *box) for box in boxes)
    return rows


def write_preview(out_dir: str, rows: list, class_names: list, per_class: int = 4) -> None:
    """preview.png: one row per class, the first image of up to `per_class` different patients."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from utils import atomic_savefig

    fig, axes = plt.subplots(len(class_names), per_class, figsize=(2.2 * per_class, 2.4 * len(class_names)),
                             squeeze=False)
    for c, name in enumerate(class_names):
        seen, picks = set(), []
        for filename, label, group in rows:
            if label == c and group not in seen and len(picks) < per_class:
                seen.add(group)
                picks.append(filename)
        for ax, filename in zip(axes[c], picks + [None] * per_class):
            ax.axis("off")
            if filename:
                ax.imshow(load_image(os.path.join(out_dir, filename)), cmap="gray", vmin=0, vmax=255)
        axes[c][0].set_title(name, loc="left", fontsize=9)
    fig.tight_layout()
    atomic_savefig(fig, os.path.join(out_dir, "preview.png"))


def write_label_csv(path: str, header: str, rows: list) -> None:
    from utils import atomic_write_text

    atomic_write_text(path, "\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")


def generate_dataset(out_dir: str, num_images: int, num_classes: int, image_size: int, seed: int,
                     num_unlabeled: int = 0) -> list:
    """Write the synthetic cohort: images, labels.csv, classes.txt, findings.csv (where each finding was
    drawn: `read_findings`), preview.png; unlabelled images
    (other patients, same class mix) under unlabeled/ with no label row. Returns the label rows."""
    _warn_foreign_images(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    findings = []
    rows = generate_images(out_dir, "", num_images, num_classes, image_size, seed, stream=0, findings=findings)
    write_label_csv(os.path.join(out_dir, FINDINGS_FILE), "filename,finding,x0,y0,x1,y1", findings)
    if num_unlabeled:
        os.makedirs(os.path.join(out_dir, "unlabeled"), exist_ok=True)
        generate_images(out_dir, "unlabeled", num_unlabeled, num_classes, image_size, seed, stream=1)
    write_label_csv(os.path.join(out_dir, "labels.csv"), "filename,label,patient_id", rows)
    names = [f"{c} {CLASS_DESCRIPTIONS[c].split(':')[0]}" for c in range(num_classes)]
    from utils import atomic_write_text
    atomic_write_text(os.path.join(out_dir, "classes.txt"),
                      "".join(f"{c}\t{CLASS_DESCRIPTIONS[c]}\n" for c in range(num_classes)))
    write_preview(out_dir, rows, names)
    return rows


def _warn_foreign_images(out_dir: str) -> None:
    """Old images left in the folder would join the unlabelled set of train_ssl.py: say so."""
    if not os.path.isdir(out_dir):
        return
    try:
        existing = list_images(out_dir)
    except UserError:
        return
    print(f"warning: {out_dir} already holds {len(existing)} image(s); files of the same name are overwritten, "
          f"others stay and train_ssl.py will read them too (use an empty --output_dir to avoid this)",
          file=sys.stderr)


#
# The same patients and renderer, with 0 to 4 findings per patient drawn from a small chain of
# dependencies that mimics chest X-ray co-occurrence: an enlarged heart raises the odds of an
# effusion, an effusion those of a consolidation next to it, and nodules are rare and independent.
SYNTHETIC_FINDINGS = {1: "Consolidation", 2: "Nodule", 3: "Effusion", 4: "Cardiomegaly"}  # ChestX-ray14 names

MIN_POSITIVE_PATIENTS = 4        # so that a small cohort still has every finding in train, val and test


def draw_findings(rng: np.random.Generator) -> tuple:
    """One patient's findings (class indices of SYNTHETIC_FINDINGS), sorted; () for a normal chest.
    Prevalences: cardiomegaly 22%, effusion about 19% (45% with cardiomegaly, 12% without),
    consolidation about 16% (35% with an effusion, 12% without), nodules 7%."""
    cardiomegaly = rng.random() < 0.22
    effusion = rng.random() < (0.45 if cardiomegaly else 0.12)
    consolidation = rng.random() < (0.35 if effusion else 0.12)
    nodules = rng.random() < 0.07
    return tuple(c for c, present in ((1, consolidation), (2, nodules), (3, effusion), (4, cardiomegaly)) if present)


def plan_multilabel_patients(num_images: int, seed: int, stream: int = 0) -> list:
    """(patient_id, findings tuple, image count) per patient, deterministic. Image counts as plan_patients;
    a finding held by fewer than MIN_POSITIVE_PATIENTS patients is given to more (only small cohorts)."""
    counts = [n for _, _, n in plan_patients(num_images, 1, seed, stream)]
    rng = np.random.default_rng([seed, stream + 1, 99])
    findings = [set(draw_findings(rng)) for _ in counts]
    for c in SYNTHETIC_FINDINGS:
        lacking = [p for p, f in enumerate(findings) if c not in f]
        short = MIN_POSITIVE_PATIENTS - (len(findings) - len(lacking))
        if short > 0 and len(lacking) > short:
            for p in rng.choice(lacking, size=short, replace=False):
                findings[p].add(c)
    prefix = "P" if stream == 0 else "U"
    return [(f"{prefix}{i:05d}", tuple(sorted(f)), n) for i, (f, n) in enumerate(zip(findings, counts))]


def finding_names(findings: tuple) -> str:
    """'Effusion|Cardiomegaly' for a labels.csv cell, 'No Finding' for none."""
    return "|".join(SYNTHETIC_FINDINGS[c] for c in findings) or "No Finding"


def generate_multilabel_dataset(out_dir: str, num_images: int, image_size: int, seed: int,
                                num_unlabeled: int = 0) -> list:
    """The multi-label cohort: images, labels.csv (filename,labels,patient_id; ChestX-ray14's |-separated
    names), classes.txt (finding and description), preview.png (a row per finding). Returns the rows."""
    from utils import atomic_write_text

    _warn_foreign_images(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    plan = plan_multilabel_patients(num_images, seed)
    rows = generate_images(out_dir, "", num_images, 0, image_size, seed, stream=0, plan=plan)
    if num_unlabeled:
        os.makedirs(os.path.join(out_dir, "unlabeled"), exist_ok=True)
        generate_images(out_dir, "unlabeled", num_unlabeled, 0, image_size, seed, stream=1,
                        plan=plan_multilabel_patients(num_unlabeled, seed, stream=1))
    write_label_csv(os.path.join(out_dir, "labels.csv"), "filename,labels,patient_id",
                    [(f, finding_names(y), p) for f, y, p in rows])
    atomic_write_text(os.path.join(out_dir, "classes.txt"),
                      "".join(f"{name}\t{CLASS_DESCRIPTIONS[c]}\n" for c, name in SYNTHETIC_FINDINGS.items()))
    order = [0] + list(SYNTHETIC_FINDINGS)                 # preview rows: No Finding, then each finding
    shown = [(f, order.index(c), p) for f, y, p in rows for c in (y or (0,))]
    write_preview(out_dir, shown, ["No Finding"] + list(SYNTHETIC_FINDINGS.values()))
    return rows
