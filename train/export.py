"""Export a trained learner as a model folder (see `models/contract.py`), atomically.

Everything is written into a sibling temp folder first; only a complete folder is renamed into
place, and an older model at the same path is replaced only after the new one is whole. The
network goes out in three formats: `model.pkl` (the fastai learner, loadable with fastai alone),
`model.safetensors` (weights only, rebuilt from metadata.json) and `model.onnx` (onnxruntime).
"""
from __future__ import annotations

import logging
import os
import pickle
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.atomic import atomic_folder
from models.contract import (ARCH, CARD_FILE, CONFUSION_FILE, CURVES_FILE, EXAMPLES_DIR, FORMATS, HISTORY_FILE,
                             MODEL_FILE, ONNX_FILE, STOPPED_PATIENCE, TOP_LOSSES_FILE, WEIGHTS_FILE, FitSummary, Head,
                             Metrics, ModelMetadata, Normalization, inference_dataloaders, library_versions,
                             write_metadata)
from models.onnx import export_onnx
from models.weights import save_weights

log = logging.getLogger(__name__)
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


F1_THRESHOLDS = [round(0.05 * i, 2) for i in range(1, 20)]  # 0.05 .. 0.95, the sweep for the best-F1 threshold


def _f1_macro(predicted, truth) -> float:
    """Macro F1 of boolean (N, C) predictions, as scikit-learn's `f1_score(average="macro")` (what
    fastai's `F1ScoreMulti` calls): a label neither present nor predicted scores 0."""
    tp = (predicted & truth).sum(0).double()
    wrong = (predicted ^ truth).sum(0).double()  # false positives + false negatives
    denom = 2 * tp + wrong
    return float(torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros_like(tp)).mean())


def evaluate_multi_label(learn, vocab, threshold: float, dl=None, outputs=None) -> dict:
    """Validation metrics of a multi-label learner at `threshold` (a class is predicted when its
    sigmoid is above it, as fastai's `accuracy_multi` and `BCEWithLogitsLossFlat.decodes` do), and
    the threshold of `F1_THRESHOLDS` with the best macro F1 (fastbook's sweep; ties go to the one
    nearest `threshold`). `outputs`: the raw outputs and targets of the last validation pass."""
    if outputs is None:
        probs, targs = learn.get_preds(dl=dl if dl is not None else learn.dls[1].new(shuffle=False, drop_last=False))
    else:
        probs, targs = torch.sigmoid(outputs[0].float()), outputs[1]
    truth = targs.bool()
    predicted = probs > threshold
    scores = {t: _f1_macro(probs > t, truth) for t in F1_THRESHOLDS}
    best = max(scores, key=lambda t: (scores[t], -abs(t - threshold)))
    per_label = (predicted == truth).float().mean(0).tolist()
    return {"valid_accuracy": float((predicted == truth).float().mean()), "n_valid": int(len(truth)),
            "per_class_accuracy": {str(c): float(a) for c, a in zip(vocab, per_label)},
            "confusion_matrix": [], "f1": _f1_macro(predicted, truth), "best_f1": scores[best],
            "best_f1_threshold": best}


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
        has = cache.labels[valid_idx, ci] > 0 if cache.multi_label else cache.labels[valid_idx] == ci
        idx = valid_idx[has][:EXAMPLES_PER_CLASS]
        for n, i in enumerate(idx.tolist()):
            name = f"{_safe(c)}_{n}.png"
            Image.fromarray(cache.images[i].permute(1, 2, 0).numpy()).save(out / name)
            names.append(f"{EXAMPLES_DIR}/{name}")
    return names


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in name) or "class"


