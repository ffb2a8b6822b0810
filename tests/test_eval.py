"""Metrics against independent implementations, honest unavailability, config checking, the grid end to end."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import rgb
from eval.config import ConfigError, load, parse
from eval.metrics import measure
from ldu import get_method, protect

ROOT = Path(__file__).resolve().parent.parent


def images(seed, n=2, size=48):
    g = torch.Generator().manual_seed(seed)
    base = torch.nn.functional.interpolate(torch.rand(n, 3, 6, 6, generator=g), size=size, mode="bilinear")
    return [im for im in base]


def test_psnr_and_ssim_match_scikit_image():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    clean = images(0)
    noisy = [(c + 0.03 * torch.randn(c.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1) for c in clean]
    ours_psnr, ours_ssim = measure("psnr", clean, noisy), measure("ssim", clean, noisy)
    ref_psnr = np.mean([peak_signal_noise_ratio(c.numpy(), n.numpy(), data_range=1.0) for c, n in zip(clean, noisy)])


    def padded(t):  # torchmetrics keeps the border (reflect-padded by the window radius 5); scikit-image crops it
        return np.pad(t.permute(1, 2, 0).numpy().astype(np.float64), ((5, 5), (5, 5), (0, 0)), mode="reflect")

    ref_ssim = np.mean([structural_similarity(padded(c), padded(n), data_range=1.0, channel_axis=2, gaussian_weights=True,
                                              sigma=1.5, use_sample_covariance=False) for c, n in zip(clean, noisy)])
    assert abs(ours_psnr - ref_psnr) < 1e-4
    assert abs(ours_ssim - ref_ssim) < 1e-5
    assert measure("linf", clean, noisy) == pytest.approx(max(float((n - c).abs().max()) for c, n in zip(clean, noisy)))


@pytest.mark.parametrize("name", ["lpips", "clip_i", "dino", "clip_iqa", "kid_generations", "face_similarity"])
def test_metrics_without_weights_say_unavailable_and_how_to_fix_it(name, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty weights cache
    monkeypatch.delenv("LDU_CLIP_MODEL", raising=False)
    monkeypatch.delenv("LDU_DINO_MODEL", raising=False)
    from eval.metrics import metrics

    prompt = ("a photo of sks person",) if metrics[name].kind == "efficacy" else ()
    value = measure(name, images(0, n=4), images(1, n=4), *prompt)  # enough images for KID: only the weights miss
    assert isinstance(value, str) and value.startswith("unavailable: ")
    assert any(word in value for word in ("put ", "set ", "pip install"))


def test_face_detection_failure_with_the_optional_face_model(photos):
    """With facenet-pytorch installed (its MTCNN weights ship in the package) the astronaut's face is found and a
    flat grey image has none; without it the metric says how to install it."""
    import importlib.util

    from torchvision.transforms.functional import pil_to_tensor

    astronaut = pil_to_tensor(photos[0]).float() / 255
    value = measure("face_detection_failure", [astronaut, torch.full_like(astronaut, 0.5)], None, None)
    if importlib.util.find_spec("facenet_pytorch") is None:
        assert isinstance(value, str) and "pip install facenet-pytorch" in value
    else:
        assert value == 0.5


def test_thumb_distance_is_smaller_for_the_subject_itself():
    subject, other = images(0, n=4), images(5, n=4)
    assert measure("thumb_distance", subject, subject) < measure("thumb_distance", other, subject)


def write(tmp_path, raw):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(raw))
    return path


def test_bad_configs_name_every_problem_by_key(tmp_path):
    raw = {"image_sets": {"a": {"folder": str(tmp_path / "missing")}, "b": {"subject": "dog"}},
           "methods": ["ldu", {"name": "nope"}, {"name": "advdm", "params": {"bogus": 1}}],
           "attacks": [{"name": "lora_dreambooth", "params": {"steps": 0}}], "purifications": ["bleach"],
           "metrics": ["psnr", "vibes"], "seeds": "zero", "colour": 1, "generate": {"n": "four"}}
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, raw))
    text = str(err.value)
    for key in ("image_sets.a.folder", "image_sets.b.subject", "methods[1].name", "methods[2].params",
                "attacks[0].params", "purifications[0].name", "metrics[1]", "seeds", "colour", "generate.n"):
        assert key in text, key


def test_cli_fails_before_any_work_on_a_bad_config(tmp_path):
    path = write(tmp_path, {"image_sets": {"a": {"subject": "robot"}}, "methods": ["nope"]})
    proc = subprocess.run([sys.executable, "-m", "eval", "run", str(path), "--out", str(tmp_path / "o")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "methods[0].name: unknown method 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_paper_protocol_is_valid_apart_from_its_data_folders():
    with pytest.raises(ConfigError) as err:
        load(ROOT / "configs" / "paper-protocol.yaml")
    assert all("no such folder" in p for p in err.value.problems), err.value.problems


@pytest.mark.slow
def test_example_tiny_grid_end_to_end_and_resume(tmp_path, monkeypatch):
    from eval.grid import cells, run

    cfg = load(ROOT / "configs" / "example-tiny.yaml")
    report = run(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(records) == len(cells(cfg)) == 10 and all(r["status"] == "ok" for r in records), [r.get("error") for r in records]
    for name in ("summary.csv", "report.html", "plot_psnr_vs_efficacy.png", "plot_purification.png"):
        assert (tmp_path / name).exists(), name
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    ldu = next(r for r in rows if r["method"].startswith("ldu") and r["purification"] == "none")
    assert ldu["seeds"] == "2" and float(ldu["psnr_mean"]) >= 20 * np.log10(255 / 8)  # RMS <= 8/255 after quantisation
    assert ldu["lpips_mean"].startswith("unavailable: ") and ldu["clip_i_mean"].startswith("unavailable: ")
    share = ldu["prevented_loss_mean"]  # random weights: a number, or "the attack learned too little"
    assert share.startswith("unavailable: the attack learned too little") or np.isfinite(float(share))
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    clean = next(r for r in records if r["method"]["name"] == "none")
    assert len(clean["base"]["post_attack_loss_sets"]) == 5 and len(clean["side"]["gen_distance"]) == 1  # raw values kept
    html = report.read_text()
    assert "data:image/png;base64," in html and "Learning prevented" in html and "src='cells/" not in html

    assert all(r["machine"]["cpu"] and r["machine"]["libraries"]["torch"] for r in records)  # where each cell ran
    assert "machines" not in html

    monkeypatch.setattr("eval.experiment.train", lambda *a, **k: pytest.fail("a cached cell was recomputed"))
    cached = next((tmp_path / "cells").glob("*.json"))  # one cell as if run on another machine, then resumed here
    cell = json.loads(cached.read_text())
    cached.write_text(json.dumps({**cell, "machine": {**cell["machine"], "cpu": "another CPU"}}))
    run(cfg, tmp_path, progress=False)  # everything cached: nothing trains
    assert "ran on 2 machines" in report.read_text() and "another CPU" in report.read_text()


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, monkeypatch):
    import attacks
    from eval.grid import run

    assert not attacks.train.__module__.startswith("tests")
    cfg = parse({"image_sets": {"cat": {"subject": "chelsea", "train": 2, "held_out": 2}}, "protect_backbone": "tiny",
                 "methods": [{"name": "ldu", "params": {"iterations": 1}}], "attacks": [{"name": "lora_dreambooth", "params": {"steps": 1}}],
                 "generate": {"n": 1, "steps": 1}, "metrics": ["psnr"], "seeds": [0]})
    real = attacks.train
    calls = []

    def flaky(bb, images, *a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("simulated out of memory")
        return real(bb, images, *a, **k)

    monkeypatch.setattr("eval.experiment.train", flaky)
    run(cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records].count("error") == 1 and [r["status"] for r in records].count("ok") == 1
    assert "simulated out of memory" in next(r for r in records if r["status"] == "error")["error"]
    assert "Failed cells" in (tmp_path / "report.html").read_text()


@pytest.mark.slow
def test_two_processes_shard_the_grid_and_merge(tmp_path):
    path = write(tmp_path, {"image_sets": {"cat": {"subject": "chelsea", "train": 2, "held_out": 2}},
                            "protect_backbone": "tiny", "methods": [{"name": "ldu", "params": {"iterations": 1}}],
                            "attacks": [{"name": "lora_dreambooth", "params": {"steps": 1}}],
                            "generate": {"n": 1, "steps": 1}, "metrics": ["psnr"], "seeds": [0, 1]})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GLOO_SOCKET_IFNAME": "lo"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    proc = subprocess.run([*torchrun, "-m", "eval", "run", str(path), "--out", str(tmp_path / "o"), "--quiet"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    shards = [tmp_path / "o" / f"results-rank{r}.jsonl" for r in (0, 1)]
    assert all(s.exists() and s.read_text().strip() for s in shards)
    merged = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert len(merged) == 4 and {r["rank"] for r in merged} == {0, 1} and all(r["status"] == "ok" for r in merged)
    assert (tmp_path / "o" / "summary.csv").exists()


def test_the_shipped_configs_are_valid():
    """example-tiny runs end to end above; example-pocket (an hour of CPU) is checked as a config, and its every method
    at least once on tiny in the grid tests."""
    for name in ("example-tiny.yaml", "example-pocket.yaml", "comparison-pocket.yaml"):
        cfg = load(ROOT / "configs" / name)
        assert cfg.methods and cfg.attacks and cfg.seeds
    assert load(ROOT / "configs" / "example-pocket.yaml").match_psnr == 32
    comparison = load(ROOT / "configs" / "comparison-pocket.yaml")  # issues 17/18: >= 3 subjects x 3 seeds, the control
    assert len(comparison.image_sets) >= 3 and len(comparison.seeds) == 3 and comparison.match_psnr == 32
    assert {"ldu", "noise"} <= {m.name for m in comparison.methods}


def test_efficacy_run_reports_every_subject_seed_and_method_with_spreads(tiny, tmp_path):
    """eval.efficacy on tiny (numbers meaningless there): rows per subject x seed, summaries with spreads, and the
    first seed's pictures: the clean attack's and each protected attack's."""
    from PIL import Image

    from eval.efficacy import run, summarize
    from ldu.subjects import SUBJECTS

    saved = []
    report = run(tiny, ["robot"], [0, 1], ["pid"], "lora_dreambooth", {"steps": 2}, method_params={"pid": {"iterations": 1}},
                 n_gen=2, log=lambda *a: None, save=saved.append, pictures=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["robot-pid.png", "robot.png"]
    s = tiny.resolution
    clean, prot = (np.asarray(Image.open(tmp_path / n)).astype(int) for n in ("robot.png", "robot-pid.png"))
    assert clean.shape == prot.shape == (4 * s, 8 * s, 3)  # 4 rows, as wide as the 8 held-out views
    assert np.array_equal(clean[s:2 * s], prot[s:2 * s])  # the same held-out views
    assert np.array_equal(clean[3 * s:, :2 * s], prot[2 * s:3 * s, :2 * s])  # row 3: the clean attack's generations
    assert 0 < np.abs(clean[:s, :4 * s] - prot[:s, :4 * s]).max() <= 9  # row 1: the protected views, within 8/255
    assert [(r["subject"], r["seed"]) for r in report["personalization"]] == [("robot", 0), ("robot", 1)]
    # saved after every row: a run stopped midway keeps what it measured
    assert [(len(s["personalization"]), len(s["protection"])) for s in saved] == [(1, 0), (1, 1), (2, 1), (2, 2)]
    assert len(report["protection"]) == 2 and all(r["linf_255"] <= 8 + 1e-4 for r in report["protection"])
    summary = summarize(report)
    pers = summary["personalization"]
    assert len(pers["gap_closed"]["values"]) == 2 and pers["retrieval_attacked"]["std"] >= 0
    assert all(0 <= v <= 1 for v in pers["retrieval_train_views"]["values"])  # the measure's ceiling, per pair
    for row in report["personalization"]:  # whom the generations are taken for: the retrieval is its subject's share
        assert set(row["retrieved_as_attacked"]) == set(SUBJECTS)
        assert sum(row["retrieved_as_attacked"].values()) == pytest.approx(1)
        assert row["retrieved_as_attacked"]["robot"] == row["retrieval_attacked"]
    assert "retrieved_as_attacked" not in pers  # not averaged
    assert summary["protection"]["pid"]["rows"] == 2 and np.isfinite(summary["protection"]["pid"]["psnr"]["mean"])
    # seed 1 run on its own gives the same numbers, so runs made apart merge into the one above (--merge)
    from eval.efficacy import merge

    later = run(tiny, ["robot"], [1], ["pid"], "lora_dreambooth", {"steps": 2}, method_params={"pid": {"iterations": 1}},
                n_gen=2, log=lambda *a: None)
    merged = merge([{**report, "personalization": report["personalization"][:1], "protection": report["protection"][:1]}, later])
    def shares(s):
        return {m: (e["prevented_generation"]["values"], e["psnr"]["values"]) for m, e in s["protection"].items()}

    assert merged["seeds"] == [0, 1] and shares(summarize(merged)) == shares(summary)


def _report(rows, pers, attack="dreambooth", matched=None):
    return {"model": "pocket", "revision": "r", "attack": attack, "attack_params": {}, "match_psnr": 32.0, "sweep": None,
            "personalization": [{"subject": s, "seed": k, "gap_closed": g, "retrieval_attacked": 0.5, "other_prompts_toward_subject": 1.0,
                                 "instance_prompt_toward_subject": 1.5, "seconds_attack": 60.0} for s, k, g in pers],
            "protection": [{"subject": s, "seed": k, "method": m, "budget": 0.02, "prevented_loss": "unavailable: x",
                            "prevented_generation": v, "psnr": 32.0, "seconds_protect": 1.0} for s, k, m, v in rows],
            "matched_budgets": matched or {}, "seconds": 10.0, "argv": []}


def test_two_controls_give_the_spread_a_method_must_beat(capsys):
    """With two noise controls the summary reports how much they differ per pair (the std of their paired
    differences) and the ±t·std/√n band inside which a method's mean lead is what one more control would show."""
    from eval.efficacy import print_summary, summarize

    values = {"noise": [0.1, 0.0, -0.1, 0.2], "noise+s100": [0.0, 0.0, 0.1, 0.0], "ldu": [0.3, 0.2, 0.1, 0.4]}
    rows = [("frog", k, m, v[k]) for m, v in values.items() for k in range(4)]
    s = summarize(_report(rows, []))
    c = s["control_spread"]["prevented_generation"]
    # by hand: differences 0.1, 0, -0.2, 0.2; mean 0.025; squares of deviations sum to 0.0875; / 3; sqrt
    assert c["controls"] == ["noise", "noise+s100"] and c["n"] == 4
    assert c["std"] == pytest.approx(math.sqrt(0.0875 / 3))
    # Student's t, 97.5 % point, 3 degrees of freedom (tables: 3.182), times std / sqrt(4 pairs)
    assert c["null_band"] == {"ldu": pytest.approx(3.182446 * math.sqrt(0.0875 / 3) / 2, rel=1e-5)}
    assert "prevented_loss" not in s["control_spread"]  # every loss share is unavailable: nothing to spread
    print_summary(s)
    assert "controls noise, noise+s100 (prevented_generation): their paired differences spread by std 0.171" in capsys.readouterr().out
    one = summarize(_report([r for r in rows if r[2] != "noise+s100"], []))
    assert one["control_spread"] == {}  # one control cannot say how much controls differ


def test_merge_joins_runs_of_one_experiment_and_refuses_runs_that_are_not(tmp_path, capsys):
    """Rows from runs made apart are pooled (overlaps must agree: the same inputs give the same numbers); runs with
    another attack, another clean attack or another matched budget where they overlap are refused by name."""
    from eval.efficacy import main, merge, summarize

    a = _report([("frog", 0, "ldu", 0.1), ("frog", 1, "ldu", 0.3)], [("frog", 0, 0.5), ("frog", 1, 0.6)],
                matched={"frog/noise": {"budget_rms": 0.028}})
    b = _report([("frog", 0, "noise", -0.1), ("frog", 2, "ldu", 0.2), ("frog", 2, "noise", 0.0)],
                [("frog", 0, 0.5), ("frog", 2, 0.4)], matched={"frog/noise": {"budget_rms": 0.028}})
    b["personalization"][0]["seconds_attack"] = 75.0  # wall time may differ; the numbers may not
    m = merge([a, b])
    assert m["seeds"] == [0, 1, 2] and len(m["personalization"]) == 3 and len(m["protection"]) == 5
    s = summarize(m)
    assert s["protection"]["ldu"]["prevented_generation"]["mean"] == pytest.approx(0.2)
    assert s["paired_differences"]["ldu - noise (prevented_generation)"]["n"] == 2  # frog 0 and 2 have both
    # pairs are named in the run's method order (an alphabetical "advdm - pid" once had its sign copied the wrong way)
    order = summarize(_report([("frog", k, m, v) for k in range(6) for m, v in (("pid", 0.3), ("advdm", 0.1))], []))
    assert order["paired_differences"]["pid - advdm (prevented_generation)"]["mean"] == pytest.approx(0.2)
    assert order["paired_differences"]["pid - advdm (prevented_generation)"]["positive"] == 6
    other = _report([], [("frog", 0, 0.5)], attack="lora_dreambooth")
    with pytest.raises(ValueError, match="differ in attack"):
        merge([a, other])
    with pytest.raises(ValueError, match="the clean attack for frog seed 0 differs"):
        merge([a, _report([], [("frog", 0, 0.55)])])
    with pytest.raises(ValueError, match="ldu's row for frog seed 1 differs"):
        merge([a, _report([("frog", 1, "ldu", 0.31)], [])])
    # the attacker's purification is part of the experiment; a run that recorded only the parameters it was given
    # is the same experiment as one that recorded them all
    given = {"name": "posting", "params": {}}
    resolved = {"name": "posting", "params": {"factor": 0.75, "quality": 75}}
    with pytest.raises(ValueError, match="differ in purification"):
        merge([a, {**_report([], [("frog", 0, 0.5)]), "purification": resolved}])
    assert merge([{**a, "purification": given}, {**_report([], [("frog", 0, 0.5)]), "purification": resolved}])
    with pytest.raises(ValueError, match="differ in purification"):
        merge([{**a, "purification": given}, {**_report([], []), "purification": {"name": "posting", "params": {"quality": 50}}}])
    with pytest.raises(ValueError, match="differ in method_params of ldu"):
        merge([a, {**_report([("frog", 2, "ldu", 0.2)], []), "method_params": {"ldu": {"iterations": 10}}}])
    # a variant only one run has keeps its own parameters: both runs' rows pair against the same clean attacks
    variant = {**_report([("frog", 0, "ldu+post", 0.4)], [("frog", 0, 0.5)]), "method_params": {"ldu+post": {"posting": True}}}
    both = merge([a, variant])
    assert both["method_params"] == {"ldu+post": {"posting": True}} and len(both["protection"]) == 3
    one_sided = _report([("frog", 1, "ldu", 0.3)], [])
    del one_sided["protection"][0]["psnr"]
    with pytest.raises(ValueError, match="ldu's row for frog seed 1 differs .*psnr"):
        merge([a, one_sided])
    with pytest.raises(ValueError, match="frog/noise's matched budget differs"):
        merge([a, _report([], [], matched={"frog/noise": {"budget_rms": 0.03}})])
    here, there = {"cpu": "CPU one", "cores": 2}, {"cpu": "CPU two", "cores": 2}  # the machine each run ran on
    (tmp_path / "a.json").write_text(json.dumps({**a, "code": "0.1.0+gaaa", "machine": here}))
    (tmp_path / "b.json").write_text(json.dumps({**b, "code": "0.1.0+gbbb", "machine": there}))
    assert main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--out", str(tmp_path / "m.json")]) == 0
    out = capsys.readouterr().out
    assert json.loads((tmp_path / "m.json").read_text())["seeds"] == [0, 1, 2] and "ldu - noise" in out
    assert "made with different code (0.1.0+gaaa, 0.1.0+gbbb)" in out
    assert "made on 2 machines (CPU one; CPU two)" in out
    # a merged report merges again (its code is a list): a third seed joins the first two
    (tmp_path / "c.json").write_text(json.dumps({**_report([("frog", 3, "ldu", 0.5)], [("frog", 3, 0.7)]), "code": "0.1.0+gbbb",
                                                 "machine": there}))
    assert main(["--merge", f"{tmp_path / 'm.json'},{tmp_path / 'c.json'}", "--out", str(tmp_path / "m2.json")]) == 0
    again = json.loads((tmp_path / "m2.json").read_text())
    assert again["seeds"] == [0, 1, 2, 3] and again["code"] == ["0.1.0+gaaa", "0.1.0+gbbb"]
    assert again["machine"] == [here, there]  # one entry per machine, however often it recurs
    assert "made with different code (0.1.0+gaaa, 0.1.0+gbbb)" in capsys.readouterr().out
    with pytest.raises(SystemExit) as err:
        main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'nope.json'}"])
    assert err.value.code == 2 and "no such run file" in capsys.readouterr().err


