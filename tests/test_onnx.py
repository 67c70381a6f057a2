"""`model.onnx` against its oracle, fastai's `learn.predict`, on real MNIST digits; its dynamic
batch, its single file, its atomic write; and the README's onnxruntime-only example, run as it is
in a process with neither torch nor fastai, from a folder outside the checkout."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.onnx import ONNX_FILE, OnnxClassifier, OnnxModelError, export_onnx

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
N_ORACLE = 500  # held-out digits compared one by one with learn.predict


@pytest.fixture(scope="module")
def folder(mnist_model):
    from models.contract import load_model_folder
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_learner's warning about pickles
        return load_model_folder(mnist_model)


@pytest.fixture(scope="module")
def onnx_path(folder, tmp_path_factory) -> Path:
    meta = folder.metadata
    return export_onnx(folder.learner.model, tmp_path_factory.mktemp("onnx") / ONNX_FILE,
                       image_size=meta.image_size, mean=meta.normalize.mean,
                       std=meta.normalize.std, classes=meta.classes)


@pytest.fixture(scope="module")
def clf(onnx_path) -> OnnxClassifier:
    return OnnxClassifier(onnx_path)


def pixels_of(img: Image.Image, size: int) -> np.ndarray:
    """The README's preprocessing: RGB, squished to size x size by Pillow's bilinear, uint8 CHW."""
    img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img).transpose(2, 0, 1)


def test_oracle_matches_learn_predict(folder, clf, mnist_arrays):
    """Same top-1 as learn.predict on 500 digits, probabilities within 1e-4 after the softmax."""
    learn = folder.learner
    images = [Image.fromarray(a) for a in mnist_arrays.valid_images[:N_ORACLE]]
    theirs = [learn.predict(img) for img in images]
    pixels = np.stack([pixels_of(img, clf.image_size) for img in images])
    probs = clf.probabilities(pixels)
    assert probs.dtype == torch.float32 and probs.shape == (N_ORACLE, 10)
    ref = torch.stack([p for _, _, p in theirs]).float()
    assert [clf.classes[i] for i in probs.argmax(1).tolist()] == [str(label) for label, _, _ in theirs]
    # fp32 both ways, but onnxruntime fuses BatchNorm into the convolutions and sums in another
    # order than oneDNN: the probabilities differ in the last few bits (measured max ~1e-6), not equal
    diff = (probs - ref).abs().max().item()
    assert diff < 1e-4, diff
    truth = [str(int(y)) for y in mnist_arrays.valid_labels[:N_ORACLE]]
    assert np.mean([clf.classes[i] == t for i, t in zip(probs.argmax(1).tolist(), truth)]) > 0.9  # a real model


def test_resize_matches_training(folder, mnist_arrays):
    """The README's resize (Pillow bilinear squish) gives exactly the uint8 pixels that the learner's
    own item pipeline (fastai's Resize(Squish), ToTensor) gives, on sizes that really resize."""
    from models.imageio import RGBImage
    learn = folder.learner
    size = folder.metadata.image_size
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(57, 31), (13, 90), (300, 200), (29, 28)]):
        digit = Image.fromarray(mnist_arrays.valid_images[i]).resize((w, h))
        colour = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        for img in (digit, colour):
            theirs = learn.dls.valid.after_item(RGBImage.create(img))
            assert np.array_equal(np.asarray(theirs), pixels_of(img, size)), (w, h, img.mode)


def test_dynamic_batch(clf, mnist_arrays):
    """Batches of 1, 7 and 64 run, and each row is what the image gives on its own."""
    x = np.stack([pixels_of(Image.fromarray(a), clf.image_size) for a in mnist_arrays.valid_images[:64]])
    alone = np.concatenate([clf.run(x[i:i + 1]) for i in range(64)])
    for n in (1, 7, 64):
        out = clf.run(x[:n])
        assert out.dtype == np.float32 and out.shape == (n, 10)
        np.testing.assert_allclose(out, alone[:n], atol=1e-5)
        np.testing.assert_allclose(out.sum(1), 1, atol=1e-5)
    t = clf.probabilities(torch.from_numpy(x[:7]))  # a torch tensor in, as the Predictor passes it
    np.testing.assert_allclose(t.numpy(), alone[:7], atol=1e-5)


def test_bad_pixels_are_refused(clf):
    s = clf.image_size
    for bad in (np.zeros((1, 3, s, s), np.float32), np.zeros((3, s, s), np.uint8),
                np.zeros((1, 3, s + 1, s), np.uint8), np.zeros((0, 3, s, s), np.uint8)):
        with pytest.raises(ValueError, match=r"expected uint8 pixels of shape \(N, 3"):
            clf.run(bad)


def test_one_self_describing_file(onnx_path, clf, folder):
    """Weights inside the one file (nothing else beside it), the interface and metadata as documented."""
    import onnx
    assert sorted(p.name for p in onnx_path.parent.iterdir()) == [ONNX_FILE]  # no external data, no temp file
    proto = onnx.load(str(onnx_path), load_external_data=False)
    assert proto.graph.initializer and not any(t.data_location == onnx.TensorProto.EXTERNAL
                                               for t in proto.graph.initializer)
    assert {o.domain: o.version for o in proto.opset_import}[""] == 18
    [inp], [out] = proto.graph.input, proto.graph.output
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert out.name == "probabilities" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert inp.type.tensor_type.shape.dim[0].dim_param  # the batch axis is symbolic
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, 28, 28]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["classes"]) == folder.metadata.classes == clf.classes
    assert int(meta["image_size"]) == clf.image_size == 28
    assert json.loads(meta["multi_label"]) is False and "BILINEAR" in meta["resize"]
    assert json.loads(meta["normalize"])["mean"] == pytest.approx(folder.metadata.normalize.mean)
    assert os.stat(onnx_path).st_mode & 0o044  # readable by others, as a model file should be (not mkstemp's 0600)


