"""Throughput and peak memory of BViT against its broad=False twin and DeiT, in one process.

    python -m bvit.benchmark                        # bvit_5m(stem='none'), its twin, deit_tiny_patch16_224
    python -m bvit.benchmark --alternate --runs 3   # one call at a time, spread over 3 runs
    python -m bvit.benchmark --suite full           # the cost table of docs/benchmarks.md (adds 22M, both stems, DeiT-S)
    python -m bvit.benchmark --suite released       # bvit_5m as released (conv stem) alone
    python -m bvit.benchmark --malloc retain        # glibc keeps freed memory: no page faults once warm
    python -m bvit.benchmark --head-share           # one BViT, broad attention on / off for alternate calls
    python -m bvit.benchmark --device cuda --compile  # bf16 autocast, batch 256, torch.compile (inductor)

Every model gets random weights. Two ways of timing, both side by side in one process so that
the machine's drifts hit all models alike:

- interleaved (default): each repeat times ``--iters`` calls of one model, then the next model;
- ``--alternate``: one call of each model in turn, each call timed by itself, so no model runs
  twice in a row (back-to-back calls of one model reuse the memory its last call just freed,
  which flatters a model that allocates a lot per call).

Images/s are medians over the repeats of a run; ratios are taken against the twin and the DeiT
of the same run. ``--runs`` repeats the whole measurement with fresh models and reports the
median ratio and its range over the runs. Peak memory is the most tensor memory alive during
one call beyond what was alive before it (activations, gradients, temporaries; not the weights),
from the allocations recorded by ``torch.profiler`` on the CPU or ``torch.cuda.max_memory_allocated``.
Minor page faults per call (``getrusage``) are printed beside the speeds: with glibc's default
allocator, whether a call maps its memory afresh depends on what ran before it in the process;
``--malloc retain`` takes that out (docs/benchmarks.md, "Page faults and the allocator", says by
how much it moved the models measured there). Inference is ``model(x)`` under ``torch.inference_mode()`` in eval
mode; a training step is forward, cross entropy, backward and an AdamW step in train mode.

On CUDA (``--device cuda``) the defaults are a batch of 256, bf16 autocast (``--amp bf16``; the
forward and the loss under ``torch.autocast``, as train_hp.py's ``--amp``) and TF32 float32
matmuls and convolutions (as engine.setup_tf32 sets them for training; ``--no-tf32``); every
timed span starts and ends with ``torch.cuda.synchronize``. ``--compile`` times each model
through ``torch.compile`` (``--compile-backend``, default inductor; compilation happens in the
untimed ``--warmup`` calls); the table's first line states the precision and eager or compiled.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import timm
from torch import nn

from torch.profiler import ProfilerActivity, profile

try:
    import resource
except ImportError:  # pragma: no cover  (not on Windows)
    resource = None

import bvit.models  # noqa: F401  (registers the BViT models)

# (label, timm name, kwargs)
Spec = Tuple[str, str, Dict]
SUITES: Dict[str, List[Spec]] = {
    'released': [  # what train_hp.py --arch BViT-5 trains: gpu_check's model-only rate beside its pipelines
        ('bvit_5m(stem=conv)', 'bvit_5m', dict(stem='conv')),
    ],
    'default': [
        ('bvit_5m(stem=none)', 'bvit_5m', dict(stem='none')),
        ('bvit_5m(stem=none, broad=False)', 'bvit_5m', dict(stem='none', broad=False)),
        ('deit_tiny_patch16_224', 'deit_tiny_patch16_224', {}),
    ],
    'full': [
        ('bvit_5m(stem=conv)', 'bvit_5m', dict(stem='conv')),
        ('bvit_5m(stem=conv, broad=False)', 'bvit_5m', dict(stem='conv', broad=False)),
        ('bvit_5m(stem=none)', 'bvit_5m', dict(stem='none')),
        ('bvit_5m(stem=none, broad=False)', 'bvit_5m', dict(stem='none', broad=False)),
        ('deit_tiny_patch16_224', 'deit_tiny_patch16_224', {}),
        ('bvit_22m(stem=conv)', 'bvit_22m', dict(stem='conv')),
        ('bvit_22m(stem=conv, broad=False)', 'bvit_22m', dict(stem='conv', broad=False)),
        ('bvit_22m(stem=none)', 'bvit_22m', dict(stem='none')),
        ('bvit_22m(stem=none, broad=False)', 'bvit_22m', dict(stem='none', broad=False)),
        ('deit_small_patch16_224', 'deit_small_patch16_224', {}),
    ],
}


def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Any:
    """``torch.autocast`` in ``amp_dtype`` on ``device`` (a no-op context for None: float32)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _inference(model: nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), _autocast(x.device, amp_dtype):
            model(x)
    return step


