import torch

from ldu import attacker_loss, diffusion_loss, make_draws


def test_draws_are_reproducible_and_seeded():
    a = make_draws(4, 2, (4, 16, 16), 1000, seed=1)
    b = make_draws(4, 2, (4, 16, 16), 1000, seed=1)
    c = make_draws(4, 2, (4, 16, 16), 1000, seed=2)
    assert torch.equal(a.t, b.t) and torch.equal(a.eps, b.eps)
    assert not torch.equal(a.eps, c.eps)
    assert a.t.shape == (4, 2) and a.eps.shape == (4, 2, 4, 16, 16)


def test_loss_matches_a_hand_computed_one(tiny):
    z0 = torch.randn(2, *tiny.latent_shape(), generator=torch.Generator().manual_seed(0))
    cond = tiny.encode_prompt("a photo of sks person")
    d = make_draws(3, 2, tiny.latent_shape(), tiny.num_train_timesteps, seed=0)
    expected = torch.zeros(2)
    with torch.no_grad():
        for j in range(3):
            for i in range(2):
                t = d.t[j, i : i + 1]
                a = tiny.alphas_cumprod[t]
                zt = a.sqrt() * z0[i : i + 1] + (1 - a).sqrt() * d.eps[j, i : i + 1]
                expected[i] += (tiny.predict(zt, t, cond) - d.eps[j, i : i + 1]).pow(2).mean() / 3
        got = diffusion_loss(tiny, z0, cond, d, reduction="none")
    assert torch.allclose(got, expected, atol=1e-5)


def test_chunked_evaluation_equals_one_batch(tiny):
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cond = tiny.encode_prompt("a photo of sks person")
    d = make_draws(5, 2, tiny.latent_shape(), tiny.num_train_timesteps, seed=3)
    with torch.no_grad():
        whole = attacker_loss(tiny, x, cond, d, reduction="none")
        tiny.reset_calls()
        chunked = attacker_loss(tiny, x, cond, d, reduction="none", max_batch=4)
    assert tiny.calls["unet"] == 3  # 2 draws x 2 images per call: 2 + 2 + 1 draws
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.allclose(whole.mean(), attacker_loss(tiny, x, cond, d), atol=1e-6)
