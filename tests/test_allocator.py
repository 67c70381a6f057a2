"""glibc's malloc keeps what a training step frees: the next step reuses it instead of faulting
fresh pages in. Measured as the process's minor page faults, in a process of its own."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys
import torch
from torchvision.models import resnet18
from train.allocator import keep_freed_memory
taken = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model = resnet18(num_classes=10).to(memory_format=torch.channels_last)
opt = torch.optim.AdamW(model.parameters())
x, y = torch.randn(64, 3, 28, 28).contiguous(memory_format=torch.channels_last), torch.randint(0, 10, (64,))
def step():  # a training step: its activations and gradients made, then freed
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(json.dumps({"taken": taken, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _faults(mode: str) -> dict:
    # glibc's own defaults: no malloc settings or preloaded allocator from the environment
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="a setting of glibc's malloc; elsewhere nothing is set")
def test_freed_step_memory_is_reused_without_page_faults():
    plain, kept = _faults("plain"), _faults("keep")
    assert kept["taken"] is True
    # glibc's defaults give back and fault in again thousands of pages a step
    assert plain["faults"] > 10 * 1000, plain
    assert kept["faults"] < plain["faults"] / 4, (kept, plain)


def test_the_command_sets_it(monkeypatch):
    """`python -m train` (train.cli.main) sets it, on a run that then fails as well."""
    import train.allocator
    import train.cli
    calls = []
    monkeypatch.setattr(train.allocator, "keep_freed_memory", lambda: calls.append(1) or True)
    assert train.cli.main(["/nonexistent/photos", "-q"]) != 0  # a clear error, after the setting
    assert calls == [1]
