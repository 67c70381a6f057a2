"""Precise BatchNorm statistics (train/precisebn.py): plain averages over clean training images,
recomputed before the last epoch's validation, so the exported model carries them."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.contract import load_model_folder, read_metadata
from tests.test_fit import random_label_digits
from train.cli import main
from train.precisebn import evenly_spaced, picked, recompute_batchnorm


def test_evenly_spaced_covers_the_set():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    spread = evenly_spaced(60000, 4096)
    assert len(spread) == len(set(spread)) == 4096 and spread[0] == 0 and spread[-1] == 59999
    # items sorted by class folder (10 classes of 6000): each class gets its share
    assert np.bincount(np.array(spread) // 6000).tolist() == pytest.approx([410] * 10, abs=1)


def test_picked_images_mix_the_classes_in_every_batch_and_repeat():
    """Items sorted by class folder, taken in order, would make batches of one class each."""
    torch.manual_seed(1)
    state = torch.random.get_rng_state()
    order = picked(60000, 4096)
    assert torch.equal(torch.random.get_rng_state(), state)  # the run's random numbers untouched
    assert sorted(order) == evenly_spaced(60000, 4096) and order == picked(60000, 4096)
    classes = np.array(order) // 6000
    assert min(len(set(classes[i:i + 64])) for i in range(0, 4096, 64)) >= 8


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=0.3))


def test_statistics_are_those_of_all_the_images_and_modes_are_restored():
    """Pooled over batches of different sizes and different means (as batches of one class each
    would be): exactly the mean and variance of everything the BatchNorm saw, not the average of
    the batches' own figures, which would leave out how far apart their means are."""
    model = _model().train()
    batches = [torch.randn(n, 3, 8, 8) * 3 + shift for n, shift in ((16, -4), (16, 0), (9, 5), (1, 0))]
    seen = recompute_batchnorm(model, batches)  # the last batch, of one image, is skipped
    assert seen == 41
    with torch.no_grad():
        f = model[0](torch.cat(batches[:3])).double()
    torch.testing.assert_close(model[1].running_mean, f.mean((0, 2, 3)).float())
    torch.testing.assert_close(model[1].running_var, f.var((0, 2, 3), unbiased=True).float())
    per_batch = torch.stack([model[0](x).var((0, 2, 3)) for x in batches[:3]]).mean(0).detach()
    # the batches' spread counts (most where a filter responds to the shift of the means)
    assert (model[1].running_var > per_batch).all() and (model[1].running_var / per_batch).max() > 1.5
    assert model[1].num_batches_tracked == 3
    # modes and momenta as found; no gradient left behind
    assert all(m.training for m in model.modules())
    assert model[1].momentum == 0.1 and model[6].momentum == 0.3
    assert all(p.grad is None for p in model.parameters())


def test_interrupted_the_statistics_stay():
    model = _model().eval()
    model[1].running_mean.fill_(0.5)

    def batches():
        yield torch.randn(8, 3, 8, 8)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recompute_batchnorm(model, batches())
    assert (model[1].running_mean == 0.5).all() and model[1].num_batches_tracked == 0
    assert not model.training


def test_without_a_usable_batch_the_statistics_stay():
    model = _model()
    model[1].running_mean.fill_(0.5)
    assert recompute_batchnorm(model, [torch.randn(1, 3, 8, 8)]) == 0
    assert (model[1].running_mean == 0.5).all() and model[1].num_batches_tracked == 0


def test_dropout_is_off_and_the_result_repeats():
    """Dropout before a BatchNorm would scale what it sees; with it off, two runs agree exactly."""
    model, batches = _model().eval(), [torch.randn(16, 3, 8, 8) for _ in range(3)]
    recompute_batchnorm(model, batches)
    first = model[6].running_var.clone()
    torch.manual_seed(123)
    recompute_batchnorm(model, batches)
    torch.testing.assert_close(model[6].running_var, first, rtol=0, atol=0)
    assert not any(m.training for m in model.modules())


def test_the_exported_model_has_the_clean_training_images_statistics(mnist_arrays, tmp_path):
    """Trained with augmentation, exported with BatchNorm statistics of the training images as the
    validation set sees them: the stem's BatchNorm holds exactly the mean and variance of conv1's
    outputs on them (one batch: the 60 training images, --bs 64 being more than there are)."""
    data = random_label_digits(mnist_arrays, tmp_path / "digits")
    out = tmp_path / "model"
    assert main([str(data), "--out", str(out), "--epochs", "2", "--size", "28", "--bs", "64", "--lr", "0.01",
                 "--augment", "--seed", "0", "-q"]) == 0
    meta = read_metadata(out)
    model = load_model_folder(out, format="safetensors").model.eval()
    files = sorted((data / "train").rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (meta.normalize.mean, meta.normalize.std))
    x = (x.float() / 255 - mean) / std
    with torch.no_grad():
        f = model[0][0](x)  # conv1
    bn = model[0][1]
    torch.testing.assert_close(bn.running_mean, f.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, f.var((0, 2, 3), unbiased=True), rtol=1e-4, atol=1e-5)
