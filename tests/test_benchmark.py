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


def _tiny_bvit():
    import timm
    return timm.create_model('bvit_5m', stem='none', img_size=32, depth=2, embed_dim=32, num_heads=2, head_dim=16)


def test_autocast_reaches_the_forward_of_both_steps():
    """``--amp bf16``: the inference call and the training step run the model under bf16 autocast
    (the head's logits come out bf16); without it, float32."""
    from bvit.benchmark import _inference, _training
    x = torch.randn(2, 3, 32, 32)
    for amp, want in ((torch.bfloat16, torch.bfloat16), (None, torch.float32)):
        model = _tiny_bvit()
        dtypes = []
        model.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
        _inference(model.eval(), x, amp)()
        _training(model.train(), x, amp)()
        assert dtypes == [want, want]
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


def test_compile_builds_a_graph_for_every_model_and_mode():
    """``--compile``: each model of the suite runs through torch.compile (dynamo traces one graph
    per model and mode; the 'eager' backend checks the mechanism without a C compiler)."""
    from torch._dynamo.utils import counters
    from bvit.benchmark import _build
    torch._dynamo.reset()
    counters.clear()
    kwargs = dict(stem='none', depth=2, embed_dim=32, num_heads=2, head_dim=16)
    specs = [('a', 'bvit_5m', kwargs), ('b', 'bvit_5m', dict(kwargs, broad=False))]
    steps = _build(specs, ['infer', 'train'], torch.randn(2, 3, 32, 32), torch.bfloat16, 'eager')
    for step in steps.values():
        step()
    assert counters['stats']['unique_graphs'] >= 4, dict(counters['stats'])


def test_cli_states_bf16_and_compiled(tmp_path):
    out = _run(['-m', 'bvit.benchmark', '--batch-size', '2', '--img-size', '32', '--repeats', '1', '--iters', '1',
                '--threads', '1', '--no-memory', '--modes', 'infer', '--amp', 'bf16', '--compile', '--compile-backend', 'eager',
                '--json', str(tmp_path / 'b.json')])
    assert ', cpu, bf16 autocast, torch.compile(eager), batch 2 at 32x32;' in out.splitlines()[0]
    import json
    import math
    data = json.load(open(tmp_path / 'b.json'))
    assert (data['precision'], data['compiled']) == ('bf16 autocast', 'torch.compile(eager)')
    speeds = [row['infer'] for res in data['runs'] for row in res.values()]
    assert len(speeds) == 3 and all(math.isfinite(v) and v > 0 for v in speeds)
