"""BatchAugment against torchvision: geometry and colour with fixed parameters, parameter
distributions with fixed seeds (KS, chi-square and binomial tests), and the PIL reference path.

    python -m pytest tests/test_augment.py -q
"""
import math
import os
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from augmentations import (SSL_AUGMENT, SUPERVISED_AUGMENT, AugmentConfig, BatchAugment,  # noqa: E402
                           PILTwoViewDataset, blur_kernel_size, blur_sigma_range, build_pil_transform,
                           eval_pil_transform)
from image_io import IMAGENET_MEAN, IMAGENET_STD, normalize  # noqa: E402

IDENTITY = AugmentConfig(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), hflip_p=0.0, rotation=0.0, brightness=0.0,
                         contrast=0.0, blur_p=0.0)
N_STAT = 4000   # samples per distribution test: KS detects a shift of ~0.04 in the CDF at p = 0.01


def smooth_images(b=4, c=1, s=48, seed=0) -> torch.Tensor:
    """uint8 images with structure at several scales, so a wrong warp shows up."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    phase = torch.rand(b, c, 1, 1, generator=g) * 6
    img = 0.5 + 0.25 * torch.sin(5 * xx + phase) * torch.cos(3 * yy - phase) + 0.2 * (xx - 0.5) + 0.1 * yy
    return (img.clamp(0, 1) * 255).round().to(torch.uint8)


def fixed_params(b, **overrides) -> dict:
    """Identity parameters for a batch of b, with some fields set."""
    p = dict(crop_w=1.0, crop_h=1.0, crop_cx=0.0, crop_cy=0.0, flip=False, angle=0.0, brightness=1.0,
             contrast=1.0, contrast_first=False, blur=False, sigma=1.0)
    p.update(overrides)
    return {k: torch.full((b,), v) if not isinstance(v, torch.Tensor) else v for k, v in p.items()}


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


# ============ output contract ============

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("config", [SSL_AUGMENT, SUPERVISED_AUGMENT], ids=["ssl", "supervised"])
def test_shape_dtype_range(channels, config):
    x = torch.randint(0, 256, (16, channels, 40, 40), dtype=torch.uint8)
    y = BatchAugment(config, 32)(x, generator=torch.Generator().manual_seed(0))
    assert y.shape == (16, 3, 32, 32) and y.dtype == torch.float32 and torch.isfinite(y).all()
    lo = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    hi = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(1, 3, 1, 1)
    assert (y >= lo - 1e-5).all() and (y <= hi + 1e-5).all()
    if channels == 1:  # grayscale stays gray: the three channels are the same image
        assert torch.allclose(unnormalize(y)[:, 0], unnormalize(y)[:, 2], atol=1e-5)


def test_seeded_generator_is_deterministic():
    x = torch.randint(0, 256, (8, 1, 32, 32), dtype=torch.uint8)
    aug = BatchAugment(SSL_AUGMENT, 32)
    a = aug(x, generator=torch.Generator().manual_seed(3))
    b = aug(x, generator=torch.Generator().manual_seed(3))
    c = aug(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_channels_last_output_has_same_values():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    a = BatchAugment(SSL_AUGMENT, 32)(x, generator=torch.Generator().manual_seed(0))
    b = BatchAugment(SSL_AUGMENT, 32, channels_last=True)(x, generator=torch.Generator().manual_seed(0))
    assert b.is_contiguous(memory_format=torch.channels_last) and torch.allclose(a, b, atol=1e-6)


# ============ geometry with fixed parameters ============

@pytest.mark.parametrize("channels", [1, 3])
def test_identity_reproduces_normalize(channels):
    x = smooth_images(c=channels, s=32)
    y = BatchAugment(IDENTITY, 32)(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y, normalize(x), atol=1e-5)


def test_flip_only_flips_exactly():
    x = smooth_images(s=32)
    y = BatchAugment(AugmentConfig(**{**IDENTITY.__dict__, "hflip_p": 1.0}), 32)(x)
    assert torch.allclose(y, normalize(x.flip(-1)), atol=1e-5)


def test_crop_flip_rotation_match_torchvision():
    """One warp equals resized_crop -> hflip -> rotate (zero fill), away from the interpolated borders."""
    s, top, left, h, w, angle = 48, 5, 9, 34, 30, 12.0
    x = smooth_images(b=1, s=s)
    p = fixed_params(1, crop_w=w / s, crop_h=h / s, crop_cx=(2 * left + w) / s - 1, crop_cy=(2 * top + h) / s - 1,
                     flip=True, angle=angle)
    ours = unnormalize(BatchAugment(SSL_AUGMENT, s).apply_params(x, p))[0, 0]
    ref = TF.resized_crop(x.float() / 255, top, left, h, w, [s, s], T.InterpolationMode.BILINEAR, antialias=False)
    ref = TF.rotate(TF.hflip(ref), angle, T.InterpolationMode.BILINEAR, fill=0)[0, 0]
    inner = slice(6, s - 6)
    assert (ours[inner, inner] - ref[inner, inner]).abs().mean() < 0.01
    # the zero-filled corners of the rotation are zero, not the input outside the crop
    assert ours[0, 0] == 0 and ref[0, 0] == 0
    mirrored = TF.rotate(TF.hflip(TF.resized_crop(x.float() / 255, top, left, h, w, [s, s])), -angle)[0, 0]
    assert (ours[inner, inner] - mirrored[inner, inner]).abs().mean() > 0.03   # the test sees the sign


def test_reflection_fill_mirrors_the_image_into_the_rotated_corners():
    """rotation_fill="reflection": a rotated full-image view has no black wedges; it equals torchvision's
    rotate of the image padded by reflection, away from the borders' interpolation."""
    s, angle = 48, 12.0
    x = smooth_images(b=1, s=s)
    p = fixed_params(1, angle=angle)
    ours = unnormalize(BatchAugment(AugmentConfig(rotation=15.0, rotation_fill="reflection"), s).apply_params(x, p))
    pad = 12
    padded = torch.nn.functional.pad(x.float() / 255, (pad,) * 4, mode="reflect")
    ref = TF.center_crop(TF.rotate(padded, angle, T.InterpolationMode.BILINEAR), [s, s])[0, 0]
    inner = slice(2, s - 2)
    assert (ours[0, 0, inner, inner] - ref[inner, inner]).abs().mean() < 0.01
    zeros = unnormalize(BatchAugment(AugmentConfig(rotation=15.0), s).apply_params(x, p))
    corner, ref_corner = float(ours[0, 0, 0, 0]), float(ref[0, 0])   # plain numbers: pytest.approx takes no 0-d tensor
    assert float(zeros[0, 0, 0, 0]) == 0 and corner > 0.05 and corner == pytest.approx(ref_corner, abs=0.05)
    with pytest.raises(ValueError, match="reflect"):
        build_pil_transform(AugmentConfig(rotation_fill="reflection"), s)


