"""The one paired experiment: what protecting a subject's photos does to a personalization attack, measured on views
of the subject that the attack never saw. The app's Attack tab, the grid runner and `python -m eval.efficacy`
all run it through these functions, so the same inputs give the same numbers everywhere.

    setup = Setup(train=views, held_out=held, noun="robot", seed=0, attack="lora_dreambooth")
    base = reference(backbone, setup)                      # the model before any attack
    clean = attack_side(backbone, setup, setup.train)      # the attack on the clean photos
    prot = attack_side(backbone, setup, protected)         # the same attack, same seed, on the protected photos
    result = compare(base.measures, clean.measures, prot.measures)   # the share of learning prevented, with noise

Conventions for seed s (the published numbers come from these; they are eval/efficacy.py's):
- the attack's seed is s, the protection's seed is s;
- post_attack_loss: the adapted model's diffusion loss on the CLEAN held-out views under LOSS_SETS independent sets
  of LOSS_DRAWS draws, set k seeded 1000 + s + 100_000 k (set 0 is the single set the first numbers used);
- generations: image i of a prompt uses seed 10_000 s + i, for the base model and both attacks alike.

Measures of a side (all raw values are kept): the loss per draw set; for each instance-prompt generation its
distance to the nearest held-out view (16 x 16 thumbnails: 8 x 8 cannot tell the subjects apart) and, when the
references of several subjects are given, which subject it is nearest to (retrieval); the other prompts'
generations' distance to the held-out views (does the subject leak into them?). The base side also keeps the
distances of the training views and of their pixel mean (one blurred image) to the held-out views: the gap an attack
can close, and how much of it a model that learned only the views' average colours would close.

`prevented = (m_protected - m_clean) / (m_base - m_clean)`: 0 when the protection changed nothing, 1 when the
attacker learned nothing, negative when it helped the attacker; "unavailable: the attack learned too little to
measure" when m_base - m_clean is below 3 times its own noise. The share's noise is the delta method's on the pairs
(the denominator's noise included). Without held-out views every efficacy measure is
"unavailable: no held-out views" (the attacks still run and their generations are still shown).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from dataclasses import dataclass, field

import torch

from attacks import Adapter, generate, get_attack, post_attack_loss, purify, train
from attacks.train import aimed
from ldu.losses import make_draws
from ldu.metrics import thumbnails
from ldu.registry import report

LOSS_SETS, LOSS_DRAWS = 5, 16
THUMB = 16  # thumbnail side of the generation metric
NOISE_FACTOR = 3  # a denominator below this many times its own noise is not a measurement
NO_HELD_OUT = "unavailable: no held-out views"
TOO_LITTLE = "unavailable: the attack learned too little to measure"
OTHER_PROMPTS = {
    "pocket": ("a photo of a rocket", "a red circle on a white background", "a photo of an astronaut"),
    "tiny": ("a photo of a dog",),
    "sd": ("a photo of a dog", "a photo of a mountain", "a painting of a city"),
}


def other_prompts(kind: str) -> tuple:
    """The prompts whose drift is measured beside the instance prompt, by backbone kind."""
    return OTHER_PROMPTS.get(kind, OTHER_PROMPTS["sd"])


@dataclass
class Setup:
    """The inputs of one paired experiment (one subject, one seed, one attack)."""

    train: list  # clean training views, [3,H,W] in [0,1]
    held_out: list | None  # clean views the attack never sees (None: efficacy is unavailable)
    noun: str  # the subject's class noun: the attack's prompts ("a photo of sks robot")
    seed: int = 0
    attack: str = "lora_dreambooth"
    attack_params: dict = field(default_factory=dict)  # overrides of the attack's defaults (steps, lr, ...)
    n_gen: int = 4
    gen_steps: int | None = None  # None: the backbone kind's default (GENERATION)
    guidance: float | None = None
    other_prompts: tuple | None = None  # None: OTHER_PROMPTS of the backbone kind; () for none
    subjects: dict | None = None  # name -> held-out views of every subject, for retrieval (optional)
    subject: str | None = None  # which of `subjects` this one is


GENERATION = {"tiny": (2, 4.0), "pocket": (25, 4.0), "sd": (50, 7.5)}  # kind -> (DDIM steps, guidance)
# kind -> the share the app's verdict reads first (the other when that one is unavailable). On pocket the held-out
# loss does not follow what its default attack learns (it rises on 15 of 15 pairs without the prior and changes sign
# between seeds with it, by a few % of its value), while the generations close at least half the gap on 14 of 14
# measurable pairs (docs/RESULTS.md, "pocket v3", the prior at weight 0.2): a share of such a small loss change reads
# 100-200 %.
VERDICT_ON = {"pocket": "prevented_generation"}


def verdict_measure(kind: str) -> str:
    """The share a verdict on this backbone kind reads first: prevented_loss, or prevented_generation."""
    return VERDICT_ON.get(kind, "prevented_loss")


def generation_settings(backbone, setup: Setup) -> tuple[int, float]:
    steps, guidance = GENERATION.get(backbone.kind, GENERATION["sd"])
    return setup.gen_steps or steps, setup.guidance if setup.guidance is not None else guidance


def attack_params(backbone, setup: Setup) -> dict:
    """The attack's overrides: aimed at the subject's noun, the experiment's seed, then the setup's own."""
    return aimed(setup.attack, setup.noun, {"seed": setup.seed, **setup.attack_params}, kind=backbone.kind)


def instance_prompt(backbone, setup: Setup) -> str:
    return get_attack(setup.attack).make_params(backbone.kind, **attack_params(backbone, setup)).instance_prompt


def loss_draws(backbone, setup: Setup) -> list:
    n = len(setup.held_out)
    return [make_draws(LOSS_DRAWS, n, backbone.latent_shape(), backbone.num_train_timesteps, seed=1000 + setup.seed + 100_000 * k)
            for k in range(LOSS_SETS)]


def generation_seeds(setup: Setup) -> list[int]:
    return [10_000 * setup.seed + i for i in range(setup.n_gen)]


def views_key(images) -> str:
    """A content hash of a list of images (caches of a side must never be reused for other pixels)."""
    h = hashlib.sha256()
    for im in images:
        h.update(str(tuple(im.shape)).encode())
        h.update((im.float().clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def _measure(backbone, setup: Setup, adapter: Adapter | None, prompt: str, callback=None) -> tuple[dict, dict]:
    """The measures of one side (adapter None: the base model) and its generations {prompt: images}."""
    steps, guidance = generation_settings(backbone, setup)
    seeds = generation_seeds(setup)
    others = other_prompts(backbone.kind) if setup.other_prompts is None else setup.other_prompts
    prompts = [prompt, *others] if setup.held_out is not None else [prompt]
    gens = {}
    for k, p in enumerate(prompts):
        gens[p] = generate(backbone, adapter, [p] * len(seeds), seeds, steps=steps, guidance=guidance,
                           callback=None if callback is None else
                           lambda info, k=k: callback({**info, "stage": "generate", "step": k * len(seeds) + info["step"],
                                                       "total": len(prompts) * len(seeds)}))
    m: dict = {}
    if setup.held_out is None:
        return m, gens
    sets = [float(v) for v in post_attack_loss(backbone, adapter, setup.held_out, loss_draws(backbone, setup), prompt=prompt)]
    m["post_attack_loss_sets"] = sets
    m["post_attack_loss"] = statistics.fmean(sets)
    thumbs = {p: thumbnails(gens[p], THUMB) for p in prompts}  # each prompt's generations, once

    def nearest(p, views):  # each generation of prompt p: its distance to the nearest of `views` (thumbnails)
        return torch.cdist(thumbs[p], views).min(1).values

    target = thumbnails(setup.held_out, THUMB)
    m["gen_distance"] = nearest(prompt, target).tolist()
    m["gen_distance_mean"] = statistics.fmean(m["gen_distance"])
    if others:
        m["other_prompt_distances"] = {p: float(nearest(p, target).mean()) for p in others}
        m["other_prompts_distance"] = statistics.fmean(m["other_prompt_distances"].values())
    if setup.subjects:
        views = {n: thumbnails(v, THUMB) for n, v in setup.subjects.items()}  # every subject's held-out views, once
        m["retrieved_as"] = recognised_as(thumbs[prompt], views)  # the retrieval, and whom a miss is taken for
        m["retrieval"] = m["retrieved_as"][setup.subject]
        # how near each prompt's generations are to the *other* subjects' views: a move toward every subject alike is
        # a move toward what the subjects share (a common look), not toward this one
        rest = [t for n, t in views.items() if n != setup.subject]
        if rest:
            m["distance_to_other_subjects"] = {p: statistics.fmean(float(nearest(p, t).mean()) for t in rest)
                                               for p in prompts}
    return m, gens


def recognised_as(thumbs: torch.Tensor, views: dict) -> dict:
    """For each subject of `views` (every subject's held-out views, {name: thumbnails}), the share of `thumbs`
    (thumbnails) whose nearest view is one of that subject's: what the images are taken for."""
    pool = torch.cat(list(views.values()))
    owner = [n for n, t in views.items() for _ in range(len(t))]
    nearest = [owner[i] for i in torch.cdist(thumbs, pool).argmin(1).tolist()]
    return {n: nearest.count(n) / len(nearest) for n in views}


def recognised(thumbs: torch.Tensor, views: dict, subject: str) -> float:
    """The share of `thumbs` whose nearest view among every subject's held-out views is one of `subject`'s: the
    retrieval measure."""
    return recognised_as(thumbs, views)[subject]


@dataclass
class Side:
    """What one side of the experiment gave: its measures (raw values), generations {prompt: images}, and for an
    attacked side the adapter and its training curve."""

    measures: dict
    generations: dict
    prompt: str
    adapter: Adapter | None = None
    train_curve: list = field(default_factory=list)


def reference(backbone, setup: Setup, callback=None) -> Side:
    """The base model (no attack) under the same prompts, draws and generation seeds."""
    prompt = instance_prompt(backbone, setup)
    m, gens = _measure(backbone, setup, None, prompt, callback)
    if setup.held_out is not None:
        held = thumbnails(setup.held_out, THUMB)

        def nearest(images):  # mean distance of images to their nearest held-out view
            return float(torch.cdist(thumbnails(images, THUMB), held).min(1).values.mean())

        m["train_views_distance"] = nearest(setup.train)
        # the training views' pixel mean, one blurred image: what learning only their average colours and layout
        # scores (nearer the held-out views than the views themselves on pocket's subjects: a distance rewards blur)
        m["views_mean_distance"] = nearest(torch.stack(list(setup.train)).float().mean(0, keepdim=True))
        if setup.subjects:
            # the retrieval of the training views themselves: what an attack that drew exactly the subject's photos
            # would score, the measure's own ceiling on this subject (pixels at 16 x 16 confuse subjects that share
            # backgrounds, and a crop of a cat with other crops)
            views = {n: thumbnails(v, THUMB) for n, v in setup.subjects.items()}
            m["train_views_retrieval"] = recognised(thumbnails(setup.train, THUMB), views, setup.subject)
    return Side(m, gens, prompt)


def gap_closed(b: dict, distance: float) -> float | None:
    """The share of the base side's closable gap (its generations' distance to the held-out views, less the training
    views') that a distance closes; None when there is no gap to close."""
    closable = b["gen_distance_mean"] - b["train_views_distance"]
    return (b["gen_distance_mean"] - distance) / closable if closable > 0 else None


def attack_side(backbone, setup: Setup, images, out=None, purification: tuple[str, dict] | None = None,
                callback=None) -> Side:
    """The attack (seeded by setup.seed) on `images` (optionally purified first), then its measures."""
    if purification is not None and purification[0] != "none":
        images = purify(images, purification[0], purification[1], backbone=backbone,
                        callback=None if callback is None else lambda info: callback({**info, "stage": "purify"}))
    adapter = train(backbone, images, setup.attack, attack_params(backbone, setup), out=out, overwrite=out is not None,
                    callback=callback)
    m, gens = _measure(backbone, setup, adapter, adapter.prompt, callback)
    return Side(m, gens, adapter.prompt, adapter, adapter.train_curve)


ONE_SAMPLE = "unavailable: one sample gives no noise estimate (use at least 2 generations)"


def sem(values: list[float]) -> float | None:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None


def _shares(base: list[float], clean: list[float], prot: list[float], out: dict, name: str) -> None:
    """out[f"prevented_{name}"] = mean(p - c) / mean(b - c) over paired samples (draw sets, or generation seeds), and
    its noise by the delta method on the pairs: the standard error of e_k = (p_k - c_k) - share (b_k - c_k) over
    mean(b - c), so the denominator's own noise and its correlation with the numerator (both hold c) count."""
    learned = [x - y for x, y in zip(base, clean)]
    gained = [x - y for x, y in zip(prot, clean)]
    out[f"{name}_learned"], out[f"{name}_learned_noise"] = statistics.fmean(learned), sem(learned)
    out[f"{name}_difference"], out[f"{name}_difference_noise"] = statistics.fmean(gained), sem(gained)
    if len(learned) < 2:
        out[f"prevented_{name}"] = ONE_SAMPLE
        return
    denominator = out[f"{name}_learned"]
    if denominator <= 0 or denominator <= NOISE_FACTOR * out[f"{name}_learned_noise"]:
        out[f"prevented_{name}"] = TOO_LITTLE
        return
    share = out[f"{name}_difference"] / denominator
    out[f"prevented_{name}"] = share
    out[f"prevented_{name}_noise"] = sem([g - share * l for g, l in zip(gained, learned)]) / denominator


def compare(b: dict, c: dict, p: dict) -> dict:
    """The share of learning prevented (loss and generation metric) from the measures of the base, clean-attack and
    protected-attack sides, with the noise of every difference:
    - loss: differences paired by draw set; noise = standard error over the LOSS_SETS sets;
    - generation distance: differences paired by generation seed; noise = standard error over the generations.
    The share's noise is the delta method's (see _shares)."""
    if "post_attack_loss_sets" not in c:
        return {"prevented_loss": NO_HELD_OUT, "prevented_generation": NO_HELD_OUT}
    out: dict = {}
    _shares(b["post_attack_loss_sets"], c["post_attack_loss_sets"], p["post_attack_loss_sets"], out, "loss")
    # generations: a larger distance is less like the subject, so the roles are the loss's
    _shares(b["gen_distance"], c["gen_distance"], p["gen_distance"], out, "gen")
    out["prevented_generation"] = out.pop("prevented_gen")
    if "prevented_gen_noise" in out:
        out["prevented_generation_noise"] = out.pop("prevented_gen_noise")
    if "train_views_distance" in b:
        out["gap_closed_clean"] = gap_closed(b, c["gen_distance_mean"])
        if "views_mean_distance" in b:  # what the training views' pixel mean closes: the blur floor (see reference)
            out["gap_closed_views_mean"] = gap_closed(b, b["views_mean_distance"])
    return out


@dataclass
class Paired:
    base: Side
    clean: Side
    protected: Side
    result: dict


def paired(backbone, setup: Setup, protected, purification: tuple[str, dict] | None = None, callback=None,
           cache: dict | None = None) -> Paired:
    """The whole experiment: the base model, the attack on the clean views and on the protected ones (optionally
    purified first), and the comparison. `cache` (a dict the caller keeps) reuses the base and clean sides of the
    same views, setup and backbone across calls (several methods compared on one subject and seed)."""
    key = (backbone.spec, backbone.revision, views_key(setup.train), views_key(setup.held_out or []), setup.noun, setup.seed,
           setup.attack, tuple(sorted(setup.attack_params.items())), setup.n_gen, setup.gen_steps, setup.guidance,
           setup.other_prompts, setup.subject)
    stages = 3
    def step(k):  # progress over the three stages
        return None if callback is None else lambda info: callback({**info, "part": k, "parts": stages})

    cached = cache.get(key) if cache is not None else None
    if cached is None:
        report(callback, {"stage": "reference", "step": 0, "total": 1, "part": 0, "parts": stages})
        cached = (reference(backbone, setup, step(0)), attack_side(backbone, setup, setup.train, callback=step(1)))
        if cache is not None:
            cache[key] = cached
    base, clean = cached
    prot = attack_side(backbone, setup, protected, purification=purification, callback=step(2))
    return Paired(base, clean, prot, compare(base.measures, clean.measures, prot.measures))
