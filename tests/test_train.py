"""Tests of the training stack (train_hp.py, engine.py, losses.py, utils.py, preemption.py): tiny DIGITS runs on
CPU, in-process where possible, and as real processes for the launchers (torchrun with 2
processes, the legacy torch.distributed.launch, plain python)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import released_file_10_classes
import torch
import torch.nn.functional as F
from torch import nn

import preemption
import train_hp
import config
import engine
import resume
import utils
from engine import evaluate, train_one_epoch
from losses import DistillationLoss, build_base_criterion
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import NativeScaler

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'fixtures' / 'official_bvit_5m_golden.pt'

# A BViT-5M on 16x16 digits (conv stem -> 8x8 -> 2x2 grid of 4x4 patches), 4 steps per epoch,
# 61 validation images (odd on purpose). Mixup, cutmix, repeated augmentation and EMA stay on.
TINY = ['--data-set', 'DIGITS', '--input-size', '16', '--stem', 'conv', '--patch-size', '4',
        '--batch-size', '32', '--train-subset', '128', '--val-subset', '61', '--num_workers', '0',
        '--threads', '1', '--print-freq', '1000', '--unscale-lr', '--aa', 'none', '--reprob', '0',
        '--hflip', '0', '--warmup-epochs', '1', '--model-ema-decay', '0.9']

# DeiT's evaluation line, with the rank tag of --log-all-ranks and this script's EMA line
SUMMARY = re.compile(r'^(?:\[rank (\d+)\] )?\* (EMA )?Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)  \(\d+ images\)$', re.M)


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def run_cli(argv: List[str], capsys) -> Tuple[int, str, str]:
    capsys.readouterr()
    rc = train_hp.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_log(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def clean_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def run_process(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=clean_env(), capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cosine_lr(epoch: int, lr: float, warmup_lr: float, warmup: int, min_lr: float, epochs: int) -> float:
    """The schedule, written out: linear warm-up from warmup_lr, then cosine from lr to min_lr."""
    if epoch < warmup:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


@pytest.fixture(scope='module')
def trained(tmp_path_factory) -> Path:
    """One finished 1-epoch tiny run; tests copy from it and never change it."""
    out = tmp_path_factory.mktemp('trained')
    n = torch.get_num_threads()
    try:
        assert train_hp.cli(TINY + ['--epochs', '1', '--output_dir', str(out)]) == 0  # TINY: --threads 1
    finally:
        torch.set_num_threads(n)
    return out


# Flags and configs --------------------------------------------------------------------------------

DEIT_FLAGS = [
    '--batch-size', '--epochs', '--model', '--input-size', '--drop', '--drop-path', '--model-ema', '--no-model-ema',
    '--model-ema-decay', '--model-ema-force-cpu', '--opt', '--opt-eps', '--opt-betas', '--clip-grad', '--momentum',
    '--weight-decay', '--sched', '--lr', '--lr-noise', '--lr-noise-pct', '--lr-noise-std', '--warmup-lr', '--min-lr',
    '--decay-epochs', '--warmup-epochs', '--cooldown-epochs', '--patience-epochs', '--decay-rate', '--dr',
    '--color-jitter', '--aa', '--smoothing', '--train-interpolation', '--repeated-aug', '--no-repeated-aug',
    '--reprob', '--remode', '--recount', '--resplit', '--mixup', '--cutmix', '--cutmix-minmax', '--mixup-prob',
    '--mixup-switch-prob', '--mixup-mode', '--teacher-model', '--teacher-path', '--distillation-type',
    '--distillation-alpha', '--distillation-tau', '--finetune', '--data-path', '--data-set', '--inat-category',
    '--output_dir', '--device', '--seed', '--resume', '--start_epoch', '--eval', '--dist-eval', '--num_workers',
    '--pin-mem', '--no-pin-mem', '--world_size', '--dist_url', '--bce-loss', '--unscale-lr', '--train-mode',
    '--no-train-mode', '--ThreeAugment', '--src', '--eval-crop-ratio', '--attn-only',
    # the released BViT command line and the launchers
    '--arch', '--local-rank', '--local_rank',
]


def test_every_deit_flag_exists_and_every_flag_is_documented():
    parser = train_hp.get_args_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    assert not [f for f in DEIT_FLAGS if f not in options]
    undocumented = [a.option_strings for a in parser._actions if a.option_strings and not (a.help or '').strip()]
    assert not undocumented
    text = parser.format_help()
    for flag in ('--broad', '--no-broad', '--broad-scale', '--stem', '--patch-size', '--amp-dtype', '--config',
                 '--deterministic', '--train-subset', '--val-subset', '--download', '--threads', '--decay-milestones',
                 '--max-bad-images'):
        assert flag in text
    assert '3 stopped by SIGTERM or SIGINT' in ' '.join(text.split())  # the exit status of a preempted run


def test_readme_command_parses_with_deit_spellings():
    args = train_hp.parse_args(['--arch', 'BViT-5', '--batch-size', '256', '--data-path', '/x', '--output_dir', '/y',
                                '--local_rank=3', '--num_workers', '4', '--no-model-ema', '--dr', '0.5'])
    assert (args.arch, args.batch_size, args.data_path, args.output_dir) == ('BViT-5', 256, '/x', '/y')
    assert args.local_rank == 3 and args.num_workers == 4 and args.model_ema is False and args.decay_rate == 0.5
    assert train_hp.parse_args(['--local-rank=1', '--model', 'bvit_22m']).local_rank == 1
    # timm train.py's spelling: the flag alone is inductor, off by default
    assert train_hp.parse_args([]).torchcompile is None
    assert train_hp.parse_args(['--torchcompile']).torchcompile == 'inductor'
    assert train_hp.parse_args(['--torchcompile', 'aot_eager', '--torchcompile-mode', 'max-autotune']).torchcompile_mode \
        == 'max-autotune'


def test_config_gives_defaults_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / 'c.yaml'
    cfg.write_text('lr: 1e-3\nepochs: 7\nmodel-ema: false\nno_repeated_aug: true\nscale: [0.5, 1]\n'
                   'data_set: DIGITS\nclip-grad: none\nopt-betas: [0.9, 0.95]\n')
    args = train_hp.parse_args(['--config', str(cfg), '--lr', '0.25', '--epochs', '9'])
    assert args.lr == 0.25 and args.epochs == 9                 # command line wins
    assert args.model_ema is False and args.repeated_aug is False  # booleans by dest or by flag name
    assert args.scale == [0.5, 1.0] and args.data_set == 'DIGITS' and args.clip_grad is None
    assert args.opt_betas == [0.9, 0.95]
    assert train_hp.parse_args(['--config', str(cfg)]).lr == 1e-3  # YAML's '1e-3' string -> float
    assert train_hp.parse_args(['--config', str(cfg), '--model-ema']).model_ema is True


def test_config_values_are_checked_and_converted_like_the_command_line(tmp_path):
    def load(text):
        return config.load_config(train_hp.get_args_parser(), str(_write(tmp_path / 'c.yaml', text)))

    assert load('no-tf32: true\nno_model_ema: false\nmodel: BViT-22\ndr: 0.5\nepochs: 7\n') == dict(
        tf32=False, model_ema=True, arch='BViT-22', decay_rate=0.5, epochs=7)  # flag names, aliases, types
    assert load('tf32: false\nopt-betas: 0.9\ntrain-subset: null\nlr: 1e-3\n') == dict(
        tf32=False, opt_betas=[0.9], train_subset=None, lr=1e-3)  # a destination; one value of a list flag
    assert load('# nothing\n') == {}
    for text, message in (('epochs: true', 'epochs must be a number, got True'),
                          ('scale: [1]', 'scale needs 2 values, got 1'),
                          ('amp-dtype: fp32', "amp-dtype must be one of fp16, bf16, got 'fp32'"),
                          ('eval: 1', 'eval must be true or false, got 1'),
                          ('lr: [1, 2]', 'lr takes one value, got [1, 2]'),
                          ('help: true', "unknown key 'help'"),
                          ('batch_sise: 8', "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
                          ('- 1', 'expected a mapping')):
        with pytest.raises(utils.UsageError, match=re.escape(message)):
            load(text)


def test_shipped_configs_hold_the_paper_recipe():
    for path in sorted((REPO / 'configs').glob('*.yaml')):
        train_hp.parse_args(['--config', str(path)])
    for name, arch in (('bvit_5m_imagenet.yaml', 'BViT-5'), ('bvit_22m_imagenet.yaml', 'BViT-22')):
        a = train_hp.parse_args(['--config', str(REPO / 'configs' / name)])
        assert a.arch == arch and a.data_set == 'IMNET' and a.epochs == 300 and a.input_size == 224
        assert (a.opt, a.lr, a.unscale_lr, a.weight_decay, a.opt_eps) == ('adamw', 1e-3, False, 0.05, 1e-6)
        assert (a.sched, a.warmup_epochs, a.min_lr) == ('cosine', 5, 1e-5)
        assert (a.aa, a.mixup, a.cutmix, a.smoothing, a.reprob) == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.1, 0.25)
        assert a.repeated_aug and a.model_ema and a.clip_grad == 1.0
    cifar = train_hp.parse_args(['--config', str(REPO / 'configs' / 'bvit_finetune_cifar.yaml')])
    assert cifar.data_set == 'CIFAR10'
    demo = train_hp.parse_args(['--config', str(REPO / 'configs' / 'demo_digits.yaml')])
    assert demo.data_set == 'DIGITS' and demo.arch == 'BViT-5'


# Bad input: one line on stderr, exit 2, nothing written ---------------------------------------------

class _Killed(Exception):
    pass


def _bad_cases(tmp: Path, trained: Path) -> Dict[str, Tuple[List[str], str]]:
    (tmp / 'empty').mkdir()
    text = tmp / 'notes.txt'
    text.write_text('not a checkpoint')
    raw = (trained / 'checkpoint.pth').read_bytes()
    truncated = tmp / 'truncated.pth'
    truncated.write_bytes(raw[:len(raw) // 2])
    other = tmp / 'other_model.pth'
    import timm
    import bvit.models  # noqa: F401
    torch.save({'model': timm.create_model('bvit_22m', num_classes=10, img_size=16, patch_size=4).state_dict()}, other)
    pickled = tmp / 'pickled_object.pth'
    torch.save({'model': _Killed()}, pickled)  # arbitrary pickled objects: refused, never unpickled
    bad_yaml = tmp / 'bad.yaml'
    bad_yaml.write_text('lr: 1e-3\nlearning_rate: 0.1\n')
    ckpt = str(trained / 'checkpoint.pth')
    return {
        'no data path': (['--data-set', 'IMNET'], '--data-path is required'),
        'missing data path': (['--data-set', 'IMNET', '--data-path', tmp / 'nowhere'], 'does not exist'),
        'empty data path': (['--data-set', 'IMNET', '--data-path', tmp / 'empty'], 'is empty'),
        'unknown arch': (TINY + ['--arch', 'BViT-7'], 'unknown --arch'),
        'unknown data set': (['--data-set', 'MNIST', '--data-path', tmp], 'unknown --data-set'),
        'resume missing file': (TINY + ['--resume', tmp / 'none.pth'], 'not found'),
        'resume truncated file': (TINY + ['--resume', truncated], 'not a readable PyTorch checkpoint'),
        'resume text file': (TINY + ['--resume', text], 'not a readable PyTorch checkpoint'),
        'resume pickled object': (TINY + ['--resume', pickled], 'refusing to load it'),
        'eval truncated file': (TINY + ['--eval', '--resume', truncated], 'not a readable PyTorch checkpoint'),
        # a file without a record: its model read off the weights (bvit_22m), the --arch given honoured
        'checkpoint of another model': (TINY + ['--arch', 'BViT-5', '--eval', '--resume', other], 'does not fit'),
        'resume of another model': (TINY + ['--arch', 'BViT-5', '--resume', other],
                                    'was trained with --arch bvit_22m, but this run has --arch bvit_5m'),
        'checkpoint with broad': (TINY + ['--resume', ckpt, '--no-broad'], 'was trained with broad attention, but '
                                  'this run has no broad attention; leave the flag out'),
        'checkpoint of another scale': (TINY + ['--resume', ckpt, '--broad-scale', '0.2'],
                                        'was trained with --broad-scale 0.4, but this run has --broad-scale 0.2'),
        'checkpoint of another arch': (TINY + ['--resume', ckpt, '--arch', 'BViT-22'],
                                       'was trained with --arch bvit_5m, but this run has --arch bvit_22m'),
        'yaml unknown key': (['--config', bad_yaml], "unknown key 'learning_rate'"),
        'yaml missing': (['--config', tmp / 'nope.yaml'], 'file not found'),
        'yaml bad value': (['--config', _write(tmp / 'v.yaml', 'epochs: many\n')], 'invalid value'),
        'stem on a cnn': (TINY + ['--arch', 'resnet18', '--patch-size', '0'], '--stem applies'),
        'resume with another lr': (TINY + ['--resume', ckpt, '--lr', '5e-4'],
                                   'was trained with --lr 0.001, this run has --lr 0.0005: --resume continues'),
        'resume with another schedule': (TINY + ['--resume', ckpt, '--sched', 'step'], 'resume with --sched cosine'),
        'resume with another min lr': (TINY + ['--resume', ckpt, '--min-lr', '0'], '--min-lr 1e-05'),
        'unknown compile backend': (TINY + ['--torchcompile', 'nonsense'], '--torchcompile nonsense: not a torch.compile '
                                    'backend here; one of'),
        'compile mode alone': (TINY + ['--torchcompile-mode', 'max-autotune'], '--torchcompile-mode goes with'),
        'cuda forced without cuda': (TINY + ['--device', 'cuda'], 'CUDA') if not torch.cuda.is_available()
        else (TINY + ['--device', 'tpu'], '--device'),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_bad_inputs_give_one_line_and_exit_2_without_writing(tmp_path, trained, capsys):
    before = {p: p.read_bytes() for p in trained.iterdir()}
    for name, (argv, expected) in _bad_cases(tmp_path, trained).items():
        out_dir = tmp_path / f'out_{name.replace(" ", "_")}'
        rc, _, err = run_cli(list(argv) + ['--output_dir', out_dir], capsys)
        lines = err.strip().splitlines()
        assert rc == 2, (name, err)
        assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], (name, err)
        assert 'Traceback' not in err
        assert not out_dir.exists(), name
    assert before == {p: p.read_bytes() for p in trained.iterdir()}


def test_bad_input_as_a_real_process(tmp_path):
    r = run_process([sys.executable, 'train_hp.py', '--data-set', 'FOLDER', '--data-path', tmp_path / 'missing'])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f'error: --data-path {tmp_path / "missing"} does not exist or is not a folder']
    r = run_process([sys.executable, 'train_hp.py', '--arch', 'nonsense_net', '--data-set', 'DIGITS'])
    assert r.returncode == 2 and 'Traceback' not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and 'BViT-5' in r.stderr and 'BViT-22' in r.stderr


def test_existing_checkpoint_is_not_overwritten_by_a_new_run(tmp_path, trained, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'checkpoint.pth').write_bytes((trained / 'checkpoint.pth').read_bytes())
    rc, _, err = run_cli(TINY + ['--epochs', '1', '--output_dir', out], capsys)
    assert rc == 2 and '--resume' in err
    assert (out / 'checkpoint.pth').read_bytes() == (trained / 'checkpoint.pth').read_bytes()


# Checkpoints ---------------------------------------------------------------------------------------

def test_checkpoint_is_plain_data_and_written_atomically(tmp_path, trained, monkeypatch):
    obj = torch.load(trained / 'checkpoint.pth', weights_only=True)
    assert {'model', 'optimizer', 'lr_scheduler', 'scaler', 'model_ema', 'epoch', 'args'} <= set(obj)
    assert obj['epoch'] == 0 and obj['model_ema'] is not None and obj['scaler'] is None  # CPU: no scaler
    assert obj['args']['arch'] == 'BViT-5' and obj['args']['input_size'] == 16
    assert torch.load(trained / 'best.pth', weights_only=True)['epoch'] == 0
    assert len(read_log(trained / 'log.txt')) == 1

    target = tmp_path / 'checkpoint.pth'
    resume.atomic_save({'a': torch.ones(3)}, str(target))
    good = target.read_bytes()
    real_save = torch.save

    def dies_mid_write(obj, f, *a, **k):
        f.write(b'partial bytes')
        raise KeyboardInterrupt  # the run is killed while writing

    monkeypatch.setattr(torch, 'save', dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        resume.atomic_save({'a': torch.zeros(3)}, str(target))
    monkeypatch.setattr(torch, 'save', real_save)
    assert target.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']


def _states_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_states_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_states_equal(x, y) for x, y in zip(a, b))
    return a == b


def _training_objects(args, seed: int):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    torch.manual_seed(seed)
    model = train_hp.build_model(args, 10)
    ema = ModelEmaV3(model, decay=0.9)
    opt = create_optimizer_v2(model, opt='adamw', lr=1e-3, weight_decay=0.05, eps=1e-6)
    sched, _ = create_scheduler_v2(opt, sched='cosine', num_epochs=5, warmup_epochs=2, warmup_lr=1e-6, min_lr=1e-5)
    return model, opt, sched, NativeScaler('cpu'), ema


def test_resume_restores_optimizer_scheduler_scaler_and_ema_exactly(tmp_path):
    args = train_hp.parse_args(TINY + ['--epochs', '5'])
    model, opt, sched, scaler, ema = _training_objects(args, 0)
    x = torch.randn(8, 3, 16, 16)
    for epoch in range(2):
        sched.step(epoch)
        loss = model(x).logsumexp(-1).mean()
        opt.zero_grad()
        scaler(loss, opt)
        ema.update(model)
    path = tmp_path / 'checkpoint.pth'
    resume.atomic_save(resume.make_checkpoint(model, opt, sched, scaler, ema, 1, 42.5, args), str(path))
    obj = torch.load(path, weights_only=True)

    model2, opt2, sched2, scaler2, ema2 = _training_objects(args, 1)
    assert not _states_equal(model.state_dict(), model2.state_dict())
    assert resume.restore_training_state(obj, str(path), model2, opt2, sched2, scaler2, ema2) == (2, 42.5)
    assert _states_equal(model.state_dict(), model2.state_dict())
    assert _states_equal(ema.module.state_dict(), ema2.module.state_dict())
    assert _states_equal(opt.state_dict(), opt2.state_dict())
    assert _states_equal(sched.state_dict(), sched2.state_dict())
    assert _states_equal(scaler.state_dict(), scaler2.state_dict())

    # a feature that is on in this run but missing from the checkpoint is an error
    for key, expected in (('model_ema', '--model-ema'), ('scaler', 'gradient scaler'),
                          ('lr_scheduler', '--sched'), ('optimizer', '--finetune')):
        fresh = _training_objects(args, 2)
        with pytest.raises(utils.UsageError, match=re.escape(expected)):
            resume.restore_training_state({**obj, key: None}, str(path), *fresh)
    with pytest.raises(utils.UsageError, match='--finetune'):
        resume.restore_training_state(obj['model'], str(path), *_training_objects(args, 2))


def test_lr_follows_the_schedule_and_resume_reproduces_an_uninterrupted_run(tmp_path, capsys, monkeypatch):
    common = TINY + ['--epochs', '4', '--warmup-epochs', '2', '--lr', '2e-3', '--warmup-lr', '1e-5',
                     '--min-lr', '1e-4']
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    assert run_cli(common + ['--output_dir', straight], capsys)[0] == 0

    real_append = train_hp.append_log_line

    def killed_after_epoch_1(output_dir, stats):
        real_append(output_dir, stats)
        if stats['epoch'] == 1:
            raise _Killed

    monkeypatch.setattr(train_hp, 'append_log_line', killed_after_epoch_1)
    with pytest.raises(_Killed):
        train_hp.cli([str(a) for a in common + ['--output_dir', cut]])
    monkeypatch.setattr(train_hp, 'append_log_line', real_append)
    rc, out, _ = run_cli(common + ['--output_dir', cut, '--resume', cut / 'checkpoint.pth'], capsys)
    assert rc == 0 and 'continuing at epoch 2' in out

    a, b = read_log(straight / 'log.txt'), read_log(cut / 'log.txt')
    assert [r['epoch'] for r in a] == [r['epoch'] for r in b] == [0, 1, 2, 3]
    for rows in (a, b):
        for r in rows:  # every epoch runs at the schedule's value for that epoch, resumed or not
            assert r['train_lr'] == pytest.approx(cosine_lr(r['epoch'], 2e-3, 1e-5, 2, 1e-4, 4), rel=1e-9)
    for ra, rb in zip(a[2:], b[2:]):
        for key in ('train_loss', 'train_lr', 'test_acc1', 'test_acc5', 'test_loss', 'test_ema_acc1',
                    'test_ema_loss', 'max_accuracy'):
            assert rb[key] == pytest.approx(ra[key], rel=1e-5, abs=1e-6), key
    assert torch.load(cut / 'checkpoint.pth', weights_only=True)['epoch'] == 3


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys, monkeypatch):
    real_build = train_hp.build_model
    calls = {'n': 0}

    def build_model_that_diverges(args, num_classes):
        model = real_build(args, num_classes)

        def hook(module, inputs, output):
            if module.training:
                calls['n'] += 1
                if calls['n'] > 4:  # epoch 1, first step (4 steps per epoch)
                    return output * float('nan')
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(train_hp, 'build_model', build_model_that_diverges)
    out = tmp_path / 'out'
    rc, stdout, err = run_cli(TINY + ['--epochs', '3', '--output_dir', out], capsys)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: the training loss is nan at epoch 1, iteration 1/4')
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == [0]
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']


def test_plain_python_is_single_process_and_logs_seed_world_size_versions(tmp_path):
    out = tmp_path / 'out'
    r = run_process([sys.executable, 'train_hp.py', *TINY, '--epochs', '1', '--deterministic', '--seed', '3',
                     '--output_dir', out])
    assert r.returncode == 0, r.stderr
    env_line = next(line for line in r.stdout.splitlines() if line.startswith('environment:'))
    for part in ('seed 3', 'world size 1', 'deterministic True', f'torch {torch.__version__}', 'timm ', 'numpy '):
        assert part in env_line
    assert len(read_log(out / 'log.txt')) == 1


def test_sampler_is_reshuffled_every_epoch_in_a_single_process(tmp_path, capsys, monkeypatch):
    from samplers import RepeatAugSampler
    seen: List[Tuple[int, List[int]]] = []
    real = RepeatAugSampler.set_epoch

    def record(self, epoch, start=0):
        real(self, epoch, start)
        seen.append((epoch, list(self)))

    monkeypatch.setattr(RepeatAugSampler, 'set_epoch', record)
    rc, _, _ = run_cli(TINY + ['--epochs', '2', '--no-repeated-aug', '--no-model-ema'], capsys)
    assert rc == 0
    assert [e for e, _ in seen] == [0, 1]
    assert seen[0][1] != seen[1][1] and sorted(seen[0][1]) == sorted(seen[1][1]) == list(range(128))


def test_deterministic_switches_off_cudnn_benchmark():
    before = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
              torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    try:
        engine.setup_determinism(True)
        assert torch.backends.cudnn.benchmark is False and torch.backends.cudnn.deterministic is True
        assert torch.are_deterministic_algorithms_enabled()
        engine.setup_determinism(False)
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = before[:2]
        torch.use_deterministic_algorithms(before[2], warn_only=before[3])
    seeds = {preemption.epoch_seed(s, e, r) for s in (0, 1) for e in range(3) for r in range(4)}
    assert len(seeds) == 2 * 3 * 4  # every (seed, epoch, rank) draws its own numbers


# Distributed -------------------------------------------------------------------------------------

def test_two_process_run_one_checkpoint_ranks_agree_and_dist_eval_is_exact(tmp_path, capsys):
    out = tmp_path / 'dist'
    # without --dist-eval every rank evaluates all 61 images with its own model and EMA: they must agree
    r = run_process([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                     'train_hp.py', *TINY, '--epochs', '1', '--log-all-ranks', '--output_dir', out])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']  # rank 0 wrote
    rows = read_log(out / 'log.txt')
    assert len(rows) == 1 and rows[0]['test_images'] == 61
    assert 'world size 2' in r.stdout
    summaries = {(m.group(1) or '0', m.group(2) or ''): m.groups()[2:] for m in SUMMARY.finditer(r.stdout)}
    assert set(summaries) == {('0', ''), ('1', ''), ('0', 'EMA '), ('1', 'EMA ')}
    assert summaries[('0', '')] == summaries[('1', '')] and summaries[('0', 'EMA ')] == summaries[('1', 'EMA ')]
    obj = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert obj['args']['world_size'] == 2 and obj['args']['lr_scaled'] == pytest.approx(1e-3)

    # the same weights, evaluated by one process (plain python, in-process here) ...
    args = train_hp.parse_args(TINY + ['--eval', '--resume', str(out / 'checkpoint.pth'), '--dist-eval'])
    one = train_hp.main(args)
    assert one['images'] == 61
    assert one['acc1'] == rows[0]['test_acc1'] and one['acc5'] == rows[0]['test_acc5']
    assert one['loss'] == pytest.approx(rows[0]['test_loss'], rel=1e-5)

    # ... and by two with --dist-eval (31 + 30 images, none padded or counted twice), under the
    # legacy launcher (no --use_env: it passes --local-rank), or torchrun where it is gone
    import importlib.util
    legacy = importlib.util.find_spec('torch.distributed.launch') is not None
    r = run_process([sys.executable, '-m', 'torch.distributed.launch' if legacy else 'torch.distributed.run',
                     '--nproc_per_node=2',
                     f'--master_port={free_port()}', 'train_hp.py', *TINY, '--eval', '--resume',
                     out / 'checkpoint.pth', '--dist-eval'])
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r'^\* Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)  \((\d+) images\)$', r.stdout, re.M)
    assert m and 'world size 2' in r.stdout
    assert int(m.group(4)) == 61
    assert float(m.group(1)) == pytest.approx(one['acc1'], abs=0.00051)  # printed with 3 decimals
    assert float(m.group(3)) == pytest.approx(one['loss'], abs=6e-4)  # 3 decimals; summed in another order
    assert f'Accuracy of the network on the 61 test images: {one["acc1"]:.1f}%' in r.stdout


# Loading weights -----------------------------------------------------------------------------------

def test_eval_of_a_released_layout_checkpoint_through_resume(tmp_path):
    """The golden fixture's weights in the released float16 layout, head cut to the 10 digits."""
    import bvit.models
    import timm
    from datasets import build_dataset
    path = released_file_10_classes(tmp_path)

    argv = ['--eval', '--resume', str(path), '--data-set', 'DIGITS', '--input-size', '224', '--val-subset', '24',
            '--batch-size', '16', '--num_workers', '0', '--threads', '1']
    stats = train_hp.main(train_hp.parse_args(argv))

    # the same, computed here: the released forward on the same images
    model = timm.create_model('bvit_5m', num_classes=10).eval()
    model.load_state_dict(bvit.models.convert_official_state_dict(bvit.checkpoint.unwrap_state_dict(torch.load(path, weights_only=True))))
    val, _ = build_dataset(False, train_hp.parse_args(argv))
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        logits = model(images)
    assert stats['images'] == 24
    assert stats['acc1'] == pytest.approx(100.0 * (logits.argmax(1) == targets).float().mean().item())
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-4)


