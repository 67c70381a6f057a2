"""The model contract: what a model folder holds, how it is preprocessed, and how it is loaded.

Training writes a model folder with `train.export`; the server, the CLI and the Hub code read it
with `load_model_folder`. Both sides meet only here, so a field renamed here is renamed for all.

A model folder has the shape of a Hugging Face model repo, so it can be pushed as it is:

    model.pkl               fastai learner (`learn.export`), loads with fastai's `load_learner` alone
    model.safetensors       the same network's weights, no pickle; rebuilt from metadata.json (models/weights.py)
    model.onnx              the same network for onnxruntime, preprocessing and softmax (multi-label: sigmoid) inside
    metadata.json           `ModelMetadata`: classes, network, preprocessing, config, data, metrics, versions
    confusion_matrix.png    fastai's ClassificationInterpretation
    top_losses.png          the validation images the model got most wrong
    history.csv             one row per epoch: epoch, phase, train_loss, valid_loss, every metric, lr, seconds
    learning_curves.png     the losses and metrics of history.csv against the epoch
    examples/<class>_<n>.png  a few validation images per class, for the app's examples
    README.md               the model card

The three model files are three formats of one network and give the same probabilities (tested):
`load_model_folder(folder, format)` loads one of them, and `Preprocessing` is the one way images
are prepared for all three, read from metadata.json.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import platform
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MODEL_FILE", "WEIGHTS_FILE", "ONNX_FILE", "METADATA_FILE", "CONFUSION_FILE", "TOP_LOSSES_FILE", "EXAMPLES_DIR",
    "HISTORY_FILE", "CURVES_FILE", "STOPPED_COMPLETED", "STOPPED_PATIENCE", "FitSummary", "CARD_FILE", "ARCH", "ARCHS", "FORMATS", "FORMAT_FILES", "METADATA_VERSION", "ModelFolderError", "Head",
    "Normalization", "Metrics", "ModelMetadata", "Preprocessing", "ModelFolder", "item_transforms",
    "batch_transforms", "library_versions", "load_model_folder", "read_metadata", "write_metadata",
    "inference_dataloaders", "DEFAULT_THRESHOLD",
]

MODEL_FILE = "model.pkl"
WEIGHTS_FILE = "model.safetensors"
ONNX_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
CONFUSION_FILE = "confusion_matrix.png"
TOP_LOSSES_FILE = "top_losses.png"
HISTORY_FILE = "history.csv"
CURVES_FILE = "learning_curves.png"
EXAMPLES_DIR = "examples"
CARD_FILE = "README.md"
ARCH = "resnet18"  # what `python -m train` fine-tunes
# The architectures a metadata.json may name: the pickle-free loader maps each to its torchvision
# constructor (models/weights.py), never `getattr` on a name read from a file.
ARCHS = ("resnet18", "resnet34", "resnet50")
# The three artifacts of a model folder, by the name `--format` gives them.
FORMAT_FILES = {"pickle": MODEL_FILE, "safetensors": WEIGHTS_FILE, "onnx": ONNX_FILE}
FORMATS = tuple(FORMAT_FILES)
RESIZE_METHODS = ("squish",)
# Why a fit ended: it ran every epoch of its budget, or --patience epochs passed without a lower valid_loss.
STOPPED_COMPLETED, STOPPED_PATIENCE = "completed", "patience"
STOP_REASONS = (STOPPED_COMPLETED, STOPPED_PATIENCE)
ACTIVATIONS = ("softmax", "sigmoid")  # single-label (CrossEntropyLossFlat), multi-label (BCEWithLogitsLossFlat)
# 3: how the fit ended (`fit`), `world_size`, and a multi-label model's `threshold`s: a version-2
# folder reads with their defaults (no record, one process, single-label), while code that reads
# only version 2 says "update this project's code" for a version-3 folder rather than "re-export".
# 2: the network (n_out, head, activation) and model.safetensors/model.onnx. A version-1 folder is
# still read: its network was always `vision_learner`'s default head with a softmax, filled in below.
METADATA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)


class ModelFolderError(RuntimeError):
    """A model folder that cannot be used; the message is one line, fit for a person."""


# ---- metadata.json: the schema ----------------------------------------------------------------------

@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of the training images in [0, 1]: x -> (x / 255 - mean) / std."""
    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class Head:
    """fastai's `create_head` arguments, as `vision_learner` and `create_vision_model` take them. The
    defaults are fastai's own, which is what `train.learner.build_learner` trains with; they are
    written out so that the network can be rebuilt without the pickle."""
    concat_pool: bool = True
    pool: bool = True
    lin_ftrs: list[int] | None = None
    ps: float = 0.5
    first_bn: bool = True
    bn_final: bool = False
    lin_first: bool = False
    y_range: list[float] | None = None

    def kwargs(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Metrics:
    """On the validation set, as `train.export.evaluate` computes them."""
    valid_accuracy: float
    n_valid: int
    per_class_accuracy: dict[str, float | None]
    confusion_matrix: list[list[int]]  # rows: actual class, columns: predicted, in `classes` order (multi-label: [])
    # multi-label only (absent from a single-label metadata.json): valid_accuracy is fastai's
    # accuracy_multi at the threshold, per_class_accuracy each label's, and these are macro F1s
    f1: float | None = None            # at `ModelMetadata.threshold`
    best_f1: float | None = None       # at `ModelMetadata.best_f1_threshold`


@dataclass(frozen=True)
class FitSummary:
    """How the fit ended (train/stopping.py). Epochs are numbered from 1 over all phases, as in history.csv."""
    epochs_planned: int        # the budget: --epochs, plus the frozen epoch with --pretrained/--init
    epochs_run: int
    best_epoch: int | None     # the lowest valid_loss
    kept_epoch: int            # whose weights this folder holds: best_epoch with --patience, else the last
    stopped: str               # "completed" (the whole budget) or "patience" (early stopping)
    patience: int = 0          # --patience; 0: off


@dataclass(frozen=True)
class ModelMetadata:
    """metadata.json, typed. `read_metadata` validates a file into one (or refuses it with one
    line); `write_metadata` writes one. Every reader and writer of the folder goes through it."""
    name: str
    classes: list[str]
    # the network, enough to rebuild it with `create_vision_model(arch, n_out, n_in=..., **head)`
    arch: str
    n_out: int
    head: Head
    activation: str            # of the network's outputs: "softmax" (one label) or "sigmoid" (multi-label)
    # the preprocessing (see `Preprocessing`)
    image_size: int            # px; every image is resized to image_size x image_size
    resize_method: str         # "squish": the whole image, aspect ratio not kept (fastai's ResizeMethod.Squish)
    input_channels: int
    normalize: Normalization
    # what the training did and measured; free-form where its shape belongs to train/
    metrics: Metrics
    versions: dict[str, str]   # python, torch, torchvision, fastai, fastcore, pillow that wrote the pickle
    config: dict = field(default_factory=dict)   # train.config.TrainConfig.as_dict()
    data: dict = field(default_factory=dict)     # train.data.DataSummary.as_dict()
    lr: float | None = None
    seed: int | None = None
    training_seconds: float | None = None
    device: str | None = None
    created: str | None = None  # ISO 8601, UTC
    world_size: int = 1         # processes that trained it together (torchrun / accelerate launch); 1 before it was recorded
    examples: list[str] = field(default_factory=list)  # paths relative to the folder
    fit: FitSummary | None = None  # None in folders exported before early stopping existed
    task: str = "image-classification"
    # multi-label only (activation "sigmoid"; absent from a single-label metadata.json, so that code
    # from before multi-label still reads those): a class is predicted when its probability is above
    # `threshold` (None: 0.5); `best_f1_threshold` is the one that maximised validation F1
    threshold: float | None = None
    best_f1_threshold: float | None = None
    metadata_version: int = METADATA_VERSION

    @property
    def preprocessing(self) -> "Preprocessing":
        return Preprocessing(self.image_size, self.resize_method, tuple(self.normalize.mean), tuple(self.normalize.std))

    @property
    def multi_label(self) -> bool:
        """Independent yes/no per class (sigmoid), rather than one class of many (softmax)."""
        return self.activation == "sigmoid"

    @property
    def decision_threshold(self) -> float:
        """The probability above which a multi-label model predicts a class."""
        return DEFAULT_THRESHOLD if self.threshold is None else self.threshold

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for key in _ABSENT_IF_NONE:  # written only where they mean something (multi-label)
            if d[key] is None:
                del d[key]
        for key in _METRICS_ABSENT_IF_NONE:
            if d["metrics"][key] is None:
                del d["metrics"][key]
        return {"metadata_version": d.pop("metadata_version"), **d}

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    @classmethod
    def from_dict(cls, raw, where: str = METADATA_FILE) -> "ModelMetadata":
        """Validate a parsed metadata.json. Raises `ModelFolderError`, one line, naming the field."""
        if not isinstance(raw, dict):
            raise ModelFolderError(f"{where} holds {_json_kind(raw)}, not a JSON object: not a model folder of this "
                                   "project, or a damaged one; re-export the model with `python -m train`")
        version = raw.get("metadata_version")
        if type(version) is not int:
            raise ModelFolderError(f"{where} has no valid metadata_version: not a model folder of this project; "
                                   "re-export the model with `python -m train`")
        if version > METADATA_VERSION:
            raise ModelFolderError(f"{where} is metadata version {version}, newer than this code reads "
                                   f"({METADATA_VERSION}): update this project's code")
        if version not in READABLE_VERSIONS:
            raise ModelFolderError(f"{where} is metadata version {version}, which this code no longer reads: "
                                   "re-export the model with `python -m train`")
        raw = dict(raw)
        if version == 1:  # written before the network was recorded: it was always fastai's default head
            classes = raw.get("classes")
            raw.setdefault("n_out", len(classes) if isinstance(classes, list) else None)
            raw.setdefault("head", {})
            raw.setdefault("activation", "softmax")
        try:
            meta = _typed(cls, raw, "")
            meta._check()
        except _SchemaError as e:
            raise ModelFolderError(f"{where}: {e}; re-export the model with `python -m train`") from None
        return meta

    def _check(self) -> None:
        """What the types alone do not say."""
        if not self.classes or len(set(self.classes)) != len(self.classes):
            raise _SchemaError("classes must be a non-empty list of distinct names")
        if self.n_out != len(self.classes):
            raise _SchemaError(f"n_out is {self.n_out} but there are {len(self.classes)} classes")
        if self.arch not in ARCHS:
            raise _SchemaError(f"arch {self.arch!r} is not one of {', '.join(ARCHS)}")
        if self.activation not in ACTIVATIONS:
            raise _SchemaError(f"activation {self.activation!r} is not one of {', '.join(ACTIVATIONS)}")
        for name in _ABSENT_IF_NONE:
            t = getattr(self, name)
            if t is not None and not (self.multi_label and 0 < t < 1):
                raise _SchemaError(f"{name} {t} is only for a multi-label (sigmoid) model, strictly between 0 and 1")
        if self.fit is not None and self.fit.stopped not in STOP_REASONS:
            raise _SchemaError(f"fit.stopped {self.fit.stopped!r} is not one of {', '.join(STOP_REASONS)}")
        if self.resize_method not in RESIZE_METHODS:
            raise _SchemaError(f"resize_method {self.resize_method!r} is not one of {', '.join(RESIZE_METHODS)}")
        if self.world_size < 1:
            raise _SchemaError(f"world_size {self.world_size} is not a number of processes (1 or more)")
        if not 1 <= self.image_size <= 4096:
            raise _SchemaError(f"image_size {self.image_size} is not between 1 and 4096 px")
        n = self.input_channels
        if n != 3 or len(self.normalize.mean) != n or len(self.normalize.std) != n:
            raise _SchemaError(f"normalize needs {n} means and stds for input_channels {n} (RGB: 3)")
        if not all(math.isfinite(v) for v in self.normalize.mean) or not all(v > 0 and math.isfinite(v) for v in self.normalize.std):
            raise _SchemaError("normalize has a non-finite mean or a std that is not positive")


class _SchemaError(ValueError):
    pass


DEFAULT_THRESHOLD = 0.5  # fastai's accuracy_multi and BCEWithLogitsLossFlat default
_ABSENT_IF_NONE = ("threshold", "best_f1_threshold")
_METRICS_ABSENT_IF_NONE = ("f1", "best_f1")


def _json_kind(v) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(v), "a number")


