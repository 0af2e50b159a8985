"""Broad attention as a timm model option: ``broad=`` of BViT and T2T-ViT, the registered names
``broad_<name>`` of timm's ViT, DeiT and Swin (bvit.broad_models), what survives timm's
save_for_hf -> create_model('local-dir:...') and this project's export, the refusal of a model
that has no broad name, and the calls timm's train.py and validate.py make, on a tiny image
folder. Tiny models at 32 / 64 px, built with pretrained=False or from files written here."""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data import create_dataset, create_loader, resolve_data_config
from timm.models import create_model, get_pretrained_cfg, load_checkpoint, save_for_hf
from timm.optim import create_optimizer_v2
from timm.utils import AverageMeter, CheckpointSaver, ParseKwargs, accuracy, get_outdir

import bvit.broad_models as BM
from bvit import builder as B
from bvit import export as E
from bvit.broad import add_broad_attention, has_broad_attention, remove_broad_attention, set_broad_scale

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py

SWIN = dict(img_size=64, window_size=4, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=7)


def _seeded(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    return timm.create_model(name, **kwargs).eval()


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def _images(size, n=2):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _plain_twin_differs(model, x, want):
    """The model without broad attention gives other logits: a plain rebuild would be caught."""
    plain = remove_broad_attention(copy.deepcopy(model))
    assert not has_broad_attention(plain)
    assert not torch.allclose(_logits(plain, x), want, atol=1e-4)


# broad= of BViT and T2T-ViT ------------------------------------------------------------------

@pytest.mark.parametrize('name, kwargs', [
    ('bvit_5m', dict(img_size=32, patch_size=4, depth=2, num_classes=5)),
    ('t2t_vit_7', dict(img_size=32, num_classes=5)),
])
def test_broad_kwarg_gives_add_broad_attentions_model(name, kwargs):
    x = _images(32)
    built = _seeded(name, broad=True, broad_scale=0.3, **kwargs)
    plain = _seeded(name, broad=False, **kwargs)
    assert has_broad_attention(built) and not has_broad_attention(plain) and built.broad_scale == 0.3
    sd, plain_sd = built.state_dict(), plain.state_dict()
    assert list(sd) == list(plain_sd) and all(torch.equal(sd[k], plain_sd[k]) for k in sd)
    want = _logits(add_broad_attention(copy.deepcopy(plain), scale=0.3), x)
    assert torch.equal(_logits(built, x), want)
    assert not torch.allclose(_logits(plain, x), want, atol=1e-4)


# The registered broad names --------------------------------------------------------------------

def test_every_convertible_vit_deit_and_swin_has_a_broad_name_with_its_pretrained_cfgs():
    plain = [n for n in timm.list_models(module=list(BM.TIMM_MODULES)) if n not in BM.NOT_CONVERTIBLE]
    assert len(plain) > 150 and {'deit_tiny_patch16_224', 'swin_tiny_patch4_window7_224',
                                 'vit_base_r50_s16_384'} <= set(plain)
    assert set(timm.list_models('broad_*')) == {'broad_' + n for n in plain}
    tagged = timm.list_models(module=list(BM.TIMM_MODULES), pretrained=True, include_tags=True)
    tagged = [n for n in tagged if n.split('.')[0] not in BM.NOT_CONVERTIBLE]
    assert set(timm.list_models('broad_*', pretrained=True, include_tags=True)) == {'broad_' + n for n in tagged}
    for name in tagged + plain:  # every cfg (tags, default tag, weights' location) is the timm model's
        arch = name.split('.')[0]
        cfg = get_pretrained_cfg('broad_' + name)
        assert cfg.architecture == 'broad_' + arch, name
        assert dataclasses.replace(cfg, architecture=arch) == get_pretrained_cfg(name), name


@pytest.mark.parametrize('name', sorted(BM.NOT_CONVERTIBLE))
def test_the_names_left_out_are_those_add_broad_attention_refuses(name):
    if not timm.is_model(name):
        pytest.skip(f'{name} is not a model of this timm')
    with torch.device('meta'):
        model = timm.create_model(name)
    with pytest.raises(TypeError, match='not timm.layers.Attention'):
        add_broad_attention(model)
    assert not timm.is_model('broad_' + name)


def test_a_broad_name_is_its_timm_model_with_broad_attention(tmp_path):
    kw = dict(img_size=32, depth=2, num_classes=5)
    x = _images(32)
    built = _seeded('broad_deit_tiny_patch16_224', broad_scale=0.3, **kw)
    plain = _seeded('deit_tiny_patch16_224', **kw)
    assert torch.equal(_logits(built, x), _logits(add_broad_attention(copy.deepcopy(plain), 0.3), x))
    assert built.pretrained_cfg['architecture'] == 'broad_deit_tiny_patch16_224'
    assert built.pretrained_cfg['tag'] == plain.pretrained_cfg['tag'] == 'fb_in1k'

    # pretrained=True: a timm DeiT file, through timm's own loader and DeiT's filter
    other = _seeded('deit_tiny_patch16_224', seed=1, **kw)
    torch.save(other.state_dict(), tmp_path / 'deit.pth')
    loaded = timm.create_model('broad_deit_tiny_patch16_224.fb_in1k', pretrained=True, broad_scale=0.3,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / 'deit.pth'), num_classes=5), **kw)
    assert loaded.pretrained_cfg['architecture'] == 'broad_deit_tiny_patch16_224'
    assert torch.equal(_logits(loaded, x), _logits(add_broad_attention(other, 0.3), x))

    with pytest.raises(ValueError, match='features_only is not offered'):
        timm.create_model('broad_deit_tiny_patch16_224', features_only=True, **kw)
    with pytest.raises(ValueError, match='swin_rel_pos_bias applies to Swin models only'):
        timm.create_model('broad_deit_tiny_patch16_224', swin_rel_pos_bias=False, **kw)


