"""Train the pocket backbone: a miniature Stable Diffusion (64x64 RGB, x4 VAE, cross-attention UNet, small CLIP
text encoder trained with it) on the data of `ldu.pocket.data`.

    python -m ldu.pocket train --out runs/pocket                # resumes from runs/pocket/checkpoints if present
    python -m ldu.pocket train --out runs/pocket --preset gpu   # bigger batches and text encoder, on a GPU
    python -m ldu.pocket train --out runs/more --init-from pocket --seed 1 --unet-steps 3000 --decoder-steps 0
                                                                # go on training a model's UNet, its VAE kept
    python -m ldu.pocket train --out runs/wide --init-from pocket --init-keep vae --text-hidden 128 --text-layers 4 \
        --decoder-steps 0                                       # a fresh UNet and wider text encoder on its latent space

Stages, each checkpointed and resumable: (1) the VAE on random crops (`vae_crop`: 32 px on a CPU, where a conv
net trains about as well on crops as on whole images at a quarter of the cost); (2) latent statistics, with the per-channel mean folded into quant_conv /
post_quant_conv (diffusers' pipelines ignore a shift_factor) and scaling_factor = 1 / std; (3) a fixed,
seeded dataset of images encoded once to posterior means and stds; (4) the UNet and text encoder together with
the epsilon-prediction loss, 10 % empty captions (for classifier-free guidance) and an EMA of the weights (with
a warm-up, so that a short run does not keep its random start);
(5) the decoder alone on photo-heavy batches (the encoder, hence the latent space, frozen; `decoder_field_fraction`
and `clamped_loss` keep flat and saturated colours, as the shipped pocket's last run did); (6) the EMA weights
saved as a StableDiffusionPipeline folder. Every random draw comes from (seed, stage, step), drawn on the CPU, so a
run is the same computation on any device (up to floating-point order). On a GPU the VAE and decoder stages
sample from pools of images made once by parallel processes (`vae_pool`, `decoder_pool`) instead of drawing a
fresh batch every step: drawing them is what a fast device would otherwise wait for.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..backbone import diffusion_target
from ..tiny import build_vocab, strip_absent_components
from . import data, pca

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1)


@dataclass
class Config:
    seed: int = 0
    vae_steps: int = 5000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_crop: int = 32  # side of the random training crops (64: whole images)
    vae_pool: int = 0  # 0: a fresh data.batch every step; N: N images made once, in parallel, and sampled
    vae_photo_fraction: float = data.PHOTO_FRACTION
    vae_field_fraction: float = 0.15  # share of saturated colour fields (data.colour_field) in the VAE's batches
    vae_texture_fraction: float = 0.3  # share of random colour textures (data.texture)
    vae_recolour_fraction: float = 0.5  # share of the VAE's photos recoloured (data.recolour)
    latent_channels: int = 16  # 4 cannot keep a cat's eyes at 64 px (a linear 4x4-patch PCA with 8 already beats it)
    vae_groups: int = 4  # GroupNorm groups of the VAE (2 channels per group erase flat colours)
    vae_logvar_init: float | None = -8.0  # start the posterior narrow (log-variance): a wide one hides the signal
    kl_weight: float = 1e-4
    vae_encoder: str = "trained"  # "trained": the encoder learns with the decoder; "pca": it is the principal-component
    #                               projection of 4x4 patches of the VAE's data (`ldu.pocket.pca`) and only the decoder
    #                               learns in the VAE stage (docs/RESULTS.md, "A linear encoder")
    pca_images: int = 2048  # with vae_encoder="pca": the VAE images the projection is fitted on
    dataset: int = 40000
    unet_steps: int = 6500
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 300
    drop_caption: float = 0.1
    ema: float = 0.999
    decoder_steps: int = 600
    decoder_lr: float = 2e-4
    decoder_photo_fraction: float = 0.8
    decoder_pool: int = 0
    decoder_batch: int = 16  # 0: vae_batch
    decoder_crop: int = 64  # 0: vae_crop; 64: whole images, so GroupNorm sees whole-image statistics at the end
    decoder_field_fraction: float | None = None  # share of colour fields in the decoder stage (None: vae_field_fraction)
    clamped_loss: bool = False  # the reconstruction loss sees the decoder's output clamped to the image range, as every
    #                             user of it does (a saturated channel may overshoot: no flat colour pulled inward)
    checkpoint_every: int = 500
    vae_channels: tuple = (32, 64, 64)
    unet_channels: tuple = (32, 64, 64)
    text_hidden: int = 64
    text_layers: int = 2
    init_from: str | None = None  # a pocket folder (or "pocket"): keep its VAE, go on training its UNet and text encoder
    init_keep: str = "all"  # with init_from: "all" (its VAE, UNet and text encoder) or "vae" (its VAE alone; a fresh UNet
    #                         and text encoder of this config's sizes, e.g. a wider text encoder on the same latent space)
    prediction_type: str = "epsilon"  # what the UNet learns to predict: "epsilon" or "v_prediction" (Salimans & Ho 2022)
    zero_terminal_snr: bool = False  # rescale the betas so the last timestep is pure noise, sampled with "trailing"
    #                                  timesteps (Lin et al. 2024, "Common diffusion noise schedules ... are flawed");
    #                                  needs v_prediction (an epsilon model cannot read x0 at zero signal)

    @property
    def decoder_fields(self) -> float:
        """The share of colour fields in the decoder stage's batches."""
        return self.vae_field_fraction if self.decoder_field_fraction is None else self.decoder_field_fraction

    def __post_init__(self):
        if self.vae_encoder not in ("trained", "pca"):
            raise ValueError(f"vae_encoder must be 'trained' or 'pca', got {self.vae_encoder!r}")
        if self.vae_encoder == "pca" and self.init_from:
            raise ValueError("vae_encoder 'pca' builds a new VAE and init_from keeps that model's: give one of them")


