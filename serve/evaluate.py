"""Evaluate a model folder on labelled images: accuracy, per-class precision, recall and F1, a
confusion matrix, and the misclassified files, worst first.

    python -m serve.evaluate models/mnist data/test                 # class sub-folders
    python -m serve.evaluate models/mnist photos --split all        # a train/valid layout: both splits
    python -m serve.evaluate models/mnist photos --labels test.csv  # file,label rows instead of folders
    python -m serve.evaluate models/mnist data/test --out eval/ --json
    python -m serve.evaluate models/mnist data/test --tta           # fastai's test-time augmentation

Which images: `DATA/<class>/**` (every image file, sub-folders included, as training reads them;
folders whose names start with `.` or `_`, such as the cleaner's `_removed/`, are not classes). A
data set already split (`train/` + `valid/`, or `training/` + `testing/`) is evaluated on its
validation half unless `--split train` or `--split all` says otherwise: a score on the images the
model learned from flatters it. With `--labels CSV`, the CSV's rows instead (a file column, a label
column; paths relative to DATA, else to the CSV's folder).

A class the model does not know is an error, not a silent zero: the model cannot ever be right on
it, so the numbers would measure the data set's mismatch rather than the model. Unreadable images
get one `error: FILE: reason` line each on stderr and are left out, as training leaves them out;
the exit status stays 0 while at least one image was scored. A model or data set that cannot be
used: one `error:` line, exit 2.

Scores come from the `Predictor` (the server's path: one decode per image, fused batch norm). With
`--tta`, from fastai's `learn.tta` on the exported learner instead: fastai's default
`aug_transforms` (flips only if the model was trained with them) over `TTA_PASSES` passes, blended
with one plain pass (fastai's `beta` 0.25); the report says so.

`--out DIR` writes `evaluation.json` (the `--json` object), `predictions.csv` (every image),
`misclassified.csv` (worst first, by the cross-entropy of the true class) and
`confusion_matrix.png`; a rerun replaces those four files and touches nothing else there.

A multi-label model (sigmoid, trained from a CSV with several labels per cell) is scored at its
threshold: fastai's `accuracy_multi`, the exact-match share, and per class precision, recall and F1
(macro F1 as fastai's `F1ScoreMulti`); a "misclassified" image is one whose predicted set is not
its true set, ranked by binary cross-entropy; there is no confusion matrix.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from models.cli import positive_int, run_cli
from models.labels import DEFAULT_DELIM, FILE_COLUMNS, LABEL_COLUMNS, LabelsError, read_labels_csv as read_table, split_labels
from serve.source import FORMAT_CHOICES, FORMAT_HELP, TRUST_REMOTE_CODE_HELP

__all__ = ["EvaluationError", "Labelled", "find_labelled", "read_labels_csv", "score_predictor", "score_tta",
           "summarize", "main"]

log = logging.getLogger(__name__)

BATCH_SIZE = 128   # images per forward pass, as serve.predict
TTA_PASSES = 4     # fastai's default n: augmented passes averaged before blending with the plain one
TOP_K = 5          # top-k accuracy is reported when the model has more classes than this
SHOWN_WORST = 10   # misclassified files printed in the text report (all of them go to --out)
JSON_WORST = 20    # ... and listed in the JSON object
LOSS_FLOOR = float(np.finfo(np.float32).tiny)  # probabilities are float32: -log of this (~87.3) caps a loss
SPLIT_FOLDERS = (("train", "valid"), ("training", "testing"))  # the layouts training recognises


class EvaluationError(ValueError):
    """The data cannot be evaluated; the message says what to fix."""


@dataclass
class Labelled:
    """The images to evaluate and what was found on the way."""
    files: list[Path]
    labels: list                                  # class names; for a multi-label model, tuples of them
    source: str                                   # a phrase for the report: where the images came from
    missing: list[tuple[str, str]] = field(default_factory=list)  # (file, reason), left out


# --------------------------------------------------------------------------- finding the images

def is_class_folder(path: Path) -> bool:
    """A class folder as training sees it: not hidden, not one of ours (`_removed/`)."""
    return path.is_dir() and not path.name.startswith((".", "_"))


def _class_folder_items(folder: Path) -> list[tuple[Path, str]]:
    from models.imageio import is_image_file
    items = []
    for c in sorted(p for p in folder.iterdir() if is_class_folder(p)):
        items += [(f, c.name) for f in sorted(c.rglob("*")) if f.is_file() and is_image_file(f)]
    return items


def find_labelled(data: Path, split: str | None = None) -> Labelled:
    """Images and labels from class folders; `split` (train, valid, all) picks the halves of a
    data set that is already split, and is refused for one that is not."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise EvaluationError(f"{data} is not a folder: give a folder with one sub-folder per class"
                              if data.exists() else f"{data} does not exist")
    for train_name, valid_name in SPLIT_FOLDERS:
        if (data / train_name).is_dir() and (data / valid_name).is_dir():
            chosen = {"train": [train_name], "valid": [valid_name], "all": [train_name, valid_name]}[split or "valid"]
            items = [it for name in chosen for it in _class_folder_items(data / name)]
            source = f"{data} ({' + '.join(f'{n}/' for n in chosen)})"
            break
    else:
        if split not in (None, "all"):
            raise EvaluationError(f"--split {split}: {data} is not split into train/ and valid/ folders "
                                  "(drop --split to evaluate every image)")
        items, source = _class_folder_items(data), str(data)
    if not items:
        raise EvaluationError(f"no images in class sub-folders of {source}: give a folder with one "
                              "sub-folder of images per class (or --labels CSV)")
    return Labelled([f for f, _ in items], [c for _, c in items], source)


