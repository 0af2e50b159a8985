"""Throughput and peak memory of BViT against its broad=False twin and DeiT, in one process.

    python -m bvit.benchmark                        # bvit_5m(stem='none'), its twin, deit_tiny_patch16_224
    python -m bvit.benchmark --alternate --runs 3   # one call at a time, spread over 3 runs
    python -m bvit.benchmark --suite full           # the README's cost table (adds 22M, both stems, DeiT-S)

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
Inference is ``model(x)`` under ``torch.inference_mode()`` in eval mode; a training step is
forward, cross entropy, backward and an AdamW step in train mode.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch
import timm
from torch import nn

from torch.profiler import ProfilerActivity, profile

import bvit.models  # noqa: F401  (registers the BViT models)

# (label, timm name, kwargs)
Spec = Tuple[str, str, Dict]
SUITES: Dict[str, List[Spec]] = {
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


def _inference(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode():
            model(x)
    return step


def _training(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0)).to(x.device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), target).backward()
        opt.step()
    return step


def _time(fn: Callable[[], None], iters: int) -> float:
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return time.perf_counter() - t0


def peak_memory_mb(fn: Callable[[], None], device: torch.device) -> float:
    """Most tensor memory (MiB) alive during one call of ``fn`` beyond what was alive before."""
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them (self memory), frees are '[memory]' events.
    timeline = []
    for e in prof.events():
        if e.name == '[memory]':
            if e.cpu_memory_usage < 0:
                timeline.append((e.time_range.start, e.cpu_memory_usage))
        elif e.self_cpu_memory_usage > 0:
            timeline.append((e.time_range.start, e.self_cpu_memory_usage))
    live = peak = 0
    for _, delta in sorted(timeline):
        live += delta
        peak = max(peak, live)
    return peak / 2 ** 20


def _build(specs: List[Spec], modes: List[str], x: torch.Tensor) -> Dict[Tuple[str, str], Callable[[], None]]:
    steps: Dict[Tuple[str, str], Callable[[], None]] = {}
    for label, name, kwargs in specs:
        for mode in modes:
            model = timm.create_model(name, **kwargs).to(x.device)
            model.train(mode == 'train')
            steps[label, mode] = (_training if mode == 'train' else _inference)(model, x)
    return steps


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def run(specs: List[Spec], batch_size: int, img_size: int, repeats: int, iters: int,
        warmup: int, modes: List[str], alternate: bool = False, memory: bool = False,
        device: torch.device = torch.device('cpu')) -> Dict[str, Dict[str, float]]:
    """Images/s per model label and mode ('infer', 'train'): medians over ``repeats``; with
    ``memory`` also '<mode> MiB', the peak memory of one call."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    steps = _build(specs, modes, x)
    for fn in steps.values():
        _time(fn, warmup)
    samples: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    for r in range(repeats):
        if alternate:
            spent = dict.fromkeys(steps, 0.)
            for _ in range(iters):
                for key, fn in steps.items():
                    _sync(device)
                    t0 = time.perf_counter()
                    fn()
                    _sync(device)
                    spent[key] += time.perf_counter() - t0
            for key in steps:
                samples[key].append(batch_size * iters / spent[key])
        else:
            for key, fn in steps.items():
                samples[key].append(batch_size * iters / _time(fn, iters))
        print(f'repeat {r + 1}/{repeats} done', file=sys.stderr, flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for (label, mode), values in samples.items():
        out.setdefault(label, {})[mode] = statistics.median(values)
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
               device: torch.device = torch.device('cpu')) -> Dict[str, float]:
    """The class-row broad head's own time as a share of the whole call, alternating the two:

    - 'infer': the streamed per-layer head ops (``BViT._stream_layer`` on each block's q, k and
      attention input, then ``BViT._stream_finish``) against ``model(x)`` in inference;
    - 'train': forward and backward of ``broad_attention_class_row`` on the blocks' attention
      inputs against a whole training step (forward, backward, AdamW).
    """
    from bvit.layers import broad_attention_class_row
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size, device=device)
    model = timm.create_model(name, **kwargs).to(device).eval()
    H, d, D = model.num_heads, model.head_dim, model.embed_dim
    with torch.inference_mode():
        _, qkvs, ys = model._run_blocks(model._embed(x), keep=True)

    def head_infer() -> None:
        with torch.inference_mode():
            logits, pieces = None, []
            for i, ((q, k, _), y) in enumerate(zip(qkvs, ys)):
                s, piece = model._stream_layer(i, q, k, y)
                logits = s if logits is None else logits.add_(s)
                pieces.append(piece)
            model._stream_finish(logits, pieces)

    weights = [blk.attn.qkv.weight for blk in model.blocks]
    leaves = [y.clone().requires_grad_() for y in ys]

    def head_train() -> None:
        broad_attention_class_row(leaves, weights, None, H, d, D).sum().backward()

    pairs = {'infer': (head_infer, _inference(model, x)),
             'train': (head_train, _training(timm.create_model(name, **kwargs).to(device).train(), x))}
    out = {}
    for mode, (head, whole) in pairs.items():
        head(), whole()
        shares = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            head()
            _sync(device)
            t1 = time.perf_counter()
            whole()
            _sync(device)
            shares.append((t1 - t0) / (time.perf_counter() - t1))
        out[mode] = statistics.median(shares)
    return out


