"""Reports of a grid run: summary.csv / summary.json (mean and spread over seeds per configuration), plots (PNG) and a
report.html that works on its own (its images are embedded).

The efficacy of a cell is the share of learning its protection prevented (eval.experiment.compare): its attack's
measures against those of the clean reference cell of the same image set, attack, attack backbone and seed (which
also holds the un-attacked base model's measures). Every share is reported with its standard deviation over seeds
and the mean paired draw noise; the raw measures stay in results.jsonl.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from ldu.version import distinct_machines

from . import experiment
from .config import Config

SHARES = ("prevented_loss", "prevented_generation", "prevented_loss_noise", "prevented_generation_noise", "loss_difference")


def _label(n: dict) -> str:
    return n["name"] if not n["params"] else n["name"] + "(" + ",".join(f"{k}={v}" for k, v in sorted(n["params"].items())) + ")"


def _group_key(r: dict) -> tuple:
    return (r["image_set"], _label(r["method"]), _label(r["purification"]), _label(r["attack"]), r["protect_backbone"],
            r["attack_backbone"])


def cell_result(r: dict, ref: dict | None) -> dict:
    """compare() of a protected cell against its clean reference cell, or why it cannot be had."""
    if ref is None:
        return {k: "unavailable: the clean reference cell failed" for k in ("prevented_loss", "prevented_generation")}
    if "base" not in ref or "post_attack_loss" not in r.get("side", {}):
        return {k: experiment.NO_HELD_OUT for k in ("prevented_loss", "prevented_generation")}
    return experiment.compare(ref["base"], ref["side"], r["side"])


def summarize(records: list[dict]) -> list[dict]:
    clean = {(r["image_set"], json.dumps(r["attack"], sort_keys=True), r["attack_backbone"], r["seed"]): r
             for r in records if r["method"]["name"] == "none" and r.get("status") == "ok"}
    groups = defaultdict(list)
    for r in records:
        groups[_group_key(r)].append(r)
    rows = []
    for key, rs in groups.items():
        ok = [r for r in rs if r.get("status") == "ok"]
        row = {"image_set": key[0], "method": key[1], "purification": key[2], "attack": key[3], "protect_backbone": key[4],
               "attack_backbone": key[5], "seeds": len(ok), "failed": len(rs) - len(ok)}
        if key[1] != "none":
            results = [cell_result(r, clean.get((r["image_set"], json.dumps(r["attack"], sort_keys=True), r["attack_backbone"],
                                                 r["seed"]))) for r in ok]
            for k in SHARES:
                values = [x[k] for x in results if isinstance(x.get(k), float)]
                if values:  # the mean over the seeds that could be measured: n says how many, the std needs two
                    row[f"{k}_mean"] = statistics.fmean(values)
                    row[f"{k}_std"] = statistics.stdev(values) if len(values) > 1 else None
                    row[f"{k}_n"] = len(values)
                elif any(k in x for x in results):
                    row[f"{k}_mean"] = next(x[k] for x in results if k in x)
                    row[f"{k}_n"] = 0
            matched = [r.get("protect_stats", {}).get("matched") for r in ok]
            if any(matched):
                row["matched_budget"] = next(m for m in matched if m)
        names = sorted({m for r in ok for m in r.get("metrics", {})})
        for name in names:
            values = [r["metrics"][name] for r in ok if isinstance(r["metrics"].get(name), (int, float))]
            if values:
                row[f"{name}_mean"] = statistics.fmean(values)
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            else:
                reasons = {r["metrics"][name] for r in ok if name in r["metrics"]}
                row[f"{name}_mean"] = next(iter(reasons)) if reasons else ""
        rows.append(row)
    return rows


def write_report(cfg: Config, records: list[dict], out: Path) -> Path:
    rows = summarize(records)
    first = ("image_set", "method", "purification", "attack", "protect_backbone", "attack_backbone", "seeds", "failed")
    columns = list(first) + sorted({c for r in rows for c in r} - set(first), key=lambda c: (not c.startswith("prevented"), c))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in r.items()})
    (out / "summary.json").write_text(json.dumps(rows, indent=2, default=str) + "\n")
    plots = write_plots(rows, out)
    path = out / "report.html"
    path.write_text(render_html(cfg, rows, records, plots, out))
    return path


def write_plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib  # deferred: plotting is the only user, and it is slow to import

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # deferred, as matplotlib

    made = []
    pts = [r for r in rows if r["method"] != "none" and r["purification"] == "none"
           and isinstance(r.get("prevented_loss_mean"), float) and isinstance(r.get("psnr_mean"), float)]
    if pts:
        fig = Figure(figsize=(8, 4.2))
        ax = fig.subplots()
        for r in pts:
            ax.errorbar(r["psnr_mean"], r["prevented_loss_mean"], xerr=r.get("psnr_std") or 0, yerr=r["prevented_loss_std"] or 0,
                        fmt="o", capsize=3, label=f"{r['method']} / {r['attack']}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("PSNR of the protected photos (dB; higher = less visible)")
        ax.set_ylabel("share of learning prevented\n(loss on held-out views)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.tight_layout()
        fig.savefig(out / "plot_psnr_vs_efficacy.png", dpi=120)
        made.append("plot_psnr_vs_efficacy.png")
    bars = [r for r in rows if r["method"] != "none" and isinstance(r.get("prevented_loss_mean"), float)]
    if bars:
        methods = sorted({r["method"] for r in bars})
        purifs = sorted({r["purification"] for r in bars}, key=lambda p: (p != "none", p))
        fig = Figure(figsize=(max(7, 1.2 * len(methods) * len(purifs)), 4.2))
        ax = fig.subplots()
        width = 0.8 / len(purifs)
        for j, p in enumerate(purifs):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                match = [r for r in bars if r["method"] == m and r["purification"] == p]
                if match:
                    xs.append(i + j * width)
                    ys.append(statistics.fmean(r["prevented_loss_mean"] for r in match))
                    es.append(max(r["prevented_loss_std"] or 0 for r in match))
            ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=f"purified: {p}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=20, fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("share of learning prevented\n(± std over seeds)")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        fig.tight_layout()
        fig.savefig(out / "plot_purification.png", dpi=120)
        made.append("plot_purification.png")
    return made


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def _amplified_uri(out: Path, clean_rel: str, protected_rel: str) -> str:
    """|protected - clean| x 10 around mid-grey, embedded."""
    c = np.asarray(Image.open(out / clean_rel), dtype=np.float32)
    p = np.asarray(Image.open(out / protected_rel), dtype=np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(127.5 + 10 * (p - c), 0, 255).astype(np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _cell(v, std=None) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" + (f" ± {std:.2g}" if isinstance(std, float) else "")
    return "unavailable" if isinstance(v, str) and v.startswith("unavailable") else str(v)


def render_html(cfg: Config, rows: list[dict], records: list[dict], plots: list[str], out: Path) -> str:
    esc = html.escape
    cols = [c for c in dict.fromkeys(c for row in rows for c in row)
            if not c.endswith(("_std", "_n")) and c != "matched_budget"]
    reasons = {f"{c}: {row[c]}" for row in rows for c in cols if isinstance(row.get(c), str) and row[c].startswith("unavailable")}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(cfg.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img.v{image-rendering:pixelated;width:96px;margin:1px}"
             ".err{color:#a00}</style></head><body>",
             f"<h1>{esc(cfg.name)}</h1><p><b>Learning prevented</b> = (attack on protected − attack on clean) / (no attack − "
             "attack on clean), measured on held-out views the attack never saw: 0 means the protection changed nothing, "
             "1 that the attacker learned nothing. Values are mean ± std over seeds; <i>noise</i> is the mean paired draw "
             "noise of one seed. A metric without its pretrained weights says <i>unavailable</i> (reasons below).</p>"]
    for p in plots:
        parts.append(f"<img src='{_data_uri(out / p)}' style='max-width:720px'>")
    parts.append("<h2>Summary</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        parts.append("<tr>" + "".join(f"<td>{esc(_cell(r.get(c, ''), r.get(c.replace('_mean', '_std'))))}</td>" for c in cols) + "</tr>")
    parts.append("</table>")
    if reasons:
        parts.append("<details><summary>Unavailable values and why</summary><ul>"
                     + "".join(f"<li>{esc(x)}</li>" for x in sorted(reasons)) + "</ul></details>")
    machines = distinct_machines(r.get("machine") for r in records)
    if len(machines) > 1:  # a grid resumed elsewhere, or ranks on several nodes: a share pairs cells run apart
        parts.append(f"<p class='err'><b>These cells ran on {len(machines)} machines</b> ("
                     + esc("; ".join(str(m.get("cpu")) for m in machines)) + "). A long attack repeats to the "
                     "digit on one machine only, so a protected cell and its clean reference may differ by more than "
                     "the protection: rerun the grid on one machine to pair them.</p>")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        parts.append("<h2>Failed cells</h2><ul>")
        parts += [f"<li class='err'>{esc(r['label'])}: {esc(r.get('error', ''))}</li>" for r in failed]
        parts.append("</ul>")
    parts.append("<h2>Images</h2><p>Per configuration (first seed): clean · protected (after purification) · difference "
                 "×10 · generations after the attack.</p>")
    seen = set()
    for r in records:
        if r.get("status") != "ok" or r["seed"] != min(cfg.seeds):
            continue
        k = r["label"].rsplit("|", 1)[0]
        if k in seen:
            continue
        seen.add(k)
        imgs = r["images"]
        parts.append(f"<h3>{esc(k)}</h3><div>")
        for c, p in zip(imgs["clean"], imgs["protected"]):
            diff = _amplified_uri(out, c, p) if r["method"]["name"] != "none" else None
            parts.append(f"<img class='v' src='{_data_uri(out / c)}' title='clean'><img class='v' src='{_data_uri(out / p)}' "
                         "title='protected'>" + (f"<img class='v' src='{diff}' title='difference x10'>" if diff else "") + "&nbsp;&nbsp;")
        parts.append("</div><div>" + "".join(f"<img class='v' src='{_data_uri(out / g)}' title='generation'>"
                                              for g in imgs["generations"]) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
