"""Reproduction studies on real data: does broad attention help, and how much?

Two studies (``--study``): ``digits`` (the default; scikit-learn's 8x8 digits, recipe
``configs/demo_digits.yaml``, table and plot in figs/reproduction.{md,png}) and ``fashion_mnist``
(Fashion-MNIST, recipe ``configs/fashion_mnist.yaml`` on a fixed 3,000-image training subset, full
10,000-image test set; table and plot in figs/fashion_mnist.{md,png}, one JSON record per run in
figs/fashion_mnist/runs/). A study's preset only sets defaults: every flag below still applies.

Every run is ``train_hp.py`` itself, started as a subprocess with this interpreter, on the study's
recipe; its per-epoch ``log.txt`` (one JSON line per epoch) is the only result read back. Suites
(``--suite``, comma-separated):

* ``bvit``: BViT-5M and the same network without broad attention (``--no-broad``: same
  parameters, same initialisation for a seed), with the conv stem and without it, over
  ``--seeds`` (default 5 seeds).
* ``scale``: BViT with ``broad_scale`` in ``--scales`` (default 0, 0.2, 0.4, 0.6, 1.0), first stem,
  over ``--scale-seeds`` (default 3); the 0.4 runs are the ``bvit`` suite's own and 0 is the
  ``--no-broad`` twin, which trains identically (bit for bit: 0 x broad adds exact zeros).
* ``wrapped``: a timm backbone (``--wrapped-arch``, default ``deit_tiny_patch16_224`` at the
  recipe's input and patch size) with broad attention added (``--broad``, :mod:`bvit.broad`)
  beside its plain twin, over ``--wrapped-seeds`` (default 3).

Each run lives in ``RUNS_DIR/<variant>/seed<S>/``; one that finished (``reproduce.json`` marker
with exit status 0 and a log), or whose JSON record is in ``--records-dir``, is not run again, so
the study resumes where it stopped (also in a fresh clone, from the committed records). ``--jobs``
runs go side by side (default 1; fashion_mnist: 2), each with OMP_NUM_THREADS=1 (``--threads``).
The table (``--out-md``) gives mean ± std (over seeds) of the final-epoch top-1, the best epoch's,
the parameters, seconds per epoch and training throughput, the per-seed paired differences
broad − twin with a 95% confidence interval (t distribution) and a paired t-test, and per run the
change of test top-1 over the last 5 epochs (converged: under 0.3 points); the plot
(``--out-png``) shows the per-seed accuracies, the paired differences, the scale sweep and the
mean test curves.

    python reproduce.py --epochs 6     # the DIGITS study in figs/reproduction.{md,png}: 35 runs, ~40 min on 2 cores
    python reproduce.py --quick        # smoke test: 1 epoch, 13 runs, output in runs/reproduce_quick
    python reproduce.py --suite bvit --stems conv --seeds 0,1,2 --epochs 15   # the demo's full budget
    python reproduce.py --epochs 6 --report-only   # rewrite table and plot from finished runs
    python reproduce.py --study fashion_mnist      # the Fashion-MNIST study (22 runs, 2 side by side)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.abspath(__file__))
TRAIN_SCRIPT = os.path.join(REPO, 'train_hp.py')
DEFAULT_CONFIG = os.path.join('configs', 'demo_digits.yaml')
MARKER = 'reproduce.json'

SUITES = ('bvit', 'scale', 'wrapped')
CONVERGED_POINTS = 0.3   # a run is converged when its test top-1 moved less than this over the last
CONVERGED_EPOCHS = 5     # CONVERGED_EPOCHS epochs (max − min)

# Presets of --study: defaults of the flags (every flag given on the command line wins).
STUDIES: Dict[str, Dict[str, Any]] = {
    'digits': dict(
        suite=list(SUITES), config=DEFAULT_CONFIG, seeds=[0, 1, 2, 3, 4], scale_seeds=[0, 1, 2], wrapped_seeds=[0, 1, 2],
        scales=[0, 0.2, 0.4, 0.6, 1.0], stems=['conv', 'none'], arch_name=None, wrapped_args=[], study_args=[],
        jobs=1, runs_dir=os.path.join('runs', 'reproduce'), records_dir=None,
        out_md=os.path.join('figs', 'reproduction.md'), out_png=os.path.join('figs', 'reproduction.png'),
        title='Reproduction on DIGITS', split='the DIGITS validation split (357 images)', metric='test_acc1'),
    'fashion_mnist': dict(
        # the wrapped pairs before the sweep: a study cut short still has the paired comparisons
        suite=['bvit', 'wrapped', 'scale'], config=os.path.join('configs', 'fashion_mnist.yaml'), seeds=[0, 1, 2, 3, 4], scale_seeds=[0, 1, 2],
        wrapped_seeds=[0, 1, 2], scales=[0, 0.2, 0.4, 1.0], stems=['none'], arch_name='BViT-12L-D48',
        # deit_tiny (D=192, 3 heads) narrowed to the BViT runs' width: 2 heads of 24, 12 layers
        wrapped_args=['--model-kwargs', 'embed_dim=48', 'num_heads=2'],
        # the study's budget: a fixed random 3,000 of the 60,000 training images (the same for every run)
        study_args=['--train-subset', '3000'],
        jobs=2, runs_dir=os.path.join('output', 'fashion_mnist'),
        records_dir=os.path.join('figs', 'fashion_mnist', 'runs'),
        out_md=os.path.join('figs', 'fashion_mnist.md'), out_png=os.path.join('figs', 'fashion_mnist.png'),
        title='Broad attention on Fashion-MNIST', split='the 10,000 Fashion-MNIST test images',
        # the recipe's weight EMA is the reported model: fixed before the study, because a pilot's raw
        # weights moved 3.4 points of test top-1 in one epoch at lr 2.7e-5 (no plateau to measure)
        metric='test_ema_acc1'),
}


@dataclass
class RunSpec:
    """One training run: ``train_hp.py --config CONFIG --seed SEED --output_dir DIR *args``."""
    key: str                  # directory name of the variant, unique per variant
    label: str                # human-readable variant name for tables and plots
    group: str                # table the variant belongs to
    seed: int
    args: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)   # e.g. stem, broad, broad_scale


# Study plan -------------------------------------------------------------------------------------

def _fmt_scale(s: float) -> str:
    return f'{s:g}'


def plan_runs(suites: Sequence[str], seeds: Sequence[int], scale_seeds: Sequence[int],
              wrapped_seeds: Sequence[int], scales: Sequence[float], wrapped_arch: str,
              bvit_arch: str = 'bvit_5m', stems: Sequence[str] = ('conv', 'none'), arch_name: Optional[str] = None,
              wrapped_args: Sequence[str] = ()) -> List[RunSpec]:
    """The table entries of the chosen suites, in the order they should run: suite by suite,
    seed-major, so an interrupted study already holds complete pairs.

    An entry names the run (``key``, ``seed``) whose result it shows; several entries may share a
    run (see :func:`unique_runs`): the sweep's 0.4 point is the ``bvit`` suite's conv-stem BViT
    run, and its 0 point is the ``--no-broad`` twin, which trains identically (the broad output
    times 0 adds exact zeros to the tokens and to every gradient; same parameters, same
    initialisation, same random draws). The sweep uses the first of ``stems``; ``arch_name``
    names the BViT in labels; ``wrapped_args`` go to both runs of the wrapped suite.
    """
    entries: List[RunSpec] = []
    name = arch_name or ('BViT-5M' if bvit_arch == 'bvit_5m' else bvit_arch)
    sweep_stem = stems[0] if stems else 'conv'

    def bvit_run(stem: str, broad: bool, scale: float, seed: int) -> RunSpec:
        stem_txt = 'conv stem' if stem == 'conv' else 'no stem'
        args = ['--arch', bvit_arch, '--stem', stem]
        if broad:
            key = f'{bvit_arch}_{stem}_broad{_fmt_scale(scale)}'
            label = f'{name}, {stem_txt}, broad {_fmt_scale(scale)}'
            args += ['--broad-scale', _fmt_scale(scale)]
        else:
            key = f'{bvit_arch}_{stem}_nobroad'
            label = f'{name}, {stem_txt}, no broad (twin)'
            args += ['--no-broad']
        return RunSpec(key, label, 'bvit', seed, args,
                       dict(arch=bvit_arch, stem=stem, broad=broad, broad_scale=scale if broad else None))

    for suite in suites:
        if suite == 'bvit':
            for seed in seeds:
                for stem in stems:
                    entries.append(bvit_run(stem, True, 0.4, seed))
                    entries.append(bvit_run(stem, False, 0.4, seed))
        elif suite == 'scale':
            for seed in scale_seeds:
                for sc in scales:
                    sc = float(sc)
                    run = bvit_run(sweep_stem, sc != 0, sc, seed)
                    stem_txt = 'conv stem' if sweep_stem == 'conv' else 'no stem'
                    label = f'{name}, {stem_txt}, broad_scale {_fmt_scale(sc)}'
                    if sc == 0:
                        label += ' (= the no-broad twin)'
                    entries.append(RunSpec(run.key, label, 'scale', seed, run.args,
                                           dict(arch=bvit_arch, stem=sweep_stem, broad=True, broad_scale=sc)))
        elif suite == 'wrapped':
            for seed in wrapped_seeds:
                entries.append(RunSpec(f'{wrapped_arch}_broad0.4', f'{wrapped_arch}, broad 0.4', 'wrapped', seed,
                                       ['--arch', wrapped_arch, '--broad', '--broad-scale', '0.4', *wrapped_args],
                                       dict(arch=wrapped_arch, broad=True, broad_scale=0.4)))
                entries.append(RunSpec(f'{wrapped_arch}_plain', f'{wrapped_arch}, plain (twin)', 'wrapped', seed,
                                       ['--arch', wrapped_arch, *wrapped_args], dict(arch=wrapped_arch, broad=False)))
        else:
            raise ValueError(f'unknown suite {suite!r}; choose from {", ".join(SUITES)}')
    return entries


def unique_runs(entries: Sequence[RunSpec]) -> List[RunSpec]:
    """The distinct trainings behind ``entries`` (first entry of each (key, seed)), in order."""
    seen = set()
    out = []
    for e in entries:
        if (e.key, e.seed) not in seen:
            seen.add((e.key, e.seed))
            out.append(e)
    return out


# Running ----------------------------------------------------------------------------------------

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


def train_command(spec: RunSpec, directory: str, config: str, extra: Sequence[str]) -> List[str]:
    """The train_hp.py command line of a run."""
    return [sys.executable, TRAIN_SCRIPT, '--config', config, '--seed', str(spec.seed),
            '--output_dir', directory, *spec.args, *extra]


_CHILDREN: set = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set by _stop_children: no run starts after it (the pool's next one would
                               # otherwise start as its predecessor is terminated, and outlive the study)


def _stop_children(signum: int = 0, frame: Any = None) -> None:
    """Terminate the runs in progress (they live in sessions of their own, so a signal to this
    process would not reach them), then exit: a restart redoes them."""
    with _CHILDREN_LOCK:
        _STOPPING.set()
        children = list(_CHILDREN)
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


def execute(spec: RunSpec, directory: str, config: str, extra: Sequence[str], threads: Optional[int] = None,
            keep_checkpoints: bool = True) -> Dict[str, Any]:
    """Run one training to completion (train_hp.py's output goes to DIR/train.out) and write the
    marker. Without ``keep_checkpoints`` the run's checkpoint.pth / best.pth (~85 MB each for
    BViT-5M, optimizer state included) are deleted once it finished. Returns the marker's content."""
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
        # its own session: with the kernel's autogroup scheduling (Linux's default on desktops and
        # here), processes of one session share one CPU share, so runs side by side would
        # together get what one other process gets
        with _CHILDREN_LOCK:
            if _STOPPING.is_set():
                raise RuntimeError(f'the study is stopping: {spec.key} seed {spec.seed} not started')
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)
            _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    info = dict(command=' '.join(shlex.quote(c) for c in cmd), returncode=rc, wall_s=round(time.time() - t0, 2),
                key=spec.key, label=spec.label, group=spec.group, seed=spec.seed, meta=spec.meta)
    if rc == 0 and not keep_checkpoints:
        for name in ('checkpoint.pth', 'best.pth'):
            if os.path.exists(os.path.join(directory, name)):
                os.remove(os.path.join(directory, name))
    with open(os.path.join(directory, MARKER), 'w') as f:
        json.dump(info, f, indent=1)
    return info


