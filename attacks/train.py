"""The attack registry and `train()`, the one wrapper that owns an attack's inputs, outputs and bookkeeping.

An attack is `fn(backbone, views, params, workdir, callback) -> AttackOutput` over views [N,3,S,S] in [0,1]
(already prepared: short side resized, centre crop). It writes its weights into `workdir` in the format
diffusers' loaders read and reports progress through `callback` (False cancels). `train()` validates
everything before any training, runs the attack with a seeded generator, and moves the finished folder into
place only at the end, so a failed or cancelled run never leaves something that looks like a result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ldu.registry import Entry, check, lookup

from .adapter import RECORD, Adapter, finish
from .data import instance_views


@dataclass
class AttackOutput:
    kind: str  # lora | textual_inversion | dreambooth
    token: str
    prompt: str
    train_curve: list[float] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class Attack(Entry):
    kind: str


attacks: dict[str, Attack] = {}


def register(attack: Attack) -> Attack:
    attacks[attack.name] = attack
    return attack


def get_attack(name: str) -> Attack:
    return lookup(attacks, name, "attack")


def check_common(p, token_field: str = "token", prompt_field: str = "instance_prompt") -> None:
    """Checks every attack's params share: steps, learning rate, batch size, and the token in the prompt."""
    check(p.steps >= 1, f"steps must be at least 1, got {p.steps}")
    check(p.lr > 0, f"lr must be positive, got {p.lr}")
    check(p.batch_size >= 1, f"batch_size must be at least 1, got {p.batch_size}")
    token, prompt = getattr(p, token_field), getattr(p, prompt_field)
    check(bool(token.strip()), f"{token_field} must not be empty")
    check(token in re.findall(r"[^\s,.;:!?\"']+", prompt),
          f"{prompt_field} {prompt!r} does not contain the token {token!r}: the attack would learn nothing to call up")


def train(backbone, images, attack: str = "lora_dreambooth", params=None, out: str | Path | None = None,
          callback=None, overwrite: bool = False) -> Adapter:
    """Run a registered attack on 1+ images of a subject and return its Adapter (weights saved under `out`).

    params: the attack's dataclass, a dict of overrides of its defaults for this backbone kind, or None.
    out: the adapter folder (default: a new temporary folder). An existing non-empty folder is refused
    unless `overwrite`.
    """
    a = get_attack(attack)
    if params is None or isinstance(params, dict):
        params = a.make_params(backbone.kind, **(params or {}))
    elif not isinstance(params, a.params):
        raise TypeError(f"params for {attack} must be {a.params.__name__}, a dict or None, not {type(params).__name__}")
    views = instance_views(images, backbone.resolution)
    out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix=f"ldu-{attack}-"))
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: already holds files (choose another folder or pass overwrite)")
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    t0 = time.perf_counter()
    try:
        result = a.fn(backbone, views, params, work, callback)
        adapter = Adapter(kind=result.kind, path=out, base_spec=backbone.spec, base_revision=backbone.revision,
                          token=result.token, prompt=result.prompt, params=dataclasses.asdict(params),
                          train_curve=result.train_curve, seconds=time.perf_counter() - t0, attack=attack)
        (work / RECORD).write_text(json.dumps(adapter.to_json(), indent=2) + "\n")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out) if any(out.iterdir()) else out.rmdir()
    finish(work, out)
    return adapter
