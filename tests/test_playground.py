"""What the app's tabs compute, without gradio: one result type for every job, out-of-memory at every stage, the
controls' validation, the verdict's words, formatting."""

import gc
import math
import weakref

import pytest
import torch

from conftest import rgb
from eval import playground as pg


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_is_one_message_and_the_memory_is_freed():
    held = {}

    def work(callback=None):
        callback({"stage": "train", "step": 3, "total": 10})
        big = torch.zeros(1000, 1000)
        held["ref"] = weakref.ref(big)
        _oom()

    r = pg.run_job(work, kind="attack")
    gc.collect()
    assert r.status == "error" and r.message == "Out of GPU memory while train: try fewer steps, fewer generations or the LoRA attack."
    assert held["ref"]() is None  # the traceback that held the tensors is gone


@pytest.mark.parametrize("target", ["protect", "measure", "save_png"])
def test_out_of_memory_at_each_stage_of_protect(tiny, tmp_path, monkeypatch, target):
    src = tmp_path / "a.png"
    rgb(64, 64).save(src)
    params = pg.method_params("pid", "tiny", effort=1)
    if target == "save_png":
        monkeypatch.setattr("ldu.io.write_together", _oom)
    else:
        monkeypatch.setattr(pg, target, _oom)
    r = pg.run_job(pg.protect_photos, [str(src)], tiny, "pid", params, tmp_path / "out", kind="protect")
    assert r.status == "error" and r.message.startswith("Out of GPU memory while ") and "fewer photos" in r.message
    monkeypatch.undo()
    assert pg.run_job(pg.protect_photos, [str(src)], tiny, "pid", params, tmp_path / "out2", kind="protect").ok


@pytest.mark.parametrize("target", ["attacks.train.train", "eval.experiment.generate", "eval.experiment.post_attack_loss"])
def test_out_of_memory_at_each_stage_of_the_attack(tiny, tmp_path, monkeypatch, target):
    srcs = []
    for i in range(2):
        srcs.append(tmp_path / f"{i}.png")
        rgb(64, 64, seed=i).save(srcs[-1])
    protected = pg.run_job(pg.protect_photos, [str(p) for p in srcs], tiny, "pid", pg.method_params("pid", "tiny", effort=1),
                           tmp_path / "p").outputs["protected"]
    setup = pg.attack_setup(tiny, [str(p) for p in srcs], [str(p) for p in srcs], "dog", "lora_dreambooth", 2, 0, 2)
    module, name = target.rsplit(".", 1)
    monkeypatch.setattr(f"eval.experiment.{name}" if module == "attacks.train" else target, _oom)
    r = pg.run_job(pg.attack_both, tiny, setup, protected, kind="attack")
    assert r.status == "error" and r.message.startswith("Out of GPU memory while ") and "fewer steps" in r.message


def test_stopped_and_user_errors_are_results_not_exceptions():
    from ldu.registry import Cancelled

    def cancelled(callback=None):
        raise Cancelled("stop")

    def bad(callback=None):
        raise ValueError("Upload 1 to 8 photos")

    assert pg.run_job(cancelled).status == "stopped"
    r = pg.run_job(bad)
    assert r.status == "error" and r.message == "Upload 1 to 8 photos"


@pytest.mark.parametrize("value", [math.nan, math.inf, -1, 2.5, True])
def test_numeric_controls_refuse_what_is_not_a_whole_number(value):
    with pytest.raises(ValueError, match="whole number"):
        pg.method_params("ldu", "tiny", effort=value)


@pytest.mark.parametrize("budget", [math.nan, math.inf, 0, -3, 300])
def test_the_budget_control_refuses_what_is_not_a_budget(budget):
    with pytest.raises(ValueError, match="Budget"):
        pg.method_params("ldu", "tiny", budget_255=budget)


def test_controls_set_the_declared_fields():
    p = pg.method_params("aspl", "tiny", effort=3, budget_255=4, seed=2, advanced="step_size=1/255\n# a comment")
    assert p.rounds == 3 and p.linf == pytest.approx(4 / 255) and p.seed == 2 and p.step_size == pytest.approx(1 / 255)
    p = pg.method_params("ldu", "tiny", budget_255=6, noun="red car")
    assert p.budget_rms == pytest.approx(6 / 255) and p.prompt == "a photo of sks red car"
    with pytest.raises(ValueError, match="no such parameter"):
        pg.method_params("ldu", "tiny", advanced="nope=1")
    with pytest.raises(ValueError, match="at most 2000"):
        pg.method_params("ldu", "tiny", advanced="x" * 3000)


