"""Reproduction studies (reproduce.py and the package studies/ at the repository root): the study
definitions, the plan, the statistics and the table writer on fabricated results, the plot, and one
tiny real study through train_hp.py."""
import json

import pytest
from PIL import Image

import reproduce
from studies import plan, plot, report, run


def _result(group, label, seed, acc, meta, best=None, params=5_400_000, sec=2.0):
    return dict(group=group, label=label, seed=seed, acc1=acc, best_acc1=best if best is not None else acc,
                params=params, sec_per_epoch=sec, meta=meta, curve=[acc - 10, acc - 2, acc])


BROAD = dict(arch='bvit_5m', stem='conv', broad=True, broad_scale=0.4)
TWIN = dict(arch='bvit_5m', stem='conv', broad=False, broad_scale=None)


def _fabricated():
    res = []
    for seed, (a, b) in enumerate([(97.0, 96.0), (98.0, 98.0), (96.0, 97.0)]):
        res.append(_result('bvit', 'B conv', seed, a, BROAD))
        res.append(_result('bvit', 'T conv', seed, b, TWIN, sec=1.5))
    res.append(_result('bvit', 'T conv', 3, 90.0, TWIN))  # a seed without a partner: not paired
    for s, acc in ((0.0, 95.0), (1.0, 93.0)):
        res.append(_result('scale', f'scale {s}', 0, acc, dict(BROAD, broad_scale=s)))
    return res


def test_mean_std():
    assert report.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    assert report.mean_std([5.0]) == (5.0, 0.0)


def test_make_table_on_fabricated_results():
    md = report.make_table(_fabricated(), title='T', preamble='why')
    lines = md.splitlines()
    assert lines[0] == '# T' and 'why' in md
    row = next(line for line in lines if line.startswith('| B conv |'))
    assert row == '| B conv | 3 | 97.00 ± 1.00 | 97.00 ± 1.00 | 5.400M | 2.0 | ? |'
    twin = next(line for line in lines if line.startswith('| T conv |'))
    assert twin.split(' | ')[1:3] == ['4', '95.25 ± 3.59']
    assert '| scale 1.0 | 1 | 93.00 ± 0.00 |' in md
    # Paired over the three shared seeds: +1, 0, -1.
    pair = next(line for line in lines if line.startswith('| B conv − T conv |'))
    # 95% CI: 0 ± t(0.975, 2 df) x 1 / sqrt(3) = 4.303 / 1.732 = 2.48
    assert pair == '| B conv − T conv | 3 | 0.00 ± 1.00 | [-2.48, +2.48] | +1.00, +0.00, -1.00 | 1 / 1 / 1 | 0.00 (1.00) |'
    # Group order follows the results; each group has its header.
    assert md.index(report.GROUP_TITLES['bvit']) < md.index(report.GROUP_TITLES['scale'])


def test_paired_differences_explicit_pairs():
    d = report.paired_differences(_fabricated(), 'B conv', 'T conv')
    assert d['seeds'] == [0, 1, 2] and d['diffs'] == [1.0, 0.0, -1.0] and d['t'] == 0.0
    res = [_result('g', 'a', s, acc, BROAD) for s, acc in enumerate([2.0, 3.0, 4.0])]
    res += [_result('g', 'b', s, 0.0, TWIN) for s in range(3)]
    d = report.paired_differences(res, 'a', 'b')
    # diffs 2, 3, 4: mean 3, std 1, t = 3 / (1 / sqrt 3); with 2 degrees of freedom Student's
    # two-sided p has the closed form 1 - t / sqrt(2 + t^2).
    t = 3 * 3 ** 0.5
    assert d['t'] == pytest.approx(t) and d['p'] == pytest.approx(1 - t / (2 + t * t) ** 0.5)
    md = report.make_table([r for r in _fabricated() if r['label'] != 'T conv'], title='T')  # no twin, no pair
    assert 'B conv' in md and 'Paired' not in md


def test_ttest_rel_gives_the_hand_made_t_test():
    """scipy's ttest_rel replaced a hand-made paired t-test (t = mean / (sd / sqrt n), p from Student's t
    with n - 1 degrees of freedom, CI mean ± t(0.975) sd / sqrt n); these are that code's values."""
    a, b = [78.12, 77.5, 79.0, 76.9, 78.3], [77.8, 78.1, 77.2, 77.0, 77.9]
    res = [_result('g', 'a', s, x, BROAD) for s, x in enumerate(a)] + [_result('g', 'b', s, x, TWIN) for s, x in enumerate(b)]
    d = report.paired_differences(res, 'a', 'b')
    assert d['t'] == pytest.approx(0.9085927709636076, rel=1e-12)
    assert d['p'] == pytest.approx(0.4149575831065169, rel=1e-12)
    assert d['ci'] == pytest.approx((-0.7482981060262901, 1.476298106026293), rel=1e-12)
    assert (d['wins'], d['ties'], d['losses']) == (3, 0, 2)
    # differences that do not vary: t infinite, no p, the interval a point
    same = [_result('g', 'a', s, 2.0 + s, BROAD) for s in range(3)] + [_result('g', 'b', s, 1.0 + s, TWIN) for s in range(3)]
    d = report.paired_differences(same, 'a', 'b')
    assert d['t'] == float('inf') and d['p'] is None and d['ci'] == (1.0, 1.0)


