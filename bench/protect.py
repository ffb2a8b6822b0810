"""Benchmark the protection methods: seconds per image, UNet/VAE calls, peak memory, overhead ratio.

    python bench/protect.py                                   # tiny on this machine's device
    python bench/protect.py --random-weights sd15 --dtype bf16 --compile   # full-size SD architecture on a GPU

outside % = the share of wall time spent outside the UNet, VAE and text-encoder calls, forward and backward (each
call timed at its boundaries: Backbone.start_timing); calls/step = UNet and VAE calls per optimisation step.
overhead = wall time / (UNet calls x one measured UNet forward+backward at the batch size). Compile / capture time is
the first (warm-up) run minus a timed run.
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
    ap.add_argument("--methods", default=",".join(n for n in methods if n not in ("ldu_amortised", "noise")),
                    help="comma-separated registry names (default: the optimising methods; the generator has "
                         "bench/amortised.py)")
    ap.add_argument("--images", type=int, default=1, help="batch size (images of one subject)")
    ap.add_argument("--iterations", type=int, default=None,
                    help="override each method's effort: the field the app's slider sets (iterations; ASPL's rounds)")
    ap.add_argument("--draws", type=int, default=None, help="override m (default: the method's default)")
    ap.add_argument("--no-checkpoint", action="store_true", help="keep UNet activations (more memory, less time)")
    ap.add_argument("--batch-photos", action="store_true", help="protect the photos in one computation (protect(batch_photos=True))")
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
        overrides = {k: v for k, v in ((m.effort_field, args.iterations), ("draws", args.draws)) if v is not None}
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
        result = protect(x, bb, method=name, params=params, batch_photos=args.batch_photos)
        sync(args.device)
        wall = time.perf_counter() - t0
        bb.start_timing()  # a third run, timed at every network boundary (it synchronises: not for the wall time)
        t0 = time.perf_counter()
        protect(x, bb, method=name, params=params, batch_photos=args.batch_photos)
        sync(args.device)
        timed_wall, inside = time.perf_counter() - t0, bb.stop_timing()
        s = result.stats["batch"]
        steps = max(1, m.steps(params)) * (1 if args.batch_photos or not m.per_image else args.images)
        rows.append({
            "method": name,
            "steps": m.steps(params),
            "s/image": f"{wall / args.images:.2f}",
            "unet calls": s["unet_calls"],
            "vae enc/dec": f"{s['vae_encode_calls']}/{s['vae_decode_calls']}",
            "calls/step": f"{s['unet_calls'] / steps:.1f}+{(s['vae_encode_calls'] + s['vae_decode_calls']) / steps:.1f}",
            "outside %": f"{100 * max(0.0, 1 - sum(inside.values()) / timed_wall):.0f}",
            "overhead": f"{wall / max(1, s['unet_calls']) / t_unet:.2f}",
            "peak GiB": peak_gib(args.device),
            "compile s": f"{max(0.0, first - wall):.1f}" if args.compile else "-",
        })
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device}), {args.images} photo(s)"
          f"{' together' if args.batch_photos else ''}; one UNet fwd+bwd at batch {args.images}: {t_unet * 1000:.1f} ms")
    print_table(rows, ["method", "steps", "s/image", "unet calls", "vae enc/dec", "calls/step", "outside %", "overhead",
                       "peak GiB", "compile s"])


if __name__ == "__main__":
    main()
