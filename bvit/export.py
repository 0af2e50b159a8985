"""Export a BViT, T2T-ViT or broad-attention timm checkpoint as timm shares models (config.json +
model.safetensors) and as ONNX.

Command line::

    python -m bvit.export CHECKPOINT OUT_DIR [--force] [--use-ema]

CHECKPOINT is anything :func:`bvit.checkpoint.load_checkpoint` reads: a checkpoint of train_hp.py
(the model comes from its record, :mod:`bvit.builder`: arch, classes, input size, patch size,
stem, broad attention and its scale, further constructor arguments), a released BViT file (bvit_5m or bvit_22m by its width), an
authors' T2T-ViT file (the model read off its weights), or a bare state dict. Besides BViT and
T2T-ViT (broad or not), a timm ViT, DeiT or Swin trained with broad attention (``train_hp.py
--broad``) is exported as its broad variant ``broad_<name>`` (:mod:`bvit.broad_models`); other
models, and broad attention on a model without a broad variant, are refused. OUT_DIR receives::

    config.json, model.safetensors   timm's hub layout (timm.models.save_for_hf):
                                     timm.create_model('local-dir:OUT_DIR', pretrained=True)
                                     rebuilds the model once bvit.models is imported
    model.onnx                       input 'input' (B, C, H, W), output 'logits'; B is dynamic

Both exports are checked before anything reaches OUT_DIR: the largest absolute logit difference
of the timm reload and of onnxruntime against the checkpoint's model, on random images, is
printed and must be at most 1e-4. Everything is written into a temporary folder beside OUT_DIR
and renamed into place at the end, so a failed or interrupted export leaves OUT_DIR as it was.
Exit status 0; 2 with one ``error: ...`` line for a bad checkpoint or OUT_DIR; 1 when a check fails.
"""
from __future__ import annotations

import argparse
import inspect
import os
import shutil
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .broad import split_broad_name
from .builder import build_from_checkpoint, is_bvit, model_kwargs, record_of_checkpoint
from .checkpoint import read_checkpoint
from .t2t import T2T_MODEL_ARGS

EXPORT_FILES = ('config.json', 'model.safetensors', 'model.onnx')
TOLERANCE = 1e-4
ONNX_OPSET = 17


class ExportError(Exception):
    """A problem a person can act on (bad checkpoint, bad OUT_DIR): one line, exit status 2."""


class ExportCheckError(RuntimeError):
    """An export whose logits differ from the checkpoint's model by more than TOLERANCE: exit status 1."""


def _check_out_dir(out_dir: str, force: bool) -> None:
    """OUT_DIR may be absent, an empty folder, or (with ``force``) a previous export; never a file
    or a folder holding anything else (``--force`` must not remove someone's files)."""
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f'{out_dir} exists and is not a folder; choose a folder for the export')
    if not os.path.isdir(out_dir):
        return
    entries = sorted(os.listdir(out_dir))
    foreign = [e for e in entries if e not in EXPORT_FILES]
    if foreign:
        shown = ', '.join(foreign[:3]) + (', ...' if len(foreign) > 3 else '')
        raise ExportError(f'{out_dir} holds files that are not an export ({shown}); choose a new or empty folder')
    if entries and not force:
        raise ExportError(f'{out_dir} already holds an export ({", ".join(entries)}); pass --force to replace it')


def _preprocessing(ckpt_args: Dict[str, Any]) -> Dict[str, Any]:
    """The preprocessing a train_hp.py checkpoint was evaluated with (mean, std, crop ratio)."""
    cfg: Dict[str, Any] = {}
    if ckpt_args.get('mean') is not None and ckpt_args.get('std') is not None:
        cfg['mean'], cfg['std'] = tuple(ckpt_args['mean']), tuple(ckpt_args['std'])
    if ckpt_args.get('eval_crop_ratio'):
        cfg['crop_pct'] = float(ckpt_args['eval_crop_ratio'])
    return cfg


def export_onnx(model: nn.Module, path: str, example: Tensor) -> None:
    """``model`` as ONNX at ``path`` (TorchScript-based exporter, which needs no onnxscript), batch
    axis dynamic."""
    kwargs: Dict[str, Any] = {}
    if 'dynamo' in inspect.signature(torch.onnx.export).parameters:  # torch >= 2.5; the default from 2.9
        kwargs['dynamo'] = False
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # the exporter's deprecation notice and tracer warnings
        torch.onnx.export(model, (example,), path, opset_version=ONNX_OPSET, input_names=['input'],
                          output_names=['logits'], dynamic_axes={'input': {0: 'batch'}, 'logits': {0: 'batch'}},
                          **kwargs)


def onnx_logits(path: str, x: Tensor) -> Tensor:
    """Run the ONNX file at ``path`` on ``x`` with onnxruntime (CPU)."""
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    return torch.from_numpy(session.run(None, {'input': x.numpy()})[0])


def timm_reload_logits(folder: str, x: Tensor) -> Tensor:
    """``timm.create_model('local-dir:folder', pretrained=True)`` on ``x``."""
    import timm
    model = timm.create_model(f'local-dir:{folder}', pretrained=True).eval()
    with torch.no_grad():
        return model(x)


