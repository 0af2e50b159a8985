"""One checkpoint means one model and one set of weights, whichever door it comes through
(docs/checkpoints.md, "Which weights each door takes"): this project's loader, the model record's
rebuild (export, visualize), hubconf.py, train_hp.py --eval --resume, and timm's own doors
(``pretrained=True`` with a file overlay, ``checkpoint_path=``, ``timm.models.load_checkpoint``).
A file of another family is refused through each of them."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import bvit.checkpoint as C
import bvit.models  # noqa: F401  (registration)
from bvit import builder as B
from bvit import export as E
from bvit import visualize as V
import train_hp
from resume import CHECKPOINT_FORMAT
from utils import args_to_dict

REPO = Path(__file__).resolve().parents[1]
FLAGS = ['--data-set', 'DIGITS', '--input-size', '32', '--patch-size', '4', '--model-kwargs', 'depth=2',
         '--val-subset', '16', '--batch-size', '16', '--num_workers', '0', '--threads', '1', '--print-freq', '1000']

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model('bvit_5m', img_size=32, patch_size=4, depth=2, num_classes=10).eval()


@pytest.fixture(scope='module')
def two_weights(tmp_path_factory):
    """A train_hp.py checkpoint whose ``model`` and ``model_ema`` differ, with its record."""
    path = tmp_path_factory.mktemp('doors') / 'checkpoint.pth'
    args = train_hp.parse_args(FLAGS)
    args.nb_classes = 10
    raw, ema = _model(0), _model(1)
    torch.save({'format': CHECKPOINT_FORMAT, 'model': raw.state_dict(), 'model_ema': ema.state_dict(), 'epoch': 0,
                'args': args_to_dict(args), B.RECORD_KEY: B.record_from_args(vars(args))}, path)
    return path, {False: raw, True: ema}


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('use_ema', [False, True], ids=['raw', 'ema'])
def test_every_door_gives_the_same_logits(two_weights, use_ema, tmp_path):
    path, models = two_weights
    x = torch.randn(3, 3, 32, 32)
    want = _logits(models[use_ema], x)
    assert not torch.allclose(want, _logits(models[not use_ema], x))  # the two weights are told apart

    got = {}
    m = _model(7)
    C.load_checkpoint(m, path, use_ema=use_ema)
    got['bvit.checkpoint.load_checkpoint'] = _logits(m, x)
    got['bvit.builder.build_from_checkpoint'] = _logits(B.build_from_checkpoint(path, use_ema=use_ema)[0], x)
    got['bvit.visualize.load_model'] = _logits(V.load_model(str(path), use_ema=use_ema)[0], x)
    got['torch.hub.load'] = _logits(torch.hub.load(str(REPO), 'bvit_5m', source='local', weights=str(path),
                                                   use_ema=use_ema), x)
    E.export(str(path), str(tmp_path / 'out'), use_ema=use_ema, log=lambda *a: None)
    got['export -> timm local-dir'] = _logits(timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True), x)
    m = _model(7)
    timm.models.load_checkpoint(m, str(path), use_ema=use_ema)
    got['timm.models.load_checkpoint'] = _logits(m, x)
    if use_ema:  # timm's two doors that have no choice take the EMA weights when the file has them
        kw = dict(img_size=32, patch_size=4, depth=2, num_classes=10)
        got['timm pretrained=True, file overlay'] = _logits(timm.create_model(
            'bvit_5m', pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10), **kw), x)
        got['timm checkpoint_path='] = _logits(timm.create_model('bvit_5m', checkpoint_path=str(path), **kw), x)
    for door, logits in got.items():
        assert torch.equal(logits, want), door


@pytest.mark.parametrize('use_ema', [False, True], ids=['raw', 'ema'])
def test_train_hp_eval_takes_the_same_weights(two_weights, use_ema):
    """--eval --resume (raw) and --eval-ema: the loss and top-1 of those weights on the same images."""
    from datasets import build_dataset
    path, models = two_weights
    argv = ['--eval', '--resume', str(path), '--data-set', 'DIGITS', '--val-subset', '16', '--batch-size', '16',
            '--num_workers', '0', '--threads', '1'] + (['--eval-ema'] if use_ema else [])
    args = train_hp.parse_args(argv)
    stats = train_hp.main(args)
    val, _ = build_dataset(False, args)
    images = torch.stack([val[i][0] for i in range(len(val))])
    targets = torch.tensor([val[i][1] for i in range(len(val))])
    assert images.shape[-2:] == (32, 32)  # the record's input size: no model flag was given
    logits = _logits(models[use_ema], images)
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
    assert stats['acc1'] == pytest.approx(100.0 * (logits.argmax(1) == targets).float().mean().item())


@pytest.fixture(scope='module')
def vit_file(tmp_path_factory):
    """A timm ViT state dict (another family), as a bare file and under 'model'."""
    d = tmp_path_factory.mktemp('vit')
    sd = timm.create_model('vit_tiny_patch16_224', num_classes=10).state_dict()
    torch.save(sd, d / 'vit.pth')
    return d / 'vit.pth'


@pytest.mark.parametrize('num_classes', [1000, 10])
def test_a_vit_file_is_refused_by_timm_pretrained_door(vit_file, num_classes):
    """timm calls the family's checkpoint_filter_fn, which refuses it whatever the class count
    (with another count timm itself would load non-strictly and leave the stem random)."""
    with pytest.raises(ValueError, match="does not fit this BViT: key 'stem.weight'"):
        timm.create_model('bvit_5m', pretrained=True, pretrained_cfg_overlay=dict(file=str(vit_file)),
                          num_classes=num_classes)


def test_a_vit_file_is_refused_through_every_other_door(vit_file, tmp_path, capsys):
    with pytest.raises(ValueError, match='does not fit this BViT'):
        C.load_checkpoint(timm.create_model('bvit_5m', num_classes=10), vit_file)
    with pytest.raises(ValueError, match='not a BViT or T2T-ViT'):
        B.build_from_checkpoint(vit_file)
    with pytest.raises(ValueError, match='not a BViT or T2T-ViT'):
        torch.hub.load(str(REPO), 'bvit_5m', source='local', weights=str(vit_file))
    with pytest.raises(RuntimeError, match='stem.weight'):  # timm's strict load_state_dict
        timm.create_model('bvit_5m', num_classes=10, checkpoint_path=str(vit_file))
    with pytest.raises(RuntimeError, match='stem.weight'):
        timm.models.load_checkpoint(timm.create_model('bvit_5m', num_classes=10), str(vit_file))
    assert E.main([str(vit_file), str(tmp_path / 'out')]) == 2
    assert not (tmp_path / 'out').exists()
    common = ['--data-set', 'DIGITS', '--val-subset', '8', '--num_workers', '0', '--threads', '1']
    for flags in (['--eval', '--resume', str(vit_file)], ['--finetune', str(vit_file), '--epochs', '1']):
        capsys.readouterr()
        assert train_hp.cli(common + flags) == 2
        err = capsys.readouterr().err.strip()
        assert '\n' not in err and "does not fit this BViT: key 'stem.weight'" in err, flags


def test_a_32px_run_is_evaluated_as_trained_without_model_flags(tmp_path, capsys):
    """Trained with --input-size 32 --patch-size 4: --eval --resume with no model flag rebuilds
    that model and gives the run's own top-1; a size that is given is honoured with a note."""
    out = tmp_path / 'run'
    train = ['--data-set', 'DIGITS', '--input-size', '32', '--patch-size', '4', '--model-kwargs', 'depth=1',
             'embed_dim=32', 'num_heads=2', 'head_dim=16', '--epochs', '1', '--batch-size', '32',
             '--train-subset', '64', '--val-subset', '40', '--num_workers', '0', '--threads', '1',
             '--print-freq', '1000', '--output_dir', str(out)]
    assert train_hp.cli(train) == 0
    logged = json.loads((out / 'log.txt').read_text().splitlines()[-1])
    obj = C.read_checkpoint(out / 'checkpoint.pth')
    assert obj[B.RECORD_KEY]['input_size'] == 32 and obj[B.RECORD_KEY]['patch_size'] == 4

    common = ['--eval', '--resume', str(out / 'checkpoint.pth'), '--data-set', 'DIGITS', '--val-subset', '40',
              '--num_workers', '0', '--threads', '1']
    stats = train_hp.main(train_hp.parse_args(common))
    assert stats['acc1'] == pytest.approx(logged['test_acc1'])
    capsys.readouterr()
    stats = train_hp.main(train_hp.parse_args(common + ['--patch-size', '4']))  # the same value: no note
    assert 'note:' not in capsys.readouterr().out and stats['acc1'] == pytest.approx(logged['test_acc1'])
    train_hp.main(train_hp.parse_args(common + ['--input-size', '48']))
    printed = capsys.readouterr().out
    assert 'was trained with --input-size 32; evaluating with --input-size 48, as given' in printed
    assert 'input 48' in printed