def _typed(tp, v, path: str):
    """`v` (parsed JSON) checked against the type hint `tp`; dataclasses are built field by field.
    Unknown keys and wrong types fail loudly, naming the field."""
    where = path or "the top level"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(v, dict):
            raise _SchemaError(f"{where} must be an object, got {_json_kind(v)}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        unknown = sorted(set(v) - names)
        if unknown:
            raise _SchemaError(f"unknown field {(path + '.' if path else '') + unknown[0]!r}")
        kwargs = {}
        for f in dataclasses.fields(tp):
            sub = f"{path}.{f.name}" if path else f.name
            if f.name not in v:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise _SchemaError(f"field {sub!r} is missing")
                continue
            kwargs[f.name] = _typed(hints[f.name], v[f.name], sub)
        return tp(**kwargs)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        return _typed(others[0], v, path)
    if origin is list:
        if not isinstance(v, list):
            raise _SchemaError(f"field {where!r} must be a list, got {_json_kind(v)}")
        return [_typed(args[0], x, f"{path}[{i}]") for i, x in enumerate(v)]
    if origin is dict or tp is dict:
        if not isinstance(v, dict):
            raise _SchemaError(f"field {where!r} must be an object, got {_json_kind(v)}")
        if not args:
            return v
        return {k: _typed(args[1], x, f"{path}.{k}") for k, x in v.items()}
    if tp is bool:
        if type(v) is not bool:
            raise _SchemaError(f"field {where!r} must be true or false, got {_json_kind(v)}")
        return v
    if tp is int:
        if type(v) is not int:
            raise _SchemaError(f"field {where!r} must be a whole number, got {_json_kind(v)}")
        return v
    if tp is float:
        if type(v) not in (int, float):
            raise _SchemaError(f"field {where!r} must be a number, got {_json_kind(v)}")
        return float(v)
    if tp is str:
        if not isinstance(v, str):
            raise _SchemaError(f"field {where!r} must be a string, got {_json_kind(v)}")
        return v
    raise TypeError(f"metadata schema: no rule for {tp!r}")  # a bug in the schema, not in the file


def read_metadata(folder: Path) -> ModelMetadata:
    """The folder's metadata.json, validated. Raises `ModelFolderError` with one line for a missing,
    unreadable, foreign, older or newer file."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {METADATA_FILE}: not a model folder exported by `python -m train`")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is unreadable: {e}") from None
    except RecursionError:  # thousands of nested brackets
        raise ModelFolderError(f"{path} is unreadable: nested too deeply") from None
    return ModelMetadata.from_dict(raw, str(path))


def write_metadata(folder: Path, meta: ModelMetadata) -> Path:
    """Write metadata.json; checked as a reader would check it, so a writer cannot write what no reader
    accepts."""
    ModelMetadata.from_dict(json.loads(meta.to_json()), "the metadata being written")
    path = Path(folder) / METADATA_FILE
    path.write_text(meta.to_json(), encoding="utf-8")
    return path


# ---- preprocessing: the one way an image becomes the network's input ----------------------------------

@dataclass(frozen=True)
class Preprocessing:
    """Image -> uint8 (3, S, S) tensor -> normalised float batch, for every format and for training.

    `prepare` decodes with `models.imageio` (EXIF rotation, 16-bit, CMYK, first frame, the pixel
    limit: as training's data cache decodes) and resizes with `item_transforms`, the transforms the
    training cache and the exported learner apply; `normalize` is `batch_transforms` as plain
    tensor arithmetic (IntToFloatTensor divides by 255, Normalize subtracts and divides), tested
    equal to the learner's own pipeline."""
    image_size: int
    resize_method: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @functools.cached_property
    def _items(self):
        from fasttransform import Pipeline
        return Pipeline(item_transforms(self.image_size), split_idx=1)  # 1: validation, no augmentation

    def prepare(self, src, gate=None):
        """Decode one image and resize it: a uint8 (3, S, S) tensor. `src` is a path, bytes, a binary
        file object, a PIL image or an array. Raises `models.imageio.ImageError` for anything that is
        not a usable image. Safe to call from many threads at once. `gate`: `models.imageio.open_image`'s
        (a server's decoding budget)."""
        import numpy as np
        import torch
        from PIL import Image
        from models.imageio import ImageError, RGBImage
        if isinstance(src, (bytearray, memoryview)):
            src = bytes(src)
        elif hasattr(src, "read"):
            src = src.read()
        if not isinstance(src, (str, Path, bytes, Image.Image, np.ndarray, torch.Tensor)):
            raise ImageError(f"cannot read an image from a {type(src).__name__}")
        try:
            img = RGBImage.create(src, size=self.image_size, gate=gate)  # reduced decoding, as the training cache
        except TypeError as e:  # an array Pillow has no mode for (float64, 5 channels...)
            raise ImageError(f"cannot read an image from this array ({e})") from None
        return self.resize(img)

    def resize(self, img):
        """`item_transforms` on one decoded RGB image, computed directly: a uint8 (3, S, S) tensor.

        In their validation behaviour fastai's squish `Resize` is a crop of the whole image (a
        copy) and Pillow's bilinear resize to S x S, and `ToTensor` a channels-first view of the
        pixels. fastai's transform dispatch around that cost ~2.4 of the ~3 ms a 28 px digit took
        through the Pipeline, so the server runs the two Pillow/torch calls itself;
        tests/test_predictor.py holds the result equal to the Pipeline's, pixel for pixel."""
        import numpy as np
        import torch
        from PIL import Image
        if self.resize_method != "squish" or img.mode != "RGB":  # what the direct path does not cover
            return self._items(img)
        s = self.image_size
        return torch.from_numpy(np.array(img.resize((s, s), Image.BILINEAR))).permute(2, 0, 1)

    def stats(self, device=None):
        """(mean, std) as float32 (1, C, 1, 1) tensors."""
        import torch
        shape = (1, len(self.mean), 1, 1)
        return (torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape),
                torch.tensor(self.std, dtype=torch.float32, device=device).view(shape))

    @staticmethod
    def normalize(x, mean, std):
        """uint8 (N, C, H, W) -> float32, as the learner's `after_batch` computes it."""
        return (x.float() / 255.0 - mean) / std


def item_transforms(size: int) -> list:
    """Per-image preprocessing, the one definition shared by the training cache, the exported
    learner and the server. Squish (not crop) so nothing at an image's edge is lost and the result
    is deterministic: decoding once for the cache gives exactly what inference computes later."""
    from fastai.vision.augment import Resize, ResizeMethod
    from fastai.data.transforms import ToTensor
    return [Resize(size, method=ResizeMethod.Squish), ToTensor()]


def batch_transforms(mean, std) -> list:
    """Per-batch preprocessing: uint8 -> float in [0, 1], then normalise per channel."""
    from fastai.data.transforms import IntToFloatTensor, Normalize
    return [IntToFloatTensor(), Normalize.from_stats(list(mean), list(std), cuda=False)]


def library_versions() -> dict:
    import fastai, fastcore, PIL, torch, torchvision
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "fastai": fastai.__version__,
            "fastcore": fastcore.__version__, "pillow": PIL.__version__}


