"""Data sets and transforms of the training script.

``--data-set``: IMNET (ImageFolder ``train/`` + ``val/``, 1000 classes), CIFAR10 / CIFAR100 (the
python-version folders ``cifar-10-batches-py`` / ``cifar-100-python``; ``CIFAR`` is CIFAR100, as
in DeiT), INAT / INAT19 (iNaturalist 2018 / 2019 json layout), FOLDER (any ImageFolder pair, class
count from the folders), SHARDS (an ImageFolder pair as WebDataset-style tar shards, written by
``scripts/make_shards.py``, each image read by its offset: ``shards.py``), DIGITS (scikit-learn's
bundled 8x8 digits, no download: ``bvit.data``), FASHION_MNIST (the four IDX files of
Fashion-MNIST, gzip or not, read by torchvision's FashionMNIST class) and FAKE (torchvision's
FakeData: random images, for throughput and smoke runs without a data set).
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset, Subset
from torchvision import datasets as tv_datasets
from torchvision import transforms

import pipeline
import shards
from bvit.data import DigitsDataset, eval_transform
from unreadable import READ_ERRORS, unreadable_record
from utils import UsageError

DATASETS = ('IMNET', 'CIFAR10', 'CIFAR100', 'CIFAR', 'INAT', 'INAT19', 'FOLDER', 'SHARDS', 'DIGITS', 'FASHION_MNIST',
            'FAKE')
INAT_CATEGORIES = ('kingdom', 'phylum', 'class', 'order', 'supercategory', 'family', 'genus', 'name')

FOLDER_LAYOUT = ('expected <data-path>/train/<class>/<image> and <data-path>/val/<class>/<image>, '
                 'with the same class folders in both')

# FASHION_MNIST: Debian's dataset-fashion-mnist package puts the four gzip IDX files here.
FASHION_MNIST_DEFAULT_PATH = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_FILES = ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte',
                       't10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte')


def _read_rgb(path: str) -> Image.Image:
    with Image.open(path) as img:
        return img.convert('RGB')


class _ImageFolder(tv_datasets.ImageFolder):
    """torchvision's ImageFolder, returning an :class:`unreadable.UnreadableImage` for a file it cannot read.
    ``loader``: path -> image (PIL's, torchvision's default; ``pipeline.read_bytes`` under
    ``--pipeline fast``, whose transform decodes)."""

    def __init__(self, root: str, split: str, transform: Any, loader: Optional[Callable[[str], Any]] = None) -> None:
        super().__init__(root, transform=transform, **({'loader': loader} if loader is not None else {}))
        self.split = split

    def __getitem__(self, index: int) -> Any:
        try:
            return super().__getitem__(index)
        except READ_ERRORS as e:
            return unreadable_record(self.samples[index][0], self.split, e)


# Transforms ---------------------------------------------------------------------------------------

def _posterize_compat(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """Posterize keeping ``bits_to_keep`` bits; 0 bits gives a black image, as Pillow < 13 did."""
    from PIL import ImageOps
    bits = int(bits_to_keep)
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


def _fix_timm_posterize() -> None:
    """Pillow 13 refuses ``ImageOps.posterize(img, 0)``, which timm's RandAugment 'inc1' policy
    (the paper's rand-m9-mstd0.5-inc1) asks for at the top magnitude, so training would crash
    at random. Route timm's posterize ops through :func:`_posterize_compat` where needed."""
    from PIL import ImageOps
    from timm.data import auto_augment
    try:
        ImageOps.posterize(Image.new('L', (1, 1)), 0)
        return  # this Pillow still accepts 0 bits
    except ValueError:
        pass
    for name in ('Posterize', 'PosterizeIncreasing', 'PosterizeOriginal'):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize_compat


def _three_augment(args: Any) -> transforms.Compose:
    """DeiT III's 3-Augment: a crop (random-resized, or simple random crop with ``--src``), a
    horizontal flip, then one of grayscale / solarisation / Gaussian blur, color jitter."""
    size = args.input_size
    if args.src:
        crop: List[Any] = [transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                           transforms.RandomCrop(size, padding=4, padding_mode='reflect')]
    else:
        crop = [transforms.RandomResizedCrop(size, scale=tuple(args.scale), ratio=tuple(args.ratio),
                                             interpolation=transforms.InterpolationMode.BICUBIC)]
    ops = crop + [
        transforms.RandomHorizontalFlip(args.hflip),
        transforms.RandomChoice([transforms.Grayscale(num_output_channels=3),
                                 transforms.RandomSolarize(threshold=128, p=1.0),
                                 transforms.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))]),
    ]
    if args.color_jitter:
        ops.append(transforms.ColorJitter(args.color_jitter, args.color_jitter, args.color_jitter))
    ops += [transforms.ToTensor(), transforms.Normalize(args.mean, args.std)]
    return transforms.Compose(ops)


