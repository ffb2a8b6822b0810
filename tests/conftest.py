"""Shared fixtures. Everything runs offline on the built-in `tiny` backbone (random weights)."""

import os
import socket
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on network retries in tests
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Empty weight caches: "unavailable" metrics behave the same on every machine, whatever it has cached.
_CACHE = tempfile.mkdtemp(prefix="ldu-test-cache-")
os.environ["TORCH_HOME"] = os.path.join(_CACHE, "torch")
os.environ["HF_HOME"] = os.path.join(_CACHE, "hf")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one thread per worker (two torch jobs must not share cores),
    os.environ["OMP_NUM_THREADS"] = "1"  # also in the subprocesses the tests start

import numpy as np
import pytest
import torch
from PIL import Image

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked `pins` re-measure what docs/RESULTS.md reports about the trained pocket backbone (minutes each):
    they run with LDU_PINS=1 (after retraining pocket or changing an attack or LDU), not in every run."""
    if os.environ.get("LDU_PINS") == "1":
        return
    skip = pytest.mark.skip(reason="a pocket pin: set LDU_PINS=1 to re-measure (docs/RESULTS.md)")
    for item in items:
        if "pins" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    from ldu import load_backbone

    return load_backbone("tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="session")
def photos():
    """Three public example photos (scikit-image: astronaut (NASA, PD), chelsea and coffee (CC0))."""
    from skimage import data

    return [Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea()), Image.fromarray(data.coffee())]


def rgb(h, w, seed=0, mode="RGB"):
    """A smooth random test image (noise photos are unrealistic for a VAE, smooth ones are not)."""
    rng = np.random.default_rng(seed)
    small = rng.random((max(2, h // 8), max(2, w // 8), 3))
    img = Image.fromarray((small * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC)
    return img.convert(mode)


@pytest.fixture(scope="session")
def app_url(tmp_path_factory):
    """The Gradio app on 127.0.0.1 with the tiny backbone, launched once for the API and browser tests."""
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    os.environ["LDU_MODELS"] = "tiny"
    import app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = app.build().queue(max_size=16)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size=app.MAX_FILE_SIZE)
    yield f"http://127.0.0.1:{port}/"
    demo.close()
    os.environ.pop("LDU_MODELS", None)
