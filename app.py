"""LDU Playground — the Gradio UI. Widgets only: every function wired here lives in ldu/, attacks/ or eval/ and runs
the same from the CLI and the tests.

Uploads go through `ldu.io.load_images` (the CLI's loader); every image shown or offered is PNG, and downloads are
the files `save_png` wrote, bit-exact. Models load lazily, on first use, on the device this machine has. Heavy work
goes through one queue; Stop works through the progress callback's cancel.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

import gradio as gr

from ldu.backbone import BUILTIN
from ldu.methods import methods

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "assets" / "examples"
MAX_FILES = 8
MAX_FILE_SIZE = "20mb"
BUILTINS = ("pocket", "tiny")


def allowed_models() -> list[str]:
    """The allow-list: $LDU_MODELS (comma-separated), else the built-ins (plus SD 1.5 on a GPU)."""
    env = [m.strip() for m in os.environ.get("LDU_MODELS", "").split(",") if m.strip()]
    if env:
        return env
    import torch

    found = [b for b in BUILTINS if (BUILTIN[b] / "model_index.json").exists()]
    return (["sd15"] if torch.cuda.is_available() else []) + found


try:  # ZeroGPU Spaces: a GPU is attached only inside functions decorated with spaces.GPU
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:

    def gpu(fn):
        return fn


# ---- per-session state: output folders and cancel flags ---------------------------------------------------
_BASE = Path(tempfile.mkdtemp(prefix="ldu-app-"))
_SESSIONS: dict[str, Path] = {}
_CANCEL: dict[str, threading.Event] = {}
_BACKBONES: dict = {}
_LOCK = threading.Lock()  # sessions and cancel flags (fast)
_MODEL_LOCK = threading.Lock()  # model loading (can take minutes: Stop must not wait for it)


def session_dir(request: gr.Request) -> Path:
    key = request.session_hash or "anonymous"
    with _LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = Path(tempfile.mkdtemp(prefix="session-", dir=_BASE))
        return _SESSIONS[key]


def cancel_event(request: gr.Request) -> threading.Event:
    with _LOCK:
        return _CANCEL.setdefault(request.session_hash or "anonymous", threading.Event())


def end_session(request: gr.Request) -> None:
    key = request.session_hash or "anonymous"
    with _LOCK:
        folder = _SESSIONS.pop(key, None)
        event = _CANCEL.pop(key, None)
    if event is not None:  # a job of a closed tab stops at its next step instead of holding the queue
        event.set()
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def stop(request: gr.Request) -> str:
    cancel_event(request).set()
    return "Stopping: the running job ends at its next step."


_ARMED: set[str] = set()


def arm(request: gr.Request) -> str:
    """A button press queues a job: clear this session's Stop flag NOW, so a Stop pressed while the job still
    waits in the queue stops it when it starts."""
    cancel_event(request).clear()
    with _LOCK:
        _ARMED.add(request.session_hash or "anonymous")
    return ""


def begin(request: gr.Request) -> threading.Event:
    """A job starts: its cancel flag. A job that was not armed by a button (an API call) drops a stale Stop."""
    event = cancel_event(request)
    with _LOCK:
        armed = (request.session_hash or "anonymous") in _ARMED
        _ARMED.discard(request.session_hash or "anonymous")
    if not armed:
        event.clear()
    return event


def backbone(spec: str):
    import torch

    from ldu.backbone import BackboneError, load_backbone

    if spec not in allowed_models():
        raise gr.Error(f"Model {spec!r} is not on this server's allow-list ({', '.join(allowed_models())}).")
    if spec not in BUILTINS and not torch.cuda.is_available():
        raise gr.Error(f"{spec} is a full-size Stable Diffusion: on a CPU one step takes minutes. Pick pocket or tiny, "
                       "or run the app on a GPU.")
    with _MODEL_LOCK:
        if spec not in _BACKBONES:
            try:
                _BACKBONES[spec] = load_backbone(spec)
            except BackboneError as err:
                raise gr.Error(str(err)) from None
        return _BACKBONES[spec]


def banner(spec: str) -> str:
    notes = {
        "tiny": "**tiny**: random weights. Every path runs, but its images are noise and its numbers mean nothing.",
        "pocket": "**pocket**: a 64 px miniature Stable Diffusion trained on a handful of public images. Effects are real "
                  "but small-scale: real protection needs Stable Diffusion on a GPU.",
    }
    return "ℹ️ " + notes.get(spec, f"**{spec}**: Stable Diffusion.")


def _progress_callback(progress, event: threading.Event, label: str):
    def callback(info):
        if event.is_set():
            return False
        total = max(1, info.get("total", 1) or 1)
        progress(min(1.0, info.get("step", 0) / total), desc=f"{label}: {info.get('stage', '')} {info.get('step', 0)}/{total}")
        return True

    return callback


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]


def _load(files):
    from ldu.io import ImageLoadError, load_images

    if not files:
        raise gr.Error("Upload 1 to 8 photos of one subject first (or click an example).")
    paths = _paths(files)
    if len(paths) > MAX_FILES:
        raise gr.Error(f"{len(paths)} files: upload at most {MAX_FILES} photos of one subject.")
    try:
        return load_images(paths)
    except ImageLoadError as err:
        raise gr.Error(" · ".join(f"{Path(n).name}: {p}" for n, p in err.problems)) from None


def _params(method: str, kind: str, iterations, budget_255, seed, advanced: str):
    from ldu.cli import parse_sets

    m = methods[method]
    fields = m.params.__dataclass_fields__
    overrides = {"seed": int(seed)}
    if "iterations" in fields:
        if iterations is None or iterations < 0:
            raise gr.Error("Iterations must be 0 or more.")
        overrides["iterations"] = int(iterations)
    if budget_255:
        overrides["linf" if m.binds == "linf" else "budget_rms"] = float(budget_255) / 255
    try:
        overrides.update(parse_sets([line for line in (advanced or "").splitlines() if line.strip()], m.params))
        return m.make_params(kind, **overrides)
    except ValueError as err:
        raise gr.Error(str(err)) from None


def estimate(files, model, method, iterations, budget_255, seed, advanced):
    """The time estimate shown before a run (loads the model on first use)."""
    from eval.compare import estimate_seconds, unet_seconds

    if not files:
        return "Upload photos to see a time estimate."
    try:
        bb = backbone(model)
        params = _params(method, bb.kind, iterations, budget_255, seed, advanced)
        secs = estimate_seconds(bb, method, params, min(len(files), MAX_FILES), _sizes(files[:MAX_FILES]))
        return f"⏱️ Estimate: about {secs:.0f} s for {min(len(files), MAX_FILES)} photo(s) (one UNet step measured at {unet_seconds(bb) * 1000:.0f} ms)."
    except gr.Error as err:
        return f"⚠️ {err.message}"


def _sizes(files) -> list[tuple[int, int]] | None:
    """(height, width) of each upload as protect() will see it (EXIF orientation applied), from the file's header;
    None when one is not a readable image (the run itself says why)."""
    from ldu.io import oriented_size

    try:
        return [oriented_size(path) for path in _paths(files)]
    except Exception:  # noqa: BLE001
        return None


@gpu
def run_protect(files, model, method, iterations, budget_255, seed, advanced, request: gr.Request, progress=gr.Progress()):
    import torch

    from eval.metrics import measure
    from ldu.io import save_png
    from ldu.protect import protect, squeezed_note

    images = _load(files)
    bb = backbone(model)
    params = _params(method, bb.kind, iterations, budget_255, seed, advanced)
    event = begin(request)
    out = session_dir(request) / f"protect-{len(list(session_dir(request).iterdir()))}"
    try:
        result = protect(images, bb, method=method, params=params, callback=_progress_callback(progress, event, method))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise gr.Error("Out of GPU memory: try fewer photos or iterations.") from None
    except Exception as err:  # Cancelled, or anything else: a message in the page, the app keeps serving
        if type(err).__name__ == "Cancelled":
            raise gr.Error("Stopped.") from None
        raise gr.Error(f"{type(err).__name__}: {err}") from None
    paths = result.save(out)
    manifests = [p.with_suffix(".json") for p in paths]
    clean_pngs = [save_png(im.pixels, im, out / "clean" / f"{p.stem}.png")  # for the slider
                  for p, im in zip(paths, result.sources)]
    diff = _difference_map(result.sources[0].pixels, result.images[0], out / "difference_x10.png")
    rows = []
    for p, s, src, prot in zip(paths, result.stats["images"], result.sources, result.images):
        lp = measure("lpips", [src.pixels], [prot])
        rows.append([p.name, round(s["psnr"], 2), round(s["ssim"], 4), lp if isinstance(lp, str) else round(lp, 4),
                     round(s["rms_255"], 2), round(s["linf_255"], 2), round(s["attacker_loss_clean"], 5),
                     round(s["attacker_loss_protected"], 5)])
    b = result.stats["batch"]
    summary = (f"{banner(model)}\n\n✅ {method} protected {len(paths)} photo(s) in {b['seconds']:.1f} s "
               f"({b['unet_calls']} UNet calls). Attacker loss on held-out draws: {b['attacker_loss_clean']:.5f} → "
               f"{b['attacker_loss_protected']:.5f}.")
    squeezed = [p.name for p, s in zip(paths, result.stats["images"]) if s.get("squeezed")]
    if squeezed:
        summary += f"\n\n⚠️ {squeezed_note(squeezed)}."
    return ([str(p) for p in paths], (str(clean_pngs[0]), str(paths[0])), str(diff), rows,
            [str(p) for p in paths + manifests], summary)


def _difference_map(clean, protected, path: Path) -> Path:
    import numpy as np
    from PIL import Image

    d = (protected.float() - clean.float()).permute(1, 2, 0).numpy() * 10 + 0.5
    Image.fromarray((np.clip(d, 0, 1) * 255).round().astype(np.uint8)).save(path)
    return path


@gpu
def run_survives_posting(files, protected_files, model, method, advanced, request: gr.Request):
    from eval.compare import survives_posting

    if not protected_files:
        raise gr.Error("Protect some photos first.")
    clean = [im.pixels for im in _load(files)]
    protected = [im.pixels for im in _load([p for p in protected_files if str(p).endswith(".png")])]
    bb = backbone(model)
    prompt = getattr(_params(method, bb.kind, 0, None, 0, advanced), "prompt", "a photo of sks person")
    r = survives_posting(bb, clean, protected, prompt)
    kept = "n/a" if r["kept"] != r["kept"] else f"{100 * r['kept']:.0f} %"
    return (f"Attacker loss clean → protected: {r['clean']:.5f} → {r['protected']:.5f} (gain {r['gain']:+.5f}). "
            f"After resize ×0.75 + JPEG q85: {r['clean_posted']:.5f} → {r['protected_posted']:.5f} "
            f"(gain {r['gain_after_posting']:+.5f}; {kept} of the gain kept).")


@gpu
def run_attack(files, protected_files, model, attack, steps, purification, seed, n_gen, request: gr.Request,
               progress=gr.Progress()):
    import torch

    from eval.compare import attack_and_compare

    if not protected_files:
        raise gr.Error("Protect some photos in the Protect tab first: the attack compares clean and protected.")
    if steps is None or steps < 1:
        raise gr.Error("Steps must be at least 1.")
    clean = [im.pixels for im in _load(files)]
    protected = [im.pixels for im in _load([p for p in protected_files if str(p).endswith(".png")])]
    bb = backbone(model)
    event = begin(request)
    held = _example_held_out(files)
    try:
        r = attack_and_compare(bb, clean, protected, attack, {"steps": int(steps), **_attack_prompt(attack, files)},
                               purification, None, held_out=held, seed=int(seed), n_gen=int(n_gen),
                               gen_steps=25 if bb.kind != "tiny" else 4, guidance=4.0 if bb.kind != "sd" else 7.5,
                               callback=_progress_callback(progress, event, attack))
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise gr.Error("Out of GPU memory: try fewer steps or a smaller attack.") from None
    except Exception as err:  # noqa: BLE001
        if type(err).__name__ == "Cancelled":
            raise gr.Error("Stopped.") from None
        raise gr.Error(f"{type(err).__name__}: {err}") from None
    out = session_dir(request) / f"attack-{len(list(session_dir(request).iterdir()))}"
    out.mkdir(parents=True)
    from ldu.protect import to_pil

    galleries = []
    for name, gens in zip(("clean", "protected"), r["generations"]):
        paths = []
        for i, g in enumerate(gens):
            paths.append(str(out / f"{name}_{i}.png"))
            to_pil(g).save(paths[-1])
        galleries.append(paths)
    rows = [[name, a if a is None or isinstance(a, str) else round(a, 5), b if isinstance(b, str) else round(b, 5)]
            for name, a, b in r["rows"]]
    note = ("post_attack_loss is measured on " + ("held-out photos of the example subject." if held is not None else
            "your clean photos themselves (no separate held-out photos), which favours the clean attack."))
    return _curves_plot(*r["curves"]), galleries[0], galleries[1], rows, note


def _curves_plot(clean, protected):
    from matplotlib.figure import Figure  # not pyplot: nothing global to leak per call

    fig = Figure(figsize=(6, 3))
    ax = fig.subplots()
    ax.plot(clean, label="attack on clean photos", alpha=0.8)
    ax.plot(protected, label="attack on protected photos", alpha=0.8)
    ax.set_xlabel("training step")
    ax.set_ylabel("diffusion loss")
    ax.legend()
    fig.tight_layout()
    return fig


def _attack_prompt(attack: str, files) -> dict:
    """The instance prompt: 'cat' for the example cat, 'cup' for the coffee, 'person' otherwise."""
    names = " ".join(Path(str(f)).name for f in files)
    noun = "cat" if "chelsea" in names or "cat" in names else "cup" if "coffee" in names or "cup" in names else "person"
    if attack == "textual_inversion":
        return {"instance_prompt": f"a photo of a <sks> {noun}"}
    return {"instance_prompt": f"a photo of sks {noun}"}


def _example_held_out(files):
    """Held-out views when the uploads are one of the example subjects (same file names), else None."""
    names = {Path(str(f)).name for f in files}
    for subject in ("chelsea", "coffee"):
        train = EXAMPLES / subject / "train"
        if train.is_dir() and names and names <= {p.name for p in train.iterdir()}:
            from ldu.io import load_images

            return [im.pixels for im in load_images([EXAMPLES / subject / "held_out"])]
    return None


@gpu
def run_batch(files, model, chosen_methods, chosen_purifications, attack, steps, image_set, seeds, request: gr.Request,
              progress=gr.Progress(track_tqdm=True)):
    from eval.config import ConfigError, parse
    from eval.grid import run

    if not chosen_methods:
        raise gr.Error("Pick at least one protection method.")
    if image_set == "my uploads":
        if not files:
            raise gr.Error("Upload photos in the Protect tab first, or pick an example subject.")
        folder = session_dir(request) / "batch-inputs"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for f in files:
            shutil.copy(str(f), folder / Path(str(f)).name)
        sets = {"uploads": {"folder": str(folder)}}
    else:
        sets = {image_set: {"pocket_subject": image_set, "train": 4, "held_out": 4}}
    noun = "cat" if image_set == "chelsea" else "cup" if image_set == "coffee" else "person"
    prompt = f"a photo of sks {noun}"
    takes_prompt = {m for m in chosen_methods if "prompt" in methods[m].params.__dataclass_fields__}
    raw = {"name": f"batch ({model})", "image_sets": sets, "protect_backbone": model,
           "methods": [{"name": m, "params": {"prompt": prompt} if m in takes_prompt else {}} for m in chosen_methods],
           "purifications": ["none", *chosen_purifications],
           "attacks": [{"name": attack, "params": {"steps": int(steps), **_attack_prompt(attack, [noun])}}],
           "generate": {"n": 2, "steps": 25 if model != "tiny" else 4, "guidance": 4.0},
           "metrics": ["psnr", "ssim", "linf", "rms", "lpips", "thumb_distance", "clip_i"], "seeds": list(range(int(seeds)))}
    try:
        backbone(model)
        cfg = parse(raw)
    except ConfigError as err:
        raise gr.Error("; ".join(err.problems)) from None
    out = session_dir(request) / f"batch-{len(list(session_dir(request).iterdir()))}"
    event = begin(request)
    try:
        report = run(cfg, out, progress=True, should_stop=event.is_set)
    except Exception as err:  # noqa: BLE001
        if type(err).__name__ == "Cancelled":
            raise gr.Error("Stopped (finished cells are kept in the session's results).") from None
        raise gr.Error(f"{type(err).__name__}: {err}") from None
    import csv

    rows = list(csv.DictReader(open(out / "summary.csv")))
    keep = ["method", "purification", "seeds", "efficacy_mean", "efficacy_std", "post_attack_loss_mean", "psnr_mean", "ssim_mean"]
    table = [[r.get(k, "") for k in keep] for r in rows]
    archive = shutil.make_archive(str(out), "zip", out)
    plots = [str(out / p) for p in ("plot_psnr_vs_efficacy.png", "plot_purification.png") if (out / p).exists()]
    return table, (plots[0] if plots else None), (plots[1] if len(plots) > 1 else None), [archive, str(report)]


def about_text() -> str:
    return (
        "## What LDU does\n"
        "Latent Diffusion Unlearning (arXiv:2510.03089) moves the starting point of a partial denoising trajectory in "
        "the latent space so that the decoded photo looks the same but a DreamBooth/LoRA fine-tune on it learns the "
        "subject worse. Here it is a per-image optimisation: DDIM-invert the photo to t* = strength × T, optimise a "
        "shift of that latent so the decoded image maximises the attacker's diffusion loss, and keep only the change "
        "it causes, projected onto a small per-image budget (8/255 RMS by default).\n\n"
        "## Models\n"
        f"Allowed here: {', '.join(allowed_models())}. **pocket** is a 64 px miniature trained on a handful of public "
        "images: effects are real but small-scale. **tiny** has random weights (every path runs, nothing means "
        "anything). Full-size Stable Diffusion needs a GPU.\n\n"
        "## Honest limits\n"
        "- Numbers on pocket/tiny are not numbers about Stable Diffusion.\n"
        "- Metrics that need pretrained weights (LPIPS, CLIP, DINO, KID) say *unavailable* when the weights are not "
        "on this machine.\n"
        "- A protection is tested here against the attacks in this app; others (and purifications) may undo it.\n"
        "- Protected images are PNG, bit-exact. Re-encoding them (JPEG, WebP, resizing) changes the perturbation: "
        "the *survives posting?* check measures how much of the effect is left.\n\n"
        "Example photos: scikit-image's bundled chelsea and coffee (CC0)."
    )


def build() -> gr.Blocks:
    models = allowed_models()
    default_model = next((m for m in ("pocket", "sd15", "tiny") if m in models), models[0])
    examples = [[sorted(str(p) for p in (EXAMPLES / s / "train").glob("*.png"))] for s in ("chelsea", "coffee")
                if (EXAMPLES / s / "train").is_dir()]
    with gr.Blocks(title="LDU Playground") as demo:
        gr.Markdown("# LDU Playground\nProtect photos against diffusion personalization, then play the attacker.")
        model = gr.Dropdown(models, value=default_model, label="Model", elem_id="model")
        model_banner = gr.Markdown(banner(default_model))
        model.change(banner, model, model_banner)
        stopper = gr.Button("Stop the running job", variant="stop", elem_id="stop")
        stop_note = gr.Markdown()
        stopper.click(stop, None, stop_note, queue=False, api_name="stop")
        with gr.Tab("Protect"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="1–8 photos of one subject", file_count="multiple", file_types=["image"],
                                    elem_id="uploads")
                    if examples:
                        gr.Examples(examples, inputs=[files], label="Example subjects (scikit-image, CC0)")
                    method = gr.Dropdown(sorted(methods), value="ldu", label="Method", elem_id="method")
                    iterations = gr.Slider(0, 200, value=8, step=1, label="Iterations")
                    budget = gr.Slider(1, 16, value=8, step=0.5, label="Budget (x/255): RMS for LDU, Linf for pixel methods")
                    seed = gr.Number(0, precision=0, label="Seed")
                    advanced = gr.Textbox(label="Advanced parameters (NAME=VALUE per line)", lines=2,
                                          placeholder="strength=0.4\nprompt=a photo of sks cat")
                    eta = gr.Markdown("Upload photos to see a time estimate.", elem_id="estimate")
                    go = gr.Button("Protect", variant="primary", elem_id="protect")
                with gr.Column():
                    summary = gr.Markdown(elem_id="protect-summary")
                    slider = gr.ImageSlider(label="Before / after", format="png", type="filepath", elem_id="slider")
                    diff = gr.Image(label="Difference ×10 (first photo)", format="png", type="filepath")
                    gallery = gr.Gallery(label="Protected (PNG)", format="png", columns=4, elem_id="protected")
                    table = gr.Dataframe(headers=["file", "PSNR", "SSIM", "LPIPS", "RMS/255", "Linf/255", "attacker loss clean",
                                                  "protected"], label="Statistics", elem_id="metrics")
                    downloads = gr.File(label="Download: protected PNGs (bit-exact) and their manifests",
                                        file_count="multiple", elem_id="downloads")
                    posting = gr.Button("Survives posting? (JPEG + resize)")
                    posting_out = gr.Markdown()
            for trigger in (files.change, method.change, iterations.change, model.change):
                trigger(estimate, [files, model, method, iterations, budget, seed, advanced], eta, concurrency_id="estimate",
                        concurrency_limit=1)
            go.click(arm, None, stop_note, queue=False).then(run_protect, [files, model, method, iterations, budget, seed, advanced],
                     [gallery, slider, diff, table, downloads, summary], api_name="protect", concurrency_id="gpu",
                     concurrency_limit=1)
            posting.click(run_survives_posting, [files, downloads, model, method, advanced], posting_out,
                          api_name="survives_posting", concurrency_id="gpu", concurrency_limit=1)
        with gr.Tab("Attack & compare"):
            gr.Markdown("Fine-tune the same attack, with the same seed, on the clean and on the protected photos of the "
                        "Protect tab, and compare what each learned.")
            with gr.Row():
                attack = gr.Dropdown(["lora_dreambooth", "textual_inversion", "dreambooth"], value="lora_dreambooth", label="Attack")
                steps = gr.Slider(1, 1000, value=100, step=1, label="Training steps", elem_id="attack-steps")
                purification = gr.Dropdown(["none", "jpeg", "gaussian_blur", "resize", "gaussian_noise", "diffpure"],
                                           value="none", label="Purify the protected photos first")
                attack_seed = gr.Number(0, precision=0, label="Seed")
                n_gen = gr.Slider(1, 8, value=4, step=1, label="Generations")
            attack_go = gr.Button("Attack both", variant="primary", elem_id="attack")
            curves = gr.Plot(label="Training loss")
            with gr.Row():
                gen_clean = gr.Gallery(label="After attacking the CLEAN photos", format="png", columns=4, elem_id="gen-clean")
                gen_prot = gr.Gallery(label="After attacking the PROTECTED photos", format="png", columns=4, elem_id="gen-protected")
            attack_table = gr.Dataframe(headers=["metric", "clean attack", "protected attack"], label="Efficacy", elem_id="efficacy")
            attack_note = gr.Markdown()
            attack_go.click(arm, None, stop_note, queue=False).then(run_attack, [files, downloads, model, attack, steps, purification, attack_seed, n_gen],
                            [curves, gen_clean, gen_prot, attack_table, attack_note], api_name="attack",
                            concurrency_id="gpu", concurrency_limit=1)
        with gr.Tab("Batch evaluation"):
            gr.Markdown("The grid runner of `python -m eval run`: methods × purifications × one attack on an image set, "
                        "over seeds, with a downloadable report.")
            with gr.Row():
                b_methods = gr.CheckboxGroup(sorted(methods), value=["ldu"], label="Methods")
                b_purif = gr.CheckboxGroup(["jpeg", "gaussian_blur", "resize", "diffpure"], value=[], label="Purifications")
            with gr.Row():
                b_attack = gr.Dropdown(["lora_dreambooth", "textual_inversion"], value="lora_dreambooth", label="Attack")
                b_steps = gr.Slider(1, 1000, value=100, step=1, label="Attack steps")
                b_set = gr.Radio(["chelsea", "coffee", "my uploads"], value="chelsea", label="Image set")
                b_seeds = gr.Slider(1, 5, value=2, step=1, label="Seeds")
            b_go = gr.Button("Run the grid", variant="primary")
            b_table = gr.Dataframe(headers=["method", "purification", "seeds", "efficacy", "efficacy std", "post_attack_loss",
                                            "PSNR", "SSIM"], label="Summary (mean and std over seeds)")
            with gr.Row():
                b_plot1 = gr.Image(label="PSNR vs efficacy", format="png", type="filepath")
                b_plot2 = gr.Image(label="Efficacy per purification", format="png", type="filepath")
            b_files = gr.File(label="Report (zip) and report.html", file_count="multiple")
            b_go.click(arm, None, stop_note, queue=False).then(run_batch, [files, model, b_methods, b_purif, b_attack, b_steps, b_set, b_seeds],
                       [b_table, b_plot1, b_plot2, b_files], api_name="batch", concurrency_id="gpu", concurrency_limit=1)
        with gr.Tab("About"):
            gr.Markdown(about_text())
        demo.unload(end_session)
    return demo


if __name__ == "__main__":
    build().queue(max_size=16).launch(max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES)])
