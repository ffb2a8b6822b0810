"""Efficacy experiments on a backbone whose weights mean something (the pocket backbone, or SD on a GPU).

- personalization: does a LoRA-DreamBooth attack on four views of a held-out subject learn it? Its
  post_attack_loss on OTHER clean views of the subject, and how close "a photo of sks ..." generations come to
  the subject, against the base model; plus how much generations of unrelated prompts move, and whether they
  come closer to the subject (a leak).
- protection: does a protection method raise the attacker's loss beyond the draw-to-draw noise, and does an
  attack on the protected views learn the subject worse (higher post_attack_loss on clean held-out views) than
  the same attack, same seed, on the clean views?

Every number is a mean and a standard deviation over seeds (each seed: other views, other draws, other LoRA).

    python -m eval.efficacy --model pocket --seeds 3 --methods ldu,advdm
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ldu.metrics import thumbnails

SUBJECT_PROMPT = "a photo of sks cat"
OTHER_PROMPTS = ("a photo of a rocket", "a red circle on a white background", "a photo of an astronaut")


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def nn_distance(images, target: torch.Tensor) -> float:
    """Mean thumbnail distance of each image to its nearest target thumbnail."""
    return float(torch.cdist(thumbnails(images), target).min(1).values.mean())


def subject_sets(subject: str, seed: int, n_train: int = 4, n_held: int = 8):
    """Training views and OTHER held-out views of a held-out subject of the pocket data, as [3,64,64] tensors."""
    from ldu.pocket.data import subject_views

    def tensors(a):
        return [torch.from_numpy(v).permute(2, 0, 1).float() / 255 for v in a]

    return tensors(subject_views(subject, n_train, seed=seed)), tensors(subject_views(subject, n_held, seed=seed + 100))


def personalization(backbone, subject: str = "chelsea", seeds=(0, 1, 2), steps: int = 300, prompt: str = SUBJECT_PROMPT,
                    attack_params: dict | None = None, n_gen: int = 8, guidance: float = 4.0,
                    attack: str = "lora_dreambooth", gen_steps: int = 25) -> tuple[dict, torch.Tensor]:
    from attacks import generate, post_attack_loss, train
    from ldu import make_draws

    rows = []
    for seed in seeds:
        views, held = subject_sets(subject, seed)
        draws = make_draws(16, len(held), backbone.latent_shape(), backbone.num_train_timesteps, seed=1000 + seed)
        adapter = train(backbone, views, attack,
                        {"steps": steps, "instance_prompt": prompt, "seed": seed, **(attack_params or {})})
        target = thumbnails(held)
        gen_seeds = [10_000 * seed + i for i in range(n_gen)]
        base_gen = generate(backbone, None, [prompt] * n_gen, gen_seeds, steps=gen_steps, guidance=guidance)
        adapted_gen = generate(backbone, adapter, [prompt] * n_gen, gen_seeds, steps=gen_steps, guidance=guidance)
        moved_other, leak_base, leak_adapted = [], [], []
        for other in OTHER_PROMPTS:
            b = generate(backbone, None, [other] * n_gen, gen_seeds, steps=gen_steps, guidance=guidance)
            a = generate(backbone, adapter, [other] * n_gen, gen_seeds, steps=gen_steps, guidance=guidance)
            moved_other.append(float((torch.stack(a) - torch.stack(b)).abs().mean()))
            leak_base.append(nn_distance(b, target))
            leak_adapted.append(nn_distance(a, target))
        rows.append({
            "post_attack_loss_base": float(post_attack_loss(backbone, None, held, draws, prompt=prompt)),
            "post_attack_loss_adapted": float(post_attack_loss(backbone, adapter, held, draws)),
            # thumbnail distance of each generation to its nearest held-out view, and to the views on average
            "subject_nn_distance_base": nn_distance(base_gen, target),
            "subject_nn_distance_adapted": nn_distance(adapted_gen, target),
            "subject_distance_base": float(torch.cdist(thumbnails(base_gen), target).mean()),
            "subject_distance_adapted": float(torch.cdist(thumbnails(adapted_gen), target).mean()),
            "moved_instance_prompt": float((torch.stack(adapted_gen) - torch.stack(base_gen)).abs().mean()),
            "moved_other_prompts": statistics.fmean(moved_other),
            # does the subject leak into other prompts? their generations' distance to the subject's views
            "other_prompts_subject_nn_distance_base": statistics.fmean(leak_base),
            "other_prompts_subject_nn_distance_adapted": statistics.fmean(leak_adapted),
        })
        if seed == seeds[0]:
            picture = torch.cat([torch.cat(list(row[:n_gen]), dim=2) for row in (held, base_gen, adapted_gen)], dim=1)
    return {k: spread([r[k] for r in rows]) for k in rows[0]}, picture


def protection(backbone, method: str, method_params: dict | None = None, subject: str = "chelsea", seeds=(0, 1, 2),
               steps: int = 300, prompt: str = SUBJECT_PROMPT, attack_params: dict | None = None,
               attack: str = "lora_dreambooth") -> dict:
    from attacks import post_attack_loss, train
    from ldu import attacker_loss, get_method, make_draws, protect
    from ldu.protect import to_working

    takes_prompt = "prompt" in get_method(method).params.__dataclass_fields__
    cond = backbone.encode_prompt(prompt)
    rows = []
    for seed in seeds:
        views, held = subject_sets(subject, seed)
        params = {"seed": seed, **({"prompt": prompt} if takes_prompt else {}), **(method_params or {})}
        t0 = time.perf_counter()
        result = protect(views, backbone, method=method, params=params)
        seconds = time.perf_counter() - t0
        x, xp = to_working(views, backbone), to_working(result.images, backbone)  # what the attacker's training sees
        with torch.no_grad():  # attacker loss under 5 independent sets of 16 draws: effect vs draw-to-draw noise
            clean_sets, prot_sets = [], []
            for k in range(5):
                d = make_draws(16, len(views), backbone.latent_shape(), backbone.num_train_timesteps, seed=50_000 + 100 * seed + k)
                clean_sets.append(float(attacker_loss(backbone, x, cond, d, max_batch=64)))
                prot_sets.append(float(attacker_loss(backbone, xp, cond, d, max_batch=64)))
        draws = make_draws(16, len(held), backbone.latent_shape(), backbone.num_train_timesteps, seed=1000 + seed)
        a = {"steps": steps, "instance_prompt": prompt, "seed": seed, **(attack_params or {})}
        on_clean = train(backbone, views, attack, a)
        on_protected = train(backbone, result.images, attack, a)
        rows.append({
            "attacker_loss_clean": statistics.fmean(clean_sets),
            "attacker_loss_protected": statistics.fmean(prot_sets),
            "attacker_loss_gain": statistics.fmean(p - c for p, c in zip(prot_sets, clean_sets)),
            # the noise of one 16-draw measurement: of the loss itself (unpaired), and of the paired gain
            "attacker_loss_draw_noise": statistics.stdev(clean_sets),
            "attacker_loss_gain_draw_noise": statistics.stdev(p - c for p, c in zip(prot_sets, clean_sets)),
            "post_attack_loss_clean_attack": float(post_attack_loss(backbone, on_clean, held, draws)),
            "post_attack_loss_protected_attack": float(post_attack_loss(backbone, on_protected, held, draws)),
            "psnr": statistics.fmean(s["psnr"] for s in result.stats["images"]),
            "rms_255": statistics.fmean(s["rms_255"] for s in result.stats["images"]),
            "linf_255": max(s["linf_255"] for s in result.stats["images"]),
            "seconds_protect": seconds,
        })
        rows[-1]["efficacy"] = rows[-1]["post_attack_loss_protected_attack"] - rows[-1]["post_attack_loss_clean_attack"]
    return {k: spread([r[k] for r in rows]) for k in rows[0]}


def main(argv=None) -> int:
    from ldu import load_backbone, methods

    ap = argparse.ArgumentParser(prog="python -m eval.efficacy", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pocket")
    ap.add_argument("--methods", default="ldu", help="comma-separated protection methods, or 'none'")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="attack steps")
    ap.add_argument("--attack", default="lora_dreambooth", help="lora_dreambooth, dreambooth or textual_inversion")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="an attack parameter (repeatable)")
    ap.add_argument("--subject", default="chelsea")
    ap.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    ap.add_argument("--skip-personalization", action="store_true")
    args = ap.parse_args(argv)
    from attacks import get_attack
    from ldu.cli import parse_sets

    try:  # bad names and values fail here, before any work
        attack_params = parse_sets(args.set, get_attack(args.attack).params)
    except ValueError as err:
        ap.error(str(err))
    bb = load_backbone(args.model)
    seeds = tuple(range(args.seeds))
    report = {"model": bb.spec, "revision": bb.revision, "subject": args.subject, "seeds": list(seeds), "steps": args.steps,
              "attack": args.attack, "attack_params": attack_params}
    if not args.skip_personalization:
        report["personalization"], picture = personalization(bb, args.subject, seeds, args.steps, attack_params=attack_params,
                                                                   attack=args.attack)
        if args.out:  # rows: held-out views, base model, adapted model ("a photo of sks ..."), first seed
            from ldu.protect import to_pil

            to_pil(picture.clamp(0, 1)).save(args.out.with_suffix(".png"))
        print("personalization (mean ± std over seeds):")
        _print_rows(report["personalization"])
    for name in [] if args.methods == "none" else args.methods.split(","):
        methods[name]  # noqa: B018  (unknown names fail here, before any work)
        report.setdefault("protection", {})[name] = r = protection(bb, name, None, args.subject, seeds, args.steps,
                                                                        attack_params=attack_params, attack=args.attack)
        print(f"protection: {name}")
        _print_rows(r)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _print_rows(rows: dict) -> None:
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"  {k:<{width}} {v['mean']:.4f} ± {v['std']:.4f}")


if __name__ == "__main__":
    raise SystemExit(main())
