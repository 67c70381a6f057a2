"""The Gradio side of the server as a stranger sees it: `python -m serve` as its own process, called
with `gradio_client` and with raw HTTP to Gradio's routes (`/gradio_api/queue/join`,
`/gradio_api/call/...`, `/gradio_api/upload`, `/gradio_api/file=`, the sketch pad's blob route).

- A request names its image by a server path. Only files uploaded to this server (and the model's
  examples) may be read: an image elsewhere on disk, /etc/passwd, /proc/self/environ, a symlink or a
  `..` path out of the upload folder, a URL are refused before they are opened, with the same answer
  whether the file exists or not, and nothing is copied into the upload folder.
- An inline image (a `data:` URL) obeys `--max-file-mb`; so does the sketch pad, whose blobs are
  bounded in size, side, slots and number.
- A refused image reaches `gradio_client` with its reason (`ValidationError`), and fails only its
  own request, not the others batched with it.
- Uploads are deleted after `--upload-ttl`, and their folder (the server's own) when it stops.
"""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import os
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

from tests.servers import GradioClients, serve_process

MAX_FILE_MB = 0.5
TIMEOUT = 60  # s per HTTP call; a first request on a busy 2-core machine can take many seconds
REFUSED = "refused: not a file uploaded to this app"


# --------------------------------------------------------------------------- helpers

def png(seed: int, side: int = 28) -> bytes:
    """A PNG no other test (and no earlier run) has made: random pixels from `seed` and the clock."""
    rng = np.random.default_rng([seed, time.time_ns()])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (side, side), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def file_data(path: str, meta: bool = True) -> dict:
    """Gradio's FileData for a server path; without `meta`, Gradio's own cache step skips it."""
    return {"path": path, "meta": {"_type": "gradio.FileData"}} if meta else {"path": path}


class Gradio:
    """Raw HTTP to the mounted Gradio app."""

    def __init__(self, url: str):
        self.url = url
        config = requests.get(url + "/config", timeout=TIMEOUT).json()
        kinds = {c["id"]: c["props"].get("elem_id") for c in config["components"]}
        self.fn = {d["api_name"]: d["id"] for d in config["dependencies"]}
        self.sketch_id = next(i for i, e in kinds.items() if e == "sketch")

    def join(self, fn: str, data: list) -> tuple[int, str]:
        """Join the queue like the page does; (join status, what came back: the refusal or the
        final message's output) as text."""
        session = uuid.uuid4().hex
        r = requests.post(self.url + "/gradio_api/queue/join", timeout=TIMEOUT,
                          json={"data": data, "fn_index": self.fn[fn], "session_hash": session,
                                "event_data": None, "trigger_id": None})
        if r.status_code != 200:
            return r.status_code, r.text
        with requests.get(self.url + f"/gradio_api/queue/data?session_hash={session}", stream=True,
                          timeout=TIMEOUT) as stream:
            for line in stream.iter_lines():
                if line.startswith(b"data:"):
                    msg = json.loads(line[5:])
                    if msg.get("msg") == "process_completed":
                        return 200, json.dumps(msg["output"])
        raise AssertionError("the queue's stream ended without a result")

    def call(self, data: list) -> tuple[int, str]:
        """The documented REST way: POST /gradio_api/call/predict, then read the event."""
        r = requests.post(self.url + "/gradio_api/call/predict", json={"data": data}, timeout=TIMEOUT)
        if r.status_code != 200:
            return r.status_code, r.text
        r = requests.get(self.url + f"/gradio_api/call/predict/{r.json()['event_id']}", timeout=TIMEOUT)
        return r.status_code, r.text

    def upload(self, name: str, data: bytes) -> Path:
        r = requests.post(self.url + "/gradio_api/upload", files=[("files", (name, data))], timeout=TIMEOUT)
        assert r.status_code == 200, r.text
        return Path(r.json()[0])


def dotdot(folder: Path, target: Path) -> str:
    """`target` named through `..` from inside `folder`: /tmp/serve-uploads-x/../../<target>."""
    return str(folder) + "/.." * len(folder.parts) + str(target)


