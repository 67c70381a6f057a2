"""Benchmark: `python -m serve` against a LitServe peer on the same weights, under the same `wrk` load.

    python bench/serve_photos.py [--model DIR] [--mnist-model DIR] [--rounds 2] [--seconds 20]
    python bench/serve_photos.py --seconds 5 --warmup 2 --rounds 1 --calib-seconds 3   # a quick check

Two workloads (`--phases`), each on its own model:
  photos  12 MP phone photos (bench/photoset_large.py: 4032x3024 JPEGs, ~3-4 MB) into a 224 px
          resnet18, 8 connections, eight photos per multipart request. Target: ours >= 3x the
          peer's requests/s, 0 errors, p99 reported.
  digits  MNIST test digits (PNG) into the MNIST model, 16 connections, one digit per request
          (64 different digits in turn). Target: ours >= 1.2x the peer's requests/s, 0 errors,
          our p99 no worse than the peer's.
The photo model is `--model`, or one trained here by `python -m train PHOTOS --size 224 --epochs 1`
on a small generated set (its accuracy is beside the point: the network is the same resnet18
either way); the MNIST model is `--mnist-model`, or `python -m train mnist --epochs 1` on
MNIST_DIR's files.

The load: Debian's `wrk` (installed with apt-get if missing), `--wrk-threads` 2, loopback only; a
Lua script builds each multipart body once in `init` (the same bytes a browser or `curl -F` would
send) and counts non-2xx answers and answers without a label in `response()`. Each run is
`--warmup` seconds, discarded, one more request to wait out the warm-up's leftovers, then
`--seconds` measured; wrk's latency percentiles are per request.

The servers run one after the other, never together, alternating (ours first in even rounds, the
peer first in odd ones) for `--rounds` rounds, so that drift in the machine's load falls on both.
Before each run a sample request is checked: one answer per file, each a known class; on digits
the share of right answers is reported, on photos how often the two servers agree. The peer
(bench/litserve_peer.py) is LitServe with its documented batching (`max_batch_size` 64,
`batch_timeout` 0.002 s), one worker on the CPU, PIL decode + resize + the model's own
normalisation; before the rounds each torch thread count in `--peer-threads` gets a
`--calib-seconds` run and the fastest is kept.

Progress goes to stderr; the last line on stdout is a one-line JSON summary, with each target and
whether it was met, and the load average seen.
"""
from __future__ import annotations

import argparse
import http.client
import json
import logging
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.photoset_large import PHONE_SIZE, parse_size  # noqa: E402
from models.cli import int_list  # noqa: E402

log = logging.getLogger("bench.serve_photos")
HOST = "127.0.0.1"  # loopback only
PHOTO_TARGET, DIGIT_TARGET = 3.0, 1.2  # ours / peer, requests per second

