"""Fashion-MNIST at GPU scale: BViT against its broad=False twin, many runs in one process.

    python -m studies.fmnist_gpu --out DIR                      # CUDA: 8 seeds x 2, 30 epochs, 60,000 images
    python -m studies.fmnist_gpu --out DIR --device cpu --seeds 2 --epochs 2 --train-size 512 \\
        --test-size 256 --batch-size 64 --embed-dim 16 --depth 2 --heads 2 --head-dim 8   # the CPU form

The design (docs/studies.md, "Fashion-MNIST at GPU scale"):

- **Data.** All 60,000 training and 10,000 test images, read from the four IDX files (gzip or
  not) by datasets.py's Fashion-MNIST reader (``--fmnist``, default ``data/fashion-mnist``:
  ``make fmnist-data`` copies the Debian package's files there, a git-ignored folder that can
  travel with a run), held on the device as uint8 tensors.
- **Augmentation on the device**, the study's recipe (configs/fashion_mnist.yaml): a random-resized
  crop of 60-100% of the area, aspect 3/4..4/3, and a horizontal flip with probability 0.5, one
  affine sampling grid per image (``affine_grid`` + bilinear ``grid_sample``, the crop's box
  continuous where torchvision's is in whole pixels; torchvision's 10 tries, then the whole image).
  Gray is repeated to 3 channels and normalised with the config's mean and std.
- **Model.** BViT at the released BViT-5M's token geometry: 12 layers, D=192, 3 heads of 64, 4x4
  patches at 28x28 without the stem, so 49 patch tokens + the class token (5.7M parameters),
  broad attention over all 12 layers at 0.4; the twin is the same network with ``broad=False``.
- **Pairs.** For each seed the BViT and its twin start from the same weights, see the same batches
  (one index order and one augmentation per seed, drawn once and fed to both) and the same
  drop-path draws (each run keeps the random state of its own stream, and the two of a seed start
  from the same one): they differ only by the broad attention.
- **Several runs at once.** Every run has its own model, optimizer, scheduler and EMA; they are
  trained in one process, interleaved step by step (each step: the seed's batch, then each of its
  runs' forward, backward, clipping, AdamW step and EMA update), all queued on one device without
  a host synchronisation inside an epoch. Eager by default; with ``--compile`` each run's model
  goes through ``torch.compile`` for its training steps (one graph per variant, shared by its
  runs; on an H200 the compilation is assumed to cost a minute or two, about what it saves here).
- **Recipe.** configs/fashion_mnist.yaml, read through train_hp.py's own parser, optimizer and
  scheduler builders (AdamW, weight decay 0.05, clipping 1.0, label smoothing 0.1, drop-path 0.05,
  cosine to 1e-6 after a 2-epoch warm-up from 1e-4, a weight EMA), with ``--batch-size`` 1024
  instead of 32 on the GPU (large enough that one step of one run keeps an H200 busy longer
  than Python takes to queue it), ``--lr`` 1e-3 (DeiT's rule, 5e-4 x batch / 512, gives 1e-3 at
  1024; the config's 1e-3 was chosen at batch 32), and ``--ema-decay`` 0.9966: an average over
  ~290 steps, 5 epochs of 58, as the config's 0.998 is over 5 epochs of its 94 steps.
- **Reported** (fixed before any run, as in the CPU study): per seed the last epoch's test top-1
  of the weight EMA of both (the raw weights beside it), the paired difference BViT minus twin
  with its 95% t-interval, and the convergence check (top-1 moving less than 0.3 points over the
  last 5 epochs), all from studies/report.py. Evaluated after the first epoch, every 5th and each
  of the last 5, on all 10,000 test images.

``--budget-s``: after the second epoch the run projects its total time from what the first two
took (an evaluation, an epoch at full speed) and stops with a one-line error, the measured speed
in it, if the projection is over the budget, instead of being cut off later with nothing to show.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import timm
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DATA = os.path.join(REPO, 'data', 'fashion-mnist')
CONFIG = os.path.join(REPO, 'configs', 'fashion_mnist.yaml')
TRIES = 10  # torchvision's RandomResizedCrop: tries before it takes the whole image


# Data -------------------------------------------------------------------------------------------

def load_fmnist(path: str, device: torch.device, train_size: Optional[int] = None,
                test_size: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels) on ``device``: images uint8 (N, 28, 28),
    labels int64, read by datasets.py (``_fashion_mnist_raw_dir``, ``FashionMNISTFolder``); the
    first ``train_size`` / ``test_size`` images when given (the files come shuffled)."""
    import datasets
    from utils import UsageError
    raw = datasets._fashion_mnist_raw_dir(path) if os.path.isdir(path) else None
    if raw is None:
        raise UsageError(f'Fashion-MNIST not found in {path} (the four IDX files, gzip or not); '
                         f'`make fmnist-data` copies them from {datasets.FASHION_MNIST_DEFAULT_PATH}')
    out = []
    for train, n in ((True, train_size), (False, test_size)):
        ds = datasets.FashionMNISTFolder(raw, train=train)
        out += [ds.data[:n].to(device), ds.targets[:n].to(device=device, dtype=torch.long)]
    return out[0], out[1], out[2], out[3]


