"""Optional TensorBoard logs: a training run's per-epoch scalars (the columns of its history CSV) and an
evaluation's test embeddings with image thumbnails for the projector. Each run writes its own folder under
its output folder, so `tensorboard --logdir checkpoints/` shows every run side by side. Needs the
`tensorboard` package; without it `--tensorboard` ends with a one-line message and the CSV/PNG outputs are
unchanged either way.

    python train_ssl.py --data_dir ./data/synthetic --tensorboard      # -> checkpoints/tensorboard/ssl/
    tensorboard --logdir checkpoints/
"""
import math
import numbers
import os

from utils import UserError

INSTALL = "python -m pip install tensorboard"

# history column -> TensorBoard tag: the prefix groups related scalars into one section of the dashboard
SECTIONS = (("loss", "loss"), ("train_loss", "loss"), ("val_loss", "loss"), ("lr", "optimiser"),
            ("encoder_frozen", "optimiser"), ("images_per_sec", "speed"), ("embedding_std", "collapse"))


def summary_writer_class():
    """torch's SummaryWriter, or a UserError naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError(f"--tensorboard needs the tensorboard package, which is not installed: {INSTALL} "
                        f"(or leave out --tensorboard)") from None
    return SummaryWriter


def run_log_dir(output_dir: str, run: str) -> str:
    """Where run `run` (ssl, finetuned, baseline, ...) of `output_dir` writes its event files."""
    return os.path.join(output_dir, "tensorboard", run)


def tag_of(column: str) -> str:
    section = dict(SECTIONS).get(column)
    if section is None:
        section = "validation" if column.startswith(("val_", "knn_")) else "other"
    return f"{section}/{column}"


class ScalarLog:
    """Writes each numeric entry of a history row as a scalar at step = the row's epoch. On --resume the
    epochs after the resumed checkpoint are purged, as the history CSV drops them, so no step is doubled."""

    def __init__(self, log_dir: str, start_epoch: int):
        writer_class = summary_writer_class()
        self.writer = writer_class(log_dir, purge_step=start_epoch + 1 if start_epoch > 0 else None)

    def write(self, row: dict) -> None:
        step = int(row["epoch"])
        for column, value in row.items():
            if column == "epoch" or isinstance(value, bool) or not isinstance(value, numbers.Real):
                continue
            if math.isfinite(value):
                self.writer.add_scalar(tag_of(column), float(value), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


THUMBNAIL_SIDE = 32      # px a side of the projector's image sprites: enough to tell images apart


def point_labels(ev) -> list:
    """One label per embedding: the true class, or a multi-label image's present findings joined by '|'."""
    if ev.y_true.ndim == 1:
        return [ev.class_names[c] for c in ev.y_true]
    return ["|".join(n for n, v in zip(ev.class_names, row) if v == 1) or "no finding" for row in ev.y_true]


def write_projectors(evaluated: list, run_names: list, data_dir: str, output_dir: str) -> list:
    """Each evaluated model's embeddings, labels and image thumbnails under OUTPUT_DIR/tensorboard/<run name>
    for the projector tab; returns the folders written."""
    import torch

    from image_io import decode_to_tensor
    writer_class, thumbs, folders = summary_writer_class(), {}, []
    for ev, run in zip(evaluated, run_names):
        for f in ev.filenames:
            if f not in thumbs:
                thumbs[f] = decode_to_tensor(os.path.join(data_dir, f), THUMBNAIL_SIDE, 3)
        images = torch.stack([thumbs[f] for f in ev.filenames]).float() / 255.0
        folder = run_log_dir(output_dir, run)
        writer = writer_class(folder)
        writer.add_embedding(torch.as_tensor(ev.features, dtype=torch.float32), metadata=point_labels(ev),
                             label_img=images, tag=f"{ev.info.split} split embeddings")
        writer.close()
        folders.append(folder)
    return folders
