"""Grid configs (YAML or JSON): parsed and checked completely before any work starts.

    name: example
    image_sets:
      robot: {subject: robot, train: 4, held_out: 8}            # a built-in subject (ldu.subjects): views per seed
      mine: {folder: photos/me, held_out_folder: photos/me-held-out, noun: person}
    protect_backbone: pocket            # a spec or a list of specs
    attack_backbone: pocket             # default: the protect backbones ("protect on A, attack on B" when they differ)
    methods: [ldu, {name: advdm, params: {iterations: 50}}]    # the clean reference "none" is always added
    purifications: [none, {name: jpeg, params: {quality: 75}}]
    attacks: [{name: lora_dreambooth, params: {steps: 300, instance_prompt: "a photo of sks cat"}}]
    generate: {n: 4, steps: 25, guidance: 7.5}                 # prompts default to each attack's instance prompt
    metrics: [psnr, ssim, lpips, thumb_distance, clip_i]
    seeds: [0, 1, 2]
    match_psnr: 32                      # optional: each method's binding budget set per image set to land at 32 dB

Efficacy needs held-out views (a built-in subject's, or `held_out_folder`): without them a cell still attacks and
generates, and its efficacy says "unavailable: no held-out views".

Every problem is reported as `key.path: what is wrong`, all of them at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from attacks import attacks, purifications
from attacks.train import aimed, default_attack
from ldu.backbone import kind_of
from ldu.io import IMAGE_SUFFIXES
from ldu.methods import methods
from ldu.subjects import SUBJECTS

from .metrics import metrics as metric_registry


class ConfigError(ValueError):
    """The config has problems; str() lists them one per line, each starting with the key path."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class Named:
    name: str
    params: dict = field(default_factory=dict)

    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + "(" + ",".join(f"{k}={v}" for k, v in sorted(self.params.items())) + ")"


@dataclass
class Config:
    name: str
    image_sets: dict
    protect_backbones: list[str]
    attack_backbones: list[str]
    methods: list[Named]
    purifications: list[Named]
    attacks: list[Named]
    generate: dict
    metrics: list[str]
    seeds: list[int]
    device: str | None = None
    dtype: str | None = None
    match_psnr: float | None = None
    source: Path | None = None


def load(path: str | Path) -> Config:
    path = Path(path)
    if not path.exists():
        raise ConfigError([f"{path}: no such config file"])
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as err:  # noqa: BLE001  (yaml and json raise their own error types)
        raise ConfigError([f"{path}: not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'} ({err})"]) from None
    return parse(raw, base=path.parent, source=path)


def parse(raw, base: Path = Path("."), source: Path | None = None) -> Config:
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["(top level): expected a mapping of keys (name, image_sets, methods, ...)"])
    known = {"name", "image_sets", "protect_backbone", "attack_backbone", "methods", "purifications", "attacks",
             "generate", "metrics", "seeds", "device", "dtype", "match_psnr"}
    for key in raw:
        if key not in known:
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(known))})")

    sets = raw.get("image_sets")
    image_sets = {}
    if not isinstance(sets, dict) or not sets:
        problems.append("image_sets: expected a non-empty mapping of name -> {folder: ...} or {pocket_subject: ...}")
    else:
        for name, spec in sets.items():
            image_sets[name] = _image_set(f"image_sets.{name}", spec, base, problems)

    protect = _strings("protect_backbone", raw.get("protect_backbone", "tiny"), problems)
    attack_bb = _strings("attack_backbone", raw.get("attack_backbone", protect), problems)

    method_list = [m for m in _named_list("methods", raw.get("methods", ["ldu"]), problems)]
    for i, m in enumerate(method_list):
        if m.name != "none":
            _check_entry(f"methods[{i}]", m, methods, "method", problems)
    if not any(m.name == "none" for m in method_list):
        method_list.insert(0, Named("none"))

    purif = _named_list("purifications", raw.get("purifications", ["none"]), problems)
    for i, p in enumerate(purif):
        if p.name != "none":
            _check_entry(f"purifications[{i}]", p, purifications, "purification", problems)
    if not any(p.name == "none" for p in purif):
        purif.insert(0, Named("none"))

    first_kind = kind_of(attack_bb[0]) if attack_bb and isinstance(attack_bb[0], str) else "sd"
    attack_list = _named_list("attacks", raw.get("attacks", [default_attack(first_kind)]), problems)
    for i, a in enumerate(attack_list):
        _check_entry(f"attacks[{i}]", a, attacks, "attack", problems)

    gen = raw.get("generate", {}) or {}
    if not isinstance(gen, dict):
        problems.append("generate: expected a mapping like {n: 4, steps: 25, guidance: 7.5, prompts: [...]}")
        gen = {}
    for key, kind, default in (("n", int, 4), ("steps", int, 25), ("guidance", (int, float), 7.5)):
        value = gen.setdefault(key, default)
        if not isinstance(value, kind) or isinstance(value, bool) or value < (1 if kind is int else 0):
            problems.append(f"generate.{key}: expected a positive number, got {value!r}")
    for key in gen:
        if key not in ("n", "steps", "guidance", "prompts"):
            problems.append(f"generate.{key}: unknown key (known: n, steps, guidance, prompts)")
    if "prompts" in gen and not (isinstance(gen["prompts"], list) and all(isinstance(p, str) for p in gen["prompts"])):
        problems.append("generate.prompts: expected a list of strings")

    metric_names = raw.get("metrics", sorted(metric_registry))
    if not isinstance(metric_names, list) or not all(isinstance(m, str) for m in metric_names):
        problems.append("metrics: expected a list of metric names")
        metric_names = []
    for i, m in enumerate(metric_names):
        if m not in metric_registry:
            problems.append(f"metrics[{i}]: unknown metric {m!r} (known: {', '.join(sorted(metric_registry))})")

    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
        problems.append(f"seeds: expected a non-empty list of integers, got {seeds!r}")
        seeds = [0]
    name = raw.get("name", source.stem if source else "grid")
    if not isinstance(name, str):
        problems.append(f"name: expected a string, got {name!r}")
    match = raw.get("match_psnr")
    if match is not None and (not isinstance(match, (int, float)) or isinstance(match, bool) or not 15 <= match <= 60):
        problems.append(f"match_psnr: expected a PSNR in dB between 15 and 60, got {match!r}")
    if problems:
        raise ConfigError(problems)
    return Config(name=name, image_sets=image_sets, protect_backbones=protect, attack_backbones=attack_bb,
                  methods=method_list, purifications=purif, attacks=attack_list, generate=gen, metrics=list(metric_names),
                  seeds=seeds, device=raw.get("device"), dtype=raw.get("dtype"), match_psnr=match, source=source)


