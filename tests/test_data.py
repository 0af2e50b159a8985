"""Tests of datasets.py and samplers.py: the bundled DIGITS split, image folders and their class
checks, the iNaturalist json layout, CIFAR folders, transforms, and the samplers."""
from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import List

import numpy as np
import pytest
import torch
from PIL import Image

import datasets
import train_hp
import unreadable
from samplers import RepeatAugSampler, ShardSampler
from utils import UsageError


def make_args(*argv: str):
    return train_hp.parse_args(list(argv))


def make_folder(root: Path, classes_train: List[str], classes_val: List[str], n: int = 2) -> Path:
    for split, classes in (('train', classes_train), ('val', classes_val)):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new('RGB', (12, 10), (30 * i, 60, 90)).save(root / split / c / f'{i}.png')
    return root


# DIGITS -------------------------------------------------------------------------------------------

def test_digits_is_bundled_split_fixed_and_upsampled_to_three_channels():
    args = make_args('--data-set', 'DIGITS', '--input-size', '24', '--aa', 'none', '--reprob', '0')
    train, val, classes = datasets.build_datasets(args)
    assert (len(train), len(val), classes) == (1440, 357, 10)
    assert len(val) % 2 == 1  # --dist-eval must cope with an odd split
    again = datasets.DigitsDataset(train=False)
    assert np.array_equal(again.images, val.images) and again.targets == val.targets  # fixed split
    assert set(val.targets) == set(range(10))  # stratified: every digit held out
    x, y = val[0]
    assert x.shape == (3, 24, 24) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.allclose(x[0] * 0.229 + 0.485, x[1] * 0.224 + 0.456, atol=1e-5)  # gray copied to RGB
    (image, ops), _ = train[0]  # --pipeline fast: uint8, RandAugment's draws (none: --aa none)
    assert image.shape == (3, 24, 24) and image.dtype == torch.uint8 and ops.shape == (0, 3)
    assert torch.equal(image[0], image[1])
    deit, _, _ = datasets.build_datasets(make_args('--data-set', 'DIGITS', '--input-size', '24', '--aa', 'none',
                                                   '--reprob', '0', '--pipeline', 'deit'))
    assert deit[0][0].shape == (3, 24, 24) and deit[0][0].dtype == torch.float32


def test_digits_needs_no_data_path_and_subsets_are_fixed():
    a = make_args('--data-set', 'digits', '--train-subset', '100', '--val-subset', '33')
    train, val, _ = datasets.build_datasets(a)
    assert (len(train), len(val)) == (100, 33) and train.classes == [str(i) for i in range(10)]
    train2, _, _ = datasets.build_datasets(make_args('--data-set', 'DIGITS', '--train-subset', '100'))
    assert train.indices == train2.indices


# Image folders and their checks -------------------------------------------------------------------

def test_folder_takes_the_class_count_from_the_folders(tmp_path):
    root = make_folder(tmp_path / 'd', ['ant', 'bee', 'cat'], ['ant', 'bee', 'cat'])
    train, val, n = datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(root),
                                                      '--input-size', '16'))
    assert n == 3 and len(train) == 6 and len(val) == 6 and train.classes == ['ant', 'bee', 'cat']
    assert val[0][0].shape == (3, 16, 16)


def test_train_and_val_class_lists_must_match(tmp_path):
    root = make_folder(tmp_path / 'd', ['ant', 'bee', 'cat'], ['ant', 'bee'])
    with pytest.raises(UsageError) as e:
        datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(root)))
    msg = str(e.value)
    assert 'class lists differ' in msg and 'only in train: cat' in msg and '<data-path>/train/<class>/<image>' in msg
    root2 = make_folder(tmp_path / 'e', ['ant', 'bee'], ['ant', 'bug'])
    with pytest.raises(UsageError, match='only in val: bug'):
        datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(root2)))


def test_imnet_needs_train_val_folders_and_1000_classes(tmp_path):
    root = make_folder(tmp_path / 'in', ['a', 'b'], ['a', 'b'])
    with pytest.raises(UsageError, match='IMNET needs 1000 classes but .* has 2.*--data-set FOLDER'):
        datasets.build_datasets(make_args('--data-path', str(root)))
    (tmp_path / 'only_train' / 'train' / 'a').mkdir(parents=True)
    with pytest.raises(UsageError, match=r'val not found; expected <data-path>/train/<class>/<image>'):
        datasets.build_datasets(make_args('--data-set', 'IMNET', '--data-path', str(tmp_path / 'only_train')))
    no_images = tmp_path / 'no_images'
    (no_images / 'train' / 'a').mkdir(parents=True)
    (no_images / 'val' / 'a').mkdir(parents=True)
    with pytest.raises(UsageError, match='expected <data-path>/train/<class>/<image>'):
        datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(no_images)))


