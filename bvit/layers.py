"""Building blocks of BViT: timm's attention and block, and the broad attention.

Shapes use B (batch), N (tokens, class token included), R (query rows asked for), H (heads),
d (head dim), L (layers), D (embedding width).

The broad attention (BViT, arXiv 2202.06268, Sec. III) concatenates every layer's q, k, v along
the channel axis and computes ``adaptive_avg_pool1d(softmax(Q Kᵀ · d^-0.5) V, D)``, the output
laid out (B, N, H·L·d) with the index running head, layer, channel. Since Q Kᵀ = Σ_l q_l k_lᵀ
and pooling is linear, it is computed here layer by layer from two terms that each layer hands
over as soon as it has run, and one step at the end:

* :func:`broad_logits`: the running sum of the layers' logits q_l k_lᵀ (B, H, R, N);
* :func:`broad_values`: the layer's values summed over the pooling groups they fall into
  (B, H, N, w), w ≈ d / g + 1 of a head's columns (a tenth of d for the released models), as a
  product with :func:`broad_pool`'s 0/1 matrix (times weight / g);
* :func:`broad_output`: ``softmax(Σ logits · scale) @ values`` of every layer, summed into the
  groups it falls into (g: :func:`broad_group`) and added into the tokens given.

Each is a few operations over all heads at once (three a layer in inference), since on a GPU
every operation is a kernel launch.

These three functions are the definition: :func:`broad_attention` composes them for lists of
q, k, v. In the models a block's attention hands them over through a :class:`BroadTap`, and one
loop, :meth:`BroadBlocks._run_blocks`, runs the blocks and collects the terms in a
:class:`BroadTerms`; BViT and ``bvit.broad`` (timm's ViT, DeiT, Swin stages, T2T-ViT) share it.
A variant of broad attention is a change to the three functions or to :meth:`BroadTap.record`
(docs/model.md, "Writing a variant of broad attention").
"""

from typing import List, Optional, Sequence, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
import torch.fx
from torch.utils.checkpoint import checkpoint
from timm.layers import DropPath, Mlp, register_notrace_function, use_fused_attn


# The definition ----------------------------------------------------------------------------------

