"""The one paired experiment: the app, the grid runner and the efficacy CLI give the same numbers for the same inputs;
without held-out views efficacy is unavailable, not silently measured on the training photos."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldu.subjects import subject_views

STEPS = 2


def _write(tmp_path, name, arrays):
    folder = tmp_path / name
    folder.mkdir()
    paths = []
    for i, a in enumerate(arrays):
        paths.append(folder / f"{name}-{i}.png")
        Image.fromarray(a).save(paths[-1])
    return folder, [str(p) for p in paths]


@pytest.mark.slow
def test_the_three_entry_points_give_identical_numbers(tiny, tmp_path):
    from eval import playground
    from eval.config import parse
    from eval.efficacy import run
    from eval.grid import run as run_grid
    from ldu import load_images, protect

    seed, method = 0, {"pid": {"iterations": 1}}
    # 1. python -m eval.efficacy's run()
    eff = run(tiny, ["robot"], [seed], ["pid"], "lora_dreambooth", {"steps": STEPS}, method_params=method, n_gen=2,
              log=lambda *a: None)
    (row,) = eff["protection"]
    # 2. the grid runner, on the same subject and seed
    cfg = parse({"image_sets": {"robot": {"subject": "robot", "train": 4, "held_out": 8}}, "protect_backbone": "tiny",
                 "methods": [{"name": "pid", "params": {"iterations": 1}}],
                 "attacks": [{"name": "lora_dreambooth", "params": {"steps": STEPS}}],
                 "generate": {"n": 2, "steps": 2, "guidance": 4.0}, "metrics": ["psnr"], "seeds": [seed]})
    run_grid(cfg, tmp_path / "grid", progress=False)
    summary = {r["method"].split("(")[0]: r for r in json.loads((tmp_path / "grid" / "summary.json").read_text())}
    records = [json.loads(line) for line in (tmp_path / "grid" / "results.jsonl").read_text().splitlines()]
    grid_clean = next(r for r in records if r["method"]["name"] == "none")
    grid_prot = next(r for r in records if r["method"]["name"] == "pid")
    # 3. the app's Protect then Attack tabs, on the same views saved as PNG files (exact 8-bit pixels)
    _, train = _write(tmp_path, "train", subject_views("robot", "train", 4, seed=seed)[0])
    _, held = _write(tmp_path, "held", subject_views("robot", "held_out", 8, seed=seed)[0])
    params = playground.method_params("pid", "tiny", effort=1, seed=seed, noun="robot")
    r = protect(load_images(train), tiny, method="pid", params=params)
    protected = r.save(tmp_path / "protected")
    setup = playground.attack_setup(tiny, train, held, "robot", "lora_dreambooth", STEPS, seed, 2)
    setup.other_prompts = None  # the efficacy CLI and the grid also generate the other prompts (not part of the shares)
    _, app = playground.attack_both(tiny, setup, [str(p) for p in protected])

    assert row["psnr"] == pytest.approx(summary["pid"]["psnr_mean"], abs=1e-9)
    for k in ("post_attack_loss_clean_attack", "post_attack_loss_protected_attack"):
        side = grid_clean if "clean" in k else grid_prot
        assert row[k] == pytest.approx(side["side"]["post_attack_loss"], abs=1e-7), k
    assert row["post_attack_loss_protected_attack"] == pytest.approx(app["result"]["loss_difference"] + row["post_attack_loss_clean_attack"], abs=1e-7)
    for k in ("prevented_loss", "prevented_generation", "loss_difference"):
        grid_value = summary["pid"].get(f"{k}_mean")
        if isinstance(row[k], str):
            assert row[k] == grid_value == app["result"][k], k
        else:
            assert row[k] == pytest.approx(grid_value, abs=1e-7) and row[k] == pytest.approx(app["result"][k], abs=1e-7), k


def test_without_held_out_views_efficacy_is_unavailable_but_the_attacks_run(tiny, tmp_path):
    from eval import playground
    from eval.experiment import NO_HELD_OUT
    from ldu import load_images, protect

    _, train = _write(tmp_path, "train", subject_views("kite", "train", 2, seed=0)[0])
    r = protect(load_images(train), tiny, method="pid", params={"iterations": 1})
    protected = r.save(tmp_path / "protected")
    setup = playground.attack_setup(tiny, train, [], "kite", "lora_dreambooth", STEPS, 0, 2)
    message, out = playground.attack_both(tiny, setup, [str(p) for p in protected])
    assert out["result"]["prevented_loss"] == NO_HELD_OUT and "No verdict" in message and "held-out" in message
    assert len(out["generations"][0]) == 2 and len(out["generations"][1]) == 2  # the attacks still ran and generated


def test_the_grid_reports_no_held_out_views_as_unavailable(tmp_path):
    from eval.config import parse
    from eval.grid import run

    folder, _ = _write(tmp_path, "photos", subject_views("frog", "train", 2, seed=0)[0])
    cfg = parse({"image_sets": {"mine": {"folder": str(folder), "noun": "frog"}}, "protect_backbone": "tiny",
                 "methods": [{"name": "pid", "params": {"iterations": 1}}],
                 "attacks": [{"name": "lora_dreambooth", "params": {"steps": STEPS}}],
                 "generate": {"n": 1, "steps": 1, "prompts": []}, "metrics": ["psnr", "thumb_distance"], "seeds": [0]})
    run(cfg, tmp_path / "out", progress=False)
    rows = {r["method"].split("(")[0]: r for r in json.loads((tmp_path / "out" / "summary.json").read_text())}
    assert rows["pid"]["prevented_loss_mean"] == "unavailable: no held-out views"
    assert rows["pid"]["thumb_distance_mean"] == "unavailable: no held-out views"
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert all(r["status"] == "ok" and r["images"]["generations"] for r in records)


def test_built_in_subjects_held_out_views_share_no_source_pixels():
    """Photo subjects: every held-out crop lies right of every training crop (the regions never meet), for several
    seeds. Drawn subjects: every view is its own drawing (no two identical)."""
    from ldu.subjects import SUBJECTS

    for name, s in SUBJECTS.items():
        for seed in range(3):
            train, train_boxes = subject_views(name, "train", 8, seed=seed)
            held, held_boxes = subject_views(name, "held_out", 8, seed=seed)
            assert train.shape == held.shape == (8, 64, 64, 3)
            if s.photo:
                for tl, tt, tr, tb in train_boxes:
                    for hl, ht, hr, hb in held_boxes:
                        overlap = max(0, min(tr, hr) - max(tl, hl)) * max(0, min(tb, hb) - max(tt, ht))
                        assert overlap == 0, (name, seed)
            else:
                flat = np.concatenate([train, held]).reshape(16, -1)
                assert len({row.tobytes() for row in flat}) == 16
    a, _ = subject_views("robot", "train", 2, seed=5)
    b, _ = subject_views("robot", "train", 2, seed=5)
    assert np.array_equal(a, b)  # a pure function of (subject, split, index, seed)


def test_retrieval_counts_what_lies_nearest_a_view_of_the_subject_and_reports_the_training_views_own(monkeypatch):
    """`recognised`: the share of images whose nearest held-out view (over every subject) is the subject's. The
    reference side reports it for the training views themselves, the measure's ceiling on that pair."""
    from eval.efficacy import taken_for
    from eval.experiment import THUMB, Setup, recognised, recognised_as, reference
    from ldu.metrics import thumbnails

    def flat(rgb, n):
        return [torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, 64, 64).clone() for _ in range(n)]

    views = {"red": thumbnails(flat((0.9, 0.1, 0.1), 3), THUMB), "blue": thumbnails(flat((0.1, 0.1, 0.9), 2), THUMB)}
    probes = thumbnails(flat((0.8, 0.2, 0.2), 2) + flat((0.2, 0.2, 0.7), 1), THUMB)
    assert recognised(probes, views, "red") == pytest.approx(2 / 3)
    assert recognised(probes, views, "blue") == pytest.approx(1 / 3)
    # whom each image is taken for: every subject named, the shares summing to one, and the log line's words
    assert recognised_as(probes, views) == pytest.approx({"red": 2 / 3, "blue": 1 / 3})
    assert recognised_as(probes[:2], views) == {"red": 1.0, "blue": 0.0}
    assert taken_for(recognised_as(probes, views), "red") == "; the rest taken for blue 0.33"
    assert taken_for(recognised_as(probes[:2], views), "red") == ""

    class Base:  # reference() reaches the model only through _measure: stand it in, the ceiling is pixels alone
        kind = "tiny"

    import eval.experiment as experiment

    setup = Setup(train=flat((0.8, 0.2, 0.2), 3) + flat((0.2, 0.2, 0.7), 1), held_out=flat((0.9, 0.1, 0.1), 3),
                  noun="thing", seed=0, attack="lora_dreambooth", attack_params={},
                  subjects={"red": flat((0.9, 0.1, 0.1), 3), "blue": flat((0.1, 0.1, 0.9), 2)}, subject="red")
    monkeypatch.setattr(experiment, "_measure", lambda backbone, setup, adapter, prompt, callback=None: ({}, {}))
    side = reference(Base(), setup)
    assert side.measures["train_views_retrieval"] == pytest.approx(3 / 4)
