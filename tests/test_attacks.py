"""Attacks on the tiny backbone: files diffusers' loaders read back exactly, seeding, pairing, bad input."""

import json

import pytest
import torch

from attacks import Adapter, generate, post_attack_loss, train
from attacks.adapter import LORA_FILE, TI_FILE
from conftest import rgb
from ldu import make_draws
from ldu.backbone import BUILTIN

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def views():
    return [rgb(80, 64, seed=s) for s in range(4)]


def probe(backbone, prompt=PROMPT):
    z = torch.randn(1, *backbone.latent_shape(), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone.predict(z, torch.tensor([300]), backbone.encode_prompt(prompt))


def fresh_pipeline():
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(BUILTIN["tiny"], local_files_only=True)


def pipe_probe(pipe, prompt=PROMPT):
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ids = pipe.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.unet(z, torch.tensor([300]), encoder_hidden_states=pipe.text_encoder(ids)[0]).sample


def test_lora_reloads_in_diffusers_exactly_at_the_right_scale(tiny, views, tmp_path):
    base = probe(tiny)
    seen = {}

    def cb(info):
        if info["stage"] == "saved":
            seen["trained"] = probe(tiny)
        return True

    adapter = train(tiny, views, "lora_dreambooth", {"steps": 5, "rank": 4, "alpha": 8.0}, out=tmp_path / "lora", callback=cb)
    assert (tmp_path / "lora" / LORA_FILE).exists() and adapter.kind == "lora"
    assert not torch.allclose(seen["trained"], base, atol=1e-4), "training changed nothing: the test would prove nothing"
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    assert torch.allclose(pipe_probe(pipe), seen["trained"], atol=1e-5)  # alpha/rank = 2 honoured on reload
    assert torch.equal(probe(tiny), base)  # the shared backbone is left as it was
    assert not getattr(tiny.unet, "peft_config", {})
    assert not any("base_layer" in k or "lora" in k for k in tiny.unet.state_dict())  # no peft wrappers left behind
    generate(tiny, adapter, [PROMPT], [0], steps=1)  # applying it (diffusers' loader) also leaves nothing behind
    assert not any("base_layer" in k or "lora" in k for k in tiny.unet.state_dict())


def test_textual_inversion_embedding_reloads_exactly(tiny, views, tmp_path):
    seen = {}
    vocab = len(tiny.tokenizer)
    adapter = train(tiny, views, "textual_inversion", {"steps": 4}, out=tmp_path / "ti",
                    callback=lambda i: seen.update(i) or True)
    assert (tmp_path / "ti" / TI_FILE).exists() and adapter.token == "<sks>"
    pipe = fresh_pipeline()
    pipe.load_textual_inversion(str(tmp_path / "ti"), token="<sks>")
    row = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("<sks>")]
    init = pipe.text_encoder.get_input_embeddings().weight[pipe.tokenizer.convert_tokens_to_ids("person</w>")]
    assert torch.allclose(row, seen["embedding"][0], atol=0)
    assert not torch.allclose(row, init), "the embedding did not move from its initializer"
    assert len(tiny.tokenizer) == vocab  # the shared tokenizer is untouched


def test_dreambooth_saves_a_unet_that_reloads_exactly(tiny, views, tmp_path):
    from diffusers import UNet2DConditionModel

    seen = {}
    base = probe(tiny)
    train(tiny, views, "dreambooth", {"steps": 2, "lr": 1e-3}, out=tmp_path / "db",
          callback=lambda i: (seen.update(trained=probe(tiny)) if i["stage"] == "saved" else None) or True)
    unet = UNet2DConditionModel.from_pretrained(tmp_path / "db" / "unet")
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = unet(z, torch.tensor([300]), encoder_hidden_states=tiny.encode_prompt(PROMPT)).sample
    assert torch.allclose(out, seen["trained"], atol=1e-5) and not torch.allclose(out, base, atol=1e-4)
    assert torch.equal(probe(tiny), base)