# ============ colour and blur with fixed parameters ============

@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("contrast_first", [False, True])
def test_brightness_contrast_match_torchvision(channels, contrast_first):
    x = smooth_images(b=2, c=channels, s=32)
    b, c = torch.tensor([1.3, 0.7]), torch.tensor([0.7, 1.3])
    p = fixed_params(2, brightness=b, contrast=c, contrast_first=torch.tensor([contrast_first] * 2))
    ours = unnormalize(BatchAugment(SSL_AUGMENT, 32).apply_params(x, p))
    for i in range(2):
        ref = x[i].float() / 255
        ops = [lambda t: TF.adjust_brightness(t, float(b[i])), lambda t: TF.adjust_contrast(t, float(c[i]))]
        for op in (ops[::-1] if contrast_first else ops):
            ref = op(ref)
        assert torch.allclose(ours[i, :channels], ref, atol=1e-5)


@pytest.mark.parametrize("s", [32, 224])
def test_blur_matches_torchvision(s):
    x = smooth_images(b=2, c=3, s=s)
    sigma = torch.tensor([0.3, 2.0]) * s / 224
    p = fixed_params(2, blur=torch.tensor([True, False]), sigma=sigma)
    ours = unnormalize(BatchAugment(SSL_AUGMENT, s).apply_params(x, p))
    ref = TF.gaussian_blur(x[:1].float() / 255, [blur_kernel_size(s)] * 2, [float(sigma[0])] * 2)
    assert torch.allclose(ours[:1], ref, atol=1e-5)
    assert torch.allclose(ours[1:], x[1:].float() / 255, atol=1e-5)        # not chosen: untouched


