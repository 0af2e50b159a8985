"""Checkpoint files: the one way this project reads weights into a model (as timm's ``_helpers.py``).

:func:`load_checkpoint` reads a file safely (``torch.load(weights_only=True)``), takes its raw or
EMA weights, adapts them with the model family's ``checkpoint_filter_fn`` (BViT's in
:mod:`bvit.models`, T2T-ViT's in :mod:`bvit.t2t`, timm's own for timm's families: the function of
that name in the module that defines the model's class or one of its bases) and loads them only
when every key fits. ``train_hp.py`` (``--eval``, ``--resume``, ``--finetune``, the teacher),
:mod:`bvit.builder` (export, visualize, hub) and timm's ``pretrained=True`` door (which calls the
same filter) go through it. This module imports no model: the families import it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import zipfile
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

_WRAPPER_PREFIXES = ('module.', '_orig_mod.', 'model.')
_RAW_KEYS = ('model', 'state_dict', 'net')
_EMA_KEYS = ('model_ema', 'state_dict_ema')

# The one class besides tensors and plain data that real checkpoint files hold: the run's
# ``args`` as an argparse.Namespace, stored by BViT's released train_hp.py and DeiT's main.py
# (under 'args') and by timm's CheckpointSaver (which T2T-ViT's releases come from).
CHECKPOINT_SAFE_GLOBALS = (argparse.Namespace,)

PathLike = Union[str, 'os.PathLike[str]']


def checkpoint_globals() -> contextlib.AbstractContextManager:
    """``torch.serialization.safe_globals`` for :data:`CHECKPOINT_SAFE_GLOBALS`: inside it,
    ``torch.load(weights_only=True)`` also rebuilds those classes and still refuses any other."""
    return torch.serialization.safe_globals(list(CHECKPOINT_SAFE_GLOBALS))


def read_checkpoint(path: PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with errors a person can act on.

    Besides tensors and plain data, the classes of :data:`CHECKPOINT_SAFE_GLOBALS` are rebuilt
    (returned as they are; this project's readers of ``args`` take only a dict). Raises
    FileNotFoundError for a missing file and ValueError for one that is not a readable PyTorch
    checkpoint (truncated, corrupt, or holding any other pickled object, which is named and never
    unpickled).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'checkpoint not found: {path}')
    try:
        with checkpoint_globals():
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises several types for bad files; all mean the same here
        if not zipfile.is_zipfile(path):
            reason = 'truncated, or not written by torch.save'
        elif 'weights only load failed' in str(e).lower():
            reason = (f'it holds pickled Python objects ({_foreign_globals(path, str(e))}) besides tensors, plain data and '
                      'argparse.Namespace; refusing to load it (torch.load with weights_only=True)')
        else:
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ValueError(f'{path} is not a readable PyTorch checkpoint: {reason}') from None


def _foreign_globals(path: str, message: str = '') -> str:
    """The classes and functions a checkpoint would unpickle beyond the allowed ones, read off
    its pickle without running it (``torch.serialization.get_unsafe_globals_in_checkpoint``).
    torch 2.5 has no such function: there the first one, as torch's ``message`` names it."""
    allowed = {f'{c.__module__}.{c.__qualname__}' for c in CHECKPOINT_SAFE_GLOBALS}
    try:
        names = [n for n in torch.serialization.get_unsafe_globals_in_checkpoint(path) if n not in allowed]
    except AttributeError:  # torch 2.5
        names = re.findall(r'Unsupported global: GLOBAL ([\w.]+)', message)[:1]
    except Exception:  # pragma: no cover - an unreadable pickle: torch's own message suffices
        names = []
    return ', '.join(names[:3]) + (', ...' if len(names) > 3 else '') if names else 'unknown'


def unwrap_state_dict(obj: Any, use_ema: bool = False) -> Dict[str, Tensor]:
    """The state dict inside what ``torch.load(path, weights_only=True)`` returned.

    Raw weights: a bare state dict or one under ``model`` (DeiT, BViT's release, train_hp.py),
    ``state_dict`` (timm's CheckpointSaver, Lightning) or ``net`` (T2T-ViT's CIFAR files), else
    the EMA weights of a file that holds nothing else. With
    ``use_ema``: ``model_ema`` (DeiT, train_hp.py) or ``state_dict_ema`` (timm's saver); a file
    without EMA weights is refused rather than answered with the raw ones. ``module.`` (DDP),
    ``_orig_mod.`` (torch.compile) and ``model.`` (Lightning) prefixes are stripped. ValueError
    when no state dict is found.
    """
    if isinstance(obj, Mapping):
        keys = _EMA_KEYS if use_ema else _RAW_KEYS + _EMA_KEYS  # a file of EMA weights alone gives those
        key = next((k for k in keys if isinstance(obj.get(k), Mapping)), None)
        if key is not None:
            obj = obj[key]
        elif use_ema:
            raise ValueError('the checkpoint holds no model_ema weights (nor state_dict_ema)')
    if not isinstance(obj, Mapping) or not obj or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ValueError('the file holds no model state dict (expected a dict of tensors, '
                         "or one under 'model' or 'state_dict')")
    out = {}
    for key, value in obj.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix):], True
        out[key] = value
    return out


