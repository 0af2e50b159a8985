"""Tests of bvit.broad: BViT's broad attention added to timm ViT / DeiT / Swin models.

All models are tiny and randomly initialised (pretrained=False, no downloads), CPU only.
"""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
import timm
from timm.models.vision_transformer import ParallelScalingBlock, VisionTransformer

from bvit.broad import (
    BroadAttention, BroadSwinTransformer, BroadWindowAttention, add_broad_attention,
    has_broad_attention, remove_broad_attention, set_broad_scale)
from bvit.layers import broad_attention


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def tiny_vit(**kwargs):
    args = dict(pretrained=False, depth=2, img_size=32, patch_size=8, num_classes=7)
    args.update(kwargs)
    return timm.create_model('vit_tiny_patch16_224', **args).eval()


def tiny_swin(img_size=64, window_size=4, **kwargs):
    args = dict(pretrained=False, img_size=img_size, window_size=window_size, embed_dim=16,
                depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), num_classes=7, drop_path_rate=0.)
    args.update(kwargs)
    return timm.create_model('swin_tiny_patch4_window7_224', **args).eval()


VIT_CONFIGS = {
    'token': dict(),
    'qkv_bias_qk_norm': dict(qkv_bias=True, qk_norm=True),
    'avg_no_class_token': dict(global_pool='avg', class_token=False),
    'registers': dict(reg_tokens=2),
    'registers_no_embed_class': dict(reg_tokens=1, no_embed_class=True, init_values=1e-2),
    'map_head': dict(global_pool='map'),
}


def vit_from_config(name):
    if name == 'distilled':
        return timm.create_model('deit_tiny_distilled_patch16_224', pretrained=False, depth=2, img_size=32,
                                 patch_size=8, num_classes=7).eval()
    return tiny_vit(**VIT_CONFIGS[name])


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ViT / DeiT --------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', [*VIT_CONFIGS, 'distilled'])
def test_vit_keys_params_unchanged_and_scale0_is_original(name):
    model = vit_from_config(name)
    ref = copy.deepcopy(model)
    keys = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    count = n_params(model)
    x = torch.randn(2, 3, 32, 32)

    out = add_broad_attention(model, scale=0.)
    assert out is model and has_broad_attention(model)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == keys
    assert n_params(model) == count
    model.load_state_dict(ref.state_dict())  # the original weights load as they are (strict)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
        set_broad_scale(model, 0.4)
        assert not torch.allclose(model(x), ref(x), atol=1e-4)  # the broad output does reach the logits


@pytest.mark.parametrize('name', [*VIT_CONFIGS, 'distilled'])
def test_vit_forward_is_forward_head_of_forward_features(name):
    """The class-token fast path computes the same logits as the full feature map."""
    model = add_broad_attention(vit_from_config(name), scale=0.4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_head(model.forward_features(x)), rtol=1e-5, atol=1e-5)


def explicit_vit(ref, x, scale, attn_mask=None):
    """Broad attention written out on an unconverted timm ViT: (features, logits)."""
    t = ref.norm_pre(ref.patch_drop(ref._pos_embed(ref.patch_embed(x))))
    B, N, D = t.shape
    qs, ks, vs = [], [], []
    for blk in ref.blocks:
        a = blk.attn
        qkv = a.qkv(blk.norm1(t)).reshape(B, N, 3, a.num_heads, a.head_dim)
        qs.append(a.q_norm(qkv[:, :, 0].transpose(1, 2)))
        ks.append(a.k_norm(qkv[:, :, 1].transpose(1, 2)))
        vs.append(qkv[:, :, 2].transpose(1, 2))
        t = blk(t, attn_mask=attn_mask)
    H, d, L = qs[0].shape[1], qs[0].shape[-1], len(qs)
    logits = sum(q @ k.transpose(-2, -1) for q, k in zip(qs, ks)) * d ** -0.5  # sum of every layer's logits
    if attn_mask is not None:
        logits = logits.masked_fill(~attn_mask, float('-inf'))
    probs = logits.softmax(-1)
    o = torch.stack([probs @ v for v in vs], dim=3)  # (B, H, N, L, d): index head, layer, channel
    o = o.permute(0, 2, 1, 3, 4).reshape(B, N, H * L * d)
    pooled = F.adaptive_avg_pool1d(o, D)
    feats = ref.norm(t + scale * pooled)
    return feats, ref.forward_head(feats)


@pytest.mark.parametrize('name', ['token', 'qkv_bias_qk_norm', 'avg_no_class_token', 'registers'])
def test_vit_two_layers_matches_explicit_broad_attention(name):
    model = vit_from_config(name)
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        feats, logits = explicit_vit(ref, x, 0.4)
        torch.testing.assert_close(model.forward_features(x), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x), logits, rtol=1e-5, atol=1e-5)


def test_vit_attention_mask_reaches_broad_attention():
    model = tiny_vit(depth=3)
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.7)
    x = torch.randn(2, 3, 32, 32)
    N = 1 + 16
    mask = torch.ones(2, 1, N, N, dtype=torch.bool)
    mask[0, :, :, 5:9] = False  # hide some keys of the first image
    with torch.no_grad():
        feats, logits = explicit_vit(ref, x, 0.7, attn_mask=mask)
        torch.testing.assert_close(model.forward_features(x, attn_mask=mask), feats, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, attn_mask=mask), logits, rtol=1e-5, atol=1e-5)