def _input_size(record: Dict[str, Any]) -> Tuple[int, int]:
    """(h, w) of the record's ``input_size`` (a side or [h, w])."""
    size = record['input_size']
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _write(model: nn.Module, record: Dict[str, Any], folder: str, ckpt_args: Dict[str, Any]) -> Dict[str, float]:
    """All three files into ``folder``, then the checks; returns the largest logit differences.
    config.json's ``model_args`` are the constructor arguments of the checkpoint's record
    (:func:`bvit.builder.model_kwargs`), the map the model was built with."""
    from timm.models import save_for_hf
    model.pretrained_cfg = {**model.pretrained_cfg, **_preprocessing(ckpt_args)}
    save_for_hf(model, folder, model_args=model_kwargs(record)[1], safe_serialization=True)
    c, (h, w) = model.in_chans, _input_size(record)
    gen = torch.Generator().manual_seed(0)
    export_onnx(model, os.path.join(folder, 'model.onnx'), torch.randn(2, c, h, w, generator=gen))
    x = torch.randn(3, c, h, w, generator=gen)  # another batch size than the export's: the axis is dynamic
    with torch.no_grad():
        ref = model(x)
    return {
        'timm local-dir reload': (timm_reload_logits(folder, x) - ref).abs().max().item(),
        'onnxruntime': (onnx_logits(os.path.join(folder, 'model.onnx'), x) - ref).abs().max().item(),
    }


def _usual_permissions(folder: str) -> None:
    """mkdtemp makes a private folder (0700): give it and its files the modes a plain mkdir and
    open would (the umask's), so an export can be shared."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for name in os.listdir(folder):
        os.chmod(os.path.join(folder, name), 0o666 & ~umask)


def _swap_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished ``tmp`` folder to ``out_dir``; a previous export there is replaced
    (moved aside first, restored if the rename fails, then removed)."""
    if not os.path.isdir(out_dir):
        os.rename(tmp, out_dir)
        return
    old = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.old-', dir=os.path.dirname(out_dir))
    os.rmdir(old)
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export(checkpoint: str, out_dir: str, force: bool = False, use_ema: bool = False,
           log=print) -> Dict[str, float]:
    """Export ``checkpoint`` into ``out_dir`` (see the module docstring); returns the largest
    logit difference of each export. ExportError for bad input, ExportCheckError when a check fails;
    in both cases ``out_dir`` is left as it was."""
    out_dir = os.path.abspath(out_dir)
    _check_out_dir(out_dir, force)
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ExportError('the ONNX export needs onnx and onnxruntime: pip install onnx onnxruntime') from None
    try:
        obj = read_checkpoint(checkpoint)
        record = record_of_checkpoint(obj, use_ema)
    except FileNotFoundError as e:
        raise ExportError(str(e)) from None
    except ValueError as e:
        raise ExportError(str(e) if str(e).startswith(checkpoint) else f'{checkpoint}: {e}') from None
    try:
        name = model_kwargs(record)[0]  # what config.json will name: BViT, T2T-ViT or a broad variant
    except ValueError as e:
        raise ExportError(f'{checkpoint}: {e}') from None
    if not (is_bvit(name) or name in T2T_MODEL_ARGS or split_broad_name(name)[1]):
        if record['broad']:
            raise ExportError(f'{checkpoint}: it holds {name} with broad attention (train_hp.py --broad), which has '
                              'no broad variant (bvit.broad_models), so timm.create_model cannot rebuild it from '
                              'config.json; evaluate it with train_hp.py --eval --resume')
        raise ExportError(f'{checkpoint}: it holds a {name} model, not a BViT, a T2T-ViT or a broad variant '
                          '(train_hp.py --broad)')
    try:
        model, record = build_from_checkpoint(obj, use_ema=use_ema)
    except ValueError as e:
        raise ExportError(f'{checkpoint}: {e}') from None
    saved = obj.get('args') if isinstance(obj, dict) else None
    ckpt_args = dict(saved) if isinstance(saved, dict) else {}

    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f'.{os.path.basename(out_dir)}.tmp-', dir=parent)
    try:
        diffs = _write(model, record, tmp, ckpt_args)
        bad = [f'{name} {d:.3g}' for name, d in diffs.items() if not d <= TOLERANCE]
        if bad:
            raise ExportCheckError(f'export check failed: largest logit difference {", ".join(bad)} > {TOLERANCE:g}; '
                               f'nothing written to {out_dir}')
        _usual_permissions(tmp)
        _swap_into_place(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    size = 'x'.join(map(str, _input_size(record)))
    arch = model.pretrained_cfg.get('architecture', type(model).__name__)
    log(f'exported {arch} ({model.num_classes} classes, {model.in_chans}x{size} input) to {out_dir}: '
        f'{", ".join(EXPORT_FILES)}')
    for name, d in diffs.items():
        log(f'{name}: largest logit difference {d:.3g} (<= {TOLERANCE:g})')
    return diffs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog='python -m bvit.export',
        description="Export a BViT, T2T-ViT or broad-attention checkpoint to timm's hub layout "
                    "(config.json + model.safetensors, loadable with "
                    "timm.create_model('local-dir:OUT_DIR', pretrained=True)) and to ONNX.")
    p.add_argument('checkpoint', metavar='CHECKPOINT', help="a checkpoint of train_hp.py, a released BViT file, "
                   'or a state dict')
    p.add_argument('out_dir', metavar='OUT_DIR', help='folder to write (new, empty, or a previous export with --force)')
    p.add_argument('--force', action='store_true', help='replace a previous export in OUT_DIR')
    p.add_argument('--use-ema', action='store_true', help="export the checkpoint's EMA weights")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export(args.checkpoint, args.out_dir, force=args.force, use_ema=args.use_ema)
    except ExportError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 2
    except ExportCheckError as e:
        print(f'error: {" ".join(str(e).split())}', file=sys.stderr)
        return 1
    return 0


__all__: List[str] = ['export', 'export_onnx', 'onnx_logits', 'timm_reload_logits', 'ExportError', 'ExportCheckError',
                       'main']

if __name__ == '__main__':
    sys.exit(main())