def test_masked_blur_of_the_gpu_equals_the_cpu_subset_blur():
    """On a GPU every image is blurred and a mask keeps the chosen ones (no wait for the device);
    on a CPU only the chosen ones are computed. Both must give the same batch."""
    x = smooth_images(b=6, c=1, s=32).float() / 255
    p = fixed_params(6, blur=torch.tensor([True, False, True, False, False, True]),
                     sigma=torch.linspace(0.1, 0.3, 6))
    augment = BatchAugment(SSL_AUGMENT, 32)
    assert torch.allclose(augment._blur_masked(x.clone(), p), augment._blur_subset(x.clone(), p), atol=1e-6)


def test_strongest_blur_at_32_px_keeps_the_image():
    """The sigma scales with the side: at 32 px the strongest blur still leaves the image recognisable
    (a fixed 23 px kernel with sigma 2 would average most of it away)."""
    x = torch.randint(0, 256, (8, 1, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    p = fixed_params(8, blur=True, sigma=blur_sigma_range(SSL_AUGMENT, 32)[1])
    y = unnormalize(BatchAugment(SSL_AUGMENT, 32).apply_params(x, p))[:, 0].flatten()
    corr = np.corrcoef(y.numpy(), (x.float() / 255).flatten().numpy())[0, 1]
    assert blur_kernel_size(32) == 3 and blur_kernel_size(224) == 23 and corr > 0.9


# ============ parameter distributions against torchvision ============

@pytest.fixture(scope="module")
def ours():
    return BatchAugment(SSL_AUGMENT, 224).sample_params(N_STAT, 224, 224, torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference():
    """torchvision's own get_params, drawn N_STAT times from a seeded global RNG."""
    torch.manual_seed(2)
    c, img = SSL_AUGMENT, torch.zeros(1, 224, 224)
    crops = [T.RandomResizedCrop.get_params(img, list(c.crop_scale), list(c.crop_ratio)) for _ in range(N_STAT)]
    angles = [T.RandomRotation.get_params([-c.rotation, c.rotation]) for _ in range(N_STAT)]
    jitter = [T.ColorJitter.get_params([1 - c.brightness, 1 + c.brightness], [1 - c.contrast, 1 + c.contrast],
                                       None, None) for _ in range(N_STAT)]
    sigmas = [T.GaussianBlur.get_params(*blur_sigma_range(c, 224)) for _ in range(N_STAT)]
    return dict(area=np.array([h * w / 224 ** 2 for _, _, h, w in crops]),
                log_ratio=np.array([math.log(w / h) for _, _, h, w in crops]),
                centre_x=np.array([2 * j + w for _, j, _, w in crops]),         # in half pixels
                angle=np.array(angles), brightness=np.array([j[1] for j in jitter]),
                contrast=np.array([j[2] for j in jitter]),
                contrast_first=np.array([list(j[0]).index(1) < list(j[0]).index(0) for j in jitter]),
                sigma=np.array(sigmas))


def test_crop_area_and_aspect_distributions(ours, reference):
    # whole pixels, as torchvision's; compared as integers so float rounding cannot split the atoms
    w, h = (ours["crop_w"] * 224).round(), (ours["crop_h"] * 224).round()
    area, log_ratio = (w * h / 224 ** 2).double().numpy(), (w / h).log().double().numpy()
    centre_x = ((ours["crop_cx"] + 1) * 224).round().numpy()
    assert stats.ks_2samp(area.round(9), reference["area"].round(9)).pvalue > 0.01
    assert stats.ks_2samp(log_ratio.round(9), reference["log_ratio"].round(9)).pvalue > 0.01
    assert (ours["crop_w"] <= 1).all() and (ours["crop_h"] <= 1).all()           # inside the image
    assert (ours["crop_cx"].abs() <= 1 - ours["crop_w"] + 1e-6).all()
    assert stats.ks_2samp(centre_x, reference["centre_x"]).pvalue > 0.01


def test_crop_on_a_wide_image_falls_back_like_torchvision():
    """Landscape 3:1 with scale 1: nothing fits, so both take the centre crop of ratio 4/3."""
    p = BatchAugment(AugmentConfig(crop_scale=(1.0, 1.0)), 32).sample_params(64, 30, 90)
    _, _, h, w = T.RandomResizedCrop.get_params(torch.zeros(1, 30, 90), [1.0, 1.0], [3 / 4, 4 / 3])
    assert torch.allclose(p["crop_w"] * 90, torch.tensor(float(w)), atol=0.5)
    assert torch.allclose(p["crop_h"] * 30, torch.tensor(float(h)), atol=0.5)


def test_rotation_and_jitter_distributions(ours, reference):
    for key in ("angle", "brightness", "contrast"):
        assert stats.ks_2samp(ours[key].numpy(), reference[key]).pvalue > 0.01, key
    table = [[int(ours["contrast_first"].sum()), N_STAT - int(ours["contrast_first"].sum())],
             [int(reference["contrast_first"].sum()), N_STAT - int(reference["contrast_first"].sum())]]
    assert stats.chi2_contingency(table).pvalue > 0.01


def test_flip_and_blur_frequencies_and_sigma(ours, reference):
    assert stats.binomtest(int(ours["flip"].sum()), N_STAT, SSL_AUGMENT.hflip_p).pvalue > 0.01
    assert stats.binomtest(int(ours["blur"].sum()), N_STAT, SSL_AUGMENT.blur_p).pvalue > 0.01
    assert stats.ks_2samp(ours["sigma"].numpy(), reference["sigma"]).pvalue > 0.01
    lo, hi = blur_sigma_range(SSL_AUGMENT, 224)
    assert ours["sigma"].min() >= lo and ours["sigma"].max() <= hi


def test_gamma_matches_torchvision_and_is_log_uniform():
    x = smooth_images(b=2, c=1, s=32)
    g = torch.tensor([0.6, 1.7])
    config = AugmentConfig(gamma=0.7)
    ours = unnormalize(BatchAugment(config, 32).apply_params(x, fixed_params(2, gamma=g)))
    for i in range(2):
        assert torch.allclose(ours[i, :1], TF.adjust_gamma(x[i].float() / 255, float(g[i])), atol=1e-5)
    drawn = BatchAugment(config, 32).sample_params(N_STAT, 32, 32, torch.Generator().manual_seed(3))["gamma"]
    log_g = drawn.log().double().numpy()
    assert stats.kstest(log_g, stats.uniform(-math.log(1.7), 2 * math.log(1.7)).cdf).pvalue > 0.01
    torch.manual_seed(4)
    pil_gamma = [t for t in build_pil_transform(config, 32).transforms if type(t).__name__ == "RandomGamma"][0]
    reference = np.log([pil_gamma.sample() for _ in range(N_STAT)])
    assert stats.ks_2samp(log_g, reference).pvalue > 0.01


def test_gamma_off_leaves_every_other_parameter_of_a_seed_unchanged():
    """The spec's pipeline has no gamma; turning it on must not reshuffle the other draws."""
    off = BatchAugment(SSL_AUGMENT, 32).sample_params(16, 32, 32, torch.Generator().manual_seed(5))
    on = BatchAugment(AugmentConfig(gamma=0.5), 32).sample_params(16, 32, 32, torch.Generator().manual_seed(5))
    assert "gamma" not in off and set(on) == set(off) | {"gamma"}
    assert all(torch.equal(off[k], on[k]) for k in off)


# ============ the PIL reference pipeline ============

@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pil_pipeline_shape_and_range(tmp_path, mode):
    arr = (smooth_images(b=1, c=1, s=50)[0, 0].numpy())
    Image.fromarray(arr).convert(mode).save(tmp_path / "a.png")
    ds = PILTwoViewDataset(str(tmp_path), ["a.png"], build_pil_transform(SSL_AUGMENT, 32))
    torch.manual_seed(0)
    v1, v2 = ds[0]
    lo = ((0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    hi = ((1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)).view(3, 1, 1)
    for v in (v1, v2):
        assert v.shape == (3, 32, 32) and v.dtype == torch.float32
        assert (v >= lo - 1e-5).all() and (v <= hi + 1e-5).all()
    assert not torch.equal(v1, v2)
    e = eval_pil_transform(32)(Image.open(tmp_path / "a.png"))
    assert e.shape == (3, 32, 32) and torch.equal(e, eval_pil_transform(32)(Image.open(tmp_path / "a.png")))