def test_sweep_plot_draws_both_shares_and_says_when_one_is_unavailable(tmp_path):
    from PIL import Image

    from eval.efficacy import summarize, sweep_curves, sweep_plot

    rows = [{"subject": "frog", "seed": 0, "method": m, "budget": b / 255, "prevented_loss": "unavailable: x",
             "prevented_generation": v, "psnr": 40 - b} for m in ("ldu", "noise") for b, v in ((4, 0.1), (8, 0.3))]
    summary = summarize({"personalization": [], "protection": rows, "sweep": [4 / 255, 8 / 255]})
    assert set(summary["protection"]) == {"ldu@4.0", "ldu@8.0", "noise@4.0", "noise@8.0"}
    fig = sweep_plot(summary, tmp_path / "sweep.png")
    with Image.open(tmp_path / "sweep.png") as im:
        assert im.width > 1000
    loss_panel, gen_panel = fig.axes[:2]
    assert "unavailable" in loss_panel.texts[0].get_text()
    # one pair per point (frog seed 0 only): a value, not a mean with a spread, and the panel says so
    assert sweep_curves(summary, "prevented_generation") == {"ldu": [(32, 0.3, 0.0, 1), (36, 0.1, 0.0, 1)],
                                                             "noise": [(32, 0.3, 0.0, 1), (36, 0.1, 0.0, 1)]}
    assert "over 1 pair (hollow: one pair, no spread)" in gen_panel.texts[0].get_text()
    rows += [{**r, "seed": 1, "prevented_generation": r["prevented_generation"] + 0.2} for r in rows]
    summary = summarize({"personalization": [], "protection": rows, "sweep": [4 / 255, 8 / 255]})
    assert sweep_curves(summary, "prevented_generation")["ldu"] == [(32, pytest.approx(0.4), pytest.approx(0.1414, abs=1e-4), 2),
                                                                    (36, pytest.approx(0.2), pytest.approx(0.1414, abs=1e-4), 2)]
    text = sweep_plot(summary, tmp_path / "sweep.png").axes[1].texts[0].get_text()
    assert "over 2 pairs" in text and "hollow" not in text


