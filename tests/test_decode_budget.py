"""Decoding memory, bounded server-wide: `--max-decode-mp` (serve.limits.DecodeBudget, the gate of
models.imageio.open_image), the web UI's decodes on threads of its own, and glibc's free memory
given back after large decodes (`return_freed_memory`).

Before them, each Gradio request decoded in a thread of Gradio's pool of 40, so 32 requests of one
64 MP PNG of 0.2 MB each took the server from 1.4 to 11.6 GB (bench/serve_memory.py's ui_burst).
The last test sends such a burst to `python -m serve` through gradio_client and the HTTP API at
once and reads the server's peak memory from /proc.
"""
from __future__ import annotations

import io
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from models.imageio import open_image
from serve.limits import DecodeBudget, Limits, return_freed_memory
from synthetic.photoset import ramp_png
from tests.servers import ROOT, GradioClients, serve_process

BIG = 8000  # px per side: the 64 MP pixel limit


class Recorder:
    """A gate that records the pixels asked for and whether Pillow had decoded anything by then."""

    def __init__(self):
        self.asked, self.loaded_before = [], []

    def __call__(self, pixels):
        import contextlib
        self.asked.append(pixels)
        self.loaded_before.append(Loads.count)
        return contextlib.nullcontext()


class Loads:
    count = 0


@pytest.fixture
def count_loads(monkeypatch):
    """Count every Pillow decode (ImageFile.load that reads pixels)."""
    from PIL import ImageFile
    original = ImageFile.ImageFile.load
    Loads.count = 0

    def load(self):
        if getattr(self, "tile", None):  # pixels still to decode
            Loads.count += 1
        return original(self)
    monkeypatch.setattr(ImageFile.ImageFile, "load", load)


# --------------------------------------------------------------------------- the gate

@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_gate_is_held_before_any_pixel_is_decoded(count_loads, fmt):
    # A PNG's getexif() decodes the whole image (its EXIF chunk may follow the pixels): that must
    # happen inside the gate too, or the budget bounds nothing for PNGs.
    buf = io.BytesIO()
    Image.new("RGB", (640, 480), (10, 200, 30)).save(buf, format=fmt)
    gate = Recorder()
    im = open_image(buf.getvalue(), gate=gate)
    assert im.size == (640, 480) and gate.asked == [640 * 480]
    assert gate.loaded_before == [0] and Loads.count >= 1


def test_gate_is_charged_the_reduced_jpeg_decode():
    # A 4032x3024 JPEG for a 224 px model decodes at 1/4 scale in the DCT (>= 2 x 224 per side):
    # the budget is charged what the decoder produces, 1008x756, not the stored 12 MP.
    buf = io.BytesIO()
    Image.new("RGB", (4032, 3024), (90, 40, 160)).save(buf, format="JPEG", quality=90)
    gate = Recorder()
    open_image(buf.getvalue(), size=224, gate=gate)
    assert gate.asked == [1008 * 756]
    gate = Recorder()
    open_image(buf.getvalue(), gate=gate)  # no size: a full decode, charged in full
    assert gate.asked == [4032 * 3024]


def test_refused_images_never_reach_the_gate():
    gate = Recorder()
    from models.imageio import ImageError
    for bad in (b"", b"not an image", ramp_png(100, 100)):  # empty, not an image, over the pixel limit
        with pytest.raises(ImageError):
            open_image(bad, max_pixels=1000, gate=gate)
    assert gate.asked == []


# --------------------------------------------------------------------------- the budget

def test_budget_bounds_what_is_held_at_once_and_serves_in_arrival_order():
    budget = DecodeBudget(100)
    order, lock, held = [], threading.Lock(), [0]
    peak = [0]
    first_in = threading.Event()
    release_first = threading.Event()

    def decode(name, pixels, wait=None):
        with budget.hold(pixels):
            with lock:
                order.append(name)
                held[0] += pixels
                peak[0] = max(peak[0], held[0])
            if wait is not None:
                first_in.set()
                release_first.wait(10)
            time.sleep(0.01)
            with lock:
                held[0] -= pixels

    big = threading.Thread(target=decode, args=("first", 60, True))
    big.start()
    first_in.wait(10)
    # With 60 of 100 held: "large" (70) must wait, and "small" (10), arriving after it, must not pass it.
    large = threading.Thread(target=decode, args=("large", 70))
    large.start()
    while not budget._turns:
        time.sleep(0.001)
    small = threading.Thread(target=decode, args=("small", 10))
    small.start()
    time.sleep(0.1)
    assert order == ["first"] and budget.in_use == 60
    release_first.set()
    for t in (big, large, small):
        t.join(10)
    assert order == ["first", "large", "small"]
    assert peak[0] <= 100 and budget.peak <= 100 and budget.in_use == 0


