"""`python -m train`: validate the data, fit resnet18, export a model folder. See `--help`."""
from __future__ import annotations

import logging
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("train")


def checkpoint_path(out: str) -> Path:
    out = Path(out).expanduser().resolve()
    return out.parent / f".{out.name}.checkpoint" / "checkpoint.pth"


def run(cfg) -> Path | None:
    """The whole job for a resolved `TrainConfig`; returns the model folder (None on the ranks other
    than 0 of a run launched on several processes: rank 0 exports)."""
    from fastai.torch_core import set_seed
    from fastai.vision.core import imagenet_stats
    from train import distributed
    from train.data import DataError, build_dataloaders, load_data
    from train.export import evaluate, evaluate_multi_label, export_model
    from train.precision import precision_of
    from train.learner import (RESUMED_STATE, TrainError, build_learner, find_lr, fit, load_checkpoint, pick_device,
                               plan_phases)
    from train.mnist import MnistError
    from models.contract import STOPPED_COMPLETED
    from train.stopping import fit_summary
    person_errors = (DataError, TrainError, MnistError)

    t_start = time.perf_counter()
    set_seed(cfg.seed, reproducible=True)
    try:
        device = distributed.setup(pick_device(cfg.device))  # under torchrun: this process's device
    except ValueError as e:
        raise TrainError(str(e)) from None
    ckpt = checkpoint_path(cfg.out)
    resume_state, lr_given = None, cfg.lr  # the --lr as given: lr_find turns 'auto' into a number below
    if cfg.resume:
        def read():
            if not ckpt.is_file():
                raise TrainError(f"--resume: no checkpoint at {ckpt}; nothing to resume (run without --resume)")
            return load_checkpoint(ckpt)
        resume_state = distributed.from_rank0(read, person_errors)  # rank 0's file, sent to every rank
        saved, lr_given = resume_state["state"]["config"], resume_state["state"].get("lr_given")
        problem = (cfg.resume_conflict(saved, lr_given)
                   or distributed.resume_conflict(resume_state["state"].get("world_size", 1)))
        if problem:
            raise TrainError(problem)
        cfg.lr = saved["lr"]
    elif distributed.is_main() and ckpt.is_file():
        log.warning("an interrupted run left %s; starting over (it is replaced after the first epoch). "
                    "Use --resume to continue it instead.", ckpt)

    from train.cache import default_root
    cache = distributed.rank0_first(  # rank 0 decodes (or builds the cache) first, the others wait, then map it
        lambda: load_data(cfg.source, cfg.size, cfg.valid_pct, cfg.seed, cfg.mnist_dir or None,
                          progress=not cfg.quiet and sys.stderr.isatty(), workers=cfg.workers or None,
                          cache_dir=(cfg.cache_dir or default_root()) if cfg.cache else None,
                          labels_csv=cfg.labels or None, file_col=cfg.file_col or None,
                          label_col=cfg.label_col or None, label_delim=cfg.label_delim),
        person_errors)
    if not cfg.quiet and distributed.is_main():
        print(cache.summary.table(), flush=True)
    counts = {"train": cache.summary.train_counts, "valid": cache.summary.valid_counts}
    if resume_state and resume_state["state"]["classes"] != cache.vocab:
        raise TrainError("--resume: the classes changed since the checkpoint; start over without --resume")
    if resume_state and resume_state["state"].get("counts", counts) != counts:
        raise TrainError("--resume: the data changed since the checkpoint (images per class and split differ); "
                         "start over without --resume")

    if cfg.pretrained:
        mean, std = imagenet_stats
    elif cfg.init:
        from models.contract import read_metadata
        norm = read_metadata(Path(cfg.init)).normalize
        mean, std = norm.mean, norm.std
    else:
        mean, std = cache.stats()
    dls = build_dataloaders(cache, cfg.bs, mean, std, augment=cfg.augment, flip=cfg.flip, device=device)
    learn = build_learner(dls, cfg, device, workdir=ckpt.parent, multi_label=cache.multi_label)

    if cfg.lr == "auto":
        lr = distributed.from_rank0(lambda: find_lr(learn, cfg.quiet))  # every rank takes rank 0's pick
        if distributed.is_main():
            print(f"lr_find suggests {lr:.2e}; using it", flush=True)
        cfg.lr = f"{lr:.3g}"
    lr = float(cfg.lr)
    state = {"config": cfg.as_dict(), "classes": cache.vocab, "counts": counts, "lr_given": lr_given,
             "world_size": distributed.world_size()}
    if resume_state:
        state.update({k: resume_state["state"][k] for k in RESUMED_STATE if k in resume_state["state"]})
        learn.model.load_state_dict(resume_state["model"])
        learn.create_opt()
        if resume_state["opt"] is not None:
            learn.opt.load_state_dict(resume_state["opt"])
        if distributed.is_main():
            print(f"resuming from {ckpt} (epochs done: {state['done']})", flush=True)
    phases = plan_phases(cfg, lr)
    fit_seconds, last_validation = fit(learn, phases, ckpt, state, quiet=cfg.quiet,
                                       resume_from=resume_state["state"] if resume_state else None,
                                       patience=cfg.patience)
    summary = fit_summary(state, sum(p.epochs for p in phases), cfg.patience)

    try:
        distributed.check_in_sync(learn.model)
    except RuntimeError as e:
        raise TrainError(str(e)) from None
    if not distributed.is_main():
        return None  # rank 0 alone exports
    with distributed.alone():  # rank 0's work from here on: fastai must not wait for the other ranks
        if cache.multi_label:
            interp, metrics = None, evaluate_multi_label(learn, cache.vocab, cfg.threshold, outputs=last_validation)
        else:
            interp, metrics = evaluate(learn, outputs=last_validation)
        metrics["_interp"] = interp
        precision = precision_of(learn)
        trained_on = str(device) if precision == "fp32" else f"{device} ({precision} mixed precision)"
        out = export_model(learn, cache, cfg, metrics, mean, std, lr, fit_seconds, trained_on,
                           history=state["history"], fit=summary)
    shutil.rmtree(ckpt.parent, ignore_errors=True)  # the model folder is complete: the checkpoint is spent
    if not cfg.quiet:
        kept = (f"epoch {summary.kept_epoch} of {summary.epochs_run} kept ({summary.stopped})  "
                if summary.kept_epoch != summary.epochs_run or summary.stopped != STOPPED_COMPLETED else "")
        f1 = (f"  F1 {metrics['f1']:.4f} at threshold {cfg.threshold:g} (best {metrics['best_f1']:.4f} at "
              f"{metrics['best_f1_threshold']:g})" if cache.multi_label else "")
        print(f"{kept}valid accuracy {metrics['valid_accuracy']:.4f}{f1}  fit {fit_seconds:.0f} s  "
              f"total {time.perf_counter() - t_start:.0f} s  ->  {out}", flush=True)
    return out


