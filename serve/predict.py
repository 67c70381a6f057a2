"""Classify image files and folders from the command line, through the same `Predictor` as the server.

    python -m serve.predict models/mnist img1.png photos/ --top-k 3 --json
    python -m serve.predict models/mnist photos/ --csv out.csv

One line per image on stdout, in the order given (a multi-label model: `"labels"`, every class above
its threshold, where a single-label one has `"label"`) (folders are walked recursively, sorted; only
files with an image extension are taken from a folder, but a file named on the command line is
always tried). A file that cannot be classified gets an `error: ...` line on stderr and the run
carries on; the exit status is then 1. A model that cannot be loaded exits with 2.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from pathlib import Path
from typing import Iterator

from models.cli import non_negative_int, positive_int, run_cli
from serve.source import FORMAT_CHOICES, FORMAT_HELP, TRUST_REMOTE_CODE_HELP, quiet_known_warnings, resolve_folder

log = logging.getLogger(__name__)

BATCH_SIZE = 128  # images per forward pass; big enough to amortise per-call overhead on a CPU
MAX_WORKERS = 4   # decoding processes at most: beyond that the model, not decoding, is the bottleneck
FORWARD_THREADS = 2  # batches in the model at once: one computes while the other's Python runs


def default_workers() -> int:
    """Decoding is mostly fastai's Python (it holds the GIL), so it is spread over processes,
    one per core (measured on 2 cores: 2 decoding processes beside 2 single-threaded forward
    passes gave 1.3x the images/s of one decoding thread beside one forward pass)."""
    from serve.predictor import available_cpus
    return min(MAX_WORKERS, available_cpus())


def default_threads(workers: int) -> int:
    """torch intra-op threads per forward pass: the cores the decoders leave, shared by the
    FORWARD_THREADS passes; at least 1 (on 2 cores: 1, and the passes overlap instead)."""
    from serve.predictor import available_cpus
    return max(1, (available_cpus() - workers) // FORWARD_THREADS)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.predict", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder written by `python -m train` (or hf://owner/name[@revision])")
    p.add_argument("paths", nargs="+", help="image files and folders")
    p.add_argument("--top-k", type=positive_int, default=None,
                   help="classes per image (default 3, or fewer if the model has fewer; a multi-label model: all, "
                        "and its labels above the threshold whatever --top-k says)")
    p.add_argument("--json", action="store_true", help="one JSON object per line instead of text")
    p.add_argument("--csv", type=Path, default=None, metavar="OUT.csv", help="also write the results to a CSV file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help=f"images per forward pass (default {BATCH_SIZE})")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help=f"decoding processes (default: one per CPU core, at most {MAX_WORKERS}); "
                        "0 decodes in one thread beside the model")
    p.add_argument("--threads", type=positive_int, default=None,
                   help=f"torch threads per forward pass; {FORWARD_THREADS} passes run at once "
                        "(default: the CPU cores not decoding, shared; at least 1)")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help=FORMAT_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr (errors are still printed)")
    return p


def expand_paths(paths, errors: list[tuple[str, str]]) -> Iterator[str]:
    """Files as given; folders walked recursively for image files. Missing paths and empty
    folders are appended to `errors` as (path, reason)."""
    from models.imageio import is_image_file
    for given in paths:
        path = Path(given)
        if path.is_dir():
            found = False
            for f in sorted(path.rglob("*")):
                if f.is_file() and is_image_file(f):
                    found = True
                    yield str(f)
            if not found:
                errors.append((given, "no image files in this folder"))
        elif path.exists():
            yield given
        else:
            errors.append((given, "no such file or folder"))


LABELS_SEP = ";"  # between the labels of a multi-label prediction, in the text and CSV outputs


def format_text(file: str, pred) -> str:
    """FILE<tab>LABEL<tab>top classes; a multi-label model's second column is every label above its
    threshold, joined by `LABELS_SEP` ("-" for none)."""
    top = "  ".join(f"{label} {conf:.4f}" for label, conf in pred.confidences)
    if pred.labels is not None:
        return f"{file}\t{LABELS_SEP.join(pred.labels) or '-'}\t{top}"
    return f"{file}\t{pred.label}\t{top}"


def classify_files(predictor, paths, top_k=None, as_json=False, csv_path=None, batch_size=BATCH_SIZE,
                   workers: int | None = None, out=None, err=None) -> tuple[int, int]:
    """Classify `paths` (files and folders), writing one line per image to `out` and one
    `error: ...` line per failure to `err`. Returns (classified, failed). `workers` decoding
    processes (default `default_workers()`), or 0 for one decoding thread."""
    workers = default_workers() if workers is None else workers
    out = out or sys.stdout
    err = err or sys.stderr
    from models.imageio import ImageError
    errors: list[tuple[str, str]] = []
    n_ok = n_bad = 0
    csv_file = open(csv_path, "w", newline="") if csv_path else None
    writer = csv.writer(csv_file) if csv_file else None
    multi = getattr(predictor, "multi_label", False)
    if writer:  # a multi-label model: the labels above the threshold, and every class's confidence
        writer.writerow(["file", "labels", "confidences", "error"] if multi else ["file", "label", "confidence", "top_k", "error"])
    try:
        files = expand_paths(paths, errors)
        for file, result in predictor.predict_many(files, top_k=top_k, batch_size=batch_size, workers=1,
                                                   processes=workers, forward_threads=FORWARD_THREADS):
            if isinstance(result, ImageError):
                n_bad += 1
                print(f"error: {file}: {result}", file=err, flush=True)
                if writer:
                    writer.writerow([file, "", "", str(result)] if multi else [file, "", "", "", str(result)])
                continue
            n_ok += 1
            if as_json:
                out.write(json.dumps({"file": file, **result.as_dict()}) + "\n")
            else:
                out.write(format_text(file, result) + "\n")
            if writer and multi:
                writer.writerow([file, LABELS_SEP.join(result.labels),
                                 "; ".join(f"{c} {p:.6f}" for c, p in result.confidences), ""])
            elif writer:
                writer.writerow([file, result.label, f"{result.confidences[0][1]:.6f}",
                                 "; ".join(f"{c} {p:.6f}" for c, p in result.confidences), ""])
    finally:
        if csv_file:
            csv_file.close()
    out.flush()
    for given, reason in errors:  # known once the walk is done
        n_bad += 1
        print(f"error: {given}: {reason}", file=err)
    return n_ok, n_bad


def run(args) -> int:
    from serve.predictor import Predictor, configure_threads
    workers = default_workers() if args.workers is None else args.workers
    threads = configure_threads(0, args.threads or default_threads(workers))
    folder, format = resolve_folder(args.model, args.trust_remote_code, args.format, args.device)
    predictor = Predictor.load(folder, device=args.device, format=format, threads=threads)
    log.info("model %s (%s, %d classes) on %s: %d thread(s), %d decoding process(es)", predictor.name, format,
             len(predictor.classes), predictor.device, threads, workers)
    n_ok, n_bad = classify_files(predictor, args.paths, args.top_k, args.json, args.csv, args.batch_size, workers)
    log.info("%d image(s) classified, %d failed", n_ok, n_bad)
    return 1 if n_bad else 0


def main(argv=None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from models.contract import ModelFolderError
    return run_cli(lambda: run(args), (ModelFolderError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