def files_under(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} if folder.is_dir() else {}


def holds(folder: Path, content: bytes) -> list[Path]:
    return [p for p, data in files_under(folder).items() if data == content]


def client_error(client, value, api_name="/predict") -> Exception:
    with pytest.raises(Exception) as info:
        client.predict(value, api_name=api_name)
    return info.value


# --------------------------------------------------------------------------- the server

@pytest.fixture(scope="module")
def served(mnist_model):
    with serve_process(mnist_model, "--max-file-mb", MAX_FILE_MB) as srv:
        yield srv


@pytest.fixture(scope="module")
def gradio(served):
    return Gradio(served.url)


@pytest.fixture(scope="module")
def client(served):
    from gradio_client import Client
    return Client(served.url + "/", verbose=False)


@pytest.fixture(scope="module")
def upload_dir(gradio):
    """The server's upload folder, as its upload route names it: <folder>/<hash>/<name>."""
    return gradio.upload("probe.png", png(0)).parent.parent


@pytest.fixture()
def secrets(tmp_path):
    """Files on the server's disk that nobody uploaded: an image (which the model could classify),
    a symlink to it, and a text file; plus a path that does not exist."""
    image = tmp_path / "never-uploaded.png"
    image.write_bytes(png(1))
    link = tmp_path / "link.png"
    link.symlink_to(image)
    text = tmp_path / "secret.txt"
    text.write_text("HF_TOKEN=hf_not_a_real_token\n")
    return {"image": image, "link": link, "text": text, "missing": tmp_path / "missing.png"}


# --------------------------------------------------------------------------- 1: server paths

def test_paths_on_the_servers_disk_are_refused(gradio, client, upload_dir, secrets):
    from gradio_client.exceptions import ValidationError
    image = secrets["image"]
    escape = dotdot(upload_dir, image)
    targets = [str(image), str(secrets["link"]), str(secrets["text"]), str(secrets["missing"]), str(escape),
               "/etc/passwd", "/proc/self/environ"]
    before = files_under(upload_dir)
    answers = {}
    for target in targets:
        for meta in (True, False):
            for way, (status, text) in (("queue", gradio.join("predict", [file_data(target, meta)])),
                                        ("call", gradio.call([file_data(target, meta)]))):
                assert status in (400, 422), (target, meta, way, status, text)  # refused at the door
                assert "confidences" not in text and "hf_not_a_real_token" not in text
                answers[target, meta, way] = text.replace(target, "<path>").replace(os.path.abspath(target), "<path>")
        err = client_error(client, file_data(target, meta=False))  # gradio_client sends it as given
        assert isinstance(err, ValidationError) and REFUSED in str(err), repr(err)
    # Whether the file exists, is an image, a symlink or text: the same answer.
    for meta in (True, False):
        for way in ("queue", "call"):
            assert len({answers[t, meta, way] for t in targets}) == 1, {t: answers[t, meta, way] for t in targets}
    assert files_under(upload_dir) == before  # nothing copied in
    for content in (image.read_bytes(), secrets["text"].read_bytes()):
        assert not holds(upload_dir, content) and not holds(Path("/tmp/gradio"), content)


def test_urls_are_not_fetched(gradio, client):
    from gradio_client import handle_file
    from gradio_client.exceptions import ValidationError
    url = "http://127.0.0.1:9/never.png"  # discard port: a fetch would fail, a refusal says why
    for meta in (True, False):
        status, text = gradio.join("predict", [file_data(url, meta)])
        assert status == 422 and "not fetched from URLs" in text, text
    err = client_error(client, handle_file(url))
    assert isinstance(err, ValidationError) and "not fetched from URLs" in str(err)