def crop_flip_params(n: int, generator: torch.Generator, scale: Sequence[float] = (0.6, 1.0),
                     ratio: Sequence[float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> torch.Tensor:
    """(n, 2, 3) affine matrices for ``affine_grid`` (``align_corners=False``) of random-resized
    crops with horizontal flips of a square image, drawn on the generator's device: area fraction
    uniform in ``scale``, aspect w/h log-uniform in ``ratio``, the first of ``TRIES`` draws that fits
    (the whole image if none does), the crop's centre uniform over the places it fits, mirrored
    with probability ``hflip``. Row 0 maps the output's x in [-1, 1] to the input's
    ``flip * w * x + cx``: the crop is ``w`` of the width (``w * h`` of the area)."""
    dev = generator.device
    area = torch.empty(n, TRIES, device=dev).uniform_(scale[0], scale[1], generator=generator)
    logr = torch.empty(n, TRIES, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w, h = (area * logr.exp()).sqrt(), (area / logr.exp()).sqrt()
    fits = (w <= 1) & (h <= 1)
    first = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first try that fits (0 if none)
    any_fit = fits.any(1)
    w = torch.where(any_fit, w.gather(1, first).squeeze(1), torch.ones(n, device=dev))
    h = torch.where(any_fit, h.gather(1, first).squeeze(1), torch.ones(n, device=dev))
    centre = torch.rand(n, 2, device=dev, generator=generator) * 2 - 1
    cx, cy = centre[:, 0] * (1 - w), centre[:, 1] * (1 - h)
    flip = torch.where(torch.rand(n, device=dev, generator=generator) < hflip, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 2] = flip * w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    return theta


def to_input(images: torch.Tensor, mean: float, std: float, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (B, 28, 28) -> float (B, 3, 28, 28): resampled through ``theta`` (bilinear, edges
    repeated) when given, scaled to [0, 1], normalised, gray repeated to 3 channels."""
    x = images.unsqueeze(1).float().div_(255)
    if theta is not None:
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return ((x - mean) / std).expand(-1, 3, -1, -1)


# Runs -------------------------------------------------------------------------------------------

def _autocast(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Any:
    return contextlib.nullcontext() if amp_dtype is None else torch.autocast(device.type, dtype=amp_dtype)


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == 'cuda' else torch.get_rng_state()


def _set_rng_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == 'cuda':
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class Run:
    """One training run: its model (compiled or not), optimizer, per-epoch scheduler, weight EMA,
    the state of its random stream (drop-path), and its per-epoch records."""

    def __init__(self, seed: int, broad: bool, recipe: argparse.Namespace, model_kwargs: Dict[str, Any],
                 device: torch.device, compile_backend: Optional[str]) -> None:
        import train_hp
        from timm.utils import ModelEmaV3
        self.seed, self.broad = seed, broad
        torch.manual_seed(seed)  # the same initial weights for both runs of a seed
        self.model = timm.create_model('bvit_5m', broad=broad, drop_path_rate=recipe.drop_path,
                                       **model_kwargs).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.train_fn = (torch.compile(self.model, backend=compile_backend) if compile_backend is not None
                         else self.model)
        self.optimizer, _ = train_hp.build_optimizer(recipe, self.model)
        self.scheduler = train_hp.build_scheduler(recipe, self.optimizer)
        self.ema = ModelEmaV3(self.model, decay=recipe.model_ema_decay)
        torch.manual_seed(seed)
        self.rng = _rng_state(device)
        self.loss_sum = torch.zeros((), device=device)
        self.train_loss: List[float] = []
        self.curve: List[float] = []
        self.raw_curve: List[float] = []
        self.curve_epochs: List[int] = []

    def step(self, x: torch.Tensor, y: torch.Tensor, criterion: nn.Module, amp_dtype: Optional[torch.dtype],
             clip_grad: Optional[float]) -> None:
        """One training step on (x, y) in this run's random stream; its loss added on the device."""
        from timm.utils import dispatch_clip_grad
        device = x.device
        _set_rng_state(device, self.rng)
        with _autocast(device, amp_dtype):
            loss = criterion(self.train_fn(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            dispatch_clip_grad(self.model.parameters(), clip_grad, mode='norm')
        self.optimizer.step()
        self.ema.update(self.model)
        self.loss_sum += loss.detach().float()
        self.rng = _rng_state(device)


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: float, std: float,
             amp_dtype: Optional[torch.dtype], batch: int) -> float:
    """Test top-1 (%) of ``model`` in eval mode on whole images."""
    was = model.training
    model.eval()
    correct = torch.zeros((), device=images.device, dtype=torch.long)
    for i in range(0, len(images), batch):
        with _autocast(images.device, amp_dtype):
            logits = model(to_input(images[i:i + batch], mean, std))
        correct += (logits.argmax(1) == labels[i:i + batch]).sum()
    model.train(was)
    return 100.0 * correct.item() / len(images)


def eval_epochs(epochs: int) -> List[int]:
    """The epochs (1-based) after which every run is evaluated: the first, every 5th, the last 5."""
    return sorted({1} | {e for e in range(1, epochs + 1) if e % 5 == 0 or e > epochs - 5})


def recipe_args(args: argparse.Namespace) -> argparse.Namespace:
    """configs/fashion_mnist.yaml through train_hp.py's parser, with this study's batch size,
    epochs, learning rate and EMA decay."""
    import train_hp
    recipe = train_hp.parse_args(['--config', CONFIG, '--batch-size', str(args.batch_size), '--epochs',
                                  str(args.epochs), '--lr', str(args.lr), '--model-ema-decay', str(args.ema_decay)])
    recipe.world_size = 1
    return recipe


def train(args: argparse.Namespace, log=print) -> Dict[str, Any]:
    """Every run of the study, trained together; returns the JSON record (see :func:`main`)."""
    from losses import build_base_criterion
    device = torch.device(args.device)
    if device.type == 'cuda':  # as engine.setup_tf32 (float32 matmuls outside autocast in TF32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    amp_dtype = torch.bfloat16 if args.amp == 'bf16' else None
    recipe = recipe_args(args)
    mean, std = recipe.mean[0], recipe.std[0]
    t0 = time.perf_counter()
    train_x, train_y, test_x, test_y = load_fmnist(args.fmnist, device, args.train_size, args.test_size)
    model_kwargs = dict(stem='none', img_size=28, patch_size=4, num_classes=10, embed_dim=args.embed_dim,
                        depth=args.depth, num_heads=args.heads, head_dim=args.head_dim)
    backend = args.compile_backend if args.compile else None
    runs = [Run(seed, broad, recipe, model_kwargs, device, backend) for seed in range(args.seeds) for broad in (True, False)]
    criterion = build_base_criterion(False, recipe.smoothing, False)
    gens = {s: torch.Generator(device=device).manual_seed(1000 + s) for s in range(args.seeds)}
    steps = len(train_x) // args.batch_size  # the last partial batch dropped (one graph shape)
    if steps < 1:
        raise SystemExit(f'error: --batch-size {args.batch_size} is larger than the {len(train_x)} training images')
    evals = eval_epochs(args.epochs)
    log(f'fmnist: {len(runs)} runs ({args.seeds} seeds x BViT / twin), {runs[0].params:,} parameters each, '
        f'{len(train_x)} training / {len(test_x)} test images, batch {args.batch_size}, {steps} steps an epoch, '
        f'{args.epochs} epochs, {args.amp}, {"torch.compile(" + backend + ")" if backend else "eager"}, {device}; '
        f'data loaded in {time.perf_counter() - t0:.1f} s')
    start = time.perf_counter()
    epoch_s: List[float] = []
    eval_s: List[float] = []
    for epoch in range(args.epochs):
        te = time.perf_counter()
        for r in runs:
            r.scheduler.step(epoch)
            r.loss_sum.zero_()
        perms = {s: torch.randperm(len(train_x), device=device, generator=g) for s, g in gens.items()}
        for i in range(steps):
            for s, g in gens.items():
                idx = perms[s][i * args.batch_size:(i + 1) * args.batch_size]
                theta = crop_flip_params(len(idx), g, recipe.scale, recipe.ratio, recipe.hflip)
                x, y = to_input(train_x[idx], mean, std, theta), train_y[idx]
                for r in runs[2 * s:2 * s + 2]:
                    r.step(x, y, criterion, amp_dtype, recipe.clip_grad)
        for r in runs:
            r.train_loss.append(r.loss_sum.item() / steps)
        epoch_s.append(time.perf_counter() - te)
        line = f'epoch {epoch + 1}/{args.epochs} {epoch_s[-1]:.1f} s, train loss ' + ' '.join(
            f'{r.train_loss[-1]:.3f}' for r in runs)
        if epoch + 1 in evals:
            tv = time.perf_counter()
            for r in runs:
                r.curve.append(evaluate(r.ema.module, test_x, test_y, mean, std, amp_dtype, args.eval_batch))
                r.raw_curve.append(evaluate(r.model, test_x, test_y, mean, std, amp_dtype, args.eval_batch))
                r.curve_epochs.append(epoch + 1)
            eval_s.append(time.perf_counter() - tv)
            line += '; EMA test top-1 ' + ' '.join(f'{r.curve[-1]:.2f}' for r in runs) + f' ({eval_s[-1]:.1f} s)'
        log(line, flush=True)
        if args.budget_s and epoch == 1 and args.epochs > 2:
            spent = time.perf_counter() - t0
            left = (args.epochs - 2) * epoch_s[1] + sum(e > 2 for e in evals) * max(eval_s)
            if spent + left > args.budget_s:
                rate = len(runs) * steps * args.batch_size / epoch_s[1]
                fit = int((args.budget_s - spent) / (epoch_s[1] + max(eval_s)) + 2)
                raise SystemExit(f'error: projected {spent + left:.0f} s > --budget-s {args.budget_s:g} '
                                 f'({rate:.0f} training img/s over the {len(runs)} runs, epoch 2 took '
                                 f'{epoch_s[1]:.1f} s); about {fit} epochs would fit')
    wall = time.perf_counter() - start
    trained = len(runs) * steps * args.batch_size
    results = []
    for r in runs:
        results.append(dict(
            group='bvit', label='BViT, broad 0.4' if r.broad else 'BViT, no broad (twin)', seed=r.seed,
            key='broad' if r.broad else 'twin', acc1=r.curve[-1], raw_acc1=r.raw_curve[-1], best_acc1=max(r.curve),
            curve=r.curve, raw_curve=r.raw_curve, curve_epochs=r.curve_epochs, epochs=args.epochs,
            train_loss=r.train_loss, params=r.params, sec_per_epoch=wall / args.epochs,
            meta=dict(arch='bvit_5m', stem='none', broad=r.broad, broad_scale=0.4)))
    return dict(
        args=vars(args), device=(torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'),
        torch=torch.__version__, timm=timm.__version__, model=model_kwargs,
        recipe={k: getattr(recipe, k) for k in ('opt', 'lr', 'weight_decay', 'opt_eps', 'clip_grad', 'sched',
                                                'warmup_epochs', 'warmup_lr', 'min_lr', 'drop_path', 'smoothing',
                                                'model_ema_decay', 'scale', 'ratio', 'hflip', 'mean', 'std')},
        steps_per_epoch=steps, eval_epochs=evals, train_images=len(train_x), test_images=len(test_x),
        wall_s=wall, epoch_s=epoch_s, eval_s=eval_s, train_img_per_s=trained * args.epochs / sum(epoch_s),
        results=results)


def summary(record: Dict[str, Any]) -> Dict[str, Any]:
    """The paired difference BViT − twin (studies.report.paired_differences) and the convergence
    (studies.report.convergence) of each run's EMA curve, from the JSON record."""
    from studies.report import CONVERGED_POINTS, convergence, paired_differences
    results = record['results']
    d = paired_differences(results, 'BViT, broad 0.4', 'BViT, no broad (twin)')
    spreads = [convergence(r['curve'], r['curve_epochs']) for r in results]
    return dict(paired=d, spreads=spreads,
                converged=sum(s is not None and s < CONVERGED_POINTS for s in spreads), runs=len(results))


def markdown(record: Dict[str, Any]) -> str:
    """The study's Markdown report: studies.report.make_table with every run's convergence."""
    from studies.report import make_table
    a = record['args']
    preamble = (f'{record["train_images"]:,} training / {record["test_images"]:,} test images, '
                f'{len(record["results"]) // 2} seeds x (BViT, twin), {a["epochs"]} epochs at batch {a["batch_size"]}, '
                f'{a["amp"]}, {"torch.compile(" + a["compile_backend"] + ")" if a["compile"] else "eager"}, '
                f'{record["device"]}, torch {record["torch"]}; last epoch of the weight EMA (raw weights in '
                f'their own table); {record["wall_s"]:.0f} s of training and evaluation, '
                f'{record["train_img_per_s"]:.0f} training img/s over all runs.')
    return make_table(record['results'], 'Fashion-MNIST at GPU scale: BViT vs its twin', preamble, per_run=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', required=True, help='folder for fmnist.json (every run, every evaluation, the '
                        'paired statistics) and fmnist.md (the tables)')
    parser.add_argument('--fmnist', default=DEFAULT_DATA, help='folder of the four Fashion-MNIST IDX files '
                        '(default data/fashion-mnist; `make fmnist-data`)')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--seeds', type=int, default=8, help='seeds; each trains a BViT and its twin')
    parser.add_argument('--epochs', type=int, default=30)
    parser.add_argument('--batch-size', type=int, default=1024)
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--ema-decay', type=float, default=0.9966, help='weight EMA decay per step')
    parser.add_argument('--train-size', type=int, default=None, help='the first N training images (default all)')
    parser.add_argument('--test-size', type=int, default=None, help='the first N test images (default all)')
    parser.add_argument('--eval-batch', type=int, default=2000)
    parser.add_argument('--embed-dim', type=int, default=192)
    parser.add_argument('--depth', type=int, default=12)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--head-dim', type=int, default=64)
    parser.add_argument('--amp', choices=['none', 'bf16'], default=None, help='autocast (default bf16 on CUDA, '
                        'none on the CPU)')
    parser.add_argument('--compile', action='store_true', help='each model through torch.compile for its training '
                        'steps (default: eager; the evaluations are eager either way)')
    parser.add_argument('--compile-backend', default='inductor')
    parser.add_argument('--threads', type=int, default=0, help='torch threads (0: the default)')
    parser.add_argument('--budget-s', type=float, default=0, help='stop after epoch 2 if the projected total '
                        'time is over this (0: no limit)')
    args = parser.parse_args(argv)
    cuda = args.device.startswith('cuda')
    if args.amp is None:
        args.amp = 'bf16' if cuda else 'none'
    if args.seeds < 2 or args.epochs < 1:
        parser.error('--seeds must be at least 2 (a t-interval) and --epochs at least 1')
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    record = train(args)
    path = os.path.join(args.out, 'fmnist.json')
    with open(path, 'w') as f:  # the runs first: a failure below leaves them on disk
        json.dump(record, f, indent=1)
    record['summary'] = summary(record)
    with open(path, 'w') as f:
        json.dump(record, f, indent=1)
    table = markdown(record)
    with open(os.path.join(args.out, 'fmnist.md'), 'w') as f:
        f.write(table)
    print(table)


if __name__ == '__main__':
    try:
        main()
    except Exception as e:  # one line, as the training script's errors
        from utils import UsageError
        if not isinstance(e, UsageError):
            raise
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)
