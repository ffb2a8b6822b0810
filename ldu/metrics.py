"""Image-difference statistics every protection reports, in [0,1] pixel units, computed in fp32.

These are the few numbers `protect()` puts in its stats; eval/ builds the full metric suite (LPIPS, FID, ...)
on top and reuses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


STRIP = 256  # rows per strip: statistics of a large image never hold more than a strip's temporaries
TILE = 1024  # SSIM tiles (plus a halo of the window's radius): a 50 MP image costs what a 1 MP one does
SSIM_RADIUS = 5  # the Gaussian window of 11 pixels


def _strips(*images: torch.Tensor):
    """Row strips of [C,H,W] tensors, as fp32 on the CPU."""
    for top in range(0, images[0].shape[-2], STRIP):
        yield tuple(im[..., top : top + STRIP, :].float().cpu() for im in images)


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    total = sum(float((x - y).pow(2).sum(dtype=torch.float64)) for x, y in _strips(a, b))
    return total / a.numel()


def rms(r: torch.Tensor) -> float:
    """Root mean square of a residual, [0,1] units."""
    return math.sqrt(sum(float(x.pow(2).sum(dtype=torch.float64)) for (x,) in _strips(r)) / r.numel())


def linf(r: torch.Tensor) -> float:
    return max(float(x.abs().max()) for (x,) in _strips(r))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0,1]; inf when identical."""
    mse = _mse(a, b)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004; torchmetrics, Gaussian window 11, sigma 1.5) of [3,H,W] images.

    Large images are measured in tiles with a halo of the window's radius: the SSIM map is the one of the whole
    image (torchmetrics reflect-pads only at the image's own borders), without its memory."""
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim_fn  # deferred: heavy

    h, w = a.shape[-2:]
    if h * w <= TILE * TILE:
        return float(ssim_fn(a.float()[None].cpu(), b.float()[None].cpu(), data_range=1.0))
    total, r = 0.0, SSIM_RADIUS
    for top in range(0, h, TILE):
        for left in range(0, w, TILE):
            t0, l0 = max(0, top - r), max(0, left - r)
            bottom, right = min(h, top + TILE), min(w, left + TILE)
            t1, l1 = min(h, bottom + r), min(w, right + r)
            crop = lambda x: x[None, :, t0:t1, l0:l1].float().cpu()  # noqa: E731
            _, full = ssim_fn(crop(a), crop(b), data_range=1.0, return_full_image=True)
            total += float(full[..., top - t0 : bottom - t0, left - l0 : right - l0].sum(dtype=torch.float64))
    return total / (a.shape[0] * h * w)


def thumbnails(images, size: int = 8) -> torch.Tensor:
    """The size x size RGB thumbnail of [3,H,W] images or a [N,3,H,W] batch, flattened to [N, 3 size^2]: the
    weight-free image feature of the pocket check (8: colour layout) and of the efficacy protocol (16: enough to
    tell the built-in subjects apart, which 8 is not)."""
    x = images if isinstance(images, torch.Tensor) else torch.stack([im.float().cpu() for im in images])
    return F.adaptive_avg_pool2d(x.float(), size).flatten(1)


def difference_stats(clean: torch.Tensor, protected: torch.Tensor) -> dict:
    """PSNR, SSIM, Linf and RMS of protected vs clean ([3,H,W], [0,1]); Linf and RMS also in /255 units."""
    mse = _mse(protected, clean)
    peak = max(float((p - c).abs().max()) for p, c in _strips(protected, clean))
    return {
        "psnr": math.inf if mse == 0 else 10 * math.log10(1.0 / mse),
        "ssim": ssim(clean, protected),
        "linf": peak,
        "rms": math.sqrt(mse),
        "linf_255": peak * 255,
        "rms_255": math.sqrt(mse) * 255,
    }
