"""torch.hub entry points, as DeiT's: one for every BViT and T2T-ViT model this repository
registers with timm (the broad variants ``broad_<name>`` of timm's models are timm names:
``timm.create_model``).

    model = torch.hub.load('/path/to/this/clone', 'bvit_5m', source='local')
    model = torch.hub.load('/path/to/this/clone', 'bvit_5m', source='local', weights='BViT-5M.pth')

Nothing is downloaded: ``weights`` is a local file, anything :func:`bvit.checkpoint.load_checkpoint`
reads (a released file, an authors' T2T-ViT file, a checkpoint of train_hp.py; ``use_ema=True``
takes its EMA weights). The model is then the file's (:func:`bvit.builder.build_from_checkpoint`:
its record gives size, patch, stem, classes, broad attention), ``kwargs`` overriding record
fields (``input_size=288``) or adding constructor arguments; without ``weights`` it is
``timm.create_model(name, **kwargs)``.
"""
from typing import Any, Callable

dependencies = ['torch', 'torchvision', 'timm']

from bvit.builder import build_from_checkpoint, record_of_checkpoint  # noqa: E402
from bvit.checkpoint import read_checkpoint  # noqa: E402
from bvit.models import MODEL_ARGS  # noqa: E402
from bvit.t2t import T2T_MODEL_ARGS  # noqa: E402


def _entry(name: str) -> Callable[..., Any]:
    def entry(pretrained: bool = False, weights: str = '', use_ema: bool = False, **kwargs: Any) -> Any:
        import timm
        if not weights:
            if pretrained:
                raise ValueError(f'{name}: nothing is downloaded; pass weights=PATH, a local checkpoint file')
            return timm.create_model(name, **kwargs)
        obj = read_checkpoint(weights)
        held = record_of_checkpoint(obj, use_ema)['arch']
        if held != name:
            raise ValueError(f'{weights} holds a {held} model, not {name}')
        return build_from_checkpoint(obj, use_ema=use_ema, overrides=kwargs)[0]
    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f'{name}: ``timm.create_model({name!r}, **kwargs)``, or with ``weights`` (a local file) the '
                     'model it holds, ``use_ema`` taking its EMA weights (see hubconf.py).')
    return entry


for _name in (*MODEL_ARGS, *T2T_MODEL_ARGS):
    globals()[_name] = _entry(_name)
