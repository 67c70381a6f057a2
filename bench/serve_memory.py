"""Measure the server's memory under the worst requests its limits allow, and that the limits hold.

    python bench/serve_memory.py [models/mnist] [--max-request-mb 100] [--max-inflight-mb 300]

It starts `python -m serve MODEL` on a free port of 127.0.0.1 with the given limits and plays the
clients from this process. Every file sent is the worst kind for memory: exactly the per-file limit
on the wire (`--max-file-mb`), decoding to the pixel limit (an 8000x8000 RGB PNG: 192 MB decoded).
The server's resident memory comes from /proc (its peak reset before each phase). Phases:

  one         one request as large as allowed (`--max-request-mb`, in files at the per-file limit)
  concurrent  `inflight / request + 1` such requests at once: the budget holds all but one, and the
              one over it must be refused (503 + Retry-After), not held
  refusals    a body over `--max-request-mb` on the API and on Gradio's JSON route (413), with
              nothing read
  connections `--max-connections` idle connections (what each costs in memory), one more (503),
              how long the server keeps the idle ones (`--keep-alive`), and a valid request after
  ui_burst    `--ui-burst` Gradio requests at once through gradio_client, each one 8000x8000 PNG
              that is small on the wire (a ramp, 0.2 MB) but 64 MP to decode: what bounds it is
              `--max-decode-mp` (pixels decoding at once, server-wide), not the bodies; the peak
              decoding /metrics saw, and the memory held once the burst is answered

`--checkout DIR` serves from another checkout (e.g. one before the limits existed, with
`--no-limit-flags`) for a before/after comparison. Progress goes to stderr; the last line on stdout
is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import http.client
import io
import json
import logging
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import HOST, free_port, memory_mb, run_together, stop_server  # noqa: E402

log = logging.getLogger("bench.serve_memory")
SIDE = 8000  # px: 8000 x 8000 = 64,000,000, exactly the pixel limit (models.imageio.MAX_PIXELS)


def worst_png(size: int) -> bytes:
    """An 8000x8000 RGB PNG of exactly `size` bytes: noise in enough rows to be `size` bytes
    compressed, black below, padded after its end (decoders stop at IEND) to the exact size."""
    import numpy as np
    from PIL import Image
    rows = max(1, int(size * 0.95) // (SIDE * 3))  # noise compresses to ~1.02x
    a = np.zeros((SIDE, SIDE, 3), dtype=np.uint8)
    a[:rows] = np.random.default_rng(0).integers(0, 256, (rows, SIDE, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    if len(data) > size:
        raise SystemExit(f"the worst-case PNG came out at {len(data):,} bytes, over {size:,}")
    return data + b"\0" * (size - len(data))


def padded_png(size: int) -> bytes:
    """A 28x28 PNG padded after its end to `size` bytes: a full-size body that costs nothing to
    decode, so that a phase measures what holding the bytes costs."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("L", (28, 28)).save(buf, format="PNG")
    return buf.getvalue() + b"\0" * (size - len(buf.getvalue()))


def multipart(files: list[tuple[str, bytes]]) -> tuple[list[bytes], int, str]:
    """The body as parts (so the files are not copied into one buffer), its length, its type."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, data in files:
        parts += [(f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                   f"Content-Type: image/png\r\n\r\n").encode(), data, b"\r\n"]
    parts.append(f"--{boundary}--\r\n".encode())
    return parts, sum(map(len, parts)), f"multipart/form-data; boundary={boundary}"


def post(port: int, path: str, parts: list[bytes], length: int, ctype: str, timeout: float = 300) -> dict:
    """One POST on a fresh connection; returns status, body, seconds. A server that answers before
    the body is all sent (and closes) is read, not counted as an error."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", ctype)
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        try:
            for p in parts:
                conn.send(p)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered early; the answer is in the socket
        resp = conn.getresponse()
        return {"status": resp.status, "body": resp.read()[:300].decode(errors="replace"),
                "retry_after": resp.getheader("Retry-After"), "s": round(time.perf_counter() - t0, 2)}
    except OSError as e:
        return {"status": None, "body": f"{type(e).__name__}: {e}", "s": round(time.perf_counter() - t0, 2)}
    finally:
        conn.close()


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # Linux: VmHWM := VmRSS


def health(port: int) -> dict:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.request("GET", "/v1/health")
    return json.loads(conn.getresponse().read())