def test_state_dicts_load_with_prefixes_and_from_model_or_model_ema(tmp_path, trained, capsys):
    obj = torch.load(trained / 'checkpoint.pth', weights_only=True)
    sd, ema = obj['model'], obj['model_ema']
    base = train_hp.main(train_hp.parse_args(TINY + ['--eval', '--resume', str(trained / 'checkpoint.pth')]))
    base_ema = train_hp.main(train_hp.parse_args(
        TINY + ['--eval', '--eval-ema', '--resume', str(trained / 'checkpoint.pth')]))
    variants = {
        'bare': (sd, base), 'module': ({'model': {f'module.{k}': v for k, v in sd.items()}}, base),
        'compiled': ({'model': {f'_orig_mod.{k}': v for k, v in sd.items()}}, base),
        'ddp_compiled': ({'model': {f'module._orig_mod.{k}': v for k, v in sd.items()}}, base),
        'ema_only': ({'model_ema': {f'module.{k}': v for k, v in ema.items()}}, base_ema),
    }
    for name, (content, expected) in variants.items():
        path = tmp_path / f'{name}.pth'
        torch.save(content, path)
        got = train_hp.main(train_hp.parse_args(TINY + ['--eval', '--resume', str(path)]))
        assert (got['acc1'], got['loss']) == (expected['acc1'], pytest.approx(expected['loss'])), name


