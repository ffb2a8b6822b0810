"""Efficacy experiments over the built-in subjects, seeds and methods: the numbers docs/RESULTS.md reports.

- personalization (`--methods none`): does the attack learn each subject? For every subject and seed: the share of
  the closable gap its instance-prompt generations close toward the held-out views (16 x 16 thumbnails), how many
  of them are nearest to the right subject among all subjects' held-out views, and how much other prompts move.
- protection: for each method, the share of learning prevented (eval.experiment: loss on held-out views and the
  generations' likeness), mean and spread over subjects x seeds, the paired draw noise beside it, the PSNR it cost;
  with `--match-psnr DB` every method's binding budget is set per subject (on seed 0's views) to land at that PSNR. A
  difference between two methods counts only when every paired subject x seed difference has the same sign.
- `--sweep 4,8,12,16`: each method at these budgets (/255, its binding budget field): efficacy against PSNR.
- `--purify posting` (or any purification, `--purify-set k=v`): the attacker runs it on every set it trains on,
  the clean views included, so the share is against the attack on the purified clean views (posting is done to
  every upload, protected or not). Budgets are still matched on the images as uploaded.
- `--view-size 128`: training views larger than the model's size, protected and purified at that size and shrunk by
  the attack as a user's photos are (GrIDPure only differs from DiffPure then); held-out views stay at the model's size.
- `--train-views 8`: each subject's first 8 training views of each seed (default 4, the first 4 the same), as a person
  uploading 8 photos; `--generations 32`: 32 generations a prompt and side (default 8, the first 8 the same), a
  steadier per-pair measure. Runs with other counts are other experiments (no merge, no budgets taken).
- `--budgets-from run.json`: take the matched budgets of an earlier run (same backbone and target; for each method
  label with the same parameters) instead of searching again: the same budgets (and, with the same code, the same
  protected images).
- `--out run.json`: the numbers, and beside them each subject's first-seed pictures: `run/SUBJECT.png` (rows:
  training views, held-out views, base generations, attacked generations) and `run/SUBJECT-METHOD.png` for each
  protection (rows: the protected views, held-out views, the clean attack's and the protected attack's generations).
- `--merge a.json,b.json`: one report from runs made apart (other seeds, other methods; no new work). Their rows are
  paired only if they were paired against the same clean attacks, so the runs must agree on the backbone, attack and
  matching and method settings, and wherever they overlap (a subject x seed's clean attack, a method's matched
  budget, a row) on the numbers too: the same inputs give the same numbers on one CPU machine, so a difference means
  they are not the same experiment, and the merge refuses (on a GPU attacks are not bit-reproducible: merge runs
  that do not overlap).

    python -m eval.efficacy --model pocket --subjects robot,frog,kite --seeds 3 --methods ldu,advdm --match-psnr 32
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from attacks import default_attack, get_attack, get_purification
from ldu import get_method, load_backbone, protect
from ldu.backbone import kind_of
from ldu.protect import MAX_BATCH, to_pil
from ldu.registry import parse_overrides
from ldu.subjects import SUBJECTS, get_subject, subject_views
from ldu.version import code_version, distinct_machines, machine

from . import experiment
from .grid import match_psnr


MATCH_SEED = 0  # --match-psnr finds each method's budget on this seed's views of each subject
TRAIN_VIEWS = 4  # training views per subject (each seed draws its own; at most MAX_BATCH); the held-out views are 8
GENERATIONS = 8  # generations per prompt and side (seeds 10 000 x seed + i: a larger count keeps the first ones)
MIN_PAIRS = 6  # a difference is real only when all of at least this many paired differences share its sign


def spread(values: list) -> dict:
    """Mean and standard deviation of the finite numbers among `values` (a share that could not be measured is a
    text or NaN: it is kept in "values" and left out of the mean, and "n" says how many counted)."""
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return {"mean": statistics.fmean(finite) if finite else None,
            "std": statistics.stdev(finite) if len(finite) > 1 else 0.0 if finite else None, "n": len(finite), "values": values}


def subject_setup(backbone, name: str, seed: int, attack: str, attack_params: dict, n_train: int = TRAIN_VIEWS,
                  n_held: int = 8, n_gen: int = GENERATIONS, everyone: dict | None = None, view_size: int | None = None,
                  guidance: float | None = None, other_prompts: tuple | None = None) -> experiment.Setup:
    """The paired experiment's setup for a built-in subject and seed: that seed's views at the backbone's size, or the
    training views at `view_size` (photos larger than the model's size: protected and purified at that size, shrunk by
    the attack as it shrinks a user's photos; the held-out views stay at the model's size). `guidance`: the
    generations' classifier-free guidance (None: the backbone kind's default, experiment.GENERATION)."""

    def tensors(a):
        return [torch.from_numpy(v.copy()).permute(2, 0, 1).float() / 255 for v in a]

    size = backbone.resolution
    return experiment.Setup(
        train=tensors(subject_views(name, "train", n_train, seed=seed, size=view_size or size)[0]),
        held_out=tensors(subject_views(name, "held_out", n_held, seed=seed, size=size)[0]),
        noun=get_subject(name).noun, seed=seed, attack=attack, attack_params=attack_params, n_gen=n_gen,
        guidance=guidance, other_prompts=other_prompts, subjects=everyone, subject=name)


def all_held_out(backbone, seed: int, n_held: int = 8) -> dict:
    """Every built-in subject's held-out views of a seed: the retrieval pool."""
    return {name: [torch.from_numpy(v.copy()).permute(2, 0, 1).float() / 255
                   for v in subject_views(name, "held_out", n_held, seed=seed, size=backbone.resolution)[0]]
            for name in SUBJECTS}


