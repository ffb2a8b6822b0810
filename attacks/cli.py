"""Command line: play the attacker.

    python -m attacks train --attack lora_dreambooth --images DIR --out DIR [--model tiny] [--steps N]
    python -m attacks generate --adapter DIR --out DIR [--prompt P] [--n 4] [--seed 0]
    python -m attacks purify --method jpeg --set quality=50 IN... --out DIR
    python -m attacks list

Every problem with the input is reported before any training, one line each (exit status 2); a run that
fails or is interrupted leaves no folder that looks like a result.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ldu.backbone import BackboneError, load_backbone
from ldu.cli import EXIT_INTERRUPTED, check_device, fail, kind_of, parse_sets, print_entries
from ldu.io import ImageLoadError, load_images, save_png
from ldu.protect import output_names, to_pil

from . import (Adapter, PurificationUnavailable, attacks, generate, get_attack, get_purification, purifications, purify,
               train)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m attacks", description="Personalization attacks and purifications.")
    sub = ap.add_subparsers(dest="command", required=True)

    def model_args(p):
        p.add_argument("--model", default=None, help="hub id, local diffusers folder, sd15, pocket or tiny")
        p.add_argument("--device", default=None, help="cpu, cuda, cuda:N")
        p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
        p.add_argument("--quiet", action="store_true", help="no progress bar")

    t = sub.add_parser("train", help="fine-tune an attack on images of a subject; writes an adapter folder")
    t.add_argument("--attack", default="lora_dreambooth", help="attack name (see `python -m attacks list`)")
    t.add_argument("--images", nargs="+", required=True, help="image files and/or folders")
    t.add_argument("--out", required=True, type=Path, help="adapter folder to create")
    t.add_argument("--steps", type=int, default=None, help="training steps")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any other attack parameter")
    t.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    model_args(t)

    g = sub.add_parser("generate", help="generate images with an adapter (or the base model), one seed per image")
    g.add_argument("--adapter", type=Path, default=None, help="adapter folder (omit for the base model)")
    g.add_argument("--out", required=True, type=Path)
    g.add_argument("--prompt", action="append", default=None, help="prompt (repeatable; default: the adapter's instance prompt)")
    g.add_argument("--n", type=int, default=4, help="images per prompt")
    g.add_argument("--seed", type=int, default=0, help="first seed; image i of a prompt uses seed + i")
    g.add_argument("--steps", type=int, default=25, help="DDIM steps")
    g.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    model_args(g)

    p = sub.add_parser("purify", help="apply a purification to images; writes lossless PNGs")
    p.add_argument("inputs", nargs="+", help="image files and/or folders")
    p.add_argument("--method", required=True, help="purification name")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--overwrite", action="store_true")
    model_args(p)  # the model is loaded only for diffpure / gridpure

    ls = sub.add_parser("list", help="attacks and purifications with their parameters")
    ls.add_argument("--kind", default="sd")
    ls.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"train": cmd_train, "generate": cmd_generate, "purify": cmd_purify, "list": cmd_list}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def cmd_list(args) -> int:
    print("ATTACKS\n")
    print_entries(attacks.values(), args.kind, args.json)
    print("PURIFICATIONS\n")
    print_entries(purifications.values(), args.kind, args.json)
    return 0


def _backbone(args):
    try:
        bb = load_backbone(args.model, device=check_device(args.device), dtype=args.dtype)
    except (BackboneError, ValueError) as err:
        raise SystemExit(fail(str(err)))
    if bb.notice:
        print(f"note: {bb.notice}", file=sys.stderr)
    return bb


def _bar(args, total: int, desc: str):
    bar = tqdm(total=total, disable=args.quiet, desc=desc, unit="step")

    def callback(info):
        if "step" in info and info.get("stage") in ("train", "generate", "purify"):
            bar.update(info["step"] - bar.n)
            if "loss" in info:
                bar.set_postfix(loss=f"{info['loss']:.4f}")
        return True

    return bar, callback


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: is a file, not a folder: choose another --out")


def cmd_train(args) -> int:
    try:
        attack = get_attack(args.attack)
        overrides = parse_sets(args.set, attack.params)
        overrides.update({k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None})
        attack.make_params(kind_of(args.model), **overrides)  # every parameter problem, before any work
        if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())) and not args.overwrite:
            raise ValueError(f"{args.out}: already exists (use --overwrite to replace it)")
        images = load_images(args.images)
    except ImageLoadError as err:
        return fail(*[f"{name}: {problem}" for name, problem in err.problems])
    except ValueError as err:
        return fail(str(err))
    bb = _backbone(args)
    params = attack.make_params(bb.kind, **overrides)
    bar, callback = _bar(args, params.steps, f"{args.attack} on {bb.spec}")
    try:
        adapter = train(bb, images, args.attack, params, out=args.out, callback=callback, overwrite=args.overwrite)
    except (ValueError, RuntimeError, OSError) as err:
        return fail(f"{args.attack}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    finally:
        bar.close()
    curve = adapter.train_curve
    print(f"{adapter.path}: {adapter.kind} adapter, {len(curve)} steps in {adapter.seconds:.1f} s, "
          f"loss {sum(curve[:10]) / min(10, len(curve)):.4f} (first 10) -> {sum(curve[-10:]) / min(10, len(curve)):.4f} (last 10)")
    return 0


def cmd_generate(args) -> int:
    try:
        adapter = Adapter.load(args.adapter) if args.adapter else None
        if args.n < 1 or args.steps < 1:
            raise ValueError("--n and --steps must be at least 1")
        _check_out(args.out)
    except ValueError as err:
        return fail(str(err))
    if adapter is not None and args.model is None:
        args.model = adapter.base_spec
    bb = _backbone(args)
    prompts = args.prompt or [adapter.prompt if adapter else "a photo of a person"]
    jobs = [(p, args.seed + i) for p in prompts for i in range(args.n)]
    bar, callback = _bar(args, len(jobs), "generate")
    try:
        images = generate(bb, adapter, [p for p, _ in jobs], [s for _, s in jobs], steps=args.steps, guidance=args.guidance,
                          callback=callback)
    except (ValueError, RuntimeError, OSError) as err:
        return fail(f"generate: {err}")
    finally:
        bar.close()
    args.out.mkdir(parents=True, exist_ok=True)
    for (prompt, seed), im in zip(jobs, images):
        to_pil(im).save(args.out / f"{prompts.index(prompt):02d}_seed{seed}.png")
    print(f"wrote {len(images)} images to {args.out}")
    return 0


def cmd_purify(args) -> int:
    try:
        entry = get_purification(args.method)
        overrides = parse_sets(args.set, entry.params)
        entry.make_params(kind_of(args.model), **overrides)
        _check_out(args.out)
        images = load_images(args.inputs)
    except ImageLoadError as err:
        return fail(*[f"{name}: {problem}" for name, problem in err.problems])
    except ValueError as err:
        return fail(str(err))
    names = output_names(images)
    existing = [args.out / f"{n}.png" for n in names if (args.out / f"{n}.png").exists()]
    if existing and not args.overwrite:
        return fail(*[f"{p}: already exists (use --overwrite to replace it)" for p in existing])
    bb = _backbone(args) if entry.needs_backbone else None
    params = entry.make_params(bb.kind if bb else "sd", **overrides)
    bar, callback = _bar(args, len(images), args.method)
    try:
        out = purify([im.pixels for im in images], args.method, params, backbone=bb, callback=callback)
    except PurificationUnavailable as err:
        return fail(f"{args.method} is unavailable here: {err}")
    except (ValueError, RuntimeError, OSError) as err:
        return fail(f"{args.method}: {str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}")
    finally:
        bar.close()
    for name, im, src in zip(names, out, images):
        save_png(im, src, args.out / f"{name}.png", {"purification": args.method, "params": dataclasses.asdict(params),
                                                     "source": src.describe()})
    print(f"wrote {len(out)} purified images to {args.out}")
    return 0
