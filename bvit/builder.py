"""The model record: what defines a network, written once into a checkpoint and read by one
function that rebuilds it (as timm's ``_builder.py`` builds from a config).

A record is a plain dict with the fields of :data:`RECORD_FIELDS`::

    arch          registered timm name ('bvit_5m', 't2t_vit_14', 'deit_tiny_patch16_224', ...); a broad
                  variant's name (``broad_deit_tiny_patch16_224``) is its timm model with broad on
    num_classes   classes of the head
    input_size    image side (int) or [h, w]
    patch_size    patch side, or None for the model's default (BViT: 16)
    stem          BViT's stem, 'conv' or 'none' (None: 'conv'); other models: None
    broad         broad attention on (BViT, T2T-ViT: their ``broad`` argument; timm's ViT, DeiT,
                  Swin: their broad variant ``broad_<arch>``, bvit.broad_models; other models:
                  bvit.broad.add_broad_attention after building)
    broad_scale   weight of the broad attention output
    broad_layers  the blocks that feed it: None (all), k (the last k) or a list of block indices;
                  a record written before it existed reads as None
    model_kwargs  further constructor arguments, {name: value}

``train_hp.py`` writes it as ``checkpoint['model_record']`` (:func:`record_from_args` of its flags);
:func:`record_of_checkpoint` reads it back from any checkpoint this project accepts (older
``train_hp.py`` files from their ``args``, released and T2T-ViT files from their weights);
:func:`create_model` is the one map from a record to ``timm.create_model``. ``train_hp.py --eval``,
:func:`build_from_checkpoint` (export, visualize) and ``hubconf.py`` go through them.
"""
from __future__ import annotations

import ast
import math
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import timm
from torch import Tensor, nn

from .broad import add_broad_attention, broad_variant, has_broad_attention, split_broad_name
from .checkpoint import PathLike, load_checkpoint, read_checkpoint, unwrap_state_dict
from .models import MODEL_ARGS, convert_official_state_dict, resolve_arch
from .t2t import T2T_MODEL_ARGS, arch_of_state_dict, rename_authors_keys

RECORD_FIELDS = ('arch', 'num_classes', 'input_size', 'patch_size', 'stem', 'broad', 'broad_scale', 'broad_layers',
                 'model_kwargs')
RECORD_KEY = 'model_record'

# constructor arguments that have a field of their own (train_hp.py refuses them in --model-kwargs)
_FIELD_KWARGS = {'num_classes': 'num_classes', 'img_size': 'input_size', 'patch_size': 'patch_size',
                 'stem': 'stem', 'broad': 'broad', 'broad_scale': 'broad_scale', 'broad_layers': 'broad_layers'}
# released widths -> registered names (a released file stores no arch)
_ARCH_BY_WIDTH = {192: 'bvit_5m', 384: 'bvit_22m'}


def canonical_arch(name: str) -> str:
    """The registered name for ``name``: BViT's spellings (``BViT-5``, ``BViT_21``, ...,
    :func:`bvit.models.resolve_arch`) or any timm model name. ValueError otherwise."""
    try:
        return resolve_arch(name)
    except ValueError:
        pass
    if timm.is_model(name):
        return name
    raise ValueError(f'unknown model {name!r}: neither a BViT name (BViT-5, BViT-22; also BViT_5, BViT-21, '
                     'BViT_21, bvit_5m, bvit_22m) nor a timm model name')


def is_bvit(arch: str) -> bool:
    return arch in MODEL_ARGS


def parse_model_kwargs(items: Union[None, Mapping[str, Any], Sequence[str]]) -> Dict[str, Any]:
    """``KEY=VALUE`` strings (train_hp.py's ``--model-kwargs``; values read as Python literals,
    else kept as strings) or a dict, as a dict. ValueError for an item without ``=``, a key that
    is not an identifier, or a key that a record field sets (``img_size``: ``input_size``, ...)."""
    if isinstance(items, Mapping):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items or []:
            key, sep, value = str(item).partition('=')
            if not sep or not key.strip().isidentifier():
                raise ValueError(f'--model-kwargs: expected KEY=VALUE, got {item!r}')
            try:
                pairs.append((key.strip(), ast.literal_eval(value.strip())))
            except (ValueError, SyntaxError):
                pairs.append((key.strip(), value.strip()))
    for key, _ in pairs:
        if key in _FIELD_KWARGS:
            raise ValueError(f'--model-kwargs: {key} has a flag of its own ({_FIELD_KWARGS[key]})')
    return dict(pairs)


def parse_broad_layers(value: Any) -> Union[None, int, list]:
    """``--broad-layers`` as a record holds it: None, an int k (the last k blocks) or a list of
    block indices. From the command line '4' is the last 4 and '0,5,11' (or '3,': one block) the
    indices. ValueError for anything else."""
    if value is None or isinstance(value, (int, list)) and not isinstance(value, bool):
        return value
    if isinstance(value, tuple):
        return list(value)
    text = str(value).strip()
    try:
        if ',' in text:
            return [int(i) for i in text.split(',') if i.strip()]
        return int(text)
    except ValueError:
        raise ValueError(f'--broad-layers {value!r}: give k (the last k blocks) or block indices with commas '
                         '(0,5,11; 3, for block 3 alone)') from None


