"""What a study runs: its definition (``configs/studies/<name>.yaml``) and the table entries of its
suites, each naming the training run whose result it shows."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUDIES_DIR = os.path.join(REPO, 'configs', 'studies')
SUITES = ('bvit', 'scale', 'wrapped')


class StudyError(ValueError):
    """A study definition that cannot be used; the message is one line naming the file."""


@dataclass(frozen=True)
class Study:
    """One study of ``configs/studies/<name>.yaml``.

    ``flags``: defaults of reproduce.py's flags, ``{dest: value}`` (the command line wins);
    ``train_args``: train_hp.py flags of every run, after ``--config RECIPE``; ``wrapped_args``:
    train_hp.py flags of both runs of the wrapped suite; ``arch_name``: the BViT's name in labels
    (None: BViT-5M for bvit_5m, else the ``--arch`` name); ``title`` and ``split``: the report's
    title and the evaluation split its preamble names; ``metric``: the logged top-1 reported
    (``test_acc1``, or ``test_ema_acc1`` for the weight EMA)."""
    name: str
    flags: Dict[str, Any]
    train_args: List[str]
    wrapped_args: List[str]
    arch_name: Optional[str]
    title: str
    split: str
    metric: str


_KEYS = ('flags', 'train-args', 'wrapped-args', 'arch-name', 'title', 'split', 'metric')


def study_names() -> List[str]:
    """The studies defined in ``configs/studies/`` (file names without ``.yaml``), sorted."""
    return sorted(f[:-len('.yaml')] for f in os.listdir(STUDIES_DIR) if f.endswith('.yaml'))


def load_study(name: str) -> Study:
    """The study ``configs/studies/<name>.yaml``: every key of :class:`Study` present (spelled
    with ``-``; ``flags`` keys are reproduce.py flag names, ``-`` or ``_``, given as destinations);
    a missing or unknown key raises :class:`StudyError`. The flag names are checked against the
    parser by the caller (``parser.set_defaults`` would accept any)."""
    import yaml
    path = os.path.join(STUDIES_DIR, f'{name}.yaml')
    if not os.path.isfile(path):
        raise StudyError(f'study {name!r} not found: no {os.path.relpath(path, REPO)}')
    with open(path) as f:
        data = yaml.safe_load(f)
    where = os.path.relpath(path, REPO)
    if not isinstance(data, dict):
        raise StudyError(f'{where}: expected a mapping with the keys {", ".join(_KEYS)}')
    unknown = sorted(set(map(str, data)) - set(_KEYS))
    missing = [k for k in _KEYS if k not in data]
    if unknown or missing:
        raise StudyError(f'{where}: ' + '; '.join(
            ([f'unknown key(s) {", ".join(unknown)}'] if unknown else [])
            + ([f'missing key(s) {", ".join(missing)}'] if missing else [])))
    if not isinstance(data['flags'], dict):
        raise StudyError(f'{where}: flags must be a mapping of reproduce.py flag names to values')
    for key in ('train-args', 'wrapped-args'):
        if not isinstance(data[key], list):
            raise StudyError(f'{where}: {key} must be a list of train_hp.py arguments')
    return Study(name=name, flags={str(k).replace('-', '_'): v for k, v in data['flags'].items()},
                 train_args=[str(a) for a in data['train-args']], wrapped_args=[str(a) for a in data['wrapped-args']],
                 arch_name=data['arch-name'], title=str(data['title']), split=str(data['split']),
                 metric=str(data['metric']))


@dataclass
class RunSpec:
    """One training run: ``train_hp.py --config CONFIG --seed SEED --output_dir DIR *args``."""
    key: str                  # directory name of the variant, unique per variant
    label: str                # human-readable variant name for tables and plots
    group: str                # table the variant belongs to
    seed: int
    args: List[str] = field(default_factory=list)
    meta: Dict[str, Any] = field(default_factory=dict)   # e.g. stem, broad, broad_scale


def _fmt_scale(s: float) -> str:
    return f'{s:g}'


def plan_runs(suites: Sequence[str], seeds: Sequence[int], scale_seeds: Sequence[int],
              wrapped_seeds: Sequence[int], scales: Sequence[float], wrapped_arch: str, bvit_arch: str,
              stems: Sequence[str], arch_name: Optional[str], wrapped_args: Sequence[str]) -> List[RunSpec]:
    """The table entries of the chosen suites, in the order they should run: suite by suite,
    seed-major, so an interrupted study already holds complete pairs.

    An entry names the run (``key``, ``seed``) whose result it shows; several entries may share a
    run (see :func:`unique_runs`): the sweep's 0.4 point is the ``bvit`` suite's BViT run of the
    sweep's stem, and its 0 point is the ``--no-broad`` twin, which trains identically (the broad
    output times 0 adds exact zeros to the tokens and to every gradient; same parameters, same
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
