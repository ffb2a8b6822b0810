"""Generation after an attack (paired by seed), class images for prior preservation, and post_attack_loss."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ldu.io import load_images
from ldu.losses import Draws, diffusion_loss
from ldu.protect import instance_views, to_pil
from ldu.registry import report

from .adapter import Adapter, applied, pipeline


@torch.no_grad()
def generate(backbone, adapter: Adapter | None, prompts: list[str], seeds: list[int], steps: int = 25,
             guidance: float = 7.5, batch_size: int = 4, callback=None) -> list[torch.Tensor]:
    """Images [3,H,W] in [0,1] (fp32, CPU) for each (prompt, seed) pair, with the adapter applied (None: the base).

    Each image has its own CPU generator seeded with its seed, and batching is fixed, so an attack on clean
    and one on protected images generate pairs that differ only by what the adapters learned. The callback
    gets a dict per batch and cancels (Cancelled) by returning False.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds: give one seed per image")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    out = []
    with applied(backbone, adapter):
        pipe = pipeline(backbone)
        for i in range(0, len(prompts), batch_size):
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
            images = pipe(prompts[i : i + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                          height=backbone.resolution, width=backbone.resolution, generator=gens, output_type="pt").images
            out += [im.float().cpu() for im in images]
            report(callback, {"stage": "generate", "step": len(out), "total": len(prompts)})
    return out


EMPTY_CAPTION = '""'  # in a class prompt: the empty caption, the unconditional branch classifier-free guidance subtracts


def class_prompts(prompt: str, n: int) -> list[str]:
    """The prompt of each of n class images: `prompt`, or, with several separated by ';', each in turn (a prior over
    several prompts holds more of what the base model draws in place than one prompt does). `""` stands for the
    empty caption (a prior on it holds the unconditional prediction, which full fine-tuning otherwise moves too)."""
    parts = [q.strip() for q in prompt.split(";")]
    if not all(parts):
        raise ValueError(f"class_prompt has an empty prompt between its ';' ({prompt!r}): give one prompt, or several "
                         f"separated by ';' ({EMPTY_CAPTION} for the empty caption)")
    return [("" if q == EMPTY_CAPTION else q) for q in (parts[i % len(parts)] for i in range(n))]


def class_images(backbone, prompt: str, n: int, seed: int = 0, steps: int = 25, guidance: float = 7.5,
                 cache_dir: str | Path | None = None, callback=None) -> torch.Tensor:
    """n images of the class prompt from the base model (DreamBooth's prior preservation), [n,3,H,W]; several
    prompts separated by ';' take turns (`class_prompts`).

    With `cache_dir` they are kept as PNGs and reused, so paired runs (clean vs protected) share them.
    """
    if cache_dir is not None:  # one subfolder per (model, prompt, seed, sampler): a cache is never stale
        key = f"{backbone.spec}|{backbone.revision}|{prompt}|{seed}|{steps}|{guidance}"
        cache = Path(cache_dir) / hashlib.sha256(key.encode()).hexdigest()[:12]
        found = sorted(cache.glob("class_*.png")) if cache.is_dir() else []
        if len(found) >= n:
            return instance_views(load_images(found[:n]), backbone.resolution)
    # 8-bit like every image an attacker collects, and exactly what a later run reads back from the cache
    images = [(im * 255).round() / 255 for im in
              generate(backbone, None, class_prompts(prompt, n), [seed + i for i in range(n)], steps=steps, guidance=guidance,
                       callback=None if callback is None else lambda info: callback({**info, "stage": "class_images"}))]
    if cache_dir is not None:
        cache.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            to_pil(im).save(cache / f"class_{i:04d}.png")
    return torch.stack(images)


@torch.no_grad()
def post_attack_loss(backbone, adapter: Adapter | None, clean_views, draws: Draws | list[Draws], prompt: str | None = None,
                     reduction: str = "mean") -> torch.Tensor | list[torch.Tensor]:
    """The adapted model's diffusion loss on CLEAN held-out views of the subject, under fixed draws.

    How well the attacker learned the real subject (lower: learned better). Efficacy of a protection is this
    number after an attack on protected images minus after one on clean images. Views are prepared as
    training views are (short side resized, centre crop); the prompt defaults to the adapter's instance prompt.
    A list of draw sets gives a list of losses, with the adapter loaded and the views encoded once.
    """
    views = instance_views(clean_views, backbone.resolution).to(backbone.device)
    prompt = prompt or (adapter.prompt if adapter else "a photo of sks person")
    sets = draws if isinstance(draws, list) else [draws]
    with applied(backbone, adapter):
        latents, cond = backbone.encode(views), backbone.encode_prompt(prompt)
        losses = [diffusion_loss(backbone, latents, cond, d, reduction=reduction, max_batch=16) for d in sets]
    return losses if isinstance(draws, list) else losses[0]
