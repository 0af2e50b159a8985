"""BViT: Broad Attention based Vision Transformer.

Importing the package (``import bvit``, ``import bvit.models``, any submodule) registers the BViT
and T2T-ViT models with timm, and the broad-attention variants ``broad_<name>`` of timm's ViT,
DeiT and Swin models (:mod:`bvit.broad_models`).
"""
__version__ = '0.1.0'

from . import broad_models, models, t2t  # noqa: E402,F401  (registration)