def test_finetune_new_head_and_input_size_from_this_projects_and_released_files(tmp_path, trained, capsys):
    """The weights a --finetune run starts from, read back from its checkpoint: lr 0 (no schedule)
    leaves them exactly as loaded."""
    from PIL import Image
    from timm.layers import resample_abs_pos_embed
    root = tmp_path / 'folder'
    for split in ('train', 'val'):
        for c in ('cat', 'dog', 'emu'):
            (root / split / c).mkdir(parents=True)
            for i in range(4 if split == 'train' else 1):
                Image.new('RGB', (20, 20), (40 * i, 80, 120)).save(root / split / c / f'{i}.png')
    folder = ['--data-set', 'FOLDER', '--data-path', root, '--train-subset', '12', '--batch-size', '4',
              '--lr', '0', '--sched', 'none', '--no-model-ema', '--epochs', '1']

    def started_from(argv: List[Any], name: str) -> Dict[str, torch.Tensor]:
        rc, out, err = run_cli(TINY + folder + argv + ['--output_dir', tmp_path / name], capsys)
        assert rc == 0, err
        assert 'new head.weight, head.bias' in out
        return torch.load(tmp_path / name / 'checkpoint.pth', weights_only=True)['model']

    # this project's checkpoint: 16 px (2x2 grid), 10 classes -> 32 px (4x4 grid), 3 classes
    source = torch.load(trained / 'checkpoint.pth', weights_only=True)['model']
    got = started_from(['--input-size', '32', '--finetune', trained / 'checkpoint.pth'], 'ours')
    expected_pe = resample_abs_pos_embed(source['pos_embed'][:, :1 + 2 * 2], [4, 4], [2, 2], num_prefix_tokens=1)
    torch.testing.assert_close(got['pos_embed'][:, :1 + 4 * 4], expected_pe, rtol=0, atol=1e-6)
    assert got['head.weight'].shape == (3, 192)
    for key in source:
        if not key.startswith(('head.', 'pos_embed')):
            assert torch.equal(got[key], source[key]), key

    # a released file: 224 px with the conv stem (7x7 grid), 1000 classes -> 64 px (2x2 grid), 3 classes
    golden = torch.load(GOLDEN, weights_only=True)['state_dict']
    released = tmp_path / 'released.pth'
    torch.save({'state_dict': golden}, released)
    got = started_from(['--input-size', '64', '--patch-size', '16', '--finetune', released], 'released')
    expected_pe = resample_abs_pos_embed(golden['pos_embedding'][:, :1 + 7 * 7].float(), [2, 2], [7, 7],
                                         num_prefix_tokens=1)
    # the released table is float16, and the resampled one may be stored in float16 (relative step 2^-11)
    torch.testing.assert_close(got['pos_embed'][:, :1 + 2 * 2], expected_pe, rtol=1e-3, atol=1e-5)
    assert torch.equal(got['cls_token'], golden['cls_token'].float()) and got['head.weight'].shape == (3, 192)


