"""Building blocks of BViT: attention that hands on its q, k, v, and the broad attention.

Shapes use B (batch), N (tokens, class token included), H (heads), d (head dim), L (layers).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from timm.layers import DropPath, Mlp

QKV = Tuple[Tensor, Tensor, Tensor]


class Attention(nn.Module):
    """Multi-head self-attention that also returns its q, k, v.

    ``qkv`` is one Linear(D, 3·H·d) laid out (3, H, d), as in the release's ``to_qkv``;
    ``proj`` maps the H·d concatenated heads back to D.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int = 64,
            qkv_bias: bool = False,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tuple[Tensor, QKV]:
        """x: (B, N, D) -> (out (B, N, D), (q, k, v) each (B, H, N, d))."""
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0., scale=self.scale)
        out = out.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(out)), (q, k, v)


class Block(nn.Module):
    """Pre-norm transformer block, ``x + attn(LN(x))`` then ``x + MLP(LN(x))``, returning q, k, v too."""

    def __init__(
            self,
            dim: int,
            num_heads: int,
            head_dim: int = 64,
            mlp_ratio: float = 4.,
            qkv_bias: bool = False,
            proj_drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_eps: float = 1e-5,
            act_layer: Type[nn.Module] = nn.GELU,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, head_dim, qkv_bias, attn_drop, proj_drop)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0. else nn.Identity()

    def forward(self, x: Tensor) -> Tuple[Tensor, QKV]:
        """x: (B, N, D) -> (x (B, N, D), (q, k, v) each (B, H, N, d))."""
        out, qkv = self.attn(self.norm1(x))
        x = x + self.drop_path1(out)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return x, qkv


def _pool_groups(width: int, out_dim: int, head_width: int) -> Optional[int]:
    """Group size g when adaptive average pooling width -> out_dim averages runs of g values that
    never cross a head boundary (so pooling V before the attention product is exact), else None."""
    if width % out_dim:
        return None
    g = width // out_dim
    return g if head_width % g == 0 else None


def broad_attention(
        q: Sequence[Tensor],
        k: Sequence[Tensor],
        v: Sequence[Tensor],
        out_dim: int,
        scale: Optional[float] = None,
) -> Tensor:
    """Parameter-free broad attention over L layers (BViT, arXiv 2202.06268, Sec. III).

    Args:
        q: L tensors (B, H, Nq, d): the queries of the rows wanted (all N tokens, or the class
            token alone for classification).
        k, v: L tensors (B, H, N, d).
        out_dim: width D the (B, Nq, H·L·d) output is adaptively average-pooled to.
        scale: logit scale; d^-0.5 of one layer's head (the release's choice) when None.

    Returns:
        (B, Nq, out_dim): ``adaptive_avg_pool1d(concat_h softmax(Q Kᵀ·scale) V, out_dim)`` with
        Q, K, V the layer-wise concatenations along the channel axis.

    Average pooling is linear, so it commutes with the attention product: when the pooling
    groups stay inside one head (always for the released configurations), V is pooled first and
    the value width shrinks from L·d to D/H, which is exact and L times cheaper.

    When fewer rows are asked for than there are tokens (the class token alone, for
    classification), Q Kᵀ = Σ_l q_l k_lᵀ and O = concat_l(A v_l) are computed layer by layer,
    which never copies the L layers' keys and values into one wide tensor.
    """
    if scale is None:
        scale = q[0].shape[-1] ** -0.5
    B, H, Nq, _ = q[0].shape
    if Nq < k[0].shape[-2]:
        logits = q[0] @ k[0].transpose(-2, -1)
        for qi, ki in zip(q[1:], k[1:]):
            logits = logits + qi @ ki.transpose(-2, -1)
        attn = (logits * scale).softmax(-1)
        out = torch.cat([attn @ vi for vi in v], -1).transpose(1, 2).reshape(B, Nq, -1)
        return F.adaptive_avg_pool1d(out, out_dim)
    Q, K, V = torch.cat(list(q), -1), torch.cat(list(k), -1), torch.cat(list(v), -1)
    E = Q.shape[-1]
    g = _pool_groups(H * E, out_dim, E)
    if g is not None and g > 1:
        V = V.unflatten(-1, (E // g, g)).mean(-1)
    out = F.scaled_dot_product_attention(Q, K, V, scale=scale)
    out = out.transpose(1, 2).reshape(B, Nq, -1)
    if g is None:
        out = F.adaptive_avg_pool1d(out, out_dim)
    return out


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Explicit softmax(q kᵀ·scale): (B, H, Nq, d), (B, H, N, d) -> (B, H, Nq, N)."""
    return (q @ k.transpose(-2, -1) * scale).softmax(-1)


def broad_attention_probs(q: Sequence[Tensor], k: Sequence[Tensor], scale: float) -> Tensor:
    """Explicit broad map: the softmax of the sum of every layer's logits, (B, H, Nq, N)."""
    logits = torch.stack([qi @ ki.transpose(-2, -1) for qi, ki in zip(q, k)]).sum(0)
    return (logits * scale).softmax(-1)


def grid_from_rows(rows: int, num_prefix_tokens: int = 1) -> Tuple[int, int]:
    """Square (h, w) grid of a position table with ``rows`` rows, prefix tokens first."""
    side = math.isqrt(rows - num_prefix_tokens)
    if side * side != rows - num_prefix_tokens:
        raise ValueError(f'a position table of {rows} rows is not a square grid plus {num_prefix_tokens} prefix token(s)')
    return side, side


__all__: List[str] = [
    'Attention', 'Block', 'broad_attention', 'attention_probs', 'broad_attention_probs', 'grid_from_rows']
