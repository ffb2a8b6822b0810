"""Where a pocket VAE's reconstructions are limited: by its encoder, its decoder, or its latent space.

    python -m ldu.pocket limits                                  # the decoder's range (20 s on 2 cores)
    python -m ldu.pocket limits --refine encoder --steps 600     # and the encoder alone fine-tuned (about 6 min)
    python -m ldu.pocket limits --refine decoder --steps 600     # or the decoder alone (about 6 min)
    python -m ldu.pocket limits --refine decoder --clamped-loss --decoder-fields 0.4   # with the decoder stage's options
    python -m ldu.pocket limits --linear 4,8,16                  # and linear 4x4-patch projections of those sizes

(1) The decoder's range: the latent of chelsea's whole photo (squashed to 64 x 64) optimised through the frozen
decoder (Adam from the encoder's latent), so the eye boxes' PSNR is what the decoder can draw from some latent, and
how far (RMS, in the UNet's scaled units) that latent lies from the encoder's. (2) A refine: the encoder alone (its
latents held near the shipped ones by `anchor` x their mean squared distance, so the latent space the UNet learned
stays) or the decoder alone (the latent space exactly kept), trained from the model's weights on the VAE's data;
then check.py's VAE measures again and how far the encoder's latents moved on the built-in subjects' views and on
fresh training images (`--clamped-loss` and `--decoder-fields` as in `train`). The refined VAE is only measured,
never saved over the model. (3) The linear bound: the principal-component projection of 4 x 4 patches
(`ldu.pocket.pca`, fitted as `vae_encoder="pca"` fits it) with each of `linear` components, decoded by its transpose.
"""

from __future__ import annotations

import copy
import time
from dataclasses import replace

import numpy as np
import torch

from ..backbone import load_backbone
from ..subjects import SUBJECTS, subject_views
from . import data, pca
from .check import EYES, _psnr, to_unit, vae_measures, whole_photo
from .train import Config, fit_pca, lr_at, reconstruction_loss, to_tensor

def _latent(vae, x: torch.Tensor) -> torch.Tensor:
    """x in [0,1] -> the posterior mean (unscaled)."""
    return vae.encode(x * 2 - 1).latent_dist.mean


def _image(vae, z: torch.Tensor) -> torch.Tensor:
    return (vae.decode(z).sample + 1) / 2


def _eyes(x: torch.Tensor, y: torch.Tensor) -> dict:
    return {k: _psnr(x[0, :, t:b, l:r], y[0, :, t:b, l:r]) for k, (l, t, r, b) in EYES.items()}


def decoder_range(vae, scaling: float, steps: int = 400, lr: float = 0.02) -> dict:
    """What the frozen decoder can draw of chelsea's whole photo: PSNR (whole, eye boxes) from the encoder's latent
    and from a latent optimised through the decoder, and that latent's RMS distance from the encoder's (scaled)."""
    x = whole_photo("chelsea")
    with torch.no_grad():
        z0 = _latent(vae, x)
        start = _image(vae, z0).clamp(0, 1)
    z = z0.clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        (_image(vae, z) - x).pow(2).mean().backward()
        opt.step()
    with torch.no_grad():
        best = _image(vae, z).clamp(0, 1)
    return {"steps": steps, "encoder": {"whole": _psnr(x[0], start[0]), **_eyes(x, start)},
            "optimised_latent": {"whole": _psnr(x[0], best[0]), **_eyes(x, best)},
            "latent_rms_encoder": float((z0 * scaling).pow(2).mean().sqrt()),
            "latent_rms_moved": float(((z.detach() - z0) * scaling).pow(2).mean().sqrt())}


