"""Helpers of the training script: errors, distributed set-up, printing and metric logging, model
names, checkpoint files (their schema; atomic, rank 0 only, loadable with ``weights_only=True``),
the checks of ``--resume`` and weight loading for ``--resume`` / ``--finetune``.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import time
from typing import Any, Dict, List, Mapping, NoReturn, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

import bvit.models as bvit_models


class UsageError(Exception):
    """A problem with the command line, the configuration, the data or a checkpoint file: the
    script prints ``error: <message>`` on one line and exits with status 2, without a traceback."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops (exit status 1) and the last good
    checkpoint, written at the end of the previous epoch, stays as it is."""


# Distributed ------------------------------------------------------------------------------------

def env_int(name: str) -> Optional[int]:
    """The integer value of environment variable ``name``, None when unset or empty."""
    value = os.environ.get(name, '').strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UsageError(f'environment variable {name}={value!r} is not an integer') from None


def resolve_device(name: Optional[str]) -> torch.device:
    """``auto`` (or None): CUDA when available, else CPU. ``cpu``, ``cuda`` or ``cuda:N`` force one."""
    name = (name or 'auto').lower()
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' or name.startswith('cuda:'):
        if not torch.cuda.is_available():
            raise UsageError(f'--device {name}: CUDA is not available on this machine (use --device cpu or auto)')
        if name == 'cuda':
            return torch.device('cuda')
        index = name[len('cuda:'):]
        if not index.isdigit():
            raise UsageError(f"--device {name}: expected 'cuda:N' with N a device number")
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise UsageError(f'--device {name}: only {count} CUDA device(s) are visible (0..{count - 1})')
        return torch.device('cuda', int(index))
    if name == 'cpu':
        return torch.device('cpu')
    raise UsageError(f"--device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")


def expand_nodelist(nodelist: str) -> List[str]:
    """The host names of a SLURM node list, in order, as ``scontrol show hostnames`` prints them:
    ``a,b``, ``node[01-03,07]`` (zero padding kept), ``gpu[1-2]-ib,cpu3``, ``r[1-2]n[1-2]``."""
    hosts: List[str] = []
    depth, item = 0, ''
    for ch in nodelist.strip() + ',':
        depth += (ch == '[') - (ch == ']')
        if ch == ',' and depth == 0:
            if item.strip():
                hosts += _expand_host(item.strip())
            item = ''
        else:
            item += ch
    if depth:
        raise UsageError(f'SLURM_JOB_NODELIST={nodelist!r}: unbalanced brackets')
    return hosts


def _expand_host(item: str) -> List[str]:
    start = item.find('[')
    if start < 0:
        return [item]
    end = item.index(']', start)
    values: List[str] = []
    for part in item[start + 1:end].split(','):
        lo, _, hi = part.partition('-')
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise UsageError(f'SLURM_JOB_NODELIST: cannot expand {item!r}')
        values += [str(n).zfill(len(lo)) for n in range(int(lo), int(hi or lo) + 1)]
    return [item[:start] + v + rest for v in values for rest in _expand_host(item[end + 1:])]


def slurm_launch() -> Optional[Tuple[int, int, int]]:
    """(rank, world size, local rank) of a task started by ``srun`` (SLURM_PROCID, SLURM_NTASKS,
    SLURM_LOCALID), when no torchrun variable is set. Sets RANK, WORLD_SIZE, LOCAL_RANK and, unless
    set, MASTER_ADDR (first host of SLURM_JOB_NODELIST) and MASTER_PORT (10000 + SLURM_JOB_ID %
    20000), which the ``env://`` rendezvous reads. None otherwise, and for a single task."""
    if any(os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')):
        return None
    rank, world = env_int('SLURM_PROCID'), env_int('SLURM_NTASKS')
    if rank is None or world is None:
        return None
    if world <= 1:
        return None  # one task (e.g. the batch script itself): a plain single-process run
    local_rank = env_int('SLURM_LOCALID')
    local_rank = rank if local_rank is None else local_rank
    if not os.environ.get('MASTER_ADDR'):
        nodelist = os.environ.get('SLURM_JOB_NODELIST') or os.environ.get('SLURM_NODELIST')
        if not nodelist:
            raise UsageError('SLURM_PROCID/SLURM_NTASKS are set but neither MASTER_ADDR nor SLURM_JOB_NODELIST')
        os.environ['MASTER_ADDR'] = expand_nodelist(nodelist)[0]
    if not os.environ.get('MASTER_PORT'):
        job = env_int('SLURM_JOB_ID')
        os.environ['MASTER_PORT'] = str(29500 if job is None else 10000 + job % 20000)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
    return rank, world, local_rank


def init_distributed(args: Any, device: torch.device) -> torch.device:
    """Start the process group when launched by torchrun, ``torch.distributed.launch`` or ``srun``.

    Reads ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` from the environment (``--local-rank`` of
    the legacy launcher when ``LOCAL_RANK`` is unset); without them, SLURM's ``SLURM_PROCID``,
    ``SLURM_NTASKS`` and ``SLURM_LOCALID`` (see :func:`slurm_launch`). Without a world size (or
    with 1) the run is single-process. Sets ``args.rank``, ``args.world_size``,
    ``args.local_rank`` and ``args.distributed``; returns the device of this process
    (``cuda:LOCAL_RANK`` on GPUs, or the ``--device cuda:N`` of a single process). The backend
    is NCCL on CUDA and gloo on CPU.

    Not timm's ``init_distributed_device``, which also reads SLURM's variables but leaves
    ``MASTER_ADDR`` / ``MASTER_PORT`` unset under ``srun`` (the ``env://`` rendezvous then
    fails), takes ``LOCAL_RANK`` as the CUDA index (a task of ``srun --gpus-per-task=1`` sees
    one GPU, index 0), replaces a ``--device cuda:N`` under a launcher with a warning, and
    fails with assertions, not one line.
    """
    slurm = slurm_launch()
    world_size = env_int('WORLD_SIZE')
    rank = env_int('RANK')
    local_rank = env_int('LOCAL_RANK')
    if slurm is not None:
        rank, world_size, local_rank = slurm
    if local_rank is None:
        local_rank = getattr(args, 'local_rank', None)
    if device.type == 'cuda' and device.index is not None and (local_rank is not None or (world_size or 1) > 1):
        raise UsageError(f'--device {device} conflicts with the launcher, which gives each process '
                         f'cuda:LOCAL_RANK (here {local_rank}); use --device cuda, or CUDA_VISIBLE_DEVICES')
    if world_size is None or world_size <= 1:
        args.rank, args.world_size, args.distributed = 0, 1, False
        args.local_rank = 0 if local_rank is None else local_rank
        if device.type == 'cuda':
            index = device.index if device.index is not None else args.local_rank
            torch.cuda.set_device(index)
            return torch.device('cuda', index)
        return device
    if rank is None:
        raise UsageError('WORLD_SIZE is set but RANK is not: launch with torchrun or '
                         'python -m torch.distributed.launch --use_env')
    if local_rank is None:
        local_rank = rank
    args.rank, args.world_size, args.local_rank, args.distributed = rank, world_size, local_rank, True
    if slurm is not None:
        log(f'SLURM task {rank} of {world_size} (local {local_rank}): rendezvous at '
            f'{os.environ["MASTER_ADDR"]}:{os.environ["MASTER_PORT"]}')
    if device.type == 'cuda':
        count = torch.cuda.device_count()
        # srun --gpus-per-task=1 shows each task one GPU: its local rank then wraps to 0
        index = local_rank % count if slurm is not None else local_rank
        if index >= count:
            raise UsageError(f'LOCAL_RANK {local_rank} but only {count} CUDA device(s) are visible')
        torch.cuda.set_device(index)
        device = torch.device('cuda', index)
        backend = 'nccl'
    else:
        backend = 'gloo'
    args.dist_backend = backend
    kwargs: Dict[str, Any] = dict(backend=backend, init_method=args.dist_url, world_size=world_size, rank=rank)
    if backend == 'nccl':
        kwargs['device_id'] = device
    dist.init_process_group(**kwargs)
    dist.barrier()
    return device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return get_rank() == 0


def cleanup_distributed() -> None:
    """The collective end of a run (every rank gets here): the normal and the preempted ends only.
    A failing rank must not call it (see :func:`exit_without_teardown`)."""
    if is_dist():
        dist.destroy_process_group()
    _REDUCED.clear()  # see all_reduce_sum


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    if is_dist():
        dist.barrier()


def exit_without_teardown(status: int) -> NoReturn:
    """End this process now with ``status``, after flushing stdout and stderr: ``os._exit``, no
    collective, no atexit handlers. The failure path of a distributed run: the peers of a failing
    rank may wait for it in a collective, and a collective teardown here would wait for them in
    turn; the launcher ends them (docs/training.md, "When one rank fails"). The caller prints the
    error line first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


# The tensors all_reduce_sum has reduced, kept until cleanup_distributed has destroyed the process
# group, so that no gloo worker thread frees one during the teardown (docs/training.md, "When one
# rank fails"). A few float64 numbers a call, a few calls an epoch.
_REDUCED: List[torch.Tensor] = []


def all_reduce_sum(values: Sequence[float], device: torch.device) -> List[float]:
    """Sum a few numbers over all ranks (float64; identity when not distributed). Not timm's
    ``reduce_tensor``, which averages one tensor of the caller's dtype (counts and loss sums must
    be summed exactly) and needs a process group."""
    if not is_dist():
        return [float(v) for v in values]
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    _REDUCED.append(t)
    return t.tolist()


# Printing -----------------------------------------------------------------------------------------

def log(*items: Any, all_ranks: bool = False) -> None:
    """print() on rank 0 only (on every rank, tagged with the rank, when ``all_ranks``), one
    :func:`write_line` each. Not timm's ``setup_default_logging`` (the ``logging`` module): the
    lines are DeiT's, bare on stdout, for DeiT's log parsers."""
    rank = get_rank()
    if rank == 0 or all_ranks:
        if rank and all_ranks:
            items = (f'[rank {rank}]',) + items
        write_line(sys.stdout, ' '.join(str(i) for i in items))


def write_line(stream: Any, text: str) -> None:
    """``text`` and its newline in one write: lines of processes sharing a pipe (torchrun's
    workers) then never interleave, even with PYTHONUNBUFFERED, where print() writes twice."""
    stream.write(text + '\n')
    stream.flush()


def environment_info(args: Any) -> str:
    """One line with what a run's numbers depend on: seed, world size, device, precision, versions."""
    import timm
    import torchvision
    parts = [
        f'seed {args.seed}', f'world size {args.world_size}', f'device {args.device_resolved}',
        f'precision {getattr(args, "precision", "float32")}',
        f'deterministic {bool(args.deterministic)}', f'python {platform.python_version()}',
        f'torch {torch.__version__}', f'torchvision {torchvision.__version__}', f'timm {timm.__version__}',
        f'numpy {np.__version__}',
    ]
    if torch.cuda.is_available():
        parts.append(f'cuda {torch.version.cuda} cudnn {torch.backends.cudnn.version()}')
    parts.append(f'threads {torch.get_num_threads()}')
    return 'environment: ' + ', '.join(parts)


