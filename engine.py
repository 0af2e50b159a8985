"""One training epoch, one evaluation pass, the evaluator of the training script, and the numerics
they run under (autocast and its dtype, TF32, determinism)."""
from __future__ import annotations

import contextlib
import math
import os
import time
from typing import Any, Callable, ContextManager, Dict, Iterable, Optional, Sequence, Set, Tuple

import torch
from timm.utils import NativeScaler, accuracy, dispatch_clip_grad, unwrap_model
from torch import nn

from preemption import StopSignal, rng_state, set_rng_state
from utils import (
    NonFiniteLossError, ProgressPrinter, UsageError, all_reduce_sum, format_seconds, get_world_size, is_dist, log,
)


def setup_determinism(deterministic: bool) -> None:
    """``--deterministic``: cuDNN benchmark off, deterministic kernels (warning only where an op
    has none). Otherwise cuDNN benchmark on, as in DeiT."""
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = bool(deterministic)
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
        torch.use_deterministic_algorithms(True, warn_only=True)


def setup_tf32(enabled: bool) -> None:
    """CUDA runs: float32 matmuls and cuDNN convolutions in TF32 (10-bit mantissa inputs, float32
    accumulation), as timm's ``train.py`` sets them; ``--no-tf32`` keeps them in full float32."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def precision(args: Any, device: torch.device) -> Tuple[Optional[torch.dtype], str]:
    """(autocast dtype or None, its description). ``--amp`` is the default on CUDA; on the CPU it
    applies only when given (CPU autocast, a gradient scaler with fp16)."""
    amp = args.amp if args.amp is not None else device.type == 'cuda'
    tf32 = ', TF32 float32 matmuls and convolutions' if device.type == 'cuda' and args.tf32 else ''
    if not amp:
        return None, 'float32' + tf32
    dtype = torch.bfloat16 if args.amp_dtype == 'bf16' else torch.float16
    return dtype, (f'{args.amp_dtype} autocast on {device.type}' +
                   (' with gradient scaler' if dtype == torch.float16 else '') + tf32)


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Callable[[], ContextManager]:
    """A factory of autocast contexts (a no-op one when ``amp_dtype`` is None); CUDA and CPU."""
    if amp_dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)


class UnreadableImages:
    """Unreadable images met by this process: each is skipped with one warning line naming the
    file and the split; more than ``limit`` distinct files (``--max-bad-images``) stop the run
    with one line (:class:`utils.UsageError`, exit status 2; the last checkpoint is kept)."""

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self.files: Set[str] = set()

    def skip(self, records: Sequence[Any]) -> int:
        for r in records:
            log(f'warning: skipped unreadable image {r.path} ({r.split} split): {r.reason}', all_ranks=True)
            self.files.add(r.path)
            if len(self.files) > self.limit:
                raise UsageError(f'{len(self.files)} unreadable images, more than --max-bad-images {self.limit}; '
                                 f'the last: {r.path} ({r.split} split): {r.reason}')
        return len(records)


def unpack_batch(batch: Sequence[Any], bad: Optional[UnreadableImages]) -> Tuple[Any, Any, int]:
    """(images, targets, skipped) of a loader batch: ``(images, targets)``, or the
    ``(images, targets, unreadable)`` of :func:`unreadable.collate_skipping_unreadable`."""
    if len(batch) < 3:
        return batch[0], batch[1], 0
    skipped = (bad or UnreadableImages()).skip(batch[2]) if batch[2] else 0
    return batch[0], batch[1], skipped


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Optional[NativeScaler],
                    params: Sequence[torch.Tensor], clip_grad: Optional[float]) -> None:
    """Backward, clipping (timm's ``dispatch_clip_grad``, norm mode) and the optimizer step: timm's
    ``NativeScaler`` with fp16 (``scaler``), the same steps without a gradient scaler otherwise
    (float32, bf16: ``scaler`` None). ``clip_grad`` None or 0: no clipping (``NativeScaler`` would
    clip to norm 0 when given 0)."""
    optimizer.zero_grad(set_to_none=True)
    clip_grad = clip_grad or None
    if scaler is not None:
        scaler(loss, optimizer, clip_grad=clip_grad, clip_mode='norm', parameters=params)
        return
    loss.backward()
    if clip_grad is not None:
        dispatch_clip_grad(params, clip_grad, mode='norm')
    optimizer.step()


def train_one_epoch(
        model: nn.Module,
        criterion: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        scaler: Optional[NativeScaler] = None,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        clip_grad: Optional[float] = None,
        model_ema: Optional[nn.Module] = None,
        mixup_fn: Optional[Callable] = None,
        set_training_mode: bool = True,
        print_freq: int = 10,
        num_epochs: Optional[int] = None,
        stop: Optional[StopSignal] = None,
        resume: Optional[Dict[str, Any]] = None,
        bad_images: Optional[UnreadableImages] = None,
        to_device: Optional[Callable[[Any], torch.Tensor]] = None,
) -> Dict[str, Any]:
    """Train ``model`` for one pass over ``data_loader``.

    ``to_device``: the loader's images -> the model's input on ``device`` (``--pipeline fast``:
    ``pipeline.DeviceAugment``, its device steps); None: ``images.to(device)``.

    ``criterion(images, outputs, targets)`` is a :class:`losses.DistillationLoss`-style loss.
    The learning rate is whatever the caller's scheduler set before the epoch; it is reported
    as ``lr``. As in DeiT, each step's loss is read locally (``loss.item()``, the only host sync)
    and a NaN or infinite one raises :class:`utils.NonFiniteLossError` on that rank before the
    optimizer step. No collective runs per step: the loss sums (and the stop flag of ``stop``,
    set by SIGTERM / SIGINT) are summed over ranks only on the steps that print (every
    ``print_freq``, and the last); a single process checks the flag after every step.

    ``resume``: what a stopped epoch returned (``batches_done``, ``loss_sum``, ``count``,
    ``rng``), for a loader that yields the rest of that epoch. Returns the epoch's mean loss over
    all ranks and images, its lr, the throughput, the unreadable images skipped, and
    ``stopped``: None, or the state to resume from (this rank's).
    """
    model.train(set_training_mode)
    world = get_world_size()
    first = int(resume['batches_done']) if resume else 0
    total = first + len(data_loader)  # type: ignore[arg-type]
    header = f'Epoch [{epoch}]' if num_epochs is None else f'Epoch [{epoch}/{num_epochs - 1}]'
    batch_size = getattr(data_loader, 'batch_size', None) or 1
    progress = ProgressPrinter(total, header, print_freq, batch_size * world, start=first)
    loss_sum, count = (float(resume['loss_sum']), int(resume['count'])) if resume else (0.0, 0)
    skipped, done_here = 0, 0
    lr = max(group['lr'] for group in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group['params']]
    iterator = iter(data_loader)  # draws the loader's base seed from torch's generator ...
    if resume:
        set_rng_state(resume['rng'])  # ... so the saved states go back after it, as they were
    totals = [loss_sum, float(count), 0.0, 0.0]
    stopped = None
    start = time.time()
    for i, batch in enumerate(iterator, start=first):
        images, targets, n_bad = unpack_batch(batch, bad_images)
        skipped += n_bad
        if images is None:
            raise UsageError(f'every image of training batch {i + 1} of epoch {epoch} was unreadable (see the warnings)')
        images = to_device(images) if to_device is not None else images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None and images.shape[0] % 2:  # mixup pairs images: an image skipped, one more left out
            images, targets = images[:-1], targets[:-1]
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast():
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f'the training loss is {loss_value} at epoch {epoch}, iteration {i + 1}/{total} '
                f'(lr {lr:.3g}); stopping. The checkpoint of the last finished epoch is kept; '
                'try a lower --lr, --clip-grad, or --amp-dtype bf16')
        _optimizer_step(loss, optimizer, scaler, params, clip_grad)
        if model_ema is not None:
            model_ema.update(unwrap_model(model))
        n = images.shape[0]
        loss_sum += loss_value * n
        count += n
        done_here += n
        asked = stop is not None and stop.requested
        if progress.due(i) or (asked and not is_dist()):
            totals = all_reduce_sum([loss_sum, count, float(asked), skipped], device)
            progress.step(i, lr=f'{lr:.6f}', loss=f'{loss_value:.4f} ({totals[0] / max(totals[1], 1):.4f})')
            if totals[2] > 0 and i + 1 < total:
                stopped = {'batches_done': i + 1, 'batches_total': total, 'loss_sum': loss_sum, 'count': count,
                           'rng': rng_state()}
                break
    elapsed = time.time() - start
    stats = {
        'loss': totals[0] / max(totals[1], 1),
        'lr': lr,
        'images_per_sec': done_here * world / max(elapsed, 1e-9),
        'skipped': int(totals[3]),
        'stopped': stopped,
    }
    if stopped is None:
        log(f'{header} done in {format_seconds(elapsed)}: loss {stats["loss"]:.4f}, lr {lr:.3g}, '
            f'{stats["images_per_sec"]:.1f} img/s' + (f', {stats["skipped"]} unreadable images skipped'
                                                     if stats['skipped'] else ''))
    return stats


@torch.no_grad()
def evaluate(
        data_loader: Iterable,
        model: nn.Module,
        device: torch.device,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        reduce: bool = False,
        print_freq: int = 50,
        header: str = 'Test',
        bad_images: Optional[UnreadableImages] = None,
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and the mean cross-entropy loss over ``data_loader``.

    Sums of correct predictions, losses and images are kept per image; with ``reduce``
    (``--dist-eval``: each rank holds a disjoint shard) they are summed over ranks, so every
    rank gets the metrics of the whole set, each image counted once. Unreadable images are
    skipped (not counted) and reported as ``skipped``.
    """
    was_training = model.training
    model.eval()
    total = len(data_loader)  # type: ignore[arg-type]
    batch_size = getattr(data_loader, 'batch_size', None) or 1
    progress = ProgressPrinter(total, header, print_freq, batch_size * (get_world_size() if reduce else 1))
    loss_sum = correct1 = correct5 = count = skipped = 0.0
    for i, batch in enumerate(data_loader):
        images, targets, n_bad = unpack_batch(batch, bad_images)
        skipped += n_bad
        if images is not None:
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            with autocast():
                outputs = model(images)
            if isinstance(outputs, (tuple, list)):  # distilled models: average the two heads, as DeiT
                outputs = (outputs[0] + outputs[1]) / 2
            outputs = outputs.float()
            loss_sum += torch.nn.functional.cross_entropy(outputs, targets, reduction='sum').item()
            n = images.shape[0]
            acc1, acc5 = accuracy(outputs, targets, topk=(1, 5))  # timm's, in % of the batch (top-5 of <5 classes: all)
            correct1 += round(acc1.item() * n / 100.0)  # back to counts, so that every image weighs the same
            correct5 += round(acc5.item() * n / 100.0)
            count += n
        progress.step(i)
    if reduce:
        loss_sum, correct1, correct5, count, skipped = all_reduce_sum(
            [loss_sum, correct1, correct5, count, skipped], device)
    model.train(was_training)
    count = max(count, 1)
    return {
        'acc1': 100.0 * correct1 / count,
        'acc5': 100.0 * correct5 / count,
        'loss': loss_sum / count,
        'images': int(count),
        'skipped': int(skipped),
    }


class Evaluator:
    """:func:`evaluate` on one validation loader, printing DeiT's lines (``* Acc@1 81.800 Acc@5
    95.594 loss 0.808``, then this script's image counts; ``Accuracy of the network on the N test
    images: ..%`` for the model itself, not its EMA). A model on another device than
    ``device`` (an EMA kept on the CPU) is evaluated there, in float32. ``bad_images``: this
    process's one count of unreadable files (``--max-bad-images``), shared with the training."""

    def __init__(self, loader: Iterable, device: torch.device, autocast: Callable[[], ContextManager],
                 reduce: bool = False, print_freq: int = 50, log_all_ranks: bool = False,
                 max_bad_images: int = 100) -> None:
        self.loader, self.device, self.autocast, self.reduce = loader, device, autocast, reduce
        self.print_freq, self.log_all_ranks = print_freq, log_all_ranks
        self.bad_images = UnreadableImages(max_bad_images)

    def __call__(self, model: nn.Module, ema: bool = False) -> Dict[str, Any]:
        device = next(model.parameters()).device
        autocast = self.autocast if device == self.device else autocast_context(device, None)
        stats = evaluate(self.loader, model, device, autocast, reduce=self.reduce, print_freq=self.print_freq,
                         header='Test (EMA)' if ema else 'Test', bad_images=self.bad_images)
        skipped = f', {stats["skipped"]} unreadable skipped' if stats['skipped'] else ''
        log(f'*{" EMA" if ema else ""} Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f} loss {stats["loss"]:.3f}'
            f'  ({stats["images"]} images{skipped})', all_ranks=self.log_all_ranks)
        if not ema:
            log(f'Accuracy of the network on the {stats["images"]} test images: {stats["acc1"]:.1f}%')
        return stats


__all__ = ['autocast_context', 'train_one_epoch', 'evaluate', 'Evaluator', 'UnreadableImages', 'unpack_batch']
