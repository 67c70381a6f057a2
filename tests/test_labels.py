"""Labels from a CSV and multi-label models, as a user runs them: `python -m train DATA --labels CSV`
as a subprocess (its one-line errors, its data summary, the is_valid split), then the multi-label
model it exports served by a real `python -m serve` process in each format (pickle, safetensors,
onnx), held to fastai's own `learn.get_preds` thresholded, and through `serve.predict` and
`serve.evaluate`.

The data: real MNIST digits, tagged "even" (an even digit), "big" (above 4) and "zero": a 6 is
"even big", a 5 "big", a 0 "even zero", a 1 or a 3 nothing (an empty cell); so cells hold two, one
or no labels, and the whole column makes the set multi-label."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT
from tests.servers import serve_process

PY = sys.executable
N_IMAGES = 600         # digits in the tagged set (one in 5 validation): few, but enough to learn from
BROKEN = "images/broken.png"
MISSING = ["images/gone_1.png", "images/gone_2.png"]


def tags(digit: int) -> list[str]:
    return [t for t, on in (("even", digit % 2 == 0), ("big", digit > 4), ("zero", digit == 0)) if on]


def run(module: str, *args, timeout: int = 900) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process from the checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PY, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_error_line(r: subprocess.CompletedProcess, *words: str) -> str:
    """Exit status 2, one `error:` line on stderr naming `words`, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, r.stderr
    for w in words:
        assert w in errors[0], (w, errors[0])
    return errors[0]


def write_table(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="session")
def tagged(mnist_arrays, tmp_path_factory) -> dict:
    """DATA/images/<i>.png for the first N_IMAGES training digits, and DATA/labels.csv naming them
    (fname, labels, is_valid: every 5th row), plus rows for two files that do not exist and one that
    is not an image."""
    from PIL import Image
    root = tmp_path_factory.mktemp("tagged")
    (root / "images").mkdir()
    rows, truth = [], {}
    for i in range(N_IMAGES):
        name = f"images/{i}.png"
        Image.fromarray(mnist_arrays.train_images[i]).save(root / name)
        t = tags(int(mnist_arrays.train_labels[i]))
        rows.append([name, " ".join(t), "true" if i % 5 == 0 else "false"])
        truth[name] = t
    (root / BROKEN).write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows += [[BROKEN, "even", "false"]] + [[m, "big", "false"] for m in MISSING]
    write_table(root / "labels.csv", ["fname", "labels", "is_valid"], rows)
    valid = [name for name, _, v in rows[:N_IMAGES] if v == "true"]
    return {"root": root, "csv": root / "labels.csv", "truth": truth, "valid": valid}


