"""Purifications: what an attacker runs on protected images before fine-tuning, in one registry.

A purification is `fn(images, params, backbone, callback) -> images` over a list of [3,H,W] fp32 images in
[0,1] (each at its own size; the output has the input's size), deterministic for its seed. Those that need a
diffusion model take the backbone; `noisy_upscale` needs an upscaler model and raises
`PurificationUnavailable` without one.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldu.ddim import ddim_denoise, ddim_timesteps
from ldu.protect import as_loaded
from ldu.registry import Entry, Registry, check, finite, param, report


class PurificationUnavailable(RuntimeError):
    """The purification needs something this machine does not have (the message says what and how to provide it)."""


@dataclass(frozen=True, kw_only=True)
class Purification(Entry):
    needs_backbone: bool = False


purifications: Registry = Registry("purification", Purification)


def register(p: Purification) -> Purification:
    return purifications.register(p)


def get_purification(name: str) -> Purification:
    return purifications.entry(name)


def purify(images, name: str, params=None, backbone=None, callback=None) -> list[torch.Tensor]:
    """Apply a registered purification to [3,H,W] images (or anything ldu.protect.as_loaded takes)."""
    entry = get_purification(name)
    if params is None or isinstance(params, dict):
        params = entry.make_params(backbone.kind if backbone is not None else "sd", **(params or {}))
    if entry.needs_backbone and backbone is None:
        raise ValueError(f"{name} needs a backbone (it denoises with a diffusion model)")
    tensors = [im.float().cpu() if isinstance(im, torch.Tensor) else as_loaded([im])[0].pixels for im in images]
    out = entry.fn(tensors, params, backbone, callback)
    if not entry.needs_backbone:  # the model-based ones report per image themselves
        report(callback, {"stage": "purify", "step": len(out), "total": len(out)})
    return out


# ---- classical ---------------------------------------------------------------------------------------
@dataclass
class JPEGParams:
    quality: int = param(75, "JPEG quality 1-95 (Pillow, 4:2:0 chroma subsampling)")

    def __post_init__(self):
        check(1 <= self.quality <= 100, f"quality must be 1..100, got {self.quality}")


def jpeg(images, p: JPEGParams, backbone=None, callback=None):
    out = []
    for x in images:
        buf = io.BytesIO()
        Image.fromarray(_to_uint8(x)).save(buf, format="JPEG", quality=p.quality)
        out.append(_from_uint8(np.asarray(Image.open(buf).convert("RGB"))))
    return out


@dataclass
class BlurParams:
    sigma: float = param(1.0, "Gaussian blur sigma in pixels (kernel 2*ceil(3 sigma)+1)")

    def __post_init__(self):
        check(self.sigma > 0, f"sigma must be positive, got {self.sigma}")


def gaussian_blur(images, p: BlurParams, backbone=None, callback=None):
    from torchvision.transforms.functional import gaussian_blur as blur  # deferred: torchvision is slow to import

    out = []
    for x in images:  # the kernel covers 3 sigma, but never more than the image (reflect padding needs that)
        k = min(2 * math.ceil(3 * p.sigma) + 1, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)
        out.append(blur(x[None], [k, k], [p.sigma, p.sigma])[0].clamp(0, 1))
    return out


@dataclass
class ResizeParams:
    factor: float = param(0.5, "downscale factor before scaling back up (bicubic, antialiased)")

    def __post_init__(self):
        check(0 < self.factor < 1, f"factor must be in (0, 1), got {self.factor}")


def _smaller(x, factor: float):
    """A `factor` copy of one image (bicubic, antialiased), not clamped."""
    h, w = x.shape[-2:]
    return F.interpolate(x[None], size=(max(1, round(h * factor)), max(1, round(w * factor))), mode="bicubic",
                         antialias=True, align_corners=False)[0]


def _back_up(small, size):
    """A small copy scaled back up to `size` (bicubic), clamped to [0, 1]."""
    return F.interpolate(small[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)


def resize(images, p: ResizeParams, backbone=None, callback=None):
    return [_back_up(_smaller(x, p.factor), x.shape[-2:]) for x in images]


@dataclass
class PostingParams:
    factor: float = param(0.75, "downscale factor before scaling back up (bicubic, antialiased)")
    quality: int = param(75, "then JPEG at this quality (Pillow, 4:2:0 chroma subsampling)")

    def __post_init__(self):
        check(0 < self.factor < 1, f"factor must be in (0, 1), got {self.factor}")
        check(1 <= self.quality <= 100, f"quality must be 1..100, got {self.quality}")


def posting(images, p: PostingParams, backbone=None, callback=None):
    """What a social network does to an upload (the protocol's 'JPEG 75 + 0.75x resize'): a smaller copy (bicubic,
    antialiased) saved as JPEG; the attacker scales it back to the input's size (bicubic) to train at its resolution."""
    return [_back_up(jpeg([_smaller(x, p.factor).clamp(0, 1)], JPEGParams(quality=p.quality))[0], x.shape[-2:])
            for x in images]


