"""The one training config: a dataclass the command line fills and every stage reads.

It is saved, resolved, into each checkpoint, so that `--resume` can check it is continuing the same
run, and into the model's metadata.json with each path cut to its name (`as_portable_dict`), so a
model says how it was made without saying where on this machine.
"""
from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from models.cli import fraction, non_negative_int, number, positive_int, seed_int

# MNIST defaults, from runs on 2-core CPUs (bench/train_mnist.py; every measurement is in README,
# Benchmarks, "MNIST's defaults against the article"). Three epochs of one-cycle at batch 256, lr 0.02,
# with batch augmentation (small rotations, zoom, warp, lighting; no flips), at 36 px: the digits are
# resized from 28 so that resnet18's maps after the stem are 9, 5, 3 and 2 px wide, not 7, 4, 2 and 1,
# and layer4's 3x3 kernels see 2x2 maps instead of using their centre tap alone. For issue 14's
# >= 99.5% within the article's time: 99.53% (median of seeds 42, 1, 2) at 0.94-1.00 of its time on
# an Intel Xeon with AMX. At 28 px three epochs gave 99.36-99.45% on every machine, four 99.50% on
# average, five and six no more; some thirty variants of lr, batch, weight decay, dropout, label
# smoothing and augmentation moved nothing beyond the seed noise (+-0.06 point a run).
# One epoch favours more, smaller steps, no augmentation and 28 px: batch 128 at lr 0.008 in fp32
# gives 99.0 +- 0.1% (batch 256: 98.83-98.99%; lr 0.01: 98.85-98.95%; bf16: 98.87% at seed 42), so a
# one-epoch run gets MNIST_ONE_EPOCH's settings unless they are given.
MNIST_DEFAULTS = dict(epochs=3, lr=0.02, bs=256, size=36, augment=True)
MNIST_ONE_EPOCH = dict(lr=0.008, bs=128, size=28, augment=False, precision="fp32")
# Photo folders: 224 px is what ImageNet weights expect; from scratch 128 px keeps a CPU run short.
PHOTO_DEFAULTS = dict(epochs=5, lr=None, bs=64, size=None, augment=True)
# Early stopping, off for both: one-cycle's rate peaks early in the run and anneals to the end, so the
# validation loss of a short fixed schedule (MNIST's 3 epochs, photos' 5) often rises mid-run and is
# lowest in the last epoch; a patience would stop such a run at its noisiest point. It pays with a
# budget longer than the data needs (--epochs 30 --patience 3). A source's defaults above may set
# `patience` to override this.
DEFAULT_PATIENCE = 0
# Fields holding a path of this machine: resolved (absolute) in the config, their names only in metadata.json.
PATH_FIELDS = ("source", "out", "init", "mnist_dir", "cache_dir", "labels")
# What `--resume` must find as the checkpoint has it: each changes the data, the split, the start or the
# schedule (a new --seed or --valid-pct re-splits an unsplit folder, so images already trained on would be
# validated on). --device, --precision, --workers and --quiet change how the run goes, not what it computes, and are free.
RESUME_FIXED = ("source", "out", "mnist_dir", "pretrained", "init", "size", "bs", "epochs", "valid_pct", "seed",
                "augment", "flip", "labels", "file_col", "label_col", "label_delim", "threshold", "patience")