def model_card(meta: ModelMetadata, formats: tuple[str, ...] = FORMATS) -> str:
    """The folder's README.md: what the model is, how it was trained and scored, and how to load each
    of the `formats` the folder holds."""
    m, d, cfg = meta.metrics, meta.data, meta.config
    how = ("fine-tuned from ImageNet weights" if cfg.get("pretrained")
           else f"fine-tuned from {cfg['init']}" if cfg.get("init") else "trained from scratch")
    rows = "\n".join(f"| {c} | {d['train_counts'][c]} | {d['valid_counts'][c]} | "
                     f"{'-' if m.per_class_accuracy[c] is None else format(m.per_class_accuracy[c], '.2%')} |"
                     for c in meta.classes)
    mean, std = [round(v, 4) for v in meta.normalize.mean], [round(v, 4) for v in meta.normalize.std]
    if meta.multi_label:
        kind = "multi-label image classifier (a sigmoid per class: any number of labels per image)"
        scored = (f"At threshold {meta.decision_threshold:g}: accuracy_multi **{m.valid_accuracy:.2%}**, macro F1 "
                  f"**{m.f1:.4f}** on {m.n_valid} images; the best F1, {m.best_f1:.4f}, is at threshold "
                  f"{meta.best_f1_threshold:g}.")
        figures = ""
    else:
        kind = "image classifier"
        scored = f"Validation accuracy: **{m.valid_accuracy:.2%}** on {m.n_valid} images."
        figures = f"""
![confusion matrix]({CONFUSION_FILE})

The validation images it got most wrong:

![top losses]({TOP_LOSSES_FILE})
"""
    return f"""# {meta.name}

A {meta.arch} {kind} for {len(meta.classes)} classes, {how} with fastai on
{d['source']}. {scored}

## Training
- {cfg['epochs']} epoch(s), one-cycle schedule, peak learning rate {meta.lr:g}, batch size {_batch(cfg['bs'], meta.world_size)}, seed {cfg['seed']}
- images squished to {meta.image_size}x{meta.image_size} px, normalised with mean {mean}, std {std}
- augmentation: {'on' if cfg['augment'] else 'off'}; device: {meta.device}; training time: {meta.training_seconds:.0f} s
- {d['n_train']} training and {d['n_valid']} validation images; {d['n_skipped']} unreadable file(s) skipped
- made {meta.created} with fastai {meta.versions['fastai']}, torch {meta.versions['torch']}

| class | train | valid | valid accuracy |
|---|---|---|---|
{rows}

{_history_section(meta)}
{figures}
## Use
```
python -m serve path/to/this/folder            # web app + HTTP API
python -m serve.predict path/to/this/folder image.jpg --top-k 3
```
{_usage(meta, formats)}"""


def _history_section(meta: ModelMetadata) -> str:
    """How the fit went and ended, and the learning curves (for folders that have them)."""
    f = meta.fit
    if f is None:
        return ""
    if f.stopped == STOPPED_PATIENCE:
        how = (f"Stopped early after epoch {f.epochs_run} of {f.epochs_planned}: the validation loss had not "
               f"improved for {f.patience} epoch(s) (`--patience {f.patience}`).")
    else:
        how = f"Ran all {f.epochs_run} epoch(s)."
    kept = (f"This folder holds epoch {f.kept_epoch}'s weights, the lowest validation loss."
            if f.kept_epoch == f.best_epoch else
            f"This folder holds the last epoch's weights (epoch {f.kept_epoch}); the lowest validation loss "
            f"was at epoch {f.best_epoch}.")
    return f"""## Learning curves
{how} {kept} Every epoch's losses, metrics, learning rate and time are in
[`{HISTORY_FILE}`]({HISTORY_FILE}).

![learning curves]({CURVES_FILE})
"""


def _batch(bs: int, world_size: int) -> str:
    return str(bs) if world_size == 1 else f"{bs * world_size} ({bs} in each of {world_size} processes)"


def _usage(meta: ModelMetadata, formats) -> str:
    """How to load each format, as code a reader can paste (run by tests/test_formats.py, from this
    folder, outside the checkout)."""
    parts = []
    if meta.multi_label:  # every class above the threshold, not the most likely one
        act = "sigmoid"
        pick = 'print([c for c, p in zip(info["classes"], probs.tolist()) if p > info["threshold"]])'
        pick_pickle = ('labels, above, probs = learn.predict("image.png")  # the classes above the threshold, '
                       'a mask, every probability\nprint(list(labels))')
    else:
        act = "softmax"
        pick = 'print(info["classes"][int(probs.argmax())], float(probs.max()))'
        pick_pickle = 'label, index, probs = learn.predict("image.png")\nprint(label, float(probs[index]))'
    if "pickle" in formats:
        parts.append(f"""With fastai alone (`{MODEL_FILE}` is a pickle: loading it runs code, so load only models you trust):
```python
from fastai.learner import load_learner
learn = load_learner("{MODEL_FILE}")
{pick_pickle}
```""")
    if "safetensors" in formats:
        parts.append(f"""With torch and safetensors, no pickle (fastai's `create_vision_model` builds the network from
`metadata.json`; images are squished to {meta.image_size}x{meta.image_size} px as in training):
```python
import json
import numpy as np, torch
from PIL import Image
from safetensors.torch import load_file
from fastai.vision.learner import create_vision_model
from torchvision.models import {meta.arch}
info = json.load(open("metadata.json"))
model = create_vision_model({meta.arch}, info["n_out"], pretrained=False, **info["head"]).eval()
model.load_state_dict(load_file("{WEIGHTS_FILE}"))
size, mean, std = info["image_size"], info["normalize"]["mean"], info["normalize"]["std"]
img = Image.open("image.png").convert("RGB").resize((size, size), Image.BILINEAR)
x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
probs = model(x).{act}(-1)[0]
{pick}
```""")
    if "onnx" in formats:
        parts.append(f"""With onnxruntime alone (no torch; normalisation and {act} are inside the graph):
```python
import json
import numpy as np, onnxruntime as ort
from PIL import Image
info = json.load(open("metadata.json"))
size = info["image_size"]
img = Image.open("image.png").convert("RGB").resize((size, size), Image.BILINEAR)
pixels = np.asarray(img).transpose(2, 0, 1)[None]  # uint8 (1, 3, size, size)
probs = ort.InferenceSession("{ONNX_FILE}").run(["probabilities"], {{"pixels": pixels}})[0][0]
{pick}
```""")
    return "\n\n".join(parts) + "\n"


