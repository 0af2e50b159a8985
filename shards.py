"""WebDataset-style tar shards: the reader of ``--data-set SHARDS`` (:class:`ShardDataset`) and
the writer of ``scripts/make_shards.py`` (:func:`write_shards`).

The layout is the one timm's webdataset reader reads (``timm.data.readers.reader_wds``: one
``_info.json`` at the root, shard paths relative to it), so its streaming reader takes the same
files::

    <root>/_info.json               {"name", "classes", "splits": {"train": {...}, "val": {...}}}
    <root>/train/train-000000.tar   train-000001.tar, ...
    <root>/val/val-000000.tar       ...

A split's entry holds ``name``, ``num_samples``, ``filenames`` (the shard paths, relative to the
root) and ``shard_lengths`` (samples per shard). A sample is two tar members with one key:
``<key>.<ext>``, the image file's bytes as they were (the extension lower-cased, ``jpeg`` as
``jpg``: :func:`member_ext`), and ``<key>.cls``, the class index in ASCII. The key is the sample's
index in the ImageFolder it came from (8 digits), so :meth:`ShardDataset.key` maps a sample back
to ``ImageFolder[key]``.

:class:`ShardDataset` is map-style: the member offsets are read once from the tar headers, then a
sample is one seek and one read in its shard. Each process, loader workers included, opens its
own file handles (at most :data:`MAX_OPEN_SHARDS`). The training samplers, repeated augmentation
and exact mid-epoch resume therefore work as they do for an image folder.
"""
from __future__ import annotations

import io
import json
import os
import random
import re
import tarfile
from collections import OrderedDict
from typing import Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from unreadable import READ_ERRORS, unreadable_record
from utils import UsageError

INFO = '_info.json'
SPLITS = ('train', 'val')
MAX_OPEN_SHARDS = 64  # file handles a process keeps open (the least recently used is closed)
IMAGE_EXTS = tuple(e.lstrip('.') for e in IMG_EXTENSIONS)
LAYOUT = (f'expected <data-path>/{INFO} and the shards it lists, as scripts/make_shards.py writes them '
          '(docs/training.md, "Data in shards")')
_MEMBER = re.compile(r'^((?:.*/|)[^./]+)\.([^/]*)$')  # webdataset's key / extension split


def pil_loader(data: bytes) -> Image.Image:
    """An image file's bytes -> an RGB PIL image, as torchvision's ImageFolder reads a file."""
    img = Image.open(io.BytesIO(data))
    return img.convert('RGB')


# Reading ------------------------------------------------------------------------------------------

def read_info(root: str) -> Dict[str, Any]:
    """``<root>/_info.json``, checked: ``classes`` and, for each split, its shard list and counts."""
    path = os.path.join(root, INFO)
    if not os.path.isfile(path):
        raise UsageError(f'{path} not found; {LAYOUT}')
    try:
        with open(path) as f:
            info = json.load(f)
        classes = [str(c) for c in info['classes']]
        for split in info['splits'].values():
            files, lengths = list(split['filenames']), [int(n) for n in split['shard_lengths']]
            if len(files) != len(lengths) or sum(lengths) != int(split['num_samples']):
                raise ValueError('filenames, shard_lengths and num_samples disagree')
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f'{path}: not a shard index ({type(e).__name__}: {e}); {LAYOUT}') from None
    info['classes'] = classes
    return info


Member = Tuple[str, int, int, Optional[bytes]]  # name, data offset, size, data (of .cls members)
_ZERO = bytes(512)


def _octal(field: bytes) -> int:
    return int(field.split(b'\0', 1)[0].strip() or b'0', 8)


