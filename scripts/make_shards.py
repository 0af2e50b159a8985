#!/usr/bin/env python
"""Write an ImageFolder pair (SRC/train/<class>/<image>, SRC/val/<class>/<image>) as WebDataset-style
tar shards for ``train_hp.py --data-set SHARDS --data-path DST``::

    python scripts/make_shards.py /path/to/imagenet /path/to/imagenet-shards --shard-size 1024

The layout (timm's webdataset layout, so timm's own reader takes it too) is in shards.py and
docs/training.md ("Data in shards"). Exit status 0, or 2 with one ``error:`` line.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

from shards import write_shards  # noqa: E402
from utils import UsageError, write_line  # noqa: E402


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (as train_hp.py's)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = _Parser('make_shards.py', formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description='Write SRC/train and SRC/val (ImageFolder layout) as tar shards under DST/train and '
                            'DST/val, plus DST/_info.json (classes, sample and shard counts).')
    p.add_argument('src', metavar='SRC', help='folder holding train/<class>/<image> and val/<class>/<image>')
    p.add_argument('dst', metavar='DST', help='output folder: must not exist, or be empty (never overwritten)')
    p.add_argument('--shard-size', type=int, default=1024, metavar='N',
                   help='samples per shard (the last has the rest)')
    p.add_argument('--seed', type=int, default=0,
                   help='seed of the shuffle of the training samples before they are cut into shards (each shard '
                        'mixes the classes); validation keeps ImageFolder order')
    p.add_argument('--no-shuffle', action='store_true', help='training samples in ImageFolder order too')
    args = p.parse_args(argv)
    try:
        write_shards(args.src, args.dst, args.shard_size, shuffle_seed=None if args.no_shuffle else args.seed)
    except UsageError as e:
        write_line(sys.stderr, 'error: ' + ' '.join(str(e).split()))
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
