"""The LDU objective: what a protected image must make hard, as one object that the per-image optimisation
(ldu/methods/ldu.py) and the amortised generator (ldu/amortised.py) both maximise.

    objective = Objective(backbone, options, x_clean, fixed_draws, seed)
    value = objective(x_protected)        # [B]: to maximise (differentiable in x_protected)
    objective.last_attacker_loss          # [B]: that call's attacker loss alone (no sign, no extra terms)
    objective.adapt(x_protected)          # the surrogate follows the fine-tuning (when options.surrogate is "lora")
    objective.close()                     # removes the surrogate's adapter from the backbone

Its parts, each an option (`ObjectiveOptions`), each measured on its own (docs/RESULTS.md, "LDU ablation"):
- **the surrogate** whose fine-tuning loss is maximised: the base model with the attack prompt ("base"); a LoRA on the
  UNet trained a few steps on the current protected images between rounds, as Anti-DreamBooth's ASPL does, so the
  perturbation anticipates the attacker's fine-tuning ("lora"); or the prompt's token embedding learned on the clean
  images first, as the paper's Textual-Inversion-adapted surrogate ("ti");
- **the draws**: the attacker loss over fixed (t, eps) draws, or fresh draws every step (an expectation over t and eps
  rather than a fit to a few of them);
- **posting**: an expectation over what a social network does to an upload (JPEG through kornia's differentiable
  codec, a resize down and up, a blur), applied in the loop;
- **a latent target**: minus `latent_target` x the distance of E(x) to the latent of flat grey (PhotoGuard's encoder
  attack, which protected most on pocket at its budget);
- **a posterior shift**: plus `posterior_shift` x the distance of E(x)'s posterior (mean and log-variance) from the
  clean photo's, PID's objective (Li et al. 2024), the baseline that protected most under Custom Diffusion on pocket;
- **the direction**: the attacker's loss maximised (adversarial, as AdvDM and the paper), or minimised: an
  error-minimising perturbation, as unlearnable examples (Huang et al. 2021) and SDS(-) (Xue et al. 2024), which makes
  the photos already "explained" by the model so that fine-tuning has less of the subject left to learn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .finetune import UNET_LORA_TARGETS, adamw, add_lora, learn_token, remove_lora, train_step
from .losses import Draws, attacker_loss, make_draws, posterior_distance

SURROGATES = ("base", "lora", "ti")
ADAPTER = "ldu_surrogate"


@dataclass(frozen=True)
class ObjectiveOptions:
    prompt: str
    surrogate: str = "base"
    surrogate_steps: int = 5
    surrogate_lr: float = 1e-4
    surrogate_rank: int = 4
    fresh_draws: bool = False
    draws: int = 4
    posting: bool = False
    latent_target: float = 0.0
    posterior_shift: float = 0.0
    minimise: bool = False


def posting_transform(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One random posting transform of a batch [B,3,H,W] in [0,1], differentiable: nothing (1 in 4), JPEG at a quality
    in [60, 95] (kornia's differentiable codec; sides multiple of 16), a resize to 0.5-0.9 and back, or a blur."""
    from kornia.enhance import jpeg_codec_differentiable  # deferred: only the posting option needs kornia
    from torchvision.transforms.functional import gaussian_blur  # deferred, as kornia

    kind = int(torch.randint(4, (1,), generator=g))
    h, w = x.shape[-2:]
    if kind == 1 and h % 16 == 0 and w % 16 == 0:
        quality = torch.empty(x.shape[0]).uniform_(60, 95, generator=g).to(x)
        return jpeg_codec_differentiable(x.clamp(0, 1), quality)
    if kind == 2:
        f = float(torch.empty(1).uniform_(0.5, 0.9, generator=g))
        small = F.interpolate(x, size=(max(8, round(h * f)), max(8, round(w * f))), mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    if kind == 3:
        sigma = float(torch.empty(1).uniform_(0.4, 1.2, generator=g))
        k = 2 * math.ceil(3 * sigma) + 1
        return gaussian_blur(x, [k, k], [sigma, sigma])
    return x


class Objective:
    """The attacker's loss on what it would train on, under the chosen surrogate, draws and posting transforms."""

    def __init__(self, backbone, options: ObjectiveOptions, x_clean: torch.Tensor, fixed_draws: Draws, seed: int):
        if options.surrogate not in SURROGATES:
            raise ValueError(f"surrogate must be one of {SURROGATES}, got {options.surrogate!r}")
        self.bb, self.o, self.fixed = backbone, options, fixed_draws
        self.g = torch.Generator().manual_seed(seed)
        self.cond = backbone.encode_prompt(options.prompt)
        self.lora = None
        self.last_attacker_loss: torch.Tensor | None = None  # [B], set by each call: without the sign and extra terms
        try:
            self._setup(backbone, options, x_clean, seed)
        except BaseException:  # never leave an adapter in a shared backbone
            self.close()
            raise

    def _setup(self, backbone, options: ObjectiveOptions, x_clean: torch.Tensor, seed: int) -> None:
        if options.surrogate == "ti":  # the paper's surrogate: the prompt's token learned on the clean images
            with torch.no_grad():
                latents = backbone.encode(x_clean)
            self.cond = learn_token(backbone, latents, options.prompt, options.surrogate_steps * 10, options.surrogate_lr * 50,
                                    self.g)
        elif options.surrogate == "lora":
            self.lora = add_lora(backbone.unet, options.surrogate_rank, options.surrogate_rank, UNET_LORA_TARGETS, ADAPTER, seed)
            backbone.unet.disable_adapters()  # on only while the loss is computed: the trajectory model stays the base
        self.target = None
        if options.latent_target:
            with torch.no_grad():
                self.target = backbone.encode(torch.full_like(x_clean[:1], 0.5))
        self.posterior0 = None
        if options.posterior_shift:  # PID's reference: the clean photos' posteriors, one per image
            with torch.no_grad():
                self.posterior0 = backbone.posterior(x_clean)

    @property
    def sign(self) -> int:
        """+1 when the value is the attacker's loss, -1 when it is minus the loss (`minimise`)."""
        return -1 if self.o.minimise else 1

    def draws(self, x: torch.Tensor) -> Draws:
        if not self.o.fresh_draws:
            return self.fixed
        shape = self.bb.latent_shape(tuple(x.shape[-2:]))
        return make_draws(self.o.draws, x.shape[0], shape, self.bb.num_train_timesteps, generator=self.g).to(self.bb.device)

    def __call__(self, x_p: torch.Tensor, draws: Draws | None = None, checkpoint: bool = False, transform: bool = True) -> torch.Tensor:
        """[B] values to maximise (the attacker's loss; minus it with `minimise`). `draws` overrides the option's draws
        (scoring on fixed held-out draws); transform=False measures without the posting transforms."""
        x = posting_transform(x_p, self.g) if self.o.posting and transform else x_p
        if self.lora is not None:
            self.bb.unet.enable_adapters()
            checkpoint = False  # a recomputation in backward would run with the adapter already switched off
        try:
            value = attacker_loss(self.bb, x, self.cond, draws if draws is not None else self.draws(x_p), reduction="none",
                                  checkpoint=checkpoint)
        finally:
            if self.lora is not None:
                self.bb.unet.disable_adapters()
        self.last_attacker_loss = value.detach()  # the attacker's loss alone, for curves and stats
        value = self.sign * value  # minimise: the loss's negative is what is maximised
        if self.target is not None:
            value = value - self.o.latent_target * (self.bb.encode(x_p) - self.target).pow(2).flatten(1).mean(1)
        if self.posterior0 is not None:
            if self.posterior0[0].shape[0] != x_p.shape[0]:
                raise ValueError("posterior_shift measures each image against its own clean photo: call the objective "
                                 f"on the {self.posterior0[0].shape[0]} images it was made with, not {x_p.shape[0]}")
            value = value + self.o.posterior_shift * posterior_distance(self.bb.posterior(x_p), self.posterior0)
        return value

    def adapt(self, x_p: torch.Tensor) -> None:
        """The LoRA surrogate learns the current protected images for a few steps (ASPL's surrogate learning)."""
        if self.lora is None or self.o.surrogate_steps == 0:
            return
        opt = adamw(self.lora, lr=self.o.surrogate_lr, weight_decay=1e-2)
        with torch.no_grad():
            mean, logvar = self.bb.posterior(x_p.detach())
        self.bb.unet.enable_adapters()
        try:
            for _ in range(self.o.surrogate_steps):
                z = (mean + (0.5 * logvar).exp() * torch.randn(mean.shape, generator=self.g).to(mean)) * self.bb.scaling_factor
                train_step(self.bb, self.lora, opt, z, self.cond.expand(x_p.shape[0], -1, -1), self.g)
        finally:
            self.bb.unet.disable_adapters()

    def close(self) -> None:
        if self.lora is not None:
            self.bb.unet.enable_adapters()
            remove_lora(self.bb.unet, ADAPTER)
            self.lora = None
