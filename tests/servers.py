"""The server as a user runs it: `python -m serve MODEL ...` in its own process on a free loopback
port, for tests that talk to it with real clients (requests, gradio_client, raw sockets, Chromium)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Served:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def spawn_serve(model, *args, env: dict | None = None, log: Path | None = None, cwd: Path = ROOT) -> Served:
    """Start `python -m serve model --port P --quiet *args` and return at once (nothing waited
    for: a test may watch the start-up). The caller stops it (`serve_process` does)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    if log is None:
        import tempfile
        log = Path(tempfile.mkstemp(prefix="serve-", suffix=".log")[1])
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "serve", str(model), "--port", str(port), "--quiet", *map(str, args)],
                                cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return Served(f"http://127.0.0.1:{port}", port, proc, log)


@contextlib.contextmanager
def serve_process(model, *args, env: dict | None = None, log: Path | None = None, timeout: float = 180,
                  cwd: Path = ROOT, stop_timeout: float = 30):
    """Start `python -m serve model --port P --quiet *args`, wait for /v1/health, yield a `Served`,
    then stop it (SIGTERM, then SIGKILL). Fails the test if it exits or stays silent."""
    served = spawn_serve(model, *args, env=env, log=log, cwd=cwd)
    proc, url = served.proc, served.url
    deadline = time.monotonic() + timeout  # fastai + gradio imports on a busy 2-core machine
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"python -m serve exited with {proc.returncode}: {served.output()[-3000:]}")
            try:
                if requests.get(url + "/v1/health", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"python -m serve did not answer within {timeout:.0f} s: {served.output()[-3000:]}")
            time.sleep(0.5)
        yield served
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class GradioClients:
    """`gradio_client.Client`s lent out one job at a time, for tests that call the UI from many
    threads: each caller a user of its own, as on a real Space. One Client shared by threads at once
    now and then cancels a job the server answered (gradio_client 2.7.2: a job registered while the
    client's event stream is closing, its session idle for an instant, waits on that closed stream
    and is told `CancelledError`; seen in CI with the server in the test's process)."""

    def __init__(self, url: str, n: int, **kwargs):
        import queue

        from gradio_client import Client
        self.all = []
        self._free = queue.Queue()
        try:
            for _ in range(n):
                self.all.append(Client(url, verbose=False, **kwargs))
        except BaseException:
            self.close()  # the ones made before the failure
            raise
        for client in self.all:
            self._free.put(client)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @contextlib.contextmanager
    def lend(self, timeout: float = 600):
        client = self._free.get(timeout=timeout)  # queue.Empty rather than a hung test
        try:
            yield client
        finally:
            self._free.put(client)

    def predict(self, *args, **kwargs):
        with self.lend() as client:
            return client.predict(*args, **kwargs)

    def close(self) -> None:
        for client in self.all:
            client.close()
