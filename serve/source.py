"""Where a served model comes from: a local model folder, or `hf://owner/name[@revision]` fetched
from the Hugging Face Hub. Shared by `python -m serve` and `python -m serve.predict`."""
from __future__ import annotations

import warnings
from pathlib import Path

__all__ = ["HF_PREFIX", "TRUST_REMOTE_CODE_HELP", "resolve_folder", "quiet_known_warnings"]

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
