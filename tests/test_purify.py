import pytest
import torch

from attacks import PurificationUnavailable, purifications, purify


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    small = torch.rand(3, 9, 11, generator=g)
    return [torch.nn.functional.interpolate(small[None], size=(70, 90), mode="bilinear")[0], torch.rand(3, 64, 64, generator=g)]


@pytest.mark.parametrize("name", [n for n in purifications if n != "noisy_upscale"])
def test_each_purification_changes_the_image_keeps_its_size_and_is_deterministic(tiny, images, name):
    a = purify(images, name, backbone=tiny)
    b = purify(images, name, backbone=tiny)
    for x, y, z in zip(images, a, b):
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert torch.equal(y, z)
        assert (y - x).abs().mean() > 1e-3


def test_seed_changes_the_noise(images):
    a = purify(images, "gaussian_noise", {"seed": 1})
    b = purify(images, "gaussian_noise", {"seed": 2})
    assert not torch.equal(a[0], b[0])


def test_jpeg_quality_orders_the_damage(images):
    err = {q: float((purify(images[:1], "jpeg", {"quality": q})[0] - images[0]).abs().mean()) for q in (30, 95)}
    assert err[30] > err[95] > 0


def test_noisy_upscale_without_a_model_says_what_is_missing(images):
    with pytest.raises(PurificationUnavailable, match="needs an upscaler model"):
        purify(images, "noisy_upscale")


def test_bad_parameters_are_named(images):
    with pytest.raises(ValueError, match="quality must be"):
        purify(images, "jpeg", {"quality": 0})
    with pytest.raises(ValueError, match="needs a backbone"):
        purify(images, "diffpure")
    with pytest.raises(ValueError, match="unknown purification"):
        purify(images, "bleach")
