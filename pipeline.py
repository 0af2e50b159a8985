"""The training input pipeline of ``--pipeline fast``: DeiT's augmentation, split between the
loader's workers and the device.

DeiT's pipeline (``--pipeline deit``, timm's ``create_transform``) does everything per image in the
workers: PIL decoding, the random-resized crop, the flip, RandAugment, conversion to float,
normalisation and random erasing. This one keeps in the workers only what must see the whole
image, on uint8 tensors:

- workers (:class:`WorkerTransform`): decode with torchvision (libjpeg-turbo; PIL for what it
  cannot read), the random-resized crop (timm's ``RandomResizedCropAndInterpolation.get_params``)
  resized by torchvision's antialiased uint8 resize, the flips (torchvision's random flips), and
  the *drawing* of RandAugment's operations and magnitudes by timm's own ``RandAugment`` object;
  a sample is ``(uint8 image (3, S, S), ops (layers, 3) float64)``, ``ops[l] = (code, argument,
  bilinear)``, code -1 where layer ``l`` drew no operation;
- device (:class:`DeviceAugment`): the drawn RandAugment operations, batched per operation, on
  uint8, then normalisation and timm's ``RandomErasing`` on the float batch.

Every random parameter is drawn by the same timm / torchvision code as in DeiT's pipeline, so the
distributions are the same (tests/test_pipeline.py tests them). The pixels differ in details:
torchvision's antialiased bicubic resize against PIL's, bicubic ``grid_sample`` (a = -0.75)
against PIL's affine bicubic (a = -0.5) for rotations, shears and translations, and the
rounding of some operations (tests/test_pipeline.py bounds each against PIL). docs/training.md,
"The input pipeline", shows both side by side and what each costs per image.
"""
from __future__ import annotations

import io
import math
import random
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

PIPELINES = ('fast', 'deit')

# RandAugment's operations, by the name of timm's function that applies them (several op names
# share one: 'Color' and 'ColorIncreasing' are both timm.data.auto_augment.color). The code of an
# operation is its index here.
OPS = ('auto_contrast', 'equalize', 'invert', 'rotate', 'posterize', 'solarize', 'solarize_add', 'color',
       'contrast', 'brightness', 'sharpness', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel',
       'translate_x_abs', 'translate_y_abs')
AFFINE = ('rotate', 'shear_x', 'shear_y', 'translate_x_rel', 'translate_y_rel', 'translate_x_abs', 'translate_y_abs')
_OP_OF_FUNCTION = {'_posterize_compat': 'posterize'}  # datasets._fix_timm_posterize's stand-in for Pillow 13
_INTERPOLATION = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
                  'nearest': InterpolationMode.NEAREST}


class UnsupportedAugmentation(ValueError):
    """An augmentation flag this pipeline does not implement (``--pipeline deit`` does)."""


# Workers ------------------------------------------------------------------------------------------

def bytes_tensor(data: bytes) -> torch.Tensor:
    """An image file's bytes as a uint8 tensor, undecoded (the shards' loader under ``--pipeline
    fast``; :class:`WorkerTransform` decodes)."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def read_bytes(path: str) -> torch.Tensor:
    """A file's bytes as a uint8 tensor (the image folders' loader under ``--pipeline fast``)."""
    with open(path, 'rb') as f:
        return bytes_tensor(f.read())


def decode(data: Any) -> torch.Tensor:
    """uint8 RGB image (3, H, W) from file bytes (a uint8 tensor), a PIL image or a uint8 tensor.
    Bytes go to torchvision's decoder (JPEG, PNG, GIF, WEBP), and to PIL where it fails (other
    formats, CMYK JPEGs): OSError if neither reads them, as the image folders expect."""
    if isinstance(data, Image.Image):
        return TF.pil_to_tensor(data.convert('RGB'))
    if data.dim() == 3:
        return data
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        pass
    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:
            return TF.pil_to_tensor(img.convert('RGB'))
    except SyntaxError as e:  # PIL: a broken PNG
        raise OSError(str(e)) from None


class _Recorded:
    """Stands in for the image while timm's RandAugment draws: each operation it would apply is
    appended to ``ops`` as ``(code, argument)``."""

    def __init__(self) -> None:
        self.ops: List[Tuple[int, float]] = []


class _Record:
    """The ``aug_fn`` of a RandAugment operation while it draws: appends ``(code, first level
    argument or 0, 1 if it resamples bilinearly)`` to the stand-in image. The resampling is drawn
    as timm's ``_interpolation`` draws it (``--train-interpolation random``: bilinear or bicubic)."""

    def __init__(self, name: str) -> None:
        self.code = OPS.index(name)

    def __call__(self, img: _Recorded, *level_args: Any, **kwargs: Any) -> _Recorded:
        from timm.data.auto_augment import _interpolation
        bilinear = OPS[self.code] in AFFINE and _interpolation(dict(kwargs)) == Image.Resampling.BILINEAR
        img.ops.append((self.code, float(level_args[0]) if level_args else 0., float(bilinear)))
        return img


