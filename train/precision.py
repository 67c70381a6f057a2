"""Mixed precision for training: bf16 on CPUs that compute it natively, fp16/bf16 on CUDA.

fastai's `to_fp16`/`to_bf16` (MixedPrecision) opens `torch.autocast('cuda')` only, so on the CPU
we open `torch.autocast('cpu', bfloat16)` ourselves, around the training batches' forward pass and
loss. The weights, their gradients and the optimiser's state stay fp32 (autocast casts per op), so
checkpoints and the export are unchanged. The last epoch's validation runs in fp32, and with
`--patience` every epoch's: the metrics, the best-epoch choice and the outputs the export reuses are
those of the weights as served. The earlier epochs' rows of history.csv are validated in bf16.

On a 2-core AMD EPYC with AVX512-BF16 (the development machine), an epoch of resnet18 on MNIST at
batch 256 went from 43 to 29 s (1.48x); validation accuracy after 2 epochs 99.25% against 99.28%. Without native bf16 (no AVX512-BF16 nor AMX) the
same ops are emulated and slower than fp32, so `auto` keeps fp32 there. The flag is not proof of
speed (on an Intel Xeon with AVX512-BF16 but no AMX exposed, bf16 steps were slower: README, CPU
and GPU), so where it says native, `auto` first times a few training steps of the model on a batch
of the run's shape in each (`step_seconds`, ~3 s at MNIST's batch 256) and takes bf16 only where it
is clearly faster; with AMX's matrix tiles (`cpu_has_amx`) it takes bf16 untimed.
"""
from __future__ import annotations

import logging

import torch
from fastai.callback.core import Callback
from fastai.callback.tracker import EarlyStoppingCallback
from fastai.learner import Learner

