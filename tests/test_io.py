import io
import struct
import zlib

import numpy as np
import png
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from conftest import rgb
from ldu.io import ImageLoadError, load_image, load_images, save_png


def roundtrip(path, tmp_path):
    loaded = load_image(path)
    out = save_png(loaded.pixels, loaded, tmp_path / "out.png", {"test": True})
    return loaded, out


def problem_of(path, **kw):
    with pytest.raises(ImageLoadError) as err:
        load_images([path], **kw)
    ((name, problem),) = err.value.problems
    assert name == str(path)
    assert "\n" not in str(err.value)  # one line per file
    return problem


# ---- bad input: one clear line naming the file and the problem -------------------------------------
def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty file" in problem_of(tmp_path / "empty.png")


def test_non_image(tmp_path):
    (tmp_path / "notes.png").write_text("hello, not a picture")
    assert "not an image" in problem_of(tmp_path / "notes.png")


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    rgb(64, 64).save(buf, format="PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert "truncated" in problem_of(tmp_path / "cut.png")


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    assert "too small (1x1)" in problem_of(tmp_path / "dot.png")


def png_header_only(w, h):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_decompression_bomb_over_our_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(png_header_only(9000, 9000))  # 81 MP claimed by a 60-byte file
    assert "decompression" in problem_of(tmp_path / "big.png")


def test_decompression_bomb_over_pillows_limit(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_header_only(100_000, 100_000))
    assert "decompression bomb" in problem_of(tmp_path / "bomb.png")


def test_pixel_limit_is_configurable(tmp_path):
    rgb(64, 64).save(tmp_path / "a.png")
    assert "over the limit" in problem_of(tmp_path / "a.png", max_pixels=1000)


def test_empty_folder(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    assert "no images in this folder" in problem_of(tmp_path)


def test_every_bad_file_is_reported_not_just_the_first(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.png").write_text("text")
    rgb(32, 32).save(tmp_path / "c.png")
    with pytest.raises(ImageLoadError) as err:
        load_images([tmp_path])
    assert [p for p, _ in err.value.problems] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_folder_skips_non_images_by_suffix(tmp_path):
    rgb(32, 32).save(tmp_path / "a.png")
    (tmp_path / "a.json").write_text("{}")
    assert [im.name for im in load_images([tmp_path])] == [str(tmp_path / "a.png")]


# ---- accepted but unusual inputs: loaded, and written back in their own layout ---------------------
def test_rgb_roundtrip_is_bit_exact_and_keeps_icc(tmp_path):
    img = rgb(37, 53)
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    img.save(tmp_path / "a.png", icc_profile=icc)
    loaded, out = roundtrip(tmp_path / "a.png", tmp_path)
    back = Image.open(out)
    assert back.mode == "RGB" and back.size == (53, 37)
    assert np.array_equal(np.asarray(back), np.asarray(img))
    assert back.info.get("icc_profile") == icc
    assert (tmp_path / "out.json").exists()


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L"])
def test_alpha_and_grey_are_restored(tmp_path, mode):
    img = rgb(40, 30, mode="RGBA")
    a = np.asarray(img).copy()
    a[..., 3] = np.linspace(0, 255, 30, dtype=np.uint8)[None, :]
    img = Image.fromarray(a).convert(mode)
    img.save(tmp_path / "a.png")
    loaded, out = roundtrip(tmp_path / "a.png", tmp_path)
    back = Image.open(out)
    assert back.mode == mode
    assert np.array_equal(np.asarray(back), np.asarray(img))
    assert loaded.gray == (mode in ("L", "LA"))


def test_palette_with_transparency_becomes_rgba(tmp_path):
    img = rgb(32, 32).quantize(16)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    loaded, out = roundtrip(tmp_path / "p.png", tmp_path)
    assert Image.open(out).mode == "RGBA"
    assert any("palette" in n for n in loaded.notes)
    expected = np.asarray(Image.open(tmp_path / "p.png").convert("RGBA"))
    assert np.array_equal(np.asarray(Image.open(out)), expected)


def test_cmyk_jpeg_is_converted_with_a_note(tmp_path):
    rgb(32, 32).convert("CMYK").save(tmp_path / "c.jpg", quality=95)
    loaded, out = roundtrip(tmp_path / "c.jpg", tmp_path)
    assert Image.open(out).mode == "RGB"
    assert any("CMYK" in n for n in loaded.notes)


@pytest.mark.parametrize("alpha", [False, True])
def test_16_bit_colour_png_keeps_all_16_bits(tmp_path, alpha):
    planes = 4 if alpha else 3
    a = (np.random.default_rng(0).random((20, 24, planes)) * 65535).astype(np.uint16)
    with open(tmp_path / "d.png", "wb") as f:
        png.Writer(24, 20, greyscale=False, alpha=alpha, bitdepth=16).write(f, a.reshape(20, -1).tolist())
    loaded, out = roundtrip(tmp_path / "d.png", tmp_path)
    assert loaded.bit_depth == 16
    w, h, rows, info = png.Reader(filename=str(out)).asDirect()
    assert info["bitdepth"] == 16 and info["alpha"] == alpha
    assert np.array_equal(np.vstack([np.asarray(r, np.uint16) for r in rows]).reshape(h, w, planes), a)


def test_16_bit_grey_png(tmp_path):
    a = (np.random.default_rng(1).random((20, 20)) * 65535).astype(np.uint16)
    Image.fromarray(a).save(tmp_path / "g.png")
    loaded, out = roundtrip(tmp_path / "g.png", tmp_path)
    assert loaded.bit_depth == 16 and loaded.gray
    assert np.array_equal(np.asarray(Image.open(out)), a)


def test_animated_gif_uses_first_frame_with_a_note(tmp_path):
    frames = [rgb(32, 32, seed=s).quantize(64) for s in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    loaded = load_image(tmp_path / "anim.gif")
    assert any("3 frames" in n for n in loaded.notes)
    first = np.asarray(Image.open(tmp_path / "anim.gif").convert("RGB"))
    assert np.array_equal((loaded.pixels * 255).round().byte().permute(1, 2, 0).numpy(), first)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path, orientation):
    img = rgb(24, 40)
    exif = img.getexif()
    exif[0x0112] = orientation
    img.save(tmp_path / "o.png", exif=exif.tobytes())
    loaded, out = roundtrip(tmp_path / "o.png", tmp_path)
    expected = ImageOps.exif_transpose(Image.open(tmp_path / "o.png")).convert("RGB")
    back = Image.open(out)
    assert back.size == expected.size
    assert np.array_equal(np.asarray(back), np.asarray(expected))
    assert back.getexif().get(0x0112, 1) == 1  # not rotated twice by a viewer


def test_gps_is_dropped_and_other_exif_kept(tmp_path):
    img = rgb(32, 32)
    exif = img.getexif()
    exif[0x010F] = "CameraMaker"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 24.0)  # GPSLatitude
    img.save(tmp_path / "g.jpg", exif=exif.tobytes(), quality=95)
    loaded, out = roundtrip(tmp_path / "g.jpg", tmp_path)
    back = Image.open(out).getexif()
    assert back.get(0x010F) == "CameraMaker"
    assert 0x8825 not in back and not back.get_ifd(0x8825)
    assert any("GPS" in n for n in loaded.notes)


def test_save_refuses_lossy_suffix(tmp_path):
    loaded = load_images([rgb(32, 32)])[0]
    with pytest.raises(ValueError, match="png only"):
        save_png(loaded.pixels, loaded, tmp_path / "x.jpg")


def test_save_is_atomic_no_temp_files_left(tmp_path):
    loaded = load_images([rgb(32, 32)])[0]
    save_png(loaded.pixels, loaded, tmp_path / "x.png", {"a": torch.tensor([1.0])})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.json", "x.png"]


def test_cmyk_with_a_corrupt_icc_profile_loads_with_a_note(tmp_path):
    rgb(32, 32).convert("CMYK").save(tmp_path / "c.jpg", quality=95, icc_profile=b"not a real profile")
    loaded = load_image(tmp_path / "c.jpg")
    assert any("ICC profile is unreadable" in n for n in loaded.notes)


def test_16_bit_png_cut_before_its_end_is_a_clear_error(tmp_path):
    a = (np.random.default_rng(0).random((20, 24, 3)) * 65535).astype(np.uint16)
    buf = io.BytesIO()
    png.Writer(24, 20, greyscale=False, bitdepth=16).write(buf, a.reshape(20, -1).tolist())
    (tmp_path / "d.png").write_bytes(buf.getvalue()[:-12])  # no IEND chunk
    assert "corrupt" in problem_of(tmp_path / "d.png") or "truncated" in problem_of(tmp_path / "d.png")


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_colour_key_transparency_becomes_alpha(tmp_path, mode):
    img = rgb(32, 32, mode=mode)
    key = (0, 0, 0) if mode == "RGB" else 0
    img.save(tmp_path / "k.png", transparency=key)
    loaded, out = roundtrip(tmp_path / "k.png", tmp_path)
    assert Image.open(out).mode == mode + "A"
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "k.png").convert(mode + "A")))
