"""``--pipeline fast`` (pipeline.py) against DeiT's pipeline (timm's create_transform): the same
distributions of every random parameter (two-sample tests, fixed seeds), the same pixels for
RandAugment's point operations, close ones for its affine operations, and --benchmark-data."""
from __future__ import annotations

import random
from collections import Counter
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from timm.data import auto_augment, create_transform
from timm.data.random_erasing import RandomErasing
from torchvision.transforms.v2 import functional as TF

import datasets
import pipeline
from tests.train_helpers import run_cli

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
AA = 'rand-m9-mstd0.5-inc1'
ALPHA = 1e-3  # two-sample tests: a p-value under this fails (fixed seeds, so a pass stays a pass)


def _photo(size: int = 224) -> Image.Image:
    from sklearn.datasets import load_sample_image
    return Image.fromarray(load_sample_image('china.jpg')).resize((size, size), Image.BICUBIC)


def _ramp(w: int = 256, h: int = 192) -> Image.Image:
    """R = column, G = row, B = 0: a crop's box and flips can be read back from its pixels."""
    x = np.zeros((h, w, 3), np.uint8)
    x[..., 0] = np.arange(w)[None, :] * 255 // (w - 1)
    x[..., 1] = np.arange(h)[:, None] * 255 // (h - 1)
    return Image.fromarray(x)


# RandAugment's operations: pixels ------------------------------------------------------------------

POINT = [('auto_contrast', auto_augment.auto_contrast, None), ('equalize', auto_augment.equalize, None),
         ('invert', auto_augment.invert, None), ('posterize', datasets._posterize_compat, 3),
         ('posterize', datasets._posterize_compat, 0), ('solarize', auto_augment.solarize, 100),
         ('solarize_add', auto_augment.solarize_add, 60), ('color', auto_augment.color, 1.7),
         ('color', auto_augment.color, 0.3), ('contrast', auto_augment.contrast, 1.6),
         ('contrast', auto_augment.contrast, 0.4), ('brightness', auto_augment.brightness, 1.5),
         ('sharpness', auto_augment.sharpness, 1.8), ('sharpness', auto_augment.sharpness, 0.2)]
AFFINE = [('rotate', auto_augment.rotate, 25.), ('rotate', auto_augment.rotate, -13.),
          ('shear_x', auto_augment.shear_x, 0.25), ('shear_y', auto_augment.shear_y, -0.2),
          ('translate_x_rel', auto_augment.translate_x_rel, 0.3), ('translate_y_rel', auto_augment.translate_y_rel, -0.4),
          ('translate_x_abs', auto_augment.translate_x_abs, 40.)]
FILL = (124, 116, 104)


def _both(name, fn, arg, bilinear=False):
    img = _photo()
    resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
    ref = TF.pil_to_tensor(fn(img, *(() if arg is None else (arg,)), fillcolor=FILL, resample=resample)).int()
    ops = torch.tensor([[[pipeline.OPS.index(name), arg or 0., float(bilinear)]]], dtype=torch.float64)
    dev = pipeline.DeviceAugment(MEAN, STD, 0., 'pixel', 1, torch.device('cpu'))
    return dev.augment(TF.pil_to_tensor(img).unsqueeze(0), ops)[0].int(), ref


@pytest.mark.parametrize('name,fn,arg', POINT, ids=[f'{n}-{a}' for n, _, a in POINT])
def test_point_operations_give_pils_pixels(name, fn, arg):
    out, ref = _both(name, fn, arg)
    assert torch.equal(out, ref)


@pytest.mark.parametrize('name,fn,arg', AFFINE, ids=[f'{n}-{a}' for n, _, a in AFFINE])
@pytest.mark.parametrize('bilinear', [False, True], ids=['bicubic', 'bilinear'])
def test_affine_operations_are_close_to_pils(name, fn, arg, bilinear):
    """Same geometry and fill; bicubic differs in its kernel (a = -0.75 against PIL's -0.5)."""
    out, ref = _both(name, fn, arg, bilinear)
    diff = (out - ref).abs().float()
    assert diff.mean() < 1.0 and (diff > 16).float().mean() < 1e-3
    filled = (ref == torch.tensor(FILL).view(3, 1, 1)).all(0)
    assert filled.float().mean() > 0.03  # the operation moved the image, PIL filled the rest ...
    agree = (out == torch.tensor(FILL).view(3, 1, 1)).all(0)
    assert (agree & filled).sum() >= 0.98 * filled.sum()  # ... and so did we