def rand_augment(config: str, size: int, mean: Sequence[float], interpolation: str) -> Any:
    """timm's RandAugment for ``config`` with the hyper-parameters timm's ``create_transform``
    gives it, each operation's ``aug_fn`` replaced by a recorder (its drawing code untouched).
    UnsupportedAugmentation for an operation with no device form here."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp
    hparams: Dict[str, Any] = dict(translate_const=int(size * 0.45),
                                   img_mean=tuple(min(255, round(255 * x)) for x in mean))
    if interpolation != 'random':  # as create_transform: timm's default then draws bilinear or bicubic
        hparams['interpolation'] = str_to_pil_interp(interpolation)
    ra = rand_augment_transform(config, hparams)
    for op in ra.ops:
        name = _OP_OF_FUNCTION.get(op.aug_fn.__name__, op.aug_fn.__name__)
        if name not in OPS:
            raise UnsupportedAugmentation(f'--pipeline fast has no device form of RandAugment op {op.name} '
                                          f'(in --aa {config}); use --pipeline deit')
        op.aug_fn = _Record(name)
    return ra


class WorkerTransform:
    """What a loader worker does to one training image under ``--pipeline fast``.

    ``img`` (file bytes as a uint8 tensor, or a PIL image) -> ``(image, ops)``: the decoded image
    randomly cropped (area fraction in ``scale``, aspect ratio in ``ratio``: timm's draws), resized
    to ``size`` x ``size`` (uint8, antialiased; ``interpolation`` 'random' draws bilinear or bicubic
    per image as timm does), flipped with probabilities ``hflip`` / ``vflip``, color-jittered by
    torchvision's ``ColorJitter(color_jitter)`` when there is no ``aa`` (as timm); and ``ops``
    (layers, 3) float64, the RandAugment operations drawn for it (:class:`_Record`; code -1: the
    layer drew none), (0, 3) without ``aa``."""

    def __init__(self, size: int, scale: Sequence[float], ratio: Sequence[float], interpolation: str,
                 hflip: float, vflip: float, aa: Optional[str], mean: Sequence[float],
                 color_jitter: float = 0.) -> None:
        if interpolation not in _INTERPOLATION and interpolation != 'random':
            raise UnsupportedAugmentation(f'--pipeline fast takes --train-interpolation '
                                          f'{"/".join(_INTERPOLATION)}/random, not {interpolation!r}')
        self.size = int(size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = interpolation
        steps: List[Any] = [T.RandomHorizontalFlip(hflip), T.RandomVerticalFlip(vflip)]
        if not aa and color_jitter:
            steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
        self.after_crop = T.Compose(steps)
        self.ra = rand_augment(aa, self.size, mean, interpolation) if aa else None
        self.layers = self.ra.num_layers if self.ra is not None else 0

    def __call__(self, img: Any) -> Tuple[torch.Tensor, torch.Tensor]:
        from timm.data.transforms import RandomResizedCropAndInterpolation
        x = decode(img)
        i, j, h, w = RandomResizedCropAndInterpolation.get_params(x, self.scale, self.ratio)
        mode = (random.choice((InterpolationMode.BILINEAR, InterpolationMode.BICUBIC))
                if self.interpolation == 'random' else _INTERPOLATION[self.interpolation])
        x = TF.resize(x[:, i:i + h, j:j + w], [self.size, self.size], interpolation=mode, antialias=True)
        x = self.after_crop(x)
        ops = torch.full((self.layers, 3), -1., dtype=torch.float64)
        if self.ra is not None:
            drawn = self.ra(_Recorded()).ops
            if drawn:
                ops[:len(drawn)] = torch.tensor(drawn, dtype=torch.float64)
        return x.contiguous(), ops


# Device -------------------------------------------------------------------------------------------

def _blend(x: torch.Tensor, degenerate: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, x, factor)``: ``degenerate + factor (x - degenerate)``,
    clipped to [0, 255] and truncated to uint8. ``factor`` (b,)."""
    x, degenerate = x.float(), degenerate.float()
    out = degenerate + factor.view(-1, 1, 1, 1).float() * (x - degenerate)
    return out.clamp_(0, 255).floor_().to(torch.uint8)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB -> L, (b, 1, H, W) int32: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
    r, g, b = x.int().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 32768) >> 16).unsqueeze(1)