WRK_LUA = r"""
-- wrk script: POST multipart/form-data bodies built once per thread in init().
-- args[1]: a manifest file, one request per line, the image files of that request tab-separated.
-- args[2]: seconds to leave uncounted at the start. A wrk run starts with every connection idle,
--          so the first answers only come after one full latency: counting them over the whole
--          run understates the throughput of a slow workload (an 8-photo request can take 10 s).
--          Answers are counted from then on, by the monotonic clock (LuaJIT's FFI).
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local boundary = "----bench-serve-photos-7d9a3c51"
local requests, counter, threads = {}, 1, {}
local measure_from = 0
non2xx, nolabel, counted = 0, 0, 0

function setup(thread)
  table.insert(threads, thread)
end

local function readfile(path)
  local f = assert(io.open(path, "rb"))
  local data = f:read("*a")
  f:close()
  return data
end

function init(args)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "multipart/form-data; boundary=" .. boundary
  for line in io.lines(args[1]) do
    local parts = {}
    for path in string.gmatch(line, "[^\t]+") do
      local name = path:match("([^/]+)$")
      table.insert(parts, "--" .. boundary .. "\r\nContent-Disposition: form-data; name=\"files\"; filename=\""
                   .. name .. "\"\r\nContent-Type: application/octet-stream\r\n\r\n" .. readfile(path) .. "\r\n")
    end
    table.insert(parts, "--" .. boundary .. "--\r\n")
    wrk.body = table.concat(parts)
    table.insert(requests, wrk.format())  -- method, path, headers (Content-Length added) and body
  end
  measure_from = now() + tonumber(args[2] or "0")
end

function request()
  local r = requests[counter]
  counter = counter % #requests + 1
  return r
end

function response(status, headers, body)
  if status < 200 or status > 299 then
    non2xx = non2xx + 1
  elseif not string.find(body, '"label"', 1, true) then
    nolabel = nolabel + 1
  end
  if now() >= measure_from then
    counted = counted + 1
  end
end

function done(summary, latency, requests)
  local n2, nl, nc = 0, 0, 0
  for _, t in ipairs(threads) do
    n2 = n2 + t:get("non2xx")
    nl = nl + t:get("nolabel")
    nc = nc + t:get("counted")
  end
  local e = summary.errors
  io.write(string.format('WRK_JSON {"requests": %d, "counted": %d, "duration_s": %.3f, "non2xx": %d, "nolabel": %d, '
    .. '"connect_errors": %d, "read_errors": %d, "write_errors": %d, "status_errors": %d, "timeouts": %d, '
    .. '"p50_ms": %.2f, "p90_ms": %.2f, "p99_ms": %.2f, "max_ms": %.2f}\n',
    summary.requests, nc, summary.duration / 1e6, n2, nl, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50) / 1e3, latency:percentile(90) / 1e3, latency:percentile(99) / 1e3, latency.max / 1e3))
end
"""


# --------------------------------------------------------------------------- wrk