# Metric logging -----------------------------------------------------------------------------------

def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(round(seconds))))


class ProgressPrinter:
    """Prints ``header [ i/N] eta .. lr .. loss .. img/s ..`` every ``print_freq`` iterations
    (and at the last one) on rank 0. ``start``: iterations already done (a resumed epoch)."""

    def __init__(self, total: int, header: str, print_freq: int, images_per_iter: int, start: int = 0) -> None:
        self.total = total
        self.header = header
        self.print_freq = max(1, int(print_freq))
        self.images_per_iter = images_per_iter
        self.begin = start
        self.start = time.time()
        self.width = len(str(total))

    def due(self, i: int) -> bool:
        """Whether iteration ``i`` (0-based) prints."""
        return (i + 1) % self.print_freq == 0 or i + 1 == self.total

    def step(self, i: int, **values: Any) -> None:
        if not self.due(i):
            return
        elapsed = time.time() - self.start
        done = max(i + 1 - self.begin, 1)
        eta = elapsed / done * (self.total - i - 1)
        rate = self.images_per_iter * done / max(elapsed, 1e-9)
        parts = [f'{self.header} [{i + 1:>{self.width}}/{self.total}]', f'eta {format_seconds(eta)}']
        for key, value in values.items():
            parts.append(f'{key} {value}')
        parts.append(f'{rate:.1f} img/s')
        log('  '.join(parts))


