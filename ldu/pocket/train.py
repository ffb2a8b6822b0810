"""Train the pocket backbone: a miniature Stable Diffusion (64x64 RGB, x4 VAE, cross-attention UNet, small CLIP
text encoder trained with it) on the data of `ldu.pocket.data`.

    python -m ldu.pocket train --out runs/pocket            # resumes from runs/pocket/checkpoints if present

Stages, each checkpointed and resumable: (1) the VAE on random 32x32 crops (a conv net: crops train it as well
as whole images, 4x cheaper); (2) latent statistics, with the per-channel mean folded into quant_conv /
post_quant_conv (diffusers' pipelines ignore a shift_factor) and scaling_factor = 1 / std; (3) a fixed,
seeded dataset of images encoded once to posterior means and stds; (4) the UNet and text encoder together with
the epsilon-prediction loss, 10 % empty captions (for classifier-free guidance) and an EMA of the weights;
(5) the decoder alone on photo-heavy batches (the encoder, hence the latent space, frozen); (6) the EMA weights
saved as a StableDiffusionPipeline folder. Every random draw comes from (seed, stage, step).
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

from . import data

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@dataclass
class Config:
    seed: int = 0
    vae_steps: int = 3000
    vae_batch: int = 32
    vae_lr: float = 1e-3
    kl_weight: float = 1e-4
    dataset: int = 40000
    unet_steps: int = 8000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    warmup: int = 300
    drop_caption: float = 0.1
    ema: float = 0.999
    decoder_steps: int = 2000
    decoder_lr: float = 2e-4
    decoder_photo_fraction: float = 0.8
    checkpoint_every: int = 500
    vae_channels: tuple = (32, 64, 64)
    unet_channels: tuple = (32, 64, 64)
    text_hidden: int = 64
    text_layers: int = 2


# ---- models --------------------------------------------------------------------------------------------
def build_tokenizer():
    from transformers import CLIPTokenizer

    from ..tiny import build_vocab

    vocab, merges = build_vocab(data.WORDS)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77, pad_token="<|endoftext|>"), vocab, merges


def build_models(cfg: Config, tokenizer):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=tuple(cfg.vae_channels),
                        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=data.SIZE,
                        mid_block_add_attention=False)
    ids = tokenizer.get_vocab()
    text = CLIPTextModel(CLIPTextConfig(vocab_size=len(ids), hidden_size=cfg.text_hidden, intermediate_size=2 * cfg.text_hidden,
                                        num_hidden_layers=cfg.text_layers, num_attention_heads=4, max_position_embeddings=77,
                                        bos_token_id=ids["<|startoftext|>"], eos_token_id=ids["<|endoftext|>"],
                                        pad_token_id=ids["<|endoftext|>"]))
    unet = UNet2DConditionModel(sample_size=data.SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=tuple(cfg.unet_channels),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                                cross_attention_dim=cfg.text_hidden, attention_head_dim=8, norm_num_groups=16)
    return vae, text, unet


# ---- helpers -----------------------------------------------------------------------------------------
def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [N,H,W,3] -> float [N,3,H,W] in [-1, 1] (the VAE's range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))


def gradient_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of horizontal and vertical image gradients (sharper reconstructions)."""
    dx = lambda x: x[..., :, 1:] - x[..., :, :-1]  # noqa: E731
    dy = lambda x: x[..., 1:, :] - x[..., :-1, :]  # noqa: E731
    return (dx(a) - dx(b)).abs().mean() + (dy(a) - dy(b)).abs().mean()


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """L1 + L2 + half the gradient difference: sharp edges without a perceptual network."""
    return (rec - x).abs().mean() + (rec - x).pow(2).mean() + 0.5 * gradient_difference(rec, x)


