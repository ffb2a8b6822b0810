"""What the app's tabs compute, as plain functions: app.py only wires widgets to these, and scripts, tests and
benchmarks drive the same loop without gradio (this module never imports it).

Every job returns a `JobResult` (status ok | stopped | error, a message for people, the outputs), so a Stop, a
validation error and running out of GPU memory are handled here, once, for every tab:

    result = run_job(protect_photos, paths, backbone, "ldu", params, out_dir, callback=...)
    result.status, result.message, result.outputs["protected"]
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import math
import queue
import shutil
import statistics
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attacks import get_attack, purifications
from attacks.purify import PurificationUnavailable
from ldu.backbone import BackboneError
from ldu.io import ImageLoadError, load_images, oriented_size, save_png
from ldu.methods import get_method, methods
from ldu.protect import MAX_BATCH, canvases_for, check_job_size, protect, squeezed_note, to_pil, working_size
from ldu.registry import Cancelled, parse_overrides
from ldu.subjects import get_subject

from . import experiment
from .compare import survives_posting as measure_posting
from .config import quick as quick_config
from .grid import run as run_grid
from .metrics import MetricUnavailable, measure

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "assets" / "examples"
MAX_PROMPT_CHARS = 300  # the text encoder reads 77 tokens; longer text only costs memory
MAX_ADVANCED_CHARS = 2000


# ---- one result type for every job --------------------------------------------------------------------------
@dataclass
class JobResult:
    status: str  # "ok" | "stopped" | "error"
    message: str  # for people
    outputs: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class Progress:
    """Wraps a progress callback: remembers the stage (for messages) and cancels when `should_stop()` says so."""

    def __init__(self, callback=None, should_stop=None):
        self.callback, self.should_stop, self.stage = callback, should_stop or (lambda: False), "starting"

    def __call__(self, info: dict) -> bool:
        self.stage = info.get("stage", self.stage)
        if self.should_stop():
            return False
        if self.callback is not None and self.callback(info) is False:
            return False
        return True


USER_ERRORS = (ValueError, ImageLoadError, BackboneError, PurificationUnavailable, MetricUnavailable, FileExistsError)
OOM_ADVICE = {"protect": "try fewer photos, smaller photos or fewer iterations",
              "attack": "try fewer steps, fewer generations or the LoRA attack",
              "batch": "try fewer methods, seeds or attack steps"}


def run_job(work, *args, kind: str = "protect", progress: Progress | None = None, **kwargs) -> JobResult:
    """Run work(*args, callback=progress, **kwargs) -> (message, outputs) and say how it ended.

    Cancelled -> stopped; out of GPU memory (at any stage) -> one message, and the memory is freed for the next job;
    a bad input or setting -> its message; anything else -> its type and message (the traceback goes to the log)."""
    progress = progress or Progress()
    oom = None
    try:
        message, outputs = work(*args, callback=progress, **kwargs)
        return JobResult("ok", message, outputs)
    except Cancelled:
        return JobResult("stopped", "Stopped. Nothing was kept from this run.")
    except torch.cuda.OutOfMemoryError:
        oom = progress.stage  # free the memory below, once the traceback (which holds the tensors) is gone
    except USER_ERRORS as err:
        return JobResult("error", str(err))
    except Exception as err:  # noqa: BLE001  (the app keeps serving; the log has the details)
        log.exception("job failed")
        return JobResult("error", f"{type(err).__name__}: {str(err)[:500]}")
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return JobResult("error", f"Out of GPU memory while {oom}: {OOM_ADVICE.get(kind, 'try a smaller job')}.")


# ---- formatting --------------------------------------------------------------------------------------------
def fmt(value, unit: str = "", digits: int = 3) -> str:
    """3 significant digits (never 17), with a unit; texts ('unavailable: ...') are shortened to their first words."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return "unavailable" if value.startswith("unavailable") else value
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return "∞" if math.isinf(value) else "–"
    text = f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return f"{text} {unit}".strip()


def percent(share: float, noise: float | None = None) -> str:
    text = f"{100 * share:.0f} %"
    return text if noise is None else f"{text} ± {100 * noise:.0f} %"


