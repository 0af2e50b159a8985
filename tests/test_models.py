"""Tests of the model package: faithfulness to the release, conventions, attention maps."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import timm

import bvit.models as M
import bvit.checkpoint as C
from bvit.layers import broad_attention
from bvit.flops import count_flops, count_params

FIXTURE = Path(__file__).parent / 'fixtures' / 'official_bvit_5m_golden.pt'


@pytest.fixture(scope='module')
def golden():
    d = torch.load(FIXTURE, weights_only=True)
    d['state_dict'] = {k: v.float() for k, v in d['state_dict'].items()}
    d['input'] = d['input'].float()
    return d


def tiny(**kw):
    args = dict(img_size=32, patch_size=4, depth=3, num_classes=10)
    args.update(kw)
    return timm.create_model('bvit_5m', **args)


def released_forward(sd: dict, x: torch.Tensor, heads: int, dim_head: int = 64, p: int = 16) -> torch.Tensor:
    """The released model's forward, written from shared/bvit-reference.md on the released keys
    alone (no code of this package), to check the converter and the model independently."""
    x = F.conv2d(x, sd['conv.weight'], sd['conv.bias'], stride=2, padding=3)
    b, c, h, w = x.shape
    # 'b c (h p1) (w p2) -> b (h w) (p1 p2 c)'
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)
    x = F.linear(x, sd['to_patch_embedding.1.weight'], sd['to_patch_embedding.1.bias'])
    dim = x.shape[-1]
    x = torch.cat([sd['cls_token'].expand(b, -1, -1), x], 1)
    n = x.shape[1]
    x = x + sd['pos_embedding'][:, :n]
    qs, ks, vs = [], [], []
    depth = 1 + max(int(k.split('.')[2]) for k in sd if k.startswith('transformer.layers.'))
    for i in range(depth):
        pre = f'transformer.layers.{i}.'
        y = F.layer_norm(x, (dim,), sd[pre + '0.norm.weight'], sd[pre + '0.norm.bias'], eps=1e-5)
        q, k, v = F.linear(y, sd[pre + '0.fn.to_qkv.weight']).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, n, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        attn = (q @ k.transpose(-1, -2) * dim_head ** -0.5).softmax(-1)
        o = (attn @ v).transpose(1, 2).reshape(b, n, heads * dim_head)
        x = x + F.linear(o, sd[pre + '0.fn.to_out.0.weight'], sd[pre + '0.fn.to_out.0.bias'])
        y = F.layer_norm(x, (dim,), sd[pre + '1.norm.weight'], sd[pre + '1.norm.bias'], eps=1e-5)
        y = F.gelu(F.linear(y, sd[pre + '1.fn.net.0.weight'], sd[pre + '1.fn.net.0.bias']))
        x = x + F.linear(y, sd[pre + '1.fn.net.3.weight'], sd[pre + '1.fn.net.3.bias'])
        qs.append(q), ks.append(k), vs.append(v)
    Q, K, V = torch.cat(qs, -1), torch.cat(ks, -1), torch.cat(vs, -1)
    O = ((Q @ K.transpose(-1, -2)) * dim_head ** -0.5).softmax(-1) @ V          # (b, h, n, L*d)
    O = O.transpose(1, 2).reshape(b, n, -1)                                      # h, then l, then j
    x = x + 0.4 * F.adaptive_avg_pool1d(O, dim)
    cls = F.layer_norm(x[:, 0], (dim,), sd['mlp_head.0.weight'], sd['mlp_head.0.bias'], eps=1e-5)
    return F.linear(cls, sd['mlp_head.1.weight'], sd['mlp_head.1.bias'])


def to_released(model: M.BViT) -> dict:
    """Our state dict in the released key layout (the inverse of the converter), for a 22M check."""
    out = {}
    p = model.patch_size
    for key, value in model.state_dict().items():
        if key == 'patch_embed.weight':
            value = value.permute(0, 2, 3, 1).reshape(value.shape[0], p * p * value.shape[1])
        for pattern, repl in [
            (r'^stem\.', 'conv.'), (r'^patch_embed\.', 'to_patch_embedding.1.'), (r'^pos_embed$', 'pos_embedding'),
            (r'^blocks\.(\d+)\.norm1\.', r'transformer.layers.\1.0.norm.'),
            (r'^blocks\.(\d+)\.attn\.qkv\.', r'transformer.layers.\1.0.fn.to_qkv.'),
            (r'^blocks\.(\d+)\.attn\.proj\.', r'transformer.layers.\1.0.fn.to_out.0.'),
            (r'^blocks\.(\d+)\.norm2\.', r'transformer.layers.\1.1.norm.'),
            (r'^blocks\.(\d+)\.mlp\.fc1\.', r'transformer.layers.\1.1.fn.net.0.'),
            (r'^blocks\.(\d+)\.mlp\.fc2\.', r'transformer.layers.\1.1.fn.net.3.'),
            (r'^norm\.', 'mlp_head.0.'), (r'^head\.', 'mlp_head.1.')]:
            import re
            new = re.sub(pattern, repl, key)
            if new != key:
                key = new
                break
        out[key] = value.clone()
    return out


# --- faithfulness to the release ------------------------------------------------------------------

def test_golden_fixture_logits(golden):
    model = timm.create_model('bvit_5m').eval()
    assert count_params(model) == golden['num_params'] == 5_710_948
    model.load_state_dict(M.convert_official_state_dict(golden['state_dict']))
    with torch.no_grad():
        logits = model(golden['input'])
        dense = model.forward_head(model.forward_features(golden['input']))
    assert (logits - golden['logits']).abs().max() < 1e-4
    assert (dense - golden['logits']).abs().max() < 1e-4


def test_reference_forward_reproduces_golden(golden):
    """The test's own reference implementation agrees with the fixture, so it can judge the 22M model."""
    with torch.no_grad():
        logits = released_forward(golden['state_dict'], golden['input'], heads=3)
    assert (logits - golden['logits']).abs().max() < 1e-4


