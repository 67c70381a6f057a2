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

from models.cli import port_int, positive_float, positive_int, run_cli
from serve.source import FORMAT_CHOICES, FORMAT_HELP, TRUST_REMOTE_CODE_HELP, quiet_known_warnings, resolve_folder

def build_parser() -> argparse.ArgumentParser:
    from serve.app import GRACE_S, UPLOAD_TTL
    from models.imageio import MAX_PIXELS
    from serve.limits import BODY_MIN_RATE, Limits
    d = Limits()
    p = argparse.ArgumentParser(prog="python -m serve", description=__doc__.split("\n")[0])
    p.add_argument("model", help="model folder written by `python -m train`, or hf://owner/name[@revision]")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=port_int, default=7860, help="TCP port (default 7860; 0 picks a free one)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="auto: CUDA, else MPS, else CPU")
    p.add_argument("--top-k", type=positive_int, default=None, help="classes shown in the UI (default 3, or fewer classes)")
    p.add_argument("--max-files", type=positive_int, default=d.max_files, help=f"images per API request (default {d.max_files})")
    p.add_argument("--max-file-mb", type=positive_float, default=d.max_file_mb,
                   help=f"MB per uploaded file, API and UI (default {d.max_file_mb:g})")
    p.add_argument("--max-batch", type=positive_int, default=d.max_batch,
                   help=f"images per forward pass across concurrent requests, a cap: a larger request "
                        f"spans several passes (default {d.max_batch})")
    p.add_argument("--max-request-mb", type=positive_float, default=d.max_request_mb,
                   help=f"MB in one request body, any route; larger: 413 (default {d.max_request_mb:g})")
    p.add_argument("--max-inflight-mb", type=positive_float, default=d.max_inflight_mb,
                   help=f"MB of request bodies held at once, server-wide; beyond: 503 with Retry-After "
                        f"(default {d.max_inflight_mb:g}; the server's memory grows by about 1.1 MB per MB "
                        f"held, plus decoding)")
    p.add_argument("--max-decode-mp", type=positive_float, default=d.max_decode_mp, metavar="MP",
                   help=f"megapixels being decoded at once, API and UI together; more wait their turn "
                        f"(default {d.max_decode_mp:g}: two images at the {MAX_PIXELS / 1e6:g} MP limit; decoding "
                        f"costs ~8 bytes per pixel of 8-bit RGB, up to ~20 for other kinds)")
    p.add_argument("--max-connections", type=positive_int, default=d.max_connections,
                   help=f"open connections; a new one beyond them is answered 503 and closed "
                        f"(default {d.max_connections})")
    p.add_argument("--keep-alive", type=positive_float, default=d.keep_alive_s, metavar="S",
                   help=f"seconds an idle connection, or one still sending its request's headers, is kept "
                        f"(default {d.keep_alive_s:g})")
    p.add_argument("--body-timeout", type=positive_float, default=d.body_timeout_s, metavar="S",
                   help=f"seconds a request body may take, plus 1 s per {BODY_MIN_RATE // 1000} kB received; "
                        f"slower: 408 (default {d.body_timeout_s:g})")
    p.add_argument("--max-queue", type=positive_int, default=d.max_queue, metavar="N",
                   help=f"images waiting for the model, API and UI together; a request beyond is refused at once "
                        f"with 503 and Retry-After (default {d.max_queue}: four full passes, at least --max-files; "
                        f"at the 160-320 images/s of the MNIST model on 2 busy cores, a wait of 1-2 s: "
                        f"bench/serve_load.py)")
    p.add_argument("--timeout", type=positive_float, default=d.queue_timeout_s, metavar="S",
                   help=f"seconds a request may wait in that queue for the model; longer: 503, its images "
                        f"dropped unrun (default {d.queue_timeout_s:g})")
    p.add_argument("--grace", type=positive_float, default=GRACE_S, metavar="S",
                   help=f"on SIGTERM or Ctrl-C: readiness 503, new requests 503, those received are answered, "
                        f"exit 0 within this many seconds (default {GRACE_S:g}: under docker stop's 10 s, and "
                        f"over --timeout plus a forward pass)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads for forward passes (default: CPU cores minus one, left to the event loop)")
    p.add_argument("--upload-ttl", type=positive_int, default=UPLOAD_TTL, metavar="SECONDS",
                   help=f"delete each web-UI upload this many seconds after it came, at the latest twice that "
                        f"(default {UPLOAD_TTL}); uploads live in a folder of the server's own, removed when it stops")
    p.add_argument("--format", choices=FORMAT_CHOICES, default="auto", help=FORMAT_HELP)
    p.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="log warnings only")
    return p


def serve(args) -> None:
    from serve.limits import Limits
    # First: flags that contradict each other fail before the model loads.
    limits = Limits(max_files=args.max_files, max_file_mb=args.max_file_mb, max_batch=args.max_batch,
                    max_request_mb=args.max_request_mb, max_inflight_mb=args.max_inflight_mb,
                    max_connections=args.max_connections, keep_alive_s=args.keep_alive,
                    body_timeout_s=args.body_timeout, max_queue=args.max_queue, queue_timeout_s=args.timeout,
                    max_decode_mp=args.max_decode_mp)
    from serve.predictor import Predictor, configure_threads
    # The event loop (HTTP parsing, Gradio's queue, decoding) keeps about one core busy under load.
    threads = configure_threads(1, args.threads)
    # Load (and check) the model before importing Gradio: a bad folder fails in seconds.
    folder, format = resolve_folder(args.model, args.trust_remote_code, args.format, args.device)
    predictor = Predictor.load(folder, device=args.device, format=format, threads=threads)
    logging.getLogger(__name__).info("loaded %s (%s): %d classes, on %s (%d thread(s))", predictor.name, format,
                                     len(predictor.classes), predictor.device, threads)
    from serve.app import launch
    launch(predictor, host=args.host, port=args.port, limits=limits, top_k=args.top_k,
           upload_ttl=args.upload_ttl, grace_s=args.grace)


def main(argv=None) -> int:
    quiet_known_warnings()
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from models.contract import ModelFolderError
    return run_cli(lambda: serve(args), (ModelFolderError, ValueError))


def exit_now(code: int) -> None:
    """Exit with `code` once the atexit handlers have run, skipping the interpreter's teardown of
    torch, fastai and Gradio: after a graceful shutdown it took 9 s on 2 busy cores, time that
    counts against --grace and the process manager's SIGKILL, and frees nothing the exit does not."""
    import atexit
    import os
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
