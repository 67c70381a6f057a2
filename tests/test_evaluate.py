"""`python -m serve.evaluate` as a subprocess on a real model and real MNIST test digits, checked
against fastai itself: its accuracy, top-5 accuracy and per-file predictions equal `learn.get_preds`'
on the same files, and the per-class numbers equal those worked out here by hand from the
confusion matrix. Also: the broken file is reported and skipped, the outputs exist, the exit codes."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS = 10      # test digits per class: 100 images, a few seconds to score
FIRST_TEST = 5000   # test-set index to start from: past the model fixture's validation digits


def evaluate_cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "serve.evaluate", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def digits(mnist_arrays, tmp_path_factory) -> Path:
    """DATA/<digit>/<index>.png: 10 test digits per class, and one broken file."""
    from PIL import Image
    root = tmp_path_factory.mktemp("eval_digits")
    counts: dict[int, int] = {}
    for i in range(FIRST_TEST, len(mnist_arrays.valid_labels)):
        y = int(mnist_arrays.valid_labels[i])
        if counts.get(y, 0) < PER_CLASS:
            counts[y] = counts.get(y, 0) + 1
            (root / str(y)).mkdir(exist_ok=True)
            Image.fromarray(mnist_arrays.valid_images[i]).save(root / str(y) / f"{i}.png")
        if len(counts) == 10 and min(counts.values()) == PER_CLASS:
            break
    (root / "3" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def good_files(data: Path) -> list[Path]:
    return sorted(f for f in data.rglob("*.png") if f.name != "broken.png")


@pytest.fixture(scope="module")
def fastai_preds(mnist_model, digits):
    """fastai's own answer: `learn.get_preds` on a `test_dl` of the readable files."""
    from fastai.learner import load_learner
    import models.imageio  # noqa: F401  (the learner's input type)
    learn = load_learner(mnist_model / "model.pkl", cpu=True)
    files = good_files(digits)
    preds, _ = learn.get_preds(dl=learn.dls.test_dl(files))
    vocab = [str(c) for c in learn.dls.vocab]
    truth = [vocab.index(f.parent.name) for f in files]
    return {str(f): (p, t) for f, p, t in zip(files, preds, truth)}, vocab


