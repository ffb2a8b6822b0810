"""Mist-style protection (Liang et al. 2023, "Mist: Towards Improved Adversarial Examples for Diffusion Models"):
AdvDM's semantic loss plus a textural loss that pulls E(x + eta) toward the latent of a target pattern.

The target pattern is generated here (a high-contrast pattern of concentric rings and diagonal stripes), not
Mist's own image. Objective per image: attacker_loss(x + eta) - texture_weight * mse(E(x + eta), E(pattern)).
Defaults: Linf 16/255 (Mist's default strength), 100 steps of 1/255, texture_weight 1 (balances the two terms
in our units; Mist's code weights its terms differently).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..losses import diffusion_loss
from . import Method, MethodParams, check, check_budget, finite, param
from .pgd import fresh_draws, pgd


@dataclass
class MistParams(MethodParams):
    linf: float = param(16 / 255, "Linf budget, [0,1] pixels (binding)")
    budget_rms: float | None = param(None, "optional RMS cap, [0,1] pixels")
    iterations: int = param(100, "PGD steps")
    step_size: float = param(1 / 255, "PGD step, [0,1] pixels")
    texture_weight: float = param(1.0, "weight of the textural loss toward the pattern's latent")
    draws: int = param(1, "fresh (t, eps) draws per step per image for the semantic loss")
    resample: bool = param(True, "fresh draws every step (the paper's Monte-Carlo estimate), else protect()'s fixed draws")

    def __post_init__(self):
        check_budget(self)
        finite(self, "step_size", "texture_weight")
        check(self.linf is not None, "mist needs linf (its binding budget)")
        check(self.iterations >= 0 and self.draws >= 1 and self.step_size > 0, "iterations >= 0, draws >= 1, step_size > 0")


def target_pattern(height: int, width: int, device=None) -> torch.Tensor:
    """[1,3,height,width] in [0,1]: rings times diagonal stripes, in three phase-shifted colour channels; the
    short side spans [-1, 1], the long side the same pixel pitch further."""
    s = min(height, width)
    axis = lambda n: torch.linspace(-(n - 1) / (s - 1), (n - 1) / (s - 1), n)  # noqa: E731
    yy, xx = torch.meshgrid(axis(height), axis(width), indexing="ij")
    r = (xx**2 + yy**2).sqrt()
    channels = [0.5 + 0.5 * torch.sign(torch.sin(12 * math.pi * r + k) * torch.sin(8 * math.pi * (xx + yy) + k)) for k in (0, 2, 4)]
    return torch.stack(channels)[None].to(device)


def mist(backbone, x: torch.Tensor, p: MistParams, draws, callback=None):
    cond = backbone.encode_prompt(p.prompt)
    g = torch.Generator().manual_seed(p.seed)
    with torch.no_grad():
        target = backbone.encode(target_pattern(*x.shape[-2:], x.device))

    def objective(xa, step, d=None):
        z = backbone.encode(xa)
        d = d if d is not None else fresh_draws(backbone, x, p.draws, g) if p.resample else draws
        semantic = diffusion_loss(backbone, z, cond, d, reduction="none")
        return semantic - p.texture_weight * (z - target).pow(2).flatten(1).mean(1)

    with torch.no_grad():
        clean = objective(x, 0, draws)
    x_adv, curve = pgd(x, objective, p.linf, p.iterations, p.step_size, callback, stage="mist")
    with torch.no_grad():
        final = objective(x_adv, 0, draws)
    return x_adv, {"curve": curve, "objective": "attacker_loss - w * mse(E(x), E(pattern))", "objective_clean": clean.tolist(),
                   "objective_final": final.tolist()}


METHOD = Method(
    name="mist", params=MistParams, fn=mist, budget_field="linf",
    summary="Mist-style: AdvDM loss plus a textural loss toward a generated pattern's latent (Liang et al. 2023)",
    defaults={"tiny": dict(iterations=6)},
    cost=lambda p: p.iterations * (p.draws + 1),
)
