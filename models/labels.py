"""Labels from a CSV: the one reader of a labels table, for training (`python -m train DATA --labels
CSV`) and for evaluation (`python -m serve.evaluate MODEL DATA --labels CSV`).

fastai's `ColReader` conventions, as Kaggle-style data sets ship them: one row per image, a file
column (a path relative to DATA, else to the CSV's own folder, or absolute) and a label column; a
label cell holding several labels separated by `delim` (a space by default, fastai's `label_delim`)
makes the whole column multi-label, and then an empty cell means "none of the classes". An optional
`is_valid` column (true/false, 1/0, yes/no) says which rows are the validation set.

    rows = read_labels_csv("data/labels.csv", "data")
    multi = is_multi_label(rows.labels)          # decided by the whole column
    tags = [split_labels(cell) for cell in rows.labels]

It lives in `models/` because both sides read it and the Space bundles `models/` and `serve/` only.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["FILE_COLUMNS", "LABEL_COLUMNS", "VALID_COLUMN", "DEFAULT_DELIM", "MISSING_SHOWN", "LabelsError",
           "LabelRows", "read_labels_csv", "split_labels", "is_multi_label", "missing_line"]

FILE_COLUMNS = ("file", "fname", "image")     # tried in this order, any case, unless --file-col names one
LABEL_COLUMNS = ("label", "labels", "tags")   # ... unless --label-col names one
VALID_COLUMN = "is_valid"                     # fastai's name for the split column
DEFAULT_DELIM = " "                           # fastai's `label_delim` for multi-label cells
MISSING_SHOWN = 5                             # files that do not exist named one by one; the rest counted
TRUE, FALSE = {"true", "1", "yes", "y", "t"}, {"false", "0", "no", "n", "f", ""}


class LabelsError(ValueError):
    """A labels CSV that cannot be used; the message is one line, naming what to fix."""


@dataclass
class LabelRows:
    """The usable rows of a labels CSV, in file order, and the rows left out."""
    files: list[Path]
    labels: list[str]                   # the label cell as written (stripped); see `split_labels`
    is_valid: list[bool] | None         # from the is_valid column, else None
    multi_label: bool                   # several labels per cell (see `is_multi_label`), or as asked
    source: str                         # the CSV's path, for messages
    missing: list[tuple[str, str]] = field(default_factory=list)  # (file as written, reason), left out
    n_rows: int = 0                     # data rows in the CSV


def split_labels(cell: str, delim: str = DEFAULT_DELIM) -> list[str]:
    """The labels of one cell, in order, without empties or repeats ("a  b a" -> ["a", "b"])."""
    parts = cell.split(delim) if delim != " " else cell.split()
    return list(dict.fromkeys(p.strip() for p in parts if p.strip()))


def is_multi_label(cells, delim: str = DEFAULT_DELIM) -> bool:
    """True when any cell of the column holds more than one label: a data set is multi-label as a
    whole, so a cell with one label (or none) in it is a set of one (or none)."""
    return any(len(split_labels(c, delim)) > 1 for c in cells)


def missing_line(missing: list[tuple[str, str]], source: str) -> str:
    """One line for the rows left out: the first few named, the rest counted."""
    names = ", ".join(f for f, _ in missing[:MISSING_SHOWN])
    more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
    return f"{len(missing)} row(s) of {source} left out: {names}{more}"


def _pick_column(header: list[str], given: str | None, defaults: tuple[str, ...], what: str, csv_path: Path) -> int:
    wanted = (given,) if given else defaults
    by_lower = {h.strip().lower(): i for i, h in enumerate(header)}
    for name in wanted:
        if name.strip().lower() in by_lower:
            return by_lower[name.strip().lower()]
    raise LabelsError(f"{csv_path} has no {what} column (looked for {', '.join(wanted)}; it has "
                      f"{', '.join(h for h in header if h.strip()) or 'none'}): name it with --{what}-col")


def _flag(cell: str, n: int, csv_path: Path) -> bool:
    v = cell.strip().lower()
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise LabelsError(f"{csv_path}: row {n} has is_valid {cell.strip()!r}: use true/false (or 1/0, yes/no)")


def read_labels_csv(csv_path, data, file_col: str | None = None, label_col: str | None = None,
                    delim: str = DEFAULT_DELIM, multi_label: bool | None = None) -> LabelRows:
    """The rows of a labels CSV whose file exists. A relative path is looked up under `data`, then
    beside the CSV. `multi_label` None decides from the label column (`is_multi_label`).

    Rows whose file does not exist, or with no file name, are listed in `missing` and left out (as
    training leaves broken images out); so is a row with an empty label cell in a single-label
    table (in a multi-label one it is an image with none of the labels). Raises `LabelsError` (one
    line) for a missing or unreadable CSV, a missing column, a CSV with no rows, or one where no
    file exists."""
    csv_path, data = Path(csv_path).expanduser(), Path(data).expanduser()
    if not csv_path.is_file():
        raise LabelsError(f"--labels {csv_path}: no such file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:  # -sig: Excel's byte-order mark
            rows = list(csv.reader(fh))
    except (UnicodeDecodeError, csv.Error) as e:
        raise LabelsError(f"{csv_path} is not a readable CSV file: {e}") from None
    except OSError as e:
        raise LabelsError(f"{csv_path} cannot be read: {e.strerror or e}") from None
    numbered = [(n, r) for n, r in enumerate(rows, start=1) if any(cell.strip() for cell in r)]
    if len(numbered) < 2:
        raise LabelsError(f"{csv_path} is empty: it needs a header row and one row per image")
    header = numbered[0][1]
    fcol = _pick_column(header, file_col, FILE_COLUMNS, "file", csv_path)
    lcol = _pick_column(header, label_col, LABEL_COLUMNS, "label", csv_path)
    vcol = next((i for i, h in enumerate(header) if h.strip().lower() == VALID_COLUMN), None)
    files, names, labels, valid, missing = [], [], [], [], []
    for n, row in numbered[1:]:
        name = row[fcol].strip() if fcol < len(row) else ""
        label = row[lcol].strip() if lcol < len(row) else ""
        if not name:
            missing.append((f"{csv_path.name}:{n}", f"row {n} has no file"))
            continue
        is_valid = _flag(row[vcol] if vcol < len(row) else "", n, csv_path) if vcol is not None else None
        path = Path(name).expanduser()
        if not path.is_absolute():
            path = next((p for p in (data / path, csv_path.parent / path) if p.is_file()), data / path)
        if not path.is_file():
            missing.append((name, "no such file (looked under the data folder and the CSV's folder)"))
            continue
        files.append(path)
        names.append(name)
        labels.append(label)
        valid.append(is_valid)
    if multi_label is None:
        multi_label = is_multi_label(labels, delim)
    if not multi_label:  # one label per row: a row without one cannot be learned or scored
        keep = [i for i, label in enumerate(labels) if label]
        missing += [(names[i], f"no label in the {header[lcol].strip()!r} column") for i in range(len(files)) if not labels[i]]
        files, labels, valid = [files[i] for i in keep], [labels[i] for i in keep], [valid[i] for i in keep]
    if not files:
        shown = f": {missing_line(missing, csv_path.name)}" if missing else ""
        raise LabelsError(f"none of the {len(numbered) - 1} rows of {csv_path} names an existing file{shown}")
    return LabelRows(files, labels, valid if vcol is not None else None, multi_label, str(csv_path), missing,
                     len(numbered) - 1)