def personalization_row(base: experiment.Side, clean: experiment.Side) -> dict:
    b, c = base.measures, clean.measures
    closable = b["gen_distance_mean"] - b["train_views_distance"]
    nan_if_none = lambda x: float("nan") if x is None else x  # noqa: E731
    gap = nan_if_none(experiment.gap_closed(b, c["gen_distance_mean"]))
    # its own noise over generation draws (the delta method): gap = (B - C) / (B - T), B and C the means of the base's
    # and the attack's per-generation distances at the same seeds, so each seed's influence is ((1 - gap) b - c) / (B - T)
    # (the base's draws move the closable gap too) and the standard error is their spread over the square root of n;
    # a floor: from 8 generations on pocket it was about 3/4 of the noise a 32-generation rerun measured (RESULTS)
    terms = [((1 - gap) * x - y) / closable for x, y in zip(b["gen_distance"], c["gen_distance"])] if closable > 0 else []
    gap_noise = experiment.sem(terms) if len(terms) > 1 else float("nan")
    def moved(p_base, p_clean):  # mean absolute change of a prompt's generations (same seeds) in [0, 1] pixels
        return float((torch.stack(clean.generations[p_clean]) - torch.stack(base.generations[p_base])).abs().mean())

    moved_instance = moved(base.prompt, clean.prompt)
    others = [p for p in base.generations if p != base.prompt]
    moved_other = statistics.fmean(moved(p, p) for p in others) if others else float("nan")
    # each other prompt apart: whether the drift is the caption's or the whole model's
    rest_b, rest_c = b.get("distance_to_other_subjects"), c.get("distance_to_other_subjects")

    def toward_rest(p_base, p_clean):  # toward the other subjects' views (NaN without them)
        return rest_b[p_base] - rest_c[p_clean] if rest_b and rest_c else float("nan")

    per_prompt = {p: {"toward_subject": b["other_prompt_distances"][p] - c["other_prompt_distances"][p],
                      "toward_other_subjects": toward_rest(p, p), "moved": moved(p, p)}
                  for p in others if p in b.get("other_prompt_distances", {})}
    return {
        "post_attack_loss_base": b["post_attack_loss"], "post_attack_loss_attacked": c["post_attack_loss"],
        "distance_base": b["gen_distance_mean"], "distance_attacked": c["gen_distance_mean"],
        "distance_train_views": b["train_views_distance"],
        "gap_closed": gap, "gap_closed_noise": gap_noise,
        # the same for the training views' pixel mean in place of the generations: a gap closed up to here can be
        # the average colours alone (a blur is nearer the held-out views than sharp views are)
        "gap_closed_views_mean": nan_if_none(experiment.gap_closed(b, b["views_mean_distance"])
                                             if "views_mean_distance" in b else None),
        "retrieval_base": b.get("retrieval", float("nan")), "retrieval_attacked": c.get("retrieval", float("nan")),
        # the training views' own retrieval: the measure's ceiling on this pair (an attack that drew them exactly)
        "retrieval_train_views": b.get("train_views_retrieval", float("nan")),
        # whom the attacked generations are taken for, each subject's share: what a miss draws instead
        "retrieved_as_attacked": c.get("retrieved_as", {}),
        "other_prompts_toward_subject": b.get("other_prompts_distance", float("nan")) - c.get("other_prompts_distance", float("nan")),
        "instance_prompt_toward_subject": b["gen_distance_mean"] - c["gen_distance_mean"],
        "instance_prompt_toward_other_subjects": toward_rest(base.prompt, clean.prompt),
        "moved_instance_prompt": moved_instance, "moved_other_prompts": moved_other,
        "seconds_attack": clean.adapter.seconds if clean.adapter else float("nan"),
        "per_prompt": per_prompt,
    }


def taken_for(shares: dict, subject: str) -> str:
    """The other subjects a run's generations were retrieved as, for its log line ("; the rest taken for kite 0.62,
    robot 0.12"), or nothing when none was."""
    rest = sorted(((v, n) for n, v in shares.items() if n != subject and v > 0), reverse=True)
    return f"; the rest taken for {', '.join(f'{n} {v:.2f}' for v, n in rest)}" if rest else ""


def picture(setup: experiment.Setup, rows: list, n: int = 8) -> torch.Tensor:
    """Rows of images (the first n of each) in one picture, each at the held-out views' size (training views larger
    than the model's, --view-size, shown at its size), short rows padded with white."""
    size = tuple(setup.held_out[0].shape[-2:])
    width = max(len(r[:n]) for r in rows)
    out = []
    for r in rows:
        r = [v if tuple(v.shape[-2:]) == size else
             F.interpolate(v[None], size=size, mode="bicubic", antialias=True, align_corners=False)[0]
             for v in r[:n]]
        r = r + [torch.ones_like(r[0])] * (width - len(r))
        out.append(torch.cat(r, dim=2))
    return torch.cat(out, dim=1).clamp(0, 1)


