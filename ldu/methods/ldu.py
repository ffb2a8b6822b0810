"""LDU: trajectory-shifted latent perturbation, as a per-image optimisation (docs/METHODS.md, "ldu").

The idea of Latent Diffusion Unlearning (arXiv:2510.03089): instead of adding pixel noise, move the starting
point of a partial denoising trajectory so that the decoded image stays faithful but is hard to learn. For
each of R rounds: DDIM-invert the current image to t* = strength x T (k steps, empty prompt), then optimise a
shift delta of z_t* with Adam so that the image decoded from DDIM-denoise(z_t* + delta) maximises the
attacker's diffusion loss (the loss a DreamBooth/LoRA fine-tune with the attack prompt minimises), as the shared
objective (ldu/objective.py) defines it: its surrogate, its draws, its posting transforms, its latent target.

Two output forms:
- residual (default): the protected image is x + r, with r = (the change of the decoded image caused by
  delta) + (the residual of earlier rounds), projected per image onto the RMS/Linf budget inside the forward
  pass, so the budget holds by construction and a zero shift returns x exactly.
- decode: the paper's output form, the VAE decode itself. A VAE round trip alone costs 25-29 dB on real
  photos, so the budget is a constraint against the zero-shift reconstruction `base`, enforced by a capped
  Lagrange multiplier with dual ascent; protect() does not project it (PSNR is reported against x and base).
  Rounds restart the optimiser from the previous shift instead of re-inverting (which would add a VAE round
  trip per round).

Where we depart from the paper (every departure is listed in docs/METHODS.md; `preset=paper` restores its form):
per-image optimisation (ldu_amortised is the generator), the shift at t* after a DDIM inversion rather than at z_T,
the base model as the surrogate, fixed draws, and residual mode with an RMS budget of 8/255.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..budget import project
from ..ddim import ddim_denoise, ddim_invert, ddim_timesteps
from ..objective import SURROGATES, Objective, ObjectiveOptions
from . import Method, MethodParams, check, check_budget, finite, param, report


@dataclass
class LDUParams(MethodParams):
    budget_rms: float | None = param(8 / 255, "per-image RMS of the final residual, [0,1] pixels (the binding budget)")
    linf: float | None = param(16 / 255, "cap on every pixel of the residual, [0,1] pixels (residual mode only)")
    strength: float = param(0.5, "t* = strength x T: how far along the trajectory the shift is applied")
    ddim_steps: int = param(4, "k: DDIM steps of the inversion and of the differentiable denoising")
    iterations: int = param(50, "K: Adam steps on the latent shift, split over the rounds")
    rounds: int = param(2, "R: re-invert the current protected image this many times")
    draws: int = param(4, "m: fixed (t, eps) draws the attacker loss averages over")
    lr: float = param(0.05, "Adam step size on the latent shift (latent units)")
    mode: str = param("residual", "residual (budget holds by construction) or decode (the paper's output form)")
    surrogate: str = param("base", "whose fine-tuning loss is maximised: base (the model as it is), lora (a LoRA that "
                                   "learns the current protected images between rounds, as ASPL), ti (the prompt's token "
                                   "learned on the clean images, as the paper)")
    surrogate_steps: int = param(5, "lora: fine-tuning steps per round; ti: 10x this many embedding steps")
    surrogate_lr: float = param(1e-4, "lora: learning rate (ti: 50x this)")
    fresh_draws: bool = param(False, "fresh (t, eps) draws every step (an expectation) instead of the fixed m; the "
                                     "last iterate is kept (a best-so-far choice would fit the draws' noise)")
    posting: bool = param(False, "an expectation over posting transforms in the loop: JPEG 60-95, resize, blur")
    latent_target: float = param(0.0, "weight of a term pulling E(x) toward the latent of flat grey (PhotoGuard's target)")
    posterior_shift: float = param(0.0, "weight of a term pushing E(x)'s posterior mean and log-variance away from the "
                                        "clean photo's (PID's objective)")
    minimise: bool = param(False, "minimise the attacker's loss instead of maximising it: an error-minimising "
                                  "perturbation (unlearnable examples, SDS-) that leaves fine-tuning less to learn")
    checkpoint: bool = param(True, "recompute UNet activations in backward (memory for time)")
    dual_lr: float = param(1.0, "decode mode: dual-ascent step of the multiplier, per unit of relative violation")
    lambda_max: float = param(100.0, "decode mode: cap of the multiplier")
    preset: str = param("", "'paper': the paper's form (z_T start, TI surrogate, decode mode, the official budget "
                            "RMS 4/255 as a soft penalty); set by make_params(preset=...), recorded here")

    def __post_init__(self):
        check_budget(self)
        finite(self, "strength", "lr", "dual_lr", "lambda_max", "surrogate_lr", "latent_target")
        check(self.surrogate in SURROGATES, f"surrogate must be one of {', '.join(SURROGATES)}, got {self.surrogate!r}")
        check(self.surrogate_steps >= 0 and self.surrogate_lr > 0 and self.latent_target >= 0,
              "surrogate_steps >= 0, surrogate_lr > 0, latent_target >= 0")
        check(self.preset in ("", "paper"), f"preset must be '' or 'paper', got {self.preset!r}")
        check(self.budget_rms is not None or self.mode == "residual" and self.linf is not None,
              "ldu needs budget_rms (decode mode measures it against the reconstruction), or linf in residual mode")
        check(self.mode in ("residual", "decode"), f"mode must be 'residual' or 'decode', got {self.mode!r}")
        check(0 < self.strength <= 1, f"strength must be in (0, 1], got {self.strength}")
        check(self.ddim_steps >= 1, f"ddim_steps must be at least 1, got {self.ddim_steps}")
        check(self.iterations >= 0, f"iterations must be 0 or more, got {self.iterations}")
        check(self.rounds >= 1, f"rounds must be at least 1, got {self.rounds}")
        check(self.draws >= 1, f"draws must be at least 1, got {self.draws}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")


def options(p: LDUParams) -> ObjectiveOptions:
    return ObjectiveOptions(prompt=p.prompt, surrogate=p.surrogate, surrogate_steps=p.surrogate_steps, surrogate_lr=p.surrogate_lr,
                            fresh_draws=p.fresh_draws, draws=p.draws, posting=p.posting, latent_target=p.latent_target,
                            posterior_shift=p.posterior_shift, minimise=p.minimise)


def trajectory_shift(backbone, x: torch.Tensor, params: LDUParams, draws, callback=None):
    """Protect a batch x [B,3,h,w] in [0,1]; returns (x_protected, stats). See the module docstring."""
    objective = Objective(backbone, options(params), x, draws, params.seed)
    try:
        return _optimise(backbone, x, params, draws, objective, callback)
    finally:
        objective.close()


def _optimise(backbone, x, params: LDUParams, draws, objective: Objective, callback):
    b = x.shape[0]
    residual = params.mode == "residual"
    # a best-so-far pick needs a fixed score: not with fresh draws or random transforms, nor with a surrogate that
    # changes between rounds (round 2's candidates would be scored by another model than round 1's best)
    keep_best = residual and not (params.fresh_draws or params.posting or params.surrogate == "lora")
    timesteps = ddim_timesteps(backbone.num_train_timesteps, params.strength, params.ddim_steps)
    c_empty = backbone.encode_prompt("")
    sched = dict(timesteps=timesteps, alphas_cumprod=backbone.alphas_cumprod, prediction_type=backbone.prediction_type)

    def model(z, t):
        return backbone.predict(z, t, c_empty, checkpoint=params.checkpoint)

    with torch.no_grad():
        clean_loss = objective(x, draws=draws, transform=False)
        clean_attacker_loss = objective.last_attacker_loss
    best, best_loss = x.clone(), clean_loss.clone()  # residual mode keeps, per image, the best candidate seen
    per_round = [params.iterations // params.rounds + (r < params.iterations % params.rounds) for r in range(params.rounds)]
    x_cur, base0, curve, grad_norm_first, step = x.clone(), None, [], None, 0
    lam, delta = torch.ones(b, device=x.device), None
    for rnd, n_it in enumerate(per_round):
        if n_it == 0:
            continue
        if rnd > 0:
            objective.adapt(x_cur)  # the LoRA surrogate learns what an attacker would now train on
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
                loss_adv = objective(x_p, checkpoint=params.checkpoint)
                if not residual:  # relative violation of mse(x_p, base0) <= b^2
                    g = (x_p - base0).pow(2).flatten(1).mean(1) / params.budget_rms**2 - 1
            if it > 0:
                with torch.no_grad():
                    if keep_best:
                        better = loss_adv > best_loss
                        best[better], best_loss[better] = x_p[better], loss_adv[better]
                step += 1
                curve.append(float(objective.last_attacker_loss.mean()))  # the attacker's loss alone, either direction
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
        x_cur = best.clone() if keep_best else x_p.detach()
    stats = {
        "timesteps": timesteps,
        "curve": curve,
        "grad_norm_first": grad_norm_first,
        "attacker_loss_clean_opt_draws": clean_attacker_loss.tolist(),
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
    budget_field="budget_rms",  # capped by linf; decode mode: RMS against the VAE reconstruction, not projected
    defaults={"tiny": dict(iterations=8, ddim_steps=2, draws=2)},
    budget=lambda p: (p.budget_rms, p.linf) if p.mode == "residual" else (None, None),
    # the paper's form: z_T (DDIM-inverted to T - 1: a forward-noised z_T decodes to another image), its TI-adapted
    # surrogate, 4 denoising steps, its decode output with the official budget (MSE <= (8/255)^2 on [-1, 1]: RMS
    # 4/255 in [0, 1]) as a penalty, one round
    presets={"paper": dict(strength=1.0, surrogate="ti", ddim_steps=4, mode="decode", budget_rms=4 / 255, rounds=1)},
    draws=lambda p: p.draws,
    # per step: k denoising calls, the loss over m draws and the VAE (~2); per round: inversion and base (2k)
    cost=lambda p: p.iterations * (p.ddim_steps + p.draws + 2) + p.rounds * 2 * p.ddim_steps,
)
