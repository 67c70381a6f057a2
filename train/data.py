"""Data: find the images, validate them, decode each one once, and serve batches as tensors.

Every source (MNIST's IDX files, MNIST's folder layout, a person's class folders, a folder with a
labels CSV) ends in one `ImageCache`: uint8 images (N, 3, S, S) already resized by the model's own
item transforms, labels (class indices, or multi-hot rows for a multi-label CSV), a train/valid
mask, and a `DataSummary` of what was found and skipped. A folder that is not split already is
split after decoding, among the readable images only.
The decoded images of a folder are held in memory, or (`python -m train`'s default) in the disk
cache of `train.cache`, memory-mapped and reused by later runs: the batches are slices either way.

Why a cache: fastai's `from_folder` opens, decodes and resizes every file on every epoch (about 70
of the article's 163 s on MNIST) and crashes mid-epoch on one truncated JPEG. Decoding once up
front both validates every file and makes each later epoch a tensor slice.
"""
from __future__ import annotations

import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import Datasets, TfmdDL, DataLoaders
from fastai.data.transforms import Categorize, MultiCategorize, OneHotEncode
from fastai.torch_core import TensorCategory, TensorImage, TensorMultiCategory
from fasttransform import Transform

from models.contract import item_transforms, batch_transforms
from models.imageio import ORIGINAL_SIZE, ImageError, RGBImage, is_image_file
from models.labels import LabelsError, missing_line, read_labels_csv, split_labels
from train.cache import CacheError, Decoded, load_or_build
from train.mnist import MnistArrays, find_mnist

log = logging.getLogger(__name__)

# A class needs at least this many readable images: with the default 20% validation split that
# is 1 validation image and 4 to learn from. Fewer cannot be both learned and measured.
MIN_IMAGES_PER_CLASS = 5
SPLIT_FOLDERS = (("train", "valid"), ("training", "testing"))


class DataError(ValueError):
    """The data cannot be trained on; the message says what is wrong and what to do."""


@dataclass
class DataSummary:
    source: str  # the data's name (the folder's own name, or 'mnist'): it goes into metadata.json and the card
    classes: list[str]
    train_counts: dict[str, int]
    valid_counts: dict[str, int]
    min_size: tuple[int, int] | None = None  # (width, height) of the smallest image seen
    max_size: tuple[int, int] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file relative to the data folder, reason)
    # multi-label: the counts above are images carrying each label; these are images
    multi_label: bool = False
    n_images: tuple[int, int] | None = None   # (train, valid)
    n_unlabelled: int = 0                     # images with none of the labels (an empty cell)

    def as_dict(self) -> dict:
        n_train, n_valid = self.n_images or (sum(self.train_counts.values()), sum(self.valid_counts.values()))
        extra = {"multi_label": True, "n_unlabelled": self.n_unlabelled} if self.multi_label else {}
        return {"source": self.source, "classes": self.classes, "train_counts": self.train_counts,
                "valid_counts": self.valid_counts, "n_train": n_train, "n_valid": n_valid, **extra,
                "min_size": list(self.min_size) if self.min_size else None,
                "max_size": list(self.max_size) if self.max_size else None,
                "n_skipped": len(self.skipped),
                "skipped": [{"file": f, "reason": r} for f, r in self.skipped]}

    def table(self) -> str:
        width = max([len("class")] + [len(c) for c in self.classes])
        lines = [f"{'class':<{width}}  {'train':>7}  {'valid':>7}"]
        for c in self.classes:
            lines.append(f"{c:<{width}}  {self.train_counts[c]:>7}  {self.valid_counts[c]:>7}")
        if self.multi_label:
            lines.append(f"{'images':<{width}}  {self.n_images[0]:>7}  {self.n_images[1]:>7}  "
                         f"(multi-label: {self.n_unlabelled} with no label)")
        else:
            lines.append(f"{'total':<{width}}  {sum(self.train_counts.values()):>7}  {sum(self.valid_counts.values()):>7}")
        if self.min_size:
            lines.append(f"image sizes (w x h): {self.min_size[0]}x{self.min_size[1]} to {self.max_size[0]}x{self.max_size[1]}")
        lines.append(f"skipped files: {len(self.skipped)}")
        return "\n".join(lines)