def test_one_image_over_the_whole_budget_decodes_alone():
    budget = DecodeBudget(100)
    with budget.hold(500):  # charged the whole budget, not refused and not waiting forever
        assert budget.in_use == 100
    assert budget.in_use == 0 and budget.peak == 100


def test_an_error_inside_gives_the_pixels_back():
    budget = DecodeBudget(100)
    with pytest.raises(RuntimeError):
        with budget.hold(80):
            raise RuntimeError("truncated")
    assert budget.in_use == 0
    with budget.hold(100):  # the whole budget is free again
        pass


def test_budget_under_the_pixel_limit_is_a_usage_error():
    with pytest.raises(ValueError, match="max-decode-mp"):
        Limits(max_decode_mp=10)
    r = subprocess.run([sys.executable, "-m", "serve", "no-such-model", "--max-decode-mp", "10"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--max-decode-mp (10) must be at least the pixel limit" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_waiter_interrupted_gives_its_turn_up():
    # Ctrl-C (or any exception) while waiting must not leave its turn at the head of the line,
    # where it would block every later decode.
    budget = DecodeBudget(100)
    interrupted = []

    def wait_then_interrupt():
        try:
            with budget.hold(100):
                pass
        except KeyboardInterrupt:
            interrupted.append(True)
    with budget.hold(100):
        t = threading.Thread(target=wait_then_interrupt)
        t.start()
        while not budget._turns:
            time.sleep(0.001)
        import ctypes
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(t.ident), ctypes.py_object(KeyboardInterrupt))
        with budget._changed:
            budget._changed.notify_all()  # wake it, so the pending exception is raised in wait()
        t.join(10)
    assert interrupted == [True] and not budget._turns
    done = threading.Event()
    threading.Thread(target=lambda: (budget.hold(1).__enter__(), done.set())).start()
    assert done.wait(5), "a later decode is blocked by the interrupted one's turn"


def test_return_freed_memory_on_glibc():
    import platform
    assert return_freed_memory() is (platform.libc_ver()[0] == "glibc")


# --------------------------------------------------------------------------- the server

def memory_mb(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(line.split()[1]) // 1024 for line in status for k in ("VmRSS", "VmHWM") if line.startswith(k + ":")}


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="reads peak memory from Linux's /proc")
def test_a_burst_of_huge_images_through_ui_and_api_stays_within_the_budget(mnist_model, tmp_path):
    """16 Gradio requests at once, then 4 more with 4 API requests, each one 64 MP PNG (0.2 MB on the
    wire, ~0.5 GB while it decodes), with room for one decode at a time (`--max-decode-mp 64`): every
    one is answered, /metrics saw the UI's decodes charged and never more than the budget decoding,
    the server's peak stays near one decode's worth, and it is back near where it started after."""
    from gradio_client import handle_file
    big = tmp_path / "big.png"
    big.write_bytes(ramp_png(BIG, BIG))
    data = big.read_bytes()
    assert len(data) < 1_000_000
    with serve_process(mnist_model, "--device", "cpu", "--max-decode-mp", 64) as served:
        pid = served.proc.pid
        time.sleep(1)
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        base = memory_mb(pid)["VmRSS"]
        with GradioClients(served.url + "/", 16, httpx_kwargs={"timeout": 300}) as clients:
            answers, errors = [], []

            def ui():
                try:
                    answers.append(clients.predict(handle_file(str(big)), api_name="/predict"))
                except Exception as e:  # noqa: BLE001  (reported below)
                    errors.append(f"ui: {type(e).__name__}: {e}")

            def api():
                r = requests.post(served.url + "/v1/predict", files=[("files", ("big.png", data, "image/png"))], timeout=300)
                (answers if r.status_code == 200 else errors).append(r.json() if r.status_code == 200 else f"api: {r.status_code} {r.text}")

            def burst(threads):
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(600)
                metrics = requests.get(served.url + "/metrics", timeout=30).text
                return next(float(line.split()[1]) for line in metrics.splitlines()
                            if line.startswith("serve_decode_pixels_peak "))

            # The web UI alone first: a decode of its own that bypassed the budget would leave the peak at 0.
            ui_peak = burst([threading.Thread(target=ui) for _ in range(16)])
            peak = burst([threading.Thread(target=ui) for _ in range(4)] + [threading.Thread(target=api) for _ in range(4)])
            mem = memory_mb(pid)
    assert not errors and len(answers) == 24, errors[:3]
    assert ui_peak == peak == 64_000_000
    # One 8-bit 64 MP decode peaks at ~0.5 GB here (two at ~1 GB); without the budget, 16 at once
    # took ~7 GB, and without the freed memory given back the server kept +1.5 GB after such a burst.
    assert mem["VmHWM"] - base < 1300, (base, mem)
    assert mem["VmRSS"] - base < 400, (base, mem)
