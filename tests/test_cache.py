"""The decode-once data cache (train/cache.py): hits map it and decode nothing, any change to the files
or --size rebuilds it, a killed or failed build leaves nothing trusted, concurrent builders agree, and
it holds no pickle. Small generated photo folders; `python -m train` as a subprocess for the CLI.
Every cache here lives under pytest's tmp_path or the session's XDG_CACHE_HOME (tests/conftest.py)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import train.data
from synthetic.photoset import make_photo_folder
from tests.conftest import ROOT
from train.cache import KEEP_PER_FOLDER, default_root
from train.data import load_data

PY = sys.executable
SIZE = 24


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return make_photo_folder(tmp_path_factory.mktemp("cache_photos"), n_per_class=10)


@pytest.fixture
def photos(made, tmp_path) -> Path:
    """A private copy (mtimes kept) that a test may change."""
    return Path(shutil.copytree(made["root"], tmp_path / "photos"))


@pytest.fixture(scope="module")
def reference(made):
    """The in-memory path's result, which every cached load must equal."""
    return load_data(str(made["root"]), SIZE, progress=False)


def same(a, b) -> bool:
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
            and torch.equal(a.is_valid, b.is_valid) and a.vocab == b.vocab
            and a.summary.as_dict() == b.summary.as_dict())


def caches(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def partials(root: Path) -> list[Path]:
    return sorted(root.glob(".*.partial-*")) if root.exists() else []


class Decodes:
    """Counts `train.data._decode` calls: a cache hit makes none."""
    def __init__(self, monkeypatch, fail_at: int | None = None, exc=KeyboardInterrupt):
        self.n, self.fail_at, self.exc, self.real = 0, fail_at, exc, train.data._decode
        monkeypatch.setattr(train.data, "_decode", self)

    def __call__(self, *args):
        self.n += 1
        if self.fail_at is not None and self.n >= self.fail_at:
            raise self.exc()
        return self.real(*args)


# --------------------------------------------------------------------------- hits and rebuilds

def test_second_load_maps_the_cache_decodes_nothing_and_gives_the_same_tensors(made, reference, tmp_path,
                                                                                monkeypatch, caplog):
    cdir = tmp_path / "c"
    first = load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir)
    assert same(first, reference)
    [folder] = caches(cdir)
    assert folder.name.startswith(f"{made['root'].name}-{SIZE}px-") and not partials(cdir)
    decodes = Decodes(monkeypatch)
    caplog.set_level("INFO", logger="train.cache")
    second = load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir)
    assert decodes.n == 0 and same(second, reference)
    hits = [r.getMessage() for r in caplog.records if "cache hit" in r.getMessage()]
    assert hits == [f"data: cache hit, {len(reference.labels)} images, {folder}"]
    # the skipped files are reported again, relative to the data folder, as the in-memory path does
    assert second.summary.skipped == reference.summary.skipped and len(second.summary.skipped) == 3
    # another seed re-splits from the cache: no decode either
    other = load_data(str(made["root"]), SIZE, seed=7, progress=False, cache_dir=cdir)
    assert decodes.n == 0 and torch.equal(other.images, reference.images)
    assert not torch.equal(other.is_valid, reference.is_valid)


def _touch(p: Path):
    f = next((p / "square").iterdir())
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))


def _add(p: Path):
    shutil.copy(next((p / "square").glob("*.png")), p / "square" / "added.png")


def _remove(p: Path):
    next((p / "triangle").glob("*.png")).unlink()


@pytest.mark.parametrize("change", [_touch, _add, _remove, "size"], ids=["touch", "add", "remove", "size"])
def test_a_changed_added_or_removed_file_or_another_size_rebuilds(photos, tmp_path, monkeypatch, change):
    cdir = tmp_path / "c"
    load_data(str(photos), SIZE, progress=False, cache_dir=cdir)
    size = SIZE
    if change == "size":
        size = SIZE + 8
    else:
        change(photos)
    decodes = Decodes(monkeypatch)
    got = load_data(str(photos), size, progress=False, cache_dir=cdir)
    n_files = sum(1 for f in photos.rglob("*") if f.is_file() and f.name != "notes.txt")
    assert decodes.n == n_files  # everything decoded again
    assert same(got, load_data(str(photos), size, progress=False))
    # the superseded cache of the same size is gone; one of another size stays
    assert len(caches(cdir)) == (2 if change == "size" else 1)


