"""AdvDM (Liang et al. 2023, "Adversarial Example Does Good: Preventing Painting Imitation from Diffusion Models
via Adversarial Examples"): pixel PGD that maximises the diffusion loss of E(x + eta), a Monte-Carlo estimate with
fresh (t, eps) draws every step.

Defaults: Linf 8/255 as in the paper; 100 steps of 1/255 (the paper's 40-100 steps, alpha ~ eps/10); the
condition is the attack prompt (the paper conditions on the image's own prompt) so every method here aims at the
same fine-tuning objective.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import attacker_loss
from . import Method, MethodParams, check, check_budget, finite, param
from .pgd import fresh_draws, pgd


@dataclass
class AdvDMParams(MethodParams):
    linf: float = param(8 / 255, "Linf budget, [0,1] pixels (binding)")
    budget_rms: float | None = param(None, "optional RMS cap, [0,1] pixels (off: AdvDM is an Linf attack)")
    iterations: int = param(100, "PGD steps")
    step_size: float = param(1 / 255, "PGD step, [0,1] pixels")
    draws: int = param(1, "fresh (t, eps) draws per step per image")
    resample: bool = param(True, "fresh draws every step (the paper's Monte-Carlo estimate), else protect()'s fixed draws")

    def __post_init__(self):
        check_budget(self)
        finite(self, "step_size")
        check(self.linf is not None, "advdm needs linf (its binding budget)")
        check(self.iterations >= 0 and self.draws >= 1 and self.step_size > 0, "iterations >= 0, draws >= 1, step_size > 0")


def advdm(backbone, x: torch.Tensor, p: AdvDMParams, draws, callback=None):
    cond = backbone.encode_prompt(p.prompt)
    g = torch.Generator().manual_seed(p.seed)
    with torch.no_grad():
        clean = attacker_loss(backbone, x, cond, draws, reduction="none")

    def objective(xa, step):
        d = fresh_draws(backbone, x, p.draws, g) if p.resample else draws
        return attacker_loss(backbone, xa, cond, d, reduction="none")

    x_adv, curve = pgd(x, objective, p.linf, p.iterations, p.step_size, callback, stage="advdm")
    with torch.no_grad():
        final = attacker_loss(backbone, x_adv, cond, draws, reduction="none")
    return x_adv, {"curve": curve, "objective": "attacker_loss", "objective_clean": clean.tolist(), "objective_final": final.tolist()}


METHOD = Method(
    name="advdm", params=AdvDMParams, fn=advdm, budget_field="linf",
    summary="AdvDM: pixel PGD maximising the diffusion loss of E(x + eta) (Liang et al. 2023)",
    defaults={"tiny": dict(iterations=6)},
    cost=lambda p: p.iterations * (p.draws + 1),
)
