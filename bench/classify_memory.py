"""What one image at the per-file limit costs the server in memory on POST /v1/classify, raw and as
JSON base64, beside /v1/predict's multipart: the bodies `--max-inflight-mb` counts are the bytes on
the wire, and this says how much resident memory each such byte costs on each route.

    python bench/classify_memory.py [models/mnist] [--max-file-mb 20] [--repeat 3]

It starts `python -m serve MODEL --max-file-mb N` on a free port of 127.0.0.1 and sends, one at a
time on fresh connections, a file of exactly N MB that costs nothing to decode (a 28x28 PNG padded
after its end, `serve_memory.padded_png`), so that what is measured is holding and parsing the
body. Each route gets a fresh server (memory freed by one route stays resident and would be
reused by the next); its peak RSS is reset after a small warm-up request (/proc/PID/clear_refs)
and read after `--repeat` requests. Progress goes to stderr; the last line on stdout is a
one-line JSON summary.
"""
from __future__ import annotations

import argparse
import base64
import json
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from serve_load import memory_mb, stop_server  # noqa: E402
from serve_memory import multipart, padded_png, post, reset_peak, start  # noqa: E402

log = logging.getLogger("bench.classify_memory")


def small(path: str, kind: str) -> tuple[list[bytes], int, str]:
    """A 1 kB request of the same kind, to warm a route up."""
    image = padded_png(1000)
    if kind.startswith("multipart"):
        return multipart([("w.png", image)])
    if kind == "application/json":
        body = json.dumps({"inputs": base64.b64encode(image).decode()}).encode()
        return [body], len(body), kind
    return [image], len(image), kind


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", nargs="?", default=str(ROOT / "models" / "mnist"))
    p.add_argument("--max-file-mb", type=float, default=20.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    size = int(args.max_file_mb * 1e6)
    image = padded_png(size)
    b64 = json.dumps({"inputs": base64.b64encode(image).decode(), "parameters": {"top_k": 3}}).encode()
    parts, length, ctype = multipart([("f.png", image)])
    cases = {"predict_multipart": ("/v1/predict", parts, length, ctype),
             "classify_raw": ("/v1/classify", [image], len(image), "image/png"),
             "classify_json_base64": ("/v1/classify", [b64], len(b64), "application/json")}
    summary = {"max_file_mb": args.max_file_mb}
    for name, (path, body, n, kind) in cases.items():
        # A fresh server per route: memory one route freed stays resident and would be reused by the next.
        proc, port = start(args.model, ROOT, ["--max-file-mb", str(args.max_file_mb)])
        try:
            post(port, path, *small(path, kind))  # warm: the route's first-request allocations
            base = memory_mb(proc.pid)["rss_mb"]
            reset_peak(proc.pid)
            for _ in range(args.repeat):
                r = post(port, path, body, n, kind)
                if r["status"] != 200:
                    raise SystemExit(f"{name}: {r['status']} {r['body']}")
            peak = memory_mb(proc.pid)["peak_rss_mb"] - base
        finally:
            stop_server(proc)
        summary[name] = {"body_mb": round(n / 1e6, 2), "baseline_rss_mb": base, "peak_over_baseline_mb": round(peak, 1),
                         "mb_per_body_mb": round(peak / (n / 1e6), 2)}
        log.info("%s: %s", name, summary[name])
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
