"""Image-difference statistics every protection reports, in [0,1] pixel units, computed in fp32.

These are the few numbers `protect()` puts in its stats; eval/ builds the full metric suite (LPIPS, FID, ...)
on top and reuses them.
"""

from __future__ import annotations

import math

import torch


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
