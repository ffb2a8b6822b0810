"""One registry shape for every kind of plug-in: protection methods, attacks, purifications and metrics.

An `Entry` is a name, a params dataclass whose fields document themselves (`param(default, help)`), a function, a
one-line summary, per-backbone-kind default overrides (one set: the app, the CLI and the grid runner all read
them), whether the app lists it, and its cost in UNet forward+backward equivalents (the time estimates). A
`Registry` maps names to entries of one type. The CLI, the app and the grid runner list and configure entries only
through this interface, so a new entry appears everywhere at once.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from fractions import Fraction
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


def finite(p, *names: str) -> None:
    """Every named numeric field of p is a finite number (NaN and inf are refused by name)."""
    for name in names:
        v = getattr(p, name)
        check(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)),
              f"{name} must be a finite number, got {v!r}")


@dataclass
class NoParams:
    """For entries without parameters (most metrics)."""


@dataclass(frozen=True, kw_only=True)
class Entry:
    name: str
    params: type
    fn: Callable
    summary: str
    defaults: dict = field(default_factory=dict)  # backbone kind -> overrides of the dataclass defaults
    listed: bool = True  # offered in the app's menus (every entry still works from the CLI and in grid configs)
    cost: Callable | None = None  # params -> UNet forward+backward equivalents of one run (time estimates)
    presets: dict = field(default_factory=dict)  # name -> overrides, chosen with the parameter `preset`

    def make_params(self, kind: str = "sd", **overrides):
        """The params for a backbone kind, with overrides; unknown names are refused by name. `preset=NAME` applies a
        named set of overrides first (the other overrides still win)."""
        names = {f.name for f in dataclasses.fields(self.params)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ValueError(f"{self.name} has no parameter {', '.join(unknown)} (it has: {', '.join(sorted(names))})")
        preset = overrides.get("preset") or ""
        if preset and preset not in self.presets:
            raise ValueError(f"{self.name} has no preset {preset!r} (it has: {', '.join(sorted(self.presets)) or 'none'})")
        return self.params(**{**self.defaults.get(kind, {}), **self.presets.get(preset, {}), **overrides})

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


class Registry(dict):
    """name -> Entry, for one kind of plug-in ("method", "attack", ...)."""

    def __init__(self, what: str, entry_type: type = Entry):
        super().__init__()
        self.what, self.entry_type = what, entry_type

    def register(self, entry: Entry) -> Entry:
        if not isinstance(entry, self.entry_type):
            raise TypeError(f"a {self.what} must be a {self.entry_type.__name__}, not {type(entry).__name__}")
        self[entry.name] = entry
        return entry

    def entry(self, name: str) -> Entry:
        if name not in self:
            raise ValueError(f"unknown {self.what} {name!r} (known: {', '.join(sorted(self))})")
        return self[name]

    def listed(self) -> list[str]:
        """The names the app offers, sorted."""
        return sorted(n for n, e in self.items() if e.listed)


def parse_number(text: str) -> float:
    """A finite float, or a fraction like 8/255 (budgets are in [0,1] pixel units)."""
    try:
        value = float(Fraction(text.strip()))
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"not a number or fraction: {text!r} (e.g. 0.03 or 8/255)") from None
    return value


def parse_overrides(items: list[str], params_cls, flag: str = "") -> dict:
    """NAME=VALUE items -> overrides, converted by the params dataclass's field types; unknown names refused.
    The CLI's --set, the app's advanced box and grid configs given as text all read parameters this way."""
    out = {}
    hints = typing.get_type_hints(params_cls)
    for item in items:
        if "=" not in item:
            raise ValueError(f"{flag}{item!r}: expected NAME=VALUE")
        name, value = item.split("=", 1)
        name = name.strip().replace("-", "_")
        if name not in hints:
            fields = ", ".join(f.name for f in dataclasses.fields(params_cls))
            raise ValueError(f"{flag}{name}: no such parameter (it has: {fields})")
        out[name] = _convert(value, hints[name], name, flag)
    return out


def _convert(value: str, hint, name: str, flag: str):
    kinds = typing.get_args(hint) or (hint,)
    v = value.strip()
    if type(None) in kinds and v.lower() in ("none", "off"):
        return None
    try:
        if bool in kinds:
            if v.lower() not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
                raise ValueError
            return v.lower() in ("1", "true", "yes", "on")
        if int in kinds:
            return int(v)
        if float in kinds:
            return parse_number(v)
    except ValueError:
        raise ValueError(f"{flag}{name}={value}: expected {' or '.join(k.__name__ for k in kinds)}") from None
    return v
