"""Training on several processes (GPUs, or CPUs for tests) under `torchrun` or `accelerate launch`.

    torchrun --nproc_per_node 4 -m train photos/ --out models/photos       # 4 GPUs of one machine
    accelerate launch --num_processes 4 -m train photos/ --out models/photos

A one-process run never touches this module beyond `world_size() == 1`. Launched, every process
runs the same `python -m train` and this module decides who does what:

- `setup` picks the process's device (`cuda:LOCAL_RANK`, or the CPU) and starts the process group
  through Accelerate (NCCL on GPUs, gloo on CPUs).
- `rank0_first`: rank 0 builds the data (decoding, or the cache) first; the others wait, then load
  what it built. `from_rank0`: what only rank 0 may do (read the checkpoint, run lr_find), its
  result sent to the others. Either way an error on rank 0 reaches every rank at once.
- `distrib_ctx` wraps one `fit` as fastai's `Learner.distrib_ctx` does (model in DDP through
  Accelerate, each loader a fastai `DistributedDL` that gives each rank its share of every epoch;
  fastai gathers the loss and metrics over all ranks), with the fixes that need and an unwrap
  that also holds when the fit is interrupted.
- Only rank 0 writes: checkpoints, the per-epoch lines, the exported model (`alone` makes fastai
  see one process for that). `check_in_sync` proves the ranks ended with the same parameters.

Batch and learning rate: `--bs` is per process, so the effective batch is bs x world size; the
learning rate is used as given, not scaled (see `build_parser`'s --bs help and the README).
"""
from __future__ import annotations

import hashlib
import logging
import os
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# How long a rank waits in one collective (the process group's timeout) before it gives up. The
# longest wait is the others' for rank 0's data: 1,000 12-MP phone photos decoded in 43.5 s on 2
# cores (README, Benchmarks: Photos), so 30,000 take ~22 min there; torch's default for NCCL is 10.
TIMEOUT = timedelta(minutes=60)


class RankFailed(RuntimeError):
    """Rank 0 failed in a step the ranks share; this rank stops with it (rank 0 printed why)."""


# --------------------------------------------------------------------------- who am I

def launched() -> bool:
    """Started by torchrun / accelerate launch with more than one process (their WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0) if launched() else 0  # before `setup`, as the launcher says


def is_main() -> bool:
    return rank() == 0


def log_prefix() -> str:
    """For the log format, before `setup`: which process a line comes from, in a launched run."""
    return f"[rank {os.environ.get('RANK', '0')}/{os.environ['WORLD_SIZE']}] " if launched() else ""


def setup(device: torch.device) -> torch.device:
    """Start this process's part of a launched run: returns the device it trains on (the one given
    in a one-process run). Raises `ValueError` with a line for a device that cannot be shared."""
    if not launched() or dist.is_initialized():
        return device
    if device.type == "mps":
        raise ValueError("several processes train on CUDA GPUs or on CPUs, not on MPS: add --device cpu")
    if device.type == "cuda":
        local, n = int(os.environ.get("LOCAL_RANK", 0)), torch.cuda.device_count()
        if local >= n:
            raise ValueError(f"process {local} of this machine has no GPU of its own ({n} visible): start at most "
                             f"{n} processes per machine (--nproc_per_node / --num_processes)")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    from accelerate import PartialState
    # Trap 1: Accelerate wraps a model in DDP on CPUs only when told to use them (cpu=True, or
    # ACCELERATE_USE_CPU=1); fastai's Accelerator() says neither, finds no GPU and lets each process
    # train alone, silently. The first state made here is shared by every Accelerator after it.
    PartialState(cpu=device.type == "cpu", timeout=TIMEOUT)  # init_process_group from torchrun's env://
    log.info("process %d of %d on %s (%s)", rank(), world_size(), device, dist.get_backend())
    return device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# --------------------------------------------------------------------------- steps the ranks share

def _broadcast(obj):
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def agree(value):
    """Rank 0's `value`, on every rank. For a decision each rank makes from its own numbers (early
    stopping's "a new best epoch", "stop now"): should their validation losses differ in the last
    bits, the ranks must still decide alike, or they part ways at the next collective call."""
    return value if world_size() == 1 else _broadcast(value)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every rank, as DDP does at each forward pass: for
    buffers a rank changed outside one (train/precisebn.py)."""
    if world_size() == 1:
        return
    for t in model.buffers():
        dist.broadcast(t, src=0)


