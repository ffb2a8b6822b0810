"""LDU's objective options on tiny (numbers meaningless there: every path runs, budgets hold, nothing is left in the
backbone), the paper preset, and the amortised generator: train, resume, protect in one pass."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import rgb
from ldu import get_method, protect

FAST = {"iterations": 2, "rounds": 2, "ddim_steps": 2, "draws": 2, "lr": 0.5}


@pytest.mark.parametrize("options", [{"surrogate": "lora", "surrogate_steps": 1}, {"surrogate": "ti", "surrogate_steps": 1},
                                     {"fresh_draws": True}, {"posting": True}, {"latent_target": 1.0},
                                     {"posterior_shift": 1.0}, {"minimise": True}])
def test_each_objective_option_runs_within_the_budget_and_leaves_the_backbone_as_it_was(tiny, options):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    r = protect([rgb(64, 64, seed=3)], tiny, params={**FAST, **options, "prompt": "a photo of sks robot"})
    s = r.stats["images"][0]
    assert 0 < s["rms"] <= 8 / 255 and s["linf"] <= 16 / 255 + 1e-6
    after = tiny.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert r.manifest["params"][next(iter(options))] == next(iter(options.values()))


def test_the_options_change_the_result(tiny):
    img = rgb(64, 64, seed=4)
    base = protect([img], tiny, params=FAST).images[0]
    for options in ({"latent_target": 5.0}, {"posterior_shift": 5.0}, {"fresh_draws": True}, {"minimise": True}):
        assert not torch.equal(base, protect([img], tiny, params={**FAST, **options}).images[0]), options


def test_minimise_moves_the_attackers_loss_the_other_way(tiny):
    img = rgb(64, 64, seed=4)
    params = {**FAST, "iterations": 3, "rounds": 1, "lr": 0.05}
    for minimise in (False, True):
        s = protect([img], tiny, params={**params, "minimise": minimise}).stats["batch"]["method"]["groups"][0]
        clean = s["attacker_loss_clean_opt_draws"][0]  # reported as the attacker's loss in both directions
        reached = min(s["curve"]) if minimise else max(s["curve"])
        assert clean > 0 and (reached < clean if minimise else reached > clean), (minimise, clean, s["curve"])


def test_the_curve_and_the_clean_stat_are_the_attackers_loss_alone(tiny):
    # with an extra term the optimised value is not the attacker's loss: what LDU reports must still be
    img = rgb(64, 64, seed=4)
    params = {**FAST, "iterations": 2, "rounds": 1}

    def stats(**options):
        return protect([img], tiny, params={**params, **options}).stats["batch"]["method"]["groups"][0]

    plain, weighted = stats(), stats(latent_target=1e4, posterior_shift=1e4)
    assert weighted["attacker_loss_clean_opt_draws"] == pytest.approx(plain["attacker_loss_clean_opt_draws"])
    assert plain["curve"][0] > 0 and all(0.5 * plain["curve"][0] < v < 2 * plain["curve"][0] for v in weighted["curve"])


def test_posterior_shift_moves_the_encoders_posterior_away_from_the_clean_photos(tiny):
    img = rgb(64, 64, seed=4)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        mean0, logvar0 = tiny.posterior(x)

    def shift(weight):
        out = protect([img], tiny, params={**FAST, "iterations": 4, "rounds": 1, "lr": 0.05, "posterior_shift": weight})
        with torch.no_grad():
            xp = out.images[0][None].to(x)
            mean, logvar = tiny.posterior(xp)
        return float((mean - mean0).pow(2).mean() + (logvar - logvar0).pow(2).mean())

    assert shift(1e4) > 2 * shift(0.0)


def test_the_paper_preset_is_the_papers_form_and_the_user_still_wins(tiny):
    m = get_method("ldu")
    p = m.make_params("tiny", preset="paper")
    assert (p.strength, p.surrogate, p.mode, p.rounds, p.preset) == (1.0, "ti", "decode", 1, "paper")
    assert p.budget_rms == pytest.approx(4 / 255)
    assert m.make_params("tiny", preset="paper", ddim_steps=2).ddim_steps == 2
    with pytest.raises(ValueError, match="no preset 'nope'"):
        m.make_params("tiny", preset="nope")
    r = protect([rgb(64, 64, seed=5)], tiny, params={"preset": "paper", "iterations": 2, "ddim_steps": 2, "draws": 1,
                                                     "surrogate_steps": 1})
    assert r.manifest["params"]["preset"] == "paper" and "psnr_vs_base_working_size" in r.stats["images"][0]


def test_the_amortised_generator_trains_resumes_and_protects_in_one_pass(tiny, tmp_path):
    from dataclasses import replace

    from ldu.amortised import PRESETS, file_hash, train

    cfg = replace(PRESETS["dev"], steps=4, batch=2, width=16, blocks=1, checkpoint_every=2, draws=1)
    a = train(tiny, cfg, tmp_path / "a", log=lambda *x: None)
    interrupted = {"at": 0}

    def stop_at_step_3(info):
        interrupted["at"] = info["step"]
        return info["step"] < 3

    from ldu.registry import Cancelled

    with pytest.raises(Cancelled):
        train(tiny, cfg, tmp_path / "b", callback=stop_at_step_3, log=lambda *x: None)  # its step-2 checkpoint stays
    b = train(tiny, cfg, tmp_path / "b", log=lambda *x: None)  # resumed from step 2: the same run
    assert file_hash(a) == file_hash(b)
    logged = [json.loads(line) for line in (a / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [4] and (a / "loss_curve.png").stat().st_size > 1000  # the loss curve
    with pytest.raises(ValueError, match="another configuration"):
        train(tiny, replace(cfg, lr=1.0), tmp_path / "a", log=lambda *x: None)
    tiny.reset_calls()
    r = protect([rgb(64, 64, seed=6), rgb(48, 80, seed=7)], tiny, method="ldu_amortised", params={"generator": str(a)})
    assert all(s["rms"] <= 8 / 255 for s in r.stats["images"])
    groups = r.stats["batch"]["method"]["groups"]
    assert groups[0]["generator_hash"] == file_hash(a) and r.stats["batch"]["unet_calls"] == 0  # no UNet at all
    zero = protect([rgb(64, 64, seed=6)], tiny, method="ldu_amortised", params={"generator": str(a), "iterations": 0})
    assert zero.stats["images"][0]["rms"] == 0
    with pytest.raises(ValueError, match=r"no generator ships for the tiny backbone \(shipped: pocket\)"):
        protect([rgb(64, 64)], tiny, method="ldu_amortised")
    with pytest.raises(ValueError, match="no trained generator"):
        protect([rgb(64, 64)], tiny, method="ldu_amortised", params={"generator": str(tmp_path / "none")})


def test_the_generator_check_sets_unseen_subjects_beside_its_training_distribution(tiny, tmp_path):
    from ldu.amortised import ShiftGenerator, check, file_hash, save
    from ldu.subjects import SUBJECTS

    gen = ShiftGenerator(tiny.latent_channels, 16, 1)
    torch.nn.init.normal_(gen.out[-1].weight, std=1.0)  # a shift far above the budget: the projection must bind
    big = save(gen, tmp_path / "big", {"backbone": tiny.spec, "latent_channels": tiny.latent_channels, "width": 16,
                                       "blocks": 1, "config": {"images": "pocket-data"}})
    seen = check(tiny, big, budget_rms=4 / 255, n=2)  # the training distribution beside every unseen subject
    assert seen["hash"] == file_hash(big) and len(seen["groups"]) == 1 + len(SUBJECTS)
    for label, g in seen["groups"].items():
        assert g["images"] == (2 if label.startswith("training") else 4)
        # the budget spent and held: RMS 4/255 is 36.1 dB, one code step of rounding less is 37.9 dB
        assert 20 * math.log10(255 / 4) - 0.01 <= g["psnr"] < 20 * math.log10(255 / 3), g
        assert math.isfinite(g["attacker_loss_gain"]) and g["attacker_loss_gain"] != 0
        assert g["latent_distance_to_grey_clean"] > 0 and math.isfinite(g["latent_distance_to_grey_protected"])
    # decode mode: the output is the VAE reconstruction plus the shift's change, its budget held against the
    # reconstruction (tiny's random VAE reconstructs nothing: far from the photo), not projected against the photo
    params = {"generator": str(big), "budget_rms": 4 / 255}
    decode = protect([rgb(64, 64, seed=6)], tiny, method="ldu_amortised", params={**params, "mode": "decode"}).stats["images"][0]
    residual = protect([rgb(64, 64, seed=6)], tiny, method="ldu_amortised", params=params).stats["images"][0]
    assert decode["budget_rms"] is None and decode["psnr_vs_base_working_size"] >= 20 * math.log10(255 / 4) - 0.01
    assert decode["psnr"] < 20 and residual["psnr"] >= 20 * math.log10(255 / 4) - 0.01


def test_network_timing_accounts_for_forward_and_backward(tiny):
    import time

    x = torch.rand(1, 3, 64, 64, requires_grad=True)
    tiny.start_timing()
    t0 = time.perf_counter()
    z = tiny.encode(x)
    out = tiny.predict(z, 500, tiny.encode_prompt("a photo"))
    out.pow(2).mean().backward()
    wall = time.perf_counter() - t0
    timing = tiny.stop_timing()
    assert timing["unet"] > 0 and timing["vae"] > 0 and sum(timing.values()) <= wall * 1.01
    assert tiny.timing is None and np.isfinite(x.grad.sum().item())
