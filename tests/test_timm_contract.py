"""BViT as a timm model: features, intermediates, dynamic size, pooling, script/FX/export, and the
equality of every path the forward can take (fast class row, streamed class row, module path).

Both registered models are checked, at a small input (64 px) so the suite stays fast; depth,
width and heads are the real ones. Tolerances are those timm's own tests use for its ViTs
(eager vs scripted/traced: 1e-5).
"""
import copy

import pytest
import torch
import timm
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import bvit.models as M

NAMES = ['bvit_5m', 'bvit_22m']
# (stem, patch): both give a 4x4 grid at 64 px, so the two stems are compared like for like.
STEMS = [('conv', 8), ('none', 16)]
TOL = dict(rtol=1e-5, atol=1e-5)


def make(name='bvit_5m', stem='conv', patch=8, **kw):
    torch.manual_seed(0)
    args = dict(img_size=64, patch_size=patch, stem=stem, num_classes=10)
    args.update(kw)
    model = timm.create_model(name, **args)
    # Non-trivial values everywhere (the init leaves biases at 0 and the class token near 0).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def images(n=2, size=64, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def assert_grads_close(got, want):
    """Per parameter: equal up to float32 summation order (1e-5 of the gradient's own scale)."""
    for k in want:
        scale = want[k].abs().max().item()
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5 * scale + 1e-8, msg=k)


def full_path(model, x):
    """The reference: every token's broad attention, then the head (no class-row shortcut)."""
    return model.forward_head(model.forward_features(x))


@pytest.fixture(params=[(n, s, p) for n in NAMES for s, p in STEMS], ids=lambda t: f'{t[0]}-{t[1]}')
def model(request):
    name, stem, patch = request.param
    return make(name, stem, patch)


# Paths of the class row -------------------------------------------------------------------------

def test_every_forward_path_gives_the_same_logits(model):
    x = images()
    with torch.no_grad():
        ref = full_path(model, x)
        streamed = model(x)                           # inference: streamed layer by layer
    fast = model(x)                                   # gradients on: hand-written class row
    modules = model._class_row_modules(model._embed(x))
    via_modules = model.forward_head(model.norm(modules))
    for out in (streamed, fast, via_modules):
        torch.testing.assert_close(out, ref, **TOL)
    assert ref.abs().max() > 0.1                       # not a degenerate comparison


def test_training_gradients_of_the_fast_path_equal_the_full_path():
    for name, (stem, patch) in zip(NAMES, STEMS):
        model = make(name, stem, patch, qkv_bias=True).train()  # dropout 0: train mode is deterministic
        x = images()
        target = torch.tensor([3, 7])
        grads = []
        for fn in (model, lambda t: full_path(model, t)):
            model.zero_grad()
            nn.functional.cross_entropy(fn(x), target).backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert_grads_close(grads[0], grads[1])
        assert grads[0]['blocks.0.attn.qkv.weight'].abs().max() > 0


def test_streamed_inference_with_hooks_changed_weights_and_autocast():
    """The streamed class row appends its value rows to each block's qkv product: hooks on the
    block, its attention or its qkv still fire (that block runs whole, same logits); new weights
    are picked up (the appended rows are cached per weight version); bf16 autocast gives what the
    full path gives under autocast."""
    model = make(qkv_bias=True)
    x = images()
    with torch.no_grad():
        ref = full_path(model, x)
        for i, mod in enumerate((model.blocks[2], model.blocks[4].attn, model.blocks[7].attn.qkv)):
            seen = []
            handle = mod.register_forward_hook(lambda m, a, o: seen.append(1))
            torch.testing.assert_close(model(x), ref, **TOL)
            handle.remove()
            assert seen == [1], i
        w, b, _ = model._stream_weights(3, model.blocks[3].attn.qkv.weight, model.blocks[3].attn.qkv.bias)
        assert w.shape[0] % 8 == 0 and w.shape[0] > 3 * model.embed_dim and b.shape == w.shape[:1]
        model.blocks[3].attn.qkv.weight.mul_(1.5)                   # in place: a new version
        model.blocks[9].attn.qkv.bias.add_(0.3)
        ref2 = full_path(model, x)
        assert not torch.allclose(ref, ref2, atol=1e-3)
        torch.testing.assert_close(model(x), ref2, **TOL)
        with torch.autocast('cpu', dtype=torch.bfloat16):
            amp, amp_ref = model(x), full_path(model, x)
    torch.testing.assert_close(amp.float(), amp_ref.float(), rtol=0, atol=2e-2)
    torch.testing.assert_close(amp.float(), ref2, rtol=0, atol=5e-2)


