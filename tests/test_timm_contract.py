"""BViT as a timm model: features, intermediates, dynamic size, pooling, script/FX/export, hooks,
timm's attention extraction, and one class-row computation whatever the client does to the weights.

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
EXACT = dict(rtol=0, atol=0)   # timm's own FX/script checks compare with ==


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


# One class row: every client sees the same computation ------------------------------------------

def block_qkv(model, x):
    """Each block's q, k, v (B, H, N, d), read by forward hooks on the qkv projections."""
    outs = []
    hooks = [blk.attn.qkv.register_forward_hook(lambda m, a, o: outs.append(o)) for blk in model.blocks]
    try:
        model.forward_features(x)
    finally:
        for h in hooks:
            h.remove()
    B, N, _ = outs[0].shape
    H, d = model.num_heads, model.head_dim
    return [o.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0) for o in outs]


def test_forward_equals_the_full_path_with_gradients(model):
    """The class row alone (forward) against every token's broad output then the head: logits in
    inference, and logits and every gradient in training."""
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), full_path(model, x), **TOL)
    target = torch.tensor([3, 7])
    grads = []
    for fn in (model, lambda t: full_path(model, t)):
        model.zero_grad()
        nn.functional.cross_entropy(fn(x), target).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    assert_grads_close(grads[0], grads[1])
    assert grads[0]['blocks.0.attn.qkv.weight'].abs().max() > 0


def test_momentum_teacher_updated_through_data_gives_its_own_logits(model):
    """DINO / MoCo / BYOL update a teacher with ``.data`` writes, which leave ``_version`` and
    ``data_ptr`` as they were: every call must read the weights as they are now."""
    student = copy.deepcopy(model)
    x = images()
    previous = None
    for step in range(4):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            for pt, ps in zip(model.parameters(), student.parameters()):
                pt.data.mul_(0.9).add_(0.1 * ps.detach().data)
            out = model(x)
            torch.testing.assert_close(out, full_path(model, x), **TOL)
            if previous is not None:
                assert not torch.allclose(out, previous, atol=1e-4), step
            previous = out
    with torch.no_grad():
        model.blocks[4].attn.qkv.weight.data.mul_(2)
        torch.testing.assert_close(model(x), full_path(model, x), **TOL)


ALL = [(n, s, p) for n in NAMES for s, p in STEMS]
ALL_IDS = [f'{n}-{s}' for n, s, _ in ALL]


@pytest.mark.parametrize('name,stem,patch', ALL, ids=ALL_IDS)
def test_a_model_built_and_run_under_inference_mode(name, stem, patch):
    with torch.inference_mode():
        model = make(name, stem, patch)
        x = images()
        out = model(x)
        torch.testing.assert_close(out, full_path(model, x), **TOL)
    plain = make(name, stem, patch)
    with torch.no_grad():
        torch.testing.assert_close(out, plain(x), rtol=0, atol=0)


class LowRank(nn.Module):
    """A LoRA-style wrapper (as peft's ``lora.Linear``): the base Linear plus a low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 2) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.normal_(self.down.weight, std=0.3)
        nn.init.normal_(self.up.weight, std=0.3)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))

    def merged(self) -> nn.Linear:
        """The base Linear with the update folded into its weight (peft's ``merge_and_unload``)."""
        with torch.no_grad():
            self.base.weight += self.up.weight @ self.down.weight
        return self.base


@pytest.mark.parametrize('name,stem,patch', ALL, ids=ALL_IDS)
def test_a_wrapped_then_merged_qkv_gives_the_wrapped_logits(name, stem, patch):
    """LoRA on qkv (after the base model has run once), trained a step, then merged: the merged
    model gives the wrapped model's logits, not the base model's."""
    plain = make(name, stem, patch)
    x = images()
    with torch.no_grad():
        base_out = plain(x)
    for blk in plain.blocks:
        blk.attn.qkv = LowRank(blk.attn.qkv)
    nn.functional.cross_entropy(plain(x), torch.tensor([1, 2])).backward()
    assert plain.blocks[0].attn.qkv.down.weight.grad.abs().max() > 0
    with torch.no_grad():
        wrapped_out = plain(x)
        torch.testing.assert_close(wrapped_out, full_path(plain, x), **TOL)
        assert not torch.allclose(wrapped_out, base_out, atol=1e-3)
        for blk in plain.blocks:
            blk.attn.qkv = blk.attn.qkv.merged()
        torch.testing.assert_close(plain(x), wrapped_out, **TOL)


def test_hooks_see_what_they_see_on_a_timm_vit(model):
    """A forward hook on every block gets the block's output tokens (a Tensor, stackable); hooks
    on the attention and qkv fire once per call; the blocks' outputs are forward_intermediates'."""
    x = images()
    feats, attn_out, qkv_out = [], [], []
    handles = [blk.register_forward_hook(lambda m, i, o: feats.append(o)) for blk in model.blocks]
    handles += [blk.attn.register_forward_hook(lambda m, i, o: attn_out.append(o)) for blk in model.blocks]
    handles += [blk.attn.qkv.register_forward_hook(lambda m, i, o: qkv_out.append(o)) for blk in model.blocks]
    with torch.no_grad():
        out = model(x)
        _, inter = model.forward_intermediates(x, output_fmt='NLC')
    for h in handles:
        h.remove()
    L = len(model.blocks)
    assert len(feats) == len(attn_out) == len(qkv_out) == 2 * L
    stacked = torch.stack(feats[:L])
    assert stacked.shape == (L, 2, 17, model.embed_dim)
    torch.testing.assert_close(stacked[:, :, 1:], torch.stack(inter), rtol=0, atol=0)
    assert all(type(o) is torch.Tensor and o.shape == (2, 17, model.embed_dim) for o in attn_out)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=0, atol=0)