@dataclass
class NoiseParams:
    sigma: float = param(8 / 255, "Gaussian noise std in [0,1] pixels")
    seed: int = param(0, "noise seed")

    def __post_init__(self):
        check(self.sigma > 0, f"sigma must be positive, got {self.sigma}")


def gaussian_noise(images, p: NoiseParams, backbone=None, callback=None):
    g = torch.Generator().manual_seed(p.seed)
    return [(x + p.sigma * torch.randn(x.shape, generator=g)).clamp(0, 1) for x in images]


# ---- with the diffusion model --------------------------------------------------------------------------
@dataclass
class DiffPureParams:
    strength: float = param(0.1, "noise to t = strength x T, then denoise back (Nie et al. 2022, in latent space)")
    steps: int = param(10, "DDIM steps back to t = 0")
    seed: int = param(0, "noise seed")

    def __post_init__(self):
        check(0 < self.strength <= 1, f"strength must be in (0, 1], got {self.strength}")
        check(self.steps >= 1, f"steps must be at least 1, got {self.steps}")


@torch.no_grad()
def _diffpure_tensor(backbone, x: torch.Tensor, strength: float, steps: int, g: torch.Generator) -> torch.Tensor:
    """x [1,3,h,w] at a size the backbone accepts -> E, noise to t*, DDIM-denoise (empty prompt), D."""
    timesteps = ddim_timesteps(backbone.num_train_timesteps, strength, steps)
    z0 = backbone.encode(x.to(backbone.device))
    t = torch.tensor([timesteps[-1]], device=backbone.device)
    zt = backbone.add_noise(z0, t, torch.randn(z0.shape, generator=g).to(z0))
    cond = backbone.encode_prompt("")
    z = ddim_denoise(lambda z_, t_: backbone.predict(z_, t_, cond), zt, timesteps, backbone.alphas_cumprod,
                     backbone.prediction_type)
    return backbone.decode(z).clamp(0, 1).float().cpu()


def _model_size(backbone, h: int, w: int) -> tuple[int, int]:
    """Short side to the backbone's resolution, aspect kept, both sides multiples of what the model accepts."""
    m, scale = backbone.size_multiple, backbone.resolution / min(h, w)
    return max(m, round(h * scale / m) * m), max(m, round(w * scale / m) * m)


def diffpure(images, p: DiffPureParams, backbone, callback=None):
    g = torch.Generator().manual_seed(p.seed)
    out = []
    for i, x in enumerate(images):
        h, w = x.shape[-2:]
        xs = F.interpolate(x[None], size=_model_size(backbone, h, w), mode="bicubic", antialias=True, align_corners=False)
        y = _diffpure_tensor(backbone, xs.clamp(0, 1), p.strength, p.steps, g)
        out.append(F.interpolate(y, size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1))
        report(callback, {"stage": "purify", "step": i + 1, "total": len(images)})
    return out


@dataclass
class GridPureParams:
    strength: float = param(0.1, "per-pass DiffPure strength")
    steps: int = param(10, "DDIM steps per pass")
    iterations: int = param(1, "passes over the whole grid")
    overlap: float = param(0.5, "tile overlap fraction; overlapping outputs are blended with a tent window")
    seed: int = param(0, "noise seed")

    def __post_init__(self):
        check(0 < self.strength <= 1, f"strength must be in (0, 1], got {self.strength}")
        check(self.steps >= 1 and self.iterations >= 1, "steps and iterations must be at least 1")
        check(0 <= self.overlap < 1, f"overlap must be in [0, 1), got {self.overlap}")


def gridpure(images, p: GridPureParams, backbone, callback=None):
    """GrIDPure (Zhao et al. 2024): DiffPure on model-resolution tiles of the full-resolution image, blended.

    Images smaller than a tile are scaled up first (and back down after), so no tile is ever padded.
    """
    tile = backbone.resolution
    g = torch.Generator().manual_seed(p.seed)
    out = []
    for n, x in enumerate(images):
        h, w = x.shape[-2:]
        scale = max(1.0, tile / min(h, w))
        H, W = max(tile, round(h * scale)), max(tile, round(w * scale))
        y = F.interpolate(x[None], size=(H, W), mode="bicubic", align_corners=False).clamp(0, 1) if (H, W) != (h, w) else x[None]
        window = _tent(tile)
        for _ in range(p.iterations):
            acc, weight = torch.zeros_like(y), torch.zeros(1, 1, H, W)
            for top in _starts(H, tile, p.overlap):
                for left in _starts(W, tile, p.overlap):
                    patch = y[..., top : top + tile, left : left + tile]
                    acc[..., top : top + tile, left : left + tile] += window * _diffpure_tensor(backbone, patch, p.strength, p.steps, g)
                    weight[..., top : top + tile, left : left + tile] += window
            y = (acc / weight).clamp(0, 1)
        out.append(F.interpolate(y, size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1)
                   if (H, W) != (h, w) else y[0])
        report(callback, {"stage": "purify", "step": n + 1, "total": len(images)})
    return out


