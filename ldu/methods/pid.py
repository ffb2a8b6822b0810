"""PID, the prompt-independent defense (Li et al. 2024, "PID: Prompt-Independent Data Protection Against Latent
Diffusion Models"): pixel PGD pushing the VAE posterior of x + eta away from that of x, in both its mean and its
log-variance, with no text prompt involved.

Defaults: Linf 8/255 (the paper's main setting), 100 steps of 1/255 from a seeded random start in the ball (at
x itself the objective has zero gradient); objective
||mu(x + eta) - mu(x)||^2 + ||logvar(x + eta) - logvar(x)||^2 per latent element.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import posterior_distance
from . import Method, MethodParams, check, check_budget, finite, param
from .pgd import pgd


@dataclass
class PIDParams(MethodParams):
    linf: float = param(8 / 255, "Linf budget, [0,1] pixels (binding)")
    budget_rms: float | None = param(None, "optional RMS cap, [0,1] pixels")
    iterations: int = param(100, "PGD steps")
    step_size: float = param(1 / 255, "PGD step, [0,1] pixels")
    logvar_weight: float = param(1.0, "weight of the log-variance term")

    def __post_init__(self):
        check_budget(self)
        finite(self, "step_size")
        check(self.linf is not None, "pid needs linf (its binding budget)")
        check(self.iterations >= 0 and self.step_size > 0, "iterations >= 0 and step_size > 0")


def pid(backbone, x: torch.Tensor, p: PIDParams, draws, callback=None):
    with torch.no_grad():
        reference = backbone.posterior(x)

    def objective(xa, step=0):
        return posterior_distance(backbone.posterior(xa), reference, p.logvar_weight)

    # A seeded random start inside the ball: at x itself the objective is at its minimum with zero gradient.
    g = torch.Generator().manual_seed(p.seed)
    start = (x + p.linf * (2 * torch.rand(x.shape, generator=g) - 1).to(x)).clamp(0, 1)
    with torch.no_grad():
        at_start = objective(start)
    x_adv, curve = pgd(x, objective, p.linf, p.iterations, p.step_size, callback, stage="pid", start=start)
    with torch.no_grad():
        final = objective(x_adv)
    # at x the objective is 0 by definition; what the optimisation itself achieved is final against the random start
    return x_adv, {"curve": curve, "objective": "posterior distance", "objective_clean": [0.0] * x.shape[0],
                   "objective_start": at_start.tolist(), "objective_final": final.tolist()}


METHOD = Method(
    name="pid", params=PIDParams, fn=pid, budget_field="linf",
    summary="PID: push the VAE posterior mean and log-variance of x + eta away from those of x (Li et al. 2024)",
    defaults={"tiny": dict(iterations=6)},
    cost=lambda p: p.iterations,  # the VAE encoder only
)