def test_unknown_operations_and_augmentations_are_refused_in_one_line():
    with pytest.raises(pipeline.UnsupportedAugmentation, match='--pipeline deit'):
        pipeline.rand_augment('rand-m9-n2-mstd0.5-inc1-t3a', 224, MEAN, 'bicubic')  # 3a: blur, desaturate...
    args = train_args('--ThreeAugment')
    assert 'ThreeAugment' in pipeline.unsupported(args)
    assert 'augmix' in pipeline.unsupported(train_args('--aa', 'augmix-m5'))
    assert pipeline.unsupported(train_args('--aa', 'none', '--train-interpolation', 'random')) is None


def train_args(*flags: str):
    import train_hp
    return train_hp.parse_args(['--data-set', 'DIGITS', *flags])


# Random parameters: the same distributions ---------------------------------------------------------

def _box_of(x: torch.Tensor, w: int = 256, h: int = 192) -> Tuple[float, float, bool]:
    """(area fraction, log aspect ratio, flipped) of a crop of :func:`_ramp`, read from its pixels."""
    r, g = x[0].float(), x[1].float()
    cols = r[r.shape[0] // 2] * (w - 1) / 255
    rows = g[:, g.shape[1] // 2] * (h - 1) / 255
    width = (cols.max() - cols.min()).item() + 1
    height = (rows.max() - rows.min()).item() + 1
    return width * height / (w * h), float(np.log(width / height)), bool(cols[0] > cols[-1])


def test_crops_and_flips_follow_deits_distribution():
    n = 600
    ramp = _ramp()
    random.seed(0), torch.manual_seed(0)
    deit = create_transform(64, is_training=True, interpolation='bicubic', hflip=0.5, color_jitter=0, re_prob=0,
                            mean=MEAN, std=STD, use_prefetcher=True)  # uint8 out: crop, flip, nothing else
    ours = pipeline.WorkerTransform(64, (0.08, 1.0), (3 / 4, 4 / 3), 'bicubic', 0.5, 0., None, MEAN)
    a = [_box_of(deit(ramp)) for _ in range(n)]
    b = [_box_of(ours(ramp)[0]) for _ in range(n)]
    for k in (0, 1):  # area fraction, aspect ratio
        assert stats.ks_2samp([s[k] for s in a], [s[k] for s in b]).pvalue > ALPHA
    assert min(s[0] for s in b) > 0.05 and max(s[0] for s in b) <= 1.0
    flips = [[sum(s[2] for s in a), n - sum(s[2] for s in a)], [sum(s[2] for s in b), n - sum(s[2] for s in b)]]
    assert stats.chi2_contingency(flips).pvalue > ALPHA
    assert abs(flips[1][0] / n - 0.5) < 0.07


def _timm_draws(n: int) -> List[List[Tuple[str, float]]]:
    """The operations timm's own RandAugment (from create_transform, as DeiT's pipeline builds it)
    applies to n images, recorded around its functions while they run."""
    deit = create_transform(224, is_training=True, auto_augment=AA, interpolation='bicubic', mean=MEAN, std=STD,
                            use_prefetcher=True)
    ra = [t for t in deit.transforms if isinstance(t, auto_augment.RandAugment)][0]
    drawn: List[Tuple[str, float]] = []
    for op in ra.ops:
        def wrapped(img, *level, _fn=op.aug_fn, _name=op.aug_fn.__name__, **kw):
            drawn.append((pipeline._OP_OF_FUNCTION.get(_name, _name), float(level[0]) if level else 0.))
            return _fn(img, *level, **kw)
        op.aug_fn = wrapped
    img = _photo(32)
    out = []
    for _ in range(n):
        drawn.clear()
        ra(img)
        out.append(list(drawn))
    return out


def test_rand_augment_draws_follow_timms_distribution():
    datasets._fix_timm_posterize()
    n = 1500
    random.seed(1), np.random.seed(1)
    theirs = _timm_draws(n)
    ours_t = pipeline.WorkerTransform(16, (1., 1.), (1., 1.), 'bicubic', 0., 0., AA, MEAN)
    img = _photo(16)
    ours = [[(pipeline.OPS[int(c)], a) for c, a, _ in ours_t(img)[1].tolist() if c >= 0] for _ in range(n)]
    # how many operations an image gets (0, 1, 2), and which
    counts = [Counter(len(d) for d in theirs), Counter(len(d) for d in ours)]
    table = [[c[k] for k in (0, 1, 2)] for c in counts]
    assert stats.chi2_contingency(table).pvalue > ALPHA
    names = sorted({name for d in theirs for name, _ in d})
    assert set(names) == {name for d in ours for name, _ in d} and len(names) == 15
    by_name = [Counter(name for d in side for name, _ in d) for side in (theirs, ours)]
    assert stats.chi2_contingency([[c[k] for k in names] for c in by_name]).pvalue > ALPHA
    # each operation's argument (magnitude, sign)
    for name in names:
        x = [a for d in theirs for k, a in d if k == name]
        y = [a for d in ours for k, a in d if k == name]
        if len(set(x)) > 1:
            assert stats.ks_2samp(x, y).pvalue > ALPHA, name
        else:
            assert set(x) == set(y), name
    # the magnitude: N(9, 0.5) clipped to [0, 10], as timm draws it; rotate takes 30 degrees at 10
    rot = np.abs([a for d in ours for k, a in d if k == 'rotate'])
    assert abs(rot.mean() - 27.) < 0.3 and abs(rot.std() - 1.5) < 0.2


def test_random_erasing_is_timms_applied_to_the_batch():
    n = 400
    ones = torch.zeros(n, 3, 32, 32)
    torch.manual_seed(0), random.seed(0)
    dev = pipeline.DeviceAugment(MEAN, STD, 0.25, 'pixel', 1, torch.device('cpu'))
    gray = (torch.tensor(MEAN).view(1, 3, 1, 1) * 255).round().to(torch.uint8).expand(n, 3, 32, 32).contiguous()
    ours = dev([gray, torch.zeros(n, 0, 3)])
    plain = (gray.float() - dev.mean) / dev.std
    erased_ours = (ours != plain).flatten(1).float().mean(1)
    cpu = RandomErasing(0.25, mode='pixel', max_count=1, device='cpu')
    erased_deit = torch.stack([(cpu(ones[i].clone()) != 0).flatten().float().mean() for i in range(n)])
    hit = [int((erased_deit > 0).sum()), int((erased_ours > 0).sum())]
    assert stats.chi2_contingency([[h, n - h] for h in hit]).pvalue > ALPHA and abs(hit[1] / n - 0.25) < 0.07
    assert stats.ks_2samp(erased_deit[erased_deit > 0], erased_ours[erased_ours > 0]).pvalue > ALPHA


# Decoding, the data sets, --benchmark-data ---------------------------------------------------------

def _folder(root, n: int = 12) -> None:
    img = _photo(96)
    for split in ('train', 'val'):
        for c in range(2):
            d = root / split / f'c{c}'
            d.mkdir(parents=True)
            for i in range(n // 2):
                img.rotate(15 * i).save(d / f'{i}.{"png" if i == 1 else "jpg"}')


def test_worker_transform_decodes_files_like_pil(tmp_path):
    _folder(tmp_path)
    for name in ('0.jpg', '1.png'):
        path = tmp_path / 'train' / 'c0' / name
        ours = pipeline.decode(pipeline.read_bytes(str(path)))
        ref = TF.pil_to_tensor(Image.open(path).convert('RGB'))
        assert ours.shape == ref.shape and (ours.int() - ref.int()).abs().max() <= 2  # libjpeg-turbo's IDCT vs PIL's
    (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 not a jpeg')
    with pytest.raises(OSError):
        pipeline.decode(pipeline.read_bytes(str(tmp_path / 'bad.jpg')))


def test_folder_training_split_gives_uint8_crops_and_drawn_operations(tmp_path):
    _folder(tmp_path)
    args = train_args('--data-set', 'FOLDER', '--data-path', str(tmp_path), '--input-size', '32')
    train, val, classes = datasets.build_datasets(args)
    (x, ops), y = train[0]
    assert x.dtype == torch.uint8 and x.shape == (3, 32, 32) and ops.shape == (2, 3) and y == 0
    assert val[0][0].dtype == torch.float32 and val[0][0].shape == (3, 32, 32)  # evaluation: unchanged


@pytest.mark.parametrize('which', pipeline.PIPELINES)
def test_benchmark_data_prints_the_loader_rate_last(tmp_path, capsys, which):
    _folder(tmp_path)
    code, out, err = run_cli(['--data-set', 'FOLDER', '--data-path', str(tmp_path), '--input-size', '32',
                              '--batch-size', '4', '--num_workers', '0', '--device', 'cpu', '--benchmark-data', '20',
                              '--pipeline', which], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[-1].startswith('data: ') and ' images/s per core ' in lines[-1] and f'pipeline {which}' in lines[-1]
    assert 'no workers' in lines[-1] and '20 images of 32 px' in lines[-1]
    assert lines[-2].startswith('device steps (')
    assert float(lines[-1].split()[1]) > 0