def test_22m_released_layout_matches_reference():
    torch.manual_seed(0)
    src = timm.create_model('bvit_22m').eval()
    assert count_params(src) == 22_037_284
    for p in src.parameters():  # make every parameter matter, as in the golden fixture
        torch.nn.init.normal_(p, std=0.05)
    released = to_released(src)
    model = timm.create_model('bvit_22m').eval()
    model.load_state_dict(M.convert_official_state_dict(C.unwrap_state_dict({'state_dict': {'model.' + k: v for k, v in released.items()}})))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = released_forward(released, x, heads=6)
        assert (model(x) - ref).abs().max() < 1e-4
        assert (model.forward_head(model.forward_features(x)) - ref).abs().max() < 1e-4


@pytest.mark.parametrize('wrap', [
    lambda sd: sd,
    lambda sd: {'model': sd},
    lambda sd: {'state_dict': {'model.' + k: v for k, v in sd.items()}},
    lambda sd: {'model': {'module.' + k: v for k, v in sd.items()}},
    lambda sd: {'module._orig_mod.' + k: v for k, v in sd.items()},
])
def test_checkpoint_containers_and_prefixes(golden, wrap, tmp_path):
    model = timm.create_model('bvit_5m').eval()
    path = tmp_path / 'w.pth'
    torch.save(wrap(golden['state_dict']), path)
    C.load_checkpoint(model, path)
    with torch.no_grad():
        assert (model(golden['input']) - golden['logits']).abs().max() < 1e-4


def test_model_ema_is_used_when_asked(tmp_path):
    model = tiny()
    other = tiny()
    path = tmp_path / 'ck.pth'
    torch.save({'model': model.state_dict(), 'model_ema': other.state_dict()}, path)
    target = tiny()
    C.load_checkpoint(target, path, use_ema=True)
    assert torch.equal(target.head.weight, other.head.weight)
    C.load_checkpoint(target, path)
    assert torch.equal(target.head.weight, model.head.weight)
    torch.save({'model': model.state_dict()}, path)
    with pytest.raises(ValueError, match='model_ema'):
        C.load_checkpoint(target, path, use_ema=True)


