"""``--config YAML``: defaults for ``train_hp.py``'s flags from a file, each key checked and
converted as the command line would be (timm's train.py reads its configs the same way, without
the checks), and the record of which flags were given."""
from __future__ import annotations

import argparse
import difflib
import os
from typing import Any, Dict, Optional, Sequence

from utils import UsageError


def load_config(parser: argparse.ArgumentParser, path: str) -> Dict[str, Any]:
    """``--config``: defaults from a YAML file, ``{dest: value}`` for ``parser.set_defaults``, as
    timm's train.py reads its config, with each key checked: a flag name without its dashes,
    spelled with ``-`` or ``_`` (``batch-size``, ``no_model_ema``; also ``tf32``, the destination of
    ``--no-tf32``). Values are converted and checked with the flag's type, count and choices; an
    unknown key is an error naming the closest flag."""
    import yaml
    if not os.path.isfile(path):
        raise UsageError(f'--config {path}: file not found')
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise UsageError(f'--config {path}: not valid YAML ({str(e).splitlines()[0]})') from None
    if not isinstance(data, (dict, type(None))):
        raise UsageError(f'--config {path}: expected a mapping of option names to values')
    actions = [a for a in parser._actions if a.option_strings and a.dest not in ('help', 'config')]
    by_name = {a.dest: a for a in actions}
    by_name.update({o.lstrip('-').replace('-', '_'): a for a in actions for o in a.option_strings})
    defaults: Dict[str, Any] = {}
    for key, value in (data or {}).items():
        name = str(key).replace('-', '_')
        if name not in by_name:
            close = difflib.get_close_matches(name, sorted(by_name), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ''
            raise UsageError(f"{path}: unknown key '{key}'{hint}; keys are train_hp.py flag names")
        action = by_name[name]
        defaults[action.dest] = _config_value(action, name, value, f'{path}: {key}')
    return defaults


def _config_value(action: argparse.Action, name: str, value: Any, where: str) -> Any:
    """``value`` of YAML key ``name`` converted for ``action``, as the command line would be."""
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise UsageError(f'{where} must be true or false, got {value!r}')
        return value if name == action.dest else (action.const if value else not action.const)  # no_x: true -> False
    if value is None:
        return None
    many = action.nargs in ('+', '*') or isinstance(action.nargs, int)
    if not many and isinstance(value, (list, dict)):
        raise UsageError(f'{where} takes one value, got {value!r}')
    values = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if isinstance(action.nargs, int) and len(values) != action.nargs:
        raise UsageError(f'{where} needs {action.nargs} values, got {len(values)}')
    out = []
    for v in values:
        if isinstance(v, bool) and action.type in (int, float):
            raise UsageError(f'{where} must be a number, got {v!r}')
        try:
            v = action.type(v) if action.type is not None and v is not None else v
        except (TypeError, ValueError):
            raise UsageError(f'{where} has an invalid value {v!r}') from None
        if action.choices is not None and v not in action.choices:
            raise UsageError(f'{where} must be one of {", ".join(map(str, action.choices))}, got {v!r}')
        out.append(v)
    return out if many else out[0]


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """``parser``'s arguments from ``argv``, over the defaults of its ``--config`` file, over the
    built-in ones. ``args.given``: the flags set on the command line or in the file, sorted
    (``--eval`` / ``--resume`` take the checkpoint's model for the others, resume.adopt_record)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument('--config', default=None)
    known, _ = pre.parse_known_args(argv)
    config = load_config(parser, known.config) if known.config else {}
    parser.set_defaults(**config)
    args = parser.parse_args(argv)
    for action in parser._actions:  # parse again without defaults: what remains was given
        action.default = argparse.SUPPRESS
    parser._defaults.clear()
    args.given = sorted(set(config) | set(vars(parser.parse_args(argv))))
    return args


__all__ = ['load_config', 'parse_with_config']
