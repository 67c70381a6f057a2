"""models.atomic.atomic_folder: `out` is always a whole folder or absent, and nothing is left beside it."""
from __future__ import annotations

import os
import stat

import pytest

from models.atomic import atomic_folder


def tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_writes_a_new_folder(tmp_path):
    out = tmp_path / "deep" / "out"
    with atomic_folder(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.partial-")
        assert not out.exists()  # nothing at `out` until the block succeeds
        (tmp / "a.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
    assert tree(out) == {"a.txt": "new", "sub/b.txt": "b"}
    assert os.listdir(out.parent) == ["out"]


def test_permissions_follow_the_umask_not_a_private_temp_dir(tmp_path):
    with atomic_folder(tmp_path / "out") as tmp:
        pass
    old = os.umask(0o022)
    os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o777 & ~old


def test_replaces_an_existing_folder_and_deletes_the_old_one_after(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with atomic_folder(out) as tmp:
        assert tree(out) == {"stale.txt": "old"}  # the old one stays in place while the new one is written
        (tmp / "a.txt").write_text("new")
    assert tree(out) == {"a.txt": "new"}
    assert os.listdir(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_an_error_leaves_out_as_it_was_and_removes_the_temp_folder(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    with pytest.raises(type(error)):
        with atomic_folder(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise error
    assert tree(out) == {"keep.txt": "keep me"}
    assert os.listdir(tmp_path) == ["out"]


def test_an_error_with_no_earlier_folder_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_failed_final_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep me")
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # 1: out -> aside, 2: new -> out (fails, e.g. disk or permission trouble)
            raise OSError("rename failed")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(out) as tmp:
            (tmp / "a.txt").write_text("new")
    assert tree(out) == {"keep.txt": "keep me"}
    assert os.listdir(tmp_path) == ["out"]


def test_two_writers_do_not_share_a_temp_folder(tmp_path):
    out = tmp_path / "out"
    with atomic_folder(out) as a, atomic_folder(out) as b:
        assert a != b
        (a / "who").write_text("a")
        (b / "who").write_text("b")
    assert tree(out) == {"who": "a"}  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["out"]
