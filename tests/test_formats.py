"""The model folder's formats (issue 10): model.pkl that loads with fastai alone, model.safetensors that
loads without unpickling, one typed metadata.json, and the --format flag, tested as users run them:
loaders in fresh processes outside the checkout, the CLIs as subprocesses, the server as a process."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle
import pickletools
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from models.contract import (ARCHS, METADATA_FILE, METADATA_VERSION, MODEL_FILE, ONNX_FILE, WEIGHTS_FILE,
                             ModelFolderError, ModelMetadata, load_model_folder, read_metadata)
from serve.predictor import Predictor
from tests.conftest import ROOT
from synthetic.photoset import exif_rotated_jpeg, save_as
from tests.test_hub import assert_clean_error
from tests.servers import serve_process

PY = sys.executable
N_ORACLE = 500  # held-out MNIST digits compared one by one


# ------------------------------------------------------------------------------------------------ helpers

def outside(code: str, cwd: Path, *args, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`python -I -c code` in `cwd`: isolated mode, so neither the cwd, PYTHONPATH nor the user site is on
    sys.path; the script first proves that nothing of this checkout is importable."""
    guard = ("import importlib.util as _u, sys as _s\n"
             f"assert not any(p and __import__('pathlib').Path(p).resolve() == __import__('pathlib').Path({str(ROOT)!r}) for p in _s.path), _s.path\n"
             "assert all(_u.find_spec(m) is None for m in ('models', 'serve', 'train')), 'the checkout is importable'\n"
             "import warnings; warnings.simplefilter('ignore')\n")
    env = {k: v for k, v in (env or os.environ).items() if k != "PYTHONPATH"}
    return subprocess.run([PY, "-I", "-c", guard + code, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def pickle_globals(path: Path) -> set[str]:
    """Every `module.name` a torch-saved pickle imports (GLOBAL and STACK_GLOBAL), read with pickletools:
    nothing is unpickled."""
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    memo, pushed, found = {}, [], set()
    for op, arg, _ in pickletools.genops(data):
        value = None
        if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"):
            value = arg
        elif op.name in ("BINGET", "LONG_BINGET", "GET"):
            value = memo.get(arg)
        elif op.name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[arg] = pushed[-1] if pushed else None
            continue
        elif op.name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
            continue
        elif op.name == "GLOBAL":
            value = arg.replace(" ", ".")
            found.add(value)
        elif op.name == "STACK_GLOBAL":
            value = f"{pushed[-2]}.{pushed[-1]}"
            found.add(value)
        pushed.append(value)
    return found


def evil_pickle(path: Path, marker: Path) -> None:
    """A model.pkl that creates `marker` when unpickled, as a malicious repo's would run its code."""
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    path.write_bytes(pickle.dumps(Evil()))


@pytest.fixture(scope="module")
def folder(mnist_model) -> Path:
    return mnist_model


@pytest.fixture(scope="module")
def pickled(folder) -> Predictor:
    return Predictor.load(folder, device="cpu", format="pickle")


@pytest.fixture(scope="module")
def rebuilt(folder) -> Predictor:
    return Predictor.load(folder, device="cpu", format="safetensors")


@pytest.fixture(scope="module")
def onnx(folder) -> Predictor:
    return Predictor.load(folder, device="cpu", format="onnx", threads=1)


@pytest.fixture(scope="module")
def digit_files(mnist_arrays, tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("digits")
    files = []
    for i in range(20):
        Image.fromarray(mnist_arrays.valid_images[i]).save(out / f"{i}.png")
        files.append(out / f"{i}.png")
    return files


@pytest.fixture
def evil_folder(folder, tmp_path) -> tuple[Path, Path]:
    """The test model folder, its model.pkl replaced by one that writes a marker file when loaded."""
    copy = tmp_path / "evil-model"
    shutil.copytree(folder, copy)
    marker = tmp_path / "PWNED"
    evil_pickle(copy / MODEL_FILE, marker)
    return copy, marker


# ------------------------------------------------------------------------------------------------ 1. model.pkl

# Every module the pickle may import from: fastai and what fastai's own pickles are made of (its
# transforms are fasttransform/plum objects; torchvision's resnet; PIL and numpy values), and the stdlib.
ALLOWED_ROOTS = {"fastai", "fastcore", "fasttransform", "plum", "torch", "torchvision", "PIL", "numpy",
                 "builtins", "collections", "pathlib", "inspect", "typing", "random", "_operator", "_functools"}
# What pickle scanners (the Hub's picklescan, modelscan) list as dangerous or suspicious.
FLAGGED = {"builtins.eval", "builtins.exec", "builtins.compile", "builtins.open", "builtins.__import__",
           "builtins.getattr", "builtins.apply", "builtins.breakpoint", "functools.partial", "_functools.partial",
           "operator.attrgetter", "_operator.attrgetter", "_codecs.encode"}


def test_pickle_holds_only_fastai_torch_and_stdlib(folder):
    found = pickle_globals(folder / MODEL_FILE)
    assert "fastai.learner.Learner" in found and "fastai.vision.core.PILImage" in found  # the reader works
    assert {g.split(".")[0] for g in found} <= ALLOWED_ROOTS, sorted(g for g in found if g.split(".")[0] not in ALLOWED_ROOTS)
    assert not [g for g in found if g.startswith(("models.", "serve.", "train.", "__main__", "cloudpickle"))]
    # The one flagged global left is fastai's: its type transform is the classmethod `PILImage.create`,
    # which pickle can only name as getattr(PILImage, "create") (README: "What the pickle holds").
    assert found & FLAGGED == {"builtins.getattr"}
    assert "fastai.optimizer.Adam" in found and "fastai.optimizer.OptimWrapper" not in found


def test_load_learner_outside_the_checkout(folder, digit_files, pickled, tmp_path):
    """A fastai user's notebook: load_learner, predict (a path, an array), get_preds(test_dl(files))."""
    code = """
import json, sys
import numpy as np
from PIL import Image
from fastai.learner import load_learner
learn = load_learner(sys.argv[1])
files = sys.argv[2:]
label, index, probs = learn.predict(files[0])
array_label = learn.predict(np.array(Image.open(files[0]).convert("RGB")))[0]
preds, _ = learn.get_preds(dl=learn.dls.test_dl(files))
print(json.dumps({"label": label, "array_label": array_label, "vocab": list(learn.dls.vocab),
                  "probs": preds.tolist(), "path": str(learn.path)}))
"""
    p = outside(code, tmp_path, folder / MODEL_FILE, *digit_files)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    ours = pickled.probabilities([pickled.prepare(f) for f in digit_files])
    assert out["vocab"] == pickled.classes
    assert out["label"] == out["array_label"] == pickled.classes[int(ours[0].argmax())]
    assert np.abs(np.array(out["probs"]) - ours.numpy()).max() < 1e-4
    assert out["path"] == "."  # no path of the training machine inside


def test_from_pretrained_fastai_on_the_push_folder(folder, digit_files, pickled, tmp_path):
    """huggingface_hub's own fastai loader on what `serve.hub push` uploads, then `learn.predict` on a
    numpy array, as the Hub's fastai inference pipeline calls it (`self.model.predict(np.array(inputs))`)."""
    staged = tmp_path / "push"
    p = subprocess.run([PY, "-m", "serve.hub", "push", folder, "--repo", "alice/mnist", "--dry-run", "--out", staged],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert {MODEL_FILE, WEIGHTS_FILE, ONNX_FILE, METADATA_FILE, "pyproject.toml"} <= {f.name for f in staged.iterdir()}
    code = """
import json, sys
import numpy as np
from PIL import Image
from huggingface_hub import from_pretrained_fastai
learn = from_pretrained_fastai(sys.argv[1])   # a local folder, given relative: it is validated as a repo id first
out = []
for f in sys.argv[2:]:
    inputs = Image.open(f)                       # what the pipeline receives (a grey PNG stays grey)
    _, _, preds = learn.predict(np.array(inputs))
    out.append(preds.tolist())
print(json.dumps(out))
"""
    p = outside(code, staged.parent, staged.name, *digit_files[:5])
    assert p.returncode == 0, p.stderr[-3000:]
    theirs = np.array(json.loads(p.stdout.strip().splitlines()[-1]))
    ours = pickled.probabilities([pickled.prepare(f) for f in digit_files[:5]]).numpy()
    assert (theirs.argmax(1) == ours.argmax(1)).all() and np.abs(theirs - ours).max() < 1e-4


def odd_images(tmp_path: Path) -> list[Path]:
    """Images whose decoding matters: EXIF-rotated, 16-bit, CMYK, RGBA, palette, an animated GIF, and
    sizes that need up- and down-scaling in both directions."""
    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))
    files = []
    exif_rotated_jpeg(base, tmp_path / "rotated.jpg")
    files.append(tmp_path / "rotated.jpg")
    for mode, fmt, ext in (("I;16", "PNG", "png"), ("CMYK", "JPEG", "jpg"), ("RGBA", "PNG", "png"), ("P", "PNG", "png"),
                           ("RGB", "PNG", "png"), ("L", "PNG", "png")):
        path = tmp_path / f"x_{mode.replace(';', '')}.{ext}"
        save_as(base, path, fmt, mode)
        files.append(path)
    frames = [Image.fromarray(rng.integers(0, 256, (300, 17, 3), dtype=np.uint8)) for _ in range(2)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    files.append(tmp_path / "anim.gif")
    return files


def test_our_preprocessing_is_the_learners_pipeline(pickled, tmp_path):
    """The Predictor prepares images itself (models.imageio + the training's Resize + normalisation from
    metadata.json): on the same decoded picture that equals the exported learner's own item and batch
    pipeline, exactly."""
    learn = pickled.folder.learner
    mean, std = pickled.preprocessing.stats()
    from models.imageio import open_image
    for f in odd_images(tmp_path):
        ours = pickled.preprocessing.normalize(pickled.prepare(f)[None], mean, std)
        (theirs,) = learn.dls.test_dl([open_image(f)]).one_batch()
        assert ours.shape == theirs.shape == (1, 3, pickled.metadata.image_size, pickled.metadata.image_size), f
        assert torch.equal(ours, theirs.as_subclass(torch.Tensor)), f
    # and for an ordinary RGB file, fastai's own decoding (a third party's learn.predict) agrees with ours
    rgb = tmp_path / "x_RGB.png"
    (theirs,) = learn.dls.test_dl([rgb]).one_batch()
    assert torch.equal(pickled.preprocessing.normalize(pickled.prepare(rgb)[None], mean, std), theirs.as_subclass(torch.Tensor))
    # the statistics are metadata.json's, and are the learner's Normalize
    norm = next(t for t in learn.dls.after_batch.fs if type(t).__name__ == "Normalize")
    assert norm.mean.flatten().tolist() == pytest.approx(list(pickled.preprocessing.mean), abs=1e-7)
    assert norm.std.flatten().tolist() == pytest.approx(list(pickled.preprocessing.std), abs=1e-7)


# ------------------------------------------------------------------------------------------------ 2. safetensors

@pytest.fixture(scope="module")
def digits(mnist_arrays):
    images = [Image.fromarray(a) for a in mnist_arrays.valid_images[:N_ORACLE]]
    return images, [str(int(y)) for y in mnist_arrays.valid_labels[:N_ORACLE]]


def test_export_writes_the_three_formats(folder):
    from models.onnx import OnnxClassifier
    meta = read_metadata(folder)
    assert all((folder / f).is_file() for f in (MODEL_FILE, WEIGHTS_FILE, ONNX_FILE))
    assert not [p.name for p in folder.parent.iterdir() if ".partial" in p.name or p.name.endswith(".tmp")]
    clf = OnnxClassifier(folder / ONNX_FILE)
    assert clf.classes == meta.classes and clf.image_size == meta.image_size


def test_oracle_every_format_matches_learn_predict(pickled, rebuilt, onnx, digits):
    """On 500 MNIST test digits the three formats give learn.predict's top-1, probabilities within 1e-4
    (onnx: onnxruntime's fp32 arithmetic, another order of the same operations)."""
    images, truth = digits
    learn = pickled.folder.learner
    theirs = [learn.predict(img) for img in images]
    ref = torch.stack([p for _, _, p in theirs]).float()
    for predictor in (pickled, rebuilt, onnx):
        probs = torch.cat([predictor.probabilities([predictor.prepare(im) for im in images[i:i + 128]])
                           for i in range(0, len(images), 128)])
        assert [predictor.classes[i] for i in probs.argmax(1).tolist()] == [str(label) for label, _, _ in theirs], predictor.format
        assert (probs - ref).abs().max().item() < 1e-4, predictor.format
    accuracy = np.mean([t == str(label) for t, (label, _, _) in zip(truth, theirs)])
    assert accuracy > 0.9  # a real model, not a constant


def test_safetensors_rebuilds_the_exact_network(folder, pickled, rebuilt):
    from safetensors import safe_open
    from models.weights import arch_builders, build_network
    assert set(arch_builders()) == set(ARCHS)
    net, theirs = rebuilt.folder.model, pickled.folder.model
    assert repr(net) == repr(theirs)  # same layers, same head arguments (dropout p, pooling, batch norms)
    a, b = net.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(t.is_meta for t in a.values()) and not net.training
    with safe_open(str(folder / WEIGHTS_FILE), "pt") as f:  # plain, contiguous tensors; nothing else
        assert set(f.keys()) == set(a) and f.metadata() == {"format": "pt"}
    assert rebuilt.folder.learner is None
    assert oct((folder / WEIGHTS_FILE).stat().st_mode & 0o777) == oct((folder / METADATA_FILE).stat().st_mode & 0o777)
    meta_net = build_network(read_metadata(folder))
    assert all(p.is_meta for p in meta_net.parameters())  # rebuilt on the meta device: no memory until loaded


def test_safetensors_never_unpickles(evil_folder, digit_files, tmp_path):
    """--format safetensors with a malicious model.pkl beside it: the weights load, the pickle never runs.
    The same folder with --format pickle does run it, so the marker would show."""
    copy, marker = evil_folder
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [PY, "-m", "serve.predict", copy, digit_files[0], "--workers", "0"]
    p = subprocess.run(cmd + ["--format", "safetensors"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert re.search(r"\t\d\t", p.stdout) and not marker.exists()
    p = subprocess.run(cmd + ["--format", "pickle"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert marker.exists()  # the evil pickle is real: loading it as a pickle ran its code


def test_serve_format_safetensors(evil_folder, digit_files, rebuilt, tmp_path):
    """`python -m serve MODEL --format safetensors`, a real server: it answers, says the format, and the
    folder's malicious pickle never ran."""
    copy, marker = evil_folder
    with serve_process(copy, "--format", "safetensors") as served:
        health = requests.get(served.url + "/v1/health", timeout=10).json()
        assert health["format"] == "safetensors"
        with open(digit_files[3], "rb") as fh:
            r = requests.post(served.url + "/v1/predict", files={"files": ("d.png", fh, "image/png")}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()[0]["label"] == rebuilt.predict(digit_files[3]).label
    assert not marker.exists()


def test_serve_predict_format_onnx(folder, digit_files, rebuilt):
    p = subprocess.run([PY, "-m", "serve.predict", folder, *digit_files[:8], "--format", "onnx", "--json"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    labels = [json.loads(line)["label"] for line in p.stdout.splitlines()]
    assert labels == [r.label for r in rebuilt.predict_batch(digit_files[:8])]


def test_a_format_the_folder_lacks_is_one_line(folder, tmp_path, digit_files):
    copy = tmp_path / "old"
    shutil.copytree(folder, copy)
    (copy / WEIGHTS_FILE).unlink()
    p = subprocess.run([PY, "-m", "serve.predict", copy, digit_files[0], "--format", "safetensors"], cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    assert_clean_error(p, "model.safetensors", "--format pickle")
    (copy / WEIGHTS_FILE).write_bytes(b"not safetensors at all")
    with pytest.raises(ModelFolderError, match="not a safetensors file"):
        load_model_folder(copy, "safetensors")
    from safetensors.torch import save_file
    save_file({"weight": torch.zeros(3)}, str(copy / WEIGHTS_FILE))
    with pytest.raises(ModelFolderError, match="do not fit a resnet18"):
        load_model_folder(copy, "safetensors")


# ------------------------------------------------------------------------------------------------ the model card

def test_card_examples_run_outside_the_checkout(folder, rebuilt, mnist_arrays, tmp_path):
    """Every Python example of the model card, pasted into a fresh process in a copy of the folder,
    with image.png a digit at twice MNIST's size (so the resize matters): each prints the same label."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    Image.fromarray(mnist_arrays.valid_images[42]).resize((56, 56), Image.BILINEAR).save(copy / "image.png")
    card = (folder / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    assert len(blocks) == 3 and ["load_learner" in blocks[0], "safetensors" in blocks[1], "onnxruntime" in blocks[2]] == [True] * 3
    want = rebuilt.predict(copy / "image.png").label
    for code in blocks:
        p = outside(code, copy)
        assert p.returncode == 0, (code, p.stderr[-3000:])
        assert p.stdout.split()[0] == want, (code, p.stdout)


# ------------------------------------------------------------------------------------------------ hf:// and auto

@pytest.fixture
def hub():
    from tests.test_hub import FakeHub
    fake = FakeHub().start()
    yield fake
    fake.stop()


def _predict_cli(model, digit, env, *args) -> subprocess.CompletedProcess:
    """`python -m serve.predict MODEL DIGIT --json *args`: its log line says which format it loaded."""
    return subprocess.run([PY, "-m", "serve.predict", str(model), digit, "--json", "--workers", "0", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _loaded_format(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 0, p.stderr
    return re.search(r"^model \S+ \((\w+), \d+ classes\)", p.stderr, flags=re.M).group(1)


def test_auto_on_the_cpu_serves_onnx_where_the_folder_has_it(folder, digit_files, rebuilt, tmp_path, monkeypatch):
    """A local folder on the CPU: `--format auto` (the default) is model.onnx on onnxruntime, the fastest
    CPU backend; a folder without model.onnx is the learner pickle, as before; on a GPU the pickle too
    (onnxruntime here runs on the CPU only)."""
    with serve_process(folder) as served:
        assert requests.get(served.url + "/v1/health", timeout=10).json()["format"] == "onnx"
        with open(digit_files[3], "rb") as fh:
            r = requests.post(served.url + "/v1/predict", files={"files": ("d.png", fh, "image/png")}, timeout=60)
        assert r.status_code == 200 and r.json()[0]["label"] == rebuilt.predict(digit_files[3]).label, r.text
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    assert _loaded_format(_predict_cli(folder, digit_files[0], env, "--format", "pickle")) == "pickle"
    copy = tmp_path / "no-onnx"
    shutil.copytree(folder, copy)
    (copy / ONNX_FILE).unlink()
    assert _loaded_format(_predict_cli(copy, digit_files[0], env)) == "pickle"
    from serve.source import resolve_folder
    assert resolve_folder(str(folder), format="auto", device="cpu") == (folder, "onnx")
    monkeypatch.setattr("serve.source._runs_on_cpu", lambda device: False)  # as on a machine with a GPU
    assert resolve_folder(str(folder), format="auto", device="cuda") == (folder, "pickle")


def test_auto_loads_a_strangers_repo_from_onnx_or_safetensors(hub, evil_folder, digit_files, rebuilt, tmp_path):
    """hf:// outside your namespace, on the CPU: --format auto loads model.onnx (no code runs when ONNX loads),
    or model.safetensors from a repo without it, with no --trust-remote-code, and never downloads the (here
    malicious) pickle; --format pickle still needs the flag; your own repo's auto is model.onnx too, and the
    learner pickle where there is no model.onnx, as before."""
    from tests.test_hub import ALICE, hub_env
    copy, marker = evil_folder
    hub.seed("model", "bob/digits", copy)
    env = hub_env(hub.url, tmp_path / "hf", token=ALICE)
    want = rebuilt.predict(digit_files[5]).label

    def downloaded(repo):
        return {r["path"].rsplit("/", 1)[-1] for r in hub.requests if r["kind"] == "resolve" and repo in r["path"]}

    p = _predict_cli("hf://bob/digits", digit_files[5], env)
    assert _loaded_format(p) == "onnx" and json.loads(p.stdout.splitlines()[-1])["label"] == want
    assert ONNX_FILE in downloaded("bob/digits") and MODEL_FILE not in downloaded("bob/digits")
    p = subprocess.run([PY, "-m", "serve.predict", "hf://bob/digits", digit_files[5], "--format", "pickle"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_clean_error(p, "outside your namespace", "--trust-remote-code", "--format safetensors")
    assert not marker.exists()

    # a stranger's repo from before ONNX: model.safetensors
    no_onnx = tmp_path / "no-onnx"
    shutil.copytree(copy, no_onnx)
    (no_onnx / ONNX_FILE).unlink()
    hub.seed("model", "bob/no-onnx", no_onnx)
    p = _predict_cli("hf://bob/no-onnx", digit_files[5], env)
    assert _loaded_format(p) == "safetensors" and json.loads(p.stdout.splitlines()[-1])["label"] == want
    assert WEIGHTS_FILE in downloaded("bob/no-onnx") and MODEL_FILE not in downloaded("bob/no-onnx")

    # an old repo of a stranger, with neither: auto says what to do, and still unpickles nothing
    old = tmp_path / "old"
    shutil.copytree(no_onnx, old)
    (old / WEIGHTS_FILE).unlink()
    hub.seed("model", "bob/old", old)
    p = subprocess.run([PY, "-m", "serve.predict", "hf://bob/old", digit_files[5]],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert_clean_error(p, "hf://bob/old has no model.safetensors", "--trust-remote-code")
    assert not marker.exists()

    # your own repo: model.onnx; without it, the learner pickle, fetched as before
    hub.seed("model", "alice/digits", rebuilt.folder.path)
    assert _loaded_format(_predict_cli("hf://alice/digits", digit_files[5], env)) == "onnx"
    mine = tmp_path / "mine"
    shutil.copytree(rebuilt.folder.path, mine)
    (mine / ONNX_FILE).unlink()
    hub.seed("model", "alice/no-onnx", mine)
    assert _loaded_format(_predict_cli("hf://alice/no-onnx", digit_files[5], env)) == "pickle"
    assert MODEL_FILE in downloaded("alice/no-onnx")


# ------------------------------------------------------------------------------------------------ 3. metadata.json

def _meta_dict(folder) -> dict:
    return json.loads((folder / METADATA_FILE).read_text())


def test_metadata_round_trips_and_is_version_2(folder):
    raw = _meta_dict(folder)
    meta = read_metadata(folder)
    assert raw["metadata_version"] == METADATA_VERSION == 3 and meta.as_dict() == raw
    assert meta.n_out == len(meta.classes) == 10 and meta.activation == "softmax" and meta.head.ps == 0.5


@pytest.mark.parametrize("content, words", [
    ("null", ["holds null", "not a json object"]),
    ("[1, 2]", ["holds a list"]),
    ('"hello"', ["holds a string"]),
    ("{}", ["metadata_version"]),
    ("{ not json", ["unreadable"]),
    ("[" * 100_000, ["unreadable"]),
])
def test_foreign_metadata_is_one_line(folder, tmp_path, content, words):
    copy = tmp_path / "m"
    copy.mkdir()
    (copy / METADATA_FILE).write_text(content)
    with pytest.raises(ModelFolderError) as e:
        read_metadata(copy)
    assert "\n" not in str(e.value) and all(w in str(e.value).lower() for w in words), str(e.value)


def _edited(raw: dict, path: str, value) -> dict:
    raw = json.loads(json.dumps(raw))
    *parents, last = path.split(".")
    d = raw
    for p in parents:
        d = d[p]
    if value is KeyError:
        del d[last]
    else:
        d[last] = value
    return raw


@pytest.mark.parametrize("path, value, words", [
    ("classes", KeyError, ["'classes' is missing"]),
    ("classes", None, ["'classes' must be a list", "null"]),
    ("classes", [1, 2], ["'classes[0]' must be a string"]),
    ("image_size", "28", ["'image_size' must be a whole number"]),
    ("image_size", True, ["'image_size' must be a whole number"]),
    ("image_size", 0, ["image_size 0"]),
    ("normalize.mean", [0.1], ["3 means"]),
    ("normalize.std", [0.0, 0.0, 0.0], ["std"]),
    ("head.ps", "half", ["'head.ps' must be a number"]),
    ("head.surprise", 1, ["unknown field 'head.surprise'"]),
    ("surprise", 1, ["unknown field 'surprise'"]),
    ("arch", "os.system", ["arch 'os.system' is not one of resnet18"]),
    ("n_out", 9, ["n_out is 9 but there are 10 classes"]),
    ("activation", "relu", ["activation 'relu'"]),
    ("resize_method", "crop", ["resize_method 'crop'"]),
    ("metrics.valid_accuracy", None, ["'metrics.valid_accuracy' must be a number"]),
    ("metadata_version", 4, ["version 4, newer", "update"]),
    ("metadata_version", 0, ["version 0", "re-export"]),
    ("metadata_version", "2", ["no valid metadata_version"]),
])
def test_wrong_metadata_is_refused_naming_the_field(folder, tmp_path, path, value, words):
    copy = tmp_path / "m"
    copy.mkdir()
    (copy / METADATA_FILE).write_text(json.dumps(_edited(_meta_dict(folder), path, value)))
    with pytest.raises(ModelFolderError) as e:
        read_metadata(copy)
    message = str(e.value)
    assert "\n" not in message and all(w.lower() in message.lower() for w in words), message


def test_version_1_folders_still_load(folder, tmp_path, pickled, digit_files):
    """A folder exported before this change (metadata version 1: no n_out, head, activation; no
    model.safetensors) still serves from its pickle: its network was fastai's default head."""
    copy = tmp_path / "v1"
    shutil.copytree(folder, copy)
    (copy / WEIGHTS_FILE).unlink()
    raw = _meta_dict(folder)
    for key in ("n_out", "head", "activation"):
        del raw[key]
    raw["metadata_version"] = 1
    (copy / METADATA_FILE).write_text(json.dumps(raw))
    meta = read_metadata(copy)
    assert meta.n_out == 10 and meta.head == read_metadata(folder).head
    old = Predictor.load(copy, device="cpu")
    assert old.predict(digit_files[0]) == pickled.predict(digit_files[0])


@pytest.mark.parametrize("content", ["null", "[]", '{"metadata_version": 2, "name": 5}'])
def test_serve_with_broken_metadata_is_one_error_line(folder, tmp_path, content):
    """Issue 11, item 10: metadata.json holding null (or any non-object) was a TypeError traceback."""
    copy = tmp_path / "m"
    shutil.copytree(folder, copy)
    (copy / METADATA_FILE).write_text(content)
    p = subprocess.run([PY, "-m", "serve", copy, "--port", "0"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert_clean_error(p, "metadata.json")


def test_the_schema_has_one_home():
    """No module outside models/contract.py reads or writes metadata.json's fields by string key."""
    fields = {f.name for f in dataclasses.fields(ModelMetadata)}
    offenders = []
    for py in [*ROOT.glob("serve/*.py"), *ROOT.glob("train/*.py"), *ROOT.glob("bench/*.py")]:
        text = py.read_text()
        if re.search(r"json\.loads\(.*metadata\.json", text):  # the card's examples use json.load(open(...)), for readers
            offenders.append(f"{py.relative_to(ROOT)}: parses metadata.json itself")
        for key in fields:
            if re.search(rf"(meta(data)?|read_metadata\([^)]*\))(\.get\(|\[)[\"']{key}[\"']", text):
                offenders.append(f"{py.relative_to(ROOT)}: {key}")
    assert offenders == []
    assert {"arch", "n_out", "head", "image_size", "resize_method", "normalize", "classes", "activation"} <= fields


def test_a_version_2_folder_reads_with_the_new_fields_at_their_defaults(folder, tmp_path):
    """Exported before version 3 (no fit record, no world_size): read as one process's run, no record."""
    copy = tmp_path / "v2"
    shutil.copytree(folder, copy)
    raw = _meta_dict(folder)
    for key in ("fit", "world_size"):
        raw.pop(key, None)
    raw["metadata_version"] = 2
    (copy / METADATA_FILE).write_text(json.dumps(raw))
    meta = read_metadata(copy)
    assert meta.fit is None and meta.world_size == 1 and meta.classes == read_metadata(folder).classes
