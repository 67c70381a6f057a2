"""The article's lessons as a runnable module: from gradient descent by hand to fastai's Learner.

A binary classifier for two MNIST digits (by default 5 = 1 versus 4 = 0, as in the article),
trained six ways, each one small step from the one before:

1. linear-fullbatch       `x@weights + bias`, one hand-written SGD step per epoch on all images
2. linear-minibatch       the same model from the same start, a shuffled batch of 256 per step
3. linear-nn              the same with `nn.Linear(28*28, 1)`
4. simple-net-manual      two layers written by hand: `x@w1 + b1`, ReLU, `@w2 + b2` (30 hidden)
5. simple-net-sequential  the same as `nn.Sequential`, stepped by fastai's `SGD` optimiser
6. simple-net-learner     the same net trained by fastai's `Learner(...).fit(20, lr)`

Each stage is validated on the MNIST `testing` images of the two digits and prints one line:
stage, model, epochs, parameter updates, seconds (training only; see `run_stage`) and accuracy.

Run (MNIST from MNIST_DIR or `--mnist-dir`, else fastai's download; see train/mnist.py):

    python -m train.sgd                          # all six stages, 5 versus 4
    python -m train.sgd --digits 3 7 --json      # 3 = 1, 7 = 0; one JSON object per line
    python -m train.sgd --stages linear-fullbatch linear-minibatch --seed 1

Fixes to the article's lines (each also noted where it is made):
- names: the article defines `x` and then uses `train_x`; here each tensor has one name
  (`DigitData.train_x` etc.), and `linear1`/`simple_net` take their parameters as arguments
  instead of reading globals, so the stages cannot leak state into each other.
- targets are a column (`unsqueeze(1)`): predictions are (N, 1), and `torch.where` against (N,)
  targets would silently broadcast to (N, N) and train on nonsense.
- init and learning rates: see `Config`; the article's std-1 init saturates the sigmoid.
- mini-batches come from `ShuffledLoader`, not torch's or fastai's `DataLoader`, except in the
  Learner stage: see `ShuffledLoader` for why.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models.cli import positive_int, seed_int
from train.mnist import MnistArrays, MnistError, find_mnist

__all__ = ["STAGES", "Config", "DigitData", "load_digits", "init_params", "mnist_loss",
           "batch_accuracy", "Pairs", "ShuffledLoader", "hand_sgd_step", "run_stage",
           "minibatch_time_to_accuracy", "run", "main"]

STAGES = ("linear-fullbatch", "linear-minibatch", "linear-nn",
          "simple-net-manual", "simple-net-sequential", "simple-net-learner")
IMAGE_PIXELS = 28 * 28
RESULT_KEYS = ("stage", "model", "epochs", "updates", "seconds", "accuracy")


@dataclass(frozen=True)
class Config:
    """Settings shared by the stages.

    Init and learning rates, and why (the issue measured the article's randn init, std 1, with
    lr 1.0 at only 57% on 5 versus 4 after 2 mini-batch epochs; seed 42 here gives 90%):
    - std 1 makes each logit a sum of ~147 inked pixels times N(0, 1) weights: |logit| ~ 7.5 on
      average, where the sigmoid is nearly flat (median slope p(1-p) 0.0016, against 0.25 at 0),
      so `mnist_loss` barely moves the weights of most images. `linear_std` 0.01 starts every
      logit near 0, where the slope is largest, and 2 epochs then reach ~99%.
    - `mnist_loss` is a mean of probabilities, so its gradients are small (slope <= 0.25, times
      pixel values in [0, 1], averaged over the batch): lr 1.0 is a moderate step for it. From 0.5
      to 3.0 the accuracies differ by under half a point; at 0.1, 2 epochs reach only 97.5%.
    - the net's weights use He init (std sqrt(2 / fan_in)), which keeps the ReLU layer's output on
      the scale of its input instead of saturating the sigmoid as std 1 does. `net_lr` 0.1
      (fastbook's for this net) gives ~99.3% in 20 epochs; 0.01 gives ~98.3%, too close to 97.5%.
    """
    seed: int = 42
    batch_size: int = 256
    hidden: int = 30                  # hidden units of the two-layer net, as in the article
    linear_std: float = 0.01          # init std of the linear model's weights and bias
    linear_lr: float = 1.0
    net_lr: float = 0.1
    epochs: dict[str, int] = field(default_factory=lambda: {
        "linear-fullbatch": 100, "linear-minibatch": 2, "linear-nn": 2,
        "simple-net-manual": 20, "simple-net-sequential": 20, "simple-net-learner": 20})


@dataclass
class DigitData:
    """Two digits as the article's tensors: x (N, 784) float in [0, 1], y (N, 1) int, 1 = first digit."""
    digits: tuple[int, int]
    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor


# ---------------------------------------------------------------- data

def _arrays_for(images: np.ndarray, labels: np.ndarray, digit: int) -> np.ndarray:
    return images[labels == digit]


def _pngs_for(folder: Path, digit: int) -> np.ndarray:
    """The digit's PNGs in `folder/<digit>/`, sorted by name so the order (and the seed) is stable."""
    from PIL import Image
    files = sorted((folder / str(digit)).glob("*.png"))
    if not files:
        raise MnistError(f"no PNG images in {folder / str(digit)}")
    return np.stack([np.asarray(Image.open(f).convert("L")) for f in files])


def _stack_pair(first: np.ndarray, second: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The article's stacking: float / 255, flattened to 784; targets 1 for `first`, 0 for `second`."""
    stacked = [torch.from_numpy(np.ascontiguousarray(a)).float() / 255 for a in (first, second)]
    x = torch.cat(stacked).view(-1, IMAGE_PIXELS)
    # Fix: a column, like the predictions. The article's `tensor([1]*n + [0]*m)` without
    # `.unsqueeze(1)` makes `torch.where(targets==1, 1-p, p)` broadcast (N,1) against (N,) to (N,N).
    y = torch.tensor([1] * len(first) + [0] * len(second)).unsqueeze(1)
    return x, y


def load_digits(source: Path | MnistArrays, digits: tuple[int, int]) -> DigitData:
    """The two digits' training and `testing` images from `find_mnist()`'s folder or arrays."""
    a, b = digits
    if isinstance(source, MnistArrays):
        train = [_arrays_for(source.train_images, source.train_labels, d) for d in digits]
        valid = [_arrays_for(source.valid_images, source.valid_labels, d) for d in digits]
    else:
        train = [_pngs_for(Path(source) / "training", d) for d in digits]
        valid = [_pngs_for(Path(source) / "testing", d) for d in digits]
    for d, n in zip(digits, (len(t) for t in train)):
        if n == 0:
            raise MnistError(f"no training images of digit {d} in {getattr(source, 'source', source)}")
    # Fix: the article builds `x` and trains on `train_x`; one name each here.
    train_x, train_y = _stack_pair(*train)
    valid_x, valid_y = _stack_pair(*valid)
    return DigitData((a, b), train_x, train_y, valid_x, valid_y)


class Pairs(Sequence):
    """The article's `dset = list(zip(x, y))`: item i is the pair (x[i], y[i]).

    It keeps x and y whole instead of 11,263 Python tuples, so that a batch is one
    `index_select` rather than 256 items stacked one by one (see `ShuffledLoader`).
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        assert len(x) == len(y), (x.shape, y.shape)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return list(zip(self.x[i], self.y[i]))
        return self.x[i], self.y[i]


class ShuffledLoader:
    """The article's `DataLoader(dset, batch_size=256, shuffle=True)` for `Pairs`.

    Same batches as torch's or fastai's DataLoader: a fresh shuffle each epoch (from torch's
    global RNG, so the seed fixes it) and a smaller last batch. Why not theirs: they collate
    each batch from 256 separate (x, y) items. For 2 epochs of 5 versus 4 (88 batches) that
    took ~0.07 s on 2 cores, against ~0.01 s here and ~0.02 s for the 88 model steps, and it
    would bury the lesson that mini-batches reach full-batch accuracy in a fraction of the time.
    """

    def __init__(self, dset: Pairs, batch_size: int = 64, shuffle: bool = False):
        self.dset, self.batch_size, self.shuffle = dset, batch_size, shuffle

    def __len__(self) -> int:
        return -(-len(self.dset) // self.batch_size)  # ceil: the last, smaller batch counts

    def __iter__(self):
        n = len(self.dset)
        order = torch.randperm(n) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            # index_select: a few times faster than x[idx] (advanced indexing) for 256 rows here
            yield self.dset.x.index_select(0, idx), self.dset.y.index_select(0, idx)


# ---------------------------------------------------------------- the article's functions

def init_params(size, std: float = 1.0) -> torch.Tensor:
    """The article's init: `randn(size) * std`, tracked by autograd."""
    return (torch.randn(size) * std).requires_grad_()


def mnist_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The article's loss: mean distance of sigmoid(prediction) from the target (1 or 0)."""
    predictions = predictions.sigmoid()
    return torch.where(targets == 1, 1 - predictions, predictions).mean()


def batch_accuracy(xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """The article's metric: the share of sigmoid(prediction) > 0.5 that match the 1/0 target."""
    preds = xb.sigmoid()
    correct = (preds > 0.5) == yb
    return correct.float().mean()


def hand_sgd_step(params, lr: float) -> None:
    """The article's step: move each parameter against its gradient, then zero the gradient."""
    for p in params:
        p.data -= p.grad * lr  # .data: an update autograd must not record
        p.grad.zero_()


def linear1(xb: torch.Tensor, weights: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    # The article's linear1 reads global weights/bias; passed in here so stages don't share state.
    return xb @ weights + bias


def simple_net(xb: torch.Tensor, w1, b1, w2, b2) -> torch.Tensor:
    """The article's two-layer net, written by hand (its globals passed in, as in `linear1`)."""
    res = xb @ w1 + b1
    res = res.max(torch.tensor(0.0))  # ReLU, as the article writes it
    return res @ w2 + b2


# ---------------------------------------------------------------- starts (the same for every stage)

def linear_start(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights (784, 1) and bias (1,), seeded: stages 1-3 start from these same numbers."""
    torch.manual_seed(cfg.seed)
    return init_params((IMAGE_PIXELS, 1), cfg.linear_std), init_params(1, cfg.linear_std)


def net_start(cfg: Config) -> tuple[torch.Tensor, ...]:
    """w1 (784, hidden), b1, w2 (hidden, 1), b2, seeded: stages 4-6 start from these.

    He init (std sqrt(2 / fan_in)) for the weights; biases small (std 0.01) like the linear model.
    """
    torch.manual_seed(cfg.seed)
    w1 = init_params((IMAGE_PIXELS, cfg.hidden), (2 / IMAGE_PIXELS) ** 0.5)
    b1 = init_params(cfg.hidden, 0.01)
    w2 = init_params((cfg.hidden, 1), (2 / cfg.hidden) ** 0.5)
    b2 = init_params(1, 0.01)
    return w1, b1, w2, b2


def linear_module(weights: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    """`nn.Linear(fan_in, fan_out)` holding the given start (it stores its weight transposed)."""
    model = nn.Linear(*weights.shape)
    with torch.no_grad():
        model.weight.copy_(weights.T)
        model.bias.copy_(bias)
    return model


def sequential_net(w1, b1, w2, b2) -> nn.Sequential:
    """The article's `nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 1))`, from this start."""
    return nn.Sequential(linear_module(w1, b1), nn.ReLU(), linear_module(w2, b2))


# ---------------------------------------------------------------- stages

def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's RNGs: fastai's DataLoader draws its shuffles from `random`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def accuracy(predict, data: DigitData) -> float:
    with torch.no_grad():
        return float(batch_accuracy(predict(data.valid_x), data.valid_y))


def train_loader(data: DigitData, cfg: Config) -> ShuffledLoader:
    seed_everything(cfg.seed)  # the same shuffles for every mini-batch stage
    return ShuffledLoader(Pairs(data.train_x, data.train_y), batch_size=cfg.batch_size, shuffle=True)


def fit_by_hand(model, params, dl, epochs: int, lr: float, step=None, until=None) -> tuple[int, float]:
    """The article's `train_model`: per batch, loss, backward, step. Returns (updates, seconds).

    `step` is a callable doing one update (default: `hand_sgd_step(params, lr)`). `until`, if
    given, is asked after each epoch, with the clock stopped, whether to stop early.
    """
    step = step or (lambda: hand_sgd_step(params, lr))
    updates, seconds = 0, 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        for xb, yb in dl:
            mnist_loss(model(xb), yb).backward()
            step()
            updates += 1
        seconds += time.perf_counter() - start
        if until is not None and until():
            break
    return updates, seconds


def minibatch_time_to_accuracy(data: DigitData, cfg: Config, target: float) -> dict:
    """`linear-minibatch` again, stopping after the first epoch whose validation accuracy is >= `target`.

    The clock stops while validating, so `seconds` is training time only, as in `run_stage`.
    A dict with `RESULT_KEYS`; its accuracy is below `target` if the stage's epochs never got there.
    """
    weights, bias = linear_start(cfg)
    dl = train_loader(data, cfg)
    model = lambda x: linear1(x, weights, bias)  # noqa: E731
    reached = lambda: accuracy(model, data) >= target  # noqa: E731
    updates, seconds = fit_by_hand(model, (weights, bias), dl, cfg.epochs["linear-minibatch"],
                                   cfg.linear_lr, until=reached)
    return {"stage": "linear-minibatch", **_result("linear", -(-updates // len(dl)), updates, seconds,
                                                   accuracy(model, data))}


def stage_linear_fullbatch(data: DigitData, cfg: Config, epochs: int) -> dict:
    weights, bias = linear_start(cfg)
    # The whole training set is the one batch: one update per epoch.
    whole = [(data.train_x, data.train_y)]
    updates, seconds = fit_by_hand(lambda x: linear1(x, weights, bias), (weights, bias), whole,
                                   epochs, cfg.linear_lr)
    return _result("linear", epochs, updates, seconds, accuracy(lambda x: linear1(x, weights, bias), data))


def stage_linear_minibatch(data: DigitData, cfg: Config, epochs: int) -> dict:
    weights, bias = linear_start(cfg)
    dl = train_loader(data, cfg)
    updates, seconds = fit_by_hand(lambda x: linear1(x, weights, bias), (weights, bias), dl,
                                   epochs, cfg.linear_lr)
    return _result("linear", epochs, updates, seconds, accuracy(lambda x: linear1(x, weights, bias), data))


def stage_linear_nn(data: DigitData, cfg: Config, epochs: int) -> dict:
    model = linear_module(*linear_start(cfg))
    dl = train_loader(data, cfg)
    updates, seconds = fit_by_hand(model, list(model.parameters()), dl, epochs, cfg.linear_lr)
    return _result("nn.Linear(784, 1)", epochs, updates, seconds, accuracy(model, data))


def stage_simple_net_manual(data: DigitData, cfg: Config, epochs: int) -> dict:
    params = net_start(cfg)
    dl = train_loader(data, cfg)
    updates, seconds = fit_by_hand(lambda x: simple_net(x, *params), params, dl, epochs, cfg.net_lr)
    return _result(f"x@w1+b1, ReLU, @w2+b2 ({cfg.hidden} hidden)", epochs, updates, seconds,
                   accuracy(lambda x: simple_net(x, *params), data))


def stage_simple_net_sequential(data: DigitData, cfg: Config, epochs: int) -> dict:
    from fastai.optimizer import SGD
    net = sequential_net(*net_start(cfg))
    opt = SGD(net.parameters(), cfg.net_lr)
    dl = train_loader(data, cfg)

    def step():  # fastai's optimiser replaces hand_sgd_step
        opt.step()
        opt.zero_grad()

    updates, seconds = fit_by_hand(net, None, dl, epochs, cfg.net_lr, step=step)
    return _result(f"nn.Sequential + fastai SGD ({cfg.hidden} hidden)", epochs, updates, seconds,
                   accuracy(net, data))


def stage_simple_net_learner(data: DigitData, cfg: Config, epochs: int) -> dict:
    """fastai end to end: its DataLoader over `list(zip(x, y))`, DataLoaders, Learner, SGD.

    Seconds is `fit` as a whole, which also validates after each epoch (fastai always does).
    """
    import fastai.callback.progress  # noqa: F401  (adds Learner.no_bar)
    from fastai.data.core import DataLoaders
    from fastai.data.load import DataLoader
    from fastai.learner import Learner
    from fastai.optimizer import SGD
    net = sequential_net(*net_start(cfg))
    seed_everything(cfg.seed)  # fastai's DataLoader seeds its shuffles from Python's `random`
    dset = list(zip(data.train_x, data.train_y))
    valid_dset = list(zip(data.valid_x, data.valid_y))
    dl = DataLoader(dset, batch_size=cfg.batch_size, shuffle=True)
    valid_dl = DataLoader(valid_dset, batch_size=cfg.batch_size)
    learn = Learner(DataLoaders(dl, valid_dl), net, opt_func=SGD, loss_func=mnist_loss,
                    metrics=batch_accuracy)
    start = time.perf_counter()
    with learn.no_bar(), learn.no_logging():  # one line per stage, not fastai's per-epoch table
        learn.fit(epochs, cfg.net_lr)
    seconds = time.perf_counter() - start
    return _result(f"Learner(nn.Sequential, SGD) ({cfg.hidden} hidden)", epochs, learn.train_iter,
                   seconds, accuracy(net, data))


STAGE_FUNCS = {
    "linear-fullbatch": stage_linear_fullbatch,
    "linear-minibatch": stage_linear_minibatch,
    "linear-nn": stage_linear_nn,
    "simple-net-manual": stage_simple_net_manual,
    "simple-net-sequential": stage_simple_net_sequential,
    "simple-net-learner": stage_simple_net_learner,
}


def _result(model: str, epochs: int, updates: int, seconds: float, acc: float) -> dict:
    return {"model": model, "epochs": epochs, "updates": updates, "seconds": seconds, "accuracy": acc}


def run_stage(name: str, data: DigitData, cfg: Config | None = None) -> dict:
    """Train one stage from its seeded start; a dict with exactly `RESULT_KEYS`.

    `seconds` is the training loop's wall time (data preparation and the final validation
    excluded), except `simple-net-learner`, where it is `Learner.fit`'s.
    """
    cfg = cfg or Config()
    if name not in STAGE_FUNCS:
        raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    result = STAGE_FUNCS[name](data, cfg, cfg.epochs[name])
    return {"stage": name, **result}


def run(data: DigitData, cfg: Config, stages=STAGES, emit=print, as_json: bool = False) -> list[dict]:
    """Run `stages` in order, emitting one line each as it finishes."""
    results = []
    for name in stages:
        result = run_stage(name, data, cfg)
        emit(format_result(result, as_json))
        results.append(result)
    return results


def format_result(r: dict, as_json: bool = False) -> str:
    if as_json:
        return json.dumps({k: r[k] for k in RESULT_KEYS})
    return (f"{r['stage']:<22} {r['model']:<46} epochs {r['epochs']:>3}  updates {r['updates']:>5}  "
            f"{r['seconds']:7.3f} s  accuracy {r['accuracy']:.4f}")


# ---------------------------------------------------------------- command line

def digit(text: str) -> int:
    """argparse type: one MNIST digit, 0 to 9."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a digit 0-9") from None
    if not 0 <= value <= 9:
        raise argparse.ArgumentTypeError(f"{value} is not a digit 0-9")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m train.sgd", description=__doc__.split("\n\n")[0])
    p.add_argument("--digits", nargs=2, type=digit, default=[5, 4], metavar=("ONE", "ZERO"),
                   help="the two digits; the first is class 1 (default: 5 4)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), metavar="STAGE",
                   help=f"stages to run, in this order (default: all): {', '.join(STAGES)}")
    p.add_argument("--seed", type=seed_int, default=Config.seed, help="seed for every start and shuffle")
    p.add_argument("--json", action="store_true", help="one JSON object per stage instead of text")
    p.add_argument("--threads", type=positive_int, default=1,
                   help="torch CPU threads (default 1: these models are tiny, and spare cores keep "
                        "timings steady on a shared machine)")
    p.add_argument("--mnist-dir", help="MNIST folder (default: MNIST_DIR, else fastai's download)")
    args = p.parse_args(argv)
    if args.digits[0] == args.digits[1]:
        p.error(f"--digits needs two different digits, got {args.digits[0]} twice")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # fastai imports torch.jit.script, deprecated in this torch: noise, not news, for this tool
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
    torch.set_num_threads(args.threads)
    try:
        data = load_digits(find_mnist(args.mnist_dir), tuple(args.digits))
    except MnistError as e:
        sys.exit(f"error: {e}")
    cfg = replace(Config(), seed=args.seed)
    run(data, cfg, args.stages, emit=lambda line: print(line, flush=True), as_json=args.json)


if __name__ == "__main__":
    main()
