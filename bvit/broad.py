"""Broad attention (BViT, arXiv 2202.06268) for other timm backbones: ViT / DeiT and Swin.

``add_broad_attention(model, scale=0.4)`` turns a timm model into its broad-attention variant in
place and returns it. No parameter, buffer or state-dict key is added, removed or renamed, so the
model's pretrained weights load as they are, and ``scale=0`` gives the original model's output
exactly. The conversion swaps the classes of the model (or Swin's stages), of its blocks and of
their attention modules for subclasses defined here (the instances, their parameters and their
hooks stay as they are); ``remove_broad_attention`` swaps them back. The blocks then run in the
loop BViT's own run in (``bvit.layers.BroadBlocks``).

Supported models
----------------
* timm ``VisionTransformer`` (ViT, DeiT, DeiT III, register-token and class-token-free variants,
  any ``global_pool``) and DeiT's ``VisionTransformerDistilled``, as long as every block's ``attn``
  is timm's ``Attention`` (``timm.layers.Attention``). Each block hands the q, k, v its own
  attention used (after qkv bias and q_norm / k_norm) to the broad attention of BViT:
  ``adaptive_avg_pool1d(softmax(Q Kᵀ · d^-0.5) V, D)`` with Q, K, V concatenated over the L blocks
  along the channel axis, computed by the same functions and the same block loop as BViT's own
  (``bvit.layers``: ``BroadBlocks._run_blocks`` calls each block as ``block(x, broad=tap)``, and
  the block's attention hands its q, k, v to the ``BroadTap``), added with ``scale`` to every token
  of the last block's output, before the final norm and the head. With a class-token head
  (``global_pool='token'``, or the distilled head) ``forward`` computes only the rows that reach
  the logits (1, or 2 for the distilled model); ``forward_features`` returns every token.
  An ``attn_mask`` / ``is_causal`` given to ``forward`` is applied to the broad attention too.
  Gradient checkpointing (``model.set_grad_checkpointing()``) checkpoints each block.
  ``forward_intermediates`` is timm's own and does not include the broad output.
* timm ``SwinTransformer`` (v1, ``swin_*``), see the next section.
* This project's ``bvit.models.BViT``: broad attention is switched on (``broad=True``) and its
  scale set.

Anything else raises ``TypeError`` naming what is supported.

Swin Transformer: design (the paper gives no code for it)
----------------------------------------------------------
Broad attention is applied within each stage, over that stage's blocks, and its output is added,
scaled, to the stage output (after the stage's last block, so before the next stage's patch
merging, or before the final norm for the last stage).

* **One window partition per stage.** q, k and v are per-token projections, so a shifted block's
  q, k, v are taken out of its shifted windows and rolled back to the unshifted token grid
  (reverse window partition, crop the padding, roll by +shift: exactly what the block does with
  its output), and then all blocks of the stage are partitioned with the regular, unshifted
  windows (shift 0, the stage's window size, padding bottom/right as the block does). Within each
  window Q, K, V are concatenated over the stage's blocks and ``softmax(Q Kᵀ · d^-0.5 + Σ_l B_l) V``
  is pooled to the stage width C exactly as in BViT (layout head, block, channel; adaptive
  average pooling), then windows are reversed to the (B, H, W, C) map.
* **Relative position bias: included** (``swin_rel_pos_bias=True``, the default). BViT's broad
  map is the softmax of the sum of every layer's attention logits; in Swin a block's logits are
  ``q kᵀ · d^-0.5 + B_l`` with B_l its learned relative position bias, so the sum over the stage's
  blocks includes Σ_l B_l, looked up for the regular window's relative positions (the same table
  lookup the unshifted blocks use). Without it the windowed broad attention would be blind to
  position (Swin has no absolute position embedding). ``swin_rel_pos_bias=False`` leaves it out.
* **No shift mask.** The shifted blocks' masks only separate tokens that the cyclic shift brought
  together from opposite borders; in the unshifted partition every window holds true neighbours,
  so no mask is needed. Padding tokens (feature maps not divisible by the window) are masked out
  as keys, and their rows are cropped away.
* No dropout, no new parameters; the logit scale is d^-0.5 of one head, as in BViT.

What timm saves of a converted model
------------------------------------
timm's ``save_for_hf`` writes a model's ``pretrained_cfg['architecture']`` and its construction
arguments (``model._model_args``, which ``timm.create_model`` records), and
``timm.create_model('local-dir:...')`` calls that architecture's entrypoint with them. So
:func:`add_broad_attention`, :func:`set_broad_scale` and :func:`remove_broad_attention` keep both
describing the model as it now is:

* a model whose class takes ``broad`` in its constructor (BViT, T2T-ViT): ``broad`` and
  ``broad_scale`` are recorded; its architecture name stays.
* a timm ViT / DeiT / Swin: ``broad_scale`` (Swin: also ``swin_rel_pos_bias``) is recorded and the
  architecture becomes its registered broad variant ``broad_<name>`` (:func:`broad_variant`;
  :mod:`bvit.broad_models`), which rebuilds it with broad attention. A model whose architecture
  has no broad variant keeps its name with ``broad_scale`` among its arguments, so timm's rebuild
  from the saved config refuses it (``TypeError: ... unexpected keyword argument 'broad_scale'``)
  instead of giving back a model without broad attention.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import Attention
from timm.models import is_model
from timm.models.swin_transformer import (
    SwinTransformer, SwinTransformerBlock, SwinTransformerStage, WindowAttention, window_partition, window_reverse)
from timm.models.vision_transformer import VisionTransformer

from .layers import BroadBlocks, BroadTap, BroadTerms, broad_group, broad_layers_of

try:  # timm >= 1.0.15 builds additive masks for the non-fused path with these
    from timm.layers import maybe_add_mask, resolve_self_attn_mask
except ImportError:  # pragma: no cover - older timm, whose Attention takes no mask
    maybe_add_mask = resolve_self_attn_mask = None

try:
    from timm.models.deit import VisionTransformerDistilled
except ImportError:  # pragma: no cover
    VisionTransformerDistilled = None

QKV = Tuple[Tensor, Tensor, Tensor]

SUPPORTED = (
    "timm VisionTransformer models (ViT, DeiT, DeiT distilled, register / no-class-token variants) "
    "whose blocks use timm.layers.Attention, timm SwinTransformer (v1) with WindowAttention, "
    "and bvit.models.BViT")


# Attention modules that hand on their q, k, v ----------------------------------------------------

class _QKVTap:
    """Mixin: when ``_broad_tap`` is set (by its block, :class:`_BroadBlock`, for the one call),
    ``forward`` hands its q, k, v to it (a :class:`bvit.layers.BroadTap`, as BViT's own attention
    does; timm's blocks call their attention without such an argument, so the block sets it on
    the module)."""
    _broad_tap: Optional[Any] = None

    def _broad_record(self, qkv: Tensor) -> None:
        """Hand on q, k, v stacked, (3, B, H, N, d)."""
        tap = self._broad_tap
        if tap is not None:
            tap.record(qkv)


class BroadAttention(_QKVTap, Attention):
    """timm ``Attention`` that also hands on the q, k, v it used (q, k after q_norm / k_norm).

    Its output is computed with the same operations as timm's, so it is bitwise the same; the
    fused (``F.scaled_dot_product_attention``) or explicit path is chosen by ``fused_attn`` as in
    timm.
    """

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        B, N, _ = x.shape
        gate = getattr(self, 'gate', None)
        gate = gate(x).sigmoid() if gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        normed = not (isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity))
        self._broad_record(torch.stack((q, k, v)) if normed else qkv)
        drop = self.attn_drop.p if self.training else 0.
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, is_causal=is_causal)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            if resolve_self_attn_mask is not None:
                logits = maybe_add_mask(logits, resolve_self_attn_mask(N, logits, attn_mask, is_causal))
            elif attn_mask is not None or is_causal:  # pragma: no cover
                raise NotImplementedError('attention masks need timm >= 1.0.15')
            out = self.attn_drop(logits.softmax(dim=-1)) @ v
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        norm = getattr(self, 'norm', None)
        if norm is not None:
            out = norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class BroadWindowAttention(_QKVTap, WindowAttention):
    """timm Swin ``WindowAttention`` that also hands on its windowed q, k, v (B·nW, H, N, d).

    Same operations as timm's (fused or explicit path by ``fused_attn``), so the same output.
    """

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        Bw, N, _ = x.shape
        qkv = self.qkv(x).reshape(Bw, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        self._broad_record(qkv)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            bias = self._get_rel_pos_bias()
            if mask is not None:
                nw = mask.shape[0]
                mask = mask.view(1, nw, 1, N, N).expand(Bw // nw, -1, self.num_heads, -1, -1)
                bias = bias + mask.reshape(-1, self.num_heads, N, N)
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            logits = (q * self.scale) @ k.transpose(-2, -1)
            logits = logits + self._get_rel_pos_bias()
            if mask is not None:
                nw = mask.shape[0]
                logits = logits.view(-1, nw, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
                logits = logits.view(-1, self.num_heads, N, N)
            out = self.attn_drop(self.softmax(logits)) @ v
        out = out.transpose(1, 2).reshape(Bw, N, -1)
        return self.proj_drop(self.proj(out))


# Blocks that take the tap -------------------------------------------------------------------

class _BroadBlock:
    """Mixin for a timm block whose ``attn`` is one of the classes above: ``forward(x, broad=tap,
    **kwargs)`` is the block's own ``forward(x, **kwargs)``, its attention's q, k, v handed to
    ``tap`` (a :class:`bvit.layers.BroadTap`), as BViT's blocks take it, so that
    :meth:`bvit.layers.BroadBlocks._run_blocks` runs them alike. timm's block code calls its
    attention without the tap, so the block sets it on the attention for the one call."""
    _broad_base: type

    def _attn_tap(self, x: Tensor, broad: BroadTap) -> Any:
        """What the attention hands its q, k, v to, for the block input ``x``."""
        return broad

    def forward(self, x: Tensor, broad: Optional[BroadTap] = None, **kwargs: Any) -> Tensor:
        attn = self.attn
        attn._broad_tap = None if broad is None else self._attn_tap(x, broad)
        try:
            return super().forward(x, **kwargs)
        finally:
            attn._broad_tap = None


class _StageWindows:
    """Hands a Swin block's windowed q, k, v (B·nW, h, N, d) to ``tap`` in the stage's unshifted
    window partition (:func:`_to_stage_windows`), for a block input of H x W tokens."""

    def __init__(self, tap: BroadTap, block: nn.Module, H: int, W: int) -> None:
        self.tap, self.block, self.H, self.W = tap, block, H, W

    def record(self, qkv: Tensor) -> None:
        """q, k, v stacked, (3, B·nW, h, N, d)."""
        self.tap.record(_to_stage_windows(qkv.flatten(0, 1), self.block, self.H, self.W).unflatten(0, (3, -1)))


class _BroadSwinBlock(_BroadBlock):
    """Mixin for a Swin block (input (B, H, W, C)): the tap gets q, k, v re-windowed to the stage's partition."""

    def _attn_tap(self, x: Tensor, broad: BroadTap) -> Any:
        return _StageWindows(broad, self, x.shape[1], x.shape[2])


