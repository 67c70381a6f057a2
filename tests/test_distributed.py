"""Training on several processes, as a user starts it: `torchrun --nproc_per_node 2 -m train ...`
(and `accelerate launch`) on CPU processes talking gloo, on a few hundred real digits.

What each test would catch: a rank that did not train (or trained on everything), ranks whose
parameters drifted apart (e.g. the model never wrapped in DDP), validation scored on rank 0's share
only, a second model folder or a checkpoint left behind, a model that does not load or predict, a
Ctrl-C that leaves nothing to resume, and a rank 0 error that leaves the others hanging.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT

PY = sys.executable
# small enough for a loaded 2-core machine, big enough to learn: 300 digits, 18 steps of 8 per rank
# per epoch (bs 8 x 2 ranks = 16 a step); 3 epochs reached 60-77% here (chance: 10%)
TRAIN = ["--epochs", "3", "--size", "28", "--bs", "8", "--lr", "3e-3", "--no-augment"]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore::FutureWarning"}


def torchrun(*args) -> list[str]:
    # `python -m torch.distributed.run` is what the `torchrun` script runs; --standalone: a free port
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "train", *map(str, args)]


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # as a terminal gives it (see test_train)


def rank_lines(stderr: str, what: str) -> dict[int, list[str]]:
    """Log lines of each rank that contain `what`, by rank."""
    found: dict[int, list[str]] = {}
    for m in re.finditer(r"^INFO: \[rank (\d)/2\] (.*)$", stderr, re.M):
        if what in m.group(2):
            found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


def safetensors_digest(path: Path) -> str:
    """sha256 over a state dict, the way `train.distributed.state_digest` defines it (sorted names,
    each name then its tensor's raw bytes), computed here from the exported file alone."""
    from safetensors.torch import load_file
    state = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def predicted_accuracy(model: Path, folder: Path, tmp: Path) -> float:
    """`python -m serve.predict` (fastai's pickle), from outside the checkout, on the held-out digits."""
    r = subprocess.run([PY, "-m", "serve.predict", str(model), str(folder), "--json", "--format", "pickle", "--quiet"],
                       cwd=tmp, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 100
    return sum(row["label"] == Path(row["file"]).parent.name for row in rows) / len(rows)


@pytest.fixture(scope="module")
def two_processes(mnist_folder, tmp_path_factory):
    """One real 2-process run to the end; returns (the finished process, its model folder)."""
    base = tmp_path_factory.mktemp("distrib")
    out = base / "models" / "digits"
    r = subprocess.run(torchrun(mnist_folder, *TRAIN, "--out", out), cwd=base, env=_env(),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r, out


def test_each_rank_trains_its_share_of_every_epoch(two_processes):
    r, _ = two_processes
    shares = rank_lines(r.stderr, "this rank trained on")
    assert sorted(shares) == [0, 1]
    for rank in (0, 1):
        # 150 of the 300 images each (fastai's DistributedDL), 18 full batches of 8 (the last 6 dropped)
        assert shares[rank] == [f"epoch {e}/3: this rank trained on 144 of the 300 training images, in 18 batches"
                                for e in (1, 2, 3)]
    assert r.stdout.count("epoch 3/3 ") == 1, "one set of per-epoch lines: rank 0's"


def test_ranks_end_equal_and_the_export_is_their_model(two_processes):
    r, out = two_processes
    digests = rank_lines(r.stderr, "parameters after training: sha256")
    assert sorted(digests) == [0, 1]
    rank1 = digests[1][0].split()[-1]
    assert rank1 == digests[0][0].split()[-1]
    # rank 1 never writes a file: what rank 0 exported is rank 1's model too
    assert safetensors_digest(out / "model.safetensors") == rank1


def test_one_model_folder_that_says_so_and_predicts(two_processes, mnist_folder, tmp_path):
    r, out = two_processes
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits"], "one folder, no checkpoint or temp left"
    assert r.stdout.count(f"->  {out}") == 1  # the closing line, from rank 0 alone
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["config"]["bs"] == 8
    # the export scored the whole validation set (100 digits), gathered from both ranks, and so did
    # fastai's per-epoch metric: each rank alone has 50
    assert meta["metrics"]["n_valid"] == 100
    last = re.search(r"^epoch 3/3 .*accuracy ([0-9.]+)", r.stdout, re.M)
    assert float(last.group(1)) == pytest.approx(meta["metrics"]["valid_accuracy"], abs=1e-4)
    assert "batch size 16 (8 in each of 2 processes)" in (out / "README.md").read_text()
    got = predicted_accuracy(out, mnist_folder / "testing", tmp_path)
    assert got == pytest.approx(meta["metrics"]["valid_accuracy"], abs=0.02)
    assert got >= 0.3, f"a model that learnt nothing: {got:.0%} on 10 classes"


def test_world_size_in_the_schema_reads_old_folders(two_processes):
    """metadata.json's world_size: a folder written before it was recorded reads as one process."""
    from models.contract import ModelFolderError, ModelMetadata
    raw = json.loads((two_processes[1] / "metadata.json").read_text())
    assert ModelMetadata.from_dict(raw).world_size == 2
    del raw["world_size"]
    assert ModelMetadata.from_dict(raw).world_size == 1
    with pytest.raises(ModelFolderError, match="world_size 0 is not a number of processes"):
        ModelMetadata.from_dict({**raw, "world_size": 0})


def test_a_rank_0_error_stops_every_rank_at_once(tmp_path):
    """Rank 0 reads the data first; its error must reach rank 1 waiting for it (fastai's barrier
    would keep rank 1 there until the process group's timeout)."""
    t0 = time.monotonic()
    r = subprocess.run(torchrun(tmp_path / "no such folder", *TRAIN, "--out", tmp_path / "m"), cwd=tmp_path,
                       env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "error: " + str(tmp_path / "no such folder") + " does not exist" in r.stderr
    assert "error: rank 1 stops: rank 0 failed" in r.stderr
    assert "[rank0]: Traceback" not in r.stderr and "[rank1]: Traceback" not in r.stderr
    assert time.monotonic() - t0 < 120  # no wait for a timeout (TIMEOUT is 60 min)


@pytest.mark.slow  # two more 2-process runs (~2 min on a loaded 2-core machine)
def test_ctrl_c_leaves_a_checkpoint_that_resume_finishes(mnist_folder, tmp_path):
    out = tmp_path / "models" / "digits"
    ckpt = tmp_path / "models" / ".digits.checkpoint" / "checkpoint.pth"
    args = [mnist_folder, *TRAIN, "--out", out]
    # Ctrl-C in a terminal signals torchrun's process group; torchrun passes SIGINT to each rank
    proc = subprocess.Popen(torchrun(*args), cwd=tmp_path, env=_env(), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 400
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ckpt.exists(), "no checkpoint after the first epoch"
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0  # torchrun's own: 1, after its SignalException
    assert (f"interrupted: no model was written to {out}; the last finished epoch is saved in {ckpt}; "
            "continue with the same command plus --resume") in stderr
    assert "interrupted: [rank 1/2] stopped" in stderr and "[rank0]: Traceback" not in stderr
    assert not out.exists()
    state = torch.load(ckpt, weights_only=False)
    assert state["state"]["world_size"] == 2 and 1 <= state["state"]["done"]["scratch"] < 3
    assert not any(k.startswith("module.") for k in state["model"]), "the plain model's weights, not DDP's"

    # another number of processes is refused, in one line, before any data is read
    r = subprocess.run([PY, "-m", "train", *map(str, args), "--resume"], cwd=tmp_path, env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith(
        "error: --resume: the checkpoint was made by 2 processes, this run has one process")

    r = subprocess.run(torchrun(*args, "--resume"), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    done = state["state"]["done"]["scratch"]
    assert "resuming from" in r.stdout and f"epoch {done + 1}/3" in r.stdout and f"epoch {done}/3 " not in r.stdout
    assert sorted(rank_lines(r.stderr, f"epoch 3/3: this rank trained on 144")) == [0, 1]
    assert json.loads((out / "metadata.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in out.parent.iterdir()) == ["digits"]


@pytest.mark.slow  # one more 2-process run (~1-2 min)
def test_accelerate_launch_and_lr_find(mnist_folder, tmp_path):
    """`accelerate launch --multi_gpu` starts the processes through torch's launcher, as on GPUs; on a
    CPU box our code moves them to gloo. (`--cpu` alone starts one process: Accelerate's multi-CPU
    launch goes through MPI.)"""
    out = tmp_path / "m"
    accelerate = [PY, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "0"]
    # --lr auto: lr_find on rank 0 alone (fastai would wait for the others in it), its pick sent to rank 1
    r = subprocess.run([*accelerate, "-m", "train", str(mnist_folder), "--size", "28", "--bs", "8", "--no-augment",
                        "--epochs", "1", "--lr", "auto", "--out", str(out)],
                       cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert sorted(rank_lines(r.stderr, "epoch 1/1: this rank trained on 144 of the 300")) == [0, 1]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["world_size"] == 2
    picked = re.findall(r"^lr_find suggests (\S+); using it$", r.stdout, re.M)
    assert len(picked) == 1 and meta["lr"] == pytest.approx(float(picked[0]), rel=0.01)
    digests = rank_lines(r.stderr, "parameters after training")
    assert digests[0] == digests[1]  # the same rate on both ranks, or their Adam steps would differ


# --------------------------------------------------------------------------- the pieces, in one process

def test_batches_counted_as_each_rank_runs_them():
    """fastai's DistributedDL counts ceil(batches / ranks): 5 for 300 images at 32 on 2 ranks, where
    each rank's 150 make 4 full batches; the one-cycle schedule (steps = that count x epochs) would
    stop at 80%, never annealing."""
    from fastai.data.core import TfmdDL
    from fastai.distributed import DistributedDL
    from train.distributed import _trainer_classes
    dl = TfmdDL(list(range(300)), bs=32, drop_last=True, shuffle=True)
    for rank in (0, 1):
        ours = _trainer_classes().dl_class(dl, rank=rank, world_size=2)
        ours._broadcast = lambda t, src: t  # one process: rank 0's indices are these
        assert len(DistributedDL(dl, rank=rank, world_size=2)) == 5
        assert len(ours) == len(list(ours)) == 4
    valid = TfmdDL(list(range(101)), bs=16, drop_last=False)
    ours = _trainer_classes().dl_class(valid, rank=1, world_size=2)
    ours._broadcast = lambda t, src: t
    assert len(ours) == len(list(ours)) == 4  # 51 (one padded) in 16 + 16 + 16 + 3


def test_sync_batchnorm_is_undone_to_the_layers_it_replaced():
    """GPU ranks train with SyncBatchNorm (fastai's default); the model that comes out must be the
    plain resnet18 again, BatchNorm1d in fastai's head included, with the same tensors."""
    from fastai.vision.learner import create_vision_model
    from torchvision.models import resnet18
    from train.distributed import _convert_sync_batchnorm, revert_sync_batchnorm
    torch.manual_seed(0)
    model = create_vision_model(resnet18, 3, pretrained=False).eval()
    kinds = [type(m) for m in model.modules()]
    assert torch.nn.BatchNorm1d in kinds and torch.nn.BatchNorm2d in kinds
    x = torch.rand(2, 3, 32, 32)
    before, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    synced = _convert_sync_batchnorm(model)
    assert torch.nn.BatchNorm2d not in [type(m) for m in synced.modules()]
    back = revert_sync_batchnorm(synced)
    assert [type(m) for m in back.modules()] == kinds
    assert all(torch.equal(v, state[k]) for k, v in back.state_dict().items()) and back.state_dict().keys() == state.keys()
    assert torch.equal(back(x), before)
