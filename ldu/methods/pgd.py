"""Projected gradient ascent in pixel space (Madry et al. 2018), shared by the pixel-space baselines.

    x_adv <- clip_[0,1]( x + clip_[-linf, linf]( x_adv + step_size * sign(grad objective(x_adv)) - x ) )

starting from x (no random start, as AdvDM, Anti-DreamBooth and PhotoGuard do). `objective(x_adv, step)` returns
one value per image to MAXIMISE; their sum is differentiated, so each image's step does not depend on the batch.
"""

from __future__ import annotations

import torch

from ..losses import make_draws
from ..registry import report


def pgd(x: torch.Tensor, objective, linf: float, iterations: int, step_size: float, callback=None,
        stage: str = "pgd", step_offset: int = 0, total: int | None = None,
        start: torch.Tensor | None = None) -> tuple[torch.Tensor, list[float]]:
    """Returns (x_adv, curve of the mean objective at each step). `start` continues from an earlier x_adv
    (still projected onto the ball around x)."""
    x_adv, curve = (x if start is None else start).clone(), []
    for i in range(iterations):
        x_adv.requires_grad_(True)
        value = objective(x_adv, i)
        (grad,) = torch.autograd.grad(value.sum(), x_adv)
        with torch.no_grad():
            x_adv = x_adv + step_size * grad.sign()
            x_adv = (x + (x_adv - x).clamp(-linf, linf)).clamp(0, 1)
        curve.append(float(value.detach().mean()))
        report(callback, {"stage": stage, "step": step_offset + i + 1, "total": total or iterations, "objective": curve[-1]})
    return x_adv.detach(), curve


def fresh_draws(backbone, x: torch.Tensor, m: int, generator: torch.Generator):
    """m new (t, eps) draws per image of the batch x [B,3,h,w] from the method's own seeded stream (AdvDM's
    Monte-Carlo estimate)."""
    shape = backbone.latent_shape(tuple(x.shape[-2:]))
    return make_draws(m, x.shape[0], shape, backbone.num_train_timesteps, generator=generator).to(backbone.device)
