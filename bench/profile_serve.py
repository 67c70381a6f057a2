"""Profile: where a `POST /v1/predict` spends the server's CPU, end to end, under `wrk` load.

    python bench/profile_serve.py MODEL [--photos 8] [--connections 16] [--seconds 20] [-- SERVE ARGS]
    python bench/profile_serve.py models/mnist                       # one 28 px PNG per request
    python bench/profile_serve.py photo_model --photos 8 --connections 8   # eight 12 MP photos per request

Starts `python -m serve MODEL` (plus any arguments after `--`), loads it with bench/serve_photos.py's
wrk script (multipart bodies built once; 2 wrk threads, loopback) for a warm-up, then samples the
server with py-spy (`pip install py-spy`; `py-spy record --format raw --threads --nonblocking`, 100
samples/s per thread, threads that are not running are not sampled) during a measured run.
Each sampled stack is put in one stage, by the first of these found from the leaf upward:
  forward    the network: onnxruntime's `run`, torch's forward (`probabilities`)
  decode     `Preprocessing.prepare`: `open_image` (PIL decode), fastai's Resize/ToTensor
  multipart  `serve.api.read_uploads` (python-multipart's parser)
  json       building and encoding the answer (`Predictor.top_k`, `as_dict`, the response's render)
  batcher    `MicroBatcher` bookkeeping
  limits     `serve.limits` (the body-limit middleware, the guarded protocol)
  http       uvicorn's protocol (httptools/h11 parsing, writing), starlette/fastapi routing
  loop       the event loop itself (uvloop/asyncio: callbacks, polling, futures)
  other      anything else (threads' own bookkeeping, logging)
Without py-spy's --native (which cannot sample without pausing the server), time spent in C under
the event loop (uvloop's loop, httptools' parser, socket writes) shows as `Runner.run`'s own time,
and the decode threads' wait for work as `_worker`'s. Prints per-stage shares of the sampled CPU, the top self-time functions, and the run's req/s
and latency; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_photos import WRK_LUA, Server, ensure_wrk, free_port, run_wrk, sample_answer  # noqa: E402

log = logging.getLogger("bench.profile_serve")

# (stage, pattern on "function (file)") in order of precedence, looked for from the leaf upward.
STAGES = [
    ("forward", re.compile(r"\brun \(.*onnxruntime|OnnxClassifier|TorchNetwork|\bprobabilities \(|torch/nn/")),
    ("decode", re.compile(r"\bprepare \(.*(contract|predictor)|open_image|PIL/|fastai/|fasttransform/|RGBImage")),
    ("multipart", re.compile(r"read_uploads|python_multipart|multipart")),
    ("json", re.compile(r"\btop_k \(|as_dict|render \(|json/encoder|orjson|_json_response")),
    ("batcher", re.compile(r"MicroBatcher|_work \(.*serve/(api|batcher)|submit \(.*serve/(api|batcher)")),
    ("limits", re.compile(r"serve/limits\.py")),
    ("http", re.compile(r"uvicorn/protocols|httptools|h11|starlette/|fastapi/|anyio/")),
    ("loop", re.compile(r"uvloop|asyncio/|selectors|concurrent/futures|threading\.py")),
]


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # leaf last in py-spy's raw format
        for name, pattern in STAGES:
            if pattern.search(frame):
                return name
    return "other"


def parse_raw(text: str) -> tuple[collections.Counter, collections.Counter, int]:
    """py-spy's raw (collapsed) output -> (samples per stage, self samples per leaf function, total)."""
    stages, leaves, total = collections.Counter(), collections.Counter(), 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if not f.startswith(("thread (", "process "))]
        if not frames:
            continue
        total += n
        stages[stage_of(frames)] += n
        leaves[re.sub(r":\d+\)$", ")", frames[-1])] += n
    return stages, leaves, total


