"""Images on disk -> tensors: readers, label files, splits, the decoded-image store, batch loaders,
augmentations, and the synthetic chest X-ray generator.

    python data_loader.py                                   # 500 synthetic images + labels.csv in ./data/medical_images
    python data_loader.py --num_images 200 --num_unlabeled 2000 --image_size 64 --output_dir ./data/small
    python data_loader.py --from_npz ../shared/data/breastmnist.npz --output_dir ./data/breastmnist
"""
import argparse
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from utils import UserError, sha256_file

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("train", "val", "test")


# ============ readers ============

def read_pixels(path: str) -> np.ndarray:
    """The stored pixel values of an image file, in their own dtype: (H, W) or (H, W, 3)."""
    if path.lower().endswith(".dcm"):
        raise UserError(f"{path}: DICOM reading is not available yet")
    with Image.open(path) as im:
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            return np.array(im).astype(np.uint16 if im.mode.startswith("I;16") else np.int32)
        if im.mode == "L":
            return np.array(im)
        return np.array(im.convert("RGB"))


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """Scale any pixel array to uint8; data wider than 8 bits is stretched to its own full range."""
    if pixels.dtype == np.uint8:
        return pixels
    x = pixels.astype(np.float64)
    lo, hi = float(x.min()), float(x.max())
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    return np.round((x - lo) / (hi - lo) * 255.0).astype(np.uint8)


def load_image(path: str) -> np.ndarray:
    """Any supported file as uint8, (H, W) for grayscale or (H, W, 3) for colour."""
    return to_uint8(read_pixels(path))


def list_images(data_dir: str) -> list[str]:
    """Every supported image under `data_dir`, recursively, as sorted relative paths."""
    if not os.path.isdir(data_dir):
        raise UserError(f"--data_dir {data_dir}: no such folder")
    found = []
    for root, dirs, files in os.walk(data_dir):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS) and name != "preview.png":
                found.append(os.path.relpath(os.path.join(root, name), data_dir))
    if not found:
        raise UserError(f"--data_dir {data_dir}: no images found (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return sorted(found)


# ============ label files and splits ============

@dataclass
class LabelTable:
    filenames: list          # relative to data_dir
    labels: np.ndarray       # (N,) int64 in [0, num_classes)
    splits: np.ndarray       # (N,) 'train' | 'val' | 'test'
    patient_ids: np.ndarray  # (N,) str; one id per image when the file has no patient_id column
    class_names: list
    sha256: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def indices(self, split: str) -> np.ndarray:
        if split == "all":
            return np.arange(len(self.filenames))
        return np.flatnonzero(self.splits == split)


def read_label_table(label_file: str, data_dir: str, num_classes: int | None = None, seed: int = 42,
                     val_fraction: float = 0.15, test_fraction: float = 0.15) -> LabelTable:
    """Read `filename,label[,split][,patient_id]` (header optional) and assign splits."""
    import pandas as pd

    if not os.path.isfile(label_file):
        raise UserError(f"--label_file {label_file}: no such file")
    first = open(label_file, encoding="utf-8-sig").readline().strip().lower()
    has_header = first.startswith("filename")
    df = pd.read_csv(label_file, header=0 if has_header else None, dtype=str, encoding="utf-8-sig")
    if not has_header:
        df.columns = ["filename", "label", "split", "patient_id"][: len(df.columns)]
    df = df.fillna("")
    if df.empty:
        raise UserError(f"--label_file {label_file}: no rows")
    raw = df["label"].str.strip()
    if raw.str.fullmatch(r"-?\d+").all():
        labels = raw.astype(np.int64).to_numpy()
        n = num_classes or int(labels.max()) + 1
        class_names = [str(i) for i in range(n)]
    else:
        class_names = sorted(raw.unique())
        labels = raw.map({c: i for i, c in enumerate(class_names)}).to_numpy().astype(np.int64)
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise UserError(f"--label_file {label_file}: label {bad} is outside [0, {num_classes}); "
                        f"check --num_classes")
    filenames = df["filename"].str.strip().tolist()
    missing = [f for f in filenames if not os.path.isfile(os.path.join(data_dir, f))]
    if missing:
        raise UserError(f"--label_file {label_file}: {len(missing)} file(s) not found under {data_dir}, "
                        f"first {missing[0]!r}")
    patients = df["patient_id"].str.strip().to_numpy() if "patient_id" in df else np.array(filenames)
    if "split" in df:
        splits = df["split"].str.strip().str.lower().to_numpy()
    else:
        splits = assign_splits(labels, patients, seed, val_fraction, test_fraction)
    return LabelTable(filenames, labels, splits.astype(str), patients.astype(str), class_names,
                      sha256_file(label_file))


def assign_splits(labels: np.ndarray, groups: np.ndarray, seed: int, val_fraction: float,
                  test_fraction: float) -> np.ndarray:
    """Stratified train/val/test split of whole groups (patients), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    group_ids, group_of = np.unique(groups, return_inverse=True)
    group_label = np.array([np.bincount(labels[group_of == g]).argmax() for g in range(len(group_ids))])
    for c in np.unique(group_label):
        members = rng.permutation(np.flatnonzero(group_label == c))
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        for split, part in (("test", members[:n_test]), ("val", members[n_test:n_test + n_val]),
                            ("train", members[n_test + n_val:])):
            splits[np.isin(group_of, part)] = split
    return splits.astype(str)


def stratified_subset(labels: np.ndarray, indices: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A stratified, seeded fraction of `indices` with at least one image of every class present."""
    if fraction >= 1.0:
        return np.sort(indices)
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == c])
        chosen.append(members[: max(1, int(round(len(members) * fraction)))])
    return np.sort(np.concatenate(chosen))


