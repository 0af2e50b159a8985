"""Attention figures (bvit.visualize): a PNG of the expected size from a checkpoint, clear errors."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

import bvit.models  # noqa: F401  (registers the models)
from bvit import visualize

TINY = dict(img_size=32, patch_size=4, depth=2, num_classes=10)


def _tiny(**kw):
    torch.manual_seed(0)
    return timm.create_model('bvit_5m', **{**TINY, **kw}).eval()


def _train_args(*flags):
    """The ``args`` dict train_hp.py stores in its checkpoints, for these command-line flags."""
    import train_hp
    from utils import args_to_dict
    args = train_hp.parse_args(['--data-set', 'DIGITS', '--input-size', '32', '--patch-size', '4',
                                '--model-kwargs', 'depth=2', *flags])
    args.nb_classes = 10
    return args_to_dict(args)


@pytest.fixture(scope='module')
def ckpt(tmp_path_factory):
    """A tiny BViT saved the way train_hp.py saves checkpoints: {'model': state dict, 'args': dict, ...}."""
    d = tmp_path_factory.mktemp('ckpt')
    model = _tiny()
    path = d / 'checkpoint.pth'
    torch.save({'format': 'bvit-train-1', 'model': model.state_dict(), 'epoch': 0, 'args': _train_args()}, path)
    return path, model


@pytest.fixture(scope='module')
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp('img') / 'digit.png'
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(path)
    return path


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == 'PNG'
        im.load()
        return im.size


def test_plot_attention_writes_png_of_expected_size(tmp_path):
    model = _tiny()
    x = torch.randn(3, 32, 32)
    out = tmp_path / 'sub' / 'fig.png'
    info = visualize.plot_attention(model, x, None, str(out), dpi=50, panel_inches=1.5)
    # input + 2 layers + broad = 4 panels in one row of 1.5 in, plus the title strip.
    assert info['size'] == (4 * 75, int(round((1.5 + 0.55) * 50)))
    assert _png_size(out) == info['size']
    assert len(info['layers']) == 2 and info['layers'][0].shape == (4, 4) and info['broad'].shape == (4, 4)
    # Class-token rows of softmax maps: patch shares are probabilities, summing to at most 1.
    for m in info['layers'] + [info['broad']]:
        assert (m >= 0).all() and m.sum() <= 1 + 1e-5


def test_class_token_maps_match_attention_maps():
    model = _tiny()
    x = torch.randn(1, 3, 32, 32)
    layers, broad, logits = visualize.class_token_maps(model, x, head=1)
    with torch.no_grad():
        maps = model.attention_maps(x)
        ref = model(x)[0]
    torch.testing.assert_close(torch.from_numpy(broad), maps.broad[0, 1, 0, 1:].reshape(4, 4))
    torch.testing.assert_close(torch.from_numpy(layers[1]), maps.layers[1][0, 1, 0, 1:].reshape(4, 4))
    torch.testing.assert_close(logits, ref)
    mean_layers, _, _ = visualize.class_token_maps(model, x, head='mean')
    torch.testing.assert_close(torch.from_numpy(mean_layers[0]), maps.layers[0][0, :, 0, 1:].mean(0).reshape(4, 4))
    with pytest.raises(visualize.VisualizeError, match='head 7'):
        visualize.class_token_maps(model, x, head=7)


def test_cli_from_checkpoint_and_image_file(ckpt, image_file, tmp_path, capsys):
    path, model = ckpt
    out = tmp_path / 'fig.png'
    rc = visualize.main(['--resume', str(path), '--image', str(image_file), '--out', str(out), '--dpi', '40'])
    assert rc == 0
    assert _png_size(out) == (4 * 80, int(round((2 + 0.55) * 40)))
    assert 'predicted' in capsys.readouterr().out


def test_load_model_rebuilds_the_trained_network(ckpt):
    path, ref = ckpt
    model, args = visualize.load_model(str(path))
    assert args['arch'] == 'BViT-5' and args['nb_classes'] == 10
    assert model.img_size == (32, 32) and model.patch_size == 4 and len(model.blocks) == 2
    assert model.broad and model.broad_scale == 0.4 and model.stem_type == 'conv'
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_released_style_checkpoint_without_args(tmp_path):
    """A bare state dict (no args): the architecture is read off the weights; flags override."""
    model = _tiny(stem='none', patch_size=8)
    path = tmp_path / 'bare.pth'
    torch.save(model.state_dict(), path)
    loaded, args = visualize.load_model(str(path))
    assert args == {} and loaded.stem_type == 'none' and loaded.patch_size == 8 and loaded.num_classes == 10
    with pytest.raises(visualize.VisualizeError, match='head.weight'):
        visualize.load_model(str(path), num_classes=5)


def test_cli_errors_are_one_line(ckpt, image_file, tmp_path, capsys):
    path, _ = ckpt
    out = str(tmp_path / 'x.png')
    assert visualize.main(['--resume', str(tmp_path / 'missing.pth'), '--image', str(image_file), '--out', out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith('error: checkpoint not found') and '\n' not in err
    not_image = tmp_path / 'notes.txt'
    not_image.write_text('hello')
    assert visualize.main(['--resume', str(path), '--image', str(not_image), '--out', out]) == 2
    err = capsys.readouterr().err.strip()
    assert 'not an image' in err and '\n' not in err
    assert visualize.main(['--resume', str(path), '--image', str(tmp_path / 'nope.png'), '--out', out]) == 2
    assert 'neither an existing image file nor an integer' in capsys.readouterr().err
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    assert visualize.main(['--resume', str(bad), '--image', str(image_file), '--out', out]) == 2
    assert 'not a readable PyTorch checkpoint' in capsys.readouterr().err


def test_no_broad_twin_and_broad_scale_come_from_args(tmp_path):
    twin = _tiny(broad=False)
    path = tmp_path / 'twin.pth'
    torch.save({'model': twin.state_dict(), 'args': _train_args('--no-broad', '--broad-scale', '0.2')}, path)
    model, _ = visualize.load_model(str(path))
    assert model.broad is False and model.broad_scale == 0.2


def test_cli_digits_index(ckpt, tmp_path, capsys):
    """An integer --image is an item of the DIGITS validation split (datasets.py's), with its label."""
    path, _ = ckpt
    out = tmp_path / 'digit.png'
    assert visualize.main(['--resume', str(path), '--image', '3', '--out', str(out), '--dpi', '30',
                           '--head', 'max', '--shared-scale']) == 0
    assert _png_size(out) == (4 * 60, int(round((2 + 0.55) * 30)))
    msg = capsys.readouterr().out
    assert msg.startswith('DIGITS val #3: predicted') and 'true ' in msg
    assert visualize.main(['--resume', str(path), '--image', '100000', '--out', str(out)]) == 2
    assert 'validation split has' in capsys.readouterr().err


def test_input_size_override_resamples_the_position_table(ckpt):
    path, ref = ckpt
    model, _ = visualize.load_model(str(path), input_size=48)
    assert model.img_size == (48, 48) and model.grid_size == (6, 6)
    layers, broad, _ = visualize.class_token_maps(model, torch.randn(3, 48, 48))
    assert broad.shape == (6, 6)
    # Through checkpoint_filter_fn: timm's resample_abs_pos_embed of the 1 + 4x4 used rows, padded
    # with zeros to the table of a 48 px model ((48/4)^2 + 1 rows, sized as released).
    from timm.layers import resample_abs_pos_embed
    want = resample_abs_pos_embed(ref.pos_embed.detach()[:, :17], [6, 6], [4, 4], num_prefix_tokens=1)
    assert model.pos_embed.shape[1] == 145
    assert torch.equal(model.pos_embed.detach()[:, :37], want)
    assert not model.pos_embed.detach()[:, 37:].any()
