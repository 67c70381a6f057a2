"""Share model folders through the Hugging Face Hub: push one as a model repo, load one back.

    python -m serve.hub push models/mnist --repo someone/mnist-resnet18 [--private] [--dry-run]
    python -m serve.hub pull hf://someone/mnist-resnet18 [--trust-remote-code]   # download, print the folder
    python -m serve hf://someone/mnist-resnet18                                  # serve it (serve/__main__.py)

Push stages the upload in a temporary folder and never touches the model folder: the folder's own
files, as they are, plus two generated ones,
- `README.md`: the model card with the Hub's YAML front matter (`library_name: fastai`,
  `pipeline_tag`, tags, the dataset, the validation accuracy as a `model-index`);
- `pyproject.toml`: the exact fastai/fastcore/python pins that `huggingface_hub.from_pretrained_fastai`
  reads, written by huggingface_hub's own helper, so fastai users can load the repo with that too.
The upload is `HfApi.create_repo(exist_ok=True)` + `upload_folder` (large files go up through Xet/LFS).

Loading (`resolve_model`) is `snapshot_download` into the standard Hugging Face cache; the snapshot
folder is then an ordinary model folder for `models.contract.load_model_folder`. A model in the cache
loads with no network (HF_HUB_OFFLINE=1 or the Hub unreachable): snapshot_download falls back to it.

A `model.pkl` is a pickle and unpickling runs whatever code its author put in it. Without
`--trust-remote-code` a model loads only from a repo in your own namespace (your user name or one of
your organisations, from `whoami`) and only at a revision that people with write access to it made:
the default branch, another branch, or a tag, checked against the repo's refs (`list_repo_refs`) by
exact name. A pull-request revision (refs/pr/N) is refused, since anyone may open a pull request on
a public repo, and so is a commit sha (it may be a pull request's commit) and anything else. The
download must then be the very commit the branch or tag named. With no token, offline, or when
`whoami` or the refs cannot be read, this cannot be checked and the flag is required.
`model.safetensors` and `model.onnx` run no code when loaded: those formats need no flag, from any
repo and revision, and are fetched without the pickle (`--format auto` picks model.onnx on the CPU
where the repo has it, else safetensors where the pickle would need the flag: `resolve_auto`).

The token comes from HF_TOKEN or `hf auth login` (huggingface_hub's `get_token`). Every failure a
person can fix (no token, 401/403, no network, no such repo) ends as `error: <one line>` and exit
code 2; importing this module never touches the network.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
import tempfile
from pathlib import Path

from models.cli import run_cli
from serve.source import HF_PREFIX, TRUST_REMOTE_CODE_HELP
from models.contract import (CARD_FILE, EXAMPLES_DIR, FORMAT_FILES, METADATA_FILE, MODEL_FILE, ModelFolderError,
                             ModelMetadata, read_metadata)

__all__ = ["HF_PREFIX", "TRUST_REMOTE_CODE_HELP", "HubError", "parse_spec", "resolve_model", "resolve_auto", "choose_format", "stage_model_repo",
           "model_card", "write_pyproject", "push_model", "check_model_folder", "describe_upload", "hub_token",
           "explain", "check_repo_id", "main"]

log = logging.getLogger(__name__)

PYPROJECT_FILE = "pyproject.toml"  # the file `from_pretrained_fastai` checks versions in
# A full commit id, SHA-1 or SHA-256, in either case (git reads both): never trusted as a branch name.
COMMIT_SHA = re.compile(r"[0-9a-fA-F]{40}|[0-9a-fA-F]{64}")
DEFAULT_BRANCH = "main"  # what huggingface_hub downloads when no revision is given (constants.DEFAULT_REVISION)
# The Hub id of the dataset `python -m train mnist` downloads; other sources are local folders with
# no Hub id, named in the card by their folder name only (a local path means nothing to readers).
MNIST_HUB_DATASET = "ylecun/mnist"
CARD_TAGS = ["fastai", "vision", "image-classification"]

class HubError(ModelFolderError):
    """A Hub operation that cannot go on; the message is one line, fit for a person."""


class MissingFormatError(HubError):
    """The repo is a model folder, but without the file of the format asked for."""


# ---- loading: hf://namespace/name[@revision] ---------------------------------------------------------

def parse_spec(spec: str) -> tuple[str, str | None]:
    """'hf://someone/name@rev' -> ('someone/name', 'rev'); the revision is optional."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if not spec.startswith(HF_PREFIX):
        raise HubError(f"{spec!r} is not a Hub model: write hf://<namespace>/<name>[@<revision>]")
    repo_id, _, revision = spec[len(HF_PREFIX):].strip("/").partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"{spec!r} is not a Hub model id ({str(e).splitlines()[0]})") from None
    return repo_id, (revision or None)


