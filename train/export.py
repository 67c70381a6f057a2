"""Export a trained learner as a model folder (see `models/contract.py`), atomically.

Everything is written into a sibling temp folder first; only a complete folder is renamed into
place, and an older model at the same path is replaced only after the new one is whole.

Nothing written names a path of this machine: the metadata and the card hold names (the data
folder's, the model's), and the pickle holds neither the folder it was written in nor a copy of
our code (see `ByReference`).
"""
from __future__ import annotations

import json
import operator
import os
import shutil
import sys
import time
import types
from datetime import datetime, timezone
from pathlib import Path

import cloudpickle
import numpy as np
import torch
from PIL import Image

from models.contract import (ARCH, CARD_FILE, CONFUSION_FILE, EXAMPLES_DIR, METADATA_FILE, METADATA_VERSION,
                             MODEL_FILE, TOP_LOSSES_FILE, inference_dataloaders, library_versions)

EXAMPLES_PER_CLASS = 3
MAX_EXAMPLE_CLASSES = 20  # the app shows examples as a grid; a few hundred would drown it


def evaluate(learn, dl=None, outputs=None):
    """Validation metrics through fastai's `ClassificationInterpretation`, in one pass over `dl`
    (default: the validation set), or in none when `outputs` has the model's raw outputs and the
    targets on that set already (the last epoch's validation pass)."""
    from fastai.interpret import ClassificationInterpretation

    # fastai's `ClassificationInterpretation` runs the whole validation set through the model once
    # for the losses, again for `confusion_matrix()` and a third time to plot it (~7 s each for
    # MNIST's 10,000 digits on 2 cores); this one reuses a single pass.
    class OnePass(ClassificationInterpretation):
        def confusion_matrix(self):
            return self._cm

    if dl is None:
        dl = learn.dls[1].new(shuffle=False, drop_last=False)
    if outputs is None:
        preds, targs, losses = learn.get_preds(dl=dl, with_loss=True)
    else:
        preds, targs = outputs
        with learn.loss_not_reduced():
            losses = learn.loss_func(preds, targs)
    interp = OnePass(learn, dl, losses)
    n = preds.shape[1]
    cm = torch.zeros(n, n, dtype=torch.long)
    cm.index_put_((targs.long(), preds.argmax(dim=1)), torch.ones_like(targs, dtype=torch.long),
                  accumulate=True)  # rows: actual class, columns: predicted, as fastai's
    interp._cm = cm.numpy()
    cm = interp._cm.astype(int)
    per_class = {c: (float(cm[i, i] / cm[i].sum()) if cm[i].sum() else None) for i, c in enumerate(interp.vocab)}
    metrics = {"valid_accuracy": float(np.trace(cm) / cm.sum()), "n_valid": int(cm.sum()),
               "per_class_accuracy": per_class, "confusion_matrix": cm.tolist()}
    return interp, metrics


def _save_figures(interp, folder: Path, n_classes: int) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    size = min(4 + 0.6 * n_classes, 20)
    interp.plot_confusion_matrix(figsize=(size, size), dpi=80)
    plt.savefig(folder / CONFUSION_FILE, bbox_inches="tight")
    plt.close("all")
    k = min(9, len(interp.losses))
    interp.plot_top_losses(k, nrows=3, figsize=(9, 9))
    plt.savefig(folder / TOP_LOSSES_FILE, bbox_inches="tight", dpi=80)
    plt.close("all")


def _save_examples(cache, folder: Path) -> list[str]:
    out = folder / EXAMPLES_DIR
    out.mkdir()
    names = []
    valid_idx = torch.nonzero(cache.is_valid).flatten()
    for ci, c in enumerate(cache.vocab[:MAX_EXAMPLE_CLASSES]):
        idx = valid_idx[cache.labels[valid_idx] == ci][:EXAMPLES_PER_CLASS]
        for n, i in enumerate(idx.tolist()):
            name = f"{_safe(c)}_{n}.png"
            Image.fromarray(cache.images[i].permute(1, 2, 0).numpy()).save(out / name)
            names.append(f"{EXAMPLES_DIR}/{name}")
    return names


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def model_card(meta: dict) -> str:
    m = meta["metrics"]
    d = meta["data"]
    cfg = meta["config"]
    how = ("fine-tuned from ImageNet weights" if cfg["pretrained"]
           else f"fine-tuned from {cfg['init']}" if cfg["init"] else "trained from scratch")
    rows = "\n".join(f"| {c} | {d['train_counts'][c]} | {d['valid_counts'][c]} | "
                     f"{'-' if m['per_class_accuracy'][c] is None else format(m['per_class_accuracy'][c], '.2%')} |"
                     for c in meta["classes"])
    return f"""# {meta['name']}

A {meta['arch']} image classifier for {len(meta['classes'])} classes, {how} with fastai on
{d['source']}. Validation accuracy: **{m['valid_accuracy']:.2%}** on {m['n_valid']} images.

## Training
- {cfg['epochs']} epoch(s), one-cycle schedule, peak learning rate {meta['lr']:g}, batch size {cfg['bs']}, seed {cfg['seed']}
- images squished to {meta['image_size']}x{meta['image_size']} px, normalised with mean {[round(v, 4) for v in meta['normalize']['mean']]}, std {[round(v, 4) for v in meta['normalize']['std']]}
- augmentation: {'on' if cfg['augment'] else 'off'}; device: {meta['device']}; training time: {meta['training_seconds']:.0f} s
- {d['n_train']} training and {d['n_valid']} validation images; {d['n_skipped']} unreadable file(s) skipped
- made {meta['created']} with fastai {meta['versions']['fastai']}, torch {meta['versions']['torch']}

| class | train | valid | valid accuracy |
|---|---|---|---|
{rows}

![confusion matrix]({CONFUSION_FILE})

The validation images it got most wrong:

![top losses]({TOP_LOSSES_FILE})

## Use
```
python -m serve path/to/this/folder            # web app + HTTP API
python -m serve.predict path/to/this/folder image.jpg --top-k 3
```
or in Python, with this project's `models` package importable (the learner's input type lives there):
```python
from fastai.learner import load_learner
learn = load_learner("model.pkl")
label, index, probs = learn.predict("image.jpg")
```
"""