def make_requests(args, tmp: Path) -> tuple[list[list[Path]], list[Path]]:
    if args.photos:
        from bench.photoset_large import write_photo_sets
        (load,) = write_photo_sets([(tmp / "photos", args.photos)], (4032, 3024))
        files = [f for f, _ in load]
        return [files], files
    from PIL import Image
    from train.mnist import find_mnist
    found = find_mnist(os.environ.get("MNIST_DIR") or str(ROOT.parent / "shared" / "data" / "mnist"))
    files = []
    for i in range(64):
        f = tmp / f"digit_{i:03d}.png"
        Image.fromarray(found.valid_images[i]).save(f)
        files.append(f)
    return [[f] for f in files], files[:1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", type=Path)
    p.add_argument("--photos", type=int, default=0, help="12 MP photos per request (default 0: one MNIST digit)")
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--seconds", type=float, default=20.0, help="profiled seconds (default 20)")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second (default 100)")
    p.add_argument("--top", type=int, default=25, help="self-time functions listed (default 25)")
    p.add_argument("--out", type=Path, default=None, help="also keep py-spy's raw stacks here")
    args, extra = p.parse_known_args()  # the rest (after --) goes to `python -m serve`
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stderr)
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        sys.exit("error: py-spy is not installed (pip install py-spy)")
    wrk = ensure_wrk()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        requests, sample = make_requests(args, tmp)
        lua, manifest = tmp / "multipart.lua", tmp / "requests.manifest"
        lua.write_text(WRK_LUA)
        manifest.write_text("".join("\t".join(map(str, r)) + "\n" for r in requests))
        from models.contract import read_metadata
        classes = list(read_metadata(args.model).classes)
        server = _ServerWith(args.model, tmp, extra)
        try:
            server.wait_ready()
            sample_answer(server.port, sample, classes)
            run_wrk(wrk, lua, manifest, server.port, args.warmup, args.connections, 2, 60)
            raw = tmp / "pyspy.txt"
            spy_proc = subprocess.Popen([spy, "record", "--pid", str(server.proc.pid), "--duration", str(round(args.seconds)),
                                         "--rate", str(args.rate), "--format", "raw", "--threads", "--nonblocking",
                                         "--output", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                        text=True)
            time.sleep(1.0)  # py-spy attaches
            res = run_wrk(wrk, lua, manifest, server.port, args.seconds, args.connections, 2, 60)
            _, err = spy_proc.communicate(timeout=120)
            if spy_proc.returncode != 0 or not raw.exists():
                sys.exit(f"py-spy failed ({spy_proc.returncode}): {err[-1500:]}")
            text = raw.read_text()
        finally:
            server.stop()
        if args.out:
            args.out.write_text(text)
    stages, leaves, total = parse_raw(text)
    load = os.getloadavg()[0]
    print(f"{res['req_per_s']:.1f} req/s, p50 {res['p50_ms']:.1f} ms, p99 {res['p99_ms']:.1f} ms, "
          f"{res['errors']} errors; load average {load:.1f}; {total} samples", file=sys.stderr)
    for name, n in stages.most_common():
        print(f"  {name:10s} {100 * n / total:5.1f}%", file=sys.stderr)
    print("top self time:", file=sys.stderr)
    for fn, n in leaves.most_common(args.top):
        print(f"  {100 * n / total:5.1f}%  {fn}", file=sys.stderr)
    print(json.dumps({"req_per_s": res["req_per_s"], "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                      "errors": res["errors"], "samples": total, "load_average": round(load, 1),
                      "stages_pct": {k: round(100 * v / total, 1) for k, v in stages.most_common()},
                      "top_self_pct": {k: round(100 * v / total, 1) for k, v in leaves.most_common(10)}}))


class _ServerWith(Server):
    """bench.serve_photos.Server with extra `python -m serve` arguments."""

    def __init__(self, model: Path, tmp: Path, extra: list[str]):
        self.kind, self.port, self.health = "ours", free_port(), "/v1/health"
        cmd = [sys.executable, "-m", "serve", str(model), "--port", str(self.port), "--quiet", *extra]
        self.errfile = open(tmp / f"ours-{self.port}.log", "w+")
        env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.errfile, stderr=subprocess.STDOUT,
                                     start_new_session=True)


if __name__ == "__main__":
    main()
