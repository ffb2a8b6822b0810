"""Command line: `python -m ldu protect IN... --out DIR` and `python -m ldu methods`.

Every problem with the input is found before any work starts and printed as one line naming the file and
the problem (exit status 2). Outputs are written batch by batch, atomically, so an interruption keeps what
was already written.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .backbone import BackboneError, kind_of, load_backbone, resolve_spec
from .io import DEFAULT_MAX_PIXELS, ImageLoadError, expand_inputs, load_image, load_images
from .methods import Cancelled, get_method, methods
from .protect import MAX_JOB_PIXELS, output_names, protect, squeezed_note
from .registry import parse_number, parse_overrides

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130
UNSET = argparse.SUPPRESS  # a flag not given leaves no attribute, so "--linf none" and "not given" differ
SHORTCUTS = ("budget_rms", "linf", "iterations", "mode", "prompt", "seed")


def number(text: str) -> float:
    """A float, or a fraction like 8/255 (budgets are in [0,1] pixel units)."""
    try:
        return parse_number(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def optional_number(text: str) -> float | None:
    return None if text.strip().lower() in ("none", "off") else number(text)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m ldu", description="LDU Playground: protect photos against diffusion personalization.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("protect", help="protect images; writes lossless PNGs and JSON manifests")
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if needed)")
    p.add_argument("--model", default=None, help="hub id, local diffusers folder, sd15, sd21-base, pocket or tiny (default: SD 1.5 on a GPU, else the built-in)")
    p.add_argument("--method", default="ldu", help="protection method (see `python -m ldu methods`)")
    p.add_argument("--budget-rms", type=optional_number, default=UNSET, help="per-image RMS budget in [0,1] pixels, e.g. 8/255 ('none' to drop it)")
    p.add_argument("--linf", type=optional_number, default=UNSET, help="Linf budget in [0,1] pixels, e.g. 16/255 ('none' to drop it)")
    p.add_argument("--iterations", type=int, default=UNSET, help="optimisation steps")
    p.add_argument("--mode", choices=("residual", "decode"), default=UNSET, help="LDU output form")
    p.add_argument("--prompt", default=UNSET, help="attack prompt the protection is aimed at")
    p.add_argument("--seed", type=int, default=UNSET, help="seed (the same seed reproduces the output on CPU)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="any other method parameter, e.g. --set strength=0.4")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None, help="model dtype (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch-size", type=int, default=8, help="photos per protect() call (1-8; one subject per batch)")
    p.add_argument("--batch-photos", action="store_true",
                   help="optimise the photos of a batch in one computation (faster on a GPU; the bytes then depend on "
                        "the companions: float sums change with the batch)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs of the same name")
    p.add_argument("--manifest-dir", type=Path, default=None, help="write the JSON manifests here instead of beside the PNGs")
    p.add_argument("--max-pixels", type=int, default=None, help="refuse larger images (default and most: 50 MP, what one job may hold)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    m = sub.add_parser("methods", help="list protection methods, their parameters and defaults")
    m.add_argument("--kind", default="sd", help="defaults for this backbone kind: sd, pocket or tiny")
    m.add_argument("--json", action="store_true")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"protect": cmd_protect, "methods": cmd_methods}[args.command](args)
    except KeyboardInterrupt:
        print("interrupted: outputs already written are kept", file=sys.stderr)
        return EXIT_INTERRUPTED


def cmd_methods(args) -> int:
    print_entries(methods.values(), args.kind, args.json)
    return 0


def print_entries(entries, kind: str, as_json: bool = False) -> None:
    """List registry entries with their parameters and defaults for a backbone kind (text or JSON)."""
    described = [e.describe(kind) for e in entries]
    if as_json:
        print(json.dumps(described, indent=2, default=str))
        return
    for d in described:
        print(f"{d['name']}: {d['summary']}")
        if "budget_field" in d:
            print(f"  binding budget: {d['budget_field']}" + ("" if d["per_image"] else " (learns from the whole set)"))
        print(f"  parameters (defaults for {kind}):")
        for p in d["params"]:
            print(f"    {p['name']:<22} = {fmt_value(p['default']):<24} {p['help']}")
        print()


def fmt_value(v) -> str:
    if isinstance(v, float):
        frac = Fraction(v).limit_denominator(255)
        return f"{v:.6g}" + (f" ({frac})" if frac.denominator == 255 and abs(float(frac) - v) < 1e-12 else "")
    return repr(v) if isinstance(v, str) else str(v)


def _overrides(args, params_cls) -> dict:
    """Method parameters from the shortcut flags and --set NAME=VALUE."""
    return {**{name: getattr(args, name) for name in SHORTCUTS if hasattr(args, name)}, **parse_sets(args.set, params_cls)}


def parse_sets(items: list[str], params_cls) -> dict:
    """--set NAME=VALUE items -> overrides (ldu.registry.parse_overrides, with the flag's name in messages)."""
    return parse_overrides(items, params_cls, flag="--set ")


def cmd_protect(args) -> int:
    # 1. Everything that can be checked without a model, before any work.
    try:
        method = get_method(args.method)
        overrides = _overrides(args, method.params)
        expected = method.make_params(kind_of(args.model), **overrides)
        if not 1 <= args.batch_size <= 8:
            raise ValueError(f"--batch-size must be 1 to 8, got {args.batch_size}")
    except ValueError as err:
        return fail(str(err))
    try:  # every file is decoded once to find every problem first; pixels are loaded again batch by batch
        images = _headers(list(args.inputs), min(args.max_pixels or DEFAULT_MAX_PIXELS, MAX_JOB_PIXELS))
    except ImageLoadError as err:
        return fail(*[f"{name}: {problem}" for name, problem in err.problems])
    names = output_names(images)
    for folder in (args.out, args.manifest_dir):
        if folder is not None and folder.exists() and not folder.is_dir():
            return fail(f"{folder}: is a file, not a folder: choose another output folder")
    targets = [args.out / f"{n}.png" for n in names]
    manifests = [(args.manifest_dir or args.out) / f"{n}.json" for n in names]
    inputs = {im.path.resolve() for im in images if im.path}
    clash = [t for t in targets + manifests if t.resolve() in inputs]
    if clash:
        return fail(*[f"{t}: would overwrite an input image: choose another --out folder" for t in clash])
    # An output whose manifest records this very input and these settings is a finished part of this job (an
    # earlier run was interrupted): it is kept and skipped. Anything else in the way needs --overwrite.
    job = {"method": args.method, "params": expected, "spec": resolve_spec(args.model)[0], "together": args.batch_photos}
    todo = [i for i in range(len(images)) if args.overwrite or not _done(targets[i], manifests[i], images[i], job)]
    existing = [t for i in todo for t in (targets[i], manifests[i]) if t.exists()]
    if existing and not args.overwrite:
        return fail(*[f"{t}: already exists (use --overwrite to replace it)" for t in existing])
    for folder in (args.out, args.manifest_dir):
        if folder is not None and (problem := _unwritable(folder)):
            return fail(f"{folder}: {problem}: choose another output folder")
    for im in images:
        for note in im.notes:
            print(f"note: {im.name}: {note}", file=sys.stderr)
    if len(todo) < len(images):
        print(f"note: {len(images) - len(todo)} output(s) already hold this job's result: kept", file=sys.stderr)

    # 2. The model.
    try:
        device = check_device(args.device)
        backbone = load_backbone(args.model, device=device, dtype=args.dtype)
    except (BackboneError, ValueError) as err:
        return fail(str(err))
    if backbone.notice:
        print(f"note: {backbone.notice}", file=sys.stderr)
    params = method.make_params(backbone.kind, **overrides)

    # 3. Batch by batch (at most --batch-size photos and MAX_JOB_PIXELS pixels); each is written as soon as it is done.
    batches = _batches([images[i] for i in todo], todo, args.batch_size, MAX_JOB_PIXELS)
    per_batch = max(1, method.steps(params))
    bar = tqdm(total=per_batch * len(batches), disable=args.quiet, unit="step", desc=f"{args.method} on {backbone.spec}")
    rows = []
    try:
        for batch in batches:
            done_before = bar.n
            loaded = load_images([images[i].path for i in batch])
            result = protect(loaded, backbone, method=args.method, params=params, batch_photos=args.batch_photos,
                             callback=lambda info: _advance(bar, done_before, per_batch, info))
            paths = result.save(args.out, names=[names[i] for i in batch], manifest_dir=args.manifest_dir)
            rows += [(p, s) for p, s in zip(paths, result.stats["images"])]
            del loaded, result
    except Cancelled:
        print("cancelled: outputs already written are kept (a rerun continues where this one stopped)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RuntimeError, OSError, ValueError) as err:  # out of memory, disk full, ...: one line
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return fail(f"{type(err).__name__} while protecting: {first[:300]} (finished outputs are kept, nothing is "
                    "half-written; a rerun continues where this one stopped)")
    finally:
        bar.close()
    print(f"{'output':<40} {'PSNR':>7} {'SSIM':>6} {'RMS/255':>8} {'Linf/255':>8}  attacker loss clean -> protected")
    for path, s in rows:
        print(f"{str(path):<40} {s['psnr']:7.2f} {s['ssim']:6.4f} {s['rms_255']:8.2f} {s['linf_255']:8.2f}  "
              f"{s['attacker_loss_clean']:.5f} -> {s['attacker_loss_protected']:.5f}")
    squeezed = [str(path) for path, s in rows if s.get("squeezed")]
    if squeezed:
        print(f"note: {squeezed_note(squeezed)}", file=sys.stderr)
    return 0


def _headers(inputs, max_pixels: int) -> list:
    """Decode every input once, one at a time, and keep what it was without its pixels (name, path, sha256, size,
    notes): every problem is found before any work, and a folder of large photos never sits in memory at once."""
    files, notes = expand_inputs(inputs)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out, problems = [], []
    for path in files:
        try:
            im = load_image(path, max_pixels)
        except ImageLoadError as err:
            problems += err.problems
            continue
        out.append(dataclasses.replace(im, pixels=torch.zeros((), dtype=torch.uint8).expand(3, *im.pixels.shape[-2:])))
        del im
    if problems:
        raise ImageLoadError(problems)
    return out


def _done(target: Path, manifest: Path, image, job: dict) -> bool:
    """Does the output already hold this input protected by this job (the same source bytes, method, parameters,
    model and batching)?"""
    if not (target.exists() and manifest.exists()):
        return False
    try:
        record = json.loads(manifest.read_text())
        return (record.get("source", {}).get("sha256") == image.sha256 and record.get("method") == job["method"]
                and record.get("params") == json.loads(json.dumps(dataclasses.asdict(job["params"]), default=str))
                and record.get("backbone", {}).get("spec") == job["spec"]
                and (record.get("photos_together") or False) == (job["together"] or not get_method(job["method"]).per_image))
    except (OSError, ValueError, AttributeError):
        return False


def _unwritable(folder: Path) -> str | None:
    """Why the job could not write into `folder` (created if missing), or None: found before any work."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ldu-write-check-"):
            pass
    except OSError as err:
        return f"cannot write there ({err.strerror or err})"
    return None


def _batches(images, indices: list[int], size: int, max_pixels: int) -> list[list[int]]:
    """Consecutive batches of at most `size` photos and `max_pixels` pixels in all (one photo per batch at least)."""
    out, current, pixels = [], [], 0
    for im, i in zip(images, indices):
        n = im.pixels.shape[-1] * im.pixels.shape[-2]
        if current and (len(current) == size or pixels + n > max_pixels):
            out.append(current)
            current, pixels = [], 0
        current.append(i)
        pixels += n
    return out + ([current] if current else [])


def check_device(name: str | None):
    """Check a --device value before any work: a bad name or a missing GPU is one clear line."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r}: not a device (use cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is available on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def _advance(bar, offset: int, per_batch: int, info: dict) -> bool:
    """Progress callback: move the bar to this batch's share of its `per_batch` steps (protect() counts over one
    method call per canvas shape); never cancels (Ctrl-C does)."""
    if info.get("stage") not in ("start", "done"):
        bar.update(offset + round(per_batch * info["step"] / max(1, info["total"])) - bar.n)
        if "attacker_loss" in info:
            bar.set_postfix(attacker_loss=f"{info['attacker_loss']:.4f}")
    return True


def fail(*lines: str) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return EXIT_BAD_INPUT