def test_prevented_share_against_a_hand_computation():
    from eval.experiment import NO_HELD_OUT, ONE_SAMPLE, TOO_LITTLE, compare

    def side(losses, distances, train_distance=None):
        m = {"post_attack_loss_sets": losses, "post_attack_loss": float(np.mean(losses)), "gen_distance": distances,
             "gen_distance_mean": float(np.mean(distances))}
        return m if train_distance is None else {**m, "train_views_distance": train_distance}

    base = side([0.30, 0.31, 0.29, 0.30, 0.30], [3.0, 3.2, 2.8, 3.0], train_distance=1.0)
    clean = side([0.20, 0.20, 0.21, 0.19, 0.20], [2.0, 2.1, 1.9, 2.0])
    prot = side([0.25, 0.26, 0.24, 0.25, 0.25], [2.5, 2.4, 2.6, 2.5])
    r = compare(base, clean, prot)
    assert r["prevented_loss"] == pytest.approx((0.25 - 0.20) / (0.30 - 0.20))  # 0.5
    # the delta method on the draw sets: e = (p - c) - 0.5 (b - c) = 0, .005, -.01, .005, 0 -> std 0.0061237, standard
    # error 0.0027386, over the 0.10 learned
    assert r["prevented_loss_noise"] == pytest.approx(0.0027386 / 0.10, rel=1e-4)
    assert r["prevented_generation"] == pytest.approx((2.5 - 2.0) / (3.0 - 2.0))
    assert r["gap_closed_clean"] == pytest.approx((3.0 - 2.0) / (3.0 - 1.0)) and "gap_closed_views_mean" not in r
    assert compare({**base, "views_mean_distance": 0.5}, clean, prot)["gap_closed_views_mean"] == pytest.approx(2.5 / 2.0)
    learned_nothing = compare(base, base, prot)
    assert learned_nothing["prevented_loss"] == TOO_LITTLE
    one = compare(side([0.3, 0.3], [3.0]), side([0.2, 0.21], [2.0]), side([0.25, 0.25], [2.5]))
    assert one["prevented_generation"] == ONE_SAMPLE and isinstance(one["prevented_loss"], float)
    no_held = compare({}, {}, {})
    assert no_held == {"prevented_loss": NO_HELD_OUT, "prevented_generation": NO_HELD_OUT}


