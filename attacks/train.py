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
from typing import Callable

from ldu.protect import instance_views
from ldu.registry import Entry, Registry, check, finite, param

from .adapter import RECORD, Adapter, finish


@dataclass
class AttackOutput:
    kind: str  # lora | textual_inversion | dreambooth
    token: str
    prompt: str
    train_curve: list[float] = field(default_factory=list)


MAX_STEPS = 100_000


@dataclass(kw_only=True)
class AttackParams:
    """What every attack's parameters have; each attack sets its own defaults and adds its own fields."""

    steps: int = param(400, "training steps")
    lr: float = param(1e-4, "AdamW learning rate")
    batch_size: int = param(1, "instance images per step")
    token: str = param("sks", "the rare instance word")
    instance_prompt: str = param("a photo of sks person", "training prompt; must contain the token")
    seed: int = param(0, "seed of the attack's initialisation, data order, noise and timesteps")

    def __post_init__(self):
        finite(self, "lr")
        check(1 <= self.steps <= MAX_STEPS, f"steps must be 1 to {MAX_STEPS}, got {self.steps}")
        check(self.lr > 0, f"lr must be positive, got {self.lr}")
        check(1 <= self.batch_size <= 64, f"batch_size must be 1 to 64, got {self.batch_size}")
        check(bool(self.token.strip()), "token must not be empty")
        check(len(self.instance_prompt) <= 1000, "instance_prompt must be at most 1000 characters (77 tokens are read)")
        check(self.token in re.findall(r"[^\s,.;:!?\"']+", self.instance_prompt),
              f"instance_prompt {self.instance_prompt!r} does not contain the token {self.token!r}: the attack would "
              "learn nothing to call up")


# The attack the app, the CLIs and the grid run when none is named, per backbone kind. On pocket v2 a LoRA of the UNet
# (rank 4-32, lr 3e-4 to 5e-3, with or without the text encoder) learned little of a subject; full DreamBooth at lr
# 5e-4 for 900 steps draws three of the five built-in subjects in about a minute, and with pocket's 8-caption prior
# (attacks/dreambooth.py) the other prompts stay off the subject (docs/RESULTS.md).
DEFAULT_ATTACK = {"pocket": "dreambooth"}


def default_attack(kind: str) -> str:
    """The attack to run on a backbone of this kind when the user names none."""
    return DEFAULT_ATTACK.get(kind, "lora_dreambooth")


def subject_prompts(noun: str, token: str = "sks") -> dict:
    """An attack's prompts for a subject of this class noun (DreamBooth's "a photo of sks dog")."""
    return {"instance_prompt": f"a photo of {token} {noun}", "class_prompt": f"a photo of a {noun}"}


@dataclass(frozen=True, kw_only=True)
class Attack(Entry):
    kind: str
    # noun -> the overrides that aim the attack at a subject of that class (its instance prompt, ...)
    prompts: Callable = subject_prompts


attacks: Registry = Registry("attack", Attack)


def register(attack: Attack) -> Attack:
    return attacks.register(attack)


def get_attack(name: str) -> Attack:
    return attacks.entry(name)


def aimed(attack: str, noun: str, params: dict | None = None, *, kind: str) -> dict:
    """An attack's parameter overrides aimed at a subject of class `noun`, plus `params` (which win), keeping
    only the names the attack has. `kind` (required, so no caller forgets it): the backbone's kind; a prompt the
    attack's defaults for that kind set (pocket's DreamBooth names its own class prompts) is kept, not replaced by
    the noun's."""
    entry = get_attack(attack)
    names = {f.name for f in dataclasses.fields(entry.params)} - set(entry.defaults.get(kind, {}))
    return {**{k: v for k, v in entry.prompts(noun).items() if k in names}, **(params or {})}


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
