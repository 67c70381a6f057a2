"""Bad and unusual input, through every door: the HTTP API, the Gradio endpoint and the CLI.

Refused input gets a clear message (HTTP 4xx with {"error": ...}; a Gradio error; an `error:` line
on stderr) and the server keeps serving: after each case a valid request still succeeds. Unusual
but valid images (16-bit, palette, RGBA, CMYK, animated GIF, EXIF-rotated, 1x1, 16 megapixels)
are classified, and classified right. All images are generated here.
"""
from __future__ import annotations

import http.client
import io
import warnings
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from models.imageio import MAX_PIXELS

MAX_FILES = 4       # the test server's limits, small so that breaking them is cheap
MAX_FILE_MB = 0.5


# --------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def server(mnist_model):
    from serve.app import Limits, start_in_thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        srv = start_in_thread(mnist_model, device="cpu", limits=Limits(max_files=MAX_FILES, max_file_mb=MAX_FILE_MB))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def predictor(server):
    return server.app.state.predictor


@pytest.fixture(scope="module")
def gradio(server):
    from gradio_client import Client
    return Client(server.url + "/", verbose=False)


def png(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sure(mnist_arrays, predictor):
    """Digits the model reads right with > 99% confidence: (array, label), a few of them."""
    out = []
    for a, y in zip(mnist_arrays.valid_images[:200], mnist_arrays.valid_labels[:200]):
        p = predictor.predict(Image.fromarray(a))
        if p.label == str(int(y)) and p.confidences[0][1] > 0.99:
            out.append((a, p.label))
    assert len(out) >= 20
    return out


@pytest.fixture(scope="module")
def rotated_digit(sure, predictor):
    """A digit that the model reads differently when it lies on its side: stored sideways with
    EXIF orientation 6, it is read right only if the rotation is applied."""
    for a, label in sure:
        sideways = Image.fromarray(a).transpose(Image.Transpose.ROTATE_90)
        if predictor.predict(sideways).label != label:
            exif = Image.Exif()
            exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
            return jpeg(sideways, exif=exif), label
    raise AssertionError("no digit in the sample changes label when rotated")


@pytest.fixture(scope="module")
def good(sure):
    return png(Image.fromarray(sure[0][0])), sure[0][1]


def _valid_cases(sure, rotated_digit):
    (a0, l0), (a1, l1), (a2, l2), (a3, l3), (a4, l4), (a5, l5) = sure[1:7]
    sixteen = Image.fromarray((a0.astype(np.uint16) * 257), mode="I;16")
    gif = io.BytesIO()
    Image.fromarray(a5).save(gif, format="GIF", save_all=True, append_images=[Image.fromarray(sure[8][0])],
                             duration=100, loop=0)
    big = Image.fromarray(a4).resize((4000, 4000), Image.NEAREST)  # 16 MP, under the 64 MP limit
    return {
        "16-bit grey PNG": (png(sixteen), l0),
        "palette PNG": (png(Image.fromarray(a1).convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)), l1),
        "RGBA PNG": (png(Image.fromarray(a2).convert("RGBA")), l2),
        "CMYK JPEG": (jpeg(Image.fromarray(a3).convert("CMYK")), l3),
        "animated GIF (first frame)": (gif.getvalue(), l5),
        "EXIF-rotated JPEG": rotated_digit,
        "16-megapixel PNG": (png(big, optimize=False), l4),
        "1x1 image": (png(Image.new("L", (1, 1), 255)), None),
    }


@pytest.fixture(scope="module")
def valid_cases(sure, rotated_digit):
    return _valid_cases(sure, rotated_digit)


