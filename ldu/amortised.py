"""The amortised LDU generator: a small network, trained once per backbone, that gives any photo its latent shift in
one forward pass (the paper's form of LDU; ldu/methods/ldu.py optimises the shift per photo instead).

    python -m ldu.amortised train --model pocket --images pocket-data --out runs/gen [--steps N] [--resume]
    python -m ldu.amortised check assets/generators/pocket --model pocket   # seen distribution vs unseen subjects
    python -m ldu protect photo.png --method ldu_amortised --model pocket

Protecting a photo: z0 = s E(x) (one VAE encode), delta = G(z0) (one generator pass), and the residual
D(z0 + delta) - D(z0) (one VAE decode of both, batched) projected onto the budget (residual mode, as per-image LDU):
three network calls and no UNet at all. Training maximises the same objective as per-image LDU (ldu/objective.py:
surrogate, draws, posting transforms) on the protected images, over images that are never the evaluation subjects.

Where it departs from the paper's generator (naresh-ub/unlearnable_samples, `models/U_UNet.py`): the shift is
applied to the clean latent rather than to z_T followed by a 4-step denoise (which would cost 8 UNet calls per
photo), and the budget is the same projection as everywhere here rather than a penalty.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors

from .backbone import load_backbone
from .budget import project
from .io import load_images, write_together
from .losses import make_draws
from .objective import Objective, ObjectiveOptions
from .pocket import data
from .registry import report
from .views import center_square

FILE = "generator.safetensors"
RECORD = "generator.json"


class ResBlock(nn.Module):
    def __init__(self, ch: int, groups: int = 8):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1),
                                  nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, ch, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class ShiftGenerator(nn.Module):
    """z0 [B,C,h,w] -> delta [B,C,h,w]: a two-level conv UNet (no timestep input), its last conv zero-initialised so
    a new generator protects nothing (delta = 0) and training starts from the photo itself."""

    def __init__(self, channels: int, width: int = 64, blocks: int = 2):
        super().__init__()
        self.inp = nn.Conv2d(channels, width, 3, padding=1)
        self.down = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = nn.Sequential(*[ResBlock(2 * width) for _ in range(blocks)])
        self.up = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.out_blocks = nn.Sequential(*[ResBlock(width) for _ in range(blocks)])
        self.out = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.down(self.inp(z))
        m = self.mid(self.pool(h))
        u = self.up(m)
        if u.shape[-2:] != h.shape[-2:]:  # odd latent sides
            u = nn.functional.interpolate(u, size=h.shape[-2:], mode="nearest")
        return self.out(self.out_blocks(h + u))


def protect_batch(backbone, gen: ShiftGenerator, x: torch.Tensor, budget_rms: float | None, linf: float | None,
                  mode: str = "residual", with_base: bool = False):
    """x [B,3,h,w] in [0,1] -> protected, differentiable in the generator: one encode, one generator pass, one decode
    (of the shifted and the unshifted latent together). The shift's change of the decoded image, projected on the
    budget, is added to the photo (residual mode) or to its VAE reconstruction (decode mode: the paper's output
    form, whose budget holds against the reconstruction). with_base: also return the reconstruction."""
    z0 = backbone.encode(x)
    delta = gen(z0.to(next(gen.parameters()).dtype)).float()
    both = backbone.decode(torch.cat([z0 + delta, z0]))
    shifted, base = both[: x.shape[0]], both[x.shape[0] :]
    out = ((x if mode == "residual" else base) + project(shifted - base, budget_rms, linf)).clamp(0, 1)
    return (out, base.clamp(0, 1)) if with_base else out  # (clamping moves no pixel farther from the clamped base)


# ---- a trained generator on disk -----------------------------------------------------------------------------
def save(gen: ShiftGenerator, folder: Path, record: dict) -> Path:
    """The weights and their record, written together or not at all (ldu.io.write_together)."""
    weights = save_safetensors({k: v.detach().float().cpu().contiguous() for k, v in gen.state_dict().items()})
    write_together([(folder / FILE, weights), (folder / RECORD, (json.dumps(record, indent=2) + "\n").encode())])
    return folder


def file_hash(folder: Path) -> str:
    return "sha256:" + hashlib.sha256((Path(folder) / FILE).read_bytes()).hexdigest()[:16]


_LOADED: dict = {}


def load(folder: str | Path, backbone) -> tuple[ShiftGenerator, dict]:
    """A saved generator for this backbone (cached per folder and device)."""
    folder = Path(folder)
    if not (folder / FILE).exists():
        raise ValueError(f"{folder}: no trained generator here ({FILE}); train one with `python -m ldu.amortised train`")
    record = json.loads((folder / RECORD).read_text())
    if record.get("latent_channels") != backbone.latent_channels:
        raise ValueError(f"{folder}: a generator for {record.get('latent_channels')} latent channels "
                         f"({record.get('backbone')}), not for {backbone.spec}'s {backbone.latent_channels}")
    key = (str(folder.resolve()), str(backbone.device), file_hash(folder))
    if key not in _LOADED:
        gen = ShiftGenerator(record["latent_channels"], record["width"], record["blocks"])
        gen.load_state_dict(load_file(str(folder / FILE)))
        _LOADED[key] = gen.to(backbone.device).eval().requires_grad_(False)
    return _LOADED[key], {**record, "hash": key[2]}


# ---- training --------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    steps: int = 3000
    batch: int = 8
    lr: float = 2e-4
    width: int = 64
    blocks: int = 2
    budget_rms: float = 8 / 255
    linf: float = 16 / 255
    prompt: str = "a photo of sks object"
    surrogate: str = "base"
    draws: int = 2  # fresh (t, eps) draws per image every step
    posting: bool = False
    latent_target: float = 0.0
    seed: int = 0
    checkpoint_every: int = 500
    images: str = "pocket-data"
    extra: dict = field(default_factory=dict)


PRESETS = {
    # the shipped pocket generator, in resumable stages of checkpoint_every steps; both pocket presets add the latent
    # target (per-image LDU's strongest lead in the ablation, docs/RESULTS.md)
    "cpu": TrainConfig(steps=3000, latent_target=1.0),
    "dev": TrainConfig(steps=1200, latent_target=1.0),  # a usable one in minutes
    # SD 1.5 at 512 px on a GPU: batch 16 as the paper's training, lr 1e-4
    "sd15": TrainConfig(steps=20000, batch=16, lr=1e-4, width=128, blocks=2, prompt="a photo of sks person"),
}


def image_stream(source: str, size: int, batch: int, seed: int):
    """step -> [batch,3,size,size] in [0,1]: pocket's own training images ('pocket-data': photos, scenes, textures;
    never the built-in subjects) or the images of a folder (random centre-crop views)."""
    if source == "pocket-data":
        def draw(step):
            a, _ = data.batch(seed + 77, step, batch, size=size, texture_fraction=0.2)
            return torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
        return draw
    pool = [center_square(im.pixels, size) for im in load_images([source])]
    if not pool:
        raise ValueError(f"{source}: no images")

    def draw(step):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return torch.stack([pool[int(i)] for i in torch.randint(len(pool), (batch,), generator=g)])
    return draw


def train(backbone, cfg: TrainConfig, out: Path, resume: bool = True, callback=None, log=print) -> Path:
    """Train (or resume) a generator for `backbone`; checkpoints in out/checkpoints, the loss curve in
    out/train_log.jsonl, the generator in out/. Every random draw comes from (seed, step): a resumed run is the run."""
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "config.json"
    if cfg_path.exists() and json.loads(cfg_path.read_text()) != json.loads(json.dumps(asdict(cfg))):
        raise ValueError(f"{out} holds a run with another configuration; use another --out")
    cfg_path.write_text(json.dumps(asdict(cfg), indent=2))
    torch.manual_seed(cfg.seed)
    gen = ShiftGenerator(backbone.latent_channels, cfg.width, cfg.blocks).to(backbone.device)
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr)
    ckpts = sorted((out / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    start = 0
    if resume and ckpts:
        state = torch.load(ckpts[-1], map_location=backbone.device, weights_only=False)
        gen.load_state_dict(state["gen"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log_path = out / "train_log.jsonl"
        if log_path.exists():  # the steps after the checkpoint are done again: their lines go
            lines = [line for line in log_path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
            log_path.write_text("".join(line + "\n" for line in lines))
    size = backbone.resolution
    stream = image_stream(cfg.images, size, cfg.batch, cfg.seed)
    if cfg.surrogate != "base":
        raise ValueError("the generator is trained across many subjects: only the base surrogate applies (lora and ti "
                         "adapt to one subject)")
    options = ObjectiveOptions(prompt=cfg.prompt, surrogate="base", draws=cfg.draws, posting=cfg.posting,
                               latent_target=cfg.latent_target)
    t0 = time.time()
    first = stream(start).to(backbone.device)
    objective = Objective(backbone, options, first, None, seed=cfg.seed)
    for step in range(start, cfg.steps):
        x = stream(step).to(backbone.device)
        # fresh draws and posting transforms every step, each from (seed, step): a resumed run is the same run
        draws = make_draws(cfg.draws, x.shape[0], backbone.latent_shape(), backbone.num_train_timesteps,
                           seed=cfg.seed * 7919 + step).to(backbone.device)
        objective.g.manual_seed(cfg.seed * 104_729 + step)
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / cfg.steps)))
        x_p = protect_batch(backbone, gen, x, cfg.budget_rms, cfg.linf)
        # on a GPU the UNet's activations are recomputed in backward (SD 1.5 at batch 16 x 2 draws would not fit
        # otherwise); on a CPU memory is not the limit and the recomputation would cost a third more time
        value = objective(x_p, draws=draws, checkpoint=backbone.device.type != "cpu")
        loss = -value.mean()
        value = value.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt.step()
        if (step + 1) % 25 == 0 or step + 1 == cfg.steps:
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps({"step": step + 1, "objective": float(value.mean()), "seconds": time.time() - t0}) + "\n")
        report(callback, {"stage": "train", "step": step + 1, "total": cfg.steps, "objective": float(value.mean())})
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            (out / "checkpoints").mkdir(exist_ok=True)
            tmp = out / "checkpoints" / f".step-{step + 1}.pt.tmp"
            torch.save({"gen": gen.state_dict(), "opt": opt.state_dict(), "step": step + 1}, tmp)
            tmp.rename(out / "checkpoints" / f"step-{step + 1}.pt")
            for old in sorted((out / "checkpoints").glob("step-*.pt"), key=lambda p: int(p.stem.split("-")[1]))[:-2]:
                old.unlink()
            log(f"step {step + 1}/{cfg.steps}: objective {float(value.mean()):.4f} ({time.time() - t0:.0f} s this run)")
    record = {"backbone": backbone.spec, "backbone_revision": backbone.revision, "latent_channels": backbone.latent_channels,
              "width": cfg.width, "blocks": cfg.blocks, "config": asdict(cfg),
              "parameters": sum(p.numel() for p in gen.parameters())}
    save(gen, out, record)
    plot_curve(out)
    return out


def plot_curve(out: Path) -> Path | None:
    """out/loss_curve.png: the training objective every 25 steps and its running mean over 200 steps (None before
    the first logged step)."""
    import matplotlib  # deferred: only this plot uses it, and it is slow to import

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    log = out / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line] if log.exists() else []
    if not rows:
        return None
    steps, values = [r["step"] for r in rows], [r["objective"] for r in rows]
    k = 8  # 8 points of 25 steps
    running = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    ax.plot(steps, values, lw=0.6, color="0.7", label="objective (one batch)")
    ax.plot(steps, running, lw=1.6, label="running mean, 200 steps")
    ax.set_xlabel("training step")
    ax.set_ylabel("objective (maximised)")
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png", dpi=100)
    return out / "loss_curve.png"


def check(backbone, folder: Path, budget_rms: float = 8 / 255, n: int = 8) -> dict:
    """What the generator does to images like its training images (pocket-data drawn with another seed) and to the
    built-in subjects' training views (never in its training data): PSNR, and the objective's two parts on draws it
    never trained on: the attacker loss gain (protected minus clean) and the encoded latent's distance to flat grey's
    latent. Close numbers on both sides mean it generalises to photos it never saw."""
    from . import protect
    from .subjects import SUBJECTS, subject_views

    gen, record = load(folder, backbone)
    cfg = record.get("config", {})
    size = backbone.resolution
    source = cfg.get("images", "pocket-data")
    seen = (f"training distribution ({source}, another seed)" if source == "pocket-data"
            else f"training images ({source}, other crops)")
    groups = {seen: image_stream(source, size, n, seed=1000)(0)}
    for name in SUBJECTS:
        a, _ = subject_views(name, "train", 4, seed=0, size=size)
        groups[f"subject {name} (never seen)"] = torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255
    grey = backbone.encode(torch.full((1, 3, size, size), 0.5, device=backbone.device))
    rows = {}
    for label, x in groups.items():
        r = protect(list(x), backbone, method="ldu_amortised", params={"generator": str(folder), "budget_rms": budget_rms,
                                                                       "prompt": cfg.get("prompt", "a photo of sks object")})
        with torch.no_grad():
            xp = torch.stack(r.images).to(backbone.device)
            dist = [(backbone.encode(v) - grey).pow(2).flatten(1).mean(1) for v in (x.to(backbone.device), xp)]
        st = r.stats["images"]
        rows[label] = {"images": len(st), "psnr": sum(s["psnr"] for s in st) / len(st),
                       "attacker_loss_gain": sum(s["attacker_loss_protected"] - s["attacker_loss_clean"] for s in st) / len(st),
                       "attacker_loss_clean": sum(s["attacker_loss_clean"] for s in st) / len(st),
                       "latent_distance_to_grey_clean": float(dist[0].mean()),
                       "latent_distance_to_grey_protected": float(dist[1].mean()),
                       "latent_closer_to_grey": 1 - float(dist[1].mean()) / float(dist[0].mean())}
    return {"generator": str(folder), "hash": record["hash"], "budget_rms": budget_rms, "groups": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldu.amortised", description="train the amortised LDU generator")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) a generator; writes DIR/generator.safetensors")
    t.add_argument("--model", default="pocket")
    t.add_argument("--images", default=None, help="a folder of training images, or pocket-data (never the evaluation subjects)")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    t.add_argument("--steps", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--device", default=None)
    c = sub.add_parser("check", help="what a trained generator does on its training distribution and on unseen subjects")
    c.add_argument("generator", type=Path)
    c.add_argument("--model", default="pocket")
    c.add_argument("--budget-rms", type=float, default=8 / 255)
    c.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    c.add_argument("--threads", type=int, default=None)
    c.add_argument("--device", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "check":
        result = check(load_backbone(args.model, device=args.device), args.generator, args.budget_rms)
        print(f"{result['generator']} ({result['hash']}), budget RMS {args.budget_rms * 255:.2f}/255")
        print(f"{'images':<52} {'n':>2} {'PSNR':>6} {'loss clean':>10} {'loss gain':>10} {'to grey: clean':>14} "
              f"{'protected':>9} {'closer':>7}")
        for label, r in result["groups"].items():
            print(f"{label:<52} {r['images']:>2} {r['psnr']:6.2f} {r['attacker_loss_clean']:10.4f} "
                  f"{r['attacker_loss_gain']:+10.4f} {r['latent_distance_to_grey_clean']:14.4f} "
                  f"{r['latent_distance_to_grey_protected']:9.4f} {100 * r['latent_closer_to_grey']:6.1f}%")
        if args.out:
            args.out.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    cfg = replace(PRESETS[args.preset], **{k: v for k, v in (("steps", args.steps), ("images", args.images)) if v is not None})
    if (args.out / "checkpoints").exists() and not args.resume:
        raise SystemExit(f"error: {args.out} holds a run: pass --resume to continue it, or choose another --out")
    bb = load_backbone(args.model, device=args.device)
    folder = train(bb, cfg, args.out, resume=args.resume)
    print(f"wrote {folder / FILE} ({file_hash(folder)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
