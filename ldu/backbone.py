"""Backbones: one object holding a Stable Diffusion's VAE, UNet, text encoder, tokenizer and noise schedule.

`load_backbone(spec)` takes a hub id, a local folder in diffusers layout, or a built-in name (`tiny`, `pocket`,
shipped in assets/). The models are frozen and in eval mode; the caller picks device and dtype. All latent
arithmetic the rest of the package does (noising, DDIM steps, residuals, losses) is fp32: the helpers here
cast into the model dtype for each call and back to fp32 for the result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
BUILTIN = {"tiny": ASSETS / "tiny", "pocket": ASSETS / "pocket"}
ALIASES = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sd21-base": "stabilityai/stable-diffusion-2-1-base",
    "sd21": "stabilityai/stable-diffusion-2-1",
}
DEFAULT_HUB_ID = ALIASES["sd15"]
COMPONENTS = ("vae", "unet", "text_encoder", "tokenizer", "scheduler")
# Only what protection, attacks and generation need: no safety checker, no fp16/ema duplicates.
HUB_PATTERNS = [
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder/model-*.safetensors",
    *[
        f"{c}/{f}"
        for c in ("unet", "vae")
        for f in (
            "config.json",
            "diffusion_pytorch_model.safetensors",
            "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model-*.safetensors",
        )
    ],
]


PROMPT_CACHE = 256  # prompt embeddings kept per backbone (least recently used go first)


class BackboneError(RuntimeError):
    """A backbone could not be loaded; the message says which and what to do instead."""


@dataclass
class Backbone:
    """A frozen latent diffusion model plus the few helpers the protection methods and attacks share.

    `kind` is "tiny", "pocket" (the built-in, or a folder `python -m ldu.pocket train` wrote) or "sd" (anything else
    loaded from a hub id or a folder); methods pick their
    default parameters by it. `calls` counts model evaluations (batched calls, and samples in them).
    """

    spec: str
    kind: str
    path: Path
    revision: str
    vae: torch.nn.Module
    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    dtype: torch.dtype
    notice: str | None = None  # set when this backbone is a fallback or a miniature: show it to the user
    calls: dict = field(default_factory=lambda: {"unet": 0, "unet_samples": 0, "vae_encode": 0, "vae_decode": 0})
    timing: dict | None = None  # seconds inside each network, forward and backward, while start_timing() is on

    def __post_init__(self):
        cfg = self.scheduler.config
        self.prediction_type: str = cfg.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise BackboneError(f"{self.spec}: prediction_type {self.prediction_type!r} is not supported (epsilon or v_prediction)")
        self.num_train_timesteps: int = cfg.num_train_timesteps
        # fp32 on the device: every noising and DDIM step uses it (float64 would not help the bf16 models).
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)
        self.scaling_factor: float = float(self.vae.config.scaling_factor)
        self.vae_scale_factor: int = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels: int = self.vae.config.latent_channels
        self.resolution: int = int(self.unet.config.sample_size) * self.vae_scale_factor
        # Working sizes must survive every VAE and UNet down-sampling (docs/DESIGN.md, "The contract").
        self.size_multiple: int = self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)
        self._prompt_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    # ---- description -------------------------------------------------------------------------
    def describe(self) -> dict:
        return {
            "spec": self.spec,
            "kind": self.kind,
            "revision": self.revision,
            "resolution": self.resolution,
            "prediction_type": self.prediction_type,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
        }

    def latent_shape(self, size: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(channels, h, w) of the latent of a square image of side `size` (default: the resolution), or of an
        image of shape (height, width)."""
        h, w = (size, size) if not isinstance(size, (tuple, list)) else size
        f = self.vae_scale_factor
        return (self.latent_channels, (h or self.resolution) // f, (w or self.resolution) // f)

    def reset_calls(self) -> None:
        for k in self.calls:
            self.calls[k] = 0

    # ---- text --------------------------------------------------------------------------------
    def clear_prompt_cache(self) -> None:
        """Forget cached prompt embeddings: call after changing the text encoder's weights in place (text LoRA)."""
        self._prompt_cache.clear()

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        return self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids.to(self.device)

    def encode_prompt(self, prompts: str | list[str], grad: bool = False) -> torch.Tensor:
        """CLIP hidden states [B, 77, D] in the text encoder's dtype.

        Without grad they are cached per prompt (prompts repeat a lot), except while any text-encoder weight
        is trainable; with grad (training the text encoder or an embedding) they are computed afresh.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if grad:
            return self._timed("text", lambda ids: self.text_encoder(ids)[0], self.token_ids(prompts))
        if any(p.requires_grad for p in self.text_encoder.parameters()):  # being trained: a cache would go stale
            with torch.no_grad():
                return self._timed("text", lambda ids: self.text_encoder(ids)[0], self.token_ids(prompts))
        # Keyed by the modules too: swapping in another text encoder or tokenizer can never return stale embeddings.
        key = (id(self.text_encoder), id(self.tokenizer))
        missing = [p for p in dict.fromkeys(prompts) if (key, p) not in self._prompt_cache]
        if missing:
            with torch.no_grad():
                hidden = self._timed("text", lambda ids: self.text_encoder(ids)[0], self.token_ids(missing))
            for p, h in zip(missing, hidden):
                self._prompt_cache[(key, p)] = h
        out = []
        for p in prompts:
            self._prompt_cache.move_to_end((key, p))
            out.append(self._prompt_cache[(key, p)])
        while len(self._prompt_cache) > PROMPT_CACHE:  # bounded: a server sees endless prompts
            self._prompt_cache.popitem(last=False)
        return torch.stack(out)

    # ---- timing (benchmarks) -------------------------------------------------------------------
    def start_timing(self) -> dict:
        """From now on, time every network call, forward and backward (the benchmark's "outside %": the share of
        wall time spent outside them). Off by default: it synchronises the device at every boundary."""
        self.timing = {"unet": 0.0, "vae": 0.0, "text": 0.0}
        return self.timing

    def stop_timing(self) -> dict:
        timing, self.timing = self.timing, None
        return timing

    def _timed(self, kind: str, fn, x: torch.Tensor):
        """fn(x) with its forward time, and (when a gradient flows back through it) its backward time, added to
        self.timing[kind]: identity autograd nodes at the output and the input record when backward enters and
        leaves the network."""
        if self.timing is None:
            return fn(x)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        clock = {}
        if torch.is_grad_enabled():
            x = _Boundary.apply(x if x.requires_grad else x.detach().requires_grad_(), self, kind, clock, "leave")
        sync()
        t0 = time.perf_counter()
        out = fn(x)
        sync()
        self.timing[kind] += time.perf_counter() - t0
        if torch.is_grad_enabled():
            out = tuple(_Boundary.apply(o, self, kind, clock, "enter") if o.requires_grad else o for o in out) \
                if isinstance(out, tuple) else _Boundary.apply(out, self, kind, clock, "enter")
        return out

    # ---- VAE ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0,1] [B,3,H,W] -> scaled posterior-mean latents s*E(x).mean, fp32 (differentiable)."""
        self.calls["vae_encode"] += 1
        return self._timed("vae", lambda x_: self.vae.encode((x_ * 2 - 1).to(self.dtype)).latent_dist.mean.float(), x) \
            * self.scaling_factor

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscaled posterior mean and log-variance of E(x), fp32 (PID's objective uses both)."""
        self.calls["vae_encode"] += 1

        def run(x_):
            dist = self.vae.encode((x_ * 2 - 1).to(self.dtype)).latent_dist
            return dist.mean.float(), dist.logvar.float()

        return self._timed("vae", run, x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [0,1] (NOT clamped, so gradients survive at the edges), fp32."""
        self.calls["vae_decode"] += 1
        x = self._timed("vae", lambda z_: self.vae.decode((z_ / self.scaling_factor).to(self.dtype)).sample.float(), z)
        return (x + 1) / 2

    # ---- UNet --------------------------------------------------------------------------------
    def predict(self, z: torch.Tensor, t: torch.Tensor | int, cond: torch.Tensor, checkpoint: bool = False) -> torch.Tensor:
        """The UNet's raw output (epsilon or v, by `prediction_type`) for latents z at timesteps t, fp32.

        `cond` is [1 or B, 77, D]; with `checkpoint` the call's activations are recomputed in backward.
        """
        b = z.shape[0]
        t = torch.as_tensor(t, device=self.device)
        t = t.expand(b) if t.ndim == 0 else t
        cond = cond.expand(b, -1, -1) if cond.shape[0] == 1 else cond
        self.calls["unet"] += 1
        self.calls["unet_samples"] += b

        dtype = self.unet.dtype  # the backbone's dtype, or fp32 for a copy being fully fine-tuned

        def run(z_, c_):
            return self.unet(z_.to(dtype), t, encoder_hidden_states=c_.to(dtype), return_dict=False)[0]

        if checkpoint and torch.is_grad_enabled():
            return self._timed("unet", lambda z_: _checkpoint(run, z_, cond, use_reentrant=False).float(), z)
        return self._timed("unet", lambda z_: run(z_, cond).float(), z)

    # ---- the forward process ------------------------------------------------------------------
    def add_noise(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        return a.sqrt() * z0 + (1 - a).sqrt() * eps

    def target(self, z0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """What the UNet is trained to output: eps, or v = sqrt(a) eps - sqrt(1-a) z0 (Salimans & Ho 2022)."""
        return diffusion_target(self.prediction_type, z0, eps, self.alphas_cumprod[t].view(-1, 1, 1, 1))


def diffusion_target(prediction_type: str, z0: torch.Tensor, eps: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """The training target for clean latents z0 noised with eps at signal level a (alphas_cumprod, broadcastable):
    eps, or v = sqrt(a) eps - sqrt(1-a) z0."""
    return eps if prediction_type == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * z0


class _Boundary(torch.autograd.Function):
    """Identity; in backward it notes when the gradient enters a network (at its output) and leaves it (at its
    input), and adds the time between to the backbone's timing."""

    @staticmethod
    def forward(ctx, x, backbone, kind, clock, side):
        ctx.backbone, ctx.kind, ctx.clock, ctx.side = backbone, kind, clock, side
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        bb = ctx.backbone
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        if ctx.side == "enter":
            ctx.clock.setdefault("entered", now)
        elif "entered" in ctx.clock and bb.timing is not None:
            bb.timing[ctx.kind] += now - ctx.clock.pop("entered")
        return grad, None, None, None, None


# ---- loading ---------------------------------------------------------------------------------------
def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def resolve_spec(spec: str | None) -> tuple[str, str | None]:
    """(spec to load, notice). With no spec: `LDU_MODEL`, else SD 1.5 on a GPU, else the best built-in."""
    if spec:
        return ALIASES.get(spec, spec), None
    env = os.environ.get("LDU_MODEL")
    if env:
        return ALIASES.get(env, env), None
    if torch.cuda.is_available():
        return DEFAULT_HUB_ID, None
    builtin = best_builtin()
    return builtin, (
        f"No GPU found: using the built-in '{builtin}' backbone, a 64 px miniature "
        + ("with RANDOM weights (its images are noise; numbers mean nothing)" if builtin == "tiny" else "trained on a handful of public images")
        + ". Real protection needs Stable Diffusion on a GPU (--model sd15 or a local diffusers folder)."
    )


def kind_of(spec: str | None) -> str:
    """The kind a spec loads as ("tiny", "pocket" or "sd"), without loading it."""
    resolved = resolve_spec(spec)[0]
    if resolved in BUILTIN:
        return resolved
    p = Path(resolved).expanduser()
    return folder_kind(p) if p.is_dir() else "sd"


def folder_kind(p: Path) -> str:
    """A local folder's kind: "pocket" when `python -m ldu.pocket train` wrote it (its training.json, with the model's
    config, beside the components), so that it gets pocket's defaults (attack, generation settings, verdict) as the
    built-in does; "sd" for any other folder."""
    try:
        config = json.loads((p / "training.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):  # none, unreadable, or not a JSON object
        return "sd"
    return "pocket" if isinstance(config, dict) and "latent_channels" in config else "sd"


def best_builtin() -> str:
    return "pocket" if (BUILTIN["pocket"] / "model_index.json").exists() else "tiny"


def load_backbone(spec: str | None = None, device: str | torch.device | None = None, dtype: torch.dtype | str | None = None,
                  revision: str | None = None) -> Backbone:
    """Load a backbone from a hub id, a local diffusers folder, or `tiny` / `pocket`.

    With no `spec`, an unreachable hub falls back to the best built-in with a loud warning; an explicit
    hub id that cannot be reached raises `BackboneError` saying how to use a local folder instead.
    """
    device = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
                 "fp16": torch.float16, "float16": torch.float16}[dtype]
    dtype = dtype or default_dtype(device)
    resolved, notice = resolve_spec(spec)
    try:
        path, kind, rev = _locate(resolved, revision)
    except BackboneError as err:
        if spec or os.environ.get("LDU_MODEL"):
            raise
        fallback = best_builtin()
        notice = f"Could not load the default model {resolved} ({err}). FELL BACK to the built-in '{fallback}' backbone: a 64 px miniature, results are small-scale."
        path, kind, rev = _locate(fallback, None)
        resolved = fallback
    if notice:
        warnings.warn(notice, stacklevel=2)
        log.warning(notice)
    elif kind in ("tiny", "pocket"):
        notice = (
            "Built-in 'tiny' backbone: random weights, its images are noise and its numbers mean nothing."
            if kind == "tiny"
            else "Built-in 'pocket' backbone: a 64 px miniature trained on a handful of public images; real protection needs SD on a GPU."
            if resolved in BUILTIN
            else f"A pocket model ({path}, trained by `python -m ldu.pocket train`): a 64 px miniature with pocket's "
                 "defaults; real protection needs SD on a GPU."
        )
    bb = _load_components(resolved, path, kind, rev, device, dtype)
    bb.notice = notice
    return bb


def _locate(spec: str, revision: str | None) -> tuple[Path, str, str]:
    """(local folder, kind, revision) for a built-in name, a folder, or a hub id (downloaded if needed)."""
    if spec in BUILTIN:
        path = BUILTIN[spec]
        if not (path / "model_index.json").exists():
            raise BackboneError(f"the built-in '{spec}' backbone is not in {path} (see README: how to build it)")
        return path, spec, _folder_revision(path)
    p = Path(spec).expanduser()
    if p.exists() or spec.startswith((".", "/", "~")) or spec.count("/") > 1:  # else "owner/name": a hub id
        if not p.is_dir():
            raise BackboneError(f"{spec}: no such folder (a local model must be a folder in diffusers layout)")
        missing = [c for c in COMPONENTS if not (p / c).is_dir()]
        if missing:
            raise BackboneError(f"{spec}: not a Stable Diffusion folder in diffusers layout (missing {', '.join(c + '/' for c in missing)})")
        return p, folder_kind(p), _folder_revision(p)
    return _download(spec, revision)


def _download(repo_id: str, revision: str | None) -> tuple[Path, str, str]:
    from huggingface_hub import snapshot_download  # deferred: only hub ids need it

    try:  # the cache first: no network round trip when the model is already here
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=True)
    except Exception:
        try:
            folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
        except Exception as err:  # offline, unknown repo, gated repo: all end the same way for the user
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise BackboneError(
                f"could not load '{repo_id}' from the Hugging Face Hub ({type(err).__name__}: {reason}). "
                f"On a machine with access run `hf download {repo_id} --local-dir DIR` and pass "
                "--model DIR, or use a built-in offline backbone: --model pocket (trained miniature) or --model tiny."
            ) from None
    path = Path(folder)
    return path, "sd", path.name  # the snapshot folder is named by its commit hash


def _folder_revision(path: Path) -> str:
    """A content hash of a local model: small files whole; large weights by size and four sampled 1 MiB
    chunks (two fine-tunes of one architecture differ everywhere, and hashing 4 GB at every load is slow)."""
    h = hashlib.sha256()
    parts = [path / "model_index.json", *(path / c for c in COMPONENTS)]  # not READMEs, grids or reports beside them
    files = [p for part in parts for p in ([part] if part.is_file() else sorted(part.rglob("*")) if part.is_dir() else [])]
    for f in sorted(p for p in files if p.is_file()):
        size = f.stat().st_size
        h.update(f"{f.relative_to(path)}:{size}".encode())
        if size <= 64 * 2**20:
            h.update(f.read_bytes())
            continue
        with open(f, "rb") as fh:
            for offset in (0, size // 3, 2 * size // 3, size - 2**20):
                fh.seek(offset)
                h.update(fh.read(2**20))
    return "sha256:" + h.hexdigest()[:16]


def _load_components(spec: str, path: Path, kind: str, revision: str, device: torch.device, dtype: torch.dtype) -> Backbone:
    # deferred: diffusers and transformers take seconds to import; `import ldu` and the CLIs' input checks stay fast
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    index = json.loads((path / "model_index.json").read_text()) if (path / "model_index.json").exists() else {}
    if index.get("_class_name", "StableDiffusionPipeline") not in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        raise BackboneError(f"{spec}: a {index['_class_name']}, not a Stable Diffusion 1.x/2.x pipeline")
    common = dict(local_files_only=True)
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, **common)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, **common)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **common)
        tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer", **common)
        scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **common)
    except (OSError, ValueError) as err:
        raise BackboneError(f"{spec}: could not load its components from {path} ({err})") from None
    for m in (vae, unet, text_encoder):
        m.requires_grad_(False).eval().to(device)
    return Backbone(spec=spec, kind=kind, path=path, revision=revision, vae=vae, unet=unet, text_encoder=text_encoder,
                    tokenizer=tokenizer, scheduler=scheduler, device=device, dtype=dtype)
