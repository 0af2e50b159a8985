"""Helpers of the training script: errors, distributed set-up, printing and metric logging.
Checkpoint files and ``--resume`` live in ``resume.py``, preemption in ``preemption.py``; weights
load through ``bvit.checkpoint``.
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


def prepare_output_dir(output_dir: str, resume: Optional[str]) -> None:
    """Create ``--output_dir`` (on the main process); one holding a checkpoint.pth is refused unless
    it is ``--resume``'s."""
    if not output_dir:
        return
    existing = os.path.join(output_dir, 'checkpoint.pth')
    if os.path.exists(existing) and not (resume and os.path.exists(resume)
                                         and os.path.samefile(existing, resume)):
        raise UsageError(f'{output_dir} already holds a checkpoint.pth; continue it with --resume {existing}, '
                         'or choose another --output_dir')
    if is_main_process():
        os.makedirs(output_dir, exist_ok=True)


def append_log_line(output_dir: str, stats: Mapping[str, Any]) -> None:
    """One JSON line per epoch in ``<output_dir>/log.txt`` (rank 0)."""
    if is_main_process() and output_dir:
        with open(os.path.join(output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps(plain(stats)) + '\n')


__all__ = [
    'UsageError', 'NonFiniteLossError', 'resolve_device', 'init_distributed', 'is_dist', 'get_world_size',
    'get_rank', 'is_main_process', 'cleanup_distributed', 'barrier', 'exit_without_teardown', 'all_reduce_sum',
    'log', 'write_line', 'environment_info', 'format_seconds', 'ProgressPrinter', 'plain',
    'args_to_dict', 'append_log_line',
]