def run(backbone, subjects: list[str], seeds: list[int], methods: list[str], attack: str, attack_params: dict,
        target_psnr: float | None = None, method_params: dict | None = None, budgets: list[float] | None = None,
        pictures: Path | None = None, log=print, n_gen: int = GENERATIONS, save=None, purification: tuple[str, dict] | None = None,
        matched: dict | None = None, view_size: int | None = None, linf_ratio: float = 2.0,
        guidance: float | None = None, other_prompts: tuple | None = None, n_train: int = TRAIN_VIEWS) -> dict:
    """Every subject x seed x method (x budget), paired against one clean attack per subject and seed. `save`, if
    given, is called with the report so far after every row (a run stopped after hours keeps what it measured).
    `purification` (name, params): the attacker purifies every set before training (the clean views too).
    `matched`: budgets already found, {"subject/label": {...}} as a report's "matched_budgets" holds them.
    `view_size`: the training views' size in pixels (default: the backbone's; see subject_setup).
    `linf_ratio`: the L-inf cap of every matched budget, as a multiple of its RMS (eval.grid.match_psnr).
    `guidance`: the generations' classifier-free guidance (None: the backbone kind's default).
    `other_prompts`: the prompts whose drift is measured beside the instance prompt (None: the backbone kind's).
    `n_train`: how many training views of each subject the attack (and every protection) gets, 1 to MAX_BATCH."""
    report: dict = {"personalization": [], "protection": []}
    matched = {tuple(k.split("/", 1)): v for k, v in (matched or {}).items()}

    def checkpoint():
        if save is not None:
            save({"personalization": list(report["personalization"]), "protection": list(report["protection"]),
                  "matched_budgets": {f"{k[0]}/{k[1]}": v for k, v in matched.items()}})  # as it stands now
    for name in subjects:
        for seed in seeds:
            setup = subject_setup(backbone, name, seed, attack, attack_params, n_train=n_train, n_gen=n_gen,
                                  everyone=all_held_out(backbone, seed), view_size=view_size, guidance=guidance,
                                  other_prompts=other_prompts)
            t0 = time.perf_counter()
            # the base and clean sides once per subject and seed, paired with every method's protected side
            base, clean = experiment.reference(backbone, setup), experiment.attack_side(backbone, setup, setup.train,
                                                                                           purification=purification)
            row = {"subject": name, "seed": seed, **personalization_row(base, clean)}
            report["personalization"].append(row)
            checkpoint()
            log(f"{name} seed {seed}: gap closed {row['gap_closed']:.2f} (the views' mean image: "
                f"{row['gap_closed_views_mean']:.2f}), retrieval {row['retrieval_attacked']:.2f} "
                f"(base {row['retrieval_base']:.2f}, the training views {row['retrieval_train_views']:.2f}"
                f"{taken_for(row['retrieved_as_attacked'], name)}), {time.perf_counter() - t0:.0f} s")
            if pictures is not None and seed == seeds[0]:
                pictures.mkdir(parents=True, exist_ok=True)
                # rows: training views, held-out views, base generations, attacked generations
                to_pil(picture(setup, [setup.train, setup.held_out, base.generations[base.prompt],
                                       clean.generations[clean.prompt]])).save(pictures / f"{name}.png")
            for label in methods:
                if label == "none":
                    continue
                method = label.split("+")[0]  # "ldu+fresh": a variant of ldu with its own --method-set parameters
                for budget in budgets or [None]:
                    params = {"prompt": setup.attack_params.get("instance_prompt") or f"a photo of sks {setup.noun}",
                              "seed": seed, **(method_params or {}).get(label, {})}
                    field = get_method(method).budget_field
                    if budget is not None:
                        params[field] = budget
                    elif target_psnr is not None and field not in (method_params or {}).get(label, {}):
                        # (a method given its budget explicitly keeps it: e.g. LDU's, too slow to bisect on a CPU)
                        k = (name, label)
                        if k not in matched:
                            # always on seed 0's views, whichever seeds this run has: runs of other seeds merge
                            first = subject_setup(backbone, name, MATCH_SEED, attack, attack_params, n_train=n_train,
                                                  view_size=view_size)
                            try:
                                matched[k] = match_psnr(backbone, method, {**params, "seed": MATCH_SEED}, first.train,
                                                        target_psnr, linf_ratio=linf_ratio)
                            except ValueError as err:  # this method on this subject only: the rest of the run goes on
                                matched[k] = {"unmatched": str(err)}
                        if "unmatched" in matched[k]:
                            log(f"  {label}: skipped on {name}: {matched[k]['unmatched']}")
                            continue
                        params.update(budget_rms=matched[k]["budget_rms"], linf=matched[k]["linf"])
                        field = "budget_rms"
                    t1 = time.perf_counter()
                    result = protect(setup.train, backbone, method=method, params=params)
                    seconds = time.perf_counter() - t1
                    prot = experiment.attack_side(backbone, setup, result.images, purification=purification)
                    r = experiment.compare(base.measures, clean.measures, prot.measures)
                    if pictures is not None and seed == seeds[0]:
                        # rows: protected views, held-out views, generations after the clean and the protected attack
                        at = "" if budget is None else f"@{budget * 255:.1f}"
                        to_pil(picture(setup, [list(result.images), setup.held_out, clean.generations[clean.prompt],
                                               prot.generations[prot.prompt]])).save(pictures / f"{name}-{label}{at}.png")
                    stats = result.stats["images"]
                    row = {"subject": name, "seed": seed, "method": label, "budget_field": field, "budget": params.get(field),
                           "psnr": statistics.fmean(s["psnr"] for s in stats), "rms_255": statistics.fmean(s["rms_255"] for s in stats),
                           "linf_255": max(s["linf_255"] for s in stats), "seconds_protect": seconds, **r,
                           "post_attack_loss_clean_attack": clean.measures["post_attack_loss"],
                           "post_attack_loss_protected_attack": prot.measures["post_attack_loss"],
                           "attacker_loss_gain": statistics.fmean(s["attacker_loss_protected"] - s["attacker_loss_clean"] for s in stats)}
                    report["protection"].append(row)
                    checkpoint()
                    log(f"  {label}{'' if budget is None else f' @{budget * 255:.1f}/255'}: PSNR {row['psnr']:.2f}, prevented "
                        f"loss {_show(r['prevented_loss'])} (noise {_show(r.get('prevented_loss_noise'))}), generation "
                        f"{_show(r['prevented_generation'])}, {seconds:.0f} s")
    report["matched_budgets"] = {f"{k[0]}/{k[1]}": v for k, v in matched.items()}
    return report


