import pytest
import torch

from ldu import ddim_denoise, ddim_invert, ddim_timesteps


def alphas():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled_linear schedule
    return torch.cumprod(1 - betas, 0)


def test_timesteps_grid():
    assert ddim_timesteps(1000, 0.5, 4) == [0, 125, 250, 375, 500]
    assert ddim_timesteps(1000, 1.0, 2) == [0, 500, 999]
    with pytest.raises(ValueError, match="strength"):
        ddim_timesteps(1000, 0.0, 4)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_known_epsilon_is_reproduced_exactly(steps):
    """A model that always returns the true noise: inversion is the forward process, denoising returns z0."""
    a = alphas()
    g = torch.Generator().manual_seed(0)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ts = ddim_timesteps(1000, 0.6, steps)
    zt = ddim_invert(lambda z, t: eps, z0, ts, a)
    assert torch.allclose(zt, a[ts[-1]].sqrt() * z0 + (1 - a[ts[-1]]).sqrt() * eps, atol=1e-5)
    assert torch.allclose(ddim_denoise(lambda z, t: eps, zt, ts, a), z0, atol=1e-5)


def test_known_v_is_reproduced_exactly_when_denoising():
    a = alphas()
    g = torch.Generator().manual_seed(1)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ts = ddim_timesteps(1000, 0.7, 5)
    v = lambda z, t: a[t].sqrt() * eps - (1 - a[t]).sqrt() * z0  # noqa: E731
    zt = a[ts[-1]].sqrt() * z0 + (1 - a[ts[-1]]).sqrt() * eps
    assert torch.allclose(ddim_denoise(v, zt, ts, a, prediction_type="v_prediction"), z0, atol=1e-5)


def test_v_denoises_from_zero_terminal_snr():
    """On a schedule rescaled to zero terminal SNR (Lin et al. 2024), the last timestep has no signal at all: a
    v-model still denoises from there (its x0 is read directly, not divided by sqrt(alpha) = 0)."""
    from diffusers import DDIMScheduler

    a = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                      rescale_betas_zero_snr=True).alphas_cumprod
    assert a[999] == 0
    g = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    ts = ddim_timesteps(1000, 1.0, 4)
    assert ts[-1] == 999
    v = lambda z, t: a[t].sqrt() * eps - (1 - a[t]).sqrt() * z0  # noqa: E731
    assert torch.allclose(ddim_denoise(v, eps, ts, a, prediction_type="v_prediction"), z0, atol=1e-5)


def gaussian_model(prediction_type, a, sigma=0.5):
    """The exact denoiser for data ~ N(0, sigma^2 I): a smooth model whose only error is discretisation."""

    def model(z, t):
        at = a[t]
        eps = (1 - at).sqrt() * z / (at * sigma**2 + 1 - at)
        if prediction_type == "epsilon":
            return eps
        x0 = at.sqrt() * sigma**2 * z / (at * sigma**2 + 1 - at)
        return at.sqrt() * eps - (1 - at).sqrt() * x0

    return model


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_reconstruction_error_falls_as_steps_double(prediction_type):
    a = alphas()
    z0 = 0.5 * torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    model = gaussian_model(prediction_type, a)
    errs = []
    for k in (2, 4, 8, 16):
        ts = ddim_timesteps(1000, 0.6, k)
        rec = ddim_denoise(model, ddim_invert(model, z0, ts, a, prediction_type), ts, a, prediction_type)
        errs.append(float((rec - z0).pow(2).mean().sqrt()))
    assert all(e2 < 0.7 * e1 for e1, e2 in zip(errs, errs[1:])), errs  # first order: about halves


def test_reconstruction_error_falls_on_the_tiny_unet(tiny):
    c = tiny.encode_prompt("")
    z0 = torch.randn(1, *tiny.latent_shape(), generator=torch.Generator().manual_seed(3))
    errs = []
    with torch.no_grad():
        for k in (2, 4, 8):
            ts = ddim_timesteps(tiny.num_train_timesteps, 0.5, k)
            model = lambda z, t: tiny.predict(z, t, c)  # noqa: E731
            rec = ddim_denoise(model, ddim_invert(model, z0, ts, tiny.alphas_cumprod), ts, tiny.alphas_cumprod)
            errs.append(float((rec - z0).pow(2).mean().sqrt()))
    assert errs[0] > errs[1] > errs[2], errs


def test_gradients_flow_and_checkpointing_changes_nothing(tiny):
    c = tiny.encode_prompt("")
    ts = ddim_timesteps(tiny.num_train_timesteps, 0.5, 3)
    z = torch.randn(1, *tiny.latent_shape(), generator=torch.Generator().manual_seed(4))
    grads = []
    for ckpt in (False, True):
        d = torch.zeros_like(z, requires_grad=True)
        out = ddim_denoise(lambda z_, t: tiny.predict(z_, t, c), z + d, ts, tiny.alphas_cumprod, checkpoint=ckpt)
        out.square().mean().backward()
        grads.append(d.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