def test_uploaded_files_and_examples_still_work(gradio, client, mnist_model):
    from gradio_client import handle_file
    path = gradio.upload("digit.png", png(2))
    for meta in (True, False):
        status, text = gradio.join("predict", [file_data(str(path), meta)])
        assert status == 200 and "confidences" in text, text
    example = sorted((mnist_model / "examples").iterdir())[0]
    assert "confidences" in client.predict(handle_file(str(example)), api_name="/predict")
    # An example click runs `classify_example` on the example's copy that Gradio made at start-up
    # (what the page sends); the model's own example files may be named too; nothing else.
    status, text = gradio.join("classify_example", [file_data(str(example), meta=False)])
    assert status == 200 and "confidences" in text, text
    status, text = gradio.join("classify_example", [file_data("/etc/passwd", meta=False)])
    assert REFUSED in text and "confidences" not in text, text


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET `path` exactly as written (requests would resolve its `..` segments first)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=TIMEOUT)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def test_file_route_serves_uploads_and_examples_only(gradio, upload_dir, secrets, mnist_model):
    get = lambda p: raw_get(gradio.url, "/gradio_api/file=" + str(p))
    path = gradio.upload("served.png", png(3))
    assert get(path)[0] == 200
    assert get(sorted((mnist_model / "examples").iterdir())[0])[0] == 200
    for target in (secrets["image"], secrets["link"], secrets["text"], "/etc/passwd", "/proc/self/environ",
                   dotdot(upload_dir, secrets["image"]),
                   mnist_model / "model.pkl", mnist_model / "metadata.json"):
        status, body = get(target)
        assert status == 403 and b"hf_not_a_real_token" not in body, (target, status)


def test_sketch_pad_reads_only_uploads(gradio, secrets, upload_dir):
    """The sketch pad's FileData paths obey the same rule (Gradio's model of them insists on `meta`)."""
    before = files_under(upload_dir)
    for target in (str(secrets["image"]), str(secrets["link"]), dotdot(upload_dir, secrets["image"]), "/etc/passwd"):
        for meta in (True, False):
            value = {"background": None, "layers": [], "composite": file_data(target, meta), "id": None}
            status, text = gradio.join("classify_sketch", [value])
            assert "error" in text and "confidences" not in text, (target, meta, status, text)
            if meta:
                assert "not uploaded" in text, text
    assert files_under(upload_dir) == before


# --------------------------------------------------------------------------- 5: per-file limits

def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def test_data_url_images_obey_the_file_limit(gradio, client):
    from gradio_client.exceptions import ValidationError
    small = png(4)
    status, text = gradio.join("predict", [{"path": "inline.png", "url": data_url(small)}])
    assert status == 200 and "confidences" in text, text  # an inline image within the limit is fine
    big = data_url(os.urandom(int(MAX_FILE_MB * 1e6) + 10))
    status, text = gradio.join("predict", [{"path": "inline.png", "url": big}])
    assert status == 422 and "file too large" in text and f"{MAX_FILE_MB:g} MB" in text, text[:300]
    err = client_error(client, {"path": "inline.png", "url": big})
    assert isinstance(err, ValidationError) and "file too large" in str(err)
    status, text = gradio.join("predict", [{"path": "inline.png", "url": "data:image/png;base64,@@@@"}])
    assert status == 422 and "not valid base64" in text, text


def post_blob(gradio, data: bytes, kind="composite", index="null", drawing_id=None):
    """What the pad sends as it is drawn on: one image blob for the drawing `drawing_id`."""
    fields = {"session_hash": uuid.uuid4().hex, "component_id": str(gradio.sketch_id), "fn_name": "accept_blobs",
              "type": kind, "index": index, "id": drawing_id or uuid.uuid4().hex}
    return requests.post(gradio.url + "/gradio_api/component_server", timeout=TIMEOUT,
                         files=[(k, (None, v)) for k, v in fields.items()] + [("file", ("blob", data, "image/png"))])


def classify_drawing(gradio, drawing_id) -> str:
    """Classify a drawing sent as blobs, by its id, as the pad's button does."""
    return gradio.join("classify_sketch", [{"background": None, "layers": [], "composite": None, "id": drawing_id}])[1]


