"""Tests of train_hp.py: its flags and --config, bad input, checkpoints and resume, loading weights,
models other than BViT: tiny DIGITS runs on CPU, in-process where possible. The training loop,
losses and mixed precision are in test_train_engine.py; launchers, preemption, SLURM and failing
ranks in test_train_launch.py."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
from conftest import released_file_10_classes
from train_helpers import REPO, SUMMARY, TINY, cosine_lr, read_log, run_cli, run_process
import torch
import torch.nn.functional as F
from torch import nn

import preemption
import train_hp
import config
import engine
import resume
import utils
from timm.utils import NativeScaler

GOLDEN = REPO / 'tests' / 'fixtures' / 'official_bvit_5m_golden.pt'


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


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
        'checkpoint of other broad layers': (TINY + ['--resume', ckpt, '--broad-layers', '2'],
                                             'was trained with every block feeding the broad attention, but this run has --broad-layers 2'),
        'broad layers not a number': (TINY + ['--broad-layers', 'last'], "--broad-layers 'last': give k"),
        'broad layers without broad': (TINY + ['--no-broad', '--broad-layers', '2'], '--broad-layers needs broad attention'),
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
