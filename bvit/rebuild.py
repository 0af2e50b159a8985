"""Rebuild the model a checkpoint holds, for tools that get only a file (visualize, export).

The architecture comes, in increasing priority, from the weights (width, depth, heads, patch
size, stem, classes, input channels, the input size the position table was sized for; for T2T-ViT
width, depth, token-layer type, classes and the table's grid), from the
``args`` that train_hp.py stores in its checkpoints (arch, input size, patch size, stem, classes,
``--no-broad``, broad scale) and from explicit overrides. The weights are then adapted by
:func:`bvit.models.checkpoint_filter_fn`, the one place that does so, and checked key by key.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import timm
from torch import Tensor, nn

from . import models as bvit_models
from . import t2t

# Names under which a training script may have stored each model setting in its ``args``.
_ARG_ALIASES: Dict[str, Tuple[str, ...]] = {
    'arch': ('arch', 'model'),
    'input_size': ('input_size', 'img_size'),
    'patch_size': ('patch_size',),
    'stem': ('stem',),
    'num_classes': ('nb_classes', 'num_classes'),
    'broad_scale': ('broad_scale',),
    'global_pool': ('global_pool',),
}
# Released widths -> registered names.
_ARCH_BY_WIDTH = {192: 'bvit_5m', 384: 'bvit_22m'}


def infer_bvit_config(state_dict: Mapping[str, Tensor]) -> Dict[str, Any]:
    """Architecture of a BViT state dict (this package's key layout), as model kwargs.

    Finds embed_dim, in_chans, patch_size, depth, num_heads (head dim 64 assumed: the qkv width
    alone cannot tell heads from head dim), qkv_bias, mlp_ratio, stem, num_classes and the input
    size the position table was sized for. Keys that are absent are left out.
    """
    cfg: Dict[str, Any] = {}
    pe = state_dict.get('patch_embed.weight')
    if pe is not None and pe.ndim == 4:
        cfg['embed_dim'] = int(pe.shape[0])
        cfg['in_chans'] = int(pe.shape[1])
        cfg['patch_size'] = int(pe.shape[-1])
    depth = 0
    while f'blocks.{depth}.attn.qkv.weight' in state_dict:
        depth += 1
    if depth:
        cfg['depth'] = depth
        inner = state_dict['blocks.0.attn.qkv.weight'].shape[0] // 3
        cfg['head_dim'] = 64
        if inner % 64 == 0:
            cfg['num_heads'] = inner // 64
        cfg['qkv_bias'] = 'blocks.0.attn.qkv.bias' in state_dict
        fc1 = state_dict.get('blocks.0.mlp.fc1.weight')
        if fc1 is not None:
            cfg['mlp_ratio'] = fc1.shape[0] / fc1.shape[1]
    cfg['stem'] = 'conv' if 'stem.weight' in state_dict else 'none'
    head = state_dict.get('head.weight')
    cfg['num_classes'] = int(head.shape[0]) if head is not None else 0
    pos = state_dict.get('pos_embed')
    if pos is not None and 'patch_size' in cfg:
        side = math.isqrt(pos.shape[1] - 1)
        if side * side == pos.shape[1] - 1:
            cfg['img_size'] = side * cfg['patch_size']
    return cfg


def _lookup(args: Mapping[str, Any], name: str) -> Any:
    for key in _ARG_ALIASES[name]:
        if args.get(key) is not None:
            return args[key]
    return None


def model_settings(ckpt_args: Optional[Mapping[str, Any]], state_dict: Mapping[str, Tensor],
                   overrides: Optional[Mapping[str, Any]] = None) -> Tuple[str, Dict[str, Any]]:
    """(timm model name, ``timm.create_model`` kwargs) from, in increasing priority: the state
    dict, the checkpoint's ``args`` and ``overrides`` (arch, input_size, patch_size, stem,
    num_classes). ValueError when no model can be named."""
    args = dict(ckpt_args or {})
    overrides = dict(overrides or {})
    inferred = infer_bvit_config(state_dict)
    arch = overrides.get('arch') or _lookup(args, 'arch')
    t2t_arch = t2t.arch_of_state_dict(state_dict)
    if arch is None and t2t_arch is not None:  # a T2T-ViT file (the authors' store no usable args)
        arch = t2t_arch
        rows = state_dict['pos_embed'].shape[1] - 1 if 'pos_embed' in state_dict else 0
        if math.isqrt(rows) ** 2 == rows and rows:
            inferred['img_size'] = math.isqrt(rows) * 16
    if arch is None:
        if 'depth' not in inferred:
            raise ValueError('the checkpoint stores no arch and its keys are not a BViT; pass the architecture')
        width = inferred.get('embed_dim')
        if width not in _ARCH_BY_WIDTH:
            raise ValueError(f'the checkpoint stores no arch and its width {width} is not a released BViT '
                             f'({", ".join(f"{w}: {n}" for w, n in _ARCH_BY_WIDTH.items())}); pass the architecture')
        arch = _ARCH_BY_WIDTH[width]
    try:
        arch = bvit_models.resolve_arch(str(arch))
        is_bvit = True
    except ValueError:
        is_bvit = False
    if not timm.is_model(arch):
        raise ValueError(f'unknown model {arch!r}: not a BViT name nor a registered timm model')

    kwargs: Dict[str, Any] = {}
    if is_bvit:
        # Shape-defining settings read off the weights fit them by construction.
        for key in ('embed_dim', 'depth', 'num_heads', 'head_dim', 'mlp_ratio', 'qkv_bias', 'in_chans',
                    'patch_size', 'stem', 'img_size'):
            if key in inferred:
                kwargs[key] = inferred[key]
    kwargs['num_classes'] = inferred.get('num_classes', 1000)
    if arch in t2t.T2T_MODEL_ARGS and 'img_size' in inferred:
        kwargs['img_size'] = inferred['img_size']
    for name, kw in (('input_size', 'img_size'), ('patch_size', 'patch_size'), ('stem', 'stem'),
                     ('num_classes', 'num_classes'), ('broad_scale', 'broad_scale'),
                     ('global_pool', 'global_pool')):
        value = overrides.get(name)
        if value is None:
            value = _lookup(args, name)
        if value is None:
            continue
        if name == 'input_size' and isinstance(value, (list, tuple)):
            value = int(value[-1]) if len(value) == 3 else tuple(int(v) for v in value)
        if name in ('stem', 'broad_scale') and not is_bvit:
            continue
        kwargs[kw] = value
    if is_bvit and args.get('no_broad'):  # train_hp.py's --no-broad: the twin without broad attention
        kwargs['broad'] = False
    return arch, kwargs


def build_from_checkpoint(obj: Any, overrides: Optional[Mapping[str, Any]] = None, use_ema: bool = False,
                          bvit_only: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a loaded checkpoint (what :func:`bvit.models.read_checkpoint` returned) holds,
    built with ``timm.create_model`` (so its factory arguments are recorded, as timm's hub export
    needs) and loaded through :func:`bvit.models.checkpoint_filter_fn`; eval mode, CPU.

    Returns (model, the checkpoint's ``args`` or {}). ValueError (one line) when the file holds
    no state dict, names no known model (or, with ``bvit_only``, another model than a BViT), or
    its weights do not fit.
    """
    sd = bvit_models.convert_official_state_dict(obj, use_ema)  # key names, to read the architecture off
    sd = t2t.rename_authors_keys(sd)
    ckpt_args = obj.get('args') if isinstance(obj, Mapping) else None
    ckpt_args = dict(ckpt_args) if isinstance(ckpt_args, Mapping) else {}
    name, kwargs = model_settings(ckpt_args, sd, overrides)
    if bvit_only and name not in bvit_models.MODEL_ARGS and name not in t2t.T2T_MODEL_ARGS:
        raise ValueError(f'it holds a {name} model, not a BViT or T2T-ViT')
    if name in t2t.T2T_MODEL_ARGS and ckpt_args.get('broad'):
        raise ValueError(f'it holds {name} with broad attention (train_hp.py --broad), which timm.create_model '
                         'cannot rebuild from its arguments; evaluate it with train_hp.py --eval --resume')
    try:
        model = timm.create_model(name, **kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f'cannot build {name} with {kwargs}: {e}') from None
    sd = bvit_models.checkpoint_filter_fn(obj, model, use_ema)
    bvit_models.check_state_dict(model, sd)
    model.load_state_dict(sd)
    return model.eval(), ckpt_args


__all__ = ['infer_bvit_config', 'model_settings', 'build_from_checkpoint']