def test_forward_hooks_can_change_a_block_output():
    model = make()
    x = images()
    with torch.no_grad():
        ref = model(x)
        handle = model.blocks[5].register_forward_hook(lambda m, i, o: o * 1.5)
        changed = model(x)
        changed_full = full_path(model, x)
        handle.remove()
    assert not torch.allclose(changed, ref, atol=1e-3)
    torch.testing.assert_close(changed, changed_full, **TOL)


@pytest.mark.parametrize('method', ['fx', 'hook'])
def test_timm_attention_extract(method):
    """timm's AttentionExtract, with fused attention off as timm needs for it, finds every layer's
    map, equal to attention_maps()."""
    from timm.layers import set_fused_attn, use_fused_attn
    from timm.utils import AttentionExtract
    was = use_fused_attn()
    set_fused_attn(False)
    try:
        model = make()
    finally:
        set_fused_attn(was)
    assert not model.blocks[0].attn.fused_attn
    x = images()
    extract = AttentionExtract(model, method=method)
    with torch.no_grad():
        maps = extract(x)
        ref = model.attention_maps(x)
        fused = make()
        torch.testing.assert_close(model(x), fused(x), **TOL)
    assert len(maps) == len(model.blocks)
    for got, want in zip(maps.values(), ref.layers):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pickle_holds_no_state_from_a_call(model):
    import pickle
    before = len(pickle.dumps(model))
    with torch.no_grad():
        model(images())
        model.forward_features(images())
    after = len(pickle.dumps(model))
    assert after == before
    assert not any(isinstance(v, torch.Tensor) for m in model.modules() for v in vars(m).values())


def test_unaligned_pooling_is_refused_with_the_reason():
    # 3 heads of 48 over 3 layers: 432 values cannot be pooled to 192 in whole groups.
    with pytest.raises(ValueError, match='432 values to 192'):
        make(depth=3, head_dim=48)
    twin = make(depth=3, head_dim=48, broad=False)          # no broad attention: nothing to pool
    assert twin(images()).shape == (2, 10)


def test_qkv_bias_and_another_head_dim():
    for kw in (dict(qkv_bias=True), dict(head_dim=32)):
        model = make(**kw)
        with torch.no_grad():
            for blk in model.blocks:
                if blk.attn.qkv.bias is not None:
                    blk.attn.qkv.bias.normal_()
            x = images()
            torch.testing.assert_close(model(x), full_path(model, x), **TOL)


# Features and intermediates ---------------------------------------------------------------------

def test_forward_intermediates_are_the_block_outputs(model):
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, indices=[2, -1], output_fmt='NLC')
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=1e-6)
        tokens = model._embed(x)
        outs = []
        for blk in model.blocks:
            tokens = blk(tokens)
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
            torch.testing.assert_close(scripted(x), model(x), **EXACT)
            torch.testing.assert_close(scripted.forward_features(x), model.forward_features(x), **EXACT)


def test_dynamic_size_scripted_and_traced():
    model = make(dynamic_img_size=True, dynamic_img_pad=True)
    scripted, traced = torch.jit.script(model), torch.fx.symbolic_trace(model)
    for size in (64, 96, 70):           # own grid, resampled table, padded to whole patches
        x = images(size=size)
        with torch.no_grad():
            ref = model(x)
            torch.testing.assert_close(scripted(x), ref, **EXACT)
            torch.testing.assert_close(traced(x), ref, **EXACT)


