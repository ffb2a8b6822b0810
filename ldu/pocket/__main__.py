"""python -m ldu.pocket train --out DIR [--preset cpu|gpu]  |  check [--model DIR]  |  limits [--refine encoder|decoder]"""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from .check import check
from .train import PRESETS, Config, scheduler, train


def _ints(value: str) -> tuple:
    """Comma-separated whole numbers, or () if any is not one."""
    try:
        return tuple(int(c) for c in value.split(","))
    except ValueError:
        return ()


def _widths(value: str) -> tuple:
    """--unet-channels: three block widths, each a positive multiple of 16 (the UNet's GroupNorm has 16 groups)."""
    widths = _ints(value)
    if len(widths) != 3 or any(w < 16 or w % 16 for w in widths):
        raise argparse.ArgumentTypeError(f"give three widths, each a multiple of 16, e.g. 48,96,96 (got {value!r})")
    return widths


def _heads_width(value: str) -> int:
    """--text-hidden: a positive multiple of 4 (the text encoder's 4 attention heads)."""
    if not value.isdigit() or int(value) < 4 or int(value) % 4:
        raise argparse.ArgumentTypeError(f"give a multiple of 4, e.g. 128 (got {value!r})")
    return int(value)


def _channel_counts(value: str) -> tuple:
    """--linear: component counts of a 4x4 RGB patch's 48 values."""
    counts = _ints(value)
    if not counts or any(not 1 <= k <= 48 for k in counts):
        raise argparse.ArgumentTypeError(f"give component counts from 1 to 48 (a 4x4 RGB patch has 48 values), "
                                         f"separated by commas, e.g. 4,8,16; got {value!r}")
    return counts


def _positive(value: str) -> int:
    """--text-layers: a whole number of at least 1."""
    if not value.isdigit() or int(value) < 1:
        raise argparse.ArgumentTypeError(f"give a whole number of at least 1, e.g. 4 (got {value!r})")
    return int(value)


def _share(value: str) -> float:
    """--decoder-fields: a share from 0 to 1."""
    try:
        share = float(value)
    except ValueError:
        share = -1.0
    if not 0 <= share <= 1:
        raise argparse.ArgumentTypeError(f"give a share from 0 to 1, e.g. 0.4 (got {value!r})")
    return share


def _decoder_options(p: argparse.ArgumentParser) -> None:
    """The decoder's loss and data, shared by train's decoder stage and limits' refine."""
    p.add_argument("--decoder-fields", type=_share, default=None, metavar="SHARE",
                   help="share of flat or smooth colour fields in the decoder's batches (default: the VAE stage's 0.15)")
    p.add_argument("--clamped-loss", action="store_true", default=None,
                   help="the reconstruction loss sees the output clamped to the image range, as it is shown")


