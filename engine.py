"""One training epoch and one evaluation pass."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, ContextManager, Dict, Iterable, Optional

import torch
from torch import nn

from utils import NonFiniteLossError, ProgressPrinter, all_reduce_sum, format_seconds, get_world_size, log, unwrap_model


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]) -> Callable[[], ContextManager]:
    """A factory of autocast contexts (a no-op one when ``amp_dtype`` is None)."""
    if amp_dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=amp_dtype)


def train_one_epoch(
        model: nn.Module,
        criterion: nn.Module,
        data_loader: Iterable,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        epoch: int,
        scaler: Optional[torch.amp.GradScaler] = None,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        clip_grad: Optional[float] = None,
        model_ema: Optional[nn.Module] = None,
        mixup_fn: Optional[Callable] = None,
        set_training_mode: bool = True,
        print_freq: int = 10,
        num_epochs: Optional[int] = None,
) -> Dict[str, float]:
    """Train ``model`` for one pass over ``data_loader``.

    ``criterion(images, outputs, targets)`` is a :class:`losses.DistillationLoss`-style loss.
    The learning rate is whatever the caller's scheduler set before the epoch; it is reported
    as ``lr``. The loss is averaged over all ranks at every step; if it is NaN or infinite on
    any rank, every rank raises :class:`utils.NonFiniteLossError` before the optimizer step.
    Returns the epoch's mean loss over all ranks and images, its lr, and the throughput.
    """
    model.train(set_training_mode)
    world = get_world_size()
    total = len(data_loader)  # type: ignore[arg-type]
    header = f'Epoch [{epoch}]' if num_epochs is None else f'Epoch [{epoch}/{num_epochs - 1}]'
    batch_size = getattr(data_loader, 'batch_size', None) or 1
    progress = ProgressPrinter(total, header, print_freq, batch_size * world)
    loss_sum, count = 0.0, 0
    lr = max(group['lr'] for group in optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group['params']]
    start = time.time()
    for i, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with autocast():
            outputs = model(images)
            loss = criterion(images, outputs, targets)
        # the mean loss over ranks: logged, and checked on every rank alike
        loss_mean = all_reduce_sum([loss.detach().float().item()], device)[0] / world
        if not math.isfinite(loss_mean):
            raise NonFiniteLossError(
                f'the training loss is {loss_mean} at epoch {epoch}, iteration {i + 1}/{total} '
                f'(lr {lr:.3g}); stopping. The checkpoint of the last finished epoch is kept; '
                'try a lower --lr, --clip-grad, or --amp-dtype bf16')
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None and scaler.is_enabled():
            scaler.scale(loss).backward()
            if clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad:
                torch.nn.utils.clip_grad_norm_(params, clip_grad)
            optimizer.step()
        if model_ema is not None:
            model_ema.update(unwrap_model(model))
        n = images.shape[0]
        loss_sum += loss_mean * n
        count += n
        if device.type == 'cuda' and (i + 1) % max(1, print_freq) == 0:
            torch.cuda.synchronize()
        progress.step(i, lr=f'{lr:.6f}', loss=f'{loss_mean:.4f} ({loss_sum / count:.4f})')
    elapsed = time.time() - start
    log(f'{header} done in {format_seconds(elapsed)}')
    return {
        'loss': loss_sum / max(count, 1),
        'lr': lr,
        'images_per_sec': count * world / max(elapsed, 1e-9),
    }


@torch.no_grad()
def evaluate(
        data_loader: Iterable,
        model: nn.Module,
        device: torch.device,
        autocast: Callable[[], ContextManager] = contextlib.nullcontext,
        reduce: bool = False,
        print_freq: int = 50,
        header: str = 'Test',
) -> Dict[str, float]:
    """Top-1 / top-5 accuracy (in %) and the mean cross-entropy loss over ``data_loader``.

    Sums of correct predictions, losses and images are kept per image; with ``reduce``
    (``--dist-eval``: each rank holds a disjoint shard) they are summed over ranks, so every
    rank gets the metrics of the whole set, each image counted once.
    """
    was_training = model.training
    model.eval()
    total = len(data_loader)  # type: ignore[arg-type]
    batch_size = getattr(data_loader, 'batch_size', None) or 1
    progress = ProgressPrinter(total, header, print_freq, batch_size * (get_world_size() if reduce else 1))
    loss_sum = correct1 = correct5 = count = 0.0
    for i, (images, targets) in enumerate(data_loader):
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            outputs = model(images)
        if isinstance(outputs, (tuple, list)):  # distilled models: average the two heads, as DeiT
            outputs = (outputs[0] + outputs[1]) / 2
        outputs = outputs.float()
        loss_sum += torch.nn.functional.cross_entropy(outputs, targets, reduction='sum').item()
        k = min(5, outputs.shape[1])
        top = outputs.topk(k, dim=1).indices
        hit = top.eq(targets.unsqueeze(1))
        correct1 += hit[:, 0].sum().item()
        correct5 += hit.any(dim=1).sum().item()
        count += images.shape[0]
        progress.step(i)
    if reduce:
        loss_sum, correct1, correct5, count = all_reduce_sum([loss_sum, correct1, correct5, count], device)
    model.train(was_training)
    count = max(count, 1)
    return {
        'acc1': 100.0 * correct1 / count,
        'acc5': 100.0 * correct5 / count,
        'loss': loss_sum / count,
        'images': int(count),
    }


__all__ = ['autocast_context', 'train_one_epoch', 'evaluate']
