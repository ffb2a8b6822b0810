"""Perturbation budgets in [0,1] pixel units, per image, in fp32.

`project` is used twice with the same semantics: inside LDU's forward pass (differentiable, so the budget
holds by construction while optimising) and, as `project_` (in place, one image, no copy of a large photo), by
`protect()` on the final residual at the original size.
"""

from __future__ import annotations

import math

import torch

from .metrics import rms

RMS_EPS = 1e-12  # inside the sqrt: the gradient of sqrt at exactly zero (a zero shift) is NaN


def rms_per_image(r: torch.Tensor) -> torch.Tensor:
    """sqrt(mean(r^2) + 1e-12) per image of a [B,...] tensor, shape [B]."""
    return (r.pow(2).flatten(1).mean(1) + RMS_EPS).sqrt()


def project(r: torch.Tensor, budget_rms: float | None, linf: float | None) -> torch.Tensor:
    """Scale each image's residual down to RMS <= budget_rms, then clip to |r| <= linf. Differentiable.

    Scaling before clipping: clipping only lowers the RMS, so both bounds hold after the two steps.
    """
    if budget_rms is not None:
        scale = (budget_rms / rms_per_image(r)).clamp(max=1.0)
        r = r * scale.view(-1, *([1] * (r.ndim - 1)))
    if linf is not None:
        r = r.clamp(-linf, linf)
    return r


def project_(r: torch.Tensor, budget_rms: float | None, linf: float | None) -> torch.Tensor:
    """`project` of ONE image's residual [C,H,W], in place (a 50 MP residual is 600 MB: no second copy)."""
    if budget_rms is not None:
        scale = min(1.0, budget_rms / math.sqrt(rms(r) ** 2 + RMS_EPS))
        if scale < 1.0:
            r.mul_(scale)
    if linf is not None:
        r.clamp_(-linf, linf)
    return r