PRESETS = {
    # 2 CPU cores, in resumable stages (times measured: docs/RESULTS.md, "The pocket backbone").
    "cpu": Config(),
    # The same model with the batches a GPU affords (a step of these small models costs about the same at any batch
    # size there: launch-bound), whole-image VAE batches, a wider text encoder, image pools made by parallel processes.
    "gpu": Config(vae_steps=2500, vae_batch=256, vae_crop=64, vae_pool=64000, dataset=100000, unet_steps=2250,
                  unet_batch=1024, unet_lr=1.5e-3, decoder_steps=750, decoder_batch=256, decoder_pool=24000,
                  text_hidden=128, text_layers=4),
}


def scheduler(cfg: Config) -> DDIMScheduler:
    """The noise schedule the UNet is trained on and the pipeline ships with."""
    if cfg.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {cfg.prediction_type!r}")
    if cfg.zero_terminal_snr and cfg.prediction_type != "v_prediction":
        raise ValueError("zero_terminal_snr needs prediction_type 'v_prediction': at zero signal the noise is the "
                         "whole input, so an epsilon model cannot tell what the image was")
    return DDIMScheduler(**SCHEDULER, prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.zero_terminal_snr,
                         timestep_spacing="trailing" if cfg.zero_terminal_snr else "leading")


# ---- models --------------------------------------------------------------------------------------------
def build_tokenizer():
    vocab, merges = build_vocab(data.WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>"), vocab, merges


def build_models(cfg: Config, tokenizer):
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=tuple(cfg.vae_channels),
                        layers_per_block=1, latent_channels=cfg.latent_channels, norm_num_groups=cfg.vae_groups, sample_size=data.SIZE,
                        mid_block_add_attention=False)
    if cfg.vae_logvar_init is not None:  # quant_conv's second half is the log-variance
        with torch.no_grad():
            vae.quant_conv.bias[cfg.latent_channels :] = cfg.vae_logvar_init
    ids = tokenizer.get_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(ids), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                                        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"],
                                        pad_token_id=ids["<|endoftext|>"]))
    unet = UNet2DConditionModel(sample_size=data.SIZE // 4, in_channels=cfg.latent_channels, out_channels=cfg.latent_channels, layers_per_block=1,
                                block_out_channels=tuple(cfg.unet_channels),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=16)
    return vae, text, unet


# ---- helpers -----------------------------------------------------------------------------------------
def to_tensor(images) -> torch.Tensor:
    """uint8 [N,H,W,3] (numpy or torch) -> float [N,3,H,W] in [-1, 1] (the VAE's range)."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    return images.permute(0, 3, 1, 2).float() / 127.5 - 1


def image_source(seed: int, pool: int, batch: int, photo_fraction: float, device, **extra):
    """(step, rng) -> uint8 images [batch,H,W,3] on device: data.batch(seed, step) when pool is 0, else a random
    draw (from rng) out of `pool` images made once. `extra`: data.batch's VAE-only fractions."""
    if not pool:
        return lambda step, rng: torch.from_numpy(data.batch(seed, step, batch, photo_fraction=photo_fraction, **extra)[0]).to(device)
    images = torch.from_numpy(data.pool(seed, math.ceil(pool / 64), 64, photo_fraction, **extra)[0][:pool]).to(device)
    return lambda step, rng: images[torch.from_numpy(rng.integers(0, pool, batch)).to(device)]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def gradient_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical image gradients (sharper reconstructions)."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, clamped: bool = False) -> torch.Tensor:
    """L1 + L2 + half the gradient difference: sharp edges without a perceptual network. clamped: of the output
    clamped to [-1, 1], what the image is once shown (a saturated colour may overshoot instead of being pulled in)."""
    if clamped:
        rec = rec.clamp(-1, 1)
    return (rec - x).abs().mean() + (rec - x).pow(2).mean() + 0.5 * gradient_difference(rec, x)