def test_data_path_problems(tmp_path):
    with pytest.raises(UsageError, match='--data-path is required'):
        datasets.build_datasets(make_args('--data-set', 'FOLDER'))
    with pytest.raises(UsageError, match='does not exist'):
        datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(tmp_path / 'x')))
    (tmp_path / 'empty').mkdir()
    with pytest.raises(UsageError, match='is empty; expected'):
        datasets.build_datasets(make_args('--data-set', 'IMNET', '--data-path', str(tmp_path / 'empty')))
    with pytest.raises(UsageError, match="unknown --data-set 'SVHN'"):
        datasets.canonical_data_set('SVHN')
    assert datasets.canonical_data_set('CIFAR') == 'CIFAR100'  # DeiT's meaning


# iNaturalist --------------------------------------------------------------------------------------

def _inat(root: Path, year: int, with_categories_file: bool) -> Path:
    cats = [{'id': 0, 'name': 'Aa bb', 'genus': 'Aa', 'kingdom': 'Plantae', 'supercategory': 'Plantae'},
            {'id': 1, 'name': 'Aa cc', 'genus': 'Aa', 'kingdom': 'Plantae', 'supercategory': 'Plantae'},
            {'id': 2, 'name': 'Dd ee', 'genus': 'Dd', 'kingdom': 'Animalia', 'supercategory': 'Aves'}]
    folder = f'train_val{year}'
    records = {}
    for split, cat_ids in (('train', [0, 1, 2, 2]), ('val', [2, 1, 0])):
        images, anns = [], []
        for i, c in enumerate(cat_ids):
            name = f'{folder}/{cats[c]["supercategory"]}/{c}/{split}{i}.jpg'
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.new('RGB', (8, 8), (c * 50, 0, 0)).save(root / name)
            images.append({'id': 100 * (split == 'val') + i, 'file_name': name})
            anns.append({'image_id': 100 * (split == 'val') + i, 'category_id': c, 'id': i})
        records[split] = {'images': images, 'annotations': anns}
        if not with_categories_file:
            records[split]['categories'] = [{'id': c['id'], 'name': c['name'], 'supercategory': c['supercategory']}
                                            for c in cats]
        (root / f'{split}{year}.json').write_text(json.dumps(records[split]))
    if with_categories_file:
        (root / 'categories.json').write_text(json.dumps(cats))
    return root


def test_inat_json_layout_2018_and_2019(tmp_path):
    root = _inat(tmp_path / 'inat18', 2018, with_categories_file=True)
    train, val, n = datasets.build_datasets(make_args('--data-set', 'INAT', '--data-path', str(root),
                                                      '--input-size', '16'))
    assert n == 3 and train.classes == ['Aa bb', 'Aa cc', 'Dd ee']
    assert [t for _, t in val.samples] == [2, 1, 0] and val[0][0].shape == (3, 16, 16)
    _, _, n = datasets.build_datasets(make_args('--data-set', 'INAT', '--data-path', str(root),
                                                '--inat-category', 'genus'))
    assert n == 2
    root19 = _inat(tmp_path / 'inat19', 2019, with_categories_file=False)
    train, _, n = datasets.build_datasets(make_args('--data-set', 'INAT19', '--data-path', str(root19)))
    assert n == 3 and len(train) == 4
    with pytest.raises(UsageError, match=r'val2018.json not found: INAT expects .*2019 for INAT19'):
        datasets.build_datasets(make_args('--data-set', 'INAT', '--data-path', str(root19)))


# CIFAR --------------------------------------------------------------------------------------------

