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


def test_posting_is_a_smaller_jpeg_scaled_back(images):
    """posting = downscale, JPEG at the small size, scale back: by hand with Pillow's codec, and worse than either
    step alone."""
    import io

    import numpy as np
    from PIL import Image

    x = images[0]
    small = torch.nn.functional.interpolate(x[None], size=(52, 68), mode="bicubic", antialias=True, align_corners=False)[0]
    buf = io.BytesIO()
    Image.fromarray((small.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=75)
    decoded = torch.from_numpy(np.asarray(Image.open(buf).convert("RGB")).copy()).permute(2, 0, 1).float() / 255
    expected = torch.nn.functional.interpolate(decoded[None], size=(70, 90), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    got = purify([x], "posting")[0]
    assert torch.allclose(got, expected, atol=1e-6)
    err = {n: float((purify([x], n, p)[0] - x).abs().mean())
           for n, p in (("posting", {"quality": 75, "factor": 0.75}), ("jpeg", {"quality": 75}), ("resize", {"factor": 0.75}))}
    assert err["posting"] > max(err["jpeg"], err["resize"])


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


@pytest.fixture(scope="module")
def random_upscaler(tmp_path_factory):
    """A diffusers x4-upscaler folder with small RANDOM weights, shaped like stabilityai/stable-diffusion-x4-upscaler
    (7-channel UNet conditioned on the noise level, x4 VAE, v-prediction): it runs the code path, nothing more."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel

    from ldu.backbone import load_backbone

    torch.manual_seed(0)
    tiny = load_backbone("tiny")
    unet = UNet2DConditionModel(sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=8, norm_num_groups=8, num_class_embeds=400)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 32), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, scaling_factor=0.08333)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=tiny.text_encoder, tokenizer=tiny.tokenizer, unet=unet,
                                          low_res_scheduler=DDPMScheduler(), scheduler=DDIMScheduler(prediction_type="v_prediction"),
                                          max_noise_level=350)
    folder = tmp_path_factory.mktemp("upscaler")
    pipe.save_pretrained(folder)
    return str(folder)


def test_noisy_upscale_runs_a_local_upscaler_folder(images, random_upscaler):
    a = purify(images, "noisy_upscale", {"model": random_upscaler, "steps": 2})
    b = purify(images, "noisy_upscale", {"model": random_upscaler, "steps": 2})
    for x, y, z in zip(images, a, b):
        assert y.shape == x.shape and 0 <= float(y.min()) and float(y.max()) <= 1
        assert torch.equal(y, z)  # seeded
    c = purify(images, "noisy_upscale", {"model": random_upscaler, "steps": 2, "seed": 1})
    assert not torch.equal(a[0], c[0])


def test_noisy_upscale_names_a_folder_that_is_not_an_upscaler(images, tmp_path):
    with pytest.raises(PurificationUnavailable, match="could not load the upscaler"):
        purify(images, "noisy_upscale", {"model": str(tmp_path)})
