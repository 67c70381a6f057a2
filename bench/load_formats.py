"""How long each model format takes to load: model.pkl (fastai's load_learner), model.safetensors (the
network rebuilt from metadata.json) and model.onnx (onnxruntime), where the folder has it.

    python bench/load_formats.py models/mnist [--repeats 5]

Each run is a fresh `python` process, as a server start is, timed in three parts:
- import_s: importing what the format needs (`serve.predictor`, torch, fastai's learner and vision
            modules for the torch formats, onnxruntime for onnx);
- load_s:   `load_model_folder(folder, format)`: reading the file and building the model;
- first_s:  `Predictor(...)` (fusing BatchNorm for torch) plus the first prediction of one digit
            (which also imports fastai's Resize, the one preprocessing all formats share);
- total_s:  the three together, what a server start spends on the model.
Formats alternate run by run so that noise from other processes hits each alike; the median of
`--repeats` runs each. Progress goes to stderr; the last line on stdout is a one-line JSON summary.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, warnings
warnings.simplefilter("ignore")
t0 = time.perf_counter()
from models.contract import load_model_folder
from serve.predictor import Predictor
if sys.argv[2] == "onnx":
    import models.onnx, onnxruntime
else:  # what each torch format imports on its way (the learner's classes; the network's builders)
    import fastai.learner, fastai.vision.learner, models.weights
t1 = time.perf_counter()
folder = load_model_folder(sys.argv[1], sys.argv[2], threads=1 if sys.argv[2] == "onnx" else None)
t2 = time.perf_counter()
label = Predictor(folder, device="cpu").predict(sys.argv[3]).label
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_s": t3 - t2, "label": label}))
"""


def run_once(folder: Path, fmt: str, image: Path) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, str(folder), fmt, str(image)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if p.returncode != 0:
        raise SystemExit(f"error: loading {fmt} failed: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", type=Path, help="a model folder written by `python -m train`")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per format; the median counts")
    args = p.parse_args(argv)
    if args.repeats < 1:
        raise SystemExit("error: --repeats must be at least 1")
    sys.path.insert(0, str(ROOT))
    from models.contract import FORMAT_FILES, read_metadata
    read_metadata(args.model)  # a bad folder fails here, in one line
    formats = [f for f, name in FORMAT_FILES.items() if (args.model / name).is_file()]
    examples = sorted((args.model / "examples").glob("*.png"))
    with tempfile.TemporaryDirectory() as tmp:
        image = examples[0] if examples else Path(tmp) / "blank.png"
        if not examples:
            from PIL import Image
            Image.new("RGB", (32, 32)).save(image)
        runs: dict[str, list[dict]] = {f: [] for f in formats}
        for i in range(args.repeats):
            for fmt in formats:
                r = run_once(args.model, fmt, image)
                runs[fmt].append(r)
                print(f"run {i + 1}/{args.repeats} {fmt}: import {r['import_s']:.2f} s, load {r['load_s']:.3f} s, "
                      f"first prediction {r['first_s']:.3f} s", file=sys.stderr, flush=True)
    summary = {"bench": "load_formats", "model": str(args.model), "repeats": args.repeats,
               "sizes_mb": {f: round((args.model / FORMAT_FILES[f]).stat().st_size / 1e6, 1) for f in formats}}
    for fmt, rs in runs.items():
        summary[fmt] = {k: round(statistics.median(r[k] for r in rs), 3) for k in ("import_s", "load_s", "first_s")}
        summary[fmt]["total_s"] = round(statistics.median(r["import_s"] + r["load_s"] + r["first_s"] for r in rs), 3)
    labels = {f: {r["label"] for r in rs} for f, rs in runs.items()}
    summary["same_label"] = len(set().union(*labels.values())) == 1
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
