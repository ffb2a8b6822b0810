"""The app's whole loop, timed, through the module the app calls (eval.playground, no gradio): protect 4 photos of a
built-in subject, attack the clean and the protected photos with the same seed (the app's default attack for the
backbone, as the Attack tab starts with), 8 generations each (and the base model's), and the verdict.

    python bench/loop.py --model pocket                       # this machine
    python bench/loop.py --model /tmp/sd15-random --steps 400  # SD 1.5 architecture on a GPU (bench/gpu.sh)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from common import print_table, sync  # noqa: E402  (common.py puts the repo on the path)

from attacks import default_attack  # noqa: E402
from eval import playground as pg  # noqa: E402
from ldu import load_backbone  # noqa: E402
from ldu.subjects import subject_views  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pocket")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=("fp32", "bf16", "fp16"))
    ap.add_argument("--method", default="ldu")
    ap.add_argument("--iterations", type=int, default=None, help="the method's effort (default: its default)")
    ap.add_argument("--attack", default=None, help="default: the app's, attacks.default_attack(backbone kind)")
    ap.add_argument("--steps", type=int, default=None, help="attack steps (default: the attack's default)")
    ap.add_argument("--n-gen", type=int, default=8)
    ap.add_argument("--subject", default="robot")
    args = ap.parse_args()
    bb = load_backbone(args.model, device=args.device, dtype=args.dtype)
    folder = Path(tempfile.mkdtemp(prefix="ldu-loop-"))
    paths = {}
    for split, n in (("train", 4), ("held_out", 8)):
        views, _ = subject_views(args.subject, split, n, seed=0, size=bb.resolution)
        paths[split] = []
        for i, v in enumerate(views):
            paths[split].append(str(folder / f"{split}-{i}.png"))
            Image.fromarray(v).save(paths[split][-1])
    rows = []
    params = pg.method_params(args.method, bb.kind, effort=args.iterations, noun="robot")
    sync(args.device)
    t0 = time.perf_counter()
    result = pg.run_job(pg.protect_photos, paths["train"], bb, args.method, params, folder / "protected")
    sync(args.device)
    rows.append({"stage": f"protect 4 photos ({args.method})", "seconds": f"{time.perf_counter() - t0:.1f}", "status": result.status})
    print(f"{rows[-1]['stage']}: {rows[-1]['seconds']} s, {rows[-1]['status']}", flush=True)  # kept if a limit stops the run
    name = args.attack or default_attack(bb.kind)
    steps = args.steps or pg.get_attack(name).make_params(bb.kind).steps
    setup = pg.attack_setup(bb, paths["train"], paths["held_out"], "robot", name, steps, 0, args.n_gen)
    t0 = time.perf_counter()
    attack = pg.run_job(pg.attack_both, bb, setup, result.outputs["protected"])
    sync(args.device)
    rows.append({"stage": f"attack both ({name}, {steps} steps) + {3 * args.n_gen} generations + measures",
                 "seconds": f"{time.perf_counter() - t0:.1f}", "status": attack.status})
    total = sum(float(r["seconds"]) for r in rows)
    rows.append({"stage": "the whole loop", "seconds": f"{total:.1f}", "status": attack.message.splitlines()[0][:70]})
    print(f"backbone {bb.spec} ({bb.resolution}px, {str(bb.dtype).replace('torch.', '')}, {args.device})")
    print_table(rows, ["stage", "seconds", "status"])
    print("verdict:", attack.message.splitlines()[0])  # whole: the table cuts it at 70 characters


if __name__ == "__main__":
    main()
