"""Early stopping, the best epoch and the run log (issue 14), as a user runs them: `python -m train` as
a subprocess, the model folder loaded in every format and scored against its own history.csv.

The data set that makes early stopping trigger: MNIST digits under labels drawn at random. There is
nothing to learn, so the validation loss is lowest after the first epoch (the one-cycle rate is still
low) and worse after it; `--seed` fixes the rest.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from models.contract import (CARD_FILE, CURVES_FILE, FORMATS, HISTORY_FILE, STOPPED_COMPLETED, STOPPED_PATIENCE,
                             read_metadata)
from tests.test_train import run_cli
from train.cli import checkpoint_path, main
from train.runlog import _cell as history_cell, read_history

COLUMNS = ["epoch", "phase", "train_loss", "valid_loss", "accuracy", "lr", "seconds"]
COMMON = ["--size", "28", "--bs", "16", "--lr", "0.01", "--no-augment", "--seed", "0", "-q"]


def random_label_digits(arrays, out: Path, classes: int = 3, n_train: int = 20, n_valid: int = 10) -> Path:
    """`classes` x (n_train + n_valid) digits on average, each in a class folder drawn at random, split
    by hand (train/ + valid/)."""
    rng = random.Random(0)
    n = classes * n_train
    for i in range(classes * (n_train + n_valid)):
        d = out / ("train" if i < n else "valid") / f"c{rng.randrange(classes)}"
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arrays.train_images[i]).save(d / f"{i}.png")
    return out


def valid_loss_of(folder: Path, data: Path, fmt: str) -> float:
    """The exported model's mean cross-entropy on data/valid, computed from the probabilities of one
    format (`serve.predictor.Predictor`, as the server runs it): what the Recorder's valid_loss was for
    the epoch whose weights the folder holds."""
    from serve.predictor import Predictor
    predictor = Predictor.load(folder, device="cpu", format=fmt)
    files = sorted((data / "valid").rglob("*.png"))
    probs = predictor.probabilities([predictor.prepare(f) for f in files])
    targets = torch.tensor([predictor.metadata.classes.index(f.parent.name) for f in files])
    return float(-probs[torch.arange(len(files)), targets].clamp_min(1e-45).log().mean())


def stop_epoch(rows: list[dict], patience: int) -> int | None:
    """The oracle of the rule: the first epoch by which `patience` epochs in a row (across phases)
    brought no lower valid_loss, or None."""
    best, wait = math.inf, 0
    for row in rows:
        best, wait = (row["valid_loss"], 0) if row["valid_loss"] < best else (best, wait + 1)
        if wait >= patience:
            return row["epoch"]
    return None


def check_history(folder: Path, rows: list[dict]) -> None:
    assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
    assert (folder / HISTORY_FILE).read_text().splitlines()[0].split(",") == COLUMNS
    for r in rows:
        assert all(math.isfinite(r[c]) for c in COLUMNS if c != "phase") and r["lr"] > 0 and r["seconds"] > 0
        assert 0 <= r["accuracy"] <= 1


def check_curves_and_card(folder: Path) -> None:
    png = (folder / CURVES_FILE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) < 100_000
    with Image.open(folder / CURVES_FILE) as im:
        im.verify()
    card = (folder / CARD_FILE).read_text()
    assert f"]({CURVES_FILE})" in card and f"]({HISTORY_FILE})" in card


@pytest.fixture(scope="module")
def noise(mnist_arrays, tmp_path_factory) -> Path:
    return random_label_digits(mnist_arrays, tmp_path_factory.mktemp("noise") / "digits")


# --------------------------------------------------------------------------- early stopping

def test_early_stopping_ends_before_the_budget_and_exports_the_best_epoch(noise, tmp_path):
    out = tmp_path / "stopped"
    r = run_cli([noise, "--epochs", "6", "--patience", "1", "--out", out, *[a for a in COMMON if a != "-q"]])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(out / HISTORY_FILE)
    fit = read_metadata(out).fit
    best = min(rows, key=lambda row: row["valid_loss"])
    assert fit.stopped == STOPPED_PATIENCE and fit.patience == 1 and fit.epochs_planned == 6
    assert fit.epochs_run == len(rows) == stop_epoch(rows, 1) < 6       # stopped before the budget
    assert fit.best_epoch == fit.kept_epoch == best["epoch"] < rows[-1]["epoch"]
    assert rows[-1]["valid_loss"] > 1.05 * best["valid_loss"]          # the last epoch's weights would show
    assert "early stopping" in r.stdout and f"keeping epoch {best['epoch']}" in r.stdout
    check_history(out, rows)
    check_curves_and_card(out)
    assert "Stopped early" in (out / CARD_FILE).read_text()
    # The folder holds the best epoch's weights, in every format: their loss on the validation set is the
    # best row's, not the last one's.
    for fmt in FORMATS:
        assert valid_loss_of(out, noise, fmt) == pytest.approx(best["valid_loss"], rel=2e-3), fmt
    assert float(history_cell(read_metadata(out).metrics.valid_accuracy)) == best["accuracy"]  # as history.csv writes it
    assert not checkpoint_path(str(out)).parent.exists()


def test_history_and_curves_in_every_model_folder(mnist_model):
    """A run without --patience (the default) logs every epoch too, and keeps the last one."""
    rows = read_history(mnist_model / HISTORY_FILE)
    assert len(rows) == 3 and {r["phase"] for r in rows} == {"scratch"}
    check_history(mnist_model, rows)
    check_curves_and_card(mnist_model)
    fit = read_metadata(mnist_model).fit
    assert fit.stopped == STOPPED_COMPLETED and fit.patience == 0 and fit.epochs_run == fit.kept_epoch == 3
    assert fit.best_epoch == min(rows, key=lambda row: row["valid_loss"])["epoch"]
    assert float(history_cell(read_metadata(mnist_model).metrics.valid_accuracy)) == rows[-1]["accuracy"]


def test_patience_counts_across_fine_tune_phases(noise, mnist_model, tmp_path):
    """With --init: the frozen epoch is epoch 1, the unfrozen ones follow, and one count runs through both."""
    out = tmp_path / "tuned"
    assert main([str(noise), "--init", str(mnist_model), "--epochs", "4", "--patience", "1", "--out", str(out),
                 *COMMON]) == 0
    rows = read_history(out / HISTORY_FILE)
    fit = read_metadata(out).fit
    assert [r["phase"] for r in rows] == ["frozen"] + ["unfrozen"] * (len(rows) - 1) and fit.epochs_planned == 5
    check_history(out, rows)
    stop = stop_epoch(rows, 1)
    assert fit.epochs_run == len(rows) == (stop or 5)
    assert fit.stopped == (STOPPED_PATIENCE if stop else STOPPED_COMPLETED)
    assert fit.kept_epoch == fit.best_epoch == min(rows, key=lambda row: row["valid_loss"])["epoch"]
    assert valid_loss_of(out, noise, "safetensors") == pytest.approx(rows[fit.kept_epoch - 1]["valid_loss"], rel=2e-3)


# --------------------------------------------------------------------------- interrupt and resume

def test_resume_keeps_the_history_the_best_weights_and_the_count(noise, tmp_path, capsys):
    """Interrupted after epoch 2, the checkpoint holds those rows, the best epoch's weights and the
    patience count; the resumed run (a new process, a new Learner) continues all three."""
    import train.learner
    out = tmp_path / "resumed"
    args = [str(noise), "--epochs", "8", "--patience", "2", "--out", str(out), *COMMON]
    save, calls = train.learner.save_checkpoint, []

    def save_then_stop(*a, **kw):
        save(*a, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as Ctrl-C after the second epoch's checkpoint

    mp = pytest.MonkeyPatch()
    mp.setattr(train.learner, "save_checkpoint", save_then_stop)
    try:
        assert main(args) == 130
    finally:
        mp.undo()
    ckpt = checkpoint_path(str(out))
    state = torch.load(ckpt, weights_only=False)["state"]
    before = state["history"]
    assert [r["epoch"] for r in before] == [1, 2] and state["best"]["epoch"] in (1, 2) and "model" in state["best"]
    assert state["wait"] == 2 - state["best"]["epoch"]

    assert main(args[:-1] + ["--patience", "3", "--resume"]) == 2  # another patience is another run
    assert "patience=2" in capsys.readouterr().err

    r = run_cli(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = read_history(out / HISTORY_FILE)
    check_history(out, rows)
    for old, new in zip(before, rows):  # the epochs before the interruption, as they were
        assert (new["epoch"], new["phase"]) == (old["epoch"], old["phase"])
        assert all(new[c] == pytest.approx(old[c], rel=1e-5, abs=0.01 if c == "seconds" else 0) for c in COLUMNS[2:])
    assert len(rows) > 2
    fit = read_metadata(out).fit
    assert fit.epochs_run == len(rows) == (stop_epoch(rows, 2) or 8)  # the count went on from the checkpoint's
    best = min(rows, key=lambda row: row["valid_loss"])
    assert fit.kept_epoch == fit.best_epoch == best["epoch"]
    assert valid_loss_of(out, noise, "onnx") == pytest.approx(best["valid_loss"], rel=2e-3)
    check_curves_and_card(out)


# --------------------------------------------------------------------------- the flag

@pytest.mark.parametrize("argv, expected", [(["mnist"], 0), (["photos"], 0), (["photos", "--patience", "3"], 3),
                                            (["mnist", "--patience", "0"], 0)])
def test_patience_default_is_off(argv, expected):
    from train.config import parse_config
    assert parse_config(argv).patience == expected


def test_help_says_the_default_and_why():
    r = run_cli(["--help"])
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "--patience N" in text and "Default: off for MNIST and photos" in text
    bad = run_cli(["mnist", "--patience", "-1"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


@pytest.mark.parametrize("stale", ["moments", "gradient"])
def test_adamw_steps_a_weight_whose_state_has_another_layout_correctly(stale):
    """torch's fused CPU AdamW walks weight, gradient and moments as flat memory: a channels-last
    moment (or gradient) of a plain weight got the wrong entries' updates. Training's AdamW puts
    them in the weight's layout first, so the step equals the one of matching layouts."""
    from train.learner import TORCH_ADAMW
    torch.manual_seed(0)
    w0, g = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    cl = torch.channels_last

    def two_steps(mismatch: bool) -> torch.Tensor:
        p = torch.nn.Parameter(w0.clone())
        opt = TORCH_ADAMW([p], lr=0.01)
        p.grad = g.clone()
        opt.step()
        if mismatch and stale == "moments":
            for name in ("exp_avg", "exp_avg_sq"):
                opt.state[p][name] = opt.state[p][name].contiguous(memory_format=cl)
        p.grad = g.clone().contiguous(memory_format=cl) if mismatch and stale == "gradient" else g.clone()
        opt.step()
        return p.detach()

    torch.testing.assert_close(two_steps(True), two_steps(False), rtol=0, atol=1e-7)
    assert not two_steps(False).is_contiguous(memory_format=cl)  # the weight itself stays as it was


