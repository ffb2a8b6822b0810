"""ASPL, Anti-DreamBooth's Alternating Surrogate and Perturbation Learning (Van Le et al. 2023, "Anti-DreamBooth:
Protecting users from personalized text-to-image synthesis").

Each round: a copy of the surrogate is fine-tuned a few steps on the CLEAN images, PGD then maximises that copy's
diffusion loss on the perturbed images, and the surrogate itself is fine-tuned on the PERTURBED images. The
surrogate here is a LoRA on the UNet (ldu.finetune), not a full UNet copy, so it fits in 12 GiB at 512² on SD 1.5;
the "copy" is a snapshot of the LoRA weights restored after the PGD.

The surrogate learns from the batch it is given: protect() calls a method once per canvas shape, so photos of
different aspect ratios train separate surrogates (crop them to one aspect for one surrogate).

Defaults scaled from the paper's scripts (eps 0.05 and alpha 0.005 on [-1,1] images = 0.025 and 0.0025 in [0,1]
pixels; 50 rounds of 3 surrogate steps and 6 PGD steps; full fine-tune lr 5e-6, here LoRA rank 4 at lr 1e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..finetune import UNET_LORA_TARGETS, adamw, add_lora, remove_lora, train_step
from ..losses import attacker_loss
from . import Method, MethodParams, check, check_budget, finite, param
from .pgd import fresh_draws, pgd

ADAPTER = "ldu_aspl_surrogate"


@dataclass
class ASPLParams(MethodParams):
    linf: float = param(0.05 / 2, "Linf budget, [0,1] pixels (binding; the paper's 0.05 on [-1,1])")
    budget_rms: float | None = param(None, "optional RMS cap, [0,1] pixels")
    rounds: int = param(50, "alternations of surrogate learning and perturbation learning")
    surrogate_steps: int = param(3, "LoRA fine-tuning steps per phase")
    pgd_steps: int = param(6, "PGD steps per round")
    step_size: float = param(0.005 / 2, "PGD step, [0,1] pixels")
    rank: int = param(4, "surrogate LoRA rank")
    lr: float = param(1e-4, "surrogate LoRA learning rate")
    resample: bool = param(True, "fresh draws every PGD step (the paper), else protect()'s fixed draws")

    def __post_init__(self):
        check_budget(self)
        finite(self, "step_size", "lr")
        check(self.linf is not None, "aspl needs linf (its binding budget)")
        check(self.rounds >= 0 and self.surrogate_steps >= 0 and self.pgd_steps >= 0, "rounds and steps must be >= 0")
        check(self.rank >= 1 and self.lr > 0 and self.step_size > 0, "rank >= 1, lr > 0, step_size > 0")


def aspl(backbone, x: torch.Tensor, p: ASPLParams, draws, callback=None):
    cond = backbone.encode_prompt(p.prompt)
    g = torch.Generator().manual_seed(p.seed)
    with torch.no_grad():
        own_clean = own_final = attacker_loss(backbone, x, cond, draws, reduction="none")
    lora = add_lora(backbone.unet, p.rank, p.rank, UNET_LORA_TARGETS, ADAPTER, p.seed)

    def finetune(images):
        opt = adamw(lora, lr=p.lr, weight_decay=1e-2)  # a fresh optimiser per phase, as the paper's code
        with torch.no_grad():
            mean, logvar = backbone.posterior(images)
        for _ in range(p.surrogate_steps):
            noise = torch.randn(mean.shape, generator=g).to(mean)
            z = (mean + (0.5 * logvar).exp() * noise) * backbone.scaling_factor
            train_step(backbone, lora, opt, z, cond.expand(images.shape[0], -1, -1), g)

    def objective(xa, step):
        d = fresh_draws(backbone, x, 1, g) if p.resample else draws
        return attacker_loss(backbone, xa, cond, d, reduction="none")

    x_adv, curve = x.clone(), []
    try:
        for r in range(p.rounds):
            snapshot = [q.detach().clone() for q in lora]
            finetune(x)  # the surrogate copy learns the clean subject...
            x_adv, c = pgd(x, objective, p.linf, p.pgd_steps, p.step_size, callback, stage="aspl",
                           step_offset=r * p.pgd_steps, total=p.rounds * p.pgd_steps, start=x_adv)
            curve += c
            if r == p.rounds - 1:  # ASPL's own objective: the clean-trained surrogate's loss, under fixed draws
                with torch.no_grad():
                    own_clean = attacker_loss(backbone, x, cond, draws, reduction="none")
                    own_final = attacker_loss(backbone, x_adv, cond, draws, reduction="none")
            with torch.no_grad():
                for q, s in zip(lora, snapshot):
                    q.copy_(s)
            finetune(x_adv)  # ...while the surrogate itself learns the perturbed images
    finally:
        remove_lora(backbone.unet, ADAPTER)
    return x_adv, {"curve": curve, "objective": "attacker_loss of the last clean-trained surrogate",
                   "objective_clean": own_clean.tolist(), "objective_final": own_final.tolist()}


METHOD = Method(
    name="aspl", params=ASPLParams, fn=aspl, budget_field="linf",
    summary="ASPL (Anti-DreamBooth): alternate LoRA surrogate fine-tuning and PGD (Van Le et al. 2023)",
    defaults={"tiny": dict(rounds=2, surrogate_steps=1, pgd_steps=2)},
    effort_field="rounds",
    per_image=False,  # its surrogate learns from the whole set: photos are protected together
    steps=lambda p: p.rounds * p.pgd_steps,
    cost=lambda p: p.rounds * (2 * p.pgd_steps + 2 * p.surrogate_steps),
)