class LowRank(nn.Module):
    """A LoRA-style wrapper: the base Linear plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.down.weight, std=0.3)
        nn.init.normal_(self.up.weight, std=0.3)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def test_a_wrapped_qkv_is_honoured_by_every_path():
    plain = make()
    wrapped = copy.deepcopy(plain)
    for blk in wrapped.blocks:
        blk.attn.qkv = LowRank(blk.attn.qkv)
    assert not wrapped._eager_fast_path() and plain._eager_fast_path()
    x = images()
    with torch.no_grad():
        ref = full_path(wrapped, x)
        assert not torch.allclose(ref, full_path(plain, x), atol=1e-3)  # the wrapper matters
        torch.testing.assert_close(wrapped(x), ref, **TOL)
    wrapped.train()
    out = wrapped(x)
    torch.testing.assert_close(out, full_path(wrapped, x), **TOL)
    out.sum().backward()
    assert wrapped.blocks[0].attn.qkv.down.weight.grad.abs().max() > 0


def test_unaligned_pooling_and_qkv_bias_paths():
    # 3 heads of 48 over 3 layers pool 432 values to 192: the groups are not whole runs inside
    # one head, so there is no streaming (the generic pooled path); still exact.
    for kw in (dict(depth=3, head_dim=48), dict(qkv_bias=True)):
        model = make(**kw)
        with torch.no_grad():
            for blk in model.blocks:
                if blk.attn.qkv.bias is not None:
                    blk.attn.qkv.bias.normal_()
        assert (model._pool_group == 0) == ('depth' in kw)
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(model(x), full_path(model, x), **TOL)
            torch.testing.assert_close(model.forward_head(model.norm(model._class_row_modules(model._embed(x)))),
                                       full_path(model, x), **TOL)


# Features and intermediates ---------------------------------------------------------------------

def test_forward_intermediates_are_the_block_outputs(model):
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[2, -1], output_fmt='NLC')
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)
        tokens = model._embed(x)
        outs = []
        for blk in model.blocks:
            tokens = blk(tokens)[0]
            outs.append(tokens)
        torch.testing.assert_close(inter[0], outs[2][:, 1:], rtol=0, atol=0)
        torch.testing.assert_close(inter[1], outs[-1][:, 1:], rtol=0, atol=0)

        maps = model.forward_intermediates(x, indices=3, intermediates_only=True, norm=True, stop_early=True)
        assert len(maps) == 3 and maps[0].shape == (2, model.embed_dim, 4, 4)
        torch.testing.assert_close(maps[-1], model.norm(outs[-1])[:, 1:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2))
        pairs = model.forward_intermediates(x, indices=[0], return_prefix_tokens=True, intermediates_only=True)
        patches, prefix = pairs[0]
        torch.testing.assert_close(prefix, outs[0][:, :1], rtol=0, atol=0)
        assert patches.shape == (2, model.embed_dim, 4, 4)
        broad = model.forward_broad(x)
        torch.testing.assert_close(model.norm(outs[-1] + model.broad_scale * broad), final, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='output_fmt'):
        model.forward_intermediates(x, output_fmt='NHWC')


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('stem,patch', STEMS)
def test_features_only_through_timm(name, stem, patch):
    ref = make(name, stem, patch)
    feats = timm.create_model(name, img_size=64, patch_size=patch, stem=stem, features_only=True,
                              out_indices=(1, 5, 11))
    missing, unexpected = feats.model.load_state_dict(ref.state_dict(), strict=False)
    assert not missing and set(unexpected) == {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}  # pruned
    assert feats.feature_info.channels() == [ref.embed_dim] * 3
    # reduction is the real pixel stride: 64 px / 4 patches = 16 for both stems (8 x 2 and 16 x 1)
    assert feats.feature_info.reduction() == [16, 16, 16]
    x = images()
    with torch.no_grad():
        out = feats(x)
        want = ref.forward_intermediates(x, indices=[1, 5, 11], intermediates_only=True)
    assert [tuple(o.shape) for o in out] == [(2, ref.embed_dim, 4, 4)] * 3
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(ref.feature_info) == 12 and ref.feature_info[0]['module'] == 'blocks.0'


def test_prune_intermediate_layers_keeps_the_values():
    model = make()
    x = images()
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
        kept = model.prune_intermediate_layers([4], prune_norm=True)
        after = model.forward_intermediates(x, indices=[4], intermediates_only=True)[0]
    assert kept == [4] and len(model.blocks) == 5 and isinstance(model.head, nn.Identity)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():   # a pruned model still runs (its broad attention spans 5 blocks)
        assert model(x).shape == (2, 1 + 16, model.embed_dim)


# Sizes and pooling -------------------------------------------------------------------------------

def test_dynamic_img_size_resamples_the_table_on_the_fly(model):
    dyn = copy.deepcopy(model)
    dyn.dynamic_img_size = True
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(dyn(x), model(x), rtol=0, atol=0)   # own size: own table
        big = images(size=96)
        fixed96 = copy.deepcopy(model)
        fixed96.set_input_size(96)
        assert fixed96.grid_size == (6, 6)
        torch.testing.assert_close(dyn(big), fixed96(big), **TOL)
        with pytest.raises(ValueError, match='divisible by the patch size'):
            dyn(images(size=70))
        dyn.dynamic_img_pad = True
        assert dyn(images(size=70)).shape == (2, 10)
        with pytest.raises(ValueError, match=r'\(B, 3, 64, 64\)'):
            model(big)
    maps = dyn.attention_maps(big)
    assert maps.grid_size == (6, 6) and maps.broad.shape[-1] == 37


def test_dynamic_img_size_through_create_model():
    model = timm.create_model('bvit_5m', dynamic_img_size=True, num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 288, 256)).shape == (1, 3)
    final, inter = model.forward_intermediates(torch.randn(1, 3, 288, 256), indices=1)
    assert inter[0].shape == (1, 192, 9, 8) and final.shape == (1, 73, 192)


def test_global_pool_empty_keeps_every_token(model):
    x = images()
    with torch.no_grad():
        feats = model.forward_features(x)
        model.reset_classifier(0, '')
        torch.testing.assert_close(model(x), feats, rtol=0, atol=0)
        model.reset_classifier(5, 'avg')
        assert model(x).shape == (2, 5)
    with pytest.raises(ValueError, match='global_pool'):
        model.reset_classifier(0, 'max')
    tokens = make(global_pool='')
    with torch.no_grad():
        assert tokens(x).shape == (2, 17, 10)


def test_checkpoint_filter_fn_resamples_and_adapts():
    src = make()
    sd = src.state_dict()
    big = timm.create_model('bvit_5m', img_size=96, patch_size=8, num_classes=10)
    out = M.checkpoint_filter_fn({'model': sd}, big)
    used = sd['pos_embed'][:, :17]
    want = timm.layers.resample_abs_pos_embed(used, [6, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(out['pos_embed'][:, :37], want, rtol=0, atol=0)
    assert out['pos_embed'].shape == big.pos_embed.shape and out['pos_embed'][:, 37:].abs().sum() == 0
    big.load_state_dict(out)
    # one channel, no stem: exact for a grey image repeated on three channels
    plain = make(stem='none', patch=16)
    grey = timm.create_model('bvit_5m', img_size=64, patch_size=16, stem='none', num_classes=10, in_chans=1).eval()
    grey.load_state_dict(M.checkpoint_filter_fn(plain.state_dict(), grey))
    g = images()[:, :1]
    with torch.no_grad():
        torch.testing.assert_close(grey(g), plain(g.expand(-1, 3, -1, -1)), **TOL)
    assert make()._traits['first_conv'] == 'stem' and plain._traits['first_conv'] == 'patch_embed'


def test_pretrained_file_at_another_size(tmp_path):
    src = make()
    path = tmp_path / 'w.pth'
    torch.save({'model': src.state_dict()}, path)
    model = timm.create_model('bvit_5m', pretrained=True, img_size=96, patch_size=8, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path), num_classes=10))
    want = timm.layers.resample_abs_pos_embed(src.pos_embed[:, :17], [6, 6], [4, 4], num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed[:, :37], want, rtol=0, atol=0)
    torch.testing.assert_close(model.head.weight, src.head.weight, rtol=0, atol=0)


# Script, trace, export ---------------------------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_torchscript_equals_eager(name):
    for stem, patch in STEMS:
        model = make(name, stem, patch)
        scripted = torch.jit.script(model)
        x = images()
        with torch.no_grad():
            torch.testing.assert_close(scripted(x), model(x), **TOL)
            torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), **TOL)


def test_dynamic_size_scripted_and_traced():
    model = make(dynamic_img_size=True, dynamic_img_pad=True)
    scripted, traced = torch.jit.script(model), torch.fx.symbolic_trace(model)
    for size in (64, 96, 70):           # own grid, resampled table, padded to whole patches
        x = images(size=size)
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(scripted(x), ref, **TOL)
            torch.testing.assert_close(traced(x), ref, **TOL)


@pytest.mark.parametrize('name', NAMES)
def test_fx_trace_forward_backward_and_script(name):
    model = make(name)
    traced = torch.fx.symbolic_trace(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), **TOL)
    # backward through the traced graph (module path) equals eager training (fast path)
    model.train()
    traced.train()
    grads = []
    for fn in (traced, model):
        model.zero_grad()
        traced.zero_grad()
        fn(x).square().sum().backward()
        src = traced if fn is traced else model
        grads.append({k: p.grad.clone() for k, p in src.named_parameters()})
    assert_grads_close(grads[0], grads[1])
    model.eval()
    traced.eval()
    scripted = torch.jit.script(traced)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), **TOL)


def test_torchvision_feature_extractor():
    model = make()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert 'blocks.11.mlp.fc2' in eval_nodes and 'head' in eval_nodes
    ext = create_feature_extractor(model, return_nodes={'blocks.5.mlp.fc2': 'mlp5', 'head': 'logits'})
    x = images()
    with torch.no_grad():
        out = ext(x)
        torch.testing.assert_close(out['logits'], model(x), **TOL)
        seen = {}
        hook = model.blocks[5].mlp.fc2.register_forward_hook(lambda m, i, o: seen.setdefault('o', o))
        model(x)
        hook.remove()
    torch.testing.assert_close(out['mlp5'], seen['o'], rtol=0, atol=0)


def test_torch_export_and_compile():
    model = make()
    x = images()
    with torch.no_grad():
        ref = model(x)
        exported = torch.export.export(model, (x,))
        torch.testing.assert_close(exported.module()(x), ref, **TOL)
        compiled = torch.compile(model, backend='aot_eager')   # dynamo capture without a C++ toolchain
        torch.testing.assert_close(compiled(x), ref, **TOL)
