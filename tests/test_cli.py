import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import png
import pytest
from PIL import Image

from conftest import rgb
from ldu.cli import main

FAST = ["--model", "tiny", "--iterations", "4", "--set", "ddim_steps=1", "--quiet"]
PEAK_GB_50MP = 6.0  # docs/DESIGN.md "Memory" (measured: docs/RESULTS.md)


def run(argv, capsys):
    """In process: an uncaught exception fails the test by itself; the subprocess tests check for tracebacks."""
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def make_inputs(folder):
    folder.mkdir()
    rgb(40, 60, seed=1).save(folder / "colour.png")
    rgb(50, 50, seed=2, mode="L").save(folder / "grey.png")
    rgb(33, 47, seed=3, mode="RGBA").save(folder / "alpha.png")
    a = np.asarray(rgb(30, 30, seed=4)).astype(np.uint16) * 257
    with open(folder / "deep.png", "wb") as f:
        png.Writer(30, 30, greyscale=False, bitdepth=16).write(f, a.reshape(30, -1).tolist())
    img = rgb(20, 70, seed=5)
    exif = img.getexif()
    exif[0x0112] = 6  # rotated: a 70x20 file shown as 20x70
    img.save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    return {"colour": ("RGB", (60, 40)), "grey": ("L", (50, 50)), "alpha": ("RGBA", (47, 33)), "deep": ("RGB16", (30, 30)),
            "rotated": ("RGB", (20, 70))}


def test_round_trip_writes_lossless_pngs_with_size_mode_and_manifest(tmp_path, capsys):
    expected = make_inputs(tmp_path / "in")
    code, out, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--budget-rms", "4/255", *FAST], capsys)
    assert code == 0, err
    for name, (mode, size) in expected.items():
        path = tmp_path / "out" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if mode == "RGB16":
            w, h, _, info = png.Reader(filename=str(path)).read()
            assert (w, h, info["bitdepth"], info["planes"]) == (*size, 16, 3)
        else:
            img = Image.open(path)
            assert (img.mode, img.size) == (mode, size)
        manifest = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        assert manifest["method"] == "ldu" and manifest["params"]["budget_rms"] == pytest.approx(4 / 255)
        assert 0 < manifest["stats"]["rms"] <= 4 / 255, name  # protected for real, within budget
    assert "PSNR" in out


@pytest.mark.parametrize(
    "maker,phrase",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("not an image"), "not an image"),
        (lambda p: Image.new("RGB", (1, 1)).save(p, format="PNG"), "too small"),
    ],
)
def test_bad_input_is_one_line_and_exit_2_and_nothing_is_written(tmp_path, capsys, maker, phrase):
    (tmp_path / "in").mkdir()
    rgb(40, 40).save(tmp_path / "in" / "good.png")
    maker(tmp_path / "in" / "bad.png")
    code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bad.png" in lines[0] and phrase in lines[0]
    assert not (tmp_path / "out").exists()


def test_empty_folder(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and "no images in this folder" in err


def test_existing_outputs_are_never_lost(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rgb(40, 40).save(tmp_path / "in" / "a.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"earlier result")
    code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and "--overwrite" in err
    assert (tmp_path / "out" / "a.png").read_bytes() == b"earlier result"
    code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "in"), *FAST, "--overwrite"], capsys)
    assert code == 2 and "would overwrite an input" in err


def test_bad_parameters_fail_before_any_work(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rgb(40, 40).save(tmp_path / "in" / "a.png")
    for extra, phrase in ((["--set", "nope=1"], "no such parameter"), (["--method", "zzz"], "unknown method"),
                          (["--set", "strength=2"], "strength must be"), (["--budget-rms", "2"], "budget_rms must be")):
        code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *FAST, *extra], capsys)
        assert code == 2 and phrase in err, (extra, err)
    assert not (tmp_path / "out").exists()


def test_methods_lists_parameters_defaults_and_binding_budget(capsys):
    code, out, _ = run(["methods", "--kind", "tiny"], capsys)
    assert code == 0 and "ldu:" in out and "binding budget" in out and "8/255" in out and "iterations" in out
    code, out, _ = run(["methods", "--json"], capsys)
    ldu = next(m for m in json.loads(out) if m["name"] == "ldu")
    assert {p["name"] for p in ldu["params"]} >= {"budget_rms", "linf", "iterations", "ddim_steps", "strength", "rounds", "mode", "prompt", "seed"}


def test_existing_manifest_of_the_user_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    rgb(40, 40).save(tmp_path / "in" / "a.jpg")
    (tmp_path / "in" / "a.json").write_text("the user's own notes")
    code, _, err = run(["protect", str(tmp_path / "in" / "a.jpg"), "--out", str(tmp_path / "in"), *FAST], capsys)
    assert code == 2 and "a.json: already exists" in err
    assert (tmp_path / "in" / "a.json").read_text() == "the user's own notes"


