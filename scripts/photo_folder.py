"""Write an ImageFolder of JPEGs at ImageNet sizes from the photos that ship inside scikit-learn,
for timing input pipelines where no data set is at hand (no download).

    python scripts/photo_folder.py DST [--images N] [--classes C] [--seed S]

DST/train/<class>/*.jpg and DST/val/<class>/*.jpg (N training and N / 4 validation images, C classes):
each a random crop of 50-100% of one of the two photos (china.jpg, flower.jpg, 640x427), resized
to 300-640 px wide with an aspect ratio of 1 to 1.5, saved at quality 75, 85 or 90. ImageNet's
training images average about 470x390 px and 110 KB (140 GB for 1.28M); 1,200 of these average
470x381 px and 39 KB (the photos are smooth and compress well, which makes decoding a little
cheaper than ImageNet's). DST must not exist yet or be empty.
"""
from __future__ import annotations

import argparse
import os
import random
import sys


def write(dst: str, images: int, classes: int, seed: int) -> int:
    """Write the folder; returns the number of files written."""
    from PIL import Image
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    written = 0
    for split, n in (('train', images), ('val', max(classes, images // 4))):
        for c in range(classes):
            os.makedirs(os.path.join(dst, split, f'class{c}'), exist_ok=True)
        for i in range(n):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            width = rng.randint(300, 640)
            img = photo.crop((x, y, x + cw, y + ch)).resize((width, int(width / rng.uniform(1.0, 1.5))), Image.BICUBIC)
            img.save(os.path.join(dst, split, f'class{i % classes}', f'{i:06d}.jpg'), quality=rng.choice((75, 85, 90)))
            written += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dst', help='the folder to write (new or empty)')
    p.add_argument('--images', type=int, default=512, help='training images (validation: a quarter as many)')
    p.add_argument('--classes', type=int, default=4, help='class folders')
    p.add_argument('--seed', type=int, default=0)
    args = p.parse_args(argv)
    if args.images < 1 or args.classes < 1:
        print('error: --images and --classes must be at least 1', file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
        print(f'error: {args.dst} exists and is not an empty folder; give a new one', file=sys.stderr)
        return 2
    n = write(args.dst, args.images, args.classes, args.seed)
    print(f'{n} JPEGs in {args.dst}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