def hub_token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` saved; None when neither exists."""
    from huggingface_hub import get_token
    return get_token()


def _own_namespaces(token: str | None) -> tuple[set[str], str]:
    """The namespaces this user may trust without the flag, and how we know (for the message)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError
    if token is None:
        return set(), "you are not logged in: no HF_TOKEN and no `hf auth login`"
    if constants.is_offline_mode():
        return set(), "HF_HUB_OFFLINE is set, so who you are cannot be checked"
    try:
        me = HfApi().whoami(token=token, cache=True)
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise HubError("the Hub refused your token (401 Unauthorized): check HF_TOKEN or run "
                           "`hf auth login --force`") from None
        return set(), f"the Hub did not say who you are ({_first_line(e)})"
    except Exception as e:  # connection refused, DNS, timeout: an offline machine
        if not _is_network_error(e):
            raise
        return set(), "the Hub cannot be reached to check who you are"
    names = {me.get("name")} | {o.get("name") for o in me.get("orgs") or []}
    names.discard(None)
    orgs = sorted(names - {me.get("name")})
    return names, f"you are {me.get('name')}" + (f", with orgs {', '.join(orgs)}" if orgs else "")


def _pickle_trusted(repo_id: str, token: str | None) -> tuple[bool, str]:
    """Whether `repo_id`'s pickle may load without --trust-remote-code, and who you are (for the message)."""
    owner = repo_id.split("/")[0] if "/" in repo_id else None
    names, who = _own_namespaces(token)
    # Hub names are unique regardless of case, and URLs resolve whatever the case
    return owner is not None and owner.casefold() in {n.casefold() for n in names}, who


def choose_format(spec: str, trust_remote_code: bool = False, token: str | None = None) -> str:
    """What `--format auto` loads from `spec`: the learner pickle from a repo you trust (yours, or
    --trust-remote-code) at one of its branches or tags, else model.safetensors, which loads without
    running the author's code."""
    repo_id, revision = parse_spec(spec)
    if trust_remote_code:
        return "pickle"
    token = token or hub_token()
    if not _pickle_trusted(repo_id, token)[0]:
        return "safetensors"
    try:  # your own repo, but maybe at a pull request's revision: its pickle would be refused
        _trusted_commit(spec, repo_id, revision, token)
    except HubError:
        return "safetensors"
    return "pickle"


def resolve_auto(spec: str, trust_remote_code: bool = False, prefer_onnx: bool = False,
                 token: str | None = None) -> tuple[Path, str]:
    """`--format auto` for `spec`: (snapshot folder, format). With `prefer_onnx` (the model runs on the
    CPU) model.onnx from any repo and revision that has one, since loading ONNX runs no code of its
    author's; otherwise, or for a repo pushed before ONNX, `choose_format`'s pick. The first try
    fetches the repo without its pickle, so a stranger's pickle is never downloaded for nothing."""
    if prefer_onnx:
        try:
            return resolve_model(spec, trust_remote_code, token, format="onnx"), "onnx"
        except MissingFormatError:
            log.info("%s has no model.onnx: falling back", spec)
    format = choose_format(spec, trust_remote_code, token)
    return resolve_model(spec, trust_remote_code, token, format=format), format


def resolve_model(spec: str, trust_remote_code: bool = False, token: str | None = None, format: str = "pickle") -> Path:
    """Download `hf://namespace/name[@revision]` into the Hugging Face cache and return the snapshot
    folder, a model folder for `load_model_folder(folder, format)`. Raises `HubError` (a
    `ModelFolderError`) with a one-line message for anything a person must fix, including an untrusted
    repo's pickle. For the pickle-free formats the pickle is not even downloaded."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import get_fastai_version  # package metadata: no fastai import here
    repo_id, revision = parse_spec(spec)
    if format not in FORMAT_FILES:
        raise HubError(f"unknown model format {format!r}: use one of {', '.join(FORMAT_FILES)}")
    token = token or hub_token()
    commit = None  # the commit a trusted branch or tag names; None when no pickle is loaded or the flag waived it
    if format == "pickle" and not trust_remote_code:
        trusted, who = _pickle_trusted(repo_id, token)
        if not trusted:
            owner = repo_id.split("/")[0] if "/" in repo_id else None
            raise HubError(f"refusing to load {spec}: it is outside your namespace ({who}), and its {MODEL_FILE} "
                           "is a pickle that runs code when loaded; pass --trust-remote-code if you trust "
                           f"{owner or 'its author'}, or --format safetensors to load its weights alone")
        commit = _trusted_commit(spec, repo_id, revision, token)
    log.info("fetching %s into the Hugging Face cache", spec)
    try:
        folder = Path(snapshot_download(repo_id=repo_id, repo_type="model", revision=revision, token=token,
                                        library_name="fastai", library_version=get_fastai_version(),
                                        ignore_patterns=None if format == "pickle" else [MODEL_FILE]))
    except Exception as e:
        raise HubError(explain(e, action=f"load {spec}", repo_id=repo_id, repo_type="model")) from None
    # The cache names a snapshot folder by its commit. Another commit than the ref named means the Hub
    # resolved the name otherwise than its refs list says, or the branch moved meanwhile: refuse
    # either way, before anything unpickles it.
    if commit is not None and folder.name != commit:
        raise HubError(f"refusing to load {spec}: the download is commit {folder.name}, not the commit "
                       f"{commit} that {revision or DEFAULT_BRANCH!r} named a moment before; try again, or pass "
                       "--trust-remote-code if you trust every author of that commit")
    # a repo that is not one of our model folders is refused here, before anything unpickles it
    if not (folder / METADATA_FILE).is_file():
        raise HubError(f"{spec} is not a model folder of this project (it needs {METADATA_FILE} and {MODEL_FILE}; "
                       "push one with `python -m serve.hub push`)")
    if not (folder / FORMAT_FILES[format]).is_file():
        hint = (f"; if you trust its author, load its {MODEL_FILE} with --format pickle --trust-remote-code"
                if format != "pickle" else "")
        raise MissingFormatError(f"{spec} has no {FORMAT_FILES[format]} (pushed before this format existed, or not by "
                                 f"`python -m serve.hub push`){hint}")
    read_metadata(folder)
    return folder


