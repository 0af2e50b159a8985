"""Samplers that are correct in a distributed run and in a plain single-process one.

``RepeatAugSampler`` is the training sampler (repeated augmentation with ``num_repeats`` > 1, a
plain shuffled shard with 1); ``ShardSampler`` splits the validation set for ``--dist-eval``
without padding, so no image is counted twice.
"""
from __future__ import annotations

import math
from typing import Iterator, List, Sized

import torch
from torch.utils.data import Sampler


class RepeatAugSampler(Sampler[int]):
    """Shuffled training indices of one rank, each image drawn ``num_repeats`` times per pass.

    Repeated augmentation (Hoffer et al., 2020; Berman et al., 2019, as in DeiT): the shuffled
    index list has every index repeated ``num_repeats`` times in a row, and ranks take it in turn
    (rank r gets positions r, r+W, r+2W, ...), so the copies of an image land on different ranks
    and get independent augmentations. Each rank yields ``ceil(len(dataset) / W)`` indices per
    epoch, so an epoch has as many steps as without repetition (and sees about
    ``1/num_repeats`` of the distinct images, as in DeiT). ``num_repeats=1`` is an ordinary
    shuffled shard (like ``DistributedSampler``). The order depends only on ``seed`` and the
    epoch given to :meth:`set_epoch`, which the training loop calls every epoch, also with one
    process; its ``start`` skips the first indices of the epoch (a run resumed mid-epoch).
    Kept rather than timm's ``RepeatAugSampler`` for that ``start``: timm's restarts an epoch
    from its first index, so a run resumed mid-epoch would see other batches than an
    uninterrupted one.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, num_repeats: int = 3) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        self.dataset_len = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank
        self.shuffle = shuffle
        self.seed = seed
        self.num_repeats = num_repeats
        self.epoch = 0
        self.start = 0
        self.num_samples = math.ceil(self.dataset_len / num_replicas)  # per rank and epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f'start {start} is not in [0, {self.num_samples}]')
        self.epoch = epoch
        self.start = start

    def indices(self) -> List[int]:
        n = self.dataset_len
        if n == 0:
            return []
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        order = order.repeat_interleave(self.num_repeats).tolist()
        # pad (by wrapping around) so that every rank gets the same number of positions
        total = self.num_samples * self.num_replicas
        while len(order) < total:
            order += order[:total - len(order)]
        return order[self.rank::self.num_replicas][:self.num_samples]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + W, ...`` of a dataset, in order, without padding.

    The shards of all ranks partition the dataset exactly (their sizes differ by at most one),
    so metrics summed over ranks count every image once, whatever the dataset size. Kept rather
    than timm's ``OrderedDistributedSampler``, which pads every shard to the same length with
    repeated indices (as torch's ``DistributedSampler``), so summed metrics count a few images twice.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        self.dataset_len = len(dataset)
        self.num_replicas = num_replicas
        self.rank = rank

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.dataset_len, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_len, self.num_replicas))


__all__ = ['RepeatAugSampler', 'ShardSampler']
