"""The DIGITS data set and the evaluation transform, shared by the training script (``datasets.py``)
and :mod:`bvit.visualize`: one split, one preprocessing.

DIGITS is scikit-learn's 1797 handwritten 8x8 digits (values 0..16, bundled with scikit-learn,
no download), split once, stratified, with a fixed seed: 1440 training and 357 validation images.
scikit-learn is imported when a DIGITS set is made, not with this module.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

DIGITS_VAL_SIZE = 357  # odd on purpose: --dist-eval must count every image once
DIGITS_SPLIT_SEED = 0


class DigitsDataset(Dataset):
    """DIGITS as 3-channel PIL images (gray repeated), or ``transform`` of them. ``train``: the
    1440 training images, else the 357 held-out ones, each split in index order; the split is
    independent of any training seed. ``images``: (N, 8, 8) uint8 in 0..255 (the 0..16 values
    scaled and rounded); ``targets``: N ints in 0..9."""

    def __init__(self, train: bool, transform: Optional[Any] = None) -> None:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        digits = load_digits()
        images = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
        targets = digits.target.astype(np.int64)
        train_idx, val_idx = train_test_split(
            np.arange(len(targets)), test_size=DIGITS_VAL_SIZE, stratify=targets, random_state=DIGITS_SPLIT_SEED)
        idx = np.sort(train_idx if train else val_idx)
        self.images = images[idx]
        self.targets = [int(t) for t in targets[idx]]
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img = Image.fromarray(self.images[index]).convert('RGB')  # 2-D uint8: mode L
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


def eval_transform(input_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float],
                   crop_pct: float) -> Any:
    """The evaluation preprocessing, timm's ``create_transform(is_training=False)``: resize the
    shorter side to ``floor(size / crop_pct)`` (bicubic; DeiT's ``int(...)`` too), center crop
    ``input_size`` (an int, or (C, H, W)), to a float tensor (3, H, W) normalised with ``mean`` /
    ``std``."""
    from timm.data import create_transform
    size = tuple(input_size) if isinstance(input_size, (tuple, list)) else input_size
    return create_transform(input_size=size, is_training=False, interpolation='bicubic',
                            mean=tuple(mean), std=tuple(std), crop_pct=crop_pct)


__all__ = ['DIGITS_VAL_SIZE', 'DIGITS_SPLIT_SEED', 'DigitsDataset', 'eval_transform']