# save_for_hf -> create_model('local-dir:...') --------------------------------------------------

# case: (model, input size, saved architecture, broad settings in config.json's model_args)
ROUND_TRIPS = {
    'vit, add_broad_attention': (  # the example, which came back as a plain ViT
        lambda: add_broad_attention(_seeded('vit_tiny_patch16_224', num_classes=10, img_size=64), scale=0.4),
        64, 'broad_vit_tiny_patch16_224', dict(broad_scale=0.4)),
    'deit, broad name': (
        lambda: _seeded('broad_deit_tiny_patch16_224', img_size=32, depth=2, num_classes=5, broad_scale=0.25),
        32, 'broad_deit_tiny_patch16_224', dict(broad_scale=0.25)),
    'distilled deit, add_broad_attention, set_broad_scale': (
        lambda: set_broad_scale(add_broad_attention(
            _seeded('deit_tiny_distilled_patch16_224', img_size=32, depth=2, num_classes=5)), 0.6),
        32, 'broad_deit_tiny_distilled_patch16_224', dict(broad_scale=0.6)),
    'swin, broad name': (
        lambda: _seeded('broad_swin_tiny_patch4_window7_224', broad_scale=0.7, swin_rel_pos_bias=False, **SWIN),
        64, 'broad_swin_tiny_patch4_window7_224', dict(broad_scale=0.7, swin_rel_pos_bias=False)),
    'swin, add_broad_attention': (
        lambda: add_broad_attention(_seeded('swin_tiny_patch4_window7_224', **SWIN), 0.5),
        64, 'broad_swin_tiny_patch4_window7_224', dict(broad_scale=0.5, swin_rel_pos_bias=True)),
    't2t, broad=True': (
        lambda: _seeded('t2t_vit_7', img_size=32, num_classes=5, broad=True, broad_scale=0.3),
        32, 't2t_vit_7', dict(broad=True, broad_scale=0.3)),
    't2t, add_broad_attention': (
        lambda: add_broad_attention(_seeded('t2t_vit_7', img_size=32, num_classes=5), 0.35),
        32, 't2t_vit_7', dict(broad=True, broad_scale=0.35)),
    'bvit broad=False, add_broad_attention': (
        lambda: add_broad_attention(_seeded('bvit_5m', img_size=32, patch_size=4, depth=2, num_classes=5,
                                            broad=False), 0.2),
        32, 'bvit_5m', dict(broad=True, broad_scale=0.2)),
}


