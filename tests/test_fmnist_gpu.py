"""studies/fmnist_gpu.py, the GPU-scale Fashion-MNIST study, on the CPU: the augmentation drawn on
the device (crop area, aspect, place, flips), the multi-run training (the runs of one process
do not disturb each other), on tiny IDX files written here (the Debian package is not needed)."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from studies import fmnist_gpu
from test_fashion_mnist import _idx


def write_learnable_fmnist(folder: Path, n_train: int = 512, n_test: int = 256) -> Path:
    """The four IDX files (uncompressed) of a learnable stand-in: each class its own brightness."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('t10k', n_test)):
        labels = rng.integers(0, 10, n)
        images = np.clip(labels[:, None, None] * 25 + rng.integers(0, 30, (n, 28, 28)), 0, 255)
        (folder / f'{split}-images-idx3-ubyte').write_bytes(_idx(images))
        (folder / f'{split}-labels-idx1-ubyte').write_bytes(_idx(labels))
    return folder


def test_crops_cover_60_to_100_percent_and_flip_half_the_time():
    g = torch.Generator().manual_seed(0)
    theta = fmnist_gpu.crop_flip_params(4000, g)
    w, h, cx, cy = theta[:, 0, 0].abs(), theta[:, 1, 1], theta[:, 0, 2], theta[:, 1, 2]
    area = w * h
    assert area.min() >= 0.6 - 1e-6 and area.max() <= 1 + 1e-6
    # large crops of a skewed aspect do not fit and are drawn again: the mean area is torchvision's
    # (0.744 here, 0.759 there: torchvision rounds the box to whole pixels, so a side up to 28.5 fits)
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    tv = [RandomResizedCrop.get_params(torch.zeros(1, 28, 28), [0.6, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    tv_area = torch.tensor([h * w / 784 for _, _, h, w in tv])
    assert abs(area.mean() - tv_area.mean()) < 0.025, (area.mean(), tv_area.mean())
    assert (w / h).min() >= 3 / 4 - 1e-6 and (w / h).max() <= 4 / 3 + 1e-6
    assert (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()  # inside the image
    assert 0.46 < (theta[:, 0, 0] < 0).float().mean() < 0.54
    assert (theta[:, 0, 1] == 0).all() and (theta[:, 1, 0] == 0).all()
    assert torch.equal(theta, fmnist_gpu.crop_flip_params(4000, torch.Generator().manual_seed(0)))
    # no draw fits (aspect 2-3 at the whole area): the whole image, as torchvision falls back
    whole = fmnist_gpu.crop_flip_params(50, g, scale=(1, 1), ratio=(2, 3), hflip=0)
    assert torch.equal(whole, torch.tensor([[1., 0, 0], [0, 1, 0]]).expand(50, 2, 3))


def test_to_input_resamples_flips_and_normalises():
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    plain = fmnist_gpu.to_input(images, 0.286, 0.353)
    assert plain.shape == (5, 3, 28, 28) and torch.equal(plain[:, 0], plain[:, 2])
    assert torch.allclose(plain[:, 0] * 0.353 + 0.286, images.float() / 255, atol=1e-6)
    identity = torch.tensor([[1., 0, 0], [0, 1, 0]]).expand(5, 2, 3)
    assert torch.allclose(fmnist_gpu.to_input(images, 0.286, 0.353, identity), plain, atol=1e-5)
    mirror = identity * torch.tensor([[-1., 1, 1], [1, 1, 1]])
    assert torch.allclose(fmnist_gpu.to_input(images, 0.286, 0.353, mirror), plain.flip(-1), atol=1e-5)
    g = torch.Generator().manual_seed(1)
    crops = fmnist_gpu.to_input(images, 0.286, 0.353, fmnist_gpu.crop_flip_params(5, g))
    assert crops.shape == (5, 3, 28, 28) and torch.isfinite(crops).all() and not torch.allclose(crops, plain)


def _recipe(epochs: int = 2) -> argparse.Namespace:
    return fmnist_gpu.recipe_args(argparse.Namespace(batch_size=32, epochs=epochs, lr=1e-3, ema_decay=0.99))


def test_interleaved_runs_keep_their_own_random_streams(tmp_path):
    """Two runs of one seed (here both twins) trained step by step with another run in between
    end bit for bit equal, drop-path draws included: a run's step depends on nothing but its own
    state and the batch. The recipe is configs/fashion_mnist.yaml's, the batch size the study's."""
    recipe = _recipe()
    assert (recipe.opt, recipe.lr, recipe.smoothing, recipe.drop_path, recipe.clip_grad) == ('adamw', 1e-3, .1, .05, 1.)
    kwargs = dict(stem='none', img_size=28, patch_size=4, num_classes=10, embed_dim=16, depth=2, num_heads=2,
                  head_dim=8)
    cpu = torch.device('cpu')
    a, other, b = (fmnist_gpu.Run(seed, False, recipe, kwargs, cpu, None) for seed in (0, 1, 0))
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert not torch.equal(a.model.pos_embed, other.model.pos_embed)
    train_x, train_y, _, _ = fmnist_gpu.load_fmnist(str(write_learnable_fmnist(tmp_path / 'f', 128, 8)), cpu)
    from losses import build_base_criterion
    criterion = build_base_criterion(False, recipe.smoothing, False)
    g = torch.Generator().manual_seed(0)
    start = [p.detach().clone() for p in a.model.parameters()]
    for i in range(4):
        idx = torch.arange(32 * i, 32 * i + 32)
        x = fmnist_gpu.to_input(train_x[idx], 0.286, 0.353, fmnist_gpu.crop_flip_params(32, g))
        for r in (a, other, b):
            r.step(x, train_y[idx], criterion, None, recipe.clip_grad)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    assert all(torch.equal(p, q) for p, q in zip(a.ema.module.parameters(), b.ema.module.parameters()))
    assert torch.equal(a.loss_sum, b.loss_sum) and math.isfinite(a.loss_sum.item())
    assert not all(torch.equal(p, q) for p, q in zip(a.model.parameters(), start))


def test_eval_epochs_first_every_5th_and_last_5():
    assert fmnist_gpu.eval_epochs(30) == [1, 5, 10, 15, 20, 25, 26, 27, 28, 29, 30]
    assert fmnist_gpu.eval_epochs(2) == [1, 2]


def test_missing_data_is_one_line(tmp_path):
    from utils import UsageError
    with pytest.raises(UsageError, match='make fmnist-data'):
        fmnist_gpu.load_fmnist(str(tmp_path), torch.device('cpu'))


def test_budget_guard_stops_after_epoch_2_with_the_measured_pace(tmp_path, capsys):
    data = write_learnable_fmnist(tmp_path / 'f', 128, 16)
    with pytest.raises(SystemExit, match=r'^error: projected \d+ s > --budget-s 0.001 \(\d+ training img/s over '
                                         r'the 4 runs, epoch 2 took [\d.]+ s\); about \d+ epochs would fit$'):
        fmnist_gpu.main(['--out', str(tmp_path / 'out'), '--fmnist', str(data), '--device', 'cpu', '--seeds', '2',
                         '--epochs', '4', '--batch-size', '64', '--embed-dim', '16', '--depth', '1', '--heads', '2',
                         '--head-dim', '8', '--budget-s', '0.001'])
    epochs = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line.startswith('epoch ')]
    assert epochs == ['1/4', '2/4'] and not (tmp_path / 'out' / 'fmnist.json').exists()