def test_wrong_model_names_key_and_shapes(golden):
    model = timm.create_model('bvit_22m')
    with pytest.raises(ValueError, match=r"'cls_token' has shape \(1, 1, 192\) in the checkpoint but \(1, 1, 384\)"):
        C.check_state_dict(model, M.convert_official_state_dict(golden['state_dict']))
    sd = M.convert_official_state_dict(golden['state_dict'])
    sd.pop('blocks.3.attn.qkv.weight')
    with pytest.raises(ValueError, match="'blocks.3.attn.qkv.weight'.*missing"):
        C.check_state_dict(timm.create_model('bvit_5m'), sd)
    sd = M.convert_official_state_dict(golden['state_dict'])
    sd['extra.weight'] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected key 'extra.weight'"):
        C.check_state_dict(timm.create_model('bvit_5m'), sd)


def test_bad_checkpoint_files(tmp_path, golden):
    model = tiny()
    with pytest.raises(FileNotFoundError, match='not found'):
        C.load_checkpoint(model, tmp_path / 'missing.pth')
    good = tmp_path / 'good.pth'
    torch.save({'model': model.state_dict()}, good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:1000])
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint\n')
    for bad in (truncated, text):
        with pytest.raises(ValueError, match='not a readable PyTorch checkpoint'):
            C.load_checkpoint(model, bad)
    torch.save({'epoch': 3}, tmp_path / 'nostate.pth')
    with pytest.raises(ValueError, match='no model state dict'):
        C.load_checkpoint(model, tmp_path / 'nostate.pth')


def test_arbitrary_pickles_are_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('unpickled!',))
    path = tmp_path / 'evil.pth'
    torch.save({'model': Evil()}, path)
    with pytest.raises(ValueError, match='not a readable'):
        C.read_checkpoint(path)


# --- broad attention ------------------------------------------------------------------------------

def explicit_broad(q, k, v, out_dim, scale):
    Q, K, V = torch.cat(q, -1), torch.cat(k, -1), torch.cat(v, -1)
    O = (Q @ K.transpose(-1, -2) * scale).softmax(-1) @ V
    return F.adaptive_avg_pool1d(O.transpose(1, 2).flatten(2), out_dim)


# (2, 4, 6, 12): groups of 4 that straddle layers (6 channels each), as the released 12 over 64 do.
@pytest.mark.parametrize('heads,layers,head_dim,out_dim', [(3, 12, 64, 192), (2, 3, 8, 16), (2, 4, 6, 12), (4, 2, 4, 16)])
def test_broad_attention_matches_explicit(heads, layers, head_dim, out_dim):
    torch.manual_seed(0)
    mk = lambda n: [torch.randn(2, heads, n, head_dim, dtype=torch.float64) for _ in range(layers)]
    q, k, v = mk(9), mk(9), mk(9)
    scale = head_dim ** -0.5
    ref = explicit_broad(q, k, v, out_dim, scale)
    assert torch.allclose(broad_attention(q, k, v, out_dim), ref, atol=1e-10)
    cls = broad_attention([t[:, :, :1] for t in q], k, v, out_dim)
    assert torch.allclose(cls, ref[:, :1], atol=1e-10)


def test_broad_attention_refuses_groups_it_cannot_pool():
    mk = lambda: [torch.randn(1, 2, 3, 6) for _ in range(5)]
    with pytest.raises(ValueError, match='60 values to 7'):
        broad_attention(mk(), mk(), mk(), 7)


@pytest.mark.parametrize('rows', [1, 4])
def test_broad_attention_gradcheck(rows):
    torch.manual_seed(0)
    mk = lambda n: [torch.randn(2, 2, n, 6, dtype=torch.float64, requires_grad=True) for _ in range(4)]
    q, k, v = mk(rows), mk(4), mk(4)
    assert torch.autograd.gradcheck(lambda *t: broad_attention(t[:4], t[4:8], t[8:], 12), (*q, *k, *v))


