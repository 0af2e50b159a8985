"""Attention figures: where the class token looks, layer by layer and in the broad attention.

Command line::

    python -m bvit.visualize --resume runs/demo/checkpoint.pth --image 0 --out figs/attention_digits.png
    python -m bvit.visualize --resume bvit_5m.pth --arch bvit_5m --num-classes 1000 --image cat.jpg --out cat.png

``--image`` is an image file or an integer index into the DIGITS validation split. The model is
rebuilt from the ``args`` a checkpoint of this project stores (arch, input size, patch size, stem,
number of classes, broad attention settings); for released files, which store no arguments, the
architecture is read off the state dict, and ``--arch``, ``--input-size``, ``--patch-size``,
``--stem`` and ``--num-classes`` override whatever was found.

From Python::

    from bvit.visualize import plot_attention
    plot_attention(model, image_tensor, raw_image, 'out.png')

The figure shows the input, then for each of the L blocks and for the broad attention the class
token's attention over the patch grid (row 0 of the (N+1) x (N+1) map, patch columns only),
averaged over heads (or one head, or the max over heads), laid over the image as a heat map.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from .builder import build_from_checkpoint
from .checkpoint import read_checkpoint
from .data import DigitsDataset, eval_transform

ImageLike = Union[np.ndarray, Tensor]

class VisualizeError(Exception):
    """An error with a message meant for the person at the command line."""


# Model ------------------------------------------------------------------------------------------

def load_model(path: str, arch: Optional[str] = None, input_size: Optional[int] = None,
               patch_size: Optional[int] = None, stem: Optional[str] = None,
               num_classes: Optional[int] = None, use_ema: bool = False) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the model a checkpoint was trained as and load its weights; eval mode, CPU.

    The architecture comes from the checkpoint's record (:func:`bvit.builder.build_from_checkpoint`),
    the arguments given here override it, and the weights are loaded by
    :func:`bvit.checkpoint.load_checkpoint` (so ``input_size`` may differ from the checkpoint's: the
    position table is resampled). Returns (model, the ``args`` stored in the checkpoint or {}).
    Raises VisualizeError with a one-line message for a missing or unreadable file or weights
    that do not fit.
    """
    overrides = dict(arch=arch, input_size=input_size, patch_size=patch_size, stem=stem, num_classes=num_classes)
    try:
        obj = read_checkpoint(path)
        model, _ = build_from_checkpoint(obj, use_ema, overrides)
    except FileNotFoundError as e:
        raise VisualizeError(str(e)) from None
    except ValueError as e:
        raise VisualizeError(str(e) if str(e).startswith(str(path)) else f'{path}: {e}') from None
    saved = obj.get('args') if isinstance(obj, Mapping) else None
    return model, dict(saved) if isinstance(saved, Mapping) else {}