def refine(vae, part: str, steps: int, lr: float = 1e-4, anchor: float = 1.0, batch: int = 16, seed: int = 0,
           photo_fraction: float = 0.8, cfg: Config | None = None, log=print):
    """A copy of `vae` with `part` ("encoder" or "decoder") trained alone for `steps` (the training's reconstruction
    loss and kinds of data as `cfg`'s decoder stage has them; the encoder's latents held near the original's by
    `anchor`; `cfg` by default the preset's). Returns the copy."""
    if part not in ("encoder", "decoder"):
        raise ValueError(f"refine: part must be encoder or decoder, got {part!r}")
    cfg = cfg or Config()
    ref, vae = vae, copy.deepcopy(vae)
    scaling = vae.config.scaling_factor
    params = [*vae.encoder.parameters(), *vae.quant_conv.parameters()] if part == "encoder" else \
        [*vae.decoder.parameters(), *vae.post_quant_conv.parameters()]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    vae.train()
    t0 = time.perf_counter()
    for step in range(steps):
        x = to_tensor(data.batch(seed + 77, step, batch, photo_fraction=photo_fraction, field_fraction=cfg.decoder_fields,
                                 texture_fraction=cfg.vae_texture_fraction, recolour_fraction=cfg.vae_recolour_fraction)[0])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, min(50, steps // 10))
        z = vae.encode(x).latent_dist.mean
        loss = reconstruction_loss(vae.decode(z).sample, x, cfg.clamped_loss)
        if part == "encoder":
            with torch.no_grad():
                z0 = ref.encode(x).latent_dist.mean
            loss = loss + anchor * ((z - z0) * scaling).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  {part} step {step + 1}/{steps}: loss {loss.item():.4f}, {time.perf_counter() - t0:.0f} s")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def latent_drift(ref, vae, scaling: float, seed: int = 5) -> dict:
    """RMS distance (scaled latents) between two VAEs' encodings of every built-in subject's views and of 64 fresh
    training images."""
    views = torch.cat([to_unit(subject_views(n, split, 8, seed=seed)[0]) for n in SUBJECTS for split in ("train", "held_out")])
    fresh = to_unit(data.batch(999, 0, 64)[0])
    return {name: float(((_latent(ref, x) - _latent(vae, x)) * scaling).pow(2).mean().sqrt())
            for name, x in (("subjects", views), ("fresh", fresh))}


def linear_round_trips(channels: tuple[int, ...]) -> dict:
    """{k: [N,3,64,64] in [0,1] -> the reconstruction through the k-component patch projection and its transpose}
    for each k of `channels` (one fit: the first k components of the largest fit are the k-component fit)."""
    mean, comps = fit_pca(replace(Config(), latent_channels=max(channels)))

    def round_trip(c):
        return lambda x: (pca.unproject(pca.project(x * 2 - 1, mean, c), mean, c) + 1) / 2

    return {k: round_trip(comps[:, :k]) for k in channels}


def limits(model: str = "pocket", part: str | None = None, steps: int = 600, range_steps: int = 400,
           anchor: float = 1.0, lr: float = 1e-4, linear: tuple[int, ...] = (), cfg: Config | None = None, log=print) -> dict:
    """The decoder's range and the VAE measures of `model`, with `part` those of that part refined alone (with `cfg`'s
    decoder-stage loss and data), and those of the linear projections with each of `linear` components."""
    torch.manual_seed(0)
    bb = load_backbone(model, device="cpu", dtype=torch.float32)
    vae, scaling = bb.vae.eval(), bb.vae.config.scaling_factor

    def measures(round_trip):
        with torch.no_grad():
            m, _ = vae_measures(round_trip)
        return {k: m[k] for k in ("held_out_photos_mean", "synthetic_psnr_min", "synthetic_colour_shift_max_255",
                                  "chelsea_left_eye_psnr", "chelsea_right_eye_psnr", "chelsea_whole_psnr")}

    def of(v):
        return lambda x: _image(v, _latent(v, x))

    res = {"model": bb.spec, "revision": bb.revision, "decoder_range": decoder_range(vae, scaling, range_steps),
           "measures": measures(of(vae)),
           "linear": {k: measures(f) for k, f in linear_round_trips(linear).items()} if linear else {}}
    if part:
        refined = refine(vae, part, steps, lr=lr, anchor=anchor, cfg=cfg, log=log)
        cfg = cfg or Config()
        res["refine"] = {"part": part, "steps": steps, "lr": lr, "anchor": anchor if part == "encoder" else None,
                         **{k: getattr(cfg, k) for k in ("decoder_field_fraction", "clamped_loss")},
                         "measures": measures(of(refined)), "latent_drift": latent_drift(vae, refined, scaling)}
    return res


def show(res: dict) -> str:
    d = res["decoder_range"]

    def eyes(m):
        return f"{m['left_eye']:.2f} / {m['right_eye']:.2f} dB (whole {m['whole']:.2f})"

    lines = [f"model {res['model']} ({res['revision']})",
             f"  chelsea's eyes from the encoder's latent:        {eyes(d['encoder'])}",
             f"  from a latent optimised through the decoder:    {eyes(d['optimised_latent'])}, {d['steps']} steps",
             f"  that latent moved {d['latent_rms_moved']:.3f} RMS from the encoder's (whose own RMS is "
             f"{d['latent_rms_encoder']:.3f}), scaled units"]
    rows = [("as shipped", res["measures"], None)]
    if "refine" in res:
        r = res["refine"]
        rows.append((f"{r['part']} refined, {r['steps']} steps", r["measures"], r["latent_drift"]))
    rows += [(f"linear projection, {k} channels", m, None) for k, m in res["linear"].items()]
    lines.append(f"  {'VAE':<28} {'photos':>7} {'synth min':>9} {'colour':>7} {'eyes':>13}  latent drift (subjects / fresh)")
    for name, m, drift in rows:
        moved = "" if drift is None else "{subjects:.4f} / {fresh:.4f}".format(**drift)
        lines.append(f"  {name:<28} {m['held_out_photos_mean']:7.2f} {m['synthetic_psnr_min']:9.2f} "
                     f"{m['synthetic_colour_shift_max_255']:7.2f} {m['chelsea_left_eye_psnr']:6.2f} / "
                     f"{m['chelsea_right_eye_psnr']:.2f}  {moved}")
    return "\n".join(lines)
