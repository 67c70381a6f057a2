"""Nothing of the training machine's file system leaves it: a model trained from a temp folder, then
staged for `python -m serve.hub push` and built as a Space, holds no absolute path of that machine
(the temp folders, the home directory, the checkout) in any file, the pickle's bytes included."""
from __future__ import annotations

import json
import os
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT
from synthetic.photoset import make_photo_folder

PY = sys.executable


def run_module(module: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m MODULE ARGS` in a fresh process from the checkout, as a user runs it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([PY, "-m", module, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"python -m {module} failed:\n{r.stderr[-3000:]}"
    return r


def machine_paths(*roots: Path) -> list[str]:
    """The absolute paths to look for, each as given and resolved (a symlinked /tmp or home has two)."""
    found = set()
    for p in roots:
        for s in (str(p), os.path.realpath(p)):
            if s not in ("/", ""):
                found.add(s.rstrip("/"))
    return sorted(found, key=len)


def pickle_strings(data: bytes) -> list[str]:
    """Every string the pickle pushes, read without unpickling. A pickled Path is its parts
    ('/', 'tmp', 'x'), never one contiguous string, so a raw byte search alone would miss it."""
    return [arg for _, arg, _ in pickletools.genops(data) if isinstance(arg, str)]


@pytest.fixture(scope="module")
def uploads(tmp_path_factory):
    """(model folder, staged Hub repo, Space folder) for a model fine-tuned with --init from another,
    both trained from a temp data folder holding broken files."""
    base = tmp_path_factory.mktemp("portable")
    data = make_photo_folder(base / "data" / "photos", n_per_class=10)["root"]
    first, model = base / "models" / "first", base / "models" / "shapes"
    common = ["--epochs", "1", "--size", "32", "--bs", "16", "-q"]
    run_module("train", data, "--out", first, *common)
    run_module("train", data, "--init", first, "--out", model, *common)
    staged, space = base / "staged", base / "space"
    run_module("serve.hub", "push", model, "--repo", "a/b", "--dry-run", "--out", staged)
    run_module("serve.space", model, "--repo", "a/b", "--dry-run", "--out", space)
    needles = machine_paths(tmp_path_factory.getbasetemp(), base, data, Path.home(), ROOT)
    return {"model": model, "staged": staged, "space": space, "needles": needles,
            "temp_parts": {p for p in Path(tmp_path_factory.getbasetemp()).parts if p != "/"}}


def test_metadata_records_names_not_machine_paths(uploads):
    meta = json.loads((uploads["model"] / "metadata.json").read_text())
    cfg, d = meta["config"], meta["data"]
    assert cfg["source"] == "photos" and d["source"] == "photos"  # the data folder's name
    assert cfg["out"] == meta["name"] == "shapes"                 # the model's name
    assert cfg["init"] == "first"                                 # the name of the model it started from
    # The broken files, relative to the data folder: still says which file to fix.
    assert sorted(s["file"] for s in d["skipped"]) == ["circle/empty.png", "circle/not_really.jpg",
                                                       "circle/truncated.jpg"]


@pytest.mark.parametrize("which", ["staged", "space"])
def test_no_machine_path_in_any_uploaded_file(uploads, which):
    folder = uploads[which]
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    assert any(p.name == "model.pkl" for p in files) and any(p.name == "metadata.json" for p in files)
    leaks = []
    for f in files:
        blobs = {f.relative_to(folder).as_posix(): f.read_bytes()}
        if f.suffix == ".pkl":
            with zipfile.ZipFile(f) as z:  # torch.save's zip: look inside each member too
                blobs.update({f"{f.name}:{n}": z.read(n) for n in z.namelist()})
        for name, blob in blobs.items():
            leaks += [f"{name}: {needle}" for needle in uploads["needles"] if needle.encode() in blob]
            if name.endswith("data.pkl"):
                strings = pickle_strings(blob)
                leaks += [f"{name}: a pickled path part {s!r}" for s in strings
                          if s == "/" or s.startswith("/") or s in uploads["temp_parts"]]
    assert not leaks, "machine paths in the upload:\n" + "\n".join(leaks)