# Models other than BViT --------------------------------------------------------------------------

def test_timm_model_with_broad_attention_and_no_broad_twin(tmp_path, capsys):
    import timm
    from bvit.broad import add_broad_attention
    from datasets import build_dataset
    rc, out, err = run_cli(TINY + ['--arch', 'vit_tiny_patch16_224', '--broad', '--epochs', '1', '--train-subset', '64',
                                   '--stem', 'conv'], capsys)
    assert rc == 2 and '--stem applies to BViT' in err
    small = [a for a in TINY if a not in ('--stem', 'conv')]
    rc, out, err = run_cli(small + ['--arch', 'vit_tiny_patch16_224', '--broad', '--broad-scale', '3', '--epochs', '1',
                                    '--train-subset', '64', '--output_dir', tmp_path / 'broad'], capsys)
    assert rc == 0, err
    # the run trained and evaluated a broad-attention ViT: its logged test loss is that of the saved
    # weights in add_broad_attention(ViT, 3), not in the plain ViT (a large scale makes them differ)
    ckpt = torch.load(tmp_path / 'broad' / 'checkpoint.pth', weights_only=True)
    logged = read_log(tmp_path / 'broad' / 'log.txt')[0]
    val, _ = build_dataset(False, train_hp.parse_args(small))
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    plain_vit = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4).eval()
    plain_vit.load_state_dict(ckpt['model'])
    with torch.no_grad():
        plain_loss = F.cross_entropy(plain_vit(images), targets).item()
        broad_loss = F.cross_entropy(add_broad_attention(plain_vit, scale=3.0)(images), targets).item()
    assert broad_loss == pytest.approx(logged['test_loss'], rel=1e-6)
    assert abs(plain_loss - logged['test_loss']) > 1e-4
    rc, out, err = run_cli(small + ['--arch', 'resnet18', '--broad', '--patch-size', '0'], capsys)
    assert rc == 2 and err.startswith('error: --broad') and len(err.strip().splitlines()) == 1
    rc, out, err = run_cli(TINY + ['--no-broad', '--epochs', '1', '--train-subset', '64', '--output_dir',
                                   tmp_path / 'twin'], capsys)
    assert rc == 0, err
    assert torch.load(tmp_path / 'twin' / 'checkpoint.pth', weights_only=True)['args']['no_broad'] is True


# Engine and losses ---------------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _loader(n: int, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)


def test_model_is_in_training_mode_inside_the_training_loop():
    model = _Tiny()
    modes: List[bool] = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    model.eval()  # e.g. left so by an evaluation
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, criterion, _loader(16), opt, torch.device('cpu'), 0, print_freq=2)
    assert modes == [True] * 4 and stats['lr'] == 0.1 and math.isfinite(stats['loss'])
    modes.clear()
    evaluate(_loader(10), model, torch.device('cpu'))
    assert modes == [False] * 3 and model.training  # evaluation puts the mode back


def test_timm_helpers_in_place_of_own_copies_give_the_same_numbers():
    import random
    import numpy as np
    from timm.utils import unwrap_model
    import datasets
    train_hp.random_seed(7)  # timm's, as the script seeds
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert draws == (random.random(), float(np.random.rand()), torch.rand(1).item())
    model = _Tiny()
    assert unwrap_model(torch.compile(model)) is model  # engine's EMA update reads the plain module
    # the evaluation transform (timm's create_transform): DeiT's resize to int(size / ratio), bicubic, center crop
    from PIL import Image
    from torchvision import transforms
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8))
    for size, ratio in ((16, 0.875), (20, 0.875), (24, 1.0)):
        args = train_hp.parse_args(['--input-size', str(size), '--eval-crop-ratio', str(ratio)])
        ref = transforms.Compose([transforms.Resize(int(size / ratio), interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(size), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
        assert torch.equal(datasets.build_transform(False, args)(img), ref(img)), (size, ratio)


def test_evaluate_counts_each_image_once():
    model = _Tiny().eval()
    loader = _loader(11, batch=4)
    stats = evaluate(loader, model, torch.device('cpu'))
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = model(x)
    assert stats['images'] == 11
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert stats['acc5'] == 100.0  # 3 classes: top-5 is top-3
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert LabelSmoothingCrossEntropy(0.1)(logits, target) == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-6)
    assert SoftTargetCrossEntropy()(logits, F.one_hot(target, 5).float()) == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    assert isinstance(build_base_criterion(True, 0.1, False), SoftTargetCrossEntropy)
    assert isinstance(build_base_criterion(False, 0.1, False), LabelSmoothingCrossEntropy)
    # --bce-loss, timm's BinaryCrossEntropy: integer targets one-hot, positive mixed targets 1 (DeiT III)
    bce = build_base_criterion(True, 0.1, True)
    assert isinstance(bce, BinaryCrossEntropy)
    one_hot = F.one_hot(target, 5).float()
    assert bce(logits, target).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, one_hot).item(),
                                                       rel=1e-6)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    assert bce(logits, mixed).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, mixed.gt(0).float()).item(), rel=1e-6)
    assert build_base_criterion(False, 0.0, False)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    teacher = nn.Linear(4, 5)
    x = torch.randn(6, 4)
    student = teacher(x).detach()
    hard = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha=1.0)(x, student, target)
    assert hard == pytest.approx(F.cross_entropy(student, student.argmax(1)).item(), rel=1e-6)
    soft = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=1.0, tau=2.0)(x, student, target)
    assert soft.item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher
    both = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5)(x, (student, student + 1.0), target)
    assert both.item() == pytest.approx(0.5 * F.cross_entropy(student, target).item(), rel=1e-5)


