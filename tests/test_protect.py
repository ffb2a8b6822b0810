import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import rgb
from ldu import Cancelled, get_method, load_images, protect
from ldu.methods import MethodParams
from ldu.io import to_codes

FAST = {"iterations": 2, "rounds": 2, "ddim_steps": 2, "draws": 2}


def codes_of(result, i):
    return to_codes(result.images[i], result.sources[i])


def source_codes(src):
    return to_codes(src.pixels, src)


@pytest.mark.parametrize("mode,size", [("RGB", (37, 53)), ("L", (65, 31)), ("RGBA", (64, 64)), ("RGB", (1000, 17))])
def test_zero_iterations_return_the_input_bit_exactly(tiny, mode, size):
    src = load_images([rgb(*size, mode=mode)])[0]
    result = protect([src], tiny, params={"iterations": 0})
    assert np.array_equal(codes_of(result, 0), source_codes(src))
    assert result.stats["images"][0]["rms"] == 0


@pytest.mark.parametrize("budget_rms,linf", [(2 / 255, 4 / 255), (None, 3 / 255), (4 / 255, None)])
def test_budget_holds_after_quantisation_for_every_image(tiny, budget_rms, linf):
    srcs = load_images([rgb(37, 53, seed=1), rgb(90, 120, seed=3, mode="L")])
    result = protect(srcs, tiny, params={**FAST, "iterations": 6, "budget_rms": budget_rms, "linf": linf, "lr": 5.0})
    for i, src in enumerate(srcs):
        r = (torch.from_numpy(codes_of(result, i).astype(np.float64)) - torch.from_numpy(source_codes(src).astype(np.float64))) / 255
        assert r.abs().max() > 0, "the method changed nothing: the test would prove nothing"
        if budget_rms is not None:
            assert float(r.pow(2).mean().sqrt()) <= budget_rms
            if (linf is None or linf >= 2 * budget_rms) and not src.gray:
                # the budget binds (a large step) on the canvas; resized to the photo's own size the residual keeps
                # most of it (3.4/255 of 4/255 here), and the rounding keeps that (test_quantise_spends_the_budget...)
                # (A gray image saves the mean of the three channels' residuals: below the budget, not at it.)
                assert float(r.pow(2).mean().sqrt()) > budget_rms - 1 / 255
        if linf is not None:
            assert float(r.abs().max()) <= linf + 1e-12
        assert result.images[i].shape == src.pixels.shape


def test_gradient_reaches_the_shift_and_is_finite(tiny):
    result = protect([rgb(64, 64)], tiny, params=FAST)
    (only,) = result.stats["batch"]["method"]["groups"]
    g = only["grad_norm_first"]
    assert np.isfinite(g) and g > 0


def test_the_optimisation_raises_the_attacker_loss_on_its_own_draws(tiny, photos):
    """Strictly: a method that returned x unchanged would score equal (the best candidate starts at x) and fail."""
    imgs = [p.resize((64, 64)) for p in photos[:2]]
    s = protect(imgs, tiny, params={**FAST, "iterations": 6}).stats
    for img in s["images"]:
        assert img["attacker_loss_protected_opt_draws"] > img["attacker_loss_clean_opt_draws"]
        assert img["rms"] > 0
    # on random `tiny` the gap is small by nature; the pocket backbone gives it a real margin
    assert "attacker_loss_protected" in s["batch"] and "attacker_loss_clean" in s["batch"]


def test_fixed_seed_reproduces_the_output(tiny):
    img = rgb(48, 56, seed=5)
    a = protect([img], tiny, params={**FAST, "seed": 3})
    b = protect([img], tiny, params={**FAST, "seed": 3})
    c = protect([img], tiny, params={**FAST, "seed": 4})
    assert torch.equal(a.images[0], b.images[0])
    assert not torch.equal(a.images[0], c.images[0])


