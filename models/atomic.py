"""Write a folder so that readers only ever see a whole one: the one place this project does it.

    with atomic_folder(out) as tmp:
        (tmp / "model.pkl").write_bytes(...)      # fill the temporary folder
    # here `out` is the new folder; an earlier `out` was replaced

The temporary folder is a dot-folder beside `out` (same filesystem, so the final step is a rename),
named `.<name>.partial-<pid>-<random>`. On success an existing `out` is first renamed aside
(`.<name>.old-...`), the new folder renamed into place, and only then the old one deleted, so at
every moment a complete folder is at `out` or beside it. On any exception, KeyboardInterrupt
included, the temporary folder is removed and `out` is left as it was. Only a process killed
outright (SIGKILL, power loss) can leave a `.partial-` folder behind; nothing ever reads one.

`keep_existing=True` is for folders that any complete copy serves as well as another (the data
cache, where concurrent builders of one key write the same content): the new folder is renamed
into place only if `out` does not exist by then, else it is dropped and the first complete one stays.
"""
from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_folder"]


def _beside(out: Path, kind: str) -> Path:
    # pid + random: two processes (or two calls in one) writing the same `out` never share a folder
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def atomic_folder(out: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; when the block ends without an exception, it
    becomes `out` (replacing an existing `out`, file or folder; with `keep_existing`, only if there
    is no `out` by then). The caller decides beforehand whether an existing `out` may be replaced."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _beside(out, "partial")
    tmp.mkdir()  # plain mkdir: the folder gets the umask's permissions, as any folder the user makes
    try:
        yield tmp
        if keep_existing:
            try:
                # rename(2) onto a non-empty folder fails (ENOTEMPTY/EEXIST): checking and renaming
                # are one step, so two writers can never both win or leave `out` half replaced.
                os.rename(tmp, out)
            except OSError:
                if not out.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another writer finished first: keep theirs
            return
        old = None
        if out.exists() or out.is_symlink():
            old = _beside(out, "old")
            os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            if old is not None:
                os.replace(old, out)  # put the earlier folder back: `out` is never left missing
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