@pytest.mark.parametrize('case', list(ROUND_TRIPS))
def test_save_for_hf_then_local_dir_rebuilds_the_broad_model(case, tmp_path):
    make, size, arch, settings = ROUND_TRIPS[case]
    model = make()
    x = _images(size)
    want = _logits(model, x)
    save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == arch
    assert {k: config['model_args'].get(k) for k in settings} == settings
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert type(reloaded) is type(model) and has_broad_attention(reloaded)
    assert reloaded.pretrained_cfg['architecture'] == arch
    torch.testing.assert_close(_logits(reloaded, x), want, rtol=0, atol=1e-6)
    _plain_twin_differs(model, x, want)


def test_remove_broad_attention_saves_the_timm_model(tmp_path):
    model = remove_broad_attention(_seeded('broad_deit_tiny_patch16_224', img_size=32, depth=2, num_classes=5))
    assert model.pretrained_cfg['architecture'] == 'deit_tiny_patch16_224'
    save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'deit_tiny_patch16_224' and 'broad_scale' not in config['model_args']
    reloaded = timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert not has_broad_attention(reloaded)
    x = _images(32)
    assert torch.equal(_logits(reloaded, x), _logits(model, x))


def test_broad_attention_on_a_model_without_a_broad_name_is_refused_when_rebuilt(tmp_path):
    """vitamin (timm's VisionTransformer with a convolutional stem, not one of the registered
    families) has no broad name: the saved config keeps its name with broad_scale among the
    model_args, and timm's rebuild refuses that in one line rather than give a plain vitamin."""
    model = add_broad_attention(_seeded('vitamin_small_224', img_size=64, depth=1, num_classes=3), 0.4)
    assert not timm.is_model('broad_vitamin_small_224')
    save_for_hf(model, tmp_path)
    config = json.loads((tmp_path / 'config.json').read_text())
    assert config['architecture'] == 'vitamin_small_224' and config['model_args']['broad_scale'] == 0.4
    with pytest.raises(TypeError, match="unexpected keyword argument 'broad_scale'") as refused:
        timm.create_model(f'local-dir:{tmp_path}', pretrained=True)
    assert '\n' not in str(refused.value)


# This project's export and model record -------------------------------------------------------

def _train_hp_args(*flags):
    import train_hp
    args = train_hp.parse_args(['--data-set', 'DIGITS', '--input-size', '32', '--broad-scale', '0.3', *flags])
    args.nb_classes = 10
    return args


@pytest.mark.parametrize('arch, model_kwargs, saved_as', [
    ('deit_tiny_patch16_224', ['--model-kwargs', 'depth=2'], 'broad_deit_tiny_patch16_224'),
    ('t2t_vit_7', [], 't2t_vit_7'),
])
def test_export_and_model_record_round_trip_broad_models(arch, model_kwargs, saved_as, tmp_path):
    from utils import args_to_dict
    args = _train_hp_args('--arch', arch, '--broad', *model_kwargs)
    record = B.record_from_args(vars(args))
    assert (record['arch'], record['broad'], record['broad_scale']) == (arch, True, 0.3)
    if saved_as.startswith('broad_'):  # --arch broad_<name> is the same model, recorded alike
        assert B.record_from_args(vars(_train_hp_args('--arch', saved_as, *model_kwargs))) == record
    torch.manual_seed(0)
    src = B.create_model(record).eval()
    assert has_broad_attention(src) and src.broad_scale == 0.3
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': src.state_dict(), 'args': args_to_dict(args), B.RECORD_KEY: record}, ckpt)

    diffs = E.export(str(ckpt), str(tmp_path / 'out'), log=lambda *a: None)
    assert diffs['timm local-dir reload'] == 0 and diffs['onnxruntime'] <= 1e-4
    config = json.loads((tmp_path / 'out' / 'config.json').read_text())
    assert config['architecture'] == saved_as and config['model_args']['broad_scale'] == 0.3
    x = _images(32)
    want = _logits(src, x)
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    assert has_broad_attention(reloaded) and torch.equal(_logits(reloaded, x), want)
    rebuilt, rebuilt_record = B.build_from_checkpoint(ckpt)
    assert rebuilt_record == record and torch.equal(_logits(rebuilt, x), want)
    _plain_twin_differs(src, x, want)