# ---- parameters from the app's widgets -----------------------------------------------------------------------
def method_params(method: str, kind: str, effort=None, budget_255=None, seed=None, advanced: str = "", noun: str | None = None):
    """The method's params for a backbone kind from the app's controls: effort (its `effort_field`), the binding
    budget in /255 (its `budget_field`), the seed, NAME=VALUE lines, and the subject's prompt."""
    m = get_method(method)
    overrides: dict = {}
    for name, value, what in ((m.effort_field, effort, "integer"), ("seed", seed, "integer")):
        if value is None:
            continue
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0 or value != int(value):
            raise ValueError(f"{'Iterations' if name == m.effort_field else 'Seed'} must be a whole number 0 or more, got {value!r}")
        overrides[name] = int(value)
    if budget_255 is not None:
        if not isinstance(budget_255, (int, float)) or not math.isfinite(budget_255) or not 0 < budget_255 <= 255:
            raise ValueError(f"Budget must be a number in (0, 255] (x/255), got {budget_255!r}")
        overrides[m.budget_field] = float(budget_255) / 255
    if noun:
        overrides["prompt"] = f"a photo of sks {noun}"
    overrides.update(advanced_overrides(advanced, m.params))
    return m.make_params(kind, **overrides)


def whole(value, name: str, low: int, high: int) -> int:
    """A whole-number control's value, or a ValueError naming it (NaN, inf, fractions and out-of-range values)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value != int(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a whole number from {low} to {high}, got {value!r}")
    return int(value)


def advanced_overrides(text: str, params_cls) -> dict:
    text = text or ""
    if len(text) > MAX_ADVANCED_CHARS:
        raise ValueError(f"Advanced parameters: at most {MAX_ADVANCED_CHARS} characters, got {len(text)}")
    items = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    out = parse_overrides(items, params_cls)
    for k, v in out.items():
        if isinstance(v, str) and len(v) > MAX_PROMPT_CHARS:
            raise ValueError(f"{k}: at most {MAX_PROMPT_CHARS} characters (the text encoder reads 77 tokens)")
    return out


def clean_noun(noun: str | None) -> str:
    """What the photos show, as the attack's class noun ("person", "dog"): one or two plain words."""
    words = (noun or "").strip().lower().split()
    if not words:
        return "person"
    if len(words) > 3 or len(" ".join(words)) > 40 or not all(w.isalpha() for w in words):
        raise ValueError("What the photos show: one to three plain words, e.g. 'person', 'dog' or 'red car'")
    return " ".join(words)


# ---- the built-in subjects ------------------------------------------------------------------------------------
def file_sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


EXPIRED = ("These photos are no longer on the server (a session's files are deleted after a few idle minutes): "
           "upload and protect them again.")


def still_there(state: dict | None) -> bool:
    """Are a protected set's files (and the clean photos it was made from) still on disk?"""
    return bool(state) and all(Path(p).exists() for p in state["paths"] + state.get("clean", []))


def example_subjects() -> dict[str, dict]:
    """name -> its subject.json plus the paths of its train and held-out example views."""
    out = {}
    for record in sorted(EXAMPLES.glob("*/subject.json")):
        info = json.loads(record.read_text())
        folder = record.parent
        info["train_paths"] = sorted(str(p) for p in (folder / "train").glob("*.png"))
        info["held_out_paths"] = sorted(str(p) for p in (folder / "held_out").glob("*.png"))
        out[info["name"]] = info
    return out


def builtin_subject(paths) -> dict | None:
    """The built-in subject whose training examples these uploads are (by content, not by file name), or None."""
    if not paths:
        return None
    uploaded = {file_sha(p) for p in paths}
    for info in example_subjects().values():
        if uploaded <= {file_sha(p) for p in info["train_paths"]}:
            return info
    return None


# ---- Protect ---------------------------------------------------------------------------------------------------
def load_uploads(paths, max_files: int = MAX_BATCH) -> list:
    if not paths:
        raise ValueError("Upload 1 to 8 photos of one subject first (or click an example).")
    if len(paths) > max_files:
        raise ValueError(f"{len(paths)} files: upload at most {max_files} photos of one subject.")
    try:
        sizes = [oriented_size(p) for p in paths]
    except Exception:  # noqa: BLE001  (the loader below names the bad file)
        sizes = None
    if sizes:
        check_job_size(sizes)  # before decoding anything large
    try:
        return load_images(list(paths))
    except ImageLoadError as err:
        raise ValueError(" · ".join(f"{Path(n).name}: {p}" for n, p in err.problems)) from None


