"""PhotoGuard's encoder attack (Salman et al. 2023, "Raising the Cost of Malicious AI-Powered Image Editing"):
pixel PGD pulling the VAE latent E(x + eta) toward the latent of a flat grey target image.

Defaults: Linf 16/255 as the project's design asks (the PhotoGuard demo used eps 0.06 on [-1,1] images, 7.7/255 in
[0,1] pixels), 200 steps of 2/255 (the demo runs 1000 steps of 0.02 on [-1,1]); target mid-grey 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, MethodParams, check, check_budget, finite, param
from .pgd import pgd


@dataclass
class PhotoGuardParams(MethodParams):
    linf: float = param(16 / 255, "Linf budget, [0,1] pixels (binding)")
    budget_rms: float | None = param(None, "optional RMS cap, [0,1] pixels")
    iterations: int = param(200, "PGD steps")
    step_size: float = param(2 / 255, "PGD step, [0,1] pixels")
    target_grey: float = param(0.5, "the flat target image's value in [0,1]")

    def __post_init__(self):
        check_budget(self)
        finite(self, "step_size")
        check(self.linf is not None, "photoguard_encoder needs linf (its binding budget)")
        check(0 <= self.target_grey <= 1, f"target_grey must be in [0,1], got {self.target_grey}")
        check(self.iterations >= 0 and self.step_size > 0, "iterations >= 0 and step_size > 0")


def photoguard_encoder(backbone, x: torch.Tensor, p: PhotoGuardParams, draws, callback=None):
    with torch.no_grad():
        target = backbone.encode(torch.full_like(x[:1], p.target_grey))

    def objective(xa, step=0):  # maximise minus the distance to the target latent
        return -(backbone.encode(xa) - target).pow(2).flatten(1).mean(1)

    with torch.no_grad():
        clean = objective(x)
    x_adv, curve = pgd(x, objective, p.linf, p.iterations, p.step_size, callback, stage="photoguard_encoder")
    with torch.no_grad():
        final = objective(x_adv)
    return x_adv, {"curve": curve, "objective": "-mse(E(x), E(grey))", "objective_clean": clean.tolist(),
                   "objective_final": final.tolist()}


METHOD = Method(
    name="photoguard_encoder", params=PhotoGuardParams, fn=photoguard_encoder, budget_field="linf",
    summary="PhotoGuard encoder attack: PGD pulling E(x + eta) toward the latent of flat grey (Salman et al. 2023)",
    defaults={"tiny": dict(iterations=6)},
    cost=lambda p: p.iterations,  # the VAE encoder only
)
