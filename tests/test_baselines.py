"""The baseline protections on tiny: budgets after quantisation, their own objective improves, registry listing."""

import numpy as np
import pytest
import torch

from conftest import rgb
from ldu import get_method, methods, protect
from ldu.io import to_codes

BASELINES = ["advdm", "aspl", "photoguard_encoder", "mist", "pid"]
FIXED = {"advdm": {"resample": False}, "mist": {"resample": False}, "aspl": {"resample": False}}


def test_every_baseline_is_registered_with_a_linf_budget_in_pixel_units():
    for name in BASELINES:
        m = methods[name]
        p = m.make_params("sd")
        assert m.budget_field == "linf" and 0 < p.linf <= 16 / 255 + 1e-12
        assert m.budgets(p) == (None, p.linf)
        assert m.params.__doc__ is not None


@pytest.mark.parametrize("name", BASELINES)
def test_budget_holds_after_quantisation_and_the_objective_improves(tiny, name):
    images = [rgb(64, 64, seed=1), rgb(48, 80, seed=2)]
    linf = 4 / 255
    r = protect(images, tiny, method=name, params={"linf": linf, **FIXED.get(name, {})})
    for i, img in enumerate(r.sources):
        diff = to_codes(r.images[i], img).astype(np.int64) - to_codes(img.pixels, img).astype(np.int64)
        assert diff.any(), "nothing changed: the test would prove nothing"
        assert np.abs(diff).max() <= 4
        s = r.stats["images"][i]
        assert s["linf"] <= linf + 1e-6 and s["linf_255"] <= 4 + 1e-4 and "rms" in s and "linf_255" in s and "rms_255" in s
    own = r.stats["batch"]["method"]  # a 64x64 and a 48x80 image: two canvas shapes, one method call each
    assert [g["images"] for g in own["groups"]] == [[0], [1]]
    for g in own["groups"]:  # against where the optimisation started (PID starts at a random point, not at x)
        start = g.get("objective_start", g["objective_clean"])
        assert all(f > c for f, c in zip(g["objective_final"], start)), g


def test_pid_with_no_iterations_does_not_pass_for_an_improvement(tiny):
    r = protect([rgb(64, 64, seed=1)], tiny, method="pid", params={"iterations": 0})
    (g,) = r.stats["batch"]["method"]["groups"]
    assert g["objective_final"] == g["objective_start"]  # the random start alone is no improvement


def test_aspl_leaves_no_surrogate_behind(tiny):
    before = {k: v.clone() for k, v in tiny.unet.state_dict().items()}
    protect([rgb(64, 64)], tiny, method="aspl")
    after = tiny.unet.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_baselines_are_seeded(tiny):
    a = protect([rgb(64, 64)], tiny, method="advdm", params={"seed": 3})
    b = protect([rgb(64, 64)], tiny, method="advdm", params={"seed": 3})
    assert torch.equal(a.images[0], b.images[0])


def test_methods_listing_names_every_baseline(capsys):
    from ldu.cli import main

    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ["ldu", *BASELINES]:
        assert f"{name}:" in out


def test_aspl_progress_counts_every_pgd_step():
    m = get_method("aspl")
    p = m.make_params("sd")
    assert m.steps(p) == p.rounds * p.pgd_steps == 300 and m.effort_field == "rounds"


def test_the_noise_control_spends_the_budget_with_seeded_per_photo_noise(tiny):
    budget = 4 / 255
    a = protect([rgb(64, 64, seed=1), rgb(64, 64, seed=2)], tiny, method="noise", params={"budget_rms": budget, "seed": 3})
    b = protect([rgb(64, 64, seed=1)], tiny, method="noise", params={"budget_rms": budget, "seed": 3})
    c = protect([rgb(64, 64, seed=1)], tiny, method="noise", params={"budget_rms": budget, "seed": 4})
    for s in a.stats["images"]:  # the whole budget is spent (up to one code step of rounding), never more
        assert budget - 1 / 255 < s["rms"] <= budget + 1e-6, s
    assert torch.equal(a.images[0], b.images[0]) and not torch.equal(a.images[0], c.images[0])
    r0 = a.images[0] - a.sources[0].pixels
    r1 = a.images[1] - a.sources[1].pixels
    assert abs(float((r0 * r1).mean())) < 0.2 * float(r0.pow(2).mean())  # two photos: independent noise
    assert not methods["noise"].listed  # a control for the CLIs and the grid, not a protection the app offers