@dataclass
class ImageCache:
    images: torch.Tensor     # uint8 (N, 3, S, S), after the model's item transforms
    labels: torch.Tensor     # int64 (N,), index into `vocab`; multi-label: float32 (N, len(vocab)) multi-hot
    is_valid: torch.Tensor   # bool (N,)
    vocab: list[str]
    summary: DataSummary
    multi_label: bool = False

    def stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of (up to 20,000 of) the training images in [0, 1], for normalisation.
        Summed in chunks of images: indexing them all at once would copy them out of a memory-mapped
        cache (and, as float, take 4x their size: 4 GB for 20,000 images at 128 px)."""
        train = torch.nonzero(~self.is_valid).flatten()
        pick = train[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:20_000]].sort().values
        total = torch.zeros(3, dtype=torch.float64)
        squares = torch.zeros(3, dtype=torch.float64)
        for chunk in pick.split(64):  # 64 images at 128 px: 13 MB as float
            x = self.images[chunk].float().div_(255)
            total += x.sum((0, 2, 3), dtype=torch.float64)
            squares += x.square_().sum((0, 2, 3), dtype=torch.float64)
        n = len(pick) * self.images.shape[-1] * self.images.shape[-2]
        mean = total / n
        std = ((squares - n * mean.square()) / (n - 1)).clamp_min(0).sqrt()  # unbiased, as torch.std
        return mean.tolist(), std.tolist()

    def is_grey(self) -> bool:
        """Whether every training image has three equal channels (MNIST, any greyscale set), read in
        chunks of images, stopping at the first that does not."""
        for chunk in torch.nonzero(~self.is_valid).flatten().split(1024):
            x = self.images[chunk]
            if not (torch.equal(x[:, 0], x[:, 1]) and torch.equal(x[:, 1], x[:, 2])):
                return False
        return True


# --------------------------------------------------------------------------- finding items

def _class_files(folder: Path) -> dict[str, list[Path]]:
    # Not classes: hidden folders, and ours whose names start with "_" (train.clean's `_removed/`).
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    return {c.name: sorted(f for f in c.rglob("*") if f.is_file() and is_image_file(f)) for c in classes}


def find_items(root: Path) -> list[tuple[Path, str, bool | None]]:
    """(file, label, is_valid) for a folder of class folders; is_valid is None everywhere when the
    folder is not split already (`split_readable` splits it once the files are decoded)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"{root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: give a folder with one sub-folder per class")
    for train_name, valid_name in SPLIT_FOLDERS:
        if (root / train_name).is_dir() and (root / valid_name).is_dir():
            items = [(f, c, False) for c, fs in _class_files(root / train_name).items() for f in fs]
            items += [(f, c, True) for c, fs in _class_files(root / valid_name).items() for f in fs]
            return items
    return [(f, c, None) for c, fs in _class_files(root).items() for f in fs]