# what runs must share for their rows to be one experiment (and each method label's parameters, where both have its rows)
SAME = ("model", "revision", "attack", "attack_params", "match_psnr", "sweep", "purification", "view_size", "linf_ratio",
        "guidance", "other_prompts", "train_views", "generations")


# settings recorded since they became options: what every run before matched or generated with (a report without
# its model, eval.efficacy.run's own, keeps a model kind's setting unrecorded)
LATE = {"linf_ratio": lambda r: 2.0, "train_views": lambda r: TRAIN_VIEWS, "generations": lambda r: GENERATIONS,
        "guidance": lambda r: experiment.GENERATION[kind_of(r["model"])][1] if "model" in r else None,
        "other_prompts": lambda r: list(experiment.other_prompts(kind_of(r["model"]))) if "model" in r else None}

# row fields recorded since a later version: a row from before lacks them, and that is no difference
LATE_FIELDS = {"per_prompt", "instance_prompt_toward_other_subjects", "gap_closed_noise", "gap_closed_views_mean",
               "retrieval_train_views", "retrieved_as_attacked"}


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def merge(reports: list[dict], names: list[str] | None = None) -> dict:
    """One report from several finished runs (other seeds, other methods, or a run cut short and continued).

    Raises ValueError, naming the runs and the difference, where they are not one experiment: a different backbone,
    attack or matching, or different numbers where they overlap (see the module's docstring)."""
    if not reports:
        raise ValueError("nothing to merge")
    names = names or [f"run {i + 1}" for i in range(len(reports))]
    first = reports[0]

    def setting(r, k):  # a report from before a setting was recorded holds its default
        if k == "purification" and r.get(k):  # every parameter resolved (early runs recorded only those given)
            return resolved_purification(r[k]["name"], r[k]["params"], kind_of(r["model"]))
        if r.get(k) is None and k in LATE:
            return LATE[k](r)
        return r.get(k) or ({} if k in ("attack_params", "method_params") else r.get(k))

    for name, r in zip(names[1:], reports[1:]):
        for k in SAME:
            if not _close(setting(r, k), setting(first, k)):
                raise ValueError(f"{names[0]} and {name} differ in {k} ({setting(first, k)!r} vs {setting(r, k)!r}): "
                                 "they are not one experiment")
    # a method label's parameters must agree between runs that both have its rows; a variant only one run has keeps its own
    params: dict = {}
    for name, r in zip(names, reports):
        for label in dict.fromkeys(row["method"] for row in r.get("protection", [])):
            mine = setting(r, "method_params").get(label, {})
            if label in params and not _close(params[label][1], mine):
                raise ValueError(f"{params[label][0]} and {name} differ in method_params of {label} ({params[label][1]!r} "
                                 f"vs {mine!r}): they are not one experiment")
            params.setdefault(label, (name, mine))
    out = {k: setting(first, k) for k in SAME}
    out["method_params"] = {label: p for label, (_, p) in params.items() if p}
    out.update({"personalization": [], "protection": [], "matched_budgets": {},
                "merged_from": [{"run": n, "argv": r.get("argv"), "seconds": r.get("seconds")} for n, r in zip(names, reports)],
                "seconds": sum(r.get("seconds") or 0 for r in reports)})
    keys = {"personalization": ("subject", "seed"), "protection": ("subject", "seed", "method", "budget")}
    for part, key in keys.items():
        seen: dict = {}
        for name, r in zip(names, reports):
            for row in r.get(part, []):
                k = tuple(row.get(x) for x in key)
                if k not in seen:
                    seen[k] = (name, row)
                    out[part].append(row)
                    continue
                other, kept = seen[k]
                varying = {"seconds_attack", "seconds_protect"}  # wall time differs from run to run; numbers do not
                diff = [f for f in row.keys() | kept.keys() if f not in varying and not _close(row.get(f), kept.get(f))
                        and not (f in LATE_FIELDS and (f not in row or f not in kept))]
                if diff:
                    what = "the clean attack" if part == "personalization" else f"{row.get('method')}'s row"
                    raise ValueError(f"{what} for {k[0]} seed {k[1]} differs between {other} and {name} ({diff[0]}: "
                                     f"{kept.get(diff[0])!r} vs {row.get(diff[0])!r}): not the same experiment (other "
                                     "code, or another machine: a long attack repeats to the digit on one machine only); "
                                     "re-run one of them with the other's settings there, or merge runs that do not overlap")
    for name, r in zip(names, reports):
        for k, v in (r.get("matched_budgets") or {}).items():
            if k in out["matched_budgets"] and not _close(out["matched_budgets"][k], v):
                raise ValueError(f"{k}'s matched budget differs between the runs ({out['matched_budgets'][k]} vs {v})")
            out["matched_budgets"].setdefault(k, v)
    codes = (r.get("code") for r in reports)  # a merged report's code is already a list
    out["code"] = list(dict.fromkeys(c for code in codes for c in (code if isinstance(code, list) else [code])))  # one unless they differ
    out["machine"] = distinct_machines(r.get("machine") for r in reports)
    out["partial"] = any(r.get("partial") for r in reports)  # a run stopped midway stays marked
    out["subjects"] = list(dict.fromkeys(row["subject"] for row in out["personalization"]))
    out["seeds"] = sorted({row["seed"] for row in out["personalization"]})
    return out


def _show(v) -> str:
    return "–" if v is None else v if isinstance(v, str) else f"{v:+.3f}"