def start(model: str, checkout: Path, flags: list[str], timeout: float = 300) -> tuple[subprocess.Popen, int]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout), "GRADIO_ANALYTICS_ENABLED": "False"}
    proc = subprocess.Popen([sys.executable, "-m", "serve", model, "--port", str(port), "--quiet", *flags],
                            cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            if "limits" in health(port):  # ready: while it starts, /v1/health answers 503 without them
                return proc, port
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    stop_server(proc)
    raise SystemExit(f"server did not answer /v1/health within {timeout:.0f} s")


def ui_burst_phase(pid: int, port: int, n: int, folder: Path) -> dict:
    """`n` gradio_client predictions of one 8000x8000 ramp PNG each (synthetic.photoset.ramp_png), all at once."""
    from gradio_client import Client, handle_file
    from synthetic.photoset import ramp_png
    path = folder / "ramp.png"
    path.write_bytes(ramp_png(SIDE, SIDE))
    client = Client(f"http://{HOST}:{port}/", verbose=False, httpx_kwargs={"timeout": 600})
    reset_peak(pid)
    before = memory_mb(pid)
    outcomes: list = [None] * n

    def one(i):
        try:
            client.predict(handle_file(str(path)), api_name="/predict")
            outcomes[i] = "ok"
        except Exception as e:  # noqa: BLE001  (counted)
            outcomes[i] = f"{type(e).__name__}: {e}"[:200]
    seconds = run_together([threading.Thread(target=one, args=(i,)) for i in range(n)])
    time.sleep(1)
    mem = memory_mb(pid)
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/metrics")
    metrics = conn.getresponse().read().decode()
    peak = [float(line.split()[1]) for line in metrics.splitlines() if line.startswith("serve_decode_pixels_peak ")]
    return {"requests": n, "file_bytes": path.stat().st_size, "ok": outcomes.count("ok"),
            "errors": sorted({o for o in outcomes if o != "ok"})[:3], "s": round(seconds, 1),
            "rss_before_mb": before["rss_mb"], **mem,
            "peak_over_before_mb": round(mem["peak_rss_mb"] - before["rss_mb"], 1),
            "held_after_mb": round(mem["rss_mb"] - before["rss_mb"], 1),
            "decode_peak_mp": peak[0] / 1e6 if peak else None}


def connections_phase(pid: int, port: int, limits: dict) -> dict:
    import socket
    n = limits["max_connections"]
    before = memory_mb(pid)["rss_mb"]
    t0 = time.monotonic()
    held = [socket.create_connection((HOST, port), timeout=60) for _ in range(n)]
    time.sleep(0.5)
    after = memory_mb(pid)["rss_mb"]
    extra = socket.create_connection((HOST, port), timeout=10)
    answer = extra.recv(200).split(b"\r\n", 1)[0].decode(errors="replace")
    extra.close()
    closed = []
    for s in held:
        try:
            s.recv(1)  # b"" once the server closes it
        except OSError:
            pass
        closed.append(time.monotonic() - t0)
        s.close()
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    conn.request("GET", "/v1/health")
    ok = conn.getresponse().status
    log.info("connections: %d idle: +%.1f MB; extra: %s; closed after %.1f s", n, after - before, answer, max(closed))
    return {"idle": n, "rss_per_connection_kb": round((after - before) * 1024 / n, 1), "extra_answer": answer,
            "idle_closed_after_s": round(max(closed), 2), "served_after": ok}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models" / "mnist"))
    p.add_argument("--max-file-mb", type=float, default=20.0)
    p.add_argument("--max-request-mb", type=float, default=None, help="default: the server's")
    p.add_argument("--max-inflight-mb", type=float, default=None, help="default: the server's")
    p.add_argument("--checkout", type=Path, default=ROOT, help="serve from this checkout")
    p.add_argument("--no-limit-flags", action="store_true", help="for a checkout without --max-request-mb")
    p.add_argument("--request-mb", type=float, default=None, help="with --no-limit-flags: the request size to send")
    p.add_argument("--ui-burst", type=int, default=32, help="Gradio requests at once in the ui_burst phase (0: skip)")
    p.add_argument("--max-decode-mp", type=float, default=None, help="default: the server's")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio_client logs every request at INFO

    flags = ["--max-file-mb", str(args.max_file_mb)]
    if not args.no_limit_flags:
        for flag, v in (("--max-request-mb", args.max_request_mb), ("--max-inflight-mb", args.max_inflight_mb),
                        ("--max-decode-mp", args.max_decode_mp)):
            if v is not None:
                flags += [flag, str(v)]
    proc, port = start(args.model, args.checkout.resolve(), flags)
    summary: dict = {"flags": flags}
    try:
        limits = health(port)["limits"]
        request_mb = args.request_mb or limits.get("max_request_mb") or 100.0
        inflight_mb = limits.get("max_inflight_mb")
        file_bytes = int(args.max_file_mb * 1_000_000)
        n_files = -(-int(request_mb * 1_000_000) // file_bytes)
        per_file = min(file_bytes, (int(request_mb * 1_000_000) - 2_000) // n_files - 200)  # room for part headers
        log.info("making the worst-case file: %d bytes, %dx%d px", per_file, SIDE, SIDE)
        png = worst_png(per_file)
        parts, length, ctype = multipart([(f"{i}.png", png) for i in range(n_files)])
        assert length <= request_mb * 1_000_000, (length, request_mb)
        summary["request"] = {"files": n_files, "file_bytes": per_file, "body_mb": round(length / 1e6, 2),
                              "decoded_mb_per_file": SIDE * SIDE * 3 / 1e6}

        from PIL import Image
        buf = io.BytesIO()
        Image.new("L", (28, 28)).save(buf, format="PNG")
        post(port, "/v1/predict", *multipart([("warm.png", buf.getvalue())]))  # first-request set-up out of the way
        base = memory_mb(proc.pid)
        log.info("baseline: %s", base)
        summary["baseline"] = base

        reset_peak(proc.pid)
        light = [padded_png(per_file) for _ in range(n_files)]
        lparts, llength, lctype = multipart([(f"{i}.png", d) for i, d in enumerate(light)])
        del light
        r = post(port, "/v1/predict", lparts, llength, lctype)
        del lparts
        mem = memory_mb(proc.pid)
        log.info("bytes only: %s %s %s", r["status"], r["s"], mem)
        summary["bytes_only"] = {"status": r["status"], "s": r["s"], **mem,
                                 "peak_over_baseline_mb": round(mem["peak_rss_mb"] - base["rss_mb"], 1),
                                 "peak_per_body_mb": round((mem["peak_rss_mb"] - base["rss_mb"]) / (llength / 1e6), 2)}

        reset_peak(proc.pid)
        r = post(port, "/v1/predict", parts, length, ctype)
        mem = memory_mb(proc.pid)
        log.info("one: %s %s %s", r["status"], r["s"], mem)
        summary["one"] = {"status": r["status"], "s": r["s"], **mem,
                          "peak_over_baseline_mb": round(mem["peak_rss_mb"] - base["rss_mb"], 1)}
        if r["status"] != 200:
            summary["one"]["body"] = r["body"]

        if inflight_mb:  # a checkout with the budget
            n = int(inflight_mb // request_mb) + 1
            reset_peak(proc.pid)
            before = memory_mb(proc.pid)
            results: list = [None] * n
            seconds = run_together([threading.Thread(target=lambda i=i: results.__setitem__(
                i, post(port, "/v1/predict", parts, length, ctype))) for i in range(n)])
            mem = memory_mb(proc.pid)
            statuses = [x["status"] for x in results]
            log.info("concurrent x%d: %s %s", n, statuses, mem)
            summary["concurrent"] = {"requests": n, "statuses": statuses, "s": round(seconds, 2),
                                     "retry_after": sorted({x.get("retry_after") for x in results} - {None}),
                                     "rss_before_mb": before["rss_mb"], **mem,
                                     "peak_over_baseline_mb": round(mem["peak_rss_mb"] - base["rss_mb"], 1),
                                     "peak_inflight_mb": health(port).get("peak_inflight_mb")}
            over = [b"x" * 1000]
            big = int(request_mb * 1_000_000) + 1
            refusals = {}
            for route, ct in (("/v1/predict", ctype), ("/gradio_api/queue/join", "application/json")):
                conn = http.client.HTTPConnection(HOST, port, timeout=30)
                conn.putrequest("POST", route)
                conn.putheader("Content-Type", ct)
                conn.putheader("Content-Length", str(big))
                conn.endheaders()
                conn.send(over[0])
                resp = conn.getresponse()
                refusals[route] = {"status": resp.status, "body": resp.read()[:200].decode(errors="replace")}
                conn.close()
            summary["refusals"] = refusals
            summary["connections"] = connections_phase(proc.pid, port, health(port)["limits"])
        if args.ui_burst:
            import tempfile
            with tempfile.TemporaryDirectory() as folder:
                summary["ui_burst"] = ui_burst_phase(proc.pid, port, args.ui_burst, Path(folder))
            log.info("ui burst: %s", summary["ui_burst"])
        summary["end"] = memory_mb(proc.pid)
        health_limits = health(port)["limits"]
    finally:
        stop_server(proc)

    targets = {}
    if "concurrent" in summary:
        st = summary["concurrent"]["statuses"]
        targets["one_request_200"] = summary["one"]["status"] == 200
        targets["budget_refuses_the_extra_request_503"] = st.count(503) >= 1 and st.count(200) >= 1 and set(st) <= {200, 503}
        targets["oversized_413_everywhere"] = all(v["status"] == 413 for v in summary["refusals"].values())
        c = summary["connections"]
        targets["extra_connection_503"] = "503" in c["extra_answer"] and c["served_after"] == 200
    if "ui_burst" in summary:
        b = summary["ui_burst"]
        targets["ui_burst_all_answered"] = b["ok"] == b["requests"]
        if b["decode_peak_mp"] is not None:  # a checkout with the decoding budget
            targets["ui_burst_decoding_within_budget"] = b["decode_peak_mp"] <= health_limits.get("max_decode_mp", 0)
    summary["targets"] = targets
    summary["all_targets_met"] = all(targets.values()) if targets else None
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
