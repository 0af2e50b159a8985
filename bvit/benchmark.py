"""Throughput of BViT against its broad=False twin and DeiT, side by side in one process.

    python -m bvit.benchmark                 # bvit_5m(stem='none'), its twin, deit_tiny_patch16_224
    python -m bvit.benchmark --suite full    # the README's cost table (adds 22M, both stems, DeiT-S)

Every model gets random weights. Each repeat times every model once, in turn (interleaved, so
slow drifts of the machine hit all models alike); the figures are medians over the repeats and
the ratios are taken against the reference model measured in the same run. Inference is
``model(x)`` under ``torch.inference_mode()`` in eval mode; a training step is forward, cross
entropy, backward and an AdamW step in train mode.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import timm
from torch import nn

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
    target = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(0))
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


def run(specs: List[Spec], batch_size: int, img_size: int, repeats: int, iters: int,
        warmup: int, modes: List[str]) -> Dict[str, Dict[str, float]]:
    """Images/s per model label and mode ('infer', 'train'): medians over ``repeats``."""
    torch.manual_seed(0)
    x = torch.randn(batch_size, 3, img_size, img_size)
    steps: Dict[Tuple[str, str], Callable[[], None]] = {}
    for label, name, kwargs in specs:
        for mode in modes:
            model = timm.create_model(name, **kwargs)
            model.train(mode == 'train')
            steps[label, mode] = (_training if mode == 'train' else _inference)(model, x)
    for fn in steps.values():
        _time(fn, warmup)
    samples: Dict[Tuple[str, str], List[float]] = {key: [] for key in steps}
    for r in range(repeats):
        for key, fn in steps.items():
            samples[key].append(batch_size * iters / _time(fn, iters))
        print(f'repeat {r + 1}/{repeats} done', file=sys.stderr, flush=True)
    out: Dict[str, Dict[str, float]] = {}
    for (label, mode), values in samples.items():
        out.setdefault(label, {})[mode] = statistics.median(values)
    return out


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--suite', choices=sorted(SUITES), default='default', help='which models to compare')
    parser.add_argument('--batch-size', type=int, default=32, help='images per step')
    parser.add_argument('--img-size', type=int, default=224, help='input resolution')
    parser.add_argument('--repeats', type=int, default=7, help='interleaved repeats; medians are reported')
    parser.add_argument('--iters', type=int, default=2, help='steps timed per model per repeat')
    parser.add_argument('--warmup', type=int, default=1, help='untimed steps per model before timing')
    parser.add_argument('--modes', default='infer,train', help="comma list of 'infer' and 'train'")
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: leave the default)')
    parser.add_argument('--json', default='', help='also write the results to this JSON file')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m for m in args.modes.split(',') if m]
    specs = SUITES[args.suite]
    res = run(specs, args.batch_size, args.img_size, args.repeats, args.iters, args.warmup, modes)

    print(f'# torch {torch.__version__}, timm {timm.__version__}, {platform.processor() or platform.machine()}, '
          f'{torch.get_num_threads()} threads, batch {args.batch_size} at {args.img_size}x{args.img_size}, '
          f'median of {args.repeats} interleaved repeats x {args.iters} steps')
    refs = {'bvit_5m': 'deit_tiny_patch16_224', 'bvit_22m': 'deit_small_patch16_224'}
    header = f"{'model':34s}" + ''.join(f'{m + " img/s":>13s}{"x DeiT":>8s}{"x twin":>8s}' for m in modes)
    print(header)
    for label, name, kwargs in specs:
        row = f'{label:34s}'
        ref = refs.get(name, name)
        twin = label.replace(')', ', broad=False)') if kwargs.get('broad', True) and name.startswith('bvit') else None
        for m in modes:
            v = res[label][m]
            deit = v / res[ref][m] if ref in res else float('nan')
            tw = v / res[twin][m] if twin in res else float('nan')
            row += f'{v:13.1f}{deit:8.3f}{tw:8.3f}'
        print(row)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'args': vars(args), 'torch': torch.__version__, 'results': res}, f, indent=1)


if __name__ == '__main__':
    main()
