"""The pocket backbone: a complete diffusers folder, a VAE that reconstructs unseen photos, a protection effect far
above the draw-to-draw noise, and a training script that reproduces and resumes, with either preset."""

import json

import numpy as np
import pytest
import torch

from ldu.backbone import BUILTIN

POCKET = BUILTIN["pocket"]
VAE_HELD_OUT_DB = 28.0  # the goal; 31.94 dB measured (assets/pocket/check.json)


@pytest.fixture(scope="module")
def pocket():
    from ldu import load_backbone

    return load_backbone("pocket", device="cpu", dtype=torch.float32)


def test_a_complete_diffusers_folder_within_30_mb(pocket):
    from diffusers import StableDiffusionPipeline

    index = json.loads((POCKET / "model_index.json").read_text())
    listed = {k for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}
    assert listed == {"vae", "unet", "text_encoder", "tokenizer", "scheduler"}  # only what is there
    assert json.loads((POCKET / "tokenizer" / "tokenizer_config.json").read_text())["tokenizer_class"] == "CLIPTokenizer"
    assert json.loads((POCKET / "vae" / "config.json").read_text()).get("shift_factor") is None
    size = sum(p.stat().st_size for p in POCKET.rglob("*.safetensors"))
    assert size <= 30 * 2**20, size
    assert pocket.resolution == 64 and pocket.vae_scale_factor == 4 and pocket.kind == "pocket"
    ids = pocket.tokenizer("sks", add_special_tokens=False).input_ids
    assert len(ids) == 1
    pipe = StableDiffusionPipeline.from_pretrained(POCKET, local_files_only=True)
    out = pipe(["a red circle on a white background", "a blue square on a yellow background"], num_inference_steps=10,
               guidance_scale=4.0, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (2, 3, 64, 64)
    # the trained model follows the caption, and each picture has none of the other's colours (measured on pocket v3:
    # light 0.98, red 0.0125, a small red blob on white; yellow 0.76, blue 0.16, blue blobs on yellow)
    def colours(x):
        r, g, b = x
        return {"light": (x.mean(0) > 0.6).float().mean(), "red": ((r > 0.6) & (g < 0.35) & (b < 0.35)).float().mean(),
                "yellow": ((r > 0.6) & (g > 0.6) & (b < 0.4)).float().mean(),
                "blue": ((b > 0.5) & (r < 0.35) & (g < 0.35)).float().mean()}

    red, blue = colours(out[0]), colours(out[1])
    assert red["light"] > 0.6 and red["red"] > 0.01 and red["yellow"] + red["blue"] < 0.01, red
    assert blue["yellow"] > 0.4 and blue["blue"] > 0.15 and blue["red"] < 0.01, blue


def test_the_vae_keeps_identity_colours_and_eyes(pocket):
    """The goals the VAE was trained for, measured on images it never saw (ldu.pocket.check.vae_measures)."""
    from ldu.pocket.check import vae_measures

    with torch.no_grad():
        m, _ = vae_measures(lambda x: pocket.decode(pocket.encode(x)))
    assert m["held_out_photos_mean"] >= VAE_HELD_OUT_DB, m["held_out_photos"]
    # the goals: 30 dB, 1/255 and 24 dB; measured 50.4 dB, 0.39/255 and 24.68 / 26.63 dB (irises, pupils and fur
    # stripes in vae.png)
    assert m["synthetic_psnr_min"] >= 30 and m["synthetic_colour_shift_max_255"] <= 1.0, m["synthetic"]
    assert min(m["chelsea_left_eye_psnr"], m["chelsea_right_eye_psnr"]) >= 24, m


def test_the_shipped_generator_protects_unseen_subjects_as_it_does_its_training_images(pocket):
    """assets/generators/pocket: the cpu preset's run, within 5 MB; on every built-in subject (never in its training
    data) it pulls the encoded latent toward flat grey's about as much as on images of its training distribution
    (measured at 8/255 on pocket v3: 17-25 % closer on the subjects, 18.5 % on the training distribution; docs/RESULTS.md)."""
    from dataclasses import asdict

    from ldu.amortised import PRESETS, check
    from ldu.methods.ldu_amortised import GENERATORS

    folder = GENERATORS / "pocket"
    assert (folder / "generator.safetensors").stat().st_size <= 5 * 2**20
    record = json.loads((folder / "generator.json").read_text())
    assert record["config"] == json.loads(json.dumps(asdict(PRESETS["cpu"])))  # reproducible from the preset
    result = check(pocket, folder, budget_rms=8 / 255, n=8)
    seen = next(g for label, g in result["groups"].items() if label.startswith("training"))
    for label, g in result["groups"].items():
        assert g["latent_closer_to_grey"] >= 0.15, (label, g)
        # unseen subjects: within a factor 1.6 of the training distribution's effect, either way
        assert 1 / 1.6 <= g["latent_closer_to_grey"] / seen["latent_closer_to_grey"] <= 1.6, (label, g, seen)
        assert 20 * np.log10(255 / 8) - 0.01 <= g["psnr"] < 20 * np.log10(255 / 7), (label, g)


@pytest.mark.slow
@pytest.mark.pins
def test_ldu_raises_the_attacker_loss_far_beyond_the_draw_noise_of_the_gain(pocket):
    from ldu import attacker_loss, make_draws, protect
    from ldu.subjects import subject_views

    views = [torch.from_numpy(v.copy()).permute(2, 0, 1).float() / 255 for v in subject_views("robot", "train", 2, seed=0)[0]]
    result = protect(views, pocket, method="ldu", params={"prompt": "a photo of sks robot", "seed": 0, "iterations": 20})
    x, xp = torch.stack(views), torch.stack(result.images)
    cond = pocket.encode_prompt("a photo of sks robot")
    clean, prot = [], []
    with torch.no_grad():
        for k in range(5):  # independent sets of 64 draws the protection never saw
            d = make_draws(64, 2, pocket.latent_shape(), pocket.num_train_timesteps, seed=777 + k)
            clean.append(float(attacker_loss(pocket, x, cond, d, max_batch=64)))
            prot.append(float(attacker_loss(pocket, xp, cond, d, max_batch=64)))
    gains = np.array(prot) - np.array(clean)  # paired: the same draws for clean and protected
    noise = np.std(gains, ddof=1)  # draw-to-draw noise of one 64-draw measurement of the gain
    assert gains.min() > 0 and gains.mean() > 5 * noise, (gains, noise)
    assert all(s["rms"] <= 8 / 255 for s in result.stats["images"])


@pytest.mark.slow
@pytest.mark.pins
def test_the_default_attack_learns_a_subject_it_never_saw(pocket):
    """Personalization is visible: the app's default attack (full DreamBooth, 900 steps, pocket's 8-caption prior at
    weight 0.2) on 4 views of the robot brings "a photo of sks robot" generations at least half of the way from the
    base model to the held-out views (issue 16's goal; 16 x 16 thumbnails; 0.80 measured on this pair, 0.61-2.16 over
    the 14 measurable subject x seed pairs, docs/RESULTS.md "pocket v3")."""
    from attacks import default_attack
    from eval.efficacy import personalization_row, subject_setup
    from eval.experiment import attack_side, reference

    setup = subject_setup(pocket, "robot", 0, default_attack("pocket"), {}, n_gen=8)
    setup.other_prompts = ()
    row = personalization_row(reference(pocket, setup), attack_side(pocket, setup, setup.train))
    assert row["gap_closed"] >= 0.5, row


@pytest.mark.slow
def test_training_is_seeded_and_resumes(tmp_path):
    from ldu.pocket.train import Config, train

    cfg = Config(vae_steps=3, unet_steps=3, decoder_steps=3, dataset=64, checkpoint_every=2, vae_batch=4, unet_batch=4)
    a = train(tmp_path / "a", cfg, progress=_quiet)
    b = train(tmp_path / "b", cfg, progress=_quiet)
    again = train(tmp_path / "a", cfg, progress=_quiet)  # resumes from the last checkpoints: nothing left to train
    for sub in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "text_encoder/model.safetensors"):
        assert (a / sub).read_bytes() == (b / sub).read_bytes()
        assert (again / sub).read_bytes() == (b / sub).read_bytes()
    with pytest.raises(ValueError, match="another configuration"):
        train(tmp_path / "a", Config(vae_steps=5, unet_steps=3, dataset=64), progress=_quiet)