# Arguments as plain data --------------------------------------------------------------------------

def plain(value: Any) -> Any:
    """``value`` as data that ``torch.load(weights_only=True)`` and JSON accept."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return str(value)


def args_to_dict(args: Any) -> Dict[str, Any]:
    return {k: plain(v) for k, v in sorted(vars(args).items())}


# Model names: what --arch and --model-kwargs build, and what checkpoints are compared on -----

BVIT_NAMES = 'BViT-5, BViT-22 (also BViT_5, BViT-21, BViT_21, bvit_5m, bvit_22m)'


def resolve_model_name(name: str) -> Tuple[str, str]:
    """('bvit', registered name) for BViT names, ('timm', name) for other timm models."""
    import timm
    try:
        return 'bvit', bvit_models.resolve_arch(name)
    except ValueError:
        pass
    if timm.is_model(name):
        return 'timm', name
    raise UsageError(f'unknown --arch {name!r}: neither a BViT name ({BVIT_NAMES}) nor a timm model name')


_OWN_FLAG_KWARGS = {'num_classes': '--data-set', 'img_size': '--input-size', 'patch_size': '--patch-size',
                    'stem': '--stem', 'broad': '--no-broad', 'broad_scale': '--broad-scale', 'drop_rate': '--drop',
                    'drop_path_rate': '--drop-path', 'in_chans': '(3 channels, fixed)', 'pretrained': '--finetune'}


def model_kwargs(args: Any) -> Dict[str, Any]:
    """``--model-kwargs KEY=VALUE ...`` as a dict (values read as Python literals, else strings).

    Not timm's ``ParseKwargs`` action: that stores a dict in the arguments (checkpoints store the
    list of ``KEY=VALUE`` strings, compared on ``--resume``), raises a traceback for a value that
    is not a literal and has a syntax error (``a b``) or an item without ``=``, and lets a key
    override a flag of this script (``num_classes``, ``img_size``, ...), which is refused here."""
    import ast
    items = args.get('model_kwargs') if isinstance(args, dict) else getattr(args, 'model_kwargs', None)
    out: Dict[str, Any] = {}
    for item in items or []:
        key, sep, value = str(item).partition('=')
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageError(f'--model-kwargs: expected KEY=VALUE, got {item!r}')
        if key in _OWN_FLAG_KWARGS:
            raise UsageError(f'--model-kwargs: {key} is set by {_OWN_FLAG_KWARGS[key]}, not here')
        try:
            out[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key] = value.strip()
    return out



# Checkpoint files ---------------------------------------------------------------------------------

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


def append_log_line(output_dir: str, stats: Mapping[str, Any]) -> None:
    """One JSON line per epoch in ``<output_dir>/log.txt`` (rank 0)."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(plain(stats)) + '\n')