def test_broad_attention_mask():
    torch.manual_seed(0)
    q, k, v = ([torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3)] for _ in range(3))
    zero = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    assert torch.allclose(broad_attention(q, k, v, 12, attn_mask=zero), broad_attention(q, k, v, 12), atol=1e-12)
    keep = torch.ones(5, 5, dtype=torch.bool)
    keep[:, 3] = False  # no row may look at token 3
    Q, K, V = torch.cat(q, -1), torch.cat(k, -1), torch.cat(v, -1)
    logits = (Q @ K.transpose(-1, -2) * 0.5).masked_fill(~keep, float('-inf'))
    ref = F.adaptive_avg_pool1d((logits.softmax(-1) @ V).transpose(1, 2).flatten(2), 12)
    assert torch.allclose(broad_attention(q, k, v, 12, attn_mask=keep), ref, atol=1e-12)


def test_attention_maps_properties():
    torch.manual_seed(0)
    model = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model.attention_maps(x)
        outs = []
        hooks = [blk.attn.qkv.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in model.blocks]
        x_last = model._run_blocks(model._embed(x), None)[0]
        for h in hooks:
            h.remove()
        qs, ks, vs = zip(*(o.reshape(2, -1, 3, 3, 64).permute(2, 0, 3, 1, 4) for o in outs))
    n = model.num_patches + 1
    assert len(maps.layers) == 3 and maps.grid_size == (4, 4)
    for a in maps.layers + [maps.broad]:
        assert a.shape == (2, 3, n, n)
        assert torch.allclose(a.sum(-1), torch.ones(2, 3, n), atol=1e-5)
    scale = 64 ** -0.5
    summed = sum(q @ k.transpose(-1, -2) for q, k in zip(qs, ks)) * scale
    assert torch.allclose(maps.broad, summed.softmax(-1), atol=1e-6)
    for a, q, k in zip(maps.layers, qs, ks):
        assert torch.allclose(a, (q @ k.transpose(-1, -2) * scale).softmax(-1), atol=1e-6)
    # The fused forward equals an explicit one built from the broad map.
    with torch.no_grad():
        o = (maps.broad @ torch.cat(vs, -1)).transpose(1, 2).flatten(2)
        explicit = model.norm(x_last + 0.4 * F.adaptive_avg_pool1d(o, model.embed_dim))
        assert torch.allclose(model.forward_features(x), explicit, atol=1e-5)


def test_fast_path_equals_full_path():
    torch.manual_seed(0)
    for stem in ('conv', 'none'):
        model = tiny(stem=stem).eval()
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            assert torch.allclose(model(x), model.forward_head(model.forward_features(x)), atol=1e-5)


def test_broad_false_twin_and_scale():
    torch.manual_seed(0)
    model = tiny()
    twin = tiny(broad=False)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in twin.state_dict().items()}
    twin.load_state_dict(model.state_dict())
    zero = tiny(broad_scale=0.)
    zero.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for m in (model, twin, zero):
        m.eval()
    with torch.no_grad():
        assert torch.equal(twin(x), zero(x))
        assert not torch.allclose(twin(x), model(x))
    # no broad path: the twin never touches the broad attention
    import bvit.layers as layers
    calls = []
    saved = {}
    targets = [(layers, 'broad_logits'), (layers, 'broad_output')]
    for owner, name in targets:
        saved[owner, name] = orig = getattr(owner, name)
        setattr(owner, name, lambda *a, _orig=orig, **k: calls.append(1) or _orig(*a, **k))
    try:
        with torch.no_grad():
            twin(x), twin.forward_features(x)
            assert not calls
            model(x)
            assert calls
    finally:
        for (owner, name), fn in saved.items():
            setattr(owner, name, fn)


# --- conventions, shapes, gradients ---------------------------------------------------------------

@pytest.mark.parametrize('kw,grid', [
    (dict(img_size=32, patch_size=4, stem='conv'), (4, 4)),
    (dict(img_size=32, patch_size=4, stem='none'), (8, 8)),
    (dict(img_size=64, patch_size=8, stem='conv'), (4, 4)),
    (dict(img_size=(32, 64), patch_size=8, stem='none'), (4, 8)),
    (dict(img_size=(32, 48), patch_size=4, stem='conv'), (4, 6)),
])
def test_other_sizes(kw, grid):
    model = timm.create_model('bvit_5m', depth=2, num_classes=7, **kw).eval()
    h, w = M._pair(kw['img_size'])
    x = torch.randn(2, 3, h, w)
    assert model.grid_size == grid
    with torch.no_grad():
        assert model(x).shape == (2, 7)
        assert model.forward_features(x).shape == (2, grid[0] * grid[1] + 1, 192)
        assert model.attention_maps(x).broad.shape == (2, 3, grid[0] * grid[1] + 1, grid[0] * grid[1] + 1)


