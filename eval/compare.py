"""What the app's tabs run, as plain functions (the app only wires widgets to these; tests and scripts call them too).

- `estimate_seconds`: a time estimate before a long run, from one measured UNet forward+backward.
- `survives_posting`: does the protection still raise the attacker's loss after JPEG + resize (what a social
  network does to an upload)?
- `attack_and_compare`: the attacker's view: the same attack with the same seed on the clean and on the protected
  photos, paired generations, both loss curves, and the efficacy metrics with post_attack_loss first.
"""

from __future__ import annotations

import time

import torch

_UNET_SECONDS: dict = {}


def unet_seconds(backbone) -> float:
    """One UNet forward+backward at batch 1 on this backbone (measured once per backbone and cached)."""
    key = (backbone.spec, str(backbone.device), str(backbone.dtype))
    if key not in _UNET_SECONDS:
        c = backbone.encode_prompt("")
        z = torch.randn(1, *backbone.latent_shape(), device=backbone.device, requires_grad=True)
        backbone.predict(z, 500, c).sum().backward()  # warm-up
        t0 = time.perf_counter()
        backbone.predict(z, 500, c).sum().backward()
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        _UNET_SECONDS[key] = time.perf_counter() - t0
    return _UNET_SECONDS[key]


def estimate_seconds(backbone, method: str, params, n_images: int, sizes: list[tuple[int, int]] | None = None) -> float:
    """Rough wall time of protect(): UNet-call-equivalents per optimisation step x the measured UNet time.

    LDU: k denoising calls + the loss call + VAE passes (~2 UNet-equivalents) per step; pixel PGD methods: one
    loss call + the VAE encoder; ASPL adds its surrogate fine-tuning. Scaled by the batch (calls are batched) and,
    given the photos' sizes (height, width), by their canvases: protect() makes one call per canvas shape, and a
    4:3 photo's canvas has about 4/3 the area of a square one.
    """
    it = getattr(params, "iterations", 0)
    if method == "ldu":
        per_step = params.ddim_steps + params.draws + 2
        fixed = params.rounds * 2 * params.ddim_steps
    elif method == "aspl":
        per_step = 2 + 2 * params.surrogate_steps / max(1, params.pgd_steps)
        fixed = 0
    else:
        per_step, fixed = getattr(params, "draws", 1) + 1, 0
    from ldu.protect import canvases_for, working_size

    side = working_size(backbone)
    shapes: dict[tuple[int, int], float] = {}  # canvas shape -> images on it, in square-canvas units of area
    for c in canvases_for(sizes or [(side, side)] * n_images, backbone):
        shapes[c.shape] = shapes.get(c.shape, 0.0) + c.H * c.W / side**2
    batch_factor = sum(0.5 + 0.5 * area for area in shapes.values())  # batched calls cost less than n separate ones
    return (it * per_step + fixed) * unet_seconds(backbone) * batch_factor


@torch.no_grad()
def survives_posting(backbone, clean, protected, prompt: str, quality: int = 85, scale: float = 0.75, seed: int = 0) -> dict:
    """Attacker loss (16 fixed draws) on clean and protected photos, before and after JPEG(quality) + resize(scale)."""
    from attacks import purify
    from ldu import attacker_loss, make_draws
    from ldu.protect import to_working

    def posted(images):
        return purify(purify(images, "resize", {"factor": scale}), "jpeg", {"quality": quality})

    cond = backbone.encode_prompt(prompt)
    draws = make_draws(16, len(clean), backbone.latent_shape(), backbone.num_train_timesteps, seed=seed + 4242)
    loss = {name: float(attacker_loss(backbone, to_working([im.float() for im in images], backbone), cond, draws, max_batch=32))
            for name, images in (("clean", clean), ("protected", protected), ("clean_posted", posted(clean)),
                                 ("protected_posted", posted(protected)))}
    loss["gain"] = loss["protected"] - loss["clean"]
    loss["gain_after_posting"] = loss["protected_posted"] - loss["clean_posted"]
    loss["kept"] = loss["gain_after_posting"] / loss["gain"] if loss["gain"] > 0 else float("nan")
    return loss


def attack_and_compare(backbone, clean, protected, attack: str = "lora_dreambooth", attack_params: dict | None = None,
                       purification: str = "none", purification_params: dict | None = None, held_out=None,
                       seed: int = 0, n_gen: int = 4, gen_steps: int = 25, guidance: float = 7.5, metrics=None,
                       callback=None) -> dict:
    """Train the same attack (same seed) on the clean and on the (optionally purified) protected photos; generate
    with the same seeds; measure. held_out: clean photos of the subject not used for training (default: the clean
    photos themselves, which favours the clean attack: say so when you show the number)."""
    from attacks import generate, get_attack, post_attack_loss, purify, train
    from ldu import make_draws

    from .metrics import metrics as registry
    from .metrics import measure

    attack_params = {**(attack_params or {})}
    if "seed" in get_attack(attack).params.__dataclass_fields__:
        attack_params.setdefault("seed", seed)
    a = get_attack(attack).make_params(backbone.kind, **attack_params)  # every problem before any training
    steps = a.steps

    def stage(name, offset):
        def cb(info):
            if callback is None:
                return True
            if info.get("stage") == "train":
                return callback({"stage": name, "step": offset + info["step"], "total": 2 * steps})
            return callback({**info, "stage": f"{name}: {info.get('stage')}"})
        return cb

    attacked = protected
    if purification and purification != "none":
        attacked = purify(protected, purification, purification_params or {}, backbone=backbone)
    on_clean = train(backbone, clean, attack, a, callback=stage("attack on clean photos", 0))
    on_protected = train(backbone, attacked, attack, a, callback=stage("attack on protected photos", steps))
    held = held_out if held_out is not None else clean
    draws = make_draws(16, len(held), backbone.latent_shape(), backbone.num_train_timesteps, seed=seed + 10_000)
    seeds = [1000 * seed + i for i in range(n_gen)]
    gens_clean = generate(backbone, on_clean, [on_clean.prompt] * n_gen, seeds, steps=gen_steps, guidance=guidance)
    gens_protected = generate(backbone, on_protected, [on_protected.prompt] * n_gen, seeds, steps=gen_steps, guidance=guidance)
    pal_clean = float(post_attack_loss(backbone, on_clean, held, draws))
    pal_protected = float(post_attack_loss(backbone, on_protected, held, draws))
    rows = [("post_attack_loss (lower = learned the subject better)", pal_clean, pal_protected),
            ("efficacy = protected - clean (higher = better protection)", None, pal_protected - pal_clean)]
    references = [im.float() for im in held]
    for name in metrics or [m for m, entry in registry.items() if entry.kind == "efficacy"]:
        rows.append((name, measure(name, gens_clean, references, on_clean.prompt),
                     measure(name, gens_protected, references, on_protected.prompt)))
    return {"adapters": (on_clean, on_protected), "curves": (on_clean.train_curve, on_protected.train_curve),
            "generations": (gens_clean, gens_protected), "rows": rows, "held_out_is_training_set": held_out is None,
            "purified": attacked if attacked is not protected else None}
