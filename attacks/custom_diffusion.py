"""Custom Diffusion (Kumari et al. 2023, "Multi-Concept Customization of Text-to-Image Diffusion"): only the
cross-attention key and value projections of the UNet are fine-tuned, the weights that read the prompt, so the
subject is tied to its words and the rest of the model is left as it was.

It is DreamBooth's training loop (attacks/dreambooth.py) with `train_unet="cross_kv"` and the settings of
diffusers' train_custom_diffusion.py README run: lr 1e-5 scaled by its batch of 2 (`--scale_lr`) to 2e-5, 250 steps.
Two deviations, both to keep one attack interface: the instance word is an existing rare token ("sks") instead of a
new modifier token whose embedding also trains, and prior preservation (off by default) uses the base model's
generations instead of retrieved real photos. Saved as DreamBooth saves (`unet/`, the whole UNet), so the same
loader applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ldu.registry import param

from .dreambooth import DreamBoothParams, cost, dreambooth
from .train import Attack


@dataclass
class CustomDiffusionParams(DreamBoothParams):
    steps: int = param(250, "training steps")
    lr: float = param(2e-5, "AdamW learning rate")
    batch_size: int = param(2, "instance images per step")
    train_unet: str = param("cross_kv", "UNet weights fine-tuned: cross_kv (Custom Diffusion), or all (DreamBooth)")


ATTACK = Attack(
    name="custom_diffusion",
    params=CustomDiffusionParams,
    fn=dreambooth,
    kind="dreambooth",
    summary="Custom Diffusion: fine-tune only the UNet's cross-attention key/value projections (the prompt's path)",
    # pocket: lr 1e-3 lowers the held-out loss most (robot: 0.072 -> 0.054; 5e-3 0.057, 2e-2 0.069; docs/RESULTS.md)
    defaults={"tiny": dict(steps=10, lr=1e-3, num_class_images=4, gradient_checkpointing=False),
              "pocket": dict(lr=1e-3, gradient_checkpointing=False)},  # checkpointing: as DreamBooth's
    cost=cost,
)