def _trusted_commit(spec: str, repo_id: str, revision: str | None, token: str | None) -> str:
    """The commit `revision` (None: the default branch) points to, if it is exactly the name of a branch
    or a tag of `repo_id`: only people with write access to a repo create those. Anything else, a
    pull request's ref (refs/pr/N, which anyone can open), a commit sha (maybe a pull request's), a
    full or URL-encoded ref, another case of a name, raises HubError; so does not being able to ask."""
    from huggingface_hub import HfApi
    name = revision or DEFAULT_BRANCH
    refuse = (f"refusing to load {spec} without --trust-remote-code: {name!r} is not a branch or tag of {repo_id}; "
              "a pull request (refs/pr/N) or a commit sha can hold anyone's code, since anyone may open a pull "
              "request on a public repo. Name a branch or tag exactly, or pass --trust-remote-code if you trust "
              "whoever wrote that revision")
    # huggingface_hub takes 40 hex digits as a commit whatever the refs say, and the Hub reads refs/...
    # as a full ref name (refs/pr/N among them) even where a branch happens to have that name
    if COMMIT_SHA.fullmatch(name) or name.casefold().startswith("refs/"):
        raise HubError(refuse)
    try:
        refs = HfApi().list_repo_refs(repo_id, repo_type="model", token=token)
    except Exception as e:
        if _is_network_error(e):
            raise HubError(f"refusing to load {spec}: the Hub cannot be reached to check that {name!r} is a branch "
                           "or tag of it, not a pull request; pass --trust-remote-code to load it unchecked") from None
        raise HubError(explain(e, action=f"load {spec}", repo_id=repo_id, repo_type="model")) from None
    for ref in [*refs.branches, *refs.tags]:
        if ref.name == name and ref.ref in (f"refs/heads/{name}", f"refs/tags/{name}"):
            return ref.target_commit
    raise HubError(refuse)


