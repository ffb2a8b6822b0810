"""`protect()`: the one wrapper that owns sizes and budgets (DESIGN.md, "The contract").

It resizes each image to the backbone's working size, runs the method's tensor function on the batch,
upsamples only the RESIDUAL back to each image's original size, projects it per image at that size onto the
method's budget in fp32, and rounds it toward zero to whole code steps of the image's bit depth, so the
quantised result can never exceed the budget and a zero residual returns the input bit for bit.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .budget import project
from .io import LoadedImage, load_images, save_png
from .losses import attacker_loss, make_draws
from .methods import get_method, report
from .metrics import difference_stats
from .version import code_version, library_versions

MAX_BATCH = 8  # one subject's photos are protected together; the CLI splits larger sets
EVAL_DRAWS = 16  # held-out draws for the reported attacker loss (the method optimises on its own m draws)
EVAL_SEED_OFFSET = 1_000_003
EVAL_MAX_BATCH = 16  # UNet samples per call when measuring: 8 images x 16 draws need not fit at once


@dataclass
class ProtectResult:
    """Protected images ([3,H,W] fp32 on the CPU, exact code values of each source's bit depth), stats and a manifest."""

    images: list[torch.Tensor]
    stats: dict
    manifest: dict
    sources: list[LoadedImage] = field(default_factory=list)

    def manifest_for(self, i: int) -> dict:
        return {**self.manifest, "source": self.sources[i].describe(), "stats": self.stats["images"][i]}

    def save(self, out_dir: str | Path, names: list[str] | None = None, manifest_dir: str | Path | None = None) -> list[Path]:
        """Write every image as PNG (plus its JSON manifest) into out_dir; returns the PNG paths."""
        out_dir = Path(out_dir)
        names = names or output_names(self.sources)
        paths = []
        for i, name in enumerate(names):
            mpath = Path(manifest_dir) / f"{name}.json" if manifest_dir else None
            paths.append(save_png(self.images[i], self.sources[i], out_dir / f"{name}.png", self.manifest_for(i), mpath))
        return paths


def output_names(sources: list[LoadedImage]) -> list[str]:
    """Output stems: the input's stem, disambiguated by its suffix (a.jpg and a.png -> a, a-png)."""
    names, seen = [], set()
    for s in sources:
        p = Path(s.name)
        stem = p.stem or "image"
        name = stem if stem not in seen else f"{stem}-{p.suffix.lstrip('.') or len(seen)}"
        while name in seen:
            name += "_"
        seen.add(name)
        names.append(name)
    return names


def as_loaded(images) -> list[LoadedImage]:
    """LoadedImage, path, PIL image or [3,H,W] tensor in [0,1] (taken as 8-bit RGB) -> LoadedImage list."""
    items = images if isinstance(images, (list, tuple)) else [images]
    out = []
    for i, item in enumerate(items):
        if isinstance(item, LoadedImage):
            out.append(item)
        elif isinstance(item, torch.Tensor):
            if item.ndim != 3 or item.shape[0] != 3:
                raise ValueError(f"image {i}: a tensor image must be [3,H,W] in [0,1], got shape {tuple(item.shape)}")
            codes = (item.detach().float().cpu().clamp(0, 1) * 255).round()
            out.append(LoadedImage(name=f"image{i}.png", pixels=codes / 255))
        else:
            out += load_images([item])
    return out


def working_size(backbone) -> int:
    size = backbone.resolution
    if size % backbone.size_multiple:
        raise ValueError(f"backbone resolution {size} is not a multiple of {backbone.size_multiple}")
    return size


def to_working(images, backbone) -> torch.Tensor:
    """[B,3,s,s] in [0,1] on the backbone's device: what a method, and an attacker's training, sees of [3,H,W] images."""
    size = working_size(backbone)
    return torch.stack([_resize(im[None].to(backbone.device), (size, size))[0] for im in images]).clamp(0, 1)


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)