def test_init_from_keeps_the_vae_and_goes_on_training_the_unet(tmp_path):
    """--init-from: the VAE (so the latent space) and its statistics are the source model's byte for byte, the UNet
    and text encoder start from its weights and train on; a folder of another preset's sizes is refused by name."""
    from dataclasses import replace

    from ldu.pocket.train import Config, train

    cfg = Config(vae_steps=3, unet_steps=3, decoder_steps=3, dataset=64, vae_batch=4, unet_batch=4)
    src = train(tmp_path / "a", cfg, progress=_quiet)
    more = train(tmp_path / "b", replace(cfg, init_from=str(src), unet_steps=2, decoder_steps=0, seed=1), progress=_quiet)
    vae = "vae/diffusion_pytorch_model.safetensors"
    assert (more / vae).read_bytes() == (src / vae).read_bytes()
    stats = ("latent_mean_removed", "latent_std", "scaling_factor")
    a, b = (json.loads((f / "training.json").read_text()) for f in (src, more))
    assert {k: a[k] for k in stats} == {k: b[k] for k in stats}
    unet = "unet/diffusion_pytorch_model.safetensors"
    assert (more / unet).read_bytes() != (src / unet).read_bytes()
    with pytest.raises(ValueError, match="text_hidden"):
        train(tmp_path / "c", replace(cfg, init_from=str(src), text_hidden=128), progress=_quiet)
    with pytest.raises(ValueError, match="not a pocket folder"):
        train(tmp_path / "d", replace(cfg, init_from=str(tmp_path)), progress=_quiet)
    # init_keep="vae": the VAE and its statistics kept, a fresh (here wider) text encoder and UNet on its latents
    wide = train(tmp_path / "e", replace(cfg, init_from=str(src), init_keep="vae", text_hidden=128, text_layers=3,
                                         decoder_steps=0), progress=_quiet)
    assert (wide / vae).read_bytes() == (src / vae).read_bytes()
    assert {k: json.loads((wide / "training.json").read_text())[k] for k in stats} == {k: a[k] for k in stats}
    text = json.loads((wide / "text_encoder" / "config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"]) == (128, 3)
    assert json.loads((wide / "unet" / "config.json").read_text())["cross_attention_dim"] == 128
    with pytest.raises(ValueError, match="init_keep"):
        train(tmp_path / "f", replace(cfg, init_from=str(src), init_keep="unet"), progress=_quiet)


