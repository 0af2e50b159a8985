"""timm names for the broad-attention variants of timm's ViT, DeiT and Swin models: ``broad_<name>``.

Importing :mod:`bvit` (any of its modules) registers ``broad_<name>`` with timm for every model
that timm registers in its modules :data:`TIMM_MODULES` (ViT, hybrid ViT, DeiT, Swin v1), except
the few of :data:`NOT_CONVERTIBLE`::

    timm.create_model('broad_deit_tiny_patch16_224', broad_scale=0.4, num_classes=10)

is timm's own ``deit_tiny_patch16_224`` entrypoint, called with the other arguments, then
:func:`bvit.broad.add_broad_attention` with ``broad_scale`` (default 0.4) and, for a Swin,
``swin_rel_pos_bias`` (default True). No parameter or state-dict key changes, so each broad name
carries its timm model's pretrained cfgs (every tag, the weights' location, the preprocessing),
only their ``architecture`` being the broad name: ``pretrained=True`` (or a tag,
``broad_deit_tiny_patch16_224.fb_in1k``) loads the timm model's weights through timm's own
loader and filter. The model's ``pretrained_cfg['architecture']`` is the broad name and its
recorded construction arguments hold the broad settings, so timm's ``save_for_hf`` ->
``create_model('local-dir:...')`` rebuilds it with broad attention.

``features_only=True`` is refused (ValueError): timm's ``forward_intermediates`` of a ViT has no
broad output, so the plain model gives the same features.
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable, Dict, List, Optional, Union

from torch import nn
from timm.models import (
    DefaultCfg, get_arch_pretrained_cfgs, is_model_pretrained, list_models, model_entrypoint, register_model,
    split_model_name_tag)

from .broad import BROAD_PREFIX, add_broad_attention

# timm's modules whose models add_broad_attention converts: VisionTransformer (and its DeiT
# subclass) with timm.layers.Attention blocks, and SwinTransformer.
TIMM_MODULES = ('vision_transformer', 'vision_transformer_hybrid', 'deit', 'swin_transformer')
_SWIN = frozenset(list_models(module='swin_transformer'))
# Their models whose blocks have no timm.layers.Attention (parallel blocks, differential
# attention): add_broad_attention refuses them, so they get no broad name.
NOT_CONVERTIBLE = frozenset({
    'vit_small_patch16_18x2_224', 'vit_base_patch16_18x2_224',                             # ParallelThingsBlock
    'vit_base_patch16_xp_224', 'vit_large_patch14_xp_224', 'vit_huge_patch14_xp_224',     # ParallelScalingBlock
    'vit_pwee_patch16_reg1_gap_256',                                                       # ParallelScalingBlock
    'vit_dpwee_patch16_reg1_gap_256',                                                      # DiffParallelScalingBlock
    'vit_dwee_patch16_reg1_gap_256', 'vit_dlittle_patch16_reg1_gap_256',                   # Block with DiffAttention
})

# read by timm's register_model: the pretrained cfgs of each broad name
default_cfgs: Dict[str, DefaultCfg] = {}
__all__: List[str] = ['TIMM_MODULES', 'NOT_CONVERTIBLE', 'create_broad']


def create_broad(base: str, pretrained: bool = False, broad_scale: float = 0.4,
                 swin_rel_pos_bias: Optional[bool] = None, broad_layers: Union[None, int, List[int]] = None,
                 **kwargs: Any) -> nn.Module:
    """The entrypoint of ``broad_<base>``: timm's ``base`` entrypoint with ``pretrained`` and
    ``kwargs``, then :func:`bvit.broad.add_broad_attention` (``broad_scale``, ``broad_layers``;
    for a Swin, ``swin_rel_pos_bias``, default True). ValueError for ``features_only`` and for
    ``swin_rel_pos_bias`` on a model that is not a Swin."""
    name = BROAD_PREFIX + base
    if kwargs.get('features_only'):
        raise ValueError(f"{name}: features_only is not offered (timm's forward_intermediates has no broad "
                         f'output); take the features of {base}')
    if swin_rel_pos_bias is not None and base not in _SWIN:
        raise ValueError(f'{name}: swin_rel_pos_bias applies to Swin models only')
    model = model_entrypoint(base)(pretrained=pretrained, **kwargs)
    return add_broad_attention(model, broad_scale, broad_layers=broad_layers,
                               swin_rel_pos_bias=True if swin_rel_pos_bias is None else swin_rel_pos_bias)


def _entrypoint(base: str) -> Callable[..., nn.Module]:
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_broad(base, pretrained, **kwargs)
    entry.__name__ = entry.__qualname__ = BROAD_PREFIX + base
    entry.__doc__ = (f"timm's {base} with BViT's broad attention (bvit.broad.add_broad_attention; broad_scale=0.4"
                     f"{', swin_rel_pos_bias=True' if base in _SWIN else ''}); "
                     f'{base} weights load as they are.')
    return entry


def _register(base: str) -> None:
    """Register ``broad_<base>`` with ``base``'s pretrained cfgs, default tag first."""
    name = BROAD_PREFIX + base
    cfgs = {split_model_name_tag(k)[1]: cfg for k, cfg in get_arch_pretrained_cfgs(base).items()}
    default_cfgs[name] = DefaultCfg(tags=deque(cfgs), cfgs=cfgs, is_pretrained=is_model_pretrained(base))
    globals()[name] = register_model(_entrypoint(base))


for _module in TIMM_MODULES:
    for _base in list_models(module=_module):
        if _base not in NOT_CONVERTIBLE:
            _register(_base)
