"""--data-set FASHION_MNIST: torchvision's FashionMNIST reader on a folder of the four IDX files
(gzip or not, directly or in torchvision's FashionMNIST/raw layout), the one-line error when they
are missing, --model-kwargs, and configs/fashion_mnist.yaml end to end. Every test writes tiny IDX
files of its own: the Debian package (dataset-fashion-mnist) is never needed."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import datasets
import train_hp
from utils import UsageError

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / 'configs' / 'fashion_mnist.yaml'
N_TRAIN, N_TEST = 40, 12


def _idx(data: np.ndarray) -> bytes:
    """IDX bytes: magic (0, 0, type 0x08 = ubyte, number of dimensions), big-endian sizes, data."""
    header = struct.pack('>BBBB', 0, 0, 0x08, data.ndim) + b''.join(struct.pack('>I', n) for n in data.shape)
    return header + data.astype(np.uint8).tobytes()


def _split(n: int, seed: int):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 10
    images = rng.integers(0, 256, size=(n, 28, 28)).astype(np.uint8)
    images[:, 0, 0] = labels * 20  # the label readable from the image, to check the pairing
    return images, labels


def write_fashion_mnist(folder: Path, gz: bool) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (('train', N_TRAIN, 0), ('t10k', N_TEST, 1)):
        images, labels = _split(n, seed)
        for name, data in ((f'{prefix}-images-idx3-ubyte', images), (f'{prefix}-labels-idx1-ubyte', labels)):
            if gz:
                with gzip.open(folder / (name + '.gz'), 'wb') as f:
                    f.write(_idx(data))
            else:
                (folder / name).write_bytes(_idx(data))
    return folder


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Gzip files are decompressed into $XDG_CACHE_HOME/bvit/fashion-mnist: keep that in tmp."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))


def _args(*extra: str):
    return train_hp.parse_args(['--data-set', 'FASHION_MNIST', '--input-size', '28', '--aa', 'none', '--reprob', '0',
                                '--eval-crop-ratio', '1', '--mean', '0.3', '0.3', '0.3', '--std', '0.3', '0.3', '0.3', *extra])


@pytest.mark.parametrize('gz', [True, False], ids=['gzip', 'plain'])
def test_reads_a_folder_of_idx_files_gzip_or_not(tmp_path, gz):
    folder = write_fashion_mnist(tmp_path / 'fm', gz)
    args = _args('--data-path', str(folder))
    train, val, classes = datasets.build_datasets(args)
    assert (len(train), len(val), classes) == (N_TRAIN, N_TEST, 10)
    assert val.classes[0] == 'T-shirt/top' and val.classes[9] == 'Ankle boot'
    x, y = val[3]
    assert x.shape == (3, 28, 28) and y == 3
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray repeated to 3 channels
    raw = datasets.FashionMNISTFolder(datasets._fashion_mnist_raw_dir(str(folder)), train=True)
    images, labels = _split(N_TRAIN, 0)
    assert np.array_equal(raw.data.numpy(), images) and raw.targets.tolist() == labels.tolist()
    cache = tmp_path / 'cache' / 'bvit' / 'fashion-mnist'
    # plain files are read where they are; gzip ones are decompressed once into the cache
    assert cache.is_dir() == gz
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f + ('.gz' if gz else '') for f in datasets.FASHION_MNIST_FILES)


def test_torchvision_layout_and_the_default_path(tmp_path, monkeypatch):
    root = tmp_path / 'tv'
    write_fashion_mnist(root / 'FashionMNIST' / 'raw', gz=False)  # where torchvision's --download puts them
    _, val, _ = datasets.build_datasets(_args('--data-path', str(root)), need_train=False)
    assert len(val) == N_TEST
    monkeypatch.setattr(datasets, 'FASHION_MNIST_DEFAULT_PATH', str(write_fashion_mnist(tmp_path / 'deb', gz=True)))
    _, val, _ = datasets.build_datasets(_args(), need_train=False)  # no --data-path: the Debian location
    assert len(val) == N_TEST


def test_missing_files_one_line_naming_the_folder_and_both_ways_to_get_them(tmp_path, monkeypatch, capsys):
    empty = tmp_path / 'empty'
    empty.mkdir()
    with pytest.raises(UsageError) as e:
        datasets.build_datasets(_args('--data-path', str(empty)))
    msg = str(e.value)
    assert str(empty) in msg and 'apt-get install dataset-fashion-mnist' in msg and '--download' in msg
    partial = write_fashion_mnist(tmp_path / 'partial', gz=True)
    (partial / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(UsageError, match='not found in'):
        datasets.build_datasets(_args('--data-path', str(partial)))
    monkeypatch.setattr(datasets, 'FASHION_MNIST_DEFAULT_PATH', str(tmp_path / 'nowhere'))
    rc = train_hp.cli(['--data-set', 'FASHION_MNIST', '--eval'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and str(tmp_path / 'nowhere') in err
    with pytest.raises(UsageError, match='--download needs a writable --data-path'):
        datasets.build_datasets(_args('--download'))


def test_broken_gzip_is_one_clear_error(tmp_path):
    folder = write_fashion_mnist(tmp_path / 'fm', gz=True)
    (folder / 'train-images-idx3-ubyte.gz').write_bytes(b'not gzip at all')
    with pytest.raises(UsageError, match='train-images-idx3-ubyte.gz'):
        datasets.build_datasets(_args('--data-path', str(folder)))


def test_model_kwargs_parse_and_refuse_what_flags_set():
    from bvit.builder import parse_model_kwargs
    args = train_hp.parse_args(['--model-kwargs', 'embed_dim=48', 'num_heads=2', 'mlp_ratio=2.0', 'act=gelu'])
    assert parse_model_kwargs(args.model_kwargs) == dict(embed_dim=48, num_heads=2, mlp_ratio=2.0, act='gelu')
    for bad, text in (('embed_dim', 'KEY=VALUE'), ('img_size=32', '--input-size'), ('broad=False', '--no-broad')):
        with pytest.raises(UsageError, match=text):
            train_hp._check_model_flags(train_hp.parse_args(['--model-kwargs', bad]))


def test_config_trains_then_evaluates_its_checkpoint(tmp_path, capsys):
    """configs/fashion_mnist.yaml as it is (12 layers, 7x7 = 49 patches of 4 pixels, no stem), one
    epoch on the tiny files (evaluated: with --eval-freq 5 the last 5 epochs always are), then --eval --resume of the checkpoint gives the same test top-1; a
    checkpoint of another width is refused by name."""
    folder = write_fashion_mnist(tmp_path / 'fm', gz=True)
    out = tmp_path / 'run'
    common = ['--config', CONFIG, '--data-path', folder, '--batch-size', '8']
    args = train_hp.parse_args([str(a) for a in common])
    model = train_hp.build_model(args, 10)
    assert model.grid_size == (7, 7) and len(model.blocks) == 12 and model.embed_dim == 48
    assert args.epochs == 50 and args.hflip == 0.5 and args.aa == 'none' and args.min_lr == 1e-6
    assert args.model_ema and args.model_ema_decay == 0.998 and args.eval_freq == 5

    rc = train_hp.cli([str(a) for a in common + ['--epochs', '1', '--output_dir', out]])
    assert rc == 0
    log = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    assert log['test_images'] == N_TEST and log['epoch_time_s'] > 0
    capsys.readouterr()
    rc = train_hp.cli([str(a) for a in common + ['--eval', '--resume', out / 'checkpoint.pth']])
    text = capsys.readouterr().out
    assert rc == 0 and f'Accuracy of the network on the {N_TEST} test images: {log["test_acc1"]:.1f}%' in text
    # a model flag given with another value is honoured, with a note (here the shapes still fit: 1 head of 48)
    rc = train_hp.cli([str(a) for a in common + ['--eval', '--resume', out / 'checkpoint.pth',
                                                 '--model-kwargs', 'embed_dim=48', 'num_heads=1', 'head_dim=48']])
    text = capsys.readouterr().out
    assert rc == 0 and 'note: ' in text and "evaluating with --model-kwargs embed_dim=48 head_dim=48 num_heads=1" in text
    # one of another width is refused by the first key that does not fit
    rc = train_hp.cli([str(a) for a in common + ['--eval', '--resume', out / 'checkpoint.pth',
                                                 '--model-kwargs', 'embed_dim=32', 'num_heads=2', 'head_dim=16']])
    err = capsys.readouterr().err
    assert rc == 2 and 'does not fit' in err and '\n' not in err.strip()
