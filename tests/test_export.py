"""bvit.export: timm hub layout + ONNX from this project's checkpoints and released files, the
model's arguments round-tripping through config.json, and bad input leaving OUT_DIR as it was."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import bvit.models as M
import bvit.checkpoint as C
from bvit import export as E

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / 'tests' / 'fixtures' / 'official_bvit_5m_golden.pt'


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


def _train_args(*flags):
    """The ``args`` dict train_hp.py stores in its checkpoints, for these flags."""
    import train_hp
    from utils import args_to_dict
    args = train_hp.parse_args(['--data-set', 'DIGITS', '--input-size', '32', '--patch-size', '4',
                                '--model-kwargs', 'depth=2', *flags])
    args.nb_classes = 10
    return args_to_dict(args)


def _tiny(seed=0, **kw):
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=4, depth=2, num_classes=10)
    return timm.create_model('bvit_5m', **{**args, **kw}).eval()


def _leftovers(parent: Path):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith('.'))


def _logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize('flags, kwargs', [
    ((), {}),
    (('--stem', 'none', '--patch-size', '8', '--no-broad', '--broad-scale', '0.2', '--mean', '0.5', '0.5', '0.5',
      '--std', '0.25', '0.25', '0.25', '--eval-crop-ratio', '1.0'),
     dict(stem='none', patch_size=8, broad=False, broad_scale=0.2)),
], ids=['released-settings', 'no-stem-no-broad'])
def test_training_checkpoint_round_trips_through_timm_and_onnx(tmp_path, flags, kwargs, capsys):
    import onnxruntime
    src = _tiny(**kwargs)
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'format': 'bvit-train-1', 'model': src.state_dict(), 'epoch': 3, 'args': _train_args(*flags)}, ckpt)
    out = tmp_path / 'export'
    assert E.main([str(ckpt), str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith(f'exported bvit_5m (10 classes, 3x32x32 input) to {out}')
    assert printed[1] == 'timm local-dir reload: largest logit difference 0 (<= 0.0001)'
    assert printed[2].startswith('onnxruntime: largest logit difference ')
    assert float(printed[2].split()[4]) <= 1e-4
    assert sorted(os.listdir(out)) == ['config.json', 'model.onnx', 'model.safetensors']
    assert _leftovers(tmp_path) == []

    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['architecture'] == 'bvit_5m' and cfg['num_classes'] == 10
    margs = cfg['model_args']
    # the record's constructor arguments (bvit.builder.model_kwargs; timm's save_for_hf adds its own
    # img_size, in_chans and global_pool), the rest the architecture's defaults
    want = {'num_classes': 10, 'img_size': [32, 32], 'patch_size': kwargs.get('patch_size', 4), 'depth': 2,
            'stem': kwargs.get('stem', 'conv'), 'broad': kwargs.get('broad', True),
            'broad_scale': kwargs.get('broad_scale', 0.4), 'in_chans': 3, 'global_pool': 'token'}
    assert margs == want
    for key, value in kwargs.items():
        assert margs[key] == value, key
    if kwargs:
        assert cfg['pretrained_cfg']['mean'] == [0.5] * 3 and cfg['pretrained_cfg']['crop_pct'] == 1.0

    reloaded = timm.create_model(f'local-dir:{out}', pretrained=True).eval()
    assert isinstance(reloaded, M.BViT)
    assert (reloaded.stem_type, reloaded.patch_size, reloaded.broad, reloaded.broad_scale, reloaded.img_size) == \
        (src.stem_type, src.patch_size, src.broad, src.broad_scale, src.img_size)
    x = torch.randn(5, 3, 32, 32)
    assert torch.equal(_logits(reloaded, x), _logits(src, x))
    session = onnxruntime.InferenceSession(str(out / 'model.onnx'), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].shape[0] == 'batch'  # dynamic batch axis
    for batch in (1, 5):
        got = torch.from_numpy(session.run(None, {'input': x[:batch].numpy()})[0])
        torch.testing.assert_close(got, _logits(src, x[:batch]), atol=1e-4, rtol=0)


def test_use_ema_exports_the_ema_weights(tmp_path, capsys):
    model, ema = _tiny(0), _tiny(1)
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), 'model_ema': ema.state_dict(), 'args': _train_args()}, ckpt)
    assert E.main([str(ckpt), str(tmp_path / 'ema'), '--use-ema']) == 0
    reloaded = timm.create_model(f'local-dir:{tmp_path / "ema"}', pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(reloaded, x), _logits(ema, x))
    torch.save({'model': model.state_dict(), 'args': _train_args()}, ckpt)
    assert E.main([str(ckpt), str(tmp_path / 'no_ema'), '--use-ema']) == 2
    assert capsys.readouterr().err == f'error: {ckpt}: the checkpoint holds no model_ema weights (nor state_dict_ema)\n'
    assert not (tmp_path / 'no_ema').exists()


def test_released_file_becomes_bvit_5m_by_its_width(tmp_path):
    """The released float16 layout (cut to 2 layers to stay fast): bvit_5m at 224, its Linear
    patch embedding converted, logits of the reload equal to load_checkpoint's model."""
    golden = torch.load(GOLDEN, weights_only=True)['state_dict']
    sd = {k: v for k, v in golden.items() if not k.startswith('transformer.layers.') or int(k.split('.')[2]) < 2}
    path = tmp_path / 'released.pth'
    torch.save({'state_dict': sd}, path)
    diffs = E.export(str(path), str(tmp_path / 'out'), log=lambda *a: None)
    assert diffs['timm local-dir reload'] == 0 and diffs['onnxruntime'] <= 1e-4
    ref = timm.create_model('bvit_5m', depth=2).eval()
    C.load_checkpoint(ref, path)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert reloaded.img_size == (224, 224) and reloaded.num_classes == 1000 and reloaded.stem_type == 'conv'
    x = torch.randn(1, 3, 224, 224)
    assert torch.equal(_logits(reloaded, x), _logits(ref, x))


