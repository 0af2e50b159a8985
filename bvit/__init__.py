"""BViT: Broad Attention based Vision Transformer. ``import bvit.models`` registers the models with timm."""
__version__ = '0.1.0'
