"""POST /v1/classify, the Hugging Face Inference API's image classification, against `python -m serve`
as its own process, with huggingface_hub's own `InferenceClient` and with plain requests; once per
model format (pickle, ONNX, safetensors: every test below runs on each). Answers are held to
/v1/predict's for the same image on the same server; every refusal is a 4xx with {"error": ...},
after which the server still serves. `--max-file-mb` is set small so that breaking it is cheap.
"""
from __future__ import annotations

import base64
import io
import socket

import pytest
import requests
import torch
from PIL import Image

from tests.servers import serve_process

MAX_FILE_MB = 0.01        # 10,000 bytes; an MNIST PNG is ~300
MAX_FILE = int(MAX_FILE_MB * 1e6)
N_CLASSES = 10


@pytest.fixture(scope="module", params=["pickle", "onnx", "safetensors"])
def server(request, mnist_model):
    with serve_process(mnist_model, "--device", "cpu", "--format", request.param, "--max-file-mb", MAX_FILE_MB) as served:
        served.format = request.param
        yield served


@pytest.fixture(scope="module")
def client(server):
    """huggingface_hub's client, pointed at our endpoint. conftest sets HF_HUB_OFFLINE, which makes
    huggingface_hub refuse every request, loopback ones too: lifted here (the model is a URL, so
    the client asks nothing of the Hub)."""
    import huggingface_hub.constants
    from huggingface_hub import InferenceClient
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        yield InferenceClient(model=f"http://127.0.0.1:{server.port}/v1/classify", timeout=60)


def png(image: Image.Image, **save) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def digits(mnist_arrays) -> list[bytes]:
    return [png(Image.fromarray(mnist_arrays.valid_images[i])) for i in range(3)]


def classify(server, data=None, json=None, params=None, headers=None):
    return requests.post(server.url + "/v1/classify", data=data, json=json, params=params, headers=headers,
                         timeout=60)


def predicted(server, image: bytes, top_k: int) -> list[dict]:
    """/v1/predict's answer for one image, in /v1/classify's shape."""
    r = requests.post(server.url + "/v1/predict", files=[("files", ("d.png", image, "image/png"))],
                      params={"top_k": top_k}, timeout=60)
    assert r.status_code == 200, r.text
    return [{"label": c["label"], "score": c["confidence"]} for c in r.json()[0]["confidences"]]


def as_dicts(elements) -> list[dict]:
    return [{"label": e.label, "score": e.score} for e in elements]


def assert_same(got: list[dict], want: list[dict]):
    assert [g["label"] for g in got] == [w["label"] for w in want]
    assert [g["score"] for g in got] == pytest.approx([w["score"] for w in want], rel=1e-6, abs=1e-12)


