"""Clean a class-folder data set by eye, most confusing images first (fastbook's `ImageClassifierCleaner`,
as a local Gradio page).

    python -m train.clean photos --model models/photos     # open http://127.0.0.1:7861
    python -m train.clean photos --undo                    # put every moved or removed file back

Pick a split (`train/` and `valid/`, or `training/` and `testing/`, when the data set has them; else
`all`) and a class: its images are shown sorted by loss (the cross-entropy of the folder's class
under the model: most confusing first; unreadable files come first of all), each with the model's
label and confidence. Click one, then keep it, move it to another class, or remove it.

Nothing is ever deleted:
- a move goes to the other class folder of the same split, a removal to `DATA/_removed/<class>/`;
  a name already taken there gets `_1`, `_2`... (a file is never overwritten: it is hard-linked to
  its new name, which fails if the name exists, then unlinked from the old one);
- every action is appended to `DATA/_cleaning.jsonl`, one JSON object a line:
  `{"time": ISO 8601 UTC, "action": "move"|"remove"|"keep"|"undo", "from": path, "to": path}`, paths
  relative to DATA (an `undo` line also has `"of"`: the line number it undoes);
- `--undo` replays the journal backwards: every move and removal not yet undone is moved back and
  recorded as undone, so a second `--undo` has nothing left to do. It first checks the whole chain
  and refuses, moving nothing, when a file is gone or its old place is taken.

Training skips `_removed/` (and any folder whose name starts with `_` or `.`; see `train.data`), and
`_cleaning.jsonl` is not an image, so a cleaned folder trains as it stands.

What a browser can name: a split and a class from the dropdowns, both checked against the server's
own folder listing, and a picture by its index in the gallery the server sent, mapped to a path kept
on the server. No client-supplied path is ever opened, and every path used is checked to lie inside DATA.
"""
import argparse
import json
import logging
import math
import os
import sys
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from models.cli import port_int, positive_int, run_cli

__all__ = ["CleanError", "DataSet", "Journal", "undo", "build_app", "main"]

log = logging.getLogger(__name__)

JOURNAL = "_cleaning.jsonl"
REMOVED = "_removed"
ALL = "all"                      # the one "split" of a data set that is not split
SPLIT_FOLDERS = (("train", "valid"), ("training", "testing"))  # as train.data reads them
DEFAULT_PORT = 7861              # beside `python -m serve`'s 7860
MAX_SHOWN = 60                   # gallery images per class: the most confusing; each is re-sent on every action
THUMB = 160                      # px, longest side of a gallery thumbnail
BATCH_SIZE = 64                  # images per forward pass while scoring a class
MAX_NAME_TRIES = 10_000          # `name_1` ... before giving up on a free name


