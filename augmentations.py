"""Augmentations: BatchAugment (whole batches on the device, per-sample parameters; what the trainers use)
and the torchvision per-image reference pipeline it matches in distribution (--augment pil).
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from image_io import IMAGENET_MEAN, IMAGENET_STD, load_image

AUGMENT_MODES = ("batch", "pil")  # --augment: whole batches on the device, or torchvision per image (reference)

ROTATION_FILLS = ("zeros", "reflection")  # what fills the corners a rotation brings in (AugmentConfig.rotation_fill)


@dataclass
class AugmentConfig:
    """Parameters of the augmentation pipelines (the spec's values are the defaults of SSL_AUGMENT)."""
    crop_scale: tuple = (0.8, 1.0)  # area fraction of the crop, uniform
    crop_ratio: tuple = (3 / 4, 4 / 3)  # crop aspect ratio w/h, log-uniform
    hflip_p: float = 0.5
    rotation: float = 15.0       # degrees, uniform in [-rotation, rotation]
    rotation_fill: str = "zeros"  # corners rotated in from outside: "zeros" (RandomRotation's) or "reflection"
    brightness: float = 0.3      # factor uniform in [1 - b, 1 + b]
    contrast: float = 0.3        # factor uniform in [1 - c, 1 + c], blended with the grayscale mean
    blur_p: float = 0.3
    blur_sigma: tuple = (0.1, 2.0)  # at 224 px; scaled with the image size
    gamma: float = 0.0           # exponent log-uniform in [1 / (1 + g), 1 + g]; 0: off (the spec has none)


SSL_AUGMENT = AugmentConfig()

SUPERVISED_AUGMENT = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), rotation=10.0, brightness=0.2,
                                   contrast=0.2, blur_p=0.0)

CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 crops, then falls back to a centre crop

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale, used for the contrast mean


def blur_kernel_size(image_size: int) -> int:
    """About 10% of the image side (SimCLR), odd, at least 3."""
    k = max(3, int(round(image_size * 0.1)))
    return k + 1 - k % 2


def blur_sigma_range(config: AugmentConfig, image_size: int) -> tuple:
    """The spec's sigma range is for 224 px; a fixed 23 px kernel with sigma 2 erases a 32 px image,
    so the sigma scales with the side and blurs every size as much as 224 px would be blurred."""
    return tuple(s * image_size / 224.0 for s in config.blur_sigma)


