"""serve.hub and the Space upload against a fake Hugging Face Hub, faked only at the network boundary.

`FakeHub` is a real HTTP server on 127.0.0.1 that speaks the part of the Hub's HTTP API that
huggingface_hub 2.x uses for these calls (whoami, repos/create, preupload, the LFS batch API and a
basic-transfer PUT, the ndjson commit, repo info, refs, tree listing, resolve), with branches, tags
and pull requests as other commits of a repo (`FakeHub.add_ref`). The code under test runs
unmodified in a subprocess with HF_ENDPOINT pointing at it, so every request goes through
huggingface_hub's own client (httpx2) and over a socket, exactly as against huggingface.co.
What it does not speak is Xet: hf_xet talks to a CAS service through its own Rust client, so the
subprocesses set HF_HUB_DISABLE_XET=1 and huggingface_hub falls back to its LFS upload path.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from tests.conftest import ROOT

PY = sys.executable
ALICE = "hf_alice_token"      # alice, member of the org "acme"
BOB = "hf_bob_token"          # bob, another user
USERS = {ALICE: ("alice", ["acme"]), BOB: ("bob", [])}
GITATTRIBUTES = b"*.pkl filter=lfs diff=lfs merge=lfs -text\n*.png filter=lfs diff=lfs merge=lfs -text\n"
LFS_SUFFIXES = {".pkl", ".png", ".jpg", ".bin", ".pt", ".safetensors"}


# ------------------------------------------------------------------------------------------------ fake Hub

@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    sdk: str | None = None
    files: dict = field(default_factory=dict)     # path -> bytes
    lfs: set = field(default_factory=set)         # paths stored through LFS
    sha: str = field(default_factory=lambda: secrets.token_hex(20))   # the head of main
    commits: list = field(default_factory=list)
    # other commits, by sha: (files, lfs paths); and refs other than main, full name -> sha
    # ("refs/heads/dev", "refs/tags/v1", "refs/pr/1": a pull request, which anyone may open)
    snapshots: dict = field(default_factory=dict)
    refs: dict = field(default_factory=dict)

    def at(self, rev: str | None):
        """(sha, files, lfs) at a revision as the Hub resolves one: main, a commit sha, a full ref name,
        then a branch, then a tag name; None when there is no such revision."""
        if rev in (None, "main", "refs/heads/main", self.sha):
            return self.sha, self.files, self.lfs
        sha = rev if rev in self.snapshots else (self.refs.get(rev) or self.refs.get(f"refs/heads/{rev}")
                                                  or self.refs.get(f"refs/tags/{rev}"))
        if sha == self.sha:
            return self.sha, self.files, self.lfs
        return (sha, *self.snapshots[sha]) if sha in self.snapshots else None


def _blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """Just enough of huggingface.co's HTTP API, with users, permissions and a request log."""

    def __init__(self):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.lfs_store: dict[str, bytes] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        # a test's hook, run after the refs are read and before they are sent; "drop" closes the connection
        self.before_refs_reply = None
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's shared client expects

            def log_message(self, *args):  # quiet
                pass

            def _dispatch(self):
                try:
                    hub.handle(self)
                except Exception as e:  # a fake-Hub bug must show, not hang the client
                    hub.reply(self, 500, {"error": f"fake hub: {type(e).__name__}: {e}"})

            do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _dispatch

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- plumbing
    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def read_body(h) -> bytes:
        if h.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(h.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    h.rfile.readline()
                    return out
                out += h.rfile.read(size)
                h.rfile.readline()
        n = int(h.headers.get("Content-Length") or 0)
        return h.rfile.read(n) if n else b""

    @staticmethod
    def reply(h, status: int, body=None, headers: dict | None = None):
        data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
        h.send_response(status)
        if not isinstance(body, bytes):
            h.send_header("Content-Type", "application/json")
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def user(self, h):
        """(ok, (name, orgs) or None): a token that is not one of ours is a 401 everywhere, as on the Hub."""
        auth = h.headers.get("Authorization", "")
        if not auth.startswith("Bearer "):
            return True, None
        token = auth[len("Bearer "):]
        return (token in USERS), USERS.get(token)

    def seed(self, repo_type: str, repo_id: str, folder: Path, private=False) -> Repo:
        """Put a repo on the fake Hub directly, as if its owner had pushed it."""
        repo = Repo(repo_type, repo_id, private=private, files={".gitattributes": GITATTRIBUTES})
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                repo.files[rel] = p.read_bytes()
                if p.suffix in LFS_SUFFIXES:
                    repo.lfs.add(rel)
        self.repos[(repo_type, repo_id)] = repo
        return repo

    def add_ref(self, repo_type: str, repo_id: str, ref: str, folder: Path) -> str:
        """Give a seeded repo another commit with the files of `folder`, at `ref` ("refs/heads/dev",
        "refs/tags/v1", "refs/pr/1"); returns its sha."""
        repo, sha = self.repos[(repo_type, repo_id)], secrets.token_hex(20)
        files, lfs = {".gitattributes": GITATTRIBUTES}, set()
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                rel = p.relative_to(folder).as_posix()
                files[rel] = p.read_bytes()
                if p.suffix in LFS_SUFFIXES:
                    lfs.add(rel)
        repo.snapshots[sha] = (files, lfs)
        repo.refs[ref] = sha
        return sha

    def log(self, method: str, kind: str) -> list[dict]:
        return [r for r in self.requests if r["method"] == method and r["kind"] == kind]

    # -- the API
    def handle(self, h):
        url = urlsplit(h.path)
        # routes match the path as sent, and each part is then unquoted: huggingface_hub quotes a
        # revision whole (refs/pr/1 -> refs%2Fpr%2F1), so its slashes are not path separators
        path, query = unquote(url.path), parse_qs(url.query)
        body = self.read_body(h) if h.command in ("POST", "PUT") else b""
        ok, who = self.user(h)
        entry = {"method": h.command, "path": path, "query": query, "user": who[0] if who else None, "kind": "?"}
        if h.headers.get("Content-Type", "").startswith("application/json") and body:
            entry["json"] = json.loads(body)
        with self.lock:
            self.requests.append(entry)
        if not ok:
            return self.reply(h, 401, {"error": "Invalid credentials in Authorization header"},
                              {"X-Error-Message": "Invalid credentials in Authorization header"})

        routes = [
            ("GET", r"/api/whoami-v2", self.whoami, "whoami"),
            ("POST", r"/api/validate-yaml", self.validate_yaml, "validate-yaml"),
            ("POST", r"/api/repos/create", self.create, "create"),
            ("POST", r"/api/(?P<t>models|spaces)/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)", self.preupload, "preupload"),
            ("POST", r"/api/(?P<t>models|spaces)/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)", self.commit, "commit"),
            ("GET", r"/api/(?P<t>models|spaces)/(?P<repo>[^/]+/[^/]+)/refs", self.list_refs, "refs"),
            ("GET", r"/api/(?P<t>models|spaces)/(?P<repo>[^/]+/[^/]+)/tree/(?P<rev>[^/]+)", self.tree, "tree"),
            ("GET", r"/api/(?P<t>models|spaces)/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?", self.info, "info"),
            ("POST", r"/(?:(?P<t>spaces)/)?(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self.lfs_batch, "lfs-batch"),
            ("PUT", r"/__lfs__/(?P<oid>[0-9a-f]{64})", self.lfs_put, "lfs-put"),
            ("GET|HEAD", r"/(?:(?P<t>spaces)/)?(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)", self.resolve, "resolve"),
        ]
        for methods, pattern, fn, kind in routes:
            m = re.fullmatch(pattern, url.path)
            if m and h.command in methods.split("|"):
                entry["kind"] = kind
                return fn(h, who, body, **{k: v if v is None else unquote(v) for k, v in m.groupdict().items()})
        return self.reply(h, 404, {"error": f"fake hub has no route {h.command} {path}"})

    @staticmethod
    def _type(t: str | None) -> str:
        return {"models": "model", "spaces": "space", None: "model"}[t]

    def _visible(self, h, who, t, repo_id) -> Repo | None:
        repo = self.repos.get((self._type(t), repo_id))
        if repo is None or (repo.private and not (who and repo_id.split("/")[0] in [who[0], *who[1]])):
            self.reply(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound",
                                                                   "X-Error-Message": "Repository not found"})
            return None
        return repo

    def _at(self, h, who, t, repo_id, rev):
        """(repo, sha, files, lfs) at `rev`, or None after replying 404."""
        repo = self._visible(h, who, t, repo_id)
        if repo is None:
            return None
        found = repo.at(rev)
        if found is None:
            self.reply(h, 404, {"error": "Invalid rev id"}, {"X-Error-Code": "RevisionNotFound"})
            return None
        return (repo, *found)

    def _writable(self, h, who, t, repo_id) -> Repo | None:
        repo = self._visible(h, who, t, repo_id)
        if repo is not None and not (who and repo_id.split("/")[0] in [who[0], *who[1]]):
            self.reply(h, 403, {"error": f"You don't have the rights to write to {repo_id}"},
                       {"X-Error-Message": f"You don't have the rights to write to {repo_id}"})
            return None
        return repo

    def _url(self, repo: Repo) -> str:
        return f"{self.url}/{'spaces/' if repo.repo_type == 'space' else ''}{repo.repo_id}"

    def whoami(self, h, who, body):
        if who is None:
            return self.reply(h, 401, {"error": "Invalid credentials in Authorization header"})
        self.reply(h, 200, {"type": "user", "name": who[0], "orgs": [{"name": o, "type": "org"} for o in who[1]],
                            "auth": {"type": "access_token", "accessToken": {"role": "write"}}})

    def validate_yaml(self, h, who, body):
        import yaml
        content = json.loads(body)["content"]
        try:
            yaml.safe_load(content.split("---")[1])
        except Exception as e:
            return self.reply(h, 400, {"errors": [{"message": str(e)}]})
        self.reply(h, 200, {"errors": [], "warnings": []})

    def create(self, h, who, body):
        p = json.loads(body)
        if who is None:
            return self.reply(h, 401, {"error": "You must be authenticated to create a repo"})
        namespace = p.get("organization") or who[0]
        repo_id, repo_type = f"{namespace}/{p['name']}", p.get("type") or "model"
        if namespace not in [who[0], *who[1]]:
            msg = f"You don't have the rights to create a {repo_type} under the namespace \"{namespace}\""
            return self.reply(h, 403, {"error": msg}, {"X-Error-Message": msg})
        if (repo_type, repo_id) in self.repos:
            return self.reply(h, 409, {"error": f"You already created this {repo_type} repo",
                                       "url": self._url(self.repos[(repo_type, repo_id)])})
        repo = Repo(repo_type, repo_id, private=p.get("visibility") == "private", sdk=p.get("sdk"),
                    files={".gitattributes": GITATTRIBUTES})
        self.repos[(repo_type, repo_id)] = repo
        self.reply(h, 200, {"url": self._url(repo), "name": repo_id, "id": secrets.token_hex(12)})

    def info(self, h, who, body, t, repo, rev=None):
        found = self._at(h, who, t, repo, rev)
        if found:
            r, sha, files, _ = found
            self.reply(h, 200, {"id": r.repo_id, "sha": sha, "private": r.private, "sdk": r.sdk,
                                "siblings": [{"rfilename": f} for f in sorted(files)]})

    def list_refs(self, h, who, body, t, repo):
        r = self._visible(h, who, t, repo)
        if not r:
            return
        info = lambda ref, sha: {"name": ref.split("/", 2)[2], "ref": ref, "targetCommit": sha}
        refs = {"refs/heads/main": r.sha, **r.refs}
        out = {"branches": [info(k, v) for k, v in refs.items() if k.startswith("refs/heads/")],
               "tags": [info(k, v) for k, v in refs.items() if k.startswith("refs/tags/")], "converts": []}
        if "include_prs" in parse_qs(urlsplit(h.path).query):
            out["pullRequests"] = [info(k, v) for k, v in refs.items() if k.startswith("refs/pr/")]
        if self.before_refs_reply is not None and self.before_refs_reply(r) == "drop":
            h.close_connection = True
            h.connection.shutdown(socket.SHUT_RDWR)  # no answer at all: a network failure to the client
            return
        self.reply(h, 200, out)

    def tree(self, h, who, body, t, repo, rev):
        found = self._at(h, who, t, repo, rev)
        if found:
            _, _, files, lfs = found
            self.reply(h, 200, [{"type": "file", "path": f, "size": len(d), "oid": _blob_sha(d),
                                 **({"lfs": {"oid": hashlib.sha256(d).hexdigest(), "size": len(d), "pointerSize": 134}}
                                    if f in lfs else {})}
                                for f, d in sorted(files.items())])

    def resolve(self, h, who, body, t, repo, rev, file):
        found = self._at(h, who, t, repo, rev)
        if not found:
            return
        _, sha, files, lfs = found
        if file not in files:
            return self.reply(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
        data = files[file]
        etag = hashlib.sha256(data).hexdigest() if file in lfs else _blob_sha(data)
        self.reply(h, 200, data, {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Type": "application/octet-stream"})

    def preupload(self, h, who, body, t, repo, rev):
        if self._writable(h, who, t, repo):
            files = json.loads(body)["files"]
            mode = lambda f: ("lfs" if f["size"] >= 10_000_000 or Path(f["path"]).suffix in LFS_SUFFIXES
                              or b"\0" in base64.b64decode(f["sample"]) else "regular")
            self.reply(h, 200, {"files": [{"path": f["path"], "uploadMode": mode(f), "shouldIgnore": False}
                                          for f in files]})

    def lfs_batch(self, h, who, body, t, repo):
        if self._writable(h, who, t, repo):
            objects = json.loads(body)["objects"]
            self.reply(h, 200, {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"], "authenticated": True,
                 **({} if o["oid"] in self.lfs_store else {"actions": {"upload": {"href": f"{self.url}/__lfs__/{o['oid']}"}}})}
                for o in objects]})

    def lfs_put(self, h, who, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return self.reply(h, 400, {"error": "sha256 mismatch"})
        self.lfs_store[oid] = body
        self.reply(h, 200, {})

    def commit(self, h, who, body, t, repo, rev):
        r = self._writable(h, who, t, repo)
        if not r:
            return
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(item["value"] for item in lines if item["key"] == "header")
        files, added, deleted = dict(r.files), {}, []
        lfs = set(r.lfs)
        for item in lines:
            k, v = item["key"], item["value"]
            if k == "file":
                files[v["path"]] = base64.b64decode(v["content"])
                lfs.discard(v["path"])
                added[v["path"]] = "regular"
            elif k == "lfsFile":
                if v["oid"] not in self.lfs_store:
                    return self.reply(h, 422, {"error": f"LFS object {v['oid']} was never uploaded"})
                files[v["path"]] = self.lfs_store[v["oid"]]
                lfs.add(v["path"])
                added[v["path"]] = "lfs"
            elif k in ("deletedFile", "deletedFolder"):
                gone = [f for f in files if f == v["path"] or f.startswith(v["path"].rstrip("/") + "/")]
                for f in gone:
                    del files[f]
                    lfs.discard(f)
                deleted += gone
        r.files, r.lfs, r.sha = files, lfs, secrets.token_hex(20)
        r.commits.append({"summary": header["summary"], "added": added, "deleted": deleted})
        self.reply(h, 200, {"commitUrl": f"{self._url(r)}/commit/{r.sha}", "commitOid": r.sha, "pullRequestUrl": None})


# ------------------------------------------------------------------------------------------------ helpers

@pytest.fixture
def hub():
    fake = FakeHub().start()
    yield fake
    fake.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(endpoint: str, home: Path, token: str | None = ALICE, offline: bool = False) -> dict:
    """A process environment that can only reach `endpoint`, with its own HF_HOME (token file, cache)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_")) and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "pythonpath")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_OFFLINE="1" if offline else "0",
               GRADIO_ANALYTICS_ENABLED="False", NO_PROXY="127.0.0.1,localhost")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


def run(args: list, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    """A command of ours in a fresh process, from the checkout, as a user runs it."""
    return subprocess.run([PY, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def assert_clean_error(p: subprocess.CompletedProcess, *words: str):
    """Exit code 2, one `error: ...` line on stderr, no traceback, and the line says `words`."""
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    errors = [line for line in p.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, p.stderr
    for w in words:
        assert w.lower() in errors[0].lower(), (w, errors[0])
    return errors[0]


def predict_with_app(args: list, cwd: Path, env: dict, image: Path, log: Path, timeout: float = 300,
                     host: str = "127.0.0.1", port: int | None = None, while_up=None):
    """Start an app (`python *args`) in its own process, wait until gradio_client can connect to
    host:port (default: $PORT, else the --port argument), call its /predict with `image`, call
    `while_up()` if given, stop the app, and return what /predict returned."""
    import time
    from gradio_client import Client, handle_file
    if port is None:
        port = int(env["PORT"]) if "PORT" in env else int(args[args.index("--port") + 1])
    with open(log, "w") as fh:
        proc = subprocess.Popen([PY, *map(str, args)], cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        client, deadline = None, time.time() + timeout  # fastai + gradio imports on a busy 2-core box
        while client is None:
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            if time.time() > deadline:
                pytest.fail(f"the app did not answer on port {port}:\n{log.read_text()[-4000:]}")
            try:
                client = Client(f"http://{host}:{port}/", verbose=False)
            except Exception:
                time.sleep(1)
        result = client.predict(handle_file(str(image)), api_name="/predict")
        if while_up is not None:
            while_up()
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def top_label(result) -> str:
    """The top class from what /predict returns: a gr.Label dict, a (label, ...) tuple, or a label."""
    if isinstance(result, (list, tuple)):
        return top_label(result[0])
    if isinstance(result, dict):
        return str(result.get("label") if "label" in result else max(result, key=result.get))
    return str(result)


def folder_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def staged(mnist_model, tmp_path_factory) -> Path:
    """The folder `push` would upload for the session's MNIST model."""
    from serve.hub import stage_model_repo
    return stage_model_repo(mnist_model, tmp_path_factory.mktemp("staged") / "repo", "alice/mnist-resnet18")


@pytest.fixture(scope="module")
def digit(mnist_model, mnist_arrays, tmp_path_factory) -> tuple[Path, str]:
    """An MNIST test digit (PNG) that the model gets right according to fastai's own learn.predict."""
    from PIL import Image
    from models.contract import load_model_folder
    learn = load_model_folder(mnist_model).learner
    out = tmp_path_factory.mktemp("digit")
    for i in range(2000, 2100):
        path = out / f"{i}.png"
        Image.fromarray(mnist_arrays.valid_images[i]).save(path)
        label = str(int(mnist_arrays.valid_labels[i]))
        if learn.predict(path)[0] == label:
            return path, label
    pytest.fail("the test model got 100 digits in a row wrong")


# ------------------------------------------------------------------------------------------------ the staged repo

def test_staged_repo_is_the_model_folder_plus_card_and_pyproject(mnist_model, staged):
    before = folder_files(mnist_model)
    src, out = folder_files(mnist_model), folder_files(staged)
    assert set(out) == set(src) | {"pyproject.toml"}
    assert all(out[f] == src[f] for f in src if f != "README.md")  # the files as they are
    assert folder_files(mnist_model) == before  # the model folder is not touched


def test_card_front_matter(mnist_model, staged):
    from huggingface_hub import ModelCard, metadata_load
    from models.contract import read_metadata
    meta = read_metadata(mnist_model)
    card = ModelCard.load(staged / "README.md")
    d = card.data
    assert d.library_name == "fastai" and d.pipeline_tag == "image-classification"
    assert {"fastai", "vision", "image-classification", "resnet18"} <= set(d.tags)
    assert d.metrics == ["accuracy"]
    (result,) = d.eval_results
    assert (result.task_type, result.metric_type, result.dataset_split) == ("image-classification", "accuracy", "validation")
    assert result.metric_value == pytest.approx(meta.metrics.valid_accuracy, abs=1e-4)
    assert result.dataset_type == "imagefolder" and result.dataset_name == Path(meta.data["source"]).name
    # the raw model-index, in the Hub's form
    raw = metadata_load(staged / "README.md")
    (index,) = raw["model-index"]
    assert index["name"] == "mnist-resnet18"
    (res,) = index["results"]
    assert res["task"]["type"] == "image-classification"
    assert set(res["dataset"]) >= {"name", "type"}
    assert res["metrics"][0]["type"] == "accuracy" and res["metrics"][0]["value"] == result.metric_value
    # the body is the folder's card, then how to load it from the Hub
    original = (mnist_model / "README.md").read_text()
    assert original.strip().splitlines()[0] in card.text and "hf://alice/mnist-resnet18" in card.text


def test_card_for_mnist_names_the_hub_dataset(mnist_model):
    import dataclasses
    from huggingface_hub import ModelCard
    from models.contract import read_metadata
    from serve.hub import MNIST_HUB_DATASET, model_card
    meta = dataclasses.replace(read_metadata(mnist_model), config={"source": "mnist"})
    card = ModelCard(model_card(meta, "---\nlicense: mit\n---\n# old card\n", "a/b", license="apache-2.0"))
    assert card.data.datasets == [MNIST_HUB_DATASET] and card.data.license == "apache-2.0"
    assert card.data.eval_results[0].dataset_type == MNIST_HUB_DATASET and card.text.lstrip().startswith("# old card")


def test_pyproject_is_huggingface_hubs_own_with_the_running_pins(staged):
    import platform
    import fastai
    import fastcore
    import toml
    from huggingface_hub import fastai_utils
    text = (staged / "pyproject.toml").read_text()
    assert text == fastai_utils.PYPROJECT_TEMPLATE  # written by huggingface_hub's _create_model_pyproject
    requires = toml.loads(text)["build-system"]["requires"]
    assert f"fastai={fastai.__version__}" in requires and f"fastcore={fastcore.__version__}" in requires
    assert f"python={platform.python_version()}" in requires
    fastai_utils._check_fastai_fastcore_pyproject_versions(str(staged))  # raises on a bad file


def test_pyproject_pins_the_models_versions_when_this_process_differs(tmp_path):
    import toml
    from huggingface_hub import fastai_utils
    from serve.hub import write_pyproject
    write_pyproject(tmp_path, {"fastai": "2.7.19", "fastcore": "1.8.1", "python": "3.10.4"})
    requires = toml.load(tmp_path / "pyproject.toml")["build-system"]["requires"]
    assert {"fastai=2.7.19", "fastcore=1.8.1", "python=3.10.4"} <= set(requires)
    fastai_utils._check_fastai_fastcore_pyproject_versions(str(tmp_path))


def test_from_pretrained_fastai_loads_the_staged_folder(staged, mnist_model, digit, monkeypatch):
    """huggingface_hub's own fastai loader (local-folder path: version check + load_learner) on what we
    push, against our loader: same classes, same probabilities."""
    import torch
    from huggingface_hub import from_pretrained_fastai
    from models.contract import load_model_folder
    # from_pretrained_fastai validates its argument as a repo id (at most one "/") before it checks
    # for a local folder, so an absolute path is refused: give it the folder relative to the cwd.
    monkeypatch.chdir(staged.parent)
    theirs = from_pretrained_fastai(staged.name)
    ours = load_model_folder(mnist_model).learner
    assert list(theirs.dls.vocab) == list(ours.dls.vocab)
    path, label = digit
    a, b = theirs.predict(path), ours.predict(path)
    assert a[0] == b[0] == label
    assert torch.allclose(a[2], b[2])


# ------------------------------------------------------------------------------------------------ push and load

def test_push_then_load_from_the_hub(hub, mnist_model, tmp_path, digit):
    env = hub_env(hub.url, tmp_path / "hf")
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/mnist-resnet18", "--private"], env)
    assert p.returncode == 0, p.stderr
    assert "hf://alice/mnist-resnet18" in p.stdout

    (create,) = hub.log("POST", "create")
    assert create["json"] == {"name": "mnist-resnet18", "organization": "alice", "visibility": "private", "type": "model"}
    repo = hub.repos[("model", "alice/mnist-resnet18")]
    assert repo.private
    (commit,) = repo.commits
    want = set(folder_files(mnist_model)) | {"pyproject.toml"}
    assert set(commit["added"]) == want  # exactly the model folder + pyproject.toml
    assert commit["added"]["model.pkl"] == "lfs" and commit["added"]["metadata.json"] == "regular"
    for f, data in folder_files(mnist_model).items():
        if f != "README.md":
            assert repo.files[f] == data, f
    assert repo.files["README.md"].startswith(b"---\n")
    assert not (mnist_model / "pyproject.toml").exists()  # staged, not written into the model folder

    # load it back: snapshot_download into this HF_HOME's cache, then the local loader
    p = run(["-m", "serve.hub", "pull", "hf://alice/mnist-resnet18"], env)
    assert p.returncode == 0, p.stderr
    folder = Path(p.stdout.strip().splitlines()[-1])
    assert folder.is_relative_to(tmp_path / "hf" / "hub")
    assert folder_files(folder) == repo.files  # every file of the repo, byte for byte
    from models.contract import load_model_folder
    path, label = digit
    assert load_model_folder(folder).learner.predict(path)[0] == label

    # ... and fastai users load the same repo with huggingface_hub's own from_pretrained_fastai
    code = ("from huggingface_hub import from_pretrained_fastai; import sys; "
            "learn = from_pretrained_fastai('alice/mnist-resnet18'); print(learn.predict(sys.argv[1])[0])")
    p = run(["-c", code, path], env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == label

    # a second push replaces the files in a new commit; the repo is not created twice
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/mnist-resnet18"], env)
    assert p.returncode == 0, p.stderr
    assert len(repo.commits) == 2 and "alice/mnist-resnet18" in [r.repo_id for r in hub.repos.values()]


def test_serve_straight_from_the_hub(hub, staged, tmp_path, digit):
    """The user's command, `python -m serve hf://...`: serve's CLI calls resolve_model, then serves."""
    hub.seed("model", "alice/mnist-resnet18", staged)
    path, label = digit
    port = free_port()
    result = predict_with_app(["-m", "serve", "hf://alice/mnist-resnet18", "--port", port], ROOT,
                              hub_env(hub.url, tmp_path / "hf"), path, tmp_path / "serve.log")
    assert top_label(result) == label, result
    assert hub.log("GET", "resolve")  # it did come from the (fake) Hub


def test_push_to_an_org_of_yours(hub, mnist_model, tmp_path):
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "acme/digits"], hub_env(hub.url, tmp_path / "hf"))
    assert p.returncode == 0, p.stderr
    assert ("model", "acme/digits") in hub.repos and not hub.repos[("model", "acme/digits")].private


def test_push_dry_run_uses_no_network(mnist_model, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/x", "--dry-run", "--out", tmp_path / "s"],
            hub_env(dead, tmp_path / "hf", token=None))
    assert p.returncode == 0, p.stderr
    assert "model.pkl" in p.stdout and "MB" in p.stdout and "pyproject.toml" in p.stdout
    assert set(folder_files(tmp_path / "s")) == set(folder_files(mnist_model)) | {"pyproject.toml"}


# ------------------------------------------------------------------------------------------------ errors

def test_push_without_a_token(hub, mnist_model, tmp_path):
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/x"], hub_env(hub.url, tmp_path / "hf", token=None))
    assert_clean_error(p, "no Hugging Face token", "HF_TOKEN", "hf auth login")
    assert hub.requests == []


def test_push_with_a_bad_token_401(hub, mnist_model, tmp_path):
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/x"], hub_env(hub.url, tmp_path / "hf", token="hf_nope"))
    assert_clean_error(p, "401")
    assert hub.repos == {}


def test_push_to_someone_elses_namespace_403(hub, mnist_model, tmp_path):
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "bob/x"], hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert_clean_error(p, "403", "permission", "bob")
    assert hub.repos == {}


def test_push_with_no_network(mnist_model, tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: connection refused
    p = run(["-m", "serve.hub", "push", mnist_model, "--repo", "alice/x"], hub_env(dead, tmp_path / "hf"))
    assert_clean_error(p, "cannot be reached", dead)


def test_push_refuses_a_folder_that_is_not_a_model(tmp_path, hub):
    p = run(["-m", "serve.hub", "push", tmp_path, "--repo", "alice/x"], hub_env(hub.url, tmp_path / "hf"))
    assert_clean_error(p, "metadata.json")
    p = run(["-m", "serve.hub", "push", tmp_path, "--repo", "no-namespace"], hub_env(hub.url, tmp_path / "hf"))
    assert_clean_error(p, "<namespace>/<name>")
    assert hub.requests == []


def test_load_a_repo_that_does_not_exist_404(hub, tmp_path):
    p = run(["-m", "serve.hub", "pull", "hf://alice/nothing-here"], hub_env(hub.url, tmp_path / "hf"))
    assert_clean_error(p, "alice/nothing-here", "no model repo")


def test_load_with_no_network(tmp_path):
    dead = f"http://127.0.0.1:{free_port()}"
    p = run(["-m", "serve.hub", "pull", "hf://alice/m", "--trust-remote-code"], hub_env(dead, tmp_path / "hf"))
    assert_clean_error(p, "not in the local Hugging Face cache", "cannot be reached")


def test_foreign_repo_needs_trust_remote_code(hub, staged, tmp_path):
    hub.seed("model", "bob/digits", staged)
    env = hub_env(hub.url, tmp_path / "hf", token=ALICE)
    p = run(["-m", "serve.hub", "pull", "hf://bob/digits"], env)
    line = assert_clean_error(p, "refusing to load hf://bob/digits", "outside your namespace", "--trust-remote-code",
                              "pickle", "you are alice")
    assert "acme" in line
    assert hub.log("GET", "resolve") == [] and hub.log("HEAD", "resolve") == []  # nothing downloaded
    p = run(["-m", "serve.hub", "pull", "hf://bob/digits", "--trust-remote-code"], env)
    assert p.returncode == 0, p.stderr
    assert folder_files(Path(p.stdout.strip().splitlines()[-1]))["model.pkl"] == (staged / "model.pkl").read_bytes()


@pytest.fixture
def revisions(hub, staged, tmp_path):
    """alice/digits: her model on main, her branch `dev` and tag `v1` (each its own commit, told apart
    by a marker file), and pull request 1, opened by a stranger, with another model.pkl in it."""
    import shutil
    hub.seed("model", "alice/digits", staged)
    shas = {}
    for ref, marker in (("refs/heads/dev", "dev.txt"), ("refs/tags/v1", "v1.txt"), ("refs/pr/1", "pr.txt")):
        folder = tmp_path / "refs" / marker
        shutil.copytree(staged, folder)
        (folder / marker).write_text(ref)
        if ref == "refs/pr/1":
            (folder / "model.pkl").write_bytes(b"a stranger's pickle")
        shas[ref] = hub.add_ref("model", "alice/digits", ref, folder)
    shas["main"] = hub.repos[("model", "alice/digits")].sha
    return shas


def nothing_downloaded(hub) -> bool:
    """No file and no listing of any revision was fetched: refusing happened before the download."""
    return not (hub.log("GET", "resolve") or hub.log("HEAD", "resolve") or hub.log("GET", "info")
                or hub.log("GET", "tree"))


@pytest.mark.parametrize("rev", ["refs/pr/1", "pr-sha", "PR-SHA", "main-sha", "refs%2Fpr%2F1", "REFS/PR/1",
                                 "refs/heads/main", "Dev", "V1", "no-such-branch"])
def test_your_own_repo_at_a_pull_request_or_sha_needs_trust_remote_code(hub, revisions, tmp_path, rev):
    """Anyone may open a pull request on a public repo, so only the default branch, a branch or a tag of
    your repo, named exactly as the repo's refs list them, loads without the flag: a pull request's ref,
    any commit sha (this one a pull request's; even main's own), a URL-encoded or re-cased form, a full
    ref name, or anything else is refused before anything is downloaded."""
    rev = {"pr-sha": revisions["refs/pr/1"], "PR-SHA": revisions["refs/pr/1"].upper(),
           "main-sha": revisions["main"]}.get(rev, rev)
    p = run(["-m", "serve.hub", "pull", f"hf://alice/digits@{rev}"], hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert_clean_error(p, f"refusing to load hf://alice/digits@{rev}", "not a branch or tag", "pull request",
                       "--trust-remote-code")
    assert nothing_downloaded(hub)


def test_a_pull_request_loads_with_trust_remote_code(hub, revisions, tmp_path):
    """The flag is the way to load one, and what comes down is the pull request's own files."""
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits@refs/pr/1", "--trust-remote-code"],
            hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert p.returncode == 0, p.stderr
    folder = Path(p.stdout.strip().splitlines()[-1])
    assert folder.name == revisions["refs/pr/1"]
    assert (folder / "model.pkl").read_bytes() == b"a stranger's pickle" and (folder / "pr.txt").is_file()


@pytest.mark.parametrize("rev", [None, "main", "dev", "v1"])
def test_your_branches_and_tags_load_without_the_flag(hub, revisions, tmp_path, rev):
    spec = "hf://alice/digits" + (f"@{rev}" if rev else "")
    p = run(["-m", "serve.hub", "pull", spec], hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert p.returncode == 0, p.stderr
    folder = Path(p.stdout.strip().splitlines()[-1])
    ref = {None: "main", "main": "main", "dev": "refs/heads/dev", "v1": "refs/tags/v1"}[rev]
    assert folder.name == revisions[ref]  # the very commit the ref names
    assert {m for m in ("dev.txt", "v1.txt", "pr.txt") if (folder / m).exists()} == (
        {"dev.txt"} if rev == "dev" else {"v1.txt"} if rev == "v1" else set())
    assert hub.log("GET", "refs")  # checked against the repo's refs, not by the name's shape


def test_a_branch_that_moves_to_another_commit_during_the_load_is_refused(hub, revisions, tmp_path):
    """The refs said `dev` is one commit, then the download resolved it to another (here: the branch
    moved to the pull request's commit in between): what came down is not what was checked."""
    hub.before_refs_reply = lambda repo: repo.refs.update({"refs/heads/dev": revisions["refs/pr/1"]})
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits@dev"], hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert_clean_error(p, "refusing to load hf://alice/digits@dev", revisions["refs/pr/1"],
                       revisions["refs/heads/dev"], "--trust-remote-code")


def test_refs_that_cannot_be_read_are_not_trusted(hub, revisions, tmp_path):
    """The Hub says who you are but the refs request dies (connection dropped): the revision cannot be
    checked, so it is refused, with the flag as the way out; nothing is downloaded."""
    hub.before_refs_reply = lambda repo: "drop"
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits@dev"], hub_env(hub.url, tmp_path / "hf", token=ALICE))
    assert_clean_error(p, "refusing to load hf://alice/digits@dev", "cannot be reached", "--trust-remote-code")
    assert hub.log("GET", "refs") and nothing_downloaded(hub)


def test_without_a_token_every_repo_is_foreign(hub, staged, tmp_path):
    hub.seed("model", "alice/digits", staged)
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits"], hub_env(hub.url, tmp_path / "hf", token=None))
    assert_clean_error(p, "not logged in", "--trust-remote-code")
    assert hub.requests == []


def test_a_repo_that_is_not_a_model_folder(hub, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "README.md").write_text("# someone else's model\n")
    hub.seed("model", "alice/other", tmp_path / "other")
    p = run(["-m", "serve.hub", "pull", "hf://alice/other"], hub_env(hub.url, tmp_path / "hf"))
    assert_clean_error(p, "hf://alice/other is not a model folder", "metadata.json")


def test_invalid_token_when_loading_401(hub, staged, tmp_path):
    hub.seed("model", "alice/digits", staged)
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits"], hub_env(hub.url, tmp_path / "hf", token="hf_nope"))
    assert_clean_error(p, "401")


def test_cached_model_loads_offline(hub, staged, tmp_path):
    hub.seed("model", "alice/digits", staged)
    home = tmp_path / "hf"
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits"], hub_env(hub.url, home))
    assert p.returncode == 0, p.stderr
    online = p.stdout.strip().splitlines()[-1]
    n = len(hub.requests)
    # offline, whoami cannot say who you are: even your own repo needs the flag (documented) ...
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits"], hub_env(hub.url, home, offline=True))
    assert_clean_error(p, "HF_HUB_OFFLINE", "--trust-remote-code")
    # ... and with it, the cached snapshot loads without a single request
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits", "--trust-remote-code"], hub_env(hub.url, home, offline=True))
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == online and len(hub.requests) == n
    # the Hub unreachable (not just HF_HUB_OFFLINE): the cache still serves it
    dead = f"http://127.0.0.1:{free_port()}"
    p = run(["-m", "serve.hub", "pull", "hf://alice/digits", "--trust-remote-code"], hub_env(dead, home))
    assert p.returncode == 0, p.stderr
    # a model that was never downloaded cannot be loaded offline, and says why
    p = run(["-m", "serve.hub", "pull", "hf://alice/other", "--trust-remote-code"], hub_env(hub.url, home, offline=True))
    assert_clean_error(p, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")


def test_resolve_model_is_what_serve_calls(hub, staged, tmp_path, monkeypatch):
    """The interface serve/__main__.py uses: resolve_model(spec, trust_remote_code=...) -> Path, or a
    ModelFolderError. Checked in-process too (only the argument checks: no network here)."""
    from models.contract import ModelFolderError
    from serve.hub import parse_spec, resolve_model
    assert parse_spec("hf://someone/name@v1") == ("someone/name", "v1")
    assert parse_spec("hf://someone/name") == ("someone/name", None)
    for bad in ("someone/name", "hf://", "hf://a/b/c", "hf://bad name/x"):
        with pytest.raises(ModelFolderError):
            resolve_model(bad)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("serve.hub.hub_token", lambda: None)
    with pytest.raises(ModelFolderError, match="--trust-remote-code"):
        resolve_model("hf://someone/name")


# ------------------------------------------------------------------------------------------------ Space upload

def test_space_upload(hub, mnist_model, tmp_path):
    out = tmp_path / "space"
    env = hub_env(hub.url, tmp_path / "hf")
    p = run(["-m", "serve.space", mnist_model, "--repo", "alice/mnist-demo", "--out", out], env)
    assert p.returncode == 0, p.stderr
    (create,) = hub.log("POST", "create")
    assert create["json"]["type"] == "space" and create["json"]["sdk"] == "gradio"
    assert create["json"]["name"] == "mnist-demo" and create["json"]["organization"] == "alice"
    assert hub.log("POST", "preupload")[0]["path"] == "/api/spaces/alice/mnist-demo/preupload/main"
    space = hub.repos[("space", "alice/mnist-demo")]
    assert space.sdk == "gradio"
    (commit,) = space.commits
    built = folder_files(out)
    assert set(commit["added"]) == set(built)  # exactly the built folder
    assert {"app.py", "requirements.txt", "README.md", "model/model.pkl", "models/imageio.py",
            "serve/__main__.py" if (ROOT / "serve" / "__main__.py").exists() else "serve/hub.py"} <= set(built)
    assert commit["added"]["model/model.pkl"] == "lfs"
    assert all(space.files[f] == d for f, d in built.items())

    # a redeploy mirrors the folder: a file the build no longer has is deleted from the Space
    space.files["stale.py"] = b"print('old')\n"
    p = run(["-m", "serve.space", mnist_model, "--repo", "alice/mnist-demo", "--out", out], env)
    assert p.returncode == 0, p.stderr
    assert space.commits[-1]["deleted"] == ["stale.py"] and ".gitattributes" in space.files


def test_space_upload_errors(hub, mnist_model, tmp_path):
    p = run(["-m", "serve.space", mnist_model, "--repo", "bob/demo", "--out", tmp_path / "s"],
            hub_env(hub.url, tmp_path / "hf"))
    assert_clean_error(p, "403", "bob")
    p = run(["-m", "serve.space", mnist_model, "--repo", "alice/demo", "--out", tmp_path / "s"],
            hub_env(hub.url, tmp_path / "hf", token=None))
    assert_clean_error(p, "no Hugging Face token")