def summarize(report: dict) -> dict:
    """Per method: mean ± std over subject x seed of each share, the mean paired noise, PSNR; per subject too; and
    for every pair of methods whether all paired differences agree in sign."""
    out: dict = {"personalization": {}, "protection": {}}
    pers = report["personalization"]
    if pers:
        keys = [k for k in pers[0] if k not in ("subject", "seed", "per_prompt", "retrieved_as_attacked")]
        out["personalization"] = {k: spread([r.get(k) for r in pers]) for k in keys}  # (a field a merged older run lacks)
        out["personalization_per_subject"] = {s: {k: spread([r.get(k) for r in pers if r["subject"] == s]) for k in keys}
                                              for s in dict.fromkeys(r["subject"] for r in pers)}
        prompts = dict.fromkeys(q for r in pers for q in r.get("per_prompt", {}))
        if prompts:  # runs from before the breakdown have none
            out["personalization_per_prompt"] = {q: {k: spread([r["per_prompt"][q].get(k) for r in pers if q in r.get("per_prompt", {})])
                                                     for k in ("toward_subject", "toward_other_subjects", "moved")}
                                                 for q in prompts}
    rows = report["protection"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"] if report.get("sweep") else None), []).append(r)
    for (method, budget), rs in groups.items():
        label = method if budget is None else f"{method}@{budget * 255:.1f}"
        entry = {"rows": len(rs)}
        for k in ("prevented_loss", "prevented_generation", "prevented_loss_noise", "prevented_generation_noise", "psnr",
                  "rms_255", "seconds_protect", "loss_difference", "attacker_loss_gain"):
            entry[k] = spread([r.get(k) for r in rs])
        out["protection"][label] = entry
    # in the run's order (its first method first: "ldu - noise", as the run was asked), not alphabetically
    labels = list(dict.fromkeys((r["method"], r["budget"] if report.get("sweep") else None) for r in rows))
    agree = {}
    for i, (a, budget_a) in enumerate(labels):
        for b, budget_b in labels[i + 1 :]:
            if budget_a != budget_b:  # compared at the same budget (or the same matched PSNR) only
                continue
            for k in ("prevented_loss", "prevented_generation"):
                pa, pb = shares(rows, a, k, budget_a), shares(rows, b, k, budget_a)
                diffs = [pa[x] - pb[x] for x in pa.keys() & pb.keys()]
                if diffs:
                    name = f"{a} - {b}" + ("" if budget_a is None else f" @{budget_a * 255:.1f}/255")
                    same_sign = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
                    # real: every pair agrees, and there are enough pairs for that to be unlikely by chance (2/2^6 = 3 %)
                    agree[f"{name} ({k})"] = {"mean": statistics.fmean(diffs), "positive": sum(d > 0 for d in diffs),
                                              "n": len(diffs), "real": same_sign and len(diffs) >= MIN_PAIRS}
    out["paired_differences"] = agree
    out["control_spread"] = control_spread(rows, [m for m, budget in labels if budget is None])
    return out


def shares(rows: list[dict], method: str, k: str, budget: float | None = None) -> dict:
    """{(subject, seed): share k} of one method's rows where that share was measured (at one budget, in a sweep)."""
    return {(r["subject"], r["seed"]): r[k] for r in rows
            if r["method"] == method and (budget is None or r["budget"] == budget) and isinstance(r.get(k), float)}


def control_spread(rows: list[dict], labels: list[str]) -> dict:
    """With two or more `noise` controls (e.g. `noise` and `noise+s100`, the same change drawn with another seed):
    how much two structureless changes of the same size differ on one pair, per share. `std` is the spread of the
    per-pair differences between controls (m of them); were a method just another control, the mean of its n paired
    differences with a control would lie within ±t·std/√n 95 % of the time, t Student's 97.5 % point for m − 1
    degrees of freedom (`null_band`): a method's mean lead inside that band is what one more control could show."""
    from scipy.stats import t as student  # scikit-image's dependency

    controls = [m for m in labels if m.split("+")[0] == "noise"]
    out = {}
    if len(controls) < 2:
        return out
    for k in ("prevented_loss", "prevented_generation"):
        share = {m: shares(rows, m, k) for m in controls}
        diffs = [share[a][x] - share[b][x] for i, a in enumerate(controls) for b in controls[i + 1 :]
                 for x in share[a].keys() & share[b].keys()]
        if len(diffs) < 3:  # a spread from two differences says nothing
            continue
        std = statistics.stdev(diffs)
        t = float(student.ppf(0.975, len(diffs) - 1))
        bands = {}
        for m in labels:
            if m in controls:
                continue
            n = min(len(shares(rows, m, k).keys() & share[c].keys()) for c in controls)
            if n:
                bands[m] = t * std / math.sqrt(n)
        out[k] = {"controls": controls, "std": std, "n": len(diffs), "null_band": bands}
    return out


def print_summary(summary: dict, file=None) -> None:
    file = file or sys.stdout  # looked up when called (a default bound at import misses a redirected stdout)
    p = summary.get("personalization")
    if p:
        print("personalization (mean ± std over subjects x seeds):", file=file)
        for k, v in p.items():
            print(f"  {k:<32} " + ("–" if v["mean"] is None else f"{v['mean']:.4f} ± {v['std']:.4f} (n {v['n']})"), file=file)
        for s, d in summary.get("personalization_per_subject", {}).items():
            f = lambda k, fmt=".2f": "–" if d[k]["mean"] is None else format(d[k]["mean"], fmt)  # noqa: E731
            views_mean = f" (the views' mean image {f('gap_closed_views_mean')})" if "gap_closed_views_mean" in d else ""
            ceiling = f" (the training views {f('retrieval_train_views')})" if "retrieval_train_views" in d else ""
            print(f"  {s:<10} gap closed {f('gap_closed')} ± {d['gap_closed']['std'] or 0:.2f}{views_mean}, retrieval "
                  f"{f('retrieval_attacked')}{ceiling}, other prompts toward the subject {f('other_prompts_toward_subject', '+.3f')} "
                  f"vs the instance prompt {f('instance_prompt_toward_subject', '+.3f')}", file=file)
        for q, d in summary.get("personalization_per_prompt", {}).items():
            g = lambda k, fmt="+.3f": "–" if d[k]["mean"] is None else format(d[k]["mean"], fmt)  # noqa: E731
            print(f"  other prompt {q!r}: toward the subject {g('toward_subject')}, toward the other subjects "
                  f"{g('toward_other_subjects')}, moved {g('moved', '.3f')}", file=file)
    if summary.get("protection"):
        print(f"{'method':<24} {'PSNR':>6} {'prevented (loss)':>20} {'noise':>7} {'prevented (gen.)':>20} {'noise':>7} {'s/4 img':>8}",
              file=file)
        for label, e in summary["protection"].items():
            def ms(k):
                v = e[k]
                return "unavailable" if v["mean"] is None else f"{v['mean']:+.3f} ± {v['std']:.3f}"
            noise = lambda k: "–" if e[k]["mean"] is None else f"{e[k]['mean']:.3f}"  # noqa: E731
            print(f"{label:<24} {e['psnr']['mean'] or 0:6.2f} {ms('prevented_loss'):>20} {noise('prevented_loss_noise'):>7} "
                  f"{ms('prevented_generation'):>20} {noise('prevented_generation_noise'):>7} {e['seconds_protect']['mean'] or 0:8.1f}",
                  file=file)
        for k, v in summary.get("paired_differences", {}).items():
            print(f"  {k}: mean {v['mean']:+.3f}, positive in {v['positive']}/{v['n']} "
                  f"({'real: all agree' if v['real'] else 'all agree, but too few pairs' if v['positive'] in (0, v['n']) else 'within noise: signs differ'})",
                  file=file)
        for k, c in summary.get("control_spread", {}).items():
            print(f"  controls {', '.join(c['controls'])} ({k}): their paired differences spread by std {c['std']:.3f} "
                  f"(n {c['n']}); were a method one more control, its mean lead over a control would lie within "
                  + ", ".join(f"±{b:.3f} ({m})" for m, b in c["null_band"].items()) + " 95 % of the time",
                  file=file)


def sweep_curves(summary: dict, key: str) -> dict:
    """{method: [(PSNR, mean share, its std, how many pairs), ...] by PSNR}: a sweep's curves for one share, each point a
    method at one budget, averaged over the subject x seed pairs where that share was measured."""
    curves: dict = {}
    for label, e in summary["protection"].items():
        if e[key]["mean"] is not None:
            curves.setdefault(label.split("@")[0], []).append((e["psnr"]["mean"], e[key]["mean"], e[key]["std"], e[key]["n"]))
    return {method: sorted(pts) for method, pts in sorted(curves.items())}


def sweep_plot(summary: dict, path: Path):
    """Efficacy against PSNR, one panel per share (held-out loss, generations), one curve per method, error bars the
    spread over subjects x seeds. A share that could not be measured anywhere leaves its panel empty, and says so; a
    point resting on one pair (no spread) is drawn hollow, and the panel says how many pairs its points rest on.
    Returns the figure (saved to `path`)."""
    import matplotlib  # deferred: plotting is the only user, and it is slow to import

    matplotlib.use("Agg")
    from matplotlib.figure import Figure  # deferred, as matplotlib

    fig = Figure(figsize=(12, 4.6))
    panels = {"prevented_loss": "held-out loss", "prevented_generation": "generations' likeness"}
    for ax, (key, title) in zip(fig.subplots(1, 2), panels.items()):
        curves = sweep_curves(summary, key)
        for method, pts in curves.items():
            line = ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3,
                               label=method, markevery=[i for i, p in enumerate(pts) if p[3] >= 2])
            single = [p for p in pts if p[3] < 2]
            if single:  # one pair: a value, not a mean with a spread
                ax.plot([p[0] for p in single], [p[1] for p in single], "o", mfc="white", color=line.lines[0].get_color(),
                        zorder=3)
        counts = sorted({p[3] for pts in curves.values() for p in pts})
        if not curves:
            ax.text(0.5, 0.5, "unavailable: the attack learned too little to measure", ha="center", transform=ax.transAxes)
        else:
            n = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            ax.text(0.02, 0.02, f"each point: mean ± std over {n} pair{'s' if counts[-1] > 1 else ''}"
                    + (" (hollow: one pair, no spread)" if counts[0] < 2 else ""), transform=ax.transAxes, fontsize=8)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_title(f"share of learning prevented: {title}")
        ax.set_xlabel("PSNR of the protected photos (dB)")
    handles, labels = [], []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h), labels.append(lab)
    fig.legend(handles, labels, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.8, 1))  # room for the legend (8 methods, the longest photoguard_encoder)
    fig.savefig(path, dpi=120)
    return fig


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m eval.efficacy", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pocket")
    ap.add_argument("--subjects", default=",".join(SUBJECTS), help=f"comma-separated built-in subjects ({', '.join(SUBJECTS)})")
    ap.add_argument("--seeds", type=int, default=3, help="how many seeds (0, 1, ...; see --first-seed)")
    ap.add_argument("--first-seed", type=int, default=0, help="start the seeds here (e.g. --seeds 1 --first-seed 2: "
                                                                "seed 2 only, to add to a run with --merge)")
    ap.add_argument("--methods", default="ldu", help="comma-separated protection methods, or 'none' (personalization "
                                                      "only); METHOD+NAME is a variant, set with --method-set METHOD+NAME.x=y")
    ap.add_argument("--attack", default=None, help="lora_dreambooth, dreambooth or textual_inversion (default: the "
                                                   "backbone's default attack, as in the app)")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an attack parameter (repeatable)")
    ap.add_argument("--method-set", action="append", default=[], metavar="METHOD.NAME=VALUE", help="a method parameter")
    ap.add_argument("--match-psnr", type=float, default=None, help="set each method's binding budget to land at this PSNR "
                                                                   "(a budget given with --method-set is kept)")
    ap.add_argument("--linf-ratio", type=float, default=2.0, metavar="R",
                    help="with --match-psnr: each matched budget's L-inf cap is R times its RMS (default 2, LDU's own "
                         "8/255 and 16/255; near 1 the change must spread over every pixel, as sign-PGD's does)")
    ap.add_argument("--sweep", default=None, help="budgets in /255 (comma-separated): efficacy against PSNR")
    ap.add_argument("--purify", default=None, metavar="NAME", help="the attacker purifies every set it trains on first "
                                                                     "(the clean views too), e.g. posting, diffpure")
    ap.add_argument("--purify-set", action="append", default=[], metavar="NAME=VALUE", help="a purification parameter")
    ap.add_argument("--view-size", type=int, default=None, metavar="PX",
                    help="training views this many pixels square (default: the model's size): protected and purified at "
                         "that size and shrunk by the attack, as a user's photos are (e.g. 128 on pocket, for gridpure)")
    ap.add_argument("--train-views", type=int, default=TRAIN_VIEWS, metavar="N",
                    help=f"training views per subject, 1 to {MAX_BATCH} (default {TRAIN_VIEWS}; the app takes 1 to "
                         f"{MAX_BATCH} photos); the held-out views stay 8")
    ap.add_argument("--generations", type=int, default=GENERATIONS, metavar="N",
                    help=f"generations per prompt on each side (default {GENERATIONS}; more: a steadier measure, the first "
                         f"{GENERATIONS} the default run's own)")
    ap.add_argument("--guidance", type=float, default=None, metavar="G",
                    help="classifier-free guidance of the attacker's generations (default: the model's, "
                         f"{', '.join(f'{k} {v[1]:g}' for k, v in experiment.GENERATION.items())})")
    ap.add_argument("--other-prompts", default=None, metavar="P1;P2",
                    help="semicolon-separated prompts whose drift is measured beside the instance prompt (default: the "
                         "model's: " + "; ".join(experiment.other_prompts("pocket")) + " on pocket)")
    ap.add_argument("--budgets-from", type=Path, default=None, metavar="RUN.json",
                    help="with --match-psnr: reuse that run's matched budgets (same backbone, method settings, target)")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here, after every row ('partial': "
                                                           "true until the run ends; pictures and plots beside it)")
    ap.add_argument("--merge", default=None, metavar="A.json,B.json",
                    help="no new work: one report from these runs' --out files (other seeds or methods of one experiment)")
    args = ap.parse_args(argv)
    if args.merge:
        return merge_main(args, ap)
    args.attack = args.attack or default_attack(kind_of(args.model))
    subjects = [s for s in args.subjects.split(",") if s]
    methods = [m for m in args.methods.split(",") if m]
    try:  # every name and value is checked here, before any work
        for s in subjects:
            get_subject(s)
        for m in methods:
            if m != "none":
                get_method(m.split("+")[0])
        attack_params = parse_overrides(args.set, get_attack(args.attack).params, flag="--set ")
        method_params: dict = {}
        for item in args.method_set:
            label, _, rest = item.partition(".")
            method_params.setdefault(label, {}).update(parse_overrides([rest], get_method(label.split("+")[0]).params,
                                                                       flag="--method-set "))
        budgets = [float(b) / 255 for b in args.sweep.split(",")] if args.sweep else None
        if not 1 <= args.train_views <= MAX_BATCH:
            raise ValueError(f"--train-views must be 1 to {MAX_BATCH} (the photos a person uploads), got {args.train_views}")
        if args.generations < 2:
            raise ValueError(f"--generations must be at least 2 (a distance between sets needs a spread), got {args.generations}")
        if args.guidance is not None and not (math.isfinite(args.guidance) and args.guidance >= 0):
            raise ValueError(f"--guidance must be a number of at least 0 (1 or below: no classifier-free guidance), "
                             f"got {args.guidance}")
        other_prompts = None if args.other_prompts is None else tuple(q.strip() for q in args.other_prompts.split(";"))
        if other_prompts is not None and (not all(other_prompts) or len(set(other_prompts)) < len(other_prompts)):
            raise ValueError(f"--other-prompts: give distinct, non-empty prompts separated by ';', got {args.other_prompts!r}")
        purification = None
        if args.purify:  # every parameter resolved (the backbone kind's defaults too), so the report says what ran
            given = parse_overrides(args.purify_set, get_purification(args.purify).params, flag="--purify-set ")
            resolved = resolved_purification(args.purify, given, kind_of(args.model))
            purification = (resolved["name"], resolved["params"])
        elif args.purify_set:
            raise ValueError("--purify-set needs --purify NAME")
    except ValueError as err:
        ap.error(str(err))
    bb = load_backbone(args.model)
    view_size = None if args.view_size in (None, bb.resolution) else args.view_size  # the model's size is the default
    if view_size is not None and view_size < bb.resolution:
        ap.error(f"--view-size {view_size} is below the model's size ({bb.resolution} px): the attack would enlarge the "
                 "views, not shrink them; give at least that, or leave it out")
    matched = None
    if args.budgets_from:
        try:
            matched = budgets_from(args.budgets_from, bb, method_params, args.match_psnr, attack_params, subjects, methods,
                                   view_size, args.linf_ratio, args.train_views)
        except ValueError as err:
            ap.error(str(err))
    t0 = time.perf_counter()
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    meta = {"model": bb.spec, "revision": bb.revision, "subjects": subjects, "seeds": seeds, "attack": args.attack,
            "attack_params": attack_params, "method_params": method_params, "match_psnr": args.match_psnr,
            "sweep": budgets, "purification": None if purification is None else {"name": purification[0], "params": purification[1]},
            "view_size": view_size, "linf_ratio": args.linf_ratio, "train_views": args.train_views,
            "generations": args.generations,
            "guidance": args.guidance if args.guidance is not None else experiment.GENERATION[kind_of(args.model)][1],
            "other_prompts": list(other_prompts or experiment.other_prompts(kind_of(args.model))),
            "argv": sys.argv[1:] if argv is None else argv, "code": code_version(), "machine": machine()}

    def write(report: dict, partial: bool):
        write_json(args.out, {**report, **meta, "seconds": time.perf_counter() - t0, "partial": partial})

    report = run(bb, subjects, seeds, methods, args.attack, attack_params, args.match_psnr, method_params,
                 budgets, pictures=args.out.with_suffix("") if args.out else None,
                 save=(lambda r: write(r, partial=True)) if args.out else None, purification=purification, matched=matched,
                 view_size=view_size, linf_ratio=args.linf_ratio, guidance=args.guidance, other_prompts=other_prompts,
                 n_train=args.train_views, n_gen=args.generations)
    report.update({**meta, "seconds": time.perf_counter() - t0})
    summary = summarize(report)
    report["summary"] = summary
    print_summary(summary)
    if args.out:
        write(report, partial=False)
        if budgets:
            sweep_plot(summary, args.out.with_suffix(".png"))
    return 0