class Checkpoints:
    """stage-step checkpoints in out/checkpoints: the latest one of a stage resumes it."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest(self, stage: str):
        found = sorted(self.dir.glob(f"{stage}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        return torch.load(found[-1], map_location="cpu", weights_only=False) if found else None

    def save(self, stage: str, step: int, state: dict) -> None:
        tmp = self.dir / f".{stage}-{step}.pt.tmp"
        torch.save({**state, "step": step}, tmp)
        tmp.rename(self.dir / f"{stage}-{step}.pt")
        for old in sorted(self.dir.glob(f"{stage}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
            old.unlink()


def log(out: Path, record: dict) -> None:
    with open(out / "train_log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- stages ------------------------------------------------------------------------------------------
def train_autoencoder(vae, stage: str, modules: dict, steps: int, lr: float, photo_fraction: float, pool: int,
                      kl_weight: float | None, cfg: Config, out: Path, ckpt: Checkpoints, progress, device) -> None:
    """Train `modules` (parts of the VAE) to reconstruct random crops. kl_weight=None: the encoder is frozen (the
    decoder stage), else it is trained too, with that weight on the KL term (the VAE stage)."""
    key = {"vae": 1, "decoder": 4}[stage]  # the stage's share of the random draws: (seed, key, step)
    params = [p for m in modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    start = 0
    state = ckpt.latest(stage)
    if state:
        for name, m in modules.items():
            m.load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    if start >= steps:
        vae.eval()
        return
    for m in modules.values():
        m.train()
    batch, c = (cfg.vae_batch, cfg.vae_crop) if stage == "vae" else (cfg.decoder_batch or cfg.vae_batch, cfg.decoder_crop or cfg.vae_crop)
    fields = cfg.vae_field_fraction if stage == "vae" else cfg.decoder_fields
    source = image_source(cfg.seed + key, pool, batch, photo_fraction, device, field_fraction=fields,
                          texture_fraction=cfg.vae_texture_fraction, recolour_fraction=cfg.vae_recolour_fraction)
    bar = progress(total=steps, initial=start, desc={"vae": "VAE", "decoder": "VAE decoder"}[stage])
    t0 = time.time()
    for step in range(start, steps):
        rng = np.random.default_rng([cfg.seed, key, step])
        images = source(step, rng)
        top, left = rng.integers(0, data.SIZE - c + 1, size=2)
        x = to_tensor(images)[..., top : top + c, left : left + c]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, 100)
        with torch.set_grad_enabled(kl_weight is not None):
            post = vae.encode(x).latent_dist
            noise = torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(step)).to(device)
            z = post.mean + post.std * noise
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x, cfg.clamped_loss)
        if kl_weight is not None:
            loss = loss + kl_weight * (post.kl().mean() / z[0].numel())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        if (step + 1) % 50 == 0:  # .item() waits for the device: only when logging
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(out, {"stage": stage, "step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == steps:
            ckpt.save(stage, step + 1, {**{name: m.state_dict() for name, m in modules.items()}, "opt": opt.state_dict()})
    bar.close()
    vae.eval()


def fit_pca(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """The patch projection of `vae_encoder="pca"`: fitted on `pca_images` images drawn as the VAE stage draws its
    batches (the same mix of photos, fields, textures and recolourings), under the stage's own seed key (5)."""
    images = [data.batch(cfg.seed + 5, i, 64, photo_fraction=cfg.vae_photo_fraction, field_fraction=cfg.vae_field_fraction,
                         texture_fraction=cfg.vae_texture_fraction, recolour_fraction=cfg.vae_recolour_fraction)[0]
              for i in range(math.ceil(cfg.pca_images / 64))]
    return pca.patch_pca(to_tensor(np.concatenate(images)[: cfg.pca_images]), cfg.latent_channels)