def _tap_major(t: torch.Tensor) -> torch.Tensor:
    """`t` laid out as train/smallmaps.py lays out layer4's 1x1-map kernels: (kh, kw, out, in) in memory."""
    return t.permute(2, 3, 0, 1).contiguous().permute(2, 3, 0, 1)


@pytest.mark.parametrize("layout", ["channels_last", "tap_major", "contiguous"])
def test_adamw_steps_weights_of_any_layout_as_contiguous_ones(layout, monkeypatch):
    """Training's AdamW steps a weight laid out other than contiguously as the flat memory it fills
    (the fused kernel would copy it): the same numbers as stepping a contiguous copy, and the weight,
    its gradient and its moments keep their shapes and layouts."""
    import train.learner
    from train.learner import TORCH_ADAMW
    flat_steps = []
    step_flat = train.learner._step_flat
    monkeypatch.setattr(train.learner, "_step_flat", lambda p, *args: flat_steps.append(p) or step_flat(p, *args))
    torch.manual_seed(0)
    w0, grads = torch.randn(8, 4, 3, 3), [torch.randn(8, 4, 3, 3) for _ in range(3)]
    lay = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
           "tap_major": _tap_major,
           "contiguous": lambda t: t.contiguous()}[layout]

    def three_steps(layout_of) -> tuple:
        p = torch.nn.Parameter(layout_of(w0.clone()))
        opt = TORCH_ADAMW([p], lr=0.01)
        for g in grads:
            p.grad = layout_of(g.clone())
            opt.step()
        return p, opt.state[p]

    p, state = three_steps(lay)
    # stepped flat from its second step on (the first makes the moments), unless contiguous already
    assert len(flat_steps) == (0 if layout == "contiguous" else 2)
    ref, ref_state = three_steps(lambda t: t.contiguous())
    assert torch.equal(p.detach(), ref.detach())
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[name], ref_state[name])
        assert state[name].shape == p.shape and state[name].stride() == p.stride()
    assert p.shape == w0.shape and p.stride() == lay(w0).stride()
    assert p.grad.shape == p.shape and p.grad.stride() == p.stride() and torch.equal(p.grad, grads[-1])


def test_adamw_stopped_before_its_step_leaves_every_weight_in_shape(monkeypatch):
    """A stop between flattening one weight and the step (Ctrl-C, out of memory while putting a later
    gradient in its weight's layout) must not leave that weight, its gradient or moments flat."""
    from train.learner import TORCH_ADAMW
    ps = [torch.nn.Parameter(_tap_major(torch.randn(8, 4, 3, 3))) for _ in range(2)]
    opt = TORCH_ADAMW(ps, lr=0.01)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    ps[0].grad = torch.randn_like(ps[0])
    ps[1].grad = torch.randn(8, 4, 3, 3)  # another layout: put in the weight's by empty_like, which stops here

    def stop(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "empty_like", stop)
    with pytest.raises(KeyboardInterrupt):
        opt.step()
    for p in ps:
        assert p.shape == p.grad.shape == (8, 4, 3, 3)
        assert all(opt.state[p][k].shape == p.shape for k in ("exp_avg", "exp_avg_sq"))
    assert ps[0].stride() == ps[0].grad.stride() == opt.state[ps[0]]["exp_avg"].stride() == (4, 1, 96, 32)