def build_transform(is_train: bool, args: Any) -> Any:
    """Training: with ``--pipeline fast``, the workers' part of it (``pipeline.WorkerTransform``);
    with ``--pipeline deit``, timm's ``create_transform`` (random-resized crop, flip, RandAugment,
    random erasing as set by the flags) or 3-Augment with ``--ThreeAugment``. Evaluation:
    :func:`bvit.data.eval_transform` (``--eval-crop-ratio``)."""
    if is_train:
        _fix_timm_posterize()
        if args.pipeline == 'fast':
            return pipeline.worker_transform(args)
        if args.ThreeAugment:
            return _three_augment(args)
        from timm.data import create_transform
        aa = args.aa if args.aa and str(args.aa).lower() not in ('', 'none') else None
        return create_transform(
            input_size=args.input_size, is_training=True, scale=tuple(args.scale), ratio=tuple(args.ratio),
            hflip=args.hflip, vflip=args.vflip, color_jitter=args.color_jitter, auto_augment=aa,
            interpolation=args.train_interpolation, mean=tuple(args.mean), std=tuple(args.std),
            re_prob=args.reprob, re_mode=args.remode, re_count=args.recount)
    return eval_transform(args.input_size, args.mean, args.std, args.eval_crop_ratio)


# Fashion-MNIST ------------------------------------------------------------------------------------

def _fashion_mnist_cache_root() -> str:
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'bvit', 'fashion-mnist')


def _fashion_mnist_missing(path: str, ask_download: bool) -> UsageError:
    return UsageError(
        f'Fashion-MNIST not found in {path} (looked for {", ".join(f + "[.gz]" for f in FASHION_MNIST_FILES)}, '
        f'also under FashionMNIST/raw/); get it with `apt-get install dataset-fashion-mnist` (installs to '
        f'{FASHION_MNIST_DEFAULT_PATH}, the default --data-path)'
        + (' or pass --download with a writable --data-path' if ask_download else ''))


def _fashion_mnist_raw_dir(path: str) -> Optional[str]:
    """A folder holding the four uncompressed IDX files of ``path`` (a folder with them, gzip or
    not, directly or under torchvision's ``FashionMNIST/raw``), or None if some are missing.
    Gzip files are decompressed once into a cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``,
    ``bvit/fashion-mnist/``), so a read-only folder such as Debian's works as it is."""
    import gzip
    import hashlib
    import shutil
    import tempfile
    for folder in (path, os.path.join(path, 'FashionMNIST', 'raw')):
        found = {}
        for name in FASHION_MNIST_FILES:
            plain, gz = os.path.join(folder, name), os.path.join(folder, name + '.gz')
            if os.path.isfile(plain):
                found[name] = plain
            elif os.path.isfile(gz):
                found[name] = gz
        if len(found) < len(FASHION_MNIST_FILES):
            continue
        if all(not f.endswith('.gz') for f in found.values()):
            return folder
        key = hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:12]
        cache = os.path.join(_fashion_mnist_cache_root(), key)
        os.makedirs(cache, exist_ok=True)
        for name, src in found.items():
            dst = os.path.join(cache, name)
            if os.path.isfile(dst) and os.path.getmtime(dst) >= os.path.getmtime(src):
                continue
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=name + '.')  # atomic: runs may start side by side
            try:
                with os.fdopen(fd, 'wb') as out, (gzip.open(src, 'rb') if src.endswith('.gz') else open(src, 'rb')) as inp:
                    shutil.copyfileobj(inp, out)
                os.replace(tmp, dst)
            except (OSError, EOFError) as e:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise UsageError(f'{src}: cannot be read as an IDX file ({e})') from None
        return cache
    return None


class FashionMNISTFolder(tv_datasets.FashionMNIST):
    """torchvision's FashionMNIST reading the IDX files from ``raw_dir`` itself instead of
    ``<root>/FashionMNIST/raw`` (nothing is copied or downloaded)."""

    def __init__(self, raw_dir: str, train: bool, transform: Optional[Any] = None) -> None:
        self._raw_dir = raw_dir
        super().__init__(raw_dir, train=train, transform=transform, download=False)

    @property
    def raw_folder(self) -> str:
        return self._raw_dir


def _to_rgb(img: Image.Image) -> Image.Image:
    return img.convert('RGB')