def read_labels_csv(csv_path: Path, data: Path, file_col: str | None = None, label_col: str | None = None,
                    delim: str = DEFAULT_DELIM, multi_label: bool = False) -> Labelled:
    """The images and labels of a labels CSV, read by `models.labels` (training's reader). For a
    multi-label model each label is a tuple of labels (an empty cell: none of them)."""
    try:
        rows = read_table(csv_path, data, file_col, label_col, delim, multi_label=multi_label)
    except LabelsError as e:
        raise EvaluationError(str(e)) from None
    labels = [tuple(split_labels(c, delim)) for c in rows.labels] if multi_label else rows.labels
    return Labelled(rows.files, labels, f"{rows.source} ({len(rows.files)} rows)", rows.missing)


def check_classes(labels: list, classes: list[str], multi_label: bool = False) -> None:
    unknown = sorted(set().union(*map(set, labels)) - set(classes) if multi_label else set(labels) - set(classes))
    if unknown:
        shown = ", ".join(repr(c) for c in unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        raise EvaluationError(f"the data has classes the model does not know: {shown} (the model knows "
                              f"{', '.join(classes[:20])}{' ...' if len(classes) > 20 else ''})")


# --------------------------------------------------------------------------- scoring

def score_predictor(predictor, files: list[Path], batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """(probabilities (n_ok, n_classes), indices of the scored files, [(file, reason)] of the rest)."""
    from models.imageio import ImageError
    index = {c: i for i, c in enumerate(predictor.classes)}
    rows, kept, bad = [], [], []
    # top_k = every class: the Prediction then carries the whole distribution.
    results = predictor.predict_many([str(f) for f in files], top_k=len(index), batch_size=batch_size)
    for i, (src, result) in enumerate(results):
        if isinstance(result, ImageError):
            bad.append((src, str(result)))
            continue
        row = np.zeros(len(index), dtype=np.float64)
        for label, p in result.confidences:
            row[index[label]] = p
        rows.append(row)
        kept.append(i)
    return (np.stack(rows) if rows else np.zeros((0, len(index)))), kept, bad


def readable(files: list[Path]) -> tuple[list[int], list[tuple[str, str]]]:
    """Indices of the files `models.imageio` decodes, and (file, reason) for the others."""
    from concurrent.futures import ThreadPoolExecutor
    from models.imageio import ImageError, open_image

    def check(f):
        try:
            open_image(f)
            return None
        except ImageError as e:
            return str(e)

    with ThreadPoolExecutor(4) as pool:  # Pillow releases the GIL while decoding
        reasons = list(pool.map(check, files))
    return [i for i, r in enumerate(reasons) if r is None], [(str(f), r) for f, r in zip(files, reasons) if r]


def score_tta(folder, files: list[Path], device: str = "cpu", batch_size: int = BATCH_SIZE, n: int = TTA_PASSES):
    """fastai's `learn.tta` over `files` on the exported learner (see the module's docstring).
    Same return shape as `score_predictor`."""
    from fastai.vision.augment import aug_transforms
    from models.contract import ModelFolderError, load_model_folder
    from models.device import pick_device
    dev = pick_device(device)
    mf = load_model_folder(folder, "pickle")  # fastai's TTA needs the learner itself (loaded on the CPU)
    learn = mf.learner
    if [str(c) for c in learn.dls.vocab] != [str(c) for c in mf.classes]:  # the columns of tta's output
        raise ModelFolderError(f"{folder}: the learner's classes differ from metadata.json's: re-export the model")
    kept, bad = readable(files)
    if not kept:
        return np.zeros((0, len(learn.dls.vocab))), kept, bad
    flip = bool(mf.metadata.config.get("flip", True))
    # The exported learner carries no augmentation (its DataLoaders are the inference ones), so
    # TTA gets fastai's defaults here, in front of the learner's own batch transforms (a Pipeline
    # orders them: augment, then IntToFloat, then Normalize). They run on split 0 only: the plain pass
    # `tta` blends in runs the learner's transforms alone.
    after_batch = aug_transforms(do_flip=flip) + list(learn.dls.valid.after_batch.fs)
    dl = learn.dls.test_dl([files[i] for i in kept], bs=batch_size, after_batch=after_batch, device=dev)
    preds, _ = learn.tta(dl=dl, n=n)
    return preds.float().numpy().astype(np.float64), kept, bad


# --------------------------------------------------------------------------- the numbers

def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n: int) -> np.ndarray:
    """Counts (n, n): row = true class, column = predicted class."""
    return np.bincount(y_true * n + y_pred, minlength=n * n).reshape(n, n)


def per_class_report(cm: np.ndarray, classes: list[str]) -> tuple[dict, dict, dict]:
    """Precision, recall, F1 and support per class, and their macro and support-weighted averages.
    As scikit-learn's `classification_report`: the classes reported are those in the truth or the
    predictions (a class the model knows but never saw nor said is left out), and a ratio with a
    zero denominator is 0."""
    per_class = {}
    for i, c in enumerate(classes):
        support, said, tp = int(cm[i].sum()), int(cm[:, i].sum()), int(cm[i, i])
        if support == 0 and said == 0:
            continue
        p = tp / said if said else 0.0
        r = tp / support if support else 0.0
        per_class[c] = {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0, "support": support}
    keys = ("precision", "recall", "f1")
    total = sum(v["support"] for v in per_class.values())
    macro = {k: float(np.mean([v[k] for v in per_class.values()])) for k in keys} | {"support": total}
    weighted = {k: sum(v[k] * v["support"] for v in per_class.values()) / total for k in keys} | {"support": total}
    return per_class, macro, weighted


def summarize(probs: np.ndarray, y_true: np.ndarray, classes: list[str], files: list[str]) -> dict:
    """Every number of the report from the probabilities (n, n_classes) and the true indices."""
    y_pred = probs.argmax(1)
    p_true = probs[np.arange(len(y_true)), y_true]
    losses = -np.log(np.maximum(p_true, LOSS_FLOOR))
    cm = confusion_matrix(y_true, y_pred, len(classes))
    per_class, macro, weighted = per_class_report(cm, classes)
    out = {"n_images": int(len(y_true)), "accuracy": float((y_pred == y_true).mean()), "loss": float(losses.mean())}
    if len(classes) > TOP_K:
        top = np.argsort(-probs, axis=1, kind="stable")[:, :TOP_K]
        out["top5_accuracy"] = float((top == y_true[:, None]).any(1).mean())
    out |= {"per_class": per_class, "macro_avg": macro, "weighted_avg": weighted,
            "confusion_matrix": {"classes": classes, "rows": "true class", "columns": "predicted class",
                                 "matrix": cm.tolist()}}
    rows = [{"file": f, "label": classes[t], "predicted": classes[p], "confidence": float(probs[i, p]),
             "loss": float(losses[i]), "correct": bool(t == p)}
            for i, (f, t, p) in enumerate(zip(files, y_true, y_pred))]
    out["predictions"] = rows
    return out


def summarize_multi_label(probs: np.ndarray, truth: np.ndarray, classes: list[str], files: list[str],
                          threshold: float) -> dict:
    """The report of a multi-label model from its probabilities (n, n_classes) and the true
    multi-hot rows (n, n_classes): a class is predicted when its probability is above `threshold`
    (as the server says). `accuracy` is fastai's `accuracy_multi` (the share of right yes/no
    answers, over every image and class), `exact_match` the share of images whose whole set is
    right, and per class precision, recall, F1 and support (images carrying it) as scikit-learn's
    `classification_report` on multi-label data (its macro F1 is fastai's `F1ScoreMulti`'s)."""
    truth = truth.astype(bool)
    predicted = probs > threshold
    p = np.clip(probs, LOSS_FLOOR, 1 - np.finfo(np.float32).eps)
    losses = -(truth * np.log(p) + (~truth) * np.log1p(-p)).mean(1)  # binary cross-entropy per image
    per_class = {}
    for i, c in enumerate(classes):
        tp, said, support = int((predicted[:, i] & truth[:, i]).sum()), int(predicted[:, i].sum()), int(truth[:, i].sum())
        prec = tp / said if said else 0.0
        rec = tp / support if support else 0.0
        per_class[c] = {"precision": prec, "recall": rec, "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0,
                        "support": support}
    keys = ("precision", "recall", "f1")
    total = sum(v["support"] for v in per_class.values())
    macro = {k: float(np.mean([v[k] for v in per_class.values()])) for k in keys} | {"support": total}
    weighted = {k: (sum(v[k] * v["support"] for v in per_class.values()) / total if total else 0.0) for k in keys} | {"support": total}
    exact = (predicted == truth).all(1)

    def names(row) -> str:
        return ";".join(c for c, on in zip(classes, row) if on)

    rows = [{"file": f, "label": names(truth[i]), "predicted": names(predicted[i]),
             "confidence": float(probs[i][predicted[i]].min()) if predicted[i].any() else float(probs[i].max()),
             "loss": float(losses[i]), "correct": bool(exact[i])} for i, f in enumerate(files)]
    return {"n_images": int(len(truth)), "multi_label": True, "threshold": threshold,
            "accuracy": float((predicted == truth).mean()), "exact_match": float(exact.mean()),
            "f1": macro["f1"], "loss": float(losses.mean()), "per_class": per_class, "macro_avg": macro,
            "weighted_avg": weighted, "predictions": rows}


# --------------------------------------------------------------------------- output

def plot_confusion(cm: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    n = len(classes)
    side = min(20.0, max(4.0, 0.5 * n + 2))
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=90 if n > 10 or max(map(len, classes)) > 3 else 0)
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:  # numbers stay legible up to about this many cells a side
        high = cm.max() / 2 if cm.size else 0
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > high else "black")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