@pytest.fixture(scope="module")
def run_json(mnist_model, digits, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    r = evaluate_cli(mnist_model, digits, "--json", "--out", out)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r, out


def test_accuracy_equals_fastai_get_preds(run_json, fastai_preds):
    report, _, out = run_json
    by_file, vocab = fastai_preds
    correct = sum(int(p.argmax()) == t for p, t in by_file.values())
    assert report["n_images"] == len(by_file) == 10 * PER_CLASS
    assert report["accuracy"] == correct / len(by_file)
    top5 = sum(t in p.topk(5).indices.tolist() for p, t in by_file.values())
    assert report["top5_accuracy"] == top5 / len(by_file)
    with open(out / "predictions.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["file"] for r in rows) == sorted(by_file)
    for r in rows:  # file by file, the same answer and the same loss as fastai's
        p, t = by_file[r["file"]]
        assert r["predicted"] == vocab[int(p.argmax())] and r["label"] == vocab[t]
        assert float(r["loss"]) == pytest.approx(-math.log(float(p[t])), rel=1e-3, abs=1e-4)
    assert report["loss"] == pytest.approx(sum(-math.log(float(p[t])) for p, t in by_file.values()) / len(by_file), rel=1e-3)


def test_per_class_numbers_follow_the_confusion_matrix(run_json, fastai_preds):
    report, _, _ = run_json
    by_file, vocab = fastai_preds
    n = len(vocab)
    cm = [[0] * n for _ in range(n)]
    for p, t in by_file.values():
        cm[t][int(p.argmax())] += 1
    assert report["confusion_matrix"]["matrix"] == cm and report["confusion_matrix"]["classes"] == vocab
    f1s, supports = [], []
    for i, c in enumerate(vocab):
        tp, support, said = cm[i][i], sum(cm[i]), sum(row[i] for row in cm)
        precision = tp / said if said else 0.0
        recall = tp / support
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        got = report["per_class"][c]
        assert got["support"] == support == PER_CLASS
        assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
        assert got["f1"] == pytest.approx(f1)
        f1s.append(f1)
        supports.append(support)
    assert report["macro_avg"]["f1"] == pytest.approx(sum(f1s) / n)
    assert report["weighted_avg"]["f1"] == pytest.approx(sum(f * s for f, s in zip(f1s, supports)) / sum(supports))
    assert report["macro_avg"]["recall"] == pytest.approx(sum(cm[i][i] / sum(cm[i]) for i in range(n)) / n)


def test_outputs_broken_file_and_misclassified(run_json, digits):
    from PIL import Image
    report, r, out = run_json
    broken = str(digits / "3" / "broken.png")
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == [next(l for l in errors if l.startswith(f"error: {broken}: "))]
    assert report["n_skipped"] == 1 and report["skipped"][0]["file"] == broken
    with Image.open(out / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.size[0] > 200
    with open(out / "misclassified.csv") as fh:
        wrong = list(csv.DictReader(fh))
    assert len(wrong) == report["n_misclassified"] == round((1 - report["accuracy"]) * report["n_images"])
    losses = [float(w["loss"]) for w in wrong]
    assert losses == sorted(losses, reverse=True) and all(w["label"] != w["predicted"] for w in wrong)
    assert json.loads((out / "evaluation.json").read_text())["accuracy"] == report["accuracy"]


def test_text_report_and_labels_csv(mnist_model, digits, run_json, tmp_path):
    """--labels: the same files named in a CSV (paths relative to DATA, one missing) score the same."""
    report, _, _ = run_json
    table = tmp_path / "labels.csv"
    with open(table, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["fname", "label"])
        for f in good_files(digits):
            w.writerow([f.relative_to(digits).as_posix(), f.parent.name])
        w.writerow(["3/not_there.png", "3"])
    r = evaluate_cli(mnist_model, digits, "--labels", table)
    assert r.returncode == 0, r.stderr
    assert f"accuracy {report['accuracy']:.4f}" in r.stdout and "macro avg" in r.stdout
    assert [l for l in r.stderr.splitlines() if l.startswith("error:")] == \
        [l for l in r.stderr.splitlines() if l.startswith("error: 3/not_there.png: no such file")]


def test_tta_says_so(mnist_model, digits, run_json):
    report, _, _ = run_json
    r = evaluate_cli(mnist_model, digits, "--tta", "--json")
    assert r.returncode == 0, r.stderr
    tta = json.loads(r.stdout.strip().splitlines()[-1])
    assert tta["tta"] is True and "learn.tta" in tta["scored_by"] and tta["n_images"] == report["n_images"]
    # Mild augmentations of digits the model mostly reads right: within a few points of the plain score.
    assert abs(tta["accuracy"] - report["accuracy"]) <= 0.1


@pytest.mark.parametrize("case", ["no_model", "not_a_model", "no_data", "unknown_class", "split_on_flat"])
def test_bad_model_or_folder_is_one_error_line(case, mnist_model, digits, tmp_path):
    model, data, extra = mnist_model, digits, []
    if case == "no_model":
        model = tmp_path / "missing"
    elif case == "not_a_model":
        model = digits
    elif case == "no_data":
        data = tmp_path / "missing"
    elif case == "unknown_class":
        (tmp_path / "cats").mkdir()
        first = next((digits / "3").glob("[0-9]*.png"))
        (tmp_path / "cats" / "a.png").write_bytes(first.read_bytes())
        data = tmp_path
    elif case == "split_on_flat":
        extra = ["--split", "train"]
    r = evaluate_cli(model, data, *extra)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    if case == "unknown_class":
        assert "'cats'" in lines[0]