def test_cifar_reads_the_python_folders_and_downloads_only_when_asked(tmp_path, monkeypatch):
    with pytest.raises(UsageError, match='is empty; expected <data-path>/cifar-10-batches-py .*--download'):
        datasets.build_datasets(make_args('--data-set', 'CIFAR10', '--data-path', str(tmp_path)))
    (tmp_path / 'README').write_text('something else')
    with pytest.raises(UsageError, match='cifar-10-batches-py not found; .*--download'):
        datasets.build_datasets(make_args('--data-set', 'CIFAR10', '--data-path', str(tmp_path)))
    folder = tmp_path / 'cifar-10-batches-py'
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        with open(folder / name, 'wb') as f:
            pickle.dump({'data': rng.integers(0, 255, (4, 3072), dtype=np.uint8), 'labels': [0, 1, 2, 9]}, f)
    with open(folder / 'batches.meta', 'wb') as f:
        pickle.dump({'label_names': [f'c{i}' for i in range(10)]}, f)
    # the files are fakes, so torchvision's checksum check fails: reported on one line
    with pytest.raises(UsageError, match='cifar-10-batches-py: Dataset not found or corrupted. You can use --download'):
        datasets.build_datasets(make_args('--data-set', 'CIFAR10', '--data-path', str(tmp_path)))
    from torchvision.datasets import CIFAR10
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(CIFAR10, '_check_integrity', lambda self: True)
    monkeypatch.setattr(tv_cifar, 'check_integrity', lambda *a, **k: True)
    for path in (tmp_path, folder):  # the parent folder or the python folder itself
        train, val, n = datasets.build_datasets(make_args('--data-set', 'CIFAR10', '--data-path', str(path),
                                                          '--input-size', '32'))
        assert (len(train), len(val), n) == (20, 4, 10) and val[0][0].shape == (3, 32, 32)
    with pytest.raises(UsageError, match='cifar-100-python not found'):
        datasets.build_datasets(make_args('--data-set', 'CIFAR', '--data-path', str(tmp_path)))


# Transforms ---------------------------------------------------------------------------------------

def test_eval_transform_is_resize_and_center_crop():
    t = datasets.build_transform(False, make_args('--input-size', '20', '--eval-crop-ratio', '0.8'))
    names = [type(x).__name__ for x in t.transforms]
    assert names == ['Resize', 'CenterCrop', 'MaybeToTensor', 'Normalize'] and t.transforms[0].size == 25  # timm's
    assert t(Image.new('RGB', (40, 30))).shape == (3, 20, 20)


def test_paper_augmentation_runs_with_this_pillow():
    """rand-m9-mstd0.5-inc1 can ask for posterize with 0 bits, which Pillow 13 refuses."""
    t = datasets.build_transform(True, make_args('--input-size', '16', '--pipeline', 'deit'))
    from timm.data import auto_augment
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    black = auto_augment.NAME_TO_OP['PosterizeIncreasing'](img, 0)
    assert np.asarray(black).max() == 0
    assert auto_augment.NAME_TO_OP['PosterizeIncreasing'](img, 8) is img
    torch.manual_seed(0)
    for _ in range(40):
        assert t(img).shape == (3, 16, 16)
    three = datasets.build_transform(True, make_args('--input-size', '16', '--ThreeAugment', '--src', '--pipeline', 'deit'))
    assert three(img).shape == (3, 16, 16)
    fast = datasets.build_transform(True, make_args('--input-size', '16'))
    drawn = [fast(img)[1] for _ in range(40)]
    assert all(d.shape == (2, 3) for d in drawn) and any((d[:, 0] >= 0).any() for d in drawn)


# Samplers -----------------------------------------------------------------------------------------