def ensure_wrk() -> str:
    """The path of `wrk`; installs Debian's package with apt-get if it is missing."""
    path = shutil.which("wrk")
    if path:
        return path
    log.info("wrk is missing: installing Debian's package (apt-get install wrk)")
    for cmd in (["apt-get", "install", "-y", "-q", "wrk"], ["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "wrk"]):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        if path := shutil.which("wrk"):
            return path
    sys.exit("error: wrk is not installed and `apt-get install wrk` failed; install it and rerun")


def run_wrk(wrk: str, lua: Path, manifest: Path, port: int, seconds: float, connections: int,
            threads: int, timeout_s: float, skip: float = 0.0) -> dict:
    """One wrk run of `skip` + `seconds`; req_per_s counts the answers of the last `seconds` only."""
    seconds = max(1, round(seconds))
    cmd = [wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds + round(skip)}s", "--timeout",
           f"{round(timeout_s)}s", "-s", str(lua), f"http://{HOST}:{port}/v1/predict", "--", str(manifest),
           str(round(skip))]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 120)
    line = next((l for l in r.stdout.splitlines() if l.startswith("WRK_JSON ")), None)
    if r.returncode != 0 or line is None:
        sys.exit(f"wrk failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    res = json.loads(line[len("WRK_JSON "):])
    res["skipped_s"] = round(skip)
    res["req_per_s"] = round(res["counted"] / max(1e-9, res["duration_s"] - round(skip)), 3)
    res["errors"] = (res["non2xx"] + res["nolabel"] + res["connect_errors"] + res["read_errors"]
                     + res["write_errors"] + res["timeouts"])
    return res


# --------------------------------------------------------------------------- servers

def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Server:
    """A server as its own process group (LitServe starts worker processes of its own), with its
    stderr in a file, ready once `health` answers 200."""

    def __init__(self, kind: str, model: Path, tmp: Path, threads: int | None = None):
        self.kind, self.port = kind, free_port()
        if kind == "ours":
            cmd = [sys.executable, "-m", "serve", str(model), "--port", str(self.port), "--quiet"]
            self.health = "/v1/health"
        else:
            cmd = [sys.executable, str(ROOT / "bench" / "litserve_peer.py"), str(model), "--port", str(self.port),
                   "--threads", str(threads)]
            self.health = "/health"
        self.errfile = open(tmp / f"{kind}-{self.port}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.errfile, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()  # before stop(), which closes the log
                self.stop()
                sys.exit(f"{self.kind} server exited with {self.proc.returncode}:\n{tail}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", self.health)
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        tail = self.log_tail()
        self.stop()
        sys.exit(f"{self.kind} server did not answer {self.health} within {timeout:.0f} s:\n{tail}")

    def log_tail(self) -> str:
        self.errfile.flush()
        self.errfile.seek(0)
        return self.errfile.read()[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # uvicorn and LitServe both shut down on it (LitServe not on SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        try:  # LitServe's workers, if any outlived their parent
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.errfile.close()


def multipart(files: list[Path]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [b"--%s\r\nContent-Disposition: form-data; name=\"files\"; filename=\"%s\"\r\n"
             b"Content-Type: application/octet-stream\r\n\r\n%s\r\n" % (boundary.encode(), f.name.encode(), f.read_bytes())
             for f in files]
    return b"".join(parts) + b"--%s--\r\n" % boundary.encode(), f"multipart/form-data; boundary={boundary}"


def sample_answer(port: int, files: list[Path], classes: list[str]) -> list[str]:
    """POST `files` once; checks the answer (one object per file, each a known class) and returns the labels."""
    body, ctype = multipart(files)
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": ctype})
    r = conn.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"sample request: status {r.status}: {data[:500]!r}")
    try:
        answer = json.loads(data)
        labels = [a["label"] for a in answer]
        ok = len(answer) == len(files) and all(l in classes and a["confidences"] for l, a in zip(labels, answer))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        sys.exit(f"sample request: not one labelled answer per file: {data[:500]!r}")
    return labels


# --------------------------------------------------------------------------- one workload

def measure(kind, model, threads, tmp, wrk, lua, manifest, sample, classes, args, connections, seconds) -> dict:
    server = Server(kind, model, tmp, threads)
    try:
        server.wait_ready()
        labels = sample_answer(server.port, sample, classes)
        # Warm up, long enough to see answers come back: their longest latency is how long the
        # measured run then leaves uncounted at its start (see WRK_LUA). (The p99 was too short:
        # the first answers after a start come sooner than those in the steady state.)
        warm, warm_s = None, args.warmup
        for _ in range(4):
            warm = run_wrk(wrk, lua, manifest, server.port, warm_s, connections, args.wrk_threads, args.wrk_timeout)
            if warm["requests"] > 0:
                break
            warm_s *= 3
        skip = min(120.0, math.ceil(warm["max_ms"] / 1000)) if warm["requests"] else 120.0
        # wrk leaves the warm-up's last requests in flight and the server still works them off:
        # one more request, queued behind them, returns when they are done.
        sample_answer(server.port, sample[:1], classes)
        res = run_wrk(wrk, lua, manifest, server.port, seconds, connections, args.wrk_threads, args.wrk_timeout,
                      skip=skip)
    finally:
        server.stop()
    res["sample_labels"] = labels
    log.info("%-5s%s: %.2f req/s (%d answers in the last %d s of %.0f), p50 %.0f ms, p99 %.0f ms, %d errors", kind,
             f" (threads {threads})" if threads else "", res["req_per_s"], res["counted"],
             round(res["duration_s"] - res["skipped_s"]), res["duration_s"], res["p50_ms"], res["p99_ms"], res["errors"])
    return res


def workload(name, model, requests, sample, connections, target, args, tmp, wrk, lua, truth=None) -> dict:
    """Calibrate the peer's threads, then alternate the two servers for --rounds rounds."""
    from models.contract import read_metadata
    classes = list(read_metadata(model).classes)
    manifest = tmp / f"{name}.manifest"
    manifest.write_text("".join("\t".join(str(f) for f in files) + "\n" for files in requests))
    log.info("%s: %d connections, %d image(s) per request", name, connections, len(requests[0]))

    calib = {}
    for t in args.peer_threads:
        calib[t] = measure("peer", model, t, tmp, wrk, lua, manifest, sample, classes, args, connections,
                           args.calib_seconds)["req_per_s"]
    best = max(calib, key=calib.get)
    log.info("%s: peer thread calibration %s: keeping %d", name, calib, best)

    runs = {"ours": [], "peer": []}
    for r in range(args.rounds):
        for kind in (("ours", "peer") if r % 2 == 0 else ("peer", "ours")):
            runs[kind].append(measure(kind, model, best if kind == "peer" else None, tmp, wrk, lua, manifest, sample,
                                      classes, args, connections, args.seconds))
    med = {k: statistics.median(x["req_per_s"] for x in v) for k, v in runs.items()}
    p99 = {k: statistics.median(x["p99_ms"] for x in v) for k, v in runs.items()}
    errors = {k: sum(x["errors"] for x in v) for k, v in runs.items()}
    ratio = med["ours"] / med["peer"] if med["peer"] else 0.0
    res = {"connections": connections, "images_per_request": len(requests[0]), "peer_threads_tried": calib,
           "peer_threads": best,
           "ours_req_per_s": [x["req_per_s"] for x in runs["ours"]], "peer_req_per_s": [x["req_per_s"] for x in runs["peer"]],
           "ours_p50_ms": [x["p50_ms"] for x in runs["ours"]], "peer_p50_ms": [x["p50_ms"] for x in runs["peer"]],
           "ours_p99_ms": [x["p99_ms"] for x in runs["ours"]], "peer_p99_ms": [x["p99_ms"] for x in runs["peer"]],
           "ours_errors": errors["ours"], "peer_errors": errors["peer"],
           "ratio_median": round(ratio, 3), "target_ratio": target}
    ours_labels, peer_labels = runs["ours"][0]["sample_labels"], runs["peer"][0]["sample_labels"]
    res["sample_top1_agreement"] = round(sum(a == b for a, b in zip(ours_labels, peer_labels)) / len(ours_labels), 3)
    if truth is not None:
        res["sample_accuracy"] = {k: round(sum(a == b for a, b in zip(v[0]["sample_labels"], truth)) / len(truth), 3)
                                  for k, v in runs.items()}
    # No completed request on either side measures nothing: that is a failure, not an infinite ratio.
    measured = min(x["counted"] for v in runs.values() for x in v) > 0
    res["ok"] = measured and ratio >= target and errors["ours"] == 0
    if name == "digits":
        res["ok"] = res["ok"] and p99["ours"] <= p99["peer"]
    log.info("%s: ours %.2f req/s vs peer %.2f (median): %.2fx (target >= %.1fx), p99 %.0f vs %.0f ms, errors %d/%d",
             name, med["ours"], med["peer"], ratio, target, p99["ours"], p99["peer"], errors["ours"], errors["peer"])
    return res


# --------------------------------------------------------------------------- models and inputs

def run_cmd(cmd, timeout: float = 3600) -> None:
    cmd = [str(c) for c in cmd]
    log.info("running: %s", " ".join(cmd))
    r = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                       timeout=timeout)
    if r.returncode != 0:
        sys.exit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")


def photo_inputs(args, tmp: Path) -> tuple[Path, list[Path]]:
    from bench.photoset_large import write_photo_sets
    need_model = args.model is None
    train, load = write_photo_sets([(tmp / "train_photos", args.train_photos if need_model else 0),
                                    (tmp / "load_photos", args.photos_per_request)], args.photo_size)
    model = args.model
    if need_model:
        model = tmp / "photo_model"
        run_cmd([sys.executable, "-m", "train", tmp / "train_photos", "--size", 224, "--epochs", 1, "--out", model, "-q"])
    return Path(model), [f for f, _ in load]


def digit_inputs(args, tmp: Path) -> tuple[Path, list[Path], list[str]]:
    from PIL import Image
    from train.mnist import MnistArrays, MnistError, find_mnist
    mnist_dir = os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared" / "data" / "mnist")
    try:
        found = find_mnist(mnist_dir)
    except MnistError as e:
        sys.exit(f"error: {e}")
    if not isinstance(found, MnistArrays):
        sys.exit("error: point MNIST_DIR at the four MNIST IDX files")
    d = tmp / "digits"
    d.mkdir()
    files, truth = [], []
    for i in range(args.digits):
        f = d / f"digit_{i:03d}.png"
        Image.fromarray(found.valid_images[i]).save(f)
        files.append(f)
        truth.append(str(int(found.valid_labels[i])))
    model = args.mnist_model
    if model is None:
        model = tmp / "mnist_model"
        run_cmd([sys.executable, "-m", "train", "mnist", "--epochs", 1, "--mnist-dir", mnist_dir, "--out", model, "-q"])
    return Path(model), files, truth


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phases", default="photos,digits", help="comma-separated: photos, digits (default both)")
    p.add_argument("--model", type=Path, default=None, help="a 224 px photo model folder (default: train one here)")
    p.add_argument("--mnist-model", type=Path, default=None, help="an MNIST model folder (default: train one here)")
    p.add_argument("--train-photos", type=int, default=40, help="photos to train the photo model on, when trained here")
    p.add_argument("--photos-per-request", type=int, default=8)
    p.add_argument("--photo-size", type=parse_size, default=PHONE_SIZE,
                   help="WIDTHxHEIGHT of the generated photos (default 4032x3024; smaller only for a quick check)")
    p.add_argument("--photo-connections", type=int, default=8)
    p.add_argument("--digits", type=int, default=64, help="different digits, one per request, in turn")
    p.add_argument("--digit-connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2, help="rounds of (ours, peer), alternating who goes first")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per run (default 20)")
    p.add_argument("--warmup", type=float, default=5.0, help="discarded seconds before each run (default 5)")
    p.add_argument("--peer-threads", type=int_list("thread counts", 1), default=[1, 2], help="torch thread counts to try for the peer")
    p.add_argument("--calib-seconds", type=float, default=10.0, help="seconds per peer calibration run (default 10)")
    p.add_argument("--wrk-threads", type=int, default=2)
    p.add_argument("--wrk-timeout", type=float, default=60.0, help="wrk's per-request timeout, s (default 60)")
    args = p.parse_args()
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if not phases or set(phases) - {"photos", "digits"}:
        p.error(f"--phases: photos and/or digits, got {args.phases!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)

    wrk = ensure_wrk()
    import litserve
    summary = {"cpus": os.cpu_count(), "load_avg_start": round(os.getloadavg()[0], 2), "litserve": litserve.__version__,
               "wrk_threads": args.wrk_threads, "seconds": args.seconds, "warmup": args.warmup, "rounds": args.rounds,
               "peer": {"max_batch_size": 64, "batch_timeout": 0.002, "workers_per_device": 1, "accelerator": "cpu"}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lua = tmp / "multipart.lua"
        lua.write_text(WRK_LUA)
        if "photos" in phases:
            model, photos = photo_inputs(args, tmp)
            summary["photos"] = workload("photos", model, [photos], photos, args.photo_connections, PHOTO_TARGET,
                                         args, tmp, wrk, lua)
            summary["photos"]["photo_mb_mean"] = round(sum(f.stat().st_size for f in photos) / len(photos) / 1e6, 2)
        if "digits" in phases:
            model, digits, truth = digit_inputs(args, tmp)
            summary["digits"] = workload("digits", model, [[f] for f in digits], digits, args.digit_connections,
                                         DIGIT_TARGET, args, tmp, wrk, lua, truth)
    summary["load_avg_end"] = round(os.getloadavg()[0], 2)
    summary["ok"] = all(summary[ph]["ok"] for ph in phases)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