def test_unet_calls_are_counted(tiny):
    p = get_method("ldu").make_params("tiny", iterations=6, rounds=2, ddim_steps=3, draws=2)
    s = protect([rgb(64, 64)], tiny, params=p).stats["batch"]
    k = p.ddim_steps
    # clean loss once; per round: inversion k + base denoising k, and (steps + 1) evaluations of denoising k + loss 1
    evaluations = p.iterations + p.rounds
    assert s["unet_calls"] == 1 + p.rounds * 2 * k + evaluations * (k + 1)
    assert s["unet_samples"] == 1 * p.draws + p.rounds * 2 * k + evaluations * (k + p.draws)


@pytest.mark.parametrize("iterations,rounds", [(1, 1), (2, 2), (3, 2)])
def test_every_step_is_scored_even_with_one_step_per_round(tiny, iterations, rounds):
    r = protect([rgb(64, 64)], tiny, params={**FAST, "iterations": iterations, "rounds": rounds, "lr": 0.5})
    assert r.stats["images"][0]["rms"] > 0
    assert len(r.stats["batch"]["method"]["groups"][0]["curve"]) == iterations


def test_decode_mode_holds_its_constraint_across_rounds(tiny):
    budget = 8 / 255
    psnr = {}
    for rounds in (1, 2):
        s = protect([rgb(64, 64)], tiny, params={**FAST, "mode": "decode", "iterations": 8, "rounds": rounds,
                                                 "budget_rms": budget}).stats["images"][0]
        psnr[rounds] = s["psnr_vs_base_working_size"]
    budget_db = 20 * np.log10(1 / budget)
    # a soft (Lagrangian) constraint: near the budget, and a second round must not add another VAE round trip
    assert psnr[2] > budget_db - 3 and psnr[2] > psnr[1] - 3, psnr


def test_decode_mode_reports_psnr_against_the_reconstruction(tiny):
    result = protect([rgb(64, 64)], tiny, params={**FAST, "mode": "decode"})
    stats = result.stats["images"][0]
    assert "psnr_vs_base_working_size" in stats and np.isfinite(stats["psnr_vs_base_working_size"])
    assert stats["budget_rms"] is None  # not projected by the wrapper: measured against the reconstruction
    assert result.manifest["params"]["mode"] == "decode"