def test_vit_explicit_attention_path_is_exact():
    """With timm's non-fused attention path (fused_attn=False) the block outputs are unchanged too."""
    model = tiny_vit(qk_norm=True)
    for m in model.modules():
        if hasattr(m, 'fused_attn'):
            m.fused_attn = False
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        set_broad_scale(model, 0.4)
        torch.testing.assert_close(model(x), explicit_vit(ref, x, 0.4)[1], rtol=1e-5, atol=1e-5)


def assert_checkpointing_keeps_gradients(model: nn.Module, x: torch.Tensor) -> None:
    model.train()
    model(x).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.set_grad_checkpointing(True)
    model(x).square().sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)


def test_vit_gradient_checkpointing_same_gradients():
    assert_checkpointing_keeps_gradients(add_broad_attention(tiny_vit(depth=3), scale=0.4), torch.randn(2, 3, 32, 32))


def assert_same_gradients(model: nn.Module, ref: nn.Module, loss, ref_loss) -> None:
    """The gradients of ``loss`` (the model's) equal those of ``ref_loss`` (the written-out reference,
    computed with ``ref``, an unconverted copy with the same parameter names), and none is zero."""
    loss.backward()
    ref_loss.backward()
    ref_params = dict(ref.named_parameters())
    for n, p in model.named_parameters():
        # a 1x1 window's bias (one row) shifts a softmax over one key: no gradient. timm 1.0.26's
        # patch merging floors odd grids, so a 48-pixel Swin's last stage is one token there.
        one_key = n.endswith('relative_position_bias_table') and p.shape[0] == 1
        assert p.grad is not None and (one_key or p.grad.abs().sum() > 0), n
        torch.testing.assert_close(p.grad, ref_params[n].grad, rtol=1e-4, atol=1e-6, msg=n)


def test_vit_train_backward_matches_the_explicit_reference_for_every_parameter():
    model = tiny_vit(qkv_bias=True, qk_norm=True).train()
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.4)
    x = torch.randn(2, 3, 32, 32)
    assert_same_gradients(model, ref, model(x).logsumexp(-1).sum(), explicit_vit(ref, x, 0.4)[1].logsumexp(-1).sum())


def test_distilled_training_head():
    model = vit_from_config('distilled')
    add_broad_attention(model, scale=0.4)
    model.set_distilled_training(True)
    model.train()
    out = model(torch.randn(2, 3, 32, 32))
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 7)


def test_readd_deepcopy_pickle_and_remove():
    model = tiny_vit()
    ref = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    add_broad_attention(model, scale=0.4)
    add_broad_attention(model, scale=0.2)  # a second call only updates the scale
    assert model.broad_scale == 0.2
    assert sum(isinstance(m, BroadAttention) for m in model.modules()) == 2
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(copy.deepcopy(model)(x), y, rtol=0, atol=0)  # model EMA deep-copies
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        torch.testing.assert_close(torch.load(buf, weights_only=False)(x), y, rtol=0, atol=0)
        remove_broad_attention(model)
        assert type(model) is VisionTransformer and not has_broad_attention(model)
        assert not any(isinstance(m, BroadAttention) for m in model.modules())
        assert torch.equal(model(x), ref(x))


def test_bvit_model_switches_its_own_broad_attention_on():
    import bvit.models  # noqa: F401  (registers bvit_5m)
    model = timm.create_model('bvit_5m', pretrained=False, depth=2, broad=False, num_classes=3)
    assert add_broad_attention(model, scale=0.3) is model
    assert model.broad and model.broad_scale == 0.3 and has_broad_attention(model)


# Swin Transformer ---------------------------------------------------------------------------------

def test_swin_224_window7_forward_backward():
    model = tiny_swin(img_size=224, window_size=7, embed_dim=24, num_heads=(1, 2, 4, 8))
    ref = copy.deepcopy(model)
    keys = list(model.state_dict())
    count = n_params(model)
    add_broad_attention(model, scale=0.)
    assert isinstance(model, BroadSwinTransformer)
    assert list(model.state_dict()) == keys and n_params(model) == count
    assert [tuple(b.shift_size) for b in model.layers[0].blocks] == [(0, 0), (3, 3)]
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    model.broad_scale = 0.4
    model.train()
    ref.train()
    out = model(x)
    assert out.shape == (1, 7) and torch.isfinite(out).all()
    assert_same_gradients(model, ref, out.sum(), explicit_swin(ref, x, 0.4).sum())


@pytest.mark.parametrize('img_size,window_size', [(64, 4), (48, 5)])  # (48, 5): padded, shifted windows
def test_swin_small_scale0_and_forward_backward(img_size, window_size):
    model = tiny_swin(img_size, window_size, depths=(2, 3, 2, 2))
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.)
    model.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert torch.equal(model.forward_features(x), ref.forward_features(x))
    for m in (model, ref):  # timm's fused window attention path too
        for mod in m.modules():
            if isinstance(mod, BroadWindowAttention) or hasattr(mod, 'relative_position_bias_table'):
                mod.fused_attn = True
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    model.broad_scale = 0.4
    model.train()
    ref.train()
    assert_same_gradients(model, ref, model(x).square().sum(), explicit_swin(ref, x, 0.4).square().sum())