def test_caches_per_data_folder_are_bounded(photos, tmp_path):
    cdir = tmp_path / "c"
    sizes = [16 + 4 * i for i in range(KEEP_PER_FOLDER + 1)]
    for s in sizes:
        load_data(str(photos), s, progress=False, cache_dir=cdir)
        time.sleep(0.01)  # distinct mtimes: the least recently used goes first
    kept = sorted(int(p.name.split("-")[-2][:-2]) for p in caches(cdir))
    assert kept == sizes[1:]


def test_the_cache_holds_arrays_and_json_only(made, tmp_path):
    cdir = tmp_path / "c"
    load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir)
    [folder] = caches(cdir)
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["cache.json", "images.npy", "key.json", "labels.npy", "sizes.npy", "split.npy"]
    for p in folder.glob("*.npy"):
        a = np.load(p, allow_pickle=False, mmap_mode="r")  # refuses an object (pickled) array
        assert a.dtype != object
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    assert labels.dtype == np.int64 and labels.ndim == 1
    key = json.loads((folder / "key.json").read_text())
    assert key["size"] == SIZE and key["decoder"] >= 1 and key["pillow"]
    want = {f.relative_to(made["root"]).as_posix() for f in made["root"].rglob("*") if f.name != "notes.txt"
            and f.is_file()}
    assert {f[0] for f in key["files"]} == want and all(f[1] >= 0 and f[2] > 0 for f in key["files"])
    json.loads((folder / "cache.json").read_text())


def test_a_damaged_cache_is_not_trusted_but_rebuilt(made, reference, tmp_path, monkeypatch):
    cdir = tmp_path / "c"
    load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir)
    [folder] = caches(cdir)
    with open(folder / "images.npy", "r+b") as f:
        f.truncate(1000)  # cut short, as a full disk or a careless copy would leave it
    decodes = Decodes(monkeypatch)
    assert same(load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir), reference)
    assert decodes.n > 0 and caches(cdir) == [folder] and not partials(cdir)


# --------------------------------------------------------------------------- interrupted and concurrent builds

def test_a_failed_build_leaves_nothing(made, tmp_path, monkeypatch):
    cdir = tmp_path / "c"
    Decodes(monkeypatch, fail_at=10)
    with pytest.raises(KeyboardInterrupt):
        load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir)
    assert caches(cdir) == [] and partials(cdir) == []


# A build in its own process; with SLOW set, each decode waits so that the parent can kill it mid-way.
CHILD = r"""
import sys, threading, time
import train.data as d
from train.data import load_data
real, lock = d._decode, threading.Lock()
def slow(*a):
    with lock:  # decoding threads: one whole line each
        sys.stdout.write("decoding\n")
        sys.stdout.flush()
    time.sleep(float(sys.argv[3]))
    return real(*a)
d._decode = slow
c = load_data(sys.argv[1], int(sys.argv[4]), progress=False, cache_dir=sys.argv[2], workers=2)
print("done", len(c.labels), int(c.images.sum()), flush=True)
"""


def child(photos: Path, cdir: Path, delay: float) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", CHILD, str(photos), str(cdir), str(delay), str(SIZE)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_build_killed_while_decoding_leaves_no_trusted_cache(made, reference, tmp_path, monkeypatch):
    cdir = tmp_path / "c"
    p = child(made["root"], cdir, 0.5)
    try:
        for _ in range(10):  # a few images into the map
            assert p.stdout.readline() == "decoding\n", p.stderr.read()
        assert partials(cdir), "the build writes into a .partial- folder"
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait(60)
    [left] = partials(cdir)
    assert caches(cdir) == []  # nothing a later run would read
    # the next build decodes everything again, and removes the killed build's folder once it is stale
    old = time.time() - 3600
    for f in [*left.iterdir(), left]:
        os.utime(f, (old, old))
    decodes = Decodes(monkeypatch)
    assert same(load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir), reference)
    assert decodes.n == len(reference.labels) + 3
    assert partials(cdir) == [] and len(caches(cdir)) == 1


