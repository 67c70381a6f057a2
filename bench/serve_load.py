"""Load-test the server: the JSON API and the Gradio endpoint, with concurrent keep-alive clients.

    python bench/serve_load.py [models/mnist] [--requests 2000] [--clients 16]

It starts `python -m serve MODEL` on a free port of 127.0.0.1 (a separate process), and this
process plays the clients: `--clients` threads, each with its own keep-alive connection, one
MNIST digit per request, together `--requests` requests per phase (each phase also stops after
`--max-seconds`). Phases:

  http         POST /v1/predict, one PNG per request. Target: 0 errors, >= 150 requests/s.
  gradio       the Gradio endpoint `predict`, called with `gradio_client` (one Client per thread,
               as the reference figures were taken) and with a light client speaking the same
               protocol (upload, /gradio_api/call/predict, read the event stream), which leaves
               more of the machine to the server. Target: 0 errors.
  gradio_noop  the same app and clients, with functions that do nothing (a second server).
               Target: gradio >= 0.8 x gradio_noop.
  overload     more work than the model can do: `--overload-clients` keep-alive clients, each
               sending `--overload-files` digits per request without pause, for
               `--overload-seconds`, against two servers in turn: one with the model's queue
               bounded by `--max-queue` (the server's default unless `--overload-queue`), one
               unbounded (`--max-queue` and `--timeout` out of reach). Reported for each: p50/p99
               of the 200s, how many 503s (each with Retry-After) and any other answer, and what
               /metrics said during the run (polled every 0.2 s: the deepest queue seen, the
               rejections by reason, the forward passes). A client told 503 waits its
               Retry-After (`--overload-retry at-once`: retries at once). Targets: only 200s and
               503s, and the p99 with the bound below the p99 without it.

Every answer is checked: status 200, and its label equal to the digit's true label for digits the
model gets right offline (the Predictor is the oracle). The server's memory (RSS, peak) is read
from /proc. Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.serve_load")
HOST = "127.0.0.1"  # load tests never leave this machine


# --------------------------------------------------------------------------- the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def start_server(model: str, noop: bool = False, timeout: float = 180.0, args: tuple = ()) -> tuple[subprocess.Popen, int]:
    """`python -m serve MODEL *args` (or this script's --serve-noop twin) on a free port; waits for /v1/health."""
    port = free_port()
    if noop:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--serve-noop", model, "--port", str(port)]
    else:
        cmd = [sys.executable, "-m", "serve", model, "--port", str(port), "--quiet", *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
    # The server's log goes to a file: a pipe nobody reads fills up and then blocks the server.
    log_file = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log_file.seek(0)
            raise SystemExit(f"server exited with {proc.returncode}: {log_file.read()[-2000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/v1/health")
            if conn.getresponse().status == 200:
                return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server did not answer /v1/health within {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run_together(threads: list[threading.Thread]) -> float:
    """Start every thread, then join them all: the seconds from the first start to the last end."""
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def memory_mb(pid: int) -> dict:
    """Resident memory now and at its peak, from /proc (Linux)."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {"rss_mb": fields.get("VmRSS"), "peak_rss_mb": fields.get("VmHWM")}


def serve_noop(argv) -> None:
    """The baseline server: the same app whose functions do nothing."""
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("--port", type=int)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from serve.app import launch
    launch(args.model, host=HOST, port=args.port, noop=True)


# --------------------------------------------------------------------------- the clients

def multipart(field: str, filename: str, data: bytes, content_type: str = "image/png") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: {content_type}\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


class Client:
    """One keep-alive connection (reconnects if the server closes it)."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection(HOST, port, timeout=60)

    def request(self, method, path, body=None, headers=None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                self.last_headers = {k.lower(): v for k, v in resp.getheaders()}
                return resp.status, resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = http.client.HTTPConnection(HOST, self.port, timeout=60)
                if attempt:
                    raise
        raise AssertionError("unreachable")


def http_predict(client: Client, digit) -> str:
    body, ctype = multipart("files", "digit.png", digit[0])
    status, data = client.request("POST", "/v1/predict", body, {"Content-Type": ctype})
    if status != 200:
        raise RuntimeError(f"HTTP {status}: {data[:200]!r}")
    return json.loads(data)[0]["label"]


def gradio_raw_predict(client: Client, digit) -> str:
    """Gradio's own protocol, the steps `gradio_client` takes (upload, call, read the event
    stream), spoken by a light client: more of the machine is left to the server."""
    body, ctype = multipart("files", "digit.png", digit[0])
    status, data = client.request("POST", "/gradio_api/upload", body, {"Content-Type": ctype})
    if status != 200:
        raise RuntimeError(f"upload: HTTP {status}: {data[:200]!r}")
    path = json.loads(data)[0]
    payload = json.dumps({"data": [{"path": path, "meta": {"_type": "gradio.FileData"}, "orig_name": "digit.png"}]})
    status, data = client.request("POST", "/gradio_api/call/predict", payload, {"Content-Type": "application/json"})
    if status != 200:
        raise RuntimeError(f"call: HTTP {status}: {data[:200]!r}")
    event_id = json.loads(data)["event_id"]
    status, data = client.request("GET", f"/gradio_api/call/predict/{event_id}")
    text = data.decode()
    if status != 200 or "event: complete" not in text:
        raise RuntimeError(f"result: HTTP {status}: {text[-300:]!r}")
    last = [line for line in text.splitlines() if line.startswith("data:")][-1]
    return json.loads(last[5:])[0]["label"]


class GradioClient:
    """`gradio_client.Client`, one per client thread (it keeps its own connections)."""

    def __init__(self, port: int):
        from gradio_client import Client as _Client
        self.client = _Client(f"http://{HOST}:{port}/", verbose=False)


def gradio_client_predict(client: GradioClient, digit) -> str:
    from gradio_client import handle_file
    return client.client.predict(handle_file(digit[1]), api_name="/predict")["label"]


PROTOCOLS = {  # phase name -> (client factory, call)
    "http": (Client, http_predict),
    "gradio_client": (GradioClient, gradio_client_predict),
    "gradio_raw": (Client, gradio_raw_predict),
}


def run_phase(name: str, port: int, protocol: str, digits: list, n_requests: int, n_clients: int,
              max_seconds: float, warmup: int = 32) -> dict:
    """`n_clients` threads share `n_requests` calls; each answer is checked against its label."""
    make_client, call = PROTOCOLS[protocol]
    lock = threading.Lock()
    counter = iter(range(n_requests))
    latencies, errors, wrong = [], [], []
    clients = [make_client(port) for _ in range(n_clients)]
    for i in range(warmup):  # connections up, caches warm; not counted
        call(clients[i % n_clients], digits[i % len(digits)])
    deadline = time.monotonic() + max_seconds

    def worker(client: Client):
        while time.monotonic() < deadline:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            digit = digits[i % len(digits)]
            expected = digit[2]
            t = time.perf_counter()
            try:
                label = call(client, digit)
            except Exception as e:  # every failure is counted and a few are shown
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - t
            with lock:
                latencies.append(elapsed)
                if expected is not None and label != expected:
                    wrong.append((i, label, expected))

    wall = run_together([threading.Thread(target=worker, args=(c,)) for c in clients])
    done = len(latencies) + len(errors)
    lat = sorted(latencies) or [float("nan")]
    result = {"client": protocol, "requests": done, "ok": len(latencies), "errors": len(errors), "wrong_labels": len(wrong),
              "seconds": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
              "p50_ms": round(statistics.median(lat) * 1e3, 1),
              "p99_ms": round(lat[min(len(lat) - 1, int(0.99 * (len(lat) - 1)))] * 1e3, 1),
              "completed_all": done == n_requests}
    if errors:
        result["first_errors"] = errors[:3]
    log.info("%s: %s", name, result)
    return result


def scrape(port: int) -> dict:
    """GET /metrics, parsed by prometheus_client: {(sample name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run_overload(name: str, port: int, digits: list, n_clients: int, n_files: int, seconds: float,
                 honour_retry_after: bool = True) -> dict:
    """`n_clients` clients send `n_files` digits per request, back to back, for `seconds`; /metrics
    is polled meanwhile. Latencies are of the 200s; the 503s and anything else are counted. A
    client told 503 waits the Retry-After it was given (`honour_retry_after`), as a well-behaved
    client does, or retries at once."""
    lock = threading.Lock()
    ok, busy, other, retry_after = [], [], [], set()
    bodies = []
    for i in range(16):  # a few request bodies, built once
        boundary = uuid.uuid4().hex
        parts = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{j}.png\"\r\n"
                         f"Content-Type: image/png\r\n\r\n".encode() + digits[(i * n_files + j) % len(digits)][0] + b"\r\n"
                         for j in range(n_files))
        bodies.append((parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"))
    start = scrape(port)
    deadline = time.monotonic() + seconds
    depth = []

    late = []  # scrapes not answered within 10 s: the event loop is that busy

    def poll():
        while time.monotonic() < deadline:
            try:
                depth.append(_value(scrape(port), "serve_queue_images"))
            except OSError:
                late.append(1)
            time.sleep(0.2)

    def worker(k: int):
        client = Client(port)
        i = k
        while time.monotonic() < deadline:
            body, ctype = bodies[i % len(bodies)]
            i += 1
            t = time.perf_counter()
            try:
                status, data = client.request("POST", "/v1/predict", body, {"Content-Type": ctype})
                headers = client.last_headers
            except Exception as e:
                with lock:
                    other.append(f"{type(e).__name__}: {e}")
                continue
            elapsed = time.perf_counter() - t
            with lock:
                if status == 200:
                    ok.append(elapsed)
                elif status == 503:
                    busy.append(elapsed)
                    retry_after.add(headers.get("retry-after"))
                else:
                    other.append(f"HTTP {status}: {data[:120]!r}")
            if status == 503 and honour_retry_after:
                time.sleep(max(0.0, min(float(headers.get("retry-after") or 0), deadline - time.monotonic())))

    wall = run_together([threading.Thread(target=worker, args=(k,)) for k in range(n_clients)] + [threading.Thread(target=poll)])
    end = scrape(port)

    def pct(xs, q):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * (len(xs) - 1)))] * 1e3, 1) if xs else None

    rejected = {dict(k[1])["reason"]: v - start.get(k, 0.0) for k, v in end.items()
                if k[0] == "serve_rejected_total" and v - start.get(k, 0.0)}
    passes = _value(end, "serve_forward_seconds_count") - _value(start, "serve_forward_seconds_count")
    images = _value(end, "serve_batch_images_sum") - _value(start, "serve_batch_images_sum")
    result = {"clients": n_clients, "files_per_request": n_files, "honour_retry_after": honour_retry_after,
              "seconds": round(wall, 1),
              "ok": len(ok), "busy_503": len(busy), "other": len(other),
              "ok_per_s": round(len(ok) / wall, 1), "images_per_s": round(images / wall, 1),
              "p50_ms": pct(ok, 0.5), "p99_ms": pct(ok, 0.99), "busy_p99_ms": pct(busy, 0.99),
              "retry_after": sorted(r for r in retry_after if r is not None),
              "metrics": {"queue_images_max": max(depth, default=None), "scrapes": len(depth),
                          "scrapes_over_10s": len(late), "rejected": rejected,
                          "forward_passes": passes, "images_per_pass": round(images / passes, 1) if passes else None}}
    if other:
        result["first_other"] = other[:3]
    log.info("%s: %s", name, result)
    return result


def _value(metrics: dict, name: str) -> float:
    return metrics.get((name, ()), 0.0)


def load_digits(model: str, folder: Path, n: int = 256) -> list[tuple[bytes, str, str | None]]:
    """n MNIST test digits as (PNG bytes, PNG file in `folder`, expected label): the label where
    the Predictor (offline) gets the digit right, else None (sent, but not checked)."""
    import io
    from PIL import Image
    from serve.predictor import Predictor
    from train.mnist import load_idx_arrays
    arrays = load_idx_arrays(Path(os.environ.get("MNIST_DIR") or ROOT.parent / "shared" / "data" / "mnist"))
    from serve.source import quiet_known_warnings
    quiet_known_warnings()
    predictor = Predictor.load(model, device="cpu")
    pngs, truths = [], []
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(arrays.valid_images[i]).save(buf, format="PNG")
        pngs.append(buf.getvalue())
        truths.append(str(int(arrays.valid_labels[i])))
    preds = predictor.predict_batch(pngs)
    out = []
    for i, (png, t, p) in enumerate(zip(pngs, truths, preds)):
        path = folder / f"{i}.png"
        path.write_bytes(png)
        out.append((png, str(path), t if p.label == t else None))
    return out


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve-noop":
        serve_noop(argv[1:])
        return {}
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models" / "mnist"))
    p.add_argument("--requests", type=int, default=2000, help="requests per phase")
    p.add_argument("--clients", type=int, default=16, help="concurrent keep-alive clients")
    p.add_argument("--max-seconds", type=float, default=300, help="a phase stops after this long")
    p.add_argument("--phases", default="http,gradio,gradio_noop,overload")
    p.add_argument("--overload-clients", type=int, default=64, help="clients of the overload phase")
    p.add_argument("--overload-files", type=int, default=8, help="digits per request in the overload phase")
    p.add_argument("--overload-seconds", type=float, default=20, help="length of each overload run")
    p.add_argument("--overload-retry", choices=["after", "at-once"], default="after",
                   help="an overload client told 503 waits its Retry-After (after), or retries at once")
    p.add_argument("--overload-queue", type=int, default=None,
                   help="--max-queue of the bounded overload run (default: the server's default)")
    p.add_argument("--gradio-clients", default="gradio_client,gradio_raw",
                   help="clients for the Gradio phases: gradio_client (the library, as the reference "
                        "figures were taken) and/or gradio_raw (the same protocol, lighter)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    phases = args.phases.split(",")
    gradio_clients = args.gradio_clients.split(",")

    summary: dict = {"bench": "serve_load", "model": args.model, "clients": args.clients, "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="serve_load_") as tmp:
        digits = load_digits(args.model, Path(tmp))
        proc, port = start_server(args.model)
        try:
            summary["memory_after_start"] = memory_mb(proc.pid)
            if "http" in phases:
                summary["http"] = run_phase("http", port, "http", digits, args.requests, args.clients,
                                            args.max_seconds)
            if "gradio" in phases:
                summary["gradio"] = {c: run_phase(f"gradio ({c})", port, c, digits, args.requests, args.clients,
                                                  args.max_seconds) for c in gradio_clients}
            summary["memory"] = memory_mb(proc.pid)
            conn = http.client.HTTPConnection(HOST, port)
            conn.request("GET", "/v1/health")
            health = json.loads(conn.getresponse().read())
            summary["forward_passes"] = {"passes": health["batches"], "images": health["images"]}
        finally:
            stop_server(proc)
        if "overload" in phases:
            from serve.limits import Limits
            bound = args.overload_queue or Limits().max_queue
            summary["overload"] = {}
            for label, flags in ((f"max_queue_{bound}", ("--max-queue", bound)),
                                 ("unbounded", ("--max-queue", 10 ** 9, "--timeout", 10 ** 6))):
                proc, port = start_server(args.model, args=flags)
                try:
                    summary["overload"][label] = run_overload(f"overload ({label})", port, digits,
                                                              args.overload_clients, args.overload_files,
                                                              args.overload_seconds,
                                                              args.overload_retry == "after")
                finally:
                    stop_server(proc)
        if "gradio_noop" in phases:
            unchecked = [(png, path, None) for png, path, _ in digits]
            proc, port = start_server(args.model, noop=True)
            try:
                summary["gradio_noop"] = {c: run_phase(f"gradio_noop ({c})", port, c, unchecked, args.requests,
                                                       args.clients, args.max_seconds) for c in gradio_clients}
            finally:
                stop_server(proc)

    targets = {}
    if "http" in summary:
        h = summary["http"]
        targets["http_0_errors"] = h["errors"] == 0 and h["wrong_labels"] == 0 and h["completed_all"]
        targets["http_ge_150_rps"] = h["requests_per_s"] >= 150
    if "gradio" in summary:
        targets["gradio_0_errors"] = all(g["errors"] == 0 and g["wrong_labels"] == 0 and g["completed_all"]
                                         for g in summary["gradio"].values())
    if "gradio" in summary and "gradio_noop" in summary:
        summary["gradio_vs_noop"] = {c: round(summary["gradio"][c]["requests_per_s"] /
                                              summary["gradio_noop"][c]["requests_per_s"], 3) for c in gradio_clients}
        for c, ratio in summary["gradio_vs_noop"].items():
            targets[f"gradio_ge_0.8_noop ({c})"] = ratio >= 0.8
    if "overload" in summary:
        runs = summary["overload"]
        targets["overload_only_200_503"] = all(r["other"] == 0 for r in runs.values())
        bounded = next(r for k, r in runs.items() if k != "unbounded")
        targets["overload_p99_bounded_lt_unbounded"] = (bounded["p99_ms"] or 0) < (runs["unbounded"]["p99_ms"] or 0)
    if "memory" in summary:
        targets["rss_lt_1.5GB"] = (summary["memory"]["peak_rss_mb"] or 0) < 1536
    summary["targets"] = targets
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