def protect(images, backbone, method: str = "ldu", params=None, callback=None) -> ProtectResult:
    """Protect 1-8 images of one subject with a registered method; see the module docstring.

    images: LoadedImage / path / PIL / [3,H,W] tensors. params: the method's params dataclass, a dict of
    overrides of its defaults for this backbone kind, or None. callback(dict) -> False cancels (`Cancelled`).
    """
    m = get_method(method)
    if params is None or isinstance(params, dict):
        params = m.make_params(backbone.kind, **(params or {}))
    elif not isinstance(params, m.params):
        raise TypeError(f"params for {method} must be {m.params.__name__}, a dict or None, not {type(params).__name__}")
    sources = as_loaded(images)
    if not 1 <= len(sources) <= MAX_BATCH:
        raise ValueError(f"protect() takes 1 to {MAX_BATCH} images of one subject, got {len(sources)}: split them into batches")
    size = working_size(backbone)
    dev = backbone.device
    x = to_working([s.pixels for s in sources], backbone)
    seed = getattr(params, "seed", 0)
    n_draws = getattr(params, "draws", 4)
    draws = make_draws(n_draws, len(sources), backbone.latent_shape(size), backbone.num_train_timesteps, seed).to(dev)

    backbone.reset_calls()
    t0 = time.perf_counter()
    report(callback, {"stage": "start", "step": 0, "total": getattr(params, "iterations", 0)})
    x_p, method_stats = m.fn(backbone, x, params, draws, callback)
    seconds = time.perf_counter() - t0
    calls = dict(backbone.calls)

    rms_budget, linf_budget = m.budgets(params)
    residual = (x_p.float() - x).detach()
    out_images, per_image = [], []
    for i, s in enumerate(sources):
        clean = s.pixels.float()
        r = _resize(residual[i : i + 1], tuple(clean.shape[-2:]))[0].cpu()
        if s.gray:  # a single-channel source stays single-channel: perturb its luminance only
            r = r.mean(0, keepdim=True).expand_as(r)
        r = project(r[None], None if rms_budget is None else rms_budget * (1 - 1e-6), linf_budget)[0]  # a hair under: fp32
        out_images.append(quantise(clean, r, s.maxval))
        stats = difference_stats(clean, out_images[-1])
        stats["budget_rms"], stats["budget_linf"] = rms_budget, linf_budget
        per_image.append(stats)

    # What the attacker sees: the quantised images at the working size, on draws the method never saw.
    with torch.no_grad():
        c_attack = backbone.encode_prompt(getattr(params, "prompt", "a photo of sks person"))
        x_final = to_working(out_images, backbone)
        eval_draws = make_draws(EVAL_DRAWS, len(sources), backbone.latent_shape(size), backbone.num_train_timesteps,
                                seed + EVAL_SEED_OFFSET).to(dev)
        def loss_of(images, d):
            return attacker_loss(backbone, images, c_attack, d, reduction="none", max_batch=EVAL_MAX_BATCH).tolist()

        loss = {
            "attacker_loss_clean": loss_of(x, eval_draws),
            "attacker_loss_protected": loss_of(x_final, eval_draws),
            "attacker_loss_clean_opt_draws": loss_of(x, draws),
            "attacker_loss_protected_opt_draws": loss_of(x_final, draws),
        }
    for i, stats in enumerate(per_image):
        for k, v in loss.items():
            stats[k] = v[i]
        if "psnr_vs_base" in method_stats:
            stats["psnr_vs_base_working_size"] = method_stats["psnr_vs_base"][i]
    batch = {
        "seconds": seconds,
        "seconds_per_image": seconds / len(sources),
        "unet_calls": calls["unet"],
        "unet_samples": calls["unet_samples"],
        "vae_encode_calls": calls["vae_encode"],
        "vae_decode_calls": calls["vae_decode"],
        "working_size": size,
        "eval_draws": EVAL_DRAWS,
        **{k: sum(v) / len(v) for k, v in loss.items()},
        "method": {k: v for k, v in method_stats.items() if k != "psnr_vs_base"},
    }
    manifest = {
        "method": method,
        "params": dataclasses.asdict(params),
        "budget": {"rms": rms_budget, "linf": linf_budget, "units": "[0,1] pixels"},
        "backbone": {"spec": backbone.spec, "kind": backbone.kind, "revision": backbone.revision,
                     "dtype": str(backbone.dtype).replace("torch.", ""), "device": backbone.device.type},
        "seed": seed,
        "code_version": code_version(),
        "libraries": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "batch_stats": batch,
    }
    report(callback, {"stage": "done", "step": getattr(params, "iterations", 0), "total": getattr(params, "iterations", 0)})
    return ProtectResult(images=out_images, stats={"images": per_image, "batch": batch}, manifest=manifest, sources=sources)


def quantise(clean: torch.Tensor, r: torch.Tensor, maxval: int) -> torch.Tensor:
    """clean + r, with r rounded TOWARD ZERO to whole code steps (1/maxval), kept inside [0,1].

    clean holds exact codes / maxval; truncation never enlarges any |r_i|, so RMS and Linf bounds survive.
    """
    codes = (clean * maxval).round()
    steps = torch.trunc(r.double() * maxval)
    steps = torch.maximum(torch.minimum(steps, maxval - codes.double()), -codes.double())
    return ((codes.double() + steps) / maxval).float()


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB PIL image (for display; files go through save_png)."""
    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
