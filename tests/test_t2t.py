"""T2T-ViT (bvit.t2t): the authors' parameter counts, the layer-by-layer behaviour the T2T paper
states, a regression vector per family, the checkpoint filter and every loader, broad attention
on it, and the timm basics. Small inputs (32 px: a 2x2 token grid) except where 224 px is the point."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

import bvit.models as M
import bvit.t2t as T
import bvit.checkpoint as C
from bvit import t2t as T
from bvit.broad import add_broad_attention

pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py

# (all parameters, trainable ones) of the authors' models: the position table and the Performer's
# random features are Parameters with requires_grad=False there too. 21,545,550 / 21,465,806 for
# t2t_vit_14 are the issue's figures; all nine equal the count of the authors' layer shapes
# (token layers 147->64 and 576->64, project 576->D, 197-row table, L blocks, 1000-class head).
COUNTS = {
    't2t_vit_7': (4_310_222, 4_255_694), 't2t_vit_10': (5_889_230, 5_834_702),
    't2t_vit_12': (6_941_902, 6_887_374), 't2t_vit_14': (21_545_550, 21_465_806),
    't2t_vit_19': (39_177_422, 39_085_070), 't2t_vit_24': (64_105_934, 64_000_974),
    't2t_vit_t_14': (21_541_070, 21_465_422), 't2t_vit_t_19': (39_172_942, 39_084_686),
    't2t_vit_t_24': (64_101_454, 64_000_590),
}
SMALL = dict(img_size=32, num_classes=10)


def _logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize('name', list(COUNTS))
def test_parameter_counts_are_the_authors(name):
    model = timm.create_model(name, device='meta')
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, trainable) == COUNTS[name]
    frozen = sorted(n for n, p in model.named_parameters() if not p.requires_grad)
    want = ['pos_embed'] + (['patch_embed.attention1.w', 'patch_embed.attention2.w'] if 't_' not in name[7:] else [])
    assert frozen == sorted(want)


def test_token_counts_after_each_soft_split():
    """T2T paper: soft split 7/4/2 then 3/2/1 twice, 224 px -> 56², 28², 14² tokens of C·k² values;
    the token layers give 64 channels, the projection D. A 224x160 image gives a 14x10 grid."""
    model = timm.create_model('t2t_vit_7').eval()
    seen = {}
    for name in ('soft_split0', 'attention1', 'soft_split1', 'attention2', 'soft_split2', 'project'):
        getattr(model.patch_embed, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, tuple(o.shape)))
    _logits(model, torch.randn(1, 3, 224, 224))
    assert seen == {'soft_split0': (1, 147, 3136), 'attention1': (1, 3136, 64), 'soft_split1': (1, 576, 784),
                    'attention2': (1, 784, 64), 'soft_split2': (1, 576, 196), 'project': (1, 196, 256)}
    assert model.patch_embed.grid_size == (14, 14) and model.pos_embed.shape == (1, 197, 256)
    assert T.t2t_grid((224, 160)) == (14, 10) and T.t2t_grid(384) == (24, 24) and T.t2t_grid(32) == (2, 2)


def test_sinusoid_position_table():
    table = T.sinusoid_pos_table(197, 384)
    for p, j in ((0, 0), (0, 1), (5, 0), (5, 1), (196, 100), (196, 383)):
        angle = p / 10000 ** (2 * (j // 2) / 384)
        assert table[0, p, j].item() == pytest.approx(math.sin(angle) if j % 2 == 0 else math.cos(angle), abs=1e-6)
    model = timm.create_model('t2t_vit_14', device='meta')
    assert not model.pos_embed.requires_grad
    small = timm.create_model('t2t_vit_7', **SMALL)
    assert torch.equal(small.pos_embed.detach(), T.sinusoid_pos_table(5, 256))


def test_performer_attention_is_the_kernel_estimate_of_softmax_attention():
    """(a) The linear-time einsums equal the explicit kernel attention φ(q) φ(k)ᵀ v / row sums.
    (b) With many N(0, I) features the estimate approaches exact softmax(q kᵀ) v (no logit scale),
    the Performer's claim; 200k features on 6 tokens of width 4 are within 0.02."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.5 * torch.randn(2, 6, 4, generator=g) for _ in range(3))
    w = torch.randn(16, 4, generator=g)
    qp, kp = T.performer_features(q, w), T.performer_features(k, w)
    kernel = qp @ kp.transpose(1, 2)
    explicit = kernel @ v / (kernel.sum(-1, keepdim=True) + 1e-8)
    torch.testing.assert_close(T.performer_attention(q, k, v, w), explicit, rtol=1e-5, atol=1e-6)
    exact = torch.softmax(q @ k.transpose(1, 2), -1) @ v
    many = torch.randn(200_000, 4, generator=g)
    err = (T.performer_attention(q, k, v, many) - exact).abs().max().item()
    assert err < 0.02
    assert (T.performer_attention(q, k, v, w[:2]) - exact).abs().max().item() > err  # few features: worse


