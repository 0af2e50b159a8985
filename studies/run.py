"""Running a study: each run is ``train_hp.py`` in a subprocess, several side by side, each in its
own folder ``RUNS_DIR/<key>/seed<S>/`` with a marker file once it ended; a finished run may also
leave a small JSON record, from which its result is read back without the folder."""
from __future__ import annotations

import atexit
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any, Callable, Dict, List, Optional, Sequence

from studies.plan import REPO, RunSpec

TRAIN_SCRIPT = os.path.join(REPO, 'train_hp.py')
MARKER = 'reproduce.json'


# Record store -----------------------------------------------------------------------------------

def run_dir(runs_dir: str, spec: RunSpec) -> str:
    return os.path.join(runs_dir, spec.key, f'seed{spec.seed}')


def read_log(path: str) -> List[Dict[str, Any]]:
    """The JSON lines of a train_hp.py ``log.txt`` (blank or broken lines skipped)."""
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def record_path(records_dir: Optional[str], spec: RunSpec) -> Optional[str]:
    """The run's JSON record in ``records_dir`` (None without one)."""
    return os.path.join(records_dir, f'{spec.key}_seed{spec.seed}.json') if records_dir else None


def read_record(path: Optional[str]) -> Optional[Dict[str, Any]]:
    """A run record written by :func:`write_record` (None if absent, unreadable or not finished)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(rec, dict) or rec.get('returncode') != 0 or not rec.get('epochs'):
        return None
    return rec


def write_record(path: str, spec: RunSpec, directory: str) -> Optional[Dict[str, Any]]:
    """Write the small JSON record of a finished run (its command, wall time, parameters and, per
    epoch, test top-1 / top-5 / loss, training loss, throughput and seconds), from which the table
    is rebuilt without the run folder (checkpoints stay there). Returns it (None if unfinished)."""
    if not is_done(directory):
        return None
    with open(os.path.join(directory, MARKER)) as f:
        marker = json.load(f)
    rows = [r for r in read_log(os.path.join(directory, 'log.txt')) if 'test_acc1' in r]
    keep = ('epoch', 'test_acc1', 'test_acc5', 'test_loss', 'test_ema_acc1', 'test_ema_acc5', 'test_ema_loss', 'train_loss', 'train_lr', 'train_images_per_sec',
            'epoch_time_s')
    rec = dict(key=spec.key, seed=spec.seed, command=marker.get('command'), returncode=marker.get('returncode'),
               wall_s=marker.get('wall_s'), params=next((r['n_parameters'] for r in rows if 'n_parameters' in r), None),
               epochs=[{k: r[k] for k in keep if k in r} for r in rows])
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(rec, f, indent=1)
        f.write('\n')
    os.replace(tmp, path)
    return rec


def is_done(directory: str) -> bool:
    """A finished run: its marker says exit status 0 and its log has at least one epoch."""
    marker, log = os.path.join(directory, MARKER), os.path.join(directory, 'log.txt')
    if not (os.path.isfile(marker) and os.path.isfile(log)):
        return False
    try:
        with open(marker) as f:
            ok = json.load(f).get('returncode') == 0
    except (OSError, ValueError):
        return False
    return ok and any('test_acc1' in r for r in read_log(log))


def collect(spec: RunSpec, directory: str, record: Optional[str], metric: str) -> Optional[Dict[str, Any]]:
    """The result of one finished run, in the form ``studies.report.make_table`` takes, or None:
    from its JSON ``record`` when that exists, else from the run folder. ``metric``: the logged
    top-1 the result reports (``test_acc1``, or ``test_ema_acc1`` for the weight EMA);
    ``raw_acc1`` is the final ``test_acc1`` in either case."""
    rec = read_record(record)
    if rec is not None:
        rows = rec['epochs']
        marker = dict(wall_s=rec['wall_s'])
        if rec.get('params') is not None:
            rows = [dict(r, n_parameters=rec['params']) for r in rows]
    elif is_done(directory):
        rows = [r for r in read_log(os.path.join(directory, 'log.txt')) if 'test_acc1' in r]
        with open(os.path.join(directory, MARKER)) as f:
            marker = json.load(f)
    else:
        return None
    rows = [r for r in rows if metric in r]
    if not rows:
        return None
    curve = [float(r[metric]) for r in rows]
    # epochs of the curve's points (train_hp.py --eval-freq N evaluates every N-th epoch and the last N)
    curve_epochs = [int(r.get('epoch', i)) for i, r in enumerate(rows)]
    epochs = curve_epochs[-1] + 1 if curve_epochs else 0
    params = next((r[k] for r in rows for k in ('n_parameters', 'n_params', 'params') if k in r), None)
    speeds = [float(r['train_images_per_sec']) for r in rows if isinstance(r.get('train_images_per_sec'), (int, float))]
    return dict(group=spec.group, label=spec.label, key=spec.key, seed=spec.seed, meta=spec.meta,
                acc1=curve[-1], best_acc1=max(curve), epochs=epochs, params=params,
                sec_per_epoch=marker['wall_s'] / max(epochs, 1),
                train_img_per_sec=statistics.mean(speeds) if speeds else None,
                wall_s=marker['wall_s'], curve=curve, curve_epochs=curve_epochs,
                raw_acc1=float(rows[-1]['test_acc1']) if 'test_acc1' in rows[-1] else None,
                raw_curve=[float(r['test_acc1']) for r in rows] if all('test_acc1' in r for r in rows) else None)


# Process pool -----------------------------------------------------------------------------------

def train_command(spec: RunSpec, directory: str, config: str, extra: Sequence[str]) -> List[str]:
    """The train_hp.py command line of a run."""
    return [sys.executable, TRAIN_SCRIPT, '--config', config, '--seed', str(spec.seed),
            '--output_dir', directory, *spec.args, *extra]


class Runner:
    """The training subprocesses of one study invocation: started by :meth:`execute`, ended by
    :meth:`stop`, after which none starts (the pool's next run would otherwise start as its
    predecessor is terminated, and outlive the study)."""

    def __init__(self) -> None:
        self._children: set = set()
        self._lock = threading.Lock()
        self._stopping = False

    def stop(self, signum: int = 0, frame: Any = None) -> None:
        """Terminate the runs in progress (they live in sessions of their own, so a signal to this
        process would not reach them); with a signal number, exit then: a restart redoes them."""
        with self._lock:
            self._stopping = True
            children = list(self._children)
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
        for proc in children:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        if signum:
            os._exit(128 + signum)

    def execute(self, spec: RunSpec, directory: str, config: str, extra: Sequence[str], threads: Optional[int],
                keep_checkpoints: bool) -> Dict[str, Any]:
        """Run one training to completion (train_hp.py's output goes to DIR/train.out) and write
        the marker. Without ``keep_checkpoints`` the run's checkpoint.pth / best.pth are deleted
        once it finished. Returns the marker's content."""
        os.makedirs(directory, exist_ok=True)
        for name in ('log.txt', 'checkpoint.pth', 'best.pth'):  # a run that stopped half-way: start it afresh
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
        cmd = train_command(spec, directory, config, extra)
        env = dict(os.environ)
        if threads:
            env['OMP_NUM_THREADS'] = env['MKL_NUM_THREADS'] = str(threads)
        t0 = time.time()
        with open(os.path.join(directory, 'train.out'), 'w') as out:
            # its own session: with the kernel's autogroup scheduling, processes of one session
            # share one CPU share, so runs side by side would together get what one other process gets
            with self._lock:
                if self._stopping:
                    raise RuntimeError(f'the study is stopping: {spec.key} seed {spec.seed} not started')
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                        start_new_session=True)
                self._children.add(proc)
            try:
                rc = proc.wait()
            finally:
                with self._lock:
                    self._children.discard(proc)
        info = dict(command=' '.join(shlex.quote(c) for c in cmd), returncode=rc, wall_s=round(time.time() - t0, 2),
                    key=spec.key, label=spec.label, group=spec.group, seed=spec.seed, meta=spec.meta)
        if rc == 0 and not keep_checkpoints:
            for name in ('checkpoint.pth', 'best.pth'):
                if os.path.exists(os.path.join(directory, name)):
                    os.remove(os.path.join(directory, name))
        with open(os.path.join(directory, MARKER), 'w') as f:
            json.dump(info, f, indent=1)
        return info


