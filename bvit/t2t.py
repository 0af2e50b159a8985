"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT: Training Vision Transformers from Scratch on
ImageNet", ICCV 2021, arXiv 2101.11986) as timm models.

Importing :mod:`bvit.models` registers ``t2t_vit_7``, ``t2t_vit_10``, ``t2t_vit_12``,
``t2t_vit_14``, ``t2t_vit_19``, ``t2t_vit_24`` (Performer tokens-to-token layers) and
``t2t_vit_t_14``, ``t2t_vit_t_19``, ``t2t_vit_t_24`` (transformer tokens-to-token layers).

The model is timm's ``VisionTransformer`` with the tokens-to-token module as its patch embedding
(:class:`TokensToToken`), the sinusoid table of "Attention is all you need" as a non-trainable
``pos_embed`` Parameter, the class token, and timm ``Block`` s with ``timm.layers.Attention``, so
``bvit.broad.add_broad_attention(model, scale)`` converts it as any timm ViT; the constructor's
``broad=True, broad_scale=...`` (``timm.create_model('t2t_vit_14', broad=True)``) applies that
conversion. Parameter names,
shapes and counts (the Performer's fixed random features and the position table included, as the
authors count them) are those of the authors' models up to two renames that
:func:`checkpoint_filter_fn` undoes: their ``tokens_to_token.`` is ``patch_embed.`` here, and a
Performer layer's ``mlp.0.`` / ``mlp.2.`` are timm ``Mlp``'s ``mlp.fc1.`` / ``mlp.fc2.``.

