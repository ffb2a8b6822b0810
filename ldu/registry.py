"""One registry shape for every kind of plug-in (protection methods, attacks, purifications, metrics).

An entry is a name, a params dataclass whose fields document themselves (`param(default, help)`), a function,
a one-line summary and per-backbone-kind default overrides. The CLI, the app and the grid runner list and
configure entries only through this interface, so a new entry appears everywhere at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable


class Cancelled(Exception):
    """The progress callback returned False: the caller asked to stop."""


def report(callback, info: dict) -> None:
    """Send progress to a callback(dict); raise Cancelled when it answers False."""
    if callback is not None and callback(info) is False:
        raise Cancelled(f"cancelled at {info.get('stage', '?')} step {info.get('step', '?')}")


def param(default, help: str, **kw):
    """A dataclass field that documents itself (the CLI's listings print the help)."""
    return field(default=default, metadata={"help": help, **kw})


def check(condition: bool, message: str) -> None:
    """Parameter validation for the params dataclasses' __post_init__: a ValueError that names the problem."""
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, kw_only=True)
class Entry:
    name: str
    params: type
    fn: Callable
    summary: str
    defaults: dict = field(default_factory=dict)  # backbone kind -> overrides of the dataclass defaults

    def make_params(self, kind: str = "sd", **overrides):
        """The params for a backbone kind, with overrides; unknown names are refused by name."""
        names = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"{self.name} has no parameter {', '.join(unknown)} (it has: {', '.join(sorted(names))})")
        return self.params(**{**self.defaults.get(kind, {}), **overrides})

    def describe(self, kind: str = "sd") -> dict:
        defaults = self.make_params(kind)
        return {
            "name": self.name,
            "summary": self.summary,
            "params": [
                {"name": f.name, "default": getattr(defaults, f.name), "help": f.metadata.get("help", "")}
                for f in dataclasses.fields(self.params)
            ],
        }


def lookup(registry: dict, name: str, what: str):
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(sorted(registry))})")
    return registry[name]