def test_sigmoid_for_multi_label(folder, tmp_path):
    model = folder.learner.model
    path = export_onnx(model, tmp_path / ONNX_FILE, image_size=28, mean=[0.5] * 3, std=[0.25] * 3,
                       classes=list("0123456789"), multi_label=True, extra_metadata={"arch": "resnet18"})
    multi = OnnxClassifier(path)
    x = np.random.default_rng(1).integers(0, 256, (5, 3, 28, 28), dtype=np.uint8)
    with torch.inference_mode():
        logits = model((torch.from_numpy(x).float() / 255 - 0.5) / 0.25)
    np.testing.assert_allclose(multi.run(x), torch.sigmoid(logits).numpy(), atol=1e-5)
    assert multi.multi_label and multi.metadata["arch"] == "resnet18"


def test_failed_write_keeps_the_old_file(folder, tmp_path, monkeypatch):
    """A write that fails half way (disk full at fsync, here) leaves the old model.onnx as it was
    and no temp file behind."""
    path = tmp_path / ONNX_FILE
    path.write_bytes(b"the old model")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        export_onnx(folder.learner.model, path, image_size=28, mean=[0.1] * 3, std=[0.3] * 3,
                    classes=folder.metadata.classes)
    assert path.read_bytes() == b"the old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE]


def test_wrong_number_of_classes_is_refused(folder, tmp_path):
    with pytest.raises(ValueError, match="10 outputs but 3 classes"):
        export_onnx(folder.learner.model, tmp_path / ONNX_FILE, image_size=28, mean=[0.1] * 3, std=[0.3] * 3,
                    classes=["a", "b", "c"])
    assert not list(tmp_path.iterdir())


def test_unusable_files_are_refused_in_one_line(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00not a protobuf" * 100)
    # a valid ONNX model, but not ours: no metadata, float input
    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    foreign = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8), str(foreign))
    for path, reason in ((tmp_path / "missing.onnx", "no ONNX model at"), (garbage, "cannot load"),
                         (foreign, "lacks this project's ONNX metadata")):
        with pytest.raises(OnnxModelError, match=reason) as err:
            OnnxClassifier(path)
        assert "\n" not in str(err.value)
    with pytest.raises(OnnxModelError, match="unknown device"):
        OnnxClassifier(foreign, device="tpu")


# ---------------------------------------------------------------------------- without torch or fastai

def readme_example() -> str:
    """The Python block that follows the README's marker comment for this test."""
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- tests/test_onnx.py runs this block as it is[^>]*-->\s*```python\n(.*?)```", text, re.S)
    assert m, "README.md lost the onnxruntime example (or its marker comment)"
    return m.group(1)


def bare_env() -> dict:
    """No PYTHONPATH, nothing of the checkout: what a user's own environment sees."""
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR")
    return {k: os.environ[k] for k in keep if k in os.environ}


def test_readme_example_runs_with_onnxruntime_alone(onnx_path, folder, mnist_arrays, tmp_path):
    """The README's snippet, exactly, in a fresh `python -I` (no checkout on sys.path, cwd a temp
    folder with only model.onnx and digit.png): it prints learn.predict's label, and neither torch
    nor fastai was imported."""
    code = readme_example()
    assert "torch" not in code and "fastai" not in code
    work = tmp_path / "user"
    work.mkdir()
    (work / ONNX_FILE).symlink_to(onnx_path)
    # a digit saved as a larger RGB JPEG-free PNG, so the snippet really converts and resizes
    img = Image.fromarray(mnist_arrays.valid_images[3]).resize((45, 61)).convert("RGB")
    img.save(work / "digit.png")
    label, _, probs = folder.learner.predict(work / "digit.png")
    check = ("\nimport sys\nassert 'torch' not in sys.modules and 'fastai' not in sys.modules, "
             "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'fastai'))\n"
             # the checkout is not on the path (its .venv may be inside it: site-packages is fine)
             "import importlib.util, os\n"
             "assert all(os.path.realpath(p or '.') != " + repr(os.path.realpath(ROOT)) + " for p in sys.path)\n"
             "assert importlib.util.find_spec('models') is None and importlib.util.find_spec('serve') is None\n")
    r = subprocess.run([PY, "-I", "-c", code + check], cwd=work, env=bare_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    printed_label, printed_p = r.stdout.split()
    assert printed_label == str(label)
    assert float(printed_p) == pytest.approx(probs.max().item(), abs=1e-4)


def test_module_runs_without_torch(onnx_path, tmp_path):
    """`OnnxClassifier.run` needs numpy and onnxruntime only: importing models.onnx and running it
    never imports torch (so the Predictor can hand it work without the module dragging torch in)."""
    code = ("import sys, numpy as np\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "from models.onnx import OnnxClassifier\n"
            f"c = OnnxClassifier({str(onnx_path)!r}, threads=1)\n"
            "p = c.run(np.zeros((3, 3, c.image_size, c.image_size), np.uint8))\n"
            "assert p.shape == (3, len(c.classes)), p.shape\n"
            "assert 'torch' not in sys.modules and 'fastai' not in sys.modules\n"
            "print('ok')\n")
    r = subprocess.run([PY, "-I", "-c", code], cwd=tmp_path, env=bare_env(), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
