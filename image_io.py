"""Image files -> pixels: PNG, JPEG, BMP, TIFF (8/16/32-bit) and DICOM readers, conversion to uint8,
folder listing, decoding to a resized uint8 tensor, and the ImageNet normalisation. A prepared folder
(prepared_images.py) answers for its source in list_images, filter_readable, decode_files and source_sizes.

    from images import list_images, load_image, decode_to_tensor
"""
import os
import sys
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from utils import UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")

IMAGENET_MEAN = (0.485, 0.456, 0.406)

IMAGENET_STD = (0.229, 0.224, 0.225)


def read_pixels(path: str) -> np.ndarray:
    """The stored pixel values of an image file: (H, W) or (H, W, 3).

    Bitmaps keep their own dtype (uint8, uint16 for 16-bit PNG/TIFF, int32 or float32 for 32-bit
    TIFF); alpha is dropped and palettes are expanded. DICOM returns the modality-rescaled,
    VOI-windowed image as float32 in [0, 1] (MONOCHROME1 inverted), or uint8 RGB for colour.
    """
    if path.lower().endswith(".dcm"):
        return _read_dicom(path)
    try:
        with Image.open(path) as im:
            im.seek(0)                      # first page of a multi-page TIFF
            return _pil_pixels(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UserError(f"{path}: not a readable image ({_reason(e)}); re-export it or remove it from the data")


def _pil_pixels(im: Image.Image) -> np.ndarray:
    if im.mode.startswith("I;16"):
        return np.array(im).astype(np.uint16)
    if im.mode in ("I", "F", "L"):
        return np.array(im)
    if im.mode in ("1", "LA", "La"):
        return np.array(im.convert("L"))
    if im.mode == "P":
        im = im.convert("RGBA")         # expands the palette, with its transparency if any
        if _palette_is_gray(im):
            return np.array(im.convert("L"))
    return np.array(im.convert("RGB"))


def _palette_is_gray(im: Image.Image) -> bool:
    """A palette image whose colours are all grays reads as (H, W), like the grayscale it is."""
    rgb = np.asarray(im)[..., :3]
    return bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all())


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:120]


def _read_dicom(path: str) -> np.ndarray:
    """Modality LUT, then the stored window (else a 0.5-99.5 percentile one); colour stays RGB."""
    try:
        import pydicom
        from pydicom.pixels import apply_color_lut, apply_modality_lut  # noqa: F401  (pydicom >= 3 needed)
    except ImportError:
        raise UserError(f"{path}: reading DICOM needs pydicom; run `pip install pydicom`")
    try:
        return _dicom_pixels(pydicom.dcmread(path))
    except Exception as e:  # pydicom raises many types for truncated, compressed or non-DICOM files,
        # and a damaged header (frame count, LUT, window) fails in numpy or float() instead
        raise UserError(f"{path}: not a readable DICOM image ({_reason(e)}); re-export it or remove it "
                        f"from the data (compressed files may need `pip install pylibjpeg`)")


def _dicom_pixels(ds) -> np.ndarray:
    """The decoded frame (the middle one of several), LUTs and window applied."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    pixels = ds.pixel_array
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[len(pixels) // 2]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        pixels = apply_color_lut(pixels, ds)
    if pixels.ndim == 3:                   # pydicom already converted YBR to RGB
        return to_uint8(pixels)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    lo, hi = _dicom_window(ds, values)
    x = np.clip((values - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    if photometric == "MONOCHROME1":       # 0 means white in MONOCHROME1
        x = 1.0 - x
    return x.astype(np.float32)


def _dicom_window(ds, values: np.ndarray) -> tuple:
    """(low, high) from WindowCenter/WindowWidth (first of several), else robust percentiles."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c, w = _first_value(center), _first_value(width)
        if w > 0:
            return c - w / 2, c + w / 2
    lo, hi = np.percentile(values, [0.5, 99.5])
    return (float(lo), float(hi)) if hi > lo else (float(values.min()), float(values.max()))


