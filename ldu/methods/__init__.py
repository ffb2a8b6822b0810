"""The registry of protection methods: name -> Method (a params dataclass, a function and what protect() needs to know).

A method is `fn(backbone, x, params, draws, callback) -> (x_protected, stats)` over float32 [B,3,h,w] in [0,1]
canvases (`ldu.protect.Canvas`: the short side at the backbone's resolution, any h x w it accepts). It never does
I/O, resizing or the final budget projection: `ldu.protect()` does. `draws` is a fixed set of (t, eps) samples
its attacker loss may average over (`Method.draws(params)` of them per image); `callback(dict)` reports progress
and returns False to cancel (the method then raises `Cancelled`). Beside the images it returns a small stats dict
of what only it knows (its loss curve, the first gradient norm, decode mode's PSNR against its reconstruction).

The contract protect() relies on is declared, not guessed:
- every params dataclass derives from `MethodParams` (the attack `prompt` and the `seed`);
- `budget_field` names the parameter that binds (the app's budget slider, `match_psnr`'s bisection);
- `steps(params)`: progress steps of one call; `draws(params)`: fixed draws per image; `cost(params)`: UNet
  forward+backward equivalents per image (the time estimate);
- `per_image`: True when each photo is protected on its own (the same photo, seed and settings give the same bytes
  alone or with companions); False when the method learns from the whole set (ASPL's surrogate).

A new method is one file in this folder that defines `METHOD`: it is found and registered on import.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

from ..registry import Cancelled, Entry, Registry, check, finite, param, report  # noqa: F401  (re-exported for method files)

FIXED_DRAWS = 4  # fixed draws per image protect() makes for a method that does not say (its reported loss)


@dataclass(kw_only=True)
class MethodParams:
    """What every method's parameters have: the attack prompt the protection aims at (and its reported attacker
    loss is measured with), and the seed of its random draws (mixed with each photo's content by protect())."""

    prompt: str = param("a photo of sks person", "the attack prompt the protection aims at (and its reported loss)")
    seed: int = param(0, "seed of the method's random draws (protect() mixes in each photo's content)")


@dataclass(frozen=True, kw_only=True)
class Method(Entry):
    budget_field: str  # the parameter that binds: "budget_rms" or "linf"
    effort_field: str = "iterations"  # the parameter the app's effort slider sets (ASPL: rounds)
    effort_max: int = 200  # the slider's top (1 for a one-pass method)
    per_image: bool = True
    steps: Callable = lambda p: p.iterations
    draws: Callable = lambda p: FIXED_DRAWS
    budget: Callable | None = None  # params -> (rms, linf) that protect() enforces; default: the params' fields

    def budgets(self, params) -> tuple[float | None, float | None]:
        if self.budget is not None:
            return self.budget(params)
        return params.budget_rms, params.linf

    def describe(self, kind: str = "sd") -> dict:
        return {**super().describe(kind), "budget_field": self.budget_field, "per_image": self.per_image}


methods: Registry = Registry("method", Method)


def register(method: Method) -> Method:
    return methods.register(method)


def get_method(name: str) -> Method:
    return methods.entry(name)


def check_budget(p) -> None:
    finite(p, "budget_rms", "linf")
    for name in ("budget_rms", "linf"):
        v = getattr(p, name)
        check(v is None or 0 < v <= 1, f"{name} must be in (0, 1] pixel units (e.g. 8/255), got {v}")
    check(isinstance(p.prompt, str) and len(p.prompt) <= 1000,
          "prompt must be text of at most 1000 characters (the text encoder reads 77 tokens)")


def _discover() -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "METHOD", None), Method):
            register(module.METHOD)


_discover()
