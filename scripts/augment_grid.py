"""Draw training augmentations of one photo from both input pipelines, side by side.

    python scripts/augment_grid.py figs/pipeline_grid.png [--per-row 8] [--size 224]

Row pairs: DeiT's pipeline (``--pipeline deit``, timm's create_transform) and this project's
(``--pipeline fast``: the worker transform, then the device steps on the CPU), both with the
ImageNet recipe's flags (bicubic random-resized crop 8-100%, flip, RandAugment
rand-m9-mstd0.5-inc1, random erasing 0.25 in 'pixel' mode), shown un-normalised. The images of
a column are not the same draw: each pipeline draws its own parameters (tests/test_pipeline.py
tests that their distributions agree).
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import Any, List

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def samples(which: str, n: int, size: int, seed: int) -> List[np.ndarray]:
    """``n`` augmented copies of scikit-learn's china.jpg through pipeline ``which``, as HxWx3
    uint8 arrays (normalisation undone, erased pixels clipped to [0, 255])."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    import datasets
    import pipeline
    import train_hp
    args = train_hp.parse_args(['--config', os.path.join(ROOT, 'configs', 'bvit_5m_imagenet.yaml'), '--data-set', 'FAKE',
                                '--input-size', str(size), '--pipeline', which])
    photo = Image.fromarray(load_sample_image('china.jpg'))
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    transform = datasets.build_transform(True, args)
    if which == 'fast':
        drawn = [transform(photo) for _ in range(n)]
        device = pipeline.device_augment(args, torch.device('cpu'))
        x = device([torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])])
    else:
        x = torch.stack([transform(photo) for _ in range(n)])
    mean, std = torch.tensor(args.mean).view(1, 3, 1, 1), torch.tensor(args.std).view(1, 3, 1, 1)
    x = ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return [a.permute(1, 2, 0).numpy() for a in x]


def draw(path: str, per_row: int, size: int, seed: int = 0) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows: List[Any] = [('deit', samples('deit', per_row, size, seed)), ('fast', samples('fast', per_row, size, seed))]
    fig, axes = plt.subplots(2, per_row, figsize=(1.6 * per_row, 3.6))
    for r, (name, images) in enumerate(rows):
        for c, img in enumerate(images):
            ax = axes[r][c]
            ax.imshow(img)
            ax.set_xticks([]), ax.set_yticks([])
        axes[r][0].set_ylabel(f'--pipeline {name}', fontsize=9)
    fig.suptitle('Training augmentations of one photo (ImageNet recipe)', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('out', help='the PNG to write')
    p.add_argument('--per-row', type=int, default=8)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    draw(args.out, args.per_row, args.size, args.seed)
    print(f'wrote {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