def record_from_args(args: Mapping[str, Any]) -> Dict[str, Any]:
    """The record of a run from ``train_hp.py``'s arguments (``vars(args)``, or the ``args`` dict
    older checkpoints store): ``--arch``, ``nb_classes``, ``--input-size``, ``--patch-size``,
    ``--stem``, ``--no-broad`` (BViT) / ``--broad`` (other models), ``--broad-scale``,
    ``--broad-layers``, ``--model-kwargs``; a broad variant's name (``--arch broad_deit_tiny_patch16_224``) is recorded
    as its timm model with broad on. ValueError for an unknown arch or bad ``--model-kwargs``."""
    arch, named_broad = split_broad_name(canonical_arch(str(args['arch'])))
    size = args.get('input_size', 224)
    if is_bvit(arch):  # the defaults filled in, so that equal models have equal records
        broad, patch, stem = not args.get('no_broad', False), args.get('patch_size') or 16, args.get('stem') or 'conv'
    else:
        broad = bool(args.get('broad', False)) or named_broad
        patch, stem = args.get('patch_size') or None, args.get('stem')
        stem = None if stem == 'none' else stem  # plain patchify: what other timm ViTs do anyway
    return dict(arch=arch, num_classes=int(args.get('nb_classes') or args.get('num_classes') or 1000),
                input_size=size if isinstance(size, int) else [int(s) for s in size][-2:],
                patch_size=patch, stem=stem, broad=broad, broad_scale=float(args.get('broad_scale', 0.4)),
                broad_layers=parse_broad_layers(args.get('broad_layers')),
                model_kwargs=parse_model_kwargs(args.get('model_kwargs')))


def _record_from_weights(sd: Mapping[str, Tensor]) -> Dict[str, Any]:
    """The record of a file that stores none (a released BViT or an authors' T2T-ViT file), read
    off its weights (this package's key names): arch by width and depth, classes, input channels,
    patch size, stem, and the input size its position table was sized for."""
    head = sd.get('head.weight')
    record: Dict[str, Any] = dict(num_classes=int(head.shape[0]) if head is not None else 0, patch_size=None,
                                  stem=None, broad=False, broad_scale=0.4, broad_layers=None, model_kwargs={})
    rows = sd['pos_embed'].shape[1] - 1 if 'pos_embed' in sd else 0
    side = math.isqrt(rows)
    t2t_arch = arch_of_state_dict(sd)
    if t2t_arch is not None:
        record.update(arch=t2t_arch, input_size=side * 16 if side * side == rows and rows else 224)
        return record
    pe = sd.get('patch_embed.weight')
    if pe is None or pe.ndim != 4 or 'blocks.0.attn.qkv.weight' not in sd:
        raise ValueError('the checkpoint stores no model record and its keys are not a BViT or T2T-ViT')
    width = int(pe.shape[0])
    if width not in _ARCH_BY_WIDTH:
        raise ValueError(f'the checkpoint stores no model record and its width {width} is not a released BViT '
                         f'({", ".join(f"{w}: {n}" for w, n in _ARCH_BY_WIDTH.items())})')
    depth = sum(1 for k in sd if k.startswith('blocks.') and k.endswith('.attn.qkv.weight'))
    patch = int(pe.shape[-1])
    record.update(arch=_ARCH_BY_WIDTH[width], input_size=side * patch if side * side == rows else 224,
                  patch_size=patch, stem='conv' if 'stem.weight' in sd else 'none', broad=True)
    kwargs = {'in_chans': int(pe.shape[1])} if pe.shape[1] != 3 else {}
    if depth != MODEL_ARGS[record['arch']]['depth']:
        kwargs['depth'] = depth
    record['model_kwargs'] = kwargs
    return record


def record_of_checkpoint(obj: Any, use_ema: bool = False) -> Dict[str, Any]:
    """The record of a loaded checkpoint (what :func:`bvit.checkpoint.read_checkpoint` returned):
    its ``model_record``; for ``train_hp.py`` files written before it, their ``args``; for files
    with neither, read off the weights. ValueError when none of these names a model."""
    if isinstance(obj, Mapping) and isinstance(obj.get(RECORD_KEY), Mapping):
        record = {'broad_layers': None, **obj[RECORD_KEY]}
        missing = [f for f in RECORD_FIELDS if f not in record]
        if missing:
            raise ValueError(f'its {RECORD_KEY} lacks {", ".join(missing)}')
        return record
    saved = obj.get('args') if isinstance(obj, Mapping) else None
    if isinstance(saved, Mapping) and saved.get('arch'):
        return record_from_args(saved)
    sd = rename_authors_keys(convert_official_state_dict(unwrap_state_dict(obj, use_ema)))
    return _record_from_weights(sd)


