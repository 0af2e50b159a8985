"""Images that cannot be read (missing, truncated, not an image): the record a file-based data set
returns instead of raising (``datasets.py``'s folders and iNaturalist, ``shards.py``), and the
collate function that leaves those records out of the batch. The training loop
(``engine.UnreadableImages``) warns about them, counts them and stops past ``--max-bad-images``.
"""
from __future__ import annotations

from typing import Any, List, NamedTuple, Sequence, Tuple

from torch.utils.data import default_collate


class UnreadableImage(NamedTuple):
    """The path of an image that could not be read, the split it belongs to and why (the
    exception's type and message on one line)."""
    path: str
    split: str
    reason: str


READ_ERRORS = (OSError, SyntaxError)  # PIL: OSError (truncated, unidentified, missing), SyntaxError (broken PNG)


def unreadable_record(path: str, split: str, error: BaseException) -> UnreadableImage:
    """The record of ``path`` in ``split``, which raised ``error`` (one of :data:`READ_ERRORS`)."""
    reason = ' '.join(str(error).split()) or type(error).__name__
    return UnreadableImage(str(path), split, f'{type(error).__name__}: {reason}')


def collate_skipping_unreadable(batch: Sequence[Any]) -> Tuple[Any, Any, List[UnreadableImage]]:
    """``(images, targets, unreadable)``: the readable samples collated as usual (None, None when
    there are none) and the :class:`UnreadableImage` records of the others."""
    good = [s for s in batch if not isinstance(s, UnreadableImage)]
    bad = [s for s in batch if isinstance(s, UnreadableImage)]
    if not good:
        return None, None, bad
    images, targets = default_collate(good)
    return images, targets, bad


__all__ = ['UnreadableImage', 'READ_ERRORS', 'unreadable_record', 'collate_skipping_unreadable']