def test_bad_input_is_one_line_and_leaves_out_dir_as_it_was(tmp_path, capsys):
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': _tiny().state_dict(), 'args': _train_args()}, ckpt)
    corrupt = tmp_path / 'corrupt.pth'
    corrupt.write_bytes(ckpt.read_bytes()[:1000])
    a_file = tmp_path / 'a_file'
    a_file.write_text('keep me')
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'notes.txt').write_text('mine')

    def fails(argv, message):
        assert E.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1 and message in err, err

    fails([tmp_path / 'missing.pth', tmp_path / 'o1'], 'checkpoint not found')
    fails([corrupt, tmp_path / 'o2'], 'not a readable PyTorch checkpoint')
    fails([ckpt, a_file], 'is not a folder')
    fails([ckpt, foreign, '--force'], 'holds files that are not an export (notes.txt)')
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()
    assert a_file.read_text() == 'keep me' and os.listdir(foreign) == ['notes.txt']

    out = tmp_path / 'out'
    assert E.main([str(ckpt), str(out)]) == 0
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    torch.save({'model': _tiny(seed=5).state_dict(), 'args': _train_args()}, ckpt)  # other weights
    fails([ckpt, out], 'already holds an export')
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert E.main([str(ckpt), str(out), '--force']) == 0
    after = {name: (out / name).read_bytes() for name in os.listdir(out)}
    assert after['model.safetensors'] != before['model.safetensors']
    assert _leftovers(tmp_path) == []


def test_a_failed_check_writes_nothing(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': _tiny().state_dict(), 'args': _train_args()}, ckpt)
    real = E.onnx_logits
    monkeypatch.setattr(E, 'onnx_logits', lambda path, x: real(path, x) + 1e-3)
    assert E.main([str(ckpt), str(tmp_path / 'out')]) == 1
    err = capsys.readouterr().err
    assert err.startswith('error: export check failed: largest logit difference onnxruntime 0.001')
    assert not (tmp_path / 'out').exists() and _leftovers(tmp_path) == []


def test_non_bvit_checkpoint_is_refused(tmp_path, capsys):
    vit = timm.create_model('vit_tiny_patch16_224', img_size=32, num_classes=10)
    ckpt = tmp_path / 'vit.pth'
    torch.save({'model': vit.state_dict(), 'args': _train_args('--arch', 'vit_tiny_patch16_224')}, ckpt)
    assert E.main([str(ckpt), str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err == (f'error: {ckpt}: it holds a vit_tiny_patch16_224 model, not a BViT, a T2T-ViT '
                                       'or a broad variant (train_hp.py --broad)\n')
    assert not (tmp_path / 'out').exists()


def test_command_line_as_a_process_outside_the_repository(tmp_path):
    torch.save({'model': _tiny().state_dict(), 'args': _train_args()}, tmp_path / 'c.pth')
    env = {**os.environ, 'PYTHONPATH': str(REPO), 'OMP_NUM_THREADS': '1'}
    r = subprocess.run([sys.executable, '-m', 'bvit.export', 'c.pth', 'out'], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 'onnxruntime: largest logit difference' in r.stdout
    r = subprocess.run([sys.executable, '-m', 'bvit.export', 'c.pth', 'out'], cwd=tmp_path, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith('error: ') and r.stderr.count('\n') == 1


def test_local_dir_export_loads_at_another_size_and_class_count(tmp_path):
    """timm's own overrides on a local-dir export: img_size resamples the table through
    checkpoint_filter_fn (timm's resample_abs_pos_embed of the used rows), num_classes a fresh head."""
    from timm.layers import resample_abs_pos_embed
    src = _tiny()
    torch.save({'model': src.state_dict(), 'args': _train_args()}, tmp_path / 'c.pth')
    E.export(str(tmp_path / 'c.pth'), str(tmp_path / 'out'), log=lambda *a: None)
    big = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True, img_size=48)
    want = resample_abs_pos_embed(src.pos_embed.detach()[:, :17], [6, 6], [4, 4], num_prefix_tokens=1)
    assert big.grid_size == (6, 6) and torch.equal(big.pos_embed.detach()[:, :37], want)
    assert torch.equal(big.blocks[1].attn.qkv.weight, src.blocks[1].attn.qkv.weight)
    other = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True, num_classes=3)
    assert other.head.weight.shape == (3, 192) and torch.equal(other.blocks[0].mlp.fc1.weight, src.blocks[0].mlp.fc1.weight)


def test_dynamic_size_model_round_trips(tmp_path):
    """A model trained with --model-kwargs dynamic_img_size=True keeps it through config.json: its
    model_args are the record's constructor arguments."""
    src = _tiny(dynamic_img_size=True)
    ckpt = tmp_path / 'c.pth'
    torch.save({'model': src.state_dict(), 'args': _train_args('--model-kwargs', 'depth=2', 'dynamic_img_size=True')},
               ckpt)
    E.export(str(ckpt), str(tmp_path / 'out'), log=lambda *a: None)
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['model_args']['dynamic_img_size'] is True and config['model_args']['depth'] == 2
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True).eval()
    assert reloaded.dynamic_img_size
    x = torch.randn(2, 3, 48, 40)
    assert torch.equal(_logits(reloaded, x), _logits(src, x))