def fingerprint(paths, backbone, method: str, params) -> str:
    """What a protected set was made from: the uploads' content, the model and its revision, the method and its
    parameters. The Attack tab refuses a set whose fingerprint no longer matches the current settings."""
    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha(p).encode())
    h.update(json.dumps([backbone.spec, backbone.revision, method, dataclasses.asdict(params)], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def protect_photos(paths, backbone, method: str, params, out_dir: Path, callback=None):
    """Protect the uploads; write PNGs + manifests, the clean PNG of the first photo (for the slider) and its
    difference map x10. Returns (message, outputs)."""
    images = load_uploads(paths)
    result = protect(images, backbone, method=method, params=params, callback=callback)
    callback and callback({"stage": "saving", "step": 0, "total": 1})
    out_dir.mkdir(parents=True, exist_ok=True)
    protected = result.save(out_dir)
    manifests = [p.with_suffix(".json") for p in protected]
    first_clean = save_png(images[0].pixels, images[0], out_dir / "clean" / f"{protected[0].stem}.png")
    difference = difference_map(images[0].pixels, result.images[0], out_dir / "difference_x10.png")
    rows = []
    for p, s, src, prot in zip(protected, result.stats["images"], result.sources, result.images):
        callback and callback({"stage": "measuring", "step": len(rows), "total": len(protected)})
        lp = measure("lpips", [src.pixels], [prot])
        rows.append([p.name, fmt(s["psnr"], "dB"), fmt(s["ssim"]), fmt(lp), fmt(s["rms_255"], "/255"), fmt(s["linf_255"], "/255"),
                     fmt(s["attacker_loss_protected"] - s["attacker_loss_clean"])])
    b = result.stats["batch"]
    mean_psnr = statistics.fmean(s["psnr"] for s in result.stats["images"])
    message = (f"{method} protected {len(protected)} photo(s) in {b['seconds']:.0f} s: {fmt(mean_psnr, 'dB')} PSNR on "
               f"average. The loss an attacker's fine-tuning starts from rose by "
               f"{fmt(b['attacker_loss_protected'] - b['attacker_loss_clean'])} (more is harder to learn). "
               "Attack them in the next tab to see whether it matters.")
    squeezed = [p.name for p, s in zip(protected, result.stats["images"]) if s.get("squeezed")]
    if squeezed:
        message += f"\n\n⚠️ {squeezed_note(squeezed)}."
    unavailable = lp if isinstance(lp, str) else None
    return message, {"protected": [str(p) for p in protected], "manifests": [str(p) for p in manifests],
                     "slider": (str(first_clean), str(protected[0])), "difference": str(difference), "rows": rows,
                     "unavailable": {"lpips": unavailable} if unavailable else {}}


STAT_HEADERS = ["file", "PSNR", "SSIM", "LPIPS", "RMS", "L∞", "attacker loss +"]


def difference_map(clean: torch.Tensor, protected: torch.Tensor, path: Path, max_side: int = 512) -> Path:
    """The residual x10 around mid-grey, as PNG, enlarged (nearest) to at least max_side/2 so it is visible."""
    d = (protected.float() - clean.float()).permute(1, 2, 0).numpy() * 10 + 0.5
    img = Image.fromarray((np.clip(d, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, (max_side // 2) // max(img.size))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    img.save(path)
    return path


def survives_posting(paths, protected_paths, backbone, prompt: str, callback=None):
    clean = [im.pixels for im in load_uploads(paths)]
    protected = [im.pixels for im in load_uploads(protected_paths)]
    r = measure_posting(backbone, clean, protected, prompt)
    kept = "–" if r["kept"] != r["kept"] else f"{100 * r['kept']:.0f} %"
    return (f"After a 0.75× resize and JPEG at quality 85 (what a social network does), the protection keeps {kept} of "
            f"its effect on the attacker's starting loss ({fmt(r['gain'])} → {fmt(r['gain_after_posting'])}). This is a "
            "quick proxy, not what an attack learns. Measured on what attacks learn at JPEG 75, 32 dB (docs/RESULTS.md, "
            "`python -m eval.efficacy --purify posting`): on the shipped pocket LDU's share was about as large after "
            "posting as before (+0.11 ± 0.16 against +0.12 ± 0.14 over 8 photo sets; Gaussian noise of the same PSNR "
            "+0.00 after posting); on pocket v2 it was gone."), r


# ---- Attack ---------------------------------------------------------------------------------------
def attack_setup(backbone, train_paths, held_out_paths, noun: str | None, attack: str, steps, seed, n_gen,
                 subject: dict | None = None) -> experiment.Setup:
    """The paired experiment the Attack tab runs: the uploads as training views; held-out views from the built-in
    subject (when the uploads are its examples) or from the user's own held-out photos; the subject's noun."""
    steps, n_gen, seed = whole(steps, "Training steps", 1, 5000), whole(n_gen, "Generations", 2, 8), whole(seed, "Seed", 0, 2**31)
    train = [im.pixels for im in load_uploads(train_paths)]
    held = None
    if subject is not None:
        held = [im.pixels for im in load_images(subject["held_out_paths"])]
        noun = subject["class_noun"]
    elif held_out_paths:
        held = [im.pixels for im in load_uploads(held_out_paths, max_files=16)]
    subjects = {n: [im.pixels for im in load_images(info["held_out_paths"])] for n, info in example_subjects().items()} \
        if subject is not None else None
    return experiment.Setup(train=train, held_out=held, noun=clean_noun(noun), seed=int(seed), attack=attack,
                            attack_params={"steps": int(steps)}, n_gen=int(n_gen), other_prompts=(),
                            subjects=subjects, subject=subject["name"] if subject else None)


def attack_both(backbone, setup: experiment.Setup, protected_paths, purification: str = "none", out_dir: Path | None = None,
                callback=None, cache: dict | None = None, seeds: int = 1):
    """The paired experiment on the protected set, for `seeds` seeds (setup.seed, setup.seed + 1, ...: other LoRA, draws
    and generations; the same photos); returns (verdict, outputs). The images shown are the first seed's."""
    if purification != "none" and purification not in purifications:
        raise ValueError(f"unknown purification {purification!r}")
    seeds = whole(seeds, "Seeds", 1, 5)
    protected = [im.pixels for im in load_uploads(protected_paths)]
    runs = []
    for k in range(int(seeds)):
        one = dataclasses.replace(setup, seed=setup.seed + k)
        step = None if callback is None else (lambda info, k=k: callback({**info, "seed": k + 1, "seeds": int(seeds)}))
        runs.append(experiment.paired(backbone, one, protected, purification=(purification, {}), callback=step, cache=cache))
    run = runs[0]
    outputs = {"verdict": verdict(combine([r.result for r in runs]), seeds=len(runs),
                                  first=experiment.verdict_measure(backbone.kind)), "result": run.result,
               "results": [r.result for r in runs],
               "curves": (run.clean.train_curve, run.protected.train_curve),
               "generations": (run.clean.generations[run.clean.prompt], run.protected.generations[run.protected.prompt]),
               "references": setup.held_out or setup.train, "references_are_held_out": setup.held_out is not None,
               "rows": result_rows(run), "prompt": run.clean.prompt}
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, images in (("reference", outputs["references"]), ("clean", outputs["generations"][0]),
                             ("protected", outputs["generations"][1])):
            paths = []
            for i, im in enumerate(images):
                paths.append(str(out_dir / f"{name}_{i}.png"))
                to_pil(im).save(paths[-1])
            outputs[f"{name}_paths"] = paths
    return outputs["verdict"], outputs


def combine(results: list[dict]) -> dict:
    """Several seeds' results as one, for each share (loss, generation): its mean, its spread over seeds, the mean
    draw noise; the first reason when a seed could not be measured."""
    out: dict = {}
    for key in ("prevented_loss", "prevented_generation"):
        shares = [r.get(key) for r in results]
        if any(v is None or isinstance(v, str) for v in shares):
            out[key] = next((v for v in shares if isinstance(v, str)), experiment.TOO_LITTLE)
            continue
        out[key] = statistics.fmean(shares)
        out[f"{key}_noise"] = statistics.fmean(r.get(f"{key}_noise") or 0.0 for r in results)
        if len(shares) > 1:
            out[f"{key}_spread"] = statistics.stdev(shares)
    return out


def verdict(result: dict, seeds: int = 1, first: str = "prevented_loss") -> str:
    """The answer in words: how much less the attacker learned (± its spread over seeds), with the draw noise, or why
    there is no answer. `first`: the share read first (`experiment.verdict_measure(kind)`); the other one when that
    one is unavailable (the attack did not show its learning there)."""
    other = "prevented_generation" if first == "prevented_loss" else "prevented_loss"
    key, share = first, result.get(first)
    if experiment.NO_HELD_OUT in (result.get("prevented_loss"), result.get("prevented_generation")):
        return ("**No verdict:** there are no held-out photos of this subject, so what the attacker learned cannot "
                "be measured on photos it never saw. Add a few other photos of the same subject under *Held-out "
                "photos*, or try an example subject. The generations below are still what each attack produced.")
    if (share is None or isinstance(share, str)) and isinstance(result.get(other), (int, float)):
        key, share = other, result.get(other)
    if share is None or isinstance(share, str):
        return ("**No verdict:** the attack on the clean photos learned too little to measure a difference (its "
                "effect is within the draw noise). Try more training steps.")
    noise = result.get(f"{key}_noise") or 0.0
    spread = result.get(f"{key}_spread")
    on = "" if key == "prevented_loss" else ", on the generations' likeness"
    runs = f"{seeds} seed{'s' if seeds > 1 else ''}; draw noise ±{100 * noise:.0f} %{on}"
    uncertain = max(2 * noise, spread or 0.0)
    shown = percent(abs(share), spread)
    if abs(share) <= uncertain:
        more = " One seed can also miss an effect: use 3 seeds for a verdict." if seeds == 1 else ""
        return f"**No measurable protection on this run** ({percent(share, spread)}, within noise; {runs}).{more}"
    if seeds == 1:
        # The draw noise is the measurement's; the attack's own run-to-run spread is not in it, and on pocket a
        # single run of the noise control (true share 0) spreads ±9-14 % over subjects x seeds (docs/RESULTS.md): one
        # run is a lean, not a verdict, and the headline says so.
        lean, how = ("toward protection", "less") if share > 0 else ("the other way", "more")
        return (f"**One run leans {lean}, not yet a verdict:** the attacker learned {shown} {how} from the protected "
                f"photos on this seed ({runs}). One seed cannot separate this from the attack's run-to-run spread: "
                "use 3 seeds for a verdict.")
    if share < 0:
        return f"**The protection helped the attacker**: it learned {shown} more ({runs})."
    return f"**The attacker learned {shown} less** from the protected photos ({runs})."


def result_rows(run) -> list[list]:
    """The comparison table: what each number measures, named by it; the raw losses last."""
    r, b, c, p = run.result, run.base.measures, run.clean.measures, run.protected.measures
    if "post_attack_loss" not in c:
        return [["learning prevented", experiment.NO_HELD_OUT.removeprefix("unavailable: "), "", ""]]
    rows = [
        ["learning prevented (loss on held-out views)", fmt(r["prevented_loss"]) if isinstance(r["prevented_loss"], str)
         else percent(r["prevented_loss"], r.get("prevented_loss_noise")), "", ""],
        ["learning prevented (generations' likeness)", fmt(r["prevented_generation"]) if isinstance(r["prevented_generation"], str)
         else percent(r["prevented_generation"], r.get("prevented_generation_noise")), "", ""],
        ["diffusion loss on held-out views (lower: learned more)", fmt(b["post_attack_loss"]), fmt(c["post_attack_loss"]),
         fmt(p["post_attack_loss"])],
        ["distance of generations to the subject (lower: more alike)", fmt(b["gen_distance_mean"]), fmt(c["gen_distance_mean"]),
         fmt(p["gen_distance_mean"])],
    ]
    if "retrieval" in c:
        rows.append(["generations recognised as the subject", percent(b["retrieval"]), percent(c["retrieval"]), percent(p["retrieval"])])
    if "train_views_retrieval" in b:  # what the measure makes of the subject's own photos: its ceiling
        rows.append(["the training photos themselves, recognised as the subject", percent(b["train_views_retrieval"]), "", ""])
    return rows


RESULT_HEADERS = ["measure", "no attack", "attack on clean", "attack on protected"]


def smoothed(curve: list[float], window: int | None = None) -> list[float]:
    """A moving average (window ~ 1/10 of the curve) so two noisy loss curves can both be read."""
    if not curve:
        return []
    window = window or max(1, len(curve) // 10)
    c = np.cumsum(np.insert(np.asarray(curve, float), 0, 0.0))
    return [float((c[i + 1] - c[max(0, i + 1 - window)]) / (i + 1 - max(0, i + 1 - window))) for i in range(len(curve))]


# ---- time estimates -------------------------------------------------------------------------------------------
_UNET_SECONDS: dict = {}


def unet_seconds(backbone) -> float:
    """One UNet forward+backward at batch 1 on this backbone (measured once per backbone and cached)."""
    key = (backbone.spec, str(backbone.device), str(backbone.dtype))
    if key not in _UNET_SECONDS:
        c = backbone.encode_prompt("")
        z = torch.randn(1, *backbone.latent_shape(), device=backbone.device, requires_grad=True)
        backbone.predict(z, 500, c).sum().backward()  # warm-up
        t0 = time.perf_counter()
        backbone.predict(z, 500, c).sum().backward()
        if backbone.device.type == "cuda":
            torch.cuda.synchronize()
        _UNET_SECONDS[key] = time.perf_counter() - t0
    return _UNET_SECONDS[key]


def estimate_protect(backbone, method: str, params, sizes: list[tuple[int, int]]) -> float:
    """Seconds for protect(): the method's declared cost (UNet-call equivalents per photo) x the measured UNet time,
    x each photo's canvas area in squares (a 4:3 photo's canvas is about 4/3 of a square one)."""
    side = working_size(backbone)
    per_photo = get_method(method).cost(params)
    area = sum(c.H * c.W / side**2 for c in canvases_for(sizes, backbone))
    return per_photo * area * unet_seconds(backbone)


def estimate_attack(backbone, attack: str, params_overrides: dict, n_gen: int) -> float:
    """Seconds for Attack both: two attacks, plus generations (CFG: two forward passes per step) for three sides."""
    entry = get_attack(attack)
    params = entry.make_params(backbone.kind, **params_overrides)
    steps, _ = experiment.GENERATION.get(backbone.kind, experiment.GENERATION["sd"])
    generation = 3 * n_gen * steps * 2 * 0.4  # a forward pass is ~0.4 of a forward+backward
    return (2 * entry.cost(params) + generation) * unet_seconds(backbone)


def estimate_batch(backbone, chosen: list[str], chosen_purifications: list[str], attack: str, steps, seeds, match: bool) -> float:
    """Seconds for a Batch grid: per seed, one clean cell and one cell per method x purification (an attack, its
    measures and generations each), plus each method's protection (x ~3 with PSNR matching, once)."""
    cells = int(seeds) * (1 + len(chosen) * (1 + len(chosen_purifications)))
    per_cell = estimate_attack(backbone, attack, {"steps": int(steps)}, 2) / 2 * 1.5  # one attack + generations
    side = working_size(backbone)
    protects = sum(estimate_protect(backbone, m, get_method(m).make_params(backbone.kind), [(side, side)] * 4)
                   for m in chosen if m in methods)
    return cells * per_cell + protects * (int(seeds) + (3 if match else 0))


MY_UPLOADS = "my uploads"
MATCH_PSNR = (20, 50)  # dB: the range the Batch tab's PSNR matching accepts


def batch_config(model: str, chosen_methods, chosen_purifications, attack: str, steps, image_set: str, seeds, match,
                 paths=(), held_paths=(), noun: str | None = None, folder: Path | None = None):
    """The Batch tab's grid config: a built-in subject, or the uploads (copied into `folder`, with the held-out photos
    in a subfolder; names made unique, so two uploads called image.png are both kept)."""
    steps, seeds = whole(steps, "Attack steps", 1, 5000), whole(seeds, "Seeds", 1, 5)
    if match is not None and not (isinstance(match, (int, float)) and MATCH_PSNR[0] <= match <= MATCH_PSNR[1]):
        raise ValueError(f"Match PSNR: a PSNR in dB from {MATCH_PSNR[0]} to {MATCH_PSNR[1]}, or empty")
    if image_set == MY_UPLOADS:
        if not paths:
            raise ValueError("Upload photos in the Protect tab first, or pick a built-in subject.")
        set_noun = clean_noun(noun)
        spec = {"folder": str(_copy_unique(paths, folder)), "noun": set_noun}
        if held_paths:
            spec["held_out_folder"] = str(_copy_unique(held_paths, folder / "held_out"))
    else:
        set_noun = get_subject(image_set).noun
        spec = {"subject": image_set, "train": 4, "held_out": 8}
    return quick_config(spec, model, chosen_methods, chosen_purifications, attack, steps, seeds, set_noun,
                        match_psnr=match or None)


def _copy_unique(paths, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, p in enumerate(paths):
        shutil.copy(p, folder / f"{i:02d}-{Path(p).name}")
    return folder


BATCH_HEADERS = ["method", "purification", "seeds", "PSNR", "learning prevented (loss)", "noise",
                 "learning prevented (generations)", "noise"]


def batch_grid(cfg, out: Path, callback=None):
    """Run a grid config (eval.grid) into `out`; returns (message, outputs) with the summary rows formatted, the two
    plots and the report as a zip whose report.html shows its images."""
    report = run_grid(cfg, out, progress=False, callback=callback)
    rows = json.loads((out / "summary.json").read_text())
    table = []
    for r in rows:
        def share(k):
            v = r.get(f"{k}_mean")
            if not isinstance(v, float):
                return fmt(v)
            n = r.get(f"{k}_n", 0)
            return percent(v, r.get(f"{k}_std")) + (f" ({n} of {r['seeds']} seeds)" if n < r["seeds"] else "")
        table.append([r["method"], r["purification"], r["seeds"], fmt(r.get("psnr_mean"), "dB"), share("prevented_loss"),
                      fmt(r.get("prevented_loss_noise_mean")), share("prevented_generation"),
                      fmt(r.get("prevented_generation_noise_mean"))])
    archive = shutil.make_archive(str(out), "zip", out)
    plots = [str(out / p) for p in ("plot_psnr_vs_efficacy.png", "plot_purification.png") if (out / p).exists()]
    failed = sum(r.get("failed", 0) for r in rows)
    message = f"Ran {len(rows)} configurations" + (f"; {failed} cell(s) failed (see the report)" if failed else "") + "."
    return message, {"rows": table, "plots": plots, "files": [archive, str(report)]}


def listed_methods() -> list[str]:
    return methods.listed()


# ---- sessions and jobs -------------------------------------------------------------------------------------------
STOP_PENDING_SECONDS = 60  # a Stop pressed while a job still waits in the queue stops it when it starts


class Sessions:
    """Per-session folders, cancel flags and one-job-at-a-time, for a server that forgets its users.

    - Each session writes only into its own folder (a random name under `root`), which is removed when the session
      ends (the browser tab's unload) or after `idle_seconds` without a request or a keep-alive (REST clients never
      say goodbye), never while one of its jobs runs. Uploads are shared by content (the web framework stores equal
      files once): one is removed when the last session that handed it in is gone, and never when it is one of
      `keep` (the example files every visitor uses).
    - `run(session, work, ...)` is a generator: the work runs in a worker thread under one lock (so the next job's
      work starts only once this one has really stopped, whatever the web framework does with its queue slot),
      the generator yields progress, and when it is closed early (a client's cancel, a closed tab) or `stop()` is
      called, that job's own cancel flag is set and it stops at its next progress report.
    """

    def __init__(self, root: Path, idle_seconds: float = 240.0, keep=()):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.idle_seconds = idle_seconds
        self.keep = set(keep)  # content hashes of files that are never removed (the examples)
        self.lock = threading.Lock()  # the sessions table
        self.work_lock = threading.Lock()  # the compute: one job's work at a time
        self._sessions: dict[str, dict] = {}
        self._owners: dict[str, set] = {}  # upload path -> the sessions that handed it in

    def _get(self, key: str) -> dict:
        with self.lock:
            s = self._sessions.get(key)
            if s is None:
                folder = self.root / uuid.uuid4().hex
                folder.mkdir(parents=True)
                s = self._sessions[key] = {"folder": folder, "jobs_live": set(), "running": 0, "seen": time.time(),
                                           "uploads": set(), "jobs": 0, "stop_pending": 0.0}
            s["seen"] = time.time()
            return s

    def touch(self, key: str) -> None:
        """A keep-alive from an open tab: its session is not idle."""
        with self.lock:
            if key in self._sessions:
                self._sessions[key]["seen"] = time.time()

    def folder(self, key: str, job: str) -> Path:
        """A new folder for one job's outputs inside the session's folder."""
        s = self._get(key)
        with self.lock:
            s["jobs"] += 1
            out = s["folder"] / f"{job}-{s['jobs']}"
        out.mkdir(parents=True)
        return out

    def note_uploads(self, key: str, paths) -> None:
        s = self._get(key)
        with self.lock:
            for p in paths or []:
                s["uploads"].add(str(p))
                self._owners.setdefault(str(p), set()).add(key)

    def stop(self, key: str) -> None:
        """Stop this session's running jobs; with none running yet (it waits in the queue), the next one that starts
        within STOP_PENDING_SECONDS."""
        s = self._get(key)
        with self.lock:
            for event in s["jobs_live"]:
                event.set()
            if not s["jobs_live"]:
                s["stop_pending"] = time.time()

    def run(self, key: str, work, *args, kind: str = "protect", **kwargs):
        """Yield ("progress", info) while the work runs, then ("done", JobResult)."""
        s = self._get(key)
        cancel = threading.Event()  # this job's own: a later job never clears it
        with self.lock:
            if time.time() - s["stop_pending"] < STOP_PENDING_SECONDS:
                cancel.set()
            s["stop_pending"] = 0.0
            s["jobs_live"].add(cancel)
            s["running"] += 1
        updates: queue.Queue = queue.Queue()
        box: dict = {}
        progress = Progress(lambda info: updates.put(info) or True, should_stop=cancel.is_set)

        def worker():
            with self.work_lock:
                box["result"] = run_job(work, *args, kind=kind, progress=progress, **kwargs)

        thread = threading.Thread(target=worker, daemon=True)
        thread.start()
        try:
            while thread.is_alive():
                thread.join(0.25)
                latest = None
                while not updates.empty():
                    latest = updates.get_nowait()
                if latest is not None:
                    yield "progress", latest
            yield "done", box["result"]
        except GeneratorExit:  # closed early: a client's cancel, a closed tab
            cancel.set()
            raise
        finally:
            if thread.is_alive():  # it stops at its next progress report; the session stays until it has
                threading.Thread(target=self._release_after, args=(s, thread, cancel), daemon=True).start()
            else:
                self._release(s, cancel)

    def _release(self, s: dict, cancel) -> None:
        with self.lock:
            s["jobs_live"].discard(cancel)
            s["running"] -= 1
            s["seen"] = time.time()

    def _release_after(self, s: dict, thread, cancel) -> None:
        thread.join()
        self._release(s, cancel)

    def end(self, key: str) -> None:
        """The session is over (tab closed): stop its jobs and remove its files (now, or once its jobs have stopped)."""
        with self.lock:
            s = self._sessions.get(key)
            if s is not None:
                for event in s["jobs_live"]:
                    event.set()
                s["ended"] = True
        self.sweep()

    def sweep(self, now: float | None = None) -> list[str]:
        """Remove every ended or idle session whose jobs are not running; returns their keys."""
        now = now or time.time()
        gone, orphans = [], []
        with self.lock:
            for key, s in list(self._sessions.items()):
                if s["running"] == 0 and (s.get("ended") or now - s["seen"] > self.idle_seconds):
                    gone.append(key)
                    self._sessions.pop(key)
                    shutil.rmtree(s["folder"], ignore_errors=True)
                    for upload in s["uploads"]:
                        owners = self._owners.get(upload, set())
                        owners.discard(key)
                        if not owners:
                            self._owners.pop(upload, None)
                            orphans.append(Path(upload))
        for upload in orphans:  # nobody else handed it in: unless it is an example, it goes
            try:
                if file_sha(upload) in self.keep:
                    continue
            except OSError:
                continue
            upload.unlink(missing_ok=True)
            try:
                upload.parent.rmdir()  # gradio keeps each upload in a folder of its own
            except OSError:
                pass
        return gone

    def active(self) -> list[str]:
        with self.lock:
            return list(self._sessions)
