"""Tests of how training runs are launched and how they end: torchrun with 2 processes, the legacy
torch.distributed.launch, plain python, SLURM (srun tasks, two nodes), preemption (SIGTERM /
SIGINT, exact resume), unreadable images, one rank failing, and the first-GPU checks
(FAKE data, TF32, scripts/gpu_check.sh in its CPU form). Tiny DIGITS runs on CPU, as real
processes where the launcher is what is tested."""
from __future__ import annotations

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
from train_helpers import (REPO, SUMMARY, TINY, _loader, _Tiny, clean_env, free_port, read_log, run_cli,
                           run_process)
import torch
from torch import nn

import preemption
import train_hp
import engine
import utils
from engine import train_one_epoch
from losses import DistillationLoss


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


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


# Preemption: SIGTERM / SIGINT, exact resume -------------------------------------------------------

# 10 steps per epoch, a progress line after every step
# RandAugment and erasing on: --pipeline fast draws them in the training process and on the device
PREEMPT = TINY + ['--batch-size', '16', '--train-subset', '160', '--print-freq', '1', '--epochs', '2',
                  '--deterministic', '--aa', 'rand-m9-mstd0.5-inc1', '--reprob', '0.25']


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
    # the handlers this process had before the run (a pytest-xdist worker ignores SIGINT)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    out = tmp_path / 'out'
    rc, stdout, err = run_cli(TINY + ['--epochs', '2', '--output_dir', out], capsys)
    monkeypatch.setattr(torch, 'save', real_save)
    monkeypatch.setattr(train_hp, 'build_model', real_build)
    assert rc == 3 and err == ''
    assert 'stopped by SIGINT at epoch 0, iteration 2/4' in stdout
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
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


# First GPU: FAKE data, TF32, scripts/gpu_check.sh ------------------------------------------------------

def test_fake_data_is_fixed_per_index_and_learnable(tmp_path):
    import random
    import datasets
    flags = ['--data-set', 'FAKE', '--input-size', '16', '--fake-size', '40', '--fake-val-size', '12',
             '--fake-classes', '5', '--aa', 'none', '--reprob', '0']
    args = train_hp.parse_args(flags + ['--pipeline', 'deit'])
    train, val, classes = datasets.build_datasets(args)
    assert (len(train), len(val), classes) == (40, 12, 5)
    (a, y), (b, z) = val[3], val[3]
    assert torch.equal(a, b) and y == z and a.shape == (3, 16, 16)  # the same image and label every time
    assert not torch.equal(val[0][0], datasets.build_datasets(args)[0][0][0])  # the splits differ
    plain = datasets.FakeImages(12, 16, 5, False, val.transform, signal=0.0)
    x, t = plain[3]
    assert t == y and (a - x - 0.5 * val.patterns[y]).abs().max() < 1e-6  # --fake-signal 0.5: its class pattern
    assert torch.equal(val.patterns, datasets.FakeImages(12, 16, 5, True, None, 0.5).patterns)  # fixed patterns
    fast = datasets.build_datasets(train_hp.parse_args(flags))[0]  # --pipeline fast: uint8, the pattern in levels
    random.seed(0), torch.manual_seed(0)
    (img, ops), t = fast[3]
    random.seed(0), torch.manual_seed(0)
    (plain_img, _), _ = datasets.FakeImages(40, 16, 5, True, fast.transform, 0.0)[3]
    expected = (plain_img.float() + 0.5 * fast.std255 * fast.patterns[t]).round().clamp(0, 255).to(torch.uint8)
    assert img.dtype == torch.uint8 and ops.shape == (0, 3) and torch.equal(img, expected)
    assert not torch.equal(img, plain_img)


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


def _gpu_check(tmp_path: Path, only: str, **extra_env: str) -> Dict[str, Tuple[str, str]]:
    env = clean_env()
    env['PYTHON'] = sys.executable
    env.update(extra_env)
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


def test_gpu_check_cpu_form_fp16(tmp_path):
    status, what = _gpu_check(tmp_path, 'fp16')['fp16']
    assert status == 'ok', what


def test_gpu_check_cpu_form_speed(tmp_path):
    status, what = _gpu_check(tmp_path, 'speed')['speed']
    assert status == 'ok', what
    assert re.match(r'bvit_5m \d+ img/s, deit_tiny \d+ img/s \([\d.]+x\) at batch 16 per process, 2 processes$', what)


def test_gpu_check_cpu_form_compile(tmp_path):
    status, what = _gpu_check(tmp_path, 'compile')['compile']
    assert status == 'ok', what


def test_gpu_check_cpu_form_pipeline(tmp_path):
    """Both input pipelines on JPEGs the script writes: the loader alone, training, the model alone."""
    status, what = _gpu_check(tmp_path, 'pipeline')['pipeline']
    assert status == 'ok', what
    assert re.match(r'deit: training \d+ img/s = [\d.]+ of the model alone, loader alone \d+ img/s, \d+/core; '
                    r'fast: training .*; model alone \d+ img/s; fast/deit per core [\d.]+x$', what)
    out = tmp_path / 'out' / 'pipeline'
    for p in ('deit', 'fast'):
        assert f'pipeline {p}; 32 images of 32 px' in (out / f'data-{p}.log').read_text()
        assert len(read_log(out / f'train-{p}' / 'log.txt')) == 1
    assert not (out / 'photos').exists()


def test_gpu_check_cpu_form_model_speed_and_fmnist(tmp_path):
    """The two single-process rows: bvit.benchmark eager and compiled (bf16), and the GPU-scale
    Fashion-MNIST study reduced (2 seeds, 2 epochs, 512 images of a learnable stand-in)."""
    from test_fmnist_gpu import write_learnable_fmnist
    rows = _gpu_check(tmp_path, 'model-speed,fmnist', FMNIST=str(write_learnable_fmnist(tmp_path / 'fmnist')))
    assert all(status == 'ok' for status, _ in rows.values()), rows
    assert re.match(r'bvit_5m\(stem=none\) eager: infer \d+ img/s x[\d.]+ twin x[\d.]+ DeiT, train .*; '
                    r'torch\.compile\(eager\): infer .*; bf16 autocast, batch 2 at 32$', rows['model-speed'][1])
    assert re.match(r'2 seeds x 2, 2 epochs: EMA top-1 BViT [\d.]+, twin [\d.]+; BViT - twin [-+][\d.]+ '
                    r'\[[-+][\d.]+, [-+][\d.]+\] \(95% t\); converged 0/4; \d+ img/s', rows['fmnist'][1])
    out = tmp_path / 'out'
    for kind in ('eager', 'compiled'):
        bench = json.loads((out / 'model-speed' / f'{kind}.json').read_text())
        speeds = [v[m] for v in bench['runs'][0].values() for m in ('infer', 'train')]
        assert len(speeds) == 6 and all(math.isfinite(v) and v > 0 for v in speeds)
    study = json.loads((out / 'fmnist' / 'fmnist.json').read_text())
    assert len(study['results']) == 4 and study['summary']['paired']['seeds'] == [0, 1]
    assert all(math.isfinite(v) for r in study['results'] for v in r['curve'] + r['raw_curve'] + r['train_loss'])
    assert '| BViT: broad 0.4 − no broad (twin) | 2 |' in (out / 'fmnist' / 'fmnist.md').read_text()
    # each row is written down as soon as it is known (a command cut off later keeps them)
    assert [line.split()[:2] for line in (out / 'summary.txt').read_text().splitlines()] == [
        ['model-speed', 'ok'], ['fmnist', 'ok']]


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
