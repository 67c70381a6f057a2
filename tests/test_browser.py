"""A real browser against the real command: `python -m serve MODEL --port P` in a subprocess,
headless Chromium driven by Playwright. It uploads an MNIST digit and reads the right label off the
page, draws a digit on the sketch pad, and sees the error shown for a missing image.

SERVE_SCREENSHOT=docs/screenshot.png saves a screenshot of the UI (the README's) there.
Chromium: Debian's `chromium` package, at /usr/bin/chromium (or CHROMIUM=path).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import requests
from PIL import Image

from tests.servers import serve_process

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
TIMEOUT_MS = 60_000  # a busy 2-core machine can take many seconds for a first request


@pytest.fixture(scope="module")
def served(mnist_model):
    """The exact command a user runs, on a free port; its URL while it runs."""
    with serve_process(mnist_model) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def page(served):
    from playwright.sync_api import sync_playwright
    assert Path(CHROMIUM).exists(), f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(served + "/")
        page.wait_for_selector("#image")
        yield page
        browser.close()


def shown_label(page) -> str:
    return page.locator("#prediction [data-testid='label-output-value']").inner_text().strip()


def wait_for_label(page, expected: str) -> None:
    page.wait_for_function(
        "e => { const h = document.querySelector(\"#prediction [data-testid='label-output-value']\");"
        " return h && h.innerText.trim() === e; }", arg=expected, timeout=TIMEOUT_MS)


def test_upload_shows_the_right_label(page, mnist_arrays, served, tmp_path):
    """Upload a digit: its label appears; a second digit replaces it. The digits are ones the
    server itself reads right (asked over HTTP), so a wrong label on screen is the page's fault."""
    picked = []
    for a, y in zip(mnist_arrays.valid_images[:50], mnist_arrays.valid_labels[:50]):
        path = tmp_path / f"{len(picked)}.png"
        Image.fromarray(a).save(path)
        r = requests.post(served + "/v1/predict", files=[("files", path.read_bytes())], timeout=60)
        if r.json()[0]["label"] == str(int(y)) and str(int(y)) not in [p[1] for p in picked]:
            picked.append((path, str(int(y))))
        if len(picked) == 2:
            break
    for path, label in picked:
        page.locator("#image input[type=file]").set_input_files(str(path))  # the upload event classifies
        wait_for_label(page, label)
        assert shown_label(page) == label
    shot = os.environ.get("SERVE_SCREENSHOT")
    if shot:
        page.get_by_text("Examples (click one)").scroll_into_view_if_needed()
        page.screenshot(path=str(ROOT / shot if not Path(shot).is_absolute() else shot), full_page=True)


def test_no_image_shows_an_error(page):
    page.reload()  # a fresh page: no image loaded
    page.wait_for_selector("#image")
    page.click("#classify")
    page.get_by_text("no image: upload, paste or photograph one first").first.wait_for(timeout=TIMEOUT_MS)


def test_drawn_digit_is_read(page):
    """Draw a '1' on the sketch pad (black on white on screen; inverted for the model)."""
    page.get_by_role("tab", name="Draw a digit").click()
    page.wait_for_selector("#sketch canvas")
    page.locator("#sketch button[aria-label='Brush']").first.click()
    box = page.locator("#sketch canvas").first.bounding_box()
    x = box["x"] + box["width"] * 0.5
    page.mouse.move(x, box["y"] + box["height"] * 0.2)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x + i * 0.4, box["y"] + box["height"] * (0.2 + 0.6 * i / 20))
    page.mouse.up()
    page.click("#classify-sketch")
    wait_for_label(page, "1")