COLUMNS = ("file", "label", "predicted", "confidence", "loss", "correct")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)


def write_outputs(out: Path, report: dict, predictions: list[dict], worst: list[dict]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "predictions.csv", predictions)
    _write_csv(out / "misclassified.csv", worst)
    cm = report.get("confusion_matrix")  # none for a multi-label model: a class is not confused with one other
    title = f"{report['model']}: accuracy {report['accuracy']:.2%} on {report['n_images']} images" + (" (TTA)" if report["tta"] else "")
    if cm is not None:
        plot_confusion(np.array(cm["matrix"]), cm["classes"], out / "confusion_matrix.png", title)
    (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")


def format_text(report: dict, worst: list[dict]) -> str:
    lines = [f"model {report['model']} on {report['n_images']} images from {report['data']}"
             + (f", {report['n_skipped']} skipped" if report["n_skipped"] else ""),
             f"scored by {report['scored_by']}",
             (f"multi-label at threshold {report['threshold']:g}: accuracy_multi {report['accuracy']:.4f}  "
              f"exact match {report['exact_match']:.4f}  macro F1 {report['f1']:.4f}" if report.get("multi_label")
              else f"accuracy {report['accuracy']:.4f}" + (f"  top-5 {report['top5_accuracy']:.4f}" if "top5_accuracy" in report else ""))
             + f"  mean loss {report['loss']:.4f}", ""]
    names = list(report["per_class"]) + ["macro avg", "weighted avg"]
    w = max(len("class"), *map(len, names))
    lines.append(f"{'class':<{w}}  {'precision':>9}  {'recall':>6}  {'f1':>6}  {'support':>7}")
    rows = list(report["per_class"].items()) + [("macro avg", report["macro_avg"]), ("weighted avg", report["weighted_avg"])]
    for i, (name, v) in enumerate(rows):
        if i == len(report["per_class"]):
            lines.append("")
        lines.append(f"{name:<{w}}  {v['precision']:>9.4f}  {v['recall']:>6.4f}  {v['f1']:>6.4f}  {v['support']:>7}")
    lines.append("")
    loss = "binary cross-entropy" if report.get("multi_label") else "cross-entropy of the true class"
    lines.append(f"misclassified: {len(worst)}" + (f", worst first ({loss}):" if worst else ""))
    for r in worst[:SHOWN_WORST]:
        lines.append(f"  {r['loss']:8.3f}  {r['file']}  {r['label']} -> {r['predicted']} ({r['confidence']:.3f})")
    if len(worst) > SHOWN_WORST:
        lines.append(f"  ... {len(worst) - SHOWN_WORST} more" + (" in misclassified.csv" if report.get("out") else " (--out DIR lists them all)"))
    if report.get("out"):
        lines.append(f"wrote {report['out']}/: evaluation.json, predictions.csv, misclassified.csv"
                     + ("" if report.get("multi_label") else ", confusion_matrix.png"))
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.evaluate", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="Unreadable images: an `error:` line each on stderr, left out (exit 0). "
                                       "A bad model or data set: one `error:` line, exit 2.")
    p.add_argument("model", help="model folder written by `python -m train` (or hf://owner/name[@revision])")
    p.add_argument("data", type=Path, help="a folder with one sub-folder of images per class (or the root "
                                           "that --labels' paths are relative to)")
    p.add_argument("--split", choices=("valid", "train", "all"), default=None,
                   help="for a data set split into train/ + valid/ (or training/ + testing/): which half "
                        "(default valid, the held-out half)")
    p.add_argument("--labels", type=Path, default=None, metavar="CSV",
                   help=f"take files and labels from a CSV instead of class folders: a file column "
                        f"({'/'.join(FILE_COLUMNS)}) and a label column ({'/'.join(LABEL_COLUMNS)}); "
                        "paths relative to DATA, else to the CSV's folder")
    p.add_argument("--file-col", default=None, help="the CSV's file column, if not one of the defaults")
    p.add_argument("--label-col", default=None, help="the CSV's label column, if not one of the defaults")
    p.add_argument("--label-delim", default=None, metavar="SEP",
                   help="a multi-label model: what separates the labels of one cell (default: what the model "
                        "was trained with, else a space)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="write evaluation.json, predictions.csv, misclassified.csv and confusion_matrix.png here")
    p.add_argument("--json", action="store_true", help="print one JSON object (the report) instead of text")
    p.add_argument("--tta", action="store_true",
                   help=f"score with fastai's test-time augmentation (learn.tta: {TTA_PASSES} augmented passes "
                        "blended with a plain one; several times slower) instead of the Predictor")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, help=f"images per forward pass (default {BATCH_SIZE})")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto",
                   help=FORMAT_HELP + " (--tta needs the learner: pickle)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="no log lines on stderr (errors are still printed)")
    return p