class CleanError(ValueError):
    """The action cannot be done; the message says why, in one line."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_class_folder(path: Path) -> bool:
    """A class as training sees it: a folder not hidden and not one of ours (`_removed/`)."""
    return path.is_dir() and not path.name.startswith((".", "_"))


# --------------------------------------------------------------------------- the data set on disk

class DataSet:
    """A class-folder data set: its splits and classes come from the folder listing only."""

    def __init__(self, root):
        root = Path(root).expanduser()
        if not root.is_dir():
            raise CleanError(f"{root} is not a folder" if root.exists() else f"{root} does not exist")
        self.root = root.resolve()
        self.splits = [ALL]
        for names in SPLIT_FOLDERS:
            if all((self.root / n).is_dir() for n in names):
                self.splits = list(names)
                break
        self.lock = threading.Lock()  # one file operation at a time (several tabs may be open)
        self.journal = Journal(self.root / JOURNAL)

    def split_dir(self, split: str) -> Path:
        if split not in self.splits:
            raise CleanError(f"no split {split!r} here (there are {', '.join(self.splits)})")
        return self.root if split == ALL else self.root / split

    def classes(self, split: str | None = None) -> list[str]:
        """Class folder names: of one split, or of all of them (a target may lack a folder yet)."""
        splits = [split] if split else self.splits
        return sorted({p.name for s in splits for p in self.split_dir(s).iterdir() if is_class_folder(p)})

    def class_dir(self, split: str, cls: str) -> Path:
        if cls not in self.classes():
            raise CleanError(f"no class {cls!r} in {self.root}")
        return self.split_dir(split) / cls

    def files(self, split: str, cls: str) -> list[Path]:
        from models.imageio import is_image_file
        d = self.class_dir(split, cls)
        return sorted(f for f in d.rglob("*") if f.is_file() and is_image_file(f)) if d.is_dir() else []

    def inside(self, path: Path) -> Path:
        """`path`, refused unless it (its folder, for a link) lies inside the data set."""
        path = Path(path)
        full = (path.parent.resolve() / path.name) if path.is_absolute() else (self.root / path).parent.resolve() / path.name
        if full.name in ("", ".", "..") or not full.is_relative_to(self.root) or full == self.root:
            raise CleanError(f"{path} is outside {self.root}: refused")
        return full

    def rel(self, path: Path) -> str:
        return self.inside(path).relative_to(self.root).as_posix()

    # ------------------------------------------------------------------ actions (journalled)

    def move(self, src: Path, split: str, to_cls: str) -> Path:
        """Move `src` into class `to_cls` of `split`; returns where it went."""
        src = self.inside(src)
        return self._act("move", src, self.class_dir(split, to_cls))

    def remove(self, src: Path, cls: str) -> Path:
        """Set `src` aside in `_removed/<cls>/` (never deleted)."""
        src = self.inside(src)
        if cls not in self.classes():
            raise CleanError(f"no class {cls!r} in {self.root}")
        return self._act("remove", src, self.root / REMOVED / cls)

    def keep(self, src: Path) -> None:
        src = self.inside(src)
        with self.lock:
            self.journal.append("keep", self.rel(src), self.rel(src))

    def kept(self) -> set[Path]:
        """Files marked kept (and still where they were kept): left out of later views."""
        return {self.root / e["from"] for _, e in self.journal.entries() if e.get("action") == "keep"}

    def _act(self, action: str, src: Path, folder: Path) -> Path:
        with self.lock:
            if not src.is_file():
                raise CleanError(f"{self.rel(src)} is no longer there (moved in another tab?)")
            dst = move_no_overwrite(src, self.inside(folder / src.name).parent)
            self.journal.append(action, self.rel(src), self.rel(dst))
            return dst


def free_name(folder: Path, name: str, n: int = 0) -> Path:
    stem, suffix = Path(name).stem, Path(name).suffix
    return folder / (name if n == 0 else f"{stem}_{n}{suffix}")


def place(src: Path, dst: Path) -> bool:
    """Give `src` the name `dst` unless `dst` exists; False (and nothing changed) if it does.
    A hard link makes the new name, which fails on an existing name even one created a moment ago
    by someone else, then the old name goes; where hard links are not possible (across file
    systems, FAT), a check then a rename."""
    if dst.exists() or dst.is_symlink():
        return False
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError:
        if dst.exists() or dst.is_symlink():
            return False
        os.rename(src, dst)
        return True
    os.unlink(src)
    return True


def move_no_overwrite(src: Path, folder: Path) -> Path:
    """Move `src` into `folder` under its own name, or `name_1`, `name_2`... if taken; never overwrites."""
    for n in range(MAX_NAME_TRIES):
        dst = free_name(folder, src.name, n)
        if place(src, dst):
            return dst
    raise CleanError(f"no free name for {src.name} in {folder} after {MAX_NAME_TRIES} tries")


class Journal:
    """`_cleaning.jsonl`: append-only; entries are numbered by line, from 1."""

    def __init__(self, path: Path):
        self.path = path

    def append(self, action: str, frm: str, to: str, **extra) -> None:
        line = json.dumps({"time": _now(), "action": action, "from": frm, "to": to, **extra})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())  # the journal is the only way back: on disk before we say "done"

    def entries(self) -> list[tuple[int, dict]]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                raise CleanError(f"{self.path} line {n} is not JSON: fix or remove that line") from None
            if not isinstance(e, dict) or not isinstance(e.get("from"), str) or not isinstance(e.get("to"), str):
                raise CleanError(f"{self.path} line {n} lacks a \"from\" and a \"to\" path")
            out.append((n, e))
        return out


def undo(data: DataSet) -> list[tuple[str, str]]:
    """Put back every move and removal not undone yet, newest first; returns (from, to) per file
    moved back. Checks the whole chain first and moves nothing if any step cannot be done."""
    entries = data.journal.entries()
    undone = {e.get("of") for _, e in entries if e.get("action") == "undo"}
    todo = [(n, e) for n, e in reversed(entries) if e.get("action") in ("move", "remove") and n not in undone]
    # Dry run over a picture of the disk: the chain A -> B -> C is undone as C -> B, then B -> A.
    there: dict[Path, bool] = {}

    def exists(p: Path) -> bool:
        return there[p] if p in there else (p.exists() or p.is_symlink())

    steps = []
    for n, e in todo:
        now, old = data.inside(e["to"]), data.inside(e["from"])
        if not exists(now):
            raise CleanError(f"cannot undo line {n} of {data.journal.path.name} ({e['action']} {e['from']} -> "
                             f"{e['to']}): {e['to']} is missing; nothing was moved back")
        if exists(old):
            raise CleanError(f"cannot undo line {n} of {data.journal.path.name} ({e['action']} {e['from']} -> "
                             f"{e['to']}): {e['from']} is taken by another file; nothing was moved back")
        there[now], there[old] = False, True
        steps.append((n, now, old))
    done = []
    with data.lock:
        for n, now, old in steps:
            if not place(now, old):  # taken since the dry run: stop here; what is done is journalled
                raise CleanError(f"{data.rel(old)} was taken while undoing; {len(done)} file(s) moved back so far "
                                 "(run --undo again once it is free)")
            data.journal.append("undo", data.rel(now), data.rel(old), of=n)
            done.append((data.rel(now), data.rel(old)))
    return done


# --------------------------------------------------------------------------- scoring a class

@dataclass
class Entry:
    path: Path
    predicted: str
    confidence: float
    loss: float          # cross-entropy of the folder's class; inf for an unreadable file
    error: str | None = None

    def caption(self) -> str:
        if self.error:
            return f"unreadable: {self.error}"
        loss = f"loss {self.loss:.2f}" if math.isfinite(self.loss) else "class unknown"
        return f"{self.predicted} {self.confidence:.0%} · {loss}"  # the file's name is shown once clicked


def score(predictor, files: list[Path], cls: str) -> list[Entry]:
    """Every file's prediction and loss, most confusing first: unreadable files, then by loss
    (for a class the model does not know, by how unsure it is)."""
    from models.imageio import ImageError
    known = cls in predictor.classes
    out = []
    for src, result in predictor.predict_many([str(f) for f in files], top_k=len(predictor.classes), batch_size=BATCH_SIZE):
        path = Path(src)
        if isinstance(result, ImageError):
            out.append(Entry(path, "", 0.0, math.inf, str(result)))
            continue
        probs = dict(result.confidences)
        loss = -math.log(max(probs.get(cls, 0.0), 1e-38)) if known else math.nan
        out.append(Entry(path, result.label, result.confidences[0][1], loss))

    def key(e: Entry):
        if e.error:
            return (0, 0.0)
        return (1, -e.loss if known else e.confidence)
    return sorted(out, key=key)


def thumbnail(entry: Entry):
    from PIL import Image
    from models.imageio import ImageError, open_image
    if entry.error:
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    try:
        im = open_image(entry.path, size=THUMB)
    except ImageError:
        return Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
    im.thumbnail((THUMB, THUMB))
    return im


# --------------------------------------------------------------------------- the page

CSS = "#gallery img { image-rendering: pixelated; }"


def build_app(data: DataSet, predictor, max_shown: int = MAX_SHOWN):
    """The Gradio Blocks. Per browser session, `gr.State` (kept on the server) holds the shown
    entries; a gallery click sends only an index into them."""
    import gradio as gr

    classes = data.classes()

    def load(split, cls):
        if split not in data.splits or cls not in classes:
            raise gr.Error("pick a split and a class from the lists")
        files = data.files(split, cls)
        kept = data.kept()
        shown = [f for f in files if f not in kept]
        entries = score(predictor, shown, cls)[:max_shown]
        note = (f"**{cls}** ({split}): {len(files)} images" + (f", {len(files) - len(shown)} kept earlier and not shown" if len(shown) < len(files) else "")
                + f"; the {len(entries)} most confusing first." + ("" if cls in predictor.classes else " The model does not know this class: sorted by its confidence, lowest first."))
        return view(entries, note)

    def view(entries, note, selected=None):
        gallery = [(thumbnail(e), e.caption()) for e in entries]
        return (gr.update(value=gallery, selected_index=None), entries, None, note,
                "Click an image to act on it." if selected is None else selected)

    def select(entries, evt: gr.SelectData):
        i = evt.index if isinstance(evt.index, int) else None
        if i is None or not 0 <= i < len(entries or []):
            return None, "Click an image to act on it."
        e = entries[i]
        what = f"unreadable ({e.error})" if e.error else f"predicted **{e.predicted}** ({e.confidence:.1%}), loss {e.loss:.3f}"
        return i, f"Selected `{data.rel(e.path)}`: {what}."

    def act(action, entries, i, split, cls, target):
        if i is None or not isinstance(i, int) or not 0 <= i < len(entries or []):
            raise gr.Error("click an image first")
        if split not in data.splits or cls not in classes:
            raise gr.Error("pick a split and a class from the lists")
        e = entries[i]
        try:
            if action == "keep":
                data.keep(e.path)
                done = f"kept `{data.rel(e.path)}`"
            elif action == "remove":
                dst = data.remove(e.path, cls)
                done = f"removed `{data.rel(e.path)}` to `{data.rel(dst)}`"
            else:
                if target not in classes or target == cls:
                    raise gr.Error("pick another class to move it to")
                dst = data.move(e.path, split, target)
                done = f"moved `{data.rel(e.path)}` to `{data.rel(dst)}`"
        except (CleanError, OSError) as err:
            raise gr.Error(str(err)) from None
        rest = entries[:i] + entries[i + 1:]
        return view(rest, f"Done: {done}. {len(rest)} left in this view.")

    with gr.Blocks(title=f"Clean {data.root.name}") as demo:
        gr.Markdown(f"## Clean `{data.root.name}`\nThe images of one class, most confusing to the model first. "
                    f"Click one, then keep it, move it to another class, or remove it (to `{REMOVED}/`; "
                    f"nothing is deleted). Every action goes to `{JOURNAL}`; "
                    f"`python -m train.clean {data.root} --undo` puts everything back.")
        with gr.Row():
            split = gr.Dropdown(data.splits, value=data.splits[0], label="split", elem_id="split")
            cls = gr.Dropdown(classes, value=classes[0] if classes else None, label="class", elem_id="class")
            show = gr.Button("Show", variant="primary", elem_id="show")
        note = gr.Markdown(elem_id="note")
        gallery = gr.Gallery(label="most confusing first", columns=8, height="auto", allow_preview=False,
                             object_fit="contain", elem_id="gallery", interactive=False)
        selected_md = gr.Markdown("Click an image to act on it.", elem_id="selected")
        with gr.Row():
            keep = gr.Button("Keep", elem_id="keep")
            remove = gr.Button("Remove", variant="stop", elem_id="remove")
            target = gr.Dropdown(classes, value=None, label="move to class", elem_id="target")
            move = gr.Button("Move", elem_id="move")
        entries = gr.State([])
        index = gr.State(None)
        outs = [gallery, entries, index, note, selected_md]
        for trigger in (show.click, split.change, cls.change, demo.load):
            trigger(load, [split, cls], outs)
        gallery.select(select, [entries], [index, selected_md])
        for button, action in ((keep, "keep"), (remove, "remove"), (move, "move")):
            button.click(lambda *a, _action=action: act(_action, *a), [entries, index, split, cls, target], outs)
    return demo


# --------------------------------------------------------------------------- the command

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.clean", description=" ".join(__doc__.split("\n\n")[0].split()),
                                epilog="Nothing is deleted: removals go to DATA/_removed/<class>/, every action to "
                                       "DATA/_cleaning.jsonl, and --undo puts every file back.")
    p.add_argument("data", type=Path, help="a folder with one sub-folder per class (or train/ + valid/ of them)")
    p.add_argument("--model", default=None, help="a model folder written by `python -m train` (its losses sort the images)")
    p.add_argument("--undo", action="store_true", help="move every file back, newest action first, and exit")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; the page moves your files)")
    p.add_argument("--port", type=port_int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--max-shown", type=positive_int, default=MAX_SHOWN,
                   help=f"images shown per class, the most confusing (default {MAX_SHOWN}; the page re-sends them after each action)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    return p


def run(args) -> int:
    data = DataSet(args.data)
    if args.undo:
        done = undo(data)
        for frm, to in done:
            print(f"moved {frm} back to {to}")
        print(f"undid {len(done)} action(s)" if done else f"nothing to undo in {data.journal.path}")
        return 0
    if not args.model:
        raise CleanError("give --model MODEL (a model folder: its losses sort the images), or --undo")
    if not data.classes():
        raise CleanError(f"no class folders in {data.root}")
    data.journal.entries()  # a broken journal is refused now, not on the first click
    from serve.source import quiet_known_warnings
    quiet_known_warnings()
    from serve.predictor import Predictor
    predictor = Predictor.load(args.model, device=args.device)
    demo = build_app(data, predictor, args.max_shown)
    print(f"cleaning {data.root} with {args.model}: http://{args.host}:{args.port}", flush=True)
    demo.launch(server_name=args.host, server_port=args.port, quiet=True, show_error=True, css=CSS)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from models.contract import ModelFolderError
    return run_cli(lambda: run(args), (CleanError, ModelFolderError, OSError))


if __name__ == "__main__":
    sys.exit(main())
