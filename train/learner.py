"""Build the fastai learner, and fit it in resumable phases with per-epoch checkpoints.

`fit` runs what `fine_tune` runs (one frozen epoch, then the unfrozen epochs at half the rate)
when starting from pretrained weights, and `fit_one_cycle` from scratch, but as named phases so
that `--resume` can skip finished phases and restart a phase at the epoch after its checkpoint
(fastai's `start_epoch`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import fastai.callback.channelslast  # noqa: F401  (patches Learner.to_channelslast)
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle / lr_find)
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat
from fastai.metrics import F1ScoreMulti, accuracy, accuracy_multi
from fastai.optimizer import OptimWrapper
from fastai.vision.learner import vision_learner
from fastcore.basics import noop
from torchvision.models import resnet18

from models.device import DeviceError, pick_device as _pick_device
from train.runlog import History, epoch_ran
from train import distributed
from train.precision import apply_precision, remove_precision
from train.precisebn import PreciseBatchNorm
from train.smallmaps import small_map_convs
from train.stopping import BestEpoch, Patience, restore_best

log = logging.getLogger(__name__)

IMAGENET_WEIGHTS = "resnet18-f37072fd.pth"  # torchvision's file name in the torch hub cache

# fastai's Adam (decoupled weight decay 0.01, betas 0.9/0.99, eps 1e-5), but torch's fused kernel:
# fastai's steps each of resnet18's 62 parameter tensors in Python, and torch's "foreach" is a
# loop of per-tensor ops on CPU too (~67 ms of a ~0.55 s step at batch 256 on 2 cores); fused
# does one pass per tensor (~15-25 ms). CPU, CUDA and MPS all have it. Training only: the export
# swaps it for fastai's plain `Adam` (a partial is what the Hub's pickle scanner flags).
class LayoutSafeAdamW(torch.optim.AdamW):
    """torch's AdamW, each gradient and moment first put in its weight's memory layout where they
    differ. The fused CPU kernel walks weight, gradient and moments as flat memory, so with layouts
    that differ it updates the wrong entries, silently (torch 2.14: 0.017 off after two steps of a
    small kernel; tested): a channels-last moment of a weight `train/smallmaps.py` has laid out tap
    by tap (a checkpoint from before it did, resumed), or of one fastai's ChannelsLast turned.

    Weights laid out other than contiguously (channels-last, tap by tap) are then stepped as the flat
    memory they fill, each with its gradient and moments: the update is elementwise and all four share
    the layout, so it is the same update, but the fused kernel copies a non-contiguous tensor (~2 of
    ~11 ms for resnet18's parameters on 2 cores)."""

    @torch.no_grad()
    def step(self, closure=None):
        flattened = []  # (weight, its tensors as they were) for each weight stepped flat
        try:
            for group in self.param_groups:
                for p in group["params"]:
                    if p.dim() != 4:  # only 4-d tensors here have several layouts
                        continue
                    if p.grad is not None and p.grad.stride() != p.stride():
                        p.grad = torch.empty_like(p).copy_(p.grad)  # empty_like: the weight's own layout
                    state = self.state.get(p)
                    for name in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq") if state else ():
                        if name in state and state[name].stride() != p.stride():
                            state[name] = torch.empty_like(p).copy_(state[name])
                    # Not before the first step, which makes the moments in the weight's shape, nor with a
                    # closure, which runs the model (its weights must keep their shapes); CPU only, where
                    # the copies were measured (the layouts are the CPU's too)
                    if (state and p.grad is not None and closure is None and p.device.type == "cpu"
                            and _fills_its_memory(p)):
                        _step_flat(p, state, flattened)
            return super().step(closure)
        finally:  # also when stopped before the step (Ctrl-C, out of memory): every weight back in shape
            for p, data, grad, moments in flattened:
                p.grad = None
                p.data, p.grad = data, grad
                self.state[p].update(moments)


def _fills_its_memory(t: torch.Tensor) -> bool:
    """Whether `t` is laid out other than contiguously but fills one block of memory without gaps
    (channels-last, or any other order of its dimensions)."""
    if t.is_contiguous():
        return False
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _step_flat(p: torch.nn.Parameter, state: dict, undo: list) -> None:
    """Make `p`, its gradient and its moments flat views of their memory for one step, having first
    put in `undo` what puts them back (so that a stop at any point in between is undone too)."""
    def flat(t):
        return t.as_strided((t.numel(),), (1,))

    moments = {k: v for k, v in state.items() if torch.is_tensor(v) and v.shape == p.shape}
    data, grad = p.data, p.grad
    undo.append((p, data, grad, moments))
    p.grad = None  # a gradient must match the weight's shape when set
    p.data = flat(data)
    p.grad = flat(grad)
    state.update({k: flat(v) for k, v in moments.items()})


TORCH_ADAMW = partial(LayoutSafeAdamW, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01, fused=True)
ADAMW = partial(OptimWrapper, opt=TORCH_ADAMW)


class TrainError(RuntimeError):
    """Training cannot start; the message says why and what to do."""


def pick_device(name: str = "auto") -> torch.device:
    try:
        return _pick_device(name)
    except DeviceError as e:
        raise TrainError(str(e)) from None


# --------------------------------------------------------------------------- callbacks

class EpochLines(Callback):
    """One plain line per epoch, for logs and CI, instead of fastprogress's redraws (which write
    every bar update into a non-terminal: hundreds of kilobytes for one MNIST epoch)."""
    order = 61  # after Recorder has computed the epoch's values

    def __init__(self, write=print, total_epochs: int | None = None, prefix: str = ""):
        self.write, self.total, self.prefix = write, total_epochs, prefix

    def before_fit(self):
        self.old_logger, self.learn.logger = self.learn.logger, self._line

    def _line(self, log):
        names = self.recorder.metric_names
        if isinstance(log[0], str) or len(log) < len(names):  # the header, or an epoch skipped on --resume
            return
        parts = [f"epoch {log[0] + 1}/{self.n_epoch}"]
        for n, v in zip(names[1:], log[1:]):
            parts.append(f"{n} {v:.4f}" if isinstance(v, float) else f"{n} {v}")
        self.write(self.prefix + "  ".join(parts))

    def after_fit(self):
        self.learn.logger = self.old_logger


class Checkpoint(Callback):
    """After every epoch, save model + optimiser + position atomically (temp file, then rename),
    so Ctrl-C or a crash loses at most the epoch in progress. `state` (history, best epoch, patience
    count: train/runlog.py, train/stopping.py) goes into the same file."""
    order = 65

    def __init__(self, path: Path, phase: str, state: dict):
        self.path, self.phase, self.state = Path(path), phase, state

    def after_cancel_fit(self):
        # Early stopping cancels the fit in its after_epoch (order 63), before this one's: save the
        # finished epoch, and the stop, here.
        if self.state.get("stopped"):
            self.after_epoch()

    def after_epoch(self):
        if not epoch_ran(self.recorder):  # skipped on --resume: nothing new to save
            return
        metrics = dict(zip(self.recorder.metric_names[1:-1], self.recorder.log[1:-1]))
        self.state.setdefault("done", {})[self.phase] = self.epoch + 1
        self.state["metrics"] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        save_checkpoint(self.learn, self.path, self.state)


class KeepLastValidation(Callback):
    """Keeps the raw outputs and targets of the last epoch's validation pass, so that the export
    can score the model without running the validation set through it again (~6 s for MNIST on
    2 cores). Never exported: `fit` passes it per call, not to the Learner."""
    order = 60

    def before_validate(self):
        self.preds, self.targs = [], []
        self.last = self.epoch == self.n_epoch - 1
        self.n = len(self.dl.dataset)  # the whole validation set, on one process or several

    def after_batch(self):
        if self.training or not self.last:
            return
        self.preds.append(self.pred.detach().float().cpu())
        self.targs.append(self.yb[0].detach().cpu())

    def result(self):
        if not getattr(self, "last", False) or not self.preds:
            return None
        # on several processes each saw its share: the whole validation set's, in order
        return distributed.gather_in_order((torch.cat(self.preds), torch.cat(self.targs)), self.n)


def save_checkpoint(learn: Learner, path: Path, state: dict) -> None:
    if not distributed.is_main():
        return  # on several processes rank 0 writes (their models are equal), and every rank reads it back
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save({"model": distributed.unwrap(learn.model).state_dict(),  # the plain model's keys, not DDP's
                "opt": learn.opt.state_dict() if learn.opt is not None else None,
                "state": state}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); delete it and start again") from None


# --------------------------------------------------------------------------- learner

def loss_and_metrics(multi_label: bool, threshold: float = 0.5) -> tuple:
    """One label per image: cross-entropy and accuracy. Several (fastbook's chapter 6): a sigmoid
    per class (`BCEWithLogitsLossFlat`, whose `thresh` is what `learn.predict` decodes with),
    `accuracy_multi` and macro F1 at the threshold. The partial lives only while training: the
    export leaves the metrics out of the pickle (`train.export.export_learner`)."""
    if not multi_label:
        return CrossEntropyLossFlat(), [accuracy]
    return BCEWithLogitsLossFlat(thresh=threshold), [partial(accuracy_multi, thresh=threshold),
                                                     F1ScoreMulti(thresh=threshold, average="macro")]


def build_learner(dls, cfg, device: torch.device, workdir: Path, multi_label: bool = False) -> Learner:
    """resnet18 through `vision_learner`; ImageNet weights through fastai's normal path."""
    loss_func, metrics = loss_and_metrics(multi_label, cfg.threshold)
    try:
        learn = vision_learner(dls, resnet18, pretrained=cfg.pretrained, normalize=False,
                               loss_func=loss_func, opt_func=ADAMW, metrics=metrics, path=workdir, model_dir=".")
    except Exception as e:
        if not cfg.pretrained:
            raise
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise TrainError(f"could not load resnet18's ImageNet weights ({type(e).__name__}: {e}). Offline? Put "
                         f"{IMAGENET_WEIGHTS} in {hub} (any machine with internet fills that cache "
                         "on first use), or train from scratch without --pretrained") from None
    if cfg.init:
        init_body(learn, cfg.init)
    learn.model.to(device)
    if device.type == "cpu":
        learn.to_channelslast(use_amp=False)  # oneDNN's convolutions are ~1.4x faster in NHWC here
    # mixed where native, and on the CPU where timed faster (train/precision.py)
    apply_precision(learn, device, cfg.precision, batch_shape=(cfg.bs, 3, cfg.size, cfg.size))
    return learn


def init_body(learn: Learner, folder: str) -> None:
    """Copy the body (everything but the classifier head) of an exported model into `learn`."""
    from models.contract import load_model_folder, ModelFolderError
    try:
        source = load_model_folder(folder)
    except ModelFolderError as e:
        raise TrainError(f"--init: {e}") from None
    if source.metadata.arch != "resnet18":
        raise TrainError(f"--init: {folder} is a {source.metadata.arch}, not a resnet18")
    learn.model[0].load_state_dict(source.model[0].state_dict())
    learn.freeze()


def detach_training_callbacks(learn: Learner) -> None:
    """Remove what only training needs, so the exported pickle holds fastai built-ins only."""
    for name in ("checkpoint", "epoch_lines"):
        if hasattr(learn, name):
            learn.remove_cb(getattr(learn, name))
    if hasattr(learn, "channels_last"):
        learn.to_contiguous(to_fp32=True)
    remove_precision(learn)
    learn.logger = print


# --------------------------------------------------------------------------- fitting

@dataclass
class Phase:
    name: str
    epochs: int
    lr: object        # float or slice (discriminative rates when unfrozen after a frozen phase)
    frozen: bool
    pct_start: float
    div: float = 25.0


def plan_phases(cfg, lr: float) -> list[Phase]:
    if cfg.pretrained or cfg.init:
        # Exactly `Learner.fine_tune(epochs, lr)`: train the new head for one epoch on a frozen
        # body, then everything at half the rate, earlier layers 100x lower.
        return [Phase("frozen", 1, slice(lr), True, 0.99),
                Phase("unfrozen", cfg.epochs, slice(lr / 2 / 100, lr / 2), False, 0.3, div=5.0)]
    return [Phase("scratch", cfg.epochs, lr, False, 0.25)]


def find_lr(learn: Learner, quiet: bool) -> float:
    """fastai's `lr_find`, run quietly; returns its 'valley' suggestion."""
    with learn.no_bar() if quiet or not sys.stdout.isatty() else contextlib.nullcontext(), _shortcuts(learn):
        suggestion = learn.lr_find(show_plot=False)
    return float(suggestion.valley)


def _shortcuts(learn: Learner):
    # Measured on CPU only (oneDNN); cuDNN and MPS keep their own convolutions.
    return small_map_convs(learn.model, enabled=next(learn.model.parameters()).device.type == "cpu")


# What a checkpoint's state carries into the resumed run: epochs done per phase, the history rows,
# the best epoch (and its weights with --patience), the patience count, and whether it stopped.
RESUMED_STATE = ("done", "history", "best", "wait", "stopped")


def fit(learn: Learner, phases: list[Phase], ckpt_path: Path, state: dict, quiet: bool = False,
        resume_from: dict | None = None, patience: int = 0) -> tuple[float, tuple | None]:
    """Run the phases, checkpointing each epoch; with `patience`, stop when the validation loss has
    not improved for that many epochs and end with the best epoch's weights (train/stopping.py).
    `state["history"]` gets one row per epoch. Returns the seconds spent fitting, and the validation
    (raw outputs, targets) of the weights the learner ends with, or None when it has none of them
    (no epoch left to run, or the best epoch's weights restored)."""
    quiet = quiet or not distributed.is_main()  # on several processes rank 0 alone reports
    interactive = sys.stdout.isatty() and not quiet
    if not interactive and hasattr(learn, "progress"):
        learn.remove_cb(ProgressCallback)
    done = dict((resume_from or {}).get("done", {}))
    state.setdefault("history", [])
    t0 = time.perf_counter()
    keep, first = None, 1
    for phase in phases:
        start, phase_first = done.get(phase.name, 0), first
        first += phase.epochs
        if start >= phase.epochs or state.get("stopped"):
            continue
        learn.freeze() if phase.frozen else learn.unfreeze()
        keep = KeepLastValidation()
        cbs = [Checkpoint(ckpt_path, phase.name, state), keep, History(state["history"], phase.name, phase_first),
               BestEpoch(state, keep_weights=patience > 0)]
        if patience:
            cbs.append(Patience(patience, state, write=noop if quiet else print))
        if phase is phases[-1]:
            cbs.append(PreciseBatchNorm())  # before the last epoch's validation (train/precisebn.py)
        if quiet:
            learn.logger = noop
        elif not interactive:
            cbs.append(EpochLines(prefix=f"[{phase.name}] " if len(phases) > 1 else ""))
        if start:
            log.info("resuming phase %s at epoch %d/%d", phase.name, start + 1, phase.epochs)
        with _shortcuts(learn), distributed.distrib_ctx(learn):  # each rank trains on its share (if several)
            learn.fit_one_cycle(phase.epochs, phase.lr, pct_start=phase.pct_start, div=phase.div,
                                start_epoch=start, cbs=cbs)
        learn.logger = print
    if restore_best(learn, state):
        keep = None
    return time.perf_counter() - t0, (keep.result() if keep else None)
