"""BViT: Broad Attention based Vision Transformer (Li et al., arXiv 2202.06268, IEEE TNNLS 2024).

Importing this module registers ``bvit_5m`` and ``bvit_22m`` with timm, so
``timm.create_model('bvit_5m', num_classes=10)`` works like any other ViT. The defaults are the
released architecture (docs/model.md; README, "Where this differs"): a 7x7 stride-2 conv stem, a linear
patch embedding (stored as a Conv2d), no qkv bias, LayerNorm eps 1e-5, and the broad attention
output, scaled by 0.4 and pooled to the embedding width, added to every token of the last layer.
"""

import math
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_function, resample_abs_pos_embed, resample_patch_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices  # no public name; timm's own ViT imports it from here

from .checkpoint import check_backbone, checkpoint_globals, unwrap_state_dict
from .layers import Block, BroadBlocks, BroadTap, BroadTerms, attention_probs, broad_group, broad_layers_of, broad_probs

_int_or_pair = Union[int, Tuple[int, int]]

# The helpers below that branch on shapes are leaves for torch.fx.symbolic_trace (and so
# torchvision's create_feature_extractor): a trace records a call to them instead of tracing
# through. timm's own FX tracer learns the same from ``register_notrace_function``. The broad
# attention's own leaves are declared in bvit.layers.


