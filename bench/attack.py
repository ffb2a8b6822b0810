"""Benchmark the personalization attacks: seconds per training step and peak memory.

    python bench/attack.py                                          # tiny on this machine's device
    python bench/attack.py --random-weights sd15 --dtype bf16       # SD 1.5 architecture, random weights, GPU

Seconds per step are measured between progress callbacks after `--warmup` steps (compilation and allocator
warm-up are reported separately as the warm-up time); "400 steps" extrapolates the steady rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import peak_gib, print_table, random_backbone, reset_peak, sync

from attacks import attacks, train  # noqa: E402  (common.py puts the repo on the path)
from ldu import load_backbone  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--random-weights", default=None, help="sd15: SD 1.5's architecture with random weights")
    ap.add_argument("--resolution", type=int, default=None)
    ap.add_argument("--attacks", default=",".join(attacks))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=4, help="training views")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--compile", action="store_true", help="torch.compile the UNet (GPU)")
    args = ap.parse_args()

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, None: None}[args.dtype]
    if torch.device(args.device).type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.random_weights:
        bb = random_backbone(args.random_weights, args.device, dtype or torch.float32, args.resolution)
    else:
        bb = load_backbone(args.model, device=args.device, dtype=dtype)
    if args.compile:
        bb.unet = torch.compile(bb.unet)
    views = [torch.rand(3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(i)) for i in range(args.images)]
    rows = []
    for name in args.attacks.split(","):
        stamps = []

        def callback(info):
            if info.get("stage") == "train":
                sync(args.device)
                stamps.append(time.perf_counter())
            return True

        reset_peak(args.device)
        t0 = time.perf_counter()
        train(bb, views, name, {"steps": args.steps}, out=tempfile.mkdtemp(prefix="bench-"), callback=callback)
        total = time.perf_counter() - t0
        steady = stamps[args.warmup:]
        per_step = (steady[-1] - steady[0]) / max(1, len(steady) - 1)
        rows.append({
            "attack": name,
            "steps": args.steps,
            "s/step": f"{per_step:.4f}",
            "400 steps (s)": f"{400 * per_step:.1f}",
            "warm-up s": f"{stamps[args.warmup] - t0 - args.warmup * per_step:.1f}" if len(stamps) > args.warmup else "-",
            "total s": f"{total:.1f}",
            "peak GiB": peak_gib(args.device),
        })
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device}), "
          f"{args.images} views, batch 1")
    print_table(rows, ["attack", "steps", "s/step", "400 steps (s)", "warm-up s", "total s", "peak GiB"])


if __name__ == "__main__":
    main()