@pytest.mark.parametrize('n,world,repeats', [(10, 1, 1), (10, 2, 1), (11, 2, 3), (7, 3, 3), (12, 4, 3)])
def test_repeat_aug_sampler_shards(n, world, repeats):
    shards = [RepeatAugSampler(range(n), world, r, seed=5, num_repeats=repeats) for r in range(world)]
    for s in shards:
        s.set_epoch(3)
    lists = [list(s) for s in shards]
    assert all(len(lst) == len(s) == -(-n // world) for lst, s in zip(lists, shards))
    everything = [i for lst in lists for i in lst]
    assert all(0 <= i < n for i in everything)
    # the ranks' positions together are the first W x ceil(n/W) of the repeated order: runs of
    # `repeats` copies of distinct images, the last run possibly cut short
    total = len(everything)
    from collections import Counter
    expected = [repeats] * (total // repeats) + ([total % repeats] if total % repeats else [])
    assert sorted(Counter(everything).values(), reverse=True) == expected
    if repeats == 1:
        assert set(everything) == set(range(n))  # one pass covers the data set
    if repeats > 1 and world >= repeats:
        # the copies of an image go to different ranks, to be augmented independently
        first = [lst[0] for lst in lists[:repeats]]
        assert len(set(first)) == 1
    assert lists == [list(s) for s in shards]  # same epoch, same order


def test_repeat_aug_sampler_reshuffles_every_epoch_with_one_process():
    s = RepeatAugSampler(range(50), 1, 0, seed=0, num_repeats=1)
    orders = []
    for epoch in range(3):
        s.set_epoch(epoch)
        orders.append(list(s))
    assert len({tuple(o) for o in orders}) == 3 and all(sorted(o) == list(range(50)) for o in orders)
    s2 = RepeatAugSampler(range(50), 1, 0, seed=0, num_repeats=1)
    s2.set_epoch(1)
    assert list(s2) == orders[1]  # a resumed run draws the same order


@pytest.mark.parametrize('n,world,rank,repeats,seed,epoch,shuffle,expected', [
    (11, 2, 1, 3, 5, 3, True, [10, 9, 9, 2, 4, 4]), (7, 3, 0, 3, 5, 3, True, [1, 5, 3]),
    (10, 4, 3, 1, 0, 2, True, [5, 4, 7]), (3, 4, 3, 3, 1, 0, True, [2]), (5, 2, 1, 3, 0, 0, False, [0, 1, 1])])
def test_repeat_aug_sampler_draws_the_indices_of_the_earlier_own_sampler(n, world, rank, repeats, seed, epoch,
                                                                        shuffle, expected):
    """The indices the sampler drew before it became timm's subclass (printed by it), so that a
    checkpoint written mid-epoch then resumes on the same batches."""
    s = RepeatAugSampler(range(n), world, rank, shuffle=shuffle, seed=seed, num_repeats=repeats)
    s.set_epoch(epoch)
    assert list(s) == expected


@pytest.mark.parametrize('n,world', [(61, 2), (357, 2), (10, 3), (2, 4), (0, 2)])
def test_shard_sampler_partitions_without_padding(n, world):
    parts = [list(ShardSampler(range(n), world, r)) for r in range(world)]
    assert sorted(i for p in parts for i in p) == list(range(n))
    assert [len(ShardSampler(range(n), world, r)) for r in range(world)] == [len(p) for p in parts]


def test_sampler_arguments_are_checked():
    with pytest.raises(ValueError):
        RepeatAugSampler(range(4), 2, 2)
    with pytest.raises(ValueError):
        ShardSampler(range(4), 0, 0)


def test_repeat_aug_sampler_start_skips_the_batches_already_done():
    s = RepeatAugSampler(range(30), 2, 1, seed=3, num_repeats=3)
    s.set_epoch(4)
    full = list(s)
    s.set_epoch(4, start=6)
    assert list(s) == full[6:] and len(s) == len(full) - 6
    s.set_epoch(5)
    assert len(s) == len(full) and s.start == 0  # the next epoch starts at its beginning
    with pytest.raises(ValueError):
        s.set_epoch(5, start=len(full) + 1)


def test_unreadable_or_missing_images_become_records_left_out_of_the_batch(tmp_path):
    root = _inat(tmp_path / 'inat18', 2018, with_categories_file=True)
    missing = root / 'train_val2018' / 'Plantae' / '1' / 'train1.jpg'
    missing.unlink()  # listed in train2018.json, not on disk
    train, val, _ = datasets.build_datasets(make_args('--data-set', 'INAT', '--data-path', str(root),
                                                      '--input-size', '16'))
    record = train[1]
    assert isinstance(record, unreadable.UnreadableImage)
    assert (record.path, record.split) == (str(missing), 'train') and record.reason.startswith('FileNotFoundError')
    images, targets, bad = unreadable.collate_skipping_unreadable([train[i] for i in range(4)])
    assert images[0].shape == (3, 3, 16, 16) and targets.tolist() == [0, 2, 2] and bad == [record]  # (uint8, ops)
    assert unreadable.collate_skipping_unreadable([record]) == (None, None, [record])

    folder = tmp_path / 'folder'
    for split in ('train', 'val'):
        (folder / split / 'x').mkdir(parents=True)
        Image.new('RGB', (8, 8)).save(folder / split / 'x' / 'good.png')
        (folder / split / 'x' / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n not an image')
    _, val, _ = datasets.build_datasets(make_args('--data-set', 'FOLDER', '--data-path', str(folder),
                                                  '--input-size', '16'))
    record = val[0]  # bad.png sorts first
    assert isinstance(record, unreadable.UnreadableImage) and record.split == 'val'
    assert record.path == str(folder / 'val' / 'x' / 'bad.png') and 'UnidentifiedImageError' in record.reason
    assert val[1][0].shape == (3, 16, 16)