@dataclass
class TrainConfig:
    source: str                      # 'mnist' or a folder of class folders
    out: str = ""                    # model folder to write; default models/<source name>
    epochs: int = 0                  # passes over the training set (with --pretrained/--init: after 1 frozen epoch)
    lr: str = ""                     # peak learning rate of the one-cycle schedule, or 'auto' (lr_find);
                                     # with --resume, "" means the checkpoint's
    bs: int = 0                      # images per batch
    size: int = 0                    # images are squished to size x size pixels
    valid_pct: float = 0.2           # share of each class held out, when the folder is not split already
    seed: int = 42                   # for the split, the weights' init and the batch order
    pretrained: bool = False         # start from torchvision's ImageNet weights (torch hub cache)
    init: str = ""                   # start from the body of a model folder this project exported
    device: str = "auto"             # auto: CUDA, then MPS, then CPU
    precision: str = ""              # auto: mixed (bf16/fp16) where the device computes it natively; fp32;
                                     # "": the source's default (auto; fp32 for a one-epoch MNIST run)
    augment: bool | None = None      # batch-level flips/rotations/zoom/lighting on the training set
    flip: bool = True                # horizontal flips when augmenting (never for digits)
    resume: bool = False             # continue from the last checkpoint of the same --out
    mnist_dir: str = ""              # a local MNIST copy; default $MNIST_DIR, else download
    quiet: bool = False              # no progress bars or per-epoch lines
    workers: int = 0                 # image-decoding threads; 0 = 2 x cores, at most 8
    # The decode-once data cache (train/cache.py). Neither changes what a run computes, so --resume lets them differ.
    cache: bool = True               # keep decoded images in a memory-mapped cache on disk, reused while the files stay
    cache_dir: str = ""              # where; "" = $XDG_CACHE_HOME (else ~/.cache)/resnet18-train/datasets
    # Labels from a CSV (models/labels.py) instead of class folders, and multi-label training.
    labels: str = ""                 # CSV of file,label rows; paths relative to the source folder or the CSV
    file_col: str = ""               # its file column; "" tries file, fname, image
    label_col: str = ""              # its label column; "" tries label, labels, tags
    label_delim: str = " "           # between the labels of one cell: any cell with two makes it multi-label
    threshold: float = 0.5           # multi-label: a class is predicted when its sigmoid is above this
    patience: int | None = None      # epochs without a lower valid_loss before stopping (then the best epoch is
                                     # exported); 0 = off; None: the source's default (DEFAULT_PATIENCE)

    def resolve(self) -> "TrainConfig":
        """Fill the defaults that depend on the data source and on --pretrained."""
        is_mnist = self.source == "mnist"
        d = MNIST_DEFAULTS if is_mnist else PHOTO_DEFAULTS
        self.epochs = self.epochs or d["epochs"]
        if is_mnist and self.epochs == 1:
            d = {**d, **MNIST_ONE_EPOCH}
        self.bs = self.bs or d["bs"]
        self.size = self.size or d["size"] or (224 if self.pretrained else 128)
        if not self.resume:  # a resumed run takes the checkpoint's rate unless one is given (see `resume_conflict`)
            self.lr = self.lr or (str(d["lr"]) if d["lr"] else ("2e-3" if (self.pretrained or self.init) else "3e-3"))
        if self.augment is None:
            self.augment = d["augment"]
        if self.patience is None:
            self.patience = d.get("patience", DEFAULT_PATIENCE)
        self.precision = self.precision or d.get("precision", "auto")
        if is_mnist:
            self.flip = False
        if not is_mnist:
            self.source = _absolute(self.source)
        self.out = _absolute(self.out or Path(__file__).resolve().parents[1] / "models" / Path(self.source).name)
        self.init = self.init and _absolute(self.init)
        self.mnist_dir = self.mnist_dir and _absolute(self.mnist_dir)
        self.cache_dir = self.cache_dir and _absolute(self.cache_dir)
        self.labels = self.labels and _absolute(self.labels)
        return self

    def as_dict(self) -> dict:
        return asdict(self)

    def as_portable_dict(self) -> dict:
        """`as_dict` for what leaves this machine (metadata.json, the card, a push): each path is cut to
        its last part, the name a person knows it by (the data folder, 'mnist', the model, the --init model)."""
        d = self.as_dict()
        for key in PATH_FIELDS:
            d[key] = Path(d[key]).name if d[key] else ""
        return d

    def resume_conflict(self, saved: dict, saved_lr_given: str | None = None) -> str | None:
        """Why this run cannot continue a checkpoint made with the config `saved` (both resolved), or None.
        `saved_lr_given` is the --lr that run was given ('auto', or a number), before lr_find replaced it."""
        defaults = {f.name: f.default for f in fields(TrainConfig)}
        for key in RESUME_FIXED:
            was = saved.get(key, defaults[key])  # a checkpoint from before a setting existed ran at its default
            if was != getattr(self, key):
                return (f"--resume: the checkpoint was made with {key}={was!r}, this run has "
                        f"{getattr(self, key)!r}; use the same settings, or start over without --resume")
        if self.lr and self.lr != saved_lr_given and not _same_rate(self.lr, saved["lr"]):
            return (f"--resume: the checkpoint was made with lr={saved['lr']!r}, this run has {self.lr!r}; omit --lr "
                    "(it means the checkpoint's) or give the same, or start over without --resume")
        return None