_BROAD_CLASSES: Dict[Tuple[type, type], type] = {}


def _broad_class(mixin: type, base: type) -> type:
    """The class ``Broad<base>`` = (mixin, base), made once per pair."""
    cls = _BROAD_CLASSES.get((mixin, base))
    if cls is None:
        name = 'Broad' + base.__name__
        cls = type(name, (mixin, base), {'__module__': __name__, '__qualname__': name, '_broad_base': base})
        _BROAD_CLASSES[mixin, base] = cls
        globals().setdefault(name, cls)  # so that pickling the whole model finds it in this process
    return cls


def _swap_block(block: nn.Module, mixin: type) -> None:
    _swap(block, _broad_class(mixin, getattr(type(block), '_broad_base', type(block))))


# Vision Transformer --------------------------------------------------------------------------

class _BroadViTMixin(BroadBlocks):
    """Overrides ``forward_features`` / ``forward`` of a timm VisionTransformer (subclass)."""
    broad_scale: float
    broad_layers: Union[None, int, List[int]] = None
    _broad_base: type

    def _broad_tokens(self, x: Tensor, rows: Optional[int], attn_mask: Optional[Tensor] = None,
                      is_causal: bool = False) -> Tensor:
        """Images -> the last block's tokens (B, N, D) plus the scaled broad output of the query
        rows [0, rows) (all when None), as timm's forward_features before its norm."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        attn = self.blocks[0].attn
        rows = x.shape[1] if rows is None else rows
        layers = broad_layers_of(self.broad_layers, len(self.blocks))
        group = broad_group(len(layers), attn.num_heads, attn.head_dim, self.embed_dim)
        terms = BroadTerms(rows, group, attn.head_dim, x, self.broad_scale, layers)
        x, _ = self._run_blocks(x, terms, attn_mask=attn_mask, is_causal=is_causal)
        x = x[:, :rows]
        # added to x rather than into it, so that x's memory layout, and with scale 0 timm's output, stay exactly
        return x + terms.output(attn.head_dim, attn.scale, torch.zeros_like(x), attn_mask, is_causal).to(x.dtype)

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        """Images -> normed tokens (B, N, D), with the scaled broad output added to every token."""
        return self.norm(self._broad_tokens(x, None, attn_mask, is_causal))

    def _broad_head_rows(self) -> Optional[int]:
        """Leading tokens that alone reach the logits (class-token heads), else None."""
        if getattr(self, 'attn_pool', None) is not None:
            return None
        base = self._broad_base
        if VisionTransformerDistilled is not None and base is VisionTransformerDistilled:
            return 2
        if (issubclass(base, VisionTransformer) and base.forward_head is VisionTransformer.forward_head
                and self.global_pool == 'token' and getattr(self, 'cls_token', None) is not None):
            return 1
        return None

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Any:
        """Images -> logits; equal to ``forward_head(forward_features(x))``.

        With a class-token head only the head tokens' rows of the broad attention are computed.
        """
        rows = self._broad_head_rows()
        if rows is None or attn_mask is not None or is_causal:
            return self.forward_head(self.forward_features(x, attn_mask=attn_mask, is_causal=is_causal))
        return self.forward_head(self.norm(self._broad_tokens(x, rows)))


class BroadVisionTransformer(_BroadViTMixin, VisionTransformer):
    """timm VisionTransformer with BViT broad attention (made by :func:`add_broad_attention`)."""
    _broad_base = VisionTransformer


_VIT_CLASSES: Dict[type, type] = {VisionTransformer: BroadVisionTransformer}

if VisionTransformerDistilled is not None:
    class BroadVisionTransformerDistilled(_BroadViTMixin, VisionTransformerDistilled):
        """DeiT distilled model with BViT broad attention (made by :func:`add_broad_attention`)."""
        _broad_base = VisionTransformerDistilled

    _VIT_CLASSES[VisionTransformerDistilled] = BroadVisionTransformerDistilled


def _broad_vit_class(base: type) -> type:
    return _VIT_CLASSES.get(base) or _broad_class(_BroadViTMixin, base)


# Swin Transformer ----------------------------------------------------------------------------

def _to_stage_windows(t: Tensor, block: nn.Module, H: int, W: int) -> Tensor:
    """A block's windowed q/k/v (B·nW, h, N, d) -> the same tokens in the unshifted partition."""
    if not any(block.shift_size):
        return t
    wh, ww = block.window_size
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    Bw, h, N, d = t.shape
    grid = window_reverse(t.transpose(1, 2).reshape(Bw, wh, ww, h * d), block.window_size, Hp, Wp)
    grid = torch.roll(grid[:, :H, :W], shifts=tuple(block.shift_size), dims=(1, 2))
    grid = F.pad(grid, (0, 0, 0, Wp - W, 0, Hp - H))
    return window_partition(grid, block.window_size).reshape(Bw, N, h, d).transpose(1, 2)


