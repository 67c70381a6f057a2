"""serve.space: the Space folder it builds, its front matter and pins, and the app it starts, run the
way Spaces run it: `python app.py` from inside the folder, with nothing of the checkout importable.
The upload itself (create_repo + upload_folder against a fake Hub) is tested in test_hub.py."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_hub import digit, folder_files, free_port, hub_env, predict_with_app, top_label  # noqa: F401 (digit is a fixture)

PY = sys.executable
REPO = "alice/mnist-demo"


@pytest.fixture(scope="module")
def space(mnist_model, tmp_path_factory) -> Path:
    from serve.space import build_space
    return build_space(mnist_model, tmp_path_factory.mktemp("space") / "mnist-demo", REPO)


def clean_env(**extra) -> dict:
    """What a Space process sees: no PYTHONPATH, no checkout, nothing of ours but the folder itself."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "MNIST_DIR")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1", **extra)
    return env


def in_space(space: Path, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-c", code], cwd=space, env=clean_env(), capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------------------------ the folder

def test_space_folder_layout(space, mnist_model):
    from serve.space import bundled_packages
    files = folder_files(space)
    assert {"app.py", "requirements.txt", "README.md"} <= set(files)
    # the model folder, as it is
    model = {f[len("model/"):]: d for f, d in files.items() if f.startswith("model/")}
    assert model == folder_files(mnist_model)
    # our packages, copied byte for byte from the checkout (never re-written)
    packages = bundled_packages(mnist_model)
    assert {"serve", "models"} <= set(packages)
    for package in packages:
        src = {f: d for f, d in folder_files(ROOT / package).items() if "__pycache__" not in f}
        assert {f[len(package) + 1:]: d for f, d in files.items() if f.startswith(package + "/")} == src, package
    top = {f.split("/")[0] for f in files if "/" in f}
    assert top == {"model", *packages}  # nothing else of the checkout (tests, bench, ...)


def test_pickle_references_are_bundled(mnist_model):
    from serve.space import bundled_packages, pickle_modules
    modules = pickle_modules(mnist_model / "model.pkl")
    assert "fastai.learner" in modules
    ours = {m.split(".")[0] for m in modules} & {"models", "serve", "train"}
    assert ours == set()  # the pickle needs nothing of ours (tests/test_formats.py); the app needs these:
    assert {"models", "serve"} <= set(bundled_packages(mnist_model))


def test_app_py_only_calls_serve(space):
    text = (space / "app.py").read_text()
    code = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    assert len(code) < 20  # a few lines: the app's logic lives in serve/, never a second copy here
    assert "from serve.__main__ import main" in text and "gradio" not in text and "load_learner" not in text
    assert '"0.0.0.0"' in text and 'os.environ.get("PORT", "7860")' in text and '"model"' in text


def test_front_matter(space, mnist_model):
    import gradio
    from huggingface_hub import SpaceCard, metadata_load
    card = SpaceCard.load(space / "README.md")
    d = card.data
    assert d.sdk == "gradio" and d.app_file == "app.py"
    assert re.fullmatch(r"\d+\.\d+\.\d+", d.sdk_version) and d.sdk_version == gradio.__version__
    assert d.python_version == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert d.title == "mnist-demo" and d.license
    assert {"fastai", "image-classification", "resnet18"} <= set(d.tags)
    raw = metadata_load(space / "README.md")
    assert raw["emoji"] and raw["sdk"] == "gradio"


def test_requirements_are_the_training_pins_without_gradio(space):
    import fastai
    import fastcore
    import torch
    import torchvision
    from packaging.requirements import Requirement
    from packaging.version import Version
    lines = [ln.strip() for ln in (space / "requirements.txt").read_text().splitlines()]
    reqs = {Requirement(ln).name.lower(): Requirement(ln) for ln in lines if ln and not ln.startswith("#")}
    assert "gradio" not in reqs  # sdk_version pins it; a second pin could only disagree
    repo = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert {Requirement(ln).name.lower() for ln in repo} - {"gradio"} == set(reqs)
    assert all(str(reqs[Requirement(ln).name.lower()]) == str(Requirement(ln)) for ln in repo if not ln.startswith("gradio"))
    # the pins are the versions this model was trained and is tested with
    assert str(reqs["fastai"].specifier) == f"=={fastai.__version__}"
    assert str(reqs["fastcore"].specifier) == f"=={fastcore.__version__}"
    assert Version(torch.__version__.split("+")[0]) in reqs["torch"].specifier
    assert Version(torchvision.__version__.split("+")[0]) in reqs["torchvision"].specifier


def test_the_checkout_is_not_importable_from_the_space(space, mnist_model):
    from serve.space import bundled_packages
    packages = bundled_packages(mnist_model)
    assert packages == ["models", "serve"]  # serving needs no training code
    p = in_space(space, f"import {', '.join(packages)}; " + "; ".join(f"print({m}.__file__)" for m in packages))
    assert p.returncode == 0, p.stderr
    assert all(Path(f).resolve().is_relative_to(space.resolve()) for f in p.stdout.split())  # the bundled copies
    for missing in {"train", "bench", "tests"} - set(packages):
        p = in_space(space, f"import {missing}")
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stderr, missing
    p = in_space(space, "import json, sys; print(json.dumps(sys.path))")
    assert str(ROOT) not in json.loads(p.stdout) and "" in json.loads(p.stdout)


def test_dry_run_builds_and_lists_without_network(mnist_model, tmp_path):
    out = tmp_path / "s"
    dead = f"http://127.0.0.1:{free_port()}"  # any request would fail
    p = subprocess.run([PY, "-m", "serve.space", str(mnist_model), "--repo", REPO, "--out", str(out), "--dry-run"],
                       cwd=ROOT, env=hub_env(dead, tmp_path / "hf", token=None), capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert "dry run" in p.stdout and "model/model.pkl" in p.stdout and "MB" in p.stdout and "app.py" in p.stdout
    assert (out / "app.py").is_file() and (out / "model" / "model.pkl").is_file()


def test_rebuild_replaces_only_its_own_folder(mnist_model, tmp_path):
    from models.contract import ModelFolderError
    from serve.space import build_space
    out = build_space(mnist_model, tmp_path / "s", REPO)
    (out / "model" / "examples" / "stale.png").write_bytes(b"x")
    build_space(mnist_model, out, REPO)
    assert not (out / "model" / "examples" / "stale.png").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFolderError, match="not a Space folder"):
        build_space(mnist_model, tmp_path / "mine", REPO)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------ the app

def test_space_app_serves_the_model(space, digit, tmp_path):
    """`python app.py` from inside the folder, clean environment, called with gradio_client; the
    digit is one fastai's own learn.predict gets right."""
    if not (ROOT / "serve" / "__main__.py").exists():
        pytest.fail("serve/__main__.py (the app) is not in the checkout yet; the Space bundles it")
    path, label = digit
    result = predict_with_app(["app.py"], space, clean_env(PORT=str(free_port())), path, tmp_path / "app.log")
    assert top_label(result) == label, result
