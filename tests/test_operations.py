"""Operating the server, against `python -m serve` in its own process on a loopback port:
liveness and readiness from the process's first moment to its SIGTERM, /metrics as Prometheus
parses it, back-pressure (--max-queue), queue timeouts (--timeout), and the graceful shutdown.

The slow paths are made observable by the server's own flags, not by hooks: `--max-batch 1`
turns a request of N files into N forward passes one after another, so a queue stays full (or a
request stays in flight) for a measurable while; the tests read /metrics to know when it is.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import ROOT, serve_process, spawn_serve

LIVE, READY = "/v1/health/live", "/v1/health/ready"


@pytest.fixture(scope="module")
def digit(mnist_arrays) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(mnist_arrays.valid_images[0]).save(buf, format="PNG")
    return buf.getvalue()


def files(png: bytes, n: int) -> list:
    return [("files", (f"d{i}.png", png, "image/png")) for i in range(n)]


def status(url: str, timeout: float = 5) -> int | None:
    """The status of GET url, or None when the connection is refused or reset."""
    try:
        return requests.get(url, timeout=timeout).status_code
    except requests.ConnectionError:
        return None


def scrape(url: str) -> dict:
    """/metrics as Prometheus reads it: {(sample name, sorted labels): value}."""
    text = requests.get(url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted((k, str(v)) for k, v in labels.items()))), 0.0)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def test_ready_after_warm_up_metrics_and_graceful_sigterm(mnist_model, digit):
    """One server's whole life: live before ready (polled from the process's start), /metrics
    moving with requests, then SIGTERM with requests in flight: they are all answered, new ones
    are refused, readiness turns 503, and the process exits 0 within --grace."""
    # --grace 20, not the default 8: the drain below is 300 passes, seconds on a loaded 2-core
    # machine; --timeout 60 keeps the queue's own timeout out of it.
    grace = 20
    srv = spawn_serve(mnist_model, "--max-batch", 1, "--max-files", 256, "--max-queue", 1024, "--timeout", 60,
                      "--grace", grace)
    try:
        # -- start-up, from the process's first moment: (live, ready) until ready
        seen, starting_predict = [], None
        deadline = time.monotonic() + 180
        while True:
            assert srv.proc.poll() is None, srv.output()[-3000:]
            live, ready = status(srv.url + LIVE), status(srv.url + READY)
            seen.append((live, ready))
            if live == 200 and ready == 503 and starting_predict is None:
                starting_predict = requests.post(srv.url + "/v1/predict", files=files(digit, 1), timeout=10)
            if ready == 200:
                break
            assert time.monotonic() < deadline, f"not ready after 180 s: {srv.output()[-3000:]}"
            time.sleep(0.05)
        assert (200, 503) in seen, f"never live-but-not-ready: {sorted(set(seen), key=str)}"
        assert all(r != 200 for _, r in seen[:-1])
        assert all(r is None for live, r in seen if live is None)  # nothing answers before HTTP does
        # a request before readiness: refused, in words, with a time to retry (not a 5xx from a half-built app)
        assert starting_predict.status_code == 503 and "starting" in starting_predict.json()["error"]
        assert int(starting_predict.headers["Retry-After"]) > 0
        body = requests.get(srv.url + READY, timeout=5).json()
        assert body == {"status": "ready"}

        # -- /metrics: parsed by prometheus_client's own parser, and moving with the requests
        before = scrape(srv.url)
        r = requests.post(srv.url + "/v1/predict", files=files(digit, 2), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 2
        assert requests.get(srv.url + "/", timeout=30).status_code == 200  # the Gradio page
        after = scrape(srv.url)
        assert value(after, "serve_requests_total", endpoint="/v1/predict", status=200) == \
            value(before, "serve_requests_total", endpoint="/v1/predict", status=200) + 1
        assert value(after, "serve_requests_total", endpoint="/", status=200) == \
            value(before, "serve_requests_total", endpoint="/", status=200) + 1
        assert value(after, "serve_request_duration_seconds_count", endpoint="/v1/predict") == \
            value(before, "serve_request_duration_seconds_count", endpoint="/v1/predict") + 1
        # --max-batch 1: two images, two forward passes of one image each
        assert value(after, "serve_forward_seconds_count") == value(before, "serve_forward_seconds_count") + 2
        assert value(after, "serve_batch_images_sum") == value(before, "serve_batch_images_sum") + 2
        assert value(after, "serve_queue_images") == 0
        assert value(after, "serve_rejected_total", reason="starting") >= 1  # the predict above, and /v1/health polls
        info = [k for k in after if k[0] == "serve_model_info"]
        name = json.loads((mnist_model / "metadata.json").read_text())["name"]
        # --format auto on the CPU, a folder with model.onnx: onnxruntime serves it
        assert len(info) == 1 and dict(info[0][1]) == {"name": name, "format": "onnx", "device": "cpu"}
        # Once ready, start-up's objects (torch, fastai, onnxruntime, Gradio: ~450,000) sit in
        # the GC's permanent generation, so that a full collection under load does not scan them
        # (the p99 of bench/serve_photos.py's digits went from 208 to 21 ms). Counted by prometheus'
        # GC collector beside it.
        assert value(after, "python_gc_frozen_objects") > 200_000  # ~450,000 here
        assert ("python_gc_collections_total", (("generation", "2"),)) in after

        # -- SIGTERM with requests in flight: one of 256 images (256 one-image passes, a second or
        # more), then 11 small ones queued behind it (oldest first), all received before the signal
        sizes = [256] + [4] * 11
        answers: list = [None] * len(sizes)
        answered_at: list = [None] * len(sizes)

        def client(i):
            try:
                resp = requests.post(srv.url + "/v1/predict", files=files(digit, sizes[i]), timeout=60)
                answers[i] = (resp.status_code, len(resp.json()) if resp.status_code == 200 else resp.text)
            except requests.RequestException as e:
                answers[i] = ("error", repr(e))
            answered_at[i] = time.monotonic()

        base = value(scrape(srv.url), "serve_batch_images_sum")
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(sizes))]
        threads[0].start()
        wait_for(lambda: value(scrape(srv.url), "serve_queue_images") > 0, 60, "the large request to reach the queue")
        for t in threads[1:]:
            t.start()

        def all_received():  # every request's images are queued, computed, or the one in the running pass
            m = scrape(srv.url)
            all_received.queued = value(m, "serve_queue_images")
            return all_received.queued + value(m, "serve_batch_images_sum") - base >= sum(sizes) - 1
        wait_for(all_received, 60, "all requests to reach the model's queue")
        assert all_received.queued > 0, "the requests finished before the signal: nothing was in flight"
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)

        ready_after, new_after = [], []
        while any(t.is_alive() for t in threads):
            ready_after.append(status(srv.url + READY))
            try:
                resp = requests.post(srv.url + "/v1/predict", files=files(digit, 1), timeout=10)
                new_after.append((resp.status_code, resp.headers.get("connection"), resp.json().get("error")
                                  if resp.status_code != 200 else None))
            except requests.ConnectionError:
                new_after.append(None)  # refused at the socket: the listener is closed
            time.sleep(0.05)
        for t in threads:
            t.join(60)
        rc = srv.proc.wait(grace + 10)
        took = time.monotonic() - signalled

        assert answers == [(200, n) for n in sizes], answers
        assert max(answered_at) > signalled  # in flight at the signal, answered after it
        assert rc == 0, srv.output()[-3000:]
        assert took <= grace + 2, f"exited {took:.1f} s after SIGTERM (--grace {grace})"
        assert 503 in ready_after and 200 not in ready_after[1:], ready_after
        assert new_after, "no new request was tried during the drain"
        assert all(a is None or (a[0] == 503 and a[1] == "close" and "shutting down" in a[2])
                   for a in new_after[1:]), new_after
        assert any(a is not None and a[0] == 503 for a in new_after), new_after
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()


def test_ctrl_c_answers_the_request_in_flight_and_exits_0(mnist_model, digit):
    """Ctrl-C (SIGINT, what a terminal sends) takes SIGTERM's path: the request already received
    is answered, readiness turns 503, and the process exits 0."""
    with serve_process(mnist_model, "--max-batch", 1, "--max-files", 256, "--max-queue", 1024,
                       "--timeout", 60, "--grace", 20) as srv:
        answer = {}

        def client():
            resp = requests.post(srv.url + "/v1/predict", files=files(digit, 256), timeout=60)
            answer["got"] = (resp.status_code, len(resp.json()) if resp.status_code == 200 else resp.text)

        t = threading.Thread(target=client)
        t.start()
        wait_for(lambda: value(scrape(srv.url), "serve_queue_images") > 0, 60, "the request to reach the queue")
        srv.proc.send_signal(signal.SIGINT)
        wait_for(lambda: status(srv.url + READY) in (503, None), 10, "readiness to turn 503")
        t.join(60)
        rc = srv.proc.wait(30)
        assert answer.get("got") == (200, 256), answer
        assert rc == 0, srv.output()[-3000:]


def test_max_queue_refuses_with_503_and_retry_after(mnist_model, digit):
    """Many concurrent 4-file requests against --max-queue 8: only 200s and 503s (with
    Retry-After and a JSON reason), each 503 counted as queue_full; then a request succeeds."""
    with serve_process(mnist_model, "--max-queue", 8, "--max-files", 4, "--max-batch", 1) as srv:
        health = requests.get(srv.url + "/v1/health", timeout=10).json()
        assert health["limits"]["max_queue"] == 8
        results, lock = [], threading.Lock()

        def client():
            with requests.Session() as s:
                for _ in range(4):
                    try:
                        r = s.post(srv.url + "/v1/predict", files=files(digit, 4), timeout=60)
                        got = (r.status_code, r.headers.get("Retry-After"), r.json())
                    except requests.RequestException as e:
                        got = ("error", None, repr(e))
                    with lock:
                        results.append(got)

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        codes = [c for c, _, _ in results]
        assert len(results) == 64 and set(codes) <= {200, 503}, sorted(set(map(str, codes)))
        assert 503 in codes and 200 in codes, codes
        for code, retry_after, body in results:
            if code == 200:
                assert len(body) == 4
            else:
                assert int(retry_after) > 0 and "--max-queue 8" in body["error"]
        r = requests.post(srv.url + "/v1/predict", files=files(digit, 4), timeout=30)
        assert r.status_code == 200 and len(r.json()) == 4
        m = scrape(srv.url)
        assert value(m, "serve_rejected_total", reason="queue_full") == codes.count(503)
        assert value(m, "serve_requests_total", endpoint="/v1/predict", status=503) == codes.count(503)
        assert requests.get(srv.url + "/v1/health", timeout=10).json()["peak_queued_images"] <= 8


def test_timeout_refuses_a_request_that_waited_and_never_computes_it(mnist_model, digit):
    """--timeout 0.2: a request queued behind 512 one-image passes gets 503 (Retry-After), and
    its image never reaches the model; the request ahead of it, already running, is answered.
    On torch (--format pickle), whose one-image pass takes milliseconds: on onnxruntime 256 passes of
    a 28 px digit can end within the timeout, and the late request is rightly answered."""
    with serve_process(mnist_model, "--format", "pickle", "--timeout", 0.2, "--max-batch", 1, "--max-files", 512,
                       "--max-queue", 512) as srv:
        images_before = requests.get(srv.url + "/v1/health", timeout=10).json()["images"]
        ahead = {}

        def big():
            r = requests.post(srv.url + "/v1/predict", files=files(digit, 512), timeout=120)
            ahead["status"], ahead["n"] = r.status_code, len(r.json())

        t = threading.Thread(target=big)
        t.start()
        depth = {}

        def queued():
            depth["now"] = value(scrape(srv.url), "serve_queue_images")
            return depth["now"] > 0
        wait_for(queued, 60, "the big request to reach the queue")
        assert depth["now"] >= 256, f"only {depth['now']:.0f} images left ahead: the wait would be too short to test"
        late = requests.post(srv.url + "/v1/predict", files=files(digit, 1), timeout=60)
        t.join(120)
        assert late.status_code == 503 and int(late.headers["Retry-After"]) > 0
        assert "--timeout" in late.json()["error"]
        assert ahead == {"status": 200, "n": 512}
        health = requests.get(srv.url + "/v1/health", timeout=10).json()
        assert health["images"] == images_before + 512  # the late request's image was dropped, not computed
        m = scrape(srv.url)
        assert value(m, "serve_rejected_total", reason="queue_timeout") == 1
        assert value(m, "serve_queue_images") == 0


def test_max_queue_below_max_files_is_one_line_error(mnist_model):
    proc = subprocess.run([sys.executable, "-m", "serve", str(mnist_model), "--max-queue", "8", "--port", "0"],
                          capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --max-queue (8) must be at least --max-files (64): else the largest request allowed could never be queued")


def test_a_gradio_request_refused_by_the_queue_says_why(mnist_model, digit, tmp_path):
    """The UI's requests share the batcher's queue: one that waits past --timeout behind the API's
    work is refused with the batcher's own message, as a `gr.Error`: a refusal the server expects,
    so no traceback in its log (under overload there would be one per refused request), and the
    server goes on."""
    from gradio_client import Client, handle_file
    png = tmp_path / "digit.png"
    png.write_bytes(digit)
    with serve_process(mnist_model, "--format", "pickle", "--timeout", 0.2, "--max-batch", 1, "--max-files", 1024,
                       "--max-queue", 2048) as srv:
        client = Client(srv.url + "/", verbose=False)
        answers = []  # one request of 1,024 one-image passes ahead: seconds of work (the first pass is taken at once)
        ahead = threading.Thread(target=lambda: answers.append(requests.post(
            srv.url + "/v1/predict", files=files(digit, 1024), timeout=300).status_code))
        ahead.start()
        wait_for(lambda: value(scrape(srv.url), "serve_queue_images") >= 512, 60, "the API's images to fill the queue")
        with pytest.raises(Exception) as refused:
            client.predict(handle_file(str(png)), api_name="/predict")
        ahead.join(300)
        assert "server busy" in str(refused.value) and "--timeout" in str(refused.value), str(refused.value)
        assert answers == [200]
        assert value(scrape(srv.url), "serve_rejected_total", reason="queue_timeout") >= 1
        assert "confidences" in client.predict(handle_file(str(png)), api_name="/predict")  # and it serves again
        assert "Traceback" not in srv.output() and "Overloaded" not in srv.output(), srv.output()[-3000:]
