"""The decode-once data cache on disk: a data folder's decoded, resized images, memory-mapped.

    <cache>/<name>-<S>px-<hash of the key>/
        images.npy   uint8 (capacity, 3, S, S): the readable files in item order, then unused slots
        labels.npy   int64 (n,): each image's class, an index into cache.json's `classes` (for a multi-label
                     CSV a class is an image's set of labels, a list)
        split.npy    int8 (n,): 0 train, 1 valid (the folder's own train/valid split), -1 not split
        sizes.npy    int32 (n, 2): each file's full upright (width, height), for the data summary
        cache.json   what the folder holds (n, classes, skipped files and why), and whose data it is
        key.json     the key: every source file's relative path, size, mtime, label and split, the image
                     size, the item transforms (resize method), the decoder's and Pillow's versions

`<cache>` is `--cache-dir`, else `$XDG_CACHE_HOME/resnet18-train/datasets`, else
`~/.cache/resnet18-train/datasets`. Nothing in it is a pickle: arrays are .npy files read with
`allow_pickle=False`, the rest is JSON.

Why: decoding is paid once per data folder instead of once per run, and the images are written
into the map as they are decoded, so a data set larger than memory trains (the process's anonymous
memory stays flat; the pages of the map are file pages the kernel can drop and re-read).

Trust: a cache is used only if its key.json equals the key computed now (any file touched, added or
removed, another --size, another decoder gives another key: a rebuild) and its arrays have the
shapes cache.json says. It is built in a `.partial-` folder beside its place and renamed into place
only once complete (`models.atomic.atomic_folder`), so a run killed while decoding leaves nothing
that a later run would read. Concurrent builders of one key (ranks of a distributed run, two
terminals) cannot corrupt it: the first complete folder to be renamed in wins, the others drop
theirs and map it.

Split: only the folder's own split is stored; an unsplit folder is split per run (`--seed`,
`--valid-pct`), after loading, so another seed does not decode again.

Disk: after each build, the other caches of the same data folder at the same size are removed
(their files have changed since: they would never be hit again) and at most `KEEP_PER_FOLDER` of
the folder's caches (other sizes) are kept, the most recently used. A build killed outright
leaves a `.partial-` folder that the next build removes. To clear everything:
`rm -rf ~/.cache/resnet18-train/datasets` (or your `--cache-dir`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.atomic import atomic_folder
from models.imageio import DECODER_VERSION

log = logging.getLogger(__name__)

PROJECT = "resnet18-train"   # the folder of ours under the user's cache folder
FORMAT = 1                   # the layout of a cache folder; bump when it changes (old ones are then rebuilt)
KEEP_PER_FOLDER = 3          # caches kept per data folder (e.g. three --size values), most recently used first;
                             # said in --cache-dir's help (train/config.py) and the README
# A `.partial-` folder whose process is not running here and that nothing wrote to for this long
# (seconds) is a killed build: removed. The age also protects a build on another machine sharing the folder.
STALE_PARTIAL_S = 600
_PARTIAL = re.compile(r"^\..+\.partial-(\d+)-[0-9a-f]+$")


class CacheError(OSError):
    """The cache cannot be written where it should go; the message says where and what to do."""


def default_root() -> Path:
    """`$XDG_CACHE_HOME/resnet18-train/datasets`, else `~/.cache/...` (the XDG spec ignores a relative value)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / PROJECT / "datasets"


@dataclass
class Decoded:
    """What decoding a list of items gives, from the cache or from memory alike."""
    images: torch.Tensor                 # uint8 (n, 3, S, S): the readable files, in item order
    labels: list                         # each image's label (a class name)
    valid: list                          # each image's split: True valid, False train, None not split
    skipped: list[tuple[str, str]]       # (file relative to the data folder, reason), in item order
    sizes: list[tuple[int, int]]         # each image's original (width, height)


def cache_key(items, root: Path, size: int) -> dict:
    """The key: everything that decides what the cache holds. `items` are (path, label, is_valid)."""
    import PIL
    import fastai
    from models.contract import item_transforms
    files = []
    for path, label, is_valid in items:
        try:
            st = path.stat()
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = [-1, -1]  # gone since it was listed: decoding skips it, and the key says so
        files.append([_key_name(path, root), *stamp, label, is_valid])
    key = {"format": FORMAT, "root": str(Path(root).resolve()), "size": size,
           "item_transforms": [repr(t) for t in item_transforms(size)],  # the resize method, as fastai says it
           "decoder": DECODER_VERSION, "pillow": PIL.__version__, "fastai": fastai.__version__, "files": files}
    # As key.json will read back (a multi-label item's tuple of labels becomes a list), so they compare equal.
    return json.loads(json.dumps(key))


def _key_name(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a labels CSV may name files beside it, outside the data folder
        return str(Path(path).resolve())


def cache_folder(cache_root: Path, key: dict, name: str) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:20]
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "data"
    return Path(cache_root) / f"{safe[:60]}-{key['size']}px-{digest}"


# --------------------------------------------------------------------------- reading