def _window_split(t, ws):
    """(B, Hp, Wp, C) -> (B·nW, ws0·ws1, C), windows row-major, batch first."""
    B, Hp, Wp, C = t.shape
    t = t.reshape(B, Hp // ws[0], ws[0], Wp // ws[1], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(-1, ws[0] * ws[1], C)


def _window_merge(t, ws, B, Hp, Wp):
    C = t.shape[-1]
    t = t.reshape(B, Hp // ws[0], Wp // ws[1], ws[0], ws[1], C).permute(0, 1, 3, 2, 4, 5)
    return t.reshape(B, Hp, Wp, C)


def explicit_swin_stage(stage, x, scale, rel_pos_bias):
    """Broad attention of one unconverted Swin stage, written out: q, k, v of every block computed
    on the unshifted token grid, one regular window partition, summed logits (+ summed bias)."""
    x = stage.downsample(x)
    B, H, W, C = x.shape
    ws = tuple(stage.blocks[0].window_size)
    Hp, Wp = -(-H // ws[0]) * ws[0], -(-W // ws[1]) * ws[1]
    N = ws[0] * ws[1]
    logits, vs = 0., []
    for blk in stage.blocks:
        a = blk.attn
        h = a.num_heads
        qkv = F.pad(a.qkv(blk.norm1(x)), (0, 0, 0, Wp - W, 0, Hp - H))
        qkv = _window_split(qkv, ws).reshape(-1, N, 3, h, qkv.shape[-1] // (3 * h))
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
        logits = logits + q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if rel_pos_bias:
            bias = a.relative_position_bias_table[a.relative_position_index.reshape(-1)].reshape(N, N, h)
            logits = logits + bias.permute(2, 0, 1)
        vs.append(v)
        x = blk(x)
    valid = _window_split(F.pad(torch.ones(1, H, W, 1), (0, 0, 0, Wp - W, 0, Hp - H)), ws)[..., 0] > 0  # (nW, N)
    logits = logits.reshape(B, -1, h, N, N).masked_fill(~valid[None, :, None, None, :], float('-inf'))
    probs = logits.reshape(-1, h, N, N).softmax(-1)
    o = torch.stack([probs @ v for v in vs], dim=3)  # (B·nW, h, N, L, d)
    o = o.permute(0, 2, 1, 3, 4).reshape(o.shape[0], N, -1)
    broad = _window_merge(F.adaptive_avg_pool1d(o, C), ws, B, Hp, Wp)[:, :H, :W]
    return x + scale * broad


def explicit_swin(ref, x, scale):
    """Logits of an unconverted Swin with broad attention written out stage by stage."""
    t = ref.patch_embed(x)
    for stage in ref.layers:
        t = explicit_swin_stage(stage, t, scale, rel_pos_bias=True)
    return ref.forward_head(ref.norm(t))


@pytest.mark.parametrize('rel_pos_bias', [True, False])
@pytest.mark.parametrize('img_size,window_size', [(64, 4), (48, 5)])
def test_swin_stage_matches_explicit_broad_attention(img_size, window_size, rel_pos_bias):
    model = tiny_swin(img_size, window_size, depths=(2, 3, 2, 2))
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.4, swin_rel_pos_bias=rel_pos_bias)
    x = torch.randn(2, 3, img_size, img_size)
    with torch.no_grad():
        t = t_ref = ref.patch_embed(x)
        for stage, stage_ref in zip(model.layers, ref.layers):
            t = stage(t_ref)
            expected = explicit_swin_stage(stage_ref, t_ref, 0.4, rel_pos_bias)
            torch.testing.assert_close(t, expected, rtol=1e-5, atol=1e-5)
            t_ref = expected


def test_swin_gradient_checkpointing_same_gradients():
    assert_checkpointing_keeps_gradients(add_broad_attention(tiny_swin(48, 5), scale=0.4), torch.randn(2, 3, 48, 48))


def test_swin_remove_restores_original():
    model = tiny_swin()
    ref = copy.deepcopy(model)
    add_broad_attention(model, scale=0.4)
    remove_broad_attention(model)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    assert not any(isinstance(m, BroadWindowAttention) for m in model.modules())


# Unsupported models --------------------------------------------------------------------------------

@pytest.mark.parametrize('make', [
    lambda: timm.create_model('resnet18', pretrained=False, num_classes=3),
    lambda: nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten()),
    lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2,
                              block_fn=ParallelScalingBlock),
], ids=['resnet18', 'sequential', 'vit_parallel_blocks'])
def test_unsupported_model_raises_type_error(make):
    model = make()
    keys = list(model.state_dict())
    with pytest.raises(TypeError, match='VisionTransformer.*SwinTransformer'):
        add_broad_attention(model)
    assert list(model.state_dict()) == keys and not has_broad_attention(model)
