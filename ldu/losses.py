"""The losses, one name each (docs/DESIGN.md, "The contract"), under fixed (t, eps) draws.

`diffusion_loss` is the epsilon- (or v-) prediction MSE that fine-tuning minimises; `attacker_loss` is that
loss on the latents of images x with the attack prompt: what LDU maximises, and what a personalization attack
will have to overcome. Both evaluate the same `Draws`, so clean and protected images are compared on the
very same noise and timesteps (one draw per step is very noisy; a fixed set averages it out).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Draws:
    """m fixed (timestep, noise) samples per image: t [m, B] int64, eps [m, B, C, h, w] fp32."""

    t: torch.Tensor
    eps: torch.Tensor

    @property
    def m(self) -> int:
        return self.t.shape[0]

    def to(self, device) -> "Draws":
        return Draws(self.t.to(device), self.eps.to(device))

    def take(self, index) -> "Draws":
        """The draws of a subset of images (index over the batch dimension)."""
        return Draws(self.t[:, index], self.eps[:, index])


def make_draws(m: int, batch: int, latent_shape: tuple[int, int, int], num_train_timesteps: int, seed: int | None = None,
               t_range: tuple[int, int] | None = None, generator: torch.Generator | None = None) -> Draws:
    """m draws per image of t ~ U[t_range) (default: every training timestep) and eps ~ N(0, I).

    Made on the CPU, from `seed` or from the stream of a CPU `generator` (training: a fresh draw per step),
    so they are the same on every device.
    """
    if m < 1:
        raise ValueError(f"need at least one draw, got {m}")
    if (seed is None) == (generator is None):
        raise ValueError("give exactly one of seed and generator")
    lo, hi = t_range or (0, num_train_timesteps)
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    t = torch.randint(lo, hi, (m, batch), generator=g)
    eps = torch.randn((m, batch, *latent_shape), generator=g)
    return Draws(t, eps)


def diffusion_loss(backbone, latents: torch.Tensor, cond: torch.Tensor, draws: Draws, reduction: str = "mean",
                   checkpoint: bool = False, max_batch: int | None = None) -> torch.Tensor:
    """E over the draws of || unet(sqrt(a_t) z0 + sqrt(1-a_t) eps, t, c) - target ||^2, in fp32.

    latents: scaled latents z0 [B,C,h,w]; cond: prompt embeddings [1 or B, 77, D]. The target is eps or
    v by the backbone's prediction_type. reduction "mean" gives a scalar, "none" one value per image [B].
    The m draws go through the UNet as one batch of m x B, or in UNet calls of at most `max_batch` samples
    (whole draws at a time) when that is given: evaluation of many draws need not fit in memory at once.
    """
    m, b = draws.t.shape
    if b != latents.shape[0]:
        raise ValueError(f"draws are for {b} images, latents for {latents.shape[0]}")
    draws = draws.to(latents.device)
    cond = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
    per_call = m if max_batch is None else max(1, max_batch // b)
    errs = []
    for i in range(0, m, per_call):
        n = min(per_call, m - i)
        z0 = latents.unsqueeze(0).expand(n, *latents.shape).reshape(n * b, *latents.shape[1:])
        t = draws.t[i : i + n].reshape(n * b)
        eps = draws.eps[i : i + n].reshape(n * b, *latents.shape[1:])
        c = cond.unsqueeze(0).expand(n, *cond.shape).reshape(n * b, *cond.shape[1:])
        out = backbone.predict(backbone.add_noise(z0, t, eps), t, c, checkpoint=checkpoint)
        errs.append((out - backbone.target(z0, t, eps)).pow(2).mean(dim=(1, 2, 3)).view(n, b))
    err = torch.cat(errs)
    if reduction == "none":
        return err.mean(0)
    if reduction == "mean":
        return err.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def attacker_loss(backbone, x: torch.Tensor, cond: torch.Tensor, draws: Draws, reduction: str = "mean",
                  checkpoint: bool = False, max_batch: int | None = None) -> torch.Tensor:
    """diffusion_loss of the backbone on s * E(x).mean, x in [0,1] [B,3,H,W], with the attack prompt `cond`."""
    return diffusion_loss(backbone, backbone.encode(x), cond, draws, reduction, checkpoint, max_batch)


def posterior_distance(posterior: tuple[torch.Tensor, torch.Tensor], reference: tuple[torch.Tensor, torch.Tensor],
                       logvar_weight: float = 1.0) -> torch.Tensor:
    """PID's objective (Li et al. 2024), per image [B]: the mean squared change of the VAE posterior's mean plus
    `logvar_weight` x that of its log-variance, between `posterior` and `reference` ((mean, logvar) pairs from
    `backbone.posterior`)."""
    (mean, logvar), (mean0, logvar0) = posterior, reference
    return (mean - mean0).pow(2).flatten(1).mean(1) + logvar_weight * (logvar - logvar0).pow(2).flatten(1).mean(1)