@pytest.mark.parametrize('name, kwargs, size', [
    ('bvit_5m', dict(img_size=32, patch_size=4, depth=1, num_classes=5), 32),
    ('bvit_22m', dict(img_size=32, patch_size=4, depth=1, num_classes=5), 32),
    ('t2t_vit_7', dict(img_size=64, num_classes=5), 64),
    ('t2t_vit_t_14', dict(img_size=64, num_classes=5), 64),
])
def test_torch_hub_local_for_each_family(name, kwargs, size, tmp_path):
    torch.manual_seed(0)
    model = torch.hub.load(str(REPO), name, source='local', **kwargs)
    ref = timm.create_model(name, **kwargs)
    assert type(model) is type(ref) and model.num_classes == 5
    torch.save({'state_dict': model.state_dict()}, tmp_path / 'w.pth')  # the layout of timm's saver
    again = torch.hub.load(str(REPO), name, source='local', weights=str(tmp_path / 'w.pth'))  # the model read off
    x = torch.randn(2, 3, size, size)
    assert torch.equal(_logits(again, x), _logits(model, x))
    with pytest.raises(ValueError, match='nothing is downloaded'):
        torch.hub.load(str(REPO), name, source='local', pretrained=True)


def _imports(path: Path, package: str) -> set:
    """Project modules that ``path`` imports, anywhere in the file (module level or in a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:  # relative: inside the bvit package
                base = f'{package}.{base}' if base else package
                found.update(f'{base}.{a.name}' for a in node.names)
            found.add(base)
    return found


def test_no_import_cycle():
    modules = {f'bvit.{p.stem}': p for p in (REPO / 'bvit').glob('*.py') if p.stem != '__init__'}
    modules.update({p.stem: p for p in REPO.glob('*.py')})
    modules.update({f'studies.{p.stem}': p for p in (REPO / 'studies').glob('*.py') if p.stem != '__init__'})
    graph = {name: {m for m in _imports(path, 'bvit') if m in modules and m != name}
             for name, path in modules.items()}
    for name, deps in graph.items():
        if name.startswith('bvit.'):
            assert all(d.startswith('bvit.') for d in deps), f'{name} imports a root script: {deps}'
    state = {}

    def visit(node, stack):
        state[node] = 'open'
        for dep in sorted(graph[node]):
            if state.get(dep) == 'open':
                raise AssertionError('import cycle: ' + ' -> '.join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 'done'

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
