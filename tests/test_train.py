"""The training pipeline: data sources, validation, pretrained weights offline, export round trip,
progress output, interrupt and resume. Real MNIST digits and generated photo folders throughout."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, write_mnist_folder
from synthetic.photoset import CLASSES, make_photo_folder
from train.cli import main
from train.data import load_data

PY = sys.executable


def run_cli(args, env=None, timeout=600, **kw):
    """`python -m train ...` in a fresh process, as a user runs it."""
    e = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([PY, "-m", "train", *map(str, args)], cwd=ROOT, env=e, capture_output=True,
                          text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("photos"), n_per_class=12)


# --------------------------------------------------------------------------- data sources

def test_mnist_from_idx_files(mnist_dir, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    cache = load_data("mnist", 28, progress=False)
    assert cache.vocab == [str(d) for d in range(10)]
    assert cache.images.shape == (70_000, 3, 28, 28) and cache.images.dtype == torch.uint8
    assert int(cache.is_valid.sum()) == 10_000
    assert cache.summary.train_counts["1"] == 6742 and cache.summary.valid_counts["1"] == 1135


def test_mnist_from_folder_layout(mnist_folder, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(mnist_folder))
    cache = load_data("mnist", 28, progress=False)
    assert cache.vocab == [str(d) for d in range(10)]
    assert cache.summary.train_counts == {str(d): 30 for d in range(10)}
    assert cache.summary.valid_counts == {str(d): 10 for d in range(10)}


def test_mnist_folder_layout_matches_idx_pixels(mnist_arrays, mnist_folder, monkeypatch):
    """Decoding the PNGs through the model's transforms gives the IDX pixels exactly."""
    monkeypatch.setenv("MNIST_DIR", str(mnist_folder))
    cache = load_data("mnist", 28, progress=False)
    first_zero = int(next(i for i, y in enumerate(mnist_arrays.train_labels) if y == 0))
    want = torch.from_numpy(mnist_arrays.train_images[first_zero].copy())
    got = cache.images[(cache.labels == 0) & ~cache.is_valid][0]
    assert torch.equal(got[0], want) and torch.equal(got[1], want)


def test_mnist_from_idx_files_at_another_size(mnist_arrays, mnist_dir, monkeypatch):
    """`python -m train mnist --size 36` on the IDX files: every digit resized (the check below)."""
    from train.data import _resized
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    cache = load_data("mnist", 36, progress=False)
    assert cache.images.shape == (70_000, 3, 36, 36) and int(cache.is_valid.sum()) == 10_000
    assert torch.equal(cache.images[:3], _resized(mnist_arrays.train_images[:3], 36))
    assert torch.equal(cache.images[-1:], _resized(mnist_arrays.valid_images[-1:], 36))