def _pair(x: _int_or_pair) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def _stem_out(h: int, w: int, conv_stem: bool) -> Tuple[int, int]:
    """Pixels after the stem: the conv stem (7x7, stride 2, padding 3) gives ceil(s / 2)."""
    return ((h + 1) // 2, (w + 1) // 2) if conv_stem else (h, w)


def patch_grid(img_size: _int_or_pair, patch_size: int, stem: str = 'conv') -> Tuple[int, int]:
    """The (h, w) patch grid of a BViT for ``img_size``: the conv stem (7x7, stride 2, padding 3)
    gives ceil(s / 2) pixels, then ``patch_size`` patches. ValueError when they do not divide."""
    if stem not in ('conv', 'none'):
        raise ValueError(f"stem must be 'conv' or 'none', got {stem!r}")
    size = _pair(img_size)
    stem_out = _stem_out(size[0], size[1], stem == 'conv')
    if any(s % patch_size for s in stem_out):
        raise ValueError(
            f'image size {size} gives {stem_out} after the {stem!r} stem, '
            f'which is not divisible by patch size {patch_size}')
    return stem_out[0] // patch_size, stem_out[1] // patch_size


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in ('', 'token', 'avg'):
        raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")


@register_notrace_function
def _check_image(x: Tensor, in_chans: int, img_size: Tuple[int, int], patch_size: int, conv_stem: bool,
                 dynamic: bool, pad: bool) -> None:
    """ValueError unless ``x`` is (B, in_chans, H, W) with H, W the model's size or, with a
    dynamic size, any size whose patch grid fits (or is padded to fit)."""
    h, w = x.shape[-2], x.shape[-1]
    fits = x.dim() == 4 and x.shape[1] == in_chans
    if dynamic:
        sh, sw = _stem_out(h, w, conv_stem)
        fits = fits and (pad or (sh % patch_size == 0 and sw % patch_size == 0))
    else:
        fits = fits and h == img_size[0] and w == img_size[1]
    if not fits:
        if dynamic:
            raise ValueError(f'BViT expects images of shape (B, {in_chans}, H, W) whose size after the stem is '
                             f'divisible by the patch size {patch_size}, got {list(x.shape)}')
        raise ValueError(f'BViT expects images of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}), got '
                         f'{list(x.shape)}; build the model with img_size/in_chans to match, or with '
                         f'dynamic_img_size=True')


torch.fx.wrap('_check_image')


@register_notrace_function
def _pad_to_patch(x: Tensor, patch_size: int) -> Tensor:
    """Zero-pad (B, C, H, W) on the bottom/right to multiples of ``patch_size``."""
    ph, pw = (-x.shape[-2]) % patch_size, (-x.shape[-1]) % patch_size
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


torch.fx.wrap('_pad_to_patch')


@register_notrace_function
def _pos_for_grid(pos_embed: Tensor, grid: Tuple[int, int], h: int, w: int, num_prefix: int) -> Tensor:
    """The position rows for an (h, w) patch grid: :func:`resample_pos_embed` of the table from
    its own grid (its used rows as they are at that grid)."""
    return resample_pos_embed(pos_embed, grid, (h, w), num_prefix_tokens=num_prefix)


torch.fx.wrap('_pos_for_grid')


class AttentionMaps(NamedTuple):
    """Explicit attention probabilities of one forward pass (softmax rows, sum to 1).

    layers: L tensors (B, H, N+1, N+1), one per block. broad: (B, H, N+1, N+1), the broad
    attention, i.e. the softmax of the sum of all layers' logits. grid_size: the (h, w) patch grid,
    so ``maps.broad[:, :, 0, 1:].reshape(B, H, *grid_size)`` is the class token's map.
    """
    layers: List[Tensor]
    broad: Tensor
    grid_size: Tuple[int, int]


class BViT(BroadBlocks, nn.Module):
    """Vision transformer with broad attention (BViT).

    Every block hands its (q, k, v) to a parameter-free broad attention over all L layers; its
    output, pooled to the embedding width and scaled by ``broad_scale``, joins the last layer's
    tokens before the norm and the head. The blocks run in :meth:`bvit.layers.BroadBlocks._run_blocks`.
    """

    def __init__(
            self,
            img_size: _int_or_pair = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            head_dim: int = 64,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            stem: str = 'conv',
            broad: bool = True,
            broad_scale: float = 0.4,
            broad_layers: Union[None, int, Sequence[int]] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_eps: float = 1e-5,
            dynamic_img_size: bool = False,
            dynamic_img_pad: bool = False,
    ) -> None:
        """
        Args:
            img_size: input size (int or (h, w)); the position table is sized for it.
            patch_size: side p of the square patches (after the stem).
            in_chans: image channels.
            num_classes: classes of the head; 0 makes ``forward`` return the pooled features.
            global_pool: 'token' (class token, as released), 'avg' (mean of the patch tokens) or
                '' (no pooling: the head sees every token).
            embed_dim, depth, num_heads, head_dim, mlp_ratio, qkv_bias: transformer width D,
                layers L, heads H, head dim d, MLP hidden D·mlp_ratio, bias of the qkv projection.
            stem: 'conv' (released: 7x7 stride-2 conv, in_chans -> in_chans, so 224 gives 7x7
                patches) or 'none' (plain patchify, 14x14 patches at 224).
            broad: add broad attention; False gives the same network and parameters without it.
            broad_scale: weight of the broad output (0.4 as released).
            broad_layers: the blocks that feed the broad attention: None for all (as released),
                an int k for the last k, or a list of block indices (:func:`bvit.layers.broad_layers_of`).
            drop_rate: dropout after the position embedding, in attention/MLP outputs and before the head.
            attn_drop_rate: dropout on attention probabilities of the blocks.
            drop_path_rate: stochastic depth, linearly increasing to this value over the blocks.
            norm_eps: LayerNorm eps (PyTorch's default 1e-5, as released; timm's ViT uses 1e-6).
            dynamic_img_size: accept any input whose patch grid fits, the position table
                resampled on the fly (default False: exactly ``img_size``, as released).
            dynamic_img_pad: with a dynamic size, zero-pad the stem's output to whole patches.
        """
        super().__init__()
        _check_global_pool(global_pool)
        self.grid_size: Tuple[int, int] = patch_grid(img_size, patch_size, stem)
        self.img_size: Tuple[int, int] = _pair(img_size)
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = embed_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.num_prefix_tokens = 1
        self.stem_type = stem
        self.broad = broad
        self.broad_scale = broad_scale
        self.broad_layers = broad_layers_of(broad_layers, depth)
        self.dynamic_img_size = dynamic_img_size
        self.dynamic_img_pad = dynamic_img_pad
        self.grad_checkpointing = False

        self.stem: nn.Module = (nn.Conv2d(in_chans, in_chans, kernel_size=7, stride=2, padding=3)
                                if stem == 'conv' else nn.Identity())
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        # Linear(in_chans·p², D) on each patch, stored as the equivalent Conv2d (faster).
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # As released, the table is sized for the image without the stem ((224/16)² + 1 = 197
        # rows) and only its first N+1 rows are used; keeping it makes the parameter count and
        # the checkpoint layout those of the release.
        self.pos_embed = nn.Parameter(torch.zeros(1, self._table_rows(self.img_size, patch_size), embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)

        dpr = [r.item() for r in torch.linspace(0, drop_path_rate, depth)]
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, head_dim, mlp_ratio, qkv_bias, proj_drop=drop_rate,
                  attn_drop=attn_drop_rate, drop_path=dpr[i], norm_eps=norm_eps)
            for i in range(depth)])
        if broad:
            self._broad_group()  # ValueError now for a width the broad attention cannot pool
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = patch_size * (2 if stem == 'conv' else 1)
        self.feature_info = [dict(module=f'blocks.{i}', num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self._traits = {'first_conv': 'stem' if stem == 'conv' else 'patch_embed'}
        self.init_weights()

    @staticmethod
    def _table_rows(img_size: Tuple[int, int], patch_size: int) -> int:
        return (img_size[0] // patch_size) * (img_size[1] // patch_size) + 1

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # timm conventions -------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(stem=r'^cls_token|pos_embed|stem|patch_embed', blocks=[(r'^blocks\.(\d+)', None), (r'^norm', (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a fresh Linear(D, num_classes) (Identity for 0); ``global_pool``
        as in the constructor ('' keeps every token)."""
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def set_input_size(self, img_size: Optional[_int_or_pair] = None, patch_size: Optional[int] = None) -> None:
        """Rebuild for another input size and/or patch size: the position table is resampled to
        the new grid (timm's ``resample_abs_pos_embed``), the patch kernel with timm's
        ``resample_patch_embed`` (FlexiViT). The model then expects exactly that size."""
        size = _pair(img_size) if img_size is not None else self.img_size
        patch = patch_size or self.patch_size
        grid = patch_grid(size, patch, self.stem_type)
        with torch.no_grad():
            if patch != self.patch_size:
                kernel = resample_patch_embed(self.patch_embed.weight, [patch, patch])
                conv = nn.Conv2d(self.in_chans, self.embed_dim, kernel_size=patch, stride=patch)
                conv.weight.copy_(kernel)
                conv.bias.copy_(self.patch_embed.bias)
                self.patch_embed = conv.to(self.patch_embed.weight.device)
            table = resample_pos_embed(self.pos_embed.detach(), self.grid_size, grid,
                                       num_rows=self._table_rows(size, patch), num_prefix_tokens=self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(table.clone())
        reduction = patch * (2 if self.stem_type == 'conv' else 1)
        for info in self.feature_info:
            info['reduction'] = reduction
        self.img_size, self.patch_size, self.grid_size = size, patch, grid
        self.num_patches = grid[0] * grid[1]
        if hasattr(self, '_traits'):
            self._traits['img_size'] = size

    # forward ----------------------------------------------------------------------------------

    def _embed(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> tokens (B, N+1, D), class token first."""
        _check_image(x, self.in_chans, self.img_size, self.patch_size, self.stem_type == 'conv',
                     self.dynamic_img_size, self.dynamic_img_pad)
        x = self.stem(x)
        if self.dynamic_img_pad:
            x = _pad_to_patch(x, self.patch_size)
        x = self.patch_embed(x)                                                   # (B, D, h, w)
        if self.dynamic_img_size:
            pos = _pos_for_grid(self.pos_embed, self.grid_size, x.shape[-2], x.shape[-1], self.num_prefix_tokens)
        else:
            pos = self.pos_embed[:, :self.num_patches + self.num_prefix_tokens]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos)

    def _broad_group(self) -> int:
        return broad_group(len(self.broad_layers), self.num_heads, self.head_dim, self.embed_dim)

    def _broad_terms(self, rows: int, like: Tensor, weight: float) -> Optional[BroadTerms]:
        """What collects the broad terms of the query rows [0, rows), to be added with ``weight``
        (None when broad attention is off)."""
        return BroadTerms(rows, self._broad_group(), self.head_dim, like, weight, self.broad_layers) if self.broad else None

    def _add_broad(self, terms: BroadTerms, into: Tensor) -> Tensor:
        """``into`` (B, R, D) or (B, D) plus the weighted broad output of the blocks' terms
        (:func:`bvit.layers.broad_output`)."""
        return terms.output(self.head_dim, self.head_dim ** -0.5, into)

    def forward_features(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> normed tokens (B, N+1, D), broad output added on every token."""
        x = self._embed(x)
        terms = self._broad_terms(x.shape[1], x, self.broad_scale)
        x, _ = self._run_blocks(x, terms)
        if terms is not None:
            x = self._add_broad(terms, x)
        return self.norm(x)

    @torch.jit.ignore
    def forward_broad(self, x: Tensor) -> Tensor:
        """Images -> the broad attention's pooled output (B, N+1, D), before ``broad_scale``:
        ``forward_features(x) == norm(x_L + broad_scale * forward_broad(x))``."""
        x = self._embed(x)
        terms = BroadTerms(x.shape[1], self._broad_group(), self.head_dim, x, 1., self.broad_layers)
        x, _ = self._run_blocks(x, terms)
        return self._add_broad(terms, torch.zeros_like(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Tokens (B, N+1, D) -> logits (B, classes), or pooled features (B, D) with pre_logits;
        with ``global_pool=''`` every token goes through the head: (B, N+1, classes or D)."""
        if self.global_pool == 'avg':
            x = x[:, self.num_prefix_tokens:].mean(1)
        elif self.global_pool == 'token':
            x = x[:, 0]
        return self._head(x, pre_logits)

    def _head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled features (..., D) -> logits (..., classes), or the features with pre_logits."""
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images (B, C, H, W) -> logits (B, num_classes), or (B, D) features if num_classes == 0.

        Equal to ``forward_head(forward_features(x))``. With the class-token head only the class
        token's row of the broad attention reaches the output, so only that row is computed.
        """
        if not self.broad or self.global_pool != 'token':
            return self.forward_head(self.forward_features(x))
        x = self._embed(x)
        terms = BroadTerms(1, self._broad_group(), self.head_dim, x, self.broad_scale, self.broad_layers)
        x, _ = self._run_blocks(x, terms)
        return self._head(self.norm(self._add_broad(terms, x[:, 0])))

    @torch.jit.ignore
    def forward_intermediates(
            self,
            x: Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            return_prefix_tokens: bool = False,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[Any], Tuple[Tensor, List[Any]]]:
        """Block outputs for feature extraction, as timm's ViTs give them.

        Args:
            indices: the last n blocks (int), the blocks listed (negative from the end), or all (None).
            return_prefix_tokens: each intermediate becomes (patch tokens, class token (B, 1, D)).
            norm: pass the intermediates through the final norm.
            stop_early: with ``intermediates_only``, stop after the last block wanted.
            output_fmt: 'NCHW' -> (B, D, h, w) patch maps; 'NLC' -> (B, h·w, D).
            intermediates_only: return only the list.
        Returns:
            (final features (B, N+1, D) as ``forward_features`` gives them, broad output
            included, intermediates), or the intermediates alone. The intermediates are the
            blocks' outputs x_l, before any broad attention (it joins only the last layer's
            tokens); ``forward_broad`` gives the broad output itself.
        """
        if output_fmt not in ('NCHW', 'NLC'):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take, last = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        grid_h, grid_w = self._grid_of(height, width)
        depth = last + 1 if stop_early and intermediates_only else -1
        terms = None if intermediates_only else self._broad_terms(x.shape[1], x, self.broad_scale)
        x, taken = self._run_blocks(x, terms, take, depth)
        if norm:
            taken = [self.norm(t) for t in taken]
        out: List[Any] = []
        for t in taken:
            patches = t[:, self.num_prefix_tokens:]
            if output_fmt == 'NCHW':
                patches = patches.reshape(B, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous()
            out.append((patches, t[:, :self.num_prefix_tokens]) if return_prefix_tokens else patches)
        if intermediates_only:
            return out
        if terms is not None:
            x = self._add_broad(terms, x)
        return self.norm(x), out

    def _grid_of(self, height: int, width: int) -> Tuple[int, int]:
        """Patch grid of an input of this size (the model's own, or any with a dynamic size)."""
        if not self.dynamic_img_size:
            return self.grid_size
        h, w = _stem_out(height, width, self.stem_type == 'conv')
        p = self.patch_size
        return (h + p - 1) // p, (w + p - 1) // p

    @torch.jit.ignore
    def prune_intermediate_layers(
            self,
            indices: Union[int, List[int]] = 1,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> List[int]:
        """Drop the blocks after the last one in ``indices`` (and the head, and with
        ``prune_norm`` the final norm), for a feature extractor. Returns the kept indices.
        The broad attention of a pruned model spans the blocks that remain."""
        take, last = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:last + 1]
        self.feature_info = self.feature_info[:last + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, '')
        return take

    @torch.jit.ignore
    def attention_maps(self, x: Tensor) -> AttentionMaps:
        """Explicit attention maps of every layer and of the broad attention, for inspection.

        Materialises the (N+1) x (N+1) maps that the normal forward never builds. Wrap the call in
        ``torch.no_grad()`` unless gradients through the maps are wanted.
        """
        grid = self._grid_of(x.shape[-2], x.shape[-1])
        x = self._embed(x)
        terms = _MapTerms(x.shape[1], self._broad_group(), self.head_dim, x, self.broad_layers)
        self._run_blocks(x, terms)
        scale = self.head_dim ** -0.5
        layers = [attention_probs(q, k, scale) for q, k in terms.qk]
        return AttentionMaps(layers, broad_probs(terms.logits, scale), grid)


class _MapTap(BroadTap):
    """A :class:`~bvit.layers.BroadTap` that also keeps the layer's q, k, for ``attention_maps``
    (every block's; only a block that ``fed`` the broad attention records its terms)."""

    def __init__(self, rows: int, layer: int, pool: Tensor, total: Optional[Tensor], fed: bool) -> None:
        super().__init__(rows, layer, pool, total)
        self.fed = fed

    def record(self, qkv: Tensor) -> None:
        if self.fed:
            super().record(qkv)
        self.q, self.k = qkv[0], qkv[1]


class _MapTerms(BroadTerms):
    """:class:`~bvit.layers.BroadTerms` that also keep every block's q, k (``qk``), for ``attention_maps``."""

    def __init__(self, rows: int, group: int, head_dim: int, like: Tensor, layers: List[int]) -> None:
        super().__init__(rows, group, head_dim, like, 1., layers)
        self.qk: List[Tuple[Tensor, Tensor]] = []

    def tap(self, block: int) -> BroadTap:
        fed = self.layers is None or block in self.layers
        return _MapTap(self.rows, len(self.values), self.pool, self.logits, fed)

    def add(self, tap: BroadTap) -> None:
        if tap.fed:
            super().add(tap)
        self.qk.append((tap.q, tap.k))


# Released checkpoints ---------------------------------------------------------------------------

# Key renames from the released layout (vit-pytorch style) to this module's.
_OFFICIAL_RENAMES = [
    (r'^conv\.', 'stem.'),
    (r'^to_patch_embedding\.1\.', 'patch_embed.'),
    (r'^pos_embedding$', 'pos_embed'),
    (r'^transformer\.layers\.(\d+)\.0\.norm\.', r'blocks.\1.norm1.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.', r'blocks.\1.attn.qkv.'),
    (r'^transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.', r'blocks.\1.attn.proj.'),
    (r'^transformer\.layers\.(\d+)\.1\.norm\.', r'blocks.\1.norm2.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.net\.0\.', r'blocks.\1.mlp.fc1.'),
    (r'^transformer\.layers\.(\d+)\.1\.fn\.net\.3\.', r'blocks.\1.mlp.fc2.'),
    (r'^mlp_head\.0\.', 'norm.'),
    (r'^mlp_head\.1\.', 'head.'),
]
def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """A released BViT state dict in this module's layout: keys renamed, and the release's Linear
    patch embedding, which flattens each patch as (row, column, channel), turned into the Conv2d
    kernel (D, C, p, p). Keys already in this layout pass unchanged."""
    sd = state_dict
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        for pattern, repl in _OFFICIAL_RENAMES:
            new = re.sub(pattern, repl, key)
            if new != key:
                if key == 'to_patch_embedding.1.weight':
                    chans = sd['conv.weight'].shape[0] if 'conv.weight' in sd else 3
                    dim, fan_in = value.shape
                    p = math.isqrt(fan_in // chans)
                    if p * p * chans != fan_in:
                        raise ValueError(f'{key}: {fan_in} inputs is not {chans}·p² for any patch size p')
                    value = value.reshape(dim, p, p, chans).permute(0, 3, 1, 2).contiguous()
                key = new
                break
        out[key] = value
    return out


def _saved_grid(sd: Mapping[str, Tensor]) -> Tuple[int, int]:
    """The patch grid a BViT state dict's position table was trained at. The table is sized for
    the image without the stem, (S // p)² + 1 rows as released, so S is one of side·p .. side·p +
    p - 1; the one whose grid fits the stem (at most one does) gives the grid."""
    rows = sd['pos_embed'].shape[1] - 1
    side = math.isqrt(rows)
    if side * side != rows:
        raise ValueError(f'pos_embed has {rows + 1} rows: not 1 + a square grid')
    p = sd['patch_embed.weight'].shape[-1] if 'patch_embed.weight' in sd else 16
    stem = 'conv' if 'stem.weight' in sd else 'none'
    for size in range(side * p, side * p + p):
        try:
            return patch_grid(size, p, stem)
        except ValueError:
            continue
    raise ValueError(f'pos_embed has {rows + 1} rows, which fit no image size with patch size {p} and stem {stem!r}')


def _adapt_in_chans(sd: Dict[str, Tensor], in_chans: int) -> None:
    """Change the input channels of the first convs in place (timm's ``adapt_input_conv``).

    Without the stem this is exact for a grey image repeated over the channels. The released
    stem maps C -> C channels, so both of its sides change: its input side as timm adapts a
    first conv, its output side by averaging the C filters for one channel (their mean feeds
    the patch embedding, whose input side is summed) or repeating them: an approximation.

    The input side is timm's ``adapt_input_conv(in_chans, w, base_chans=w.shape[1])`` (newer timm),
    written out here because timm 1.0.26, the floor, has no ``base_chans`` (it assumes 3): one
    channel sums the saved ones; more or fewer repeat them cyclically, cut at ``in_chans``, scaled
    by ``saved / in_chans``; computed in float32 and cast back to the weight's dtype.
    """
    def adapt(w: Tensor) -> Tensor:
        saved = w.shape[1]
        if in_chans == saved:
            return w
        v = w.float()
        if in_chans == 1:
            v = v.sum(dim=1, keepdim=True)
        else:
            v = v.repeat(1, -(-in_chans // saved), 1, 1)[:, :in_chans] * (saved / float(in_chans))
        return v.to(w.dtype)

    if 'stem.weight' in sd:
        w, b = sd['stem.weight'], sd['stem.bias']
        w = adapt(w)
        pick = torch.arange(in_chans) % w.shape[0]
        sd['stem.weight'] = w.float().mean(0, keepdim=True).to(w.dtype) if in_chans == 1 else w[pick]
        sd['stem.bias'] = b.float().mean(0, keepdim=True).to(b.dtype) if in_chans == 1 else b[pick]
    pe = sd['patch_embed.weight']
    sd['patch_embed.weight'] = adapt(pe)


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """Adapt BViT weights to ``model`` (a :class:`BViT`): the family filter that timm's
    ``pretrained=True`` door and :func:`bvit.checkpoint.load_checkpoint` call.

    ``state_dict``: a state dict (released layout or this module's), or a checkpoint holding one
    (:func:`bvit.checkpoint.unwrap_state_dict`, raw weights). Done here: the release's key names,
    its Linear patch embedding as a Conv2d kernel, the position table resampled (bicubic) from the
    checkpoint's patch grid to the model's and sized to the model's table, and the first convs
    adapted to the model's ``in_chans``. The classifier is left as saved; every other key must fit
    the model, so a state dict of another family is refused (ValueError naming the key), whatever
    the class count.
    """
    sd = convert_official_state_dict(unwrap_state_dict(state_dict))
    if 'pos_embed' in sd and 'patch_embed.weight' in sd:
        pe = sd['pos_embed']
        sd['pos_embed'] = resample_pos_embed(
            pe.float(), _saved_grid(sd), model.grid_size, num_rows=model.pos_embed.shape[1],
            num_prefix_tokens=model.num_prefix_tokens).to(pe.dtype)
    if 'patch_embed.weight' in sd and sd['patch_embed.weight'].shape[1] != model.in_chans:
        _adapt_in_chans(sd, model.in_chans)
    check_backbone(model, sd)
    return sd


def resample_pos_embed(
        pos_embed: Tensor,
        old_grid: Tuple[int, int],
        new_grid: Tuple[int, int],
        num_rows: Optional[int] = None,
        num_prefix_tokens: int = 1,
) -> Tensor:
    """Resize a position table (1, R, D) whose first rows are ``num_prefix_tokens`` + an
    ``old_grid`` patch grid (row-major) to ``new_grid``, bicubically; prefix rows are kept.

    Rows past the used ones (the release sizes its table for the image without the stem) are
    dropped; ``num_rows`` pads the result with zeros to a table of that many rows. When the grids
    are equal the table comes back unchanged (its first ``used`` rows, or all of it when
    ``num_rows`` is its own row count).
    """
    used = num_prefix_tokens + old_grid[0] * old_grid[1]
    same = old_grid[0] == new_grid[0] and old_grid[1] == new_grid[1]
    if same and num_rows is not None and num_rows == pos_embed.shape[1]:
        return pos_embed
    if pos_embed.shape[1] < used:
        raise ValueError(f'position table has {pos_embed.shape[1]} rows, fewer than the {used} of a '
                         f'{old_grid[0]}x{old_grid[1]} grid')
    if same:
        out = pos_embed[:, :used]
    else:
        out = resample_abs_pos_embed(pos_embed[:, :used], [new_grid[0], new_grid[1]], [old_grid[0], old_grid[1]],
                                     num_prefix_tokens=num_prefix_tokens)
    if num_rows is not None and num_rows > out.shape[1]:
        out = torch.cat([out, out.new_zeros(1, num_rows - out.shape[1], out.shape[2])], dim=1)
    return out


# Registration -----------------------------------------------------------------------------------

MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    'bvit_5m': dict(embed_dim=192, depth=12, num_heads=3, head_dim=64, mlp_ratio=4.),
    'bvit_22m': dict(embed_dim=384, depth=12, num_heads=6, head_dim=64, mlp_ratio=4.),
}
_ALIASES = {
    'bvit-5': 'bvit_5m', 'bvit_5': 'bvit_5m', 'bvit_5m': 'bvit_5m', 'bvit-5m': 'bvit_5m',
    'bvit-22': 'bvit_22m', 'bvit_22': 'bvit_22m', 'bvit-21': 'bvit_22m', 'bvit_21': 'bvit_22m',
    'bvit_22m': 'bvit_22m', 'bvit-22m': 'bvit_22m',
}


def resolve_arch(name: str) -> str:
    """Registered model name for a BViT architecture name, as spelled by the paper, the release
    or timm (case-insensitive): ``BViT-5``/``BViT_5``/``bvit_5m`` -> ``bvit_5m``,
    ``BViT-22``/``BViT-21``/``BViT_21``/``bvit_22m`` -> ``bvit_22m``. ValueError otherwise."""
    key = name.strip().lower()
    if key not in _ALIASES:
        known = ', '.join(['BViT-5', 'BViT_5', 'bvit_5m', 'BViT-22', 'BViT-21', 'BViT_21', 'bvit_22m'])
        raise ValueError(f'unknown BViT architecture {name!r}; known names: {known}')
    return _ALIASES[key]


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.875, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': 'stem', 'classifier': 'head',
        'paper_ids': 'arXiv:2202.06268', 'paper_name': 'BViT: Broad Attention based Vision Transformer',
        'license': 'apache-2.0', **kwargs,
    }


default_cfgs = generate_default_cfgs({'bvit_5m': _cfg(), 'bvit_22m': _cfg()})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> BViT:
    out_indices = kwargs.pop('out_indices', 3)
    args = {**MODEL_ARGS[variant], **kwargs}
    # features_only goes through timm's FeatureGetterNet, i.e. forward_intermediates: the last 3
    # blocks by default, as for timm's ViTs.
    with checkpoint_globals():  # pretrained files may hold the run's argparse.Namespace
        return build_model_with_cfg(
            BViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **args)


@register_model
def bvit_5m(pretrained: bool = False, **kwargs: Any) -> BViT:
    """BViT-5M (released ``BViT_5``): D=192, 12 layers, 3 heads of 64; 5.71M parameters."""
    return _create('bvit_5m', pretrained, **kwargs)


@register_model
def bvit_22m(pretrained: bool = False, **kwargs: Any) -> BViT:
    """BViT-22M (released ``BViT_21``): D=384, 12 layers, 6 heads of 64; 22.04M parameters."""
    return _create('bvit_22m', pretrained, **kwargs)


__all__ = [
    'BViT', 'AttentionMaps', 'bvit_5m', 'bvit_22m', 'resolve_arch', 'convert_official_state_dict',
    'checkpoint_filter_fn', 'resample_pos_embed', 'patch_grid', 'MODEL_ARGS',
]
