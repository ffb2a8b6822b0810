"""LDU Playground — the Gradio UI: widgets and wiring only. Everything a tab computes is in eval/playground.py (and
below it), which runs the same without gradio from scripts, tests and benchmarks.

Uploads go through the CLI's loader; every image shown or offered is PNG, and downloads are the files `save_png`
wrote, bit-exact. Models load lazily on first use. Jobs run one at a time under one lock; Stop, a client's cancel
and a closed tab all stop the work at its next step; each session's files are removed when it ends or goes idle.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import threading
import time
import uuid
from pathlib import Path

import gradio as gr
from gradio.utils import get_upload_folder

from attacks import attacks, default_attack, purifications
from eval import playground as pg
from ldu.backbone import BUILTIN, BackboneError, kind_of, load_backbone
from ldu.methods import get_method
from ldu.subjects import SUBJECTS

ROOT = Path(__file__).resolve().parent
EXAMPLES = ROOT / "assets" / "examples"
MAX_FILES = 8
MAX_FILE_SIZE = "20mb"
BUILTINS = ("pocket", "tiny")
IDLE_SECONDS = float(os.environ.get("LDU_SESSION_IDLE_SECONDS", 240))  # REST sessions never say goodbye

try:  # ZeroGPU Spaces: a GPU is attached only inside functions decorated with spaces.GPU
    import spaces

    gpu = spaces.GPU(duration=120)
except ImportError:
    def gpu(fn):
        return fn


def allowed_models() -> list[str]:
    """The allow-list: $LDU_MODELS (comma-separated), else the built-ins (plus SD 1.5 on a GPU)."""
    env = [m.strip() for m in os.environ.get("LDU_MODELS", "").split(",") if m.strip()]
    if env:
        return env
    import torch  # deferred: app.py itself imports no torch at module level

    found = [b for b in BUILTINS if (BUILTIN[b] / "model_index.json").exists()]
    return (["sd15"] if torch.cuda.is_available() else []) + found


# ---- sessions: files, jobs, cleanup ---------------------------------------------------------------------------
SESSIONS: pg.Sessions | None = None  # made by build(): per-server folders, jobs and cleanup
_BACKBONES: dict = {}
_MODEL_LOCK = threading.Lock()


_SERVER_LOCK = None  # this server's lock on its folder, held for its lifetime


def start_sessions() -> pg.Sessions:
    """This server's sessions under <gradio's upload folder>/ldu-sessions/server-<random>, which it holds locked;
    folders nobody holds (a server that died) are removed first, and a sweeper removes ended and idle sessions."""
    global SESSIONS, _SERVER_LOCK
    if SESSIONS is None:
        base = Path(get_upload_folder()) / "ldu-sessions"
        base.mkdir(parents=True, exist_ok=True)
        for old in base.glob("server-*"):
            with open(old / ".lock", "a") as probe:
                try:
                    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # a live server holds it
            shutil.rmtree(old, ignore_errors=True)
        root = base / f"server-{uuid.uuid4().hex[:12]}"
        root.mkdir()
        _SERVER_LOCK = open(root / ".lock", "a")
        fcntl.flock(_SERVER_LOCK, fcntl.LOCK_EX)
        keep = {pg.file_sha(p) for info in pg.example_subjects().values() for p in info["train_paths"] + info["held_out_paths"]}
        SESSIONS = pg.Sessions(root, idle_seconds=IDLE_SECONDS, keep=keep)

        def sweeper():
            while True:
                time.sleep(min(30.0, IDLE_SECONDS / 4))
                SESSIONS.sweep()

        threading.Thread(target=sweeper, daemon=True, name="session-sweeper").start()
    return SESSIONS


def _key(request: gr.Request) -> str:
    return request.session_hash or "anonymous"


def end_session(request: gr.Request) -> None:
    SESSIONS.end(_key(request))


def keep_alive(request: gr.Request) -> None:
    SESSIONS.touch(_key(request))


def stop(request: gr.Request):
    """The Stop buttons: the job stops at its next step. The button itself says so (the job's own output says when it
    has stopped: written there too, a late "Stopping…" could land after "Stopped" and stay)."""
    SESSIONS.stop(_key(request))
    return gr.update(value="Stopping…", interactive=False)


def backbone(spec: str):
    import torch  # deferred, as in allowed_models()

    if spec not in allowed_models():
        raise gr.Error(f"Model {spec!r} is not on this server's allow-list ({', '.join(allowed_models())}).", print_exception=False)
    if spec not in BUILTINS and not torch.cuda.is_available():
        raise gr.Error(f"{spec} is a full-size Stable Diffusion: on a CPU one step takes minutes. Pick pocket or tiny, "
                       "or run the app on a GPU.", print_exception=False)
    with _MODEL_LOCK:
        if spec not in _BACKBONES:
            try:
                _BACKBONES[spec] = load_backbone(spec)
            except BackboneError as err:
                raise gr.Error(str(err), print_exception=False) from None
        return _BACKBONES[spec]


def banner(spec: str) -> str:
    notes = {
        "tiny": "**tiny**: random weights. Every path runs, but its images are noise and its numbers mean nothing.",
        "pocket": "**pocket**: a 64 px miniature Stable Diffusion trained on a handful of public images. Effects are real "
                  "but small-scale: real protection needs Stable Diffusion on a GPU.",
    }
    return "ℹ️ " + notes.get(spec, f"**{spec}**: Stable Diffusion.")


def _paths(files) -> list[str]:
    return [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files or []]


def _fail(message: str):
    raise gr.Error(message, print_exception=False)


def _run(request, progress, label: str, work, *args, kind: str, **kwargs):
    """Run a job of this session; yields status texts while it runs and returns its JobResult (StopIteration)."""
    for what, payload in SESSIONS.run(_key(request), work, *args, kind=kind, **kwargs):
        if what == "progress":
            total = max(1, payload.get("total", 1) or 1)
            step = payload.get("step", 0)
            where = f"cell {payload['cell']}/{payload['cells']} · " if "cell" in payload else ""
            progress(min(1.0, step / total), desc=f"{label}: {where}{payload.get('stage', '')} {step}/{total}")
            yield f"⏳ {label}: {where}{payload.get('stage', '')} {step}/{total}"
        else:
            return payload
    return None


# ---- Protect -----------------------------------------------------------------------------------------------------
def method_controls(method: str, model: str):
    """The effort and budget sliders of a method, with its defaults for this model."""
    m = get_method(method)
    p = m.make_params(kind_of(model))
    effort = getattr(p, m.effort_field)
    budget = getattr(p, m.budget_field)
    what = "RMS" if m.budget_field == "budget_rms" else "L∞"
    return (gr.update(value=effort, maximum=m.effort_max,
                      label=f"{m.effort_field.replace('_', ' ').capitalize()} (default {effort})"),
            gr.update(value=round(budget * 255, 2), label=f"Budget: {what} in /255 (default {budget * 255:.3g})"))


def subject_note(files) -> tuple:
    """When the uploads are a built-in subject's examples: its noun, and that held-out views come with it."""
    info = pg.builtin_subject(_paths(files)) if files else None
    if info is None:
        return gr.update(), ""
    return (gr.update(value=info["class_noun"]),
            f"Example subject **{info['name']}**: {len(info['held_out_paths'])} held-out photos of it come with the "
            "example, so the Attack tab can measure what an attacker learned on photos it never saw.")


