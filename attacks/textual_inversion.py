"""Textual Inversion (Gal et al. 2023, "An Image is Worth One Word"), as diffusers' textual_inversion.py.

A new placeholder token is added to (a copy of) the tokenizer, its embedding initialised from a word, and only
that embedding row is trained with the diffusion loss, on prompts from the paper's object templates. The
other rows are restored after each step (the example's approach). Saved as `learned_embeds.safetensors`
({token: embedding}) so `load_textual_inversion` reads it.

Defaults: the example's lr 5e-4 is scaled by its batch (1) x accumulation (4) to 2e-3 with batch 1; AdamW
weight decay 1e-2; 500 steps (the example runs 3000).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from ldu.finetune import adamw, forked_rng
from ldu.registry import check, param, report

from .adapter import TI_FILE
from .data import Posteriors, Shuffler, train_loop
from .train import Attack, AttackOutput, AttackParams

# A few of the object templates of the Textual Inversion paper's code (imagenet_templates_small).
TEMPLATES = (
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}", "a photo of a clean {}",
    "a close-up photo of a {}", "a bright photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a photo of the small {}", "a photo of the large {}", "a dark photo of the {}",
)


@dataclass
class TIParams(AttackParams):
    steps: int = param(500, "training steps")
    lr: float = param(2e-3, "AdamW learning rate of the embedding")
    batch_size: int = param(1, "images per step")
    token: str = param("<sks>", "the new placeholder token (must not be in the vocabulary)")
    initializer: str | None = param(None, "a single-token word whose embedding starts the new one (None: the last "
                                          "word of the instance prompt that is one token, e.g. its class noun)")
    instance_prompt: str = param("a photo of a <sks> person", "the prompt generation and post_attack_loss use; must "
                                                             "contain the token")
    templates: bool = param(True, "train on the paper's object templates (else only on instance_prompt)")
    weight_decay: float = param(1e-2, "AdamW weight decay")
    flip: bool = param(False, "random horizontal flips")
    seed: int = param(0, "seed of data order, templates, noise and timesteps")

    def __post_init__(self):
        super().__post_init__()
        check(" " not in self.token.strip(), f"token must be one word, got {self.token!r}")


def _initializer(tokenizer, p) -> str:
    """The last word of the instance prompt (not the token) that the vocabulary spells as one token."""
    words = [w for w in p.instance_prompt.replace(p.token, " ").split() if len(tokenizer.encode(w, add_special_tokens=False)) == 1]
    if not words:
        raise ValueError(f"no word of {p.instance_prompt!r} is one token of this vocabulary: set initializer")
    return words[-1]


def textual_inversion(backbone, views: torch.Tensor, p: TIParams, workdir, callback=None) -> AttackOutput:
    tokenizer = copy.deepcopy(backbone.tokenizer)
    # A word the vocabulary already spells as one token ("person" -> "person</w>") is not new either.
    if len(tokenizer.encode(p.token, add_special_tokens=False)) == 1 or tokenizer.add_tokens(p.token) == 0:
        raise ValueError(f"token {p.token!r} is already in the vocabulary: choose a new placeholder like <sks>")
    init_ids = tokenizer.encode(p.initializer or _initializer(tokenizer, p), add_special_tokens=False)
    if len(init_ids) != 1:
        raise ValueError(f"initializer {p.initializer!r} is {len(init_ids)} tokens: choose a word that is one token")
    token_id = tokenizer.convert_tokens_to_ids(p.token)
    text = copy.deepcopy(backbone.text_encoder).float()
    with forked_rng(backbone.device):  # resizing initialises the new row from the global RNG; we set it below
        text.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    emb = text.get_input_embeddings().weight
    with torch.no_grad():
        emb[token_id] = emb[init_ids[0]].clone()
    text.requires_grad_(False)
    emb.requires_grad_(True)
    keep = torch.ones(emb.shape[0], dtype=torch.bool, device=emb.device)
    keep[token_id] = False
    original = emb.detach().clone()

    g = torch.Generator().manual_seed(p.seed)
    inst = Posteriors.of(backbone, views, flip=p.flip)
    order = Shuffler(inst.n, g)
    opt = adamw([emb], lr=p.lr, weight_decay=p.weight_decay)
    templates = [t.format(p.token) for t in TEMPLATES] if p.templates else [p.instance_prompt]
    saved = backbone.tokenizer, backbone.text_encoder
    backbone.tokenizer, backbone.text_encoder = tokenizer, text
    backbone.clear_prompt_cache()
    def batches():
        prompts = [templates[int(i)] for i in torch.randint(0, len(templates), (p.batch_size,), generator=g)]
        return inst.sample(order.next(p.batch_size), g), prompts, None

    def only_the_new_row_learns():
        with torch.no_grad():
            emb[keep] = original[keep]

    try:
        curve = train_loop(backbone, batches, [emb], opt, p.steps, g, callback, grad_text=True, max_grad_norm=None,
                           after_step=only_the_new_row_learns)
        learned = emb.detach()[token_id : token_id + 1].float().cpu().clone()
        save_file({p.token: learned}, str(workdir / TI_FILE))
        report(callback, {"stage": "saved", "step": p.steps, "total": p.steps, "embedding": learned})
    finally:
        backbone.tokenizer, backbone.text_encoder = saved
        backbone.clear_prompt_cache()
    return AttackOutput(kind="textual_inversion", token=p.token, prompt=p.instance_prompt, train_curve=curve)


ATTACK = Attack(
    name="textual_inversion",
    params=TIParams,
    fn=textual_inversion,
    kind="textual_inversion",
    summary="Textual Inversion: learn one new token embedding for the subject (only that row trains)",
    defaults={"tiny": dict(steps=20, lr=5e-2)},
    prompts=lambda noun: {"instance_prompt": f"a photo of a <sks> {noun}"},
    cost=lambda p: p.steps * p.batch_size * 1.2,  # UNet forward+backward equivalents
)