def _fashion_mnist(args: Any, train: bool, transform: Any) -> Dataset:
    """Fashion-MNIST as 3-channel PIL images (gray repeated, so every timm model and transform
    takes it unchanged): 60,000 training or 10,000 test images, 28x28, 10 classes."""
    path = args.data_path or FASHION_MNIST_DEFAULT_PATH
    raw = _fashion_mnist_raw_dir(path) if os.path.isdir(path) else None
    if raw is None and args.download:
        if not args.data_path:
            raise UsageError('--download needs a writable --data-path for Fashion-MNIST')
        try:
            tv_datasets.FashionMNIST(path, train=train, download=True)
        except (OSError, RuntimeError) as e:
            raise UsageError(f'Fashion-MNIST download into {path} failed: {str(e).strip().splitlines()[0]}') from None
        raw = _fashion_mnist_raw_dir(path)
    if raw is None:
        raise _fashion_mnist_missing(path, ask_download=not args.download)
    try:
        return FashionMNISTFolder(raw, train=train, transform=transforms.Compose([_to_rgb, transform]))
    except (RuntimeError, AssertionError, ValueError, OSError) as e:
        raise UsageError(f'{path}: the Fashion-MNIST IDX files cannot be read ({str(e).strip() or type(e).__name__})') from None


# iNaturalist --------------------------------------------------------------------------------------

class INatDataset(Dataset):
    """iNaturalist 2018 / 2019 in its released json layout::

        <root>/train2018.json, <root>/val2018.json   (or ...2019.json)
        <root>/categories.json                       (optional: the full taxonomy of every category id)
        <root>/<file_name of each image>             (e.g. train_val2018/Plantae/7477/xxx.jpg)

    Each json holds ``images`` (``id``, ``file_name``) and ``annotations`` (``image_id``,
    ``category_id``). ``category`` picks the taxonomy level used as the label (default
    ``name``, the species); the class list is the sorted set of labels in the training json.
    Category records come from ``categories.json`` when present, else from the json's own
    ``categories`` list.
    """

    def __init__(self, root: str, train: bool, year: int, category: str = 'name',
                 transform: Optional[Any] = None, loader: Optional[Callable[[str], Any]] = None) -> None:
        self.root = root
        self.transform = transform
        self.loader = loader or _read_rgb
        split = 'train' if train else 'val'
        self.split = split
        records = self._read(os.path.join(root, f'{split}{year}.json'))
        train_records = records if train else self._read(os.path.join(root, f'train{year}.json'))
        cat_path = os.path.join(root, 'categories.json')
        if os.path.isfile(cat_path):
            with open(cat_path) as f:
                cats = json.load(f)
        else:
            cats = train_records.get('categories', [])
        by_id: Dict[int, Dict[str, Any]] = {}
        for i, rec in enumerate(cats):
            by_id[int(rec.get('id', i))] = rec

        def label_of(cat_id: int) -> str:
            rec = by_id.get(int(cat_id))
            if rec is None or category not in rec:
                raise UsageError(f'{root}: category id {cat_id} has no {category!r} entry in the category list')
            return str(rec[category])

        self.classes = sorted({label_of(a['category_id']) for a in train_records['annotations']})
        index = {c: i for i, c in enumerate(self.classes)}
        cat_of_image = {a['image_id']: a['category_id'] for a in records['annotations']}
        self.samples: List[Tuple[str, int]] = []
        for img in records['images']:
            if img['id'] not in cat_of_image:
                raise UsageError(f'{root}: image {img["id"]} ({img["file_name"]}) has no annotation')
            label = label_of(cat_of_image[img['id']])
            if label not in index:
                raise UsageError(f'{root}: the {split} set has class {label!r}, which the training set does not')
            self.samples.append((os.path.join(root, img['file_name']), index[label]))
        self.targets = [t for _, t in self.samples]
        self.split_classes = sorted({label_of(a['category_id']) for a in records['annotations']})

    @staticmethod
    def _read(path: str) -> Dict[str, Any]:
        if not os.path.isfile(path):
            raise UsageError(f'{path} not found: INAT expects <data-path>/train<year>.json and val<year>.json '
                             '(2018 for INAT, 2019 for INAT19) next to the image folders')
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise UsageError(f'{path}: not a readable json file ({e})') from None
        if not isinstance(data, dict) or 'images' not in data or 'annotations' not in data:
            raise UsageError(f"{path}: expected a json object with 'images' and 'annotations'")
        return data

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        path, target = self.samples[index]
        try:
            img = self.loader(path)
            if self.transform is not None:
                img = self.transform(img)
        except READ_ERRORS as e:  # also a file listed in the json but missing
            return unreadable_record(path, self.split, e)
        return img, target


# FAKE ---------------------------------------------------------------------------------------------

