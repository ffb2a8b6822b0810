"""Reports of a grid run: summary.csv (mean and spread over seeds per configuration), plots (PNG) and report.html.

Efficacy of a cell = its post_attack_loss minus that of the clean reference cell (no protection, no purification,
same image set, attack, attack backbone and seed): how much worse the attacker learned the subject. Positive is
protection. Every efficacy number is reported with its standard deviation over seeds.
"""

from __future__ import annotations

import csv
import html
import json
import statistics
from collections import defaultdict
from pathlib import Path

from .config import Config


def _group_key(r: dict) -> tuple:
    def label(n):
        return n["name"] if not n["params"] else n["name"] + "(" + ",".join(f"{k}={v}" for k, v in sorted(n["params"].items())) + ")"

    return (r["image_set"], label(r["method"]), label(r["purification"]), label(r["attack"]), r["protect_backbone"],
            r["attack_backbone"])


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
        names = sorted({m for r in ok for m in r.get("metrics", {})})
        for name in names:
            values = [r["metrics"][name] for r in ok if isinstance(r["metrics"].get(name), (int, float))]
            if values:
                row[f"{name}_mean"] = statistics.fmean(values)
                row[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
            else:
                reasons = {r["metrics"][name] for r in ok if name in r["metrics"]}
                row[f"{name}_mean"] = next(iter(reasons)) if reasons else ""
                row[f"{name}_std"] = ""
        if key[1] != "none":
            eff = []
            for r in ok:
                ref = clean.get((r["image_set"], json.dumps(r["attack"], sort_keys=True), r["attack_backbone"], r["seed"]))
                if ref is not None:
                    eff.append(r["metrics"]["post_attack_loss"] - ref["metrics"]["post_attack_loss"])
            if eff:
                row["efficacy_mean"] = statistics.fmean(eff)
                row["efficacy_std"] = statistics.stdev(eff) if len(eff) > 1 else 0.0
        rows.append(row)
    return rows


def write_report(cfg: Config, records: list[dict], out: Path) -> Path:
    rows = summarize(records)
    columns = sorted({c for r in rows for c in r}, key=lambda c: (not c.startswith(("image_set", "method", "purif", "attack", "protect", "seeds", "failed")),
                                                                 not c.startswith("efficacy"), c))
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    plots = write_plots(rows, out)
    path = out / "report.html"
    path.write_text(render_html(cfg, rows, records, plots, out))
    return path


def write_plots(rows: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    pts = [r for r in rows if r["method"] != "none" and r["purification"] == "none" and "efficacy_mean" in r
           and isinstance(r.get("psnr_mean"), float)]
    if pts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in pts:
            ax.errorbar(r["psnr_mean"], r["efficacy_mean"], xerr=r.get("psnr_std") or 0, yerr=r["efficacy_std"], fmt="o",
                        capsize=3, label=f"{r['method']} / {r['attack']}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel("PSNR of the protected photos (dB, higher = less visible)")
        ax.set_ylabel("efficacy: post-attack loss vs clean (higher = better)")
        ax.set_title("Invisibility vs protection (mean ± std over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "plot_psnr_vs_efficacy.png", dpi=120)
        plt.close(fig)
        made.append("plot_psnr_vs_efficacy.png")
    bars = [r for r in rows if r["method"] != "none" and "efficacy_mean" in r]
    if bars:
        methods = sorted({r["method"] for r in bars})
        purifs = sorted({r["purification"] for r in bars}, key=lambda p: (p != "none", p))
        fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(methods) * len(purifs) / 2), 4))
        width = 0.8 / len(purifs)
        for j, p in enumerate(purifs):
            xs, ys, es = [], [], []
            for i, m in enumerate(methods):
                match = [r for r in bars if r["method"] == m and r["purification"] == p]
                if match:
                    xs.append(i + j * width)
                    ys.append(statistics.fmean(r["efficacy_mean"] for r in match))
                    es.append(max(r["efficacy_std"] for r in match))
            ax.bar(xs, ys, width=width, yerr=es, capsize=3, label=f"purification: {p}")
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(methods))], methods, rotation=20, fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_ylabel("efficacy (post-attack loss vs clean)")
        ax.set_title("Efficacy before and after each purification (± std over seeds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "plot_purification.png", dpi=120)
        plt.close(fig)
        made.append("plot_purification.png")
    return made


def _amplified(out: Path, clean_rel: str, protected_rel: str, name: str) -> str:
    """|protected - clean| x 10 around mid-grey, as a PNG next to the report."""
    import numpy as np
    from PIL import Image

    c = np.asarray(Image.open(out / clean_rel), dtype=np.float32)
    p = np.asarray(Image.open(out / protected_rel), dtype=np.float32)
    d = np.clip(127.5 + 10 * (p - c), 0, 255).astype(np.uint8)
    rel = str(Path(protected_rel).parent / f"diff_{name}.png")
    Image.fromarray(d).save(out / rel)
    return rel


def render_html(cfg: Config, rows: list[dict], records: list[dict], plots: list[str], out: Path) -> str:
    esc = html.escape
    cols = list(dict.fromkeys(c for row in rows for c in row if not c.endswith("_std")))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(cfg.name)}</title>",
             "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}img{image-rendering:pixelated;width:96px;margin:1px}"
             ".err{color:#a00}</style></head><body>",
             f"<h1>{esc(cfg.name)}</h1><p>Efficacy = post-attack loss on clean held-out views after attacking the "
             "protected photos, minus after attacking the clean photos (same attack, seed and backbone); positive is "
             "protection. Values are mean ± std over seeds. A metric without its pretrained weights says "
             "<i>unavailable</i> and why.</p>"]
    for p in plots:
        parts.append(f"<img src='{esc(p)}' style='width:480px'>")
    parts.append("<h2>Summary</h2><table><tr>" + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>")
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, "")
            std = r.get(c.replace("_mean", "_std"))
            text = f"{v:.4f}" + (f" ± {std:.4f}" if isinstance(std, float) else "") if isinstance(v, float) else str(v)
            cells.append(f"<td>{esc(text)}</td>")
        parts.append("<tr>" + "".join(cells) + "</tr>")
    parts.append("</table>")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        parts.append("<h2>Failed cells</h2><ul>")
        parts += [f"<li class='err'>{esc(r['label'])}: {esc(r.get('error', ''))}</li>" for r in failed]
        parts.append("</ul>")
    parts.append("<h2>Images</h2><p>Per cell (first seed): clean · protected (after purification) · difference ×10 · "
                 "generations after the attack.</p>")
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
        for i, (c, p) in enumerate(zip(imgs["clean"], imgs["protected"])):
            diff = _amplified(out, c, p, str(i)) if r["method"]["name"] != "none" else None
            parts.append(f"<img src='{esc(c)}' title='clean'><img src='{esc(p)}' title='protected'>"
                         + (f"<img src='{esc(diff)}' title='difference x10'>" if diff else "") + "&nbsp;&nbsp;")
        parts.append("</div><div>" + "".join(f"<img src='{esc(g)}' title='generation'>" for g in imgs["generations"]) + "</div>")
    parts.append("</body></html>")
    return "\n".join(parts)
