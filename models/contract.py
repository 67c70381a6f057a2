"""The model contract: what a model folder holds, how it is preprocessed, and how it is loaded.

Training writes a model folder with `train.export`; the server, the CLI and the Hub code read it
with `load_model_folder`. Both sides meet only here, so a field renamed here is renamed for all.

A model folder has the shape of a Hugging Face model repo, so it can be pushed as it is:

    model.pkl               fastai learner (`learn.export`), loads with `load_learner`
    metadata.json           classes, preprocessing, config, data summary, metrics, versions
    confusion_matrix.png    fastai's ClassificationInterpretation
    top_losses.png          the validation images the model got most wrong
    examples/<class>_<n>.png  a few validation images per class, for the app's examples
    README.md               the model card
"""
from __future__ import annotations

import json
import platform
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MODEL_FILE", "METADATA_FILE", "CONFUSION_FILE", "TOP_LOSSES_FILE", "EXAMPLES_DIR", "CARD_FILE",
    "ARCH", "ModelFolderError", "ModelFolder", "item_transforms", "batch_transforms",
    "library_versions", "load_model_folder", "read_metadata", "inference_dataloaders",
]

MODEL_FILE = "model.pkl"
METADATA_FILE = "metadata.json"
CONFUSION_FILE = "confusion_matrix.png"
TOP_LOSSES_FILE = "top_losses.png"
EXAMPLES_DIR = "examples"
CARD_FILE = "README.md"
ARCH = "resnet18"
METADATA_VERSION = 1

# Keys every metadata.json must have; the loaders check them so a half-written or foreign
# folder is refused with a clear message rather than failing on first request.
REQUIRED_KEYS = ("name", "classes", "arch", "image_size", "normalize", "versions", "metrics")


class ModelFolderError(RuntimeError):
    """A model folder that cannot be used; the message is one line, fit for a person."""


def item_transforms(size: int) -> list:
    """Per-image preprocessing, the one definition shared by the training cache and the exported
    learner. Squish (not crop) so nothing at an image's edge is lost and the result is
    deterministic: decoding once for the cache gives exactly what inference computes later."""
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


def read_metadata(folder: Path) -> dict:
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        raise ModelFolderError(f"{folder} has no {METADATA_FILE}: not a model folder exported by `python -m train`")
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path} is unreadable: {e}") from None
    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise ModelFolderError(f"{path} lacks {', '.join(missing) or 'a JSON object'}: re-export the model")
    return meta


def _major(version: str) -> str:
    return str(version).split(".")[0]


@dataclass
class ModelFolder:
    path: Path
    metadata: dict
    learner: object  # fastai Learner, on CPU, in eval mode

    @property
    def classes(self) -> list[str]:
        return list(self.metadata["classes"])

    @property
    def name(self) -> str:
        return self.metadata["name"]

    def examples(self) -> list[Path]:
        return sorted((self.path / EXAMPLES_DIR).glob("*.png"))


def load_model_folder(folder, cpu: bool = True) -> ModelFolder:
    """Load an exported model folder: check it, then `load_learner` its `model.pkl`.

    Refuses, with a `ModelFolderError`, a folder that is missing, incomplete, or was made with
    another major version of fastai (a pickle from another major version does not unpickle
    reliably; read the versions from the metadata rather than find out mid-request).
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    meta = read_metadata(folder)
    pkl = folder / MODEL_FILE
    if not pkl.is_file():
        raise ModelFolderError(f"{folder} has no {MODEL_FILE}: the export did not finish, or this is not a model folder")
    import fastai
    trained = meta["versions"].get("fastai", "?")
    if _major(trained) != _major(fastai.__version__):
        raise ModelFolderError(f"{folder} was made with fastai {trained}, this is fastai {fastai.__version__}: "
                               f"install fastai=={trained} or re-train the model")
    import models.imageio  # noqa: F401  (the learner's input type lives there; make sure it imports)
    from fastai.learner import load_learner
    try:
        learn = load_learner(pkl, cpu=cpu)
    except Exception as e:  # a corrupt or foreign pickle raises anything from EOFError to KeyError
        raise ModelFolderError(f"cannot load {pkl}: {type(e).__name__}: {e}") from None
    learn.model.eval()
    return ModelFolder(folder, meta, learn)


def inference_dataloaders(classes, size: int, mean, std, sample):
    """The DataLoaders an exported learner carries: a file path or a PIL image in (through
    `RGBImage`), the same item and batch transforms as training, class names out.

    fastai needs one real item to learn the pipeline's types (`learn.export` then keeps only the
    transforms): `sample` is one (image, class name) pair. `RGBImage.create`'s type hints tell
    `test_dl` that a path, bytes, an array or a plain PIL image all enter at that step."""
    from fastai.data.core import Datasets
    from fastai.data.transforms import Categorize, ItemGetter
    from models.imageio import RGBImage
    dsets = Datasets([sample], tfms=[[ItemGetter(0), RGBImage.create], [ItemGetter(1), Categorize(vocab=list(classes))]],
                     splits=([0], [0]))
    return dsets.dataloaders(bs=64, after_item=item_transforms(size), after_batch=batch_transforms(mean, std),
                             num_workers=0, device="cpu")