@pytest.mark.parametrize('layer', ['performer', 'transformer'])
def test_token_layers_use_the_value_as_skip(layer):
    """With the attention's projection and the MLP zeroed, a token layer returns its v exactly."""
    torch.manual_seed(0)
    mod = (T.TokenPerformer(147, 64) if layer == 'performer' else T.TokenTransformer(147, 64)).eval()
    proj = mod.proj if layer == 'performer' else mod.attn.proj
    for lin in (proj, mod.mlp.fc2):
        torch.nn.init.zeros_(lin.weight)
        torch.nn.init.zeros_(lin.bias)
    x = torch.randn(2, 9, 147)
    qkv = (mod.kqv if layer == 'performer' else mod.attn.qkv)(mod.norm1(x))
    v = qkv[..., 128:]  # v is the last third in both layouts (k, q, v and q, k, v)
    with torch.no_grad():
        assert torch.equal(mod(x), v)


def test_token_attention_is_single_head_softmax_scaled_by_the_input_width():
    torch.manual_seed(0)
    attn = T.TokenAttention(147, 64).eval()
    x = torch.randn(2, 10, 147)
    q, k, v = attn.qkv(x).split(64, -1)
    want = v + attn.proj(torch.softmax(q @ k.transpose(1, 2) * 147 ** -0.5, -1) @ v)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