def _stop(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (kill, `timeout`, docker stop, a batch scheduler) ends a run as Ctrl-C does


def main(argv=None) -> int:
    from train.allocator import keep_freed_memory
    from train.config import parse_config
    cfg = parse_config(argv)
    keep_freed_memory()  # a step's freed tensors kept for the next (train/allocator.py)
    from train import distributed
    catch_term = (threading.current_thread() is threading.main_thread()  # signal.signal works only there
                  and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)   # a handler someone set wins
    if catch_term:
        signal.signal(signal.SIGTERM, _stop)
    try:
        return _main(cfg)
    finally:
        distributed.teardown()
        if catch_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _main(cfg) -> int:
    from train import distributed
    logging.basicConfig(level=logging.WARNING if cfg.quiet else logging.INFO,
                        format=f"%(levelname)s: {distributed.log_prefix()}%(message)s", stream=sys.stderr)
    import warnings
    warnings.filterwarnings("ignore", module="fastai")  # load_learner's pickle warning, deprecations
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*")  # raised inside fastai's imports
    from train.data import DataError
    from train.learner import TrainError
    from train.mnist import MnistError
    from models.cli import run_cli
    from models.contract import ModelFolderError

    def interrupted() -> str:
        if not distributed.is_main():  # rank 0 says what was kept
            return f"interrupted: {distributed.log_prefix()}stopped"
        ckpt = checkpoint_path(cfg.out)
        where = (f"the last finished epoch is saved in {ckpt}; continue with the same command plus --resume"
                 if ckpt.is_file() else "no epoch had finished, so there is nothing to resume")
        return f"\ninterrupted: no model was written to {cfg.out}; {where}"

    def body() -> None:
        run(cfg)

    return run_cli(body, (DataError, TrainError, MnistError, ModelFolderError, distributed.RankFailed), interrupted)