def export_model(learn, cache, cfg, metrics: dict, mean, std, lr: float, training_seconds: float,
                 device: str) -> Path:
    """Write the model folder to `cfg.out`; returns its path."""
    from train.learner import detach_training_callbacks
    out = Path(cfg.out).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        interp = metrics.pop("_interp")
        _save_figures(interp, tmp, len(cache.vocab))
        examples = _save_examples(cache, tmp)

        train_dls = learn.dls
        mean, std = [float(v) for v in mean], [float(v) for v in std]
        detach_training_callbacks(learn)
        learn.model.cpu()
        sample = (Image.fromarray(cache.images[0].permute(1, 2, 0).numpy()), cache.vocab[int(cache.labels[0])])
        learn.dls = inference_dataloaders(cache.vocab, cfg.size, mean, std, sample)
        # `learn.path` is pickled: "." rather than this machine's folder (`load_learner` never reads it).
        # Exported to an absolute name, since fastai writes to learn.path / fname.
        learn.path = Path(".")
        learn.export(tmp / (MODEL_FILE + ".tmp"), pickle_module=ByReference)
        os.replace(tmp / (MODEL_FILE + ".tmp"), tmp / MODEL_FILE)  # learn.export writes in place; rename makes it atomic
        learn.path = tmp
        learn.dls = train_dls

        meta = {
            "metadata_version": METADATA_VERSION,
            "name": out.name,
            "task": "image-classification",
            "classes": list(cache.vocab),
            "arch": ARCH,
            "image_size": cfg.size,
            "resize_method": "squish",
            "input_channels": 3,
            "normalize": {"mean": mean, "std": std},
            "lr": lr,
            "config": cfg.as_portable_dict(),
            "seed": cfg.seed,
            "data": cache.summary.as_dict(),
            "metrics": metrics,
            "training_seconds": round(training_seconds, 1),
            "device": device,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "examples": examples,
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / CARD_FILE).write_text(model_card(meta))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _ByReferencePickler(cloudpickle.Pickler):
    """fastai's cloudpickle, except for a classmethod's function. The input pipeline keeps
    `RGBImage.create` as its plain function, which cloudpickle cannot find under its name (that is
    the bound method) and so copies by value, our code and the checkout's path (`__file__`) with it.
    Stored as `attrgetter("create.__func__")(RGBImage)`, it is imported from `models` like the rest.
    (Not as `getattr(RGBImage.create, "__func__")`: cloudpickle stores a bound method as its function
    and its class, which would come back here.)"""

    def reducer_override(self, obj):
        if isinstance(obj, types.FunctionType):
            bound = _bound_method_of(obj)
            if bound is not None:
                return operator.attrgetter(f"{obj.__name__}.__func__"), (bound.__self__,)
        return super().reducer_override(obj)


def _bound_method_of(func):
    """The classmethod (bound to its class) that `func` is the function of, found by its module and
    qualified name, or None."""
    found = sys.modules.get(getattr(func, "__module__", None) or "")
    for part in getattr(func, "__qualname__", "").split("."):
        found = getattr(found, part, None)
    return found if isinstance(found, types.MethodType) and found.__func__ is func else None


class ByReference:
    """The `pickle_module` for `learn.export` (torch.save reads its `__name__` and `Pickler`)."""
    Pickler = _ByReferencePickler


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder to `out`. An existing `out` is moved aside first and deleted
    only once the new one is in place, so some complete model is always at `out` or beside it."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}-{int(time.time())}"
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