def data_config(model: nn.Module, args: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """input_size (C, H, W), mean, std, crop_pct, interpolation for a model: its own image size;
    the normalisation and crop ratio the checkpoint's ``args`` stored, else the model's defaults."""
    args = args or {}
    cfg = dict(getattr(model, 'pretrained_cfg', None) or {})
    if args.get('mean') is not None and args.get('std') is not None:
        cfg['mean'], cfg['std'] = args['mean'], args['std']
    if args.get('eval_crop_ratio'):
        cfg['crop_pct'] = args['eval_crop_ratio']
    img = getattr(model, 'img_size', None) or cfg.get('input_size', (3, 224, 224))[-2:]
    img = (img, img) if isinstance(img, int) else tuple(img)
    return dict(
        input_size=(getattr(model, 'in_chans', 3), int(img[0]), int(img[1])),
        mean=tuple(cfg.get('mean', IMAGENET_DEFAULT_MEAN)),
        std=tuple(cfg.get('std', IMAGENET_DEFAULT_STD)),
        crop_pct=float(cfg.get('crop_pct', 0.875)),
        interpolation=cfg.get('interpolation', 'bicubic'),
    )


# Images -----------------------------------------------------------------------------------------

def denormalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """(C, H, W) normalized tensor -> (H, W, 3) float array in [0, 1] for display."""
    x = image.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    x = x.clamp(0, 1).permute(1, 2, 0).numpy()
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def load_image(spec: str, args: Mapping[str, Any], cfg: Mapping[str, Any]) -> Tuple[Tensor, Optional[int], str]:
    """``spec`` is an image file or an integer index into the DIGITS validation split.

    Returns (normalized tensor (C, H, W), label or None, a short description).
    """
    if spec.strip().lstrip('-').isdigit():
        index = int(spec)
        image, label = digits_val_item(index, args, cfg)
        return image, label, f'DIGITS val #{index}'
    if not os.path.exists(spec):
        raise VisualizeError(f'--image {spec!r} is neither an existing image file nor an integer DIGITS index')
    if os.path.isdir(spec):
        raise VisualizeError(f'--image {spec!r} is a directory, not an image file')
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(spec) as im:
            im = im.convert('RGB')
    except (UnidentifiedImageError, OSError) as e:
        raise VisualizeError(f'--image {spec!r} is not an image PIL can read ({type(e).__name__})') from None
    image = _eval_transform(cfg)(im)
    return image, None, os.path.basename(spec)


def _eval_transform(cfg: Mapping[str, Any]):
    """:func:`bvit.data.eval_transform` (the training script's) with ``cfg``'s size, mean/std, crop."""
    return eval_transform(cfg['input_size'], cfg['mean'], cfg['std'], cfg['crop_pct'])


def digits_val_item(index: int, args: Mapping[str, Any], cfg: Mapping[str, Any]) -> Tuple[Tensor, int]:
    """Item ``index`` of the DIGITS validation split (:class:`bvit.data.DigitsDataset`),
    preprocessed for the model."""
    try:
        val = DigitsDataset(train=False, transform=_eval_transform(cfg))
    except ImportError:
        raise VisualizeError('an integer --image needs scikit-learn (the DIGITS images ship with it): '
                             'pip install scikit-learn') from None
    n = len(val)
    if not -n <= index < n:
        raise VisualizeError(f'--image {index}: the DIGITS validation split has {n} images (0..{n - 1})')
    return val[index % n]


# Attention --------------------------------------------------------------------------------------

def class_token_maps(model: nn.Module, image: Tensor, head: Union[str, int] = 'mean'
                     ) -> Tuple[List[np.ndarray], np.ndarray, Tensor]:
    """Class-token attention over the patch grid for every layer and for the broad attention.

    Args:
        model: a model with ``attention_maps`` (every BViT).
        image: (C, H, W) or (1, C, H, W), normalized.
        head: 'mean' or 'max' over heads, or the index of one head.

    Returns:
        (L arrays (h, w), broad array (h, w), logits (num_classes,)). Values are the attention
        probabilities the class token puts on each patch (its own share is left out, so a map sums
        to at most 1).
    """
    if not hasattr(model, 'attention_maps'):
        raise VisualizeError(f'{type(model).__name__} has no attention_maps(); only BViT models can be drawn')
    x = image.unsqueeze(0) if image.ndim == 3 else image
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            maps = model.attention_maps(x)
            logits = model(x)[0]
    finally:
        model.train(was_training)
    h, w = maps.grid_size

    def reduce(a: Tensor) -> np.ndarray:
        row = a[0, :, 0, 1:].float()  # (H, N) class token -> patches
        if head == 'mean':
            r = row.mean(0)
        elif head == 'max':
            r = row.max(0).values
        else:
            hi = int(head)
            if not -row.shape[0] <= hi < row.shape[0]:
                raise VisualizeError(f'head {hi} does not exist; the model has {row.shape[0]} heads')
            r = row[hi]
        return r.reshape(h, w).cpu().numpy()

    return [reduce(a) for a in maps.layers], reduce(maps.broad), logits


def _to_display(raw: ImageLike) -> np.ndarray:
    """(H, W), (H, W, C) or (C, H, W) image, uint8 or float -> (H, W, 3) floats in [0, 1]."""
    a = raw.detach().cpu().numpy() if isinstance(raw, Tensor) else np.asarray(raw)
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f'raw_image must be (H, W), (H, W, C) or (C, H, W), got shape {a.shape}')
    a = a[..., :3].astype(np.float64)
    if a.max() > 1.0:
        a = a / 255.0
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return np.clip(a, 0, 1)