def test_plan_runs_shares_runs_between_suites():
    entries = plan.plan_runs(['bvit', 'scale', 'wrapped'], seeds=[0, 1], scale_seeds=[0], wrapped_seeds=[0],
                             scales=[0, 0.4, 1.0], wrapped_arch='deit_tiny_patch16_224', bvit_arch='bvit_5m',
                             stems=['conv', 'none'], arch_name=None, wrapped_args=[])
    runs = plan.unique_runs(entries)
    keys = [(r.key, r.seed) for r in runs]
    assert len(keys) == len(set(keys))
    # bvit: 2 seeds x 2 stems x (broad, twin) = 8; the sweep's 0 and 0.4 points are the conv twin and
    # conv BViT runs of seed 0, so it adds only 1.0; wrapped: broad and plain.
    assert len(entries) == 8 + 3 + 2 and len(runs) == 8 + 1 + 2
    sweep = {e.meta['broad_scale']: e for e in entries if e.group == 'scale'}
    assert sweep[0.0].key == 'bvit_5m_conv_nobroad' and '--no-broad' in sweep[0.0].args
    assert sweep[0.4].key == 'bvit_5m_conv_broad0.4'
    assert sweep[1.0].args[sweep[1.0].args.index('--broad-scale') + 1] == '1'
    twin = next(r for r in runs if r.key == 'bvit_5m_none_nobroad' and r.seed == 1)
    assert '--no-broad' in twin.args and twin.args[twin.args.index('--stem') + 1] == 'none'
    wrapped = [r for r in runs if r.group == 'wrapped']
    assert any('--broad' in r.args for r in wrapped) and any('--broad' not in r.args for r in wrapped)
    with pytest.raises(ValueError):
        plan.plan_runs(['nope'], [0], [0], [0], [0.4], 'x', 'bvit_5m', ['conv'], None, [])


def test_default_pairs_stay_within_a_group():
    res = _fabricated() + [_result('scale', 'scale 0.4', 0, 97.0, BROAD),
                           _result('scale', 'scale 0 (= twin)', 0, 96.0, dict(BROAD, broad_scale=0.0))]
    assert report.default_pairs(res) == [('B conv', 'T conv')]


def test_collect_and_cache_from_a_run_directory(tmp_path):
    spec = plan.RunSpec('k', 'K', 'bvit', 0, [], dict(broad=True))
    d = tmp_path / 'k' / 'seed0'
    d.mkdir(parents=True)
    log = [dict(epoch=0, test_acc1=50.0, n_parameters=123, train_images_per_sec=10.0),
           dict(epoch=1, test_acc1=70.0, n_parameters=123, train_images_per_sec=30.0)]
    (d / 'log.txt').write_text('\n'.join(json.dumps(r) for r in log) + '\n')
    assert not run.is_done(str(d))  # no marker: an interrupted run is redone
    (d / run.MARKER).write_text(json.dumps(dict(returncode=0, wall_s=10.0)))
    assert run.is_done(str(d))
    r = run.collect(spec, str(d), None, 'test_acc1')
    assert r['acc1'] == 70.0 and r['best_acc1'] == 70.0 and r['params'] == 123 and r['epochs'] == 2
    assert r['sec_per_epoch'] == 5.0 and r['train_img_per_sec'] == 20.0 and r['curve'] == [50.0, 70.0]
    (d / run.MARKER).write_text(json.dumps(dict(returncode=1, wall_s=10.0)))
    assert not run.is_done(str(d)) and run.collect(spec, str(d), None, 'test_acc1') is None


def test_make_plot_writes_png(tmp_path):
    out = tmp_path / 'r.png'
    plot.make_plot(_fabricated(), str(out), title='T')
    with Image.open(out) as im:
        assert im.format == 'PNG' and im.size[0] > im.size[1] > 100


TINY_CONFIG = """\
data-set: DIGITS
input-size: 16
patch-size: 4
batch-size: 32
epochs: 1
warmup-epochs: 0
train-subset: 64
val-subset: 32
aa: none
mixup: 0
cutmix: 0
reprob: 0
model-ema: false
repeated-aug: false
num_workers: 0
print-freq: 1000
"""


