"""What a training run saves and restores: ``checkpoint.pth`` (its schema, loadable with
``torch.load(weights_only=True)``; written atomically, rank 0 only), the model record that
``--eval`` / ``--resume`` rebuild the model from, and the checks and restores of ``--resume``.
Weights load through :func:`bvit.checkpoint.load_checkpoint`."""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from bvit.builder import RECORD_KEY, is_bvit, record_from_args, record_of_checkpoint
from bvit.checkpoint import load_checkpoint, read_checkpoint
from utils import UsageError, args_to_dict, log, plain

CHECKPOINT_FORMAT = 'bvit-train-1'


class _KeepWriteError:
    """A file's ``write`` that remembers the OSError it raised: torch.save turns it into a
    RuntimeError that no longer says why (``unexpected pos 46 vs 0``)."""

    def __init__(self, f: Any) -> None:
        self.f = f
        self.error: Optional[OSError] = None

    def write(self, data: Any) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``:
    a run killed mid-write leaves the previous file intact, and so does a failed write (disk
    full: the OSError of the write is raised, the temporary file removed)."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{os.path.basename(path)}.tmp-{os.getpid()}')
    try:
        with open(tmp, 'wb') as f:
            writer = _KeepWriteError(f)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# The model record: which flags set each field (bvit.builder.RECORD_FIELDS; the class count comes
# from the data set, not a flag).
RECORD_FLAGS: Dict[str, Tuple[str, ...]] = {
    'arch': ('arch',), 'input_size': ('input_size',), 'patch_size': ('patch_size',), 'stem': ('stem',),
    'broad': ('no_broad', 'broad'), 'broad_scale': ('broad_scale',), 'broad_layers': ('broad_layers',),
    'model_kwargs': ('model_kwargs',),
}


def _describe(field: str, value: Any) -> str:
    """A record field's value as the flag that sets it: ``--input-size 32``, ``no broad attention``."""
    if field == 'broad':
        return 'broad attention' if value else 'no broad attention'
    if field == 'broad_layers' and value is None:
        return 'every block feeding the broad attention'
    if field == 'model_kwargs':
        return '--model-kwargs ' + (' '.join(f'{k}={v!r}' for k, v in sorted(value.items())) or '(none)')
    return f'--{field.replace("_", "-")} {value}'


def adopt_record(obj: Any, args: Any, path: str, given: Sequence[str]) -> None:
    """``--eval`` / ``--resume``: the model is the checkpoint's (its record,
    :func:`bvit.builder.record_of_checkpoint`). Each model flag that was not given (on the command
    line or in ``--config``) takes the record's value in ``args``; one that was given and differs
    is honoured with --eval, with a ``note:`` line, and refused when resuming a training (its
    state belongs to the recorded model). A file whose model cannot be read off is left to the
    flags (its weights must then fit them)."""
    try:
        saved = record_of_checkpoint(obj)
        mine = record_from_args(vars(args))
    except ValueError:  # no model to read off, or flags that train_hp.py refuses in one line later
        return
    for field in RECORD_FLAGS:
        if saved[field] == mine[field]:
            continue
        old, new = _describe(field, saved[field]), _describe(field, mine[field])
        if not any(flag in given for flag in RECORD_FLAGS[field]):
            _set_from_record(args, field, saved[field], saved['arch'])
        elif getattr(args, 'eval', False):
            log(f'note: {path} was trained with {old}; evaluating with {new}, as given')
        else:
            raise UsageError(f'{path} was trained with {old}, but this run has {new}; leave the flag out to resume '
                             'the checkpoint\'s model, or start a new run from these weights with --finetune')


def _set_from_record(args: Any, field: str, value: Any, arch: str) -> None:
    """Set the flag of record field ``field`` in ``args`` to ``value`` (the inverse of
    :func:`bvit.builder.record_from_args` for one field)."""
    if field == 'broad':
        if is_bvit(arch):
            args.no_broad, args.broad = not value, False
        else:
            args.no_broad, args.broad = False, bool(value)
    elif field == 'model_kwargs':
        args.model_kwargs = [f'{k}={v!r}' for k, v in value.items()]
    elif field == 'input_size' and not isinstance(value, int):
        h, w = value
        if h != w:
            raise UsageError(f'the checkpoint\'s model takes {h}x{w} images; train_hp.py takes square ones')
        args.input_size = int(h)
    else:
        setattr(args, field, value)


def make_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: Any, model_ema: Optional[nn.Module], epoch: int,
                    max_accuracy: float, args: Any,
                    position: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What ``checkpoint.pth`` holds: tensors, numbers, strings, lists and dicts only, so it loads
    with ``torch.load(weights_only=True)``. Features that are off are stored as None. ``epoch`` is
    the last finished epoch; ``position`` (a run stopped mid-epoch) where the next one stands:
    its number, iterations done, and each rank's loss sums and generator states."""
    return {
        'format': CHECKPOINT_FORMAT,
        'model': model.state_dict(),
        'optimizer': optimizer.state_dict(),
        'lr_scheduler': scheduler.state_dict() if scheduler is not None else None,
        'scaler': scaler.state_dict() if scaler is not None else None,  # timm's NativeScaler (fp16): its GradScaler's
        'model_ema': model_ema.module.state_dict() if model_ema is not None else None,
        'epoch': int(epoch),
        'max_accuracy': float(max_accuracy),
        'args': args_to_dict(args),
        RECORD_KEY: record_from_args(vars(args)),
        'position': position,
    }


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    """:func:`atomic_save`, with a write that fails (disk full, no permission) as one line:
    the previous file at ``path`` is kept as it was."""
    try:
        atomic_save(obj, path)
    except OSError as e:
        reason = e.strerror or str(e) or type(e).__name__
        raise UsageError(f'cannot write {path}: {reason}; the previous {os.path.basename(path)}, if any, is kept as '
                         f'it was (free space or choose another --output_dir, then continue with --resume)') from None