def evaluate(args) -> dict:
    """The whole job; returns the report (also written to --out)."""
    from serve.source import resolve_folder
    folder, format = resolve_folder(args.model, args.trust_remote_code, "pickle" if args.tta else args.format,
                                    args.device)
    from models.contract import read_metadata
    meta = read_metadata(folder)  # before loading a pickle: a foreign folder fails fast
    multi = meta.multi_label
    if args.labels is not None:
        if args.split:
            raise EvaluationError("--split and --labels do not go together: the CSV names the files")
        delim = args.label_delim or meta.config.get("label_delim") or DEFAULT_DELIM  # as the model was trained
        data = read_labels_csv(args.labels, args.data, args.file_col, args.label_col, delim, multi_label=multi)
    else:
        data = find_labelled(args.data, args.split)
        if multi:  # a class folder: the one label of each of its images
            data.labels = [(c,) for c in data.labels]
    classes = list(meta.classes)
    check_classes(data.labels, classes, multi)
    if args.tta:
        probs, kept, bad = score_tta(folder, data.files, args.device, args.batch_size)
        scored_by = f"fastai's learn.tta (n={TTA_PASSES}, default aug_transforms, beta 0.25)"
    else:
        from serve.predictor import Predictor, configure_threads
        predictor = Predictor.load(folder, device=args.device, format=format)
        configure_threads(1)  # one decoding thread beside the forward passes
        classes = predictor.classes
        probs, kept, bad = score_predictor(predictor, data.files, args.batch_size)
        scored_by = f"the Predictor on {predictor.device}"
    skipped = data.missing + bad
    for f, reason in skipped:
        print(f"error: {f}: {reason}", file=sys.stderr, flush=True)
    if not kept:
        raise EvaluationError(f"no readable images in {data.source} ({len(skipped)} skipped)")
    index = {c: i for i, c in enumerate(classes)}
    files = [str(data.files[i]) for i in kept]
    if multi:
        truth = np.zeros((len(kept), len(classes)), dtype=bool)
        for row, i in enumerate(kept):
            truth[row, [index[c] for c in data.labels[i]]] = True
        numbers = summarize_multi_label(probs, truth, classes, files, meta.decision_threshold)
    else:
        y_true = np.array([index[data.labels[i]] for i in kept], dtype=np.int64)
        numbers = summarize(probs, y_true, classes, files)
    predictions = numbers.pop("predictions")
    worst = sorted((r for r in predictions if not r["correct"]), key=lambda r: -r["loss"])
    report = {"model": meta.name, "model_folder": str(folder), "data": data.source,
              "tta": bool(args.tta), "scored_by": scored_by, **numbers,
              "n_misclassified": len(worst), "misclassified": worst[:JSON_WORST],
              "n_skipped": len(skipped), "skipped": [{"file": f, "reason": r} for f, r in skipped],
              "out": str(args.out) if args.out else None}
    if args.out:
        write_outputs(args.out, report, predictions, worst)
    print(json.dumps(report) if args.json else format_text(report, worst), flush=True)
    return report


def main(argv=None) -> int:
    from serve.source import quiet_known_warnings
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    from models.contract import ModelFolderError

    def body() -> int:
        evaluate(args)
        return 0

    return run_cli(body, (ModelFolderError, EvaluationError, OSError))  # LabelsError arrives as EvaluationError


if __name__ == "__main__":
    sys.exit(main())
