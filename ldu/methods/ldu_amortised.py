"""LDU, amortised: the latent shift comes from a generator trained once for the backbone (ldu/amortised.py), so a
photo costs one VAE encode, one generator pass and one VAE decode (no UNet). The fast option of the app."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..metrics import psnr
from . import Method, MethodParams, check, check_budget, param, report

GENERATORS = Path(__file__).resolve().parent.parent.parent / "assets" / "generators"


@dataclass
class AmortisedParams(MethodParams):
    budget_rms: float | None = param(8 / 255, "per-image RMS of the final residual, [0,1] pixels (the binding budget)")
    linf: float | None = param(16 / 255, "cap on every pixel of the residual, [0,1] pixels")
    generator: str = param("", "folder of a trained generator (default: the one shipped for the backbone, "
                               "assets/generators/<backbone>)")
    iterations: int = param(1, "1: one generator pass; 0: no change (the contract's zero-iteration case)")
    mode: str = param("residual", "residual (the shift's change added to the photo) or decode (added to its VAE "
                                  "reconstruction, the paper's output form; the budget holds against the reconstruction)")

    def __post_init__(self):
        check_budget(self)
        check(self.iterations in (0, 1), f"iterations must be 0 or 1 (one forward pass), got {self.iterations}")
        check(self.mode in ("residual", "decode"), f"mode must be 'residual' or 'decode', got {self.mode!r}")
        check(self.mode == "residual" or self.budget_rms is not None,
              "decode mode needs budget_rms (measured against the reconstruction)")


def generator_folder(backbone, p: AmortisedParams) -> Path:
    if p.generator:
        return Path(p.generator)
    folder = GENERATORS / backbone.kind
    if not (folder / "generator.safetensors").exists():
        shipped = sorted(g.parent.name for g in GENERATORS.glob("*/generator.safetensors")) or ["none"]
        raise ValueError(f"ldu_amortised: no generator ships for the {backbone.kind} backbone (shipped: "
                         f"{', '.join(shipped)}); train one with `python -m ldu.amortised train --model ...` and pass "
                         "generator=<its folder>, or use ldu")
    return folder


@torch.no_grad()
def amortised(backbone, x: torch.Tensor, p: AmortisedParams, draws, callback=None):
    if p.iterations == 0:
        return x.clone(), {"generator": None}
    from ..amortised import load, protect_batch  # here: `python -m ldu.amortised` must not find itself imported

    gen, record = load(generator_folder(backbone, p), backbone)
    out, base = protect_batch(backbone, gen, x, p.budget_rms, p.linf, mode=p.mode, with_base=True)
    report(callback, {"stage": "ldu_amortised", "step": 1, "total": 1})
    extra = {}
    if p.mode == "decode":  # what decode mode's budget is measured against, as per-image LDU reports it
        extra["psnr_vs_base"] = [psnr(o, b) for o, b in zip(out, base)]
    return out, {**extra, "generator": str(generator_folder(backbone, p)), "generator_hash": record["hash"],
                 "generator_backbone_revision": record.get("backbone_revision")}


METHOD = Method(
    name="ldu_amortised", params=AmortisedParams, fn=amortised, budget_field="budget_rms",
    budget=lambda p: (p.budget_rms, p.linf) if p.mode == "residual" else (None, None),  # decode: against the reconstruction
    summary="LDU with the amortised generator: the latent shift in one forward pass (train one: python -m ldu.amortised)",
    cost=lambda p: 0.5 * p.iterations,  # one VAE encode, one generator pass, one decode: no UNet
    effort_field="iterations", effort_max=1,
    listed=any(GENERATORS.glob("*/generator.safetensors")),  # the app offers it once a generator ships
)
