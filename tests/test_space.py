"""serve.space: the Space folder it builds, its front matter and pins, and the app it starts, run the
way Spaces run it: `python app.py` from inside the folder, with nothing of the checkout importable.
The upload itself (create_repo + upload_folder against a fake Hub) is tested in test_hub.py."""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
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
    from serve.space import bundled_packages, source_files
    files = folder_files(space)
    assert {"app.py", "requirements.txt", "README.md"} <= set(files)
    # the model folder, as it is
    model = {f[len("model/"):]: d for f, d in files.items() if f.startswith("model/")}
    assert model == folder_files(mnist_model)
    # our packages: their source files, copied byte for byte from the checkout (never re-written)
    packages = bundled_packages(mnist_model)
    assert {"serve", "models"} <= set(packages)
    for package in packages:
        src = {f.as_posix(): (ROOT / f).read_bytes() for f in source_files(package)}
        assert {"serve/space.py", "models/contract.py"} & set(src)
        assert {f: d for f, d in files.items() if f.startswith(package + "/")} == src, package
    top = {f.split("/")[0] for f in files if "/" in f}
    assert top == {"model", *packages}  # nothing else of the checkout (tests, bench, ...)


def checkout_copy(dest: Path, git: bool) -> Path:
    """The files git tracks in this checkout, copied to `dest`, with `git add` done there when `git`
    (a fresh clone with work in progress) or no .git at all (an unpacked source archive)."""
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True,
                             timeout=60).stdout.decode().split("\0")
    for rel in filter(None, tracked):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, dest / rel)
    if git:
        subprocess.run(["git", "init", "-q", str(dest)], check=True, timeout=60)
        subprocess.run(["git", "-C", str(dest), "add", "-A"], check=True, timeout=60)
    return dest


@pytest.mark.parametrize("git", [True, False], ids=["git-checkout", "no-git"])
def test_only_source_files_are_bundled_never_other_models_or_data(mnist_model, tmp_path, git, caplog):
    """models/ is where exported model folders go by default. With the deployed model and a second,
    private one in there, and a stray data file, the Space holds the deployed model once (under
    model/) and our source files, nothing else: no second model, no data file, no model twice."""
    from serve.space import build_space
    root = checkout_copy(tmp_path / "checkout", git)
    deployed = root / "models" / "mnist"
    shutil.copytree(mnist_model, deployed)
    private = root / "models" / "private-faces"
    private.mkdir()
    (private / "metadata.json").write_text('{"name": "private-faces", "classes": ["my", "family"]}')
    (private / "model.pkl").write_bytes(b"private weights" * 1000)
    (root / "models" / "faces.csv").write_text("name,photo\nme,/home/me/me.jpg\n")
    (root / "serve" / "scratch.py").write_text("SECRET = 1\n")  # never added to git
    out = build_space(deployed, tmp_path / "space", REPO, root=root)
    files = folder_files(out)
    # the one CSV is the deployed model's own run log (model/history.csv), not the stray data file
    assert not [f for f in files if "private-faces" in f or (f.endswith(".csv") and f != "model/history.csv")
                or "family" in f]
    assert "model/history.csv" in files
    assert not [f for f in files if f.startswith("models/mnist")]  # the deployed model only once, under model/
    assert {f for f in files if f.endswith(".pkl")} == {"model/model.pkl"}
    ours = {f for f in files if not f.startswith("model/") and f not in ("app.py", "README.md", "requirements.txt")}
    assert ours and all(f.endswith(".py") for f in ours)
    if git:  # what git tracks; a file it does not is left out, and said
        assert ours == {f for f in subprocess.run(["git", "-C", str(root), "ls-files", "serve", "models"],
                                                  capture_output=True, text=True, check=True).stdout.split()}
        assert "serve/scratch.py" not in files and "serve/scratch.py" in caplog.text
    else:  # no git: the packages' *.py files
        assert ours == {p.relative_to(root).as_posix() for pkg in ("serve", "models")
                        for p in (root / pkg).rglob("*.py")}
    model_bytes = sum(len(d) for f, d in files.items() if f.startswith("model/"))
    assert sum(len(d) for d in files.values()) - model_bytes < 1_000_000  # the rest is source: under 1 MB


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
    assert '"0.0.0.0"' in text and '"7860"' in text and '"model"' in text
    assert 'os.environ.get("GRADIO_SERVER_NAME")' in text and 'os.environ.get("GRADIO_SERVER_PORT")' in text


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


