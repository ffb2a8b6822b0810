"""Write a Stable-Diffusion-1.5-architecture folder with random weights in diffusers layout (what `--model DIR` and
the app load), for benchmarks on a machine without the hub: real FLOPs and memory, meaningless images.

    python bench/make_random_sd.py --out /tmp/sd15-random [--resolution 512]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from common import random_backbone  # noqa: E402  (common.py puts the repo on the path)

from ldu.tiny import strip_absent_components  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resolution", type=int, default=512)
    args = ap.parse_args()
    bb = random_backbone("sd15", "cpu", torch.float32, args.resolution)
    pipe = StableDiffusionPipeline(vae=bb.vae, text_encoder=bb.text_encoder, tokenizer=bb.tokenizer, unet=bb.unet,
                                   scheduler=bb.scheduler, safety_checker=None, feature_extractor=None, image_encoder=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(args.out, safe_serialization=True)
    strip_absent_components(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