def test_distillation_from_a_timm_teacher_file(tmp_path, capsys):
    import timm
    teacher = timm.create_model('resnet10t', num_classes=10)
    path = tmp_path / 'teacher.pth'
    torch.save({'model': teacher.state_dict()}, path)
    rc, _, err = run_cli(TINY + ['--epochs', '1', '--train-subset', '64', '--distillation-type', 'hard',
                                 '--teacher-model', 'resnet10t', '--teacher-path', path], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(TINY + ['--distillation-type', 'soft', '--teacher-model', 'resnet10t'], capsys)
    assert rc == 2 and '--teacher-path' in err


# Mixed precision on the CPU -----------------------------------------------------------------------

# Tolerances, relative to float32 (||amp - fp32|| / ||fp32||, per output and per parameter
# gradient), about 3x what was measured on these models: bfloat16 keeps 8 significant bits
# (measured: outputs 0.9%, gradients 2.0%), float16 11 bits (0.13%, 0.2%).
AMP_TOLERANCE = {torch.bfloat16: {'out': 0.03, 'grad': 0.06}, torch.float16: {'out': 0.005, 'grad': 0.01}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _amp_models():
    import timm
    import bvit.models  # noqa: F401
    from bvit.broad import add_broad_attention
    torch.manual_seed(0)
    # BViT (its own blocks; in train mode model(x) computes only the class token's broad row) and
    # a timm ViT converted by add_broad_attention: both sum the broad logits in float32 under autocast
    yield 'bvit', timm.create_model('bvit_5m', num_classes=10, img_size=16, patch_size=4, stem='conv'), 16
    yield 'vit+broad', add_broad_attention(timm.create_model(
        'vit_tiny_patch16_224', depth=2, img_size=32, patch_size=8, num_classes=10), scale=0.4), 32


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_cpu_autocast_training_and_evaluation_steps_are_close_to_float32(dtype):
    from engine import autocast_context
    tol = AMP_TOLERANCE[dtype]
    cpu = torch.device('cpu')
    for name, model, size in _amp_models():
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, size, size, generator=g),
                                              torch.randint(0, 10, (8,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        x, y = data.tensors
        model.train()
        ref_out = model(x)
        F.cross_entropy(ref_out, y).backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            with autocast_context(cpu, dtype)():
                out = model(x)
        assert out.dtype == dtype and _rel(out, ref_out) < tol['out'], name
        # one training step (plain SGD, lr 1: the weight change is the gradient), scaled with fp16
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        # (init_scale 2^10: at the default 2^16 these float16 gradients overflow and the scaler,
        # rightly, skips the step and halves the scale; a step must happen here)
        scaler = NativeScaler('cpu') if dtype == torch.float16 else None
        if scaler is not None:
            scaler.load_state_dict({**scaler.state_dict(), 'scale': 2.0 ** 10})
        train_one_epoch(model, DistillationLoss(nn.CrossEntropyLoss(), None), loader, opt, cpu, 0, scaler=scaler,
                        autocast=autocast_context(cpu, dtype), print_freq=1000)
        if scaler is not None:
            assert scaler.state_dict()['scale'] == 1024.0  # no overflow: the step was taken
        for n, p in model.named_parameters():
            assert _rel(before[n] - p.detach(), ref_grads[n]) < tol['grad'], (name, n)
        ref_eval = evaluate(loader, model, cpu)
        amp_eval = evaluate(loader, model, cpu, autocast_context(cpu, dtype))
        assert amp_eval['images'] == 8 and amp_eval['loss'] == pytest.approx(ref_eval['loss'], rel=tol['out'])


def test_the_fp16_step_is_timms_native_scaler_and_equals_a_grad_scaler_step_with_clipping():
    """engine's step with timm's NativeScaler against the GradScaler step it replaced (scale,
    backward, unscale, clip, step, update): the same parameters and scaler state after fp16 steps
    with clipping that acts, the first ones skipped for overflowing fp16 gradients (scale halved)."""
    from engine import _optimizer_step, autocast_context
    cpu = torch.device('cpu')
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]
    scale = 2.0 ** 20  # the scaled fp16 gradients overflow (> 65504) at first: steps skipped, the scale halved

    def run(step_fn):
        torch.manual_seed(0)
        model = _Tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norms = []
        for x, y in batches:
            with autocast_context(cpu, torch.float16)():
                loss = F.cross_entropy(model(x), y)
            step_fn(loss, opt, list(model.parameters()), norms)
        return model.state_dict(), norms

    reference = torch.amp.GradScaler('cpu', init_scale=scale)

    def grad_scaler_step(loss, opt, params, norms):
        opt.zero_grad(set_to_none=True)
        reference.scale(loss).backward()
        reference.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        reference.step(opt)
        reference.update()

    native = NativeScaler('cpu')
    native.load_state_dict({**native.state_dict(), 'scale': scale})

    def native_scaler_step(loss, opt, params, norms):
        _optimizer_step(loss, opt, native, params, 0.05)

    want, norms = run(grad_scaler_step)
    got, _ = run(native_scaler_step)
    skipped = sum(not math.isfinite(n) for n in norms)
    assert 1 <= skipped <= 4 and min(n for n in norms if math.isfinite(n)) > 0.05  # steps taken, clipped
    assert reference.get_scale() == native.state_dict()['scale'] == scale / 2 ** skipped
    assert native.state_dict() == reference.state_dict()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert not torch.equal(want['net.3.weight'], run(lambda loss, opt, params, norms: None)[0]['net.3.weight'])


def test_amp_on_cpu_is_used_when_asked_and_states_its_precision(tmp_path, capsys):
    out = tmp_path / 'fp16'
    rc, stdout, err = run_cli(TINY + ['--epochs', '1', '--train-subset', '64', '--amp', '--amp-dtype', 'fp16',
                                      '--output_dir', out], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[0].startswith('environment: ')
    assert 'precision fp16 autocast on cpu with gradient scaler' in stdout.splitlines()[0]
    scaler = torch.load(out / 'checkpoint.pth', weights_only=True)['scaler']
    assert scaler['scale'] == 65536.0  # the CPU gradient scaler ran and was saved
    assert engine.precision(train_hp.parse_args([]), torch.device('cpu')) == (None, 'float32')  # CPU default
    assert engine.precision(train_hp.parse_args(['--amp-dtype', 'bf16']), torch.device('cuda'))[0] == torch.bfloat16
    assert engine.precision(train_hp.parse_args(['--no-amp']), torch.device('cuda')) == (
        None, 'float32, TF32 float32 matmuls and convolutions')
    assert engine.precision(train_hp.parse_args(['--no-amp', '--no-tf32']), torch.device('cuda')) == (None, 'float32')


# Preemption: SIGTERM / SIGINT, exact resume -------------------------------------------------------

# 10 steps per epoch, a progress line after every step
PREEMPT = TINY + ['--batch-size', '16', '--train-subset', '160', '--print-freq', '1', '--epochs', '2',
                  '--deterministic']


def test_sigterm_mid_epoch_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight, cut = tmp_path / 'straight', tmp_path / 'cut'
    cmd = [sys.executable, 'train_hp.py', *PREEMPT, '--output_dir']
    ref = subprocess.Popen([str(c) for c in cmd + [straight]], cwd=REPO, env=clean_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    proc = subprocess.Popen([str(c) for c in cmd + [cut]], cwd=REPO, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # a real signal to a real process, once it has logged epoch 1, step 3
        lines.append(line.rstrip('\n'))
        if line.startswith('Epoch [1/1] [ 3/10]'):
            proc.send_signal(signal.SIGTERM)
    assert proc.wait() == train_hp.STOP_EXIT_STATUS == 3, proc.stderr.read()[-3000:]
    assert ref.wait() == 0, ref.stderr.read()[-3000:]
    stop = [line for line in lines if line.startswith('stopped by')]
    assert len(stop) == 1 and re.match(r'stopped by SIGTERM at epoch 1, iteration ([3-9])/10: a resumable '
                                       r'checkpoint\.pth is in .*; continue with --resume .* \(exit status 3\)$', stop[0])
    obj = torch.load(cut / 'checkpoint.pth', weights_only=True)
    done = obj['position']['batches_done']
    assert obj['epoch'] == 0 and obj['position']['epoch'] == 1 and 3 <= done < 10
    assert len(read_log(cut / 'log.txt')) == 1  # the interrupted epoch is logged once, when it ends

    r = run_process([sys.executable, 'train_hp.py', *PREEMPT, '--output_dir', cut, '--resume', cut / 'checkpoint.pth'])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f'continuing at epoch 1, iteration {done + 1}' in r.stdout
    a, b = (torch.load(d / 'checkpoint.pth', weights_only=True) for d in (straight, cut))
    for key in ('model', 'model_ema'):
        diff = max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
        assert diff <= 1e-6, key
    ra, rb = read_log(straight / 'log.txt'), read_log(cut / 'log.txt')
    assert [r['epoch'] for r in rb] == [0, 1]
    assert rb[1]['train_loss'] == pytest.approx(ra[1]['train_loss'], abs=1e-6)
    assert rb[1]['test_acc1'] == ra[1]['test_acc1'] and b['position'] is None


def test_second_signal_during_the_save_changes_nothing_and_handlers_come_back(tmp_path, capsys, monkeypatch):
    real_build, real_save = train_hp.build_model, torch.save
    steps = {'n': 0}

    def build_model_interrupted_at_step_2(args, num_classes):
        model = real_build(args, num_classes)

        def hook(module, inputs, output):
            if module.training:
                steps['n'] += 1
                if steps['n'] == 2:
                    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during the second step
        model.register_forward_hook(hook)
        return model

    def save_signalled_twice(obj, f, *a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(train_hp, 'build_model', build_model_interrupted_at_step_2)
    monkeypatch.setattr(torch, 'save', save_signalled_twice)
    out = tmp_path / 'out'
    rc, stdout, err = run_cli(TINY + ['--epochs', '2', '--output_dir', out], capsys)
    monkeypatch.setattr(torch, 'save', real_save)
    monkeypatch.setattr(train_hp, 'build_model', real_build)
    assert rc == 3 and err == ''
    assert 'stopped by SIGINT at epoch 0, iteration 2/4' in stdout
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    obj = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert obj['position']['batches_done'] == 2 and obj['epoch'] == -1
    assert sorted(p.name for p in out.iterdir()) == ['checkpoint.pth']  # no temp file, no best.pth, no log yet
    rc, stdout, err = run_cli(TINY + ['--epochs', '2', '--output_dir', out, '--resume', out / 'checkpoint.pth'], capsys)
    assert rc == 0, err
    assert 'continuing at epoch 0, iteration 3' in stdout and 'Epoch [0/1] [4/4]' in stdout
    assert [r['epoch'] for r in read_log(out / 'log.txt')] == [0, 1]
    rc, _, err = run_cli(TINY + ['--epochs', '2', '--batch-size', '16', '--output_dir', tmp_path / 'x', '--resume',
                                 _mid_epoch_copy(obj, tmp_path)], capsys)
    assert rc == 2 and 'resume it with the same' in err and len(err.strip().splitlines()) == 1


def _mid_epoch_copy(obj: Dict[str, Any], tmp_path: Path) -> Path:
    path = tmp_path / 'mid_epoch.pth'
    torch.save(obj, path)
    return path


def test_training_loop_reduces_only_on_printing_steps(monkeypatch):
    import engine
    calls: List[int] = []
    real = engine.all_reduce_sum

    def counting(values, device):
        calls.append(len(values))
        return real(values, device)

    monkeypatch.setattr(engine, 'all_reduce_sum', counting)
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, DistillationLoss(nn.CrossEntropyLoss(), None), _loader(40), opt,
                            torch.device('cpu'), 0, print_freq=4)
    assert len(calls) == 3  # steps 4 and 8 print, and step 10 (the last): not one per step
    assert stats['stopped'] is None and math.isfinite(stats['loss'])


# SLURM and multi-node launches ----------------------------------------------------------------------

def test_slurm_nodelist_is_expanded_like_scontrol_show_hostnames():
    expand = utils.expand_nodelist
    assert expand('a,b') == ['a', 'b']
    assert expand('node[01-03,07]') == ['node01', 'node02', 'node03', 'node07']
    assert expand('gpu[1-2]-ib,cpu3') == ['gpu1-ib', 'gpu2-ib', 'cpu3']
    assert expand('n[8-10]') == ['n8', 'n9', 'n10'] and expand('n[098-101]') == ['n098', 'n099', 'n100', 'n101']
    assert expand('r[1-2]n[1,3]') == ['r1n1', 'r1n3', 'r2n1', 'r2n3']
    with pytest.raises(utils.UsageError, match='unbalanced'):
        expand('node[01-03')


def test_slurm_variables_give_rank_world_and_rendezvous_when_torchrun_is_absent():
    saved = dict(os.environ)  # slurm_launch sets RANK, WORLD_SIZE, ...: all of it goes back below
    try:
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'):
            os.environ.pop(key, None)
        os.environ.update(SLURM_PROCID='5', SLURM_NTASKS='8', SLURM_LOCALID='1', SLURM_JOB_ID='123456',
                          SLURM_JOB_NODELIST='gpu[07-08]-ib,cpu3')
        assert utils.slurm_launch() == (5, 8, 1)
        assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == ('gpu07-ib', str(10000 + 123456 % 20000))
        assert (os.environ['RANK'], os.environ['WORLD_SIZE'], os.environ['LOCAL_RANK']) == ('5', '8', '1')
        assert utils.slurm_launch() is None  # torchrun's variables (here: the ones just set) win
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
            del os.environ[key]
        os.environ.update(MASTER_ADDR='head', MASTER_PORT='4242')
        assert utils.slurm_launch() == (5, 8, 1)
        assert (os.environ['MASTER_ADDR'], os.environ['MASTER_PORT']) == ('head', '4242')
        for key in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
            del os.environ[key]
        os.environ['SLURM_NTASKS'] = '1'
        assert utils.slurm_launch() is None and 'RANK' not in os.environ  # one task: a plain run
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _slurm_job_with_free_port() -> int:
    import random
    rng = random.Random(os.getpid())
    while True:
        job = rng.randrange(1, 10 ** 6)
        with socket.socket() as s:
            try:
                s.bind(('127.0.0.1', 10000 + job % 20000))
                return job
            except OSError:
                continue


def _two_processes(cmds: List[List[Any]], envs: List[Dict[str, str]]) -> List[Tuple[int, str, str]]:
    """Start the commands together; their (status, stdout, stderr). A process still running after
    5 minutes (these runs take seconds) is killed and the test fails: a hang never blocks the suite."""
    procs = [subprocess.Popen([str(c) for c in cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env in zip(cmds, envs)]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f'{p.args} did not end: {[q.communicate()[1][-2000:] for q in procs]}')
    return [(p.returncode, out, err) for p, (out, err) in zip(procs, outputs)]


SMALL_RUN = TINY + ['--epochs', '1', '--train-subset', '64', '--no-model-ema']


def _srun_envs(job: int) -> List[Dict[str, str]]:
    """The environments srun gives the two tasks of job ``job`` on this one node."""
    envs = []
    for rank in range(2):
        env = clean_env()
        env.update(SLURM_PROCID=str(rank), SLURM_NTASKS='2', SLURM_LOCALID=str(rank), SLURM_JOB_ID=str(job),
                   SLURM_JOB_NODELIST='localhost')
        envs.append(env)
    return envs


def test_srun_tasks_train_as_one_run(tmp_path):
    job = _slurm_job_with_free_port()
    out = tmp_path / 'srun'
    results = _two_processes([[sys.executable, 'train_hp.py', *SMALL_RUN, '--output_dir', out]] * 2, _srun_envs(job))
    for rc, stdout, err in results:
        assert rc == 0, err[-3000:]
    assert f'SLURM task 0 of 2 (local 0): rendezvous at localhost:{10000 + job % 20000}' in results[0][1]
    # every task names its rendezvous before it waits there (a hang is then diagnosable); then rank 0 logs
    assert results[1][1] == f'SLURM task 1 of 2 (local 1): rendezvous at localhost:{10000 + job % 20000}\n'
    assert 'world size 2' in results[0][1]
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['args']['world_size'] == 2


def test_two_node_torchrun_trains_as_one_run(tmp_path):
    out = tmp_path / 'nodes'
    port = free_port()
    cmds = [[sys.executable, '-m', 'torch.distributed.run', '--nnodes', '2', '--node_rank', str(node),
             '--nproc_per_node', '1', '--master_addr', '127.0.0.1', '--master_port', str(port),
             'train_hp.py', *SMALL_RUN, '--output_dir', out] for node in range(2)]
    results = _two_processes(cmds, [clean_env(), clean_env()])
    for rc, stdout, err in results:
        assert rc == 0, err[-3000:]
    assert 'world size 2' in results[0][1] and 'Accuracy of the network on the 61 test images' in results[0][1]
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']
    assert len(read_log(out / 'log.txt')) == 1


# Unreadable data -----------------------------------------------------------------------------------

def _folder_with_truncated_images(root: Path) -> Tuple[Path, Path]:
    from PIL import Image
    for split, n in (('train', 6), ('val', 3)):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (16, 16), (40 * i, 90 * (c == 'a'), 120)).save(root / split / c / f'{i}.png')
    bad_train, bad_val = root / 'train' / 'a' / '3.png', root / 'val' / 'b' / '1.png'
    for path in (bad_train, bad_val):
        path.write_bytes(path.read_bytes()[:60])  # the header survives, the pixel data is cut
    return bad_train, bad_val


def test_unreadable_images_are_skipped_named_counted_and_limited(tmp_path, capsys):
    bad_train, bad_val = _folder_with_truncated_images(tmp_path / 'folder')
    argv = TINY + ['--data-set', 'FOLDER', '--data-path', tmp_path / 'folder', '--batch-size', '4', '--num_workers', '2',
                   '--no-repeated-aug', '--no-model-ema', '--epochs', '2']
    rc, out, err = run_cli(argv + ['--output_dir', tmp_path / 'out'], capsys)
    assert rc == 0 and 'Traceback' not in out + err, err
    warnings = [line for line in out.splitlines() if line.startswith('warning:')]
    assert warnings == [f'warning: skipped unreadable image {bad_train} (train split): OSError: image file is '
                        'truncated', f'warning: skipped unreadable image {bad_val} (val split): OSError: image file '
                        'is truncated'] * 2  # each file once per epoch, named with its split
    rows = read_log(tmp_path / 'out' / 'log.txt')
    assert [(r['train_skipped'], r['test_skipped'], r['test_images']) for r in rows] == [(1, 0 + 1, 5)] * 2
    assert '(5 images, 1 unreadable skipped)' in out and 'Accuracy of the network on the 5 test images' in out
    assert re.search(r'^Epoch \[0/1\] done in .*, 1 unreadable images skipped$', out, re.M)

    rc, out, err = run_cli(argv + ['--max-bad-images', '1', '--output_dir', tmp_path / 'limited'], capsys)
    assert rc == 2 and 'Traceback' not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: 2 unreadable images, more than --max-bad-images 1')
    assert str(bad_val) in lines[0] and '(val split)' in lines[0]
    assert not (tmp_path / 'limited' / 'checkpoint.pth').exists()


# Compiled training --------------------------------------------------------------------------------------

COMPILE_RUN = TINY + ['--batch-size', '16', '--sched', 'none', '--epochs', '1', '--model-kwargs', 'depth=4']


def test_compiled_ddp_training_ends_with_the_weights_of_eager_and_evaluates(tmp_path):
    """torch.compile after DDP (aot_eager, 2 gloo processes, 4 steps at lr 1e-3 with drop-path,
    mixup and the EMA): the weights of eager training (measured: equal, difference 0.0), and the
    evaluation on the compiled copy gives eager's numbers."""
    runs = {}
    for name, extra in (('eager', []), ('compiled', ['--torchcompile', 'aot_eager'])):
        r = run_process([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                         'train_hp.py', *COMPILE_RUN, *extra, '--output_dir', tmp_path / name])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / 'checkpoint.pth', weights_only=True), read_log(tmp_path / name / 'log.txt')
    (eager, eager_log), (compiled, compiled_log) = runs['eager'], runs['compiled']
    assert compiled['args']['torchcompile'] == 'aot_eager' and eager['args']['torchcompile'] is None
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in compiled['model'])  # the plain model's keys
    torch.manual_seed(0)
    initial = train_hp.build_model(train_hp.parse_args(COMPILE_RUN), 10).state_dict()
    assert max((eager['model'][k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it trained
    for key in ('model', 'model_ema'):
        diff = max((eager[key][k] - compiled[key][k]).abs().max().item() for k in eager[key])
        assert diff <= 1e-6, (key, diff)
    assert compiled_log[0]['train_loss'] == pytest.approx(eager_log[0]['train_loss'], abs=1e-6)
    for k in ('test_acc1', 'test_acc5', 'test_ema_acc1'):
        assert compiled_log[0][k] == eager_log[0][k], k
    assert compiled_log[0]['test_loss'] == pytest.approx(eager_log[0]['test_loss'], abs=1e-5)


def test_compiled_bvit_training_step_under_autocast():
    import timm
    model = timm.create_model('bvit_5m', num_classes=10, img_size=16, patch_size=4, depth=2)
    compiled = torch.compile(model, backend='aot_eager')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = compiled(torch.randn(4, 3, 16, 16))
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# First GPU: FAKE data, TF32, scripts/gpu_check.sh ------------------------------------------------------

def test_fake_data_is_fixed_per_index_and_learnable(tmp_path):
    import datasets
    args = train_hp.parse_args(['--data-set', 'FAKE', '--input-size', '16', '--fake-size', '40', '--fake-val-size',
                                '12', '--fake-classes', '5', '--aa', 'none', '--reprob', '0'])
    train, val, classes = datasets.build_datasets(args)
    assert (len(train), len(val), classes) == (40, 12, 5)
    (a, y), (b, z) = val[3], val[3]
    assert torch.equal(a, b) and y == z and a.shape == (3, 16, 16)  # the same image and label every time
    assert not torch.equal(val[0][0], datasets.build_datasets(args)[0][0][0])  # the splits differ
    plain = datasets.FakeImages(12, 16, 5, False, val.transform, signal=0.0)
    x, t = plain[3]
    assert t == y and (a - x - 0.5 * val.patterns[y]).abs().max() < 1e-6  # --fake-signal 0.5: its class pattern
    assert torch.equal(val.patterns, datasets.FakeImages(12, 16, 5, True, None, 0.5).patterns)  # fixed patterns


def test_tf32_on_cuda_by_default_and_stated_in_the_precision():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        cuda = torch.device('cuda', 0)
        args = train_hp.parse_args(['--amp-dtype', 'bf16'])
        assert args.tf32 is True
        assert engine.precision(args, cuda) == (torch.bfloat16, 'bf16 autocast on cuda, TF32 float32 matmuls and '
                                                  'convolutions')
        assert engine.precision(args, torch.device('cpu'))[1] == 'float32'  # no TF32 on the CPU
        off = train_hp.parse_args(['--no-tf32', '--no-amp'])
        assert engine.precision(off, cuda) == (None, 'float32')
        engine.setup_tf32(True)
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        engine.setup_tf32(False)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _gpu_check(tmp_path: Path, only: str) -> Dict[str, Tuple[str, str]]:
    env = clean_env()
    env['PYTHON'] = sys.executable
    r = subprocess.run(['bash', 'scripts/gpu_check.sh', '--cpu', '--out', str(tmp_path / 'out'), '--only', only],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    table = r.stdout.split('gpu_check summary', 1)[-1].splitlines()[2:]
    rows = {line.split()[0]: (line.split()[1], line.split(None, 2)[2]) for line in table if line.strip()}
    assert set(rows) == set(only.split(',')), r.stdout + r.stderr[-2000:]
    return rows


def test_gpu_check_cpu_form_bf16_ema_and_exact_resume(tmp_path):
    rows = _gpu_check(tmp_path, 'bf16,ema-eval,resume')
    assert all(status == 'ok' for status, _ in rows.values()), rows
    first, last = map(float, re.match(r'loss ([\d.]+) -> ([\d.]+)', rows['bf16'][1]).groups())
    assert last < first
    assert rows['resume'][1].endswith('largest difference 0')


def test_gpu_check_cpu_form_fp16_and_speed(tmp_path):
    rows = _gpu_check(tmp_path, 'fp16,speed')
    assert all(status == 'ok' for status, _ in rows.values()), rows
    assert re.match(r'bvit_5m \d+ img/s, deit_tiny \d+ img/s \([\d.]+x\) at batch 16 per process, 2 processes$',
                    rows['speed'][1])


def test_gpu_check_cpu_form_compile(tmp_path):
    status, what = _gpu_check(tmp_path, 'compile')['compile']
    assert status == 'ok', what


# One rank fails: its line first, every rank ends ------------------------------------------------------

class _Exited(Exception):
    pass


def _stand_in_distributed(monkeypatch) -> List[Any]:
    """A distributed run's calls, recorded instead of made: the collectives of a teardown
    (destroy_process_group, barrier), os._exit and the lines written to stderr, in order."""
    calls: List[Any] = []
    for module in (train_hp, utils):
        monkeypatch.setattr(module, 'is_dist', lambda: True)
        monkeypatch.setattr(module, 'get_rank', lambda: 1)
    monkeypatch.setattr(torch.distributed, 'destroy_process_group', lambda *a, **k: calls.append('destroy'))
    monkeypatch.setattr(torch.distributed, 'barrier', lambda *a, **k: calls.append('barrier'))
    monkeypatch.setattr(train_hp, 'write_line', lambda stream, text: calls.append(('line', text)))

    def exit_now(status):
        calls.append(('exit', status))
        raise _Exited

    monkeypatch.setattr(os, '_exit', exit_now)
    return calls


@pytest.mark.parametrize('error, status, line', [
    (utils.UsageError('2 unreadable images, more than --max-bad-images 1'), 2,
     'error [rank 1]: 2 unreadable images, more than --max-bad-images 1'),
    (utils.NonFiniteLossError('the training loss is nan'), 1, 'error [rank 1]: the training loss is nan'),
    (RuntimeError('Connection closed by peer [127.0.0.1]:1234'), 1,
     'error [rank 1]: RuntimeError: Connection closed by peer [127.0.0.1]:1234 (traceback above; a broken collective '
     'means another process ended first: see its line)'),
], ids=['usage', 'nan', 'peer-gone'])
def test_a_failing_rank_prints_its_line_then_exits_without_a_collective_teardown(monkeypatch, error, status, line):
    calls = _stand_in_distributed(monkeypatch)

    def failing_main(args):
        raise error

    monkeypatch.setattr(train_hp, 'main', failing_main)
    with pytest.raises(_Exited):
        train_hp.cli(TINY + ['--epochs', '1'])
    assert calls == [('line', line), ('exit', status)]  # the line, then os._exit: no destroy, no barrier


def test_the_normal_and_the_preempted_ends_keep_the_collective_teardown(monkeypatch):
    calls = _stand_in_distributed(monkeypatch)
    monkeypatch.setattr(train_hp, 'main', lambda args: {})
    assert train_hp.cli(TINY + ['--epochs', '1']) == 0
    assert calls == ['destroy']

    def stopped(args):
        raise preemption.RunStopped('at epoch 0')

    calls.clear()
    monkeypatch.setattr(train_hp, 'main', stopped)
    assert train_hp.cli(TINY + ['--epochs', '1']) == 3
    assert calls == ['destroy']


@pytest.mark.parametrize('rank', [0, 1])
def test_no_rank_exits_with_3_before_rank_0_has_saved_mid_epoch(tmp_path, monkeypatch, rank):
    calls = _stand_in_distributed(monkeypatch)
    monkeypatch.setattr(preemption, 'is_main_process', lambda: rank == 0)
    monkeypatch.setattr(preemption, 'gather_objects', lambda state: [state, state])
    monkeypatch.setattr(preemption, 'save_checkpoint', lambda obj, path: calls.append('save'))
    monkeypatch.setattr(preemption, 'log', lambda *a, **k: None)
    args = train_hp.parse_args(TINY + ['--output_dir', str(tmp_path)])
    args.world_size = 2
    stop = preemption.StopSignal()
    stop.signum = signal.SIGTERM
    with pytest.raises(preemption.RunStopped):
        preemption.save_and_stop(args, stop, 1, {'batches_done': 2, 'batches_total': 4}, lambda position: {})
    assert calls == (['save', 'barrier'] if rank == 0 else ['barrier'])


FAIL_WRITE = """
import builtins, errno, os, sys
sys.path.insert(0, os.getcwd())
real_open, opened = builtins.open, []


class Full:
    def __init__(self, f):
        self.f, self.written = f, 0
    def write(self, data):
        if self.written + len(data) > 4096:  # the disk fills up 4 KiB into the file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)


def open_on_a_full_disk(path, mode='r', *a, **k):
    f = real_open(path, mode, *a, **k)
    if '.checkpoint.pth.tmp-' in str(path):
        opened.append(path)
        if len(opened) == 2:  # the second checkpoint.pth (epoch 1) finds the disk full
            return Full(f)
    return f


builtins.open = open_on_a_full_disk
import train_hp
sys.exit(train_hp.cli(sys.argv[1:]))
"""


def _launch(kind: str, script: Any, argv: List[Any]) -> List[Tuple[int, str, str]]:
    """A 2-process run: 'torchrun' (one result: the launcher's) or 'srun' (two tasks as srun starts them)."""
    if kind == 'torchrun':
        cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', script, *argv]
        return _two_processes([cmd], [clean_env()])
    return _two_processes([[sys.executable, script, *argv]] * 2, _srun_envs(_slurm_job_with_free_port()))


ERROR_LINE = re.compile(r'^error(?: \[rank (\d)\])?: (.*)$', re.M)


def _first_error(results: List[Tuple[int, str, str]], cause: str) -> Tuple[str, str]:
    """(rank, line) of the one error line naming ``cause``: the first error line of its stream
    (under torchrun, the stream of every worker and the launcher)."""
    causes = [(err, m) for _, _, err in results for m in ERROR_LINE.finditer(err) if cause in m.group(2)]
    assert len(causes) == 1, [err[-3000:] for _, _, err in results]
    err, m = causes[0]
    assert next(ERROR_LINE.finditer(err)).group(0) == m.group(0), err[-3000:]
    return m.group(1) or '0', m.group(0)


@pytest.mark.parametrize('kind', ['torchrun', 'srun'])
def test_one_rank_with_an_unreadable_image_ends_every_rank(tmp_path, capsys, kind):
    from PIL import Image
    folder = tmp_path / 'folder'
    for split, n in (('train', 6), ('val', 2)):
        for c in ('a', 'b'):
            (folder / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new('RGB', (16, 16), (40 * i, 90 * (c == 'a'), 120)).save(folder / split / c / f'{i}.png')
    out = tmp_path / 'out'
    argv = TINY + ['--data-set', 'FOLDER', '--data-path', folder, '--batch-size', '2', '--no-repeated-aug',
                   '--no-model-ema', '--max-bad-images', '0', '--output_dir', out]
    assert run_cli(argv + ['--epochs', '1'], capsys)[0] == 0  # epoch 0 by one process, all images readable
    before = (out / 'checkpoint.pth').read_bytes()
    bad = folder / 'train' / 'b' / '4.png'
    bad.write_bytes(bad.read_bytes()[:60])  # one rank's shard now holds a truncated image
    results = _launch(kind, 'train_hp.py', argv + ['--epochs', '2', '--resume', out / 'checkpoint.pth'])
    assert all(rc != 0 for rc, _, _ in results), results
    rank, line = _first_error(results, 'unreadable images, more than --max-bad-images 0')
    assert str(bad) in line and 'OSError: image file is truncated' in line
    if kind == 'srun':  # the other task names what it met, after the cause
        other = results[1 - int(rank)]
        assert other[0] == 1 and 'another process ended first' in other[2]
    assert (out / 'checkpoint.pth').read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']


@pytest.mark.parametrize('kind', ['torchrun', 'srun'])
def test_rank_0_failing_to_write_its_checkpoint_ends_every_rank(tmp_path, kind):
    script = tmp_path / 'full_disk.py'
    script.write_text(FAIL_WRITE)
    out = tmp_path / 'out'
    results = _launch(kind, script, TINY + ['--train-subset', '64', '--no-model-ema', '--epochs', '2', '--output_dir', out])
    assert all(rc != 0 for rc, _, _ in results), results
    rank, line = _first_error(results, 'No space left on device')
    assert rank == '0' and line.startswith(f'error: cannot write {out / "checkpoint.pth"}: No space left on device; '
                                           'the previous checkpoint.pth, if any, is kept')
    if kind == 'srun':
        assert results[0][0] == 2 and results[1][0] == 1
    assert torch.load(out / 'checkpoint.pth', weights_only=True)['epoch'] == 0  # epoch 0's, intact
    assert sorted(p.name for p in out.iterdir()) == ['best.pth', 'checkpoint.pth', 'log.txt']  # no temp file left


# Flags that do what they say ------------------------------------------------------------------------

def test_device_cuda_index_is_honoured_or_refused_under_a_launcher(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    assert utils.resolve_device('cuda:1') == torch.device('cuda', 1)
    assert utils.resolve_device('cuda') == torch.device('cuda')
    with pytest.raises(utils.UsageError, match=r'--device cuda:2: only 2 CUDA device\(s\) are visible'):
        utils.resolve_device('cuda:2')
    for key, value in (('RANK', '0'), ('WORLD_SIZE', '2'), ('LOCAL_RANK', '0')):
        monkeypatch.setenv(key, value)
    args = train_hp.parse_args(['--device', 'cuda:1'])
    with pytest.raises(utils.UsageError, match='--device cuda:1 conflicts with the launcher'):
        utils.init_distributed(args, torch.device('cuda', 1))


def test_multistep_schedule_follows_decay_milestones():
    args = train_hp.parse_args(['--sched', 'multistep', '--decay-milestones', '2', '4', '--decay-rate', '0.5',
                                '--lr', '0.1', '--warmup-epochs', '0', '--epochs', '6'])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = train_hp.build_scheduler(args, opt)
    lrs = []
    for epoch in range(6):
        sched.step(epoch)
        lrs.append(opt.param_groups[0]['lr'])
    assert lrs == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    with pytest.raises(utils.UsageError, match='--decay-milestones must increase'):
        train_hp._check_flags(train_hp.parse_args(['--decay-milestones', '5', '3']))


def test_eval_freq_evaluates_every_nth_and_the_last_n_epochs(tmp_path, capsys):
    # --eval-freq 2 over 5 epochs: after epochs 1 and 3 (every 2nd) and 3, 4 (the last 2)
    assert [e for e in range(5) if train_hp.eval_due(e, 5, 2)] == [1, 3, 4]
    assert [e for e in range(3) if train_hp.eval_due(e, 3, 1)] == [0, 1, 2]  # default: every epoch, as DeiT
    out = tmp_path / 'run'
    rc, text, _ = run_cli(TINY + ['--epochs', '3', '--eval-freq', '2', '--output_dir', out], capsys)
    assert rc == 0
    rows = read_log(out / 'log.txt')
    assert [r['epoch'] for r in rows] == [0, 1, 2]
    assert ['test_acc1' in r for r in rows] == [False, True, True]
    assert ['test_ema_acc1' in r for r in rows] == [False, True, True]
    assert len(SUMMARY.findall(text)) == 4  # model and EMA, twice
    assert (out / 'best.pth').exists() and 'train_loss' in rows[0]
    rc, _, err = run_cli(TINY + ['--epochs', '1', '--eval-freq', '0', '--output_dir', tmp_path / 'bad'], capsys)
    assert rc == 2 and '--eval-freq must be at least 1' in err
