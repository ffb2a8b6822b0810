"""LDU Playground — Gradio UI only (a first version: the Protect tab; attacks and evaluation come next).

Every function wired here lives in the `ldu` package and runs the same from the CLI and the tests. Uploads
go through `ldu.io.load_images` (the CLI's loader); downloads are the PNG files `save_png` wrote, bit-exact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import gradio as gr

from ldu.backbone import best_builtin
from ldu.io import ImageLoadError, load_images
from ldu.methods import methods

MODELS = [m for m in os.environ.get("LDU_MODELS", "").split(",") if m] or [best_builtin()]
_backbones: dict = {}


def _backbone(spec: str):
    from ldu.backbone import load_backbone

    if spec not in MODELS:
        raise gr.Error(f"model {spec!r} is not on this server's allow-list ({', '.join(MODELS)})")
    if spec not in _backbones:
        _backbones[spec] = load_backbone(spec)
    return _backbones[spec]


def run_protect(files, model, method, iterations, budget_255, seed, progress=gr.Progress()):
    from ldu.methods import Cancelled
    from ldu.protect import MAX_BATCH, protect

    if not files:
        raise gr.Error("Upload 1 to 8 photos of one subject first.")
    if len(files) > MAX_BATCH:
        raise gr.Error(f"{len(files)} files: upload at most {MAX_BATCH} photos of one subject.")
    if iterations < 0:
        raise gr.Error("Iterations must be 0 or more.")
    try:
        images = load_images([f if isinstance(f, str) else f.name for f in files])
    except ImageLoadError as err:
        raise gr.Error("; ".join(f"{Path(n).name}: {p}" for n, p in err.problems)) from None
    bb = _backbone(model)
    params = {"iterations": int(iterations), "seed": int(seed)}
    if "budget_rms" in {f for f in methods[method].params.__dataclass_fields__}:
        params["budget_rms"] = budget_255 / 255
    try:
        params = methods[method].make_params(bb.kind, **params)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    total = max(1, int(iterations))

    def callback(info):
        progress(min(1.0, info.get("step", 0) / total), desc=f"{method}: step {info.get('step', 0)}/{total}")
        return True

    try:
        result = protect(images, bb, method=method, params=params, callback=callback)
    except Cancelled:
        raise gr.Error("Stopped.") from None
    out_dir = Path(tempfile.mkdtemp(prefix="ldu-"))
    paths = result.save(out_dir)
    rows = [[Path(p).name, round(s["psnr"], 2), round(s["ssim"], 4), round(s["rms_255"], 2), round(s["linf_255"], 2),
             round(s["attacker_loss_clean"], 5), round(s["attacker_loss_protected"], 5)]
            for p, s in zip(paths, result.stats["images"])]
    notice = bb.notice or ""
    return [str(p) for p in paths], [str(p) for p in paths], rows, notice


def build() -> gr.Blocks:
    with gr.Blocks(title="LDU Playground") as demo:
        gr.Markdown("# LDU Playground\nProtect photos against diffusion personalization (Latent Diffusion Unlearning, "
                    "arXiv:2510.03089). First version: protection only; the attack and evaluation tabs follow.")
        with gr.Tab("Protect"):
            with gr.Row():
                with gr.Column():
                    files = gr.File(label="1-8 photos of one subject", file_count="multiple", file_types=["image"], elem_id="uploads")
                    model = gr.Dropdown(MODELS, value=MODELS[0], label="Model")
                    method = gr.Dropdown(sorted(methods), value="ldu", label="Method")
                    iterations = gr.Slider(0, 200, value=8, step=1, label="Iterations")
                    budget = gr.Slider(1, 16, value=8, step=0.5, label="RMS budget (x/255)")
                    seed = gr.Number(0, precision=0, label="Seed")
                    go = gr.Button("Protect", variant="primary")
                with gr.Column():
                    notice = gr.Markdown()
                    gallery = gr.Gallery(label="Protected (PNG)", format="png", elem_id="protected")
                    downloads = gr.File(label="Download the protected PNGs (bit-exact)", file_count="multiple")
                    table = gr.Dataframe(headers=["file", "PSNR", "SSIM", "RMS/255", "Linf/255", "attacker loss clean", "protected"],
                                         label="Statistics")
        go.click(run_protect, [files, model, method, iterations, budget, seed], [gallery, downloads, table, notice],
                 api_name="protect", concurrency_id="gpu", concurrency_limit=1)
    return demo


if __name__ == "__main__":
    build().queue(max_size=16).launch(max_file_size="20mb")