@pytest.mark.slow
def test_a_v_prediction_unet_on_a_zero_terminal_snr_schedule(tmp_path, monkeypatch):
    """--prediction v_prediction --zero-terminal-snr: the UNet learns v, the pipeline ships the rescaled schedule
    with trailing timesteps (so sampling starts at pure noise), and generating from it gives finite images."""
    from dataclasses import replace

    from attacks.generate import generate
    from ldu import load_backbone
    from ldu.pocket import train as pocket_train

    targets = []
    real = pocket_train.diffusion_target
    monkeypatch.setattr(pocket_train, "diffusion_target", lambda kind, *a: targets.append(kind) or real(kind, *a))
    cfg = pocket_train.Config(vae_steps=2, unet_steps=2, decoder_steps=0, dataset=64, vae_batch=4, unet_batch=4,
                              prediction_type="v_prediction", zero_terminal_snr=True)
    folder = pocket_train.train(tmp_path / "v", cfg, progress=_quiet)
    assert targets == ["v_prediction", "v_prediction"]
    sched = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["prediction_type"], sched["rescale_betas_zero_snr"], sched["timestep_spacing"]) == \
        ("v_prediction", True, "trailing")
    bb = load_backbone(str(folder), device="cpu", dtype=torch.float32)
    assert bb.prediction_type == "v_prediction" and bb.alphas_cumprod[-1] == 0
    images = generate(bb, None, ["a photo of a cat"], [0], steps=3)
    assert torch.isfinite(images[0]).all()
    with pytest.raises(ValueError, match="needs prediction_type 'v_prediction'"):
        pocket_train.train(tmp_path / "e", replace(cfg, prediction_type="epsilon"), progress=_quiet)
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("args, message", [
    (["--unet-channels", "48,50,96"], "multiple of 16"), (["--unet-channels", "48,96"], "three widths"),
    (["--unet-channels", "a,b,c"], "three widths"), (["--text-hidden", "130"], "multiple of 4"),
    (["--text-layers", "0"], "at least 1"), (["--text-layers", "-2"], "at least 1"),
    (["--init-keep", "vae"], "--init-keep needs --init-from"),
    (["--zero-terminal-snr"], "needs prediction_type 'v_prediction'"),
    (["--vae-encoder", "pca", "--init-from", "pocket"], "give one of them")])
def test_train_cli_refuses_bad_sizes_by_name_before_any_work(args, message, tmp_path, capsys):
    from ldu.pocket.__main__ import main

    with pytest.raises(SystemExit) as err:
        main(["train", "--out", str(tmp_path / "m"), *args])
    assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_gpu_preset_path_on_a_cpu(tmp_path):
    """The gpu preset (image pools, whole-image VAE crops, the wider text encoder) at toy sizes."""
    from dataclasses import replace

    from ldu import load_backbone
    from ldu.pocket.train import PRESETS, train

    cfg = replace(PRESETS["gpu"], vae_steps=2, unet_steps=2, decoder_steps=2, vae_batch=4, unet_batch=8, vae_pool=128,
                  decoder_pool=64, decoder_batch=4, dataset=64)
    folder = train(tmp_path / "run", cfg, progress=_quiet, device="cpu")
    assert json.loads((folder / "training.json").read_text())["config"]["vae_pool"] == 128
    bb = load_backbone(str(folder), device="cpu", dtype=torch.float32)
    assert bb.text_encoder.config.hidden_size == 128 and bb.unet.config.cross_attention_dim == 128


