"""Write an ImageFolder of JPEGs at ImageNet sizes from the photos that ship inside scikit-learn,
for timing input pipelines where no data set is at hand (no download).

    python scripts/photo_folder.py DST [--images N] [--classes C] [--seed S] [--copies K] [--jobs J]

DST/train/<class>/*.jpg and DST/val/<class>/*.jpg (N training and N / 4 validation images, C classes;
with --copies K, K hard links to each file under other names, so that an epoch is K times longer
without K times the writing; --jobs J processes write them):
each a random crop of 50-100% of one of the two photos (china.jpg, flower.jpg, 640x427), resized
to 300-640 px wide with an aspect ratio of 1 to 1.5, saved at quality 75, 85 or 90. ImageNet's
training images average about 470x390 px and 110 KB (140 GB for 1.28M); 1,200 of these average
469x380 px and 39 KB (the photos are smooth and compress well, which makes decoding a little
cheaper than ImageNet's). DST must not exist yet or be empty.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from typing import List, Tuple


def _write_one(job: Tuple[str, int, int]) -> None:
    """Image ``i`` of a split, drawn from its own seed (the same whatever the number of jobs)."""
    from PIL import Image
    from sklearn.datasets import load_sample_image
    path, i, seed = job
    rng = random.Random(seed * 1_000_003 + i)
    photo = Image.fromarray(load_sample_image(('china.jpg', 'flower.jpg')[i % 2]))
    w, h = photo.size
    cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
    x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
    width = rng.randint(300, 640)
    img = photo.crop((x, y, x + cw, y + ch)).resize((width, int(width / rng.uniform(1.0, 1.5))), Image.BICUBIC)
    img.save(path, quality=rng.choice((75, 85, 90)))


def write(dst: str, images: int, classes: int, seed: int, copies: int = 1, jobs: int = 1) -> int:
    """Write the folder; returns the number of files in it (links included)."""
    from multiprocessing import Pool
    todo: List[Tuple[str, int, int]] = []
    for split, n in (('train', images), ('val', max(classes, images // 4))):
        for c in range(classes):
            os.makedirs(os.path.join(dst, split, f'class{c}'), exist_ok=True)
        todo += [(os.path.join(dst, split, f'class{i % classes}', f'{i:06d}.jpg'), i + (split == 'val') * images, seed)
                 for i in range(n)]
    if jobs > 1:
        with Pool(jobs) as pool:
            pool.map(_write_one, todo, chunksize=16)
    else:
        for job in todo:
            _write_one(job)
    for path, _, _ in todo:
        for k in range(1, copies):
            os.link(path, path[:-len('.jpg')] + f'-{k}.jpg')
    return len(todo) * copies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('dst', help='the folder to write (new or empty)')
    p.add_argument('--images', type=int, default=512, help='training images (validation: a quarter as many)')
    p.add_argument('--classes', type=int, default=4, help='class folders')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--copies', type=int, default=1, help='hard links to each file (an epoch K times longer)')
    p.add_argument('--jobs', type=int, default=1, help='processes that write the images')
    args = p.parse_args(argv)
    if min(args.images, args.classes, args.copies, args.jobs) < 1:
        print('error: --images, --classes, --copies and --jobs must be at least 1', file=sys.stderr)
        return 2
    if os.path.exists(args.dst) and (not os.path.isdir(args.dst) or os.listdir(args.dst)):
        print(f'error: {args.dst} exists and is not an empty folder; give a new one', file=sys.stderr)
        return 2
    n = write(args.dst, args.images, args.classes, args.seed, args.copies, args.jobs)
    print(f'{n} JPEGs in {args.dst}' + (f' ({n // args.copies} images, {args.copies} names each)' if args.copies > 1 else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
