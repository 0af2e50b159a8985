"""Tests of shards.py and scripts/make_shards.py: the shards of a small image folder (counts,
classes, bytes, order, timm's _info.json layout), SHARDS samples equal to the ImageFolder's, loader
workers with handles of their own, unreadable images, broken shards and refusals on one line, and
train_hp.py runs from shards, stopped mid-epoch and resumed to the weights of an uninterrupted run."""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import random
import re
import signal
import tarfile
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from train_helpers import REPO, TINY, read_log, run_cli

import datasets
import pipeline
import shards
import train_hp
import unreadable
from bvit.data import eval_transform
from samplers import RepeatAugSampler
from utils import UsageError

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py

CLASSES = ['ant', 'bee', 'cow']
# 14 training images a class (42: 5 steps of 8), 4 validation images a class; JPEG and PNG mixed
N_TRAIN, N_VAL = 14, 4


def make_folder(root: Path) -> Path:
    """SRC/train/<class>/<image>, SRC/val/<class>/<image>: 20x20 noise around a colour of the
    class, every third image a PNG, the others JPEGs (some named .JPEG, as ImageNet's)."""
    rng = np.random.default_rng(0)
    for split, n in (('train', N_TRAIN), ('val', N_VAL)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                base = np.array([200 * (c == 0), 200 * (c == 1), 200 * (c == 2)], dtype=np.int16)
                pixels = np.clip(base + rng.integers(-40, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
                ext = '.png' if i % 3 == 0 else ('.JPEG' if i % 3 == 1 else '.jpg')
                Image.fromarray(pixels).save(root / split / name / f'{name}_{i:02d}{ext}',
                                             format='PNG' if ext == '.png' else 'JPEG')
    return root


@pytest.fixture(scope='module')
def written(tmp_path_factory) -> Dict[str, Path]:
    """A folder and its shards (4 samples a shard), shared by the tests that only read them."""
    tmp = tmp_path_factory.mktemp('shards')
    src = make_folder(tmp / 'src')
    shards.write_shards(str(src), str(tmp / 'dst'), 4, log=lambda line: None)
    return {'src': src, 'dst': tmp / 'dst'}


def _folder_samples(src: Path, split: str) -> List[tuple]:
    from torchvision.datasets import ImageFolder
    return ImageFolder(str(src / split)).samples


def _tar_members(path: Path) -> Dict[str, bytes]:
    with tarfile.open(path) as tf:
        return {m.name: tf.extractfile(m).read() for m in tf.getmembers()}


# Writing ------------------------------------------------------------------------------------------

def test_make_shards_writes_the_counts_classes_and_bytes_of_the_folder(written, tmp_path):
    src, dst = written['src'], written['dst']
    info = json.loads((dst / '_info.json').read_text())
    assert info['classes'] == CLASSES
    for split, n in (('train', 3 * N_TRAIN), ('val', 3 * N_VAL)):
        entry = info['splits'][split]
        shard_count = -(-n // 4)
        assert entry['num_samples'] == n and entry['name'] == split
        assert entry['filenames'] == [f'{split}/{split}-{i:06d}.tar' for i in range(shard_count)]
        assert entry['shard_lengths'] == [4] * (n // 4) + ([n % 4] if n % 4 else [])
        assert sorted(os.listdir(dst / split)) == [Path(f).name for f in entry['filenames']]  # no temp file left
        folder = _folder_samples(src, split)
        keys = []
        for rel, length in zip(entry['filenames'], entry['shard_lengths']):
            members = _tar_members(dst / rel)
            assert len(members) == 2 * length
            for name, data in members.items():
                key, ext = name.split('.')
                path, label = folder[int(key)]  # the key is the ImageFolder index
                if ext == 'cls':
                    assert data == str(label).encode()
                else:
                    assert ext == {'.png': 'png', '.JPEG': 'jpg', '.jpg': 'jpg'}[Path(path).suffix]
                    assert data == Path(path).read_bytes()
                    keys.append(int(key))
        assert sorted(keys) == list(range(n))  # every image once
        if split == 'val':
            assert keys == list(range(n))  # validation keeps ImageFolder order
        else:
            assert keys != list(range(n))  # training is shuffled, so a shard mixes classes
            assert len({folder[k][1] for k in keys[:4]}) > 1
    assert sorted(os.listdir(dst)) == ['_info.json', 'train', 'val']

    again = tmp_path / 'again'  # the same folder and seed give the same bytes; --no-shuffle the folder order
    shards.write_shards(str(src), str(again), 4, log=lambda line: None)
    assert (again / 'train' / 'train-000003.tar').read_bytes() == (dst / 'train' / 'train-000003.tar').read_bytes()
    info = shards.write_shards(str(src), str(tmp_path / 'plain'), 100, shuffle_seed=None, log=lambda line: None)
    assert info['splits']['train']['shard_lengths'] == [3 * N_TRAIN]
    names = [n for n in _tar_members(tmp_path / 'plain' / 'train' / 'train-000000.tar') if n.endswith('.cls')]
    assert names == [f'{i:08d}.cls' for i in range(3 * N_TRAIN)]


def _make_shards_main():
    spec = importlib.util.spec_from_file_location('make_shards', REPO / 'scripts' / 'make_shards.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_make_shards_refuses_on_one_line_and_never_overwrites(written, tmp_path, capsys):
    main = _make_shards_main()
    src, dst = written['src'], written['dst']
    before = {p: p.stat().st_mtime_ns for p in dst.rglob('*')}
    (tmp_path / 'file').write_text('x')
    only_train = tmp_path / 'only_train'
    (only_train / 'train' / 'a').mkdir(parents=True)
    other = make_folder(tmp_path / 'other')
    (other / 'val' / 'dog').mkdir()
    Image.new('RGB', (4, 4)).save(other / 'val' / 'dog' / 'd.png')
    cases = {
        'no train': ([tmp_path / 'none', tmp_path / 'o1'], f'{tmp_path / "none" / "train"} not found'),
        'no val': ([only_train, tmp_path / 'o2'], f'{only_train / "val"} not found'),
        'non-empty DST': ([src, dst], f'{dst} exists and is not an empty folder; make_shards never overwrites'),
        'DST a file': ([src, tmp_path / 'file'], 'exists and is not an empty folder'),
        'shard size 0': ([src, tmp_path / 'o3', '--shard-size', '0'], '--shard-size must be at least 1, got 0'),
        'other classes': ([other, tmp_path / 'o4'], 'train has 3 class folders, val 4, not the same names (dog'),
        'bad flag': ([src, tmp_path / 'o5', '--shard-size', 'x'], "argument --shard-size: invalid int value: 'x'"),
    }
    for case, (argv, want) in cases.items():
        capsys.readouterr()
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's exit
            rc = e.code
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith('error: ') and err.count('\n') == 1 and want in err, (case, err)
    assert not any((tmp_path / f'o{i}').exists() and os.listdir(tmp_path / f'o{i}') for i in range(1, 6))
    assert {p: p.stat().st_mtime_ns for p in dst.rglob('*')} == before  # nothing rewritten


# Reading ------------------------------------------------------------------------------------------

def _args(*argv: str):
    return train_hp.parse_args(['--input-size', '16', '--pipeline', 'deit', *argv])


def test_shards_give_the_samples_of_the_image_folder(written):
    src, dst = written['src'], written['dst']
    transform = eval_transform(16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), 0.875)
    for train in (True, False):
        split = 'train' if train else 'val'
        ds, classes = datasets.build_dataset(train, _args('--data-set', 'SHARDS', '--data-path', str(dst)), transform)
        folder, _ = datasets.build_dataset(train, _args('--data-set', 'FOLDER', '--data-path', str(src)), transform)
        assert isinstance(ds, shards.ShardDataset) and classes == 3 and ds.classes == CLASSES
        assert len(ds) == len(folder) == 3 * (N_TRAIN if train else N_VAL)
        keys = [int(ds.key(i)) for i in range(len(ds))]
        if not train:
            assert keys == list(range(len(ds)))  # the same order
        for i, k in enumerate(keys):
            (x, y), (x_ref, y_ref) = ds[i], folder[k]
            assert y == y_ref == ds.targets[i] and torch.equal(x, x_ref), (split, i)
        data, label = ds.read(0)  # the raw bytes: what another loader (bytes -> image) gets
        path, folder_label = folder.samples[keys[0]]
        assert data == Path(path).read_bytes() and label == folder_label
    # a loader of one's own, the shape of torchvision's ImageFolder(loader=...)
    sizes = shards.ShardDataset(str(dst), 'val', loader=lambda b: len(b))
    assert [sizes[i][0] for i in range(3)] == [Path(p).stat().st_size for p, _ in folder.samples[:3]]

    # --pipeline fast: the undecoded bytes as a uint8 tensor go to its worker transform, as the folder's do
    fast = ['--pipeline', 'fast', '--aa', 'rand-m9-mstd0.5-inc1']
    ds, _ = datasets.build_dataset(True, _args('--data-set', 'SHARDS', '--data-path', str(dst), *fast))
    folder, _ = datasets.build_dataset(True, _args('--data-set', 'FOLDER', '--data-path', str(src), *fast))
    assert ds.loader is pipeline.bytes_tensor
    for i in range(0, len(ds), 5):
        got, want = [], []
        for data, out in ((ds, got), (folder, want)):
            random.seed(i)  # the same draws of crop, flip and RandAugment (Python, NumPy, torch) for both
            np.random.seed(i)
            torch.manual_seed(i)
            out.append(data[i if data is ds else int(ds.key(i))])
        (image, ops), label = got[0]
        assert image.dtype == torch.uint8 and image.shape == (3, 16, 16) and label == want[0][1]
        assert torch.equal(image, want[0][0][0]) and torch.equal(ops, want[0][0][1])

    # --train-subset still picks a fixed subset; the class lists of both splits are the shards'
    args = _args('--data-set', 'SHARDS', '--data-path', str(dst), '--train-subset', '10')
    train, val, n = datasets.build_datasets(args)
    assert (len(train), len(val), n) == (10, 12, 3)


def test_loader_workers_open_their_own_handles_and_read_what_one_process_reads(written):
    ds = shards.ShardDataset(str(written['dst']), 'train', transform=eval_transform(16, (0, 0, 0), (1, 1, 1), 1.0))
    direct = torch.stack([ds[i][0] for i in range(len(ds))])
    ds.close()
    loader = torch.utils.data.DataLoader(ds, batch_size=5, num_workers=2, shuffle=False,
                                         multiprocessing_context='fork')
    images = torch.cat([x for x, _ in loader])
    assert torch.equal(images, direct)
    assert len(ds._files) == 0  # the workers opened the shards; the parent holds none of their handles
    ds[0]
    assert list(ds._files) == [0]
    copy = pickle.loads(pickle.dumps(ds))  # what a spawned worker gets: no open file, the same samples
    assert len(copy._files) == 0 and torch.equal(copy[5][0], direct[5]) and list(copy._files) == [1]
    ds.close()
    copy.close()


def _with_bad_png(src: Path, split: str) -> Path:
    """The first PNG of the split's first class, its pixel data cut off."""
    path = src / split / CLASSES[0] / f'{CLASSES[0]}_00.png'
    path.write_bytes(path.read_bytes()[:60])
    return path


def test_an_unreadable_image_in_a_shard_becomes_a_record_left_out_of_the_batch(tmp_path):
    src = make_folder(tmp_path / 'src')
    _with_bad_png(src, 'val')
    shards.write_shards(str(src), str(tmp_path / 'dst'), 5, log=lambda line: None)
    ds = shards.ShardDataset(str(tmp_path / 'dst'), 'val', transform=eval_transform(16, (0, 0, 0), (1, 1, 1), 1.0))
    record = ds[0]  # validation keeps ImageFolder order: the cut PNG (ant_00.png) comes first
    assert isinstance(record, unreadable.UnreadableImage) and record.split == 'val'
    assert record.path == f'{tmp_path / "dst" / "val" / "val-000000.tar"}:00000000.png'
    assert record.reason == 'OSError: image file is truncated'
    images, targets, bad = unreadable.collate_skipping_unreadable([ds[i] for i in range(3)])
    assert images.shape == (2, 3, 16, 16) and targets.tolist() == [0, 0] and bad == [record]


def _tar(path: Path, members: Dict[str, bytes]) -> None:
    with tarfile.open(path, 'w') as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def test_broken_shards_give_one_line_naming_the_shard(written, tmp_path, capsys):
    png = (written['src'] / 'val' / 'ant' / 'ant_00.png').read_bytes()
    shard = tmp_path / 'val' / 'val-000000.tar'
    shard.parent.mkdir()
    info = {'classes': CLASSES, 'splits': {'val': {'name': 'val', 'num_samples': 2, 'filenames': ['val/val-000000.tar'],
                                                   'shard_lengths': [2]}}}
    (tmp_path / '_info.json').write_text(json.dumps(info))
    cases = {
        'no .cls': ({'0.png': png, '0.cls': b'1', '1.png': png}, 'sample 1 has no .cls member (has png)'),
        'no image': ({'0.png': png, '0.cls': b'1', '1.txt': b'x', '1.cls': b'0'}, 'sample 1 has no image member'),
        'bad class': ({'0.png': png, '0.cls': b'1', '1.png': png, '1.cls': b'3'},
                      "sample 1 has class '3', not an index below 3"),
        'one sample': ({'0.png': png, '0.cls': b'1'}, '1 samples, but _info.json lists 2'),
    }
    for case, (members, want) in cases.items():
        _tar(shard, members)
        with pytest.raises(UsageError, match=re.escape(want)):
            shards.ShardDataset(str(tmp_path), 'val')
    _tar(shard, {'0.png': png, '0.cls': b'1', 'ü/1.png': png, 'ü/1.cls': b'2'})  # a pax header: read by tarfile
    good = shard.read_bytes()
    ds = shards.ShardDataset(str(tmp_path), 'val')
    assert [ds[i][1] for i in range(2)] == [1, 2] and ds.member(1) == f'{shard}:ü/1.png' and ds.key(1) == 'ü/1'
    ds.close()
    second = 512 + -(-len(png) // 512) * 512  # the second member's header: after the first's, and its padded data
    header = bytearray(good)
    header[second + 130] = ord('x')  # a digit of its size
    for data, reason in ((good[:1000], f'unexpected end of data: the last member needs {second - 1000} more bytes'),
                         (bytes(header), f'invalid header at byte {second}'),
                         (b'GIF89a' + bytes(2000), 'bad header checksum at byte 0')):
        shard.write_bytes(data)
        with pytest.raises(UsageError, match=rf'^{re.escape(str(shard))}: not a readable tar file \(ReadError: '
                                             rf'{re.escape(reason)}\); write the shards again'):
            shards.ShardDataset(str(tmp_path), 'val')

    # through train_hp.py: exit 2, one line (here: a folder that holds no _info.json)
    shard.write_bytes(good[:1000])
    for path, want in ((tmp_path, f'{shard}: not a readable tar file'), (tmp_path / 'val', '_info.json not found')):
        rc, _, err = run_cli(['--data-set', 'SHARDS', '--data-path', path, '--eval', '--num_workers', '0'], capsys)
        assert rc == 2 and err.count('\n') == 1 and want in err, err


# Training -----------------------------------------------------------------------------------------

# 42 training images, 5 steps of 8 an epoch; 12 validation images; no worker process, so that a
# mid-epoch resume replays the augmentation draws too (docs/training.md, "Preemption")
RUN = TINY + ['--data-set', 'SHARDS', '--batch-size', '8', '--num_workers', '0', '--epochs', '2', '--deterministic']


def test_training_from_shards_stopped_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, capsys, monkeypatch):
    src = make_folder(tmp_path / 'src')
    bad = _with_bad_png(src, 'train')
    shards.write_shards(str(src), str(tmp_path / 'dst'), 8, log=lambda line: None)
    run = RUN + ['--data-path', tmp_path / 'dst']
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    rc, out, err = run_cli(run + ['--output_dir', straight], capsys)
    assert rc == 0, err
    rows = read_log(straight / 'log.txt')
    assert [r['epoch'] for r in rows] == [0, 1] and all(np.isfinite(r['train_loss']) for r in rows)
    # the cut PNG (ImageFolder index 0) is skipped each time the sampler draws it (repeated augmentation:
    # up to 3 times an epoch), named by its shard and member
    train = shards.ShardDataset(str(tmp_path / 'dst'), 'train')
    where = next(i for i in range(len(train)) if train.key(i) == '00000000')
    sampler = RepeatAugSampler(train, 1, 0, seed=0, num_repeats=3)
    draws = []
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        draws.append(list(sampler)[:40].count(where))  # 5 full batches of 8; the last 2 indices dropped
    assert [r['train_skipped'] for r in rows] == draws and sum(draws) > 0
    assert [r['test_images'] for r in rows] == [12, 12]
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: skipped unreadable image {train.member(where)} (train split): OSError: image file '
                        'is truncated'] * sum(draws)
    assert str(bad) not in out

    real_build = train_hp.build_model
    steps = {'n': 0}

    def build_model_interrupted_at_step_8(args, num_classes):  # epoch 1, step 3 (5 steps an epoch)
        model = real_build(args, num_classes)

        def hook(module, inputs, output):
            if module.training:
                steps['n'] += 1
                if steps['n'] == 8:
                    os.kill(os.getpid(), signal.SIGTERM)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_hp, 'build_model', build_model_interrupted_at_step_8)
    rc, out, err = run_cli(run + ['--output_dir', cut], capsys)
    monkeypatch.setattr(train_hp, 'build_model', real_build)
    assert rc == 3 and 'stopped by SIGTERM at epoch 1, iteration 3/5' in out, out + err
    obj = torch.load(cut / 'checkpoint.pth', weights_only=True)
    assert obj['epoch'] == 0 and obj['position']['epoch'] == 1 and obj['position']['batches_done'] == 3
    rc, out, err = run_cli(run + ['--output_dir', cut, '--resume', cut / 'checkpoint.pth'], capsys)
    assert rc == 0 and 'continuing at epoch 1, iteration 4' in out, err
    a, b = (torch.load(d / 'checkpoint.pth', weights_only=True) for d in (straight, cut))
    for key in ('model', 'model_ema'):
        diff = max((a[key][k].float() - b[key][k].float()).abs().max().item() for k in a[key])
        assert diff <= 1e-6, key
    ra, rb = read_log(straight / 'log.txt'), read_log(cut / 'log.txt')
    assert [r['epoch'] for r in rb] == [0, 1]
    assert rb[1]['train_loss'] == pytest.approx(ra[1]['train_loss'], abs=1e-6)
    assert rb[1]['test_acc1'] == ra[1]['test_acc1']
    assert rb[1]['test_loss'] == pytest.approx(ra[1]['test_loss'], abs=1e-6)


class _Killed(Exception):
    pass


def test_with_loader_workers_a_run_resumed_at_an_epoch_boundary_ends_with_the_uninterrupted_weights(
        written, tmp_path, capsys, monkeypatch):
    run = RUN + ['--data-path', written['dst'], '--num_workers', '2']
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    assert run_cli(run + ['--output_dir', straight], capsys)[0] == 0
    real_append = train_hp.append_log_line

    def killed_after_epoch_0(output_dir, stats):
        real_append(output_dir, stats)
        raise _Killed

    monkeypatch.setattr(train_hp, 'append_log_line', killed_after_epoch_0)
    with pytest.raises(_Killed):
        train_hp.cli([str(a) for a in run + ['--output_dir', cut]])
    monkeypatch.setattr(train_hp, 'append_log_line', real_append)
    rc, out, err = run_cli(run + ['--output_dir', cut, '--resume', cut / 'checkpoint.pth'], capsys)
    assert rc == 0 and 'continuing at epoch 1' in out, err
    a, b = (torch.load(d / 'checkpoint.pth', weights_only=True) for d in (straight, cut))
    assert a['epoch'] == b['epoch'] == 1
    for key in ('model', 'model_ema'):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    assert read_log(cut / 'log.txt')[1]['train_loss'] == read_log(straight / 'log.txt')[1]['train_loss']