class Checkpoints:
    """stage-step checkpoints in out/checkpoints: the latest one of a stage resumes it."""

    def __init__(self, out: Path):
        self.dir = out / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)

    def latest(self, stage: str):
        found = sorted(self.dir.glob(f"{stage}-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        return torch.load(found[-1], weights_only=False) if found else None

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
def train_vae(vae, cfg: Config, out: Path, ckpt: Checkpoints, progress) -> None:
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    start = 0
    state = ckpt.latest("vae")
    if state:
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.train()
    bar = progress(total=cfg.vae_steps, initial=start, desc="VAE")
    t0 = time.time()
    for step in range(start, cfg.vae_steps):
        rng = np.random.default_rng([cfg.seed, 1, step])
        images, _ = data.batch(cfg.seed + 1, step, cfg.vae_batch)
        top, left = rng.integers(0, data.SIZE - 32 + 1, size=2)
        x = to_tensor(images)[..., top : top + 32, left : left + 32]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.vae_steps, cfg.vae_lr, 100)
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = reconstruction_loss(rec, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            log(out, {"stage": "vae", "step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.vae_steps:
            ckpt.save("vae", step + 1, {"model": vae.state_dict(), "opt": opt.state_dict()})
    bar.close()
    vae.eval()


@torch.no_grad()
def centre_latents(vae, cfg: Config) -> dict:
    """Fold the latent mean into the VAE's 1x1 convs and return scaling_factor = 1 / std (DESIGN: no shift_factor)."""
    means = []
    for i in range(16):
        images, _ = data.batch(cfg.seed + 2, i, 64)
        means.append(vae.encode(to_tensor(images)).latent_dist.mean)
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
def encode_dataset(vae, cfg: Config, out: Path, progress) -> dict:
    path = out / "checkpoints" / f"dataset-{cfg.seed}-{cfg.dataset}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    means, stds, captions = [], [], []
    bar = progress(total=cfg.dataset, desc="encode dataset")
    for i in range(0, cfg.dataset, 64):
        images, caps = data.batch(cfg.seed + 3, i // 64, min(64, cfg.dataset - i))
        post = vae.encode(to_tensor(images)).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
        captions += caps
        bar.update(len(caps))
    bar.close()
    ds = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
    torch.save(ds, path)
    return ds


def train_unet(unet, text, tokenizer, scaling: float, ds: dict, cfg: Config, out: Path, ckpt: Checkpoints, progress) -> tuple:
    from diffusers import DDIMScheduler

    alphas = DDIMScheduler(**SCHEDULER).alphas_cumprod.float()
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.unet_lr, weight_decay=1e-2)
    ema = [p.detach().clone() for p in params]
    start = 0
    state = ckpt.latest("unet")
    if state:
        unet.load_state_dict(state["unet"])
        text.load_state_dict(state["text"])
        opt.load_state_dict(state["opt"])
        ema = state["ema"]
        start = state["step"]
    unique = sorted(set(ds["captions"]) | {""})
    ids = tokenizer(unique, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    index = {c: i for i, c in enumerate(unique)}
    cap_idx = torch.tensor([index[c] for c in ds["captions"]])
    unet.train()
    text.train()
    bar = progress(total=cfg.unet_steps, initial=start, desc="UNet + text encoder")
    t0 = time.time()
    n = ds["mean"].shape[0]
    for step in range(start, cfg.unet_steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        idx = torch.randint(0, n, (cfg.unet_batch,), generator=g)
        z0 = (ds["mean"][idx].float() + ds["std"][idx].float() * torch.randn(ds["mean"][idx].shape, generator=g)) * scaling
        c = cap_idx[idx].clone()
        c[torch.rand(cfg.unet_batch, generator=g) < cfg.drop_caption] = index[""]
        t = torch.randint(0, 1000, (cfg.unet_batch,), generator=g)
        eps = torch.randn(z0.shape, generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, cfg.unet_steps, cfg.unet_lr, cfg.warmup)
        loss = F.mse_loss(unet(zt, t, encoder_hidden_states=text(ids[c])[0]).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            for e, p in zip(ema, params):
                e.mul_(cfg.ema).add_(p.detach(), alpha=1 - cfg.ema)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            log(out, {"stage": "unet", "step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.unet_steps:
            ckpt.save("unet", step + 1, {"unet": unet.state_dict(), "text": text.state_dict(), "opt": opt.state_dict(), "ema": ema})
    bar.close()
    with torch.no_grad():  # the EMA weights are what ships
        for e, p in zip(ema, params):
            p.copy_(e)
    unet.eval()
    text.eval()


def finetune_decoder(vae, cfg: Config, out: Path, ckpt: Checkpoints, progress) -> None:
    """Sharpen the decoder on photo-heavy batches with the encoder frozen: the latent space the UNet learned is
    unchanged, reconstructions of natural photos (the held-out subjects) improve."""
    if cfg.decoder_steps <= 0:
        return
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr, weight_decay=0.0)
    start = 0
    state = ckpt.latest("decoder")
    if state:
        vae.decoder.load_state_dict(state["decoder"])
        vae.post_quant_conv.load_state_dict(state["post_quant_conv"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    vae.decoder.train()
    bar = progress(total=cfg.decoder_steps, initial=start, desc="VAE decoder")
    t0 = time.time()
    for step in range(start, cfg.decoder_steps):
        rng = np.random.default_rng([cfg.seed, 4, step])
        images, _ = data.batch(cfg.seed + 4, step, cfg.vae_batch, photo_fraction=cfg.decoder_photo_fraction)
        top, left = rng.integers(0, data.SIZE - 32 + 1, size=2)
        x = to_tensor(images)[..., top : top + 32, left : left + 32]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.decoder_steps, cfg.decoder_lr, 100)
        with torch.no_grad():
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=torch.Generator().manual_seed(step))
        rec = vae.decode(z).sample
        loss = reconstruction_loss(rec, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % 50 == 0:
            log(out, {"stage": "decoder", "step": step + 1, "loss": loss.item(), "seconds": time.time() - t0})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.decoder_steps:
            ckpt.save("decoder", step + 1, {"decoder": vae.decoder.state_dict(), "post_quant_conv": vae.post_quant_conv.state_dict(),
                                            "opt": opt.state_dict()})
    bar.close()
    vae.eval()


def train(out: Path, cfg: Config, progress=None) -> Path:
    """Run (or resume) every stage and write the pipeline folder to out/pipeline; returns that path."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from ..tiny import strip_absent_components

    progress = progress or tqdm
    out.mkdir(parents=True, exist_ok=True)
    saved_cfg = out / "config.json"
    if saved_cfg.exists() and json.loads(saved_cfg.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"{out} holds a run with another configuration ({saved_cfg}); use another --out")
    saved_cfg.write_text(json.dumps(asdict(cfg), indent=2))
    t0 = time.time()
    ckpt = Checkpoints(out)
    tokenizer, vocab, merges = build_tokenizer()
    vae, text, unet = build_models(cfg, tokenizer)
    train_vae(vae, cfg, out, ckpt, progress)
    t_vae = time.time() - t0
    stats = centre_latents(vae, cfg)
    ds = encode_dataset(vae, cfg, out, progress)
    train_unet(unet, text, tokenizer, vae.config.scaling_factor, ds, cfg, out, ckpt, progress)
    finetune_decoder(vae, cfg, out, ckpt, progress)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(**SCHEDULER), safety_checker=None, feature_extractor=None,
                                   image_encoder=None, requires_safety_checker=False)
    folder = out / "pipeline"
    pipe.save_pretrained(folder, safe_serialization=True)
    strip_absent_components(folder)
    (folder / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "training.json").write_text(json.dumps({"config": asdict(cfg), **stats, "seconds_total_this_run": time.time() - t0,
                                                      "seconds_vae_this_run": t_vae}, indent=2))
    return folder