Attention scale of the backbone blocks: ``head_dim ** -0.5`` (timm's), the scale the authors'
``main.py`` trains with and evaluates their released files with (it builds the model with
``pretrained=False``, which leaves ``qk_scale`` unset). Their factories set
``qk_scale = embed_dim ** -0.5`` only under ``pretrained=True``, a branch that loads no weights
(their default configs have no url); ``qk_scale`` reproduces it when wanted. Both
``pretrained=True`` and from-scratch models here use ``head_dim ** -0.5`` unless ``qk_scale`` is
given.
"""
from __future__ import annotations

import math
import re
from functools import partial
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import Mlp, resample_abs_pos_embed, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer

from .broad import add_broad_attention
from .checkpoint import check_backbone, checkpoint_globals, unwrap_state_dict

_int_or_pair = Union[int, Tuple[int, int]]

# (kernel, stride, padding) of the three soft splits.
SOFT_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))


def _pair(x: _int_or_pair) -> Tuple[int, int]:
    return (x, x) if isinstance(x, int) else (int(x[0]), int(x[1]))


def soft_split_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """Tokens along one side after a soft split (``nn.Unfold``) of ``size`` pixels or tokens."""
    return (size + 2 * padding - kernel) // stride + 1


def t2t_grid(img_size: _int_or_pair) -> Tuple[int, int]:
    """The (h, w) token grid after the three soft splits: 224 -> 56 -> 28 -> 14 per side. For sizes
    that are multiples of 16 it is size / 16, the authors' ``img_size // 16``."""
    h, w = _pair(img_size)
    for k, s, p in SOFT_SPLITS:
        h, w = soft_split_size(h, k, s, p), soft_split_size(w, k, s, p)
    if h < 1 or w < 1:
        raise ValueError(f'image size {_pair(img_size)} is too small for the soft splits (7/4/2, 3/2/1, 3/2/1)')
    return h, w


def sinusoid_pos_table(positions: int, dim: int) -> Tensor:
    """(1, positions, dim) float32 sinusoid table of "Attention is all you need", position p and
    column j: ``sin(p / 10000 ** (2 * (j // 2) / dim))`` for even j, ``cos(...)`` for odd j,
    computed in float64. Row 0 is the class token's, rows 1.. the tokens' in row-major order.

    timm's sin-cos helpers (``timm.layers.build_sincos2d_pos_embed``) build 2-D tables with the
    sines and cosines in separate halves; T2T-ViT uses this 1-D interleaved one.
    """
    pos = torch.arange(positions, dtype=torch.float64)[:, None]
    j = torch.arange(dim, dtype=torch.float64)
    angle = pos / torch.pow(10000.0, 2 * torch.div(j, 2, rounding_mode='floor') / dim)
    table = torch.where(torch.arange(dim) % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.float().unsqueeze(0)


def performer_features(x: Tensor, w: Tensor) -> Tensor:
    """Positive random features (B, T, d) -> (B, T, m) of the softmax kernel (Performer, FAVOR+):
    ``exp(w_i·x - |x|² / 2) / sqrt(m)``, so that ``φ(q)·φ(k)`` estimates ``exp(q·k)`` for rows
    ``w_i`` drawn from N(0, I). Computed in float32."""
    x = x.float()
    return torch.exp(torch.einsum('btd,md->btm', x, w) - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])


def performer_attention(q: Tensor, k: Tensor, v: Tensor, w: Tensor, eps: float = 1e-8) -> Tensor:
    """Linear-time estimate of ``softmax(q kᵀ) v`` (no logit scale), (B, T, d) each -> (B, T, d):
    ``φ(q) (φ(k)ᵀ v) / (φ(q) Σ_t φ(k_t) + eps)`` with :func:`performer_features`; float32."""
    qp, kp = performer_features(q, w), performer_features(k, w)
    norm = torch.einsum('btm,bm->bt', qp, kp.sum(dim=1)).unsqueeze(-1)
    kv = torch.einsum('btd,btm->bdm', v.float(), kp)
    return torch.einsum('btm,bdm->btd', qp, kv) / (norm + eps)


class TokenAttention(nn.Module):
    """Single-head attention of a transformer tokens-to-token layer, (B, N, dim) -> (B, N, out_dim).

    q, k, v are projected to ``out_dim`` (64) channels, the logits scaled by ``dim ** -0.5`` (the
    input width, as the authors' module computes its head dim), and the output is
    ``v + proj(softmax(q kᵀ · scale) v)``: the value is the skip connection, since the input has
    another width. timm's ``Attention`` returns no v and scales by its head dim, hence this module.
    """

    def __init__(self, dim: int, out_dim: int, qkv_bias: bool = False, attn_drop: float = 0.,
                 proj_drop: float = 0.) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.scale = dim ** -0.5
        self.qkv = nn.Linear(dim, out_dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(out_dim, out_dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, 1, self.out_dim).permute(2, 0, 3, 1, 4).unbind(0)  # (B, 1, N, d)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.,
                                           scale=self.scale)
        return v.squeeze(1) + self.proj_drop(self.proj(y.squeeze(1)))


class TokenTransformer(nn.Module):
    """Transformer tokens-to-token layer, (B, N, dim) -> (B, N, out_dim):
    ``y = attn(norm1(x))`` (:class:`TokenAttention`, value skip), then ``y + mlp(norm2(y))`` with an
    MLP of hidden width ``out_dim · mlp_ratio``."""

    def __init__(self, dim: int, out_dim: int, mlp_ratio: float = 1.) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenAttention(dim, out_dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, int(out_dim * mlp_ratio), out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TokenPerformer(nn.Module):
    """Performer tokens-to-token layer, (B, N, dim) -> (B, N, out_dim).

    ``k, q, v = kqv(norm1(x))`` (out_dim each, in that order), ``y = v + drop(proj(A))`` with A
    :func:`performer_attention` over ``m = out_dim · kernel_ratio`` fixed random features ``w``
    (rows orthonormal, scaled by sqrt(m); drawn once at construction, a Parameter with
    ``requires_grad=False`` that the checkpoint stores), then ``y + mlp(norm2(y))``. Dropout 0.1
    after the projection and after the MLP, as the authors' layer has.
    """

    def __init__(self, dim: int, out_dim: int, kernel_ratio: float = 0.5, attn_drop: float = 0.1,
                 mlp_drop: float = 0.1) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.eps = 1e-8
        self.kqv = nn.Linear(dim, 3 * out_dim)
        self.dp = nn.Dropout(attn_drop)
        self.proj = nn.Linear(out_dim, out_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(out_dim)
        self.mlp = Mlp(out_dim, out_dim, out_dim, drop=(0., mlp_drop))
        m = int(out_dim * kernel_ratio)
        self.w = nn.Parameter(torch.empty(m, out_dim), requires_grad=False)
        self.init_features()

    def init_features(self) -> None:
        """Draw the random features: orthonormal rows (``nn.init.orthogonal_``) times sqrt(m)."""
        if self.w.is_meta:
            return
        with torch.no_grad():
            nn.init.orthogonal_(self.w)
            self.w.mul_(math.sqrt(self.w.shape[0]))

    def forward(self, x: Tensor) -> Tensor:
        k, q, v = torch.split(self.kqv(self.norm1(x)), self.out_dim, dim=-1)
        x = v + self.dp(self.proj(performer_attention(q, k, v, self.w, self.eps)))
        return x + self.mlp(self.norm2(x))


class TokensToToken(nn.Module):
    """Tokens-to-token module, the patch embedding of T2T-ViT: images (B, C, H, W) -> tokens
    (B, h·w, D), or (B, h, w, D) for ``output_fmt='NHWC'`` (timm's dynamic-size path).

    Soft split 7x7 / stride 4 / padding 2 (``nn.Unfold``: (B, C·49, H/4·W/4) columns as tokens),
    a token layer to ``token_dim`` channels, re-structurization to a (token_dim, H/4, W/4) map, soft
    split 3/2/1, a second token layer, re-structurization, soft split 3/2/1, and a Linear from
    token_dim·9 to D: 224 px gives 3136, 784, then 196 tokens. The token layers are
    :class:`TokenPerformer` (``tokens_type='performer'``) or :class:`TokenTransformer`.
    The arguments are those timm's ``VisionTransformer`` passes to its ``embed_layer``.
    """

    def __init__(
            self,
            img_size: _int_or_pair = 224,
            patch_size: _int_or_pair = 16,
            in_chans: int = 3,
            embed_dim: int = 768,
            bias: bool = True,
            tokens_type: str = 'performer',
            token_dim: int = 64,
            strict_img_size: bool = True,
            output_fmt: Optional[str] = None,
            dynamic_img_pad: bool = False,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if _pair(patch_size) != (16, 16):
            raise ValueError(f'T2T-ViT has no patch size to choose: its soft splits give 16 px per token, got '
                             f'patch_size={patch_size}')
        if dynamic_img_pad:
            raise ValueError('T2T-ViT takes any image size its soft splits fit; dynamic_img_pad is not supported')
        if output_fmt not in (None, 'NLC', 'NHWC'):
            raise ValueError(f"output_fmt must be 'NLC' or 'NHWC', got {output_fmt!r}")
        if tokens_type not in ('performer', 'transformer'):
            raise ValueError(f"tokens_type must be 'performer' or 'transformer', got {tokens_type!r}")
        self.tokens_type = tokens_type
        self.in_chans = in_chans
        self.patch_size = (16, 16)
        self.flatten = output_fmt != 'NHWC'
        self.strict_img_size = strict_img_size
        self.soft_split0 = nn.Unfold(kernel_size=7, stride=4, padding=2)
        self.soft_split1 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        self.soft_split2 = nn.Unfold(kernel_size=3, stride=2, padding=1)
        layer = TokenPerformer if tokens_type == 'performer' else TokenTransformer
        self.attention1 = layer(in_chans * 7 * 7, token_dim)
        self.attention2 = layer(token_dim * 3 * 3, token_dim)
        self.project = nn.Linear(token_dim * 3 * 3, embed_dim, bias=bias)
        self.img_size: Tuple[int, int] = _pair(img_size)
        self.grid_size: Tuple[int, int] = t2t_grid(self.img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    def set_input_size(self, img_size: Optional[_int_or_pair] = None,
                       patch_size: Optional[_int_or_pair] = None) -> None:
        """Expect ``img_size`` from now on (timm's ``VisionTransformer.set_input_size`` then
        resamples the position table)."""
        if patch_size is not None and _pair(patch_size) != (16, 16):
            raise ValueError(f'T2T-ViT has no patch size to choose, got patch_size={patch_size}')
        if img_size is not None:
            self.img_size = _pair(img_size)
            self.grid_size = t2t_grid(self.img_size)
            self.num_patches = self.grid_size[0] * self.grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Union[int, Tuple[int, int]]:
        return 16 if as_scalar else (16, 16)

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """The token grid for an (H, W) image."""
        return t2t_grid(img_size)

    def forward(self, x: Tensor) -> Tensor:
        B, _, H, W = x.shape
        if self.strict_img_size:
            torch._assert(H == self.img_size[0] and W == self.img_size[1],
                          f'T2T-ViT built for {self.img_size[0]}x{self.img_size[1]} images; build it with '
                          'img_size=(H, W) of the input, or with dynamic_img_size=True')
        h = soft_split_size(H, 7, 4, 2)
        w = soft_split_size(W, 7, 4, 2)
        x = self.attention1(self.soft_split0(x).transpose(1, 2))            # (B, h·w, token_dim)
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        h, w = soft_split_size(h, 3, 2, 1), soft_split_size(w, 3, 2, 1)
        x = self.attention2(self.soft_split1(x).transpose(1, 2))            # (B, h·w, token_dim)
        x = x.transpose(1, 2).reshape(B, -1, h, w)
        h, w = soft_split_size(h, 3, 2, 1), soft_split_size(w, 3, 2, 1)
        x = self.project(self.soft_split2(x).transpose(1, 2))               # (B, h·w, D)
        if not self.flatten:
            x = x.reshape(B, h, w, -1)
        return x


def _init_authors(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class T2TViT(VisionTransformer):
    """T2T-ViT: the tokens-to-token module, then a ViT backbone over its tokens and a class token.

    A timm ``VisionTransformer`` (``forward_features``, ``forward_head``, ``reset_classifier``,
    ``forward_intermediates``, ``set_input_size``, ``dynamic_img_size`` are timm's) whose
    ``patch_embed`` is :class:`TokensToToken` and whose ``pos_embed`` is the fixed
    :func:`sinusoid_pos_table` (a Parameter with ``requires_grad=False``). Blocks: timm ``Block``
    with ``timm.layers.Attention``, no qkv bias, LayerNorm eps 1e-5, GELU MLP.
    """

    def __init__(
            self,
            img_size: _int_or_pair = 224,
            patch_size: _int_or_pair = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = 'token',
            embed_dim: int = 768,
            depth: int = 12,
            num_heads: int = 12,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            qk_scale: Optional[float] = None,
            tokens_type: str = 'performer',
            token_dim: int = 64,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            dynamic_img_size: bool = False,
            broad: bool = False,
            broad_scale: float = 0.4,
            broad_layers: Union[None, int, Sequence[int]] = None,
            device: Optional[Union[str, torch.device]] = None,
            dtype: Optional[torch.dtype] = None,
    ) -> None:
        """
        Args:
            img_size: input size (int or (h, w)); the token grid is :func:`t2t_grid` of it.
            patch_size: 16 only (the soft splits' stride); accepted for timm's interface.
            in_chans, num_classes, global_pool: as in timm's VisionTransformer.
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias: the backbone (width D, blocks L, heads,
                MLP hidden D·mlp_ratio, bias of the blocks' qkv projection).
            qk_scale: logit scale of the backbone blocks; None gives ``head_dim ** -0.5`` (how the
                authors train and evaluate). Another value switches those blocks to timm's explicit
                attention path (its fused path ignores ``Attention.scale``).
            tokens_type: 'performer' or 'transformer' token layers.
            token_dim: width of the token layers (64).
            drop_rate: dropout after the position table and in the blocks' projections and MLPs, as
                the authors apply it (none before the head).
            attn_drop_rate: dropout on the blocks' attention probabilities.
            drop_path_rate: stochastic depth, linearly increasing to this value over the blocks.
            dynamic_img_size: accept any input size, the position table resampled on the fly (timm).
            broad: add BViT's broad attention over the backbone blocks
                (:func:`bvit.broad.add_broad_attention`, the same parameters); False: the T2T-ViT.
            broad_scale: weight of the broad output (0.4, BViT's), with ``broad``.
            broad_layers: the blocks that feed it, with ``broad``: None for all, k for the last k,
                or a list of block indices (:func:`bvit.layers.broad_layers_of`).
            device, dtype: where and in which type to create the parameters (timm's factory kwargs).
        """
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            qkv_bias=qkv_bias, dynamic_img_size=dynamic_img_size, drop_rate=0., pos_drop_rate=drop_rate,
            proj_drop_rate=drop_rate, attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate,
            weight_init='skip', embed_layer=partial(TokensToToken, tokens_type=tokens_type, token_dim=token_dim),
            norm_layer=partial(nn.LayerNorm, eps=1e-5), device=device, dtype=dtype)
        self.tokens_type = tokens_type
        self.pos_embed.requires_grad_(False)
        self.qk_scale = qk_scale
        if qk_scale is not None:
            for blk in self.blocks:
                blk.attn.scale = float(qk_scale)
                blk.attn.fused_attn = False
        self.init_weights()
        if broad:
            add_broad_attention(self, broad_scale, broad_layers=broad_layers)

    @property
    def img_size(self) -> Tuple[int, int]:
        return self.patch_embed.img_size

    def set_input_size(self, img_size: Optional[_int_or_pair] = None,
                       patch_size: Optional[_int_or_pair] = None) -> None:
        """timm's, the resampled table kept fixed (timm 1.0.26 makes it a new trainable Parameter)."""
        super().set_input_size(img_size=img_size, patch_size=patch_size)
        self.pos_embed.requires_grad_(False)

    def init_weights(self, mode: str = '', needs_reset: bool = True) -> None:
        """The authors' initialisation: Linear weights truncated normal (std .02) and zero biases,
        LayerNorms (1, 0), the class token truncated normal (std .02), the sinusoid position
        table, the Performer features redrawn. ``mode`` must be '' (timm's other schemes do not apply)."""
        if mode:
            raise ValueError(f"T2T-ViT has one initialisation, got mode={mode!r}")
        with torch.no_grad():
            self.pos_embed.copy_(sinusoid_pos_table(self.pos_embed.shape[1], self.embed_dim))
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_authors)
        for m in self.modules():
            if isinstance(m, TokenPerformer):
                m.init_features()


def rename_authors_keys(sd: Mapping[str, Tensor]) -> Dict[str, Tensor]:
    """The authors' T2T-ViT key names to this module's (``tokens_to_token.`` -> ``patch_embed.``,
    a Performer layer's ``mlp.0.`` / ``mlp.2.`` -> ``mlp.fc1.`` / ``mlp.fc2.``); other keys unchanged."""
    out: Dict[str, Tensor] = {}
    for key, value in sd.items():
        key = re.sub(r'^tokens_to_token\.', 'patch_embed.', key)
        key = re.sub(r'^(patch_embed\.attention[12])\.mlp\.0\.', r'\1.mlp.fc1.', key)
        key = re.sub(r'^(patch_embed\.attention[12])\.mlp\.2\.', r'\1.mlp.fc2.', key)
        out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> Dict[str, Tensor]:
    """Adapt an authors' T2T-ViT state dict, or one of this project's, to ``model`` (a
    :class:`T2TViT`): the family filter that timm's ``pretrained=True`` door and
    :func:`bvit.checkpoint.load_checkpoint` call.

    ``state_dict``: a state dict or a checkpoint holding one (raw weights;
    :func:`bvit.checkpoint.unwrap_state_dict`). Their ``tokens_to_token.`` becomes ``patch_embed.``,
    a Performer layer's ``mlp.0.`` / ``mlp.2.`` become ``mlp.fc1.`` / ``mlp.fc2.``, and a position
    table of another grid (the checkpoint's taken as square, as the authors' are) is resampled
    bicubically to the model's (timm's ``resample_abs_pos_embed``, class row kept), as the authors'
    loader does for their 384 px model. The classifier is left as saved; every other key must fit
    (ValueError naming the key, or the channel count to build the model with).
    """
    out = rename_authors_keys(unwrap_state_dict(state_dict))
    pe = out.get('pos_embed')
    if pe is not None and tuple(pe.shape) != tuple(model.pos_embed.shape):
        side = math.isqrt(pe.shape[1] - 1)
        if side * side != pe.shape[1] - 1:
            raise ValueError(f'pos_embed has {pe.shape[1]} rows: not 1 + a square grid of tokens')
        out['pos_embed'] = resample_abs_pos_embed(
            pe.float(), list(model.patch_embed.grid_size), [side, side], num_prefix_tokens=1).to(pe.dtype)
    first = next((k for k in ('patch_embed.attention1.kqv.weight', 'patch_embed.attention1.attn.qkv.weight')
                  if k in out), None)
    if first is not None and out[first].shape[1] != model.in_chans * 49:
        raise ValueError(f'{first} takes {out[first].shape[1]} inputs ({out[first].shape[1] // 49} channels x 7x7), '
                         f'the model {model.in_chans * 49}: build it with in_chans={out[first].shape[1] // 49}')
    check_backbone(model, out)
    return out


# Registration -----------------------------------------------------------------------------------

T2T_MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    't2t_vit_7': dict(tokens_type='performer', embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.),
    't2t_vit_10': dict(tokens_type='performer', embed_dim=256, depth=10, num_heads=4, mlp_ratio=2.),
    't2t_vit_12': dict(tokens_type='performer', embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.),
    't2t_vit_14': dict(tokens_type='performer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.),
    't2t_vit_19': dict(tokens_type='performer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.),
    't2t_vit_24': dict(tokens_type='performer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.),
    't2t_vit_t_14': dict(tokens_type='transformer', embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.),
    't2t_vit_t_19': dict(tokens_type='transformer', embed_dim=448, depth=19, num_heads=7, mlp_ratio=3.),
    't2t_vit_t_24': dict(tokens_type='transformer', embed_dim=512, depth=24, num_heads=8, mlp_ratio=3.),
}


def arch_of_state_dict(sd: Mapping[str, Tensor]) -> Optional[str]:
    """The registered T2T-ViT name whose layout and shapes ``sd`` (this module's key names) has,
    read off its width, depth and token-layer type; None for other state dicts."""
    if 'patch_embed.project.weight' not in sd:
        return None
    width = sd['patch_embed.project.weight'].shape[0]
    depth = 0
    while f'blocks.{depth}.attn.qkv.weight' in sd:
        depth += 1
    tokens = 'performer' if 'patch_embed.attention1.w' in sd else 'transformer'
    for name, cfg in T2T_MODEL_ARGS.items():
        if (cfg['embed_dim'], cfg['depth'], cfg['tokens_type']) == (width, depth, tokens):
            return name
    return None


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '', 'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None,
        'crop_pct': 0.9, 'interpolation': 'bicubic', 'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN, 'std': IMAGENET_DEFAULT_STD,
        'first_conv': None, 'classifier': 'head',
        'paper_ids': 'arXiv:2101.11986',
        'paper_name': 'Tokens-to-Token ViT: Training Vision Transformers from Scratch on ImageNet',
        'origin_url': 'https://github.com/yitu-opensource/T2T-ViT', 'license': 'other', **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in T2T_MODEL_ARGS})


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> T2TViT:
    out_indices = kwargs.pop('out_indices', 3)
    with checkpoint_globals():  # the authors' files hold the run's argparse.Namespace
        return build_model_with_cfg(
            T2TViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
            feature_cfg=dict(out_indices=out_indices, feature_cls='getter'), **{**T2T_MODEL_ARGS[variant], **kwargs})


@register_model
def t2t_vit_7(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-7: Performer tokens-to-token, D=256, 7 blocks, 4 heads, MLP x2."""
    return _create('t2t_vit_7', pretrained, **kwargs)


@register_model
def t2t_vit_10(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-10: Performer tokens-to-token, D=256, 10 blocks, 4 heads, MLP x2."""
    return _create('t2t_vit_10', pretrained, **kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-12: Performer tokens-to-token, D=256, 12 blocks, 4 heads, MLP x2."""
    return _create('t2t_vit_12', pretrained, **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-14: Performer tokens-to-token, D=384, 14 blocks, 6 heads, MLP x3."""
    return _create('t2t_vit_14', pretrained, **kwargs)


@register_model
def t2t_vit_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-19: Performer tokens-to-token, D=448, 19 blocks, 7 heads, MLP x3."""
    return _create('t2t_vit_19', pretrained, **kwargs)


@register_model
def t2t_vit_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT-24: Performer tokens-to-token, D=512, 24 blocks, 8 heads, MLP x3."""
    return _create('t2t_vit_24', pretrained, **kwargs)


@register_model
def t2t_vit_t_14(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-14: transformer tokens-to-token, D=384, 14 blocks, 6 heads, MLP x3."""
    return _create('t2t_vit_t_14', pretrained, **kwargs)


@register_model
def t2t_vit_t_19(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-19: transformer tokens-to-token, D=448, 19 blocks, 7 heads, MLP x3."""
    return _create('t2t_vit_t_19', pretrained, **kwargs)


@register_model
def t2t_vit_t_24(pretrained: bool = False, **kwargs: Any) -> T2TViT:
    """T2T-ViT_t-24: transformer tokens-to-token, D=512, 24 blocks, 8 heads, MLP x3."""
    return _create('t2t_vit_t_24', pretrained, **kwargs)


__all__ = [
    'T2TViT', 'TokensToToken', 'TokenPerformer', 'TokenTransformer', 'TokenAttention', 'sinusoid_pos_table',
    'performer_features', 'performer_attention', 'soft_split_size', 't2t_grid', 'checkpoint_filter_fn', 'rename_authors_keys',
    'arch_of_state_dict', 'T2T_MODEL_ARGS', 'SOFT_SPLITS',
] + list(T2T_MODEL_ARGS)
