"""Samplers that are correct in a distributed run and in a plain single-process one.

``RepeatAugSampler`` is the training sampler (timm's, resumable mid-epoch: repeated augmentation
with ``num_repeats`` > 1, a plain shuffled shard with 1); ``ShardSampler`` splits the validation
set for ``--dist-eval`` without padding, so no image is counted twice.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Sized

from timm.data import distributed_sampler as timm_sampler
from torch.utils.data import Sampler


class RepeatAugSampler(timm_sampler.RepeatAugSampler):
    """timm's ``RepeatAugSampler`` (repeated augmentation, as DeiT's RASampler: the shuffled index
    list has every index ``num_repeats`` times in a row, rank r takes positions r, r+W, ...,
    wrapping around to pad) with ``ceil(len(dataset) / W)`` indices per rank and epoch
    (``selected_round=0``: an epoch has as many steps as without repetition), seeded by
    ``seed + epoch`` (timm's by the epoch alone), and a ``start`` in :meth:`set_epoch` that skips
    the epoch's first indices, so that a run resumed mid-epoch sees the batches of an
    uninterrupted one (timm's restarts the epoch). ``num_repeats=1``: a shuffled shard. The
    training loop calls :meth:`set_epoch` every epoch, also with one process."""

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True,
                 seed: int = 0, num_repeats: int = 3) -> None:
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is not in [0, {num_replicas})')
        if num_repeats < 1:
            raise ValueError(f'num_repeats must be >= 1, got {num_repeats}')
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, num_repeats=num_repeats, selected_round=0)
        self.seed, self.start = seed, 0
        self.epoch = seed  # epoch 0 until set_epoch

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        if not 0 <= start <= self.num_selected_samples:
            raise ValueError(f'start {start} is not in [0, {self.num_selected_samples}]')
        self.epoch = self.seed + epoch  # timm's __iter__ seeds its generator with self.epoch
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return self.num_selected_samples - self.start


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
