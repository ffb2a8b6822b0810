"""The app through its API (gradio_client): bit-exact downloads, Stop, two isolated sessions, bad input."""

import hashlib
import os
import threading
import time

import pytest

from conftest import rgb


def client(url):
    from gradio_client import Client

    return Client(url, verbose=False)


def protect_args(paths, iterations=3, budget=6, seed=5, advanced=""):
    from gradio_client import handle_file

    return [[handle_file(str(p)) for p in paths], "tiny", "ldu", iterations, budget, seed, advanced]


def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def expected_sha(path, tmp_path, tiny, **params):
    from ldu import load_images, protect
    from ldu.io import save_png

    r = protect(load_images([path]), tiny, params={"iterations": 3, "budget_rms": 6 / 255, "seed": 5, **params})
    return sha(save_png(r.images[0], r.sources[0], tmp_path / f"ref-{path.stem}.png"))


def test_download_is_bit_identical_to_protect(app_url, tmp_path, tiny):
    src = tmp_path / "subject.png"
    rgb(70, 90, seed=11).save(src)
    gallery, slider, diff, table, downloads, summary = client(app_url).predict(*protect_args([src]), api_name="/protect")
    assert "random weights" in summary
    pngs = [d for d in downloads if str(d).endswith(".png")]
    assert sha(pngs[0]) == expected_sha(src, tmp_path, tiny)
    assert [d for d in downloads if str(d).endswith(".json")]  # the manifest is offered too
    assert table["data"][0][0] == "subject.png" and str(table["data"][0][3]).startswith("unavailable")


def test_two_sessions_at_once_never_see_each_other(app_url, tmp_path, tiny):
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"person{i}.png")
        rgb(64, 64, seed=100 + i).save(paths[-1])
    results = {}

    def work(i):
        results[i] = client(app_url).predict(*protect_args([paths[i]]), api_name="/protect")

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for i in range(2):
        downloads = results[i][4]
        pngs = [d for d in downloads if str(d).endswith(".png")]
        assert [os.path.basename(p) for p in pngs] == [f"person{i}.png"]
        assert sha(pngs[0]) == expected_sha(paths[i], tmp_path, tiny)


def test_stop_really_stops_and_the_next_job_starts_promptly(app_url, tmp_path):
    src = tmp_path / "long.png"
    rgb(64, 64).save(src)
    c = client(app_url)
    job = c.submit(*protect_args([src], iterations=200), api_name="/protect")
    time.sleep(6)  # let it start and run a few steps
    t0 = time.time()
    c.predict(api_name="/stop")
    with pytest.raises(Exception, match="Stopped"):
        job.result(timeout=120)
    assert time.time() - t0 < 30  # 200 iterations would take minutes
    t1 = time.time()
    result = c.predict(*protect_args([src], iterations=0), api_name="/protect")
    assert result[4] and time.time() - t1 < 60


def test_bad_input_is_a_message_and_the_app_keeps_serving(app_url, tmp_path):
    from gradio_client import handle_file

    c = client(app_url)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(Exception, match="not an image"):
        c.predict(*protect_args([bad]), api_name="/protect")
    many = []
    for i in range(9):
        many.append(tmp_path / f"m{i}.png")
        rgb(32, 32, seed=i).save(many[-1])
    with pytest.raises(Exception, match="at most 8"):
        c.predict(*protect_args(many), api_name="/protect")
    good = tmp_path / "ok.png"
    rgb(64, 64).save(good)
    result = c.predict(*protect_args([good], iterations=0), api_name="/protect")
    protected = [handle_file(p) for p in result[4]]
    with pytest.raises(Exception, match="at least 1|less than minimum"):  # Gradio's slider check, or ours
        c.predict([handle_file(str(good))], protected, "tiny", "lora_dreambooth", 0, "none", 0, 1, api_name="/attack")
    with pytest.raises(Exception, match="allow-list|not in the list of choices"):
        c.predict(*[*protect_args([good])[:1], "sd15", *protect_args([good])[2:]], api_name="/protect")
    assert c.predict(*protect_args([good], iterations=0), api_name="/protect")[4]


def test_attack_tab_trains_on_clean_and_protected(app_url, tmp_path):
    from gradio_client import handle_file

    c = client(app_url)
    srcs = []
    for i in range(2):
        srcs.append(tmp_path / f"v{i}.png")
        rgb(64, 64, seed=i).save(srcs[-1])
    downloads = [handle_file(p) for p in c.predict(*protect_args(srcs, iterations=2), api_name="/protect")[4]]
    curves, gen_clean, gen_prot, table, note = c.predict([handle_file(str(p)) for p in srcs], downloads, "tiny",
                                                         "lora_dreambooth", 2, "none", 0, 2, api_name="/attack")
    assert len(gen_clean) == 2 and len(gen_prot) == 2
    assert table["data"][0][0].startswith("post_attack_loss") and "clean photos themselves" in note


def test_app_starts_fast_and_loads_no_model_until_used():
    import subprocess
    import sys
    from pathlib import Path

    code = ("import time; t = time.time(); import app; demo = app.build(); "
            "print(round(time.time() - t, 1), len(app._BACKBONES))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent, env={**os.environ, "LDU_MODELS": "tiny"})
    seconds, loaded = proc.stdout.split()[-2:]
    assert float(seconds) < 15 and loaded == "0", proc.stdout + proc.stderr


def test_out_of_gpu_memory_is_a_message_and_the_app_keeps_serving(app_url, tmp_path, monkeypatch):
    import sys

    import torch
    from gradio_client import handle_file

    import eval.compare
    import ldu.protect  # noqa: F401  (the package's `protect` attribute is the function: patch the module)

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    c = client(app_url)
    good = tmp_path / "ok.png"
    rgb(64, 64).save(good)
    downloads = [handle_file(p) for p in c.predict(*protect_args([good], iterations=0), api_name="/protect")[4]]
    monkeypatch.setattr(sys.modules["ldu.protect"], "protect", oom)  # the app runs in this process and imports it per call
    monkeypatch.setattr(eval.compare, "attack_and_compare", oom)
    with pytest.raises(Exception, match="Out of GPU memory: try fewer photos or iterations"):
        c.predict(*protect_args([good]), api_name="/protect")
    with pytest.raises(Exception, match="Out of GPU memory: try fewer steps"):
        c.predict([handle_file(str(good))], downloads, "tiny", "lora_dreambooth", 2, "none", 0, 1, api_name="/attack")
    monkeypatch.undo()
    assert c.predict(*protect_args([good], iterations=0), api_name="/protect")[4]


def test_upload_sizes_for_the_estimate_follow_the_exif_orientation(tmp_path):
    from PIL import Image

    import app
    from ldu import load_images

    turned = tmp_path / "turned.jpg"
    im = Image.new("RGB", (120, 90), (200, 100, 50))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(turned, exif=exif)
    plain = tmp_path / "plain.png"
    Image.new("RGB", (120, 90)).save(plain)
    assert app._sizes([str(turned), str(plain)]) == [(120, 90), (90, 120)]
    assert tuple(load_images([turned])[0].pixels.shape[1:]) == (120, 90)  # what protect() will see
    (tmp_path / "bad.png").write_text("not an image")
    assert app._sizes([str(plain), str(tmp_path / "bad.png")]) is None