def test_bad_inputs_name_expected_size():
    model = tiny()
    with pytest.raises(ValueError, match=r'\(B, 3, 32, 32\)'):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match=r'\(B, 3, 32, 32\)'):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match='not divisible by patch size'):
        timm.create_model('bvit_5m', img_size=40, patch_size=16)
    with pytest.raises(ValueError, match='stem'):
        tiny(stem='resnet')


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for kw in (dict(), dict(drop_path_rate=0.1, drop_rate=0.1)):
        model = tiny(**kw).train()
        model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_grad_checkpointing_same_result():
    torch.manual_seed(0)
    a, b = tiny(), tiny()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-5), n


def test_timm_conventions():
    model = timm.create_model('bvit_22m', num_classes=0, img_size=32, patch_size=4, depth=2)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 384)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 384)
    model.reset_classifier(3, global_pool='avg')
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        assert torch.allclose(model(x), model.head(feats[:, 1:].mean(1)), atol=1e-6)
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    cfg = model.pretrained_cfg
    assert cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.875
    assert tuple(cfg['mean']) == timm.data.IMAGENET_DEFAULT_MEAN and tuple(cfg['std']) == timm.data.IMAGENET_DEFAULT_STD
    assert timm.is_model('bvit_5m') and timm.is_model('bvit_22m')
    m = timm.create_model('bvit_5m', in_chans=1, img_size=32, patch_size=4, depth=1, drop_rate=0.1,
                          drop_path_rate=0.1, broad_scale=0.2)
    assert m(torch.randn(1, 1, 32, 32)).shape == (1, 1000) and m.broad_scale == 0.2


def test_timm_pretrained_file_loads_released_weights(golden, tmp_path):
    path = tmp_path / 'released.pth'
    torch.save(golden['state_dict'], path)
    model = timm.create_model('bvit_5m', pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        assert (model(golden['input']) - golden['logits']).abs().max() < 1e-4


@pytest.mark.parametrize('name', ['BViT-5', 'bvit_5', 'BVIT_5M', 'bvit_5m'])
def test_resolve_arch_5m(name):
    assert M.resolve_arch(name) == 'bvit_5m'


@pytest.mark.parametrize('name', ['BViT-22', 'BViT-21', 'BViT_21', 'bvit_22m', 'BVIT_22M'])
def test_resolve_arch_22m(name):
    assert M.resolve_arch(name) == 'bvit_22m'


def test_resolve_arch_unknown_lists_names():
    with pytest.raises(ValueError, match='BViT-5.*bvit_22m'):
        M.resolve_arch('BViT-100')


def test_resample_pos_embed():
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 4 * 6 + 5, 8)  # 4x6 grid used, 5 unused rows (as the release's stem leaves)
    same = M.resample_pos_embed(pe, (4, 6), (4, 6))
    assert torch.equal(same, pe[:, :25])
    assert M.resample_pos_embed(pe, (4, 6), (4, 6), num_rows=pe.shape[1]) is pe
    big = M.resample_pos_embed(pe, (4, 6), (8, 3), num_rows=40)
    assert big.shape == (1, 40, 8)
    assert torch.equal(big[:, :1], pe[:, :1])  # class token kept
    assert torch.equal(big[:, 25:], torch.zeros(1, 15, 8))
    # a constant grid stays constant: interpolation, not reshuffling
    flat = torch.cat([pe[:, :1], torch.ones(1, 24, 8)], 1)
    assert torch.allclose(M.resample_pos_embed(flat, (4, 6), (6, 4))[:, 1:], torch.ones(1, 24, 8), atol=1e-5)
    with pytest.raises(ValueError, match='rows'):
        M.resample_pos_embed(pe, (8, 8), (4, 4))


# --- cost -----------------------------------------------------------------------------------------