def test_sketch_pad_blobs_are_bounded(gradio):
    drawing = png(5, side=280)
    assert post_blob(gradio, drawing, drawing_id="kept").status_code == 200
    assert "confidences" in classify_drawing(gradio, "kept")  # the way the pad works
    assert post_blob(gradio, drawing, drawing_id="oldest").status_code == 200
    # A layer index is a list length on the server: a huge one would allocate gigabytes.
    r = post_blob(gradio, drawing, kind="layer", index=str(10 ** 9))
    assert r.status_code == 400 and "layers" in r.text, (r.status_code, r.text[:200])
    # Drawings that decode to far more pixels than the pad has (a few KB of PNG each), one of them
    # past Pillow's decompression-bomb limit.
    for side in (5_000, 20_000):
        buf = io.BytesIO()
        Image.new("L", (side, side)).save(buf, format="PNG")
        r = post_blob(gradio, buf.getvalue())
        assert r.status_code == 413 and "px a side" in r.text, (side, r.status_code, r.text[:200])
    r = post_blob(gradio, b"not an image")
    assert r.status_code == 400 and "not an image" in r.text
    r = post_blob(gradio, os.urandom(int(MAX_FILE_MB * 1e6) + 10))
    assert r.status_code == 413, (r.status_code, r.text[:200])  # Gradio's own per-file limit
    # Many drawings never classified: the server keeps the newest 64 (serve.ui.SKETCH_MAX_BLOBS), so
    # the oldest is gone (classifying it finds nothing drawn) and the newest is still there.
    for i in range(80):
        assert post_blob(gradio, drawing, drawing_id=f"new{i}").status_code == 200
    assert "nothing drawn" in classify_drawing(gradio, "oldest")
    assert "confidences" in classify_drawing(gradio, "new79")


# --------------------------------------------------------------------------- 9: the reason reaches the client

def test_refusal_reason_reaches_gradio_client(client, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import ValidationError
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    err = client_error(client, handle_file(str(bad)))
    assert isinstance(err, ValidationError) and "not an image" in str(err), repr(err)
    err = client_error(client, None)
    assert isinstance(err, ValidationError) and "no image" in str(err), repr(err)


def test_a_bad_image_fails_only_its_own_request(served, tmp_path):
    """Bursts of good images with one bad one among them, from many clients at once: Gradio
    batches them; each good one is answered, only the bad one is refused."""
    from gradio_client import handle_file
    good = []
    for i in range(4):
        p = tmp_path / f"good{i}.png"
        p.write_bytes(png(10 + i))
        good.append(p)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with GradioClients(served.url + "/", 16) as clients:
        for c in clients.all:  # upload the files once, so that the jobs below reach the queue together
            c.predict(handle_file(str(good[0])), api_name="/predict")

        def run(i):
            path = bad if i % 8 == 3 else good[i % len(good)]
            try:
                return path, clients.predict(handle_file(str(path)), api_name="/predict")
            except Exception as e:
                return path, e

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, range(32)))
    for path, out in results:
        if path == bad:
            assert isinstance(out, Exception) and "cannot classify" in str(out), repr(out)
        else:
            assert isinstance(out, dict) and "label" in out, (path, repr(out))


# --------------------------------------------------------------------------- 6: the upload folder

def test_uploads_are_deleted_and_their_folder_at_shutdown(mnist_model):
    with serve_process(mnist_model, "--upload-ttl", 1) as srv:
        g = Gradio(srv.url)
        uploaded = [g.upload(f"u{i}.png", png(100 + i)) for i in range(20)]
        folder = uploaded[0].parent.parent
        assert folder.name.startswith("serve-uploads-"), folder  # the server's own, not Gradio's shared one
        assert all(p.exists() for p in uploaded)
        deadline = time.monotonic() + 30  # deleted 1 to 2 s after upload; a busy machine is slower
        while any(p.exists() for p in uploaded) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not any(p.exists() for p in uploaded), [p for p in uploaded if p.exists()]
        assert requests.get(srv.url + "/v1/health", timeout=TIMEOUT).ok
        g.upload("last.png", png(200))
        assert folder.is_dir()
    assert not folder.exists()  # removed when the server stopped (SIGTERM)