def _starts(length: int, tile: int, overlap: float) -> list[int]:
    """Tile offsets covering [0, length) with at least the requested overlap; the last tile ends at the edge."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1 - overlap)))
    starts = list(range(0, length - tile, stride)) + [length - tile]
    return sorted(set(starts))


def _tent(size: int) -> torch.Tensor:
    ramp = torch.minimum(torch.arange(size) + 1.0, size - torch.arange(size).float())
    return (ramp[:, None] * ramp[None, :]).view(1, 1, size, size)


@dataclass
class NoisyUpscaleParams:
    model: str | None = param(None, "x4 upscaler: local diffusers folder or hub id (stabilityai/stable-diffusion-x4-upscaler)")
    sigma: float = param(0.05, "Gaussian noise added before upscaling (Honig et al. 2024)")
    noise_level: int = param(20, "the upscaler's own noise_level")
    steps: int = param(20, "upscaler denoising steps")
    seed: int = param(0, "noise seed")


def noisy_upscale(images, p: NoisyUpscaleParams, backbone=None, callback=None):
    """Noisy upscaling (Honig et al. 2024, "Adversarial perturbations cannot reliably protect artists"):
    downscale x4, add Gaussian noise, upscale x4 with the SD x4 upscaler, back to the original size."""
    if not p.model:
        raise PurificationUnavailable(
            "noisy_upscale needs an upscaler model: set model=<local folder of stabilityai/stable-diffusion-x4-upscaler "
            "in diffusers layout> (download it on a machine with access: hf download ... --local-dir DIR)")
    from diffusers import StableDiffusionUpscalePipeline  # deferred: only this purification needs it

    device = backbone.device if backbone is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        pipe = StableDiffusionUpscalePipeline.from_pretrained(p.model, dtype=torch.float16 if device.type == "cuda" else torch.float32)
    except Exception as err:
        raise PurificationUnavailable(f"noisy_upscale could not load the upscaler {p.model!r}: {err}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(p.seed)
    out = []
    for i, x in enumerate(images):
        h, w = x.shape[-2:]
        small = F.interpolate(x[None], size=(max(1, h // 4), max(1, w // 4)), mode="bicubic", antialias=True, align_corners=False)
        small = (small + p.sigma * torch.randn(small.shape, generator=g)).clamp(0, 1)
        up = pipe(prompt="", image=small, noise_level=p.noise_level, num_inference_steps=p.steps,
                  generator=torch.Generator().manual_seed(p.seed + i), output_type="pt").images
        out.append(F.interpolate(up.float().cpu(), size=(h, w), mode="bicubic", antialias=True, align_corners=False)[0].clamp(0, 1))
        report(callback, {"stage": "purify", "step": i + 1, "total": len(images)})
    return out


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    return (x.detach().float().cpu().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def _from_uint8(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255


for _p in (
    Purification(name="jpeg", params=JPEGParams, fn=jpeg, summary="JPEG re-encoding at a quality"),
    Purification(name="gaussian_blur", params=BlurParams, fn=gaussian_blur, summary="Gaussian blur"),
    Purification(name="resize", params=ResizeParams, fn=resize, summary="downscale then upscale back"),
    Purification(name="posting", params=PostingParams, fn=posting,
                 summary="what posting does: a smaller copy saved as JPEG, scaled back up"),
    Purification(name="gaussian_noise", params=NoiseParams, fn=gaussian_noise, summary="additive Gaussian noise"),
    Purification(name="diffpure", params=DiffPureParams, fn=diffpure, needs_backbone=True,
                 summary="DiffPure/SDEdit: noise the latents to t, DDIM-denoise with the backbone",
                 defaults={"tiny": dict(steps=2)}, cost=lambda p: 0.5 * p.steps),
    Purification(name="gridpure", params=GridPureParams, fn=gridpure, needs_backbone=True,
                 summary="GrIDPure: DiffPure on overlapping model-size tiles at full resolution",
                 defaults={"tiny": dict(steps=2)}, cost=lambda p: 2 * p.steps * p.iterations),
    Purification(name="noisy_upscale", params=NoisyUpscaleParams, fn=noisy_upscale, listed=False,
                 summary="noise then the SD x4 upscaler (unavailable without an upscaler model)"),
):
    register(_p)
