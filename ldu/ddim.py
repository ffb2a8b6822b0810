"""Deterministic DDIM (eta = 0) inversion and denoising over a partial trajectory, as plain differentiable functions.

Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12 with sigma = 0, run forwards (inversion, as in
Mokady et al. 2023, "Null-text Inversion") or backwards (denoising). Both functions share one signature, in
the spirit of k-diffusion's samplers:

    ddim_invert(model, z, timesteps, alphas_cumprod, prediction_type="epsilon", checkpoint=False, callback=None)
    ddim_denoise(model, z, timesteps, alphas_cumprod, prediction_type="epsilon", checkpoint=False, callback=None)

`model(z, t)` returns the network's raw output (epsilon or v) for latents z [B,C,h,w] at integer timestep t.
`timesteps` is the ascending grid [0, t_1, ..., t_k] from `ddim_timesteps`; its first entry stands for the clean
end, whose alpha is exactly 1, so denoising returns the x0-prediction of the last step and a model that always
returns the true epsilon makes invert-then-denoise exact. Gradients flow unless the caller wraps the call in
torch.no_grad(); `checkpoint` recomputes each model call's activations in backward to save memory.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

Model = Callable[[torch.Tensor, int], torch.Tensor]


def ddim_timesteps(num_train_timesteps: int, strength: float, steps: int) -> list[int]:
    """The grid [0, t_1, ..., t_k]: k evenly spaced timesteps ending at t* = strength x T (at most T - 1)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    if steps < 1:
        raise ValueError(f"ddim_steps must be at least 1, got {steps}")
    t_end = min(max(1, round(strength * num_train_timesteps)), num_train_timesteps - 1)
    grid = sorted({round(i * t_end / steps) for i in range(1, steps + 1)} - {0})
    return [0] + grid


def _alpha(alphas_cumprod: torch.Tensor, t: int) -> torch.Tensor:
    # The clean end of the grid has alpha exactly 1 (as DDIM with set_alpha_to_one).
    return alphas_cumprod.new_tensor(1.0) if t == 0 else alphas_cumprod[t]


def _eps(out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """The noise the model sees in z, reading its output with the signal level a of the timestep it was given."""
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":  # v = sqrt(a) eps - sqrt(1-a) x0 (Salimans & Ho 2022)
        return a.sqrt() * out + (1 - a).sqrt() * z
    raise ValueError(f"prediction_type {prediction_type!r} is not supported (epsilon or v_prediction)")


def _x0(out: torch.Tensor, z: torch.Tensor, a: torch.Tensor, prediction_type: str) -> torch.Tensor | None:
    """A v-prediction's clean latents, read directly (defined at zero signal, a = 0, where dividing by sqrt(a) is
    not: a zero-terminal-SNR schedule's last timestep); None for epsilon, whose x0 `_step` derives."""
    return a.sqrt() * z - (1 - a).sqrt() * out if prediction_type == "v_prediction" else None


def _step(eps: torch.Tensor, z: torch.Tensor, a_here: torch.Tensor, a_new: torch.Tensor,
          x0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step (eq. 12, sigma = 0) from level a_here to a_new with a shared noise estimate; returns (z_new, x0)."""
    if x0 is None:
        x0 = (z - (1 - a_here).sqrt() * eps) / a_here.sqrt()
    return a_new.sqrt() * x0 + (1 - a_new).sqrt() * eps, x0


def _call(model: Model, z: torch.Tensor, t: int, checkpoint: bool) -> torch.Tensor:
    if checkpoint and torch.is_grad_enabled():
        return _checkpoint(model, z, t, use_reentrant=False)
    return model(z, t)


def ddim_invert(model: Model, z: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor,
                prediction_type: str = "epsilon", checkpoint: bool = False, callback=None) -> torch.Tensor:
    """Clean latents z0 -> z at timesteps[-1], one deterministic DDIM step per grid interval.

    Step i evaluates the model at the TARGET timestep t_i on the current latents (the usual approximation
    eps(z_{t_i}) ~ eps(z_{t_{i-1}}), as diffusers' DDIMInverseScheduler), so denoising, which evaluates at
    t_i too, sees the same timestep embeddings. A v-prediction is read as a noise estimate with the signal
    level of t_i (the level the model was told), then stepped like epsilon.
    """
    for i in range(1, len(timesteps)):
        a_here, a = _alpha(alphas_cumprod, timesteps[i - 1]), _alpha(alphas_cumprod, timesteps[i])
        eps = _eps(_call(model, z, timesteps[i], checkpoint), z, a, prediction_type)
        z, x0 = _step(eps, z, a_here, a)
        if callback is not None:
            callback({"i": i - 1, "t": timesteps[i], "z": z, "x0": x0})
    return z


def ddim_denoise(model: Model, z: torch.Tensor, timesteps: list[int], alphas_cumprod: torch.Tensor,
                 prediction_type: str = "epsilon", checkpoint: bool = False, callback=None) -> torch.Tensor:
    """z at timesteps[-1] -> clean latents, one deterministic DDIM step per grid interval (eq. 12, sigma = 0)."""
    for i in range(len(timesteps) - 1, 0, -1):
        a, a_next = _alpha(alphas_cumprod, timesteps[i]), _alpha(alphas_cumprod, timesteps[i - 1])
        out = _call(model, z, timesteps[i], checkpoint)
        z, x0 = _step(_eps(out, z, a, prediction_type), z, a, a_next, _x0(out, z, a, prediction_type))
        if callback is not None:
            callback({"i": len(timesteps) - 1 - i, "t": timesteps[i], "z": z, "x0": x0})
    return z