def _spread(values: List[float]) -> str:
    if any(v != v for v in values):
        return f"{'-':>19s}"
    return f'{statistics.median(values):7.3f} [{min(values):.3f}-{max(values):.3f}]'


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=sorted(SUITES), default='default', help='which models to compare')
    parser.add_argument('--batch-size', type=int, default=32, help='images per step')
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
    parser.add_argument('--head-share', action='store_true', help="only measure the broad head's own share of "
                        'each BViT call (inference and training), alternating head and whole call')
    parser.add_argument('--json', default='', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(',') if m]
    specs = SUITES[args.suite]
    device = torch.device(args.device)
    if args.head_share:
        print(f'# broad head share of each call, median of {args.repeats} alternating pairs, batch {args.batch_size} '
              f'at {args.img_size}x{args.img_size}, {torch.get_num_threads()} threads, {args.device}')
        for label, name, kwargs in specs:
            if name.startswith('bvit') and kwargs.get('broad', True):
                share = head_share(name, kwargs, args.batch_size, args.img_size, args.repeats, device)
                print(f"{label:34s} inference {100 * share['infer']:5.2f}%   training step {100 * share['train']:5.2f}%")
        return
    results = []
    for _ in range(args.runs):
        results.append(run(specs, args.batch_size, args.img_size, args.repeats, args.iters, args.warmup, modes,
                           alternate=args.alternate, memory=not args.no_memory, device=device))
    rel = [ratios(res, specs, modes) for res in results]

    how = 'one call at a time, alternating' if args.alternate else f'{args.iters} calls per model, interleaved'
    print(f'# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads, {args.device}, batch {args.batch_size} at {args.img_size}x{args.img_size}; '
          f'{how}; median of {args.repeats} repeats x {args.iters} steps per run, {args.runs} run(s): '
          f'ratios are median [min-max] over runs')
    header = f"{'model':34s}" + ''.join(f'{m + " img/s":>12s}{"x DeiT":>20s}{"x twin":>20s}' for m in modes)
    if not args.no_memory:
        header += ''.join(f'{m + " MiB":>11s}' for m in modes)
    print(header)
    for label, _, _ in specs:
        row = f'{label:34s}'
        for m in modes:
            row += f'{statistics.median(r[label][m] for r in results):12.1f}'
            row += f' {_spread([r[label][f"{m} x DeiT"] for r in rel]):>19s}'
            row += f' {_spread([r[label][f"{m} x twin"] for r in rel]):>19s}'
        if not args.no_memory:
            row += ''.join(f'{statistics.median(r[label][f"{m} MiB"] for r in results):11.1f}' for m in modes)
        print(row)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'torch': torch.__version__, 'runs': results, 'ratios': rel}, f, indent=1)


if __name__ == '__main__':
    main()