def test_kid_and_fid_refuse_too_few_images():
    value = measure("kid", images(0, n=3), images(1, n=3))
    assert value == "unavailable: too few images (need >= 4 per set, got 3)"
    assert measure("fid", images(0, n=8), images(1, n=8)).startswith("unavailable: too few images (need >= 50")


def test_ssim_of_a_large_image_in_tiles_is_the_whole_image_ssim():
    from torchmetrics.functional.image import structural_similarity_index_measure

    from ldu.metrics import TILE, ssim

    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.interpolate(torch.rand(1, 3, 40, 30, generator=g), size=(TILE + 77, TILE + 13), mode="bilinear")[0]
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    whole = float(structural_similarity_index_measure(a[None], b[None], data_range=1.0))
    assert ssim(a, b) == pytest.approx(whole, abs=1e-6)


def test_match_psnr_lands_within_tolerance(tiny, monkeypatch):
    import eval.grid
    from eval.grid import match_psnr

    views = [torch.from_numpy(np.array(rgb(64, 64, seed=i))).permute(2, 0, 1).float() / 255 for i in range(2)]
    found = match_psnr(tiny, "advdm", {"iterations": 8}, views, 42.0)
    assert abs(found["psnr"] - 42.0) <= 0.3 and found["linf"] == pytest.approx(2 * found["budget_rms"]) and found["runs"] >= 1
    ran = []  # every protection the search runs carries the ratio, not only the budget it returns
    monkeypatch.setattr(eval.grid, "protect", lambda *a, params, **k: ran.append(params) or protect(*a, params=params, **k))
    tight = match_psnr(tiny, "ldu", {"iterations": 2, "ddim_steps": 2, "draws": 1}, views, 42.0, linf_ratio=1.1)
    assert abs(tight["psnr"] - 42.0) <= 0.3 and tight["linf"] == pytest.approx(1.1 * tight["budget_rms"])
    assert ran and all(p["linf"] == pytest.approx(1.1 * p["budget_rms"]) for p in ran)


