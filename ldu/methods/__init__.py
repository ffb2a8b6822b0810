"""The registry of protection methods: name -> Method(params dataclass, function).

A method is `fn(backbone, x, params, draws, callback) -> (x_protected, stats)` over float32 [B,3,h,w] in [0,1]
at the working size. It never does I/O, resizing or the final budget projection: `ldu.protect()` does.
`draws` is the fixed set of (t, eps) samples its attacker loss averages over; `callback(dict)` reports
progress and returns False to cancel (the method then raises `Cancelled`). A new method is one file in
this folder plus one `register(...)` line below; the CLI, the app and the grid runner read this registry.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable


class Cancelled(Exception):
    """The progress callback returned False: the caller asked to stop."""


def report(callback, info: dict) -> None:
    """Send progress to the callback; raise Cancelled when it answers False."""
    if callback is not None and callback(info) is False:
        raise Cancelled(f"cancelled at {info.get('stage', '?')} step {info.get('step', '?')}")


def param(default, help: str, **kw):
    """A dataclass field that documents itself (`python -m ldu methods` prints the help)."""
    return field(default=default, metadata={"help": help, **kw})


@dataclass(frozen=True)
class Method:
    name: str
    params: type
    fn: Callable
    summary: str
    binds: str  # which budget binds, in words, for `python -m ldu methods` and the app
    defaults: dict = field(default_factory=dict)  # backbone kind -> overrides of the dataclass defaults
    budget: Callable | None = None  # params -> (rms, linf) that protect() enforces; default: the params' fields

    def make_params(self, kind: str = "sd", **overrides):
        """The method's params for a backbone kind, with overrides; unknown names are refused by name."""
        names = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"{self.name} has no parameter {', '.join(unknown)} (it has: {', '.join(sorted(names))})")
        values = {**self.defaults.get(kind, {}), **overrides}
        return self.params(**values)

    def budgets(self, params) -> tuple[float | None, float | None]:
        if self.budget is not None:
            return self.budget(params)
        return getattr(params, "budget_rms", None), getattr(params, "linf", None)

    def describe(self, kind: str = "sd") -> dict:
        defaults = self.make_params(kind)
        return {
            "name": self.name,
            "summary": self.summary,
            "binds": self.binds,
            "params": [
                {"name": f.name, "default": getattr(defaults, f.name), "help": f.metadata.get("help", "")}
                for f in dataclasses.fields(self.params)
            ],
        }


methods: dict[str, Method] = {}


def register(method: Method) -> Method:
    methods[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in methods:
        raise ValueError(f"unknown method {name!r} (known: {', '.join(sorted(methods))})")
    return methods[name]


def check(condition: bool, message: str) -> None:
    """Parameter validation for the params dataclasses' __post_init__: a ValueError that names the problem."""
    if not condition:
        raise ValueError(message)


def check_budget(p) -> None:
    for name in ("budget_rms", "linf"):
        v = getattr(p, name, None)
        check(v is None or 0 < v <= 1, f"{name} must be in (0, 1] pixel units (e.g. 8/255), got {v}")


from . import ldu as _ldu  # noqa: E402  (registers itself)

register(_ldu.METHOD)
