"""Property-based fuzzing of the one loader (and of protect() behind it): random bytes, truncations, corrupted headers
and chunks, odd modes and sizes. Every case is either a clean one-line error naming the file or a valid image;
never a traceback."""

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ldu.io import ImageLoadError, load_image, save_png

MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK", "I", "F"]
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}
FUZZ = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _encode(mode: str, fmt: str, w: int, h: int, seed: int) -> bytes | None:
    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode if mode != "I;16" else "I")
    if mode == "I;16":
        img = img.convert("I;16")
    buf = io.BytesIO()
    try:
        img.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return None  # this format cannot hold this mode: not a case
    return buf.getvalue()


@st.composite
def image_bytes(draw):
    kind = draw(st.sampled_from(["valid", "truncated", "flipped", "spliced", "random"]))
    if kind == "random":
        return draw(st.binary(min_size=0, max_size=2048)), ".png"
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(sorted(FORMATS)))
    w, h = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    data = _encode(mode, fmt, w, h, draw(st.integers(0, 2**16)))
    if data is None:
        data = _encode("RGB", "PNG", w, h, 0)
        fmt = "PNG"
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif kind == "flipped":  # corrupt header bytes or chunk bytes
        data = bytearray(data)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, min(len(data) - 1, draw(st.sampled_from([32, 128, len(data) - 1])))))
            data[i] = draw(st.integers(0, 255))
        data = bytes(data)
    elif kind == "spliced":
        i = draw(st.integers(0, len(data)))
        data = data[:i] + draw(st.binary(min_size=1, max_size=64)) + data[i:]
    return data, FORMATS[fmt]


def _check(tmp_path, data: bytes, suffix: str):
    path = tmp_path / f"case{suffix}"
    path.write_bytes(data)
    try:
        return load_image(path)
    except ImageLoadError as err:
        text = str(err)
        assert "\n" not in text and text.startswith(str(path)) and len(text) < 400, text
        return None


@FUZZ
@given(case=image_bytes())
def test_the_loader_gives_a_clean_error_or_a_valid_image(tmp_path_factory, case):
    tmp_path = tmp_path_factory.mktemp("fuzz")
    data, suffix = case
    loaded = _check(tmp_path, data, suffix)
    if loaded is not None:
        px = loaded.pixels
        assert px.ndim == 3 and px.shape[0] == 3 and min(px.shape[1:]) >= 16
        assert float(px.min()) >= 0 and float(px.max()) <= 1 and not px.isnan().any()


@settings(max_examples=20, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=image_bytes())
def test_protect_with_zero_iterations_writes_a_valid_png_or_refuses(tiny, tmp_path_factory, case):
    from ldu import protect

    tmp_path = tmp_path_factory.mktemp("fuzzp")
    loaded = _check(tmp_path, *case)
    if loaded is None:
        return
    r = protect([loaded], tiny, method="ldu", params={"iterations": 0})
    out = save_png(r.images[0], r.sources[0], tmp_path / "out.png", r.manifest_for(0))
    with Image.open(out) as im:
        im.load()
        assert im.size == loaded.size
    assert (tmp_path / "out.json").exists()


@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_a_valid_image_of_each_mode_round_trips(tmp_path, mode):
    data = _encode(mode, "PNG", 40, 30, 1)
    loaded = _check(tmp_path, data, ".png")
    assert loaded is not None and loaded.size == (40, 30)