def test_a_method_whose_psnr_cannot_be_matched_is_skipped_by_name_and_the_run_goes_on(tiny):
    """A method that never lands at the target (here noise with nothing to add) is reported and skipped on that
    subject; the other methods' rows are all there (a crash here once lost a whole efficacy run)."""
    from eval.efficacy import run
    from eval.grid import match_psnr

    views = [torch.from_numpy(np.array(rgb(64, 64, seed=i))).permute(2, 0, 1).float() / 255 for i in range(2)]
    with pytest.raises(ValueError, match="noise: no budget within 0.3 dB of 40.0 dB"):
        match_psnr(tiny, "noise", {"iterations": 0}, views, 40.0, max_runs=3)
    lines = []
    report = run(tiny, ["robot"], [0], ["noise+zero", "noise"], "lora_dreambooth", {"steps": 1}, target_psnr=40.0,
                 method_params={"noise+zero": {"iterations": 0}}, n_gen=2, log=lines.append)
    assert [r["method"] for r in report["protection"]] == ["noise"] and abs(report["protection"][0]["psnr"] - 40) <= 0.3
    assert any("noise+zero: skipped on robot: noise: no budget" in line for line in lines), lines
    assert "unmatched" in report["matched_budgets"]["robot/noise+zero"]


def test_purify_makes_the_attacker_purify_every_set_and_budgets_from_reuses_a_runs_budgets(tiny, monkeypatch, tmp_path,
                                                                                         capsys):
    """--purify: the clean views and the protected ones are both purified before the attack trains on them (the
    share is against the attack on the purified clean views); --budgets-from: no new search, that run's budgets."""
    import eval.efficacy as ef
    import eval.experiment as ex
    from attacks import purify

    seen = []
    real_train = ex.train
    monkeypatch.setattr(ex, "train", lambda bb, images, *a, **k: (seen.append([x.clone() for x in images]),
                                                                  real_train(bb, images, *a, **k))[1])
    monkeypatch.setattr(ef, "match_psnr", lambda *a, **k: pytest.fail("matched again despite the given budgets"))
    given = {"robot/noise": {"budget_rms": 4 / 255, "linf": 16 / 255}}
    report = ef.run(tiny, ["robot"], [0], ["noise"], "lora_dreambooth", {"steps": 1}, target_psnr=35.0, n_gen=2,
                    log=lambda *a: None, purification=("posting", {"quality": 75, "factor": 0.75}), matched=given)
    setup = ef.subject_setup(tiny, "robot", 0, "lora_dreambooth", {"steps": 1})
    clean_seen, protected_seen = seen
    assert all(torch.equal(a, b) for a, b in zip(clean_seen, purify(setup.train, "posting")))
    protected = ef.protect(setup.train, tiny, method="noise", params={"seed": 0, "budget_rms": 4 / 255, "linf": 16 / 255,
                                                                       "prompt": "a photo of sks robot"}).images
    assert all(torch.equal(a, b) for a, b in zip(protected_seen, purify(protected, "posting")))
    assert report["matched_budgets"] == given and report["protection"][0]["budget"] == pytest.approx(4 / 255)
    # only the budgets of labels whose parameters agree are taken
    (tmp_path / "v.json").write_text(json.dumps({"model": "tiny", "revision": tiny.revision, "match_psnr": 35.0,
                                                 "method_params": {"noise+x": {"linf": 0.1}},
                                                 "matched_budgets": {**given, "robot/noise+x": {"budget_rms": 0.01}}}))
    assert ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0) == given
    assert ef.budgets_from(tmp_path / "v.json", tiny, {"noise": {"iterations": 0}}, 35.0) == {}
    # ... of this run's subjects and methods only, and with the same instance prompt
    assert ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0, subjects=["frog"]) == {}
    assert ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0, methods=["ldu", "noise+x"]) == {}
    with pytest.raises(ValueError, match="instance prompt"):
        ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0, {"instance_prompt": "a photo of sks dog"})
    # ... and with the same L-inf ratio (a run file from before the option matched at 2)
    assert ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0, linf_ratio=2.0) == given
    with pytest.raises(ValueError, match="its linf_ratio is 2.0, this run's 1.1"):
        ef.budgets_from(tmp_path / "v.json", tiny, {}, 35.0, linf_ratio=1.1)
    # the CLI: a run file matched to another target is refused before any work, and so is --purify-set alone
    (tmp_path / "r.json").write_text(json.dumps({"model": "tiny", "revision": tiny.revision, "match_psnr": 32.0,
                                                 "method_params": {}, "matched_budgets": given}))
    for argv, why in ((["--budgets-from", str(tmp_path / "r.json"), "--match-psnr", "35"], "its match_psnr is 32.0"),
                      (["--purify-set", "quality=50"], "--purify-set needs --purify"),
                      (["--purify", "posting", "--purify-set", "qualty=50"], "qualty")):
        with pytest.raises(SystemExit) as err:
            ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "noise", *argv])
        assert err.value.code == 2 and why in capsys.readouterr().err