def test_vae_limits_separate_the_decoders_range_from_the_encoder_and_refine_one_part_alone(capsys):
    """`python -m ldu.pocket limits` (random weights: only the mechanics are tested): the latent optimised through the
    decoder reconstructs better than the encoder's and is reported with its distance; a decoder refine keeps the
    latent space exactly, an encoder refine moves it, less under a larger anchor; bad steps fail by name."""
    from ldu.pocket.__main__ import main
    from ldu.pocket.limits import limits, show

    res = limits("tiny", "decoder", steps=2, range_steps=30, log=lambda *a: None)
    d = res["decoder_range"]
    assert d["optimised_latent"]["whole"] > d["encoder"]["whole"] and d["latent_rms_moved"] > 0
    assert res["refine"]["latent_drift"] == {"subjects": 0.0, "fresh": 0.0}
    assert res["refine"]["measures"] != res["measures"]  # the decoder did train
    loose = limits("tiny", "encoder", steps=3, range_steps=1, anchor=0.0, lr=1e-3, log=lambda *a: None)["refine"]
    held = limits("tiny", "encoder", steps=3, range_steps=1, anchor=1e4, lr=1e-3, log=lambda *a: None)["refine"]
    assert 0 < held["latent_drift"]["fresh"] < loose["latent_drift"]["fresh"]
    assert "encoder refined, 3 steps" in show({**res, "refine": held})
    with pytest.raises(SystemExit) as err:
        main(["limits", "--model", "tiny", "--steps", "0"])
    assert err.value.code == 2 and "--steps must be at least 1" in capsys.readouterr().err
    # the linear bound: all 48 components of a 4x4 RGB patch give the image back; 4 lose what 48 keep
    assert res["linear"] == {}  # only when asked
    lin = limits("tiny", range_steps=1, linear=(4, 48), log=lambda *a: None)["linear"]
    assert lin[48]["held_out_photos_mean"] > 90 and lin[48]["synthetic_colour_shift_max_255"] < 1e-3, lin[48]
    assert lin[4]["held_out_photos_mean"] < 35 and "linear projection, 48 channels" in show({**res, "linear": lin})
    with pytest.raises(SystemExit) as err:
        main(["limits", "--model", "tiny", "--linear", "8,64"])
    assert err.value.code == 2 and "from 1 to 48" in capsys.readouterr().err


def test_the_clamped_loss_lets_a_saturated_colour_overshoot():
    """clamped_loss: an output past a saturated target costs nothing (it is shown clamped), one short of it costs as
    before."""
    from ldu.pocket.train import reconstruction_loss

    x = torch.ones(2, 3, 8, 8)
    x[:, 1] = -1  # magenta: two channels at the top of the range, one at the bottom
    past = (x * 1.05).requires_grad_(True)
    assert reconstruction_loss(past, x).item() > 0.05
    loss = reconstruction_loss(past, x, clamped=True)
    loss.backward()
    assert loss.item() == 0 and past.grad.abs().max().item() == 0
    short = x * 0.95
    assert reconstruction_loss(short, x, clamped=True).item() == pytest.approx(reconstruction_loss(short, x).item())


def test_the_decoder_stage_trains_with_its_own_fields_share_and_loss_options(tmp_path, monkeypatch):
    """decoder_field_fraction reaches the decoder stage (the VAE stage keeps vae_field_fraction) and clamped_loss
    both stages that train the decoder."""
    from ldu.pocket import train as t

    fields, losses = [], []
    source, loss = t.image_source, t.reconstruction_loss

    def spy_source(*a, **k):
        fields.append(k["field_fraction"])
        return source(*a, **k)

    def spy_loss(rec, x, clamped=False):
        losses.append(clamped)
        return loss(rec, x, clamped)

    monkeypatch.setattr(t, "image_source", spy_source)
    monkeypatch.setattr(t, "reconstruction_loss", spy_loss)
    cfg = t.Config(vae_steps=2, unet_steps=1, decoder_steps=2, dataset=64, vae_batch=4, unet_batch=4, decoder_batch=4,
                   decoder_field_fraction=0.5, clamped_loss=True)
    t.train(tmp_path / "d", cfg, progress=_quiet)
    assert fields == [0.15, 0.5] and losses == [True] * 4
    assert t.Config().decoder_fields == 0.15 and t.Config(decoder_field_fraction=0.0).decoder_fields == 0.0