def _seeded(model, seed=0):
    """Every state-dict entry (sorted keys) drawn from N(0, 0.1²) with a seeded generator: the
    weights depend on the key layout and shapes only, not on how the model initialises."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, value in sorted(model.state_dict().items()):
            value.copy_(0.1 * torch.randn(value.shape, generator=g))
    return model.eval()


# Made by running this file's _seeded(T.T2TViT(img_size=32, embed_dim=64, depth=2, num_heads=2,
# mlp_ratio=2., tokens_type=..., num_classes=4)) on torch.randn(2, 3, 32, 32) of a generator
# seeded with 1 (bvit.t2t at the commit that added it; torch 2.14.1, CPU, float32).
REGRESSION = {
    'performer': [[0.175492, 0.058501, -0.063171, 0.119424], [0.176371, 0.060788, -0.063662, 0.112555]],
    'transformer': [[0.132025, 0.019409, 0.056216, 0.063359], [0.133249, 0.017222, 0.053251, 0.063966]],
}


@pytest.mark.parametrize('family', list(REGRESSION))
def test_regression_vector(family):
    model = _seeded(T.T2TViT(img_size=32, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2., tokens_type=family,
                             num_classes=4))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = _logits(model, x)
    torch.testing.assert_close(out, torch.tensor(REGRESSION[family]), rtol=0, atol=2e-6)


def test_qk_scale_applies_to_every_block():
    """qk_scale=D**-0.5 (the authors' pretrained=True branch) switches the blocks to timm's
    explicit path with that scale; the default keeps the per-head scale."""
    torch.manual_seed(0)
    dflt = timm.create_model('t2t_vit_7', **SMALL)
    scaled = timm.create_model('t2t_vit_7', qk_scale=256 ** -0.5, **SMALL)
    assert all(b.attn.scale == 64 ** -0.5 for b in dflt.blocks)
    assert all(b.attn.scale == 256 ** -0.5 and not b.attn.fused_attn for b in scaled.blocks)
    attn = scaled.blocks[0].attn.eval()
    x = torch.randn(2, 5, 256)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 4, 64).permute(2, 0, 3, 1, 4)
    want = attn.proj((torch.softmax(q @ k.transpose(-1, -2) * 256 ** -0.5, -1) @ v).transpose(1, 2).reshape(2, 5, 256))
    with torch.no_grad():
        torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-6)


# --- checkpoints --------------------------------------------------------------------------------

def authors_layout(sd):
    """This module's state dict in the authors' key names (tokens_to_token., Performer mlp.0/2),
    with DDP's ``module.`` prefixes as their saver writes them."""
    out = {}
    for key, value in sd.items():
        key = key.replace('patch_embed.', 'tokens_to_token.', 1)
        if '.attention' in key and 'attn' not in key:
            key = key.replace('.mlp.fc1.', '.mlp.0.').replace('.mlp.fc2.', '.mlp.2.')
        out['module.' + key] = value
    return out


def authors_file(path: Path, model, ema=None) -> Path:
    """Saved as the authors' main.py saves (timm 0.3's CheckpointSaver): state_dict and
    state_dict_ema, optimizer, amp_scaler, epoch, arch, version, metric, args (Namespace)."""
    args = argparse.Namespace(model='t2t_vit_7', img_size=224, lr=1e-3, weight_decay=0.03, model_ema=True)
    torch.save({'epoch': 309, 'arch': 't2t_vit_7', 'state_dict': authors_layout(model.state_dict()),
                'state_dict_ema': authors_layout((ema or model).state_dict()),
                'optimizer': torch.optim.AdamW(model.parameters()).state_dict(), 'version': 2, 'args': args,
                'amp_scaler': {'scale': 65536.0, 'growth_factor': 2.0, 'backoff_factor': 0.5, 'growth_interval': 2000,
                               '_growth_tracker': 0}, 'metric': 71.7}, path)
    return path


def test_authors_file_loads_with_its_logits_everywhere(tmp_path):
    torch.manual_seed(0)
    src = timm.create_model('t2t_vit_7', **SMALL).eval()
    ema = timm.create_model('t2t_vit_7', **SMALL).eval()
    path = authors_file(tmp_path / '71.7_T2T_ViT_7.pth.tar', src, ema)
    x = torch.randn(2, 3, 32, 32)
    want, want_ema = _logits(src, x), _logits(ema, x)
    fresh = lambda **kw: timm.create_model('t2t_vit_7', **SMALL, **kw)  # noqa: E731
    m = fresh()
    C.load_checkpoint(m, path)
    assert torch.equal(_logits(m, x), want)
    C.load_checkpoint(m, path, use_ema=True)
    assert torch.equal(_logits(m, x), want_ema)
    pre = fresh(pretrained=True, pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    assert torch.equal(_logits(pre, x), want_ema)  # timm's loader takes state_dict_ema, as the authors' eval does
    import utils
    tuned = timm.create_model('t2t_vit_7', img_size=32, num_classes=3)
    assert C.load_checkpoint(tuned, str(path), new_head=True) == ['head.weight', 'head.bias']
    assert torch.equal(tuned.patch_embed.attention1.w, src.patch_embed.attention1.w)
    assert torch.equal(tuned.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)


def test_position_table_resampled_for_another_size(tmp_path):
    """A 224 px file (14x14 grid) into a 384 px model (24x24) and a 32 px one (2x2): the table is
    timm's bicubic resample of the file's, everything else as saved."""
    torch.manual_seed(0)
    src = timm.create_model('t2t_vit_7', device='meta')
    sd = {k: torch.randn(v.shape) for k, v in src.state_dict().items()}
    obj = {'state_dict': authors_layout(sd)}
    for size, grid in ((384, 24), (32, 2)):
        model = timm.create_model('t2t_vit_7', img_size=size, device='meta')
        out = T.checkpoint_filter_fn(obj, model)
        want = resample_abs_pos_embed(sd['pos_embed'], [grid, grid], [14, 14], num_prefix_tokens=1)
        assert out['pos_embed'].shape == (1, grid * grid + 1, 256) and torch.equal(out['pos_embed'], want)
        assert torch.equal(out['patch_embed.attention1.mlp.fc1.weight'], sd['patch_embed.attention1.mlp.fc1.weight'])
        C.check_state_dict(model, out)
    with pytest.raises(ValueError, match='in_chans=3'):
        T.checkpoint_filter_fn(obj, timm.create_model('t2t_vit_7', in_chans=1, device='meta'))


# --- broad attention ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['t2t_vit_7', 't2t_vit_t_14'])
def test_broad_attention_at_scale_0_is_the_original_model(name, tmp_path):
    torch.manual_seed(0)
    model = timm.create_model(name, **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    ref, sd = _logits(model, x), {k: v.clone() for k, v in model.state_dict().items()}
    count = sum(p.numel() for p in model.parameters())
    add_broad_attention(model, scale=0.)
    assert isinstance(model, T.T2TViT) and list(model.state_dict()) == list(sd)
    assert sum(p.numel() for p in model.parameters()) == count
    assert torch.equal(_logits(model, x), ref)
    model.broad_scale = 0.4
    assert not torch.allclose(_logits(model, x), ref)
    plain = timm.create_model(name, **SMALL)
    plain.load_state_dict(model.state_dict())  # converted weights load into the plain model as they are
    assert torch.equal(_logits(plain, x), ref)
    fresh = add_broad_attention(timm.create_model(name, **SMALL), scale=0.)  # and an authors' file into a converted one
    C.load_checkpoint(fresh, authors_file(tmp_path / 'authors.pth.tar', plain))
    assert torch.equal(_logits(fresh, x), ref)


def test_one_training_step_with_broad_attention():
    torch.manual_seed(0)
    model = add_broad_attention(timm.create_model('t2t_vit_7', drop_path_rate=0.1, **SMALL), scale=0.4).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = F.cross_entropy(model(torch.randn(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert math.isfinite(loss.item())
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if not p.requires_grad)


# --- timm basics ----------------------------------------------------------------------------------

def test_timm_basics():
    torch.manual_seed(0)
    model = timm.create_model('t2t_vit_7', **SMALL).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = _logits(model, x)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (2, 5, 256)
        assert torch.equal(model.forward_head(feats), ref)
        assert torch.equal(model.forward_head(feats, pre_logits=True), feats[:, 0])
    pooled = timm.create_model('t2t_vit_7', img_size=32, num_classes=0)
    pooled.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith('head.')})
    assert torch.equal(_logits(pooled, x), feats[:, 0])
    model.reset_classifier(3)
    assert _logits(model, x).shape == (2, 3)
    dyn = timm.create_model('t2t_vit_7', dynamic_img_size=True, **SMALL)
    dyn.load_state_dict(pooled.state_dict(), strict=False)
    dyn.reset_classifier(0)
    assert torch.equal(_logits(dyn, x), feats[:, 0])
    assert _logits(dyn, torch.randn(1, 3, 48, 64)).shape == (1, 256)
    with pytest.raises(AssertionError, match='img_size'):
        model(torch.randn(1, 3, 48, 48))
    final, inter = pooled.eval().forward_intermediates(x, indices=[0, 6])
    assert torch.equal(final, feats) and [t.shape for t in inter] == [(2, 256, 2, 2)] * 2
    pooled.set_input_size(48)  # a 3x3 grid: the table resampled by timm
    assert pooled.pos_embed.shape == (1, 10, 256) and not pooled.pos_embed.requires_grad
    assert _logits(pooled, torch.randn(1, 3, 48, 48)).shape == (1, 256)
    eager = timm.create_model('t2t_vit_7', **SMALL).eval()
    torch.testing.assert_close(torch.jit.script(eager)(x), _logits(eager, x), rtol=1e-5, atol=1e-6)


def test_macs_beside_the_readme():
    """bvit.flops at 224 px (one image), the Performer's einsums and the token transformer's
    3136-token attention included: 1.147 / 6.089 GMACs beside the README's 1.1G / 6.1G."""
    from bvit.flops import T2T_README_GMACS, count_flops
    for name, flops in (('t2t_vit_7', 2_293_727_232), ('t2t_vit_t_14', 12_177_443_840)):
        assert count_flops(timm.create_model(name), 224) == flops
        assert abs(flops / 2e9 - T2T_README_GMACS[name]) < 0.05


TRAIN = ['--data-set', 'DIGITS', '--input-size', '32', '--batch-size', '16', '--val-subset', '16', '--num_workers', '0',
         '--threads', '1', '--print-freq', '1000']


def test_train_hp_epoch_with_broad_then_eval_resume(tmp_path):
    """One train_hp.py epoch of --arch t2t_vit_7 --broad on the demo digits at 32 px (a 2x2 token
    grid), then --eval --resume of its checkpoint: the same top-1 and loss as its last evaluation."""
    import train_hp
    out = tmp_path / 'run'
    argv = TRAIN + ['--arch', 't2t_vit_7', '--broad', '--epochs', '1', '--train-subset', '64', '--warmup-epochs', '0',
                    '--output_dir', str(out)]
    assert train_hp.cli(argv) == 0
    ckpt = torch.load(out / 'checkpoint.pth', weights_only=True)
    assert ckpt['args']['arch'] == 't2t_vit_7' and ckpt['args']['broad'] is True and ckpt['epoch'] == 0
    stats = train_hp.main(train_hp.parse_args(TRAIN + ['--arch', 't2t_vit_7', '--broad', '--eval', '--resume',
                                                       str(out / 'checkpoint.pth')]))
    model = add_broad_attention(timm.create_model('t2t_vit_7', **SMALL), 0.4)
    model.load_state_dict(ckpt['model'])
    from datasets import build_dataset
    val, _ = build_dataset(False, train_hp.parse_args(TRAIN))
    images = torch.stack([val[i][0] for i in range(16)])
    targets = torch.tensor([val[i][1] for i in range(16)])
    logits = _logits(model, images)
    assert stats['images'] == 16
    assert stats['acc1'] == pytest.approx(100.0 * (logits.argmax(1) == targets).float().mean().item())
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)


def test_train_hp_eval_resume_of_an_authors_file(tmp_path):
    import train_hp
    torch.manual_seed(0)
    src, ema = timm.create_model('t2t_vit_7', **SMALL), timm.create_model('t2t_vit_7', **SMALL)
    path = str(authors_file(tmp_path / 'release.pth.tar', src, ema))
    bare = tmp_path / 'bare.pth'
    for flag, model in (([], src), (['--eval-ema'], ema)):
        torch.save(model.state_dict(), bare)
        base = TRAIN + ['--arch', 't2t_vit_7', '--eval', '--resume']
        got = train_hp.main(train_hp.parse_args(base + [path] + flag))
        want = train_hp.main(train_hp.parse_args(base + [str(bare)]))
        assert (got['loss'], got['acc1']) == (want['loss'], want['acc1'])


def test_export_of_an_authors_file(tmp_path, capsys):
    pytest.importorskip('onnxruntime')
    from bvit import export as E
    torch.manual_seed(0)
    src = timm.create_model('t2t_vit_7', **SMALL).eval()
    path = authors_file(tmp_path / 'release.pth.tar', src)
    assert E.main([str(path), str(tmp_path / 'out')]) == 0
    assert 'exported t2t_vit_7 (10 classes, 3x32x32 input)' in capsys.readouterr().out
    reloaded = timm.create_model(f'local-dir:{tmp_path / "out"}', pretrained=True)
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(_logits(reloaded, x), _logits(src, x))


def test_imagenet_config_is_the_t2t_recipe():
    import train_hp
    repo = Path(__file__).resolve().parents[1]
    a = train_hp.parse_args(['--config', str(repo / 'configs' / 't2t_vit_14_imagenet.yaml'), '--data-path', '.'])
    assert (a.arch, a.broad, a.broad_scale, a.input_size, a.batch_size, a.lr, a.weight_decay) == (
        't2t_vit_14', True, 0.4, 224, 64, 5e-4, 0.05)
    assert (a.opt, a.opt_eps, a.clip_grad, a.sched, a.warmup_epochs, a.warmup_lr, a.min_lr, a.epochs) == (
        'adamw', 1e-8, None, 'cosine', 10, 1e-6, 1e-5, 300)
    assert (a.drop_path, a.mixup, a.cutmix, a.smoothing, a.reprob, a.model_ema, a.model_ema_decay, a.amp,
            a.repeated_aug, a.train_interpolation, a.eval_crop_ratio) == (
        0.1, 0.8, 1.0, 0.1, 0.25, True, 0.99996, True, False, 'random', 0.9)