def run_all(todo: Sequence[RunSpec], runs_dir: str, records_dir: Optional[str], config: str, extra: Sequence[str],
            jobs: int, threads: Optional[int], keep_checkpoints: Callable[[RunSpec], bool],
            finished: Callable[[int, RunSpec, Dict[str, Any]], None]) -> List[str]:
    """Run ``todo``, ``jobs`` at a time, in order of the list. Each finished run writes its record
    (with ``records_dir``) and is handed to ``finished(n, spec, marker)``, n counting from 1 in
    order of completion. SIGTERM, SIGHUP, SIGINT and the interpreter's exit stop the runs in
    progress (:meth:`Runner.stop`); the caller's handlers come back afterwards. Returns the
    folders of the runs that failed."""
    runner = Runner()
    failed: List[str] = []

    def one(s: RunSpec) -> Dict[str, Any]:
        d = run_dir(runs_dir, s)
        info = runner.execute(s, d, config, extra, threads, keep_checkpoints(s))
        if info['returncode'] == 0 and records_dir:
            write_record(record_path(records_dir, s), s, d)
        return info

    stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # Ctrl-C reaches this process only
    previous = {sig: signal.signal(sig, runner.stop) for sig in stops}
    atexit.register(runner.stop)
    try:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = {pool.submit(one, s): s for s in todo}
            for n, fut in enumerate(as_completed(futures), 1):
                s, info = futures[fut], fut.result()
                if info['returncode'] != 0:
                    failed.append(run_dir(runs_dir, s))
                finished(n, s, info)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        atexit.unregister(runner.stop)
    return failed