def _smooth(x: torch.Tensor) -> torch.Tensor:
    """PIL's ``ImageFilter.SMOOTH`` (3x3 kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded;
    the one-pixel border unchanged)."""
    kernel = torch.ones(3, 3, device=x.device)
    kernel[1, 1] = 5
    kernel = (kernel / 13).expand(3, 1, 3, 3)
    inner = F.conv2d(x.float(), kernel, groups=3).round_().clamp_(0, 255).to(torch.uint8)
    out = x.clone()
    out[..., 1:-1, 1:-1] = inner
    return out


def _affine_matrices(names: Sequence[str], args: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(b, 2, 3) float64: PIL's affine data of each operation, output pixel centre -> input point."""
    out = torch.zeros(len(names), 2, 3, dtype=torch.float64)
    out[:, 0, 0] = out[:, 1, 1] = 1
    for k, (name, a) in enumerate(zip(names, args.tolist())):
        if name == 'rotate':  # PIL's Image.rotate about the centre, no expansion
            angle = -math.radians(a)
            c, s = round(math.cos(angle), 15), round(math.sin(angle), 15)
            cx, cy = width / 2, height / 2
            out[k] = torch.tensor([[c, s, c * -cx + s * -cy + cx], [-s, c, -s * -cx + c * -cy + cy]],
                                  dtype=torch.float64)
        elif name == 'shear_x':
            out[k, 0, 1] = a
        elif name == 'shear_y':
            out[k, 1, 0] = a
        elif name == 'translate_x_rel':
            out[k, 0, 2] = a * width
        elif name == 'translate_y_rel':
            out[k, 1, 2] = a * height
        elif name == 'translate_x_abs':
            out[k, 0, 2] = a
        else:  # translate_y_abs
            out[k, 1, 2] = a
    return out


def _affine(x: torch.Tensor, matrices: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, data, resample, fillcolor=fill)`` for a batch: output
    pixel (u, v) takes the input at ``matrix @ (u + 0.5, v + 0.5, 1)``; points outside the image
    take ``fill`` (3,). ``matrices`` (b, 2, 3)."""
    b, _, h, w = x.shape
    v, u = torch.meshgrid(torch.arange(h, device=x.device, dtype=torch.float32) + .5,
                          torch.arange(w, device=x.device, dtype=torch.float32) + .5, indexing='ij')
    points = torch.stack([u, v, torch.ones_like(u)], -1).view(1, h * w, 3)
    src = points @ matrices.to(x.device, torch.float32).transpose(1, 2)  # (b, h w, 2), pixel units
    inside = ((src[..., 0] >= 0) & (src[..., 0] < w) & (src[..., 1] >= 0) & (src[..., 1] < h)).view(b, 1, h, w)
    grid = (src / torch.tensor([w, h], device=x.device) * 2 - 1).view(b, h, w, 2)
    out = F.grid_sample(x.float(), grid, mode=mode, padding_mode='border', align_corners=False)
    out = torch.where(inside, out, fill.view(1, 3, 1, 1).float())
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _point_op(name: str, x: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """One non-geometric RandAugment operation on uint8 ``x`` (b, 3, H, W), per-image ``arg`` (b,),
    as timm's PIL function of that name computes it."""
    a = arg.view(-1, 1, 1, 1)
    if name == 'auto_contrast':  # PIL: per channel, lut int(i * 255 / (hi - lo) - lo * scale)
        lo = x.amin((2, 3), keepdim=True).float()
        hi = x.amax((2, 3), keepdim=True).float()
        scale = 255 / (hi - lo).clamp_min(1)
        out = ((x.float() - lo) * scale).clamp_(0, 255).floor_().to(torch.uint8)
        return torch.where(hi > lo, out, x)
    if name == 'equalize':
        return TF.equalize(x)
    if name == 'invert':
        return 255 - x
    if name == 'posterize':  # bits to keep; 0 gives black (datasets._posterize_compat)
        bits = a.clamp(0, 8).to(torch.int32)
        mask = (256 - (1 << (8 - bits))).to(torch.uint8)
        return x & mask
    if name == 'solarize':
        return torch.where(x.float() >= a, 255 - x, x)
    if name == 'solarize_add':  # add to the pixels under 128
        return torch.where(x < 128, (x.float() + a).clamp_(max=255).to(torch.uint8), x)
    if name == 'color':
        return _blend(x, _gray(x).expand_as(x), arg)
    if name == 'contrast':  # PIL: a solid image of the rounded mean of L
        mean = (_gray(x).float().mean((1, 2, 3)) + 0.5).floor()
        return _blend(x, mean.view(-1, 1, 1, 1).expand(x.shape), arg)
    if name == 'brightness':
        return _blend(x, torch.zeros_like(x), arg)
    if name == 'sharpness':
        return _blend(x, _smooth(x), arg)
    raise KeyError(name)


class DeviceAugment:
    """What ``--pipeline fast`` does on the device to a batch from the loader: the RandAugment
    operations the workers drew, normalisation, and timm's random erasing.

    ``images`` (B, 3, S, S) uint8 and ``ops`` (B, layers, 3) from :class:`WorkerTransform`'s
    samples -> (B, 3, S, S) float32, normalised with ``mean`` / ``std`` and erased. The
    operations run layer by layer, each on the images that drew it (indices found on the host
    from ``ops``, which stays there: no device synchronisation). ``fill`` is RandAugment's fill
    colour (timm: the mean in 0-255); ``interpolation`` the affine resampling ('bicubic',
    'bilinear', 'nearest'; 'random': as drawn per operation, bilinear or bicubic)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], re_prob: float, re_mode: str, re_count: int,
                 device: torch.device, interpolation: str = 'bicubic') -> None:
        from timm.data.random_erasing import RandomErasing
        self.device = torch.device(device)
        self.mean = torch.tensor([255 * m for m in mean], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([255 * s for s in std], device=self.device).view(1, 3, 1, 1)
        self.fill = torch.tensor([min(255, round(255 * m)) for m in mean], device=self.device)
        self.mode = 'bicubic' if interpolation == 'random' else interpolation
        self.erase = (RandomErasing(re_prob, mode=re_mode, max_count=re_count, device=self.device)
                      if re_prob > 0 else None)

    def augment(self, images: torch.Tensor, ops: torch.Tensor) -> torch.Tensor:
        """The RandAugment operations alone: uint8 (B, 3, S, S) on the device, ``ops`` (B, layers, 3)
        on the host -> a new uint8 batch."""
        x = images.clone()
        for layer in range(ops.shape[1]):
            groups: Dict[Tuple[str, bool], List[int]] = {}
            for k, (code, _, bilinear) in enumerate(ops[:, layer].tolist()):
                if code >= 0:
                    name = OPS[int(code)]
                    groups.setdefault(('affine' if name in AFFINE else name, bool(bilinear)), []).append(k)
            for (name, bilinear), members in groups.items():
                rows = torch.tensor(members)
                idx = rows.to(self.device, non_blocking=True)
                args = ops[rows, layer, 1]
                if name == 'affine':
                    m = _affine_matrices([OPS[int(c)] for c in ops[rows, layer, 0].tolist()], args,
                                         x.shape[-1], x.shape[-2])
                    out = _affine(x.index_select(0, idx), m, self.fill, 'bilinear' if bilinear else self.mode)
                else:
                    out = _point_op(name, x.index_select(0, idx), args.to(self.device, torch.float32, non_blocking=True))
                x.index_copy_(0, idx, out)
        return x

    def __call__(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        """``batch``: the loader's collated ``[images, ops]``."""
        images, ops = batch
        x = self.augment(images.to(self.device, non_blocking=True), ops.cpu())
        x = x.float().sub_(self.mean).div_(self.std)
        return self.erase(x) if self.erase is not None else x


def unsupported(args: Any) -> Optional[str]:
    """Why ``--pipeline fast`` cannot do the augmentation the flags ask for, in one line, or None."""
    aa = args.aa if args.aa and str(args.aa).lower() not in ('', 'none') else None
    if args.ThreeAugment:
        return '--pipeline fast does not do --ThreeAugment; add --pipeline deit'
    if aa is not None and not str(aa).startswith('rand'):
        return f'--pipeline fast does RandAugment (--aa rand-...) or none, not --aa {aa}; add --pipeline deit'
    if args.train_interpolation not in (*_INTERPOLATION, 'random'):
        return (f'--pipeline fast takes --train-interpolation {"/".join(_INTERPOLATION)}/random, '
                f'not {args.train_interpolation!r}; add --pipeline deit')
    return None


def worker_transform(args: Any) -> WorkerTransform:
    aa = args.aa if args.aa and str(args.aa).lower() not in ('', 'none') else None
    return WorkerTransform(args.input_size, args.scale, args.ratio, args.train_interpolation, args.hflip,
                           args.vflip, aa, args.mean, args.color_jitter)


def device_augment(args: Any, device: torch.device) -> DeviceAugment:
    return DeviceAugment(args.mean, args.std, args.reprob, args.remode, args.recount, device,
                         interpolation=args.train_interpolation)


# --benchmark-data ---------------------------------------------------------------------------------

def benchmark_loader(loader: Any, sampler: Any, images: int, to_device: Optional[Any], device: torch.device,
                     args: Any) -> Dict[str, float]:
    """``--benchmark-data N``: iterate ``loader`` (epoch 0 of ``sampler``, then on) until ``images``
    images came, nothing else, then time the device steps (``to_device``, or the copy to
    ``device``) on up to 8 of those batches apart. Loader CPU time: the worker processes' user +
    system time (``getrusage`` of the children, counted once the workers are joined; their start
    included), or this process's with ``--num_workers 0``. Prints two lines, the last
    ``data: <X> images/s per core ...``, and returns the figures."""
    import resource
    import time

    def children() -> float:
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        return r.ru_utime + r.ru_stime

    kept: List[Any] = []
    seen, epoch = 0, 0
    cpu0, own0, wall0 = children(), time.process_time(), time.perf_counter()
    while seen < images:
        sampler.set_epoch(epoch)
        iterator = iter(loader)
        for batch in iterator:
            if batch[0] is None:
                continue
            seen += len(batch[1])
            if len(kept) < 8:
                kept.append(batch[0])
            if seen >= images:
                break
        del iterator  # joins the workers, so that their CPU time is counted
        epoch += 1
    wall = time.perf_counter() - wall0
    cpu = children() - cpu0 if loader.num_workers else time.process_time() - own0

    def step(x: Any) -> torch.Tensor:
        return to_device(x) if to_device is not None else x.to(device, non_blocking=True)
    step(kept[0])  # warm-up
    n_dev = sum(len(x[0] if isinstance(x, (list, tuple)) else x) for x in kept)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for x in kept:
        step(x)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    dev = time.perf_counter() - t0
    what = ('RandAugment, normalisation, random erasing' if to_device is not None else 'the copy')
    print(f'device steps ({what}) on {device}: {n_dev / dev:.0f} images/s ({1e3 * dev / n_dev:.3f} ms an image, '
          f'{n_dev} images)')
    workers = f'{loader.num_workers} workers, 1 thread each' if loader.num_workers else \
        f'no workers (in this process, {torch.get_num_threads()} threads)'
    print(f'data: {seen / cpu:.0f} images/s per core ({1e3 * cpu / seen:.3f} ms of loader CPU time an image); '
          f'{seen / wall:.0f} images/s wall; {workers}; pipeline {args.pipeline}; {seen} images of '
          f'{args.input_size} px, batch {loader.batch_size}', flush=True)
    return {'images': seen, 'images_per_core_s': seen / cpu, 'images_per_s': seen / wall,
            'device_images_per_s': n_dev / dev}