def broad_group(num_layers: int, num_heads: int, head_dim: int, out_dim: int) -> int:
    """Size g of the pooling groups: ``adaptive_avg_pool1d`` from W = H·L·d to D averages runs of
    g = W / D consecutive values of the (head, layer, channel) axis. ValueError unless D divides
    W and the runs stay inside one head (always so when H·d = D, as in every released model,
    timm's ViTs and Swin's stages: then g = L)."""
    width = num_heads * num_layers * head_dim
    if width % out_dim or (num_layers * head_dim) % (width // out_dim):
        raise ValueError(
            f'broad attention pools {num_heads} heads x {num_layers} layers x {head_dim} channels = {width} '
            f'values to {out_dim}: that needs whole groups of values inside one head (e.g. heads x head_dim = {out_dim})')
    return width // out_dim


def broad_layers_of(broad_layers: Union[None, int, Sequence[int]], depth: int) -> List[int]:
    """The blocks that feed the broad attention, as sorted indices: all ``depth`` for None (as
    released), the last k for an int k, or the indices of a list (negative ones count from the
    end). ValueError, naming the choice, for none or an index outside the blocks."""
    if broad_layers is None:
        return list(range(depth))
    if isinstance(broad_layers, int) and not isinstance(broad_layers, bool):
        if not 1 <= broad_layers <= depth:
            raise ValueError(f'broad_layers={broad_layers}: the last k layers need 1 <= k <= {depth} (the depth)')
        return list(range(depth - broad_layers, depth))
    indices = [int(i) for i in broad_layers]
    if not indices or any(not -depth <= i < depth for i in indices):
        raise ValueError(f'broad_layers={list(broad_layers)}: give layer indices in [{-depth}, {depth - 1}] '
                         f'(at least one), or an int k for the last k layers')
    return sorted({i % depth for i in indices})


def broad_pool(head_dim: int, group: int, like: Tensor, weight: float = 1.) -> Tensor:
    """The pooling as a product: Z (w·g, w) in ``like``'s dtype and device, Z[i, c] = weight / g when
    i // g == c, w = ⌈(g - 1 + d) / g⌉ (the most groups a layer can touch). A layer whose d
    channels start at o = (l·d) mod g of a group has them averaged into its w_l = ⌈(o + d) / g⌉
    groups, times ``weight``, by v @ Z[o:o + d, :w_l]. ``weight`` is the scale the model adds the
    broad output with."""
    w = (2 * group + head_dim - 2) // group
    eye = torch.eye(w, dtype=like.dtype, device=like.device)
    return (eye[:, None].expand(w, group, w) * (weight / group)).view(w * group, w)


@register_notrace_function
def broad_logits(total: Optional[Tensor], q: Tensor, k: Tensor) -> Tensor:
    """The broad logits summed up to this layer: total + q kᵀ, (B, H, R, N) (total None before the
    first layer); q: (B, H, R, d), k: (B, H, N, d).

    One product over the B·H heads, the sum in the same call (``baddbmm``); it reads q and k
    without a copy when (B, H) is one axis in memory (:meth:`BroadTap.record` hands them so).
    """
    B, H, R, d = q.shape
    qb, kt = q.reshape(B * H, R, d), k.reshape(B * H, -1, d).transpose(1, 2)
    logits = torch.bmm(qb, kt) if total is None else torch.baddbmm(total.view(B * H, R, -1), qb, kt)
    return logits.view(B, H, R, -1)


@register_notrace_function
def broad_values(v: Tensor, layer: int, pool: Tensor) -> Tensor:
    """One layer's values summed over the pooling groups they fall into: (B, H, N, d) -> (B, H, N, w).

    Layer l's channels j are the values l·d + j of a head's (layer, channel) axis, so they fall
    into the w groups from ⌊l·d / g⌋ on (the first and last may be shared with the layers beside
    it). One product of all heads' and tokens' rows with :func:`broad_pool`'s Z.
    """
    B, H, N, d = v.shape
    group = pool.shape[0] // pool.shape[1]
    offset = (layer * d) % group
    w = (offset + d + group - 1) // group
    return torch.mm(v.reshape(B * H * N, d), pool[offset:offset + d, :w]).view(B, H, N, w)


@register_notrace_function
def broad_output(logits: Tensor, values: List[Tensor], head_dim: int, group: int, scale: float, into: Tensor,
                 attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """``into`` plus the pooled broad output of the layers' terms.

    Args:
        logits: (B, H, R, N), Σ_l q_l k_lᵀ (:func:`broad_logits`).
        values: L tensors (B, H, N, w_l), each layer's :func:`broad_values` (weight / g folded in).
        head_dim: d; group: the pooling group size g (:func:`broad_group`).
        scale: the logit scale (d^-0.5 of one layer's head in BViT).
        into: (B, R, H·L·d / g), or (B, H·L·d / g) when R = 1: what the output is added to.
        attn_mask, is_causal: applied to the scaled logits (:func:`broad_probs`).
    Returns:
        ``into`` + ``softmax(logits·scale) @ v_l`` for every layer, summed into the groups it falls
        into in its head (times weight / g: the average, weighted), heads concatenated. One product
        over the layers' groups side by side; ``scatter_add`` sums each group's columns into it.
    """
    B, H, R, N = logits.shape
    attn = broad_probs(logits, scale, attn_mask, is_causal).flatten(0, 1)
    sums = torch.bmm(attn, torch.cat(values, -1).flatten(0, 1))                          # (B·H, R, Σ w_l)
    cols = len(values) * head_dim // group
    index: List[int] = []
    for h in range(H):
        for i, vals in enumerate(values):
            first = h * cols + i * head_dim // group
            index += list(range(first, first + vals.shape[-1]))
    sums = sums.view(B, H, R, -1).transpose(1, 2).reshape(into.shape[:-1] + (len(index),))
    return into.scatter_add(-1, torch.tensor(index, device=into.device).expand(sums.shape), sums.to(into.dtype))


# They loop or slice by shape: symbolic tracing (torch.fx, torchvision's and timm's feature
# extractors) records each call as one node instead of tracing through.
for _leaf in ('broad_logits', 'broad_values', 'broad_output'):
    torch.fx.wrap(_leaf)


def broad_attention(
        q: Sequence[Tensor],
        k: Sequence[Tensor],
        v: Sequence[Tensor],
        out_dim: int,
        scale: Optional[float] = None,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
) -> Tensor:
    """Parameter-free broad attention over L layers: the three functions above, composed.

    Args:
        q: L tensors (B, H, R, d): the query rows wanted (all N tokens, or leading ones only).
        k, v: L tensors (B, H, N, d).
        out_dim: width D the (B, R, H·L·d) output is adaptively average-pooled to.
        scale: logit scale; d^-0.5 of one layer's head (the release's choice) when None.
        attn_mask: boolean (True = attend) or additive, broadcastable to (B, H, R, N), as in
            ``F.scaled_dot_product_attention``; is_causal: row r attends to tokens <= r.
    Returns:
        (B, R, out_dim) in q's dtype: ``adaptive_avg_pool1d(concat_h softmax(Q Kᵀ·scale) V, out_dim)``.
    """
    H, d = q[0].shape[1], q[0].shape[-1]
    scale = d ** -0.5 if scale is None else scale
    group = broad_group(len(q), H, v[0].shape[-1], out_dim)
    pool = broad_pool(v[0].shape[-1], group, v[0])
    logits: Optional[Tensor] = None
    for qi, ki in zip(q, k):
        logits = broad_logits(logits, qi, ki)
    values = [broad_values(v[i], i, pool) for i in range(len(v))]
    assert logits is not None, 'broad attention needs at least one layer'
    into = q[0].new_zeros(q[0].shape[0], q[0].shape[2], out_dim)
    return broad_output(logits, values, v[0].shape[-1], group, scale, into, attn_mask, is_causal).to(q[0].dtype)


class BroadTap:
    """What one block's attention hands on to the broad attention (filled in by :class:`Attention`).

    Made by :meth:`BroadTerms.tap` for block ``layer`` and passed as ``block(x, broad=tap)``; after
    the call ``logits`` is :func:`broad_logits` of the blocks so far (``total``, the sum before this
    one, plus this layer's) for the query rows [0, ``rows``), and ``values`` its :func:`broad_values`.
    """

    def __init__(self, rows: int, layer: int, pool: Tensor, total: Optional[Tensor]) -> None:
        self.rows = rows
        self.layer = layer
        self.pool = pool
        self.total = total
        self.logits = torch.jit.annotate(Optional[Tensor], None)
        self.values = torch.jit.annotate(Optional[Tensor], None)

    def record(self, qkv: Tensor) -> None:
        """Take the layer's terms from its q, k, v stacked, (3, B, H, N, d). One copy makes them
        contiguous, so that each product reads its (B·H)-batched operands as views."""
        q, k, v = qkv.contiguous().unbind(0)
        self.logits = broad_logits(self.total, q[:, :, :self.rows], k)
        self.values = broad_values(v, self.layer, self.pool)


class BroadTerms:
    """The broad terms of the blocks run so far, collected by :meth:`BroadBlocks._run_blocks`.

    ``tap(layer)`` makes the :class:`BroadTap` block ``layer`` fills in; ``add(tap)`` then takes
    its terms: ``logits`` is Σ_l q_l k_lᵀ (B, H, R, N), summed as the blocks run so that one
    layer's q, k live at a time, and ``values`` the layers' broad_values (B, H, N, w_l), pooled with
    ``pool`` (:func:`broad_pool` of the head dim and group size g, made once per call).
    ``output`` is the pooled broad output (B, R, H·L·d / g) of :func:`broad_output`. Only the
    blocks in ``layers`` (sorted indices; all when None) feed it: ``tap`` gives the others None,
    and the L of the definition is the number of blocks that feed it.
    """

    def __init__(self, rows: int, group: int, head_dim: int, like: Tensor, weight: float = 1.,
                 layers: Optional[List[int]] = None) -> None:
        self.rows = rows
        self.group = group
        self.layers = layers
        self.pool = broad_pool(head_dim, group, like, weight)
        self.logits = torch.jit.annotate(Optional[Tensor], None)
        self.values = torch.jit.annotate(List[Tensor], [])

    def tap(self, block: int) -> Optional[BroadTap]:
        """The tap block ``block`` fills in, or None when it does not feed the broad attention."""
        layers = self.layers
        if layers is not None and block not in layers:
            return None
        return BroadTap(self.rows, len(self.values), self.pool, self.logits)

    def add(self, tap: BroadTap) -> None:
        logits, values = tap.logits, tap.values
        if logits is None or values is None:
            raise RuntimeError(f'block {tap.layer} did not call its attention; broad attention expects one call per block')
        self.logits = logits
        self.values.append(values)

    def output(self, head_dim: int, scale: float, into: Tensor, attn_mask: Optional[Tensor] = None,
               is_causal: bool = False) -> Tensor:
        """``into`` + :func:`broad_output` of the terms collected (head dim d, logit ``scale``, mask as there)."""
        logits = self.logits
        if logits is None:
            raise RuntimeError('broad attention needs at least one block')
        return broad_output(logits, self.values, head_dim, self.group, scale, into, attn_mask, is_causal)


class BroadBlocks:
    """Mixin with the one loop that runs a model's blocks and collects their broad terms.

    For a module with ``blocks`` (a ModuleList or Sequential whose blocks take ``block(x,
    broad=tap)`` and, with a mask, ``attn_mask=`` / ``is_causal=``) and ``grad_checkpointing``:
    BViT, and ``bvit.broad``'s timm ViT / DeiT / T2T-ViT models and Swin stages.
    """

    def _run_blocks(self, x: Tensor, terms: Optional[BroadTerms], take: Optional[List[int]] = None,
                    depth: int = -1, attn_mask: Optional[Tensor] = None,
                    is_causal: bool = False) -> Tuple[Tensor, List[Tensor]]:
        """Tokens x through the first ``depth`` blocks (all when -1) -> (last output, the outputs of
        the blocks in ``take``). Block i hands its q, k, v to ``terms.tap(i)``, whose terms
        ``terms.add`` collects as soon as the block has run; no broad attention when ``terms`` is None.
        ``attn_mask`` / ``is_causal`` go to every block (timm's ViT blocks)."""
        taken: List[Tensor] = []
        for i, blk in enumerate(self.blocks):
            if depth < 0 or i < depth:
                tap = terms.tap(i) if terms is not None else None
                if (self.grad_checkpointing and not torch.jit.is_scripting()) or attn_mask is not None or is_causal:
                    x = self._call_block(i, x, tap, attn_mask, is_causal)
                else:
                    x = blk(x, broad=tap)
                if terms is not None and tap is not None:
                    terms.add(tap)
                if take is not None and i in take:
                    taken.append(x)
        return x, taken

    @torch.jit.unused
    def _call_block(self, i: int, x: Tensor, tap: Optional[BroadTap], attn_mask: Optional[Tensor],
                    is_causal: bool) -> Tensor:
        """Block i with a mask and/or recomputed in the backward pass (gradient checkpointing);
        neither is scripted."""
        kwargs = dict(attn_mask=attn_mask, is_causal=is_causal) if attn_mask is not None or is_causal else {}
        if self.grad_checkpointing:
            return checkpoint(self.blocks[i], x, broad=tap, use_reentrant=False, **kwargs)
        return self.blocks[i](x, broad=tap, **kwargs)


def attention_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """softmax((q·scale) kᵀ), the map of one layer, computed as :class:`Attention` does without
    fused attention: (B, H, R, d), (B, H, N, d) -> (B, H, R, N)."""
    return ((q * scale) @ k.transpose(-2, -1)).softmax(dim=-1)


def broad_probs(logits: Tensor, scale: float, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
    """The broad map from the layers' summed logits (B, H, R, N): softmax(logits·scale + mask).

    The mask as ``F.scaled_dot_product_attention`` takes it: boolean ``attn_mask`` (True =
    attend) or additive, broadcastable to (B, H, R, N); ``is_causal``: row r of the last R rows
    of N tokens attends to tokens <= r + N - R.
    """
    logits = logits * scale
    if is_causal:
        R, N = logits.shape[-2], logits.shape[-1]
        keep = torch.ones(R, N, dtype=torch.bool, device=logits.device).tril(N - R)
        logits = logits.masked_fill(~keep, float('-inf'))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, float('-inf'))
        else:
            logits = logits + attn_mask.to(logits.dtype)
    return logits.softmax(-1)


# timm's attention and block, with the tap -------------------------------------------------------

class Attention(nn.Module):
    """Multi-head self-attention with the parameters and operations of ``timm.layers.Attention``,
    plus the :class:`BroadTap` argument that hands its q, k, v on.

    ``qkv`` is one Linear(D, 3·H·d) laid out (3, H, d), as in the release's ``to_qkv``; ``proj``
    maps the H·d concatenated heads back to D. Like timm's, it runs
    ``F.scaled_dot_product_attention`` when ``fused_attn`` (``timm.layers.use_fused_attn()`` at
    construction), else the explicit softmax then ``attn_drop``, so that timm's
    ``AttentionExtract`` finds the maps. A class of its own rather than a subclass of timm's: the
    tap is an argument of ``forward`` (timm's ``Block`` would not pass it on), and the head dim
    (64 in the release, not D / H) and the constructor do not move with timm's versions.
    """
    fused_attn: torch.jit.Final[bool]

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
        self.fused_attn = use_fused_attn()
        inner = num_heads * head_dim
        self.qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor, broad: Optional[BroadTap] = None) -> Tensor:
        """x: (B, N, D) -> (B, N, D); its q, k, v, stacked (3, B, H, N, d), go to ``broad`` when given."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if broad is not None:
            broad.record(qkv)
        q, k, v = qkv.unbind(0)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            attn = attn.softmax(dim=-1)
            attn = self.attn_drop(attn)
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.num_heads * self.head_dim)
        return self.proj_drop(self.proj(x))


class Block(nn.Module):
    """Pre-norm transformer block, ``x + attn(LN(x))`` then ``x + MLP(LN(x))``, as timm's ViT block."""

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

    def forward(self, x: Tensor, broad: Optional[BroadTap] = None) -> Tensor:
        """x: (B, N, D) -> (B, N, D); the attention's q, k, v go to ``broad`` when given."""
        x = x + self.drop_path1(self.attn(self.norm1(x), broad=broad))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


__all__: List[str] = [
    'Attention', 'Block', 'BroadTap', 'BroadTerms', 'BroadBlocks', 'broad_group', 'broad_layers_of', 'broad_pool', 'broad_logits', 'broad_values', 'broad_output',
    'broad_attention', 'attention_probs', 'broad_probs']