class FakeImages(tv_datasets.FakeData):
    """``--data-set FAKE``: torchvision's ``FakeData`` (random images of the input size, random
    labels; index i gives the same image and label in every epoch and process), for throughput
    and smoke runs without a data set, through the split's usual transform. The splits differ
    (the validation images come from other seeds). With ``signal`` > 0 a fixed pattern of its
    class, ``signal`` times a unit-variance tensor, is added to each transformed image, so that a
    model can learn (random labels alone cannot be learnt: the loss would stay at ln(classes));
    it costs one addition per image. Under ``--pipeline fast`` (a uint8 image and its drawn
    operations) it is added before normalisation, scaled by ``255 * std``, and rounded and clipped
    to uint8. ``FakeData`` seeds torch's generators for every image (and restores the CPU one
    only): on a GPU, use loader workers (``--num_workers`` > 0), as usual."""

    def __init__(self, size: int, input_size: int, num_classes: int, train: bool, transform: Any,
                 signal: float, std: Sequence[float] = (1., 1., 1.)) -> None:
        super().__init__(size=size, image_size=(3, input_size, input_size), num_classes=num_classes,
                         transform=transform, random_offset=0 if train else 10 ** 9)
        self.classes = [str(c) for c in range(num_classes)]
        self.signal = float(signal)
        g = torch.Generator().manual_seed(12345)
        self.patterns = torch.randn(num_classes, 3, input_size, input_size, generator=g) if signal else None
        self.std255 = 255 * torch.tensor(std).view(3, 1, 1)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        img, target = super().__getitem__(index)
        target = int(target)
        if self.patterns is not None and isinstance(img, tuple):  # --pipeline fast: (uint8 image, ops)
            x = img[0].float() + self.signal * self.std255 * self.patterns[target]
            return (x.round_().clamp_(0, 255).to(torch.uint8), img[1]), target
        if self.patterns is not None and isinstance(img, torch.Tensor) and img.shape == self.patterns.shape[1:]:
            img = img + self.signal * self.patterns[target]
        return img, target


# Building -----------------------------------------------------------------------------------------

def canonical_data_set(name: str) -> str:
    key = str(name).upper()
    if key not in DATASETS:
        raise UsageError(f'unknown --data-set {name!r}; choose one of {", ".join(DATASETS)}')
    return 'CIFAR100' if key == 'CIFAR' else key


def _check_data_path(args: Any) -> str:
    path = args.data_path
    if not path:
        raise UsageError(f'--data-path is required for --data-set {args.data_set} '
                         '(only DIGITS, bundled with scikit-learn, and FAKE need none)')
    if not os.path.isdir(path):
        if args.data_set in ('CIFAR10', 'CIFAR100') and args.download:
            return path
        raise UsageError(f'--data-path {path} does not exist or is not a folder')
    if not os.listdir(path) and not (args.data_set in ('CIFAR10', 'CIFAR100') and args.download):
        raise UsageError(f'--data-path {path} is empty; {_layout(args.data_set)}')
    return path


def _layout(data_set: str) -> str:
    if data_set in ('IMNET', 'FOLDER'):
        return FOLDER_LAYOUT
    if data_set == 'CIFAR10':
        return 'expected <data-path>/cifar-10-batches-py (the CIFAR-10 python version), or pass --download'
    if data_set == 'CIFAR100':
        return 'expected <data-path>/cifar-100-python (the CIFAR-100 python version), or pass --download'
    if data_set in ('INAT', 'INAT19'):
        year = 2019 if data_set == 'INAT19' else 2018
        return f'expected <data-path>/train{year}.json, val{year}.json and the image folders they name'
    if data_set == 'SHARDS':
        return shards.LAYOUT
    return ''


def _image_folder(root: str, split: str, transform: Any, loader: Optional[Callable[[str], Any]]
                  ) -> tv_datasets.ImageFolder:
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise UsageError(f'{folder} not found; {FOLDER_LAYOUT}')
    try:
        return _ImageFolder(folder, split, transform, loader)
    except (FileNotFoundError, RuntimeError) as e:
        raise UsageError(f'{folder}: {str(e).strip().splitlines()[0]}; {FOLDER_LAYOUT}') from None


def _cifar(args: Any, train: bool, transform: Any) -> Dataset:
    ten = args.data_set == 'CIFAR10'
    folder = 'cifar-10-batches-py' if ten else 'cifar-100-python'
    root = args.data_path
    if os.path.basename(os.path.normpath(root)) == folder:
        root = os.path.dirname(os.path.normpath(root))
    if not args.download and not os.path.isdir(os.path.join(root, folder)):
        raise UsageError(f'{os.path.join(root, folder)} not found; {_layout(args.data_set)}')
    cls = tv_datasets.CIFAR10 if ten else tv_datasets.CIFAR100
    try:
        return cls(root, train=train, transform=transform, download=bool(args.download))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[0].replace('download=True', '--download')
        raise UsageError(f'{os.path.join(root, folder)}: {reason}') from None