def test_same_seed_same_curve_and_record_round_trip(tiny, views, tmp_path):
    a = train(tiny, views, "lora_dreambooth", {"steps": 4, "seed": 1}, out=tmp_path / "a")
    b = train(tiny, views, "lora_dreambooth", {"steps": 4, "seed": 1}, out=tmp_path / "b")
    c = train(tiny, views, "lora_dreambooth", {"steps": 4, "seed": 2}, out=tmp_path / "c")
    assert a.train_curve == b.train_curve and len(a.train_curve) == 4
    assert a.train_curve != c.train_curve
    again = Adapter.load(tmp_path / "a")
    assert again.train_curve == a.train_curve and again.prompt == PROMPT and again.base_spec == "tiny"
    assert json.loads((tmp_path / "a" / "adapter.json").read_text())["params"]["steps"] == 4


def test_generation_is_paired_by_seed(tiny, views, tmp_path):
    adapter = train(tiny, views, "lora_dreambooth", {"steps": 3, "lr": 1e-2}, out=tmp_path / "g")
    one = generate(tiny, adapter, [PROMPT] * 2, [5, 6], steps=3)
    two = generate(tiny, adapter, [PROMPT] * 2, [5, 6], steps=3)
    base = generate(tiny, None, [PROMPT] * 2, [5, 6], steps=3)
    assert all(torch.equal(x, y) for x, y in zip(one, two))
    assert not torch.equal(one[0], one[1])  # different seeds, different images
    assert not torch.equal(one[0], base[0])  # the adapter is really applied
    assert one[0].shape == (3, 64, 64) and 0 <= one[0].min() and one[0].max() <= 1


def test_post_attack_loss_falls_on_what_the_attack_learned(tiny, views, tmp_path):
    draws = make_draws(8, 2, tiny.latent_shape(), tiny.num_train_timesteps, seed=0)
    adapter = train(tiny, views, "lora_dreambooth", {"steps": 30, "lr": 3e-3}, out=tmp_path / "p")
    before = float(post_attack_loss(tiny, None, views[:2], draws, prompt=PROMPT))
    after = float(post_attack_loss(tiny, adapter, views[:2], draws))
    assert after < before, (before, after)


@pytest.mark.parametrize("attack,params,phrase", [
    ("nope", {}, "unknown attack"),
    ("lora_dreambooth", {"steps": 0}, "steps must be 1 to"),
    ("lora_dreambooth", {"lr": float("nan")}, "lr must be a finite number"),
    ("lora_dreambooth", {"instance_prompt": "a photo of a person"}, "does not contain the token"),
    ("textual_inversion", {"instance_prompt": "a photo of a thing"}, "does not contain the token"),
    ("textual_inversion", {"token": "person", "instance_prompt": "a photo of a person"}, "already in the vocabulary"),
    ("lora_dreambooth", {"stepz": 3}, "has no parameter stepz"),
    ("custom_diffusion", {"train_unet": "attn"}, "train_unet must be one of all, cross_kv"),
    ("dreambooth", {"snr_gamma": 0}, "snr_gamma must be a positive number"),
    ("lora_dreambooth", {"snr_gamma": float("inf")}, "snr_gamma must be a positive number"),
    ("dreambooth", {"lr_scheduler": "cosine_annealing"}, "lr_scheduler must be one of constant, "),
    ("lora_dreambooth", {"lr_warmup_steps": 2}, "needs a schedule with a warmup"),
    ("dreambooth", {"steps": 3, "lr_scheduler": "linear", "lr_warmup_steps": 4}, "lr_warmup_steps must be between 0"),
])
def test_bad_input_fails_before_training_and_leaves_nothing(tiny, views, tmp_path, attack, params, phrase):
    with pytest.raises(ValueError, match=phrase):
        train(tiny, views, attack, params, out=tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]


def test_non_image_in_the_folder_and_empty_folder(tiny, tmp_path):
    from ldu import ImageLoadError

    (tmp_path / "imgs").mkdir()
    rgb(64, 64).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.png").write_text("not a picture")
    with pytest.raises(ImageLoadError, match="b.png: not an image"):
        train(tiny, [tmp_path / "imgs"], "lora_dreambooth", out=tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageLoadError, match="no images"):
        train(tiny, [tmp_path / "empty"], "lora_dreambooth", out=tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_cancel_leaves_no_result_and_restores_the_backbone(tiny, views, tmp_path):
    from ldu import Cancelled

    base = probe(tiny)
    with pytest.raises(Cancelled):
        train(tiny, views, "lora_dreambooth", {"steps": 10}, out=tmp_path / "c", callback=lambda i: i.get("step", 0) < 3)
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())
    assert torch.equal(probe(tiny), base) and not getattr(tiny.unet, "peft_config", {})


