"""Benchmark the protection methods: seconds per image, UNet/VAE calls, peak memory, overhead ratio.

    python bench/protect.py                                   # tiny on this machine's device
    python bench/protect.py --random-weights sd15 --dtype bf16 --compile   # full-size SD architecture on a GPU

overhead = wall time / (UNet calls x one measured UNet forward+backward at the batch size): 1.0 would mean
the method costs nothing but its UNet calls (the loss call runs m draws in one batch, so it can exceed 1
even with no overhead at all). Compile / capture time is the first (warm-up) run minus a timed run.
"""

from __future__ import annotations

import argparse
import time

import torch

from common import add_backbone_args, backbone_from_args, peak_gib, print_table, reset_peak, sync, time_unet_fwd_bwd

from ldu import methods, protect  # noqa: E402  (common.py puts the repo on the path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_backbone_args(ap)
    ap.add_argument("--methods", default=",".join(methods), help="comma-separated registry names")
    ap.add_argument("--images", type=int, default=1, help="batch size (images of one subject)")
    ap.add_argument("--iterations", type=int, default=None, help="override each method's iterations")
    ap.add_argument("--draws", type=int, default=None, help="override m (default: the method's default)")
    ap.add_argument("--no-checkpoint", action="store_true", help="keep UNet activations (more memory, less time)")
    args = ap.parse_args()
    bb = backbone_from_args(args)
    if args.compile:  # the VAE too: protection differentiates through it every step
        bb.vae.decoder = torch.compile(bb.vae.decoder)
        bb.vae.encoder = torch.compile(bb.vae.encoder)
    x = [torch.rand(3, bb.resolution, bb.resolution, generator=torch.Generator().manual_seed(i)) for i in range(args.images)]
    t_unet = time_unet_fwd_bwd(bb, args.images)
    rows = []
    for name in args.methods.split(","):
        m = methods[name]
        overrides = {k: v for k, v in (("iterations", args.iterations), ("draws", args.draws)) if v is not None}
        if args.no_checkpoint:
            overrides["checkpoint"] = False
        params = m.make_params(bb.kind, **{k: v for k, v in overrides.items() if hasattr(m.params, k)})
        sync(args.device)
        t0 = time.perf_counter()
        protect(x, bb, method=name, params=params)  # warm-up (and compilation, with --compile)
        sync(args.device)
        first = time.perf_counter() - t0
        reset_peak(args.device)
        t0 = time.perf_counter()
        result = protect(x, bb, method=name, params=params)
        sync(args.device)
        wall = time.perf_counter() - t0
        s = result.stats["batch"]
        rows.append({
            "method": name,
            "iters": getattr(params, "iterations", ""),
            "s/image": f"{wall / args.images:.2f}",
            "unet calls": s["unet_calls"],
            "vae enc/dec": f"{s['vae_encode_calls']}/{s['vae_decode_calls']}",
            "s/unet call": f"{wall / max(1, s['unet_calls']):.4f}",
            "overhead": f"{wall / max(1, s['unet_calls']) / t_unet:.2f}",
            "peak GiB": peak_gib(args.device),
            "compile s": f"{max(0.0, first - wall):.1f}" if args.compile else "-",
        })
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device}), batch {args.images}; "
          f"one UNet fwd+bwd at batch {args.images}: {t_unet * 1000:.1f} ms")
    print_table(rows, ["method", "iters", "s/image", "unet calls", "vae enc/dec", "s/unet call", "overhead", "peak GiB", "compile s"])


if __name__ == "__main__":
    main()
