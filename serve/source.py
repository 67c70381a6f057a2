"""Where a served model comes from: a local model folder, or `hf://owner/name[@revision]` fetched
from the Hugging Face Hub. Shared by `python -m serve` and `python -m serve.predict`."""
from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["HF_PREFIX", "TRUST_REMOTE_CODE_HELP", "FORMAT_CHOICES", "FORMAT_HELP", "resolve_folder",
           "quiet_known_warnings"]

HF_PREFIX = "hf://"
# The help of every `--trust-remote-code`: it says why the flag exists.
TRUST_REMOTE_CODE_HELP = (
    "allow loading an hf:// model that is not the default branch, a branch or a tag of a repo in your "
    "own namespace (your Hugging Face user name or one of your organisations). model.pkl is a Python "
    "pickle, and unpickling runs any code its author put in it; anyone may open a pull request on a "
    "public repo, so a pull-request revision (@refs/pr/N) or a commit sha (@<sha>, maybe a pull "
    "request's commit) of your own repo needs this flag too. Pass it only for revisions whose authors "
    "you trust. Without a token, or offline, who you are and the repo's branches and tags cannot be "
    "checked, and every hf:// model needs it.")


# `--format` of `serve` and `serve.predict`: which of a model folder's three files to load.
FORMAT_CHOICES = ("auto", "pickle", "safetensors", "onnx")
FORMAT_HELP = (
    "which model file to load. pickle: model.pkl, the fastai learner (a pickle: loading it runs code). "
    "safetensors: model.safetensors, the weights alone, the network rebuilt from metadata.json; never "
    "unpickles anything. onnx: model.onnx on onnxruntime (CPU). auto (default): on the CPU, model.onnx "
    "where the folder or hf:// repo has one (any repo: ONNX runs no code when loaded; onnxruntime is the "
    "fastest CPU backend); otherwise, or on a GPU, pickle for a local folder and for hf:// repos you trust "
    "(your namespace, or --trust-remote-code) and safetensors for other hf:// repos, so they load without "
    "--trust-remote-code")


def resolve_folder(spec: str, trust_remote_code: bool = False, format: str = "auto",
                   device: str = "auto") -> tuple[Path, str]:
    """(local model folder, format to load) for `spec`: a path, or `hf://owner/name[@revision]`
    fetched by `serve.hub` (which raises `ModelFolderError` when it cannot). `device` is the one the
    model will run on: `auto` prefers model.onnx only where that is the CPU (see FORMAT_HELP)."""
    prefer_onnx = format == "auto" and _runs_on_cpu(device)
    if str(spec).startswith(HF_PREFIX):
        from models.contract import ModelFolderError
        try:
            from serve.hub import resolve_auto, resolve_model
        except ImportError as e:
            raise ModelFolderError(f"cannot fetch {spec}: Hub support is not available ({e})") from None
        if format == "auto":
            return resolve_auto(spec, trust_remote_code, prefer_onnx=prefer_onnx)
        return Path(resolve_model(spec, trust_remote_code=trust_remote_code, format=format)), format
    if format == "auto":
        from models.contract import ONNX_FILE
        format = "onnx" if prefer_onnx and (Path(spec) / ONNX_FILE).is_file() else "pickle"
    return Path(spec), format


def _runs_on_cpu(device: str) -> bool:
    """Whether `--device` resolves to the CPU here. onnxruntime runs on the CPU alone (models/onnx.py),
    so on a GPU the torch formats stay the default."""
    from models.device import pick_device
    return pick_device(device).type == "cpu"


def quiet_known_warnings() -> None:
    """Two warnings every start would print, neither actionable by the person starting it:
    fastai's use of `torch.jit.script` at import, and `load_learner`'s note that pickles run code
    (the model folder is the user's own, or `--trust-remote-code` was an explicit choice)."""
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"load_learner` uses Python's insecure pickle", category=UserWarning)
