"""Measure a pocket model: VAE reconstruction, diffusion loss against a random model of the same size, how much
the caption matters, and caption following of classifier-free-guided generations (guidance 4, 7.5 and 12). Writes check.json and
grid.png (one row per caption class) and prints a table.

    python -m ldu.pocket check                     # the shipped assets/pocket
    python -m ldu.pocket check --model runs/pocket/pipeline
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from ..backbone import load_backbone
from ..losses import diffusion_loss, make_draws
from ..metrics import thumbnails
from ..protect import to_pil
from ..subjects import SUBJECTS, subject_views
from . import data
from .train import Config, build_models

GUIDANCE = 7.5  # Stable Diffusion's default; the grid and the headline number use it
GUIDANCE_SWEEP = (4.0, 7.5, 12.0)
STEPS = 25


def to_unit(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255


# Boxes (left, top, right, bottom) around chelsea's eyes in the whole photo squashed to 64 x 64.
EYES = {"left_eye": (18, 18, 31, 30), "right_eye": (39, 23, 52, 35)}
FLAT_COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0),
                "magenta": (255, 0, 255), "cyan": (0, 255, 255), "grey": (128, 128, 128), "orange": (245, 140, 20)}


def synthetic_images(size: int = data.SIZE) -> dict[str, torch.Tensor]:
    """Smooth images a VAE must not shift: the saturated gradient R = 4x, G = 4y, B = 2(x + y) and flat colours."""
    yy, xx = np.mgrid[0:size, 0:size]
    out = {"gradient": np.stack([4 * xx, 4 * yy, 2 * (xx + yy)], -1).clip(0, 255).astype(np.uint8)}
    out.update({f"flat_{k}": np.full((size, size, 3), v, np.uint8) for k, v in FLAT_COLOURS.items()})
    return {k: to_unit(v[None])[0] for k, v in out.items()}


def whole_photo(name: str) -> torch.Tensor:
    """A photo subject's whole photo squashed to the model's size: [1,3,64,64] in [0,1] (EYES are boxes in chelsea's)."""
    return to_unit(np.array(Image.fromarray(data.photo(name)).resize((data.SIZE, data.SIZE), Image.LANCZOS))[None])


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return 10 * math.log10(1 / max(float((a - b).pow(2).mean()), 1e-12))


@torch.no_grad()
def vae_measures(round_trip, seed: int = 5) -> tuple[dict, torch.Tensor]:
    """What a VAE keeps, measured on images it never trained on. round_trip: [N,3,64,64] in [0,1] -> reconstructions.

    - held-out photos: 32 views of each photo subject (chelsea and coffee, both halves), PSNR per subject and mean;
    - synthetic: the saturated gradient and flat colours, PSNR and per-channel mean error in /255 (colour shift);
    - chelsea's eyes: PSNR inside a box around each eye of the whole photo squashed to 64 x 64.
    Returns the numbers and a picture (rows: originals, reconstructions) of chelsea, coffee and the gradient."""
    res: dict = {"held_out_photos": {}}
    photos = [n for n, s in SUBJECTS.items() if s.photo]
    for name in photos:
        views = torch.cat([to_unit(subject_views(name, split, 16, seed=seed)[0]) for split in ("train", "held_out")])
        rec = round_trip(views).clamp(0, 1)
        res["held_out_photos"][name] = float(np.mean([_psnr(a, b) for a, b in zip(views, rec)]))
    res["held_out_photos_mean"] = float(np.mean(list(res["held_out_photos"].values())))
    synth = synthetic_images()
    x = torch.stack(list(synth.values()))
    rec = round_trip(x).clamp(0, 1)
    res["synthetic"] = {k: {"psnr": _psnr(a, b), "mean_error_255": [round(float(e), 2) for e in (b - a).mean((1, 2)) * 255]}
                        for k, a, b in zip(synth, x, rec)}
    res["synthetic_psnr_min"] = min(v["psnr"] for v in res["synthetic"].values())
    res["synthetic_colour_shift_max_255"] = max(abs(e) for v in res["synthetic"].values() for e in v["mean_error_255"])
    cat = whole_photo("chelsea")
    cat_rec = round_trip(cat).clamp(0, 1)
    res["chelsea_whole_psnr"] = _psnr(cat[0], cat_rec[0])
    for k, (l, t, r, b) in EYES.items():
        res[f"chelsea_{k}_psnr"] = _psnr(cat[0, :, t:b, l:r], cat_rec[0, :, t:b, l:r])
    cup = whole_photo("coffee")
    originals = torch.cat([cat, cup, x[:1]])
    picture = torch.cat([torch.cat(list(originals), 2), torch.cat(list(round_trip(originals).clamp(0, 1)), 2)], 1)
    return res, picture


@torch.no_grad()
def vae_psnr(bb, images: torch.Tensor) -> list[float]:
    rec = bb.decode(bb.encode(images)).clamp(0, 1)
    mse = (rec - images).pow(2).flatten(1).mean(1)
    return [10 * math.log10(1 / m) for m in mse.tolist()]


@torch.no_grad()
def loss_on(bb, unet, text, images: torch.Tensor, captions: list[str], seed: int) -> float:
    """epsilon-prediction MSE of (unet, text) on images under seeded draws (4 per image)."""
    z = bb.encode(images)
    ids = bb.token_ids(captions)
    saved = bb.unet, bb.text_encoder
    bb.unet, bb.text_encoder = unet, text
    try:
        cond = text(ids)[0]
        draws = make_draws(4, z.shape[0], tuple(z.shape[1:]), bb.num_train_timesteps, seed=seed)
        return float(diffusion_loss(bb, z, cond, draws, max_batch=256))
    finally:
        bb.unet, bb.text_encoder = saved


def check(model: str = "pocket", out: Path | None = None, samples: int = 16, seed: int = 0) -> dict:
    bb = load_backbone(model, device="cpu", dtype=torch.float32)
    out = Path(out) if out else bb.path
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"model": bb.spec, "revision": bb.revision}

    # 1. VAE reconstruction: held-out photos (never trained on), smooth synthetic images, chelsea's eyes, and fresh
    #    training-distribution images; the reconstructions of chelsea, coffee and the gradient go to vae.png.
    with torch.no_grad():
        measures, picture = vae_measures(lambda x: bb.decode(bb.encode(x)))
    res["vae"] = measures
    res["vae_psnr_held_out"] = measures["held_out_photos_mean"]
    to_pil(picture).resize((picture.shape[2] * 3, picture.shape[1] * 3), Image.NEAREST).save(out / "vae.png")
    held = torch.cat([to_unit(subject_views(n, split, 16, seed=seed + 5)[0]) for n, s in SUBJECTS.items() if s.photo
                      for split in ("train", "held_out")])
    fresh_np, fresh_caps = data.batch(seed + 999, 0, 64)
    fresh = to_unit(fresh_np)
    res["vae_psnr_training_distribution"] = float(np.mean(vae_psnr(bb, fresh)))

    # 2. Diffusion loss on fresh images vs a random model of the same architecture; and how much captions matter.
    cfg = json.loads((bb.path / "training.json").read_text())["config"] if (bb.path / "training.json").exists() else {}
    _, rand_text, rand_unet = build_models(Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}), bb.tokenizer)
    shuffled = [fresh_caps[(i + 7) % len(fresh_caps)] for i in range(len(fresh_caps))]
    res["loss_true_captions"] = loss_on(bb, bb.unet, bb.text_encoder, fresh, fresh_caps, seed)
    res["loss_empty_captions"] = loss_on(bb, bb.unet, bb.text_encoder, fresh, [""] * len(fresh_caps), seed)
    res["loss_shuffled_captions"] = loss_on(bb, bb.unet, bb.text_encoder, fresh, shuffled, seed)
    res["loss_random_model"] = loss_on(bb, rand_unet.eval(), rand_text.eval(), fresh, fresh_caps, seed)
    res["loss_held_out_subjects"] = loss_on(bb, bb.unet, bb.text_encoder, held,
                                             [c for c in data.HELD_OUT.values() for _ in range(held.shape[0] // 2)], seed)

    # 3. Caption following: is a generation nearest (8x8 thumbnail distance) to a real image of its own caption's
    #    class? 1-nearest-neighbour over 64 real images per class (the classes are multi-modal: shapes at random
    #    places and sizes), and, stricter, the nearest class centroid. Swept over the guidance scale.
    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=DDIMScheduler.from_config(bb.scheduler.config), safety_checker=None,
                                   feature_extractor=None, image_encoder=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    classes = list(data.CHECK_CLASSES)
    reals = [thumbnails(to_unit(data.class_examples(c, 64))) for c in classes]
    centroids = torch.stack([r.mean(0) for r in reals])
    pool, labels = torch.cat(reals), torch.arange(len(classes)).repeat_interleave(64)
    sweep, rows = {}, []
    for guidance in GUIDANCE_SWEEP:
        nn_hits, centroid_hits, per_class = 0, 0, {}
        for k, caption in enumerate(classes):
            gens = pipe([caption] * samples, num_inference_steps=STEPS, guidance_scale=guidance, height=data.SIZE,
                        width=data.SIZE, output_type="pt",
                        generator=[torch.Generator().manual_seed(seed * 1000 + i) for i in range(samples)]).images.float()
            f = thumbnails(gens)
            hit = labels[torch.cdist(f, pool).argmin(1)] == k
            per_class[caption] = float(hit.float().mean())
            nn_hits += int(hit.sum())
            centroid_hits += int((torch.cdist(f, centroids).argmin(1) == k).sum())
            if guidance == GUIDANCE:
                rows.append(torch.cat(list(gens[:8]), dim=2))
        sweep[str(guidance)] = {"nearest_neighbour": nn_hits / (samples * len(classes)),
                                "nearest_centroid": centroid_hits / (samples * len(classes)), "per_class": per_class}
    res["caption_following"] = sweep[str(GUIDANCE)]["nearest_neighbour"]
    res["caption_following_per_class"] = sweep[str(GUIDANCE)]["per_class"]
    res["caption_following_by_guidance"] = sweep
    res["caption_following_chance"] = 1 / len(classes)
    res["generation"] = {"guidance": GUIDANCE, "steps": STEPS, "samples_per_class": samples}
    to_pil(torch.cat(rows, dim=1)).save(out / "grid.png")
    (out / "check.json").write_text(json.dumps(res, indent=2) + "\n")
    print(f"model {bb.spec} ({bb.revision})")
    print(f"  VAE: held-out photos {measures['held_out_photos']}, synthetic min {measures['synthetic_psnr_min']:.2f} dB "
          f"(colour shift max {measures['synthetic_colour_shift_max_255']:.2f}/255), chelsea's eyes "
          f"{measures['chelsea_left_eye_psnr']:.2f} / {measures['chelsea_right_eye_psnr']:.2f} dB")
    for key in ("vae_psnr_held_out", "vae_psnr_training_distribution", "loss_true_captions", "loss_empty_captions",
                "loss_shuffled_captions", "loss_random_model", "loss_held_out_subjects", "caption_following"):
        print(f"  {key:<32} {res[key]:.4f}")
    for caption, acc in res["caption_following_per_class"].items():
        print(f"    {acc:5.2f}  {caption}")
    for guidance, r in sweep.items():
        print(f"  guidance {guidance:>4}: nearest neighbour {r['nearest_neighbour']:.3f}, nearest centroid {r['nearest_centroid']:.3f}")
    print(f"wrote {out / 'check.json'} and {out / 'grid.png'} (rows: {'; '.join(classes)})")
    return res
