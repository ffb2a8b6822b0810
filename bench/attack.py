"""Benchmark the personalization attacks: seconds per training step and peak memory.

    python bench/attack.py                                          # tiny on this machine's device
    python bench/attack.py --random-weights sd15 --dtype bf16       # SD 1.5 architecture, random weights, GPU
    python bench/attack.py --model pocket --attacks dreambooth --set gradient_checkpointing=true   # one option's cost

Seconds per step are measured between progress callbacks after `--warmup` steps (compilation and allocator
warm-up are reported separately as the warm-up time); "400 steps" extrapolates the steady rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from common import add_backbone_args, backbone_from_args, peak_gib, print_table, reset_peak, sync

from attacks import attacks, get_attack, train  # noqa: E402  (common.py puts the repo on the path)
from ldu.cli import parse_sets  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_args(ap)
    ap.add_argument("--attacks", default=",".join(attacks))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--images", type=int, default=4, help="training views")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="an attack parameter, for every attack listed (repeatable)")
    args = ap.parse_args()
    bb = backbone_from_args(args)
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
        attack = get_attack(name)
        params = attack.make_params(bb.kind, **{**parse_sets(args.set, attack.params), "steps": args.steps})
        train(bb, views, name, params, out=tempfile.mkdtemp(prefix="bench-"), callback=callback)
        total = time.perf_counter() - t0
        steady = stamps[args.warmup:]
        per_step = (steady[-1] - steady[0]) / max(1, len(steady) - 1)
        rows.append({
            "attack": name,
            "steps": args.steps,
            "batch": params.batch_size,
            "s/step": f"{per_step:.4f}",
            "400 steps (s)": f"{400 * per_step:.1f}",
            "warm-up s": f"{stamps[args.warmup] - t0 - args.warmup * per_step:.1f}" if len(stamps) > args.warmup else "-",
            "total s": f"{total:.1f}",
            "peak GiB": peak_gib(args.device),
        })
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device}), "
          f"{args.images} views" + (f", {' '.join(args.set)}" if args.set else ""))
    print_table(rows, ["attack", "steps", "batch", "s/step", "400 steps (s)", "warm-up s", "total s", "peak GiB"])


if __name__ == "__main__":
    main()
