"""BViT: Broad Attention based Vision Transformer.

Importing the package (``import bvit``, ``import bvit.models``, any submodule) registers the BViT
and T2T-ViT models with timm.
"""
__version__ = '0.1.0'

from . import models, t2t  # noqa: E402,F401  (registration)