def resolved_purification(name: str, params: dict, kind: str) -> dict:
    """{"name", "params"} with every parameter of the purification resolved (the backbone kind's defaults too)."""
    entry = get_purification(name)
    return {"name": entry.name, "params": dataclasses.asdict(entry.make_params(kind, **params))}


def budgets_from(path: Path, bb, method_params: dict, target: float | None, attack_params: dict | None = None,
                 subjects: list[str] | None = None, methods: list[str] | None = None, view_size: int | None = None,
                 linf_ratio: float = 2.0, train_views: int = TRAIN_VIEWS) -> dict:
    """An earlier run's matched budgets, if that run matched on the same backbone to the same PSNR with the same
    instance prompt (the protections' prompt): those of this run's subjects and method labels whose parameters are
    this run's (another variant's budget is found anew)."""
    if target is None:
        raise ValueError("--budgets-from needs --match-psnr (the target the budgets were matched to)")
    if not path.is_file():
        raise ValueError(f"--budgets-from: no such run file: {path}")
    r = json.loads(path.read_text())
    for k, ours in (("model", bb.spec), ("revision", bb.revision), ("match_psnr", target), ("view_size", view_size),
                    ("linf_ratio", linf_ratio), ("train_views", train_views)):
        theirs = LATE[k](r) if r.get(k) is None and k in LATE else r.get(k)  # a run from before the option: its default
        if not _close(theirs, ours):
            raise ValueError(f"--budgets-from {path}: its {k} is {theirs!r}, this run's {ours!r}: its budgets would "
                             "not land at this run's PSNR")
    prompt = (r.get("attack_params") or {}).get("instance_prompt"), (attack_params or {}).get("instance_prompt")
    if prompt[0] != prompt[1]:
        raise ValueError(f"--budgets-from {path}: its instance prompt is {prompt[0]!r}, this run's {prompt[1]!r}: the "
                         "protections aim at the prompt, so its budgets would not land at this run's PSNR")
    theirs = r.get("method_params") or {}
    out = {}
    for k, v in (r.get("matched_budgets") or {}).items():
        subject, label = k.split("/", 1)
        if ("unmatched" not in v and (subjects is None or subject in subjects) and (methods is None or label in methods)
                and _close(theirs.get(label, {}), method_params.get(label, {}))):
            out[k] = v
    return out


