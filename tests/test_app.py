"""The placeholder app starts, and a protected image downloaded through the API is bit-identical to protect()."""

import hashlib
import socket

import pytest
import torch

from conftest import rgb


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import os

    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    import app

    app.MODELS[:] = ["tiny"]
    demo = app.build().queue()
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def test_download_is_bit_identical_to_protect(server, tmp_path, tiny):
    from gradio_client import Client, handle_file

    from ldu import load_images, protect
    from ldu.io import save_png

    src = tmp_path / "subject.png"
    rgb(70, 90, seed=11).save(src)
    client = Client(server, verbose=False)
    gallery, downloads, table, notice = client.predict([handle_file(str(src))], "tiny", "ldu", 3, 6, 5, api_name="/protect")
    assert "random weights" in notice
    got = downloads[0] if isinstance(downloads[0], str) else downloads[0]["path"]

    expected = protect(load_images([src]), tiny, params={"iterations": 3, "budget_rms": 6 / 255, "seed": 5})
    ref = save_png(expected.images[0], expected.sources[0], tmp_path / "ref.png")
    assert hashlib.sha256(open(got, "rb").read()).digest() == hashlib.sha256(ref.read_bytes()).digest()
    assert table["data"][0][0] == "subject.png"


def test_bad_upload_is_a_message_and_the_app_keeps_serving(server, tmp_path):
    from gradio_client import Client, handle_file

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    client = Client(server, verbose=False)
    with pytest.raises(Exception, match="not an image"):
        client.predict([handle_file(str(bad))], "tiny", "ldu", 1, 8, 0, api_name="/protect")
    good = tmp_path / "ok.png"
    rgb(64, 64).save(good)
    result = client.predict([handle_file(str(good))], "tiny", "ldu", 0, 8, 0, api_name="/protect")
    assert len(result[1]) == 1
