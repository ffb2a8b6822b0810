"""The grid runner: every cell is the chain protect (backbone A) -> purify -> attack (backbone B) -> generate ->
measure, for each image set x method x purification x attack x backbones x seed.

Cells are cached by a key over their whole specification, the code version and the library versions
(out/cells/<key>.json): a rerun skips finished cells and retries failed ones. A failing cell is recorded with its
error and the grid goes on. Shards: with RANK / WORLD_SIZE set (torchrun, accelerate launch) each process takes
every WORLD_SIZE-th cell and writes results-rank<R>.jsonl; after a barrier, rank 0 merges them and writes the
report (eval/report.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import Config, Named

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
    from ldu.version import code_version, library_versions

    payload = {"cell": cell.spec(), "image_set": _jsonable(cfg.image_sets[cell.image_set]), "generate": cfg.generate,
               "metrics": cfg.metrics, "code": code_version(), "libraries": library_versions(),
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
def image_set_views(spec: dict) -> tuple[list, list]:
    """(training views, held-out clean views) as LoadedImage lists (pocket subjects) or from folders."""
    from ldu.io import LoadedImage, load_images

    if "pocket_subject" in spec:
        from ldu.pocket.data import subject_views

        def loaded(arr, tag):
            return [LoadedImage(name=f"{spec['pocket_subject']}-{tag}{i}.png",
                                pixels=torch.from_numpy(a.copy()).permute(2, 0, 1).float() / 255) for i, a in enumerate(arr)]

        return (loaded(subject_views(spec["pocket_subject"], spec["train"], seed=spec["seed"]), "train"),
                loaded(subject_views(spec["pocket_subject"], spec["held_out"], seed=spec["seed"] + 100), "held"))
    train = load_images([spec["folder"]])
    held = load_images([spec["held_out_folder"]]) if "held_out_folder" in spec else train
    return train, held


# ---- running -------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, cfg: Config, out: Path, rank: int = 0, world: int = 1, progress=True, should_stop=None):
        self.cfg, self.out, self.rank, self.world, self.progress = cfg, Path(out), rank, world, progress
        self.should_stop = should_stop or (lambda: False)
        self._backbones: dict = {}
        self._protected: dict = {}
        (self.out / "cells").mkdir(parents=True, exist_ok=True)

    def backbone(self, spec: str):
        if spec not in self._backbones:
            from ldu import load_backbone

            self._backbones[spec] = load_backbone(spec, device=self.cfg.device, dtype=self.cfg.dtype)
        return self._backbones[spec]

    def revisions(self) -> dict:
        """Each backbone's revision for the cache keys; one that cannot be found fails its cells, not the grid."""
        from ldu.backbone import BackboneError, _locate, resolve_spec

        out = {}
        for s in set(self.cfg.protect_backbones + self.cfg.attack_backbones):
            try:
                out[s] = _locate(resolve_spec(s)[0], None)[2]
            except BackboneError as err:
                out[s] = f"unavailable: {err}"
        return out

    def run(self) -> list[dict]:
        from tqdm.auto import tqdm

        revisions = self.revisions()
        mine = cells(self.cfg)[self.rank :: self.world]
        records = []
        bar = tqdm(mine, desc=f"cells (rank {self.rank}/{self.world})", disable=not self.progress, position=0)
        for cell in bar:
            if self.should_stop():
                from ldu.registry import Cancelled

                raise Cancelled("grid stopped between cells; finished cells stay cached")
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
        record = {"key": key, **cell.spec(), "label": cell.label(), "rank": self.rank}
        try:
            record.update(self._chain(cell, key))
            record["status"] = "ok"
        except Exception as err:  # noqa: BLE001  (one failing cell must not stop the grid)
            record["status"] = "error"
            record["error"] = f"{type(err).__name__}: {err}"
            record["traceback"] = traceback.format_exc(limit=4)
        record["seconds"] = time.perf_counter() - t0
        return record

    def _protected_images(self, cell: Cell, train):
        """Protected training views, shared by every cell with the same set, method, backbone and seed."""
        from ldu import protect

        k = (cell.image_set, cell.method.label(), cell.protect_backbone, cell.seed)
        if k not in self._protected:
            if cell.method.name == "none":
                self._protected[k] = ([im.pixels for im in train], {})
            else:
                bb = self.backbone(cell.protect_backbone)
                params = {**cell.method.params}
                from ldu import get_method

                if "seed" in get_method(cell.method.name).params.__dataclass_fields__:
                    params.setdefault("seed", cell.seed)
                result = protect(train, bb, method=cell.method.name, params=params)
                self._protected[k] = (result.images, result.stats["batch"])
        return self._protected[k]

    def _chain(self, cell: Cell, key: str) -> dict:
        from attacks import generate, get_attack, post_attack_loss, purify, train
        from ldu import make_draws
        from ldu.protect import to_pil

        from .metrics import get_metric, measure

        folder = self.out / "cells" / key
        folder.mkdir(parents=True, exist_ok=True)
        train_views, held = image_set_views(self.cfg.image_sets[cell.image_set])
        clean = [im.pixels for im in train_views]
        protected, protect_stats = self._protected_images(cell, train_views)
        metrics: dict = {}
        if cell.method.name != "none":  # imperceptibility of the protection itself (before any purification)
            for name in self.cfg.metrics:
                if get_metric(name).kind == "imperceptibility":
                    metrics[name] = measure(name, clean, protected)
        times = {}
        t = time.perf_counter()
        ab = self.backbone(cell.attack_backbone)
        if cell.purification.name != "none":
            protected = purify(protected, cell.purification.name, {**cell.purification.params}, backbone=ab)
        times["purify"] = time.perf_counter() - t
        t = time.perf_counter()
        attack_params = {**cell.attack.params}
        if "seed" in get_attack(cell.attack.name).params.__dataclass_fields__:
            attack_params.setdefault("seed", cell.seed)
        adapter = train(ab, protected, cell.attack.name, attack_params, out=folder / "adapter", overwrite=True)
        times["attack"] = time.perf_counter() - t
        draws = make_draws(16, len(held), ab.latent_shape(), ab.num_train_timesteps, seed=10_000 + cell.seed)
        metrics["post_attack_loss"] = float(post_attack_loss(ab, adapter, held, draws))
        t = time.perf_counter()
        prompts = self.cfg.generate.get("prompts") or [adapter.prompt]
        n = self.cfg.generate["n"]
        jobs = [(p, 1000 * cell.seed + i) for p in prompts for i in range(n)]
        gens = generate(ab, adapter, [p for p, _ in jobs], [s for _, s in jobs], steps=self.cfg.generate["steps"],
                        guidance=self.cfg.generate["guidance"])
        times["generate"] = time.perf_counter() - t
        references = [im.pixels for im in held]
        for name in self.cfg.metrics:
            if get_metric(name).kind == "efficacy":
                metrics[name] = measure(name, gens[:n], references, prompts[0])
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
            import shutil

            shutil.rmtree(folder / "adapter", ignore_errors=True)
        return {"metrics": metrics, "train_curve": adapter.train_curve, "times": times, "images": images,
                "protect_stats": {k: v for k, v in protect_stats.items() if k != "method"},
                "prompts": prompts}


def distributed() -> tuple[int, int]:
    """(rank, world size) from torchrun / accelerate's environment, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def run(cfg: Config, out: Path, progress: bool = True, should_stop=None) -> Path | None:
    """Run this process's shard; rank 0 then merges every shard and writes the report. Returns the report path."""
    from .report import write_report

    rank, world = distributed()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if world > 1 and not torch.distributed.is_initialized():
        import datetime

        # CPU-only barrier, works offline; shards can differ by hours, so the barrier must not time out at 30 min
        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(days=7))
        if cfg.device is None and torch.cuda.is_available():  # one GPU per process
            cfg.device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank)) % torch.cuda.device_count()}"
    Runner(cfg, out, rank, world, progress, should_stop).run()
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