def estimate(files, model, method, effort, budget, seed, advanced):
    """The time estimate shown before a run (loads the model on first use)."""
    paths = _paths(files)[:MAX_FILES]
    if not paths:
        return "Upload photos (or click an example) to see a time estimate."
    try:
        bb = backbone(model)
        params = pg.method_params(method, bb.kind, effort, budget, seed, advanced)
        sizes = [pg.oriented_size(p) for p in paths]
        secs = pg.estimate_protect(bb, method, params, sizes)
    except gr.Error as err:
        return f"⚠️ {err.message}"
    except Exception as err:  # noqa: BLE001  (an estimate never stops the page; the run itself names the problem)
        return f"⚠️ {err}"
    return f"⏱️ About {secs:.0f} s for {len(paths)} photo(s) (one UNet step measured at {pg.unet_seconds(bb) * 1000:.0f} ms)."


@gpu
def run_protect(files, model, method, effort, budget, seed, advanced, noun, request: gr.Request, progress=gr.Progress()):
    paths = _paths(files)
    SESSIONS.note_uploads(_key(request), paths)
    bb = backbone(model)
    try:
        params = pg.method_params(method, bb.kind, effort, budget, seed, advanced, noun=pg.clean_noun(noun))
    except ValueError as err:
        _fail(str(err))
    clear = (None, None, None, None, None)  # slider, difference, table, downloads, the protected set
    yield ("⏳ Protecting…", *clear, "")
    out = SESSIONS.folder(_key(request), "protect")
    job = _run(request, progress, method, pg.protect_photos, paths, bb, method, params, out, kind="protect")
    while True:
        try:
            status = next(job)
        except StopIteration as done:
            result = done.value
            break
        yield (status, *(gr.update(),) * 6)
    if result.status == "stopped":
        yield ("⏹️ Stopped. Nothing was kept from this run.", *clear, "")
        return
    if not result.ok:
        _fail(result.message)
    o = result.outputs
    state = {"paths": o["protected"], "clean": paths, "fingerprint": pg.fingerprint(paths, bb, method, params), "method": method}
    unavailable = "; ".join(f"{k}: {v.removeprefix('unavailable: ')}" for k, v in o["unavailable"].items())
    yield (f"{banner(model)}\n\n✅ {result.message}", o["slider"], o["difference"], o["rows"],
           o["protected"] + o["manifests"], state, f"<small>Not measured here: {unavailable}</small>" if unavailable else "")


