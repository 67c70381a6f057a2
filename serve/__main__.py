"""Serve an exported model: the web UI and the JSON API on one port.

    python -m serve models/mnist --port 7860                 # http://127.0.0.1:7860
    python -m serve hf://owner/name@main --host 0.0.0.0      # a model folder from the Hugging Face Hub

The model is loaded once, at start-up. A folder that is missing, incomplete, unreadable or made
with another major version of fastai is refused with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

HF_PREFIX = "hf://"
TRUST_REMOTE_CODE_HELP = ("allow loading a model pickle from a Hub repo outside your own namespace: "
                          "unpickling runs code, so only for repos you trust")


def resolve_folder(spec: str, trust_remote_code: bool = False) -> Path:
    """A local model folder for `spec`: a path, or `hf://owner/name[@revision]` fetched by
    `serve.hub.resolve_model` (which raises `ModelFolderError` when it cannot)."""
    if str(spec).startswith(HF_PREFIX):
        from models.contract import ModelFolderError
        try:
            from serve.hub import resolve_model
        except ImportError as e:
            raise ModelFolderError(f"cannot fetch {spec}: Hub support is not available ({e})") from None
        return Path(resolve_model(spec, trust_remote_code=trust_remote_code))
    return Path(spec)


def quiet_known_warnings() -> None:
    """Two warnings every start would print, neither actionable by the person starting it:
    fastai's use of `torch.jit.script` at import, and `load_learner`'s note that pickles run code
    (the model folder is the user's own, or `--trust-remote-code` was an explicit choice)."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"load_learner` uses Python's insecure pickle", category=UserWarning)


def build_parser() -> argparse.ArgumentParser:
    from serve.api import Limits
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder written by `python -m train`, or hf://owner/name[@revision]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: CUDA, else MPS, else CPU")
    p.add_argument("--top-k", type=int, default=None, help="classes shown in the UI (default 3, or fewer classes)")
    p.add_argument("--max-files", type=int, default=d.max_files, help=f"images per API request (default {d.max_files})")
    p.add_argument("--max-file-mb", type=float, default=d.max_file_mb,
                   help=f"MB per uploaded file, API and UI (default {d.max_file_mb:g})")
    p.add_argument("--max-batch", type=int, default=d.max_batch,
                   help=f"images per forward pass across concurrent API requests (default {d.max_batch})")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads for forward passes (default: CPU cores minus one, left to the event loop)")
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def main(argv=None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.contract import ModelFolderError
    for name, value in (("--max-files", args.max_files), ("--max-file-mb", args.max_file_mb),
                        ("--max-batch", args.max_batch), ("--top-k", args.top_k or 1),
                        ("--threads", args.threads or 1)):
        if value <= 0:
            print(f"error: {name} must be positive", file=sys.stderr)
            return 2
    try:
        from serve.predictor import Predictor, configure_threads
        # Load (and check) the model before importing Gradio: a bad folder fails in seconds.
        predictor = Predictor.load(resolve_folder(args.model, args.trust_remote_code), device=args.device)
    except (ModelFolderError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The event loop (HTTP parsing, Gradio's queue, decoding) keeps about one core busy under load.
    threads = configure_threads(1, args.threads)
    logging.getLogger(__name__).info("loaded %s: %d classes, on %s (%d torch thread(s))", predictor.name,
                                     len(predictor.classes), predictor.device, threads)
    from serve.api import Limits
    from serve.app import launch
    limits = Limits(max_files=args.max_files, max_file_mb=args.max_file_mb, max_batch=args.max_batch)
    launch(predictor, host=args.host, port=args.port, limits=limits, top_k=args.top_k)
    return 0


if __name__ == "__main__":
    sys.exit(main())