def test_tiny_real_study_through_train_hp(tmp_path, capsys):
    """BViT and its twin, one seed, one epoch on 64 DIGITS images: train_hp.py runs as a subprocess,
    its log.txt is read back into the table, and a second invocation reuses the finished runs."""
    config = tmp_path / 'tiny.yaml'
    config.write_text(TINY_CONFIG)
    argv = ['--suite', 'bvit', '--stems', 'conv', '--seeds', '0', '--config', str(config),
            '--runs-dir', str(tmp_path / 'runs'), '--out-md', str(tmp_path / 'r.md'), '--out-png', str(tmp_path / 'r.png')]
    assert reproduce.main(argv) == 0
    for key in ('bvit_5m_conv_broad0.4', 'bvit_5m_conv_nobroad'):
        d = tmp_path / 'runs' / key / 'seed0'
        assert run.is_done(str(d))
        assert json.loads((d / 'log.txt').read_text().splitlines()[-1])['test_images'] == 32
    md = (tmp_path / 'r.md').read_text()
    assert '| BViT-5M, conv stem, broad 0.4 | 1 |' in md and '| BViT-5M, conv stem, no broad (twin) | 1 |' in md
    assert '5.347M' in md  # parameters from train_hp.py's log; the twin has the same ones
    with Image.open(tmp_path / 'r.png') as im:
        assert im.format == 'PNG'
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert '2 already done, 0 to run' in capsys.readouterr().out


def test_wrapped_runs_share_the_recipe():
    """The demo recipe leaves the stem to BViT's default, so a timm backbone takes it unchanged."""
    config = plan.load_study('digits').flags['config']
    import yaml
    with open(config) as f:
        assert 'stem' not in yaml.safe_load(f)
    entries = plan.plan_runs(['wrapped'], [0], [0], [0], [0.4], 'deit_tiny_patch16_224', 'bvit_5m', ['conv'], None, [])
    cmd = run.train_command(entries[0], 'run', config, ['--epochs', '1'])
    assert cmd[cmd.index('--config') + 1] == config
    assert cmd[-2:] == ['--epochs', '1'] and '--broad' in cmd


def test_sparse_evaluation_curve_and_convergence(tmp_path):
    # train_hp.py --eval-freq 5 over 14 epochs logs test values after epochs 4 and 9-13 only
    spec = plan.RunSpec('k', 'K', 'bvit', 0, [], dict(broad=True))
    d = tmp_path / 'k' / 'seed0'
    d.mkdir(parents=True)
    accs = {4: 40.0, 9: 60.0, 10: 70.0, 11: 70.3, 12: 70.1, 13: 70.2}
    log = [dict(epoch=e, train_loss=1.0, **({'test_acc1': accs[e]} if e in accs else {})) for e in range(14)]
    (d / 'log.txt').write_text('\n'.join(json.dumps(r) for r in log) + '\n')
    (d / run.MARKER).write_text(json.dumps(dict(returncode=0, wall_s=28.0)))
    r = run.collect(spec, str(d), None, 'test_acc1')
    assert r['curve'] == [40.0, 60.0, 70.0, 70.3, 70.1, 70.2] and r['curve_epochs'] == [4, 9, 10, 11, 12, 13]
    assert r['epochs'] == 14 and r['sec_per_epoch'] == 2.0 and r['acc1'] == 70.2
    assert report.CONVERGED_EPOCHS == 5
    assert report.convergence(r['curve'], r['curve_epochs']) == pytest.approx(10.3)  # epochs 9-13
    assert report.convergence(r['curve'][1:], [8, 10, 11, 12, 13]) is None  # epoch 9 was not evaluated
    assert report.convergence(r['curve'][2:], r['curve_epochs'][2:]) is None  # 4 points
    assert report.convergence([1.0, 5.0, 3.0, 2.0, 4.0], None) == 4.0


def test_no_run_starts_once_the_study_is_stopping(tmp_path, monkeypatch):
    started = []
    monkeypatch.setattr(run.subprocess, 'Popen', lambda *a, **k: started.append(a))
    spec = plan.RunSpec('k', 'K', 'bvit', 0, [], {})
    runner = run.Runner()
    runner.stop()
    with pytest.raises(RuntimeError, match='the study is stopping'):
        runner.execute(spec, str(tmp_path / 'k'), 'c.yaml', [], 1, True)
    assert started == []