def write_json(path: Path, data: dict) -> None:
    """Whole or not at all: a temporary file renamed over the last one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    tmp.replace(path)


def merge_main(args, ap) -> int:
    paths = [Path(p) for p in args.merge.split(",") if p]
    try:
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise ValueError(f"no such run file: {', '.join(missing)}")
        if len(paths) < 2:
            raise ValueError("--merge needs at least two run files, comma-separated")
        report = merge([json.loads(p.read_text()) for p in paths], [str(p) for p in paths])
    except (ValueError, json.JSONDecodeError) as err:
        ap.error(str(err))
    if len(report["code"]) > 1:
        print(f"note: these runs were made with different code ({', '.join(map(str, report['code']))}); where they "
              "overlap their numbers agree, but a change that touches only the rows that do not overlap would not show")
    if len(report["machine"]) > 1:
        cpus = "; ".join(str(m.get("cpu")) for m in report["machine"])
        print(f"note: these runs were made on {len(report['machine'])} machines ({cpus}); where they overlap their "
              "numbers agree, but a long attack repeats to the digit on one machine only, so the means mix machines")
    summary = summarize(report)
    report["summary"] = summary
    print_summary(summary)
    if args.out:
        write_json(args.out, report)
        if report.get("sweep"):
            sweep_plot(summary, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
