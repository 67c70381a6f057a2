"""The data cleaner as a person uses it: `python -m train.clean DATA --model M --port P` in a
subprocess, a real headless Chromium clicking through the page, then `python -m train.clean DATA
--undo` in another subprocess; the files on disk and the journal are checked after each step.
Plus the rules that keep files safe (no overwrite, nothing outside DATA, undo refuses a taken
place), and training ignoring what the cleaner leaves in DATA.

CLEAN_SCREENSHOT=docs/cleaner.png saves a screenshot of the page (the README's) there.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TIMEOUT_MS = 60_000  # a busy 2-core machine can take many seconds to score a class
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False"}


def clean_cli(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.clean", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def journal(data: Path) -> list[dict]:
    path = data / "_cleaning.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


FIRST_UNSEEN = 5000  # MNIST test-set index past the model fixture's digits: real, varied losses


@pytest.fixture
def data(mnist_arrays, tmp_path) -> Path:
    """A small split data set of digits the model has not seen (training/<d>/: 8, testing/<d>/: 4
    per class), the cleaner's to change."""
    from PIL import Image
    root = tmp_path / "digits"
    counts: dict[int, int] = {}
    for i in range(FIRST_UNSEEN, len(mnist_arrays.valid_labels)):
        y = int(mnist_arrays.valid_labels[i])
        n = counts.get(y, 0)
        if n < 12:
            counts[y] = n + 1
            d = root / ("training" if n < 8 else "testing") / str(y)
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(mnist_arrays.valid_images[i]).save(d / f"{i}.png")
        if len(counts) == 10 and min(counts.values()) == 12:
            return root
    raise AssertionError("not enough MNIST test digits")


@pytest.fixture
def cleaner(data, mnist_model, tmp_path):
    """The command a user runs, on a free port; (url, data) while it runs."""
    port = free_port()
    log = tmp_path / "clean.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "train.clean", str(data), "--model", str(mnist_model),
                                 "--port", str(port)], cwd=ROOT, env=ENV, stdout=fh, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"train.clean exited with {proc.returncode}: {log.read_text()[-3000:]}"
            try:
                if requests.get(url + "/", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, f"train.clean did not answer: {log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield url, data
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def pick(page, elem_id: str, option: str) -> None:
    """Choose `option` in the Gradio dropdown `#elem_id`."""
    page.locator(f"#{elem_id} input").click()
    # The list of this dropdown: inside its block where Gradio renders it there; else the visible
    # one (the list of a dropdown used just before may still be fading out, with the same names)
    scoped = page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True)
    target = scoped if scoped.count() else page.get_by_role("option", name=option, exact=True).filter(visible=True)
    target.first.click()


