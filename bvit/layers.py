"""Building blocks of BViT: attention that hands on its q, k, v, and the broad attention.

Shapes use B (batch), N (tokens, class token included), H (heads), d (head dim), L (layers).
"""

from typing import List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
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
        return self.attend(self.qkv(x))

    def attend(self, qkv: Tensor) -> Tuple[Tensor, QKV]:
        """The attention on a qkv projection (B, N, 3·H·d + e): its first 3·H·d columns are
        q, k, v, laid out (3, H, d); any e columns after them are ignored (BViT's streamed
        inference appends its own to the same product). -> (out (B, N, D), (q, k, v))."""
        B, N, _ = qkv.shape
        inner = self.num_heads * self.head_dim
        qkv = qkv[:, :, :3 * inner].reshape(B, N, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
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
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tuple[Tensor, QKV, Tensor]:
        """x: (B, N, D) -> (x (B, N, D), (q, k, v) each (B, H, N, d), attention input (B, N, D)).
        With ``grad_checkpointing`` set, activations are recomputed in the backward pass."""
        if self._recompute():
            return self._checkpointed(x)
        return self._forward(x)

    def forward_attn(self, x: Tensor) -> Tuple[Tensor, QKV, Tensor]:
        """First half, ``x + attn(norm1(x))``: (x (B, N, D), (q, k, v), attention input (B, N, D))."""
        y = self.norm1(x)
        out, qkv = self.attn(y)
        return x + self.drop_path1(out), qkv, y

    def forward_mlp(self, x: Tensor) -> Tensor:
        """Second half, ``x + mlp(norm2(x))``: (B, N, D) -> (B, N, D)."""
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def forward_tokens(self, x: Tensor) -> Tensor:
        """The block's output (B, N, D) alone, its q, k, v and attention input let go before the
        MLP runs, so that in inference the MLP reuses their memory (the (B, N, 3·H·d) qkv output
        alive through the MLP had the broad-free bvit_5m(stem='none') peak at 77.4 MiB at batch
        32; 54.4 MiB without). A block with hooks, or one recomputed by gradient checkpointing,
        runs whole."""
        if not torch.jit.is_scripting() and (self._recompute() or self.has_hooks()):
            return self(x)[0]
        return self.forward_mlp(self.forward_attn(x)[0])

    def _recompute(self) -> bool:
        return self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()

    @torch.jit.unused
    def _checkpointed(self, x: Tensor) -> Tuple[Tensor, QKV, Tensor]:
        return checkpoint(self._forward, x, use_reentrant=False)

    def _forward(self, x: Tensor) -> Tuple[Tensor, QKV, Tensor]:
        x, qkv, y = self.forward_attn(x)
        return self.forward_mlp(x), qkv, y

    @torch.jit.unused
    def has_hooks(self) -> bool:
        """Whether calling the block runs any forward (pre-)hook, its own or a global one: paths
        that call its halves instead fall back to the whole call then, so that hooks still fire."""
        return has_forward_hooks(self)


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether calling any of ``modules`` would run a forward (pre-)hook, its own or a global one."""
    from torch.nn.modules import module as mod
    return bool(mod._global_forward_hooks or mod._global_forward_pre_hooks
                or any(m._forward_hooks or m._forward_pre_hooks for m in modules))


def _pool_groups(width: int, out_dim: int, head_width: int) -> Optional[int]:
    """Group size g when adaptive average pooling width -> out_dim averages runs of g values that
    never cross a head boundary (so pooling V before the attention product is exact), else None."""
    if width % out_dim:
        return None
    g = width // out_dim
    return g if head_width % g == 0 else None


def broad_attention(
        q: List[Tensor],
        k: List[Tensor],
        v: List[Tensor],
        out_dim: int,
        scale: Optional[float] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
) -> Tensor:
    """Parameter-free broad attention over L layers (BViT, arXiv 2202.06268, Sec. III).

    Args:
        q: L tensors (B, H, Nq, d): the queries of the rows wanted (all N tokens, or the class
            token alone for classification).
        k, v: L tensors (B, H, N, d) (v may have its own width dv).
        out_dim: width D the (B, Nq, H·L·dv) output is adaptively average-pooled to.
        scale: logit scale; d^-0.5 of one layer's head (the release's choice) when None.
        attn_mask, is_causal: as in ``F.scaled_dot_product_attention`` (boolean, True = attend,
            or an additive bias broadcastable to (B, H, Nq, N)), for backbones that mask.

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
    if Nq < k[0].shape[-2] and attn_mask is None and not is_causal:
        logits = q[0] @ k[0].transpose(-2, -1)
        for qi, ki in zip(q[1:], k[1:]):
            logits = logits + qi @ ki.transpose(-2, -1)
        attn = (logits * scale).softmax(-1)
        out = torch.cat([attn @ vi for vi in v], -1).transpose(1, 2).reshape(B, Nq, -1)
        return F.adaptive_avg_pool1d(out, out_dim)
    Q, K, V = torch.cat(q, -1), torch.cat(k, -1), torch.cat(v, -1)
    E = V.shape[-1]
    g = _pool_groups(H * E, out_dim, E)
    if g is not None and g > 1:
        V = V.unflatten(-1, (E // g, g)).mean(-1)
    out = F.scaled_dot_product_attention(Q, K, V, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    out = out.transpose(1, 2).reshape(B, Nq, -1)
    if g is None:
        out = F.adaptive_avg_pool1d(out, out_dim)
    return out


class _BroadClassRow(torch.autograd.Function):
    """The class token's row of broad attention, from each layer's attention input y_l (B, N, D)
    and qkv weight, with a hand-written backward (see :func:`broad_attention_class_row`)."""

    @staticmethod
    def forward(ctx, num_heads: int, head_dim: int, scale: float, num_layers: int, *tensors: Tensor) -> Tensor:
        ys, weights, biases = tensors[:num_layers], tensors[num_layers:2 * num_layers], tensors[2 * num_layers:]
        H, d = num_heads, head_dim
        # Attention is kept token-major, (B, N, H), so that every product with a (B, N, D) input
        # reads it in its own layout (a transposed big operand would be copied by bmm).
        logits, q0s, rs = None, [], []
        for y, w, b in zip(ys, weights, biases or [None] * num_layers):
            wq, wk, _ = w.view(3, H, d, -1).unbind(0)
            q0 = torch.einsum('bc,hjc->bhj', y[:, 0], wq)                       # (B, H, d)
            if b is not None:
                q0 = q0 + b.view(3, H, d)[0]
            r = torch.einsum('bhj,hjc->bhc', q0, wk)                             # (B, H, D)
            # k's bias adds the same q0·b_k to every logit of a row: softmax ignores it.
            rt = r.transpose(1, 2).contiguous()                                  # (B, D, H), small
            logits = torch.baddbmm(logits, y, rt) if logits is not None else y @ rt  # (B, N, H)
            q0s.append(q0)
            rs.append(r)
        attn = (logits * scale).softmax(1)                                      # (B, N, H)
        attn_hn = attn.transpose(1, 2).contiguous()                             # (B, H, N), small
        outs, ybars = [], []
        for y, w, b in zip(ys, weights, biases or [None] * num_layers):
            ybar = attn_hn @ y                                                   # (B, H, D)
            o = torch.einsum('bhc,hjc->bhj', ybar, w.view(3, H, d, -1)[2])
            if b is not None:
                o = o + b.view(3, H, d)[2]                                       # rows of attn sum to 1
            outs.append(o)
            ybars.append(ybar)
        ctx.dims = (H, d, scale, num_layers, len(biases) > 0)
        ctx.save_for_backward(attn, *ys, *weights, *q0s, *rs, *ybars)
        return torch.stack(outs, 2)                                              # (B, H, L, d)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        H, d, scale, L, has_bias = ctx.dims
        attn, rest = ctx.saved_tensors[0], ctx.saved_tensors[1:]
        ys, weights, q0s, rs, ybars = (rest[i * L:(i + 1) * L] for i in range(5))
        grad_out = grad_out.to(attn.dtype)
        dattn = torch.zeros_like(attn)                                           # (B, N, H)
        dybars, dws, dbs = [], [], []
        for l in range(L):
            wv = weights[l].view(3, H, d, -1)[2]
            go = grad_out[:, :, l]                                                # (B, H, d)
            dybar = torch.einsum('bhj,hjc->bhc', go, wv)                         # (B, H, D)
            dattn.baddbmm_(ys[l], dybar.transpose(1, 2).contiguous())
            dybars.append(dybar)
            dws.append([None, None, torch.einsum('bhj,bhc->hjc', go, ybars[l])])
            dbs.append([None, None, go.sum(0)])
        dlogits = attn * (dattn - (dattn * attn).sum(1, keepdim=True)) * scale   # (B, N, H)
        dlogits_hn = dlogits.transpose(1, 2).contiguous()                        # (B, H, N), small
        dys = []
        paths = torch.cat([dlogits, attn], 2)                                    # (B, N, 2H)
        for l in range(L):
            y, w = ys[l], weights[l].view(3, H, d, -1)
            dr = dlogits_hn @ y                                                  # (B, H, D)
            dws[l][1] = torch.einsum('bhj,bhc->hjc', q0s[l], dr)
            dq0 = torch.einsum('bhc,hjc->bhj', dr, w[1])                         # (B, H, d)
            dws[l][0] = torch.einsum('bhj,bc->hjc', dq0, y[:, 0])
            dbs[l][0] = dq0.sum(0)
            dbs[l][1] = torch.zeros_like(dq0[0])
            # Both paths into y_l in one product: (B, N, 2H) @ (B, 2H, D).
            dy = paths @ torch.cat([rs[l], dybars[l]], 1)
            dy[:, 0] += torch.einsum('bhj,hjc->bc', dq0, w[0])
            dys.append(dy)
        dweights = [torch.stack(g).reshape(weights[0].shape) for g in dws]
        dbiases = [torch.stack(g).reshape(-1) for g in dbs] if has_bias else []
        return (None, None, None, None, *dys, *dweights, *dbiases)


def broad_attention_class_row(
        ys: Sequence[Tensor],
        qkv_weights: Sequence[Tensor],
        qkv_biases: Optional[Sequence[Tensor]],
        num_heads: int,
        head_dim: int,
        out_dim: int,
        scale: Optional[float] = None,
) -> Tensor:
    """The class token's row of :func:`broad_attention`, computed from the layers' inputs.

    Args:
        ys: L tensors (B, N, D): each block's attention input (its first LayerNorm's output).
        qkv_weights: L weights (3·H·d, D) of the blocks' qkv projections, laid out (3, H, d);
            qkv_biases: their biases (3·H·d) or None.
    Returns:
        (B, 1, out_dim), equal to ``broad_attention([q[:, :, :1]], k, v, out_dim, scale)``.

    For a class row, q_cls·k_lᵀ = (q_cls W_k) y_lᵀ and A v_l = (A y_l) W_vᵀ, so every product
    reads y_l once and is (B, H, ·) small; the backward folds both paths into y_l in one batched
    product per layer. This never touches the (B, H, N, d) keys and values or their gradients
    (README, "Speed of the broad attention", gives its measured share of a training step:
    ``python -m bvit.benchmark --head-share``).
    """
    if scale is None:
        scale = head_dim ** -0.5
    tensors = [*ys, *qkv_weights, *(qkv_biases or [])]
    dtype = torch.promote_types(ys[0].dtype, qkv_weights[0].dtype)
    with torch.autocast(ys[0].device.type, enabled=False):
        out = _BroadClassRow.apply(num_heads, head_dim, scale, len(ys), *[t.to(dtype) for t in tensors])
    B = out.shape[0]
    return F.adaptive_avg_pool1d(out.reshape(B, 1, -1).to(ys[0].dtype), out_dim)


# Streaming class row: what each layer leaves for the head ------------------------------------------
#
# The class row's output is pool(concat_l A v_l), with one map A for all layers. Pooling is linear
# and (when its groups stay inside a head: always for the released configurations) each pooled
# column of a head reads at most two adjacent layers. So each layer can hand over, as soon as it
# has run, its logits (added into one running sum) and its values already pooled to the few
# columns it reaches (v_l S_l, w = c1 - c0 ≈ d/g + 1 wide per head): a tenth of a layer's input
# for the released models, instead of the whole (B, N, D) input kept alive until the last layer.


def class_row_columns(layer: int, head_dim: int, group: int) -> Tuple[int, int]:
    """The columns [c0, c1) of one head's pooled output that layer ``layer``'s values reach,
    when the pooling averages runs of ``group`` values of the (layer, channel) axis."""
    return layer * head_dim // group, ((layer + 1) * head_dim - 1) // group + 1


def class_row_pooling(layer: int, head_dim: int, group: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(d, c1 - c0): the pooling restricted to layer ``layer``: column c averages the channels
    j of this layer with (layer·d + j) // group == c0 + c, weight 1/group."""
    c0, c1 = class_row_columns(layer, head_dim, group)
    cols = torch.div(torch.arange(head_dim, device=device) + layer * head_dim, group, rounding_mode='floor') - c0
    return (cols.unsqueeze(1) == torch.arange(c1 - c0, device=device).unsqueeze(0)).to(dtype) / group


def class_row_finish(
        logits: Tensor,
        pieces: List[Tensor],
        head_dim: int,
        group: int,
        out_dim: int,
        scale: float,
) -> Tensor:
    """The class row's pooled broad output (B, 1, out_dim) from the summed logits (B, H, N) and
    the layers' pooled values, pieces[l] (B, H, N, w_l) (the scriptable module path; eager
    inference has its own token-major finish, ``BViT._stream_finish``)."""
    H = logits.shape[1]
    attn = (logits * scale).softmax(2)
    vals = torch.cat(pieces, -1)
    red = (attn.unsqueeze(2) @ vals).squeeze(2)                                  # (B, H, W)
    cols = out_dim // H
    outs: List[Tensor] = []
    start = 0
    for layer in range(len(pieces)):
        c0, c1 = class_row_columns(layer, head_dim, group)
        outs.append(F.pad(red[..., start:start + c1 - c0], (c0, cols - c1)))
        start += c1 - c0
    out = torch.stack(outs, 0).sum(0)                                            # (B, H, cols)
    return out.reshape(out.shape[0], 1, out_dim)


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """Explicit softmax(q kᵀ·scale): (B, H, Nq, d), (B, H, N, d) -> (B, H, Nq, N)."""
    return (q @ k.transpose(-2, -1) * scale).softmax(-1)


def broad_attention_probs(q: Sequence[Tensor], k: Sequence[Tensor], scale: float) -> Tensor:
    """Explicit broad map: the softmax of the sum of every layer's logits, (B, H, Nq, N)."""
    logits = torch.stack([qi @ ki.transpose(-2, -1) for qi, ki in zip(q, k)]).sum(0)
    return (logits * scale).softmax(-1)


__all__: List[str] = [
    'Attention', 'Block', 'has_forward_hooks', 'broad_attention', 'broad_attention_class_row', 'attention_probs',
    'broad_attention_probs', 'class_row_columns', 'class_row_pooling', 'class_row_finish']