@torch.no_grad()
def centre_latents(vae, cfg: Config, device) -> dict:
    """Fold the latent mean into the VAE's 1x1 convs and return scaling_factor = 1 / std (DESIGN: no shift_factor)."""
    means = []
    for i in range(16):
        images, _ = data.batch(cfg.seed + 2, i, 64)
        means.append(vae.encode(to_tensor(images).to(device)).latent_dist.mean)
    z = torch.cat(means)
    mu = z.mean(dim=(0, 2, 3))
    c = mu.numel()
    vae.quant_conv.bias[:c] -= mu  # encoder: mean channels come first in quant_conv's output
    w = vae.post_quant_conv.weight[:, :, 0, 0]  # decoder input z = z' + mu: fold W mu into the bias
    vae.post_quant_conv.bias += w @ mu
    std = (z - mu.view(1, -1, 1, 1)).std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    return {"latent_mean_removed": mu.tolist(), "latent_std": std, "scaling_factor": round(1.0 / std, 5)}


@torch.no_grad()
def encode_dataset(vae, cfg: Config, out: Path, progress, device) -> dict:
    path = out / "checkpoints" / f"dataset-{cfg.seed}-{cfg.dataset}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    images, captions = data.pool(cfg.seed + 3, math.ceil(cfg.dataset / 64), 64)
    images, captions = images[: cfg.dataset], captions[: cfg.dataset]
    means, stds = [], []
    bar = progress(total=cfg.dataset, desc="encode dataset")
    for i in range(0, cfg.dataset, 256):
        post = vae.encode(to_tensor(images[i : i + 256]).to(device)).latent_dist
        means.append(post.mean.half().cpu())
        stds.append(post.std.half().cpu())
        bar.update(len(means[-1]))
    bar.close()
    ds = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    torch.save(ds, path)
    return ds