# ============ decoded images and batches ============

def decode_to_tensor(path: str, image_size: int, channels: int) -> torch.Tensor:
    """Read, convert to `channels`, resize to image_size x image_size: uint8 (C, S, S)."""
    pixels = load_image(path)
    im = Image.fromarray(pixels)
    im = im.convert("L" if channels == 1 else "RGB").resize((image_size, image_size), Image.BILINEAR)
    arr = np.asarray(im)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(arr))


class ImageStore(torch.utils.data.Dataset):
    """Images decoded once to uint8 (C, S, S); kept in RAM when they fit in `cache_gb`."""

    def __init__(self, root: str, filenames: list, image_size: int, cache_gb: float = 4.0,
                 channels: int | None = None, skip_unreadable: bool = False):
        self.root, self.filenames, self.image_size = root, list(filenames), image_size
        self.channels = channels or self._guess_channels()
        need_gb = len(self.filenames) * self.channels * image_size * image_size / 2**30
        self.in_memory = need_gb <= cache_gb
        self.images = None
        if self.in_memory:
            decoded = [self._decode_or_none(i, skip_unreadable) for i in range(len(self.filenames))]
            skipped = [f for f, t in zip(self.filenames, decoded) if t is None]
            if skipped:
                print(f"warning: skipped {len(skipped)} unreadable image(s): {', '.join(skipped[:5])}"
                      f"{' ...' if len(skipped) > 5 else ''}", file=sys.stderr)
                self.filenames = [f for f, t in zip(self.filenames, decoded) if t is not None]
            if not self.filenames:
                raise UserError(f"{root}: none of the images could be read")
            self.images = torch.stack([t for t in decoded if t is not None])

    def _decode_or_none(self, i: int, skip_unreadable: bool):
        try:
            return self._decode(i)
        except (OSError, ValueError, UserError) as e:
            if skip_unreadable:
                return None
            raise UserError(f"{os.path.join(self.root, self.filenames[i])}: cannot read this image ({e})")

    def _guess_channels(self) -> int:
        sample = self.filenames[: 16]
        colour = any(load_image(os.path.join(self.root, f)).ndim == 3 and not _is_gray(os.path.join(self.root, f))
                     for f in sample)
        return 3 if colour else 1

    def _decode(self, i: int) -> torch.Tensor:
        return decode_to_tensor(os.path.join(self.root, self.filenames[i]), self.image_size, self.channels)

    def __len__(self):
        return len(self.filenames)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i] if self.images is not None else self._decode(i)