def _absolute(path) -> str:
    return str(Path(path).expanduser().resolve())


def _same_rate(a: str, b: str) -> bool:
    return "auto" not in (a, b) and float(a) == float(b)


def learning_rate(s: str) -> str:
    if s == "auto":
        return s
    v = number(s, "a number or 'auto'")
    if not 0 < v < 10:
        raise argparse.ArgumentTypeError(f"learning rate must be in (0, 10), got {v}")
    return s


def label_delim(s: str) -> str:
    if not s:
        raise argparse.ArgumentTypeError("must be one or more characters, e.g. ' ' or ';'")
    return s


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Fine-tune resnet18 with fastai on MNIST or on folders of photos (one folder per "
                    "class), then export a model folder that `python -m serve` loads.",
        epilog="examples:\n"
               "  python -m train mnist --epochs 1 --out models/mnist\n"
               "  python -m train path/to/photos --epochs 5 --size 64 --out models/fashion\n"
               "  python -m train path/to/photos --pretrained --epochs 3 --out models/lotr\n"
               "  python -m train path/to/photos --init models/mnist --epochs 3\n"
               "  python -m train path/to/photos --epochs 30 --patience 3   # stop when valid loss stalls\n"
               "  python -m train mnist --resume        # after Ctrl-C: continue from the last epoch\n"
               "  python -m train path/to/images --labels labels.csv   # file,label rows; 'a b' cells: multi-label\n"
               "  torchrun --nproc_per_node 4 -m train path/to/photos   # 4 GPUs (or accelerate launch -m train)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="'mnist', or a folder with one sub-folder per class (optionally inside "
                                  "train/ + valid/ or training/ + testing/)")
    p.add_argument("--out", default="", help="model folder to write (default: models/<name of the source>)")
    p.add_argument("--epochs", type=positive_int, default=0,
                   help=f"epochs (default: MNIST {MNIST_DEFAULTS['epochs']}, photos {PHOTO_DEFAULTS['epochs']})")
    p.add_argument("--lr", type=learning_rate, default=None,
                   help="peak learning rate, or 'auto' to run fastai's lr_find and use its suggestion "
                        f"(default: MNIST {MNIST_DEFAULTS['lr']}, {MNIST_ONE_EPOCH['lr']} for one epoch; photos 3e-3, "
                        "fine-tuning 2e-3; with --resume, the checkpoint's)")
    p.add_argument("--bs", "--batch-size", dest="bs", type=positive_int, default=0,
                   help=f"batch size (default: MNIST {MNIST_DEFAULTS['bs']}, {MNIST_ONE_EPOCH['bs']} for one epoch; "
                        f"photos {PHOTO_DEFAULTS['bs']}). Per process: under torchrun or accelerate launch the "
                        "effective batch is bs x the number of processes, and --lr is used as given, not scaled "
                        "(divide --bs by the number of processes to keep a one-process run's batch)")
    p.add_argument("--size", type=positive_int, default=0,
                   help="image size in pixels, images are squished to size x size "
                        f"(default: MNIST {MNIST_DEFAULTS['size']}, its 28x28 digits resized so that resnet18's "
                        f"last stage sees 2x2 maps, not 1x1, and {MNIST_ONE_EPOCH['size']} for one epoch; photos 128, "
                        "with --pretrained 224)")
    p.add_argument("--valid-pct", type=fraction, default=0.2,
                   help="share of each class to validate on, for folders not already split (default 0.2)")
    p.add_argument("--seed", type=seed_int, default=42,
                   help="random seed for split, init and batch order, 0 to 2**32-1 (default 42)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--pretrained", action="store_true",
                       help="fine-tune from torchvision's ImageNet weights (torch hub cache; downloaded when online)")
    start.add_argument("--init", default="", metavar="MODEL_FOLDER",
                       help="fine-tune from the body of a model folder exported earlier (e.g. models/mnist)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], default="auto",
                   help="auto picks CUDA, then MPS, then CPU (default auto)")
    p.add_argument("--precision", choices=["auto", "fp32"], default="",
                   help="auto trains in mixed precision where the device computes it natively: bf16 (else fp16) "
                        "on CUDA; on CPUs with AMX, bf16; with AVX512-BF16 alone, bf16 where a few steps timed at the "
                        "start find it faster (~1.5x on an AMD Zen 4, slower on an Intel Xeon without AMX); fp32 "
                        "elsewhere; weights and the last epoch's validation stay fp32. fp32: full precision throughout. "
                        "Default auto, but fp32 for a "
                        "one-epoch MNIST run (its 99.0%% sits within 0.1 point of the line; bf16 gave 98.87%% at seed 42)")
    aug = p.add_mutually_exclusive_group()
    aug.add_argument("--augment", dest="augment", action="store_true", default=None,
                     help="batch augmentation: flips, small rotations, zoom, warp, lighting "
                          "(default for photos, and for MNIST beyond one epoch)")
    aug.add_argument("--no-augment", dest="augment", action="store_false",
                     help="no augmentation (default for a one-epoch MNIST run)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no horizontal flips when augmenting (for text, digits, anything with a handedness)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last checkpoint: the same source, --out and "
                        "settings (a changed --seed, --valid-pct, --lr, --augment, --no-flip, --size, --bs, "
                        "--epochs, --patience... is refused, and so is another number of processes under torchrun); "
                        "--device, --precision, --workers and --quiet may differ")
    p.add_argument("--patience", type=non_negative_int, default=None, metavar="N",
                   help="early stopping: stop when the validation loss has not improved for N epochs, and "
                        "export the epoch with the lowest validation loss instead of the last (counted over "
                        "all epochs: with --pretrained/--init the frozen epoch is the first); 0 = off. Default: "
                        f"{DEFAULT_PATIENCE or 'off'} for MNIST and photos, whose short one-cycle schedules "
                        "often reach their lowest validation loss in the last epoch, after a rise mid-run; "
                        "give a longer --epochs budget with it")
    p.add_argument("--mnist-dir", default="", help="local MNIST copy (folder layout or IDX files); default $MNIST_DIR")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="image-decoding threads (default, or 0: 2 x cores, at most 8)")
    cache = p.add_mutually_exclusive_group()  # the data cache (train/cache.py)
    cache.add_argument("--cache-dir", default="", metavar="DIR",
                       help="where the decoded images of a folder are cached, memory-mapped, for later runs "
                            "(default: $XDG_CACHE_HOME, else ~/.cache, /resnet18-train/datasets; rebuilt when a "
                            "file or --size changes; the 3 most recently used are kept per data folder; MNIST's "
                            "IDX files are never cached)")
    cache.add_argument("--no-cache", dest="cache", action="store_false",
                       help="decode into memory and write no cache (the data set must fit in memory)")
    csv_group = p.add_argument_group("labels from a CSV (fastai's ColReader conventions)")
    csv_group.add_argument("--labels", default="", metavar="CSV",
                           help="take files and labels from a CSV instead of class folders: a file column (a path "
                                "relative to SOURCE, else to the CSV's folder) and a label column; an optional "
                                "is_valid column (true/false) gives the split, else --valid-pct")
    csv_group.add_argument("--file-col", default="", help="the CSV's file column (default: file, fname or image)")
    csv_group.add_argument("--label-col", default="", help="the CSV's label column (default: label, labels or tags)")
    csv_group.add_argument("--label-delim", type=label_delim, default=" ", metavar="SEP",
                           help="separates several labels in one cell (default: a space); if any cell holds more "
                                "than one, a multi-label model is trained (sigmoid per class, fastai's "
                                "BCEWithLogitsLossFlat) and an empty cell means no labels. Class names with "
                                "spaces: give another separator, e.g. ';'")
    csv_group.add_argument("--threshold", type=fraction, default=0.5,
                           help="multi-label: a class is predicted when its probability is above this (default "
                                "0.5); the threshold with the best validation F1 is reported beside it")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, tables or per-epoch lines")
    return p


def parse_config(argv=None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    names = {f.name for f in fields(TrainConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["lr"] = values["lr"] or ""
    return TrainConfig(**values).resolve()