@gpu
def run_survives_posting(files, state, model, noun, request: gr.Request, progress=gr.Progress()):
    if not state:
        _fail("Protect some photos first.")
    bb = backbone(model)
    prompt = f"a photo of sks {pg.clean_noun(noun)}"
    result = None
    if not pg.still_there(state):
        _fail(pg.EXPIRED)
    job = _run(request, progress, "posting", pg.survives_posting, state["clean"], state["paths"], bb, prompt, kind="protect")
    while True:
        try:
            yield next(job)
        except StopIteration as done:
            result = done.value
            break
    if result.status == "stopped":
        yield "⏹️ Stopped."
        return
    if not result.ok:
        _fail(result.message)
    yield result.message


# ---- Attack ------------------------------------------------------------------------------------------
@gpu
def run_attack(files, held_files, model, noun, state, method, effort, budget, seed, advanced, attack, steps, purification,
               attack_seed, n_gen, seeds, request: gr.Request, progress=gr.Progress()):
    paths = _paths(files)
    SESSIONS.note_uploads(_key(request), paths + _paths(held_files))
    if not state:
        _fail("Protect some photos in the Protect tab first: the attack compares the clean and the protected photos.")
    if not pg.still_there(state) or not all(Path(p).exists() for p in paths):
        _fail(pg.EXPIRED)
    bb = backbone(model)
    try:
        params = pg.method_params(method, bb.kind, effort, budget, seed, advanced, noun=pg.clean_noun(noun))
        if pg.fingerprint(paths, bb, method, params) != state["fingerprint"]:
            _fail("The protected photos were made from other photos, another model or other settings than those now in "
                  "the Protect tab: protect again first (or put them back).")
        setup = pg.attack_setup(bb, paths, _paths(held_files), noun, attack, steps, attack_seed, n_gen,
                                subject=pg.builtin_subject(paths))
    except ValueError as err:
        _fail(str(err))
    empty = (None, None, None, None, None, "")
    yield ("⏳ Attacking…", *empty)
    out = SESSIONS.folder(_key(request), "attack")
    job = _run(request, progress, attack, pg.attack_both, bb, setup, state["paths"], purification, out, kind="attack",
               seeds=seeds)
    while True:
        try:
            status = next(job)
        except StopIteration as done:
            result = done.value
            break
        yield (status, *(gr.update(),) * 6)
    if result.status == "stopped":
        yield ("⏹️ Stopped. Nothing was kept from this run.", *empty)
        return
    if not result.ok:
        _fail(result.message)
    o = result.outputs
    ref_label = "held-out photos (never given to the attacker)" if o["references_are_held_out"] else "your photos"
    return_ = (result.message, [(p, ref_label if i == 0 else None) for i, p in enumerate(o["reference_paths"])],
               o["clean_paths"], o["protected_paths"], o["rows"], _curves_plot(*o["curves"]),
               f"Prompt: *{o['prompt']}*; same seeds for the three rows.")
    yield return_


