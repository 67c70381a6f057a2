"""The Predictor against its oracle, fastai's own `learn.predict`, on real MNIST digits."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from models.imageio import ImageError
from serve.predictor import Prediction, Predictor, pick_device

N_ORACLE = 500  # held-out digits compared one by one


@pytest.fixture(scope="module")
def predictor(mnist_model) -> Predictor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # load_learner's warning about pickles
        return Predictor.load(mnist_model, device="cpu")


@pytest.fixture(scope="module")
def digits(mnist_arrays):
    """The first N_ORACLE MNIST test digits as PIL images, with their true labels."""
    images = [Image.fromarray(a) for a in mnist_arrays.valid_images[:N_ORACLE]]
    return images, [str(int(y)) for y in mnist_arrays.valid_labels[:N_ORACLE]]


def test_oracle_matches_learn_predict(predictor, digits):
    """Top-1 equal to learn.predict's on 500 digits, probabilities within 1e-4: batched, so the
    batch path (stacking, one forward pass) is what is checked."""
    images, truth = digits
    learn = predictor.folder.learner
    theirs = [learn.predict(img) for img in images]
    probs = torch.cat([predictor.probabilities([predictor.prepare(im) for im in images[i:i + 128]])
                       for i in range(0, len(images), 128)])
    assert probs.shape == (N_ORACLE, 10)
    ref = torch.stack([p for _, _, p in theirs]).float()
    assert [predictor.classes[i] for i in probs.argmax(1).tolist()] == [str(label) for label, _, _ in theirs]
    assert (probs - ref).abs().max().item() < 1e-4
    # and it is a real model, not a constant: it reads most digits right
    accuracy = np.mean([predictor.classes[i] == t for i, t in zip(probs.argmax(1).tolist(), truth)])
    assert accuracy > 0.9


def test_single_image_path_matches_batch(predictor, digits, tmp_path):
    """A path, bytes, a PIL image and an array give the same answer, alone or in a batch."""
    images, _ = digits
    img = images[7]
    path = tmp_path / "d.png"
    img.save(path)
    batch = predictor.predict_batch([img, images[0], images[1]])[0]
    for src in (img, path, str(path), path.read_bytes(), np.asarray(img), open(path, "rb")):
        pred = predictor.predict(src)
        assert pred.label == batch.label
        assert pred.confidences[0][1] == pytest.approx(batch.confidences[0][1], abs=1e-5)


def test_preprocessing_is_the_learners(predictor, mnist_model):
    """Resize and Normalize come from metadata.json and match the exported learner's (MNIST's own
    statistics, not ImageNet's), and the sizes the model sees are the training size."""
    meta = predictor.metadata
    norm = [t for t in predictor.folder.learner.dls.after_batch.fs if type(t).__name__ == "Normalize"][0]
    assert norm.mean.flatten().tolist() == pytest.approx(meta.normalize.mean, abs=1e-6)
    assert norm.std.flatten().tolist() == pytest.approx(meta.normalize.std, abs=1e-6)
    assert list(predictor.preprocessing.mean) == meta.normalize.mean
    assert norm.mean.flatten()[0].item() != pytest.approx(0.485, abs=0.01)  # not ImageNet's
    x = predictor.prepare(Image.new("RGB", (300, 120), "white"))
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, meta.image_size, meta.image_size)


@pytest.mark.parametrize("size", [28, 64, 224])
def test_direct_resize_is_the_item_transforms_pixel_for_pixel(size):
    """`Preprocessing.resize` (Pillow and torch called directly, the server's path) against
    `item_transforms` through fastai's Pipeline (the training cache's and the learner's): the same uint8
    pixels, for images smaller, larger, of the same size, and of other aspect ratios, noise and gradients."""
    from fasttransform import Pipeline
    from models.contract import Preprocessing, item_transforms
    from models.imageio import RGBImage
    pre = Preprocessing(image_size=size, resize_method="squish", mean=(0.5,) * 3, std=(0.25,) * 3)
    pipeline = Pipeline(item_transforms(size), split_idx=1)
    rng = np.random.default_rng(size)
    for w, h in [(size, size), (1, 1), (size // 2, size * 3), (7 * size, 2 * size + 1), (333, 95), (2, 500)]:
        a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]  # a gradient beside the noise
        img = RGBImage.create(Image.fromarray(a))
        want = pipeline(img)
        got = pre.resize(img)
        assert got.dtype == torch.uint8 and tuple(got.shape) == (3, size, size)
        assert torch.equal(got, want.as_subclass(torch.Tensor)), (w, h)


def test_top_k(predictor, digits):
    img = digits[0][0]
    assert len(predictor.predict(img).confidences) == 3  # default
    full = predictor.predict(img, top_k=50)  # more than there are classes: all of them
    assert len(full.confidences) == 10
    values = [c for _, c in full.confidences]
    assert values == sorted(values, reverse=True) and sum(values) == pytest.approx(1, abs=1e-4)
    assert full.label == full.confidences[0][0]
    one = predictor.predict(img, top_k=1)
    assert one.as_dict() == {"label": full.label, "confidences": [{"label": full.label, "confidence": values[0]}]}
    assert one.as_label() == {full.label: values[0]}


def test_predict_many_keeps_order_and_carries_on(predictor, digits, tmp_path):
    images, truth = digits
    files = []
    for i in range(40):
        images[i].save(tmp_path / f"{i}.png")
        files.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "empty.png").write_bytes(b"")
    srcs = files[:5] + [str(tmp_path / "bad.png")] + files[5:30] + [str(tmp_path / "empty.png"),
                                                                   str(tmp_path / "missing.png")] + files[30:]
    for workers in (0, 2):
        out = list(predictor.predict_many(srcs, batch_size=8, workers=workers))
        assert [s for s, _ in out] == srcs
        errors = {s: r for s, r in out if isinstance(r, ImageError)}
        assert set(errors) == {str(tmp_path / n) for n in ("bad.png", "empty.png", "missing.png")}
        assert "empty" in str(errors[str(tmp_path / "empty.png")])
        labels = [r.label for s, r in out if isinstance(r, Prediction)]
        expected = [p.label for p in predictor.predict_batch(files)]
        assert labels == expected


def test_device_choice(predictor, digits):
    assert pick_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():  # a machine with a GPU: the CPU-trained model serves there too
        gpu = Predictor(predictor.folder, device="cuda")
        a, b = gpu.predict(digits[0][0]), predictor.predict(digits[0][0])
        assert a.label == b.label and a.confidences[0][1] == pytest.approx(b.confidences[0][1], abs=1e-4)
    else:
        with pytest.raises(ValueError, match="CUDA"):
            pick_device("cuda")
    with pytest.raises(ValueError):
        pick_device("tpu")


def test_bad_image_is_an_image_error(predictor):
    for bad in (b"", b"hello", b"\x89PNG\r\n\x1a\n" + b"\0" * 20):
        with pytest.raises(ImageError):
            predictor.prepare(bad)