def export_learner(learn, path: Path, keep_metrics: bool = True) -> Path:
    """`learn.export`, made portable: the stdlib pickle at protocol 4 instead of fastai's default
    cloudpickle (which pickles `PILImage.create` by value, as Python-version-specific bytecode), a
    plain optimiser function instead of a partial, and no path of this machine (`learn.path` is
    '.'). Written to a temp file and renamed, so `path` is whole or absent.

    The optimiser is fastai's own Adam with `train.learner.ADAMW`'s hyperparameters (betas 0.9/0.99,
    eps 1e-5, decoupled weight decay 0.01): ADAMW is a `functools.partial`, which the Hub's pickle
    scanner flags. Only a later `learn.fine_tune` by whoever loads the pickle uses it.

    `keep_metrics` False (multi-label) leaves the metrics out: `accuracy_multi` at a threshold is a
    partial and `F1ScoreMulti` holds scikit-learn's function; the threshold stays in the pickle as
    the loss's `thresh`, which `learn.predict` decodes with, and in metadata.json."""
    from fastai.optimizer import Adam
    saved = learn.opt_func, learn.opt, learn.path, learn.metrics
    learn.opt_func, learn.opt, learn.path = Adam, None, Path(".")
    if not keep_metrics:
        learn.metrics = []
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        learn.export(tmp.resolve(), pickle_module=pickle, pickle_protocol=4)
        os.replace(tmp, path)
    finally:
        learn.opt_func, learn.opt, learn.path, learn.metrics = saved
        tmp.unlink(missing_ok=True)
    return Path(path)


def export_model(learn, cache, cfg, metrics: dict, mean, std, lr: float, training_seconds: float,
                 device: str, history: list[dict] | None = None, fit: FitSummary | None = None) -> Path:
    """Write the model folder to `cfg.out`; returns its path. `history` (train/runlog.py's rows) becomes
    history.csv and learning_curves.png; `fit` says how the fit ended."""
    from train.learner import detach_training_callbacks
    from train.runlog import plot_learning_curves, write_history
    from train.distributed import world_size
    out = Path(cfg.out).expanduser().resolve()
    with atomic_folder(out) as tmp:
        interp = metrics.pop("_interp")
        if interp is not None:  # multi-label: no confusion matrix of one class against another
            _save_figures(interp, tmp, len(cache.vocab))
        examples = _save_examples(cache, tmp)
        multi = cache.multi_label
        if history:
            write_history(history, tmp / HISTORY_FILE)
            plot_learning_curves(history, tmp / CURVES_FILE, fit.kept_epoch if fit else None)

        mean, std = [float(v) for v in mean], [float(v) for v in std]
        meta = ModelMetadata(
            name=out.name, classes=[str(c) for c in cache.vocab], arch=ARCH, n_out=len(cache.vocab),
            head=Head(),  # vision_learner's defaults, what train.learner.build_learner trains
            activation="sigmoid" if multi else "softmax",  # BCEWithLogitsLossFlat's, CrossEntropyLossFlat's
            image_size=cfg.size, resize_method="squish", input_channels=3,
            normalize=Normalization(mean=mean, std=std),
            metrics=Metrics(**{k: v for k, v in metrics.items() if k != "best_f1_threshold"}),
            threshold=cfg.threshold if multi else None, best_f1_threshold=metrics.get("best_f1_threshold"),
            versions=library_versions(), config=cfg.as_portable_dict(), data=cache.summary.as_dict(), lr=lr,
            seed=cfg.seed, training_seconds=round(training_seconds, 1), device=device,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"), examples=examples, fit=fit,
            world_size=world_size())

        train_dls = learn.dls
        detach_training_callbacks(learn)
        learn.model.cpu()
        first = Image.fromarray(cache.images[0].permute(1, 2, 0).numpy())
        sample = (first, [c for c, on in zip(cache.vocab, cache.labels[0].tolist()) if on] if multi
                  else cache.vocab[int(cache.labels[0])])
        learn.dls = inference_dataloaders(cache.vocab, cfg.size, mean, std, sample, multi_label=multi)
        try:
            export_learner(learn, tmp / MODEL_FILE, keep_metrics=not multi)
        finally:
            learn.dls = train_dls
        save_weights(learn.model, tmp / WEIGHTS_FILE)
        export_onnx(learn.model, tmp / ONNX_FILE, image_size=meta.image_size, mean=mean, std=std,
                    classes=meta.classes, multi_label=meta.activation == "sigmoid")

        write_metadata(tmp, meta)
        (tmp / CARD_FILE).write_text(model_card(meta))
    return out