def _scan_headers(f: BinaryIO, length: int) -> Optional[List[Member]]:
    """The regular-file members of an uncompressed ustar / GNU tar file, each header read directly
    (tarfile takes about ten times as long a member); None where a header needs tarfile (pax or
    GNU long-name records, sparse files, base-256 numbers)."""
    out: List[Member] = []
    pos = 0
    while pos < length:
        f.seek(pos)
        buf = f.read(1024)  # the header and, for a small member such as a .cls, all its data
        head = buf[:512]
        if len(head) < 512:
            raise tarfile.ReadError(f'unexpected end of data in the header at byte {pos}')
        if head == _ZERO:
            return out
        if head[124] & 0x80 or head[156:157] in (b'x', b'g', b'L', b'K', b'S'):
            return None
        try:
            size, checksum = _octal(head[124:136]), _octal(head[148:156])
        except ValueError:
            raise tarfile.ReadError(f'invalid header at byte {pos}') from None
        if checksum != sum(head[:148]) + 256 + sum(head[156:]):
            raise tarfile.ReadError(f'bad header checksum at byte {pos}')
        name = head[:100].split(b'\0', 1)[0]
        if head[257:265] == b'ustar\x0000' and head[345] != 0:
            name = head[345:500].split(b'\0', 1)[0] + b'/' + name
        if head[156:157] in (b'0', b'\0', b'7'):
            small = buf[512:512 + size] if name.lower().endswith(b'.cls') and size <= len(buf) - 512 else None
            out.append((name.decode('utf-8', 'surrogateescape'), pos + 512, size, small))
        pos += 512 + -(-size // 512) * 512
    if pos > length:
        raise tarfile.ReadError(f'unexpected end of data: the last member needs {pos - length} more bytes')
    return out


def _tarfile_members(path: str) -> List[Member]:
    """:func:`_scan_headers`' list, read by tarfile (any tar format), the .cls members' data with it."""
    out: List[Member] = []
    with tarfile.open(path, 'r:') as tf:
        while True:
            m = tf.next()
            tf.members.clear()  # keep no TarInfo per member: a shard can hold many thousands
            if m is None:
                return out
            if m.isfile():
                f = tf.extractfile(m) if m.name.lower().endswith('.cls') else None
                out.append((m.name, m.offset_data, m.size, f.read() if f is not None else None))


def index_shard(path: str, num_classes: int) -> Tuple[List[str], List[int], List[int], List[int]]:
    """(image member names, data offsets, sizes, class indices) of the samples of one shard, in
    file order. Raises :class:`UsageError` for a shard that is not a readable tar file or a sample
    without its image or its ``.cls`` member."""
    parts: Dict[str, Dict[str, Member]] = {}  # key -> extension -> member, in file order
    try:
        with open(path, 'rb') as f:
            members = _scan_headers(f, os.fstat(f.fileno()).st_size)
            if members is None:
                members = _tarfile_members(path)
            for m in members:
                match = _MEMBER.match(m[0])
                if match:
                    parts.setdefault(match.group(1), {})[match.group(2).lower()] = m
            names, offsets, sizes, targets = [], [], [], []
            for key, by_ext in parts.items():
                image = next((by_ext[e] for e in by_ext if e in IMAGE_EXTS), None)
                cls = by_ext.get('cls')
                if image is None or cls is None:
                    raise UsageError(f'{path}: sample {key} has no {"image" if image is None else ".cls"} member '
                                     f'(has {", ".join(sorted(by_ext))}); write the shards again with '
                                     'scripts/make_shards.py')
                data = cls[3]
                if data is None:
                    f.seek(cls[1])
                    data = f.read(cls[2])
                text = data.decode('ascii', 'replace').strip()
                if not text.isdigit() or int(text) >= num_classes:
                    raise UsageError(f'{path}: sample {key} has class {text!r}, not an index below {num_classes}')
                names.append(image[0])
                offsets.append(image[1])
                sizes.append(image[2])
                targets.append(int(text))
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UsageError(f'{path}: not a readable tar file ({type(e).__name__}: {e}); write the shards again '
                         'with scripts/make_shards.py') from None
    return names, offsets, sizes, targets


class ShardDataset(Dataset):
    """One split of the shards under ``root`` (:func:`write_shards`' layout), map-style.

    ``dataset[i]`` is ``(transform(loader(bytes)), class index)``, or an
    :class:`datasets.UnreadableImage` where the loader or the transform raises a read error (as
    the ImageFolder of ``--data-set FOLDER``). ``loader`` takes the image file's bytes (default
    :func:`pil_loader`: an RGB PIL image); :meth:`read` gives the raw ``(bytes, class index)`` of
    a sample. The order is the shards' (``filenames`` in ``_info.json``, then file order).
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None,
                 loader: Callable[[bytes], Any] = pil_loader) -> None:
        info = read_info(root)
        if split not in info['splits']:
            raise UsageError(f'{os.path.join(root, INFO)} has no split {split!r} (has '
                             f'{", ".join(info["splits"])}); {LAYOUT}')
        entry = info['splits'][split]
        self.root, self.split, self.transform, self.loader = root, split, transform, loader
        self.classes: List[str] = info['classes']
        self.paths = [os.path.join(root, f) for f in entry['filenames']]
        names: List[str] = []
        shard: List[int] = []
        offsets: List[int] = []
        sizes: List[int] = []
        targets: List[int] = []
        for s, (path, expected) in enumerate(zip(self.paths, entry['shard_lengths'])):
            n, o, z, t = index_shard(path, len(self.classes))
            if len(n) != int(expected):
                raise UsageError(f'{path}: {len(n)} samples, but {INFO} lists {expected} (a truncated or altered '
                                 'shard); write the shards again with scripts/make_shards.py')
            names += n
            offsets += o
            sizes += z
            targets += t
            shard += [s] * len(n)
        # numpy arrays, not lists of Python objects: a forked loader worker shares them unchanged
        self._names = np.array([n.encode('utf-8', 'surrogateescape') for n in names] or [b''], dtype=np.bytes_)
        self._shard = np.array(shard, dtype=np.int32)
        self._offset = np.array(offsets, dtype=np.int64)
        self._size = np.array(sizes, dtype=np.int64)
        self.targets = np.array(targets, dtype=np.int64)
        self._files: 'OrderedDict[int, BinaryIO]' = OrderedDict()
        self._pid: Optional[int] = None

    def __len__(self) -> int:
        return len(self._shard)

    def member(self, index: int) -> str:
        """``<shard path>:<image member name>`` of sample ``index`` (what warnings name)."""
        return f'{self.paths[self._shard[index]]}:{self._name(index)}'

    def key(self, index: int) -> str:
        """The key of sample ``index`` (for make_shards' shards: its ImageFolder index, 8 digits)."""
        return _MEMBER.match(self._name(index)).group(1)  # type: ignore[union-attr]

    def _name(self, index: int) -> str:
        return self._names[index].decode('utf-8', 'surrogateescape')

    def _file(self, shard: int) -> BinaryIO:
        if self._pid != os.getpid():  # a new loader worker: handles of its own, not its parent's
            self._files, self._pid = OrderedDict(), os.getpid()
        f = self._files.get(shard)
        if f is None:
            if len(self._files) >= MAX_OPEN_SHARDS:
                self._files.popitem(last=False)[1].close()
            f = self._files[shard] = open(self.paths[shard], 'rb')
        else:
            self._files.move_to_end(shard)
        return f

    def read(self, index: int) -> Tuple[bytes, int]:
        """The image file's bytes and the class index of sample ``index``: one seek and one read."""
        f = self._file(int(self._shard[index]))
        size = int(self._size[index])
        f.seek(int(self._offset[index]))
        data = f.read(size)
        if len(data) != size:
            raise OSError(f'read {len(data)} of {size} bytes: the shard changed after it was indexed')
        return data, int(self.targets[index])

    def __getitem__(self, index: int) -> Any:
        try:
            data, target = self.read(index)
            img = self.loader(data)
            if self.transform is not None:
                img = self.transform(img)
        except READ_ERRORS as e:
            return unreadable_record(self.member(index), self.split, e)
        return img, target

    def __getstate__(self) -> Dict[str, Any]:  # pickled to a spawned worker: without open files
        return {**self.__dict__, '_files': OrderedDict(), '_pid': None}

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


# Writing ------------------------------------------------------------------------------------------

def _split_samples(src: str) -> Tuple[List[str], Dict[str, List[Tuple[str, int]]]]:
    """(classes, split -> [(path, class index)]) of the ImageFolder pair under ``src``, in
    torchvision's ImageFolder order (sorted classes, sorted files, its image extensions)."""
    for split in SPLITS:
        if not os.path.isdir(os.path.join(src, split)):
            raise UsageError(f'{os.path.join(src, split)} not found; expected SRC/train/<class>/<image> and '
                             'SRC/val/<class>/<image>')
    classes: Optional[List[str]] = None
    samples = {}
    for split in SPLITS:
        folder = os.path.join(src, split)
        try:
            found, class_to_idx = find_classes(folder)
            samples[split] = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS)
        except (FileNotFoundError, RuntimeError) as e:
            raise UsageError(f'{folder}: {str(e).strip().splitlines()[0]}') from None
        if classes is not None and found != classes:
            raise UsageError(f'{src}: train has {len(classes)} class folders, val {len(found)}, not the same '
                             f'names ({", ".join(sorted(set(classes) ^ set(found))[:3])} in one only)')
        classes = found
    assert classes is not None
    return classes, samples


def member_ext(path: str) -> str:
    """The extension of an image's member: the file's, lower-cased, and ``jpeg`` written ``jpg``
    (ImageNet's ``.JPEG``), the key timm's webdataset reader looks for by default (``jpg;png;webp``)."""
    ext = os.path.splitext(path)[1].lower().lstrip('.')
    return 'jpg' if ext == 'jpeg' else ext


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = len(data), 0, 0o444  # fixed metadata: the same input gives the same bytes
    tar.addfile(ti, io.BytesIO(data))


def _write_atomic(path: str, write: Callable[[BinaryIO], None]) -> None:
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.tmp')
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_shards(src: str, dst: str, shard_size: int, shuffle_seed: Optional[int] = 0,
                 log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Write the ImageFolder pair ``src/train``, ``src/val`` as tar shards of ``shard_size``
    samples under ``dst`` (which must not exist or be empty), then ``dst/_info.json``; returns
    that json's content. The training samples are shuffled with ``shuffle_seed`` before they are
    cut into shards, so that each shard mixes the classes (None: ImageFolder order); the
    validation samples keep ImageFolder order. Each file is written to a temporary name, then
    renamed: ``_info.json`` is the last, so a write that did not finish has none."""
    if shard_size < 1:
        raise UsageError(f'--shard-size must be at least 1, got {shard_size}')
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
        raise UsageError(f'{dst} exists and is not an empty folder; make_shards never overwrites: remove it or '
                         'choose another DST')
    classes, samples = _split_samples(src)
    info: Dict[str, Any] = {'name': os.path.basename(os.path.normpath(src)), 'classes': classes, 'splits': {}}
    for split in SPLITS:
        items = samples[split]
        order = list(range(len(items)))
        if split == 'train' and shuffle_seed is not None:
            random.Random(shuffle_seed).shuffle(order)
        width = max(8, len(str(len(items) - 1)))
        os.makedirs(os.path.join(dst, split), exist_ok=True)
        filenames, lengths = [], []
        for start in range(0, len(order), shard_size):
            chunk = order[start:start + shard_size]
            rel = f'{split}/{split}-{len(filenames):06d}.tar'

            def write(f: BinaryIO, chunk: Sequence[int] = chunk) -> None:
                with tarfile.open(fileobj=f, mode='w', format=tarfile.USTAR_FORMAT) as tar:
                    for i in chunk:
                        path, target = items[i]
                        with open(path, 'rb') as img:
                            data = img.read()
                        key = f'{i:0{width}d}'
                        _add(tar, f'{key}.{member_ext(path)}', data)
                        _add(tar, f'{key}.cls', str(target).encode('ascii'))

            _write_atomic(os.path.join(dst, rel), write)
            filenames.append(rel)
            lengths.append(len(chunk))
            log(f'wrote {rel}: {len(chunk)} samples')
        info['splits'][split] = {'name': split, 'num_samples': len(items), 'filenames': filenames,
                                 'shard_lengths': lengths}
    text = json.dumps(info, indent=1).encode()
    _write_atomic(os.path.join(dst, INFO), lambda f: f.write(text))  # type: ignore[arg-type,return-value]
    log(f'{dst}: {len(classes)} classes; ' + ', '.join(
        f'{s} {info["splits"][s]["num_samples"]} samples in {len(info["splits"][s]["filenames"])} shards'
        for s in SPLITS))
    return info


__all__ = ['INFO', 'MAX_OPEN_SHARDS', 'ShardDataset', 'index_shard', 'member_ext', 'pil_loader',
           'read_info', 'write_shards']
