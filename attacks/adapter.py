"""What an attack leaves behind, and how it is put back into a backbone: the `Adapter` record.

An adapter is a folder: the weights in the format diffusers' own loaders read
(`pytorch_lora_weights.safetensors`, `learned_embeds.safetensors`, or `unet/` [+ `text_encoder/`]) plus
`adapter.json` with this record. `applied(backbone, adapter)` puts it into the backbone through those same
loaders for the duration of a `with` block, so generation and post_attack_loss always exercise the saved files.
"""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ldu.finetune import forked_rng

KINDS = ("lora", "textual_inversion", "dreambooth")
RECORD = "adapter.json"
LORA_FILE = "pytorch_lora_weights.safetensors"
TI_FILE = "learned_embeds.safetensors"


@dataclass
class Adapter:
    kind: str
    path: Path
    base_spec: str
    base_revision: str
    token: str  # the instance word ("sks") or the placeholder token ("<sks>")
    prompt: str  # the instance prompt it was trained with; generation and post_attack_loss use it
    params: dict = field(default_factory=dict)
    train_curve: list[float] = field(default_factory=list)
    seconds: float = 0.0
    attack: str = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["path"] = str(self.path)
        return d

    @classmethod
    def load(cls, path: str | Path) -> "Adapter":
        path = Path(path)
        record = path / RECORD
        if not record.exists():
            raise ValueError(f"{path}: not an adapter folder (no {RECORD}); train one with `python -m attacks train`")
        d = json.loads(record.read_text())
        d["path"] = path
        known = {f.name for f in fields(cls)}
        missing = {"kind", "base_spec", "token", "prompt"} - set(d)
        if missing:
            raise ValueError(f"{record}: not a complete adapter record (missing {', '.join(sorted(missing))})")
        return cls(**{k: v for k, v in d.items() if k in known})  # keys from a newer version are ignored


def pipeline(backbone):
    """A StableDiffusionPipeline over the backbone's own modules (nothing is copied or reloaded)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline  # deferred: diffusers takes seconds to import

    pipe = StableDiffusionPipeline(
        vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer, unet=backbone.unet,
        scheduler=DDIMScheduler.from_config(backbone.scheduler.config), safety_checker=None, feature_extractor=None,
        image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def applied(backbone, adapter: Adapter | None, adapter_name: str = "attack"):
    """Within the block, the backbone carries the adapter (loaded from its files with diffusers' loaders).

    The backbone must carry no other LoRA: leaving the block unloads every LoRA layer.
    """
    if adapter is None:
        yield backbone
        return
    if adapter.base_spec != backbone.spec:
        warnings.warn(f"adapter trained on {adapter.base_spec} is applied to {backbone.spec}", stacklevel=3)
    saved = {name: getattr(backbone, name) for name in ("unet", "text_encoder", "tokenizer")}
    backbone.clear_prompt_cache()
    try:
        if adapter.kind == "lora":
            pipe = pipeline(backbone)
            from diffusers.utils import logging as dlog  # deferred, as in pipeline()

            level = dlog.get_verbosity()
            dlog.set_verbosity_error()  # a UNet-only LoRA makes the loader warn that the text encoder got none
            try:
                try:
                    pipe.load_lora_weights(str(adapter.path), weight_name=LORA_FILE, adapter_name=adapter_name)
                finally:
                    dlog.set_verbosity(level)
                yield backbone
            finally:  # also after a failed load: it leaves peft's wrapper layers in the shared modules
                pipe.unload_lora_weights()
        elif adapter.kind == "textual_inversion":
            backbone.tokenizer = copy.deepcopy(saved["tokenizer"])
            backbone.text_encoder = copy.deepcopy(saved["text_encoder"])
            with forked_rng(backbone.device):  # the loader's embedding resize draws from the global RNG
                pipeline(backbone).load_textual_inversion(str(adapter.path), weight_name=TI_FILE, token=adapter.token,
                                                          tokenizer=backbone.tokenizer, text_encoder=backbone.text_encoder)
            yield backbone
        elif adapter.kind == "dreambooth":
            from diffusers import UNet2DConditionModel  # deferred, as in pipeline()

            backbone.unet = UNet2DConditionModel.from_pretrained(Path(adapter.path) / "unet", dtype=backbone.dtype)
            backbone.unet.requires_grad_(False).eval().to(backbone.device)
            if (Path(adapter.path) / "text_encoder").is_dir():
                from transformers import CLIPTextModel  # deferred: only a DreamBooth text encoder needs it

                backbone.text_encoder = CLIPTextModel.from_pretrained(Path(adapter.path) / "text_encoder", dtype=backbone.dtype)
                backbone.text_encoder.requires_grad_(False).eval().to(backbone.device)
            yield backbone
        else:
            raise ValueError(f"unknown adapter kind {adapter.kind!r} (known: {', '.join(KINDS)})")
    finally:
        for name, module in saved.items():
            setattr(backbone, name, module)
        backbone.clear_prompt_cache()


def finish(tmp: Path, out: Path) -> None:
    """Move a completed adapter folder into place (a half-written one never carries the final name)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
