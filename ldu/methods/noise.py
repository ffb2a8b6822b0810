"""The null protection: seeded Gaussian noise at the same budget as a real method, and no objective at all (drawn at
the working size, like every method's residual, and resized with it to the photo's size).

It is the measurement's control, not a defence: a method's share of learning prevented means something only where
it differs from what the same amount of structureless change does to the same-seed attack (on pocket, full
DreamBooth is chaotic enough that any small change moves its generations). The grid and efficacy CLI can run it
beside the methods at the same PSNR (`--methods ldu,noise --match-psnr 32`); the app does not list it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import Method, MethodParams, check, check_budget, param


@dataclass
class NoiseParams(MethodParams):
    budget_rms: float | None = param(8 / 255, "per-image RMS of the noise, [0,1] pixels (the binding budget)")
    linf: float | None = param(None, "optional cap on every pixel of the noise, [0,1] pixels")
    iterations: int = param(1, "1: add the noise; 0: no change")

    def __post_init__(self):
        check_budget(self)
        check(self.budget_rms is not None, "noise needs budget_rms (the size of the noise)")


def noise(backbone, x: torch.Tensor, p: NoiseParams, draws, callback=None):
    if p.iterations == 0 or p.budget_rms == 0:
        return x.clone(), {}
    g = torch.Generator().manual_seed(p.seed)  # protect() gives each photo its own seed (its content mixed in)
    eps = torch.randn(x.shape, generator=g).to(x)
    # a little above the budget before clamping, so the RMS after clamping at 0/1 still reaches it; protect()'s
    # projection brings it back to the budget exactly
    return (x + 1.25 * p.budget_rms * eps).clamp(0, 1), {}


METHOD = Method(
    name="noise", params=NoiseParams, fn=noise, budget_field="budget_rms",
    summary="control: seeded Gaussian pixel noise at the budget, no objective (what any change of that size does)",
    steps=lambda p: 1, cost=lambda p: 0.0, listed=False, effort_max=1,
)
