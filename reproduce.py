"""Reproduction studies on real data: does broad attention help, and how much?

A study (``--study``, defined in ``configs/studies/<name>.yaml``) sets the defaults of the flags
below; every flag given on the command line wins. ``digits`` (the default; scikit-learn's 8x8
digits, recipe ``configs/demo_digits.yaml``, table and plot in figs/reproduction.{md,png}) and
``fashion_mnist`` (Fashion-MNIST, recipe ``configs/fashion_mnist.yaml`` on a fixed 3,000-image
training subset, full 10,000-image test set; table and plot in figs/fashion_mnist.{md,png}, one
JSON record per run in figs/fashion_mnist/runs/).

Every run is ``train_hp.py`` itself, started as a subprocess with this interpreter, on the study's
recipe; its per-epoch ``log.txt`` (one JSON line per epoch) is the only result read back. Suites
(``--suite``, comma-separated):

* ``bvit``: BViT-5M and the same network without broad attention (``--no-broad``: same
  parameters, same initialisation for a seed), with the conv stem and without it, over ``--seeds``.
* ``scale``: BViT with ``broad_scale`` in ``--scales``, first stem, over ``--scale-seeds``; the 0.4
  runs are the ``bvit`` suite's own and 0 is the ``--no-broad`` twin, which trains identically
  (bit for bit: 0 x broad adds exact zeros).
* ``wrapped``: a timm backbone (``--wrapped-arch``, default ``deit_tiny_patch16_224`` at the
  recipe's input and patch size) with broad attention added (``--broad``, :mod:`bvit.broad`)
  beside its plain twin, over ``--wrapped-seeds``.

Each run lives in ``RUNS_DIR/<variant>/seed<S>/``; one that finished (``reproduce.json`` marker
with exit status 0 and a log), or whose JSON record is in ``--records-dir``, is not run again, so
the study resumes where it stopped (also in a fresh clone, from the committed records). ``--jobs``
runs go side by side, each with OMP_NUM_THREADS=1 (``--threads``). The table (``--out-md``) gives
mean ± std (over seeds) of the final-epoch top-1, the best epoch's, the parameters, seconds per
epoch and training throughput, the per-seed paired differences broad − twin with a 95% confidence
interval (t distribution) and a paired t-test, and per run the change of test top-1 over the last
5 epochs (converged: under 0.3 points); the plot (``--out-png``) shows the per-seed accuracies,
the paired differences, the scale sweep and the mean test curves. The work is done by the
package ``studies``: plan, run, report, plot.

    python reproduce.py --epochs 6     # the DIGITS study in figs/reproduction.{md,png}
    python reproduce.py --quick        # smoke test: 1 epoch, output in runs/reproduce_quick
    python reproduce.py --suite bvit --stems conv --seeds 0,1,2 --epochs 15   # the demo's full budget
    python reproduce.py --epochs 6 --report-only   # rewrite table and plot from finished runs
    python reproduce.py --study fashion_mnist      # the Fashion-MNIST study
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from studies.plan import REPO, SUITES, RunSpec, Study, StudyError, load_study, plan_runs, study_names, unique_runs
from studies.plot import make_plot
from studies.report import convergence, make_table
from studies.run import TRAIN_SCRIPT, collect, is_done, read_record, record_path, run_all, run_dir, train_command

# --quick: defaults over the study's (the command line still wins); out-md / out-png then go to the runs dir
QUICK = dict(seeds=[0, 1], scale_seeds=[0], wrapped_seeds=[0], epochs=1, records_dir=None, out_md=None, out_png=None)


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


def _names(s: str) -> List[str]:
    return [x.strip() for x in s.split(',') if x.strip()]


def _per_study(studies: Sequence[Study], dest: str) -> str:
    """'default per study: digits X; fashion_mnist Y' for a flag the studies set."""
    def show(v: Any) -> str:
        return 'none' if v is None else ','.join(f'{x:g}' if isinstance(x, float) else str(x) for x in v) \
            if isinstance(v, list) else str(v)
    return 'default per study: ' + '; '.join(f'{s.name} {show(s.flags[dest])}' for s in studies if dest in s.flags)


def build_parser() -> argparse.ArgumentParser:
    studies = [load_study(n) for n in study_names()]

    def d(dest: str) -> str:
        return _per_study(studies, dest)

    p = argparse.ArgumentParser(prog='python reproduce.py', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--study', choices=study_names(), default='digits',
                   help='the study of configs/studies/STUDY.yaml, which sets the defaults of the flags below (default digits)')
    p.add_argument('--suite', type=_suites, default=None,
                   help=f'comma-separated, run in this order: bvit,scale,wrapped ({d("suite")})')
    p.add_argument('--seeds', type=_ints, default=None, help=f'seeds of the bvit suite ({d("seeds")})')
    p.add_argument('--scale-seeds', type=_ints, default=None, help=f'seeds of the scale sweep ({d("scale_seeds")})')
    p.add_argument('--wrapped-seeds', type=_ints, default=None, help=f'seeds of the wrapped suite ({d("wrapped_seeds")})')
    p.add_argument('--scales', type=_floats, default=None, help=f'broad_scale values of the sweep ({d("scales")})')
    p.add_argument('--stems', type=_names, default=None,
                   help=f'stems of the bvit suite; the sweep uses the first ({d("stems")})')
    p.add_argument('--wrapped-arch', default='deit_tiny_patch16_224', help='timm backbone of the wrapped suite')
    p.add_argument('--arch', default='bvit_5m', help='BViT model of the bvit and scale suites')
    p.add_argument('--config', default=None, help=f'train_hp.py config ({d("config")})')
    p.add_argument('--epochs', type=int, default=None, help="override the config's epochs for every run")
    p.add_argument('--train-arg', action='append', default=[], metavar='ARG',
                   help='extra argument for train_hp.py, repeatable (e.g. --train-arg=--batch-size --train-arg=64)')
    p.add_argument('--quick', action='store_true',
                   help='tiny budget for smoke tests: 1 epoch, seeds 0,1 (sweep and wrapped: 0) unless given; runs, '
                        'table and plot in runs/reproduce_quick (other studies: runs/reproduce_quick_STUDY), no records')
    p.add_argument('--jobs', type=int, default=None, help=f'runs side by side ({d("jobs")})')
    p.add_argument('--runs-dir', default=None, help=f'where runs (logs, checkpoints) live ({d("runs_dir")})')
    p.add_argument('--records-dir', default=None,
                   help='where each finished run leaves a small JSON record (per-epoch results), read back instead '
                        f'of the run folder when present ({d("records_dir")})')
    p.add_argument('--out-md', default=None, help=f'markdown table ({d("out_md")}; with --quick in the runs dir)')
    p.add_argument('--out-png', default=None, help=f'plot ({d("out_png")}; with --quick in the runs dir)')
    p.add_argument('--threads', type=int, default=1,
                   help='OMP_NUM_THREADS / MKL_NUM_THREADS of each run (default 1: docs/studies.md says why)')
    p.add_argument('--keep-checkpoints', choices=('first', 'all', 'none'), default='first',
                   help="keep checkpoint.pth / best.pth of the first seed's runs (default, for figures), "
                        'of all runs, or of none')
    p.add_argument('--report-only', action='store_true', help='write table and plot from finished runs, run nothing')
    p.add_argument('--note', default='', help='text added to the table\'s preamble (e.g. the measured wall time)')
    p.add_argument('--dry-run', action='store_true', help='print the commands of the runs still to do')
    return p


def _study_defaults(parser: argparse.ArgumentParser, study: Study) -> Dict[str, Any]:
    """The study's ``flags`` as ``{dest: value}`` for ``parser.set_defaults``, each value checked and
    converted by its flag's type as the command line would be (a list joined with commas)."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    out = {}
    for dest, value in study.flags.items():
        action = actions.get(dest)
        if action is None or dest in ('study', 'help'):
            raise StudyError(f'configs/studies/{study.name}.yaml: flags: unknown flag {dest!r}')
        if value is not None and action.type is not None:
            text = ','.join(map(str, value)) if isinstance(value, list) else str(value)
            try:
                value = action.type(text)
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise StudyError(f'configs/studies/{study.name}.yaml: flags: {dest}: {e}') from None
        out[dest] = value
    return out