def test_concurrent_builders_of_one_key_agree_and_leave_one_cache(made, reference, tmp_path):
    cdir = tmp_path / "c"
    procs = [child(made["root"], cdir, 0.01) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    lines = {out.splitlines()[-1] for out, _ in outs}
    assert lines == {f"done {len(reference.labels)} {int(reference.images.sum())}"}
    assert len(caches(cdir)) == 1 and partials(cdir) == []
    assert same(load_data(str(made["root"]), SIZE, progress=False, cache_dir=cdir), reference)


# --------------------------------------------------------------------------- the command line

def test_cli_builds_then_hits_the_cache_and_no_cache_writes_none(made, reference, tmp_path):
    def run(*args, xdg):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(xdg)}
        r = subprocess.run([PY, "-m", "train", str(made["root"]), "--epochs", "1", "--size", "16", "--bs", "16",
                            "--no-augment", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        return r

    xdg = tmp_path / "xdg"
    where = xdg / "resnet18-train" / "datasets"
    first = run("--out", tmp_path / "m1", xdg=xdg)
    [folder] = caches(where)
    assert f"data: decoding {len(reference.labels) + 3} files into the cache {folder}" in first.stderr
    assert "cache hit" not in first.stderr
    second = run("--out", tmp_path / "m2", xdg=xdg)
    assert f"data: cache hit, {len(reference.labels)} images, {folder}" in second.stderr
    assert "skipping" in second.stderr  # the broken files are still named on every run
    bare = tmp_path / "xdg_bare"
    third = run("--out", tmp_path / "m3", "--no-cache", xdg=bare)
    assert "data:" not in third.stderr and not bare.joinpath("resnet18-train").exists()
    meta = [json.loads((tmp_path / m / "metadata.json").read_text()) for m in ("m1", "m2", "m3")]
    assert meta[0]["data"] == meta[1]["data"] == meta[2]["data"]
    assert meta[2]["config"]["cache"] is False and meta[0]["config"]["cache_dir"] == ""


def test_cli_cache_dir_flags(tmp_path, capsys, made):
    from train.cli import main
    from train.config import parse_config
    cfg = parse_config([str(made["root"]), "--cache-dir", str(tmp_path / "x" / ".." / "c")])
    assert cfg.cache and cfg.cache_dir == str(tmp_path / "c")
    assert parse_config([str(made["root"]), "--no-cache"]).cache is False
    with pytest.raises(SystemExit):
        parse_config([str(made["root"]), "--no-cache", "--cache-dir", "c"])
    capsys.readouterr()
    blocked = tmp_path / "a_file"
    blocked.write_text("not a folder")
    assert main([str(made["root"]), "--cache-dir", str(blocked), "--out", str(tmp_path / "m"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot write the data cache" in err and "--no-cache" in err and "Traceback" not in err
    assert err.count("\n") == 1


def test_default_location_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_root() == tmp_path / "resnet18-train" / "datasets"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # the XDG spec: only absolute paths count
    assert default_root() == Path.home() / ".cache" / "resnet18-train" / "datasets"


def test_keep_existing_leaves_the_first_complete_folder(tmp_path):
    from models.atomic import atomic_folder
    out = tmp_path / "c"
    with atomic_folder(out, keep_existing=True) as tmp:
        (tmp / "a").write_text("late")
        out.mkdir()
        (out / "a").write_text("first")  # another writer finished meanwhile
    assert (out / "a").read_text() == "first" and sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with atomic_folder(tmp_path / "d", keep_existing=True) as tmp:
        (tmp / "a").write_text("only")
    assert (tmp_path / "d" / "a").read_text() == "only"


def test_a_multi_label_csv_is_cached_too_files_beside_the_csv_included(made, tmp_path, monkeypatch):
    # A labels CSV naming files in the data folder and one beside the CSV, outside it; several
    # labels per cell make it multi-label: both go through the cache and come back the same.
    from models.imageio import is_image_file
    files = sorted(p for p in made["root"].rglob("*") if p.is_file() and is_image_file(p))
    side = tmp_path / "csvdir"
    side.mkdir()
    beside = "beside" + files[0].suffix
    shutil.copy(files[0], side / beside)
    rows = [f"{p.relative_to(made['root']).as_posix()},{p.parent.name} {'even' if i % 2 else 'odd'}"
            for i, p in enumerate(files)] + [f"{beside},{files[0].parent.name} odd"]
    csv = side / "labels.csv"
    csv.write_text("file,labels\n" + "\n".join(rows) + "\n")
    reference = load_data(str(made["root"]), SIZE, progress=False, labels_csv=str(csv))
    assert reference.multi_label and "even" in reference.vocab
    cdir = tmp_path / "c"
    first = load_data(str(made["root"]), SIZE, progress=False, labels_csv=str(csv), cache_dir=cdir)
    decodes = Decodes(monkeypatch)
    second = load_data(str(made["root"]), SIZE, progress=False, labels_csv=str(csv), cache_dir=cdir)
    assert decodes.n == 0 and len(caches(cdir)) == 1
    assert same(first, reference) and same(second, reference) and second.multi_label
