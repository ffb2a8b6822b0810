"""Benchmark the amortised LDU generator: seconds per training step, the training run's projected cost, and seconds
per protected image (with its network calls).

    python bench/amortised.py --model pocket                                   # the shipped pocket generator, CPU
    python bench/amortised.py --random-weights sd15 --dtype bf16 --preset sd15 # SD 1.5's architecture, on a GPU

A backbone without a shipped generator (random weights) gets an untrained one of the preset's shape: its timings
are real (the same network), its protection is not, and the table says so.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from common import add_backbone_args, backbone_from_args, peak_gib, print_table, reset_peak, sync

from ldu import methods, protect  # noqa: E402  (common.py puts the repo on the path)
from ldu.amortised import PRESETS, FILE, ShiftGenerator, file_hash, save, train  # noqa: E402
from ldu.methods.ldu_amortised import GENERATORS  # noqa: E402


def time_training(bb, preset: str, steps: int, batch: int | None, device) -> tuple[float, dict]:
    """Seconds per training step of `preset` (after one warm-up step), from the per-step progress reports."""
    cfg = replace(PRESETS[preset], steps=steps + 1, checkpoint_every=10**9, batch=batch or PRESETS[preset].batch)
    marks = []

    def callback(event):
        sync(device)
        marks.append(time.perf_counter())
        return True

    with tempfile.TemporaryDirectory() as tmp:
        reset_peak(device)
        train(bb, cfg, Path(tmp), resume=False, callback=callback, log=lambda *_: None)
    return (marks[-1] - marks[0]) / steps, {"batch": cfg.batch, "peak": peak_gib(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_args(ap)
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="training configuration to time")
    ap.add_argument("--train-steps", type=int, default=5, help="timed training steps (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: the preset's)")
    ap.add_argument("--images", default="1,8", help="protect batch sizes to time, comma-separated")
    args = ap.parse_args()
    bb = backbone_from_args(args)
    cfg = PRESETS[args.preset]

    per_step, info = time_training(bb, args.preset, args.train_steps, args.batch, args.device)
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device}); preset "
          f"{args.preset}: {cfg.steps} steps at batch {info['batch']}")
    note = "" if info["batch"] == cfg.batch else f" (at batch {info['batch']}; the preset's {cfg.batch} costs about {cfg.batch / info['batch']:.0f}x)"
    print_table([{"stage": "train", "batch": info["batch"], "s/step": f"{per_step:.3f}",
                  f"{cfg.steps} steps": f"{per_step * cfg.steps / 60:.1f} min{note}", "peak GiB": info["peak"]}],
                ["stage", "batch", "s/step", f"{cfg.steps} steps", "peak GiB"])

    shipped = GENERATORS / bb.kind
    with tempfile.TemporaryDirectory() as tmp:
        folder, trained = shipped, (shipped / FILE).exists()
        if not trained or args.random_weights:
            torch.manual_seed(0)
            gen = ShiftGenerator(bb.latent_channels, cfg.width, cfg.blocks)
            for p in gen.parameters():  # nonzero everywhere (a new generator's last conv is zero): the same work
                torch.nn.init.normal_(p, std=0.02)
            folder = save(gen, Path(tmp), {"backbone": bb.spec, "latent_channels": bb.latent_channels,
                                           "width": cfg.width, "blocks": cfg.blocks, "config": {}})
            trained = False
        rows = []
        for n in (int(v) for v in args.images.split(",")):
            x = [torch.rand(3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(i)) for i in range(n)]
            params = methods["ldu_amortised"].make_params(bb.kind, generator=str(folder))
            for together in (False, True) if n > 1 else (False,):
                protect(x, bb, method="ldu_amortised", params=params, batch_photos=together)  # warm-up
                sync(args.device)
                reset_peak(args.device)
                t0 = time.perf_counter()
                r = protect(x, bb, method="ldu_amortised", params=params, batch_photos=together)
                sync(args.device)
                wall = time.perf_counter() - t0
                s = r.stats["batch"]
                rows.append({"photos": f"{n}{' together' if together else ''}", "s/image": f"{s['seconds'] / n:.3f}",
                             "s/image with measures": f"{wall / n:.3f}",
                             "unet calls": s["unet_calls"],
                             "vae enc/dec per image": f"{s['vae_encode_calls'] / n:.2f}/{s['vae_decode_calls'] / n:.2f}",
                             "peak GiB": peak_gib(args.device)})
        label = f"{folder} ({file_hash(folder)})" if trained else "an untrained generator of the preset's shape (timing only)"
        print(f"protect with ldu_amortised, generator: {label}. s/image: the method (encode, generator, decode); with "
              "measures: all of protect(), whose stats (PSNR, SSIM, the attacker loss before and after) call the UNet")
        print_table(rows, ["photos", "s/image", "s/image with measures", "unet calls", "vae enc/dec per image", "peak GiB"])


if __name__ == "__main__":
    main()
