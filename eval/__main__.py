"""python -m eval run CONFIG --out DIR   |   python -m eval metrics"""

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval", description="Grid evaluation of protections against attacks.")
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) a grid; writes results.jsonl, summary.csv, plots and report.html")
    r.add_argument("config", type=Path, help="YAML or JSON grid config (see eval/config.py and configs/)")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--quiet", action="store_true")
    sub.add_parser("metrics", help="list metrics and whether their weights are available here")
    args = ap.parse_args(argv)
    if args.command == "metrics":
        import torch

        from .metrics import MetricUnavailable, NothingToMeasure, metrics

        probe = [torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(i)) for i in range(2)]
        for m in metrics.values():
            try:
                m.fn(probe, probe, *(("a photo",) if m.kind == "efficacy" else ()))
                status = "available"
            except NothingToMeasure:  # it loaded and ran; the random probe has no face in it
                status = "available"
            except MetricUnavailable as err:
                status = f"unavailable: {err}"
            print(f"{m.name:<16} {m.kind:<17} {m.summary}\n{'':<16} {status}")
        return 0
    from .config import ConfigError, load

    try:
        cfg = load(args.config)
    except ConfigError as err:
        for line in err.problems:
            print(f"error: {args.config}: {line}", file=sys.stderr)
        return 2
    from .grid import run

    report = run(cfg, args.out, progress=not args.quiet)
    if report:
        print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
