"""The grid runner: every cell is the chain protect (backbone A) -> purify -> attack (backbone B) -> generate ->
measure, for each image set x method x purification x attack x backbones x seed.

Cells are cached by a key over their whole specification, the code version and the library versions
(out/cells/<key>.json): a rerun skips finished cells and retries failed ones. A failing cell is recorded with its
error and the grid goes on. Shards: with RANK / WORLD_SIZE set (torchrun, accelerate launch) each process takes
every WORLD_SIZE-th cell and writes results-rank<R>.jsonl; after a barrier, rank 0 merges them and writes the
report (eval/report.py). Each cell records the machine it ran on; the report says so when its cells ran on more
than one (a grid resumed elsewhere), since a long CPU attack repeats to the digit on one machine only.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import shutil
import statistics
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ldu import get_method, load_backbone, protect
from ldu.backbone import BackboneError, _locate, resolve_spec
from ldu.io import load_images
from ldu.registry import Cancelled, report
from ldu.protect import to_pil
from ldu.subjects import get_subject, subject_views
from ldu.version import code_version, library_versions, machine

from . import experiment
from .config import Config, Named
from .metrics import get_metric, measure
from .report import write_report

CLEAN = Named("none")


@dataclass(frozen=True)
class Cell:
    image_set: str
    method: Named
    purification: Named
    attack: Named
    protect_backbone: str
    attack_backbone: str
    seed: int

    def spec(self) -> dict:
        return {"image_set": self.image_set, "method": dataclasses.asdict(self.method),
                "purification": dataclasses.asdict(self.purification), "attack": dataclasses.asdict(self.attack),
                "protect_backbone": self.protect_backbone, "attack_backbone": self.attack_backbone, "seed": self.seed}

    def label(self) -> str:
        return (f"{self.image_set} | {self.method.label()} | {self.purification.label()} | {self.attack.label()} | "
                f"{self.protect_backbone}->{self.attack_backbone} | seed {self.seed}")


def cells(cfg: Config) -> list[Cell]:
    """Every cell, in a fixed order. The clean reference (method none) is never purified."""
    out = []
    for name in cfg.image_sets:
        for method in cfg.methods:
            for purification in cfg.purifications if method.name != "none" else [CLEAN]:
                for attack in cfg.attacks:
                    for pb in cfg.protect_backbones if method.name != "none" else cfg.protect_backbones[:1]:
                        for ab in cfg.attack_backbones:
                            for seed in cfg.seeds:
                                out.append(Cell(name, method, purification, attack, pb, ab, seed))
    return out


def cell_key(cell: Cell, cfg: Config, revisions: dict) -> str:
    payload = {"cell": cell.spec(), "image_set": _jsonable(cfg.image_sets[cell.image_set]), "generate": cfg.generate,
               "metrics": cfg.metrics, "match_psnr": cfg.match_psnr, "code": code_version(), "libraries": library_versions(),
               "revisions": {b: revisions[b] for b in (cell.protect_backbone, cell.attack_backbone)},
               "images": _image_hashes(cfg.image_sets[cell.image_set]), "device": cfg.device, "dtype": cfg.dtype}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _image_hashes(spec: dict) -> list[str]:
    """The content of a folder image set (a changed photo must not hit the cache), by file hash."""
    out = []
    for key in ("folder", "held_out_folder"):
        if key in spec:
            for p in sorted(Path(spec[key]).iterdir()):
                if p.is_file():
                    out.append(hashlib.sha256(p.read_bytes()).hexdigest()[:16])
    return out


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# ---- inputs ------------------------------------------------------------------------------------------------
def image_set_views(spec: dict, seed: int, size: int) -> tuple[list, list | None, str]:
    """(training views, held-out clean views or None, class noun) of an image set for a seed: a built-in subject's
    views of that seed (ldu.subjects), or the photos of a folder (the same for every seed)."""
    if "subject" in spec:
        def tensors(a):
            return [torch.from_numpy(v.copy()).permute(2, 0, 1).float() / 255 for v in a]

        name = spec["subject"]
        return (tensors(subject_views(name, "train", spec["train"], seed=seed, size=size)[0]),
                tensors(subject_views(name, "held_out", spec["held_out"], seed=seed, size=size)[0]), get_subject(name).noun)
    train = [im.pixels for im in load_images([spec["folder"]])]
    held = [im.pixels for im in load_images([spec["held_out_folder"]])] if "held_out_folder" in spec else None
    return train, held, spec.get("noun", "person")


# ---- running -------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: Config, out: Path, rank: int = 0, world: int = 1, progress=True, callback=None):
        """callback(dict): progress per cell and inside it ({"cell": i, "cells": n, ...}); False stops the grid (the
        cells finished so far stay cached)."""
        self.cfg, self.out, self.rank, self.world, self.progress = cfg, Path(out), rank, world, progress
        self.callback = callback
        self._backbones: dict = {}
        self._protected: dict = {}
        self._budgets: dict = {}
        (self.out / "cells").mkdir(parents=True, exist_ok=True)

    def backbone(self, spec: str):
        if spec not in self._backbones:
            self._backbones[spec] = load_backbone(spec, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._backbones[spec]

    def revisions(self) -> dict:
        """Each backbone's revision for the cache keys; one that cannot be found fails its cells, not the grid."""
        out = {}
        for s in set(self.cfg.protect_backbones + self.cfg.attack_backbones):
            try:
                out[s] = _locate(resolve_spec(s)[0], None)[2]
            except BackboneError as err:
                out[s] = f"unavailable: {err}"
        return out

    def run(self) -> list[dict]:
        revisions = self.revisions()
        mine = cells(self.cfg)[self.rank :: self.world]
        records = []
        bar = tqdm(mine, desc=f"cells (rank {self.rank}/{self.world})", disable=not self.progress, position=0)
        for i, cell in enumerate(bar):
            self._cell = {"cell": i + 1, "cells": len(mine), "label": cell.label()}
            report(self.callback, {"stage": "cell", "step": i, "total": len(mine), **self._cell})
            key = cell_key(cell, self.cfg, revisions)
            path = self.out / "cells" / f"{key}.json"
            if path.exists():
                record = json.loads(path.read_text())
                if record.get("status") == "ok":
                    records.append(record)
                    continue
            bar.set_postfix_str(cell.label()[:60])
            record = self.run_cell(cell, key)
            path.write_text(json.dumps(record, indent=2, default=str) + "\n")
            records.append(record)
        with open(self.out / f"results-rank{self.rank}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r, default=str) + "\n")
        return records

    def run_cell(self, cell: Cell, key: str) -> dict:
        t0 = time.perf_counter()
        record = {"key": key, **cell.spec(), "label": cell.label(), "rank": self.rank, "machine": machine()}
        try:
            record.update(self._chain(cell, key))
            record["status"] = "ok"
        except Cancelled:
            raise
        except Exception as err:  # noqa: BLE001  (one failing cell must not stop the grid)
            record["status"] = "error"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=4)
        record["seconds"] = time.perf_counter() - t0
        return record

    def _inside(self):
        """Progress inside the current cell, labelled with the cell (None without a callback)."""
        if self.callback is None:
            return None
        return lambda info: self.callback({**info, **self._cell})

    def budget(self, cell: Cell) -> dict:
        """With match_psnr: the method's binding budget for this image set, found at seed 0 and reused for every seed."""
        if self.cfg.match_psnr is None or cell.method.name == "none":
            return {}
        k = (cell.image_set, cell.method.label(), cell.protect_backbone)
        if k not in self._budgets:
            bb = self.backbone(cell.protect_backbone)
            train, _, noun = image_set_views(self.cfg.image_sets[cell.image_set], self.cfg.seeds[0], bb.resolution)
            params = {"prompt": f"a photo of sks {noun}", "seed": self.cfg.seeds[0], **cell.method.params}
            self._budgets[k] = match_psnr(bb, cell.method.name, params, train, self.cfg.match_psnr)
        return self._budgets[k]

    def _protected_images(self, cell: Cell, train, noun: str):
        """Protected training views, shared by every cell with the same set, method, backbone and seed."""
        k = (cell.image_set, cell.method.label(), cell.protect_backbone, cell.seed)
        if k not in self._protected:
            bb = self.backbone(cell.protect_backbone)
            matched = self.budget(cell)
            params = {"prompt": f"a photo of sks {noun}", "seed": cell.seed, **cell.method.params,
                      **{k: v for k, v in matched.items() if k in ("budget_rms", "linf")}}
            result = protect(train, bb, method=cell.method.name, params=params, callback=self._inside())
            self._protected[k] = (result.images, {**result.stats["batch"], "matched": matched})
        return self._protected[k]

    def _chain(self, cell: Cell, key: str) -> dict:
        folder = self.out / "cells" / key
        folder.mkdir(parents=True, exist_ok=True)
        ab = self.backbone(cell.attack_backbone)
        spec = self.cfg.image_sets[cell.image_set]
        clean, held, noun = image_set_views(spec, cell.seed, ab.resolution)
        setup = experiment.Setup(train=clean, held_out=held, noun=noun, seed=cell.seed, attack=cell.attack.name,
                                 attack_params=dict(cell.attack.params), n_gen=self.cfg.generate["n"],
                                 gen_steps=self.cfg.generate["steps"], guidance=self.cfg.generate["guidance"],
                                 other_prompts=tuple(self.cfg.generate["prompts"]) if "prompts" in self.cfg.generate else None)
        metrics: dict = {}
        times: dict = {}
        record: dict = {"noun": noun, "held_out": held is not None}
        t = time.perf_counter()
        if cell.method.name == "none":
            protected, protect_stats = clean, {}
            base = experiment.reference(ab, setup, callback=self._inside())
            record["base"] = base.measures
        else:
            protected, protect_stats = self._protected_images(cell, clean, noun)
            for name in self.cfg.metrics:  # imperceptibility of the protection itself (before any purification)
                if get_metric(name).kind == "imperceptibility":
                    metrics[name] = measure(name, clean, protected)
        times["protect"] = time.perf_counter() - t
        t = time.perf_counter()
        purification = (cell.purification.name, dict(cell.purification.params))
        side = experiment.attack_side(ab, setup, protected, out=folder / "adapter", purification=purification,
                                      callback=self._inside())
        times["attack_and_measure"] = time.perf_counter() - t
        record["side"] = side.measures
        gens = side.generations[side.prompt]
        for name in self.cfg.metrics:
            if get_metric(name).kind == "efficacy":
                metrics[name] = measure(name, gens, held, side.prompt) if held is not None else experiment.NO_HELD_OUT
        if "post_attack_loss" in side.measures:
            metrics["post_attack_loss"] = side.measures["post_attack_loss"]
        images = {"clean": [], "protected": [], "generations": []}
        for i, (c, p) in enumerate(zip(clean, protected)):
            to_pil(c).save(folder / f"clean_{i}.png")
            to_pil(p).save(folder / f"protected_{i}.png")
            images["clean"].append(f"cells/{key}/clean_{i}.png")
            images["protected"].append(f"cells/{key}/protected_{i}.png")
        for i, g in enumerate(gens):
            to_pil(g).save(folder / f"gen_{i}.png")
            images["generations"].append(f"cells/{key}/gen_{i}.png")
        if cell.attack.name == "dreambooth":  # a full UNet per cell would fill the disk; its numbers are kept
            shutil.rmtree(folder / "adapter", ignore_errors=True)
        return {**record, "metrics": metrics, "train_curve": side.train_curve, "times": times, "images": images,
                "protect_stats": {k: v for k, v in protect_stats.items() if k != "method"}, "prompt": side.prompt}