def test_v_prediction_backbone_runs(tiny):
    from diffusers import DDIMScheduler

    v = dataclasses.replace(tiny, scheduler=DDIMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction"))
    assert v.prediction_type == "v_prediction"
    s = protect([rgb(64, 64)], v, params=FAST).stats["images"][0]
    assert np.isfinite(s["attacker_loss_protected"])


def test_cancel_through_the_callback(tiny):
    calls = []

    def cb(info):
        calls.append(info)
        return info.get("step", 0) < 2

    with pytest.raises(Cancelled):
        protect([rgb(64, 64)], tiny, params={**FAST, "iterations": 10}, callback=cb)
    assert max(c["step"] for c in calls) == 2


def test_manifest_names_method_params_backbone_seed_and_version(tiny):
    r = protect([rgb(64, 64)], tiny, params={**FAST, "seed": 7})
    m = r.manifest_for(0)
    assert m["method"] == "ldu" and m["seed"] == 7 and m["params"]["iterations"] == FAST["iterations"]
    assert m["backbone"]["spec"] == "tiny" and m["backbone"]["revision"].startswith("sha256:")
    assert m["code_version"] and "torch" in m["libraries"]
    assert {"psnr", "ssim", "linf", "rms"} <= set(m["stats"])
    assert {"seconds", "unet_calls"} <= set(m["batch_stats"])


def test_bad_parameters_and_batches_are_refused_by_name(tiny):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        protect([rgb(64, 64)], tiny, method="nope")
    with pytest.raises(ValueError, match="has no parameter budget"):
        protect([rgb(64, 64)], tiny, params={"budget": 1})
    with pytest.raises(ValueError, match="mode must be"):
        protect([rgb(64, 64)], tiny, params={"mode": "pixels"})
    with pytest.raises(ValueError, match="budget_rms must be in"):
        protect([rgb(64, 64)], tiny, params={"budget_rms": 8})
    with pytest.raises(ValueError, match="1 to 8 images"):
        protect([rgb(32, 32)] * 9, tiny, params={"iterations": 0})


def test_batch_of_different_sizes_returns_each_at_its_own_size(tiny):
    imgs = [rgb(30, 70, seed=1), rgb(64, 64, seed=2), rgb(200, 100, seed=3)]
    r = protect(imgs, tiny, params={**FAST, "iterations": 1, "rounds": 1})
    assert [tuple(i.shape[1:]) for i in r.images] == [(30, 70), (64, 64), (200, 100)]


def test_quantise_spends_the_budget_smoothly_and_never_exceeds_it():
    """A residual at 6.87 code steps everywhere (what sign-PGD leaves after the RMS projection) is saved at RMS 6.87,
    not truncated to 6 (PSNR then jumped 32.6 -> 31.2 dB between whole steps and 32 dB could not be matched); below
    the budget the rounding is unbiased; a zero residual changes nothing; the dither is seeded."""
    from ldu.protect import quantise

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(20, 236, (3, 40, 300), generator=g).float() / 255  # 300 rows: two strips
    sign = (torch.randint(0, 2, (3, 40, 300), generator=g) * 2 - 1).float()

    def steps(out):  # in whole code steps
        return (out.double() * 255).round() - (clean.double() * 255).round()

    for k in (5.9, 6.3, 6.87, 6.99):
        d = steps(quantise(clean, sign * k / 255, 255, budget_rms=k / 255, linf=2 * k / 255, seed=1))
        assert k - 0.01 < float(d.pow(2).mean().sqrt()) <= k and float(d.abs().max()) <= 7, k
    capped = steps(quantise(clean, sign * 6.87 / 255, 255, budget_rms=6.87 / 255, linf=6.87 / 255, seed=1))
    assert float(capped.abs().max()) == 6  # the L-inf cap keeps every step at 6
    whole = steps(quantise(clean, sign * 6.5 / 255, 255, budget_rms=6.5 / 255, linf=7 / 255, seed=1))
    assert float(whole.abs().max()) == 7  # an L-inf of exactly 7 code steps allows 7
    edge = torch.where(sign > 0, torch.ones_like(clean), torch.zeros_like(clean))  # every step pushes past 0 or 255
    e = (quantise(edge, sign * 6.5 / 255, 255, budget_rms=6.5 / 255, linf=13 / 255, seed=1).double() * 255).round()
    assert torch.equal(e, (edge.double() * 255).round())  # kept inside [0, 1]: nothing can move
    small = torch.full((3, 40, 300), 0.3 / 255)
    mean_step = float(steps(quantise(clean, small, 255, seed=2)).mean())
    assert abs(mean_step - 0.3) < 0.02  # stochastic rounding: E[step] = r (truncation saved 0)
    assert torch.equal(quantise(clean, torch.zeros_like(small), 255, 0.01, 0.02), clean)
    assert torch.equal(quantise(clean, small, 255, seed=3), quantise(clean, small, 255, seed=3))
    assert not torch.equal(quantise(clean, small, 255, seed=3), quantise(clean, small, 255, seed=4))


def test_sixteen_bit_source_is_quantised_in_sixteen_bit_steps(tiny, tmp_path):
    import png

    a = (np.asarray(rgb(64, 64)).astype(np.uint16) * 257)
    with open(tmp_path / "d.png", "wb") as f:
        png.Writer(64, 64, greyscale=False, bitdepth=16).write(f, a.reshape(64, -1).tolist())
    src = load_images([tmp_path / "d.png"])[0]
    r = protect([src], tiny, params={**FAST, "budget_rms": 2 / 255, "linf": 4 / 255})
    codes = codes_of(r, 0).astype(np.int64)
    diff = codes - a.astype(np.int64)
    assert diff.any() and np.abs(diff).max() <= 4 / 255 * 65535
    assert np.sqrt(((diff / 65535) ** 2).mean()) <= 2 / 255


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (96, 128), (130, 61), (512, 683), (1408, 1419), (17, 1000)])
@pytest.mark.parametrize("size,multiple,vae_factor", [(64, 16, 4), (512, 64, 8)])
def test_the_attackers_centre_square_is_a_latent_aligned_window_of_the_canvas(hw, size, multiple, vae_factor):
    import torch.nn.functional as F

    from ldu.protect import Canvas, center_square

    x = torch.rand(3, *hw, generator=torch.Generator().manual_seed(0))
    c = Canvas.of(*hw, size, multiple)
    assert c.H % multiple == 0 and c.W % multiple == 0 and min(c.h, c.w) == size
    assert 0 <= c.H - c.h < multiple and 0 <= c.W - c.w < multiple
    canvas = c.place(x)
    assert canvas.shape == (3, c.H, c.W)
    resized = F.interpolate(x[None], size=(c.h, c.w), mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)
    assert torch.equal(c.take(canvas), resized)  # the padding is around the photo, not over it
    top, left = (c.H - size) // 2, (c.W - size) // 2
    assert top % vae_factor == 0 and left % vae_factor == 0  # the attacker's latent grid is the method's
    window = canvas[:, top : top + size, left : left + size]
    if not c.squeezed:  # the aspect kept: what the attacker trains on is exactly that window of the canvas
        assert torch.allclose(window, center_square(x, size), atol=1e-6)
    else:  # 17 x 1000: squeezed to 4:1; the attacker's square comes from the photo's middle, not from all of it
        assert max(c.h, c.w) == 4 * size and center_square(x, size).shape == (3, size, size)