class BatchAugment(nn.Module):
    """Augment a whole batch on its own device with per-sample random parameters, in the order of
    the spec's PIL pipeline (build_pil_transform) and with the same parameter distributions:

    crop (RandomResizedCrop), flip and rotation (zero fill) -> one affine warp, one grid_sample;
    brightness and contrast in a random order per sample (ColorJitter), clamped after each;
    with config.gamma > 0, a random gamma (x ** g, the grayscale stand-in for SimCLR's colour distortion);
    Gaussian blur with probability blur_p, sigma per sample; ImageNet normalisation.

    forward(images: uint8 (B, C, H, W) or float in [0, 1], C in {1, 3}, generator=None)
    -> float (B, 3, S, S). A 1-channel batch stays 1-channel until the normalisation.

    With a generator on the images' device (a CUDA one) the parameters are drawn there and never
    visit the host: nothing in the call waits for the GPU, and the call can be captured in a CUDA
    graph (train_ssl.py --cuda_graphs on). The constants it needs are made once per device.
    """

    def __init__(self, config: AugmentConfig, image_size: int, channels_last: bool = False):
        super().__init__()
        self.config, self.image_size, self.channels_last = config, image_size, channels_last
        self.kernel_size = blur_kernel_size(image_size)
        self.sigma_range = blur_sigma_range(config, image_size)
        self._constants = {}      # device -> tensors: made while capturing, a host-to-device copy would fail

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        params = self.sample_params(images.shape[0], images.shape[-2], images.shape[-1], generator)
        return self.apply_params(images, _to_device(params, images.device))

    def sample_params(self, b: int, height: int, width: int, generator: torch.Generator | None = None) -> dict:
        """Per-sample parameters (B,) drawn from `generator`, on its device (default: torch's global CPU
        RNG, so a seed gives the same augmentations whatever the images' device). The same code draws
        on every device: only the random stream differs between a CPU and a CUDA generator."""
        c, n = self.config, CROP_ATTEMPTS
        device = generator.device if generator is not None else torch.device("cpu")
        dtype = torch.float32 if device.type == "mps" else torch.float64      # MPS has no float64
        u = torch.rand(b, 2 * n + 9, generator=generator, dtype=dtype, device=device)
        off_x, off_y, flip, angle, bright, contrast, order, blur, sigma = u[:, 2 * n:].unbind(1)
        crop_w, crop_h, crop_cx, crop_cy = self._crop(u[:, :n], u[:, n:2 * n], off_x, off_y, height, width)
        extra = {}
        if c.gamma > 0:   # drawn after the others, so turning it on leaves their values for a seed as they were
            u_gamma = torch.rand(b, generator=generator, dtype=dtype, device=device)
            extra["gamma"] = torch.exp(_lerp(u_gamma, -np.log1p(c.gamma), np.log1p(c.gamma))).float()
        return dict(**extra,
                    crop_w=crop_w.float(), crop_h=crop_h.float(), crop_cx=crop_cx.float(), crop_cy=crop_cy.float(),
                    flip=flip < c.hflip_p,
                    angle=_lerp(angle, -c.rotation, c.rotation).float(),                # degrees, counter-clockwise
                    brightness=_lerp(bright, max(0.0, 1 - c.brightness), 1 + c.brightness).float(),
                    contrast=_lerp(contrast, max(0.0, 1 - c.contrast), 1 + c.contrast).float(),
                    contrast_first=order < 0.5,
                    blur=blur < c.blur_p,
                    sigma=_lerp(sigma, *self.sigma_range).float(),                      # output pixels
        )

    def _crop(self, u_scale, u_ratio, u_x, u_y, height, width):
        """RandomResizedCrop.get_params, vectorised: the first of 10 candidates (area fraction uniform,
        aspect log-uniform, sides rounded to whole pixels) that fits inside the image, else torchvision's
        centre-crop fallback; the offset is a whole pixel, uniform over every position that fits.
        Returns the crop's width, height (fractions of the side) and centre (normalised, [-1, 1])."""
        c = self.config
        area = height * width * (c.crop_scale[0] + (c.crop_scale[1] - c.crop_scale[0]) * u_scale)  # (B, 10)
        lo, hi = np.log(c.crop_ratio[0]), np.log(c.crop_ratio[1])
        ratio = torch.exp(lo + (hi - lo) * u_ratio)
        w, h = torch.sqrt(area * ratio).round(), torch.sqrt(area / ratio).round()
        ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        first = ok.to(torch.uint8).argmax(dim=1, keepdim=True)
        in_ratio = width / height
        fallback = ((width, round(width / c.crop_ratio[0])) if in_ratio < c.crop_ratio[0] else
                    (round(height * c.crop_ratio[1]), height) if in_ratio > c.crop_ratio[1] else (width, height))
        any_ok = ok.any(dim=1)
        w = torch.where(any_ok, w.gather(1, first).squeeze(1), float(fallback[0]))
        h = torch.where(any_ok, h.gather(1, first).squeeze(1), float(fallback[1]))
        left = torch.where(any_ok, torch.floor(u_x * (width - w + 1)), (width - w) // 2)
        top = torch.where(any_ok, torch.floor(u_y * (height - h + 1)), (height - h) // 2)
        return w / width, h / height, (2 * left + w) / width - 1, (2 * top + h) / height - 1

    def apply_params(self, images: torch.Tensor, p: dict) -> torch.Tensor:
        """The augmentation with given parameters (see sample_params), on the device of `images`.
        (Not `apply`: nn.Module.apply(fn) must keep working.)
        Always fp32, also inside the trainer's autocast: bf16 keeps 8 bits, no more than the uint8 input
        it came from, and on a CPU without bf16 instructions it is slower."""
        with torch.autocast(images.device.type, enabled=False):
            scale = 1 / 255 if images.dtype == torch.uint8 else 1.0  # folded into the jitter: one pass less
            x = self._warp(images.float(), p)                               # (B, C, S, S), new tensor
            x = self._jitter(x, p, scale)
            if "gamma" in p:
                x = x.clamp_(min=1e-8).pow_(p["gamma"].view(-1, 1, 1, 1))
            if self.config.blur_p > 0:
                x = self._blur_subset(x, p)
            return self._normalize(x)

    def _warp(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Output pixel o (normalised, [-1, 1]^2) shows the cropped image at q = flip(R(-angle) o), which
        is the input at centre + (w, h) * q; q outside [-1, 1]^2 was outside the crop: zero, as
        RandomRotation fills (rotation_fill "reflection": the image there, mirrored at its edges).
        Crop, flip and rotation cost one bilinear resampling instead of three."""
        b, s = x.shape[0], self.image_size
        a = p["angle"] * (np.pi / 180)
        cos, sin = a.cos(), a.sin()
        sign = 1 - 2 * p["flip"].to(x.dtype)
        rot_t = torch.stack([cos * sign, sin, -sin * sign, cos], dim=1).view(b, 2, 2)   # (flip R)^T
        # pixel centres, as affine_grid(align_corners=False) makes them, but (S*S, 2) instead of (B, S, S, 3)
        t = (torch.arange(s, device=x.device, dtype=x.dtype) * 2 + 1) / s - 1
        base = torch.stack(torch.meshgrid(t, t, indexing="xy"), dim=-1).view(1, s * s, 2)
        q = (base @ rot_t).view(b, s, s, 2)                                # (B, S, S, 2)
        size = torch.stack([p["crop_w"], p["crop_h"]], dim=1).view(b, 1, 1, 2)
        centre = torch.stack([p["crop_cx"], p["crop_cy"]], dim=1).view(b, 1, 1, 2)
        grid = torch.addcmul(centre, q, size)
        if self.config.rotation_fill == "reflection":                     # the image mirrored at its edges
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if self.config.rotation > 0:
            outside = q.abs().amax(dim=-1, keepdim=True) > 1   # vector_norm(inf): much slower (docs/performance.md)
            grid.masked_fill_(outside, -2.0)                                # -2 is off the image: zero
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def _jitter(self, x: torch.Tensor, p: dict, scale: float = 1.0) -> torch.Tensor:
        """ColorJitter(brightness, contrast) on scale * x: the two in a random order per sample, each
        clamped to [0, 1]. Both are x -> clamp(f * x + (1 - f) * target); brightness blends with black,
        contrast with the image's grayscale mean, so one multiply-add per step serves both orders."""
        b = x.shape[0]
        first = p["contrast_first"].view(b, 1, 1, 1)
        f1 = torch.where(first, p["contrast"].view(b, 1, 1, 1), p["brightness"].view(b, 1, 1, 1))
        f2 = torch.where(first, p["brightness"].view(b, 1, 1, 1), p["contrast"].view(b, 1, 1, 1))
        gray = self._constant("gray", x.device)
        t1 = torch.where(first, _gray_mean(x, gray) * scale, 0.0)
        x = torch.addcmul(t1 * (1 - f1), x, f1 * scale).clamp_(0, 1)
        t2 = torch.where(first, 0.0, _gray_mean(x, gray))
        return torch.addcmul(t2 * (1 - f2), x, f2, out=x).clamp_(0, 1)

    def _blur_subset(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """Blur the chosen samples (a third of the batch). On a CPU only those are computed; on a GPU
        all are, and a mask keeps the chosen ones: picking them (nonzero) would wait for the device."""
        if x.device.type != "cpu":
            return self._blur_masked(x, p)
        idx = p["blur"].nonzero().squeeze(1)
        if idx.numel() == 0:
            return x
        return x.index_copy_(0, idx, gaussian_blur_batch(x.index_select(0, idx), p["sigma"][idx], self.kernel_size))

    def _blur_masked(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        return torch.where(p["blur"].view(-1, 1, 1, 1), gaussian_blur_batch(x, p["sigma"], self.kernel_size), x)

    def _constant(self, name: str, device: torch.device) -> torch.Tensor:
        """Small constant tensors, made on each device once (not in every call, and never while capturing)."""
        if device not in self._constants:
            self._constants[device] = {
                "inv_std": torch.tensor([1 / s for s in IMAGENET_STD], device=device).view(1, 3, 1, 1),
                "shift": torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)],
                                      device=device).view(1, 3, 1, 1),
                "gray": torch.tensor(GRAY_WEIGHTS, device=device).view(1, 3, 1, 1)}
        return self._constants[device][name]

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation as one multiply-add that also expands 1 channel to 3."""
        b, _, h, w = x.shape
        inv_std, shift = self._constant("inv_std", x.device), self._constant("shift", x.device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((b, 3, h, w), device=x.device, memory_format=fmt)
        return torch.addcmul(shift, x, inv_std, out=out)


def _to_device(params: dict, device: torch.device) -> dict:
    """The (B,) parameter tensors on `device` in one pinned copy instead of one small copy each."""
    if all(v.device == device for v in params.values()):     # on the CPU, or drawn on the device
        return params
    names = list(params)
    packed = torch.stack([params[k].float() for k in names], dim=1)
    if device.type == "cuda":
        packed = packed.pin_memory()
    packed = packed.to(device, non_blocking=True)
    return {k: (col > 0.5 if params[k].dtype == torch.bool else col) for k, col in zip(names, packed.unbind(1))}


def _lerp(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * t


def _gray_mean(x: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the grayscale image per sample: (B, C, H, W) -> (B, 1, 1, 1); `weights`: GRAY_WEIGHTS
    as a (1, 3, 1, 1) tensor on x's device, when the caller keeps one."""
    m = x.mean(dim=(2, 3), keepdim=True)
    if x.shape[1] == 3:
        if weights is None:
            weights = torch.tensor(GRAY_WEIGHTS, device=x.device).view(1, 3, 1, 1)
        m = (m * weights.to(x.dtype)).sum(1, keepdim=True)
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


def _three_channels(x: torch.Tensor) -> torch.Tensor:
    """(1, S, S) -> (3, S, S); a module-level function so DataLoader workers can pickle it."""
    return x.expand(3, -1, -1) if x.shape[0] == 1 else x


def build_pil_transform(config: AugmentConfig, image_size: int):
    """torchvision per-image pipeline of the spec: PIL image -> normalised float (3, S, S). The reference
    that BatchAugment matches in distribution (rotation bilinear, as BatchAugment's one resampling)."""
    from torchvision import transforms as T

    if config.rotation_fill != "zeros":
        raise ValueError(f"rotation_fill {config.rotation_fill!r}: RandomRotation fills with a constant; only "
                         f"BatchAugment can reflect")
    if tuple(config.crop_scale) == (1.0, 1.0):
        steps = [T.Resize((image_size, image_size))]   # the supervised "resize to S x S"
    else:
        steps = [T.RandomResizedCrop(image_size, scale=config.crop_scale, ratio=config.crop_ratio)]
    steps += [T.RandomHorizontalFlip(config.hflip_p),
              T.RandomRotation(config.rotation, interpolation=T.InterpolationMode.BILINEAR, fill=0),
              T.ColorJitter(brightness=config.brightness, contrast=config.contrast)]
    if config.gamma > 0:
        steps.append(RandomGamma(config.gamma))
    if config.blur_p > 0:
        blur = T.GaussianBlur(blur_kernel_size(image_size), sigma=blur_sigma_range(config, image_size))
        steps.append(T.RandomApply([blur], p=config.blur_p))
    steps += [T.ToTensor(), T.Lambda(_three_channels), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class RandomGamma:
    """PIL image -> adjust_gamma(image, g), g log-uniform in [1 / (1 + strength), 1 + strength]."""

    def __init__(self, strength: float):
        self.log_range = float(np.log1p(strength))

    def sample(self) -> float:
        return float(np.exp(_lerp(torch.rand(()).item(), -self.log_range, self.log_range)))

    def __call__(self, image):
        from torchvision.transforms import functional as TF

        return TF.adjust_gamma(image, self.sample())

    def __repr__(self):
        return f"RandomGamma(strength={np.expm1(self.log_range):g})"


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
