"""Parameters and FLOPs of the registered BViT models, counted with ``torch.utils.flop_counter``.

    python -m bvit.flops [--img-size 224] [--num-classes 1000] [--t2t]

One line per model and stem, for the classification forward ``model(x)`` of one image; ``--t2t``
adds the T2T-ViT models beside the MACs their README gives (the Performer's einsums are matrix
products, so they are counted).
``GFLOPs`` counts a multiply-add as 2 (flop_counter's convention); ``GMACs`` is half of it, the
unit vision papers (BViT's included) call "FLOPs".
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional

import torch
import timm
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

import bvit.models  # noqa: F401  (registers the BViT models)

# flop_counter knows the CUDA attention kernels but not the CPU one that
# scaled_dot_product_attention dispatches to here; without this its FLOPs would be dropped.
_cpu_sdpa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _cpu_sdpa not in torch.utils.flop_counter.flop_registry:
    @register_flop_formula(_cpu_sdpa)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    # torch < 2.4 files the formula under each overload, but FlopCounterMode looks it up by packet
    torch.utils.flop_counter.flop_registry.setdefault(_cpu_sdpa, _cpu_sdpa_flop)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int = 224, in_chans: int = 3) -> int:
    """FLOPs (2 per multiply-add) of ``model(x)`` for one image (1, in_chans, img_size, img_size),
    in eval mode; every call of a BViT costs the same (it keeps nothing from one call to the next)."""
    was_training = model.training
    model.eval()
    x = torch.zeros(1, in_chans, img_size, img_size)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


def table(names: Optional[List[str]] = None, img_size: int = 224, num_classes: int = 1000,
          twins: bool = False) -> List[Dict]:
    """Rows of {model, stem, broad, params, gflops, gmacs, tokens} for the registered BViTs."""
    rows = []
    for name in names or ['bvit_5m', 'bvit_22m']:
        for stem in ('conv', 'none'):
            for broad in ((True, False) if twins else (True,)):
                model = timm.create_model(name, img_size=img_size, num_classes=num_classes, stem=stem, broad=broad)
                flops = count_flops(model, img_size)
                rows.append(dict(model=name, stem=stem, broad=broad, params=count_params(model),
                                 gflops=flops / 1e9, gmacs=flops / 2e9, tokens=model.num_patches + 1))
    return rows


# MACs of the T2T-ViT README (yitu-opensource/T2T-ViT, "T2T-ViT Models"), 224 px.
T2T_README_GMACS = {'t2t_vit_7': 1.1, 't2t_vit_10': 1.5, 't2t_vit_12': 1.8, 't2t_vit_14': 4.8, 't2t_vit_19': 8.5,
                    't2t_vit_24': 13.8, 't2t_vit_t_14': 6.1, 't2t_vit_t_19': 9.8, 't2t_vit_t_24': 15.0}


def t2t_table(img_size: int = 224, num_classes: int = 1000) -> List[Dict]:
    """Rows of {model, params, trainable, gflops, gmacs, readme_gmacs, tokens} for the T2T-ViTs."""
    rows = []
    for name, readme in T2T_README_GMACS.items():
        model = timm.create_model(name, img_size=img_size, num_classes=num_classes)
        flops = count_flops(model, img_size)
        rows.append(dict(model=name, params=count_params(model),
                         trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
                         gflops=flops / 1e9, gmacs=flops / 2e9, readme_gmacs=readme if img_size == 224 else None,
                         tokens=model.patch_embed.num_patches + 1))
    return rows


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--img-size', type=int, default=224, help='input resolution')
    parser.add_argument('--num-classes', type=int, default=1000, help='classes of the head')
    parser.add_argument('--twins', action='store_true', help='also list the broad=False twins')
    parser.add_argument('--deit', action='store_true', help="also list timm's deit_tiny/deit_small for comparison")
    parser.add_argument('--t2t', action='store_true', help='also list the T2T-ViT models beside their README\'s MACs')
    args = parser.parse_args(argv)
    print(f"{'model':10s} {'stem':5s} {'broad':6s} {'tokens':>6s} {'params':>12s} {'GFLOPs':>8s} {'GMACs':>7s}")
    for r in table(img_size=args.img_size, num_classes=args.num_classes, twins=args.twins):
        print(f"{r['model']:10s} {r['stem']:5s} {str(r['broad']):6s} {r['tokens']:6d} {r['params']:12,d} "
              f"{r['gflops']:8.3f} {r['gmacs']:7.3f}")
    if args.deit:
        for name in ('deit_tiny_patch16_224', 'deit_small_patch16_224'):
            model = timm.create_model(name, num_classes=args.num_classes, img_size=args.img_size)
            flops = count_flops(model, args.img_size)
            tokens = model.patch_embed.num_patches + model.num_prefix_tokens
            print(f"{name:23s} {tokens:6d} {count_params(model):12,d} {flops / 1e9:8.3f} {flops / 2e9:7.3f}")
    if args.t2t:
        print(f"{'model':13s} {'tokens':>6s} {'params':>12s} {'trainable':>12s} {'GFLOPs':>8s} {'GMACs':>7s} README")
        for r in t2t_table(args.img_size, args.num_classes):
            readme = f"{r['readme_gmacs']:.1f}" if r['readme_gmacs'] is not None else '-'
            print(f"{r['model']:13s} {r['tokens']:6d} {r['params']:12,d} {r['trainable']:12,d} {r['gflops']:8.3f} "
                  f"{r['gmacs']:7.3f} {readme:>6s}")


if __name__ == '__main__':
    main()