def test_view_size_protects_and_purifies_larger_training_views_and_is_part_of_the_experiment(tiny, monkeypatch,
                                                                                              tmp_path, capsys):
    """--view-size: the training views are drawn at that size, protected and purified there (gridpure then has more
    than one tile) and handed to the attack at that size; the held-out views stay at the model's size; runs at
    another view size are another experiment (no merge, no budgets taken)."""
    import eval.efficacy as ef
    import eval.experiment as ex

    big = 2 * tiny.resolution
    seen, purified = [], []
    real_train, real_purify = ex.train, ex.purify
    monkeypatch.setattr(ex, "train", lambda bb, images, *a, **k: (seen.append([x.shape for x in images]),
                                                                  real_train(bb, images, *a, **k))[1])
    monkeypatch.setattr(ex, "purify", lambda images, *a, **k: (purified.append([x.shape for x in images]),
                                                               real_purify(images, *a, **k))[1])
    given = {"robot/noise": {"budget_rms": 4 / 255, "linf": 16 / 255}}
    report = ef.run(tiny, ["robot"], [0], ["noise"], "lora_dreambooth", {"steps": 1}, target_psnr=35.0, n_gen=2,
                    log=lambda *a: None, matched=given, view_size=big, pictures=tmp_path / "pics",
                    purification=("gridpure", {"strength": 0.1, "steps": 1, "iterations": 1, "overlap": 0.5, "seed": 0}))
    assert seen and purified and all(shape[-2:] == (big, big) for shapes in seen + purified for shape in shapes)
    setup = ef.subject_setup(tiny, "robot", 0, "lora_dreambooth", {}, view_size=big)
    assert setup.train[0].shape[-2:] == (big, big) and setup.held_out[0].shape[-2:] == (tiny.resolution,) * 2
    assert report["protection"][0]["psnr"] == pytest.approx(20 * math.log10(255 / 4), abs=0.3)  # the budget, at that size
    from PIL import Image
    assert Image.open(tmp_path / "pics" / "robot.png").size == (8 * tiny.resolution, 4 * tiny.resolution)
    # another view size is another experiment
    with pytest.raises(ValueError, match="differ in view_size"):
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("frog", 0, 0.5)]), "view_size": big}])
    (tmp_path / "r.json").write_text(json.dumps({"model": "tiny", "revision": tiny.revision, "match_psnr": 35.0,
                                                 "method_params": {}, "matched_budgets": given}))
    with pytest.raises(ValueError, match="its view_size is None"):
        ef.budgets_from(tmp_path / "r.json", tiny, {}, 35.0, view_size=big)
    with pytest.raises(SystemExit) as err:
        ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "noise",
                 "--view-size", str(tiny.resolution // 2)])
    assert err.value.code == 2 and "below the model's size" in capsys.readouterr().err


def test_train_views_is_how_many_views_every_attack_and_protection_gets_and_is_part_of_the_experiment(
        tiny, monkeypatch, tmp_path, capsys):
    """--train-views N: the clean attack, the protection and the protected attack all get that seed's first N training
    views (the first 4 the default run's own); the held-out views stay 8; runs with another count are another
    experiment (no merge, no budgets taken; a run from before the option merges as 4); 0 or above 8 fails first."""
    import eval.efficacy as ef
    import eval.experiment as ex
    from ldu.subjects import subject_views

    trained, protected = [], []
    real_train, real_protect = ex.train, ef.protect
    monkeypatch.setattr(ex, "train", lambda bb, images, *a, **k: (trained.append(len(images)),
                                                                  real_train(bb, images, *a, **k))[1])
    monkeypatch.setattr(ef, "protect", lambda images, *a, **k: (protected.append(len(images)),
                                                                real_protect(images, *a, **k))[1])
    ef.run(tiny, ["robot"], [0], ["noise"], "lora_dreambooth", {"steps": 1}, n_gen=2, log=lambda *a: None,
           method_params={"noise": {"budget_rms": 4 / 255}}, n_train=6)
    assert trained == [6, 6] and protected == [6]  # the clean and the protected attack; the protection
    setup = ef.subject_setup(tiny, "robot", 1, "lora_dreambooth", {}, n_train=6)
    first4 = subject_views("robot", "train", 4, seed=1, size=tiny.resolution)[0]
    assert len(setup.held_out) == 8 and len(setup.train) == 6
    as_uint8 = np.stack([(x.permute(1, 2, 0) * 255).round().byte().numpy() for x in setup.train[:4]])
    assert np.array_equal(as_uint8, first4)
    with pytest.raises(ValueError, match="differ in train_views"):
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "train_views": 8}])
    merged = ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "train_views": 4}])
    assert merged["train_views"] == 4
    given = {"robot/noise": {"budget_rms": 4 / 255, "linf": 16 / 255}}
    (tmp_path / "r.json").write_text(json.dumps({"model": "tiny", "revision": tiny.revision, "match_psnr": 35.0,
                                                 "method_params": {}, "matched_budgets": given}))
    assert ef.budgets_from(tmp_path / "r.json", tiny, {}, 35.0) == given
    with pytest.raises(ValueError, match="its train_views is 4, this run's 8"):
        ef.budgets_from(tmp_path / "r.json", tiny, {}, 35.0, train_views=8)
    for n in ("0", "9"):
        with pytest.raises(SystemExit) as err:
            ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "none", "--train-views", n])
        why = f"--train-views must be 1 to 8 (the photos a person uploads), got {n}"
        assert err.value.code == 2 and why in capsys.readouterr().err


def test_generations_is_how_many_every_side_draws_per_prompt_and_a_larger_count_keeps_the_first(tiny, monkeypatch, capsys,
                                                                                                 tmp_path):
    """--generations N: every side draws N generations of each prompt with the seeds 10 000 x seed + i, so a run with
    more keeps the default run's generations first (the same pictures); runs with another count are another
    experiment; fewer than 2 fails before any work."""
    import eval.efficacy as ef
    import eval.experiment as ex

    seeds, images = [], []
    real = ex.generate

    def generate(bb, adapter, prompts, s, **k):
        seeds.append(list(s))
        images.append(real(bb, adapter, prompts, s, **k))
        return images[-1]
    monkeypatch.setattr(ex, "generate", generate)
    assert ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--first-seed", "1", "--methods", "none",
                    "--set", "steps=1", "--other-prompts", "a cat", "--generations", "3",
                    "--out", str(tmp_path / "r.json")]) == 0
    assert seeds == [[10_000, 10_001, 10_002]] * 4  # base and attacked side, the instance prompt and the other one
    assert json.loads((tmp_path / "r.json").read_text())["generations"] == 3
    steps, guidance = ex.GENERATION[tiny.kind]
    few = real(tiny, None, ["a photo of sks robot"] * 2, [10_000, 10_001], steps=steps, guidance=guidance)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(few, images[0][:2]))
    with pytest.raises(ValueError, match="differ in generations"):
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "generations": 32}])
    merged = ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "generations": 8}])
    assert merged["generations"] == 8
    with pytest.raises(SystemExit) as err:
        ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "none", "--generations", "1"])
    assert err.value.code == 2 and "--generations must be at least 2" in capsys.readouterr().err


def test_gap_closed_carries_its_own_noise_over_generation_draws():
    """Each personalization row gives the gap closed's standard error over the generation draws by the delta method:
    gap = (B - C) / (B - T) moves with each seed's base distance b (in the closable gap too) and attacked distance c
    as ((1 - gap) b - c) / (B - T); the spread of those over the square root of their count. Checked against the
    spread of the gap closed itself over many simulated draws. A row from before the field merges with one that has it."""
    import eval.efficacy as ef
    import eval.experiment as ex

    gens = {"p": [torch.zeros(3, 4, 4)] * 4}
    base = ex.Side({"gen_distance": [3.0, 4.0, 5.0, 6.0], "gen_distance_mean": 4.5, "train_views_distance": 1.0,
                    "post_attack_loss": 0.1}, gens, "p")
    clean = ex.Side({"gen_distance": [2.0, 2.0, 4.0, 4.0], "gen_distance_mean": 3.0, "post_attack_loss": 0.1}, gens, "p")
    row = ef.personalization_row(base, clean)
    gap = 1.5 / 3.5
    terms = ((1 - gap) * np.array([3.0, 4.0, 5.0, 6.0]) - np.array([2.0, 2.0, 4.0, 4.0])) / 3.5
    assert row["gap_closed"] == pytest.approx(gap)
    assert row["gap_closed_noise"] == pytest.approx(terms.std(ddof=1) / 2)
    # against simulation: 8 seeds' distances drawn (base and attacked correlated, as at shared seeds) many times
    rng = np.random.default_rng(0)
    gaps, noises = [], []
    for _ in range(4000):
        shared = rng.normal(0, 0.5, 8)
        b_i, c_i = 7.5 + shared + rng.normal(0, 0.4, 8), 6.0 + 0.6 * shared + rng.normal(0, 0.6, 8)
        r = ef.personalization_row(ex.Side({"gen_distance": list(b_i), "gen_distance_mean": b_i.mean(),
                                            "train_views_distance": 4.5, "post_attack_loss": 0.1}, gens, "p"),
                                   ex.Side({"gen_distance": list(c_i), "gen_distance_mean": c_i.mean(),
                                            "post_attack_loss": 0.1}, gens, "p"))
        gaps.append(r["gap_closed"]), noises.append(r["gap_closed_noise"])
    assert np.sqrt(np.mean(np.square(noises))) == pytest.approx(np.std(gaps), rel=0.1)
    old, new = _report([], [("frog", 0, 0.5)]), _report([], [("frog", 0, 0.5)])
    new["personalization"][0]["gap_closed_noise"] = 0.1
    new["personalization"][0]["gap_closed_views_mean"] = 1.2
    new["personalization"][0]["retrieval_train_views"] = 0.75
    new["personalization"][0]["retrieved_as_attacked"] = {"frog": 0.5, "kite": 0.5}
    assert ef.merge([old, new])["personalization"][0]["gap_closed"] == 0.5