@pytest.mark.parametrize("args, message", [
    (["--decoder-fields", "1.5"], "share from 0 to 1"),
    (["--decoder-fields", "half"], "share from 0 to 1"),
])
def test_decoder_options_are_refused_by_name(args, message, tmp_path, capsys):
    from ldu.pocket.__main__ import main

    for command in (["train", "--out", str(tmp_path / "m")], ["limits", "--model", "tiny"]):
        with pytest.raises(SystemExit) as err:
            main([*command, *args])
        assert err.value.code == 2 and message in capsys.readouterr().err


def test_a_pca_encoder_computes_the_patch_projection_exactly():
    """vae_encoder="pca": diffusers' own Encoder, wired, gives the principal-component projection of 4x4 patches as
    its latent mean (to float rounding) and the chosen log-variance; sizes it cannot wire are refused by name."""
    from dataclasses import replace

    from ldu.pocket import data
    from ldu.pocket.pca import patch_pca, project, wire_encoder
    from ldu.pocket.train import Config, build_models, build_tokenizer, to_tensor

    cfg = Config()
    vae, _, _ = build_models(cfg, build_tokenizer()[0])
    mean, comps = patch_pca(to_tensor(data.batch(0, 0, 64, photo_fraction=0.5, field_fraction=0.2)[0]), 16)
    assert torch.allclose(comps.T @ comps, torch.eye(16), atol=1e-5)
    wire_encoder(vae, mean, comps, logvar=-9.0)
    x = to_tensor(data.batch(1, 0, 8)[0])  # other images than the fit's
    with torch.no_grad():
        post = vae.encode(x).latent_dist
    ref = project(x, mean, comps)
    assert ref.shape == post.mean.shape == (8, 16, 16, 16)
    assert (post.mean - ref).abs().max() <= 1e-4 * ref.abs().max(), (post.mean - ref).abs().max()  # measured 6e-6
    assert torch.equal(post.logvar, torch.full_like(post.logvar, -9.0))
    small, _, _ = build_models(replace(cfg, vae_channels=(32, 64, 16)), build_tokenizer()[0])
    with pytest.raises(ValueError, match="room in each"):
        wire_encoder(small, mean, comps, logvar=-9.0)
    with pytest.raises(ValueError, match="vae_encoder must be"):
        Config(vae_encoder="linear")


def test_training_with_a_pca_encoder_trains_the_decoder_alone(tmp_path):
    """The VAE stage with vae_encoder="pca" keeps the wired encoder: the saved pipeline's latents are the projection
    (less the folded-in mean), its encoder's weights are the wiring's, and the decoder's have left their start."""
    from diffusers import AutoencoderKL

    from ldu.pocket import data
    from ldu.pocket.pca import project, wire_encoder
    from ldu.pocket.train import Config, build_models, build_tokenizer, fit_pca, to_tensor, train

    cfg = Config(vae_encoder="pca", pca_images=64, vae_steps=3, unet_steps=1, decoder_steps=0, dataset=64, vae_batch=4,
                 unet_batch=4)
    folder = train(tmp_path / "p", cfg, progress=_quiet)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    x = to_tensor(data.batch(1, 0, 4)[0])
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    removed = torch.tensor(json.loads((folder / "training.json").read_text())["latent_mean_removed"]).view(1, -1, 1, 1)
    ref = project(x, *fit_pca(cfg))
    assert (z + removed - ref).abs().max() <= 1e-4 * ref.abs().max()
    start, _, _ = build_models(cfg, build_tokenizer()[0])  # the same seeded start the run had
    wire_encoder(start, *fit_pca(cfg), logvar=cfg.vae_logvar_init)
    for name, p in start.encoder.state_dict().items():
        assert torch.equal(vae.encoder.state_dict()[name], p), name
    assert not all(torch.equal(vae.decoder.state_dict()[n], p) for n, p in start.decoder.state_dict().items())


def test_image_pools_do_not_depend_on_the_number_of_processes():
    from ldu.pocket.data import pool

    one, caps_one = pool(5, 8, 3, workers=1)
    two, caps_two = pool(5, 8, 3, workers=2)  # 2 spawned processes
    assert one.shape == (24, 64, 64, 3) and np.array_equal(one, two) and caps_one == caps_two


def _quiet(*args, **kwargs):
    from tqdm.auto import tqdm

    return tqdm(*args, disable=True, **kwargs)