def _training(model: nn.Module, x: torch.Tensor, amp_dtype: Optional[torch.dtype] = None) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(x.device, amp_dtype):
            loss = loss_fn(model(x), target)
        loss.backward()
        opt.step()
    return step


def retain_freed_memory() -> None:
    """glibc: keep freed memory in the process (no trimming of the heap, no separate mappings
    for large blocks), so that calls reuse memory earlier calls touched, much as jemalloc or
    tcmalloc do. By default glibc maps large blocks afresh and gives memory back, by thresholds
    it adapts as the process runs, so whether a call page-faults its memory in again depends on
    what ran before it (measured counts: docs/benchmarks.md, "Page faults and the allocator").
    SystemExit where the C library has no ``mallopt`` (not glibc). The same from the shell:
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647."""
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = getattr(libc, 'mallopt', None)
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    if mallopt is None or not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1)):
        raise SystemExit('--malloc retain needs glibc (mallopt); this C library has none')


def _minor_faults() -> int:
    """Minor page faults of this process so far (first touches of memory new to it); 0 without ``resource``."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource is not None else 0


def _time(fn: Callable[[], None], iters: int, device: torch.device = torch.device('cpu')) -> float:
    """Seconds of ``iters`` calls of ``fn``, the device's queue empty at the start and the end."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def count_ops(fn: Callable[[], None]) -> int:
    """The aten operations one call of ``fn`` dispatches that are not views: on a GPU, each is a
    kernel launch (counted with a ``TorchDispatchMode``, below autograd, so a backward pass counts too)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.n += not func.is_view
            return func(*args, **(kwargs or {}))

    with _Count() as counter:
        fn()
    return counter.n


def broad_ops(name: str, kwargs: Dict, batch_size: int, img_size: int) -> Dict[str, Tuple[int, int]]:
    """Operations (``count_ops``) of a BViT and of its broad=False twin: inference (``model(x)``,
    no grad, eval mode) and a forward and backward pass (``model(x).sum().backward()``, train mode)."""
    x = torch.randn(batch_size, 3, img_size, img_size)
    out: Dict[str, Tuple[int, int]] = {}
    for mode in ('infer', 'fwd+bwd'):
        counts = []
        for broad in (True, False):
            torch.manual_seed(0)
            model = timm.create_model(name, **{**kwargs, 'broad': broad}).train(mode != 'infer')
            if mode == 'infer':
                with torch.no_grad():
                    counts.append(count_ops(lambda: model(x)))
            else:
                counts.append(count_ops(lambda: model(x).sum().backward()))
        out[mode] = (counts[0], counts[1])
    return out


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Most tensor memory (MiB) alive during one call of ``fn`` beyond what was alive before.

    On the CPU: the running sum of every allocation and free ``torch.profiler`` records in the
    call (the ``[memory]`` events of its trace, each with its ``Bytes``), in time order. The
    per-op ``self_cpu_memory_usage`` of ``prof.events()`` cannot give this: it is each op's
    allocations net of its frees, so an op that frees (an autograd node dropping its saved
    tensors) and one that allocates a temporary and frees it again both hide what they did.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'trace.json')
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)['traceEvents']
    # Frees of memory allocated before the call are not recorded (the profiler does not know
    # their size), so the sum starts from 0 at the call's start.
    changes = sorted((e['ts'], e['args']['Bytes']) for e in events
                     if e.get('name') == '[memory]' and e['args'].get('Device Type', 0) == 0)
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak / 2 ** 20


def _build(specs: List[Spec], modes: List[str], x: torch.Tensor, amp_dtype: Optional[torch.dtype] = None,
           compile_backend: Optional[str] = None) -> Dict[Tuple[str, str], Callable[[], None]]:
    """One step function per model label and mode, each with a model of its own (through
    ``torch.compile(backend=compile_backend)`` unless that is None)."""
    steps: Dict[Tuple[str, str], Callable[[], None]] = {}
    for label, name, kwargs in specs:
        for mode in modes:
            model = timm.create_model(name, img_size=x.shape[-1], **kwargs).to(x.device)
            model.train(mode == 'train')
            if compile_backend is not None:
                model = torch.compile(model, backend=compile_backend)
            steps[label, mode] = (_training if mode == 'train' else _inference)(model, x, amp_dtype)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run(specs: List[Spec], batch_size: int, img_size: int, repeats: int, iters: int,
        warmup: int, modes: List[str], alternate: bool = False, memory: bool = False,
        device: torch.device = torch.device('cpu'), amp_dtype: Optional[torch.dtype] = None,
        compile_backend: Optional[str] = None) -> Dict[str, Dict[str, float]]:
    """Images/s per model label and mode ('infer', 'train'): medians over ``repeats``; '<mode>
    faults', the median minor page faults of one call; with ``memory`` also '<mode> MiB', the
    peak memory of one call. ``amp_dtype``: autocast dtype (None: float32); ``compile_backend``:
    each model through ``torch.compile`` with that backend (None: eager)."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    steps = _build(specs, modes, x, amp_dtype, compile_backend)
    for fn in steps.values():
        _time(fn, warmup, device)
    samples: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    faults: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    for r in range(repeats):
        spent = dict.fromkeys(steps, 0.)
        if alternate:
            for _ in range(iters):
                for key, fn in steps.items():
                    _sync(device)
                    f0, t0 = _minor_faults(), time.perf_counter()
                    fn()
                    _sync(device)
                    spent[key] += time.perf_counter() - t0
                    faults[key].append(_minor_faults() - f0)
        else:
            for key, fn in steps.items():
                f0 = _minor_faults()
                spent[key] = _time(fn, iters, device)
                faults[key].append((_minor_faults() - f0) / iters)
        for key in steps:
            samples[key].append(batch_size * iters / spent[key])
        print(f'repeat {r + 1}/{repeats} done', file=sys.stderr, flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for (label, mode), values in samples.items():
        out.setdefault(label, {})[mode] = statistics.median(values)
        out[label][f'{mode} faults'] = statistics.median(faults[label, mode])
        if memory:
            out[label][f'{mode} MiB'] = peak_memory_mb(steps[label, mode], device)
    return out


def ratios(res: Dict[str, Dict[str, float]], specs: List[Spec], modes: List[str]) -> Dict[str, Dict[str, float]]:
    """Per label and mode: 'x DeiT' and 'x twin' throughput ratios within one run (NaN if absent)."""
    refs = {'bvit_5m': 'deit_tiny_patch16_224', 'bvit_22m': 'deit_small_patch16_224'}
    out: Dict[str, Dict[str, float]] = {}
    for label, name, kwargs in specs:
        ref = refs.get(name, name)
        twin = label.replace(')', ', broad=False)') if kwargs.get('broad', True) and name.startswith('bvit') else None
        for m in modes:
            v = res[label][m]
            out.setdefault(label, {})[f'{m} x DeiT'] = v / res[ref][m] if ref in res else float('nan')
            out[label][f'{m} x twin'] = v / res[twin][m] if twin in res else float('nan')
    return out


def head_share(name: str, kwargs: Dict, batch_size: int, img_size: int, repeats: int,
               device: torch.device = torch.device('cpu'), modes: Tuple[str, ...] = ('infer', 'train'),
               ) -> Dict[str, List[float]]:
    """The broad head's share of a call: one model, its ``broad`` switched on and off for
    alternate calls (so weights, input and machine state are the same), share = 1 - t_off / t_on
    per adjacent pair. Everything the head costs counts: its products, its memory, and what
    they do to the rest of the call. Returns per mode of ``modes`` ('infer', 'train') the
    ``repeats`` shares.
    """
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    out: Dict[str, List[float]] = {}
    for mode in modes:
        model = timm.create_model(name, **kwargs).to(device).train(mode == 'train')
        step = (_training if mode == 'train' else _inference)(model, x)
        for broad in (True, False):
            model.broad = broad
            step()
        shares = []
        for _ in range(repeats):
            spent = []
            for broad in (True, False):
                model.broad = broad
                _sync(device)
                t0 = time.perf_counter()
                step()
                _sync(device)
                spent.append(time.perf_counter() - t0)
            shares.append(1 - spent[1] / spent[0])
        out[mode] = shares
    return out


def _quartiles(shares: List[float]) -> str:
    """'median% [q1%, q3%]' of a list of fractions."""
    q1, q2, q3 = statistics.quantiles(shares, n=4) if len(shares) > 1 else shares * 3
    return f'{100 * q2:5.2f}% [{100 * q1:5.2f}, {100 * q3:5.2f}]'


def _spread(values: List[float]) -> str:
    if any(v != v for v in values):
        return f"{'-':>19s}"
    return f'{statistics.median(values):7.3f} [{min(values):.3f}-{max(values):.3f}]'


def _device_name(device: torch.device) -> str:
    """'cpu', or 'cuda (<the GPU's name>)'."""
    return f'cuda ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else device.type


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=sorted(SUITES), default='default', help='which models to compare')
    parser.add_argument('--batch-size', type=int, default=None, help='images per step (default: 256 on CUDA, 32 '
                        'on the CPU)')
    parser.add_argument('--img-size', type=int, default=224, help='input resolution')
    parser.add_argument('--repeats', type=int, default=7, help='repeats per run; medians are reported')
    parser.add_argument('--iters', type=int, default=2, help='steps timed per model per repeat')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model before timing')
    parser.add_argument('--runs', type=int, default=1, help='whole measurements with fresh models; the ratios '
                        'are reported as median [min-max] over the runs')
    parser.add_argument('--alternate', action='store_true', help='time one call of each model in turn '
                        '(default: --iters calls of one model, then the next)')
    parser.add_argument('--no-memory', action='store_true', help='skip the peak-memory measurement')
    parser.add_argument('--modes', default='infer,train', help="comma list of 'infer' and 'train'")
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--amp', choices=['none', 'bf16'], default=None, help='autocast dtype of the forward and '
                        "the loss (default: bf16 on CUDA, none (float32) on the CPU)")
    parser.add_argument('--no-tf32', action='store_true', help='CUDA: float32 matmuls and convolutions in full '
                        'float32 (default: TF32, as train_hp.py sets them)')
    parser.add_argument('--compile', action='store_true', help='time every model through torch.compile '
                        '(compiled in the untimed --warmup calls; default: eager)')
    parser.add_argument('--compile-backend', default='inductor', help="torch.compile's backend with --compile "
                        "(inductor; on the CPU 'aot_eager' or 'eager' check the mechanism without a C compiler)")
    parser.add_argument('--malloc', choices=['default', 'retain'], default='default',
                        help="'retain': glibc keeps freed memory (no heap trimming, no separate mappings for large "
                        "blocks), so calls reuse memory instead of faulting it in afresh (see retain_freed_memory); "
                        "'default': the C library as it is")
    parser.add_argument('--head-share', action='store_true', help="only measure the broad head's share of each "
                        'BViT call in the --modes given: one model, broad attention on and off for alternate '
                        'calls, --repeats pairs')
    parser.add_argument('--count-ops', action='store_true', help='only count the aten operations (not views) of '
                        'each BViT and its broad=False twin, inference and a forward and backward pass')
    parser.add_argument('--json', default='', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.batch_size is None:
        args.batch_size = 256 if device.type == 'cuda' else 32
    if args.amp is None:
        args.amp = 'bf16' if device.type == 'cuda' else 'none'
    amp_dtype = torch.bfloat16 if args.amp == 'bf16' else None
    if args.compile and args.warmup < 1:
        parser.error('--compile needs --warmup 1 or more (the compilation is not timed)')
    if device.type == 'cuda':  # as engine.setup_tf32 does for training (bvit does not import the training scripts)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not args.no_tf32
    tf32 = ', TF32' if device.type == 'cuda' and not args.no_tf32 else ''
    precision = (f'{args.amp} autocast' if amp_dtype is not None else 'float32') + tf32
    compiled = f'torch.compile({args.compile_backend})' if args.compile else 'eager'
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc == 'retain':
        retain_freed_memory()
    modes = [m for m in args.modes.split(',') if m]
    specs = SUITES[args.suite]
    if args.head_share:
        print(f'# broad head share of each call (1 - t(broad off) / t(broad on), same model, adjacent calls): '
              f'median [quartiles] of {args.repeats} pairs, batch {args.batch_size} at {args.img_size}x{args.img_size}, '
              f'{torch.get_num_threads()} threads, {args.device}, malloc {args.malloc}')
        for label, name, kwargs in specs:
            if name.startswith('bvit') and kwargs.get('broad', True):
                share = head_share(name, kwargs, args.batch_size, args.img_size, args.repeats, device, tuple(modes))
                print(f'{label:34s}' + ''.join(f'  {m} {_quartiles(v)}' for m, v in share.items()))
        return
    if args.count_ops:
        print(f'# aten operations that are not views, BViT / its broad=False twin (+ per layer), '
              f'batch {args.batch_size} at {args.img_size}x{args.img_size}')
        for label, name, kwargs in specs:
            if name.startswith('bvit') and kwargs.get('broad', True):
                layers = len(timm.create_model(name, **kwargs).blocks)
                ops = broad_ops(name, kwargs, args.batch_size, args.img_size)
                print(f'{label:34s}' + ''.join(f'  {m} {a} / {b} (+{(a - b) / layers:.2f})' for m, (a, b) in ops.items()))
        return
    results = []
    for _ in range(args.runs):
        results.append(run(specs, args.batch_size, args.img_size, args.repeats, args.iters, args.warmup, modes,
                           alternate=args.alternate, memory=not args.no_memory, device=device, amp_dtype=amp_dtype,
                           compile_backend=args.compile_backend if args.compile else None))
    rel = [ratios(res, specs, modes) for res in results]

    how = 'one call at a time, alternating' if args.alternate else f'{args.iters} calls per model, interleaved'
    print(f'# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads, {_device_name(device)}, {precision}, {compiled}, '
          f'batch {args.batch_size} at {args.img_size}x{args.img_size}; '
          f'{how}; median of {args.repeats} repeats x {args.iters} steps per run, {args.runs} run(s): '
          f'ratios are median [min-max] over runs; malloc {args.malloc}; faults: minor page faults per call')
    header = f"{'model':34s}" + ''.join(f'{m + " img/s":>12s}{"x DeiT":>20s}{"x twin":>20s}' for m in modes)
    header += ''.join(f'{m + " faults":>14s}' for m in modes)
    if not args.no_memory:
        header += ''.join(f'{m + " MiB":>11s}' for m in modes)
    print(header)
    for label, _, _ in specs:
        row = f'{label:34s}'
        for m in modes:
            row += f'{statistics.median(r[label][m] for r in results):12.1f}'
            row += f' {_spread([r[label][f"{m} x DeiT"] for r in rel]):>19s}'
            row += f' {_spread([r[label][f"{m} x twin"] for r in rel]):>19s}'
        row += ''.join(f'{statistics.median(r[label][f"{m} faults"] for r in results):14.0f}' for m in modes)
        if not args.no_memory:
            row += ''.join(f'{statistics.median(r[label][f"{m} MiB"] for r in results):11.1f}' for m in modes)
        print(row)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'torch': torch.__version__, 'device': _device_name(device),
                       'precision': precision, 'compiled': compiled, 'runs': results, 'ratios': rel}, f, indent=1)


if __name__ == '__main__':
    main()