def _read(folder: Path, key: dict) -> Decoded | None:
    """The cache in `folder` if it is complete and its key is `key`, mapped (not read); else None."""
    try:
        held = json.loads((folder / "cache.json").read_text())
        if held.get("format") != FORMAT or json.loads((folder / "key.json").read_text()) != key:
            return None
        n, s = int(held["n_images"]), key["size"]
        # mmap_mode "c": a private (copy-on-write) map, so the tensor is writable as torch wants,
        # and nothing written to it could ever reach the file other processes map.
        images = np.load(folder / "images.npy", mmap_mode="c", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        split = np.load(folder / "split.npy", allow_pickle=False)
        sizes = np.load(folder / "sizes.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if (images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, s, s) or len(images) < n
            or labels.shape != (n,) or split.shape != (n,) or sizes.shape != (n, 2)):
        return None
    classes = held["classes"]
    return Decoded(images=torch.from_numpy(images)[:n],
                   # a multi-label image's labels were a tuple, and JSON gave back a list
                   labels=[tuple(c) if isinstance(c, list) else c for c in (classes[i] for i in labels.tolist())],
                   valid=[None if v < 0 else bool(v) for v in split.tolist()],
                   skipped=[(f, r) for f, r in held["skipped"]],
                   sizes=[(w, h) for w, h in sizes.tolist()])


# --------------------------------------------------------------------------- writing

def _write(tmp: Path, key: dict, name: str, n_items: int, fill: Callable[[torch.Tensor], Decoded]) -> None:
    s = key["size"]
    path = tmp / "images.npy"
    images = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n_items, 3, s, s))
    if hasattr(os, "posix_fallocate"):
        # Reserve the disk now: a full disk is then one clear error here, not a SIGBUS from a write
        # into the map halfway through decoding.
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)
            except OSError as e:
                raise CacheError(f"cannot reserve {os.fstat(f.fileno()).st_size / 1e9:.1f} GB for the data "
                                 f"cache in {tmp.parent} ({e.strerror}): free some space, or choose "
                                 "another place with --cache-dir DIR, or use --no-cache") from None
    d = fill(torch.from_numpy(images))  # decodes straight into the map, one image at a time
    images.flush()
    del images
    n = len(d.labels)
    classes = sorted(set(d.labels))
    index = {c: i for i, c in enumerate(classes)}
    # One index per image into `classes`; for a multi-label set a class is a tuple of labels (the image's set).
    np.save(tmp / "labels.npy", np.array([index[c] for c in d.labels], dtype=np.int64).reshape(n), allow_pickle=False)
    np.save(tmp / "split.npy", np.array([-1 if v is None else int(v) for v in d.valid], dtype=np.int8).reshape(n),
            allow_pickle=False)
    np.save(tmp / "sizes.npy", np.array(d.sizes, dtype=np.int32).reshape(n, 2), allow_pickle=False)
    (tmp / "key.json").write_text(json.dumps(key))
    held = {"format": FORMAT, "name": name, "root": key["root"], "size": s, "n_images": n, "n_files": n_items,
            "classes": classes, "skipped": [list(x) for x in d.skipped],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (tmp / "cache.json").write_text(json.dumps(held, indent=1))  # last: a folder without it is never read


def _remove_stale_partials(cache_root: Path) -> None:
    now = time.time()
    for d in cache_root.glob(".*.partial-*"):
        m = _PARTIAL.match(d.name)
        if not m or not d.is_dir():
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # its builder is still running
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue  # someone else's process, or a name we did not make
        newest = max([p.stat().st_mtime for p in d.iterdir()] + [d.stat().st_mtime], default=0)
        if now - newest > STALE_PARTIAL_S:
            log.info("removing %s, left by a build that was killed", d)
            shutil.rmtree(d, ignore_errors=True)


def _evict(cache_root: Path, keep: Path) -> None:
    """Drop the caches of `keep`'s data folder that are superseded (same size) or beyond KEEP_PER_FOLDER."""
    mine = json.loads((keep / "cache.json").read_text())
    same_folder = []
    for d in cache_root.iterdir():
        if d == keep or d.name.startswith(".") or not d.is_dir():
            continue
        try:
            held = json.loads((d / "cache.json").read_text())
        except (OSError, ValueError):
            continue
        if held.get("root") == mine["root"]:
            same_folder.append((d, held))
    by_use = sorted(same_folder, key=lambda dm: dm[0].stat().st_mtime, reverse=True)
    others_kept = 0
    for d, held in by_use:
        if held.get("size") == mine["size"] or others_kept >= KEEP_PER_FOLDER - 1:
            log.info("removing the superseded data cache %s", d)
            # A process still mapping it keeps its pages (POSIX unlink semantics) until it ends.
            shutil.rmtree(d, ignore_errors=True)
        else:
            others_kept += 1


def load_or_build(cache_root: Path, items, root: Path, size: int, name: str,
                  fill: Callable[[torch.Tensor], Decoded]) -> Decoded:
    """The decoded `items` from the cache under `cache_root` (a hit maps it and decodes nothing),
    else built there by `fill(out)`, which decodes into `out` (uint8 (len(items), 3, S, S)) and
    returns the `Decoded` record with `images` a view of `out`; then mapped back from the cache."""
    cache_root = Path(cache_root)
    key = cache_key(items, root, size)
    folder = cache_folder(cache_root, key, name)
    found = _read(folder, key)
    if found is not None:
        os.utime(folder)  # most recently used: kept longest by `_evict`
        log.info("data: cache hit, %d images, %s", len(found.labels), folder)
        return found
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(cache_root)
        log.info("data: decoding %d files into the cache %s", len(items), folder)
        # There but not trusted (an older format, a damaged copy): a complete new one replaces it.
        # Else the first complete build of this key wins, should another process finish first.
        with atomic_folder(folder, keep_existing=not folder.exists()) as tmp:
            _write(tmp, key, name, len(items), fill)
    except CacheError:
        raise
    except OSError as e:
        raise CacheError(f"cannot write the data cache in {cache_root} ({e.strerror or e}): choose another "
                         "place with --cache-dir DIR, or use --no-cache") from None
    found = _read(folder, key)
    if found is None:
        raise CacheError(f"the data cache just written to {folder} cannot be read back; remove it and try again, "
                         "or use --no-cache")
    try:
        _evict(cache_root, folder)
    except OSError as e:  # another process removing caches at the same time: tidying can wait
        log.warning("could not tidy the data caches in %s: %s", cache_root, e)
    return found