def collect(spec: RunSpec, directory: str, record: Optional[str] = None,
            metric: str = 'test_acc1') -> Optional[Dict[str, Any]]:
    """The result of one finished run, in the form :func:`make_table` takes, or None: from its
    JSON ``record`` when that exists, else from the run folder. ``metric``: the logged top-1 the
    result reports (``test_acc1``, or ``test_ema_acc1`` for the weight EMA); ``raw_acc1`` is the
    final ``test_acc1`` in either case."""
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


def convergence(curve: Sequence[float], curve_epochs: Optional[Sequence[int]] = None,
                epochs: int = CONVERGED_EPOCHS) -> Optional[float]:
    """max − min of the test top-1 over the last ``epochs`` epochs (None for a shorter curve, or
    when ``curve_epochs``, the epoch of each point, shows that one of those epochs was not evaluated)."""
    if len(curve) < epochs:
        return None
    if curve_epochs is not None and list(curve_epochs[-epochs:]) != list(range(curve_epochs[-1] - epochs + 1,
                                                                               curve_epochs[-1] + 1)):
        return None
    tail = [float(x) for x in curve[-epochs:]]
    return max(tail) - min(tail)


# Table (pure) -----------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f'{m:.{digits}f} ± {s:.{digits}f}'


def _params(v: Any) -> str:
    if v is None:
        return '?'
    v = float(v)
    return f'{v / 1e6:.3f}M' if v >= 1e5 else f'{int(v):,}'