from train import distributed
from train.timing import fastest_seconds

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32")
# bf16 must make a step at least this much faster to be taken: it costs a few hundredths of a
# point of accuracy (README, Benchmarks), and two timings of the same kernels differ by a few percent.
MIN_SPEEDUP = 1.1


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN can run bf16 convolutions and matmuls in hardware (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    try:
        return torch.backends.mkldnn.is_available() and (cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes: assume not
        return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX's bf16 matrix tiles and the OS lets this process use them. There bf16
    is not timed against fp32 (~2 s of a run): its products run in the tiles, fp32's in AVX-512,
    and a batch-256 MNIST step at 36 px took 151 ms against 347 ms (2-core Intel Xeon, Emerald
    Rapids). Timing is for AVX512-BF16 alone, which was slower than fp32 on one such Xeon."""
    cpu = torch.cpu
    try:
        return torch.backends.mkldnn.is_available() and cpu._is_amx_tile_supported() and cpu._init_amx()
    except AttributeError:  # a torch without these probes: assume not
        return False


class CpuMixedPrecision(Callback):
    """`torch.autocast('cpu', bfloat16)` around each training batch's forward pass and loss, and each
    validation batch's but those of a phase's last epoch, or of any epoch when a patience picks the
    epoch to keep by its validation loss: those run in fp32, the numbers of the weights as served."""
    order = 10  # where fastai's MixedPrecision sits: before the loss, after the batch is on its device
    _mixed_validation = False

    def before_fit(self):
        self._mixed_validation = False  # (get_preds and validate, the export's scoring, fire before_fit too)

    def before_train(self):
        # Decided with the epoch's training, which a pass of get_preds or validate never has: those
        # run in fp32. The other epochs' validation only fills history.csv, and fastai's
        # MixedPrecision validates under autocast too. In bf16 MNIST's 10,000 digits took 1.4 s at
        # 36 px (fp32: 3.7 s; at 28 px 0.7 s against 1.9 s) on 2 cores of an Intel Xeon with AMX.
        stopping = any(isinstance(cb, EarlyStoppingCallback) for cb in self.learn.cbs)
        self._mixed_validation = self.epoch < self.n_epoch - 1 and not stopping

    def after_epoch(self):
        self._mixed_validation = False

    def before_batch(self):
        mixed = self.training or self._mixed_validation
        self._autocast = torch.autocast("cpu", dtype=torch.bfloat16) if mixed else None
        if self._autocast is not None:
            self._autocast.__enter__()

    def after_pred(self):
        if self._autocast is not None:  # the loss (and the recorded outputs) in fp32
            self.learn.pred = self.learn.pred.float()

    def after_loss(self):
        self._exit()

    def after_cancel_batch(self):  # a batch stopped early must not leave autocast on
        self._exit()

    def _exit(self):
        if getattr(self, "_autocast", None) is not None:
            self._autocast.__exit__(None, None, None)
            self._autocast = None


def apply_precision(learn: Learner, device: torch.device, precision: str = "auto",
                    batch_shape: tuple[int, ...] | None = None) -> None:
    """Set the learner's training precision (`precision`: one of PRECISIONS); `precision_of` says
    which it got. On a CPU with native bf16, `batch_shape` (batch, channels, height, width) is what
    bf16 is timed on against fp32 before it is taken; without one it is taken on the flag alone."""
    if precision == "fp32" or device.type not in ("cpu", "cuda"):
        return  # MPS: fastai's MixedPrecision is CUDA-only, and ours CPU-only
    if device.type == "cuda":
        # bf16 needs no loss scaling (fp32's range)
        learn.to_bf16() if torch.cuda.is_bf16_supported() else learn.to_fp16()
    else:
        # Rank 0 decides alone and every rank of a launched run takes its verdict, CPUs alike or not:
        # the others wait rather than time steps on the cores rank 0 is timing on, and rank 0's
        # error (out of memory at a large batch) stops them at once instead of at the timeout.
        def decide():
            if not cpu_has_native_bf16():
                return False
            if batch_shape is None:
                return True
            if cpu_has_amx():
                log.info("precision auto: this CPU multiplies bf16 in AMX tiles; training in bf16 mixed "
                         "precision (not timed)")
                return True
            return bf16_pays_off(learn, batch_shape)
        if distributed.from_rank0(decide):
            learn.add_cb(CpuMixedPrecision())


def bf16_pays_off(learn: Learner, batch_shape: tuple[int, ...]) -> bool:
    """Whether a training step of `learn`'s model is at least MIN_SPEEDUP times faster under bf16
    autocast than in fp32, as timed here."""
    if hasattr(learn, "channels_last"):  # time the layout it trains in (fastai converts at before_fit)
        learn.model.to(memory_format=torch.channels_last)
    from train.smallmaps import small_map_convs  # and with the shortcuts fit() trains with
    with small_map_convs(learn.model):
        seconds = step_seconds(learn.model, batch_shape)
    faster = seconds["fp32"] >= MIN_SPEEDUP * seconds["bf16"]
    log.info("precision auto: a training step (forward, backward, AdamW) of batch %d took %.0f ms in bf16 "
             "and %.0f ms in fp32 here; training in %s", batch_shape[0], 1000 * seconds["bf16"], 1000 * seconds["fp32"],
             "bf16 mixed precision" if faster else "fp32")
    return faster


def step_seconds(model: torch.nn.Module, batch_shape: tuple[int, ...], steps: int = 2) -> dict[str, float]:
    """Seconds per training step of `model` on the CPU on a random batch of `batch_shape`, in fp32
    and under bf16 autocast: forward, backward and a fused AdamW step (the optimiser training
    uses: its cost is the same in both, and a whole step is what the speed-up is of). The fastest
    of `steps` each, taken in turns after one untimed each (oneDNN picks and caches its kernels on
    the first). Every parameter is timed as trainable: a frozen body (`--pretrained`, `--init`)
    trains unfrozen after its first epoch, and its weight gradients are where bf16 gains or loses
    most. The model is left as found: weights, BatchNorm statistics, `requires_grad` and each
    module's train/eval mode restored, gradients cleared, torch's random state untouched, so a
    seeded run trains the same with or without this."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [(m, m.training) for m in model.modules()]
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    model.train()
    for p, _ in trainable:
        p.requires_grad_(True)
    from train.learner import TORCH_ADAMW  # the optimiser fit() trains with (learner imports this module)
    opt = TORCH_ADAMW(model.parameters(), lr=1e-3)
    try:
        with torch.random.fork_rng(devices=[]):
            x = torch.randn(batch_shape).contiguous(memory_format=torch.channels_last)

            def step(bf16: bool) -> None:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = model(x)
                out.float().sum().backward()  # any scalar: the backward pass costs the same
                opt.step()
                opt.zero_grad(set_to_none=True)
            return fastest_seconds({"fp32": lambda: step(False), "bf16": lambda: step(True)}, steps)
    finally:
        model.zero_grad(set_to_none=True)
        for p, requires_grad in trainable:
            p.requires_grad_(requires_grad)
        model.load_state_dict(saved)  # copies into the tensors in place, their layout kept
        for m, training in modes:
            m.training = training


def precision_of(learn: Learner) -> str:
    """What the learner trains in: 'bf16', 'fp16' or 'fp32' (for metadata.json and the card)."""
    if any(isinstance(cb, CpuMixedPrecision) for cb in learn.cbs):
        return "bf16"
    mixed = getattr(learn, "mixed_precision", None)
    return mixed.amp_mode.value if mixed is not None else "fp32"


def remove_precision(learn: Learner) -> None:
    """Back to plain fp32 for the export (the pickle holds fastai built-ins only)."""
    for cb in [cb for cb in learn.cbs if isinstance(cb, CpuMixedPrecision)]:
        learn.remove_cb(cb)
    if hasattr(learn, "mixed_precision"):
        learn.to_fp32()