def test_ema_metric_reports_the_ema_and_keeps_the_raw_weights(tmp_path):
    spec = plan.RunSpec('k', 'K', 'bvit', 0, [], dict(broad=True))
    d = tmp_path / 'k' / 'seed0'
    d.mkdir(parents=True)
    log = [dict(epoch=0, test_acc1=50.0, test_ema_acc1=40.0), dict(epoch=1, test_acc1=60.0, test_ema_acc1=58.0)]
    (d / 'log.txt').write_text('\n'.join(json.dumps(r) for r in log) + '\n')
    (d / run.MARKER).write_text(json.dumps(dict(returncode=0, wall_s=4.0)))
    r = run.collect(spec, str(d), None, 'test_ema_acc1')
    assert r['curve'] == [40.0, 58.0] and r['acc1'] == 58.0 and r['raw_acc1'] == 60.0
    assert r['raw_curve'] == [50.0, 60.0]
    assert run.collect(spec, str(d), None, 'test_acc1')['acc1'] == 60.0
    res = []
    for seed, (a, b) in enumerate([(97.0, 96.0), (98.0, 98.0), (96.0, 97.5)]):
        res.append(dict(_result('bvit', 'B conv', seed, a, BROAD), raw_acc1=a - 1, key='b'))
        res.append(dict(_result('bvit', 'T conv', seed, b, TWIN), raw_acc1=b, key='t'))
    md = report.make_table(res, title='T', per_run=True)
    raw_part = md.split('## Paired differences (same seed), raw weights (no EMA)')[1]
    # raw: broad − twin per seed 0, −1, −2.5; the EMA (reported) table: +1, 0, −1.5
    assert '| B conv − T conv | 3 | -1.17 ± 1.26 | [-4.29, +1.96] | +0.00, -1.00, -2.50 |' in raw_part
    assert '| B conv − T conv | 3 | -0.17 ± 1.26 |' in md.split('raw weights (no EMA)')[0]
    assert 'raw weights final (%) | raw max − min | raw converged |' in md
    assert '| 96.00 | – | – |' in md.split('## Every run')[1]  # a 3-point fabricated curve: no 5-epoch tail


def test_study_definitions():
    assert plan.study_names() == ['digits', 'fashion_mnist']
    fm = plan.load_study('fashion_mnist')
    assert fm.train_args == ['--train-subset', '3000'] and fm.metric == 'test_ema_acc1'
    assert fm.wrapped_args == ['--model-kwargs', 'embed_dim=48', 'num_heads=2'] and fm.arch_name == 'BViT-12L-D48'
    assert fm.flags['jobs'] == 2 and fm.flags['records_dir'] == 'figs/fashion_mnist/runs'
    digits = plan.load_study('digits')
    assert digits.flags['suite'] == ['bvit', 'scale', 'wrapped'] and digits.flags['records_dir'] is None


def test_a_broken_study_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(plan, 'STUDIES_DIR', str(tmp_path))
    good = (plan.REPO + '/configs/studies/digits.yaml')
    text = open(good).read()
    (tmp_path / 'typo.yaml').write_text(text.replace('metric:', 'metrik:'))
    with pytest.raises(plan.StudyError, match='unknown key.s. metrik; missing key.s. metric'):
        plan.load_study('typo')
    (tmp_path / 'typo.yaml').unlink()
    (tmp_path / 'badsuite.yaml').write_text(text.replace('suite: [bvit, scale, wrapped]', 'suite: [bvit, nope]'))
    with pytest.raises(SystemExit) as e:
        reproduce.main(['--study', 'badsuite', '--dry-run'])
    assert e.value.code == 2 and 'badsuite.yaml: flags: suite: unknown suite(s) nope' in capsys.readouterr().err
    (tmp_path / 'badsuite.yaml').write_text(text.replace('jobs: 1', 'job: 1'))
    with pytest.raises(SystemExit):
        reproduce.main(['--study', 'badsuite', '--dry-run'])
    assert "flags: unknown flag 'job'" in capsys.readouterr().err


def test_study_defaults_under_the_command_line(tmp_path, capsys):
    """A study's flags are defaults: the command line wins; --quick's defaults lie between."""
    argv = ['--study', 'fashion_mnist', '--dry-run', '--runs-dir', str(tmp_path), '--suite', 'bvit', '--seeds', '7']
    assert reproduce.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith('2 runs planned, 0 already done, 2 to run') and lines[0].endswith('; 2 at a time)')
    cmds = lines[1:]
    assert len(cmds) == 2 and all('--seed 7 ' in c and c.endswith('--train-subset 3000') for c in cmds)
    assert all('configs/fashion_mnist.yaml' in c and '--stem none' in c for c in cmds)
    assert reproduce.main(['--quick', '--dry-run', '--runs-dir', str(tmp_path), '--jobs', '3']) == 0
    lines = capsys.readouterr().out.splitlines()
    # seeds 0,1 (sweep and wrapped 0): 8 bvit runs, 3 sweep points of its own, 2 wrapped
    assert lines[0] == f'13 runs planned, 0 already done, 13 to run (runs in {tmp_path}; 3 at a time)'
    assert all(c.endswith('--epochs 1') and 'configs/demo_digits.yaml' in c for c in lines[1:])
    assert sorted({c.split('--seed ')[1].split()[0] for c in lines[1:]}) == ['0', '1']
