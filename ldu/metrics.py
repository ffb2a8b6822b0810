"""Image-difference statistics every protection reports, in [0,1] pixel units, computed in fp32.

These are the few numbers `protect()` puts in its stats; eval/ builds the full metric suite (LPIPS, FID, ...)
on top and reuses them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def rms(r: torch.Tensor) -> float:
    """Root mean square of a residual, [0,1] units."""
    return float(r.float().pow(2).mean().sqrt())


def linf(r: torch.Tensor) -> float:
    return float(r.float().abs().max())


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB for images in [0,1]; inf when identical."""
    mse = float((a.float() - b.float()).pow(2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004; torchmetrics, Gaussian window 11, sigma 1.5) of [3,H,W] images."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return float(structural_similarity_index_measure(a.float()[None].cpu(), b.float()[None].cpu(), data_range=1.0))


def thumbnails(images) -> torch.Tensor:
    """The 8x8 RGB thumbnail (colour layout) of [3,H,W] images or a [N,3,H,W] batch, flattened to [N,192]: the
    weight-free image feature of the pocket check, the efficacy experiments and the thumb_distance metric."""
    x = images if isinstance(images, torch.Tensor) else torch.stack([im.float().cpu() for im in images])
    return F.adaptive_avg_pool2d(x.float(), 8).flatten(1)


def difference_stats(clean: torch.Tensor, protected: torch.Tensor) -> dict:
    """PSNR, SSIM, Linf and RMS of protected vs clean ([3,H,W], [0,1]); Linf and RMS also in /255 units."""
    r = protected.float() - clean.float()
    return {
        "psnr": psnr(clean, protected),
        "ssim": ssim(clean, protected),
        "linf": linf(r),
        "rms": rms(r),
        "linf_255": linf(r) * 255,
        "rms_255": rms(r) * 255,
    }
