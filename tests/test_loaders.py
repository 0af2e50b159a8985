"""Every loader of the training script goes through ``bvit.checkpoint.load_checkpoint`` (the family filter):
``--eval --resume`` (at the checkpoint's size or another), ``--finetune`` (BViT and other timm
models), and what it leaves alone (the classifier, training resumes at another size)."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import released_file_10_classes
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import bvit.models as M
import bvit.checkpoint as C
import train_hp
import resume
import utils

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'fixtures' / 'official_bvit_5m_golden.pt'
TINY = ['--data-set', 'DIGITS', '--input-size', '16', '--stem', 'conv', '--patch-size', '4', '--batch-size', '8',
        '--val-subset', '12', '--num_workers', '0', '--threads', '1', '--print-freq', '1000']


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def _train_style_checkpoint(path: Path, argv, num_classes: int = 10, seed: int = 0):
    """A model built by train_hp.py for ``argv`` and saved as train_hp.py saves (weights + args)."""
    args = train_hp.parse_args(argv)
    args.nb_classes = num_classes
    torch.manual_seed(seed)
    model = train_hp.build_model(args, num_classes).eval()
    torch.save({'format': resume.CHECKPOINT_FORMAT, 'model': model.state_dict(), 'epoch': 0,
                'args': utils.args_to_dict(args)}, path)
    return model


def _padded(table: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([table, table.new_zeros(1, rows - table.shape[1], table.shape[2])], dim=1)


def test_eval_resume_at_the_same_size_gives_the_source_logits_exactly(tmp_path):
    src = _train_style_checkpoint(tmp_path / 'c.pth', TINY)
    args = train_hp.parse_args(TINY + ['--eval', '--resume', str(tmp_path / 'c.pth')])
    model = train_hp.build_model(args, 10).eval()
    C.load_checkpoint(model, args.resume)
    for key, value in src.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x), src(x))


def test_eval_resume_of_a_training_checkpoint_at_a_larger_size(tmp_path):
    """Trained at 16 px (2x2 grid), evaluated at 32 px (4x4 grid) without --finetune: the table is
    timm's resample_abs_pos_embed of the used rows, everything else as saved."""
    src = _train_style_checkpoint(tmp_path / 'c.pth', TINY)
    args = train_hp.parse_args(TINY + ['--eval', '--resume', str(tmp_path / 'c.pth'), '--input-size', '32'])
    resume.adopt_record(C.read_checkpoint(args.resume), args, args.resume, args.given)  # honoured, not refused
    model = train_hp.build_model(args, 10)
    assert model.img_size == (32, 32) and model.grid_size == (4, 4)
    C.load_checkpoint(model, args.resume)
    old = src.pos_embed.detach()
    want = resample_abs_pos_embed(old[:, :5], [4, 4], [2, 2], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), _padded(want, model.pos_embed.shape[1]))
    for key, value in src.state_dict().items():
        if key != 'pos_embed':
            assert torch.equal(model.state_dict()[key], value), key
    stats = train_hp.main(args)
    assert stats['images'] == 12


