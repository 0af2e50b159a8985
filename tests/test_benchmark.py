"""bvit.benchmark: its command line in both harnesses, the head-share mode, and what
``--malloc retain`` does to the C library (each in a subprocess: it changes the process's allocator)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args):
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.mark.parametrize('harness', [['--alternate'], []])
def test_table_has_every_model_with_ratios_and_faults(harness):
    out = _run(['-m', 'bvit.benchmark'] + harness + ['--batch-size', '1', '--repeats', '2', '--iters', '1', '--modes', 'infer',
                          '--no-memory', '--malloc', 'retain', '--threads', '1'])
    lines = out.strip().splitlines()
    assert 'malloc retain' in lines[0]
    assert ('one call at a time' in lines[0]) == bool(harness)
    assert lines[1].split()[:2] == ['model', 'infer']
    rows = {line[:34].strip(): line[34:].split() for line in lines[2:]}
    assert list(rows) == ['bvit_5m(stem=none)', 'bvit_5m(stem=none, broad=False)', 'deit_tiny_patch16_224']
    bvit, twin, deit = rows.values()
    # img/s, x DeiT median [min-max], x twin median [min-max] (or '-'), faults per call
    assert float(bvit[0]) > 0 and float(bvit[1]) > 0 and float(bvit[3]) > 0 and float(bvit[-1]) >= 0
    assert deit[1] == '1.000' and twin[3] == '-'


def test_head_share_pairs_one_model_on_and_off():
    out = _run(['-m', 'bvit.benchmark', '--head-share', '--batch-size', '1', '--repeats', '3', '--modes', 'infer', '--threads', '1'])
    lines = out.strip().splitlines()
    assert 'broad off' in lines[0] and '3 pairs' in lines[0]
    assert len(lines) == 2 and lines[1].startswith('bvit_5m(stem=none)')
    median = float(lines[1].split('infer')[1].split('%')[0])
    assert -100 < median < 100 and 'train' not in lines[1]


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt, /proc/self/maps')
def test_retain_serves_large_tensors_from_the_heap():
    """By default glibc gives a 64 MiB tensor a mapping of its own, unmapped when it is freed (so
    its pages are faulted in again next time); ``--malloc retain`` serves it from the heap."""
    code = textwrap.dedent('''
        import sys, torch
        from bvit.benchmark import retain_freed_memory
        if sys.argv[1] == 'retain':
            retain_freed_memory()
        t = torch.empty(16 * 2 ** 20)
        ptr = t.data_ptr()
        for line in open('/proc/self/maps'):
            span, *rest = line.split()
            lo, hi = (int(v, 16) for v in span.split('-'))
            if lo <= ptr < hi:
                print(rest[-1] if len(rest) == 5 else 'anonymous')
    ''')
    where = {mode: _run(['-c', code, mode]).split()[-1] for mode in ('default', 'retain')}
    assert where == {'default': 'anonymous', 'retain': '[heap]'}, where


def test_peak_memory_counts_the_frees_inside_ops():
    """A chain of 10 sines on a 4 MiB tensor keeps the 10 inputs for backward (40 MiB), and the
    backward frees each as it goes, holding only a gradient or two beside them: the peak is
    40-52 MiB. Counting each op's net self memory instead drops the frees made inside the
    autograd nodes and reads 120."""
    from bvit.benchmark import peak_memory_mb
    x = torch.randn(2 ** 20, requires_grad=True)

    def step():
        y = x
        for _ in range(10):
            y = torch.sin(y)
        y.sum().backward()
        x.grad = None
    step()
    peak = peak_memory_mb(step, torch.device('cpu'))
    assert 40 <= peak <= 52, peak
