"""Personalization attacks and purifications: what a protection must withstand.

    from attacks import train, generate, post_attack_loss, purify
    adapter = train(backbone, protected_images, attack="lora_dreambooth", params={"steps": 400}, out="runs/lora")
    images = generate(backbone, adapter, ["a photo of sks person"] * 4, seeds=[0, 1, 2, 3])
    loss = post_attack_loss(backbone, adapter, clean_held_out_views, draws)

Registries: `attacks` (lora_dreambooth, textual_inversion, dreambooth, custom_diffusion) and `purifications` (jpeg,
gaussian_blur, resize, gaussian_noise, diffpure, gridpure, noisy_upscale). A new one is one file plus one
`register(...)` line here.
"""

from . import custom_diffusion as _custom
from . import dreambooth as _dreambooth
from . import lora_dreambooth as _lora
from . import textual_inversion as _ti
from .adapter import Adapter, applied, pipeline
from .generate import class_images, generate, post_attack_loss
from .purify import PurificationUnavailable, get_purification, purifications, purify
from .train import Attack, AttackOutput, attacks, default_attack, get_attack, register, train

for _module in (_lora, _ti, _dreambooth, _custom):
    register(_module.ATTACK)

__all__ = [
    "Adapter", "Attack", "AttackOutput", "PurificationUnavailable", "applied", "attacks", "class_images", "default_attack",
    "generate",
    "get_attack", "get_purification", "pipeline", "post_attack_loss", "purifications", "purify", "register", "train",
]