def test_move_in_the_browser_then_undo(cleaner, mnist_model):
    from playwright.sync_api import sync_playwright
    url, data = cleaner
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM)"
    before = sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png"))
    # A name already taken in the target class for every digit 3: the move must not overwrite it.
    copies = [data / "training" / "5" / f.name for f in (data / "training" / "3").glob("*.png")]
    for f in copies:
        shutil.copy(data / "training" / "3" / f.name, f)
    decoys = {f.name: f.read_bytes() for f in (data / "training" / "5").glob("*.png")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        pick(page, "class", "3")
        page.get_by_text("3 (training): 8 images").wait_for()
        thumbs = page.locator("#gallery .gallery-item > button")
        assert thumbs.count() == 8
        captions = page.locator("#gallery .caption-label").all_inner_texts()
        losses = [float(re.search(r"loss (\d+\.\d+)", c).group(1)) for c in captions]
        assert losses == sorted(losses, reverse=True) and len(set(losses)) > 1, captions  # most confusing first
        thumbs.first.click()
        page.get_by_text("Selected training/3/").wait_for()
        selected = page.locator("#selected").inner_text()
        chosen = re.search(r"Selected (training/3/\S+\.png)", selected).group(1)
        assert abs(float(re.search(r"loss (\d+\.\d+)", selected).group(1)) - losses[0]) <= 0.006  # the one clicked
        pick(page, "target", "5")
        shot = os.environ.get("CLEAN_SCREENSHOT")
        if shot:  # the README's: the most confusing image selected, about to be moved
            page.screenshot(path=str(ROOT / shot if not Path(shot).is_absolute() else shot), full_page=True)
        page.click("#move")
        page.get_by_text("Done: moved").wait_for()
        page.wait_for_function("() => document.querySelectorAll('#gallery .gallery-item').length === 7")
        browser.close()

    name = Path(chosen).name
    moved_to = data / "training" / "5" / f"{Path(name).stem}_1.png"  # the plain name was taken
    assert not (data / chosen).exists() and moved_to.is_file()
    assert {f.name: f.read_bytes() for f in (data / "training" / "5").glob("*.png") if f.name in decoys} == decoys
    [entry] = journal(data)
    assert entry["action"] == "move" and entry["from"] == chosen
    assert entry["to"] == moved_to.relative_to(data).as_posix() and entry["time"]

    r = clean_cli(data, "--undo")
    assert r.returncode == 0, r.stderr
    assert (data / chosen).is_file() and not moved_to.exists()
    entries = journal(data)
    assert entries[-1]["action"] == "undo" and entries[-1]["of"] == 1
    assert entries[-1]["from"] == entry["to"] and entries[-1]["to"] == chosen
    r = clean_cli(data, "--undo")  # recorded: nothing is undone twice
    assert r.returncode == 0 and "nothing to undo" in r.stdout
    for f in copies:
        f.unlink()  # the decoys this test made
    assert sorted(p.relative_to(data).as_posix() for p in data.rglob("*.png")) == before


# --------------------------------------------------------------------------- the rules, without a browser

def test_remove_and_undo_refusals(data):
    from train.clean import CleanError, DataSet, undo
    ds = DataSet(data)
    assert ds.splits == ["training", "testing"] and ds.classes() == [str(i) for i in range(10)]
    a, b = sorted((data / "testing" / "7").glob("*.png"))[:2]
    (data / "_removed" / "7").mkdir(parents=True)
    (data / "_removed" / "7" / a.name).write_bytes(b"someone else's file")
    dst = ds.remove(a, "7")
    assert dst == data / "_removed" / "7" / f"{a.stem}_1.png" and not a.exists()
    assert (data / "_removed" / "7" / a.name).read_bytes() == b"someone else's file"
    ds.move(b, "testing", "1")
    # Old place taken: refused, and nothing at all is moved back (not even the other entry).
    a.write_bytes(b"new")
    with pytest.raises(CleanError, match="taken"):
        undo(ds)
    assert dst.exists() and (data / "testing" / "1" / b.name).exists() and not b.exists()
    a.unlink()
    (data / "testing" / "1" / b.name).rename(data / "elsewhere.png")  # a file gone: refused too
    with pytest.raises(CleanError, match="missing"):
        undo(ds)
    (data / "elsewhere.png").rename(data / "testing" / "1" / b.name)
    assert len(undo(ds)) == 2 and a.exists() and b.exists() and not dst.exists()
    assert undo(ds) == []


def test_paths_outside_data_are_refused(data, tmp_path):
    from train.clean import CleanError, DataSet, undo
    ds = DataSet(data)
    outside = tmp_path / "mine.png"
    outside.write_bytes(b"x")
    with pytest.raises(CleanError, match="outside"):
        ds.move(outside, "training", "1")
    with pytest.raises(CleanError, match="no class"):
        ds.move(next((data / "training" / "1").glob("*.png")), "training", "../..")
    # A journal edited to point outside DATA is refused before anything moves.
    (data / "_cleaning.jsonl").write_text(json.dumps({"time": "t", "action": "move", "from": "../mine.png",
                                                      "to": "training/1/" + next((data / "training" / "1").glob("*.png")).name}) + "\n")
    with pytest.raises(CleanError, match="outside"):
        undo(ds)
    assert outside.read_bytes() == b"x"


def test_cli_errors_are_one_line(data, tmp_path):
    r = clean_cli(tmp_path / "nope", "--undo")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ")
    r = clean_cli(data)  # no --model
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--model" in r.stderr
    (data / "_cleaning.jsonl").write_text("not json\n")
    r = clean_cli(data, "--undo")
    assert r.returncode == 2 and "line 1" in r.stderr and r.stderr.strip().count("\n") == 0


def test_training_ignores_what_the_cleaner_leaves(tmp_path):
    """`_removed/` (and any `_` folder) is not a class; `_cleaning.jsonl` is not an image."""
    from PIL import Image
    from train.data import find_items
    for c in ("a", "b", "_removed/a"):
        (tmp_path / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "_cleaning.jsonl").write_text("{}\n")
    items = find_items(tmp_path)
    assert sorted({label for _, label, _ in items}) == ["a", "b"]
    assert all("_removed" not in f.parts for f, _, _ in items) and len(items) == 6