def test_export_refuses_broad_attention_on_a_model_without_a_broad_name(tmp_path, capsys):
    record = dict(arch='vitamin_small_224', num_classes=3, input_size=64, patch_size=None, stem=None, broad=True,
                  broad_scale=0.4, model_kwargs={'depth': 1})
    model = B.create_model(record)
    assert has_broad_attention(model)
    ckpt = tmp_path / 'checkpoint.pth'
    torch.save({'model': model.state_dict(), B.RECORD_KEY: record}, ckpt)
    assert E.main([str(ckpt), str(tmp_path / 'out')]) == 2
    assert capsys.readouterr().err == (
        f'error: {ckpt}: it holds vitamin_small_224 with broad attention (train_hp.py --broad), which has no broad '
        'variant (bvit.broad_models), so timm.create_model cannot rebuild it from config.json; evaluate it with '
        'train_hp.py --eval --resume\n')
    assert not (tmp_path / 'out').exists()


# timm's train.py and validate.py -------------------------------------------------------------

def _image_folder(root: Path, classes: int = 3, per_class: int = 4, size: int = 40) -> Path:
    """``root/{train,validation}/class<c>/<i>.png``: random 40x40 RGB images, darker to brighter by class."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ('train', 'validation'):
        for c in range(classes):
            folder = root / split / f'class{c}'
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = (torch.rand(size, size, 3, generator=g) * 80 + 80 * c).to(torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f'{i}.png')
    return root


def _script_args(argv):
    """The flags of timm's train.py / validate.py that these calls use, parsed as those scripts do
    (``--model-kwargs`` by timm's ParseKwargs)."""
    p = argparse.ArgumentParser()
    p.add_argument('--model')
    p.add_argument('--num-classes', type=int, default=None)
    p.add_argument('--img-size', type=int, default=None)
    p.add_argument('--model-kwargs', nargs='*', default={}, action=ParseKwargs)
    return p.parse_args(argv)


def _loader(dataset, config, training):
    extra = {} if training else dict(crop_pct=config['crop_pct'], crop_mode=config['crop_mode'])
    return create_loader(dataset, input_size=config['input_size'], batch_size=4, is_training=training,
                         use_prefetcher=False, interpolation=config['interpolation'], mean=config['mean'],
                         std=config['std'], num_workers=0, device=torch.device('cpu'), **extra)


def _validate(model, loader):
    """validate.py's loop: (top-1 averaged over the images, the logits)."""
    top1, outs = AverageMeter(), []
    model.eval()
    with torch.no_grad():
        for x, y in loader:
            out = model(x)
            top1.update(accuracy(out, y, topk=(1,))[0].item(), x.size(0))
            outs.append(out)
    return top1.avg, torch.cat(outs)


@pytest.mark.parametrize('argv', [
    ['--model', 't2t_vit_7', '--model-kwargs', 'img_size=32', 'broad=True', 'broad_scale=0.3'],
    ['--model', 'broad_deit_tiny_patch16_224', '--model-kwargs', 'img_size=32', 'depth=2', 'broad_scale=0.3'],
], ids=['t2t_vit_7', 'broad_deit_tiny'])
def test_timm_train_and_validate_calls_on_a_tiny_folder(argv, tmp_path):
    root = _image_folder(tmp_path / 'data')
    args = _script_args([*argv, '--num-classes', '3', '--img-size', '32'])
    assert args.model_kwargs['broad_scale'] == 0.3

    # train.py: the model, its data config, one epoch, the checkpoint saver
    torch.manual_seed(0)
    model = create_model(args.model, pretrained=False, in_chans=3, num_classes=args.num_classes, drop_rate=0.,
                         drop_path_rate=None, global_pool=None, **args.model_kwargs)
    assert has_broad_attention(model) and model.broad_scale == 0.3
    config = resolve_data_config(vars(args), model=model)
    assert config['input_size'] == (3, 32, 32)
    train_loader = _loader(create_dataset('', root=str(root), split='train', is_training=True), config, True)
    optimizer = create_optimizer_v2(model, opt='adamw', lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    steps = 0
    for x, y in train_loader:
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    assert steps == 3 and torch.isfinite(loss)
    assert not torch.equal(model.state_dict()['blocks.0.attn.qkv.weight'], before['blocks.0.attn.qkv.weight'])
    output_dir = get_outdir(str(tmp_path), 'out')
    saver = CheckpointSaver(model, optimizer, args=args, checkpoint_dir=output_dir, recovery_dir=output_dir)
    saver.save_checkpoint(epoch=0, metric=0.)

    # validate.py: a fresh model from the same flags, the checkpoint, the eval loader
    fresh = create_model(args.model, pretrained=False, num_classes=args.num_classes, in_chans=3, global_pool=None,
                         **args.model_kwargs)
    load_checkpoint(fresh, str(Path(output_dir) / 'last.pth.tar'))
    eval_config = resolve_data_config(vars(args), model=fresh, use_test_size=True)
    val_loader = _loader(create_dataset('', root=str(root), split='validation'), eval_config, False)
    top1, logits = _validate(fresh, val_loader)
    want_top1, want = _validate(model, val_loader)
    assert logits.shape == (12, 3) and top1 == want_top1 and torch.equal(logits, want)
    _plain_twin_differs(model, next(iter(val_loader))[0], want[:4])


# broad_layers --------------------------------------------------------------------------------

def _qkv_and_last(model, x):
    """Each block's qkv projection output and the last block's output, from one forward pass."""
    qkv, last = [], []
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o: qkv.append(o)) for b in model.blocks]
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, i, o: last.append(o)))
    with torch.no_grad():
        out = model.forward_features(x)
    for h in hooks:
        h.remove()
    return out, qkv, last[0]