def test_guidance_reaches_every_generation_and_is_part_of_the_experiment(tiny, monkeypatch, capsys):
    """--guidance: the base, clean and protected sides generate at it; runs at another guidance are another
    experiment, and a run from before the option merges as the model's default; a bad value fails before any work."""
    import eval.efficacy as ef
    import eval.experiment as ex

    used = []
    real = ex.generate
    monkeypatch.setattr(ex, "generate", lambda *a, **k: (used.append(k["guidance"]), real(*a, **k))[1])
    ef.run(tiny, ["robot"], [0], ["noise"], "lora_dreambooth", {"steps": 1}, n_gen=2, log=lambda *a: None,
           method_params={"noise": {"budget_rms": 4 / 255}}, guidance=9.0)
    assert len(used) >= 3 and set(used) == {9.0}  # base, clean attack, protected attack
    default = ex.GENERATION["pocket"][1]
    with pytest.raises(ValueError, match="differ in guidance"):
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "guidance": default + 1}])
    merged = ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "guidance": default}])
    assert merged["guidance"] == default
    with pytest.raises(ValueError, match="differ in guidance"):  # 0 is a guidance, not "unrecorded"
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "guidance": 0.0}])
    for bad in ("-1", "nan"):
        with pytest.raises(SystemExit) as err:
            ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "none", "--guidance", bad])
        assert err.value.code == 2 and "--guidance must be" in capsys.readouterr().err


def test_drift_per_other_prompt_and_other_prompts_are_part_of_the_experiment(tiny, capsys, tmp_path):
    """Each other prompt's drift apart (toward the subject, moved), whose mean is the row's; --other-prompts picks
    them and is recorded; runs with other prompts are another experiment, a run from before the option merges as the
    model's defaults, and a row from before the breakdown merges with one that has it."""
    import eval.efficacy as ef
    import eval.experiment as ex

    prompts = ("a photo of a dog", "a red circle on a white background")
    report = ef.run(tiny, ["robot"], [0], ["none"], "lora_dreambooth", {"steps": 2}, n_gen=2, log=lambda *a: None,
                    other_prompts=prompts)
    row = report["personalization"][0]
    assert list(row["per_prompt"]) == list(prompts)
    assert row["other_prompts_toward_subject"] == pytest.approx(np.mean([d["toward_subject"] for d in row["per_prompt"].values()]))
    assert row["moved_other_prompts"] == pytest.approx(np.mean([d["moved"] for d in row["per_prompt"].values()]))
    assert all(d["moved"] > 0 for d in row["per_prompt"].values())  # the attack changed what each prompt draws
    # toward the other subjects' views too (robot's pool holds every built-in subject): a move toward all of them alike
    assert all(math.isfinite(d["toward_other_subjects"]) for d in row["per_prompt"].values())
    assert math.isfinite(row["instance_prompt_toward_other_subjects"])
    # against a hand computation from the two sides' generations (mean over the other subjects of each generation's
    # distance to its nearest view, base minus attacked)
    from ldu.metrics import thumbnails

    setup = ef.subject_setup(tiny, "robot", 0, "lora_dreambooth", {"steps": 2}, n_gen=2, everyone=ef.all_held_out(tiny, 0),
                             other_prompts=prompts)
    base, clean = ex.reference(tiny, setup), ex.attack_side(tiny, setup, setup.train)

    def rest(gens):
        return np.mean([torch.cdist(thumbnails(gens, ex.THUMB), thumbnails(v, ex.THUMB)).min(1).values.mean().item()
                        for n, v in setup.subjects.items() if n != "robot"])
    again = ef.personalization_row(base, clean)
    q = prompts[1]
    assert again["per_prompt"][q]["toward_other_subjects"] == pytest.approx(rest(base.generations[q]) - rest(clean.generations[q]))
    assert again["instance_prompt_toward_other_subjects"] == pytest.approx(
        rest(base.generations[base.prompt]) - rest(clean.generations[clean.prompt]))
    summary = ef.summarize(report)
    assert summary["personalization_per_prompt"][prompts[1]]["moved"]["values"] == [row["per_prompt"][prompts[1]]["moved"]]
    assert "per_prompt" not in summary["personalization"]
    ef.print_summary(summary)
    assert f"other prompt {prompts[1]!r}: toward the subject" in capsys.readouterr().out
    # recorded by the CLI; merge: other prompts are another experiment, unrecorded means the model's
    out = tmp_path / "r.json"
    ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "none", "--set", "steps=1",
             "--other-prompts", "a photo of a dog; a photo of a cat", "--out", str(out)])
    rec = json.loads(out.read_text())
    assert rec["other_prompts"] == ["a photo of a dog", "a photo of a cat"]
    assert rec["machine"]["cores"] >= 1 and rec["machine"]["libraries"]["torch"] and rec["machine"]["cpu"]  # where it ran
    assert list(rec["personalization"][0]["per_prompt"]) == rec["other_prompts"]
    with pytest.raises(ValueError, match="differ in other_prompts"):
        ef.merge([_report([], [("frog", 0, 0.5)]), {**_report([], [("kite", 0, 0.5)]), "other_prompts": ["a"]}])
    merged = ef.merge([_report([], [("frog", 0, 0.5)]),
                       {**_report([], [("kite", 0, 0.5)]), "other_prompts": list(ex.OTHER_PROMPTS["pocket"])}])
    assert merged["other_prompts"] == list(ex.OTHER_PROMPTS["pocket"])
    old, new = _report([], [("frog", 0, 0.5)]), _report([], [("frog", 0, 0.5)])
    new["personalization"][0]["per_prompt"] = {"a photo of a rocket": {"toward_subject": 0.1, "moved": 0.2}}
    new["personalization"][0]["instance_prompt_toward_other_subjects"] = 0.3
    assert ef.merge([old, new])["personalization"][0]["gap_closed"] == 0.5
    assert ef.summarize(ef.merge([new, _report([], [("kite", 0, 0.4)])]))["personalization"]["gap_closed"]["n"] == 2
    for bad in ("a;;b", "a;a"):
        with pytest.raises(SystemExit) as err:
            ef.main(["--model", "tiny", "--subjects", "robot", "--seeds", "1", "--methods", "none", "--other-prompts", bad])
        assert err.value.code == 2 and "--other-prompts" in capsys.readouterr().err


def test_efficacy_cli_refuses_a_bad_attack_parameter_before_any_work(capsys):
    from eval.efficacy import main

    with pytest.raises(SystemExit) as err:
        main(["--model", "tiny", "--set", "nope=1"])
    assert err.value.code == 2 and "nope" in capsys.readouterr().err