def test_mnist_at_a_size_beyond_memory_is_a_clear_error(mnist_dir, tmp_path, monkeypatch):
    """70,000 images at 1,000 px would be 210 GB: refused with what it takes, not a traceback."""
    monkeypatch.setenv("MNIST_DIR", str(mnist_dir))
    r = run_cli(["mnist", "--size", "1000", "--epochs", "1", "--out", tmp_path / "m", "-q"], timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "--size 1000 needs 195.6 GB" in r.stderr and "smaller --size" in r.stderr
    assert not (tmp_path / "m").exists()


def test_mnist_idx_at_another_size_matches_the_png_layout(mnist_arrays, mnist_folder, monkeypatch):
    """At another size than 28 the IDX arrays are resized as the PNGs are when decoded through the
    model's transforms: the pixels a served upload of the same digit gets."""
    from train.data import _resized
    monkeypatch.setenv("MNIST_DIR", str(mnist_folder))
    for size in (36, 20):
        from_pngs = load_data("mnist", size, progress=False)
        for digit in (0, 7):  # the folder holds the first 30 of each digit, in its own file order
            ours = from_pngs.images[(from_pngs.labels == digit) & ~from_pngs.is_valid]
            first = [i for i, y in enumerate(mnist_arrays.train_labels) if y == digit][:len(ours)]
            from_idx = _resized(mnist_arrays.train_images[first], size)
            assert from_idx.shape == (len(ours), 3, size, size)
            assert sorted(x.numpy().tobytes() for x in from_idx) == sorted(x.numpy().tobytes() for x in ours)


def test_greyscale_training_batches_are_augmented_as_one_channel(mnist_folder, photos, monkeypatch):
    """Digits (three equal channels) are augmented as one channel, then repeated: the same batches,
    bit for bit, as augmenting all three, training and validation alike; colour photos keep three."""
    import itertools
    from fastai.torch_core import set_seed
    from train import data
    cache = data.load_data(str(mnist_folder), 28, progress=False)
    assert cache.is_grey() and not data.load_data(str(photos["root"]), 32, progress=False).is_grey()

    def batches(grey: bool) -> list:
        monkeypatch.setattr(data.ImageCache, "is_grey", lambda self: grey)
        set_seed(0)
        dls = data.build_dataloaders(cache, 32, *cache.stats(), augment=True, flip=False)
        assert ("OneChannel" in [type(t).__name__ for t in dls.train.after_batch.fs]) == grey
        return [x for x, _ in itertools.islice(dls.train, 3)] + [dls.valid.one_batch()[0]]
    one, three = batches(True), batches(False)
    assert all(a.shape[1:] == (3, 28, 28) and torch.equal(a, b) for a, b in zip(one, three))
    assert not torch.equal(one[0], one[1])  # (augmented batches, not one repeated)


def test_mnist_missing_copy_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MNIST_DIR", str(tmp_path))
    assert main(["mnist", "--out", str(tmp_path / "m"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "IDX files" in err and "MNIST_DIR" in err and "Traceback" not in err


def test_mnist_offline_without_copy_says_how_to_point_at_one(tmp_path):
    env = {"MNIST_DIR": "", "FASTAI_HOME": str(tmp_path / "fastai")}
    r = run_cli(["mnist", "--out", tmp_path / "m", "-q"], env=env, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "could not download MNIST" in r.stderr and "MNIST_DIR" in r.stderr
    assert "Traceback" not in r.stderr


def test_folder_split_by_valid_pct_skips_broken_files(photos):
    cache = load_data(str(photos["root"]), 32, valid_pct=0.25, progress=False)
    s = cache.summary
    assert s.classes == list(CLASSES)
    # recorded relative to the data folder, never as this machine's path
    assert {f for f, _ in s.skipped} == {f"circle/{p.name}" for p in photos["broken"]}
    reasons = dict((Path(f).name, r) for f, r in s.skipped)
    assert "empty" in reasons["empty.png"] and "truncated" in reasons["truncated.jpg"]
    assert "not an image" in reasons["not_really.jpg"]
    assert s.train_counts["circle"] + s.valid_counts["circle"] == 12  # 15 files: 3 broken, notes.txt ignored
    assert all(s.valid_counts[c] == 3 for c in CLASSES)
    assert s.min_size[0] >= 24 and s.max_size[0] < 320
    assert cache.images.shape[1:] == (3, 32, 32)


def test_split_is_fixed_by_seed(photos):
    a, b, c = (load_data(str(photos["root"]), 32, 0.2, seed, progress=False) for seed in (1, 1, 2))
    assert torch.equal(a.is_valid, b.is_valid) and not torch.equal(a.is_valid, c.is_valid)
    assert torch.equal(a.images, b.images)  # the same readable images, in the same order


def _broken_files(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"broken_{i}.png").write_bytes(b"")  # an empty file: unreadable


def test_unreadable_files_take_no_validation_places(tmp_path):
    """The split is drawn among the readable images: a class with broken files still gets its 20%."""
    root = tmp_path / "data"
    _class_dir(root, "a", 10)
    _broken_files(root / "a", 5)
    _class_dir(root, "b", 10)
    for seed in range(6):
        s = load_data(str(root), 32, 0.2, seed, progress=False).summary
        assert s.valid_counts == {"a": 2, "b": 2} and s.train_counts == {"a": 8, "b": 8}, seed
        assert len(s.skipped) == 5


def test_a_class_with_just_enough_readable_images_always_trains(tmp_path):
    """5 readable images and a broken one: whichever seed, 1 is validated on and 4 learned from.
    (Split before decoding, the broken file could be the one validation pick, and the run was told
    to 'drop the train/valid split' of a folder that has none.)"""
    root = tmp_path / "data"
    _class_dir(root, "a", 10)
    _class_dir(root, "b", 5)
    _broken_files(root / "b", 1)
    for seed in range(30):
        s = load_data(str(root), 32, 0.2, seed, progress=False).summary
        assert (s.train_counts["b"], s.valid_counts["b"]) == (4, 1), seed


def test_too_few_readable_images_in_an_unsplit_folder(tmp_path, capsys):
    root = tmp_path / "data"
    _class_dir(root, "a", 10)
    _class_dir(root, "b", 4)
    _broken_files(root / "b", 2)
    assert main([str(root), "--out", str(tmp_path / "m"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "error: too few readable images in class b (4)" in err and "2 unreadable file(s)" in err
    assert "split" not in err and "Traceback" not in err  # this folder has no split to drop


@pytest.mark.parametrize("names", [("train", "valid"), ("training", "testing")])
def test_presplit_folders(tmp_path, names):
    made = make_photo_folder(tmp_path / "p", n_per_class=10, split=True, broken=False)
    if names != ("train", "valid"):
        for old, new in zip(("train", "valid"), names):
            (made["root"] / old).rename(made["root"] / new)
    cache = load_data(str(made["root"]), 32, progress=False)
    assert cache.summary.train_counts == {c: 8 for c in CLASSES}
    assert cache.summary.valid_counts == {c: 2 for c in CLASSES}


# --------------------------------------------------------------------------- validation errors

def _class_dir(root, name, n, start=0):
    from synthetic.photoset import draw_shape
    import random
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        draw_shape("circle", (40, 40), random.Random(i)).save(d / f"{i}.png")


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("empty", "no images found"),
    ("one_class", "only one class"),
    ("too_few", "too few readable images in class b (3)"),
    ("no_valid", "has no validation images"),
    ("a_file", "is not a folder"),
])
def test_validation_errors_are_clear(tmp_path, capsys, case, message):
    root = tmp_path / "data"
    if case == "empty":
        root.mkdir()
        (root / "a").mkdir()
        (root / "a" / "notes.txt").write_text("no images here")
    elif case == "one_class":
        _class_dir(root, "a", 10)
    elif case == "too_few":
        _class_dir(root, "a", 10)
        _class_dir(root, "b", 3)
    elif case == "no_valid":
        _class_dir(root / "train", "a", 8)
        _class_dir(root / "train", "b", 8)
        _class_dir(root / "valid", "a", 2)
    elif case == "a_file":
        root.write_text("not a folder")
    assert main([str(root), "--out", str(tmp_path / "m"), "-q"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not (tmp_path / "m").exists()


def test_bad_flags_are_argparse_errors(tmp_path):
    r = run_cli(["mnist", "--lr", "fast", "--epochs", "0"])
    assert r.returncode == 2 and "expected a number or 'auto'" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["bench/train_mnist.py", "--seeds", "42,x"], "expected seeds separated by commas, got '42,x'"),
    (["bench/train_mnist.py", "--seeds", "-1"], "expected seeds >= 0"),
    (["bench/serve_photos.py", "--peer-threads", "0,2"], "expected thread counts >= 1"),
])
def test_bench_lists_of_numbers_are_argparse_errors(argv, message):
    # models.cli.int_list, the one parser of "42,1,2"-style flags, seen from the benches' command lines
    r = subprocess.run([PY, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("argv, expected", [
    (["mnist"], dict(epochs=3, bs=256, lr="0.02", size=36, augment=True, flip=False)),
    (["mnist", "--epochs", "1"], dict(epochs=1, bs=128, lr="0.008", size=28, augment=False)),  # one epoch: more, smaller steps
    (["mnist", "--epochs", "1", "--size", "36"], dict(size=36)),
    (["mnist", "--epochs", "1", "--augment"], dict(augment=True)),
    (["mnist", "--epochs", "1", "--bs", "64"], dict(bs=64, lr="0.008")),       # a given value always wins
    (["mnist", "--epochs", "3", "--lr", "0.02"], dict(bs=256, lr="0.02")),
    (["photos"], dict(epochs=5, bs=64, lr="3e-3", size=128, augment=True)),
    (["photos", "--pretrained"], dict(lr="2e-3", size=224)),
])
def test_defaults_resolve_per_source_and_budget(argv, expected):
    from train.config import parse_config
    cfg = parse_config(argv)
    assert {k: getattr(cfg, k) for k in expected} == expected


# --------------------------------------------------------------------------- training paths

def test_train_photos_end_to_end_with_line_per_epoch(photos, tmp_path):
    out = tmp_path / "photos_model"
    r = run_cli([photos["root"], "--epochs", "2", "--size", "32", "--bs", "16", "--out", out])
    assert r.returncode == 0, r.stderr[-3000:]
    # Not a terminal: one plain line per epoch, no progress-bar redraws in the log.
    assert "epoch 1/2" in r.stdout and "epoch 2/2" in r.stdout and "valid_loss" in r.stdout
    assert len(r.stdout) < 5_000 and "|████" not in r.stdout + r.stderr
    assert "skipping" in r.stderr and "truncated.jpg" in r.stderr
    assert "skipped files: 3" in r.stdout
    assert "PassManager" not in r.stdout + r.stderr  # the ONNX exporter's INFO notes stay out of the log
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["data"]["n_skipped"] == 3 and meta["config"]["augment"] is True
    assert meta["classes"] == list(CLASSES) and meta["image_size"] == 32


def _fake_imagenet_weights(torch_home: Path) -> None:
    """torchvision's resnet18 weights under the hub cache's own file name, so fastai's normal
    `pretrained=True` path loads them with no network."""
    from torchvision.models import resnet18
    ckpt = torch_home / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(resnet18().state_dict(), ckpt / "resnet18-f37072fd.pth")


def test_pretrained_offline_from_the_hub_cache(photos, tmp_path):
    _fake_imagenet_weights(tmp_path / "torch")
    out = tmp_path / "pre"
    r = run_cli([photos["root"], "--pretrained", "--epochs", "1", "--size", "32", "--out", out, "--bs", "16"],
                env={"TORCH_HOME": str(tmp_path / "torch")})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[frozen] epoch 1/1" in r.stdout and "[unfrozen] epoch 1/1" in r.stdout  # fine_tune's schedule
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["config"]["pretrained"] is True
    assert meta["normalize"]["mean"] == pytest.approx([0.485, 0.456, 0.406])  # ImageNet statistics


def test_pretrained_offline_without_weights_is_a_clear_error(photos, tmp_path):
    r = run_cli([photos["root"], "--pretrained", "--out", tmp_path / "pre", "-q"],
                env={"TORCH_HOME": str(tmp_path / "empty_torch")}, timeout=300)
    assert r.returncode == 2
    assert "resnet18-f37072fd.pth" in r.stderr and "without --pretrained" in r.stderr
    assert "Traceback" not in r.stderr


def test_init_from_an_exported_model_and_lr_auto(mnist_model, photos, tmp_path, capsys):
    out = tmp_path / "from_mnist"
    assert main([str(photos["root"]), "--init", str(mnist_model), "--epochs", "1", "--size", "28",
                 "--bs", "16", "--lr", "auto", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "lr_find suggests" in printed
    meta = json.loads((out / "metadata.json").read_text())
    mnist_meta = json.loads((mnist_model / "metadata.json").read_text())
    assert meta["config"]["init"] == mnist_model.name  # its name: no path of this machine in the metadata
    assert meta["normalize"] == mnist_meta["normalize"]  # the body was trained with those statistics
    assert meta["config"]["lr"] != "auto" and float(meta["config"]["lr"]) > 0


# --------------------------------------------------------------------------- export

EXPECTED_META = {"name", "classes", "arch", "image_size", "normalize", "config", "seed", "data", "metrics",
                 "training_seconds", "versions", "created", "examples", "lr", "device"}


def test_model_folder_is_complete(mnist_model):
    files = {p.name for p in mnist_model.iterdir()}
    assert {"model.pkl", "metadata.json", "confusion_matrix.png", "top_losses.png", "README.md", "examples"} <= files
    meta = json.loads((mnist_model / "metadata.json").read_text())
    assert EXPECTED_META <= set(meta)
    assert meta["classes"] == [str(d) for d in range(10)] and meta["arch"] == "resnet18"
    assert set(meta["versions"]) == {"python", "torch", "torchvision", "fastai", "fastcore", "pillow"}
    m = meta["metrics"]
    assert 0.9 <= m["valid_accuracy"] <= 1 and len(m["confusion_matrix"]) == 10
    assert sum(map(sum, m["confusion_matrix"])) == m["n_valid"] == 500
    assert set(m["per_class_accuracy"]) == set(meta["classes"])
    assert meta["data"]["train_counts"]["3"] == 300 and meta["data"]["n_skipped"] == 0
    assert len(list((mnist_model / "examples").glob("*.png"))) == 30
    card = (mnist_model / "README.md").read_text()
    assert f"{m['valid_accuracy']:.2%}" in card and "load_learner" in card
    assert not list(mnist_model.parent.glob(".*partial*")) and not list(mnist_model.parent.glob(".*checkpoint"))
    # Trained at 28 px on CPU, so with train.smallmaps' shortcuts: none of them is pickled.
    assert b"smallmaps" not in (mnist_model / "model.pkl").read_bytes()


def test_one_pass_evaluation_matches_fastai_interpretation(mnist_model, mnist_folder):
    """`evaluate` reuses one pass over the data; fastai's own `ClassificationInterpretation` (three
    passes) must agree with it on the confusion matrix and the losses."""
    from fastai.interpret import ClassificationInterpretation
    from fastai.learner import load_learner
    from PIL import Image
    from train.export import evaluate
    learn = load_learner(mnist_model / "model.pkl")
    files = sorted((mnist_folder / "testing").rglob("*.png"))
    items = [(Image.open(f).convert("RGB"), f.parent.name) for f in files]
    dl = learn.dls.test_dl(items, with_labels=True)
    interp, metrics = evaluate(learn, dl)
    reference = ClassificationInterpretation.from_learner(learn, dl=dl)
    assert metrics["confusion_matrix"] == reference.confusion_matrix().tolist()
    assert metrics["n_valid"] == len(files) == 100
    assert torch.allclose(interp.losses, reference.losses, atol=1e-5)
    cm = reference.confusion_matrix()
    assert metrics["valid_accuracy"] == pytest.approx(cm.trace() / cm.sum())


def test_last_epoch_validation_is_reused_for_the_export_metrics(mnist_folder, tmp_path):
    """`fit` keeps the last epoch's validation outputs; scoring them must equal a fresh pass."""
    from fastai.torch_core import set_seed
    from train.config import TrainConfig
    from train.data import build_dataloaders, load_data
    from train.export import evaluate
    from train.learner import build_learner, fit, plan_phases
    set_seed(0, reproducible=True)
    cfg = TrainConfig(source=str(mnist_folder), out=str(tmp_path / "m"), epochs=2, size=28, bs=32,
                      lr="0.01", augment=False, quiet=True).resolve()
    cache = load_data(cfg.source, 28, progress=False)
    mean, std = cache.stats()
    learn = build_learner(build_dataloaders(cache, 32, mean, std), cfg, torch.device("cpu"), tmp_path)
    seconds, kept = fit(learn, plan_phases(cfg, 0.01), tmp_path / "c.pth", {}, quiet=True)
    assert seconds > 0 and kept is not None and len(kept[0]) == len(kept[1]) == 100
    interp_kept, kept_metrics = evaluate(learn, outputs=kept)
    interp_fresh, fresh_metrics = evaluate(learn)
    assert kept_metrics == fresh_metrics
    assert torch.allclose(interp_kept.losses, interp_fresh.losses, atol=1e-4)
    assert not any(type(cb).__name__ == "KeepLastValidation" for cb in learn.cbs)  # never exported


LOAD_IN_FRESH_PROCESS = r"""
import json, sys, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
from fastai.learner import load_learner
from PIL import Image
folder, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
learn = load_learner(folder / "model.pkl")  # CPU by default
names = [type(cb).__name__ for cb in learn.cbs]
by_path = [learn.predict(f)[0] for f in files]
# a loaded image: fastai's PILImage.create retypes a lazily opened one without decoding it (fastai's own
# behaviour for every vision learner), and the exported learner's input type is fastai's PILImage
by_pil = [learn.predict(Image.open(f).convert("RGB"))[0] for f in files]
probs, _ = learn.get_preds(dl=learn.dls.test_dl(files))
print(json.dumps({"path": by_path, "pil": by_pil, "batch": [learn.dls.vocab[i] for i in probs.argmax(1)],
                  "cbs": names, "device": str(next(learn.model.parameters()).device)}))
"""


def test_export_loads_in_a_fresh_process(mnist_model, mnist_folder):
    files = sorted((mnist_folder / "testing").rglob("*.png"))[::4]
    r = subprocess.run([PY, "-c", LOAD_IN_FRESH_PROCESS, str(mnist_model), *map(str, files)], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["path"] == got["pil"] == got["batch"]
    truth = [f.parent.name for f in files]
    assert sum(p == t for p, t in zip(got["path"], truth)) >= 0.85 * len(files)
    assert got["device"] == "cpu"
    assert set(got["cbs"]) <= {"TrainEvalCallback", "Recorder", "CastToTensor"}  # nothing of ours pickled


def test_export_replaces_an_old_model_only_when_complete(mnist_model, tmp_path):
    """The export writes through models.atomic: the old model stays whole at `out` until the new
    folder is complete, and nothing is left beside it afterwards (tests/test_atomic.py: the rest)."""
    import shutil
    from models.atomic import atomic_folder
    out = tmp_path / "m"
    shutil.copytree(mnist_model, out)
    with atomic_folder(out) as new:
        (new / "marker").write_text("new")
        assert (out / "model.pkl").is_file() and not (out / "marker").exists()  # not yet replaced
    assert (out / "marker").read_text() == "new" and not (out / "model.pkl").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# --------------------------------------------------------------------------- interrupt and resume

def _default_sigint():
    # A shell that starts jobs with `&` hands them SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_keeps_the_checkpoint_and_resume_finishes(mnist_arrays, tmp_path, sig):
    data = write_mnist_folder(mnist_arrays, tmp_path / "digits", 60, 10)
    out = tmp_path / "models" / "digits"
    ckpt = tmp_path / "models" / ".digits.checkpoint" / "checkpoint.pth"
    args = [data, "--epochs", "3", "--size", "28", "--bs", "32", "--out", out]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PY, "-m", "train", *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 300
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint was written after the first epoch"
    proc.send_signal(sig)  # SIGINT is what Ctrl-C sends
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    assert "interrupted" in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists(), "an interrupted run must not leave a model folder"
    state = torch.load(ckpt, weights_only=False)["state"]
    done = state["done"]["scratch"]
    assert 1 <= done < 3

    r = run_cli([*args, "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming" in r.stdout
    assert f"epoch {done + 1}/3" in r.stdout and f"epoch {done}/3" not in r.stdout  # finished epochs skipped
    assert (out / "model.pkl").is_file() and not ckpt.exists()


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, photos, capsys):
    assert main([str(photos["root"]), "--resume", "--out", str(tmp_path / "x"), "-q"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """A real checkpoint after epoch 1 of 2, left by a run stopped the way Ctrl-C stops it; returns
    (the run's arguments, a fresh copy of the checkpoint each time it is called)."""
    import shutil
    import train.learner
    base = tmp_path_factory.mktemp("resume")
    data = make_photo_folder(base / "photos", n_per_class=10)["root"]
    out = base / "models" / "m"
    args = [str(data), "--epochs", "2", "--size", "32", "--bs", "16", "--lr", "0.005", "--out", str(out), "-q"]
    save = train.learner.save_checkpoint

    def save_then_stop(*a, **kw):
        save(*a, **kw)
        raise KeyboardInterrupt

    mp = pytest.MonkeyPatch()
    mp.setattr(train.learner, "save_checkpoint", save_then_stop)
    try:
        assert main(args) == 130
    finally:
        mp.undo()
    ckpt = out.parent / ".m.checkpoint" / "checkpoint.pth"
    kept = base / "kept.pth"
    shutil.copy(ckpt, kept)

    def restore() -> Path:
        ckpt.parent.mkdir(exist_ok=True)
        shutil.copy(kept, ckpt)
        return ckpt
    return args, restore


def _with(args, flag, value=None):
    """`args` with `flag` set to `value` (replaced if present), or added as a switch."""
    args = list(args)
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag] if value is None else [flag, value]
    return args


@pytest.mark.parametrize("flag, value, saved", [
    ("--seed", "7", "seed=42"),              # re-splits the folder: trained-on images would be validated on
    ("--valid-pct", "0.3", "valid_pct=0.2"),
    ("--no-augment", None, "augment=True"),
    ("--no-flip", None, "flip=True"),
    ("--lr", "0.05", "lr='0.005'"),          # was silently replaced by the checkpoint's
    ("--epochs", "3", "epochs=2"),
    ("--bs", "8", "bs=16"),
])
def test_resume_refuses_a_setting_that_changes_the_run(interrupted, flag, value, saved, capsys):
    args, restore = interrupted
    ckpt = restore()
    assert main(_with(args, flag, value) + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint was made with " + saved) and "without --resume" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert ckpt.is_file()  # nothing of the interrupted run is lost


def test_resume_refuses_changed_data(interrupted, capsys):
    from synthetic.photoset import draw_shape
    import random
    args, restore = interrupted
    restore()
    extra = Path(args[0]) / "square" / "added_later.png"
    draw_shape("square", (40, 40), random.Random(0)).save(extra)
    try:
        assert main(args + ["--resume"]) == 2
    finally:
        extra.unlink()
    assert "error: --resume: the data changed since the checkpoint" in capsys.readouterr().err


def test_resume_keeps_the_saved_lr_and_accepts_what_does_not_change_the_result(interrupted, capsys):
    """An omitted --lr means the checkpoint's; --device, --workers and --quiet may differ."""
    args, restore = interrupted
    restore()
    args = [a for i, a in enumerate(args) if a != "--lr" and args[i - 1] != "--lr"]
    assert main(_with(_with(args, "--workers", "1"), "--device", "cpu") + ["--resume"]) == 0, capsys.readouterr().err
    meta = json.loads((Path(args[args.index("--out") + 1]) / "metadata.json").read_text())
    assert meta["lr"] == 0.005 and meta["config"]["lr"] == "0.005"


@pytest.mark.parametrize("given, saved_given, ok", [
    ("", "0.005", True),        # omitted: the checkpoint's
    ("0.005", "0.005", True),
    ("5e-3", "0.005", True),    # the same number written another way
    ("auto", "auto", True),     # the same command again: lr_find's pick is in the checkpoint
    ("auto", "0.005", False),
    ("0.01", "auto", False),
])
def test_resume_lr_rule(given, saved_given, ok):
    from train.config import TrainConfig
    saved = TrainConfig(source="photos", epochs=2, lr="0.005").resolve().as_dict()
    cfg = TrainConfig(source="photos", epochs=2, lr=given, resume=True).resolve()
    assert (cfg.resume_conflict(saved, saved_given) is None) == ok


# --------------------------------------------------------------------------- full MNIST

@pytest.mark.slow
def test_full_mnist_one_epoch_reaches_98_5(mnist_dir, tmp_path):
    out = tmp_path / "mnist"
    r = run_cli(["mnist", "--epochs", "1", "--out", out], env={"MNIST_DIR": str(mnist_dir)}, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["metrics"]["n_valid"] == 10_000
    # 99.00-99.08% at seeds 42, 1, 2 on the development machine, 98.95% at seed 42 on CI's of
    # 2026-12-02, 98.84% on an Intel Xeon without AVX512-BF16 (2026-12-03): oneDNN's kernels, and
    # so the rounding, differ by CPU. The article's own pipeline reaches 98.5-98.9%; a broken input
    # pipeline or schedule falls well below this bar.
    assert meta["metrics"]["valid_accuracy"] >= 0.985, meta["metrics"]["valid_accuracy"]