def _first_value(v) -> float:
    return float(v[0]) if isinstance(v, Sequence) else float(v)


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Any pixel array as uint8: floats in [0, 1] (windowed DICOM) map to 0-255; other wider data
    is stretched to its own min..max, so 16-bit images use the full range instead of clipping at 255."""
    if pixels.dtype == np.uint8:
        return pixels
    x = pixels.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():                   # float TIFFs may hold NaN/inf: range from the finite pixels,
        if not finite.any():               # NaN shown as black, +inf white, -inf black
            return np.zeros(pixels.shape, np.uint8)
        lo, hi = float(x[finite].min()), float(x[finite].max())
        x = np.where(np.isnan(x), lo, np.clip(x, lo, hi))
    lo, hi = float(x.min()), float(x.max())
    if np.issubdtype(pixels.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    """Any supported file as uint8, (H, W) for grayscale or (H, W, 3) for colour."""
    return to_uint8(read_pixels(path))


def list_images(data_dir: str, flag: str = "--data_dir") -> list[str]:
    """Every supported image under `data_dir`, recursively, as sorted relative paths ('/'-separated); `flag`:
    the command-line flag that named the folder, for the messages.

    Hidden files (editor and macOS `._` droppings) and this tool's own preview.png are left out."""
    if not os.path.isdir(data_dir):
        raise UserError(f"{flag} {data_dir}: no such folder; check the path")
    prepared = prepared_folder(data_dir)
    if prepared is not None:
        return list(prepared.filenames)
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and name != "preview.png" and not name.startswith("."):
                found.append(os.path.relpath(os.path.join(root, name), data_dir).replace(os.sep, "/"))
    if not found:
        raise UserError(f"{flag} {data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)} "
                        f"in it and its subfolders)")
    return sorted(found)


def prepared_folder(root: str):
    """The opened prepared folder at `root` (prepared_images.PreparedImages), or None for a folder of image files.

    A prepared folder stands in for its source wherever a folder of images is read."""
    from prepared_images import open_prepared     # it decodes with this module's readers
    return open_prepared(root) if os.path.isdir(root) else None


def filter_readable(root: str, filenames: list, quiet: bool = False) -> tuple[list, list]:
    """(readable, skipped) filenames, decoding each once (a prepared folder knows them); prints one warning
    naming the skipped ones.

    For unlabelled folders, where a corrupt file should not stop pretraining. Labelled data must not
    be filtered silently: ImageStore raises a UserError naming the file instead."""
    prepared = prepared_folder(root)
    kept, skipped = [], []
    for name in filenames:
        if prepared is not None:
            readable = name not in prepared.unreadable
        else:
            try:
                check_image_size(load_image(os.path.join(root, name)), name)
                readable = True
            except UserError:
                readable = False
        (kept if readable else skipped).append(name)
    if skipped and not quiet:
        shown = ", ".join(skipped[:5]) + (f" and {len(skipped) - 5} more" if len(skipped) > 5 else "")
        print(f"warning: skipped {len(skipped)} unreadable image(s) under {root}: {shown}", file=sys.stderr)
    return kept, skipped


def list_readable_images(data_dir: str) -> list[str]:
    """The unlabelled dataset: every readable image under `data_dir` (corrupt ones skipped with a warning)."""
    kept, _ = filter_readable(data_dir, list_images(data_dir))
    if not kept:
        raise UserError(f"--data_dir {data_dir}: none of the images could be read; check the files")
    return kept


MIN_IMAGE_SIDE = 8   # pixels: a smaller "image" (a 1x1 placeholder, an icon) upsampled is a flat square


def check_image_size(pixels: np.ndarray, path: str) -> np.ndarray:
    """`pixels` when both sides are at least MIN_IMAGE_SIDE, else a UserError naming the file."""
    h, w = pixels.shape[:2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise UserError(f"{path}: the image is {w}x{h} pixels, too small to learn from (at least {MIN_IMAGE_SIDE} "
                        f"px a side); remove it from the data (a placeholder or an icon?)")
    return pixels


def decode_to_tensor(path: str, image_size: int, channels: int) -> torch.Tensor:
    """Read, convert to `channels`, resize to image_size x image_size: uint8 (C, S, S)."""
    return torch.from_numpy(resize_pixels(check_image_size(load_image(path), path), image_size, channels))


def resize_pixels(pixels: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 pixels (H, W) or (H, W, 3) converted to `channels` and resized: uint8 (C, S, S)."""
    im = Image.fromarray(pixels)
    im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    arr = np.array(im)                      # a writable copy; PIL's buffer is read-only
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def decode_files(root: str, filenames: list, image_size: int, channels: int) -> torch.Tensor:
    """decode_to_tensor of each of `filenames` under `root` (or their rows of a prepared folder): uint8 (N, C, S, S)."""
    prepared = prepared_folder(root)
    if prepared is not None:
        prepared.check_side(image_size)
        return torch.from_numpy(prepared.read(prepared.positions(filenames), channels))
    if not filenames:
        return torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8)
    return torch.stack([decode_to_tensor(os.path.join(root, f), image_size, channels) for f in filenames])


def source_sizes(root: str, filenames: list) -> list:
    """(width, height) of each file as stored (a prepared folder recorded them)."""
    prepared = prepared_folder(root)
    if prepared is not None:
        return [prepared.sizes[i] for i in prepared.positions(filenames)]
    sizes = []
    for f in filenames:
        with Image.open(os.path.join(root, f)) as im:
            sizes.append(im.size)
    return sizes


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, C, S, S), C in {1, 3} -> ImageNet-normalised float (B, 3, S, S)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std  # a 1-channel batch broadcasts to 3 channels here