def attack_choice(model):
    """The model's default attack and its default steps (pocket learns a subject only with full DreamBooth)."""
    name = default_attack(kind_of(model))
    return gr.update(value=name), steps_choice(model, name)


def steps_choice(model, attack):
    steps = attacks[attack].make_params(kind_of(model)).steps
    return gr.update(value=steps, label=f"Training steps (default {steps})")


def attack_estimate(model, attack, steps, n_gen, seeds):
    try:
        bb = backbone(model)
        secs = pg.estimate_attack(bb, attack, {"steps": int(steps)}, int(n_gen)) * int(seeds or 1)
    except Exception as err:  # noqa: BLE001  (an estimate never stops the page)
        return f"⚠️ {getattr(err, 'message', err)}"
    return f"⏱️ About {secs:.0f} s for both attacks, the base model and the generations."


def _curves_plot(clean, protected):
    # deferred: matplotlib is slow to import and only this plot needs it (Figure, not pyplot: nothing global leaks)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3))
    ax = fig.subplots()
    for curve, name, colour in ((clean, "attack on clean photos", "tab:blue"), (protected, "attack on protected photos", "tab:orange")):
        ax.plot(curve, color=colour, alpha=0.2, lw=0.8)
        ax.plot(pg.smoothed(curve), color=colour, lw=2, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss (smoothed)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=2, frameon=False)
    fig.tight_layout()
    return fig


# ---- Batch --------------------------------------------------------------------------------------------
@gpu
def run_batch(files, held_files, noun, model, chosen_methods, chosen_purifications, attack, steps, image_set, seeds,
              match, request: gr.Request, progress=gr.Progress()):
    if not chosen_methods:
        _fail("Pick at least one protection method.")
    backbone(model)
    try:
        folder = SESSIONS.folder(_key(request), "batch-inputs") if image_set == pg.MY_UPLOADS else None
        cfg = pg.batch_config(model, chosen_methods, chosen_purifications, attack, steps, image_set, seeds, match,
                              _paths(files), _paths(held_files), noun, folder)
    except ValueError as err:  # ConfigError included
        _fail(str(err).replace("\n", "; "))
    out = SESSIONS.folder(_key(request), "batch")
    yield ("⏳ Running the grid…", None, None, None, None)
    job = _run(request, progress, "grid", pg.batch_grid, cfg, out, kind="batch")
    while True:
        try:
            status = next(job)
        except StopIteration as done:
            result = done.value
            break
        yield (status, gr.update(), gr.update(), gr.update(), gr.update())
    if result.status == "stopped":
        yield ("⏹️ Stopped. Finished cells are kept in this session's results.", None, None, None, None)
        return
    if not result.ok:
        _fail(result.message)
    o = result.outputs
    yield (result.message, o["rows"], o["plots"][0] if o["plots"] else None, o["plots"][1] if len(o["plots"]) > 1 else None,
           o["files"])


def batch_estimate(model, chosen_methods, chosen_purifications, attack, steps, seeds, match):
    if not chosen_methods:
        return ""
    try:
        bb = backbone(model)
        secs = pg.estimate_batch(bb, chosen_methods, chosen_purifications, attack, steps, seeds, bool(match))
    except Exception as err:  # noqa: BLE001
        return f"⚠️ {getattr(err, 'message', err)}"
    return f"⏱️ About {secs / 60:.0f} min ({secs:.0f} s) on this machine."