def test_face_similarity_code_path_with_random_weights(photos, tmp_path, monkeypatch):
    """Random FaceNet weights (never reported as real): only the plumbing is checked, with a property that holds for
    any weights: a face compared with itself has similarity 1."""
    facenet = pytest.importorskip("facenet_pytorch")
    import eval.metrics as em
    from torchvision.transforms.functional import pil_to_tensor

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    state = {**facenet.InceptionResnetV1().state_dict(), "logits.weight": torch.zeros(8631, 512), "logits.bias": torch.zeros(8631)}
    torch.save(state, tmp_path / "checkpoints" / em.FACENET_WEIGHTS)  # the VGGFace2 file's layout, random values
    monkeypatch.setattr(em, "_MODELS", {})
    astronaut = pil_to_tensor(photos[0]).float() / 255
    assert measure("face_similarity", [astronaut], [astronaut]) == pytest.approx(1.0, abs=1e-5)
    assert measure("face_similarity", [torch.full_like(astronaut, 0.5)], [astronaut]).startswith("unavailable: no face")


def test_metrics_listing_says_what_is_available_here(capsys):
    from eval.__main__ import main

    assert main(["metrics"]) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {lines[i].split()[0]: lines[i + 1].strip() for i in range(0, len(lines) - 1, 2)}
    for name in ("psnr", "ssim", "linf", "rms", "thumb_distance"):  # weight-free: available everywhere
        assert status[name] == "available", (name, status[name])
    for name in ("lpips", "clip_i", "dino"):  # tests run with empty weight caches
        assert status[name].startswith("unavailable: "), (name, status[name])


def test_survives_posting_measures_the_gain_before_and_after_jpeg_and_resize(tiny):
    """The 'survives posting?' check on tiny (numbers meaningless there): its bookkeeping, and that posting happens."""
    from eval.compare import survives_posting

    clean = [torch.from_numpy(np.array(rgb(64, 64, seed=i))).permute(2, 0, 1).float() / 255 for i in range(2)]
    protected = [(x + 0.05 * torch.randn(x.shape, generator=torch.Generator().manual_seed(i))).clamp(0, 1)
                 for i, x in enumerate(clean)]
    r = survives_posting(tiny, clean, protected, "a photo of sks person")
    assert r["gain"] == pytest.approx(r["protected"] - r["clean"])
    assert r["gain_after_posting"] == pytest.approx(r["protected_posted"] - r["clean_posted"])
    assert r["clean_posted"] != r["clean"]  # JPEG + resize changed what the attacker sees
    same = survives_posting(tiny, clean, clean, "a photo of sks person")
    assert same["gain"] == 0 and same["gain_after_posting"] == 0 and np.isnan(same["kept"])


def test_time_estimate_follows_the_declared_cost_iterations_and_canvas_area(tiny):
    from eval.playground import estimate_protect

    m = get_method("ldu")
    p, p2 = m.make_params("tiny"), m.make_params("tiny", iterations=2 * m.make_params("tiny").iterations)
    square = estimate_protect(tiny, "ldu", p, [(64, 64)])
    assert estimate_protect(tiny, "ldu", p, [(64, 64)] * 2) == pytest.approx(2 * square)  # one call per photo
    assert estimate_protect(tiny, "ldu", p, [(300, 300)]) == pytest.approx(square)  # the canvas, not the photo
    assert estimate_protect(tiny, "ldu", p, [(64, 90)]) == pytest.approx(1.5 * square)  # a 64 x 96 canvas
    assert 1.8 * square < estimate_protect(tiny, "ldu", p2, [(64, 64)]) < 2.2 * square  # iterations dominate
    advdm = get_method("advdm")
    assert estimate_protect(tiny, "advdm", advdm.make_params("tiny"), [(64, 64)]) < square  # 6 pixel steps vs 8 LDU steps


def test_eval_run_checks_backbones_and_out_before_any_work(tmp_path, capsys):
    from eval.__main__ import main

    path = write(tmp_path, {"image_sets": {"r": {"subject": "robot"}}, "protect_backbone": "/etc", "methods": ["pid"]})
    assert main(["run", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "backbone /etc" in capsys.readouterr().err and not (tmp_path / "o").exists()
    good = write(tmp_path, {"image_sets": {"r": {"subject": "robot"}}, "protect_backbone": "tiny", "methods": ["pid"]})
    assert main(["run", str(good), "--out", "/proc/ldu-no"]) == 2
    assert "cannot write there" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_run_exit_status_says_whether_cells_failed(tmp_path, monkeypatch, capsys):
    from eval.__main__ import main

    path = write(tmp_path, {"image_sets": {"r": {"subject": "robot", "train": 2, "held_out": 2}}, "protect_backbone": "tiny",
                            "methods": [{"name": "pid", "params": {"iterations": 1}}],
                            "attacks": [{"name": "lora_dreambooth", "params": {"steps": 1}}],
                            "generate": {"n": 1, "steps": 1, "prompts": []}, "metrics": ["psnr"], "seeds": [0]})
    assert main(["run", str(path), "--out", str(tmp_path / "ok"), "--quiet"]) == 0
    import eval.experiment

    real, calls = eval.experiment.train, []

    def first_fails(*a, **k):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(*a, **k)

    monkeypatch.setattr("eval.experiment.train", first_fails)
    assert main(["run", str(path), "--out", str(tmp_path / "some"), "--quiet"]) == 3
    monkeypatch.setattr("eval.experiment.train", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("always")))
    assert main(["run", str(path), "--out", str(tmp_path / "all"), "--quiet"]) == 1
    assert "always" in capsys.readouterr().err


def test_the_training_views_pixel_mean_is_the_gap_a_blur_closes(tiny, monkeypatch):
    """The base side keeps the distance of the training views' pixel mean (one blurred image) to the held-out views,
    and each personalization row the gap that image would close: a black and a white view average to the grey of the
    held-out view (distance 0: the whole gap and more), while each sharp view is 0.5 away in every thumbnail pixel."""
    import eval.efficacy as ef
    import eval.experiment as ex

    monkeypatch.setattr(ex, "_measure", lambda bb, setup, adapter, prompt, callback=None: (
        {"gen_distance": [20.0, 20.0], "gen_distance_mean": 20.0, "post_attack_loss": 0.1}, {prompt: [torch.zeros(3, 8, 8)] * 2}))
    setup = ex.Setup(train=[torch.zeros(3, 64, 64), torch.ones(3, 64, 64)], held_out=[torch.full((3, 64, 64), 0.5)],
                     noun="thing")
    base = ex.reference(tiny, setup)
    sharp = 0.5 * (3 * ex.THUMB**2) ** 0.5
    assert base.measures["train_views_distance"] == pytest.approx(sharp, rel=1e-4)
    assert base.measures["views_mean_distance"] == pytest.approx(0.0, abs=1e-4)
    clean = ex.Side({"gen_distance": [15.0, 15.0], "gen_distance_mean": 15.0, "post_attack_loss": 0.1}, base.generations, base.prompt)
    row = ef.personalization_row(base, clean)
    assert row["gap_closed"] == pytest.approx(5 / (20 - sharp), rel=1e-4)
    assert row["gap_closed_views_mean"] == pytest.approx(20 / (20 - sharp), rel=1e-4) and row["gap_closed_views_mean"] > 1