def _padding_key_mask(
        H: int, W: int, window: Tuple[int, int], device: torch.device, dtype: torch.dtype,
) -> Optional[Tensor]:
    """(nW, 1, 1, N) additive mask, -inf on the padding keys of the unshifted partition; None if no padding."""
    wh, ww = window
    Hp, Wp = math.ceil(H / wh) * wh, math.ceil(W / ww) * ww
    if (Hp, Wp) == (H, W):
        return None
    valid = torch.zeros(1, Hp, Wp, 1, device=device, dtype=torch.bool)
    valid[:, :H, :W] = True
    valid = window_partition(valid, window).reshape(-1, wh * ww)
    mask = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill_(~valid, float('-inf'))
    return mask[:, None, None, :]


def _stage_layers(broad_layers: Union[None, int, List[int]], depth: int) -> List[int]:
    """A Swin stage's blocks that feed its broad attention: an int k is the stage's last
    min(k, depth) blocks; a list gives block indices within every stage."""
    if isinstance(broad_layers, int) and not isinstance(broad_layers, bool):
        broad_layers = min(broad_layers, depth)
    return broad_layers_of(broad_layers, depth)


class BroadSwinTransformerStage(BroadBlocks, SwinTransformerStage):
    """Swin stage whose output gets the scaled broad attention over its blocks (see module doc)."""
    _broad_base = SwinTransformerStage
    broad_scale: float = 0.4
    broad_rel_pos_bias: bool = True
    broad_layers: Union[None, int, List[int]] = None

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        B, H, W, C = x.shape
        window = tuple(self.blocks[0].window_size)
        if any(tuple(b.window_size) != window for b in self.blocks):
            sizes = [b.window_size for b in self.blocks]
            raise RuntimeError(f'broad attention needs one window size per stage, got {sizes}')
        attn = self.blocks[0].attn
        head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        N = window[0] * window[1]
        layers = _stage_layers(self.broad_layers, len(self.blocks))
        terms = BroadTerms(N, broad_group(len(layers), attn.num_heads, head_dim, C), head_dim, x, self.broad_scale, layers)
        x, _ = self._run_blocks(x, terms)
        Hp, Wp = math.ceil(H / window[0]) * window[0], math.ceil(W / window[1]) * window[1]
        zeros = x.new_zeros(B * (Hp // window[0]) * (Wp // window[1]), N, C)
        out = terms.output(head_dim, attn.scale, zeros, self._broad_mask(B, H, W, window, x))
        out = window_reverse(out.reshape(-1, window[0], window[1], C), window, Hp, Wp)
        return x + out[:, :H, :W]

    def _broad_mask(self, B: int, H: int, W: int, window: Tuple[int, int], x: Tensor) -> Optional[Tensor]:
        """Additive mask of the broad logits (B·nW, h or 1, N, N), or None: the blocks' summed
        relative position bias (``broad_rel_pos_bias``) and -inf on padding keys."""
        mask: Optional[Tensor] = None
        if self.broad_rel_pos_bias:
            mask = torch.stack([b.attn._get_rel_pos_bias() for b in self.blocks]).sum(0)  # (1, h, N, N)
        pad = _padding_key_mask(H, W, window, x.device, x.dtype)
        if pad is not None:
            mask = pad if mask is None else mask + pad  # (nW, h or 1, N, N)
            nw, h, N = mask.shape[0], mask.shape[1], window[0] * window[1]
            mask = mask.expand(nw, -1, N, -1).unsqueeze(0).expand(B, -1, -1, -1, -1).reshape(B * nw, h, N, N)
        return mask


class BroadSwinTransformer(SwinTransformer):
    """timm SwinTransformer with broad attention in every stage (made by :func:`add_broad_attention`).

    ``broad_scale`` reads / sets the scale of all stages.
    """
    _broad_base = SwinTransformer

    @property
    def broad_scale(self) -> float:
        return self.layers[0].broad_scale

    @broad_scale.setter
    def broad_scale(self, value: float) -> None:
        for stage in self.layers:
            stage.broad_scale = float(value)


# Conversion ----------------------------------------------------------------------------------

_ATTN_ATTRS = (
    'qkv', 'q_norm', 'k_norm', 'num_heads', 'head_dim', 'scale', 'fused_attn', 'attn_drop', 'proj', 'proj_drop')
_WINDOW_ATTN_ATTRS = ('qkv', 'num_heads', 'scale', 'fused_attn', 'attn_drop', 'proj', 'proj_drop', 'softmax',
                      '_get_rel_pos_bias')


def _unsupported(model: nn.Module, why: str) -> TypeError:
    return TypeError(f'add_broad_attention: {type(model).__name__} is not supported ({why}); supported are {SUPPORTED}')


def _check_attrs(model: nn.Module, module: nn.Module, attrs: Sequence[str], where: str) -> None:
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise _unsupported(model, f'{where} lacks {missing}; this timm version is not supported')


def _swap(module: nn.Module, cls: type) -> None:
    if type(module) is not cls:
        module.__class__ = cls


def _check_scale(scale: float) -> float:
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f'broad attention scale must be finite, got {scale}')
    return scale


# Names and recorded construction arguments ---------------------------------------------------

BROAD_PREFIX = 'broad_'
_SETTINGS = ('broad', 'broad_scale', 'broad_layers', 'swin_rel_pos_bias')


def broad_variant(arch: str) -> Optional[str]:
    """``'broad_' + arch`` when timm has that model name registered (:mod:`bvit.broad_models`
    registers one for timm's ViT, DeiT and Swin models), else None."""
    name = BROAD_PREFIX + arch
    return name if is_model(name) else None


def split_broad_name(name: str) -> Tuple[str, bool]:
    """``(plain name, True)`` for a registered broad variant ``broad_<plain name>``, else ``(name, False)``."""
    plain = name[len(BROAD_PREFIX):]
    if name.startswith(BROAD_PREFIX) and is_model(name) and is_model(plain):
        return plain, True
    return name, False


def _record_settings(model: nn.Module) -> None:
    """Make the construction arguments timm recorded for ``model`` (``_model_args``) and its
    ``pretrained_cfg['architecture']`` describe its broad attention as it now is, so that
    timm's ``save_for_hf`` saves what rebuilds it (module docstring, "What timm saves of a
    converted model")."""
    on = has_broad_attention(model)
    takes_broad = 'broad' in inspect.signature(getattr(type(model), '_broad_base', type(model))).parameters
    args = {k: v for k, v in getattr(model, '_model_args', {}).items() if k not in _SETTINGS}
    if takes_broad:
        args['broad'] = on
    if on or (takes_broad and hasattr(model, 'broad_scale')):
        args['broad_scale'] = float(model.broad_scale)
    if on and isinstance(model, BroadSwinTransformer):
        args['swin_rel_pos_bias'] = bool(model.layers[0].broad_rel_pos_bias)
    layers = model.layers[0].broad_layers if isinstance(model, BroadSwinTransformer) else getattr(model, 'broad_layers', None)
    if on and layers is not None:
        args['broad_layers'] = layers if isinstance(layers, int) else list(layers)
    model._model_args = args
    cfg = getattr(model, 'pretrained_cfg', None)
    if takes_broad or not isinstance(cfg, dict) or not cfg.get('architecture'):
        return
    plain, _ = split_broad_name(cfg['architecture'])
    name = (broad_variant(plain) or plain) if on else plain
    if name != cfg['architecture']:
        renamed = {**cfg, 'architecture': name}
        if getattr(model, 'default_cfg', None) is cfg:  # timm's alias of the same dict
            model.default_cfg = renamed
        model.pretrained_cfg = renamed


def _convert_vit(model: nn.Module, scale: float) -> nn.Module:
    base = getattr(type(model), '_broad_base', type(model))
    if base.forward_features is not VisionTransformer.forward_features:
        raise _unsupported(model, f'{base.__name__} overrides forward_features')
    blocks = list(model.blocks)
    if not blocks:
        raise _unsupported(model, 'it has no blocks')
    for i, blk in enumerate(blocks):
        attn = getattr(blk, 'attn', None)
        if type(attn) not in (Attention, BroadAttention):
            raise _unsupported(
                model, f'block {i} ({type(blk).__name__}) has attention {type(attn).__name__}, '
                'not timm.layers.Attention')
        _check_attrs(model, attn, _ATTN_ATTRS, f'block {i} attention')
    for blk in blocks:
        _swap(blk.attn, BroadAttention)
        _swap_block(blk, _BroadBlock)
    _swap(model, _broad_vit_class(base))
    model.broad_scale = scale
    return model


def _convert_swin(model: nn.Module, scale: float, rel_pos_bias: bool) -> nn.Module:
    for i, stage in enumerate(model.layers):
        if type(stage) not in (SwinTransformerStage, BroadSwinTransformerStage):
            raise _unsupported(model, f'stage {i} is {type(stage).__name__}')
        for j, blk in enumerate(stage.blocks):
            attn = getattr(blk, 'attn', None)
            if not isinstance(blk, SwinTransformerBlock) or type(attn) not in (WindowAttention, BroadWindowAttention):
                raise _unsupported(model, f'stage {i} block {j} is {type(blk).__name__} with {type(attn).__name__}')
            _check_attrs(model, blk.attn, _WINDOW_ATTN_ATTRS, f'stage {i} block {j} attention')
            _check_attrs(model, blk, ('shift_size', 'window_size'), f'stage {i} block {j}')
    for stage in model.layers:
        for blk in stage.blocks:
            _swap(blk.attn, BroadWindowAttention)
            _swap_block(blk, _BroadSwinBlock)
        _swap(stage, BroadSwinTransformerStage)
        stage.broad_rel_pos_bias = bool(rel_pos_bias)
    _swap(model, BroadSwinTransformer)
    model.broad_scale = scale
    return model


def add_broad_attention(model: nn.Module, scale: float = 0.4, *, swin_rel_pos_bias: bool = True,
                        broad_layers: Union[None, int, Sequence[int]] = None) -> nn.Module:
    """Add BViT's parameter-free broad attention to a timm model, in place; returns the model.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT, DeiT distilled; blocks using
            ``timm.layers.Attention``), a timm ``SwinTransformer``, or a ``bvit.models.BViT``.
        scale: weight of the broad output added to the features (0.4 in BViT); 0 reproduces the
            original model's output exactly.
        swin_rel_pos_bias: Swin only: include the blocks' summed relative position bias in the
            broad logits (see the module docstring).
        broad_layers: the blocks that feed the broad attention (:func:`bvit.layers.broad_layers_of`):
            None for all, an int k for the last k, a list of block indices. For a Swin, per stage:
            k is each stage's last min(k, depth) blocks, a list the same indices in every stage.

    Parameters, buffers and state-dict keys are unchanged, so weights load as before and after.
    The settings are recorded where timm's ``save_for_hf`` reads them, and a timm model's
    architecture becomes its broad variant ``broad_<name>`` (module docstring, "What timm saves
    of a converted model"). Calling it again on a converted model only updates the settings.
    Raises TypeError for other models, naming what is supported.
    """
    scale = _check_scale(scale)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f'add_broad_attention expects a torch.nn.Module, got {type(model).__name__}; supported are {SUPPORTED}')
    layers = None if broad_layers is None else broad_layers if isinstance(broad_layers, int) else [int(i) for i in broad_layers]
    if isinstance(model, VisionTransformer):
        broad_layers_of(layers, len(model.blocks))  # ValueError now for layers outside the blocks
        model = _convert_vit(model, scale)
        model.broad_layers = layers
    elif isinstance(model, SwinTransformer):
        if type(model) not in (SwinTransformer, BroadSwinTransformer):
            raise _unsupported(model, 'subclasses of SwinTransformer are not supported')
        for stage in model.layers:
            _stage_layers(layers, len(stage.blocks))
        model = _convert_swin(model, scale, swin_rel_pos_bias)
        for stage in model.layers:
            stage.broad_layers = layers
    else:
        from .models import BViT  # here, so that importing this module does not register the BViT models
        if not isinstance(model, BViT):
            raise _unsupported(model, 'no supported attention blocks')
        model.broad_layers = broad_layers_of(layers, len(model.blocks))
        model.broad = True
        model.broad_scale = scale
    _record_settings(model)
    return model


