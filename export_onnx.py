"""evaluate.py --export onnx: a classifier checkpoint as OUT/model.onnx, a graph that takes images in [0, 1]
and gives calibrated probabilities, so a hospital system can score images with onnxruntime alone
(docs/export.md). The graph holds the normalisation (the checkpoint's mean and std, one channel expanded
to three), the network, the temperature and the softmax (one label) or sigmoids (findings); its metadata
records what a caller needs to prepare the input and read the output. After writing, the file is checked
with onnxruntime against PyTorch on the checkpoint's test images (or random inputs without data).

    python evaluate.py --checkpoint ./checkpoints/best_finetuned_model.pth --export onnx --output_dir ./export
"""
import inspect
import json
import os
import warnings

import numpy as np
import torch
import torch.nn as nn

import data_loader
import tasks
from checkpoints import ClassifierCheckpoint
from scoring import normalizer
from utils import UserError

OPSET = 17
MAX_ABS_DIFF = 1e-4           # probabilities; float32 graphs of the same network agree far closer
MISSING = "--export onnx needs onnx and onnxruntime: pip install -r requirements-export.txt"


class ExportedClassifier(nn.Module):
    """image (N, C, S, S) float in [0, 1] -> probabilities (N, K): normalise, classify, divide by T, squash."""

    def __init__(self, ckpt: ClassifierCheckpoint):
        super().__init__()
        self.model = ckpt.build_model()
        self.register_buffer("mean", torch.tensor(ckpt.normalization["mean"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(ckpt.normalization["std"], dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("temperature", ckpt.temperature_tensor().view(1, -1))
        self.task = tasks.of(ckpt.task)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = (image - self.mean) / self.std               # (N, 1 or 3, S, S) -> (N, 3, S, S): one channel broadcasts
        logits = self.model(x) / self.temperature        # (N, K)
        return self.task.probabilities(logits)


def require_onnx():
    """(onnx, onnxruntime), or the one-line error naming the optional requirements file."""
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise UserError(MISSING)
    return onnx, onnxruntime


def metadata(ckpt: ClassifierCheckpoint) -> dict:
    """What a caller of model.onnx needs, as strings (ONNX metadata_props)."""
    out = {"image_size": str(ckpt.image_size), "channels": str(ckpt.channels),
           "class_names": json.dumps(list(ckpt.class_names)), "task": ckpt.task,
           "temperature": json.dumps(ckpt.temperature), "normalization": json.dumps(ckpt.normalization),
           "input": "image: float32 (N, channels, image_size, image_size), pixels / 255 in [0, 1]",
           "output": f"probabilities: float32 (N, K), {tasks.of(ckpt.task).output_text}"}
    if ckpt.class_display_names:
        out["class_display_names"] = json.dumps(list(ckpt.class_display_names))
    return out | tasks.of(ckpt.task).export_metadata(ckpt)


def write_onnx(ckpt: ClassifierCheckpoint, path: str) -> None:
    """The exported graph at `path`, dynamic batch, with its metadata."""
    onnx, _ = require_onnx()
    module = ExportedClassifier(ckpt).eval()
    example = torch.rand(2, ckpt.channels, ckpt.image_size, ckpt.image_size)
    tmp = path + ".tmp"
    with warnings.catch_warnings():      # the TorchScript exporter warns it is legacy; the new one needs onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, (example,), tmp, input_names=["image"], output_names=["probabilities"],
                          dynamic_axes={"image": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=OPSET, **torchscript_exporter())
    graph = onnx.load(tmp)
    for key, value in metadata(ckpt).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(graph)
    onnx.save(graph, tmp)
    os.replace(tmp, path)


def check_images(ckpt: ClassifierCheckpoint, data_dir: str | None, cache_gb: float, count: int = 8):
    """(uint8 images (N, C, S, S), what they are): the checkpoint's recorded test split read from `data_dir`,
    or random pixels when there is no data folder or no recorded split."""
    test = (ckpt.splits or {}).get("test") or []
    if data_dir and test:
        prepared = data_loader.prepared_folder(data_dir)
        present = [f for f in test if (f in prepared.position if prepared is not None
                                       else os.path.isfile(os.path.join(data_dir, f)))]
        if present:
            store = data_loader.ImageStore(data_dir, present, ckpt.image_size, cache_gb, ckpt.channels)
            return torch.stack([store[i] for i in range(len(store))]), f"{len(present)} test-split images"
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, ckpt.channels, ckpt.image_size, ckpt.image_size), generator=g)
    return images.to(torch.uint8), f"{count} random images (no --data_dir with the recorded test split)"


@torch.no_grad()
def torch_probabilities(ckpt: ClassifierCheckpoint, images: torch.Tensor) -> np.ndarray:
    """What evaluate.py computes for uint8 images: the checkpoint's normalisation, network, temperature."""
    model = ckpt.build_model()
    logits = model(normalizer(ckpt)(images)) / ckpt.temperature_tensor()
    return tasks.of(ckpt.task).probabilities(logits).numpy()


def compare(ckpt: ClassifierCheckpoint, path: str, images: torch.Tensor) -> dict:
    """onnxruntime's probabilities of uint8 `images` / 255 against evaluate.py's: max |difference| and the share
    of images with the same top class (the same most probable finding, multi-label)."""
    _, ort = require_onnx()
    expected = torch_probabilities(ckpt, images)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    got = session.run(["probabilities"], {"image": (images.float() / 255.0).numpy()})[0]
    same = (got.argmax(1) == expected.argmax(1)).mean()
    return {"images": len(images), "max_abs_diff": float(np.abs(got - expected).max()), "same_argmax": float(same),
            "onnx": got, "torch": expected}


def torchscript_exporter() -> dict:
    """The keyword that picks the TorchScript exporter where torch.onnx.export has a choice (torch 2.5+);
    before that it is the only one."""
    return {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}


def export(ckpt: ClassifierCheckpoint, output_dir: str, data_dir: str | None, cache_gb: float) -> dict:
    """OUT/model.onnx, checked against PyTorch; a UserError when they disagree."""
    require_onnx()
    path = os.path.join(output_dir, "model.onnx")
    if os.path.isdir(path):
        raise UserError(f"{path}: is a folder, so the export cannot be written there; remove it or choose another "
                        f"--output_dir")
    os.makedirs(output_dir, exist_ok=True)
    write_onnx(ckpt, path)
    images, what = check_images(ckpt, data_dir, cache_gb)
    result = compare(ckpt, path, images)
    print(f"onnx check on {what}: max |p_onnx - p_torch| = {result['max_abs_diff']:.2e} (limit {MAX_ABS_DIFF:g}), "
          f"same top class on {result['same_argmax']:.1%} of {result['images']} images")
    if result["max_abs_diff"] > MAX_ABS_DIFF or result["same_argmax"] < 1.0:
        os.remove(path)                      # a model that scores differently must not be picked up by mistake
        raise UserError(f"{path}: the exported model disagrees with PyTorch (max |difference| "
                        f"{result['max_abs_diff']:.2e}, same top class on {result['same_argmax']:.1%}), so it was "
                        f"removed; report the torch and onnx versions")
    print(f"exported: {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return result | {"path": path, "checked_on": what}