def test_existing_adapter_folder_is_not_replaced_silently(tiny, views, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        train(tiny, views, "lora_dreambooth", {"steps": 1}, out=tmp_path / "x")
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"


def test_a_prompt_the_kind_defaults_set_is_not_replaced_by_the_subject_noun():
    """pocket's DreamBooth names its own prior captions: aiming it at a subject sets the instance prompt and keeps
    them (the noun's "a photo of a robot" would undo the kind's choice); elsewhere the noun's class prompt stays, and
    a caller's own value always wins. The experiment (app, CLI, grid) aims through the same function."""
    from types import SimpleNamespace

    from attacks.dreambooth import POCKET_PRIOR
    from attacks.train import aimed, get_attack
    from eval.experiment import attack_params

    db = get_attack("dreambooth")
    on_pocket = db.make_params("pocket", **aimed("dreambooth", "robot", {"seed": 1}, kind="pocket"))
    assert on_pocket.class_prompt == POCKET_PRIOR and on_pocket.prior_preservation
    assert on_pocket.instance_prompt == "a photo of sks robot" and on_pocket.seed == 1
    assert aimed("dreambooth", "robot", kind="sd")["class_prompt"] == "a photo of a robot"
    assert aimed("lora_dreambooth", "robot", kind="pocket")["class_prompt"] == "a photo of a robot"
    assert aimed("dreambooth", "robot", {"class_prompt": "a cat"}, kind="pocket")["class_prompt"] == "a cat"
    setup = SimpleNamespace(attack="dreambooth", noun="robot", seed=2, attack_params={})
    assert "class_prompt" not in attack_params(SimpleNamespace(kind="pocket"), setup)
    assert attack_params(SimpleNamespace(kind="sd"), setup)["class_prompt"] == "a photo of a robot"


def test_prior_preservation_generates_and_caches_class_images(tiny, views, tmp_path, monkeypatch):
    import importlib

    gen = importlib.import_module("attacks.generate")  # the module (the package re-exports a function of that name)
    calls = []
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    params = {"steps": 2, "prior_preservation": True, "num_class_images": 2, "class_dir": str(tmp_path / "cls")}
    a = train(tiny, views, "lora_dreambooth", params, out=tmp_path / "a")
    assert len(sorted((tmp_path / "cls").rglob("class_*.png"))) == 2 and len(calls) == 1
    b = train(tiny, views, "lora_dreambooth", params, out=tmp_path / "b")
    assert len(calls) == 1  # the second run read the cache instead of generating
    assert a.train_curve == b.train_curve
    c = train(tiny, views, "lora_dreambooth", {**params, "prior_loss_weight": 0.0}, out=tmp_path / "c")
    assert c.train_curve != a.train_curve  # the class loss is part of the objective


def test_several_class_prompts_take_turns_and_each_image_keeps_its_prompt(tiny, views, monkeypatch):
    import importlib

    from attacks.data import DreamBoothBatches, instance_views
    from attacks.generate import class_prompts
    from attacks.lora_dreambooth import LoRAParams

    assert class_prompts("a photo of a dog; a red circle", 5) == ["a photo of a dog", "a red circle"] * 2 + ["a photo of a dog"]
    assert class_prompts("a photo of a dog", 3) == ["a photo of a dog"] * 3
    assert class_prompts('""; a photo of a dog', 3) == ["", "a photo of a dog", ""]  # "" is the empty caption
    with pytest.raises(ValueError, match="empty prompt"):
        LoRAParams(prior_preservation=True, class_prompt="a photo of a dog;;a cat")
    gen = importlib.import_module("attacks.generate")
    drawn = {}  # each class image's prompt, by seed: the image the batches pair with a prompt is the one drawn for it
    real = gen.generate
    monkeypatch.setattr(gen, "generate", lambda b, a, prompts, seeds, **k: drawn.update(zip(seeds, prompts)) or real(b, a, prompts, seeds, **k))
    p = LoRAParams(prior_preservation=True, class_prompt="a photo of a dog;a photo of a cat", num_class_images=4,
                   batch_size=2, seed=10)
    batches = DreamBoothBatches(tiny, instance_views(views, tiny.resolution), p, torch.Generator().manual_seed(0))
    assert sorted(drawn.items()) == [(10, "a photo of a dog"), (11, "a photo of a cat"), (12, "a photo of a dog"), (13, "a photo of a cat")]
    taken, take = [], batches.cls_order.next  # which class images each step takes
    batches.cls_order.next = lambda b: taken.append(take(b)) or taken[-1]
    for _ in range(3):
        _, prompts, _ = batches()
        assert prompts[:2] == [p.instance_prompt] * 2
        assert prompts[2:] == [drawn[10 + i] for i in taken[-1].tolist()]


def test_text_encoder_lora_reloads_exactly(tiny, views, tmp_path):
    seen = {}

    def cb(info):
        if info["stage"] == "saved":
            seen["cond"] = tiny.encode_prompt(PROMPT)
            seen["unet"] = probe(tiny)
        return True

    base_cond = tiny.encode_prompt(PROMPT)
    train(tiny, views, "lora_dreambooth", {"steps": 4, "train_text_encoder": True, "lr": 1e-2}, out=tmp_path / "te", callback=cb)
    assert not torch.allclose(seen["cond"], base_cond, atol=1e-4), "the text-encoder LoRA did not train"
    pipe = fresh_pipeline()
    pipe.load_lora_weights(str(tmp_path / "te"))
    ids = pipe.tokenizer(PROMPT, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(pipe.text_encoder(ids)[0], seen["cond"], atol=1e-5)
    assert torch.allclose(pipe_probe(pipe), seen["unet"], atol=1e-5)
    assert torch.equal(tiny.encode_prompt(PROMPT), base_cond)
    assert not any("lora" in k or "base_layer" in k for k in tiny.text_encoder.state_dict())


def test_a_failed_lora_load_leaves_no_peft_layers_behind(tiny, views, tmp_path):
    from safetensors.torch import load_file, save_file

    adapter = train(tiny, views, "lora_dreambooth", {"steps": 1}, out=tmp_path / "bad")
    weights = load_file(tmp_path / "bad" / LORA_FILE)
    key = sorted(k for k in weights if "lora.down" in k or "lora_A" in k)[-1]
    weights[key] = torch.zeros(weights[key].shape[0] + 3, weights[key].shape[1])  # a LoRA for another architecture
    save_file(weights, tmp_path / "bad" / LORA_FILE)
    with pytest.raises(Exception):
        generate(tiny, adapter, [PROMPT], [0], steps=1)
    assert not any("base_layer" in k or "lora" in k for k in tiny.unet.state_dict())


@pytest.mark.parametrize("attack,params", [("textual_inversion", {"steps": 3}), ("dreambooth", {"steps": 2, "lr": 1e-3}),
                                           ("custom_diffusion", {"steps": 2})])
def test_ti_dreambooth_and_custom_diffusion_are_seeded_applied_and_leave_the_backbone_alone(tiny, views, tmp_path, attack, params):
    base = probe(tiny)
    state = torch.random.get_rng_state()
    a = train(tiny, views, attack, params, out=tmp_path / "a")
    b = train(tiny, views, attack, params, out=tmp_path / "b")
    assert a.train_curve == b.train_curve
    draws = make_draws(2, 2, tiny.latent_shape(), tiny.num_train_timesteps, seed=0)
    assert float(post_attack_loss(tiny, a, views[:2], draws)) != float(post_attack_loss(tiny, None, views[:2], draws, prompt=a.prompt))
    assert not torch.equal(generate(tiny, a, [a.prompt], [0], steps=2)[0], generate(tiny, None, [a.prompt], [0], steps=2)[0])
    assert torch.equal(probe(tiny), base)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing drew from the global RNG


@pytest.mark.parametrize("attack,trained", [("custom_diffusion", lambda k: ".attn2.to_k." in k or ".attn2.to_v." in k),
                                            ("dreambooth", lambda k: True)])
def test_each_dreambooth_loop_trains_only_its_unet_weights(tiny, views, tmp_path, attack, trained):
    from safetensors.torch import load_file

    train(tiny, views, attack, {"steps": 2, "lr": 1e-2}, out=tmp_path / "a")
    saved = load_file(tmp_path / "a" / "unet" / "diffusion_pytorch_model.safetensors")
    base = tiny.unet.state_dict()
    changed = {k for k, v in saved.items() if not torch.equal(v, base[k].float())}
    assert changed == {k for k in saved if trained(k)}
    assert len(changed) >= 2


@pytest.mark.parametrize("attack", ["textual_inversion", "dreambooth"])
def test_cancel_other_attacks(tiny, views, tmp_path, attack):
    from ldu import Cancelled

    with pytest.raises(Cancelled):
        train(tiny, views, attack, {"steps": 5}, out=tmp_path / "c", callback=lambda i: i.get("step", 0) < 2)
    assert not list(tmp_path.iterdir())


def test_dreambooth_on_a_bf16_backbone_keeps_small_updates(views, tmp_path):
    from diffusers import UNet2DConditionModel

    from ldu import load_backbone

    bf16 = load_backbone("tiny", device="cpu", dtype=torch.bfloat16)
    lr, steps = 1e-5, 2
    train(bf16, views, "dreambooth", {"steps": steps, "lr": lr, "weight_decay": 0.0}, out=tmp_path / "db")
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "db" / "unet")
    base = UNet2DConditionModel.from_pretrained(BUILTIN["tiny"], subfolder="unet")
    w, w0 = saved.conv_in.weight.detach(), base.conv_in.weight.detach()
    assert w.dtype == torch.float32
    # Adam moves each weight by at most ~lr per step: bf16 rounding (~0.4 % of a weight) would show up far above that
    assert float((w - w0).abs().max()) <= 1.1 * steps * lr
    assert float((w - w0).abs().max()) > 0


def test_token_next_to_punctuation_is_accepted(tiny, views, tmp_path):
    a = train(tiny, views, "lora_dreambooth", {"steps": 1, "instance_prompt": "a photo of sks."}, out=tmp_path / "p")
    assert a.prompt == "a photo of sks."


def test_min_snr_weights_each_sample_by_its_timestep(tiny, views, tmp_path, monkeypatch):
    """snr_gamma: each sample's loss times min(SNR, gamma) / SNR (epsilon) or / (SNR + 1) (v), SNR = a / (1 - a):
    the step's loss is the weighted mean of the very losses an unweighted step computes from the same draws, and the
    option reaches every step of the attacks that take it."""
    from types import SimpleNamespace

    import attacks.data
    from ldu.finetune import min_snr_weights, train_step
    from ldu.losses import diffusion_loss

    a = tiny.alphas_cumprod.double()
    t = torch.tensor([0, 200, 999])
    snr = a[t] / (1 - a[t])
    assert torch.allclose(min_snr_weights(tiny, t, 5.0).double(), snr.clamp(max=5) / snr, rtol=1e-5)
    assert min_snr_weights(tiny, t, 5.0)[-1] == 1 and min_snr_weights(tiny, t, 5.0)[0] < 0.01
    v = SimpleNamespace(scheduler=tiny.scheduler, prediction_type="v_prediction")
    assert torch.allclose(min_snr_weights(v, t, 5.0).double(), snr.clamp(max=5) / (snr + 1), rtol=1e-5)
    from diffusers import DDIMScheduler  # a zero-terminal-SNR schedule: SNR 0 at t = 999, weight 1 there (not 0/0)
    zero = SimpleNamespace(scheduler=DDIMScheduler(rescale_betas_zero_snr=True), prediction_type="epsilon")
    assert min_snr_weights(zero, t, 5.0)[-1] == 1 and torch.isfinite(min_snr_weights(zero, t, 5.0)).all()
    zero.prediction_type = "v_prediction"
    assert min_snr_weights(zero, t, 5.0)[-1] == 0

    z = torch.randn(3, *tiny.latent_shape(), generator=torch.Generator().manual_seed(1))
    cond = tiny.encode_prompt(PROMPT).expand(3, -1, -1)
    w = torch.nn.Parameter(torch.zeros(1))  # a parameter outside the model (lr 0): the UNet is left as it is
    opt = torch.optim.SGD([w], lr=0.0)
    plain = train_step(tiny, [w], opt, z + 0 * w, cond, torch.Generator().manual_seed(7))
    weighted = train_step(tiny, [w], opt, z + 0 * w, cond, torch.Generator().manual_seed(7), snr_gamma=1.0)
    draws = make_draws(1, 3, tuple(z.shape[1:]), tiny.num_train_timesteps, generator=torch.Generator().manual_seed(7))
    per = diffusion_loss(tiny, z, cond, draws, reduction="none")
    assert abs(plain - float(per.mean())) < 1e-6
    assert abs(weighted - float((per * min_snr_weights(tiny, draws.t[0], 1.0)).mean())) < 1e-6, (weighted, per)

    seen, real = [], attacks.data.train_step
    monkeypatch.setattr(attacks.data, "train_step", lambda *args, **kw: seen.append(args[-1]) or real(*args, **kw))
    for attack in ("dreambooth", "lora_dreambooth"):
        train(tiny, views, attack, {"steps": 2, "snr_gamma": 2.5}, out=tmp_path / attack)
    assert seen == [2.5] * 4, seen


def test_lr_schedule_sets_each_steps_learning_rate(tiny, views, tmp_path, monkeypatch):
    """lr_scheduler / lr_warmup_steps: each optimiser step runs at diffusers' scheduled rate (linear with 2 warmup
    steps over 4: 0, 1/2, 1, 1/2 of lr); the default keeps lr constant."""
    seen, real = [], torch.optim.AdamW.step

    def spy(self, *args, **kw):
        seen.append(self.param_groups[0]["lr"])
        return real(self, *args, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    for attack in ("dreambooth", "lora_dreambooth"):
        seen.clear()
        train(tiny, views, attack, {"steps": 4, "lr": 1e-3, "lr_scheduler": "linear", "lr_warmup_steps": 2},
              out=tmp_path / attack)
        assert seen == pytest.approx([0.0, 5e-4, 1e-3, 5e-4]), (attack, seen)
    seen.clear()
    train(tiny, views, "dreambooth", {"steps": 3, "lr": 1e-3}, out=tmp_path / "constant")
    assert seen == pytest.approx([1e-3] * 3), seen


def test_attacks_step_a_fused_adamw_that_takes_the_loops_steps(tiny, views, tmp_path, monkeypatch):
    """ldu.finetune.adamw: the attacks' optimiser is torch's fused AdamW on a CPU (the per-tensor loop was a third of
    a pocket DreamBooth step), and its updates are the loop's, groups and weight decay included, up to rounding."""
    from ldu.finetune import adamw

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.GroupNorm(2, 8), torch.nn.Conv2d(8, 4, 1)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    start = nets[0][0].weight.detach().clone()
    groups = [[{"params": list(n[0].parameters()), "lr": 1e-2}, {"params": list(n[1:].parameters()), "lr": 3e-3}] for n in nets]
    opts = [torch.optim.AdamW(groups[0], weight_decay=1e-2, foreach=False), adamw(groups[1], weight_decay=1e-2)]
    assert not opts[0].defaults["fused"] and opts[1].defaults["fused"]
    x = torch.randn(2, 3, 9, 9)
    for _ in range(5):
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a - b).abs().max()
    assert (nets[1][0].weight - start).abs().max() > 1e-2  # they moved: the comparison is not of untouched weights

    fused, real = [], torch.optim.AdamW.step
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **kw: fused.append(self.defaults["fused"]) or real(self, *a, **kw))
    for attack in ("dreambooth", "lora_dreambooth", "textual_inversion"):
        train(tiny, views, attack, {"steps": 1}, out=tmp_path / attack)
    assert fused == [True] * 3, fused