def rank0_first(build, errors: tuple[type[BaseException], ...] = (Exception,)):
    """`build()` on rank 0, then on the others (which find rank 0's cache and map it, or redo the
    in-memory decode). fastai's `rank0_first` does the same with a barrier, which cannot carry rank
    0's error: the others would sit in it until the timeout. Here the barrier is a broadcast of
    rank 0's outcome, so when rank 0 fails (`errors`: its message is sent) every rank stops."""
    if world_size() == 1:
        return build()
    if is_main():
        try:
            result = build()
        except errors as e:
            _broadcast(str(e))
            raise
        except BaseException:
            _broadcast("see rank 0's output")
            raise
        _broadcast(None)
        return result
    failed = _broadcast(None)
    if failed is not None:
        raise RankFailed(f"rank {rank()} stops: rank 0 failed ({failed})")
    return build()


def from_rank0(step, errors: tuple[type[BaseException], ...] = (Exception,)):
    """`step()` on rank 0 alone (as a one-process run: see `alone`), its result sent to every rank.
    The result is pickled over the process group: our own objects only (a checkpoint, a number)."""
    if world_size() == 1:
        return step()
    if is_main():
        try:
            with alone():
                result = step()
        except errors as e:
            _broadcast(("error", str(e)))
            raise
        except BaseException:
            _broadcast(("error", "see rank 0's output"))
            raise
        _broadcast(("ok", result))
        return result
    status, result = _broadcast(None)
    if status == "error":
        raise RankFailed(f"rank {rank()} stops: rank 0 failed ({result})")
    return result


@contextmanager
def alone():
    """fastai reads WORLD_SIZE from the environment on every call and then gathers every metric over
    all ranks (and its `Learner.load` waits at a barrier): work that only rank 0 does (lr_find, the
    export's evaluation) would wait for the others forever. Within this block it sees one process."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = saved


def resume_conflict(saved_world_size: int) -> str | None:
    """A checkpoint continues only with the world size it was made with: each process's share of an
    epoch, and so the effective batch and the steps per epoch, depend on it."""
    if saved_world_size != world_size():
        def procs(n): return "one process" if n == 1 else f"{n} processes"
        return (f"--resume: the checkpoint was made by {procs(saved_world_size)}, this run has "
                f"{procs(world_size())}; resume with the same number (torchrun --nproc_per_node / "
                "accelerate launch --num_processes), or start over without --resume")
    return None


# --------------------------------------------------------------------------- fitting

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP (fastai's `after_fit` unwraps it, but an interrupted fit never gets there)."""
    from torch.nn.parallel import DistributedDataParallel
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def revert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`nn.SyncBatchNorm.convert_sync_batchnorm` undone: every SyncBatchNorm back into the class it
    replaced (recorded by `_convert_sync_batchnorm`: fastai's head has BatchNorm1d, resnet18's body
    BatchNorm2d), sharing the same parameters and buffers. A SyncBatchNorm refuses CPU tensors and
    is no plain resnet18: neither a checkpoint's next fit nor an exported model may hold one."""
    if isinstance(model, torch.nn.SyncBatchNorm):
        raise TypeError("call revert_sync_batchnorm on the model, not on one of its layers")
    for name, child in model.named_children():
        if isinstance(child, torch.nn.SyncBatchNorm):
            kind = getattr(child, "_reverted_from", torch.nn.BatchNorm2d)
            bn = kind(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                      device="meta")
            if child.affine:
                bn.weight, bn.bias = child.weight, child.bias
            bn.running_mean, bn.running_var = child.running_mean, child.running_var
            bn.num_batches_tracked = child.num_batches_tracked
            bn.train(child.training)
            setattr(model, name, bn)
        else:
            revert_sync_batchnorm(child)
    return model


def _convert_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """`convert_sync_batchnorm`, remembering each layer's class so that `revert_sync_batchnorm` can
    give it back (fastai's head has BatchNorm1d, resnet18's body BatchNorm2d)."""
    kinds = {name: type(m) for name, m in model.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, torch.nn.SyncBatchNorm)}
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, m in model.named_modules():
        if name in kinds:
            m._reverted_from = kinds[name]
    return model