def find_csv_items(root: Path, labels_csv, file_col: str | None = None, label_col: str | None = None,
                   delim: str = " ") -> tuple[list, list[tuple[str, str]], bool]:
    """(items, missing, multi_label) for a folder whose labels are in a CSV (`models.labels`): items as
    `find_items` gives them, a label being a tuple of labels (maybe empty) when the table is
    multi-label; `missing` the rows left out as (file as written, reason), logged in one line."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"{root} is not a folder: with --labels, give the folder the CSV's paths are relative to"
                        if root.exists() else f"{root} does not exist")
    try:
        rows = read_labels_csv(labels_csv, root, file_col or None, label_col or None, delim)
    except LabelsError as e:
        raise DataError(str(e)) from None
    if rows.missing:
        log.warning("%s; going on with the other %d", missing_line(rows.missing, Path(labels_csv).name), len(rows.files))
    labels = [tuple(split_labels(c, delim)) for c in rows.labels] if rows.multi_label else rows.labels
    valid = rows.is_valid or [None] * len(rows.files)
    if rows.multi_label and (n := sum(1 for l in labels if not l)):
        log.info("%d image(s) have an empty label cell: in a multi-label table that means none of the labels", n)
    return list(zip(rows.files, labels, valid)), rows.missing, rows.multi_label


def _rarest_label(labels: list[tuple[str, ...]]) -> list[str]:
    """Each multi-label image's rarest label ("" for none): the strata `split_readable` splits by, so
    that every label with a few images gets some in the validation set."""
    counts: dict[str, int] = {}
    for tags in labels:
        for t in tags:
            counts[t] = counts.get(t, 0) + 1
    return [min(tags, key=lambda t: (counts[t], t)) if tags else "" for tags in labels]


def split_readable(labels: list[str], valid_pct: float, seed: int) -> list[bool]:
    """is_valid for each image, drawn per class by `seed`: `valid_pct` of each class's images, at least
    one and never all of them. Given only the readable images, so an unreadable file takes no place."""
    if not 0 < valid_pct < 1:
        raise DataError(f"--valid-pct must be between 0 and 1, got {valid_pct}")
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    valid = [False] * len(labels)
    rng = random.Random(seed)
    for c in sorted(by_class):
        # Split each class on its own so every class gets validation images in proportion.
        idx = by_class[c]
        order = list(idx)
        rng.shuffle(order)
        n_valid = min(max(1, round(len(idx) * valid_pct)), len(idx) - 1)
        for i in order[:n_valid]:
            valid[i] = True
    return valid


# --------------------------------------------------------------------------- decoding once

def _decode(path: Path, size: int, tfms) -> tuple[torch.Tensor | None, tuple[int, int] | None, str | None]:
    try:
        img = RGBImage.create(path, size=size)  # reduced decoding: it is resized to `size` next
    except ImageError as e:
        return None, None, str(e)
    original = img.info[ORIGINAL_SIZE]
    x = img
    for t in tfms:
        x = t(x, split_idx=1)  # the validation/inference behaviour of each transform
    return x, original, None


# Decoded images waiting, in order, to be written out: enough to keep every thread busy, and only
# this many (not the whole data set) are ever held in memory at once.
DECODE_WINDOW_PER_WORKER = 4


def _decode_in_order(items, size: int, tfms, workers: int):
    """`_decode` of each item, in item order, in threads (Pillow releases the GIL while decoding),
    with at most `DECODE_WINDOW_PER_WORKER` x `workers` results waiting to be consumed."""
    from collections import deque
    window = DECODE_WINDOW_PER_WORKER * workers
    with ThreadPoolExecutor(workers) as pool:
        pending = deque()
        for path, _, _ in items:
            pending.append(pool.submit(_decode, path, size, tfms))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _decode_into(out: torch.Tensor, items, size: int, roots, workers: int, progress: bool) -> Decoded:
    """Decode every item into `out` (uint8 (len(items), 3, S, S): memory, or the disk cache's map),
    the readable ones packed from slot 0 on, each written as soon as it is decoded. Skipped files
    are recorded relative to the first of `roots` holding them."""
    tfms = item_transforms(size)
    labels, valid, skipped, sizes = [], [], [], []
    results = _decode_in_order(items, size, tfms, workers)
    if progress:
        from fastprogress.fastprogress import progress_bar
        results = progress_bar(results, total=len(items), comment="decoding images")
    for (path, label, is_valid), (x, wh, err) in zip(items, results):
        if err is not None:
            skipped.append((_relative(Path(path), roots), err))
            continue
        out[len(labels)].copy_(x.as_subclass(torch.Tensor))
        labels.append(label)
        valid.append(is_valid)
        sizes.append(wh)
    return Decoded(out[:len(labels)], labels, valid, skipped, sizes)


def decode_items(items, size: int, source: str, root: Path, name: str, valid_pct: float = 0.2, seed: int = 42,
                 workers: int | None = None, progress: bool = True, cache_dir: Path | str | None = None,
                 missing=(), multi_label: bool = False, roots=()) -> ImageCache:
    """Decode and resize every file once, then split the readable ones of an unsplit folder (items
    whose is_valid is None).

    `cache_dir`: keep the decoded images in a memory-mapped cache there (`train.cache`), reused by
    later runs while the files stay the same; None decodes into memory. `source` names the data in
    error messages (this machine's path, for the person at it); `name` is what the summary records,
    and skipped files are recorded relative to `root` (or to one of `roots`, the labels CSV's folder),
    after the `missing` ones, (name, reason) pairs already. `multi_label`: each item's label is a
    tuple of labels."""
    if not items:
        raise DataError(f"no images found in {source} (looked for {', '.join(sorted({'.jpg', '.png', '.gif', '.webp', '.bmp', '.tif'}))}, any case)")
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    root = Path(root)
    folders = (root, *map(Path, roots))

    def fill(out):
        return _decode_into(out, items, size, folders, workers, progress)

    if cache_dir is None:
        # One allocation, filled in place: no list of tensors and no stack (which held it all twice).
        decoded = fill(torch.empty((len(items), 3, size, size), dtype=torch.uint8))
    else:
        try:
            decoded = load_or_build(Path(cache_dir), items, root, size, name, fill)
        except CacheError as e:
            raise DataError(str(e)) from None
    for f, reason in decoded.skipped:
        log.warning("skipping %s: %s", f, reason)
    valid = decoded.valid
    if None in valid:  # not split already
        valid = split_readable(_rarest_label(decoded.labels) if multi_label else decoded.labels, valid_pct, seed)
    skipped = list(missing) + list(decoded.skipped)
    return _build_cache(decoded.images, decoded.labels, valid, source, name, skipped, decoded.sizes, multi_label,
                        from_csv=bool(roots))


def _relative(path: Path, roots) -> str:
    """`path` relative to the first of `roots` holding it, else its name: never this machine's path."""
    for r in roots:
        try:
            return path.relative_to(r).as_posix()
        except ValueError:
            continue
    return path.name


def _build_cache(images, labels, valid, source, name, skipped, sizes, multi_label: bool = False,
                 from_csv: bool = False) -> ImageCache:
    tag_sets = [set(l) for l in labels] if multi_label else [{l} for l in labels]
    vocab = sorted(set().union(*tag_sets))
    if not labels:
        raise DataError(f"no readable images in {source} ({len(skipped)} skipped)")
    if len(vocab) < 2:
        where = "labels" if from_csv else "sub-folders, one per class"
        raise DataError(f"only one class ({vocab[0]!r}) in {source}: a classifier needs at least two {where}"
                        if vocab else f"no labels in {source}: every label cell is empty")
    index = {c: i for i, c in enumerate(vocab)}
    if multi_label:  # multi-hot rows, what fastai's MultiCategorize + OneHotEncode make
        y = torch.zeros(len(labels), len(vocab), dtype=torch.float32)
        for row, tags in enumerate(tag_sets):
            y[row, [index[t] for t in tags]] = 1.0
    else:
        y = torch.tensor([index[l] for l in labels], dtype=torch.int64)
    v = torch.tensor(valid, dtype=torch.bool)
    train_counts = {c: 0 for c in vocab}
    valid_counts = {c: 0 for c in vocab}
    for tags, is_valid in zip(tag_sets, valid):
        for t in tags:
            (valid_counts if is_valid else train_counts)[t] += 1
    summary = DataSummary(name, vocab, train_counts, valid_counts, skipped=skipped)
    if multi_label:
        summary.multi_label = True
        summary.n_images = (int((~v).sum()), int(v.sum()))
        summary.n_unlabelled = sum(1 for t in tag_sets if not t)
    if sizes:
        summary.min_size = (min(w for w, _ in sizes), min(h for _, h in sizes))
        summary.max_size = (max(w for w, _ in sizes), max(h for _, h in sizes))
    few = [f"{c} ({train_counts[c] + valid_counts[c]})" for c in vocab
           if train_counts[c] + valid_counts[c] < MIN_IMAGES_PER_CLASS]
    if few:
        unreadable = f" ({len(skipped)} unreadable file(s) were skipped)" if skipped else ""
        raise DataError(f"too few readable images in class {', '.join(few)}: each class needs at least "
                        f"{MIN_IMAGES_PER_CLASS} (at least 1 to validate on and 4 to learn from){unreadable}")
    # Only a split made by the person can leave a side empty: `split_readable` never does (for a
    # multi-label table it splits by each image's rarest label, so a label seldom alone can miss out).
    add_valid = ("mark some of its rows is_valid=true, or drop the is_valid column and use --valid-pct" if from_csv
                 else "add some to the validation folder, or drop the train/valid split and use --valid-pct")
    if multi_label and (not v.any() or v.all()):  # single-label: the per-class checks below say it
        raise DataError(f"no {'validation' if not v.any() else 'training'} images in {source}: "
                        + (add_valid if not v.any() else "mark some rows is_valid=false" if from_csv
                           else "add some to the training folder"))
    no_valid = [c for c in vocab if valid_counts[c] == 0]
    if no_valid and multi_label:
        log.warning("label %s has no validation images: its F1 is not measured", ", ".join(no_valid))
    elif no_valid:
        raise DataError(f"class {', '.join(no_valid)} has no validation images: {add_valid}")
    no_train = [c for c in vocab if train_counts[c] == 0]
    if no_train:
        raise DataError(f"class {', '.join(no_train)} has no training images: "
                        + ("mark some of its rows is_valid=false" if from_csv else "add some to the training folder"))
    return ImageCache(images, y, v, vocab, summary, multi_label)


def mnist_cache(arrays: MnistArrays, size: int = 28) -> ImageCache:
    """MNIST straight from IDX arrays: grey to RGB by repeating the channel, exactly what decoding
    the PNGs with `RGBImage` gives; at another size than 28, resized as the PNGs would be."""
    grey = np.concatenate([arrays.train_images, arrays.valid_images])
    if size == grey.shape[-1]:
        x = _as_rgb(grey)
    else:
        _check_fits_in_memory(len(grey) * 3 * size * size, size)
        x = _resized(grey, size)
    labels = [str(int(l)) for l in np.concatenate([arrays.train_labels, arrays.valid_labels])]
    valid = [False] * len(arrays.train_labels) + [True] * len(arrays.valid_labels)
    return _build_cache(x, labels, valid, f"MNIST IDX files in {arrays.source}", "mnist", [], [(28, 28)] * len(labels))


def _check_fits_in_memory(n_bytes: int, size: int) -> None:
    """MNIST's images are held in memory (no disk cache): refuse a --size whose images alone would
    not fit in this machine's, with what it would take, rather than fail to allocate (or swap) later."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no such query here: let the allocation say
        return
    if n_bytes > total // 2:
        raise DataError(f"MNIST at --size {size} needs {n_bytes / 2**30:.1f} GB of memory for its images, "
                        f"more than half of this machine's {total / 2**30:.1f} GB: use a smaller --size "
                        "(28, its native size, or up to a few times that)")


def _as_rgb(grey: np.ndarray) -> torch.Tensor:
    """uint8 grey images (N, H, W) as (N, 3, H, W), the channel repeated, as PIL's convert("RGB") does."""
    return torch.from_numpy(grey)[:, None].expand(-1, 3, -1, -1).contiguous()


def _resized(grey: np.ndarray, size: int) -> torch.Tensor:
    """Grey images (N, H, W) squished to `size` as the model's item transforms do it (`Resize`'s
    squish: PIL's bilinear resize of the whole image), on the grey image before the channel is
    repeated (PIL filters each channel alike): the pixels a PNG of the digit gets, decoded, and so
    what a served upload of it gets (tested). ~1.5 s for MNIST's 70,000 (each written into a tensor of
    three channels: ~2 s; through the transforms one image at a time, as the PNGs are, 28 s)."""
    from PIL import Image
    out = np.empty((len(grey), size, size), dtype=np.uint8)
    for i, a in enumerate(grey):
        out[i] = np.asarray(Image.fromarray(a, "L").resize((size, size), Image.BILINEAR))
    return _as_rgb(out)


def load_data(source: str, size: int, valid_pct: float = 0.2, seed: int = 42, mnist_dir=None,
              progress: bool = True, workers: int | None = None, cache_dir: Path | str | None = None,
              labels_csv=None, file_col: str | None = None, label_col: str | None = None,
              label_delim: str = " ") -> ImageCache:
    """Resolve `source` ('mnist' or a folder, its labels from class folders or from `labels_csv`)
    into a validated, decoded `ImageCache`.
    `cache_dir`: see `decode_items`. MNIST's IDX files are read into memory whatever it says: reading
    them takes about a second and they are 165 MB as RGB, so a disk cache would save nothing."""
    if labels_csv:
        if source == "mnist":
            raise DataError("--labels takes a folder of images, not 'mnist'")
        root = Path(source).expanduser()
        items, missing, multi = find_csv_items(root, labels_csv, file_col, label_col, label_delim)
        return decode_items(items, size, f"{source} (labels from {Path(labels_csv).name})", root,
                            root.resolve().name, valid_pct, seed, workers, progress, cache_dir=cache_dir,
                            missing=missing, multi_label=multi, roots=(Path(labels_csv).expanduser().parent,))
    if source == "mnist":
        found = find_mnist(mnist_dir)
        if isinstance(found, MnistArrays):
            return mnist_cache(found, size)
        root = found
        items = [(f, f.parent.name, split == "testing") for split in ("training", "testing")
                 for f in sorted((root / split).rglob("*")) if f.is_file() and is_image_file(f)]
        return decode_items(items, size, f"MNIST folder {root}", root, "mnist", workers=workers, progress=progress,
                            cache_dir=cache_dir)
    root = Path(source).expanduser()
    items = find_items(root)
    return decode_items(items, size, str(source), root, root.resolve().name, valid_pct, seed, workers, progress,
                        cache_dir=cache_dir)


# --------------------------------------------------------------------------- batches

class CachedImage(Transform):
    "Item index -> its decoded image (only used by fastai's per-item paths: show, interpretation)."
    def __init__(self, images): self.images = images
    def encodes(self, i: int): return TensorImage(self.images[i])


class CachedLabel(Transform):
    "Item index -> its class name, for `Categorize` (multi-label: its list of names, for `MultiCategorize`)."
    def __init__(self, labels, vocab): self.labels, self.vocab = labels, vocab
    def encodes(self, i: int):
        if self.labels.ndim == 2:
            return [self.vocab[j] for j in torch.nonzero(self.labels[i]).flatten().tolist()]
        return self.vocab[int(self.labels[i])]


class OneChannel(Transform):
    """Training batches of greyscale images are augmented as one channel, then repeated to three
    (`ThreeChannels`): every augmentation of fastai's `aug_transforms` treats the channels alike
    (one warp, one lighting change per image), so the numbers are the same, for a third of the work
    (MNIST at 36 px, batch 256, on 2 cores: 9.3 ms a batch against 12.1 ms, of which a few are fastai's
    Python around the ops)."""
    order, split_idx = 5, 0  # before IntToFloatTensor (10); the training set only

    def encodes(self, x: TensorImage):
        return x[:, :1]


class ThreeChannels(Transform):
    order, split_idx = 98, 0  # after the augmentations (30-40), before Normalize (99)

    def encodes(self, x: TensorImage):
        return x.expand(-1, 3, -1, -1)


class CachedImageDL(TfmdDL):
    """A `TfmdDL` whose batches are tensor slices of the cache instead of collated items:
    one indexing op per batch rather than a Python pipeline per image."""

    def create_batches(self, samps):
        cache_x, cache_y = self.dataset.tfms[0].fs[0].images, self.dataset.tfms[1].fs[0].labels
        items = self.dataset.items
        samps = list(samps)
        stop = len(samps) - (len(samps) % self.bs if self.drop_last else 0)
        for start in range(0, stop, self.bs):
            idx = torch.as_tensor([items[s] for s in samps[start:start + self.bs]])
            y = cache_y[idx]
            yield TensorImage(cache_x[idx]), (TensorMultiCategory(y) if y.ndim == 2 else TensorCategory(y))


def build_dataloaders(cache: ImageCache, bs: int, mean, std, augment: bool = False,
                      flip: bool = True, device=None) -> DataLoaders:
    """fastai DataLoaders over the cache, with the model's batch transforms (plus augmentation,
    on the training set only) so the Learner sees exactly what the exported model will."""
    n_train = int((~cache.is_valid).sum())
    if bs > n_train:
        # fastai drops the last partial training batch (a batch of 1 breaks BatchNorm): with fewer
        # images than one batch there would be no batch at all.
        log.warning("batch size %d is more than the %d training images: using %d", bs, n_train, n_train)
        bs = n_train
    idx = list(range(len(cache.labels)))
    splits = ([i for i in idx if not cache.is_valid[i]], [i for i in idx if cache.is_valid[i]])
    targets = ([MultiCategorize(vocab=cache.vocab), OneHotEncode(len(cache.vocab))] if cache.multi_label
               else [Categorize(vocab=cache.vocab)])
    dsets = Datasets(idx, tfms=[[CachedImage(cache.images)], [CachedLabel(cache.labels, cache.vocab), *targets]],
                     splits=splits)
    after_batch = batch_transforms(mean, std)
    if augment:
        from fastai.vision.augment import aug_transforms
        after_batch = aug_transforms(do_flip=flip, max_rotate=10.0, max_zoom=1.1, max_warp=0.1) + after_batch
        if cache.is_grey():
            after_batch += [OneChannel(), ThreeChannels()]
    return dsets.dataloaders(bs=bs, val_bs=bs * 2, after_batch=after_batch, dl_type=CachedImageDL,
                             num_workers=0, device=device)