@pytest.fixture(scope="session")
def multi_model(tagged, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The multi-label model, trained by `python -m train` as a user runs it (the smallest run that
    learns: 28 px, 2 epochs of 480 digits at batch 16; accuracy_multi ~0.93, macro F1 ~0.85)."""
    out = tmp_path_factory.mktemp("models") / "tags"
    r = run("train", tagged["root"], "--labels", tagged["csv"], "--out", out, "--epochs", 2, "--size", 28,
            "--bs", 16, "--lr", "0.005", "--no-augment", timeout=1800)  # ~90 s of CPU; the bound is for a loaded machine
    assert r.returncode == 0, r.stderr[-3000:]
    return out, r


@pytest.fixture(scope="session")
def fastai_probs(multi_model, tagged) -> dict:
    """fastai's own answer on the validation digits: `learn.get_preds` on a `test_dl`, sigmoid applied
    (the loss's activation), as a fastai user gets it from model.pkl."""
    from fastai.learner import load_learner
    learn = load_learner(multi_model[0] / "model.pkl", cpu=True)
    files = [tagged["root"] / n for n in tagged["valid"]]
    preds, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    vocab = [str(c) for c in learn.dls.vocab]
    return {str(f): dict(zip(vocab, p.tolist())) for f, p in zip(files, preds)}


# --------------------------------------------------------------------------- the CSV's errors

def test_a_column_is_multi_label_as_a_whole(tmp_path):
    """One cell with two labels makes the table multi-label: its one-label cells are sets of one, its
    empty cells sets of none (kept); without such a cell an empty cell is a row left out."""
    from models.labels import is_multi_label, read_labels_csv, split_labels
    assert split_labels("  a b  a ") == ["a", "b"] and split_labels("a;b c", ";") == ["a", "b c"]
    assert is_multi_label(["a", "", "a b"]) and not is_multi_label(["a", "", "b"])
    assert not is_multi_label(["a b", "c"], ";")
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"")  # existence is all the reader checks
    multi = read_labels_csv(write_table(tmp_path / "m.csv", ["Fname", "Tags"], [["0.png", "a b"], ["1.png", "a"], ["2.png", ""]]), tmp_path)
    assert multi.multi_label and multi.labels == ["a b", "a", ""] and multi.is_valid is None and not multi.missing
    single = read_labels_csv(write_table(tmp_path / "s.csv", ["file", "label"], [["0.png", "a"], ["1.png", "b"], ["2.png", ""]]), tmp_path)
    assert not single.multi_label and single.labels == ["a", "b"] and [f for f, _ in single.missing] == ["2.png"]


@pytest.mark.parametrize("case", ["no_column", "no_file_exists", "empty", "one_class", "bad_is_valid"])
def test_csv_errors_are_one_line(case, tagged, tmp_path):
    root = tagged["root"]
    table = tmp_path / "labels.csv"
    expect = {
        "no_column": ("has no label column", "fname, tags_of_it", "--label-col"),
        "no_file_exists": ("none of the 3 rows", "names an existing file", "nope/1.png, nope/2.png, nope/3.png"),
        "empty": ("is empty",),
        "one_class": ("only one class ('even')", "at least two labels"),
        "bad_is_valid": ("row 2 has is_valid 'maybe'",),
    }[case]
    if case == "no_column":
        write_table(table, ["fname", "tags_of_it"], [["images/0.png", "big"]])
    elif case == "no_file_exists":
        write_table(table, ["file", "label"], [[f"nope/{i}.png", "big"] for i in (1, 2, 3)])
    elif case == "empty":
        table.write_text("file,label\n\n")
    elif case == "one_class":
        write_table(table, ["image", "label"], [[f"images/{i}.png", "even"] for i in range(8)])
    elif case == "bad_is_valid":
        write_table(table, ["file", "label", "is_valid"], [["images/0.png", "big", "maybe"]])
    r = run("train", root, "--labels", table, "--out", tmp_path / "never", "--epochs", 1, timeout=300)
    one_error_line(r, *expect)
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------- training

def test_multi_label_run_reports_its_data(multi_model, tagged):
    out, r = multi_model
    # The files that do not exist: one warning line, the first few named; training went on.
    warning = next(l for l in r.stderr.splitlines() if "left out" in l)
    assert "2 row(s) of labels.csv left out: images/gone_1.png, images/gone_2.png" in warning
    assert "empty label cell" in r.stderr and "none of the labels" in r.stderr
    assert "multi-label" in r.stdout and "F1" in r.stdout
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["activation"] == "sigmoid" and meta["classes"] == ["big", "even", "zero"]
    assert meta["threshold"] == 0.5 and 0.05 <= meta["best_f1_threshold"] <= 0.95
    m = meta["metrics"]
    assert 0 <= m["f1"] <= m["best_f1"] <= 1 and m["confusion_matrix"] == []
    # It learned: better than answering "no" to everything (accuracy_multi of that baseline ~0.63).
    assert m["valid_accuracy"] > 0.75, m
    # The broken image and the missing files are in the data summary, by the names the CSV gave.
    d = meta["data"]
    assert sorted(s["file"] for s in d["skipped"]) == sorted([BROKEN, *MISSING])
    assert all("/tmp" not in s["reason"] for s in d["skipped"])  # no path of this machine leaves it
    # is_valid honoured: exactly the rows marked true are validated on (all of them readable).
    assert d["n_valid"] == len(tagged["valid"]) == m["n_valid"] and d["n_train"] == N_IMAGES - len(tagged["valid"])
    counts = {c: sum(c in tagged["truth"][n] for n in tagged["valid"]) for c in meta["classes"]}
    assert d["valid_counts"] == counts
    assert d["n_unlabelled"] == sum(not t for t in tagged["truth"].values())
    assert meta["config"]["labels"] == "labels.csv"  # its name, not this machine's path


def test_multi_label_pickle_holds_nothing_of_ours(multi_model, fastai_probs, tagged):
    from tests.test_formats import ALLOWED_ROOTS, FLAGGED, pickle_globals
    found = pickle_globals(multi_model[0] / "model.pkl")
    assert "fastai.losses.BCEWithLogitsLossFlat" in found and "fastai.data.transforms.MultiCategorize" in found
    assert {g.split(".")[0] for g in found} <= ALLOWED_ROOTS, sorted(found)
    assert found & FLAGGED == {"builtins.getattr"}  # fastai's PILImage.create, as for single-label models
    # learn.predict decodes with the loss's threshold: the labels above 0.5.
    from fastai.learner import load_learner
    learn = load_learner(multi_model[0] / "model.pkl", cpu=True)
    name = tagged["valid"][0]
    labels, mask, probs = learn.predict(tagged["root"] / name)
    assert list(labels) == [c for c, p in fastai_probs[str(tagged["root"] / name)].items() if p > 0.5]


# --------------------------------------------------------------------------- serving, every format

def above(probs: dict, threshold: float = 0.5, margin: float = 1e-3) -> tuple[set, set]:
    """(classes clearly above the threshold, classes too near it to call: float rounding may differ)."""
    return ({c for c, p in probs.items() if p > threshold + margin},
            {c for c, p in probs.items() if abs(p - threshold) <= margin})


def post(url: str, files: list[Path]) -> list[dict]:
    handles = [open(f, "rb") for f in files]
    try:
        r = requests.post(url + "/v1/predict", files=[("files", (f.name, h, "image/png")) for f, h in zip(files, handles)],
                          timeout=120)
    finally:
        for h in handles:
            h.close()
    assert r.status_code == 200, r.text
    return r.json()


def test_served_in_every_format_agrees_with_fastai(multi_model, tagged, fastai_probs):
    from gradio_client import Client, handle_file
    files = [tagged["root"] / n for n in tagged["valid"][:24]]
    answers = {}
    for fmt in ("pickle", "safetensors", "onnx"):
        with serve_process(multi_model[0], "--format", fmt) as served:
            health = requests.get(served.url + "/v1/health", timeout=30).json()
            assert health["format"] == fmt and health["multi_label"] is True and health["threshold"] == 0.5
            answers[fmt] = post(served.url, files)
            if fmt == "pickle":  # the web UI: every label above the threshold, and a line naming them
                shown, line = Client(served.url, verbose=False).predict(handle_file(str(files[0])), api_name="/predict")
                want = answers[fmt][0]["labels"]
                assert sorted(c["label"] for c in shown.get("confidences", [])) == sorted(want)
                assert all(f"**{c}**" in line for c in want) if want else "No label above" in line
    for fmt, got in answers.items():
        for f, pred in zip(files, got):
            assert set(pred) == {"labels", "confidences"}, pred  # no single "label"
            conf = pred["confidences"]
            assert [c["label"] for c in conf] and len(conf) == 3
            assert [c["confidence"] for c in conf] == sorted((c["confidence"] for c in conf), reverse=True)
            probs = {c["label"]: c["confidence"] for c in conf}
            reference = fastai_probs[str(f)]
            assert probs == pytest.approx(reference, abs=1e-4), (fmt, f)
            sure, unsure = above(reference)
            assert sure <= set(pred["labels"]) <= sure | unsure, (fmt, f, pred, reference)
            assert pred["labels"] == [c["label"] for c in conf if c["confidence"] > 0.5]
    # The three formats agree with each other on every label set (and on the probabilities, above).
    for other in ("safetensors", "onnx"):
        assert [a["labels"] for a in answers["pickle"]] == [a["labels"] for a in answers[other]], other
    # Some image gets two labels, and some none: the test saw both shapes of a multi-label answer.
    sizes = {len(a["labels"]) for a in answers["pickle"]}
    assert 0 in sizes and 2 in sizes, sizes


def test_predict_cli_prints_labels(multi_model, tagged, fastai_probs, tmp_path):
    files = [tagged["root"] / n for n in tagged["valid"][:5]]
    r = run("serve.predict", multi_model[0], *files, "--json", "--workers", 0, "--csv", tmp_path / "out.csv", timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in r.stdout.splitlines()]
    assert [l["file"] for l in lines] == [str(f) for f in files]
    for line in lines:
        assert set(line) == {"file", "labels", "confidences"} and len(line["confidences"]) == 3
        sure, unsure = above(fastai_probs[line["file"]])
        assert sure <= set(line["labels"]) <= sure | unsure
    with open(tmp_path / "out.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["file", "labels", "confidences", "error"]
    assert [r["labels"] for r in rows] == [";".join(l["labels"]) for l in lines]
    text = run("serve.predict", multi_model[0], files[0], "--workers", 0, timeout=300)
    assert text.returncode == 0 and text.stdout.split("\t")[1] == (";".join(lines[0]["labels"]) or "-")


def test_evaluate_multi_label(multi_model, tagged, fastai_probs, tmp_path):
    """serve.evaluate on the validation rows: accuracy_multi and per-class numbers from fastai's own
    probabilities, thresholded here."""
    table = write_table(tmp_path / "valid.csv", ["fname", "labels"],
                        [[n, " ".join(tagged["truth"][n])] for n in tagged["valid"]])
    r = run("serve.evaluate", multi_model[0], tagged["root"], "--labels", table, "--json", "--out", tmp_path / "eval",
            timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["multi_label"] is True and report["threshold"] == 0.5 and report["n_images"] == len(tagged["valid"])
    classes = ["big", "even", "zero"]
    right = total = 0
    for n in tagged["valid"]:
        probs = fastai_probs[str(tagged["root"] / n)]
        for c in classes:
            right += (probs[c] > 0.5) == (c in tagged["truth"][n])
            total += 1
    assert report["accuracy"] == pytest.approx(right / total, abs=1.5 / total)  # a probability at 0.5 may round
    for c in classes:
        support = sum(c in tagged["truth"][n] for n in tagged["valid"])
        assert report["per_class"][c]["support"] == support
        assert set(report["per_class"][c]) == {"precision", "recall", "f1", "support"}
    assert "f1" in report["macro_avg"] and not (tmp_path / "eval" / "confusion_matrix.png").exists()
    assert (tmp_path / "eval" / "misclassified.csv").is_file()


# --------------------------------------------------------------------------- a single-label CSV

def test_single_label_csv_beside_its_images(mnist_arrays, tmp_path):
    """A CSV with one label per cell trains a single-label model; paths relative to the CSV's own
    folder; no is_valid column: --valid-pct splits; the served shape is today's."""
    from PIL import Image
    data, sheet = tmp_path / "root", tmp_path / "sheets"
    (sheet / "pics").mkdir(parents=True)
    data.mkdir()
    rows = []
    for i in range(61):
        Image.fromarray(mnist_arrays.train_images[i]).save(sheet / "pics" / f"{i}.png")
        rows.append([f"pics/{i}.png", "even" if int(mnist_arrays.train_labels[i]) % 2 == 0 else "odd"])
    rows[-1][1] = ""  # an empty label cell in a single-label table: left out, and said so
    write_table(sheet / "labels.csv", ["image", "label"], rows)
    out = tmp_path / "evenodd"
    r = run("train", data, "--labels", sheet / "labels.csv", "--out", out, "--epochs", 1, "--size", 28, "--bs", 16,
            "--valid-pct", "0.25", "-q")
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["activation"] == "softmax" and meta["classes"] == ["even", "odd"]
    assert "threshold" not in meta and "f1" not in meta["metrics"]  # a single-label folder as before
    per_class = [sum(r[1] == c for r in rows) for c in ("even", "odd")]
    assert meta["data"]["n_valid"] == sum(round(n * 0.25) for n in per_class)  # --valid-pct, per class
    assert meta["data"]["n_train"] + meta["data"]["n_valid"] == 60
    assert [(s["file"], s["reason"]) for s in meta["data"]["skipped"]] == [("pics/60.png", "no label in the 'label' column")]
    from serve.predictor import Predictor
    pred = Predictor.load(out, device="cpu", format="onnx").predict(sheet / "pics" / "0.png").as_dict()
    assert set(pred) == {"label", "confidences"} and len(pred["confidences"]) == 2
