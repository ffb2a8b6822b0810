import shutil
import warnings

import pytest
import torch

from ldu import BackboneError, load_backbone
from ldu.backbone import BUILTIN


def test_tiny_is_a_complete_diffusers_folder(tiny):
    from diffusers import StableDiffusionPipeline

    assert tiny.kind == "tiny" and tiny.resolution == 64 and tiny.latent_shape() == (4, 16, 16)
    assert tiny.prediction_type == "epsilon"
    pipe = StableDiffusionPipeline.from_pretrained(BUILTIN["tiny"], local_files_only=True)
    out = pipe("a photo of sks person", num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)


def test_instance_token_is_a_single_known_token(tiny):
    ids = tiny.tokenizer("sks", add_special_tokens=False).input_ids
    assert len(ids) == 1 and ids[0] != tiny.tokenizer.unk_token_id


def test_encode_decode_shapes_and_dtypes(tiny):
    x = torch.rand(2, 3, 64, 64)
    z = tiny.encode(x)
    assert z.shape == (2, 4, 16, 16) and z.dtype == torch.float32
    assert tiny.decode(z).shape == x.shape


def test_unreachable_hub_id_names_the_model_and_the_alternatives():
    with pytest.raises(BackboneError) as err:
        load_backbone("nobody-here/no-such-model", device="cpu")
    msg = str(err.value)
    assert "nobody-here/no-such-model" in msg and "local" in msg and "tiny" in msg


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(BackboneError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_backbone(str(tmp_path), device="cpu")


def test_local_folder_loads(tiny):
    bb = load_backbone(str(BUILTIN["tiny"]), device="cpu")
    assert bb.kind == "sd" and bb.revision == tiny.revision


def test_a_folder_pocket_train_wrote_loads_as_pocket_and_any_other_folder_as_sd(tmp_path):
    """A retrained pocket (`python -m ldu.pocket train` writes training.json with its config beside the components)
    gets pocket's defaults (its attack, generation settings, verdict), not Stable Diffusion's."""
    from ldu.backbone import kind_of

    mine = tmp_path / "mine"
    shutil.copytree(BUILTIN["pocket"], mine)
    assert kind_of(str(mine)) == "pocket"
    bb = load_backbone(str(mine), device="cpu")
    assert bb.kind == "pocket" and "ldu.pocket train" in bb.notice and str(mine) in bb.notice
    (mine / "training.json").write_text("[1, 2]")  # not what the trainer writes
    assert kind_of(str(mine)) == "sd"
    (mine / "training.json").unlink()
    assert kind_of(str(mine)) == "sd" and load_backbone(str(mine), device="cpu").kind == "sd"


def test_no_spec_offline_falls_back_loudly(monkeypatch):
    monkeypatch.delenv("LDU_MODEL", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine that cannot reach the hub
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bb = load_backbone(None, device="cpu", dtype=torch.float32)
    assert bb.kind in ("tiny", "pocket")
    assert "FELL BACK" in bb.notice
    assert any("FELL BACK" in str(w.message) for w in caught)


def test_explicit_spec_never_falls_back(monkeypatch):
    monkeypatch.setenv("LDU_MODEL", "nobody-here/no-such-model")
    with pytest.raises(BackboneError):
        load_backbone(None, device="cpu")


def test_v_prediction_target(tiny):
    import dataclasses

    from diffusers import DDIMScheduler

    v = dataclasses.replace(tiny, scheduler=DDIMScheduler.from_config(tiny.scheduler.config, prediction_type="v_prediction"))
    z0, eps, t = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16), torch.tensor([400])
    a = tiny.alphas_cumprod[400]
    assert torch.allclose(v.target(z0, t, eps), a.sqrt() * eps - (1 - a).sqrt() * z0)
    assert torch.equal(tiny.target(z0, t, eps), eps)
