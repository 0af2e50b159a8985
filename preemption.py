"""Preemption and exact resume: SIGTERM / SIGINT stop the training after a finished optimizer
step (:class:`StopSignal`), the run ends with :class:`RunStopped` (exit status
:data:`STOP_EXIT_STATUS`), and the checkpoint holds every rank's generator states
(:func:`rng_state`), so that ``--resume`` draws what an uninterrupted run would have
(:func:`epoch_seed`, :func:`set_rng_state`). docs/training.md, "Preemption", says how to use it.
"""
from __future__ import annotations

import os
import random
import signal
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from resume import save_checkpoint
from utils import barrier, get_world_size, is_dist, is_main_process, log


class RunStopped(Exception):
    """SIGTERM or SIGINT stopped the training after a finished optimizer step; a resumable
    checkpoint was written (with ``--output_dir``). The script exits with :data:`STOP_EXIT_STATUS`."""


STOP_EXIT_STATUS = 3


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of rank ``rank`` in epoch ``epoch``: every epoch's random numbers (augmentation,
    mixup, dropout, loader workers) depend only on (seed, epoch, rank), so a resumed run draws
    exactly what an uninterrupted one would have."""
    return (int(seed) * 1_000_003 + epoch * 10_007 + rank) % (2 ** 31)


class StopSignal:
    """While installed, SIGTERM and SIGINT only record that a stop was asked for: the training
    loop finishes its optimizer step, the ranks agree, rank 0 saves, and the run exits with
    :data:`STOP_EXIT_STATUS`. Further signals (also during the save) change nothing; SIGKILL
    still stops at once. Installed from the main thread only (Python's rule for handlers)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def install(self) -> 'StopSignal':
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else 'a signal'


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of the data loaders: SLURM and a terminal's Ctrl-C signal the whole
    process group, and a loader worker killed by them would end the step the main process is
    finishing; the main process stops its workers itself."""
    for sig in StopSignal.SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def rng_state() -> Dict[str, Any]:
    """Python's, NumPy's (also mixup's) and torch's (CPU and CUDA) generator states as plain
    data (tensors, numbers), so that a checkpoint holding them loads with ``weights_only=True``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        'torch': torch.get_rng_state(),
        'cuda': list(cuda),
        'numpy': {'keys': torch.from_numpy(np_state[1].astype(np.int64)), 'pos': int(np_state[2]),
                  'has_gauss': int(np_state[3]), 'cached_gaussian': float(np_state[4])},
        'python': {'version': int(py_state[0]), 'state': torch.tensor(py_state[1], dtype=torch.int64),
                   'gauss': py_state[2]},
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state(('MT19937', n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'],
                         n['cached_gaussian']))
    p = state['python']
    random.setstate((p['version'], tuple(int(v) for v in p['state'].tolist()), p['gauss']))


def gather_objects(obj: Any) -> List[Any]:
    """``obj`` of every rank, in rank order (one collective; used once, when a run stops)."""
    if not is_dist():
        return [obj]
    out: List[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def save_and_stop(args: Any, stop: StopSignal, epoch: int, state: Dict[str, Any],
                  checkpoint: Callable[[Dict[str, Any]], Dict[str, Any]]) -> None:
    """A stop agreed in the middle of ``epoch``: rank 0 saves ``checkpoint(position)``, the
    position being where every rank is (iterations done, its loss sums, its random states), then
    the run ends with :class:`RunStopped`."""
    ranks = gather_objects(state)  # every rank's own generator states and loss sums
    position = {'epoch': epoch, 'batches_done': state['batches_done'], 'batch_size': args.batch_size,
                'world_size': args.world_size, 'ranks': ranks}
    if args.output_dir and is_main_process():
        save_checkpoint(checkpoint(position), os.path.join(args.output_dir, 'checkpoint.pth'))  # further signals only set the flag
    barrier()  # no rank exits with status 3 (which a launcher may answer by killing the job) before the file is there
    stop_run(args.output_dir, stop, f'at epoch {epoch}, iteration {state["batches_done"]}/{state["batches_total"]}',
              'a resumable checkpoint.pth')


def stop_run(output_dir: str, stop: StopSignal, where: str, what: str) -> None:
    """Logs the one line of a stopped run and raises :class:`RunStopped`."""
    if output_dir:
        path = os.path.join(output_dir, 'checkpoint.pth')
        log(f'stopped by {stop.name} {where}: {what} is in {path}; continue with --resume {path} '
            f'(exit status {STOP_EXIT_STATUS})')
    else:
        log(f'stopped by {stop.name} {where}: nothing saved (no --output_dir) (exit status {STOP_EXIT_STATUS})')
    raise RunStopped(where)


__all__ = ['RunStopped', 'STOP_EXIT_STATUS', 'StopSignal', 'ignore_stop_signals', 'epoch_seed', 'rng_state',
           'save_and_stop', 'stop_run',
           'set_rng_state', 'gather_objects']