def _decoder_overrides(args) -> dict:
    return {k: v for k, v in (("decoder_field_fraction", args.decoder_fields), ("clamped_loss", args.clamped_loss))
            if v is not None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ldu.pocket")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train (or resume) the pocket backbone; writes DIR/pipeline")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--preset", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: about 2 h on 2 cores; gpu: larger batches and text encoder, 7.3 min on one H200 "
                        "(measured with v3's flags, docs/RESULTS.md)")
    t.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--vae-steps", type=int, default=None)
    t.add_argument("--unet-steps", type=int, default=None)
    t.add_argument("--decoder-steps", type=int, default=None)
    t.add_argument("--dataset", type=int, default=None, help="images in the encoded UNet training set")
    t.add_argument("--init-from", default=None, metavar="MODEL",
                   help="pocket or a pocket folder: keep its VAE, go on training its UNet and text encoder (give "
                        "--decoder-steps 0 to keep its decoder too)")
    t.add_argument("--init-keep", choices=("all", "vae"), default=None,
                   help="with --init-from: all (default) or vae (its VAE alone; a fresh UNet and text encoder)")
    t.add_argument("--text-hidden", type=_heads_width, default=None, help="text encoder width (cpu preset 64, gpu 128)")
    t.add_argument("--text-layers", type=_positive, default=None, help="text encoder layers (cpu preset 2, gpu 4)")
    t.add_argument("--unet-channels", type=_widths, default=None, metavar="C1,C2,C3",
                   help="the UNet's block widths, multiples of 16 (default 32,64,64)")
    t.add_argument("--prediction", choices=("epsilon", "v_prediction"), default=None,
                   help="what the UNet predicts (default: epsilon)")
    t.add_argument("--zero-terminal-snr", action="store_true", default=None,
                   help="train and sample a noise schedule that ends at pure noise (needs --prediction v_prediction)")
    t.add_argument("--vae-encoder", choices=("trained", "pca"), default=None,
                   help="trained (default): the VAE's encoder learns; pca: it is a fixed 4x4-patch projection and only "
                        "the decoder learns")
    _decoder_options(t)
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    c = sub.add_parser("check", help="measure the quality of a pocket model; writes check.json and a grid")
    c.add_argument("--model", default="pocket", help="pocket, or a folder")
    c.add_argument("--out", type=Path, default=None, help="where to write check.json and grid.png (default: the model folder)")
    c.add_argument("--samples", type=int, default=16, help="generations per caption class")
    lim = sub.add_parser("limits", help="where the VAE's reconstructions are limited: the decoder's range, and the "
                                        "encoder or decoder fine-tuned alone (measured, never saved)")
    lim.add_argument("--model", default="pocket", help="pocket, or a folder")
    lim.add_argument("--refine", choices=("encoder", "decoder"), default=None, help="also fine-tune this part alone")
    lim.add_argument("--steps", type=int, default=600, help="refine steps (batch 16)")
    lim.add_argument("--lr", type=float, default=1e-4, help="refine learning rate")
    lim.add_argument("--anchor", type=float, default=1.0, help="encoder refine: weight holding its latents near the model's")
    lim.add_argument("--range-steps", type=int, default=400, help="Adam steps of the latent optimised through the decoder")
    lim.add_argument("--linear", type=_channel_counts, default=(), metavar="K1,K2,...",
                     help="also measure linear 4x4-patch projections with these many components (what a linear "
                          "encoder and decoder of each latent size keep)")
    _decoder_options(lim)
    lim.add_argument("--out", type=Path, default=None, help="also write the numbers here as JSON")
    lim.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.command == "train":
        if args.init_keep and not args.init_from:
            ap.error("--init-keep needs --init-from MODEL (the model whose parts are kept)")
        overrides = {k: v for k, v in (("seed", args.seed), ("vae_steps", args.vae_steps), ("unet_steps", args.unet_steps),
                                       ("decoder_steps", args.decoder_steps), ("dataset", args.dataset),
                                       ("init_from", args.init_from), ("init_keep", args.init_keep),
                                       ("text_hidden", args.text_hidden), ("text_layers", args.text_layers),
                                       ("unet_channels", args.unet_channels), ("prediction_type", args.prediction),
                                       ("zero_terminal_snr", args.zero_terminal_snr), ("vae_encoder", args.vae_encoder))
                     if v is not None} | _decoder_overrides(args)
        try:
            cfg = replace(PRESETS[args.preset], **overrides)
            scheduler(cfg)
        except ValueError as e:
            ap.error(str(e))
        folder = train(args.out, cfg, device=args.device)
        print(f"wrote {folder}")
        return 0
    if args.command == "limits":
        from .limits import limits, show  # deferred: only this command needs it

        for name in ("steps", "range_steps"):
            if getattr(args, name) < 1:
                ap.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
        res = limits(args.model, args.refine, args.steps, args.range_steps, args.anchor, args.lr, args.linear,
                     replace(Config(), **_decoder_overrides(args)))
        print(show(res))
        if args.out:
            args.out.write_text(json.dumps(res, indent=2) + "\n")
        return 0
    check(args.model, args.out, samples=args.samples)
    return 0


if __name__ == "__main__":
    sys.exit(main())
