"""The registry of protection methods: name -> Method(params dataclass, function).

A method is `fn(backbone, x, params, draws, callback) -> (x_protected, stats)` over float32 [B,3,h,w] in [0,1]
canvases (`ldu.protect.Canvas`: the short side at the backbone's resolution, any h x w it accepts; protect()
makes one call per shape). (DESIGN.md's contract returns x_protected alone; the small stats dict beside it
carries what only the method knows: its loss curve, the first gradient norm, decode mode's PSNR against its
reconstruction.) It never does I/O, resizing or the final budget projection: `ldu.protect()` does.
`draws` is the fixed set of (t, eps) samples its attacker loss averages over; `callback(dict)` reports
progress and returns False to cancel (the method then raises `Cancelled`). A new method is one file in
this folder plus one `register(...)` line below; the CLI, the app and the grid runner read this registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..registry import Cancelled, Entry, check, lookup, param, report  # noqa: F401  (re-exported for method files)


@dataclass(frozen=True, kw_only=True)
class Method(Entry):
    binds: str  # which budget binds, in words, for `python -m ldu methods` and the app
    budget: Callable | None = None  # params -> (rms, linf) that protect() enforces; default: the params' fields

    def budgets(self, params) -> tuple[float | None, float | None]:
        if self.budget is not None:
            return self.budget(params)
        return getattr(params, "budget_rms", None), getattr(params, "linf", None)

    def describe(self, kind: str = "sd") -> dict:
        return {**super().describe(kind), "binds": self.binds}


methods: dict[str, Method] = {}


def register(method: Method) -> Method:
    methods[method.name] = method
    return method


def get_method(name: str) -> Method:
    return lookup(methods, name, "method")


def check_budget(p) -> None:
    for name in ("budget_rms", "linf"):
        v = getattr(p, name, None)
        check(v is None or 0 < v <= 1, f"{name} must be in (0, 1] pixel units (e.g. 8/255), got {v}")


from . import advdm as _advdm  # noqa: E402
from . import aspl as _aspl  # noqa: E402
from . import ldu as _ldu  # noqa: E402
from . import mist as _mist  # noqa: E402
from . import photoguard_encoder as _photoguard  # noqa: E402
from . import pid as _pid  # noqa: E402

for _m in (_ldu, _advdm, _aspl, _photoguard, _mist, _pid):
    register(_m.METHOD)