@pytest.mark.parametrize('name', NAMES)
def test_fx_trace_forward_backward_and_script(name):
    model = make(name)
    traced = torch.fx.symbolic_trace(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), **EXACT)
    # backward through the traced graph: the same operations as eager training
    model.train()
    traced.train()
    grads = []
    for fn in (traced, model):
        model.zero_grad()
        traced.zero_grad()
        fn(x).square().sum().backward()
        src = traced if fn is traced else model
        grads.append({k: p.grad.clone() for k, p in src.named_parameters()})
    for k in grads[1]:
        torch.testing.assert_close(grads[0][k], grads[1][k], **EXACT, msg=k)
    model.eval()
    traced.eval()
    scripted = torch.jit.script(traced)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), **EXACT)


def test_torchvision_feature_extractor():
    model = make()
    train_nodes, eval_nodes = get_graph_node_names(model)
    assert 'blocks.11.mlp.fc2' in eval_nodes and 'head' in eval_nodes
    ext = create_feature_extractor(model, return_nodes={'blocks.5.mlp.fc2': 'mlp5', 'head': 'logits'})
    x = images()
    with torch.no_grad():
        out = ext(x)
        torch.testing.assert_close(out['logits'], model(x), **EXACT)
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
        torch.testing.assert_close(exported.module()(x), ref, **EXACT)
        compiled = torch.compile(model, backend='aot_eager')   # dynamo capture without a C++ toolchain
        torch.testing.assert_close(compiled(x), ref, **EXACT)


def _train_steps(model, x, target, steps=2):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_compiled_training_steps_equal_eager():
    """torch.compile (aot_eager: dynamo and AOTAutograd, no C++ toolchain) trains as eager does."""
    eager = make().train()
    compiled_model = copy.deepcopy(eager)
    x, target = images(), torch.tensor([1, 8])
    losses = _train_steps(eager, x, target)
    compiled_losses = _train_steps(torch.compile(compiled_model, backend='aot_eager'), x, target)
    assert compiled_losses == losses
    for (k, a), b in zip(eager.state_dict().items(), compiled_model.state_dict().values()):
        torch.testing.assert_close(b, a, **EXACT, msg=k)


def test_grad_checkpointing_gives_the_same_gradients(model):
    x, target = images(), torch.tensor([1, 8])
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    model.set_grad_checkpointing(False)
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], **EXACT, msg=k)


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_low_precision_weights_and_autocast(dtype):
    """The layers' logits are summed in float32: with bf16 / fp16 weights, and under bf16
    autocast, the logits stay within the precision of the dtype of the float32 model's
    (bf16 keeps 8 significant bits, fp16 11: bounds 3e-2 / 4e-3 of the logits' scale)."""
    model = make()
    x = images()
    with torch.no_grad():
        ref = model(x)
        scale = ref.abs().max().item()
        tol = (3e-2 if dtype == torch.bfloat16 else 4e-3) * scale
        low = copy.deepcopy(model).to(dtype)
        out = low(x.to(dtype))
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=tol)
        torch.testing.assert_close(out, low.forward_head(low.forward_features(x.to(dtype))), rtol=0, atol=tol)
        if dtype == torch.bfloat16:
            with torch.autocast('cpu', dtype=dtype):
                amp = model(x)
            torch.testing.assert_close(amp.float(), ref, rtol=0, atol=tol)


def _ddp_compiled_worker(rank, init_file, out_dir):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    try:
        x = images(seed=10 + rank)
        target = torch.tensor([rank, 9 - rank])
        for compiled in (False, True):
            model = make().train()
            ddp = DDP(model)
            # as PyTorch documents for DDP: wrap first, then compile the wrapped model
            net = torch.compile(ddp, backend='aot_eager') if compiled else ddp
            _train_steps(net, x, target, steps=2)
            if rank == 0:
                torch.save(model.state_dict(), f'{out_dir}/{"compiled" if compiled else "eager"}.pt')
    finally:
        dist.destroy_process_group()


def test_compiled_training_under_ddp_equals_eager(tmp_path):
    """Two gloo processes, DDP then torch.compile (aot_eager, so DDPOptimizer splits the graph at
    bucket boundaries): after two AdamW steps the weights equal eager DDP's (to 1e-6: the
    all-reduce of buckets may sum in another order)."""
    import torch.multiprocessing as mp
    mp.spawn(_ddp_compiled_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, join=True)
    eager = torch.load(tmp_path / 'eager.pt', weights_only=True)
    compiled = torch.load(tmp_path / 'compiled.pt', weights_only=True)
    start = make().state_dict()
    assert not torch.equal(eager['blocks.0.attn.qkv.weight'], start['blocks.0.attn.qkv.weight'])
    for k in eager:
        torch.testing.assert_close(compiled[k], eager[k], rtol=0, atol=1e-6, msg=k)