def model_kwargs(record: Mapping[str, Any]) -> Tuple[str, Dict[str, Any]]:
    """(name, ``timm.create_model`` kwargs) of a record: the one map from a record to a
    constructor. Broad attention is the ``broad`` argument of BViT and T2T-ViT and the broad
    variant ``broad_<arch>`` of timm's ViT, DeiT and Swin; on any other model it is added after
    building (:func:`create_model`). ValueError for a setting the model family does not have."""
    arch, named_broad = split_broad_name(record['arch'])
    broad = bool(record['broad']) or named_broad
    kwargs: Dict[str, Any] = dict(num_classes=record['num_classes'], img_size=record['input_size'])
    layers = record.get('broad_layers')
    if is_bvit(arch):
        kwargs.update(patch_size=record['patch_size'] or 16, stem=record['stem'] or 'conv',
                      broad=broad, broad_scale=float(record['broad_scale']))
    else:
        if record.get('stem') not in (None, 'none'):  # 'none' (plain patchify) is what other timm ViTs do
            raise ValueError(f'stem {record["stem"]!r} applies to BViT models only, not {arch}')
        if record.get('patch_size'):
            kwargs['patch_size'] = record['patch_size']
        variant = broad_variant(arch) if broad else None
        if broad and arch in T2T_MODEL_ARGS:
            kwargs.update(broad=True, broad_scale=float(record['broad_scale']))
        elif variant is not None:
            arch = variant
            kwargs['broad_scale'] = float(record['broad_scale'])
    if layers is not None and 'broad_scale' in kwargs:  # the models with a broad argument or name
        kwargs['broad_layers'] = layers
    return arch, {**kwargs, **parse_model_kwargs(record.get('model_kwargs'))}


def create_model(record: Mapping[str, Any], **train_kwargs: Any) -> nn.Module:
    """The network a record describes, built with ``timm.create_model`` (:func:`model_kwargs`;
    its factory arguments recorded, as timm's hub export needs) plus ``train_kwargs`` (dropout,
    stochastic depth); broad attention on a model that has no ``broad`` argument nor broad
    variant by :func:`bvit.broad.add_broad_attention`. A convolutional timm model, which takes no
    ``img_size``, is built without it. ValueError (one line) when the model cannot be built so."""
    arch, kwargs = model_kwargs(record)
    kwargs.update(train_kwargs)
    try:
        model = timm.create_model(arch, **kwargs)
    except TypeError as e:
        if is_bvit(arch) or 'img_size' not in str(e):
            raise ValueError(f'cannot build {arch}: {e}') from None
        if 'patch_size' in kwargs:
            raise ValueError(f'{arch} takes no patch size') from None
        kwargs.pop('img_size')
        model = timm.create_model(arch, **kwargs)
    except ValueError as e:
        raise ValueError(f'cannot build {arch}: {e}') from None
    if (record['broad'] or split_broad_name(record['arch'])[1]) and not has_broad_attention(model):
        try:
            model = add_broad_attention(model, scale=float(record['broad_scale']), broad_layers=record.get('broad_layers'))
        except (TypeError, ValueError) as e:
            raise ValueError(f'broad attention on {arch}: {e}') from None
    return model


def build_from_checkpoint(source: Union[PathLike, Mapping[str, Any]], use_ema: bool = False,
                          overrides: Optional[Mapping[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model a checkpoint holds, in eval mode on the CPU: its record
    (:func:`record_of_checkpoint`) updated with ``overrides`` (record fields, e.g. another
    ``input_size``, whose position table is then resampled; other keys are constructor arguments,
    added to ``model_kwargs``; None values are ignored), built by :func:`create_model` and
    loaded by :func:`bvit.checkpoint.load_checkpoint`. Returns (model, record).
    FileNotFoundError / ValueError (one line) when the file is missing, names no model, or its
    weights do not fit."""
    where = '' if isinstance(source, Mapping) else f'{source}: '
    obj = source if isinstance(source, Mapping) else read_checkpoint(source)
    try:
        record = record_of_checkpoint(obj, use_ema)
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key in RECORD_FIELDS:
                record[key] = value
            else:
                record['model_kwargs'] = {**parse_model_kwargs(record['model_kwargs']), **parse_model_kwargs({key: value})}
        record['arch'] = canonical_arch(str(record['arch']))
        model = create_model(record)
        load_checkpoint(model, obj, use_ema=use_ema)
    except ValueError as e:
        raise ValueError(f'{where}{e}') from None
    return model.eval(), record


__all__ = [
    'RECORD_FIELDS', 'RECORD_KEY', 'canonical_arch', 'is_bvit', 'parse_broad_layers', 'parse_model_kwargs', 'record_from_args',
    'record_of_checkpoint', 'model_kwargs', 'create_model', 'build_from_checkpoint',
]