def _image_set(key: str, spec, base: Path, problems: list[str]) -> dict:
    if not isinstance(spec, dict):
        problems.append(f"{key}: expected {{subject: NAME, train: 4, held_out: 8}} or {{folder: PATH, held_out_folder: PATH}}")
        return {}
    if "subject" in spec:
        if spec["subject"] not in SUBJECTS:
            problems.append(f"{key}.subject: {spec['subject']!r} is not a built-in subject ({', '.join(SUBJECTS)})")
        for n in ("train", "held_out"):
            if not isinstance(spec.get(n, 4), int) or spec.get(n, 4) < 1:
                problems.append(f"{key}.{n}: expected a positive integer")
        extra = set(spec) - {"subject", "train", "held_out"}
        if extra:
            problems.append(f"{key}: unknown key(s) {', '.join(sorted(extra))} (a subject set has subject, train, held_out)")
        return {"subject": spec["subject"], "train": spec.get("train", 4), "held_out": spec.get("held_out", 8)}
    if "folder" not in spec:
        problems.append(f"{key}: needs folder (a folder of photos) or subject (a built-in subject)")
        return {}
    out = {"noun": spec.get("noun", "person")}
    if not isinstance(out["noun"], str) or not out["noun"].strip():
        problems.append(f"{key}.noun: expected what the photos show, e.g. person")
    for n in ("folder", "held_out_folder"):
        if n in spec:
            folder = (base / spec[n]).resolve() if not Path(spec[n]).is_absolute() else Path(spec[n])
            if not folder.is_dir():
                problems.append(f"{key}.{n}: no such folder: {folder}")
            elif not any(p.suffix.lower() in IMAGE_SUFFIXES for p in folder.iterdir()):
                problems.append(f"{key}.{n}: no images in {folder}")
            out[n] = folder
    return out


def quick(image_set: dict, backbone: str, chosen_methods: list[str], chosen_purifications: list[str], attack: str,
          steps: int, seeds: int, noun: str, match_psnr: float | None = None, generations: int = 2) -> Config:
    """The config of a small grid (the app's Batch tab): one image set, methods aimed at the subject's noun, the
    given purifications and one attack, `seeds` seeds."""
    raw = {"name": f"batch ({backbone})", "image_sets": {"set": image_set}, "protect_backbone": backbone,
           "methods": [{"name": m, "params": {"prompt": f"a photo of sks {noun}"}} for m in chosen_methods],
           "purifications": ["none", *chosen_purifications],
           "attacks": [{"name": attack, "params": aimed(attack, noun, {"steps": int(steps)}, kind=kind_of(backbone))}],
           "generate": {"n": generations, "steps": 25 if backbone != "tiny" else 2, "guidance": 4.0},
           "metrics": ["psnr", "ssim", "linf", "rms", "lpips", "thumb_distance", "clip_i"],
           "seeds": list(range(int(seeds))), **({"match_psnr": match_psnr} if match_psnr else {})}
    return parse(raw)


def _strings(key: str, value, problems: list[str]) -> list[str]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        problems.append(f"{key}: expected a backbone spec or a list of them, got {value!r}")
        return []
    return values


def _named_list(key: str, value, problems: list[str]) -> list[Named]:
    if not isinstance(value, list) or not value:
        problems.append(f"{key}: expected a non-empty list of names or {{name: ..., params: {{...}}}}")
        return []
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            out.append(Named(item))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            params = item.get("params", {}) or {}
            extra = set(item) - {"name", "params"}
            if extra:
                problems.append(f"{key}[{i}]: unknown key(s) {', '.join(sorted(extra))} (use name and params)")
            if not isinstance(params, dict):
                problems.append(f"{key}[{i}].params: expected a mapping")
                params = {}
            out.append(Named(item["name"], dict(params)))
        else:
            problems.append(f"{key}[{i}]: expected a name or {{name: ..., params: {{...}}}}, got {item!r}")
    return out


def _check_entry(key: str, item: Named, registry: dict, what: str, problems: list[str]) -> None:
    if item.name not in registry:
        problems.append(f"{key}.name: unknown {what} {item.name!r} (known: {', '.join(sorted(registry))})")
        return
    try:
        registry[item.name].make_params("sd", **item.params)
    except (TypeError, ValueError) as err:
        problems.append(f"{key}.params: {err}")
