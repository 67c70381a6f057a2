"""The server's resource limits, against `python -m serve` as its own process (raw sockets and
requests): bytes in flight (413, 503 + Retry-After), slow and idle connections (408, closed), the
connection cap, `--max-batch` as a cap on every forward pass, and `top_k` parsing. Limits are set
small here so that breaking them is cheap; every case ends with a valid request still served.
"""
from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time

import pytest
import requests
import torch
from PIL import Image

from tests.servers import serve_process

MAX_BATCH = 8
MAX_REQUEST_MB = 2.0
MAX_INFLIGHT_MB = 3.0
KEEP_ALIVE_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 16
CUT_OFF_S = 8.0  # how long a test waits for the server to cut a client off (the limits are 1 s)


@pytest.fixture(scope="module")
def server(mnist_model):
    with serve_process(mnist_model, "--device", "cpu", "--max-batch", MAX_BATCH, "--max-file-mb", 0.5,
                       "--max-request-mb", MAX_REQUEST_MB, "--max-inflight-mb", MAX_INFLIGHT_MB,
                       "--keep-alive", KEEP_ALIVE_S, "--body-timeout", BODY_TIMEOUT_S,
                       "--max-connections", MAX_CONNECTIONS) as served:
        yield served


@pytest.fixture(scope="module")
def digit(mnist_arrays) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mnist_arrays.valid_images[0]).save(buf, format="PNG")
    return buf.getvalue()


def post(url, *pngs, params=None):
    files = [("files", (f"{i}.png", png, "image/png")) for i, png in enumerate(pngs)]
    return requests.post(url + "/v1/predict", files=files, params=params, timeout=60)


def health(server) -> dict:
    return requests.get(server.url + "/v1/health", timeout=10).json()


def assert_serving(server, digit):
    r = post(server.url, digit)
    assert r.status_code == 200 and r.json()[0]["label"], r.text