def restore_training_state(obj: Any, path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                           scheduler: Any, scaler: Any, model_ema: Optional[nn.Module]) -> Tuple[int, float]:
    """Load everything a run needs to continue; returns (next epoch, best top-1 so far).

    Every feature that is on in this run must be in the checkpoint (optimizer, lr scheduler,
    grad scaler with fp16 AMP, EMA with --model-ema); a missing one is an error.
    """
    try:
        load_checkpoint(model, obj)  # a checkpoint of another model fails here, saying which key
    except ValueError as e:
        raise UsageError(f'{path}: {e}') from None
    if not isinstance(obj, dict) or not isinstance(obj.get('optimizer'), dict) or 'epoch' not in obj:
        raise UsageError(f'{path} holds model weights but no training state (optimizer, epoch); '
                         'use --finetune to start a new run from these weights, or --eval to evaluate them')

    def need(key: str, feature: str) -> Any:
        value = obj.get(key)
        if not isinstance(value, dict) or not value:
            raise UsageError(f'{path} has no {key} state, but this run uses {feature}; resume with the settings '
                             'of the original run, or use --finetune to start afresh from its weights')
        return value

    try:
        optimizer.load_state_dict(need('optimizer', 'an optimizer'))
    except (ValueError, KeyError) as e:
        raise UsageError(f'{path}: its optimizer state does not fit this run ({e}); '
                         'resume with the same --opt and model') from None
    if scheduler is not None:
        state = need('lr_scheduler', f'--sched {type(scheduler).__name__}')
        if set(state) != set(scheduler.state_dict()):
            raise UsageError(f'{path}: its lr scheduler differs from this run\'s --sched; resume with the same --sched')
        scheduler.load_state_dict(state)
    if scaler is not None:
        scaler.load_state_dict(need('scaler', 'a gradient scaler (fp16 AMP)'))
    if model_ema is not None:
        need('model_ema', '--model-ema')
        try:
            load_checkpoint(model_ema.module, obj, use_ema=True)
        except ValueError as e:
            raise UsageError(f'{path}: {e}') from None
    return int(obj['epoch']) + 1, float(obj.get('max_accuracy', 0.0))


# The flags that define the learning-rate schedule: restored from the checkpoint on --resume, so a
# different value would be silently ignored; it is refused instead.
SCHEDULE_FLAGS = {'sched': '--sched', 'lr': '--lr', 'min_lr': '--min-lr', 'warmup_lr': '--warmup-lr',
                  'warmup_epochs': '--warmup-epochs', 'decay_epochs': '--decay-epochs',
                  'decay_milestones': '--decay-milestones', 'decay_rate': '--decay-rate'}


def check_resume_schedule(obj: Any, args: Any, path: str) -> None:
    """``--resume`` restores the learning-rate schedule of the checkpoint: a schedule flag that
    differs from the checkpoint's is refused (one line naming it), and a changed total batch
    (hence scaled lr) gets a note."""
    saved = obj.get('args') if isinstance(obj, dict) else None
    if not isinstance(saved, dict):
        return
    for key, flag in SCHEDULE_FLAGS.items():
        if key in saved and plain(getattr(args, key)) != saved[key]:
            old = ' '.join(map(str, saved[key])) if isinstance(saved[key], list) else saved[key]
            new = ' '.join(map(str, getattr(args, key))) if isinstance(saved[key], list) else getattr(args, key)
            raise UsageError(f'{path} was trained with {flag} {old}, this run has {flag} {new}: --resume continues '
                             f'the checkpoint\'s learning-rate schedule, which would ignore it; resume with {flag} '
                             f'{old}, or start a new run from these weights with --finetune')
    old_scaled = saved.get('lr_scaled')
    if old_scaled is not None and abs(old_scaled - args.lr_scaled) > 1e-12 * max(abs(old_scaled), 1.0):
        log(f'note: the total batch differs from the checkpoint\'s; its learning-rate schedule (restored) keeps '
            f'its peak lr {old_scaled:.3g}, not {args.lr_scaled:.3g}')
    if args.sched != 'none' and saved.get('epochs') not in (None, args.epochs):
        log(f'note: the checkpoint was made for --epochs {saved["epochs"]}; its learning-rate schedule '
            f'(restored) still ends there, while this run trains to epoch {args.epochs - 1}')


def resume_position(obj: Any, args: Any, path: str) -> Optional[Dict[str, Any]]:
    """Where a checkpoint written mid-epoch stopped (None for an end-of-epoch one). The rest of
    that epoch is the same only with the same processes and batch size; others are refused."""
    position = obj.get('position') if isinstance(obj, dict) else None
    if not position:
        return None
    if (position['world_size'], position['batch_size']) != (args.world_size, args.batch_size):
        raise UsageError(f'{path} was saved in the middle of epoch {position["epoch"]} by {position["world_size"]} '
                         f'process(es) with --batch-size {position["batch_size"]}; resume it with the same '
                         f'(this run: {args.world_size}, {args.batch_size})')
    return position


def read_resume(path: str) -> Any:
    """:func:`bvit.checkpoint.read_checkpoint` with its errors as a UsageError (one ``error:`` line, status 2)."""
    try:
        return read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


__all__ = [
    'CHECKPOINT_FORMAT', 'atomic_save', 'make_checkpoint', 'save_checkpoint', 'RECORD_FLAGS', 'adopt_record',
    'read_resume', 'restore_training_state', 'SCHEDULE_FLAGS', 'check_resume_schedule', 'resume_position',
]
