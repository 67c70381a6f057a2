"""The real app on a free port: called over HTTP (requests) and with `gradio_client`, one request
at a time and many at once, every answer checked against the Predictor; the CLIs in and out of
process; the sketch pad's digit framing."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from tests.servers import GradioClients

ROOT = Path(__file__).resolve().parents[1]
N_DIGITS = 64


@pytest.fixture(scope="module")
def server(mnist_model):
    from serve.app import start_in_thread
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        srv = start_in_thread(mnist_model, device="cpu")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def predictor(server):
    return server.app.state.predictor


@pytest.fixture(scope="module")
def digits(mnist_arrays, predictor):
    """(png bytes, true label, oracle label) for the first N_DIGITS MNIST test digits."""
    out = []
    for a, y in zip(mnist_arrays.valid_images[:N_DIGITS], mnist_arrays.valid_labels[:N_DIGITS]):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG")
        out.append((buf.getvalue(), str(int(y))))
    oracle = predictor.predict_batch([png for png, _ in out])
    return [(png, truth, p.label) for (png, truth), p in zip(out, oracle)]


@pytest.fixture(scope="module")
def gradio(server):
    from gradio_client import Client
    return Client(server.url + "/", verbose=False)


def post(url, *pngs, top_k=None):
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    return requests.post(url + "/v1/predict", files=files, params={"top_k": top_k} if top_k else None, timeout=60)


def gradio_predict(client, png: bytes, tmp: Path) -> dict:
    from gradio_client import handle_file
    path = tmp / f"{abs(hash(png))}.png"
    path.write_bytes(png)
    return client.predict(handle_file(str(path)), api_name="/predict")


def test_health(server, predictor):
    h = requests.get(server.url + "/v1/health", timeout=10).json()
    assert h["status"] == "ok" and h["name"] == predictor.name == "mnist"
    assert h["classes"] == [str(i) for i in range(10)] and h["device"] == "cpu"
    assert h["limits"]["max_files"] == 64 and h["limits"]["max_file_mb"] == 20


def test_http_predict_files_in_order(server, digits):
    r = post(server.url, *[png for png, _, _ in digits[:10]])
    assert r.status_code == 200, r.text
    body = r.json()
    assert [x["label"] for x in body] == [oracle for _, _, oracle in digits[:10]]
    for x in body:
        confs = [c["confidence"] for c in x["confidences"]]
        assert len(confs) == 3 and confs == sorted(confs, reverse=True) and x["confidences"][0]["label"] == x["label"]


def test_http_top_k(server, digits):
    assert len(post(server.url, digits[0][0], top_k=1).json()[0]["confidences"]) == 1
    assert len(post(server.url, digits[0][0], top_k=99).json()[0]["confidences"]) == 10  # all classes
    r = post(server.url, digits[0][0], top_k="zero")
    assert r.status_code == 422 and "top_k" in r.json()["error"]


def test_gradio_client_predict(gradio, digits, tmp_path):
    for png, _, oracle in digits[:3]:
        out = gradio_predict(gradio, png, tmp_path)
        assert out["label"] == oracle
        assert len(out["confidences"]) == 3


def test_ui_page_and_description(server, predictor):
    r = requests.get(server.url + "/", timeout=10)
    assert r.status_code == 200 and "gradio" in r.text.lower()
    from serve.ui import describe
    text = describe(predictor)
    acc = predictor.metadata.metrics.valid_accuracy
    assert f"{acc:.1%}" in text and "`0`" in text and "`9`" in text and "3,000 images" in text


def test_many_concurrent_requests_all_right(server, digits, tmp_path):
    """32 threads, HTTP and Gradio mixed (8 Gradio users): every request answered, every answer the
    oracle's (and the true label wherever the model gets the digit right offline). Requests share
    forward passes: the micro-batcher, which serves both doors, ran fewer passes than it classified images."""
    before = requests.get(server.url + "/v1/health", timeout=10).json()
    jobs = [("http", i % N_DIGITS) for i in range(192)] + [("gradio", i % N_DIGITS) for i in range(48)]
    local = threading.local()

    def one(job):
        kind, i = job
        png, truth, oracle = digits[i]
        if kind == "http":
            s = getattr(local, "session", None) or requests.Session()
            local.session = s
            r = s.post(server.url + "/v1/predict", files=[("files", ("d.png", png, "image/png"))], timeout=120)
            assert r.status_code == 200, r.text
            label = r.json()[0]["label"]
        else:
            label = gradio_predict(gradio, png, tmp_path)["label"]
        return label, truth, oracle

    with GradioClients(server.url + "/", 8) as gradio, ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, jobs))
    assert len(results) == len(jobs)
    for label, truth, oracle in results:
        assert label == oracle
        if oracle == truth:
            assert label == truth
    after = requests.get(server.url + "/v1/health", timeout=10).json()
    passes, images = after["batches"] - before["batches"], after["images"] - before["images"]
    assert images == len(jobs) and passes < images


def test_sketch_to_digit_reads_drawn_digits(predictor, mnist_arrays):
    """The sketch pad draws black on a transparent canvas; framed and inverted, drawn digits are
    read like MNIST's white-on-black ones. Simulated: digits drawn black at 10x scale, placed
    off-centre on a 280x280 canvas."""
    import gradio as gr
    from serve.ui import sketch_to_digit
    right = 0
    picked = [(a, str(int(y))) for a, y in zip(mnist_arrays.valid_images[:40], mnist_arrays.valid_labels[:40])]
    for a, truth in picked:
        big = np.asarray(Image.fromarray(a).resize((200, 200), Image.BILINEAR))
        canvas = np.zeros((280, 280, 4), dtype=np.uint8)  # transparent
        canvas[60:260, 70:270, 3] = big  # black ink (RGB 0), its opacity the digit's intensity
        digit = sketch_to_digit({"composite": canvas})
        assert digit.mode == "L" and digit.size[0] == digit.size[1]
        right += predictor.predict(digit).label == truth
    assert right >= 0.85 * len(picked)
    with pytest.raises(gr.Error, match="nothing drawn"):
        sketch_to_digit({"composite": np.zeros((280, 280, 4), dtype=np.uint8)})
    with pytest.raises(gr.Error):
        sketch_to_digit(None)


# --------------------------------------------------------------------------- command lines

def test_predict_cli_files_folders_json_csv(mnist_model, digits, tmp_path, capsys):
    from serve.predict import main
    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    for i, (png, _, _) in enumerate(digits[:6]):
        (folder / f"{i}.png").write_bytes(png)
    (folder / "notes.txt").write_text("not an image, and not picked up from a folder")
    single = tmp_path / "one.png"
    single.write_bytes(digits[6][0])
    out_csv = tmp_path / "out.csv"
    code = main([str(mnist_model), str(single), str(tmp_path / "photos"), "--top-k", "2", "--json",
                 "--csv", str(out_csv), "--quiet"])
    assert code == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [Path(x["file"]).name for x in lines] == ["one.png"] + [f"{i}.png" for i in range(6)]
    assert [x["label"] for x in lines] == [digits[6][2]] + [d[2] for d in digits[:6]]
    assert all(len(x["confidences"]) == 2 for x in lines)
    rows = list(csv.DictReader(out_csv.open()))
    assert [r["label"] for r in rows] == [x["label"] for x in lines] and all(r["error"] == "" for r in rows)


def test_serve_refuses_bad_model_folders(mnist_model, tmp_path):
    """One line on stderr, exit status 2, no traceback: the real command, in a subprocess, for one
    case; `main()` in process for the others."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "serve", str(tmp_path / "nope"), "--port", "0"], cwd=ROOT,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: model folder") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1

    import shutil
    from serve.__main__ import main
    no_pkl = tmp_path / "no_pkl"
    shutil.copytree(mnist_model, no_pkl)
    (no_pkl / "model.pkl").unlink()
    old = tmp_path / "old_fastai"
    shutil.copytree(mnist_model, old)
    meta = json.loads((old / "metadata.json").read_text())
    meta["versions"]["fastai"] = "1.0.61"
    (old / "metadata.json").write_text(json.dumps(meta))
    broken = tmp_path / "broken_meta"
    shutil.copytree(mnist_model, broken)
    (broken / "metadata.json").write_text("{ not json")
    corrupt = tmp_path / "corrupt_pkl"
    shutil.copytree(mnist_model, corrupt)
    (corrupt / "model.pkl").write_bytes(b"garbage")
    for folder, words in ((no_pkl, "model.pkl"), (old, "fastai 1.0.61"), (broken, "unreadable"),
                          (corrupt, "cannot load")):
        err = io.StringIO()
        with pytest.MonkeyPatch.context() as m:
            m.setattr(sys, "stderr", err)
            # --format pickle: these are the pickle's failures (`auto` would serve model.onnx, and block)
            assert main([str(folder), "--port", "0", "--format", "pickle"]) == 2
        line = err.getvalue().strip()
        assert line.startswith("error: ") and words in line and "\n" not in line, line