def match_psnr(backbone, method: str, params: dict, views, target_db: float, tolerance: float = 0.3, max_runs: int = 8,
               linf_ratio: float = 2.0) -> dict:
    """The budget that puts the protected views' mean PSNR within `tolerance` dB of `target_db`, by a secant search
    on log(budget) (PSNR is close to linear in it) from the RMS that would give the target exactly, and a bisection
    once two budgets bracket the target (a PGD method's PSNR can jump with its budget, and a secant then cycles).

    Every method is matched on its RMS budget, with its L-inf cap set to `linf_ratio` times it (default twice: LDU's
    own ratio, 8/255 and 16/255; near 1 a residual must spread over every pixel, as sign-PGD's does). An L-inf budget
    alone cannot be matched: with most pixels at the cap (sign-PGD fills its box) the saved residual's PSNR moves in
    jumps of 1-2 dB per 1/255 of L-inf; the RMS projection, then stochastic rounding held inside the budget
    (`ldu.protect.quantise`), moves it smoothly. Returns {"budget_rms", "linf", "psnr": reached, "runs": n,
    "target_psnr"}."""
    get_method(method)  # an unknown name fails here
    start = 10 ** (-target_db / 20)  # the RMS that gives target_db exactly
    tried: list[tuple[float, float]] = []
    budget = start
    for _ in range(max_runs):
        result = protect(views, backbone, method=method, params={**params, "budget_rms": budget, "linf": min(1.0, linf_ratio * budget)})
        reached = statistics.fmean(s["psnr"] for s in result.stats["images"])
        tried.append((math.log(budget), reached))
        if abs(reached - target_db) <= tolerance:
            return {"budget_rms": budget, "linf": min(1.0, linf_ratio * budget), "psnr": reached, "runs": len(tried),
                    "target_psnr": target_db}
        above = [t for t in tried if t[1] > target_db]  # too little change
        below = [t for t in tried if t[1] < target_db]  # too much
        if above and below:  # bracketed: bisect (a PGD method's PSNR can jump with its budget; a secant then cycles)
            hi = min(t[0] for t in below)  # the smallest budget that changed too much
            smaller = [t[0] for t in above if t[0] < hi]  # (none when the PSNR is not monotone in the budget)
            lo = max(smaller) if smaller else min(t[0] for t in above)
            budget = min(1.0, math.exp((lo + hi) / 2))
            if any(abs(math.log(budget) - t[0]) < 1e-6 for t in tried):
                break  # the bracket cannot shrink further
            continue
        if len(tried) == 1:
            slope = -20 / math.log(10)  # PSNR = -20 log10(rms): d PSNR / d log(budget) when the budget binds fully
        else:
            (x0, y0), (x1, y1) = tried[-2], tried[-1]
            slope = (y1 - y0) / (x1 - x0) if x1 != x0 and y1 != y0 else -20 / math.log(10)
            slope = min(slope, -1.0)  # more budget never makes the PSNR higher; keep the step finite
        budget = min(1.0, math.exp(tried[-1][0] + (target_db - tried[-1][1]) / slope))
        if any(abs(math.log(budget) - t[0]) < 1e-6 for t in tried):
            break  # the same budget again (at the cap, or a method that changes nothing): no run would add anything
    raise ValueError(f"{method}: no budget within {tolerance} dB of {target_db} dB PSNR after {len(tried)} runs "
                     f"(reached {', '.join(f'{y:.2f}' for _, y in tried)} dB): its PSNR jumps with its budget, or it "
                     "does not spend it")


def distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate's environment, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run(cfg: Config, out: Path, progress: bool = True, callback=None) -> Path | None:
    """Run this process's shard; rank 0 then merges every shard and writes the report. Returns the report path."""
    rank, world = distributed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1 and not torch.distributed.is_initialized():
        # CPU-only barrier, works offline; shards can differ by hours, so the barrier must not time out at 30 min
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if cfg.device is None and torch.cuda.is_available():  # one GPU per process
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    Runner(cfg, out, rank, world, progress, callback).run()
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank != 0:
        return None
    records = []
    for r in range(world):
        path = out / f"results-rank{r}.jsonl"
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with open(out / "results.jsonl", "w") as f:
        for rec in records:
            f.write(json.dumps(rec, default=str) + "\n")
    return write_report(cfg, records, out)
