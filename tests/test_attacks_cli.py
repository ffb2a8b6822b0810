import json

from attacks.cli import main
from conftest import rgb

TINY = ["--model", "tiny", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_generate_purify_round_trip(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    for s in range(3):
        rgb(72, 64, seed=s).save(tmp_path / "imgs" / f"v{s}.png")
    code, out, err = run(["train", "--attack", "lora_dreambooth", "--images", str(tmp_path / "imgs"), "--out",
                          str(tmp_path / "lora"), "--steps", "3", *TINY], capsys)
    assert code == 0, err
    record = json.loads((tmp_path / "lora" / "adapter.json").read_text())
    assert record["kind"] == "lora" and len(record["train_curve"]) == 3
    code, out, err = run(["generate", "--adapter", str(tmp_path / "lora"), "--out", str(tmp_path / "gen"), "--n", "2",
                          "--steps", "2", "--quiet"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "gen").iterdir()) == ["00_seed0.png", "00_seed1.png"]
    code, out, err = run(["purify", str(tmp_path / "imgs"), "--method", "jpeg", "--set", "quality=40", "--out",
                          str(tmp_path / "pur")], capsys)
    assert code == 0, err
    assert (tmp_path / "pur" / "v0.png").exists() and json.loads((tmp_path / "pur" / "v0.json").read_text())["params"]["quality"] == 40


def test_bad_inputs_are_one_line_before_any_training(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    rgb(64, 64).save(tmp_path / "imgs" / "a.png")
    (tmp_path / "imgs" / "b.png").write_text("not an image")
    cases = [
        (["--attack", "lora_dreambooth", "--images", str(tmp_path / "imgs")], "b.png: not an image"),
        (["--attack", "nope", "--images", str(tmp_path / "imgs" / "a.png")], "unknown attack"),
        (["--attack", "lora_dreambooth", "--images", str(tmp_path / "imgs" / "a.png"), "--steps", "0"], "steps must be 1 to"),
        (["--attack", "lora_dreambooth", "--images", str(tmp_path / "imgs" / "a.png"), "--set",
          "instance_prompt=a photo of a dog"], "does not contain the token"),
    ]
    for extra, phrase in cases:
        code, _, err = run(["train", *extra, "--out", str(tmp_path / "out"), *TINY], capsys)
        assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert not (tmp_path / "out").exists()


def test_unavailable_purification_is_a_clear_message(tmp_path, capsys):
    rgb(64, 64).save(tmp_path / "a.png")
    code, _, err = run(["purify", str(tmp_path / "a.png"), "--method", "noisy_upscale", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "needs an upscaler model" in err


def test_list_shows_attacks_and_purifications(capsys):
    code, out, _ = run(["list", "--kind", "tiny"], capsys)
    assert code == 0
    for name in ("lora_dreambooth", "textual_inversion", "dreambooth", "jpeg", "diffpure", "gridpure", "noisy_upscale"):
        assert f"{name}:" in out