# ---- loading ------------------------------------------------------------------------------------------

def _major(version: str) -> str:
    return str(version).split(".")[0]


@dataclass
class ModelFolder:
    path: Path
    metadata: ModelMetadata
    format: str          # the artifact loaded: "pickle", "safetensors" or "onnx"
    model: object        # a torch.nn.Module on the CPU in eval mode (pickle, safetensors), or an OnnxClassifier
    learner: object = None  # the fastai Learner, for "pickle" only

    @property
    def classes(self) -> list[str]:
        return list(self.metadata.classes)

    @property
    def name(self) -> str:
        return self.metadata.name

    def examples(self) -> list[Path]:
        return sorted((self.path / EXAMPLES_DIR).glob("*.png"))


def load_model_folder(folder, format: str = "pickle", threads: int | None = None) -> ModelFolder:
    """Check a model folder and load one of its formats:

    - "pickle": `load_learner(model.pkl)`; refused for a folder made with another major version of
      fastai (such a pickle does not unpickle reliably: say so rather than fail mid-request).
    - "safetensors": the network rebuilt from metadata.json, weights from model.safetensors; never
      unpickles anything, whatever else the folder holds.
    - "onnx": model.onnx in onnxruntime (`threads` intra-op threads; default: onnxruntime's).

    Raises `ModelFolderError` (one line) for anything a person must fix.
    """
    folder = Path(folder).expanduser()
    if format not in FORMAT_FILES:
        raise ModelFolderError(f"unknown model format {format!r}: use one of {', '.join(FORMATS)}")
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    meta = read_metadata(folder)
    file = folder / FORMAT_FILES[format]
    if not file.is_file():
        others = [f for f, name in FORMAT_FILES.items() if f != format and (folder / name).is_file()]
        hint = f"; it has {' and '.join(others)} (--format {others[0]})" if others else ""
        raise ModelFolderError(f"{folder} has no {file.name}: exported before this format existed, or the export "
                               f"did not finish{hint}")
    if format == "safetensors":
        from models.weights import load_network
        return ModelFolder(folder, meta, format, load_network(file, meta))
    if format == "onnx":
        from models.onnx import OnnxClassifier
        try:
            return ModelFolder(folder, meta, format, OnnxClassifier(file, threads=threads))
        except Exception as e:  # onnxruntime raises its own types for a damaged or foreign graph
            raise ModelFolderError(f"cannot load {file}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    import fastai
    trained = meta.versions.get("fastai", "?")
    if _major(trained) != _major(fastai.__version__):
        raise ModelFolderError(f"{folder} was made with fastai {trained}, this is fastai {fastai.__version__}: "
                               f"install fastai=={trained} or re-train the model")
    from fastai.learner import load_learner
    try:
        learn = load_learner(file, cpu=True)
    except Exception as e:  # a corrupt or foreign pickle raises anything from EOFError to KeyError
        raise ModelFolderError(f"cannot load {file}: {type(e).__name__}: {e}") from None
    learn.model.eval()
    vocab = [str(c) for c in learn.dls.vocab]
    if vocab != meta.classes:
        raise ModelFolderError(f"{folder}: the learner's classes {vocab} differ from {METADATA_FILE}'s "
                               f"{meta.classes}: re-export the model")
    return ModelFolder(folder, meta, format, learn.model, learn)


def inference_dataloaders(classes, size: int, mean, std, sample, multi_label: bool = False):
    """The DataLoaders an exported learner carries: a path, bytes, an array or a PIL image in
    (through fastai's own `PILImage`, so the pickle needs nothing of this project), the same item
    and batch transforms as training, class names out. Our own code decodes with `models.imageio`
    and feeds the learner's network directly (`Preprocessing`); this is what a third party's
    `learn.predict` and `learn.dls.test_dl` use.

    fastai needs one real item to learn the pipeline's types (`learn.export` then keeps only the
    transforms): `sample` is one (PIL image, class name) pair, (PIL image, list of class names) for
    a multi-label model, whose targets are fastai's `MultiCategoryBlock`'s (MultiCategorize, OneHotEncode)."""
    from fastai.data.core import Datasets
    from fastai.data.transforms import Categorize, ItemGetter, MultiCategorize, OneHotEncode
    from fastai.vision.core import PILImage
    targets = ([MultiCategorize(vocab=list(classes)), OneHotEncode(len(classes))] if multi_label
               else [Categorize(vocab=list(classes))])
    dsets = Datasets([sample], tfms=[[ItemGetter(0), PILImage.create], [ItemGetter(1), *targets]],
                     splits=([0], [0]))
    return dsets.dataloaders(bs=64, after_item=item_transforms(size), after_batch=batch_transforms(mean, std),
                             num_workers=0, device="cpu")