def test_eval_resume_of_a_released_224_file_at_288(tmp_path):
    """The released float16 file, head cut to 10 classes, evaluated at 288 px: 7x7 -> 9x9 grid;
    top-1 and loss are those of the model built here with the table resampled by timm."""
    from datasets import build_dataset
    path = released_file_10_classes(tmp_path)
    argv = ['--eval', '--resume', str(path), '--data-set', 'DIGITS', '--input-size', '288', '--val-subset', '8',
            '--batch-size', '8', '--num_workers', '0', '--threads', '1']
    stats = train_hp.main(train_hp.parse_args(argv))

    ref = timm.create_model('bvit_5m', num_classes=10, img_size=288).eval()
    want = M.convert_official_state_dict(C.unwrap_state_dict(torch.load(path, weights_only=True)))
    pe = want['pos_embed']
    assert pe.shape[1] == 197 and ref.pos_embed.shape[1] == 325  # rows sized for 224/16 and 288/16 without the stem
    want['pos_embed'] = _padded(resample_abs_pos_embed(pe.float()[:, :50], [9, 9], [7, 7], num_prefix_tokens=1)
                                .to(pe.dtype), 325)
    ref.load_state_dict(want)
    val, _ = build_dataset(False, train_hp.parse_args(argv))
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    assert images.shape[-2:] == (288, 288)
    with torch.no_grad():
        logits = ref(images)
    assert stats['images'] == 8
    assert stats['acc1'] == pytest.approx(100.0 * (logits.argmax(1) == targets).float().mean().item())
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def test_training_resume_at_another_size_is_refused_by_name(tmp_path, capsys):
    _train_style_checkpoint(tmp_path / 'c.pth', TINY)
    rc = train_hp.cli(TINY + ['--resume', str(tmp_path / 'c.pth'), '--input-size', '32', '--epochs', '1'])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and '\n' not in err
    assert 'trained with --input-size 16, but this run has --input-size 32' in err and '--finetune' in err


def test_finetune_bvit_other_size_and_class_count(tmp_path):
    """16 px / 10 classes -> 32 px / 3 classes: the table resampled as checkpoint_filter_fn does
    (timm's resample_abs_pos_embed), a fresh head, every other weight as saved."""
    src = _train_style_checkpoint(tmp_path / 'c.pth', TINY)
    args = train_hp.parse_args(TINY + ['--input-size', '32'])
    torch.manual_seed(1)
    model = train_hp.build_model(args, 3)
    fresh_head = {k: v.clone() for k, v in model.head.state_dict().items()}
    assert C.load_checkpoint(model, str(tmp_path / 'c.pth'), new_head=True) == ['head.weight', 'head.bias']
    want = resample_abs_pos_embed(src.pos_embed.detach()[:, :5], [4, 4], [2, 2], num_prefix_tokens=1)
    assert torch.equal(model.pos_embed.detach(), _padded(want, model.pos_embed.shape[1]))
    for key, value in fresh_head.items():
        assert torch.equal(model.head.state_dict()[key], value)
    for key, value in src.state_dict().items():
        if key not in ('pos_embed', 'head.weight', 'head.bias'):
            assert torch.equal(model.state_dict()[key], value), key
    # the same class count keeps the saved head
    same = train_hp.build_model(train_hp.parse_args(TINY), 10)
    assert C.load_checkpoint(same, str(tmp_path / 'c.pth'), new_head=True) == []
    assert torch.equal(same.head.weight, src.head.weight)


def test_finetune_of_a_timm_vit_resamples_with_timm(tmp_path):
    """Non-BViT timm models load through timm's own family filter (vision_transformer's
    checkpoint_filter_fn: resample_abs_pos_embed of a square grid)."""
    torch.manual_seed(0)
    big = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=64)  # 4x4 grid
    torch.save({'model': big.state_dict()}, tmp_path / 'vit.pth')
    small = timm.create_model('vit_tiny_patch16_224', num_classes=5, img_size=32)  # 2x2 grid
    assert C.load_checkpoint(small, str(tmp_path / 'vit.pth'), new_head=True) == ['head.weight', 'head.bias']
    want = resample_abs_pos_embed(big.pos_embed.detach(), [2, 2], num_prefix_tokens=1)
    assert torch.equal(small.pos_embed.detach(), want)
    assert torch.equal(small.blocks[0].attn.qkv.weight, big.blocks[0].attn.qkv.weight)
    from timm.models import vision_transformer
    assert C.family_filter(small) is vision_transformer.checkpoint_filter_fn  # timm's own filter did it


def test_no_copy_of_the_adaptation_is_left():
    for name in ('bvit_grid', 'checkpoint_bvit_grid'):
        assert not hasattr(utils, name)
    import bvit.visualize as V
    assert not hasattr(V, '_fit_pos_embed')