def test_the_verdict_says_what_happened_with_its_noise():
    from eval.experiment import NO_HELD_OUT, TOO_LITTLE

    # one seed: a lean, never a headline verdict (the attack's run-to-run spread is not in the draw noise)
    one = pg.verdict({"prevented_loss": 0.38, "prevented_loss_noise": 0.05})
    assert one.startswith("**One run leans toward protection, not yet a verdict:** the attacker learned 38 % less")
    assert "±5 %" in one and "use 3 seeds" in one
    assert pg.verdict({"prevented_loss": 0.38, "prevented_loss_noise": 0.05}, seeds=3).startswith("**The attacker learned 38 % less")
    assert pg.verdict({"prevented_loss": 0.03, "prevented_loss_noise": 0.04}).startswith("**No measurable protection")
    assert "use 3 seeds" in pg.verdict({"prevented_loss": 0.03, "prevented_loss_noise": 0.04})
    assert "use 3 seeds" not in pg.verdict({"prevented_loss": 0.03, "prevented_loss_noise": 0.04}, seeds=3)
    assert pg.verdict({"prevented_loss": -0.4, "prevented_loss_noise": 0.05}).startswith("**One run leans the other way")
    assert "learned 40 % more" in pg.verdict({"prevented_loss": -0.4, "prevented_loss_noise": 0.05})
    assert pg.verdict({"prevented_loss": -0.4, "prevented_loss_noise": 0.05}, seeds=2).startswith("**The protection helped the attacker")
    assert "held-out" in pg.verdict({"prevented_loss": NO_HELD_OUT}) and "more training steps" in pg.verdict({"prevented_loss": TOO_LITTLE})
    both = {"prevented_loss": TOO_LITTLE, "prevented_generation": TOO_LITTLE}
    assert "more training steps" in pg.verdict(both)
    # the loss did not show the learning, the generations did: the verdict reads them, and says so
    text = pg.verdict({"prevented_loss": TOO_LITTLE, "prevented_generation": 0.5, "prevented_generation_noise": 0.1})
    assert text.startswith("**One run leans toward protection") and "learned 50 % less" in text
    assert "generations' likeness" in text and "±10 %" in text
    assert "use 3 seeds" in text and "use 3 seeds" not in pg.verdict({"prevented_loss": 0.5}, seeds=3)


def test_numbers_are_shown_with_three_significant_digits():
    assert pg.fmt(0.123456789) == "0.123" and pg.fmt(31.98765, "dB") == "32 dB" and pg.fmt(1234.5) == "1234"
    assert pg.fmt("unavailable: needs weights") == "unavailable" and pg.fmt(None) == "–" and pg.fmt(math.inf) == "∞"
    assert pg.percent(0.384, 0.061) == "38 % ± 6 %"


def test_smoothing_keeps_the_length_and_flattens_noise():
    curve = [1.0 if i % 2 else 0.0 for i in range(100)]
    s = pg.smoothed(curve)
    assert len(s) == 100 and max(s[20:]) - min(s[20:]) < 0.2


def test_a_built_in_subject_is_recognised_by_content_not_name(tmp_path):
    import shutil

    info = pg.example_subjects()["robot"]
    renamed = tmp_path / "IMG_0001.png"
    shutil.copy(info["train_paths"][0], renamed)
    assert pg.builtin_subject([str(renamed)])["name"] == "robot"
    other = tmp_path / "robot-train-0.png"
    rgb(64, 64).save(other)
    assert pg.builtin_subject([str(other)]) is None  # the right name, other pixels


def test_the_verdict_reads_the_share_its_backbone_kind_names_first():
    """On pocket the held-out loss does not follow what the default attack learns (a share of its small change reads
    100-200 %): the verdict reads the generations' share first there, and the loss only when that is unavailable."""
    from eval.experiment import NO_HELD_OUT, TOO_LITTLE, verdict_measure

    assert verdict_measure("pocket") == "prevented_generation" and verdict_measure("sd") == "prevented_loss"
    both = {"prevented_loss": 2.07, "prevented_loss_noise": 0.1, "prevented_generation": 0.05,
            "prevented_generation_noise": 0.04}
    assert pg.verdict(both, seeds=3).startswith("**The attacker learned 207 % less")
    on_gen = pg.verdict(both, seeds=3, first="prevented_generation")
    assert on_gen.startswith("**No measurable protection") and "generations' likeness" in on_gen and "207" not in on_gen
    no_gen = {**both, "prevented_generation": TOO_LITTLE}
    assert pg.verdict(no_gen, seeds=3, first="prevented_generation").startswith("**The attacker learned 207 % less")
    none = {"prevented_loss": TOO_LITTLE, "prevented_generation": TOO_LITTLE}
    assert "more training steps" in pg.verdict(none, first="prevented_generation")
    assert "held-out" in pg.verdict({"prevented_loss": NO_HELD_OUT, "prevented_generation": NO_HELD_OUT},
                                    first="prevented_generation")


def test_several_seeds_give_a_spread_in_the_verdict():
    r = pg.combine([{"prevented_loss": 0.4, "prevented_loss_noise": 0.05}, {"prevented_loss": 0.2, "prevented_loss_noise": 0.03}])
    assert r["prevented_loss"] == pytest.approx(0.3) and r["prevented_loss_spread"] == pytest.approx(0.1414, abs=1e-3)
    text = pg.verdict(r, seeds=2)
    assert text.startswith("**The attacker learned 30 % ± 14 % less") and "2 seeds; draw noise ±4 %" in text
    wide = pg.combine([{"prevented_loss": 0.4, "prevented_loss_noise": 0.01}, {"prevented_loss": -0.2, "prevented_loss_noise": 0.01}])
    assert pg.verdict(wide, seeds=2).startswith("**No measurable protection")  # the seeds disagree
    from eval.experiment import TOO_LITTLE

    gen = pg.combine([{"prevented_loss": TOO_LITTLE, "prevented_generation": 0.6, "prevented_generation_noise": 0.1},
                      {"prevented_loss": 0.1, "prevented_generation": 0.4, "prevented_generation_noise": 0.1}])
    assert gen["prevented_loss"] == TOO_LITTLE and gen["prevented_generation"] == pytest.approx(0.5)
    assert pg.verdict(gen, seeds=2).startswith("**The attacker learned 50 % ± 14 % less")


@pytest.mark.parametrize("value", [math.nan, math.inf, 0, 6, 2.5, "3"])
def test_whole_number_controls_name_themselves(value):
    with pytest.raises(ValueError, match="Seeds must be a whole number from 1 to 5"):
        pg.whole(value, "Seeds", 1, 5)