def connect(server) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", server.port), timeout=CUT_OFF_S)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_until_closed(s: socket.socket, limit: float = CUT_OFF_S) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took.
    Fails if the server keeps the connection open past `limit` seconds."""
    t0, out = time.monotonic(), b""
    s.settimeout(limit)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"the server kept the connection open for {limit} s; it sent {out[:200]!r}")
    finally:
        s.close()
    return out, time.monotonic() - t0


def status_and_json(raw: bytes) -> tuple[int, dict, dict]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), json.loads(body), headers


# the start of a well-formed body whose one field is not `files` (the API parses it and ignores it)
NOTE = b'--b\r\nContent-Disposition: form-data; name="note"\r\n\r\n'


def multipart_head(length: int, path: str = "/v1/predict", ctype: str = "multipart/form-data; boundary=b") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


# --------------------------------------------------------------------------- --max-batch

def test_batcher_caps_every_pass():
    """No forward pass exceeds max_batch; a request spans passes and gets its own rows in order."""
    from serve.api import MicroBatcher
    passes = []

    def run(items):
        passes.append(len(items))
        return torch.stack(items).float()

    async def scenario():
        batcher = MicroBatcher(run, max_batch=MAX_BATCH, max_wait_ms=20)
        try:
            big = [torch.tensor([i]) for i in range(64)]
            assert (await batcher.submit(big)).flatten().tolist() == list(range(64))
            assert passes == [MAX_BATCH] * 8
            passes.clear()
            sizes = [5, 7, 13, 1, 8]
            reqs = [[torch.tensor([100 * r + i]) for i in range(n)] for r, n in enumerate(sizes)]
            got = await asyncio.gather(*(batcher.submit(x) for x in reqs))
            for r, (x, rows) in enumerate(zip(reqs, got)):
                assert rows.flatten().tolist() == [100 * r + i for i in range(len(x))]
            assert sum(passes) == sum(sizes) and max(passes) <= MAX_BATCH
            assert len(passes) == -(-sum(sizes) // MAX_BATCH)  # passes are filled, not split per request
            assert (batcher.batches, batcher.images, batcher.largest) == (8 + len(passes), 64 + sum(sizes), MAX_BATCH)
        finally:
            batcher.close()

    asyncio.run(scenario())


def test_max_batch_caps_a_large_request(server, digit):
    before = health(server)
    r = post(server.url, *[digit] * 20)
    assert r.status_code == 200 and len(r.json()) == 20
    after = health(server)
    assert after["images"] - before["images"] == 20
    assert after["batches"] - before["batches"] == 3  # 8 + 8 + 4
    assert after["largest_batch"] == MAX_BATCH and after["limits"]["max_batch"] == MAX_BATCH


# --------------------------------------------------------------------------- top_k

@pytest.mark.parametrize("top_k", ["²", "9" * 5000, "٣", "+3", " 3", "3.0", "1e3", "0", "-1", "", "0x3", "1000000"])
def test_bad_top_k_is_422_json(server, digit, top_k):
    r = post(server.url, digit, params={"top_k": top_k})
    assert r.status_code == 422, r.text
    assert "top_k" in r.json()["error"] and len(r.json()["error"]) < 200
    assert_serving(server, digit)


def test_top_k_over_the_classes_is_clamped(server, digit):
    for top_k, n in (("1", 1), ("10", 10), ("999999", 10)):
        r = post(server.url, digit, params={"top_k": top_k})
        assert r.status_code == 200 and len(r.json()[0]["confidences"]) == n, r.text


# --------------------------------------------------------------------------- bytes in flight

def test_health_says_the_limits(server):
    limits = health(server)["limits"]
    assert limits["max_request_mb"] == MAX_REQUEST_MB and limits["max_inflight_mb"] == MAX_INFLIGHT_MB
    assert limits["keep_alive_s"] == KEEP_ALIVE_S and limits["body_timeout_s"] == BODY_TIMEOUT_S
    assert limits["max_connections"] == MAX_CONNECTIONS


@pytest.mark.parametrize("path,ctype", [("/v1/predict", "multipart/form-data; boundary=b"),
                                        ("/gradio_api/queue/join", "application/json"),
                                        ("/gradio_api/upload", "multipart/form-data; boundary=b")])
def test_request_over_max_request_mb_is_413_unread(server, digit, path, ctype):
    s = connect(server)
    s.sendall(multipart_head(int(MAX_REQUEST_MB * 1e6) + 1, path, ctype) + b"x" * 100)
    raw, took = read_until_closed(s)
    status, body, _ = status_and_json(raw)
    assert status == 413 and f"at most {MAX_REQUEST_MB:g} MB per request" in body["error"]
    assert_serving(server, digit)


def test_chunked_body_over_max_request_mb_is_413(server, digit):
    s = connect(server)
    s.sendall(b"POST /gradio_api/queue/join HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    chunk = b"x" * 100_000
    for _ in range(int(MAX_REQUEST_MB * 1e6 / len(chunk)) + 1):  # just over the limit, then wait
        s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    status, body, _ = status_and_json(read_until_closed(s)[0])
    assert status == 413 and "too large" in body["error"]
    assert health(server)["inflight_mb"] == 0
    assert_serving(server, digit)


def test_budget_full_is_503_with_retry_after(server, digit):
    """One client holds 1.5 MB of the 3 MB budget (its body half sent); another declaring 1.9 MB
    is drained and refused with 503 + Retry-After; once the first finishes, the second fits."""
    holder = connect(server)
    declared = int(1.9e6)
    prefix, suffix = NOTE, b"\r\n--b--\r\n"
    filler = declared - len(prefix) - len(suffix)
    holder.sendall(multipart_head(declared) + prefix + b"x" * 1_500_000)
    deadline = time.monotonic() + CUT_OFF_S
    while health(server)["inflight_mb"] < 1.4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(server)["inflight_mb"] >= 1.4

    second = connect(server)
    second.sendall(multipart_head(declared) + b"y" * declared)
    status, body, headers = status_and_json(read_until_closed(second)[0])
    assert status == 503 and "busy" in body["error"] and int(headers["retry-after"]) >= 1

    holder.sendall(b"x" * (filler - 1_500_000) + suffix)  # the rest: served (400: it has no files)
    status, body, _ = status_and_json(read_until_closed(holder)[0])
    assert status == 400 and "no files" in body["error"]
    assert health(server)["inflight_mb"] == 0
    assert_serving(server, digit)


# --------------------------------------------------------------------------- slow and idle clients

def test_unfinished_bodies_are_cut_off_408(server, digit):
    """Content-Length larger than sent, and chunked without its last chunk: 408 after the body
    timeout, the connection closed, the bytes given back."""
    unfinished = connect(server)
    unfinished.sendall(multipart_head(100_000) + NOTE + b"z" * 1000)
    chunked = connect(server)
    chunked.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                    b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(NOTE), NOTE))
    for s in (unfinished, chunked):
        raw, took = read_until_closed(s)
        status, body, _ = status_and_json(raw)
        assert status == 408 and "too slow" in body["error"]
        assert took < BODY_TIMEOUT_S + 4
    assert health(server)["inflight_mb"] == 0
    assert_serving(server, digit)


def test_slow_loris_cut_off_while_valid_clients_are_served(server, digit):
    """Clients that open a connection and send nothing, half a request head, or a body a byte at
    a time are closed within seconds; meanwhile (and after) valid clients are answered."""
    idle = [connect(server) for _ in range(3)]
    half_head = []
    for _ in range(3):
        s = connect(server)
        s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart")
        half_head.append(s)
    trickle = connect(server)
    trickle.sendall(multipart_head(1_000_000) + NOTE)
    stop = threading.Event()

    def drip():  # a byte every 0.2 s: far below 64 kB/s
        try:
            while not stop.is_set():
                trickle.sendall(b"x")
                time.sleep(0.2)
        except OSError:
            pass

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        for _ in range(5):  # served while the slow clients hold their connections
            assert_serving(server, digit)
        for s in idle + half_head:
            raw, took = read_until_closed(s)
            assert raw == b"" and took < KEEP_ALIVE_S + 4
        raw, took = read_until_closed(trickle)
        assert status_and_json(raw)[0] == 408
    finally:
        stop.set()
        dripper.join(5)
    assert_serving(server, digit)


def test_idle_keep_alive_connection_is_closed(server, digit):
    s = connect(server)
    s.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.2)
    first = s.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    raw, took = read_until_closed(s)
    assert took < KEEP_ALIVE_S + 4


def test_connections_over_the_cap_are_refused_503(server, digit):
    held = [connect(server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.1)
    extra = connect(server)
    raw, took = read_until_closed(extra)
    status, body, headers = status_and_json(raw)
    assert status == 503 and "connections" in body["error"] and "retry-after" in headers
    for s in held:  # idle: closed by the keep-alive limit, which frees their places
        read_until_closed(s)
    assert_serving(server, digit)


@pytest.mark.parametrize("impl", ["h11", "httptools"])
def test_guarded_protocol_on_both_uvicorn_parsers(impl):
    """The head deadline and the connection cap on either of uvicorn's HTTP parsers (a Space
    without httptools runs h11), around a trivial app: a half-sent head and an idle connection
    are closed, the connection over the cap gets 503, a complete request is answered."""
    import importlib
    import uvicorn
    from serve.limits import guarded_protocol
    base = (importlib.import_module("uvicorn.protocols.http.h11_impl").H11Protocol if impl == "h11"
            else importlib.import_module("uvicorn.protocols.http.httptools_impl").HttpToolsProtocol)

    async def app(scope, receive, send):
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
            await send({"type": "http.response.body", "body": b"ok"})

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=KEEP_ALIVE_S,
                            http=guarded_protocol(3, KEEP_ALIVE_S, base=base))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)

        at = type("At", (), {"port": port})  # what `connect` reads of a server
        warm = connect(at)  # the first request does one-off work (h11 under pytest: seconds) before the timed part
        warm.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_until_closed(warm)[0].startswith(b"HTTP/1.1 200")
        idle, half = connect(at), connect(at)
        half.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        ok = connect(at)
        deadline = time.monotonic() + 5
        while len(server.server_state.connections) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)  # until the server has taken all three
        over = connect(at)
        assert status_and_json(read_until_closed(over)[0])[0] == 503
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        raw, took = read_until_closed(ok)  # answered, then closed as idle after the keep-alive
        assert raw.startswith(b"HTTP/1.1 200") and raw.endswith(b"ok") and took < KEEP_ALIVE_S + 4
        for s in (idle, half):
            raw, took = read_until_closed(s)
            assert raw == b"" and took < KEEP_ALIVE_S + 4
    finally:
        server.should_exit = True
        thread.join(10)