def _show_path(path: str) -> str:
    """``path`` relative to the repository when inside it, else as it is."""
    rel = os.path.relpath(os.path.abspath(path), REPO)
    return path if rel.startswith('..') else rel


def _in_repo(path: Optional[str]) -> Optional[str]:
    return path if path is None or os.path.isabs(path) else os.path.join(REPO, path)


def _shown_command(argv: Sequence[str]) -> str:
    """The study's command for the table: ``argv`` without the report-only switches."""
    shown: List[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in ('--report-only', '--dry-run'):
            continue
        elif a == '--note':
            skip = True
        elif not a.startswith('--note='):
            shown.append(a)
    return ('python reproduce.py ' + ' '.join(shlex.quote(a) for a in shown)).strip()


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # --study and --quick first: their defaults go under the command line, as train_hp.py's --config
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--study', default=parser.get_default('study'))
    pre.add_argument('--quick', action='store_true')
    known, _ = pre.parse_known_args(argv)
    study = None
    if known.study in study_names():  # else parse_args below names the choices
        try:
            study = load_study(known.study)
            parser.set_defaults(**_study_defaults(parser, study))
        except StudyError as e:
            parser.error(str(e))
    if known.quick:
        quick_dir = os.path.join('runs', f'reproduce_quick{"" if known.study == "digits" else "_" + known.study}')
        parser.set_defaults(runs_dir=quick_dir, **QUICK)
    args = parser.parse_args(argv)  # an unknown --study ends here, naming the choices
    if args.jobs < 1:
        parser.error('--jobs must be at least 1')
    runs_dir = _in_repo(args.runs_dir)
    records_dir = _in_repo(args.records_dir)
    out_md = _in_repo(args.out_md) or os.path.join(runs_dir, 'reproduction.md')
    out_png = _in_repo(args.out_png) or os.path.join(runs_dir, 'reproduction.png')
    if not os.path.isfile(TRAIN_SCRIPT):
        print(f'error: {TRAIN_SCRIPT} not found', file=sys.stderr)
        return 2
    config = _in_repo(args.config)
    if not os.path.isfile(config):
        print(f'error: config {args.config} not found', file=sys.stderr)
        return 2
    bad = [x for x in args.stems if x not in ('conv', 'none')]
    if bad:
        parser.error(f'--stems: unknown stem(s) {", ".join(bad)}; choose from conv, none')
    extra = list(study.train_args) + list(args.train_arg) + (
        ['--epochs', str(args.epochs)] if args.epochs is not None else [])
    entries = plan_runs(args.suite, args.seeds, args.scale_seeds, args.wrapped_seeds, args.scales,
                        args.wrapped_arch, args.arch, args.stems, study.arch_name, study.wrapped_args)
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
    first_seeds = {'bvit': args.seeds, 'scale': args.scale_seeds, 'wrapped': args.wrapped_seeds}

    def keep(s: RunSpec) -> bool:
        first = first_seeds[s.group][0] if first_seeds[s.group] else None
        return args.keep_checkpoints == 'all' or (args.keep_checkpoints == 'first' and s.seed == first)

    def finished(n: int, s: RunSpec, info: Dict[str, Any]) -> None:
        d = run_dir(runs_dir, s)
        status = 'ok' if info['returncode'] == 0 else f'FAILED (exit {info["returncode"]}, see {d}/train.out)'
        res = collect(s, d, record_path(records_dir, s), study.metric)
        acc = ''
        if res:
            spread = convergence(res['curve'], res['curve_epochs'])
            acc = f', top-1 {res["acc1"]:.2f}' + ('' if spread is None else f', last-5 spread {spread:.2f}')
        print(f'[{n}/{len(todo)}] {s.label}, seed {s.seed}: {status} in {info["wall_s"]:.0f} s{acc} '
              f'({(time.time() - t_start) / 60:.1f} min)', flush=True)

    if not args.report_only and todo:
        failed = run_all(todo, runs_dir, records_dir, config, extra, args.jobs, args.threads, keep, finished)
    study_wall = time.time() - t_start

    results = []
    missing = []
    for e in entries:
        r = collect(e, run_dir(runs_dir, e), record_path(records_dir, e), study.metric)
        if r is not None:
            results.append(r)
        elif f'{e.key} seed {e.seed}' not in missing:
            missing.append(f'{e.key} seed {e.seed}')
    if not results:
        print('error: no finished runs to report', file=sys.stderr)
        return 1
    total_run_wall = sum(r['wall_s'] for r in {(r['key'], r['seed']): r for r in results}.values())
    threads_txt = f'OMP_NUM_THREADS={args.threads}' if args.threads else 'torch\'s default threads'
    side = f'{args.jobs} runs side by side' if args.jobs > 1 else 'one run at a time'
    preamble = (
        f'Every run is `train_hp.py --config {_show_path(config)}` with the flags of its variant '
        f'(`--seed S{" " + " ".join(extra) if extra else ""}`); top-1 is on {study.split}'
        f'{", of the weight EMA (the recipe model-ema; the raw weights have their own paired table and columns in the last table)" if study.metric == "test_ema_acc1" else ""}, '
        f'mean ± sample std over seeds. "final" is the last epoch, the number reported; "best epoch" the maximum '
        f'over epochs (selected on the same split, so optimistic; shown for reference only). "s / epoch" is the '
        f'run\'s wall time (start-up, training and evaluation) / epochs, "train img/s" the training throughput '
        f'train_hp.py logs; both on a shared 2-core CPU with {threads_txt}, {side}, so noisy.\n\n'
        f'Command: `{_shown_command(argv)}`. Sum of the runs\' wall times: {total_run_wall / 60:.1f} min '
        f'({len({(r["key"], r["seed"]) for r in results})} runs).' + (f' {args.note}' if args.note else ''))
    os.makedirs(os.path.dirname(os.path.abspath(out_md)), exist_ok=True)
    with open(out_md, 'w') as f:
        f.write(make_table(results, title=study.title, preamble=preamble, per_run=records_dir is not None,
                           missing=missing))
    make_plot(results, out_png, title=study.title + (' (partial)' if missing else ''))
    print(f'wrote {out_md} and {out_png}; this invocation took {study_wall / 60:.1f} min', flush=True)
    if failed:
        print(f'{len(failed)} run(s) failed: ' + ', '.join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