def test_torchvision_resize_and_center_crop_are_what_the_attacker_sees():
    from torchvision.transforms import CenterCrop, Resize

    from ldu.protect import center_square

    x = torch.rand(3, 75, 100, generator=torch.Generator().manual_seed(1))
    theirs = CenterCrop(64)(Resize(64, antialias=True)(x))  # diffusers' DreamBooth example, on a tensor
    assert torch.allclose(center_square(x, 64), theirs.clamp(0, 1), atol=1e-5)


@pytest.mark.parametrize("together", [False, True])
def test_non_square_photos_are_protected_at_their_aspect(tiny, together):
    """One call per photo by default; with batch_photos, one call per canvas shape."""
    images = [rgb(80, 48, seed=1), rgb(64, 64, seed=2), rgb(80, 48, seed=3), rgb(1000, 17, seed=4)]
    calls = []
    fast = {**FAST, "iterations": 1, "rounds": 1, "lr": 0.5}
    r = protect(images, tiny, params=fast, callback=lambda info: calls.append(info) or True, batch_photos=together)
    shapes = [s["working_shape"] for s in r.stats["images"]]
    assert shapes == [[112, 64], [64, 64], [112, 64], [256, 64]]  # 80 high, 48 wide: resized to 107 x 64, padded
    assert [s["squeezed"] for s in r.stats["images"]] == [False, False, False, True]
    groups = [g["images"] for g in r.stats["batch"]["method"]["groups"]]
    assert groups == ([[0, 2], [1], [3]] if together else [[0], [1], [2], [3]])
    for img, out, s in zip(r.sources, r.images, r.stats["images"]):
        assert out.shape == img.pixels.shape and s["rms"] > 0
    steps = [c["step"] for c in calls if c.get("stage") == "ldu"]
    assert steps == sorted(steps) and steps[-1] == len(groups) * fast["iterations"]  # progress counts over every call