def read_checkpoint(path: str) -> Any:
    """``bvit.models.read_checkpoint``, the one reader (``weights_only=True``), for the scripts:
    its FileNotFoundError / ValueError become a UsageError with the same message (one ``error:``
    line, exit status 2)."""
    try:
        return bvit_models.read_checkpoint(path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def model_state_from(obj: Any, model: nn.Module, path: str, use_ema: bool = False) -> Dict[str, Tensor]:
    """The state dict for ``model`` in a loaded checkpoint (this project's ``model`` or, with
    ``use_ema``, ``model_ema``; a bare state dict; a released BViT file), adapted to ``model`` by
    ``bvit.models.checkpoint_filter_fn`` (so a BViT checkpoint of another input size fits, its
    position table resampled). UsageError when it does not fit ``model``."""
    try:
        sd = bvit_models.checkpoint_filter_fn(obj, model, use_ema)
        bvit_models.check_state_dict(model, sd)
    except ValueError as e:
        raise UsageError(f'{path}: {e}') from None
    return sd


def load_model_weights(model: nn.Module, obj: Any, path: str, use_ema: bool = False) -> None:
    sd = model_state_from(obj, model, path, use_ema)
    model.load_state_dict(sd)


def model_identity(args: Any) -> Dict[str, Any]:
    """The settings that define a model beyond its parameter shapes (broad attention on or off,
    its scale, the stem, the patch size), with defaults filled in, for comparing runs."""
    get = args.get if isinstance(args, dict) else lambda k, d=None: getattr(args, k, d)
    kind, name = resolve_model_name(str(get('arch')))
    if kind == 'bvit':
        broad = not get('no_broad', False)
        ident = {'arch': name, 'broad': broad, 'stem': get('stem') or 'conv', 'patch_size': get('patch_size') or 16}
    else:
        broad = bool(get('broad', False))
        ident = {'arch': name, 'broad': broad, 'patch_size': get('patch_size')}
    if broad:
        ident['broad_scale'] = float(get('broad_scale', 0.4))
    ident['model_kwargs'] = ' '.join(sorted(f'{k}={v!r}' for k, v in model_kwargs(args).items())) or None
    return ident


_IDENTITY_FLAGS = {'arch': '--arch', 'stem': '--stem', 'patch_size': '--patch-size', 'broad_scale': '--broad-scale',
                   'model_kwargs': '--model-kwargs'}


def check_saved_args(obj: Any, args: Any, path: str) -> None:
    """A checkpoint of this script made with another model is refused, naming the flag to fix;
    this includes broad attention on/off and its scale, which change no parameter shape. The
    input size may differ with --eval (the position table is resampled), not when resuming."""
    saved = obj.get('args') if isinstance(obj, dict) else None
    if not isinstance(saved, dict) or 'arch' not in saved:
        return
    try:
        old = model_identity(saved)
    except UsageError:
        raise UsageError(f'{path} is a checkpoint of --arch {saved["arch"]}, which this installation does not know') from None
    new = model_identity(args)
    if old['arch'] == new['arch'] and old['broad'] != new['broad']:
        flag = '--no-broad' if resolve_model_name(args.arch)[0] == 'bvit' else '--broad'
        fix = ('remove' if (flag == '--no-broad') == old['broad'] else 'add') + f' {flag}'
        raise UsageError(f'{path} is a checkpoint of {old["arch"]} {"with" if old["broad"] else "without"} broad '
                         f'attention, but this run builds it {"with" if new["broad"] else "without"}; {fix}')
    for key in _IDENTITY_FLAGS:
        if old.get(key) != new.get(key):
            flag = _IDENTITY_FLAGS[key]
            raise UsageError(f'{path} is a checkpoint of a model with {flag} {old.get(key)}, but this run has '
                             f'{flag} {new.get(key)}; pass the same value')
    size = saved.get('input_size')
    if not getattr(args, 'eval', False) and size is not None and size != args.input_size:
        # --eval takes any size (the position table is resampled); training state is per size
        raise UsageError(f'{path} was trained with --input-size {size}, but this run has --input-size '
                         f'{args.input_size}; resume with the same size, or start a new run from these weights '
                         'with --finetune')


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
        'position': position,
    }


