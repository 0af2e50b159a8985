"""A study's statistics and its Markdown report, from per-run results (pure: no files, no clock).

A result is a mapping with ``group`` ('bvit', 'scale', 'wrapped' or any other name), ``label``
(variant), ``seed``, ``acc1`` (final-epoch top-1, %), and optionally ``best_acc1``, ``params``,
``sec_per_epoch``, ``train_img_per_sec``, ``key`` (the run), ``curve`` / ``curve_epochs`` (the
evaluated top-1 and the epoch of each point), ``raw_acc1`` / ``raw_curve`` (the raw weights when a
weight EMA is reported) and ``meta`` (arch, stem, broad, broad_scale), as
``studies.run.collect`` returns it."""
from __future__ import annotations

import math
import statistics
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

CONVERGED_POINTS = 0.3   # a run is converged when its test top-1 moved less than this over the last
CONVERGED_EPOCHS = 5     # CONVERGED_EPOCHS epochs (max − min)

GROUP_TITLES = {
    'bvit': 'BViT vs the same network without broad attention',
    'scale': 'Sweep of broad_scale',
    'wrapped': 'Broad attention added to a timm backbone (bvit.broad; same recipe)',
}


# Statistics -------------------------------------------------------------------------------------

def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def convergence(curve: Sequence[float], curve_epochs: Optional[Sequence[int]]) -> Optional[float]:
    """max − min of the test top-1 over the last ``CONVERGED_EPOCHS`` epochs (None for a shorter
    curve, or when ``curve_epochs``, the epoch of each point, shows that one of those epochs was
    not evaluated)."""
    n = CONVERGED_EPOCHS
    if len(curve) < n:
        return None
    if curve_epochs is not None and list(curve_epochs[-n:]) != list(range(curve_epochs[-1] - n + 1,
                                                                          curve_epochs[-1] + 1)):
        return None
    tail = [float(x) for x in curve[-n:]]
    return max(tail) - min(tail)


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
    losses, and from ``scipy.stats.ttest_rel`` the paired t statistic, its two-sided p-value and
    the 95% confidence interval of the mean difference (t distribution, n - 1 degrees of freedom).
    t, p and the interval are None for fewer than 2 seeds; p is None too when the differences do
    not vary (no spread to test against; t is then ±inf, or nan for all-zero differences)."""
    by = {(r['label'], r['seed']): float(r['acc1']) for r in results}
    seeds = sorted({s for (lab, s) in by if lab == a} & {s for (lab, s) in by if lab == b})
    diffs = [by[(a, s)] - by[(b, s)] for s in seeds]
    t = p = ci = None
    if len(diffs) > 1:
        from scipy.stats import ttest_rel
        with warnings.catch_warnings():  # exact, constant differences: not the precision loss it warns of
            warnings.filterwarnings('ignore', 'Precision loss occurred', RuntimeWarning)
            test = ttest_rel([by[(a, s)] for s in seeds], [by[(b, s)] for s in seeds])
        t = float(test.statistic)
        interval = test.confidence_interval(0.95)
        ci = (float(interval.low), float(interval.high))
        if mean_std(diffs)[1] > 0:
            p = float(test.pvalue)
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


def short_pair(a: str, b: str) -> str:
    """'X, Y, broad 0.4' and 'X, Y, no broad (twin)' -> 'X, Y: broad 0.4 − no broad (twin)'."""
    pa, pb = a.split(', '), b.split(', ')
    n = 0
    while n < min(len(pa), len(pb)) - 1 and pa[n] == pb[n]:
        n += 1
    if n == 0:
        return f'{a} − {b}'
    return f'{", ".join(pa[:n])}: {", ".join(pa[n:])} − {", ".join(pb[n:])}'


# Markdown ---------------------------------------------------------------------------------------

def _pm(values: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(values)
    return f'{m:.{digits}f} ± {s:.{digits}f}'


def _params(v: Any) -> str:
    if v is None:
        return '?'
    v = float(v)
    return f'{v / 1e6:.3f}M' if v >= 1e5 else f'{int(v):,}'


def make_table(results: Sequence[Mapping[str, Any]], title: str, preamble: str = '', per_run: bool = False,
               missing: Sequence[str] = ()) -> str:
    """Markdown report of the study from per-run results (see the module's docstring).

    One table per group in order of appearance; each twin is paired with its broad variant of the
    same group (:func:`default_pairs`), in a table of paired differences, and in a second one of
    the raw weights when the results carry ``raw_acc1`` that differs from ``acc1``. One run may
    appear in several groups under different labels (the sweep's 0 and 0.4 points). ``per_run``
    adds a table of every run with its test top-1 change over the last ``CONVERGED_EPOCHS``
    epochs (``curve`` needed) and whether it converged (under ``CONVERGED_POINTS``); ``missing``
    lists runs not finished yet (a partial table).
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
        lines.append(f'| {short_pair(a, b)} | {len(d["seeds"])} | {_pm(d["diffs"])} | {ci} | {per} '
                     f'| {d["wins"]} / {d["ties"]} / {d["losses"]} | {tp} |')
    lines.append('')
    return lines
