"""Early stopping and the best epoch: fastai's tracker callbacks, their state kept in the checkpoint.

`BestEpoch` does `SaveModelCallback`'s job (remember the epoch with the lowest validation loss and,
with `--patience`, a copy of its weights); `Patience` is fastai's `EarlyStoppingCallback` (stop when
the validation loss has not improved for N epochs). fastai's own keep their count on the callback and
save weights under `learn.path/models/`; these keep both in `state`, the dict `train.learner.Checkpoint`
writes atomically with the model after every epoch, so the best weights and the count survive a phase
change and `--resume` (which builds a new Learner), and can never disagree with the checkpoint.

Patience counts over all the epochs of a run, whatever the phase: with `--pretrained`/`--init` the
frozen epoch is the first, a phase change neither resets nor pauses the count, and a stop ends the run
(no later phase starts). The weights exported are then those of the best epoch of the whole run.
"""
from __future__ import annotations

from fastai.callback.core import CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback

from models.contract import STOPPED_COMPLETED, STOPPED_PATIENCE, FitSummary
from train import distributed
from train.runlog import epoch_ran

MONITOR = "valid_loss"  # lower is better (fastai's TrackerCallback picks np.less for a loss)


def _saved_best(state: dict):
    best = state.get("best")
    return best[MONITOR] if best else None


class BestEpoch(TrackerCallback):
    """After each epoch with a new lowest validation loss: `state["best"]` = its run-wide epoch number
    and loss, and with `keep_weights` a CPU copy of the model's state dict (~45 MB for resnet18)."""
    order = TrackerCallback.order + 1  # SaveModelCallback's: after History (55), before Patience (63)

    def __init__(self, state: dict, keep_weights: bool):
        super().__init__(monitor=MONITOR, reset_on_fit=False)
        self.state, self.keep_weights, self.best = state, keep_weights, _saved_best(state)

    def after_epoch(self):
        if not epoch_ran(self.recorder):  # fastai's trackers would index an empty record here
            return
        super().after_epoch()
        self.new_best = distributed.agree(self.new_best)  # one decision on several processes
        if self.new_best:
            best = {"epoch": self.state["history"][-1]["epoch"], MONITOR: float(self.best)}
            if self.keep_weights:
                best["model"] = {k: v.detach().to("cpu", copy=True) for k, v in self.learn.model.state_dict().items()}
            self.state["best"] = best


class Patience(EarlyStoppingCallback):
    """fastai's early stopping with its best value and wait count carried in `state` (`state["wait"]`),
    and `state["stopped"]` set before it cancels the fit, so the checkpoint knows the run is over."""

    def __init__(self, patience: int, state: dict, write=print):
        super().__init__(monitor=MONITOR, patience=patience, reset_on_fit=False)
        self.state, self.write, self.best = state, write, _saved_best(state)

    def before_fit(self):
        super().before_fit()  # sets wait = 0; keeps `best` (reset_on_fit=False)
        self.wait = self.state.get("wait", 0)

    def after_epoch(self):
        if not epoch_ran(self.recorder):
            return
        # EarlyStoppingCallback.after_epoch, less its message (which numbers epochs per phase, from 0)
        TrackerCallback.after_epoch(self)
        self.new_best = distributed.agree(self.new_best)  # one decision on several processes
        self.wait = 0 if self.new_best else self.wait + 1
        self.state["wait"] = self.wait
        if self.wait >= self.patience:
            self.state["stopped"] = STOPPED_PATIENCE
            best = self.state["best"]
            self.write(f"early stopping: {MONITOR} has not improved for {self.wait} epoch(s); keeping epoch "
                       f"{best['epoch']} ({MONITOR} {best[MONITOR]:.4f})")
            raise CancelFitException()


def restore_best(learn, state: dict) -> bool:
    """Load the best epoch's weights into `learn` when they are kept and are not the last epoch's.
    Returns whether it did (the last validation pass then scored other weights)."""
    best, rows = state.get("best") or {}, state.get("history") or []
    if "model" not in best or not rows or best["epoch"] == rows[-1]["epoch"]:
        return False
    learn.model.load_state_dict(best["model"])
    return True


def fit_summary(state: dict, planned: int, patience: int) -> FitSummary:
    """What metadata.json says about how the fit ended (epochs counted from 1 over all phases)."""
    best, rows = state.get("best") or {}, state.get("history") or []
    last = rows[-1]["epoch"] if rows else 0
    return FitSummary(epochs_planned=planned, epochs_run=last, best_epoch=best.get("epoch"),
                      kept_epoch=best["epoch"] if "model" in best else last,
                      stopped=state.get("stopped", STOPPED_COMPLETED), patience=patience)