@pytest.mark.parametrize("method", ["ldu", "advdm", "photoguard_encoder", "mist", "pid"])
def test_a_photo_gets_the_same_bytes_alone_and_with_companions(tiny, method):
    """Per-photo reproducibility: draws seeded by the seed and the photo's content, one computation per photo."""
    photo, companions = rgb(64, 64, seed=21), [rgb(64, 64, seed=22), rgb(48, 80, seed=23)]
    params = {"iterations": 2, **({"rounds": 1, "ddim_steps": 2, "draws": 2, "lr": 0.5} if method == "ldu" else {})}
    alone = protect([photo], tiny, method=method, params=params)
    together = protect([companions[0], photo, companions[1]], tiny, method=method, params=params)
    assert torch.equal(alone.images[0], together.images[1])
    assert alone.stats["images"][0]["photo_seed"] == together.stats["images"][1]["photo_seed"]
    assert alone.stats["images"][0]["attacker_loss_clean"] == pytest.approx(together.stats["images"][1]["attacker_loss_clean"], abs=1e-5)
    assert alone.stats["images"][0]["rms"] > 0
    if method != "photoguard_encoder":  # the others draw at random: another seed, other bytes
        other_seed = protect([photo], tiny, method=method, params={**params, "seed": 1})
        assert not torch.equal(alone.images[0], other_seed.images[0])


def test_a_method_that_learns_from_the_set_sees_the_set():
    from ldu.methods import methods

    assert not methods["aspl"].per_image
    assert all(m.per_image for name, m in methods.items() if name != "aspl")


@dataclasses.dataclass
class _ProbeParams(MethodParams):
    linf: float = 8 / 255
    budget_rms: float | None = None
    iterations: int = 2


def _probe(backbone, x, p, draws, callback=None):
    """A fake method whose residual is a fingerprint of its own image: +linf where it is brighter than its mean."""
    from ldu.methods import report

    for i in range(p.iterations):
        report(callback, {"stage": "probe", "step": i + 1, "total": p.iterations})
    sign = torch.where(x > x.mean(dim=(1, 2, 3), keepdim=True), 1.0, -1.0)
    return (x + p.linf * sign).clamp(0, 1), {"shape": list(x.shape)}


@pytest.fixture
def probe(monkeypatch):
    from ldu.methods import Method, methods

    monkeypatch.setitem(methods, "probe", Method(name="probe", params=_ProbeParams, fn=_probe, summary="test probe",
                                                budget_field="linf"))
    return "probe"


@pytest.mark.parametrize("together", [False, True])
def test_each_image_gets_its_own_residual_back_across_calls(tiny, probe, together):
    images = [rgb(64, 64, seed=1), rgb(80, 48, seed=2), rgb(64, 64, seed=3), rgb(80, 48, seed=4)]
    r = protect(images, tiny, method=probe, batch_photos=together)
    assert [g["images"] for g in r.stats["batch"]["method"]["groups"]] == ([[0, 2], [1, 3]] if together else [[0], [1], [2], [3]])
    for i, (src, out) in enumerate(zip(r.sources, r.images)):
        fingerprint = torch.where(src.pixels > src.pixels.mean(), 1.0, -1.0)
        residual = out - src.pixels
        agree = {k: float((residual * torch.where(o.pixels > o.pixels.mean(), 1.0, -1.0)).mean())
                 for k, o in enumerate(r.sources) if o.pixels.shape == src.pixels.shape}
        assert len(agree) == 2 and max(agree, key=agree.get) == i, agree  # its own fingerprint, not its neighbour's
        assert float((residual * fingerprint).mean()) > 0.5 * 8 / 255


def test_cancel_in_the_second_call_stops_protect(tiny, probe):
    seen = []

    def cb(info):
        seen.append((info.get("group"), info.get("step")))
        return info.get("group") != 2

    with pytest.raises(Cancelled):
        protect([rgb(64, 64, seed=1), rgb(80, 48, seed=2)], tiny, method=probe, callback=cb)
    assert (1, 2) in seen and seen[-1] == (2, 3)  # the first call ran through, the second stopped at its first report
