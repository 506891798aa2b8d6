"""Score one PNG/JPEG or DICOM file with a model.onnx written by `evaluate.py --export onnx`, using numpy,
Pillow, pydicom and onnxruntime only (no torch, no toolkit). The image is read as the toolkit reads it.

    python score_with_onnx.py export/model.onnx chest.png
    python score_with_onnx.py export/model.onnx study/IM0001.dcm
"""
import json
import sys

import numpy as np
import onnxruntime as ort
from PIL import Image


def dicom_pixels(path):
    """One DICOM frame as floats in [0, 1]: rescale slope/intercept, the stored window (else the 0.5-99.5
    percentiles), MONOCHROME1 inverted."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[len(pixels) // 2]                      # the middle frame
    if pixels.ndim == 3:                                       # colour: already RGB
        return pixels
    values = apply_modality_lut(pixels, ds).astype(np.float64)     # slope * stored + intercept (e.g. HU)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    first = lambda v: float(v[0]) if isinstance(v, pydicom.multival.MultiValue) else float(v)   # noqa: E731
    if center is not None and width is not None and first(width) > 0:
        lo, hi = first(center) - first(width) / 2, first(center) + first(width) / 2
    else:
        lo, hi = np.percentile(values, [0.5, 99.5])
        lo, hi = (lo, hi) if hi > lo else (values.min(), values.max())
    x = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        x = 1.0 - x
    return x.astype(np.float32)


def to_uint8(pixels):
    """uint8 as is; floats in [0, 1] times 255; wider data (16-bit) stretched to its own min..max."""
    if pixels.dtype == np.uint8:
        return pixels
    x = pixels.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(pixels.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def read_image(path, image_size, channels):
    """(1, C, S, S) float32 in [0, 1]: grayscale (or RGB), bilinear resize to S x S, pixels / 255."""
    if path.lower().endswith((".dcm", ".dicom")):
        pixels = dicom_pixels(path)
    else:
        with Image.open(path) as im:
            pixels = np.array(im if im.mode in ("L", "I", "I;16", "F", "RGB") else im.convert("RGB"))
    im = Image.fromarray(to_uint8(pixels)).convert("L" if channels == 1 else "RGB")
    x = np.asarray(im.resize((image_size, image_size), Image.BILINEAR), dtype=np.float32) / 255.0
    x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
    return x[None]


def main(model_path, image_path):
    session = ort.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    image = read_image(image_path, int(meta["image_size"]), int(meta["channels"]))
    prob = session.run(["probabilities"], {"image": image})[0][0]
    names = json.loads(meta["class_names"])
    thresholds = json.loads(meta["thresholds"]) if "thresholds" in meta else None
    print(f"{image_path} ({meta['task']}, temperature {meta['temperature']}):")
    for k, (name, p) in enumerate(zip(names, prob)):
        flag = "" if thresholds is None else ("  present" if p >= thresholds[k] else "")
        print(f"  {name} {p:.6f}{flag}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