def save_checkpoint(obj: Dict[str, Any], path: str) -> None:
    """:func:`utils.atomic_save`, with a write that fails (disk full, no permission) as one line:
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
    load_model_weights(model, obj, path)  # a checkpoint of another model fails here, saying which key
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
        model_ema.module.load_state_dict(model_state_from(obj, model_ema.module, path, use_ema=True))
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



# --finetune: new head and resampled position embedding --------------------------------------------

def head_keys(model: nn.Module) -> List[str]:
    """State-dict keys of the classifier of ``model`` (timm's ``get_classifier``)."""
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(classifier, nn.Module):
        return []
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names.get(id(classifier))
    if prefix is None:
        return []
    return [f'{prefix}.{k}' for k in classifier.state_dict()]


def interpolate_pos_embed(model: nn.Module, state_dict: Dict[str, Tensor]) -> None:
    """Timm models other than BViT: resample ``state_dict['pos_embed']`` in place to ``model``'s
    grid with timm's ``resample_abs_pos_embed`` (the checkpoint's grid taken as square, as timm
    does; prefix tokens kept). A no-op at the same shape. (A BViT's table is resampled by
    ``bvit.models.checkpoint_filter_fn``.)"""
    if 'pos_embed' not in state_dict or not hasattr(model, 'pos_embed') or isinstance(model, bvit_models.BViT):
        return
    pe = state_dict['pos_embed']
    target = model.pos_embed
    if tuple(pe.shape) == tuple(target.shape):
        return
    grid = getattr(getattr(model, 'patch_embed', None), 'grid_size', None)
    if grid is None:
        raise UsageError(f'cannot resample pos_embed {tuple(pe.shape)} to {tuple(target.shape)} for this model')
    prefix = 0 if getattr(model, 'no_embed_class', False) else getattr(model, 'num_prefix_tokens', 1)
    state_dict['pos_embed'] = resample_abs_pos_embed(pe.float(), list(grid), num_prefix_tokens=prefix).to(pe.dtype)


def load_finetune_weights(model: nn.Module, path: str) -> List[str]:
    """``--finetune``: load a checkpoint (this project's, released BViT, or any state dict for the
    same architecture) into ``model`` with a fresh head where the class count differs and the
    position embedding resampled to the model's input size (``bvit.models.checkpoint_filter_fn``
    for a BViT, :func:`interpolate_pos_embed` for other timm models). Returns the keys left at
    their fresh initialisation (the head's, when replaced)."""
    obj = read_checkpoint(path)
    try:
        sd = bvit_models.checkpoint_filter_fn(obj, model)
    except ValueError as e:
        raise UsageError(f'{path}: {e}') from None
    interpolate_pos_embed(model, sd)
    own = model.state_dict()
    fresh: List[str] = []
    for key in head_keys(model):
        if key not in sd or tuple(sd[key].shape) != tuple(own[key].shape):
            sd[key] = own[key]
            fresh.append(key)
    try:
        bvit_models.check_state_dict(model, sd)
    except ValueError as e:
        raise UsageError(f'{path}: {e}') from None
    model.load_state_dict(sd)
    return fresh


__all__ = [
    'UsageError', 'NonFiniteLossError', 'resolve_device', 'init_distributed', 'is_dist', 'get_world_size',
    'get_rank', 'is_main_process', 'cleanup_distributed', 'barrier', 'exit_without_teardown', 'all_reduce_sum',
    'log', 'write_line', 'environment_info', 'format_seconds', 'ProgressPrinter', 'plain',
    'args_to_dict', 'BVIT_NAMES', 'resolve_model_name', 'model_kwargs', 'atomic_save', 'append_log_line',
    'read_checkpoint', 'model_identity', 'check_saved_args', 'make_checkpoint', 'save_checkpoint',
    'restore_training_state', 'SCHEDULE_FLAGS', 'check_resume_schedule', 'resume_position', 'model_state_from', 'load_model_weights', 'head_keys', 'interpolate_pos_embed', 'load_finetune_weights',
]