def assert_serving(server, digits):
    r = classify(server, digits[0], headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and len(r.json()) == 5, r.text


def assert_refused(r, status: int, fragment: str):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    assert fragment in r.json()["error"], r.json()


# --------------------------------------------------------------------------- InferenceClient

def test_inference_client_path_bytes_and_pil_equal_predict(server, client, digits, tmp_path):
    for i, image in enumerate(digits):
        path = tmp_path / f"{i}.png"
        path.write_bytes(image)
        want5, want3 = predicted(server, image, 5), predicted(server, image, 3)
        assert_same(as_dicts(client.image_classification(str(path))), want5)    # no parameters: the raw bytes
        assert_same(as_dicts(client.image_classification(image)), want5)
        assert_same(as_dicts(client.image_classification(path, top_k=3)), want3)  # a parameter: JSON + base64
        assert_same(as_dicts(client.image_classification(image, top_k=3)), want3)
    # huggingface_hub 2.4 refuses a PIL image for this task before sending anything (its binary-input
    # helper takes bytes, a path or a URL); sent as the client encodes one elsewhere (PNG), it works.
    # When the client starts sending PIL images, this fails: then send `pil` itself.
    pil = Image.open(io.BytesIO(digits[0]))
    with pytest.raises(ValueError, match="Expected binary inputs"):
        client.image_classification(pil)
    assert_same(as_dicts(client.image_classification(png(pil), top_k=2)), predicted(server, digits[0], 2))


def test_top_k_honoured_and_sorted(server, client, digits):
    for k in (1, 2, 7, N_CLASSES):
        got = as_dicts(client.image_classification(digits[1], top_k=k))
        assert len(got) == k and len({g["label"] for g in got}) == k
        assert [g["score"] for g in got] == sorted((g["score"] for g in got), reverse=True)
    assert len(client.image_classification(digits[1])) == 5            # the Inference API's default
    assert len(client.image_classification(digits[1], top_k=500)) == N_CLASSES  # more than the classes: all


def test_function_to_apply(server, client, digits):
    from huggingface_hub.errors import HfHubHTTPError
    image = digits[2]
    probs = as_dicts(client.image_classification(image, top_k=N_CLASSES))
    assert sum(p["score"] for p in probs) == pytest.approx(1.0, abs=1e-4)
    assert_same(as_dicts(client.image_classification(image, top_k=N_CLASSES, function_to_apply="softmax")), probs)
    # none: log-probabilities (the logits up to the constant softmax forgets); their softmax is the probabilities
    logits = as_dicts(client.image_classification(image, top_k=N_CLASSES, function_to_apply="none"))
    assert [g["label"] for g in logits] == [p["label"] for p in probs]
    assert all(-88 < g["score"] <= 0 for g in logits)
    again = torch.softmax(torch.tensor([g["score"] for g in logits], dtype=torch.float64), 0)
    assert again.tolist() == pytest.approx([p["score"] for p in probs], abs=1e-6)
    with pytest.raises(HfHubHTTPError) as e:  # sigmoid needs raw logits, which a softmax model's formats lose
        client.image_classification(image, function_to_apply="sigmoid")
    assert e.value.response.status_code == 422 and "sigmoid" in e.value.response.json()["error"]


# --------------------------------------------------------------------------- plain HTTP

@pytest.mark.parametrize("ctype", ["image/png", "image/jpeg", "application/octet-stream", "text/plain", None])
def test_raw_bytes_with_any_content_type(server, digits, ctype):
    r = classify(server, digits[0], params={"top_k": 2}, headers={"Content-Type": ctype} if ctype else None)
    assert r.status_code == 200, r.text
    assert_same(r.json(), predicted(server, digits[0], 2))


def test_json_base64_and_data_url(server, digits):
    b64 = base64.b64encode(digits[1]).decode()
    want = predicted(server, digits[1], 4)
    for inputs in (b64, f"data:image/png;base64,{b64}", f"  {b64}\n"):
        r = classify(server, json={"inputs": inputs, "parameters": {"top_k": 4}, "options": {"wait_for_model": True}})
        assert r.status_code == 200, r.text
        assert_same(r.json(), want)
    r = classify(server, json={"inputs": b64, "parameters": {"top_k": None, "function_to_apply": None}})
    assert r.status_code == 200 and len(r.json()) == 5  # nulls are absent parameters


def test_a_url_in_inputs_is_refused_and_never_fetched(server, digits):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        listener.settimeout(1.0)
        port = listener.getsockname()[1]
        for url in (f"http://127.0.0.1:{port}/digit.png", f"HTTPS://127.0.0.1:{port}/digit.png"):
            assert_refused(classify(server, json={"inputs": url}), 422, "does not fetch URLs")
        with pytest.raises(socket.timeout):
            listener.accept()  # nothing ever connected
    assert_serving(server, digits)


def _json(body: bytes):
    return {"data": body, "headers": {"Content-Type": "application/json"}}


REFUSALS = {
    "raw not an image": (dict(data=b"hello, not a picture", headers={"Content-Type": "image/png"}), 422, "not an image"),
    "truncated image": (dict(data="TRUNCATED", headers={"Content-Type": "image/png"}), 422, ""),
    "base64 not an image": (dict(json={"inputs": base64.b64encode(b"hello").decode()}), 422, "not an image"),
    "broken base64": (dict(json={"inputs": "iVBORw0KGgo=!!"}), 400, "not valid base64"),
    "base64 bad padding": (dict(json={"inputs": "iVBORw0KGgo"}), 400, "not valid base64"),
    "non-ASCII base64": (dict(json={"inputs": "iVBORw0KGgoé"}), 400, "not valid base64"),
    "data URL not base64": (dict(json={"inputs": "data:image/png,rawpixels"}), 422, "base64"),
    "empty body": (dict(data=b"", headers={"Content-Type": "image/png"}), 400, "empty body"),
    "no body, no type": (dict(), 400, "empty body"),
    "empty JSON body": (_json(b""), 400, "not valid JSON"),
    "malformed JSON": (_json(b'{"inputs": '), 400, "not valid JSON"),
    "deeply nested JSON": (_json(b"[" * 50_000), 400, "not valid JSON"),
    "a 5,000-digit top_k": (_json(b'{"inputs": "AAAA", "parameters": {"top_k": 1' + b"0" * 5000 + b"}}"), 400, "not valid JSON"),
    "JSON not an object": (dict(json=["iVBORw0KGgo="]), 400, "must be an object"),
    "no inputs": (dict(json={"parameters": {"top_k": 2}}), 422, "inputs must be"),
    "inputs a list": (dict(json={"inputs": ["AAAA", "AAAA"]}), 422, "one image per request"),
    "empty inputs": (dict(json={"inputs": ""}), 400, "inputs is empty"),
    "unknown key": (dict(json={"inputs": "AAAA", "image": "x"}), 422, "unknown key 'image'"),
    "unknown parameter": (dict(json={"inputs": "AAAA", "parameters": {"topk": 2}}), 422, "unknown parameter 'topk'"),
    "parameters not an object": (dict(json={"inputs": "AAAA", "parameters": [2]}), 422, "parameters must be"),
    "top_k 0": (dict(json={"inputs": "AAAA", "parameters": {"top_k": 0}}), 422, "top_k"),
    "top_k a string": (dict(json={"inputs": "AAAA", "parameters": {"top_k": "3"}}), 422, "top_k"),
    "top_k a float": (dict(json={"inputs": "AAAA", "parameters": {"top_k": 2.5}}), 422, "top_k"),
    "top_k true": (dict(json={"inputs": "AAAA", "parameters": {"top_k": True}}), 422, "top_k"),
    "top_k 10^7": (dict(json={"inputs": "AAAA", "parameters": {"top_k": 10 ** 7}}), 422, "top_k"),
    "top_k in the query": (dict(data=b"x", params={"top_k": "-1"}), 422, "top_k"),
    "unknown function": (dict(json={"inputs": "AAAA", "parameters": {"function_to_apply": "relu"}}), 422, "function_to_apply"),
    "multipart": (dict(files=[("files", ("d.png", b"x", "image/png"))]), 415, "/v1/predict"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_4xx_json(server, digits, case):
    kwargs, status, fragment = REFUSALS[case]
    if kwargs.get("data") == "TRUNCATED":
        kwargs = {**kwargs, "data": digits[0][: len(digits[0]) // 2]}
    r = requests.post(server.url + "/v1/classify", timeout=60, **kwargs)
    assert_refused(r, status, fragment)
    assert_serving(server, digits)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405_json(server, digits, method):
    r = requests.request(method, server.url + "/v1/classify", data=digits[0], timeout=60)
    assert_refused(r, 405, "POST")
    assert r.headers["allow"] == "POST"
    assert_serving(server, digits)


def test_openapi_describes_the_route(server):
    r = requests.get(server.url + "/v1/openapi.json", timeout=30)
    assert r.status_code == 200
    post = r.json()["paths"]["/v1/classify"]["post"]
    assert set(post["requestBody"]["content"]) == {"image/*", "application/json"}
    assert list(r.json()["paths"]["/v1/classify"]) == ["post"]  # the 405 answers are not advertised


def padded_png(size: int) -> bytes:
    """A valid PNG of exactly `size` bytes (a digit, padded with a text chunk)."""
    from PIL import PngImagePlugin
    image = Image.new("L", (28, 28), 0)
    info = PngImagePlugin.PngInfo()
    info.add_text("pad", "")
    base = len(png(image, pnginfo=info))
    info = PngImagePlugin.PngInfo()
    info.add_text("pad", "x" * (size - base))
    out = png(image, pnginfo=info)
    assert len(out) == size
    return out


def test_the_file_limit_holds_for_raw_and_base64_bodies(server, digits):
    at, over = padded_png(MAX_FILE), padded_png(MAX_FILE + 1)
    for body in (dict(data=at, headers={"Content-Type": "image/png"}),
                 dict(json={"inputs": base64.b64encode(at).decode()})):  # its JSON is 4/3 the limit: taken
        r = classify(server, **body)
        assert r.status_code == 200 and len(r.json()) == 5, r.text
    for body in (dict(data=over, headers={"Content-Type": "image/png"}),
                 dict(data=iter([over[:5000], over[5000:]]), headers={"Content-Type": "image/png"}),  # chunked
                 dict(json={"inputs": base64.b64encode(over).decode()})):
        assert_refused(classify(server, **body), 413, f"{MAX_FILE_MB:g} MB")
    # a JSON body larger than any image's base64 is refused by its declared length, unread
    assert_refused(classify(server, **_json(b'{"inputs": "' + b"A" * (2 * MAX_FILE + 100_000) + b'"}')), 413,
                   "request too large")
    # a large raw body (500x the limit) is refused too, and the client reads the answer, not a reset
    assert_refused(classify(server, data=b"\0" * (500 * MAX_FILE), headers={"Content-Type": "image/png"}), 413,
                   "file too large")
    assert requests.get(server.url + "/v1/health", timeout=10).json()["inflight_mb"] == 0
    assert_serving(server, digits)


# --------------------------------------------------------------------------- the scores, without a server

def test_scores_from_probabilities_recover_what_each_activation_allows():
    from serve.hf_inference import scores
    z = torch.tensor([[3.0, -1.0, 0.5, -20.0], [0.0, 0.0, 4.0, -200.0]], dtype=torch.float64)
    # a multi-label (sigmoid) model: its logits come back exactly (within float32's rounding)
    p = torch.sigmoid(z).float()
    assert scores(p, "sigmoid", "sigmoid") is p
    assert torch.allclose(scores(p, "sigmoid", "none")[:, :3], z[:, :3], atol=1e-5)
    assert scores(p, "sigmoid", "none")[1, 3] == pytest.approx(-87.3, abs=0.1)   # floored, not -inf
    assert torch.allclose(scores(p, "sigmoid", "softmax")[0], torch.softmax(z[0], 0), atol=1e-5)
    # a single-label (softmax) model: log-probabilities, the logits less their log-sum-exp
    p = torch.softmax(z, -1).float()
    assert scores(p, "softmax", "softmax") is p
    assert torch.allclose(scores(p, "softmax", "none")[:, :3], torch.log_softmax(z, -1)[:, :3], atol=1e-5)
    assert torch.isfinite(scores(p, "softmax", "none")).all()                # p underflowed to 0: floored