def test_requirements_are_the_training_pins_without_gradio(space, mnist_model):
    import fastai
    import fastcore
    from packaging.requirements import Requirement
    from models.contract import read_metadata
    lines = [ln.strip() for ln in (space / "requirements.txt").read_text().splitlines()]
    reqs = {Requirement(ln).name.lower(): Requirement(ln) for ln in lines if ln and not ln.startswith("#")}
    assert "gradio" not in reqs  # sdk_version pins it; a second pin could only disagree
    repo = [ln.strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
    assert {Requirement(ln).name.lower() for ln in repo} - {"gradio"} == set(reqs)
    assert all(str(reqs[Requirement(ln).name.lower()]) == str(Requirement(ln)) for ln in repo
               if Requirement(ln).name.lower() not in ("gradio", "torch", "torchvision"))
    assert str(reqs["fastai"].specifier) == f"=={fastai.__version__}"
    assert str(reqs["fastcore"].specifier) == f"=={fastcore.__version__}"
    # torch and torchvision: exactly what this model was trained with, as its metadata.json says
    versions = read_metadata(mnist_model).versions
    for name in ("torch", "torchvision"):
        assert str(reqs[name].specifier) == f"=={versions[name].split('+')[0]}", (name, versions[name])


def test_torch_pins_drop_the_local_build_label_and_say_why():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from serve.space import space_requirements
    text = space_requirements({"torch": "2.14.1+cu130", "torchvision": "0.29.1+cpu"}, ROOT / "requirements.txt")
    pins = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert "torch==2.14.1" in pins and "torchvision==0.29.1" in pins
    assert all(Requirement(ln) for ln in pins)  # every line is one pip reads
    comment = " ".join(ln for ln in text.splitlines() if ln.startswith("#"))
    assert "2.14.1+cu130" in comment and "0.29.1+cpu" in comment and "PEP 440" in comment
    # ... and the comment's claim holds: a pin without a label matches the CPU and the CUDA builds
    assert all(v in SpecifierSet("==2.14.1") for v in ("2.14.1", "2.14.1+cpu", "2.14.1+cu130"))
    # a source or pre-release build (not on PyPI), or no record at all: the repo's range stays
    text = space_requirements({"torch": "2.6.0a0+git1234"}, ROOT / "requirements.txt")
    repo = {Requirement(ln).name: ln for ln in (ROOT / "requirements.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")}
    assert repo["torch"] in text.splitlines() and repo["torchvision"] in text.splitlines()
    assert "PEP 440" not in text


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


def test_space_app_listens_where_gradio_server_name_and_port_say(space, digit, tmp_path):
    """Spaces, like every Gradio host, give the address in GRADIO_SERVER_NAME / GRADIO_SERVER_PORT; they
    win over PORT. Bound to 127.0.0.2, the app is not on 127.0.0.1, nor on $PORT."""
    path, label = digit
    port, other = free_port(), free_port()
    while other == port:
        other = free_port()
    env = clean_env(GRADIO_SERVER_NAME="127.0.0.2", GRADIO_SERVER_PORT=str(port), PORT=str(other))

    def nothing_else_listens():
        for host, p in (("127.0.0.1", port), ("127.0.0.2", other), ("127.0.0.1", other)):
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection((host, p), timeout=5).close()

    result = predict_with_app(["app.py"], space, env, path, tmp_path / "app.log", host="127.0.0.2", port=port,
                              while_up=nothing_else_listens)
    assert top_label(result) == label, result