def _trainer_classes():
    """fastai's `DistributedTrainer`, and its `DistributedDL` as `.dl_class`, with the fixes below
    (imported on first use: a one-process run never loads Accelerate)."""
    from fastai.distributed import DistributedDL, DistributedTrainer, _round_to_multiple
    from fastai.torch_core import find_bs

    class RankDL(DistributedDL):
        def _broadcast(self, t, rank):
            # Trap 3: fastai sends the epoch's shuffled indices from rank 0 as a CUDA tensor,
            # unconditionally (NCCL needs one); gloo takes CPU tensors, and a CPU box has no CUDA.
            if dist.get_backend() == "nccl":
                return super()._broadcast(t, rank)
            t = torch.tensor(t, dtype=torch.long)
            dist.broadcast(t, rank)
            return t.tolist()

        def __len__(self):
            # fastai counts ceil(batches / world size), but each rank gets ceil(items / world size)
            # items and drops its own last partial batch: with 300 images at batch 32 on 2 ranks that
            # is 5 counted for 4 run, and the one-cycle schedule (steps = this length x epochs) would
            # stop at 80% without annealing. Count the batches each rank really runs.
            share = _round_to_multiple(self.dl.n, self.world_size) // self.world_size
            return share // self.bs if self.drop_last else -(-share // self.bs)

    class RankTrainer(DistributedTrainer):
        """One rank's side of a fit; also counts what this rank trained on, for the log."""

        def before_fit(self):
            if self.sync_bn:  # keep the classes, to give them back in `restore`
                self.learn.model = _convert_sync_batchnorm(self.learn.model)
            sync, self.sync_bn = self.sync_bn, False
            try:
                super().before_fit()
            finally:
                self.sync_bn = sync

        dl_class = RankDL

        def _wrap_dl(self, dl):
            return dl if isinstance(dl, DistributedDL) else self.dl_class(dl, device=self.learn.model.device)

        def before_epoch(self):
            self.batches, self.images = 0, 0

        def after_batch(self):
            if self.training:
                self.batches += 1
                self.images += find_bs(self.yb)
                self.of = self.dl.n  # the epoch's training images, all ranks together

        def after_epoch(self):
            if self.batches:  # not an epoch skipped on --resume
                log.info("epoch %d/%d: this rank trained on %d of the %d training images, in %d batches",
                         self.epoch + 1, self.n_epoch, self.images, self.of, self.batches)

        def restore(self, learn):
            """Undo what `before_fit` did, whether or not the fit reached `after_fit`."""
            learn.model = revert_sync_batchnorm(unwrap(learn.model))
            if hasattr(self, "old_dls"):
                learn.dls.loaders = self.old_dls
            if isinstance(getattr(learn, "dl", None), DistributedDL):
                learn.dl = learn.dl.dl

    return RankTrainer


@contextmanager
def distrib_ctx(learn):
    """One fit on every rank, as fastai's `learn.distrib_ctx()`, which cannot take the CPU fixes
    (it builds fastai's own `DistributedTrainer`). Does nothing in a one-process run. On the way out,
    normal or not, the model is the plain module again (no DDP, no SyncBatchNorm) and the loaders
    are the ones it came with."""
    if world_size() == 1:
        yield learn
        return
    from fastai.callback.progress import ProgressCallback
    cpu = next(learn.model.parameters()).device.type == "cpu"
    # Trap 2: SyncBatchNorm (batch statistics over all ranks) refuses CPU tensors: CPU ranks keep
    # their own BatchNorm statistics, broadcast from rank 0 by DDP before each forward.
    # mixed_precision="no": fastai's own callback (to_bf16 / to_fp16) already does it.
    trainer = _trainer_classes()(sync_bn=not cpu, mixed_precision="no")
    learn.add_cb(trainer)
    if not is_main() and hasattr(learn, "progress"):
        learn.remove_cb(ProgressCallback)  # one progress bar: rank 0's (this rank never exports)
    try:
        yield learn
    finally:
        learn.remove_cb(trainer)
        trainer.restore(learn)


def gather_in_order(tensors: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Each rank's outputs of its share of the validation set -> the whole set's, in the loader's
    order: `DistributedDL` gives rank r the r-th contiguous slice of the (unshuffled, padded) index
    list, so concatenating the ranks' tensors in rank order and cutting the padding restores it."""
    if world_size() == 1:
        return tensors
    # NCCL gathers CUDA tensors only
    on = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for t in tensors:
        parts = [torch.empty_like(t, device=on) for _ in range(world_size())]
        dist.all_gather(parts, t.contiguous().to(on))
        out.append(torch.cat(parts)[:n].to(t.device))
    return tuple(out)


def state_digest(model: torch.nn.Module) -> str:
    """sha256 over the state dict's tensors (parameters and buffers), by sorted name, each as the raw
    bytes of a contiguous CPU copy: equal on two ranks exactly when their models are."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_in_sync(model: torch.nn.Module) -> None:
    """After the fit: every rank's parameters must equal rank 0's (DDP averages the gradients and
    broadcasts the buffers, so they do unless something is broken). Raises `RuntimeError` otherwise,
    on every rank, before anything is exported."""
    if world_size() == 1:
        return
    digest = state_digest(model)
    log.info("parameters after training: sha256 %s", digest)
    digests = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        raise RuntimeError(f"the processes ended with different parameters (ranks {differ} differ from rank 0); "
                           "nothing was exported")
