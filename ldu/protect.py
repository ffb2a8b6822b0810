"""`protect()`: the one wrapper that owns sizes and budgets (docs/DESIGN.md, "The contract").

It resizes each image as a DreamBooth attacker's data loader does (short side to the backbone's resolution,
aspect kept), pads it to a shape the backbone accepts (its "canvas"), runs the method's tensor function on the
canvases (one call per canvas shape), upsamples only the RESIDUAL back to each image's original size, projects
it per image at that size onto the method's budget in fp32, and rounds it to whole code steps of the image's bit
depth by seeded stochastic rounding held inside the budget (`quantise`), so the quantised result spends the budget
but never exceeds it, and a zero residual returns the input bit for bit.

Why a canvas and not a square: an attacker trains on the centre (or a random) square of the short-side-resized
photo. Squashing a 4:3 photo into a square would optimise the perturbation at the wrong aspect, and the
attacker would see it stretched by 4/3. On the canvas the attacker's centre square is an exact, latent-grid
aligned window of what the method optimised, and the rest of the photo is protected at the same scale.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

from .budget import project_
from .io import LoadedImage, load_images, save_png
from .losses import Draws, attacker_loss, make_draws
from .methods import get_method, report
from .metrics import STRIP, difference_stats
from .version import code_version, library_versions
from .views import MAX_ASPECT, center_square, crop_offset, resize, resized_sides  # noqa: F401  (re-exported)

MAX_BATCH = 8  # photos of one subject per protect() call; the CLI splits larger sets
# Pixels one job may hold in all (all its photos together): what keeps a CPU server under its documented peak
# memory (docs/DESIGN.md, "Memory": measured bytes per pixel of a protect() job).
MAX_JOB_PIXELS = 50_000_000
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


def instance_views(images, size: int) -> torch.Tensor:
    """LoadedImage / path / PIL / [3,H,W] tensors -> [N,3,size,size] in [0,1]: what a DreamBooth attacker trains on
    (short side resized, centre crop)."""
    loaded = as_loaded(images)
    if not loaded:
        raise ValueError("no training images given")
    return torch.stack([center_square(im.pixels, size) for im in loaded])


def to_working(images, backbone) -> torch.Tensor:
    """[B,3,s,s] in [0,1] on the backbone's device: the centre squares an attacker's training sees of [3,H,W] images."""
    size = working_size(backbone)
    return torch.stack([center_square(im, size) for im in images]).to(backbone.device)


def canvas_multiple(backbone) -> int:
    """What canvas sides are multiples of: what the backbone accepts, and such that half the difference of two
    of them is a whole number of latent cells (so the attacker's centre square sits on the latent grid)."""
    m = backbone.size_multiple
    return m if (m // 2) % backbone.vae_scale_factor == 0 else 2 * m


@dataclass(frozen=True)
class Canvas:
    """Where an image sits on the method's canvas: resized to (h, w) (the attacker's resize, long side capped at
    MAX_ASPECT short sides), then reflect-padded by (top, left) to shape (H, W), both multiples of
    `canvas_multiple`. The padding puts the attacker's centre square at ((H - s) / 2, (W - s) / 2): whole latent
    cells from the canvas's corner, so it sees the latent grid the method optimised on."""

    h: int
    w: int
    top: int
    left: int
    H: int
    W: int
    squeezed: bool = False  # the long side was capped: the photo is longer than MAX_ASPECT short sides

    @classmethod
    def of(cls, height: int, width: int, size: int, multiple: int) -> "Canvas":
        h, w = (min(v, MAX_ASPECT * size) for v in resized_sides(height, width, size))
        H, W = (-(-v // multiple) * multiple for v in (h, w))
        top, left = ((P - size) // 2 - crop_offset(v, size) for P, v in ((H, h), (W, w)))
        return cls(h, w, top, left, H, W, squeezed=max(height, width) > MAX_ASPECT * min(height, width))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.H, self.W)

    def place(self, x: torch.Tensor) -> torch.Tensor:
        """[3,h0,w0] -> [3,H,W]."""
        x = resize(x[None].float(), (self.h, self.w), mode="bilinear").clamp(0, 1)
        pad = (self.left, self.W - self.w - self.left, self.top, self.H - self.h - self.top)
        return (F.pad(x, pad, mode="reflect") if any(pad) else x)[0]

    def take(self, r: torch.Tensor) -> torch.Tensor:
        """[3,H,W] residual on the canvas -> [3,h,w], the part over the image."""
        return r[:, self.top : self.top + self.h, self.left : self.left + self.w]


def canvases_for(sizes: list[tuple[int, int]], backbone) -> list[Canvas]:
    """The canvas of each photo of size (height, width) on this backbone: what protect() runs the method on."""
    return [Canvas.of(h, w, working_size(backbone), canvas_multiple(backbone)) for h, w in sizes]


def squeezed_note(names: list[str]) -> str:
    return (f"longer than {MAX_ASPECT}:1, protected squeezed to {MAX_ASPECT}:1 (an attacker who keeps the full length "
            f"sees the perturbation at another scale): {', '.join(names)}")


class _Call(NamedTuple):
    """One method call: the images it protected (indices), their clean and protected canvases, its draws, its stats."""

    images: list[int]
    clean: torch.Tensor
    protected: torch.Tensor
    draws: object
    stats: dict


def photo_seed(seed: int, pixels: torch.Tensor) -> int:
    """The seed of one photo's draws: the job's seed mixed with the photo's pixel content (not its position in the
    batch, not its file name), so the same photo and seed give the same draws alone, with companions, in the app
    and from the CLI."""
    h = hashlib.sha256(f"{seed}:{tuple(pixels.shape)}:".encode())
    for top in range(0, pixels.shape[-2], 1024):  # row blocks: no copy of a large photo
        h.update(pixels[..., top : top + 1024, :].contiguous().float().numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "big")


def plan_calls(canvases: list[Canvas], together: bool) -> list[list[int]]:
    """Which photos each method call protects: one call per photo, or (together) one per canvas shape."""
    if not together:
        return [[i] for i in range(len(canvases))]
    groups: dict[tuple[int, int], list[int]] = {}
    for i, c in enumerate(canvases):
        groups.setdefault(c.shape, []).append(i)
    return list(groups.values())


def check_job_size(sizes: list[tuple[int, int]], max_pixels: int = MAX_JOB_PIXELS) -> None:
    """Refuse a job whose photos hold more pixels in all than the memory model allows (docs/DESIGN.md, "Memory")."""
    total = sum(h * w for h, w in sizes)
    if total > max_pixels:
        raise ValueError(f"these {len(sizes)} photos hold {total / 1e6:.0f} MP in all, over the {max_pixels / 1e6:.0f} MP "
                         "one job may hold: protect fewer or smaller photos at a time")


def protect(images, backbone, method: str = "ldu", params=None, callback=None, batch_photos: bool = False,
            max_pixels: int = MAX_JOB_PIXELS) -> ProtectResult:
    """Protect 1-8 images of one subject with a registered method; see the module docstring.

    images: LoadedImage / path / PIL / [3,H,W] tensors. params: the method's params dataclass, a dict of
    overrides of its defaults for this backbone kind, or None. callback(dict) -> False cancels (`Cancelled`).

    Each photo is optimised on its own with draws seeded by the seed and its content (`photo_seed`), so its bytes
    do not depend on its companions. `batch_photos` puts photos of one canvas shape into one computation instead
    (faster on a GPU; not byte-stable, since float sums change with the batch). A method that learns from the
    whole set (`Method.per_image` False, e.g. ASPL) always sees the set together.
    """
    m = get_method(method)
    if params is None or isinstance(params, dict):
        params = m.make_params(backbone.kind, **(params or {}))
    elif not isinstance(params, m.params):
        raise TypeError(f"params for {method} must be {m.params.__name__}, a dict or None, not {type(params).__name__}")
    sources = as_loaded(images)
    if not 1 <= len(sources) <= MAX_BATCH:
        raise ValueError(f"protect() takes 1 to {MAX_BATCH} images of one subject, got {len(sources)}: split them into batches")
    check_job_size([tuple(s.pixels.shape[-2:]) for s in sources], max_pixels)
    size = working_size(backbone)
    dev = backbone.device
    canvases = canvases_for([tuple(s.pixels.shape[-2:]) for s in sources], backbone)
    together = batch_photos or not m.per_image
    calls = plan_calls(canvases, together)
    seeds = [photo_seed(params.seed, s.pixels) for s in sources]
    steps = m.steps(params)

    backbone.reset_calls()
    t0 = time.perf_counter()
    report(callback, {"stage": "start", "step": 0, "total": steps * len(calls)})
    runs: list[_Call] = []
    for k, idx in enumerate(calls):
        shape = canvases[idx[0]].shape
        x = torch.stack([canvases[i].place(sources[i].pixels) for i in idx]).to(dev)
        draws = _draws_for([seeds[i] for i in idx], m.draws(params), backbone, shape).to(dev)
        call_params = params if together else dataclasses.replace(params, seed=seeds[idx[0]])
        x_p, method_stats = m.fn(backbone, x, call_params, draws, _in_group(callback, k, len(calls)))
        runs.append(_Call(idx, x, x_p.float().detach(), draws, method_stats))
    seconds = time.perf_counter() - t0
    calls_count = dict(backbone.calls)

    rms_budget, linf_budget = m.budgets(params)
    out_images, per_image = [None] * len(sources), [None] * len(sources)
    for run in runs:
        for j, i in enumerate(run.images):
            s, c = sources[i], canvases[i]
            clean = s.pixels
            r = resize(c.take(run.protected[j] - run.clean[j])[None], tuple(clean.shape[-2:]))[0].cpu()
            if s.gray:  # a single-channel source stays single-channel: perturb its luminance only
                r = r.mean(0, keepdim=True)
            project_(r, None if rms_budget is None else rms_budget * (1 - 1e-6), linf_budget)
            out_images[i] = quantise(clean, r, s.maxval, None if rms_budget is None else rms_budget * (1 - 1e-6),
                                     linf_budget, seed=seeds[i])  # a hair under: the stats are measured in fp32
            del r
            stats = difference_stats(clean, out_images[i])
            stats["budget_rms"], stats["budget_linf"] = rms_budget, linf_budget
            stats["working_shape"] = list(c.shape)
            stats["squeezed"] = c.squeezed
            stats["photo_seed"] = seeds[i]
            if "psnr_vs_base" in run.stats:
                stats["psnr_vs_base_working_size"] = run.stats["psnr_vs_base"][j]
            per_image[i] = stats

    with torch.no_grad():
        c_attack = backbone.encode_prompt(params.prompt)

        def loss_of(images, d):
            return attacker_loss(backbone, images, c_attack, d, reduction="none", max_batch=EVAL_MAX_BATCH).tolist()

        # What the attacker sees: the centre squares of the quantised images, on draws the method never saw ...
        x_clean, x_final = to_working([s.pixels for s in sources], backbone), to_working(out_images, backbone)
        eval_draws = _draws_for([v + EVAL_SEED_OFFSET for v in seeds], EVAL_DRAWS, backbone, (size, size)).to(dev)
        loss = {"attacker_loss_clean": loss_of(x_clean, eval_draws), "attacker_loss_protected": loss_of(x_final, eval_draws),
                "attacker_loss_clean_opt_draws": [0.0] * len(sources), "attacker_loss_protected_opt_draws": [0.0] * len(sources)}
        # ... and what the method optimised: the whole canvases, quantised result included, on its own draws.
        for run in runs:
            final = torch.stack([canvases[i].place(out_images[i]) for i in run.images]).to(dev)
            for key, images in (("attacker_loss_clean_opt_draws", run.clean), ("attacker_loss_protected_opt_draws", final)):
                for i, v in zip(run.images, loss_of(images, run.draws)):
                    loss[key][i] = v
    for i, stats in enumerate(per_image):
        for k, v in loss.items():
            stats[k] = v[i]
    batch = {
        "seconds": seconds,
        "seconds_per_image": seconds / len(sources),
        "unet_calls": calls_count["unet"],
        "unet_samples": calls_count["unet_samples"],
        "vae_encode_calls": calls_count["vae_encode"],
        "vae_decode_calls": calls_count["vae_decode"],
        "working_size": size,
        "eval_draws": EVAL_DRAWS,
        "photos_together": together,
        **{k: sum(v) / len(v) for k, v in loss.items()},
        # one entry per method call: the images it protected and what the method reported
        "method": {"groups": [{"images": r.images, **{k: v for k, v in r.stats.items() if k != "psnr_vs_base"}}
                              for r in runs]},
    }
    manifest = {
        "method": method,
        "params": dataclasses.asdict(params),
        "budget": {"rms": rms_budget, "linf": linf_budget, "units": "[0,1] pixels"},
        "backbone": {"spec": backbone.spec, "kind": backbone.kind, "revision": backbone.revision,
                     "dtype": str(backbone.dtype).replace("torch.", ""), "device": backbone.device.type},
        "seed": params.seed,
        "photos_together": together,
        "code_version": code_version(),
        "libraries": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "batch_stats": batch,
    }
    report(callback, {"stage": "done", "step": steps * len(calls), "total": steps * len(calls)})
    return ProtectResult(images=out_images, stats={"images": per_image, "batch": batch}, manifest=manifest, sources=sources)


def _draws_for(seeds: list[int], m: int, backbone, shape: tuple[int, int]) -> Draws:
    """m fixed draws per photo, each photo's from its own seed, side by side along the batch dimension."""
    parts = [make_draws(m, 1, backbone.latent_shape(shape), backbone.num_train_timesteps, seed) for seed in seeds]
    return Draws(torch.cat([d.t for d in parts], 1), torch.cat([d.eps for d in parts], 1))


def _in_group(callback, k: int, n: int):
    """The method's progress reports of call k of n, counted over all n calls (callback(dict) -> False cancels)."""
    if callback is None or n == 1:
        return callback

    def cb(info: dict):
        info = dict(info, group=k + 1, groups=n)
        if "total" in info:
            info["step"], info["total"] = k * info["total"] + info.get("step", 0), n * info["total"]
        return callback(info)

    return cb


DITHER_BINS = 4096  # resolution of the dither threshold: the spent budget lands within ~1/4096 of the slack


def quantise(clean: torch.Tensor, r: torch.Tensor, maxval: int, budget_rms: float | None = None,
             linf: float | None = None, seed: int = 0) -> torch.Tensor:
    """clean + r on whole code steps (1/maxval), inside [0,1], spending the budget without exceeding it.

    Each value of r is first rounded toward zero (t), then moved one more step away from zero (to the nearest code
    beyond it) where its remainder f = |r| - |t| exceeds u + theta, with u a seeded uniform dither per value: at
    theta = 0 that is unbiased stochastic rounding (E[step] = r). theta >= 0 is the smallest value at which the RMS
    of the steps still fits `budget_rms`, found from one weighted histogram of f - u (each step costs 2|t| + 1 of
    squared code steps), so both bounds hold exactly: RMS <= budget_rms, |step| <= linf. Where r binds its RMS
    budget the saved residual's RMS is the budget, not up to a code step below it, and a residual whose values all
    sit at 6.9 code steps can be saved at RMS 6.9 (truncation gave 6 everywhere: PSNR jumped 1.3 dB per code step,
    and a PSNR between could not be matched). A zero r returns clean bit for bit.

    r is expected inside its budgets (`protect` projects it first); one over its RMS budget is truncated, which is
    all the rounding can do. clean holds exact codes / maxval. r may have one channel (a grey source: the same step
    on R, G and B). Computed in row strips (the dither regenerated from (seed, strip)): a large photo never needs
    more than its own size again.
    """
    cap = None if linf is None else math.floor(linf * maxval * (1 + 1e-9))  # the most whole steps within linf

    def parts(top):
        x = r[..., top : top + STRIP, :].double() * maxval
        t = torch.trunc(x)
        f = (x - t).abs()
        ok = f > 0
        if cap is not None:
            t = t.clamp(-cap, cap)
            ok &= t.abs() + 1 <= cap
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + top) % 2**63)
        u = torch.rand(x.shape, generator=g, dtype=torch.float64)
        return x, t, f - u, ok

    theta = 0.0
    if budget_rms is not None:
        edges = torch.linspace(-1.0, 1.0, DITHER_BINS + 1, dtype=torch.float64)
        cost = torch.zeros(DITHER_BINS, dtype=torch.float64)
        spent = 0.0
        for top in range(0, r.shape[-2], STRIP):
            x, t, d, ok = parts(top)
            spent += float(t.pow(2).sum())
            if ok.any():
                cost += torch.histogram(d[ok], bins=edges, weight=(2 * t.abs() + 1)[ok]).hist
        slack = (budget_rms * maxval) ** 2 * r.numel() * (1 - 1e-9) - spent
        # promoting every value with d > edges[k] costs at most above[k] (values at the edge itself are not promoted)
        above = cost.flip(0).cumsum(0).flip(0)
        fits = (above <= slack).nonzero()
        theta = max(0.0, float(edges[int(fits[0])])) if len(fits) else 1.0
    out = torch.empty_like(clean, dtype=torch.float32)
    for top in range(0, clean.shape[-2], STRIP):
        rows = slice(top, top + STRIP)
        x, t, d, ok = parts(top)
        steps = t + torch.where(ok & (d > theta), torch.sign(x), torch.zeros_like(x))
        codes = (clean[..., rows, :] * maxval).round().double()
        steps = steps.expand_as(codes)
        steps = torch.maximum(torch.minimum(steps, maxval - codes), -codes)
        out[..., rows, :] = ((codes + steps) / maxval).float()
    return out


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[3,H,W] in [0,1] -> 8-bit RGB PIL image (for display; files go through save_png)."""
    arr = (pixels.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)