def _bad_cases(good_png: bytes):
    photo = jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)))
    bomb = png(Image.new("1", (12_000, 12_000)))              # 144 MP, a few KB on disk
    ten_k = png(Image.new("1", (10_000, 10_000)))             # 100 MP: over MAX_PIXELS, refused too
    assert len(bomb) < 100_000 and 12_000 * 12_000 > MAX_PIXELS
    return {  # name: (bytes, HTTP status, words in the message)
        "text file": (b"just some text, not a picture\n" * 3, 422, "not an image"),
        "empty file": (b"", 422, "empty file"),
        "truncated JPEG": (photo[: len(photo) // 2], 422, "truncated"),
        "truncated PNG": (good_png[:60], 422, "unreadable"),
        "decompression bomb": (bomb, 413, "too large"),
        "10,000 x 10,000 image": (ten_k, 413, "too large"),
    }


@pytest.fixture(scope="module")
def bad_cases(good):
    return _bad_cases(good[0])


def post(url, *files, **kw):
    return requests.post(url + "/v1/predict", files=[("files", (n, d, "application/octet-stream")) for n, d in files],
                         timeout=60, **kw)


def assert_still_serving(server, gradio, good, tmp_path):
    """A valid request succeeds, over HTTP and over Gradio."""
    from gradio_client import handle_file
    data, label = good
    r = post(server.url, ("ok.png", data))
    assert r.status_code == 200 and r.json()[0]["label"] == label, r.text
    path = tmp_path / "ok.png"
    path.write_bytes(data)
    assert gradio.predict(handle_file(str(path)), api_name="/predict")["label"] == label


def gradio_refusal(gradio, path) -> str:
    """Call the Gradio endpoint expecting a refusal; return the message the client received."""
    from gradio_client import handle_file
    with pytest.raises(Exception) as info:
        gradio.predict(handle_file(str(path)) if path is not None else None, api_name="/predict")
    resp = getattr(info.value, "response", None)
    return resp.text if resp is not None else str(info.value)


# --------------------------------------------------------------------------- HTTP and Gradio

BAD_NAMES = ["text file", "empty file", "truncated JPEG", "truncated PNG", "decompression bomb",
             "10,000 x 10,000 image"]
VALID_NAMES = ["16-bit grey PNG", "palette PNG", "RGBA PNG", "CMYK JPEG", "animated GIF (first frame)",
               "EXIF-rotated JPEG", "16-megapixel PNG", "1x1 image"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_image_refused_then_serving(name, bad_cases, server, gradio, good, tmp_path):
    data, status, words = bad_cases[name]
    r = post(server.url, ("first.png", good[0]), ("culprit.png", data))
    assert r.status_code == status, r.text
    body = r.json()
    assert words in body["error"] and body["file"] == "culprit.png" and "culprit.png" in body["error"]
    path = tmp_path / "culprit.png"
    path.write_bytes(data)
    assert words in gradio_refusal(gradio, path)
    assert_still_serving(server, gradio, good, tmp_path)


@pytest.mark.parametrize("name", VALID_NAMES)
def test_unusual_image_classified(name, valid_cases, server, gradio, predictor, good, tmp_path):
    from gradio_client import handle_file
    data, label = valid_cases[name]
    r = post(server.url, (f"{name}.img", data))
    assert r.status_code == 200, r.text
    got = r.json()[0]
    assert got["label"] == predictor.predict(data).label  # the server decodes as the Predictor does
    if label is not None:
        assert got["label"] == label
    path = tmp_path / "unusual.img"
    path.write_bytes(data)
    assert gradio.predict(handle_file(str(path)), api_name="/predict")["label"] == got["label"]
    assert_still_serving(server, gradio, good, tmp_path)


def test_no_image(server, gradio, good, tmp_path):
    r = requests.post(server.url + "/v1/predict", files=[("other_field", ("x.png", good[0]))], timeout=30)
    assert r.status_code == 400 and "no files" in r.json()["error"] and "'files'" in r.json()["error"]
    r = requests.post(server.url + "/v1/predict", data=b"", headers={"Content-Type": "multipart/form-data; boundary=x"},
                      timeout=30)
    assert r.status_code == 400 and "error" in r.json()
    r = requests.post(server.url + "/v1/predict", json={"image": "x"}, timeout=30)
    assert r.status_code == 415 and "multipart/form-data" in r.json()["error"]
    assert "no image" in gradio_refusal(gradio, None)
    assert_still_serving(server, gradio, good, tmp_path)


def test_malformed_multipart(server, gradio, good, tmp_path):
    r = requests.post(server.url + "/v1/predict", data=b"--b\r\nnonsense without headers",
                      headers={"Content-Type": "multipart/form-data; boundary=b"}, timeout=30)
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert_still_serving(server, gradio, good, tmp_path)


def test_too_many_files(server, gradio, good, tmp_path):
    r = post(server.url, *[(f"{i}.png", good[0]) for i in range(MAX_FILES + 1)])
    assert r.status_code == 413
    assert "too many files" in r.json()["error"] and str(MAX_FILES) in r.json()["error"]
    r = post(server.url, *[(f"{i}.png", good[0]) for i in range(MAX_FILES)])  # exactly the limit is fine
    assert r.status_code == 200 and len(r.json()) == MAX_FILES
    assert_still_serving(server, gradio, good, tmp_path)


def test_file_too_large(server, gradio, good, tmp_path):
    noise = png(Image.fromarray(np.random.default_rng(1).integers(0, 255, (600, 600, 3), dtype=np.uint8)))
    assert len(noise) > MAX_FILE_MB * 1e6
    r = post(server.url, ("ok.png", good[0]), ("huge.png", noise))
    assert r.status_code == 413
    assert "file too large" in r.json()["error"] and f"{MAX_FILE_MB:g} MB" in r.json()["error"]
    assert r.json()["file"] == "huge.png"
    path = tmp_path / "huge.png"
    path.write_bytes(noise)
    gradio_refusal(gradio, path)  # Gradio's upload route applies the same per-file limit
    h = requests.get(server.url + "/v1/health", timeout=10).json()["limits"]
    assert h["max_files"] == MAX_FILES and h["max_file_mb"] == MAX_FILE_MB
    assert_still_serving(server, gradio, good, tmp_path)


def test_huge_declared_body_refused_before_reading(server, gradio, good, tmp_path):
    """A client announcing 10 GB is answered at once, without the server reading (or storing) it."""
    u = urlparse(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Content-Length", str(10 ** 10))
    conn.endheaders()
    resp = conn.getresponse()
    assert resp.status == 413 and b"too large" in resp.read()
    conn.close()
    assert_still_serving(server, gradio, good, tmp_path)


# --------------------------------------------------------------------------- CLI

def test_cli_reports_bad_files_and_carries_on(mnist_model, bad_cases, valid_cases, good, tmp_path, capsys):
    from serve.predict import main
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a_good.png").write_bytes(good[0])
    for i, (data, _, _) in enumerate(bad_cases.values()):
        (folder / f"b_bad_{i}.png").write_bytes(data)
    for i, (data, _) in enumerate(valid_cases.values()):
        (folder / f"c_odd_{i}.png").write_bytes(data)
    (folder / "z_good.png").write_bytes(good[0])
    code = main([str(mnist_model), str(folder), str(tmp_path / "missing.png"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 1
    classified = [Path(line.split("\t")[0]).name for line in out.splitlines()]
    assert classified == ["a_good.png"] + [f"c_odd_{i}.png" for i in range(len(valid_cases))] + ["z_good.png"]
    assert out.splitlines()[0].split("\t")[1] == good[1]
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(bad_cases) + 1 and all(x.startswith("error: ") for x in err_lines)
    assert any("missing.png" in x and "no such file" in x for x in err_lines)
