"""Training data for the attacks, prepared as diffusers' DreamBooth example prepares it.

Each view is resized so its short side is the backbone's resolution and center-cropped to a square, with
torchvision's Resize and CenterCrop arithmetic (bilinear, antialiased, as Resize does on a PIL image). The VAE posterior of every view (and of
its mirror image, when flips are on) is computed once; each training step samples latents from it, as the
example's `vae.encode(x).latent_dist.sample()` does, with the attack's own seeded generator.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from ldu.finetune import grad_scaler, train_step
from ldu.protect import instance_views  # noqa: F401  (re-exported: the attacks' view of their training images)
from ldu.registry import check, report

from .generate import class_images, class_prompts


@dataclass
class Posteriors:
    """Posterior mean and std (unscaled) of E(view) for N views, and of their mirror images when `flip`."""

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    flip: bool

    @classmethod
    @torch.no_grad()
    def of(cls, backbone, views: torch.Tensor, flip: bool = False) -> "Posteriors":
        x = views.to(backbone.device)
        if flip:
            x = torch.cat([x, x.flip(-1)])
        means, stds = [], []
        for chunk in x.split(4):
            mean, logvar = backbone.posterior(chunk)
            means.append(mean)
            stds.append((0.5 * logvar.clamp(-30, 20)).exp())  # as diffusers' DiagonalGaussianDistribution
        return cls(torch.cat(means), torch.cat(stds), backbone.scaling_factor, flip)

    @property
    def n(self) -> int:
        return self.mean.shape[0] // (2 if self.flip else 1)

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Scaled latents sampled for the views `index` (each mirrored with probability 1/2 when flipping)."""
        if self.flip:
            index = index + self.n * torch.randint(0, 2, index.shape, generator=generator)
        mean, std = self.mean[index], self.std[index]
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        return (mean + std * noise) * self.scaling_factor


class Shuffler:
    """Batches of indices from a seeded permutation, reshuffled every epoch (a DataLoader with shuffle=True)."""

    def __init__(self, n: int, generator: torch.Generator):
        self.n, self.generator, self.queue = n, generator, []

    def next(self, batch: int) -> torch.Tensor:
        out = []
        while len(out) < batch:
            if not self.queue:
                self.queue = torch.randperm(self.n, generator=self.generator).tolist()
            out.append(self.queue.pop(0))
        return torch.tensor(out)


# diffusers.optimization's schedules that need nothing but a warmup and the step count
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def check_loss_options(p) -> None:
    """The checks of the loss options shared by DreamBooth and LoRA-DreamBooth (DreamBoothBatches, train_loop and
    lr_schedule read them): at least one class image, no empty prompt between a class prompt's ';' (refused by name),
    a positive Min-SNR gamma, a known lr schedule and a warmup it can use."""
    check(p.num_class_images >= 1 or not p.prior_preservation, "num_class_images must be at least 1")
    check(p.snr_gamma is None or (math.isfinite(p.snr_gamma) and p.snr_gamma > 0),
          f"snr_gamma must be a positive number (5 is usual) or None, got {p.snr_gamma}")
    if p.prior_preservation:
        class_prompts(p.class_prompt, 1)
    check(p.lr_scheduler in LR_SCHEDULES,
          f"lr_scheduler must be one of {', '.join(LR_SCHEDULES)}, got {p.lr_scheduler!r}")
    check(0 <= p.lr_warmup_steps <= p.steps,
          f"lr_warmup_steps must be between 0 and steps ({p.steps}), got {p.lr_warmup_steps}")
    check(p.lr_warmup_steps == 0 or p.lr_scheduler != "constant",
          "lr_warmup_steps needs a schedule with a warmup (constant_with_warmup, linear, cosine, ...), not constant")


def lr_schedule(optimizer, p):
    """diffusers' get_scheduler over the attack's steps (the examples' --lr_scheduler and --lr_warmup_steps): the
    function to call after each optimiser step (train_loop's after_step)."""
    from diffusers.optimization import get_scheduler  # deferred: diffusers takes seconds to import

    return get_scheduler(p.lr_scheduler, optimizer, num_warmup_steps=p.lr_warmup_steps, num_training_steps=p.steps).step


class DreamBoothBatches:
    """Each step's latents, prompts and loss weights: instance views, plus as many class images with prior
    preservation (diffusers' DreamBooth collate: instance and class examples in one batch, the class loss
    weighted by prior_loss_weight)."""

    def __init__(self, backbone, views: torch.Tensor, p, generator: torch.Generator, callback=None):
        self.p, self.g = p, generator
        self.inst = Posteriors.of(backbone, views, flip=p.flip)
        self.inst_order = Shuffler(self.inst.n, generator)
        self.cls = self.cls_order = self.cls_prompts = None
        if p.prior_preservation:
            images = class_images(backbone, p.class_prompt, p.num_class_images, seed=p.seed, cache_dir=p.class_dir,
                                  callback=callback)
            self.cls = Posteriors.of(backbone, images, flip=p.flip)
            self.cls_order = Shuffler(self.cls.n, generator)
            self.cls_prompts = class_prompts(p.class_prompt, p.num_class_images)

    def __call__(self):
        b, p = self.p.batch_size, self.p
        z, prompts, weights = self.inst.sample(self.inst_order.next(b), self.g), [p.instance_prompt] * b, None
        if self.cls is not None:
            which = self.cls_order.next(b)
            z = torch.cat([z, self.cls.sample(which, self.g)])
            prompts += [self.cls_prompts[i] for i in which.tolist()]
            weights = torch.cat([torch.full((b,), 1 / b), torch.full((b,), p.prior_loss_weight / b)])
        return z, prompts, weights


def train_loop(backbone, batches, trainable, optimizer, steps: int, generator: torch.Generator, callback=None,
               grad_text: bool = False, max_grad_norm: float | None = 1.0, after_step=None,
               context=contextlib.nullcontext, snr_gamma: float | None = None) -> list[float]:
    """`steps` optimiser steps on batches() -> (latents, prompts, weights); returns the loss curve. snr_gamma:
    Min-SNR weighting of the loss (ldu.finetune.train_step)."""
    curve, scaler = [], grad_scaler(backbone)
    for step in range(steps):
        z, prompts, weights = batches()
        with context():
            cond = backbone.encode_prompt(prompts, grad=grad_text)
            curve.append(train_step(backbone, trainable, optimizer, z, cond, generator, weights, max_grad_norm, scaler,
                                    snr_gamma))
        if after_step is not None:
            after_step()
        report(callback, {"stage": "train", "step": step + 1, "total": steps, "loss": curve[-1]})
    return curve