def set_broad_scale(model: nn.Module, scale: float) -> nn.Module:
    """Set the broad-attention scale of a model made by :func:`add_broad_attention`; returns it."""
    if not hasattr(model, 'broad_scale'):
        raise TypeError(f'{type(model).__name__} has no broad attention; call add_broad_attention first')
    model.broad_scale = _check_scale(scale)
    _record_settings(model)
    return model


def has_broad_attention(model: nn.Module) -> bool:
    """Whether ``model`` computes broad attention (converted here, or a BViT with ``broad=True``)."""
    if isinstance(model, (_BroadViTMixin, BroadSwinTransformer)):
        return True
    return bool(getattr(model, 'broad', False)) and hasattr(model, 'broad_scale')


def remove_broad_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`add_broad_attention` in place (restore the timm classes, the recorded settings
    and the architecture name); returns the model.

    For a BViT, switches its broad attention off (``broad=False``).
    """
    if isinstance(model, (_BroadViTMixin, BroadSwinTransformer)):
        for m in model.modules():
            base = getattr(type(m), '_broad_base', None)
            if base is None and isinstance(m, _QKVTap):
                base = WindowAttention if isinstance(m, WindowAttention) else Attention
            if base is not None:
                m.__dict__.pop('broad_scale', None)
                m.__dict__.pop('broad_rel_pos_bias', None)
                m.__dict__.pop('broad_layers', None)
                m.__dict__.pop('_broad_tap', None)
                m.__class__ = base
        _record_settings(model)
    elif hasattr(model, 'broad') and hasattr(model, 'broad_scale'):
        model.broad = False
        _record_settings(model)
    return model


__all__ = [
    'add_broad_attention', 'remove_broad_attention', 'set_broad_scale', 'has_broad_attention',
    'broad_variant', 'split_broad_name', 'BROAD_PREFIX',
    'BroadAttention', 'BroadWindowAttention', 'BroadVisionTransformer',
    'BroadSwinTransformerStage', 'BroadSwinTransformer', 'SUPPORTED',
]