def summarize(results: Sequence[Mapping[str, Any]]) -> List[Dict[str, Any]]:
    """One row per variant (in order of first appearance): n seeds, acc1 / best_acc1 values,
    parameters, seconds per epoch."""
    rows: Dict[str, Dict[str, Any]] = {}
    for r in results:
        row = rows.setdefault(r['label'], dict(label=r['label'], group=r['group'], meta=r.get('meta', {}),
                                               seeds=[], acc1=[], best_acc1=[], sec=[], speed=[], params=None))
        row['seeds'].append(r['seed'])
        row['acc1'].append(float(r['acc1']))
        row['best_acc1'].append(float(r.get('best_acc1', r['acc1'])))
        if r.get('sec_per_epoch') is not None:
            row['sec'].append(float(r['sec_per_epoch']))
        if r.get('train_img_per_sec') is not None:
            row['speed'].append(float(r['train_img_per_sec']))
        if r.get('params') is not None:
            row['params'] = r['params']
    return list(rows.values())


def paired_differences(results: Sequence[Mapping[str, Any]], a: str, b: str) -> Dict[str, Any]:
    """Per-seed acc1(a) - acc1(b) over the seeds both variants have: the differences, wins / ties /
    losses, the paired t statistic with its two-sided p-value and the 95% confidence interval of
    the mean difference (t distribution, n - 1 degrees of freedom; None where undefined or
    without scipy)."""
    by = {(r['label'], r['seed']): float(r['acc1']) for r in results}
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    t = p = ci = None
    if len(diffs) > 1:
        m, sd = mean_std(diffs)
        t = math.inf * (1 if m > 0 else -1 if m < 0 else 0) if sd == 0 else m / (sd / math.sqrt(len(diffs)))
        try:
            from scipy.stats import t as student_t
            half = float(student_t.ppf(0.975, len(diffs) - 1)) * sd / math.sqrt(len(diffs))
            ci = (m - half, m + half)
            if sd > 0:
                p = float(2 * student_t.sf(abs(t), len(diffs) - 1))
        except ImportError:  # scipy comes with scikit-learn, but the table does not need it
            pass
    return dict(a=a, b=b, seeds=seeds, diffs=diffs, wins=sum(d > 0 for d in diffs),
                ties=sum(d == 0 for d in diffs), losses=sum(d < 0 for d in diffs), t=t, p=p, ci=ci)