@pytest.mark.parametrize('name, broad_layers, chosen', [
    ('broad_deit_tiny_patch16_224', 2, [2, 3]),
    ('broad_deit_tiny_patch16_224', [0, -1], [0, 3]),
    ('t2t_vit_7', [1], [1]),
])
def test_broad_layers_of_a_broad_model_is_the_definition_on_those_blocks(name, broad_layers, chosen):
    """A broad model's forward_features is norm(x_L + scale * broad_attention of the chosen
    blocks' q, k, v), and the choice survives save_for_hf -> local-dir."""
    from bvit.layers import broad_attention
    kwargs = dict(depth=4, img_size=32, patch_size=8, num_classes=3) if 'deit' in name else dict(img_size=32, num_classes=3, broad=True)
    model = _seeded(name, broad_layers=broad_layers, broad_scale=0.5, **kwargs)
    x = _images(32)
    out, qkv, last = _qkv_and_last(model, x)
    attn = model.blocks[0].attn
    parts = [o.reshape(2, last.shape[1], 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4) for o in qkv]
    broad = broad_attention(*([parts[i][j] for i in chosen] for j in range(3)), model.embed_dim, scale=attn.scale)
    torch.testing.assert_close(out, model.norm(last + 0.5 * broad), rtol=0, atol=1e-5)


def test_broad_layers_survive_save_for_hf_and_the_record(tmp_path):
    model = _seeded('broad_deit_tiny_patch16_224', broad_layers=[1, 2], depth=4, img_size=32, patch_size=8,
                    num_classes=3)
    x = _images(32)
    want = _logits(model, x)
    save_for_hf(model, tmp_path / 'hf')
    again = timm.create_model(f'local-dir:{tmp_path / "hf"}', pretrained=True)
    assert again.broad_layers == [1, 2]
    torch.testing.assert_close(_logits(again, x), want, rtol=0, atol=1e-6)
    assert not torch.allclose(_logits(_seeded('broad_deit_tiny_patch16_224', depth=4, img_size=32, patch_size=8,
                                              num_classes=3), x), want, atol=1e-4)
    record = B.record_from_args(dict(arch='bvit_5m', nb_classes=3, input_size=32, patch_size=8, broad_layers='0,5,'))
    assert record['broad_layers'] == [0, 5]
    assert B.create_model(record).broad_layers == [0, 5]
    assert B.create_model({**record, 'broad_layers': 3}).broad_layers == [9, 10, 11]


def test_broad_layers_per_swin_stage():
    """For a Swin, k is each stage's last min(k, depth) blocks; a list, the same indices in every stage."""
    model = _seeded('broad_swin_tiny_patch4_window7_224', broad_layers=1, **SWIN)
    x = _images(64)
    one = _logits(model, x)
    assert [s.broad_layers for s in model.layers] == [1] * 4
    from bvit.broad import _stage_layers
    assert _stage_layers(3, 2) == [0, 1] and _stage_layers(1, 6) == [5] and _stage_layers([0], 2) == [0]
    every = _logits(_seeded('broad_swin_tiny_patch4_window7_224', **SWIN), x)
    assert not torch.allclose(one, every, atol=1e-5)
    with pytest.raises(ValueError, match='broad_layers='):
        _seeded('broad_swin_tiny_patch4_window7_224', broad_layers=[3], **SWIN)
