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
from train.precisebn import evenly_spaced, recompute_batchnorm


def test_evenly_spaced_covers_the_set_without_random_numbers():
    assert evenly_spaced(5, 10) == [0, 1, 2, 3, 4]
    picked = evenly_spaced(60000, 4096)
    assert len(picked) == len(set(picked)) == 4096 and picked[0] == 0 and picked[-1] == 59999
    # items sorted by class folder (10 classes of 6000): each class gets its share
    assert np.bincount(np.array(picked) // 6000).tolist() == pytest.approx([410] * 10, abs=1)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Dropout(0.5),
                         nn.Linear(4 * 6 * 6, 5), nn.BatchNorm1d(5, momentum=0.3))


def test_statistics_are_the_average_of_the_batches_and_modes_are_restored():
    model = _model().train()
    batches = [torch.randn(n, 3, 8, 8) * 3 + 1 for n in (16, 16, 9, 1)]  # the last, of one image, is skipped
    seen = recompute_batchnorm(model, batches)
    assert seen == 41
    feats = [model[0](x) for x in batches[:3]]
    with torch.no_grad():
        want_mean = torch.stack([f.mean((0, 2, 3)) for f in feats]).mean(0)
        want_var = torch.stack([f.var((0, 2, 3), unbiased=True) for f in feats]).mean(0)
    torch.testing.assert_close(model[1].running_mean, want_mean)
    torch.testing.assert_close(model[1].running_var, want_var)
    assert model[1].num_batches_tracked == 3
    # modes and momenta as found; no gradient left behind
    assert all(m.training for m in model.modules())
    assert model[1].momentum == 0.1 and model[6].momentum == 0.3
    assert all(p.grad is None for p in model.parameters())


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