def default_pairs(results: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
    """(broad, twin) label pairs: for each non-broad variant, the broad variant of the same group
    with the same arch and stem and broad_scale 0.4 (the released setting)."""
    labels: Dict[str, Tuple[str, Mapping[str, Any]]] = {}
    for r in results:
        labels.setdefault(r['label'], (r['group'], r.get('meta', {})))
    pairs = []
    for twin, (g, m) in labels.items():
        if m.get('broad') is False:
            for lab, (h, n) in labels.items():
                if (h == g and n.get('broad') and n.get('arch') == m.get('arch') and n.get('stem') == m.get('stem')
                        and n.get('broad_scale') == 0.4):
                    pairs.append((lab, twin))
                    break
    return pairs


GROUP_TITLES = {
    'bvit': 'BViT vs the same network without broad attention',
    'scale': 'Sweep of broad_scale',
    'wrapped': 'Broad attention added to a timm backbone (bvit.broad; same recipe)',
}


def make_table(results: Sequence[Mapping[str, Any]], pairs: Optional[Sequence[Tuple[str, str]]] = None,
               title: str = 'Reproduction on DIGITS', preamble: str = '', per_run: bool = False,
               missing: Sequence[str] = ()) -> str:
    """Markdown report of the study from per-run results (pure: no files, no clock).

    Each result is a mapping with ``group`` ('bvit', 'scale', 'wrapped' or any other name),
    ``label`` (variant), ``seed``, ``acc1`` (final-epoch top-1, %), and optionally ``best_acc1``,
    ``params``, ``sec_per_epoch``, ``train_img_per_sec``, ``meta`` (arch, stem, broad, broad_scale; used to pair each
    twin with its broad variant of the same group when ``pairs`` is None). One run may appear in
    several groups under different labels (the sweep's 0 and 0.4 points). ``per_run`` adds a table
    of every run with its test top-1 change over the last 5 epochs (``curve`` needed) and whether it
    converged (under 0.3 points); ``missing`` lists runs not finished yet (a partial table).
    """
    lines = [f'# {title}' + (' (PARTIAL)' if missing else ''), '']
    if preamble:
        lines += [preamble.rstrip(), '']
    if missing:
        lines += [f'**Partial: {len(missing)} planned run(s) not finished yet, left out of every row below:** '
                  + ', '.join(missing) + '.', '']
    groups: List[str] = []
    for r in results:
        if r['group'] not in groups:
            groups.append(r['group'])
    for g in groups:
        rows = summarize([r for r in results if r['group'] == g])
        lines += [f'## {GROUP_TITLES.get(g, g)}', '',
                  '| variant | seeds | top-1 final (%) | top-1 best epoch (%) | parameters | s / epoch | train img/s |',
                  '|---|---|---|---|---|---|---|']
        for row in rows:
            sec = f'{statistics.mean(row["sec"]):.1f}' if row['sec'] else '?'
            speed = f'{statistics.mean(row["speed"]):.0f}' if row['speed'] else '?'
            lines.append(f'| {row["label"]} | {len(row["seeds"])} | {_pm(row["acc1"])} | {_pm(row["best_acc1"])} '
                         f'| {_params(row["params"])} | {sec} | {speed} |')
        lines.append('')
    if pairs is None:
        pairs = default_pairs(results)
    # with a weight EMA reported, the raw weights' final top-1 too (``raw_acc1``)
    raw = [dict(r, acc1=r['raw_acc1']) for r in results if r.get('raw_acc1') is not None]
    has_raw = len(raw) == len(results) and any(r['raw_acc1'] != r['acc1'] for r in results)
    lines += _pair_table(results, pairs, 'final-epoch top-1')
    if has_raw:
        lines += _pair_table(raw, pairs, 'raw weights (no EMA), final-epoch top-1')
    if per_run:
        runs: Dict[Tuple[str, int], Mapping[str, Any]] = {}
        for r in results:
            runs.setdefault((r.get('key', r['label']), r['seed']), r)
        lines += [f'## Every run: convergence (test top-1 max − min over the last {CONVERGED_EPOCHS} epochs '
                  f'< {CONVERGED_POINTS} points)', '',
                  '| run | seed | epochs | top-1 final (%) | top-1 over the last 5 epochs (%) | max − min '
                  '| converged | s / epoch |' + (' raw weights final (%) | raw max − min | raw converged |'
                                                  if has_raw else ''),
                  '|---|---|---|---|---|---|---|---|' + ('---|---|---|' if has_raw else '')]
        for (key, seed), r in runs.items():
            curve = list(r.get('curve') or [])
            spread = convergence(curve, r.get('curve_epochs'))
            tail = ', '.join(f'{x:.2f}' for x in curve[-CONVERGED_EPOCHS:])
            ok = '–' if spread is None else ('yes' if spread < CONVERGED_POINTS else '**no**')
            sec = f'{r["sec_per_epoch"]:.1f}' if r.get('sec_per_epoch') is not None else '?'
            lines.append(f'| {r["label"]} | {seed} | {r.get("epochs", len(curve))} | {float(r["acc1"]):.2f} | {tail} '
                         f'| {"–" if spread is None else f"{spread:.2f}"} | {ok} | {sec} |'
                         + (_raw_cells(r) if has_raw else ''))
        lines.append('')
    return '\n'.join(lines).rstrip() + '\n'


def _raw_cells(r: Mapping[str, Any]) -> str:
    """Per-run table cells of the raw weights (when a weight EMA is reported): final top-1 and
    the convergence of their own curve."""
    spread = convergence(r.get('raw_curve') or [], r.get('curve_epochs'))
    ok = '–' if spread is None else ('yes' if spread < CONVERGED_POINTS else '**no**')
    return f' {float(r["raw_acc1"]):.2f} | {"–" if spread is None else f"{spread:.2f}"} | {ok} |'


def _pair_table(results: Sequence[Mapping[str, Any]], pairs: Sequence[Tuple[str, str]], heading: str) -> List[str]:
    """Markdown lines of the paired differences broad − twin (same seed) of ``pairs``."""
    if not pairs:
        return []
    lines = [f'## Paired differences (same seed), {heading}', '',
             '| broad variant − twin | seeds | mean ± std (points) | 95% CI | per seed '
             '| broad better / equal / worse | paired t (p) |',
             '|---|---|---|---|---|---|---|']
    for a, b in pairs:
        d = paired_differences(results, a, b)
        if not d['seeds']:
            continue
        per = ', '.join(f'{x:+.2f}' for x in d['diffs'])
        if d['t'] is None:
            tp = '–'
        else:
            tp = f'{d["t"]:.2f}' + (f' ({d["p"]:.2f})' if d['p'] is not None else '')
        ci = f'[{d["ci"][0]:+.2f}, {d["ci"][1]:+.2f}]' if d.get('ci') else '–'
        lines.append(f'| {_short_pair(a, b)} | {len(d["seeds"])} | {_pm(d["diffs"])} | {ci} | {per} '
                     f'| {d["wins"]} / {d["ties"]} / {d["losses"]} | {tp} |')
    lines.append('')
    return lines


# Plot -------------------------------------------------------------------------------------------

def _short_pair(a: str, b: str) -> str:
    """'X, Y, broad 0.4' and 'X, Y, no broad (twin)' -> 'X, Y: broad 0.4 − no broad (twin)'."""
    pa, pb = a.split(', '), b.split(', ')
    n = 0
    while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
        n += 1
    if n == 0:
        return f'{a} − {b}'
    return f'{", ".join(pa[:n])}: {", ".join(pa[n:])} − {", ".join(pb[n:])}'


def _wrap_label(text: str, width: int = 15) -> str:
    """Tick label on several lines: one per comma-separated part, long names cut after an '_'."""
    out = []
    for part in text.replace(': ', ':, ').replace(' − ', ', − ').split(', '):
        while len(part) > width and '_' in part[4:width + 1]:
            cut = part.rfind('_', 4, width + 1) + 1
            out.append(part[:cut])
            part = part[cut:]
        out.append(part)
    return '\n'.join(out)


def make_plot(results: Sequence[Mapping[str, Any]], out_path: str, title: str = 'Reproduction on DIGITS') -> None:
    """Up to four panels: per-seed final top-1 of every variant (bvit and wrapped groups), the
    per-seed paired difference broad − twin, the broad_scale sweep, and the mean test-accuracy
    curves of the bvit and wrapped groups."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    compare = summarize([r for r in results if r['group'] in ('bvit', 'wrapped')])
    pairs = [p for p in default_pairs(results) if paired_differences(results, *p)['seeds']]
    sweep = [r for r in results if r['group'] == 'scale']
    curves = [r for r in results if r['group'] in ('bvit', 'wrapped') and r.get('curve')]
    panels = [p for p, ok in (('compare', compare), ('pairs', pairs), ('sweep', sweep), ('curves', curves)) if ok]
    if not panels:
        raise ValueError('no results to plot')
    ncols = 2 if len(panels) > 1 else 1
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.2 * ncols, 4.4 * nrows), squeeze=False)
    axes = list(axes.ravel())
    for ax in axes[len(panels):]:
        ax.axis('off')

    def color_of(meta: Mapping[str, Any]) -> str:
        return 'tab:blue' if meta.get('broad') else 'tab:gray'

    for ax, panel in zip(axes, panels):
        if panel == 'compare':
            for i, row in enumerate(compare):
                n = len(row['acc1'])
                xs = [i - 0.15 + 0.2 * j / max(n - 1, 1) for j in range(n)]
                ax.scatter(xs, row['acc1'], s=14, color=color_of(row['meta']), alpha=0.6, zorder=2)
                m, sd = mean_std(row['acc1'])
                ax.errorbar([i + 0.22], [m], yerr=[sd], fmt='o', color=color_of(row['meta']), capsize=4, ms=6, zorder=3)
                ax.annotate(f'{m:.1f}', (i + 0.3, m), fontsize=7, va='center')
            ax.set_xticks(range(len(compare)))
            ax.set_xticklabels([_wrap_label(r['label']) for r in compare], fontsize=7)
            ax.set_xlim(-0.5, len(compare) - 0.3)
            ax.set_ylabel('final-epoch top-1 (%)')
            ax.set_title('final top-1: each seed (dots), mean ± std; blue = broad attention', fontsize=9)
            ax.grid(axis='y', alpha=0.3)
        elif panel == 'pairs':
            for i, (a, b) in enumerate(pairs):
                d = paired_differences(results, a, b)
                n = len(d['diffs'])
                xs = [i - 0.15 + 0.2 * j / max(n - 1, 1) for j in range(n)]
                ax.scatter(xs, d['diffs'], s=16, color='tab:blue', alpha=0.6, zorder=2)
                m, sd = mean_std(d['diffs'])
                ax.errorbar([i + 0.22], [m], yerr=[sd], fmt='o', color='tab:blue', capsize=4, ms=6, zorder=3)
                ax.annotate(f'{m:+.2f}', (i + 0.3, m), fontsize=7, va='center')
            ax.axhline(0, color='black', lw=0.8)
            ax.set_xticks(range(len(pairs)))
            ax.set_xticklabels([_wrap_label(_short_pair(a, b), 22) for a, b in pairs], fontsize=7)
            ax.set_xlim(-0.5, len(pairs) - 0.3)
            ax.set_ylabel('top-1 difference (points), same seed')
            ax.set_title('broad − twin, per seed (dots), mean ± std', fontsize=9)
            ax.grid(axis='y', alpha=0.3)
        elif panel == 'sweep':
            by: Dict[float, List[float]] = {}
            for r in sweep:
                by.setdefault(float(r['meta'].get('broad_scale', math.nan)), []).append(float(r['acc1']))
            xs = sorted(by)
            for x in xs:
                ax.scatter([x] * len(by[x]), by[x], s=14, color='tab:blue', alpha=0.5)
            ms = [mean_std(by[x]) for x in xs]
            ax.errorbar(xs, [m for m, _ in ms], yerr=[sd for _, sd in ms], color='tab:blue', capsize=4, marker='o')
            ax.set_xticks(xs)
            ax.set_xlabel('broad_scale (0: the no-broad twin; 0.4: as released)')
            ax.set_ylabel('final-epoch top-1 (%)')
            stems = sorted({str(r['meta'].get('stem')) for r in sweep})
            stem_txt = ', '.join('conv stem' if x == 'conv' else 'no stem' for x in stems)
            ax.set_title(f'broad_scale sweep, {stem_txt}: each seed (dots), mean ± std', fontsize=9)
            ax.grid(alpha=0.3)
        else:
            labels: List[str] = []
            for r in curves:
                if r['label'] not in labels:
                    labels.append(r['label'])
            dashes = ['-', '--', ':', '-.']
            families: List[Tuple[Any, Any]] = []
            for lab in labels:
                meta = next(r['meta'] for r in curves if r['label'] == lab)
                fam = (meta.get('arch'), meta.get('stem'))
                if fam not in families:
                    families.append(fam)
                runs = [r for r in curves if r['label'] == lab]
                cs = [r['curve'] for r in runs]
                n = min(len(c) for c in cs)
                xs = [e + 1 for e in (runs[0].get('curve_epochs') or range(n))[:n]]
                mean = [statistics.mean(c[e] for c in cs) for e in range(n)]
                ax.plot(xs, mean, label=f'{lab} ({len(cs)} seeds)', color=color_of(meta),
                        ls=dashes[families.index(fam) % len(dashes)])
            ax.set_xlabel('epoch')
            ax.set_ylabel('test top-1 (%), mean over seeds')
            ax.set_title('learning curves (blue = broad attention)', fontsize=9)
            ax.legend(fontsize=6.5, loc='lower right')
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


# Command line -----------------------------------------------------------------------------------

def _ints(s: str) -> List[int]:
    try:
        return [int(x) for x in s.split(',') if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated integers, got {s!r}') from None


def _floats(s: str) -> List[float]:
    try:
        return [float(x) for x in s.split(',') if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected comma-separated numbers, got {s!r}') from None


def _suites(s: str) -> List[str]:
    out = [x.strip() for x in s.split(',') if x.strip()]
    bad = [x for x in out if x not in SUITES]
    if bad:
        raise argparse.ArgumentTypeError(f'unknown suite(s) {", ".join(bad)}; choose from {", ".join(SUITES)}')
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='python reproduce.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--study', choices=sorted(STUDIES), default='digits',
                   help="preset of the defaults below: 'digits' (default) or 'fashion_mnist' "
                        '(configs/fashion_mnist.yaml, no stem, scales 0,0.2,0.4,1, deit_tiny at width 48, '
                        '3,000 training images, 2 runs side by side, records in figs/fashion_mnist/runs)')
    p.add_argument('--suite', type=_suites, default=None,
                   help='comma-separated, run in this order: bvit,scale,wrapped (default all; fashion_mnist: bvit,wrapped,scale)')
    p.add_argument('--seeds', type=_ints, default=None, help='seeds of the bvit suite (default 0..4)')
    p.add_argument('--scale-seeds', type=_ints, default=None, help='seeds of the scale sweep (default 0,1,2)')
    p.add_argument('--wrapped-seeds', type=_ints, default=None, help='seeds of the wrapped suite (default 0,1,2)')
    p.add_argument('--scales', type=_floats, default=None,
                   help='broad_scale values of the sweep (default 0,0.2,0.4,0.6,1; fashion_mnist: 0,0.2,0.4,1)')
    p.add_argument('--stems', default=None, type=lambda v: [x.strip() for x in v.split(',') if x.strip()],
                   help='stems of the bvit suite; the sweep uses the first (default conv,none; fashion_mnist: none)')
    p.add_argument('--wrapped-arch', default='deit_tiny_patch16_224', help='timm backbone of the wrapped suite')
    p.add_argument('--arch', default='bvit_5m', help='BViT model of the bvit and scale suites')
    p.add_argument('--config', default=None,
                   help='train_hp.py config (default configs/demo_digits.yaml; fashion_mnist: configs/fashion_mnist.yaml)')
    p.add_argument('--epochs', type=int, default=None, help="override the config's epochs for every run")
    p.add_argument('--train-arg', action='append', default=[], metavar='ARG',
                   help='extra argument for train_hp.py, repeatable (e.g. --train-arg=--batch-size --train-arg=64)')
    p.add_argument('--quick', action='store_true',
                   help='tiny budget for smoke tests: 1 epoch, seeds 0,1 (sweep and wrapped: 0) unless given; runs, '
                        'table and plot in runs/reproduce_quick')
    p.add_argument('--jobs', type=int, default=None, help='runs side by side (default 1; fashion_mnist: 2)')
    p.add_argument('--runs-dir', default=None,
                   help='where runs (logs, checkpoints) live (default runs/reproduce; fashion_mnist: output/fashion_mnist)')
    p.add_argument('--records-dir', default=None,
                   help='where each finished run leaves a small JSON record (per-epoch results), read back instead '
                        'of the run folder when present (default none; fashion_mnist: figs/fashion_mnist/runs)')
    p.add_argument('--out-md', default=None, help='markdown table (default figs/reproduction.md; with --quick in the runs dir)')
    p.add_argument('--out-png', default=None, help='plot (default figs/reproduction.png; with --quick in the runs dir)')
    p.add_argument('--threads', type=int, default=1,
                   help='OMP_NUM_THREADS / MKL_NUM_THREADS of each run (default 1: on a busy 2-core CPU, '
                        "torch's 2-thread element-wise ops and optimizer steps ran ~100x slower than 1 thread)")
    p.add_argument('--keep-checkpoints', choices=('first', 'all', 'none'), default='first',
                   help="keep checkpoint.pth / best.pth of the first seed's runs (default, for figures), "
                        'of all runs, or of none')
    p.add_argument('--report-only', action='store_true', help='write table and plot from finished runs, run nothing')
    p.add_argument('--note', default='', help='text added to the table\'s preamble (e.g. the measured wall time)')
    p.add_argument('--dry-run', action='store_true', help='print the commands of the runs still to do')
    return p


def _show_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else as it is."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith('..') else rel


def _in_repo(path: Optional[str]) -> Optional[str]:
    return path if path is None or os.path.isabs(path) else os.path.join(REPO, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    preset = STUDIES[args.study]
    for name in ('suite', 'seeds', 'scale_seeds', 'wrapped_seeds', 'scales', 'stems', 'config', 'jobs'):
        if getattr(args, name) is None:
            setattr(args, name, list(preset[name]) if isinstance(preset[name], list) else preset[name])
    if args.quick:
        given = {a.split('=')[0] for a in argv}
        if '--seeds' not in given:
            args.seeds = [0, 1]
        if '--scale-seeds' not in given:
            args.scale_seeds = [0]
        if '--wrapped-seeds' not in given:
            args.wrapped_seeds = [0]
        if args.epochs is None:
            args.epochs = 1
    if args.jobs < 1:
        parser.error('--jobs must be at least 1')
    quick_dir = os.path.join('runs', f'reproduce_quick{"" if args.study == "digits" else "_" + args.study}')
    runs_dir = _in_repo(args.runs_dir or (quick_dir if args.quick else preset['runs_dir']))
    records_dir = _in_repo(args.records_dir or (None if args.quick else preset['records_dir']))
    out_md = _in_repo(args.out_md) or (os.path.join(runs_dir, 'reproduction.md') if args.quick else _in_repo(preset['out_md']))
    out_png = _in_repo(args.out_png) or (os.path.join(runs_dir, 'reproduction.png') if args.quick else _in_repo(preset['out_png']))
    if not os.path.isfile(TRAIN_SCRIPT):
        print(f'error: {TRAIN_SCRIPT} not found', file=sys.stderr)
        return 2
    config = args.config if os.path.isabs(args.config) else os.path.join(REPO, args.config)
    if not os.path.isfile(config):
        print(f'error: config {args.config} not found', file=sys.stderr)
        return 2
    bad = [x for x in args.stems if x not in ('conv', 'none')]
    if bad:
        parser.error(f'--stems: unknown stem(s) {", ".join(bad)}; choose from conv, none')
    extra = list(preset['study_args']) + list(args.train_arg) + (
        ['--epochs', str(args.epochs)] if args.epochs is not None else [])
    entries = plan_runs(args.suite, args.seeds, args.scale_seeds, args.wrapped_seeds, args.scales,
                        args.wrapped_arch, args.arch, args.stems, preset['arch_name'], preset['wrapped_args'])
    specs = unique_runs(entries)

    def done(s: RunSpec) -> bool:
        return read_record(record_path(records_dir, s)) is not None or is_done(run_dir(runs_dir, s))

    todo = [s for s in specs if not done(s)]
    print(f'{len(specs)} runs planned, {len(specs) - len(todo)} already done, {len(todo)} to run '
          f'(runs in {runs_dir}{", records in " + records_dir if records_dir else ""}; {args.jobs} at a time)',
          flush=True)
    if args.dry_run:
        for s in todo:
            print(' '.join(shlex.quote(c) for c in train_command(s, run_dir(runs_dir, s), config, extra)))
        return 0
    t_start = time.time()
    failed: List[str] = []
    lock = threading.Lock()
    first_seeds = {'bvit': args.seeds, 'scale': args.scale_seeds, 'wrapped': args.wrapped_seeds}

    def one(s: RunSpec) -> Tuple[RunSpec, Dict[str, Any]]:
        d = run_dir(runs_dir, s)
        first = first_seeds[s.group][0] if first_seeds[s.group] else None
        keep = args.keep_checkpoints == 'all' or (args.keep_checkpoints == 'first' and s.seed == first)
        info = execute(s, d, config, extra, args.threads, keep)
        if info['returncode'] == 0 and records_dir:
            write_record(record_path(records_dir, s), s, d)
        return s, info

    if not args.report_only and todo:
        import atexit
        import signal
        stops = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)  # Ctrl-C reaches this process only
        _STOPPING.clear()  # a study run before in this process (tests) may have stopped
        previous = {sig: signal.signal(sig, _stop_children) for sig in stops}
        atexit.register(_stop_children)
        try:
            with ThreadPoolExecutor(max_workers=args.jobs) as pool:
                futures = [pool.submit(one, s) for s in todo]
                for n, fut in enumerate(as_completed(futures), 1):
                    s, info = fut.result()
                    d = run_dir(runs_dir, s)
                    status = 'ok' if info['returncode'] == 0 else f'FAILED (exit {info["returncode"]}, see {d}/train.out)'
                    res = collect(s, d, record_path(records_dir, s), preset['metric'])
                    acc = ''
                    if res:
                        spread = convergence(res['curve'], res['curve_epochs'])
                        acc = f', top-1 {res["acc1"]:.2f}' + ('' if spread is None else f', last-5 spread {spread:.2f}')
                    with lock:
                        print(f'[{n}/{len(todo)}] {s.label}, seed {s.seed}: {status} in {info["wall_s"]:.0f} s{acc} '
                              f'({(time.time() - t_start) / 60:.1f} min)', flush=True)
                    if info['returncode'] != 0:
                        failed.append(d)
        finally:  # the caller's handlers come back (tests run studies in-process)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    study_wall = time.time() - t_start

    results = []
    missing = []
    for e in entries:
        r = collect(e, run_dir(runs_dir, e), record_path(records_dir, e), preset['metric'])
        if r is not None:
            results.append(r)
        elif f'{e.key} seed {e.seed}' not in missing:
            missing.append(f'{e.key} seed {e.seed}')
    if not results:
        print('error: no finished runs to report', file=sys.stderr)
        return 1
    total_run_wall = sum(r['wall_s'] for r in {(r['key'], r['seed']): r for r in results}.values())
    threads_txt = f'OMP_NUM_THREADS={args.threads}' if args.threads else 'torch\'s default threads'
    shown: List[str] = []
    skip = False
    for a in argv:  # the study's command: without the report-only switches
        if skip:
            skip = False
        elif a in ('--report-only', '--dry-run'):
            continue
        elif a == '--note':
            skip = True
        elif not a.startswith('--note='):
            shown.append(a)
    cmd = 'python reproduce.py ' + ' '.join(shlex.quote(a) for a in shown)
    side = f'{args.jobs} runs side by side' if args.jobs > 1 else 'one run at a time'
    preamble = (
        f'Every run is `train_hp.py --config {_show_path(config)}` with the flags of its variant '
        f'(`--seed S{" " + " ".join(extra) if extra else ""}`); top-1 is on {preset["split"]}'
        f'{", of the weight EMA (the recipe model-ema; the raw weights have their own paired table and columns in the last table)" if preset["metric"] == "test_ema_acc1" else ""}, '
        f'mean ± sample std over seeds. "final" is the last epoch, the number reported; "best epoch" the maximum '
        f'over epochs (selected on the same split, so optimistic; shown for reference only). "s / epoch" is the '
        f'run\'s wall time (start-up, training and evaluation) / epochs, "train img/s" the training throughput '
        f'train_hp.py logs; both on a shared 2-core CPU with {threads_txt}, {side}, so noisy.\n\n'
        f'Command: `{cmd.strip()}`. Sum of the runs\' wall times: {total_run_wall / 60:.1f} min '
        f'({len({(r["key"], r["seed"]) for r in results})} runs).' + (f' {args.note}' if args.note else ''))
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, 'w') as f:
        f.write(make_table(results, preamble=preamble, title=preset['title'], per_run=records_dir is not None,
                           missing=missing))
    make_plot(results, out_png, title=preset['title'] + (' (partial)' if missing else ''))
    print(f'wrote {out_md} and {out_png}; this invocation took {study_wall / 60:.1f} min', flush=True)
    if failed:
        print(f'{len(failed)} run(s) failed: ' + ', '.join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