def about_text() -> str:
    return (
        "## What LDU does\n"
        "Latent Diffusion Unlearning (arXiv:2510.03089) moves the starting point of a partial denoising trajectory in "
        "the latent space so that the decoded photo looks the same but a DreamBooth/LoRA fine-tune on it learns the "
        "subject worse. Here it is a per-image optimisation: DDIM-invert the photo to t* = strength × T, optimise a "
        "shift of that latent so the decoded image maximises the attacker's diffusion loss, and keep only the change "
        "it causes, projected onto a small per-image budget.\n\n"
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
        "the *survives posting?* check measures how much of the effect is left.\n"
        "- Your photos stay on this server only while your session lasts; they are deleted when you close the tab.\n\n"
        "Example subjects: three drawn by this project's code; chelsea and coffee from scikit-image (CC0)."
    )


PRIVATE = {"api_visibility": "private"}  # UI plumbing, not part of the app's API
CSS = """
#stats table, #result-table table { table-layout: fixed; width: 100%; }
#stats td, #stats th, #result-table td, #result-table th { overflow-wrap: anywhere; }
"""


def build() -> gr.Blocks:
    start_sessions()
    models = allowed_models()
    default_model = next((m for m in ("pocket", "sd15", "tiny") if m in models), models[0])
    kind = kind_of(default_model)
    subjects = pg.example_subjects()
    examples = [[info["train_paths"]] for info in subjects.values()]
    methods = pg.listed_methods()
    method_choices = [(f"{m} (fast: one forward pass)" if get_method(m).effort_max == 1 else m, m) for m in methods]
    first = get_method("ldu")
    p0 = first.make_params(kind)
    attack_names = attacks.listed()
    first_attack = default_attack(kind)
    default_steps = attacks[first_attack].make_params(kind).steps
    with gr.Blocks(title="LDU Playground") as demo:
        gr.Markdown("# LDU Playground\nProtect photos against diffusion personalization, then play the attacker.")
        with gr.Row():
            model = gr.Dropdown(models, value=default_model, label="Model", elem_id="model", scale=1)
            model_banner = gr.Markdown(banner(default_model))
        model.change(banner, model, model_banner, **PRIVATE)
        protected_state = gr.State(None)
        with gr.Tab("Protect"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="1–8 photos of one subject", file_count="multiple", file_types=["image"],
                                    elem_id="uploads")
                    if examples:
                        gr.Examples(examples, inputs=[files], label="Example subjects",
                                    example_labels=[info["name"] for info in subjects.values()])
                    subject_info = gr.Markdown(elem_id="subject-info")
                    noun = gr.Textbox("person", label="What the photos show (the attack's class word)", max_length=40,
                                      elem_id="noun")
                    with gr.Accordion("Held-out photos (optional)", open=False):
                        held_files = gr.File(label="Other photos of the same subject, never given to the attacker: they "
                                                   "measure what it learned", file_count="multiple", file_types=["image"],
                                             elem_id="held-out")
                    method = gr.Dropdown(method_choices, value="ldu", label="Method", elem_id="method")
                    effort = gr.Slider(0, 200, value=getattr(p0, first.effort_field), step=1,
                                       label=f"Iterations (default {getattr(p0, first.effort_field)})", elem_id="effort")
                    budget = gr.Slider(0.5, 32, value=round(p0.budget_rms * 255, 2), step=0.5,
                                       label=f"Budget: RMS in /255 (default {p0.budget_rms * 255:.3g})", elem_id="budget")
                    seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                    with gr.Accordion("Advanced parameters", open=False):
                        advanced = gr.Textbox(label="NAME=VALUE per line (see `python -m ldu methods`)", lines=3,
                                              max_length=pg.MAX_ADVANCED_CHARS, placeholder="strength=0.4")
                    eta = gr.Markdown("Upload photos (or click an example) to see a time estimate.", elem_id="estimate")
                    with gr.Row():
                        go = gr.Button("Protect", variant="primary", elem_id="protect")
                        stop_protect = gr.Button("Stop", variant="secondary", visible=False, elem_id="stop-protect")
                with gr.Column():
                    summary = gr.Markdown(elem_id="protect-summary")
                    slider = gr.ImageSlider(label="Before / after", format="png", type="filepath", elem_id="slider")
                    diff = gr.Image(label="Difference ×10 (first photo)", format="png", type="filepath", interactive=False)
                    table = gr.Dataframe(headers=pg.STAT_HEADERS, label="Statistics", elem_id="stats", interactive=False,
                                         wrap=True, column_widths=["28%"] + ["12%"] * 6, max_chars=40)
                    unavailable = gr.Markdown(elem_id="protect-unavailable")
                    downloads = gr.File(label="Download: protected PNGs (bit-exact) and their manifests",
                                        file_count="multiple", interactive=False, elem_id="downloads")
                    posting = gr.Button("Survives posting? (JPEG + resize)", elem_id="posting")
                    posting_out = gr.Markdown()
            files.change(subject_note, files, [noun, subject_info], **PRIVATE)
            method.change(method_controls, [method, model], [effort, budget], **PRIVATE)
            model.change(method_controls, [method, model], [effort, budget], **PRIVATE)
            for trigger in (files.change, method.change, effort.change, model.change):
                trigger(estimate, [files, model, method, effort, budget, seed, advanced], eta, concurrency_id="estimate",
                        concurrency_limit=1, show_progress="hidden", **PRIVATE)
            show = lambda: gr.update(visible=True, value="Stop", interactive=True)  # noqa: E731
            hide = lambda: gr.update(visible=False)  # noqa: E731
            go.click(show, None, stop_protect, queue=False, **PRIVATE).then(
                run_protect, [files, model, method, effort, budget, seed, advanced, noun],
                [summary, slider, diff, table, downloads, protected_state, unavailable], api_name="protect",
                concurrency_id="gpu", concurrency_limit=1).then(hide, None, stop_protect, queue=False, **PRIVATE)
            stop_protect.click(stop, None, stop_protect, queue=False, api_name="stop")
            posting.click(run_survives_posting, [files, protected_state, model, noun], posting_out, api_name="survives_posting",
                          concurrency_id="gpu", concurrency_limit=1)
        with gr.Tab("Attack"):
            gr.Markdown("The same attack, with the same seed, on the clean and on the protected photos of the Protect tab; "
                        "then what each learned, measured on held-out photos of the subject.")
            with gr.Row():
                attack = gr.Dropdown(attack_names, value=first_attack, label="Attack")
                steps = gr.Slider(1, 1000, value=default_steps, step=1, label=f"Training steps (default {default_steps})",
                                  elem_id="attack-steps")
                purification = gr.Dropdown(["none", *purifications.listed()], value="none", label="Purify the protected photos first")
                attack_seed = gr.Number(0, precision=0, minimum=0, label="Seed")
                n_gen = gr.Slider(2, 8, value=4, step=1, label="Generations")
                attack_seeds = gr.Slider(1, 5, value=1, step=1, label="Seeds (1: a lean; 3 for a verdict, 3× the time)")
            attack_eta = gr.Markdown(elem_id="attack-estimate")
            with gr.Row():
                attack_go = gr.Button("Attack both", variant="primary", elem_id="attack")
                stop_attack = gr.Button("Stop", variant="secondary", visible=False, elem_id="stop-attack")
            verdict = gr.Markdown(elem_id="verdict")
            with gr.Row(equal_height=True):
                references = gr.Gallery(label="The subject (held-out photos)", format="png", columns=4, height=220,
                                        elem_id="references", interactive=False)
                gen_clean = gr.Gallery(label="After attacking the CLEAN photos", format="png", columns=4, height=220,
                                       elem_id="gen-clean", interactive=False)
                gen_prot = gr.Gallery(label="After attacking the PROTECTED photos", format="png", columns=4, height=220,
                                      elem_id="gen-protected", interactive=False)
            result_table = gr.Dataframe(headers=pg.RESULT_HEADERS, label="What the attacker learned", elem_id="result-table",
                                        interactive=False, wrap=True, column_widths=["40%", "20%", "20%", "20%"], max_chars=60)
            with gr.Accordion("Details: training curves", open=False):
                curves = gr.Plot(label="Training loss")
                attack_note = gr.Markdown()
            attack_go.click(show, None, stop_attack, queue=False, **PRIVATE).then(
                run_attack, [files, held_files, model, noun, protected_state, method, effort, budget, seed, advanced, attack,
                             steps, purification, attack_seed, n_gen, attack_seeds],
                [verdict, references, gen_clean, gen_prot, result_table, curves, attack_note], api_name="attack",
                concurrency_id="gpu", concurrency_limit=1).then(hide, None, stop_attack, queue=False, **PRIVATE)
            stop_attack.click(stop, None, stop_attack, queue=False, api_visibility="undocumented")
            model.change(attack_choice, model, [attack, steps], **PRIVATE)
            attack.input(steps_choice, [model, attack], steps, **PRIVATE)
            for trigger in (attack.change, steps.change, n_gen.change, attack_seeds.change, model.change):
                trigger(attack_estimate, [model, attack, steps, n_gen, attack_seeds], attack_eta, concurrency_id="estimate",
                        concurrency_limit=1, show_progress="hidden", **PRIVATE)
        with gr.Tab("Batch"):
            gr.Markdown("The grid runner of `python -m eval run`: methods × purifications × one attack on an image set, "
                        "over seeds, with a downloadable report.")
            with gr.Row():
                b_methods = gr.CheckboxGroup(methods, value=["ldu"], label="Methods")
                b_purif = gr.CheckboxGroup(purifications.listed(), value=[], label="Purifications")
            with gr.Row():
                b_attack = gr.Dropdown(attack_names, value=first_attack, label="Attack")
                b_steps = gr.Slider(1, 1000, value=default_steps, step=1, label=f"Training steps (default {default_steps})")
                b_set = gr.Radio([*SUBJECTS, pg.MY_UPLOADS], value=next(iter(SUBJECTS)), label="Image set")
                b_seeds = gr.Slider(1, 5, value=1, step=1, label="Seeds")
                b_match = gr.Number(None, label="Match PSNR (dB, optional)", minimum=pg.MATCH_PSNR[0], maximum=pg.MATCH_PSNR[1])
            b_eta = gr.Markdown()
            with gr.Row():
                b_go = gr.Button("Run the grid", variant="primary", elem_id="batch")
                stop_batch = gr.Button("Stop", variant="secondary", visible=False)
            b_status = gr.Markdown()
            b_table = gr.Dataframe(headers=pg.BATCH_HEADERS, label="Summary (mean ± std over seeds)", interactive=False,
                                   wrap=True, max_chars=40)
            with gr.Row():
                b_plot1 = gr.Image(label="Learning prevented vs PSNR", format="png", type="filepath", interactive=False)
                b_plot2 = gr.Image(label="Learning prevented per purification", format="png", type="filepath", interactive=False)
            b_files = gr.File(label="Report (zip, with its images)", file_count="multiple", interactive=False)
            model.change(attack_choice, model, [b_attack, b_steps], **PRIVATE)
            b_attack.input(steps_choice, [model, b_attack], b_steps, **PRIVATE)
            for trigger in (b_methods.change, b_purif.change, b_attack.change, b_steps.change, b_seeds.change, model.change):
                trigger(batch_estimate, [model, b_methods, b_purif, b_attack, b_steps, b_seeds, b_match], b_eta,
                        concurrency_id="estimate", concurrency_limit=1, show_progress="hidden", **PRIVATE)
            b_go.click(show, None, stop_batch, queue=False, **PRIVATE).then(
                run_batch, [files, held_files, noun, model, b_methods, b_purif, b_attack, b_steps, b_set, b_seeds, b_match],
                [b_status, b_table, b_plot1, b_plot2, b_files], api_name="batch", concurrency_id="gpu",
                concurrency_limit=1).then(hide, None, stop_batch, queue=False, **PRIVATE)
            stop_batch.click(stop, None, stop_batch, queue=False, api_visibility="undocumented")
        with gr.Tab("About"):
            gr.Markdown(about_text())
        keepalive = gr.Timer(60)  # an open tab is not an idle session
        keepalive.tick(keep_alive, None, None, queue=False, **PRIVATE)
        demo.unload(end_session)
    return demo


if __name__ == "__main__":
    build().queue(max_size=16).launch(max_file_size=MAX_FILE_SIZE, allowed_paths=[str(EXAMPLES)], css=CSS)
