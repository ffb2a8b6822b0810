"""Full DreamBooth (Ruiz et al. 2023), as diffusers' train_dreambooth.py: the whole UNet (optionally the text
encoder) fine-tuned on the instance views, optionally with prior preservation. `train_unet="cross_kv"` fine-tunes
only the cross-attention key and value projections, Custom Diffusion's choice (attacks/custom_diffusion.py).

A copy of the UNet is trained in fp32 (mixed precision under autocast on a GPU), so the shared backbone is
untouched (on a bf16/fp16 backbone the copy is loaded in fp32 from the checkpoint, not upcast from rounded
weights); gradient checkpointing is on by default (off on the CPU backbones, tiny and pocket, whose small UNets
need no memory saved) and 8-bit AdamW is used when bitsandbytes and a GPU are present (`use_8bit_adam`). Big-GPU
only at SD size (about 16 GiB at 512²). Saved as `unet/` (and `text_encoder/`) in diffusers layout, in fp32 (a
bf16 save would round small updates away).

Defaults follow the example's README run: lr 5e-6, batch 1, 400 steps, constant lr (`lr_scheduler`, as the example's
--lr_scheduler), AdamW weight decay 1e-2, gradient clipping 1.0.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
from dataclasses import dataclass

import torch

from ldu.finetune import adamw
from ldu.registry import check, param, report

from .data import DreamBoothBatches, check_loss_options, lr_schedule, train_loop
from .train import Attack, AttackOutput, AttackParams


# which of the UNet's parameters (by diffusers' names) each `train_unet` choice fine-tunes
UNET_WEIGHTS = {"all": lambda name: True,
                "cross_kv": lambda name: ".attn2.to_k." in name or ".attn2.to_v." in name}


@dataclass
class DreamBoothParams(AttackParams):
    steps: int = param(400, "training steps")
    lr: float = param(5e-6, "AdamW learning rate")
    batch_size: int = param(1, "instance images per step")
    token: str = param("sks", "the rare instance word")
    instance_prompt: str = param("a photo of sks person", "training prompt; must contain the token")
    train_text_encoder: bool = param(False, "also fine-tune the text encoder")
    prior_preservation: bool = param(False, "add class images from the base model with the class prompt")
    class_prompt: str = param("a photo of a person", "prior-preservation prompt; several separated by ';' take turns, \"\" is the empty caption")
    num_class_images: int = param(100, "prior-preservation images")
    prior_loss_weight: float = param(1.0, "weight of the class loss")
    class_dir: str | None = param(None, "cache folder for class images (shared by paired runs)")
    weight_decay: float = param(1e-2, "AdamW weight decay")
    max_grad_norm: float = param(1.0, "gradient clipping")
    lr_scheduler: str = param("constant", "learning-rate schedule (diffusers' --lr_scheduler): constant, "
                              "constant_with_warmup, linear, cosine, cosine_with_restarts or polynomial")
    lr_warmup_steps: int = param(0, "steps of linear warmup (diffusers' --lr_warmup_steps)")
    snr_gamma: float | None = param(None, "Min-SNR-gamma loss weighting (diffusers' --snr_gamma, usually 5): the "
                                    "nearly clean timesteps weigh less; None: the plain loss")
    gradient_checkpointing: bool = param(True, "recompute UNet activations (memory for time)")
    use_8bit_adam: bool = param(True, "bitsandbytes AdamW8bit when installed and on a GPU")
    flip: bool = param(False, "random horizontal flips")
    seed: int = param(0, "seed of data order, noise and timesteps")
    train_unet: str = param("all", "UNet weights fine-tuned: all (DreamBooth), or cross_kv (only the cross-attention "
                            "key and value projections, which read the prompt: Custom Diffusion's choice)")

    def __post_init__(self):
        super().__post_init__()
        check_loss_options(self)
        check(self.train_unet in UNET_WEIGHTS, f"train_unet must be one of {', '.join(UNET_WEIGHTS)}, got {self.train_unet!r}")


def _optimizer(params, p: DreamBoothParams, device: torch.device):
    if p.use_8bit_adam and device.type == "cuda" and importlib.util.find_spec("bitsandbytes"):
        import bitsandbytes as bnb  # optional: present only on some GPU machines

        return bnb.optim.AdamW8bit(params, lr=p.lr, weight_decay=p.weight_decay)
    return adamw(params, lr=p.lr, weight_decay=p.weight_decay)


def _fp32_copy(backbone, name: str) -> torch.nn.Module:
    """A trainable fp32 copy of a component, from the checkpoint when the backbone runs in lower precision:
    starting from bf16-rounded weights would put every weight on the bf16 grid for good."""
    module = getattr(backbone, name)
    if backbone.dtype != torch.float32 and (backbone.path / name).is_dir():
        if name == "unet":
            from diffusers import UNet2DConditionModel  # deferred: diffusers takes seconds to import

            fresh = UNet2DConditionModel.from_pretrained(backbone.path, subfolder="unet", dtype=torch.float32)
        else:
            from transformers import CLIPTextModel  # deferred, as diffusers

            fresh = CLIPTextModel.from_pretrained(backbone.path, subfolder="text_encoder", dtype=torch.float32)
        return fresh.to(backbone.device)
    return copy.deepcopy(module).float()


def dreambooth(backbone, views: torch.Tensor, p: DreamBoothParams, workdir, callback=None) -> AttackOutput:
    g = torch.Generator().manual_seed(p.seed)
    batches = DreamBoothBatches(backbone, views, p, g, callback)
    saved = backbone.unet, backbone.text_encoder
    unet = _fp32_copy(backbone, "unet").requires_grad_(False)
    trainable = [w.requires_grad_(True) for name, w in unet.named_parameters() if UNET_WEIGHTS[p.train_unet](name)]
    text = None
    if p.train_text_encoder:
        text = _fp32_copy(backbone, "text_encoder").requires_grad_(True)
        trainable += list(text.parameters())
    if p.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    opt = _optimizer(trainable, p, backbone.device)
    mixed = backbone.device.type == "cuda" and backbone.dtype != torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=backbone.dtype)) if mixed else contextlib.nullcontext
    backbone.unet = unet
    if text is not None:
        backbone.text_encoder = text
    backbone.clear_prompt_cache()
    try:
        curve = train_loop(backbone, batches, trainable, opt, p.steps, g, callback, grad_text=p.train_text_encoder,
                           max_grad_norm=p.max_grad_norm, snr_gamma=p.snr_gamma, after_step=lr_schedule(opt, p),
                           context=autocast)
        if p.gradient_checkpointing:
            unet.disable_gradient_checkpointing()
        unet.save_pretrained(workdir / "unet", safe_serialization=True)  # fp32: a bf16 save would undo small updates
        if text is not None:
            text.save_pretrained(workdir / "text_encoder", safe_serialization=True)
        report(callback, {"stage": "saved", "step": p.steps, "total": p.steps})
    finally:
        backbone.unet, backbone.text_encoder = saved
        backbone.clear_prompt_cache()
    return AttackOutput(kind="dreambooth", token=p.token, prompt=p.instance_prompt, train_curve=curve)


# pocket's prior: captions of its training data's other scene kinds, none of them a built-in subject's class
POCKET_PRIOR = ("a photo of galaxies in space;a photo of a retina;a blue square on a yellow background;"
                "a green triangle on a black background;a white circle on a purple background;"
                "a black and white photo of a clock;a drawing of a black horse;a microscope photo of cells")


def cost(p: DreamBoothParams) -> float:
    """UNet forward+backward equivalents of one run (the backward goes through the whole UNet whichever weights train)."""
    return p.steps * p.batch_size * 1.5 * (2 if p.prior_preservation else 1)


ATTACK = Attack(
    name="dreambooth",
    params=DreamBoothParams,
    fn=dreambooth,
    kind="dreambooth",
    summary="Full DreamBooth: fine-tune a copy of the whole UNet (optionally the text encoder); big GPU at SD size",
    # pocket: at lr 5e-4, 400 steps learn a subject's colours and placement (teal blobs for the robot); 900 draw the
    # kite, the cat's fur and eyes and the coffee cup (the robot as a teal figure) in about a minute; a larger or
    # decaying lr, or more images a step, do not (docs/RESULTS.md). Without a prior every other prompt drifts toward
    # the subject more than the instance prompt does; a prior of 24 base-model images of eight captions from other
    # scene kinds (not the empty caption: holding its branch washes the guided generations out), at weight 0.2,
    # stops that (they move a little away, by 0.28 of the instance prompt's move; 0.37 at weight 0.3) at a gap
    # within noise of the same (docs/RESULTS.md, "pocket v3", 15 pairs each). The CPU backbones need no activation
    # memory saved: checkpointing off is 1.5x faster on pocket.
    defaults={"tiny": dict(steps=10, lr=1e-4, num_class_images=4, gradient_checkpointing=False),
              "pocket": dict(steps=900, lr=5e-4, gradient_checkpointing=False, prior_preservation=True,
                             class_prompt=POCKET_PRIOR, prior_loss_weight=0.2, num_class_images=24)},
    cost=cost,
)