def classifier_keys(model: nn.Module) -> List[str]:
    """State-dict keys of ``model``'s classifier (timm's ``get_classifier``): the keys a new head replaces."""
    classifier = model.get_classifier() if hasattr(model, 'get_classifier') else None
    if not isinstance(classifier, nn.Module):
        return []
    prefix = next((n for n, m in model.named_modules() if m is classifier), None)
    return [f'{prefix}.{k}' for k in classifier.state_dict()] if prefix else []


def check_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], ignore: Iterable[str] = ()) -> None:
    """ValueError naming the first key where ``state_dict`` does not fit ``model`` (missing,
    unexpected or of another shape); keys in ``ignore`` are not compared (the classifier, which
    timm's ``pretrained=True`` door replaces when the class count differs)."""
    ignore = set(ignore)
    expected = model.state_dict()
    name = type(model).__name__
    for key, ref in expected.items():
        if key in ignore:
            continue
        if key not in state_dict:
            raise ValueError(f"checkpoint does not fit this {name}: key '{key}' (shape {tuple(ref.shape)}) is missing")
        if tuple(state_dict[key].shape) != tuple(ref.shape):
            raise ValueError(
                f"checkpoint does not fit this {name}: '{key}' has shape {tuple(state_dict[key].shape)} "
                f"in the checkpoint but {tuple(ref.shape)} in the model")
    for key in state_dict:
        if key not in expected and key not in ignore:
            raise ValueError(f"checkpoint does not fit this {name}: unexpected key '{key}'")


def check_backbone(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """:func:`check_state_dict` of every key but the classifier's (its keys, and ``head.*`` for a
    model built without one): what a family's ``checkpoint_filter_fn`` checks, since timm's
    ``pretrained=True`` door replaces the classifier when the class count differs."""
    check_state_dict(model, state_dict, ignore=classifier_keys(model) + ['head.weight', 'head.bias'])


def family_filter(model: nn.Module) -> Optional[Callable[..., Dict[str, Tensor]]]:
    """The ``checkpoint_filter_fn(state_dict, model)`` of ``model``'s family: the function of that
    name in the module that defines its class or the nearest base that has one (BViT ->
    :mod:`bvit.models`, T2T-ViT -> :mod:`bvit.t2t`, a timm ViT or DeiT with broad attention ->
    timm's ``vision_transformer``); None when no module in the chain has one."""
    for cls in type(model).__mro__:
        fn = getattr(sys.modules.get(cls.__module__), 'checkpoint_filter_fn', None)
        if callable(fn):
            return fn
    return None


def load_checkpoint(model: nn.Module, source: Union[PathLike, Mapping[str, Any]], use_ema: bool = False,
                    new_head: bool = False) -> List[str]:
    """Load a checkpoint into ``model``: the one loader of this project.

    ``source``: a path (read with :func:`read_checkpoint`) or what it returned. ``use_ema`` takes
    the EMA weights (see :func:`unwrap_state_dict`). The weights are adapted by the family's
    ``checkpoint_filter_fn`` (:func:`family_filter`: key layouts, position tables resampled to the
    model's grid, input channels) and must then fit every key; with ``new_head`` a classifier
    whose shape differs (or that is absent) keeps the model's fresh initialisation, for
    fine-tuning. Returns the keys left fresh. FileNotFoundError / ValueError (one line, the path
    first) on any problem, the model untouched.
    """
    where = f'{os.fspath(source)}: ' if isinstance(source, (str, os.PathLike)) else ''
    obj = read_checkpoint(source) if where else source
    try:
        sd = unwrap_state_dict(obj, use_ema)
        fn = family_filter(model)
        if fn is not None:
            sd = dict(fn(sd, model))
        fresh: List[str] = []
        if new_head:
            own = model.state_dict()
            for key in classifier_keys(model):
                if key not in sd or tuple(sd[key].shape) != tuple(own[key].shape):
                    sd[key] = own[key]
                    fresh.append(key)
        check_state_dict(model, sd)
    except ValueError as e:
        raise ValueError(f'{where}{e}') from None
    model.load_state_dict(sd)
    return fresh


__all__ = [
    'CHECKPOINT_SAFE_GLOBALS', 'checkpoint_globals', 'read_checkpoint', 'unwrap_state_dict', 'classifier_keys',
    'check_state_dict', 'check_backbone', 'family_filter', 'load_checkpoint',
]