def plot_attention(
        model: nn.Module,
        image_tensor: Tensor,
        raw_image: Optional[ImageLike],
        out_path: Optional[str] = None,
        head: Union[str, int] = 'mean',
        label: Optional[int] = None,
        class_names: Optional[Sequence[str]] = None,
        title: Optional[str] = None,
        ncols: Optional[int] = None,
        panel_inches: float = 2.0,
        dpi: int = 100,
        alpha: float = 0.55,
        cmap: str = 'viridis',
        shared_scale: bool = False,
        smooth: bool = False,
        style: str = 'auto',
        annotate: Optional[bool] = None,
        subject: Optional[str] = None,
) -> Dict[str, Any]:
    """Draw the input and the class token's attention of every layer and of the broad attention.

    Args:
        model: a BViT (anything with ``attention_maps``), any mode; it is run in eval mode.
        image_tensor: (C, H, W) or (1, C, H, W), normalized as the model expects.
        raw_image: the same image for display, (H, W[, C]) or (C, H, W), floats in [0, 1] or
            uint8; None denormalizes ``image_tensor`` with the model's mean/std.
        out_path: PNG (or any format matplotlib knows) to write; None writes nothing.
        head: 'mean' (default) or 'max' over heads, or one head's index.
        label: true class, shown in the title when given.
        class_names: names for the predicted / true class.
        title: figure title; a default names the prediction (after ``subject``, e.g. the image).
        ncols: panels per row (default: all L + 2 in rows of at most 7).
        panel_inches, dpi: each panel is panel_inches square; the image is exactly
            (ncols·panel_inches·dpi) x (rows·panel_inches·dpi + title) pixels, see the return value.
        alpha, cmap: heat map opacity and colour map.
        shared_scale: one colour scale for all maps (with a colour bar) instead of one per panel.
        smooth: bilinear heat maps instead of one flat square per patch.
        style: 'overlay' (heat map laid over the image with ``alpha``), 'contour' (opaque heat
            map with the image's outline drawn on it: clearer for line drawings such as DIGITS),
            or 'auto' (default): 'contour' for grey images, 'overlay' for colour ones.
        annotate: write each patch's share in its cell (default: for grids of at most 16 patches).

    Each panel's title gives, in brackets, the share the class token keeps for itself (the map's
    patches hold the rest), or, with ``head='max'``, the map's maximum.

    Returns:
        dict with ``figure`` (a matplotlib Figure, made without pyplot: no backend is changed and
        no window opens), ``size`` (width, height) in pixels,
        ``layers`` (L arrays), ``broad`` (array), ``pred`` (int), ``prob`` (float).
    """
    try:
        from matplotlib import patheffects
        from matplotlib.figure import Figure
    except ImportError:
        raise VisualizeError('drawing needs matplotlib: pip install matplotlib (or pip install "bvit[visualize]")') from None
    layers, broad, logits = class_token_maps(model, image_tensor, head)
    if raw_image is None:
        cfg = data_config(model)
        raw = denormalize(image_tensor[0] if image_tensor.ndim == 4 else image_tensor, cfg['mean'], cfg['std'])
    else:
        raw = _to_display(raw_image)
    H, W = raw.shape[:2]
    probs = logits.float().softmax(-1)
    pred = int(probs.argmax())

    def cname(i: int) -> str:
        return class_names[i] if class_names is not None and i < len(class_names) else str(i)

    panels = len(layers) + 2
    ncols = ncols or min(panels, 7)
    nrows = math.ceil(panels / ncols)
    title_in = 0.55
    fig_w, fig_h = ncols * panel_inches, nrows * panel_inches + title_in
    fig = Figure(figsize=(fig_w, fig_h), dpi=dpi)
    top = 1 - title_in / fig_h
    right = 0.93 if shared_scale else 0.995
    grid = fig.add_gridspec(nrows, ncols, left=0.005, right=right, bottom=0.005, top=top,
                            wspace=0.04, hspace=0.16)
    if shared_scale:
        vmin, vmax = 0.0, float(max(m.max() for m in layers + [broad]))
    head_txt = {'mean': 'mean over heads', 'max': 'max over heads'}.get(str(head), f'head {head}')
    if title is None:
        title = f'prediction {cname(pred)} ({probs[pred]:.0%})'
        if label is not None:
            title += f', true {cname(label)}'
        if subject:
            title = f'{subject}: {title}'
    scale_txt = 'one colour scale' if shared_scale else 'colour from 0 to each panel\'s max'
    self_txt = '; (cls x): share kept by the class token' if head != 'max' else ''
    fig.suptitle(f'{title}\nclass-token attention over the patches, {head_txt}, {scale_txt}{self_txt}',
                 fontsize=9, y=1 - 0.06 / fig_h, va='top')

    gray = raw.mean(-1)
    if style == 'auto':
        grey = np.abs(raw - raw[..., :1]).max() < 2e-3
        style = 'contour' if grey else 'overlay'
    if style not in ('contour', 'overlay'):
        raise ValueError(f"style must be 'auto', 'contour' or 'overlay', got {style!r}")
    level = float(gray.min() + gray.max()) / 2
    use_contour = style == 'contour' and gray.max() > gray.min()
    cx, cy = (np.arange(W) + 0.5), (np.arange(H) + 0.5)

    if annotate is None:
        annotate = broad.size <= 16
    names = ['input'] + [f'layer {i + 1}' for i in range(len(layers))] + ['broad attention']
    broad_used = getattr(model, 'broad', True)
    if not broad_used:
        names[-1] = 'broad (not used by model)'
    im = None
    for i, name in enumerate(names):
        ax = fig.add_subplot(grid[i // ncols, i % ncols])
        ax.imshow(raw, extent=(0, W, H, 0), interpolation='nearest')
        if i > 0:
            m = layers[i - 1] if i <= len(layers) else broad
            lo, hi = (vmin, vmax) if shared_scale else (0.0, float(m.max()))
            if hi <= lo:
                hi = lo + 1e-12
            interp = 'bilinear' if smooth else 'nearest'
            if use_contour:
                im = ax.imshow(m, extent=(0, W, H, 0), cmap=cmap, vmin=lo, vmax=hi, interpolation=interp)
                ax.contour(cx, cy, gray, levels=[level], colors='white', linewidths=1.0)
            else:
                im = ax.imshow(m, extent=(0, W, H, 0), cmap=cmap, alpha=alpha, vmin=lo, vmax=hi,
                               interpolation=interp)
            if annotate:
                gh, gw = m.shape
                for (r, c), v in np.ndenumerate(m):
                    light = (v - lo) / (hi - lo) > 0.6  # viridis-like maps are light at the top
                    ax.text((c + 0.5) * W / gw, (r + 0.5) * H / gh, f'{v:.2f}', ha='center', va='center',
                            fontsize=8 if gh * gw <= 4 else 6.5, fontweight='bold',
                            color='black' if light else 'white',
                            path_effects=[patheffects.withStroke(linewidth=2, foreground='white' if light else 'black')])
            if head != 'max':
                name = f'{name}  (cls {1 - float(m.sum()):.2f})'
            else:
                name = f'{name}  (max {m.max():.2f})'
        ax.set_title(name, fontsize=8, pad=2, fontweight='bold' if i == len(names) - 1 else 'normal')
        ax.set_xlim(0, W)
        ax.set_ylim(H, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        if i == len(names) - 1:
            for s in ax.spines.values():
                s.set_edgecolor('tab:blue')
                s.set_linewidth(2)
    if shared_scale and im is not None:
        cax = fig.add_axes([0.945, 0.05, 0.015, top - 0.1])
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    size = (int(round(fig_w * dpi)), int(round(fig_h * dpi)))
    if out_path:
        parent = os.path.dirname(os.path.abspath(out_path))
        os.makedirs(parent, exist_ok=True)
        fig.savefig(out_path, dpi=dpi)
    return dict(figure=fig, size=size, layers=layers, broad=broad, pred=pred, prob=float(probs[pred]))


def _model_name(model: nn.Module, args: Mapping[str, Any]) -> str:
    name = str(args.get('arch') or getattr(model, 'pretrained_cfg', {}).get('architecture') or type(model).__name__)
    details = []
    if hasattr(model, 'stem_type'):
        details.append('conv stem' if model.stem_type == 'conv' else 'no stem')
    if getattr(model, 'broad', True) is False:
        details.append('no broad attention')
    img = getattr(model, 'img_size', None)
    if img:
        details.append(f'{img[0]}x{img[1]} input')
    return f'{name} ({", ".join(details)})' if details else name


# Command line -----------------------------------------------------------------------------------

def _head_arg(s: str) -> Union[str, int]:
    if s in ('mean', 'max'):
        return s
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'mean', 'max' or a head index, got {s!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m bvit.visualize',
        description='Draw the class token attention of every layer and of the broad attention of a BViT checkpoint.')
    p.add_argument('--resume', required=True, metavar='CKPT', help="a checkpoint of train_hp.py or a released BViT file")
    p.add_argument('--image', required=True, metavar='PATH_OR_INDEX',
                   help='an image file, or an integer index into the DIGITS validation split')
    p.add_argument('--out', required=True, metavar='PNG', help='figure to write')
    p.add_argument('--head', type=_head_arg, default='mean', help="'mean' (default), 'max' or a head index")
    p.add_argument('--shared-scale', action='store_true', help='one colour scale for all panels')
    p.add_argument('--smooth', action='store_true', help='bilinear heat maps instead of one square per patch')
    p.add_argument('--style', choices=('auto', 'contour', 'overlay'), default='auto',
                   help="heat map over the image ('overlay') or opaque with the image outline ('contour'); "
                        "auto: contour for grey images")
    p.add_argument('--ncols', type=int, default=None, help='panels per row (default up to 7)')
    p.add_argument('--dpi', type=int, default=100)
    p.add_argument('--panel-inches', type=float, default=2.0)
    p.add_argument('--use-ema', action='store_true', help='draw the EMA weights of the checkpoint')
    g = p.add_argument_group('model (override what the checkpoint stores; needed for released files)')
    g.add_argument('--arch', default=None, help='bvit_5m, bvit_22m (or BViT-5, ...) or another timm name')
    g.add_argument('--input-size', type=int, default=None)
    g.add_argument('--patch-size', type=int, default=None)
    g.add_argument('--stem', choices=('conv', 'none'), default=None)
    g.add_argument('--num-classes', type=int, default=None)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, ckpt_args = load_model(args.resume, args.arch, args.input_size, args.patch_size, args.stem,
                                      args.num_classes, args.use_ema)
        cfg = data_config(model, ckpt_args)
        image, label, desc = load_image(args.image, ckpt_args, cfg)
        if tuple(image.shape) != tuple(cfg['input_size']):
            raise VisualizeError(f'the image was preprocessed to {tuple(image.shape)} but the model takes '
                                 f'{tuple(cfg["input_size"])}')
        raw = denormalize(image, cfg['mean'], cfg['std'])
        info = plot_attention(model, image, raw, args.out, head=args.head, label=label,
                              title=None, ncols=args.ncols, panel_inches=args.panel_inches, dpi=args.dpi,
                              shared_scale=args.shared_scale, smooth=args.smooth, style=args.style,
                              subject=f'{_model_name(model, ckpt_args)}, {desc}')
    except VisualizeError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    truth = f', true {label}' if label is not None else ''
    print(f'{desc}: predicted {info["pred"]} ({info["prob"]:.1%}){truth}; wrote {args.out} '
          f'({info["size"][0]}x{info["size"][1]} px)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