@pytest.mark.parametrize("extra,phrase", [(["--device", "bogus"], "not a device"), (["--device", "cuda:7"], "cuda")])
def test_bad_device_is_one_line(tmp_path, capsys, extra, phrase):
    rgb(40, 40).save(tmp_path / "a.png")
    code, _, err = run(["protect", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *FAST, *extra], capsys)
    assert code == 2 and phrase in err and len(err.strip().splitlines()) == 1


def test_out_is_a_file(tmp_path, capsys):
    rgb(40, 40).save(tmp_path / "a.png")
    (tmp_path / "o").write_text("x")
    code, _, err = run(["protect", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *FAST], capsys)
    assert code == 2 and "is a file" in err


def test_bad_input_from_a_real_process_has_no_traceback(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"")
    proc = subprocess.run([sys.executable, "-m", "ldu", "protect", str(tmp_path / "bad.png"), "--out", str(tmp_path / "o"), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: {tmp_path / 'bad.png'}: empty file (0 bytes)"


@pytest.mark.slow
def test_python_dash_m_ldu_entry_point(tmp_path):
    rgb(40, 40).save(tmp_path / "a.png")
    proc = subprocess.run([sys.executable, "-m", "ldu", "protect", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *FAST],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o" / "a.png").exists() and (tmp_path / "o" / "a.json").exists()


def _noise_png(path, h, w, seed):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def test_a_full_disk_leaves_nothing_half_written_and_a_rerun_finishes_the_job(tmp_path, capsys):
    """Two photos whose PNGs are about 90 KB each, into a 200 KB filesystem (a tmpfs when we may mount one, else a
    write that fails with ENOSPC for the second photo): the first is written whole, the second not at all, no
    temporary file is left, and a rerun after space is freed writes the second without --overwrite."""
    import errno
    import os

    (tmp_path / "in").mkdir()
    _noise_png(tmp_path / "in" / "a.png", 180, 210, 1)
    _noise_png(tmp_path / "in" / "b.png", 180, 210, 2)
    out = tmp_path / "out"
    out.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(out)]).returncode == 0
    try:
        if mounted:
            code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(out), *FAST], capsys)
        else:
            import ldu.io

            real = ldu.io.write_together

            def full(files):
                if any(str(p).endswith("b.png") for p, _ in files):
                    raise OSError(errno.ENOSPC, "No space left on device")
                return real(files)

            ldu.io.write_together = full
            try:
                code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(out), *FAST], capsys)
            finally:
                ldu.io.write_together = real
        assert code == 2 and "No space left" in err and "nothing is half-written" in err
        left = sorted(p.name for p in out.iterdir())
        assert left == ["a.json", "a.png"], left  # whole or nothing, no temporary files
        first = (out / "a.png").read_bytes()
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=2m", str(out)], check=True)
        code, _, err = run(["protect", str(tmp_path / "in"), "--out", str(out), *FAST], capsys)
        assert code == 0, err
        assert "1 output(s) already hold this job's result: kept" in err
        assert sorted(p.name for p in out.iterdir()) == ["a.json", "a.png", "b.json", "b.png"]
        assert (out / "a.png").read_bytes() == first
    finally:
        if mounted:
            subprocess.run(["umount", str(out)])


def test_a_rerun_with_other_settings_is_refused_without_overwrite(tmp_path, capsys):
    rgb(40, 40).save(tmp_path / "a.png")
    args = ["protect", str(tmp_path / "a.png"), "--out", str(tmp_path / "o"), *FAST]
    assert run(args, capsys)[0] == 0
    code, _, err = run(args, capsys)  # the same job: already done
    assert code == 0 and "already hold this job's result" in err
    code, _, err = run([*args, "--seed", "9"], capsys)
    assert code == 2 and "already exists (use --overwrite" in err


def test_an_unwritable_out_is_found_before_any_work(tmp_path, capsys):
    rgb(40, 40).save(tmp_path / "a.png")
    code, _, err = run(["protect", str(tmp_path / "a.png"), "--out", "/proc/ldu-cannot-write-here", *FAST], capsys)
    assert code == 2 and "cannot write there" in err and "UNet" not in err


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")  # never beside the browser's Stop test (see there)
def test_a_50_megapixel_photo_stays_under_the_documented_memory_bound(tmp_path):
    """docs/DESIGN.md "Memory": protect() at 50 MP through the CLI, peak RSS of the process (resource module)."""
    side = 7071  # 50.0 MP
    yy, xx = np.mgrid[0:side:16, 0:side:16]
    small = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
    Image.fromarray(small).resize((side, side), Image.NEAREST).save(tmp_path / "huge.png", compress_level=1)
    code = ("import resource, sys; from ldu.cli import main; rc = main(sys.argv[1:]); "
            "print('peak_gb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "protect", str(tmp_path / "huge.png"), "--out", str(tmp_path / "o"),
                           "--model", "tiny", "--iterations", "1", "--set", "ddim_steps=1", "--quiet"],
                          capture_output=True, text=True, timeout=900, cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak = float(proc.stdout.split("peak_gb")[-1])
    assert peak < PEAK_GB_50MP, peak
    with Image.open(tmp_path / "o" / "huge.png") as im:
        assert im.size == (side, side)
