"""LDU: trajectory-shifted latent perturbation, as a per-image optimisation (DESIGN.md, "LDU").

The idea of Latent Diffusion Unlearning (arXiv:2510.03089): instead of adding pixel noise, move the starting
point of a partial denoising trajectory so that the decoded image stays faithful but is hard to learn. For
each of R rounds: DDIM-invert the current image to t* = strength x T (k steps, empty prompt), then optimise a
shift delta of z_t* with Adam so that the image decoded from DDIM-denoise(z_t* + delta) maximises the
attacker's diffusion loss (the loss a DreamBooth/LoRA fine-tune with the attack prompt minimises) averaged
over fixed (t, eps) draws.

Two output forms:
- residual (default): the protected image is x + r, with r = (the change of the decoded image caused by
  delta) + (the residual of earlier rounds), projected per image onto the RMS/Linf budget inside the forward
  pass, so the budget holds by construction and a zero shift returns x exactly.
- decode: the paper's output form, the VAE decode itself. A VAE round trip alone costs 25-29 dB on real
  photos, so the budget is a constraint against the zero-shift reconstruction `base`, enforced by a capped
  Lagrange multiplier with dual ascent; protect() does not project it (PSNR is reported against x and base).
  Rounds restart the optimiser from the previous shift instead of re-inverting (which would add a VAE round
  trip per round).

Where we depart from the paper: its amortised generator is replaced by per-image optimisation (its released
code does not run); the shift is applied at t* after a DDIM inversion rather than to the initial noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import project
from ..ddim import ddim_denoise, ddim_invert, ddim_timesteps
from ..losses import attacker_loss
from . import Method, check, check_budget, param, report


@dataclass
class LDUParams:
    budget_rms: float | None = param(8 / 255, "per-image RMS of the final residual, [0,1] pixels (the binding budget)")
    linf: float | None = param(16 / 255, "cap on every pixel of the residual, [0,1] pixels (residual mode only)")
    strength: float = param(0.5, "t* = strength x T: how far along the trajectory the shift is applied")
    ddim_steps: int = param(4, "k: DDIM steps of the inversion and of the differentiable denoising")
    iterations: int = param(50, "K: Adam steps on the latent shift, split over the rounds")
    rounds: int = param(2, "R: re-invert the current protected image this many times")
    draws: int = param(4, "m: fixed (t, eps) draws the attacker loss averages over")
    lr: float = param(0.05, "Adam step size on the latent shift (latent units)")
    mode: str = param("residual", "residual (budget holds by construction) or decode (the paper's output form)")
    prompt: str = param("a photo of sks person", "the attack prompt whose fine-tuning loss is maximised")
    seed: int = param(0, "seed of the draws")
    checkpoint: bool = param(True, "recompute UNet activations in backward (memory for time)")
    dual_lr: float = param(1.0, "decode mode: dual-ascent step of the multiplier, per unit of relative violation")
    lambda_max: float = param(100.0, "decode mode: cap of the multiplier")

    def __post_init__(self):
        check_budget(self)
        check(self.budget_rms is not None or self.mode == "residual" and self.linf is not None,
              "ldu needs budget_rms (decode mode measures it against the reconstruction), or linf in residual mode")
        check(self.mode in ("residual", "decode"), f"mode must be 'residual' or 'decode', got {self.mode!r}")
        check(0 < self.strength <= 1, f"strength must be in (0, 1], got {self.strength}")
        check(self.ddim_steps >= 1, f"ddim_steps must be at least 1, got {self.ddim_steps}")
        check(self.iterations >= 0, f"iterations must be 0 or more, got {self.iterations}")
        check(self.rounds >= 1, f"rounds must be at least 1, got {self.rounds}")
        check(self.draws >= 1, f"draws must be at least 1, got {self.draws}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")


def trajectory_shift(backbone, x: torch.Tensor, params: LDUParams, draws, callback=None):
    """Protect a batch x [B,3,h,w] in [0,1] (one subject); returns (x_protected, stats). See the module docstring."""
    b = x.shape[0]
    residual = params.mode == "residual"
    timesteps = ddim_timesteps(backbone.num_train_timesteps, params.strength, params.ddim_steps)
    c_attack = backbone.encode_prompt(params.prompt)
    c_empty = backbone.encode_prompt("")
    sched = dict(timesteps=timesteps, alphas_cumprod=backbone.alphas_cumprod, prediction_type=backbone.prediction_type)

    def model(z, t):
        return backbone.predict(z, t, c_empty, checkpoint=params.checkpoint)

    with torch.no_grad():
        clean_loss = attacker_loss(backbone, x, c_attack, draws, reduction="none")
    best, best_loss = x.clone(), clean_loss.clone()  # residual mode keeps, per image, the best candidate seen
    per_round = [params.iterations // params.rounds + (r < params.iterations % params.rounds) for r in range(params.rounds)]
    x_cur, base0, curve, grad_norm_first, step = x.clone(), None, [], None, 0
    lam, delta = torch.ones(b, device=x.device), None
    for rnd, n_it in enumerate(per_round):
        if n_it == 0:
            continue
        # Residual mode re-inverts the current protected image each round. Decode mode inverts x once and
        # carries the shift over (re-inverting a decode would add one more VAE round trip per round), and
        # measures its constraint against that one zero-shift reconstruction.
        if residual or base0 is None:
            with torch.no_grad():
                z_t = ddim_invert(model, backbone.encode(x_cur), **sched)
                base = backbone.decode(ddim_denoise(model, z_t, **sched))
            base0 = base if base0 is None else base0
        offset = x_cur - x  # the residual earlier rounds already spent
        start = torch.zeros_like(z_t) if residual or delta is None else delta.detach()
        delta = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=params.lr)
        # n_it Adam steps, each candidate scored after its step: evaluation 0 (the zero shift, = x_cur) only
        # gives the first gradient, and a last gradient-free evaluation scores the final step.
        for it in range(n_it + 1):
            last = it == n_it
            with torch.set_grad_enabled(not last):
                x_bar = backbone.decode(ddim_denoise(model, z_t + delta, **sched))
                if residual:
                    x_p = (x + project(offset + (x_bar - base), params.budget_rms, params.linf)).clamp(0, 1)
                else:
                    x_p = x_bar.clamp(0, 1)
                loss_adv = attacker_loss(backbone, x_p, c_attack, draws, reduction="none", checkpoint=params.checkpoint)
                if not residual:  # relative violation of mse(x_p, base0) <= b^2
                    g = (x_p - base0).pow(2).flatten(1).mean(1) / params.budget_rms**2 - 1
            if it > 0:
                with torch.no_grad():
                    if residual:
                        better = loss_adv > best_loss
                        best[better], best_loss[better] = x_p[better], loss_adv[better]
                step += 1
                curve.append(float(loss_adv.detach().mean()))
                report(callback, {"stage": "ldu", "step": step, "total": params.iterations, "round": rnd + 1,
                                  "attacker_loss": curve[-1]})
            if last:
                break
            loss = -loss_adv.sum()  # a sum, so each image's gradient does not depend on the batch size
            if not residual:
                loss = loss + (lam * torch.relu(g)).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_norm_first is None:
                grad_norm_first = float(delta.grad.norm())
            opt.step()
            if not residual:
                lam = (lam + params.dual_lr * g.detach()).clamp(0, params.lambda_max)
        x_cur = best.clone() if residual else x_p.detach()
    stats = {
        "timesteps": timesteps,
        "curve": curve,
        "grad_norm_first": grad_norm_first,
        "attacker_loss_clean_opt_draws": clean_loss.tolist(),
    }
    if not residual and base0 is not None:
        mse = (x_cur - base0).pow(2).flatten(1).mean(1)
        stats["psnr_vs_base"] = [math.inf if v == 0 else 10 * math.log10(1 / v) for v in mse.tolist()]
    return x_cur.detach(), stats


METHOD = Method(
    name="ldu",
    params=LDUParams,
    fn=trajectory_shift,
    summary="Latent Diffusion Unlearning: shift the DDIM trajectory at t* so the decoded image maximises the attacker's loss",
    binds="budget_rms (per-image RMS), capped by linf; decode mode: RMS against the VAE reconstruction, not projected",
    defaults={"tiny": dict(iterations=8, ddim_steps=2, draws=2)},
    budget=lambda p: (p.budget_rms, p.linf) if p.mode == "residual" else (None, None),
)