def _is_gray(path: str) -> bool:
    arr = load_image(path)
    return arr.ndim == 2 or (np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 0], arr[..., 2]))


class BatchLoader:
    """Yields (images uint8 (B, C, S, S), labels int64 (B,), indices int64 (B,)) over `indices`.

    In-memory stores are sliced directly (no per-image collation); streaming stores go through a
    DataLoader with workers. `set_epoch` reshuffles deterministically; rank/world shard the epoch.
    """

    def __init__(self, store: ImageStore, indices, labels=None, batch_size: int = 64, shuffle: bool = False,
                 drop_last: bool = False, seed: int = 0, num_workers: int = 0, rank: int = 0, world_size: int = 1,
                 pin_memory: bool = False):
        self.store, self.indices = store, torch.as_tensor(np.asarray(indices), dtype=torch.int64)
        self.labels = torch.as_tensor(np.asarray(labels if labels is not None else np.full(len(store), -1)),
                                      dtype=torch.int64)
        self.batch_size, self.shuffle, self.drop_last, self.seed = batch_size, shuffle, drop_last, seed
        self.num_workers, self.rank, self.world_size, self.pin_memory = num_workers, rank, world_size, pin_memory
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        order = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = order[torch.randperm(len(order), generator=g)]
        if self.world_size > 1:  # every rank gets the same number of images (pad by wrapping)
            per_rank = -(-len(order) // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - len(order)]])
            order = order[self.rank::self.world_size]
        return order

    def _batches(self):
        order = self._order()
        stop = len(order) - (len(order) % self.batch_size if self.drop_last else 0)
        return [order[i:i + self.batch_size] for i in range(0, stop, self.batch_size)]

    def __len__(self):
        return len(self._batches())

    def __iter__(self):
        batches = self._batches()
        if self.store.in_memory:
            for idx in batches:
                images = self.store.images[idx]
                yield (images.pin_memory() if self.pin_memory else images), self.labels[idx], idx
            return
        loader = torch.utils.data.DataLoader(
            self.store, batch_sampler=[b.tolist() for b in batches], num_workers=self.num_workers,
            pin_memory=self.pin_memory, persistent_workers=False)
        for idx, images in zip(batches, loader):
            yield images, self.labels[idx], idx


# ============ augmentations ============

AUGMENT_MODES = ("batch", "pil")  # --augment: whole batches on the device, or torchvision per image (reference)


@dataclass
class AugmentConfig:
    """Parameters of the augmentation pipelines (the spec's values are the defaults of SSL_AUGMENT)."""
    crop_scale: tuple = (0.8, 1.0)  # area fraction of the crop, uniform
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio w/h, log-uniform
    hflip_p: float = 0.5
    rotation: float = 15.0       # degrees, uniform in [-rotation, rotation], zero fill
    brightness: float = 0.3      # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.3        # factor uniform in [1 - c, 1 + c], blended with the grayscale mean
    blur_p: float = 0.3
    blur_sigma: tuple = (0.1, 2.0)  # at 224 px; scaled with the image size


SSL_AUGMENT = AugmentConfig()
SUPERVISED_AUGMENT = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=10.0, brightness=0.2,
                                   contrast=0.2, blur_p=0.0)
CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 crops, then falls back to a centre crop
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # torchvision's rgb_to_grayscale, used for the contrast mean


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side (SimCLR), odd, at least 3."""
    k = max(3, int(round(image_size * 0.1)))
    return k + 1 - k % 2


def blur_sigma_range(config: AugmentConfig, image_size: int) -> tuple:
    """The spec's sigma range is for 224 px; a fixed 23 px kernel with sigma 2 erases a 32 px image,
    so the sigma scales with the side and blurs every size as much as 224 px would be blurred."""
    return tuple(s * image_size / 224.0 for s in config.blur_sigma)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 1] float (B, C, S, S), C in {1, 3} -> ImageNet-normalised float (B, 3, S, S)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std  # a 1-channel batch broadcasts to 3 channels here


class BatchAugment(nn.Module):
    """Augment a whole batch on its own device with per-sample random parameters, in the order of
    the spec's PIL pipeline (build_pil_transform) and with the same parameter distributions:

    crop (RandomResizedCrop), flip and rotation (zero fill) -> one affine warp, one grid_sample;
    brightness and contrast in a random order per sample (ColorJitter), clamped after each;
    Gaussian blur with probability blur_p, sigma per sample; ImageNet normalisation.

    forward(images: uint8 (B, C, H, W) or float in [0, 1], C in {1, 3}, generator=None)
    -> float (B, 3, S, S). A 1-channel batch stays 1-channel until the normalisation.
    """

    def __init__(self, config: AugmentConfig, image_size: int, channels_last: bool = False):
        super().__init__()
        self.config, self.image_size, self.channels_last = config, image_size, channels_last
        self.kernel_size = blur_kernel_size(image_size)
        self.sigma_range = blur_sigma_range(config, image_size)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply(images, {k: v.to(images.device, non_blocking=True) for k, v in params.items()})

    def sample_params(self, b: int, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """Per-sample parameters as CPU tensors (B,), drawn in one call from `generator` (default: torch's
        global RNG), so a seed gives the same augmentations on every device."""
        c, n = self.config, CROP_ATTEMPTS
        u = torch.rand(b, 2 * n + 9, generator=generator, dtype=torch.float64,
                       device=generator.device if generator is not None else "cpu").cpu()
        crop = self._crop(u[:, :n], u[:, n:2 * n], height, width)
        off_x, off_y, flip, angle, bright, contrast, order, blur, sigma = u[:, 2 * n:].unbind(1)
        return dict(
            crop_w=crop[0].float(), crop_h=crop[1].float(),                    # fractions of the side
            crop_cx=((1 - crop[0]) * (2 * off_x - 1)).float(),                # normalised centre, crop inside
            crop_cy=((1 - crop[1]) * (2 * off_y - 1)).float(),
            flip=flip < c.hflip_p,
            angle=_lerp(angle, -c.rotation, c.rotation).float(),                # degrees, counter-clockwise
            brightness=_lerp(bright, max(0.0, 1 - c.brightness), 1 + c.brightness).float(),
            contrast=_lerp(contrast, max(0.0, 1 - c.contrast), 1 + c.contrast).float(),
            contrast_first=order < 0.5,
            blur=blur < c.blur_p,
            sigma=_lerp(sigma, *self.sigma_range).float(),                      # output pixels
        )

    def _crop(self, u_scale, u_ratio, height, width):
        """RandomResizedCrop.get_params, vectorised: the first of 10 candidates (area fraction uniform,
        aspect log-uniform) that fits inside the image, else torchvision's centre-crop fallback.
        Sizes stay continuous (sub-pixel) instead of rounded. Returns width and height fractions."""
        c = self.config
        area = c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u_scale          # (B, 10)
        lo, hi = np.log(c.crop_ratio[0]), np.log(c.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u_ratio)                                      # w/h in pixels
        fw = torch.sqrt(area * ratio * height / width)
        fh = torch.sqrt(area / ratio * width / height)
        ok = (fw <= 1) & (fh <= 1)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)                           # first that fits
        in_ratio = width / height
        fallback = ((1.0, in_ratio / c.crop_ratio[0]) if in_ratio < c.crop_ratio[0] else
                    (c.crop_ratio[1] / in_ratio, 1.0) if in_ratio > c.crop_ratio[1] else (1.0, 1.0))
        any_ok = ok.any(dim=1)
        fw = torch.where(any_ok, fw.gather(1, first).squeeze(1), fallback[0])
        fh = torch.where(any_ok, fh.gather(1, first).squeeze(1), fallback[1])
        return fw, fh

    def apply(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The augmentation with given parameters (see sample_params), on the device of `images`."""
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        x = self._warp(x, p)                                                # (B, C, S, S), new tensor
        x = self._jitter(x, p)
        if self.config.blur_p > 0:
            x = self._blur_subset(x, p)
        return self._normalize(x)

    def _warp(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Output pixel o (normalised, [-1, 1]^2) shows the cropped image at q = flip(R(-angle) o), which
        is the input at centre + (w, h) * q; q outside [-1, 1]^2 was outside the crop: zero, as
        RandomRotation fills. Crop, flip and rotation cost one bilinear resampling instead of three."""
        b, s = x.shape[0], self.image_size
        a = p["angle"] * (np.pi / 180)
        cos, sin = a.cos(), a.sin()
        sign = 1 - 2 * p["flip"].to(x.dtype)
        zero = torch.zeros_like(cos)
        theta = torch.stack([cos * sign, -sin * sign, zero, sin, cos, zero], dim=1).view(b, 2, 3)
        q = F.affine_grid(theta, [b, 1, s, s], align_corners=False)       # (B, S, S, 2)
        size = torch.stack([p["crop_w"], p["crop_h"]], dim=1).view(b, 1, 1, 2)
        centre = torch.stack([p["crop_cx"], p["crop_cy"]], dim=1).view(b, 1, 1, 2)
        grid = torch.addcmul(centre, q, size)
        if self.config.rotation > 0:
            grid.masked_fill_(q.abs().amax(dim=-1, keepdim=True) > 1, -2.0)  # -2 is off the image: zero
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _jitter(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """ColorJitter(brightness, contrast): the two in a random order per sample, each clamped to [0, 1].
        Both are x -> clamp(f * x + (1 - f) * target); brightness blends with black, contrast with the
        image's grayscale mean, so one pass per step serves both orders."""
        b = x.shape[0]
        first = p["contrast_first"]
        f1 = torch.where(first, p["contrast"], p["brightness"]).view(b, 1, 1, 1)
        f2 = torch.where(first, p["brightness"], p["contrast"]).view(b, 1, 1, 1)
        t1 = torch.where(first.view(b, 1, 1, 1), _gray_mean(x), 0.0)
        x = (x * f1).add_(t1 * (1 - f1)).clamp_(0, 1)
        t2 = torch.where(first.view(b, 1, 1, 1), 0.0, _gray_mean(x))
        return x.mul_(f2).add_(t2 * (1 - f2)).clamp_(0, 1)

    def _blur_subset(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Blur only the chosen samples (a third of the batch). nonzero() waits for the device once per
        batch, as the training loop's loss.item() does anyway."""
        idx = p["blur"].nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        return x.index_copy_(0, idx, gaussian_blur_batch(x.index_select(0, idx), p["sigma"][idx], self.kernel_size))

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation as one multiply-add that also expands 1 channel to 3."""
        b, _, h, w = x.shape
        inv_std = torch.tensor([1 / s for s in IMAGENET_STD], device=x.device).view(1, 3, 1, 1)
        shift = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)], device=x.device).view(1, 3, 1, 1)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((b, 3, h, w), device=x.device, memory_format=fmt)
        return torch.addcmul(shift, x, inv_std, out=out)


def _lerp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * t


def _gray_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of the grayscale image per sample: (B, C, H, W) -> (B, 1, 1, 1)."""
    m = x.mean(dim=(2, 3), keepdim=True)
    if x.shape[1] == 3:
        m = (m * torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return m


def gaussian_blur_batch(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """torchvision's gaussian_blur (reflect padding, separable kernel) with one sigma per sample.

    Each 1-D blur is a banded (S, S) matrix with the reflection folded in, so the two passes are
    two batched matmuls (BLAS) instead of a depthwise convolution with B*C groups.
    x: (B, C, H, W) float, sigma: (B,) -> (B, C, H, W)."""
    rows = _blur_matrix(sigma, kernel_size, x.shape[-2], x.dtype)          # (B, H, H)
    cols = rows if x.shape[-1] == x.shape[-2] else _blur_matrix(sigma, kernel_size, x.shape[-1], x.dtype)
    return rows.unsqueeze(1) @ x @ cols.transpose(1, 2).unsqueeze(1)


def _blur_matrix(sigma: torch.Tensor, k: int, n: int, dtype) -> torch.Tensor:
    """(B, n, n) matrices M with (M @ v)[i] = sum_j g_j v[reflect(i + j - k // 2)]."""
    r = k // 2
    taps = torch.arange(k, device=sigma.device, dtype=dtype) - r
    g = torch.exp(-0.5 * (taps / sigma.to(dtype).view(-1, 1)) ** 2)
    g = g / g.sum(dim=1, keepdim=True)                                     # (B, k)
    src = torch.arange(n, device=sigma.device).view(n, 1) + taps.long().view(1, k)
    src = src.abs()                                                        # reflect at 0 (no edge repeat)
    src = torch.where(src > n - 1, 2 * (n - 1) - src, src).clamp(0, n - 1)
    m = torch.zeros(sigma.shape[0], n, n, device=sigma.device, dtype=dtype)
    return m.scatter_add_(2, src.expand(sigma.shape[0], n, k), g.view(-1, 1, k).expand(-1, n, k))


# ============ the PIL reference pipeline ============

def _three_channels(x: torch.Tensor) -> torch.Tensor:
    """(1, S, S) -> (3, S, S); a module-level function so DataLoader workers can pickle it."""
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def build_pil_transform(config: AugmentConfig, image_size: int):
    """torchvision per-image pipeline of the spec: PIL image -> normalised float (3, S, S). The reference
    that BatchAugment matches in distribution (rotation bilinear, as BatchAugment's one resampling)."""
    from torchvision import transforms as T

    if tuple(config.crop_scale) == (1.0, 1.0):
        steps = [T.Resize((image_size, image_size))]   # the supervised "resize to S x S"
    else:
        steps = [T.RandomResizedCrop(image_size, scale=config.crop_scale, ratio=config.crop_ratio)]
    steps += [T.RandomHorizontalFlip(config.hflip_p),
              T.RandomRotation(config.rotation, interpolation=T.InterpolationMode.BILINEAR, fill=0),
              T.ColorJitter(brightness=config.brightness, contrast=config.contrast)]
    if config.blur_p > 0:
        blur = T.GaussianBlur(blur_kernel_size(image_size), sigma=blur_sigma_range(config, image_size))
        steps.append(T.RandomApply([blur], p=config.blur_p))
    steps += [T.ToTensor(), T.Lambda(_three_channels), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


def eval_pil_transform(image_size: int):
    """PIL image -> resized, normalised float (3, S, S), no randomness."""
    from torchvision import transforms as T

    return T.Compose([T.Resize((image_size, image_size)), T.ToTensor(), T.Lambda(_three_channels),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class PILTwoViewDataset(torch.utils.data.Dataset):
    """The classic SimCLR data path: decode the file and augment it twice, per image, on every access.
    __getitem__(i) -> (view1, view2), each float (3, S, S)."""

    def __init__(self, root: str, filenames: list, transform):
        self.root, self.filenames, self.transform = root, list(filenames), transform

    def __len__(self):
        return len(self.filenames)

    def __getitem__(self, i: int):
        im = Image.fromarray(load_image(os.path.join(self.root, self.filenames[i])))
        return self.transform(im), self.transform(im)


# ============ synthetic chest X-rays ============


# ============ MedMNIST import ============


# ============ command line ============

def main(args):
    raise UserError("the data generator is not written yet")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", default="./data/medical_images", help="folder for the images and labels.csv")
    p.add_argument("--num_images", type=int, default=500, help="labelled synthetic images")
    p.add_argument("--num_unlabeled", type=int, default=0, help="extra synthetic images with no label row")
    p.add_argument("--num_classes", type=int, default=3, help="number of findings (classes)")
    p.add_argument("--image_size", type=int, default=224, help="side of the square images in pixels")
    p.add_argument("--seed", type=int, default=42, help="random seed; the same seed gives identical files")
    p.add_argument("--from_npz", default=None, help="import a MedMNIST-style .npz instead of generating")
    return p


if __name__ == "__main__":
    from utils import run_cli
    run_cli(main, get_args_parser())