def test_parameter_counts_of_released_configs():
    assert count_params(timm.create_model('bvit_5m')) == 5_710_948
    assert count_params(timm.create_model('bvit_22m')) == 22_037_284


def test_flop_counter_counts_attention():
    model = timm.create_model('bvit_5m', stem='none', broad=False)
    deit = timm.create_model('deit_tiny_patch16_224')
    f = count_flops(model)
    # analytic, 2 FLOPs per MAC: patch embedding, 12 blocks (qkv, attention, proj, MLP), head
    n, d = 197, 192
    block = 2 * (n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * 4 * d)
    analytic = 2 * 196 * 768 * d + 12 * block + 2 * d * 1000
    assert abs(f - analytic) / analytic < 1e-3
    assert abs(f - count_flops(deit)) / f < 1e-3
    assert count_flops(timm.create_model('bvit_5m', stem='none')) > f


def test_inference_keeps_no_layer_inputs_alive():
    """Inference with broad attention peaks within 1.5 attention inputs (B, N, D) of its twin: the
    layers' pooled values (12 layers x 3 heads x 6 of 64 columns, 1.1 inputs) are all it keeps,
    since each block's attention turns its q, k, v into its terms at once. Keeping the 12 layers'
    keys and values to the end instead would add 24."""
    from bvit.benchmark import _inference, peak_memory_mb
    torch.manual_seed(0)
    x = torch.randn(4, 3, 224, 224)
    model = M.bvit_5m(stem='none').eval()
    twin = M.bvit_5m(stem='none', broad=False).eval()
    peaks = []
    for m in (model, twin):
        step = _inference(m, x)
        step()
        peaks.append(peak_memory_mb(step, torch.device('cpu')))
    one_y = 4 * 197 * 192 * 4 / 2 ** 20
    assert 0 < peaks[0] - peaks[1] < 1.5 * one_y, peaks


def test_broad_head_costs_at_most_4_operations_a_layer_in_inference_and_10_in_training():
    """Broad attention adds few, large operations: counted on bvit_5m as released (conv stem,
    batch 4 at 224) against its broad=False twin, per layer, in inference and in a forward and
    backward pass (docs/benchmarks.md has the counts)."""
    from bvit.benchmark import broad_ops
    ops = broad_ops('bvit_5m', {}, 4, 224)
    extra = {mode: (broad - twin) / 12 for mode, (broad, twin) in ops.items()}
    assert 0 < extra['infer'] <= 4 and 0 < extra['fwd+bwd'] <= 10, ops


@pytest.mark.parametrize('broad_layers', [None, 3, [0, 5, -1], [2]])
def test_broad_layers_is_the_definition_on_those_layers(broad_layers):
    """broad_layers picks the blocks that feed the broad attention (None: all, as released; k: the
    last k; a list: those indices): the output is broad_attention on those blocks' q, k, v."""
    torch.manual_seed(0)
    model = M.bvit_5m(stem='none', img_size=32, patch_size=8, num_classes=3, broad_layers=broad_layers).eval()
    chosen = {'None': list(range(12)), '3': [9, 10, 11], '[0, 5, -1]': [0, 5, 11], '[2]': [2]}[str(broad_layers)]
    assert model.broad_layers == chosen
    x = torch.randn(2, 3, 32, 32)
    qkv = []
    hooks = [b.attn.qkv.register_forward_hook(lambda mod, i, o: qkv.append(o)) for b in model.blocks]
    with torch.no_grad():
        got = model.forward_broad(x)
    for h in hooks:
        h.remove()
    parts = [o.reshape(2, got.shape[1], 3, model.num_heads, model.head_dim).permute(2, 0, 3, 1, 4) for o in qkv]
    want = broad_attention(*([parts[i][j] for i in chosen] for j in range(3)), model.embed_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        features = model.forward_features(x)
        assert torch.allclose(model(x), model.forward_head(features), atol=1e-5)


@pytest.mark.parametrize('bad', [0, 13, [12], [], [-13]])
def test_broad_layers_outside_the_blocks_are_refused(bad):
    with pytest.raises(ValueError, match='broad_layers='):
        M.bvit_5m(stem='none', img_size=32, patch_size=8, broad_layers=bad)