# ---- errors: huggingface_hub's exceptions as one line a person can act on ----------------------------

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # huggingface_hub messages open with a status line and put the useful part after a blank line
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


def _is_network_error(e: BaseException) -> bool:
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled
    seen = set()
    while e is not None and id(e) not in seen:  # the network error may be the cause of a wrapper
        seen.add(id(e))
        if isinstance(e, (httpx2.TransportError, OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return True
        e = e.__cause__ or e.__context__
    return False


def explain(e: BaseException, action: str, repo_id: str, repo_type: str = "model") -> str:
    """One line saying why `action` on `repo_id` failed and what to do; re-raises what it cannot explain
    (a bug should keep its traceback)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                        LocalTokenNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
    kind = "Space" if repo_type == "space" else "model repo"
    where = constants.ENDPOINT
    if isinstance(e, LocalTokenNotFoundError):
        return f"cannot {action}: no Hugging Face token; set HF_TOKEN or run `hf auth login`"
    if isinstance(e, GatedRepoError):
        return f"cannot {action}: {repo_id} is gated; accept its conditions on {where}/{repo_id} with your account"
    if isinstance(e, RepositoryNotFoundError):
        return (f"cannot {action}: no {kind} {repo_id} on {where} (or it is private and your token "
                "cannot read it)")
    if isinstance(e, RevisionNotFoundError):
        return f"cannot {action}: {repo_id} has no such revision"
    if isinstance(e, LocalEntryNotFoundError):
        if constants.is_offline_mode():
            return (f"cannot {action}: it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                    "HF_HUB_OFFLINE is set; unset it and connect once to download it")
        return (f"cannot {action}: it is not in the local Hugging Face cache and the Hub at {where} cannot be "
                "reached; check your network")
    if isinstance(e, HfHubHTTPError) and e.response is not None:
        status = e.response.status_code
        if status == 401:
            return (f"cannot {action}: the Hub refused your token (401 Unauthorized); check HF_TOKEN or run "
                    "`hf auth login --force`")
        if status == 403:
            return (f"cannot {action}: permission denied (403 Forbidden); your token needs write access to "
                    f"the namespace {repo_id.split('/')[0]!r} (a fine-grained token must list it)")
        if status == 402:
            return f"cannot {action}: the Hub asks for a paid plan for this (402 Payment Required)"
        return f"cannot {action}: the Hub at {where} answered {status}: {_first_line(e)}"
    if _is_network_error(e):
        if constants.is_offline_mode():
            return f"cannot {action}: HF_HUB_OFFLINE is set; unset it to reach the Hub"
        return f"cannot {action}: the Hub at {where} cannot be reached ({_first_line(e)}); check your network"
    if isinstance(e, HFValidationError):
        return f"cannot {action}: {_first_line(e)}"
    if isinstance(e, ValueError) and "metadata in README.md" in str(e):
        return f"cannot {action}: the Hub rejected the card's front matter: {' '.join(str(e).split())}"
    raise e


# ---- push: a model folder as a Hub model repo ----------------------------------------------------------

def check_model_folder(folder: Path) -> ModelMetadata:
    """The folder's metadata, after checking it holds what a push or a Space needs."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ModelFolderError(f"model folder {folder} does not exist")
    meta = read_metadata(folder)
    if not (folder / MODEL_FILE).is_file():
        raise ModelFolderError(f"{folder} has no {MODEL_FILE}: the export did not finish, or this is not a model folder")
    return meta


def _card_dataset(meta: ModelMetadata, hub_dataset: str | None) -> tuple[str | None, str, str]:
    """(Hub dataset id or None, dataset type, pretty name) for the card."""
    if hub_dataset:
        return hub_dataset, hub_dataset, hub_dataset.split("/")[-1]
    source = str(meta.config.get("source") or meta.data.get("source") or "")
    if source == "mnist":
        return MNIST_HUB_DATASET, MNIST_HUB_DATASET, "MNIST"
    # a local folder of class folders: the Hub calls that layout "imagefolder"
    return None, "imagefolder", Path(source).name or "images"


def model_card(meta: ModelMetadata, body: str, repo_id: str, hub_dataset: str | None = None, license: str | None = None) -> str:
    """The model card: huggingface_hub's ModelCardData as YAML front matter, then the folder's card
    (any front matter it already has is replaced) and how to load the repo."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    from huggingface_hub.repocard import RepoCard
    dataset_id, dataset_type, dataset_name = _card_dataset(meta, hub_dataset)
    accuracy = meta.metrics.valid_accuracy
    data = ModelCardData(
        library_name="fastai",
        pipeline_tag="image-classification",
        tags=CARD_TAGS + [meta.arch],
        datasets=[dataset_id] if dataset_id else None,
        metrics=["accuracy"],
        license=license,
        model_name=repo_id.split("/")[-1],
        eval_results=[EvalResult(task_type="image-classification", task_name="Image Classification",
                                 dataset_type=dataset_type, dataset_name=dataset_name, dataset_split="validation",
                                 metric_type="accuracy", metric_name="Validation accuracy",
                                 metric_value=round(accuracy, 4))],
    )
    text = RepoCard(body).text if body.startswith("---") else body
    if "## Load from the Hub" not in text:
        text = text.rstrip() + "\n\n" + _hub_usage(repo_id)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{text.lstrip()}"))


def _hub_usage(repo_id: str) -> str:
    return f"""## Load from the Hub
```
python -m serve hf://{repo_id}            # the web app + HTTP API of this project
```
With fastai alone (`pip install toml` for huggingface_hub's version check):
```python
from huggingface_hub import from_pretrained_fastai
learn = from_pretrained_fastai("{repo_id}")
label, index, probs = learn.predict("image.png")
```
`{MODEL_FILE}` is a pickle: loading it runs code. Load it only if you trust its author; `python -m serve`
asks for `--trust-remote-code` for repos outside your own namespace, and loads their `{FORMAT_FILES["safetensors"]}`
(no pickle) without it. `huggingface_hub.snapshot_download("{repo_id}")` fetches every file for the
safetensors and onnxruntime examples above.
"""


def write_pyproject(folder: Path, versions: dict) -> Path:
    """`pyproject.toml` pinning the fastai, fastcore and python that made `model.pkl`, in the format
    `from_pretrained_fastai` checks. Normally huggingface_hub writes it itself (`_create_model_pyproject`,
    which pins the running versions); only when this process runs other versions than the training
    did is the same format filled with the training versions, since those are what the pickle needs."""
    from huggingface_hub.fastai_utils import _create_model_pyproject
    from huggingface_hub.utils import get_fastai_version, get_fastcore_version, get_python_version
    path = Path(folder) / PYPROJECT_FILE
    path.unlink(missing_ok=True)  # the helper never overwrites; a copied stale one must not survive
    wanted = (versions.get("fastai"), versions.get("fastcore"), versions.get("python"))
    if wanted == (get_fastai_version(), get_fastcore_version(), get_python_version()):
        _create_model_pyproject(Path(folder))
    else:
        log.warning("this process runs fastai %s, fastcore %s, python %s; pinning the model's fastai %s, "
                    "fastcore %s, python %s in %s", get_fastai_version(), get_fastcore_version(),
                    get_python_version(), *wanted, PYPROJECT_FILE)
        path.write_text('[build-system]\nrequires = ["setuptools>=40.8.0", "wheel", '
                        f'"python={wanted[2]}", "fastai={wanted[0]}", "fastcore={wanted[1]}"]\n'
                        'build-backend = "setuptools.build_meta:__legacy__"\n')
    return path


def stage_model_repo(folder: Path, out: Path, repo_id: str, hub_dataset: str | None = None,
                     license: str | None = None) -> Path:
    """Write what the model repo will hold into `out` (created; must not exist): the model folder's
    files as they are, its card with front matter, and pyproject.toml. `folder` is only read."""
    folder = Path(folder).expanduser()
    meta = check_model_folder(folder)
    out = Path(out)
    # dotfiles and caches are never part of a model; the card is regenerated below
    shutil.copytree(folder, out, ignore=shutil.ignore_patterns(".*", "__pycache__", "*.partial*", "*.tmp"))
    body = (folder / CARD_FILE).read_text(encoding="utf-8") if (folder / CARD_FILE).is_file() else f"# {meta.name}\n"
    (out / CARD_FILE).write_text(model_card(meta, body, repo_id, hub_dataset, license), encoding="utf-8")
    write_pyproject(out, meta.versions)
    return out


def describe_upload(folder: Path) -> str:
    """The files under `folder` with their sizes, as a person reads them, and the total."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    width = max((len(p.relative_to(folder).as_posix()) for p in files), default=0)
    lines = [f"  {p.relative_to(folder).as_posix():<{width}}  {_size(p.stat().st_size):>9}" for p in files]
    lines.append(f"  {len(files)} files, {_size(sum(p.stat().st_size for p in files))}")
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def push_model(folder: Path, repo_id: str, private: bool = False, hub_dataset: str | None = None,
               license: str | None = None, out: Path | None = None, dry_run: bool = False,
               token: str | None = None) -> str:
    """Push a model folder to the Hub model repo `repo_id` (created if missing). Returns the repo URL,
    or the staging folder on a dry run. Raises `HubError`/`ModelFolderError` with one-line messages."""
    from huggingface_hub import HfApi, constants
    check_repo_id(repo_id)
    meta = check_model_folder(folder)
    token = token or hub_token()
    if token is None and not dry_run:  # fail before staging a large folder
        raise HubError(f"cannot push to {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")
    with tempfile.TemporaryDirectory(prefix="hub-push-") as tmp:
        if out is not None:
            out = Path(out).expanduser()
            if out.exists():
                raise HubError(f"--out {out} exists: give a new folder for the staged repo")
        stage = stage_model_repo(folder, out if out is not None else Path(tmp) / "repo", repo_id, hub_dataset, license)
        print(f"{'would upload' if dry_run else 'uploading'} to model repo {repo_id}"
              f"{' (private)' if private else ''} on {constants.ENDPOINT}:\n{describe_upload(stage)}", flush=True)
        if dry_run:
            print(f"dry run: nothing uploaded; the staged repo is in {stage}" if out is not None
                  else "dry run: nothing uploaded (--out DIR keeps the staged repo)")
            return str(stage)
        api = HfApi(token=token)
        try:
            url = api.create_repo(repo_id, repo_type="model", private=private or None, exist_ok=True)
            api.upload_folder(repo_id=url.repo_id, folder_path=stage, repo_type="model",
                              commit_message=f"Upload {meta.name}: {meta.metrics.valid_accuracy:.2%} "
                                             "validation accuracy (serve.hub push)",
                              # a re-push replaces the example images instead of piling them up
                              delete_patterns=[f"{EXAMPLES_DIR}/*"])
        except Exception as e:
            raise HubError(explain(e, action=f"push to {repo_id}", repo_id=repo_id)) from None
    return str(url)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id
    if repo_id.count("/") != 1:
        raise HubError(f"--repo {repo_id!r}: write <namespace>/<name>, e.g. someone/mnist-resnet18")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise HubError(f"--repo {repo_id!r}: {_first_line(e)}") from None


# ---- command line ------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m serve.hub", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    push = sub.add_parser("push", help="push a model folder to a Hub model repo")
    push.add_argument("folder", type=Path, help="a model folder written by `python -m train`")
    push.add_argument("--repo", required=True, help="<namespace>/<name> of the model repo (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)")
    push.add_argument("--dataset", default=None, help=f"Hub dataset id the model was trained on, for the card "
                                                       f"(default: {MNIST_HUB_DATASET} for `mnist`, else none)")
    push.add_argument("--license", default=None, help="license id for the card, e.g. apache-2.0 (default: none)")
    push.add_argument("--out", type=Path, default=None, help="keep the staged repo in this new folder")
    push.add_argument("--dry-run", action="store_true", help="stage and list the files; no network")
    pull = sub.add_parser("pull", help="download hf://<namespace>/<name>[@rev] to the cache and print its folder")
    pull.add_argument("spec", help="hf://<namespace>/<name>[@revision]")
    pull.add_argument("--trust-remote-code", action="store_true", help=TRUST_REMOTE_CODE_HELP)
    p.add_argument("--quiet", action="store_true", help="warnings and errors only")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per HTTP request otherwise

    def body():
        if args.command == "push":
            url = push_model(args.folder, args.repo, private=args.private, hub_dataset=args.dataset,
                             license=args.license, out=args.out, dry_run=args.dry_run)
            if not args.dry_run:
                print(f"pushed: {url}\nserve it with: python -m serve {HF_PREFIX}{args.repo}")
        else:
            print(resolve_model(args.spec, trust_remote_code=args.trust_remote_code))

    return run_cli(body, (ModelFolderError,))  # HubError included


if __name__ == "__main__":
    sys.exit(main())