def train_unet(unet, text, tokenizer, scaling: float, ds: dict, cfg: Config, out: Path, ckpt: Checkpoints, progress, device) -> None:
    alphas = scheduler(cfg).alphas_cumprod.float().to(device)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    live = [p.detach() for p in params]  # views of the parameters (the optimiser updates them in place)
    start = 0
    state = ckpt.latest("unet")
    if state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema = [e.to(device) for e in state["ema"]]
        start = state["step"]
    unique = sorted(set(ds["captions"]) | {""})
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids.to(device)
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in ds["captions"]])
    means, stds = ds["mean"].to(device), ds["std"].to(device)
    unet.train()
    text.train()
    bar = progress(total=cfg.unet_steps, initial=start, desc="UNet + text encoder")
    t0 = time.time()
    n, shape = means.shape[0], (cfg.unet_batch, *means.shape[1:])
    for step in range(start, cfg.unet_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)  # every draw on the CPU: the same on any device
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        noise = torch.randn(shape, generator=g)
        c = cap_idx[idx].clone()
        c[torch.rand(cfg.unet_batch, generator=g) < cfg.drop_caption] = index[""]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        eps = torch.randn(shape, generator=g)
        used, which = torch.unique(c, return_inverse=True)  # encode each caption of the batch once
        idx, noise, used, which, t, eps = (v.to(device) for v in (idx, noise, used, which, t, eps))
        z0 = (means[idx].float() + stds[idx].float() * noise) * scaling
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        target = diffusion_target(cfg.prediction_type, z0, eps, a)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=text(ids[used])[0][which]).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(cfg.ema, (1 + step) / (10 + step))  # warm-up: early steps must not keep the random init
        with torch.no_grad():
            torch._foreach_mul_(ema, decay)
            torch._foreach_add_(ema, live, alpha=1 - decay)
        bar.update(1)
        if (step + 1) % 50 == 0:  # .item() waits for the device: only when logging
            bar.set_postfix(loss=f"{loss.item():.4f}")
            log(out, {"stage": "unet", "step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            ckpt.save("unet", step + 1, {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema})
    bar.close()
    with torch.no_grad():  # the EMA weights are what ships
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text.eval()


def load_start(cfg: Config, tokenizer) -> tuple:
    """(vae, text, unet, latent stats): built afresh, or with `cfg.init_from` loaded from that pocket folder, whose
    VAE (so its latent space) is kept and whose latent statistics are carried over."""
    if not cfg.init_from:
        return (*build_models(cfg, tokenizer), None)
    if cfg.init_keep not in ("all", "vae"):
        raise ValueError(f"init_keep must be 'all' or 'vae', got {cfg.init_keep!r}")
    from ..backbone import BUILTIN  # deferred: the backbone module imports the pipelines

    src = BUILTIN.get(cfg.init_from, Path(cfg.init_from))
    if not (src / "training.json").is_file():
        raise ValueError(f"init_from: {src} is not a pocket folder (no training.json); give 'pocket' or a folder "
                         "written by `python -m ldu.pocket train`")
    stats = {k: v for k, v in json.loads((src / "training.json").read_text()).items()
             if k in ("latent_mean_removed", "latent_std", "scaling_factor")}
    vae = AutoencoderKL.from_pretrained(src, subfolder="vae")
    found = {"latent_channels": vae.config.latent_channels}
    if cfg.init_keep == "vae":
        _, text, unet = build_models(cfg, tokenizer)
    else:
        text = CLIPTextModel.from_pretrained(src, subfolder="text_encoder")
        unet = UNet2DConditionModel.from_pretrained(src, subfolder="unet")
        found |= {"text_hidden": text.config.hidden_size, "text_layers": text.config.num_hidden_layers,
                  "unet_channels": tuple(unet.config.block_out_channels)}
    wrong = {k: v for k, v in found.items() if v != (tuple(getattr(cfg, k)) if k == "unet_channels" else getattr(cfg, k))}
    if wrong:
        raise ValueError(f"init_from: {src} was not trained with this preset's sizes ({wrong}); pick the preset it was "
                         "trained with")
    return vae, text, unet, stats


def train(out: Path, cfg: Config, progress=None, device=None) -> Path:
    """Run (or resume) every stage and write the pipeline folder to out/pipeline; returns that path. device: where
    to train (default: CUDA when present, else the CPU). With `cfg.init_from` the VAE stage and the centring are
    skipped (that model's VAE is kept) and the UNet and text encoder start from its weights."""
    progress = progress or tqdm
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    scheduler(cfg)  # refuse a bad schedule before any work
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "config.json"
    defaults = json.loads(json.dumps(asdict(Config())))  # a run saved before a field existed used its default
    if saved_cfg.exists() and {**defaults, **json.loads(saved_cfg.read_text())} != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"{out} holds a run with another configuration ({saved_cfg}); use another --out")
    saved_cfg.write_text(json.dumps(asdict(cfg), indent=2))
    ckpt = Checkpoints(out)
    tokenizer, vocab, merges = build_tokenizer()
    vae, text, unet, stats = load_start(cfg, tokenizer)
    vae, text, unet = vae.to(device), text.to(device), unet.to(device)
    seconds, t0 = {}, time.time()

    def lap(name):
        nonlocal t0
        seconds[name] = round(time.time() - t0, 1)
        t0 = time.time()

    if stats is None:
        if cfg.vae_encoder == "pca":
            pca.wire_encoder(vae, *fit_pca(cfg), logvar=cfg.vae_logvar_init if cfg.vae_logvar_init is not None else -8.0)
            train_autoencoder(vae, "vae", {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}, cfg.vae_steps,
                              cfg.vae_lr, cfg.vae_photo_fraction, cfg.vae_pool, None, cfg, out, ckpt, progress, device)
        else:
            train_autoencoder(vae, "vae", {"model": vae}, cfg.vae_steps, cfg.vae_lr, cfg.vae_photo_fraction, cfg.vae_pool,
                              cfg.kl_weight, cfg, out, ckpt, progress, device)
        stats = centre_latents(vae, cfg, device)
    vae.eval()
    lap("vae")
    ds = encode_dataset(vae, cfg, out, progress, device)
    lap("dataset")
    train_unet(unet, text, tokenizer, vae.config.scaling_factor, ds, cfg, out, ckpt, progress, device)
    lap("unet")
    # Sharpen the decoder on photo-heavy batches with the encoder frozen: the latent space the UNet learned is
    # unchanged, reconstructions of natural photos (the held-out subjects) improve.
    train_autoencoder(vae, "decoder", {"decoder": vae.decoder, "post_quant_conv": vae.post_quant_conv}, cfg.decoder_steps,
                      cfg.decoder_lr, cfg.decoder_photo_fraction, cfg.decoder_pool, None, cfg, out, ckpt, progress, device)
    lap("decoder")
    vae, text, unet = vae.cpu(), text.cpu(), unet.cpu()
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler(cfg), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    folder = out / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    strip_absent_components(folder)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    (folder / "training.json").write_text(json.dumps({"config": asdict(cfg), **stats, "device": where,
                                                      "seconds_this_run": seconds}, indent=2))
    return folder
