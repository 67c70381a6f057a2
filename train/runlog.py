"""The run log: one row per epoch (`History`, a callback), written as `history.csv` and drawn as
`learning_curves.png` in the model folder by `train.export`.

The rows live in the checkpoint's state (`state["history"]`), not only in fastai's Recorder: the
Recorder starts empty at every `fit` call (each phase, and a `--resume` builds a new Learner), so the
epochs before a phase change or an interruption would be lost from it.
"""
from __future__ import annotations

import csv
import time
from pathlib import Path

from fastai.callback.core import Callback

# Columns before and after the learner's own values (train_loss, valid_loss, then every metric, by the
# names fastai's Recorder gives them: accuracy, or accuracy_multi and F1 for a multi-label learner).
LEAD = ("epoch", "phase")
TAIL = ("lr", "seconds")


def epoch_ran(recorder) -> bool:
    """False for an epoch fastai skipped on `--resume` (`start_epoch`): its `after_epoch` still runs,
    with nothing recorded."""
    return bool(recorder.values) and len(recorder.values[-1]) > 0


class History(Callback):
    """Appends one row per finished epoch to `rows` (a list kept in the checkpoint state). `first` is
    the run-wide number of the phase's first epoch (1-based), so the rows number the epochs of all
    phases in one sequence."""
    order = 55  # after the Recorder (50) has the epoch's values; before BestEpoch/Patience read the row

    def __init__(self, rows: list, phase: str, first: int):
        self.rows, self.phase, self.first = rows, phase, first

    def before_epoch(self):
        self.t0 = time.perf_counter()

    def after_epoch(self):
        if not epoch_ran(self.recorder):
            return
        names = self.recorder.metric_names[1:-1]  # less 'epoch' and 'time'
        row = {"epoch": self.first + self.epoch, "phase": self.phase}
        row.update({n: float(v) for n, v in zip(names, self.recorder.values[-1])})
        # The last batch's rate (the head's group, as the Recorder records it): one-cycle moves it every batch.
        row["lr"] = float(self.recorder.lrs[-1]) if self.recorder.lrs else float(self.opt.hypers[-1]["lr"])
        row["seconds"] = round(time.perf_counter() - self.t0, 2)
        self.rows.append(row)


def columns(rows: list[dict]) -> list[str]:
    """epoch, phase, the learner's values in the Recorder's order, lr, seconds."""
    values = []
    for row in rows:
        values += [k for k in row if k not in LEAD + TAIL and k not in values]
    return [*LEAD, *values, *TAIL]


def write_history(rows: list[dict], path: Path) -> Path:
    """`history.csv`: a header and one row per epoch; losses and metrics with 6 significant digits."""
    cols = columns(rows)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for row in rows:
            w.writerow([_cell(row.get(c, "")) for c in cols])
    return Path(path)


def read_history(path: Path) -> list[dict]:
    """`history.csv` back as rows of numbers (the phase stays a string)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k == "phase" else int(v) if k == "epoch" else float(v)) for k, v in row.items() if v != ""}
                for row in csv.DictReader(f)]


def _cell(v):
    return f"{v:.6g}" if isinstance(v, float) else v


def plot_learning_curves(rows: list[dict], path: Path, kept_epoch: int | None = None) -> Path:
    """`learning_curves.png`: train and valid loss (left) and every metric (right) against the epoch,
    the kept epoch marked, phase changes dotted. ~20-40 kB at 80 dpi."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt
    cols = columns(rows)
    metrics = [c for c in cols if c not in (*LEAD, *TAIL, "train_loss", "valid_loss")]
    epochs = [r["epoch"] for r in rows]
    fig, (losses, mets) = plt.subplots(1, 2, figsize=(9, 3.2), dpi=80)
    for name, style in (("train_loss", "-o"), ("valid_loss", "-s")):
        losses.plot(epochs, [r.get(name) for r in rows], style, ms=3, label=name.replace("_", " "))
    for name in metrics:
        mets.plot(epochs, [r.get(name) for r in rows], "-o", ms=3, label=name)
    shown = [r[n] for r in rows for n in ("train_loss", "valid_loss") if r.get(n, 0) > 0]
    if shown and max(shown) > 50 * min(shown):  # a loss that blew up would flatten every other point
        losses.set_yscale("log")
    for ax, title in ((losses, "loss"), (mets, "validation metrics")):
        for a, b in zip(rows, rows[1:]):
            if a["phase"] != b["phase"]:
                ax.axvline(b["epoch"] - 0.5, color="grey", ls=":", lw=1)
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="tab:green", ls="--", lw=1, label=f"kept: epoch {kept_epoch}")
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.set_xticks(epochs if len(epochs) <= 20 else epochs[::max(1, len(epochs) // 10)])
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