def _subset(dataset: Dataset, n: Optional[int], seed: int) -> Dataset:
    """A fixed random subset of ``n`` samples (in index order), for quick runs."""
    if not n or n >= len(dataset):
        return dataset
    g = torch.Generator()
    g.manual_seed(seed)
    idx = sorted(torch.randperm(len(dataset), generator=g)[:n].tolist())
    sub = Subset(dataset, idx)
    sub.classes = dataset.classes  # type: ignore[attr-defined]
    return sub


def build_dataset(is_train: bool, args: Any, transform: Optional[Any] = None) -> Tuple[Dataset, int]:
    """One split of ``args.data_set`` with the transform for that split: (dataset, classes).

    The dataset has a ``classes`` attribute (the class names in label order).
    """
    args.data_set = canonical_data_set(args.data_set)
    if transform is None:
        transform = build_transform(is_train, args)
    name = args.data_set
    # --pipeline fast: files are read as bytes, decoded by its worker transform
    loader = pipeline.read_bytes if is_train and args.pipeline == 'fast' else None
    if name == 'DIGITS':
        ds: Dataset = DigitsDataset(train=is_train, transform=transform)
    elif name == 'FASHION_MNIST':
        ds = _fashion_mnist(args, is_train, transform)
    elif name == 'FAKE':
        ds = FakeImages(args.fake_size if is_train else args.fake_val_size, args.input_size, args.fake_classes,
                        is_train, transform, args.fake_signal, args.std)
    else:
        root = _check_data_path(args)
        if name in ('IMNET', 'FOLDER'):
            ds = _image_folder(root, 'train' if is_train else 'val', transform, loader)
        elif name in ('CIFAR10', 'CIFAR100'):
            ds = _cifar(args, is_train, transform)
        elif name == 'SHARDS':
            ds = shards.ShardDataset(root, 'train' if is_train else 'val', transform,
                                     pipeline.bytes_tensor if loader is not None else shards.pil_loader)
        else:
            ds = INatDataset(root, train=is_train, year=2019 if name == 'INAT19' else 2018,
                             category=args.inat_category, transform=transform, loader=loader)
    n = args.train_subset if is_train else args.val_subset
    ds = _subset(ds, n, seed=1 if is_train else 2)
    return ds, len(ds.classes)  # type: ignore[attr-defined]


def _split_classes(ds: Dataset) -> Sequence[str]:
    base = ds.dataset if isinstance(ds, Subset) else ds
    return list(getattr(base, 'split_classes', getattr(base, 'classes')))


def build_datasets(args: Any, need_train: bool = True) -> Tuple[Optional[Dataset], Dataset, int]:
    """(train set or None, validation set, number of classes), after checking that the train and
    val class lists are identical and, for IMNET, that there are 1000 classes."""
    val, nb_classes = build_dataset(False, args)
    train = None
    if need_train:
        train, nb_train = build_dataset(True, args)
        train_classes, val_classes = _split_classes(train), _split_classes(val)
        if list(train_classes) != list(val_classes):
            only_train = sorted(set(train_classes) - set(val_classes))[:3]
            only_val = sorted(set(val_classes) - set(train_classes))[:3]
            detail = []
            if only_train:
                detail.append(f'only in train: {", ".join(map(str, only_train))}')
            if only_val:
                detail.append(f'only in val: {", ".join(map(str, only_val))}')
            raise UsageError(f'train and val class lists differ ({len(train_classes)} vs {len(val_classes)} classes'
                             f'{"; " + "; ".join(detail) if detail else ""}); {_layout(args.data_set) or FOLDER_LAYOUT}')
        nb_classes = nb_train
    if args.data_set == 'IMNET' and nb_classes != 1000:
        raise UsageError(f'IMNET needs 1000 classes but {args.data_path} has {nb_classes}; {FOLDER_LAYOUT} '
                         '(use --data-set FOLDER for another class count)')
    if len(val) == 0:
        raise UsageError(f'the validation set of {args.data_set} is empty')
    return train, val, nb_classes


__all__ = ['DATASETS', 'INAT_CATEGORIES', 'DigitsDataset', 'FakeImages', 'FashionMNISTFolder', 'INatDataset', 'build_transform', 'build_dataset',
           'build_datasets', 'canonical_data_set']
