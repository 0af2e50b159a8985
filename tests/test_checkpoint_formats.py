"""Checkpoints as released training scripts write them load everywhere a checkpoint is read, still
with ``torch.load(weights_only=True)``: BViT's released ``train_hp.py`` and DeiT's ``main.py``
(``model``, ``optimizer``, ``lr_scheduler``, ``epoch``, ``model_ema``, ``scaler``, ``args``) and
timm's ``CheckpointSaver`` (``state_dict``, ``state_dict_ema``, ``optimizer``, ``amp_scaler``,
``arch``, ``version``, ``metric``, ``saver``, ``args``), whose ``args`` is the run's
``argparse.Namespace``. The files are written here, shaped as each script writes them. A file with
any other pickled object is refused in one line, without running its pickle."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch
from timm.scheduler import CosineLRScheduler

import bvit.models as M
import bvit.checkpoint as C
import train_hp
import utils

TINY = ['--data-set', 'DIGITS', '--input-size', '16', '--stem', 'conv', '--patch-size', '4', '--batch-size', '8',
        '--val-subset', '12', '--num_workers', '0', '--threads', '1', '--print-freq', '1000']
KINDS = ('bvit_release', 'deit_main', 'timm_saver')

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py

CALLS = []


def record_call(*args):
    """What the refused file's pickle would call: it must never run."""
    CALLS.append(args)
    return args


class Payload:
    def __reduce__(self):
        return (record_call, ('unpickled',))


def _training_state(model: torch.nn.Module):
    """(optimizer, lr scheduler, grad scaler) state dicts after one AdamW step, as a run saves them."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    opt.step()
    sched = CosineLRScheduler(opt, t_initial=300, lr_min=1e-5, warmup_t=5, warmup_lr_init=1e-6)
    sched.step(1)
    scaler = torch.amp.GradScaler('cpu', init_scale=2. ** 16)
    return opt.state_dict(), sched.state_dict(), scaler.state_dict()


def release_file(kind: str, path: Path, model: torch.nn.Module, ema: torch.nn.Module) -> Path:
    """``model``/``ema`` saved as ``kind`` writes checkpoints; ``args`` an argparse.Namespace."""
    opt, sched, scaler = _training_state(model)
    if kind == 'timm_saver':  # timm.utils.CheckpointSaver._save
        args = argparse.Namespace(model='bvit_5m', lr=5e-4, weight_decay=0.05, img_size=224, mean=None,
                                  scale=[0.08, 1.0], model_ema=True, device='cuda:0', prefetcher=True)
        obj = {'epoch': 299, 'arch': args.model, 'optimizer': opt, 'version': 2, 'args': args,
               'amp_scaler': scaler, 'state_dict': model.state_dict(), 'state_dict_ema': ema.state_dict(),
               'metric': 81.5, 'saver': {'checkpoint_files': [('checkpoint-299.pth.tar', 81.5)], 'best_epoch': 299,
                                         'best_metric': 81.5, 'pending': (299, 81.5)}}
    else:  # DeiT main.py; BViT's released train_hp.py writes the same keys
        name = 'BViT-5' if kind == 'bvit_release' else 'deit_tiny_patch16_224'
        args = argparse.Namespace(arch=name, model=name, batch_size=256, epochs=300, input_size=224, lr=5e-4,
                                  opt_betas=None, color_jitter=0.4, model_ema=True, device='cuda', dist_url='env://')
        obj = {'model': model.state_dict(), 'optimizer': opt, 'lr_scheduler': sched, 'epoch': 299,
               'model_ema': ema.state_dict(), 'scaler': scaler, 'args': args}
    torch.save(obj, path)
    return path


def _pair():
    """A tiny BViT (train_hp.py's TINY settings) and a different 'EMA' of it."""
    args = train_hp.parse_args(TINY)
    torch.manual_seed(0)
    model = train_hp.build_model(args, 10)
    torch.manual_seed(1)
    ema = train_hp.build_model(args, 10)
    return model, ema


def _weights_equal(model, ref) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[k], v) for k, v in ref.state_dict().items())


@pytest.mark.parametrize('kind', KINDS)
def test_release_files_load_in_python(tmp_path, kind):
    model, ema = _pair()
    path = release_file(kind, tmp_path / f'{kind}.pth', model, ema)
    obj = C.read_checkpoint(path)
    assert isinstance(obj['args'], argparse.Namespace) and obj['args'].lr == 5e-4
    fresh = lambda: train_hp.build_model(train_hp.parse_args(TINY), 10)  # noqa: E731
    for use_ema, want in ((False, model), (True, ema)):
        target = fresh()
        C.load_checkpoint(target, path, use_ema=use_ema)
        assert _weights_equal(target, want)
    # timm's pretrained path (its load_state_dict prefers the EMA weights when a file has them)
    pre = timm.create_model('bvit_5m', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10),
                            num_classes=10, img_size=16, patch_size=4)
    assert _weights_equal(pre, ema)


@pytest.mark.parametrize('kind', ['bvit_release', 'timm_saver'])
def test_release_files_in_train_hp_eval_resume_and_finetune(tmp_path, kind):
    model, ema = _pair()
    path = str(release_file(kind, tmp_path / f'{kind}.pth', model, ema))
    bare = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), bare)
    stats = train_hp.main(train_hp.parse_args(TINY + ['--eval', '--resume', path]))
    want = train_hp.main(train_hp.parse_args(TINY + ['--eval', '--resume', str(bare)]))
    assert stats['images'] == 12 and stats['loss'] == want['loss'] and stats['acc1'] == want['acc1']
    target = train_hp.build_model(train_hp.parse_args(TINY), 10)
    assert C.load_checkpoint(target, path, new_head=True) == []
    assert _weights_equal(target, model)


def test_export_of_a_release_file(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    from bvit import export as E
    model, ema = _pair()
    path = release_file('deit_main', tmp_path / 'release.pth', model, ema)
    assert E.main([str(path), str(tmp_path / 'out')]) == 0
    assert 'exported bvit_5m (10 classes, 3x16x16 input)' in capsys.readouterr().out
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert _weights_equal(reloaded, model)


def test_any_other_pickled_object_is_refused_without_unpickling(tmp_path, capsys):
    model, _ = _pair()
    bad = tmp_path / 'bad.pth'
    torch.save({'model': model.state_dict(), 'args': argparse.Namespace(lr=1e-3), 'extra': Payload()}, bad)
    CALLS.clear()
    with pytest.raises(ValueError) as info:
        C.read_checkpoint(bad)
    msg = str(info.value)
    assert '\n' not in msg and 'refusing to load it' in msg
    assert f'({__name__}.record_call)' in msg  # named, the allowed Namespace not
    assert train_hp.cli(TINY + ['--eval', '--resume', str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'refusing to load it' in err
    from bvit import export as E
    assert E.main([str(bad), str(tmp_path / 'out')]) == 2
    assert not (tmp_path / 'out').exists()
    assert CALLS == []
