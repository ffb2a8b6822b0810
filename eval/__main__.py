"""python -m eval run CONFIG --out DIR   |   python -m eval metrics"""

import argparse
import json
import sys
from pathlib import Path

import torch

from ldu.backbone import BackboneError, _locate, resolve_spec
from ldu.cli import _unwritable

from .config import ConfigError, load
from .grid import run
from .metrics import MetricUnavailable, NothingToMeasure, metrics


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
    try:
        cfg = load(args.config)
    except ConfigError as err:
        for line in err.problems:
            print(f"error: {args.config}: {line}", file=sys.stderr)
        return 2
    problems = []
    for spec in dict.fromkeys(cfg.protect_backbones + cfg.attack_backbones):  # every model, before any work
        try:
            _locate(resolve_spec(spec)[0], None)
        except BackboneError as err:
            problems.append(f"backbone {spec}: {err}")
    if not problems and (why := _unwritable(args.out)) is not None:
        problems.append(f"--out {args.out}: {why}")
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr)
        return 2
    report = run(cfg, args.out, progress=not args.quiet)
    if report is None:  # a rank other than 0: its shard is written, rank 0 reports
        return 0
    records = [json.loads(line) for line in (args.out / "results.jsonl").read_text().splitlines() if line.strip()]
    failed = [r for r in records if r.get("status") != "ok"]
    print(f"wrote {report}: {len(records) - len(failed)} cell(s) ok, {len(failed)} failed")
    for r in failed[:10]:
        print(f"error: {r['label']}: {r.get('error', '')}", file=sys.stderr)
    # 0: every cell passed; 3: some failed (their errors are in the report); 1: every cell failed
    return 0 if not failed else 1 if len(failed) == len(records) else 3


if __name__ == "__main__":
    sys.exit(main())
