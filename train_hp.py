"""Train and evaluate BViT (and any timm model, optionally with broad attention) on ImageNet,
CIFAR, iNaturalist, an image folder, Fashion-MNIST or the bundled DIGITS set, with DeiT's recipe
and flags. One process, ``torchrun`` / ``torch.distributed.launch``, or ``srun`` under SLURM::

    python train_hp.py --config configs/demo_digits.yaml --output_dir output/demo
    torchrun --nproc_per_node=4 train_hp.py --arch BViT-5 --data-path /path/to/imagenet --output_dir /path/to/save
    python train_hp.py --eval --resume /path/to/weight.pth --data-path /path/to/imagenet

Exit statuses (``--help``'s epilog) and the rest: docs/training.md.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.utils import NativeScaler, random_seed
from torch import nn
from torch.utils.data import DataLoader

from bvit.builder import canonical_arch, create_model, is_bvit, parse_broad_layers, parse_model_kwargs, record_from_args
from bvit.checkpoint import load_checkpoint
from config import parse_with_config
from datasets import DATASETS, INAT_CATEGORIES, build_datasets, canonical_data_set
from engine import Evaluator, autocast_context, precision, setup_determinism, setup_tf32, train_one_epoch
from losses import DistillationLoss, build_base_criterion
import pipeline
from samplers import RepeatAugSampler, ShardSampler
from preemption import STOP_EXIT_STATUS, RunStopped, StopSignal, epoch_seed, ignore_stop_signals, save_and_stop, stop_run
from resume import (
    adopt_record, check_resume_schedule, make_checkpoint, read_resume, restore_training_state, resume_position,
    save_checkpoint,
)
from unreadable import collate_skipping_unreadable
from utils import (
    NonFiniteLossError, UsageError, all_reduce_sum, append_log_line, cleanup_distributed, environment_info,
    exit_without_teardown, format_seconds, get_rank, init_distributed, is_dist, is_main_process, log,
    prepare_output_dir, resolve_device, write_line,
)

SCHEDULES = ('cosine', 'tanh', 'step', 'multistep', 'poly', 'constant', 'wsd', 'rsqrt', 'none')


# Arguments ----------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f'error: {message} (see {self.prog} --help)\n')


def _str2bool_none(value: str) -> Optional[float]:
    return None if str(value).lower() in ('none', '') else float(value)


def get_args_parser() -> argparse.ArgumentParser:
    """All flags. DeiT's main.py flags keep their names, spellings and meanings; the defaults are
    the BViT paper's ImageNet recipe (see configs/bvit_5m_imagenet.yaml)."""
    p = _Parser('train_hp.py', description='BViT training and evaluation script (DeiT-compatible flags).',
                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                epilog='Exit status: 0 done; 1 non-finite loss (last checkpoint kept); 2 an error, printed on one '
                       'line; 3 stopped by SIGTERM or SIGINT after a finished step, with a resumable checkpoint '
                       '(continue with --resume OUTPUT_DIR/checkpoint.pth). Under srun, SLURM_PROCID, '
                       'SLURM_NTASKS and SLURM_LOCALID give rank, world size and local rank.')
    p.add_argument('--config', default=None, metavar='YAML',
                   help='YAML file of defaults (keys: flag names, with - or _); flags on the command line win')
    p.add_argument('--batch-size', default=64, type=int, help='images per process and step (total = this x processes)')
    p.add_argument('--epochs', default=300, type=int, help='epochs to train')
    p.add_argument('--bce-loss', action='store_true',
                   help='binary cross entropy instead of softmax CE (DeiT III; positive soft targets become 1)')
    p.add_argument('--unscale-lr', action='store_true', help='use --lr as given instead of lr x total batch / 512')

    g = p.add_argument_group('model')
    g.add_argument('--arch', '--model', dest='arch', default='BViT-5', metavar='NAME', help='model: a BViT name '
                   '(BViT-5, BViT-22; also BViT_5, BViT-21, BViT_21, bvit_5m, bvit_22m) or any timm model name')
    g.add_argument('--input-size', default=224, type=int, help='image size (square)')
    g.add_argument('--patch-size', default=None, type=int, help='patch size (BViT: 16; timm models that take one)')
    g.add_argument('--stem', default=None, choices=['conv', 'none'], help="BViT stem: 'conv' (as released) or 'none'")
    g.add_argument('--no-broad', action='store_true', help='BViT without broad attention (its broad=False twin)')
    g.add_argument('--broad', action='store_true', help='broad attention on a timm ViT / DeiT / Swin or a T2T-ViT')
    g.add_argument('--broad-scale', default=0.4, type=float, help='weight of the broad attention output')
    g.add_argument('--broad-layers', default=None, metavar='K|I,J,..', help='blocks feeding the broad attention: K '
                   "the last K, I,J,.. those ('3,': block 3); default all. Swin: per stage (docs/backbones.md)")
    g.add_argument('--model-kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help="more arguments of the model's constructor, e.g. embed_dim=64 num_heads=2 head_dim=32 "
                        '(a narrower BViT or timm ViT); values are Python literals')
    g.add_argument('--drop', default=0.0, type=float, help='dropout rate')
    g.add_argument('--drop-path', default=0.1, type=float, help='stochastic depth rate')
    g.add_argument('--model-ema', action='store_true', help='keep an exponential moving average of the weights')
    g.add_argument('--no-model-ema', action='store_false', dest='model_ema', help='no weight EMA')
    g.add_argument('--model-ema-decay', default=0.99996, type=float, help='EMA decay per step')
    g.add_argument('--model-ema-force-cpu', action='store_true', help='keep the EMA on the CPU (then not evaluated)')
    p.set_defaults(model_ema=True)

    g = p.add_argument_group('optimizer')
    g.add_argument('--opt', default='adamw', metavar='OPTIMIZER', help='timm optimizer name')
    g.add_argument('--opt-eps', default=1e-6, type=float, metavar='EPSILON', help='optimizer epsilon')
    g.add_argument('--opt-betas', default=None, type=float, nargs='+', metavar='BETA', help='optimizer betas')
    g.add_argument('--clip-grad', default=1.0, type=_str2bool_none, metavar='NORM',
                   help="clip the gradient norm to this ('none' for no clipping)")
    g.add_argument('--momentum', default=0.9, type=float, metavar='M', help='SGD momentum')
    g.add_argument('--weight-decay', default=0.05, type=float, help='weight decay (not on biases, norms, tokens)')

    g = p.add_argument_group('learning-rate schedule (stepped at the start of every epoch)')
    g.add_argument('--sched', default='cosine', metavar='SCHEDULER', help=f'one of {", ".join(SCHEDULES)}')
    g.add_argument('--lr', default=1e-3, type=float, metavar='LR',
                   help='peak learning rate for a total batch of 512 (scaled linearly unless --unscale-lr)')
    g.add_argument('--lr-noise', type=float, nargs='+', default=None, metavar='pct, pct',
                   help='learning-rate noise on/off epochs, as fractions of --epochs')
    g.add_argument('--lr-noise-pct', type=float, default=0.67, metavar='PERCENT', help='learning-rate noise limit')
    g.add_argument('--lr-noise-std', type=float, default=1.0, metavar='STDDEV', help='learning-rate noise std-dev')
    g.add_argument('--warmup-lr', type=float, default=1e-6, metavar='LR', help='learning rate of the first warm-up epoch')
    g.add_argument('--min-lr', type=float, default=1e-5, metavar='LR', help='lower bound of cyclic schedules')
    g.add_argument('--decay-epochs', type=float, default=30, metavar='N', help="epochs between decays ('step')")
    g.add_argument('--warmup-epochs', type=int, default=5, metavar='N', help='epochs of linear warm-up')
    g.add_argument('--cooldown-epochs', type=int, default=10, metavar='N',
                   help='timm cooldown epochs at --min-lr; as in DeiT the run still ends after --epochs')
    g.add_argument('--patience-epochs', type=int, default=10, metavar='N',
                   help="patience of timm's plateau schedule (accepted for DeiT compatibility; plateau is not offered)")
    g.add_argument('--decay-milestones', type=int, nargs='+', default=[90, 180, 270], metavar='EPOCH',
                   help="epochs (numbered from 0, as in the logs) from which 'multistep' multiplies the lr by "
                        "--decay-rate (--decay-epochs is the period of 'step')")
    g.add_argument('--decay-rate', '--dr', type=float, default=0.1, metavar='RATE', help="decay rate ('step', 'multistep')")

    g = p.add_argument_group('augmentation')
    g.add_argument('--color-jitter', type=float, default=0.3, metavar='PCT',
                   help='color jitter factor (timm skips it when --aa is set)')
    g.add_argument('--aa', type=str, default='rand-m9-mstd0.5-inc1', metavar='NAME',
                   help="timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1 ('none' for none)")
    g.add_argument('--smoothing', type=float, default=0.1, help='label smoothing')
    g.add_argument('--train-interpolation', type=str, default='bicubic',
                   help='training resize interpolation (random, bilinear, bicubic)')
    g.add_argument('--repeated-aug', action='store_true', help='repeated augmentation (3 copies of each image)')
    g.add_argument('--no-repeated-aug', action='store_false', dest='repeated_aug', help='no repeated augmentation')
    p.set_defaults(repeated_aug=True)
    g.add_argument('--train-mode', action='store_true', help='model.train() during training (the default)')
    g.add_argument('--no-train-mode', action='store_false', dest='train_mode',
                   help='keep the model in eval mode while training (DeiT III fine-tuning)')
    p.set_defaults(train_mode=True)
    g.add_argument('--ThreeAugment', action='store_true', help="DeiT III's 3-Augment instead of RandAugment")
    g.add_argument('--src', action='store_true', help='simple random crop (with --ThreeAugment)')
    g.add_argument('--scale', type=float, nargs=2, default=(0.08, 1.0), metavar=('MIN', 'MAX'),
                   help='area range of the random-resized crop')
    g.add_argument('--ratio', type=float, nargs=2, default=(3 / 4, 4 / 3), metavar=('MIN', 'MAX'),
                   help='aspect-ratio range of the random-resized crop')
    g.add_argument('--hflip', type=float, default=0.5, help='horizontal flip probability')
    g.add_argument('--vflip', type=float, default=0.0, help='vertical flip probability')
    g.add_argument('--mean', type=float, nargs=3, default=IMAGENET_DEFAULT_MEAN, metavar='M', help='normalisation mean')
    g.add_argument('--std', type=float, nargs=3, default=IMAGENET_DEFAULT_STD, metavar='S', help='normalisation std')

    g = p.add_argument_group('random erasing')
    g.add_argument('--reprob', type=float, default=0.25, metavar='PCT', help='random erase probability')
    g.add_argument('--remode', type=str, default='pixel', help="random erase mode ('pixel', 'rand', 'const')")
    g.add_argument('--recount', type=int, default=1, help='random erase count')
    g.add_argument('--resplit', action='store_true',
                   help='accepted for DeiT compatibility; no effect (there are no augmentation splits, as in DeiT)')

    g = p.add_argument_group('mixup / cutmix')
    g.add_argument('--mixup', type=float, default=0.8, help='mixup alpha, active if > 0')
    g.add_argument('--cutmix', type=float, default=1.0, help='cutmix alpha, active if > 0')
    g.add_argument('--cutmix-minmax', type=float, nargs='+', default=None,
                   help='cutmix min/max area ratio (overrides alpha)')
    g.add_argument('--mixup-prob', type=float, default=1.0, help='probability of mixup or cutmix per batch')
    g.add_argument('--mixup-switch-prob', type=float, default=0.5, help='probability of cutmix instead of mixup')
    g.add_argument('--mixup-mode', type=str, default='batch', choices=['batch', 'pair', 'elem'],
                   help='how mixup parameters are drawn: per batch, pair or element')

    g = p.add_argument_group('distillation')
    g.add_argument('--teacher-model', default='regnety_160', type=str, metavar='MODEL', help='timm teacher model')
    g.add_argument('--teacher-path', type=str, default='', help='teacher weights (a local file; nothing is downloaded)')
    g.add_argument('--distillation-type', default='none', choices=['none', 'soft', 'hard'], help='distillation type')
    g.add_argument('--distillation-alpha', default=0.5, type=float, help='weight of the distillation loss')
    g.add_argument('--distillation-tau', default=1.0, type=float, help='temperature of soft distillation')

    g = p.add_argument_group('fine-tuning')
    g.add_argument('--finetune', default='', help='start from these weights: new head if the class count differs, '
                   'position embedding resampled to --input-size (this project\'s or released BViT files)')
    g.add_argument('--attn-only', action='store_true',
                   help='train only the attention layers (plus head, position embedding, patch embedding)')

    g = p.add_argument_group('data')
    g.add_argument('--data-path', default=None, type=str,
                   help='data set root (DIGITS and FAKE need none; FASHION_MNIST: a folder with its four IDX files, '
                        'gzip or not, default /usr/share/datasets/fashion-mnist)')
    g.add_argument('--data-set', default='IMNET', type=str, metavar='NAME', help=f'one of {", ".join(DATASETS)} '
                   '(CIFAR = CIFAR100, as in DeiT; INAT = iNaturalist 2018, INAT19 = 2019)')
    g.add_argument('--inat-category', default='name', choices=list(INAT_CATEGORIES), help='iNaturalist label level')
    g.add_argument('--download', action='store_true', help='download CIFAR10/CIFAR100/FASHION_MNIST into --data-path if missing')
    g.add_argument('--fake-size', default=12800, type=int, metavar='N', help='--data-set FAKE: training images')
    g.add_argument('--fake-val-size', default=1000, type=int, metavar='N', help='--data-set FAKE: validation images')
    g.add_argument('--fake-classes', default=1000, type=int, metavar='N', help='--data-set FAKE: classes')
    g.add_argument('--fake-signal', default=0.5, type=float, metavar='A',
                   help='--data-set FAKE: weight of the fixed pattern of its class added to each image, so that '
                        'the loss can fall (0: pure random images and labels)')
    g.add_argument('--train-subset', default=None, type=int, metavar='N',
                   help='train on a fixed random subset of N training images (quick runs and tests)')
    g.add_argument('--val-subset', default=None, type=int, metavar='N',
                   help='evaluate on a fixed random subset of N validation images')
    g.add_argument('--pipeline', default='fast', choices=pipeline.PIPELINES, help="training input: 'deit' "
                   "(timm's transform, all in the workers) or 'fast' (part on the device: docs/training.md)")
    g.add_argument('--num_workers', default=10, type=int, help='data loader worker processes per process')
    g.add_argument('--max-bad-images', default=100, type=int, metavar='N',
                   help='unreadable images (missing, truncated, not images) are skipped with a warning naming the '
                        'file and split, and counted in the epoch summary and log.txt; more than N distinct ones '
                        'stop the run (exit 2)')
    g.add_argument('--pin-mem', action='store_true', help='pin CPU memory in the data loader (GPU runs)')
    g.add_argument('--no-pin-mem', action='store_false', dest='pin_mem', help='do not pin memory')
    p.set_defaults(pin_mem=True)

    g = p.add_argument_group('run')
    g.add_argument('--output_dir', default='', help='folder for checkpoint.pth, best.pth and log.txt (empty: save nothing)')
    g.add_argument('--device', default='auto',
                   help="'auto' (CUDA if available, else CPU), 'cpu', 'cuda' or 'cuda:N' (one process; under a "
                        "launcher each process takes cuda:LOCAL_RANK and cuda:N is refused)")
    g.add_argument('--amp', action='store_true', default=None,
                   help='mixed precision (autocast, --amp-dtype): the default on CUDA; on the CPU only when given')
    g.add_argument('--no-amp', action='store_false', dest='amp', help='float32 on CUDA too')
    g.add_argument('--amp-dtype', default='fp16', choices=['fp16', 'bf16'],
                   help='autocast dtype (CUDA and CPU); fp16 uses a gradient scaler')
    g.add_argument('--threads', default=0, type=int, metavar='N',
                   help="CPU threads per process for torch (0: torch's default; torchrun sets 1)")
    g.add_argument('--seed', default=0, type=int,
                   help='random seed: the model is initialised alike on every rank; the data order and '
                        'augmentation of each epoch depend on (seed, epoch, rank)')
    g.add_argument('--no-tf32', action='store_false', dest='tf32',
                   help="on CUDA, keep float32 matmuls and convolutions in full float32 (by default they use "
                        "TF32, and cuDNN benchmark is on, as in timm's train.py)")
    g.add_argument('--benchmark-data', default=0, type=int, metavar='N',
                   help='only time the training loader for N images, no model (device steps apart)')
    g.add_argument('--deterministic', action='store_true',
                   help='deterministic kernels, cuDNN benchmark off (slower on GPUs)')
    g.add_argument('--resume', default='', help='continue from this checkpoint.pth, also one written mid-epoch '
                   'on SIGTERM/SIGINT (exit status 3); the learning-rate flags must be the checkpoint\'s '
                   '(with --eval: evaluate these weights; released BViT files accepted)')
    g.add_argument('--start_epoch', default=0, type=int, metavar='N', help='first epoch (set by --resume)')
    g.add_argument('--eval', action='store_true', help='only evaluate (top-1, top-5, loss) and exit')
    g.add_argument('--eval-ema', action='store_true', help="with --eval: evaluate the checkpoint's EMA weights")
    g.add_argument('--eval-crop-ratio', default=0.875, type=float, help='center-crop ratio of evaluation')
    g.add_argument('--eval-freq', default=1, type=int, metavar='N',
                   help='evaluate after every N-th epoch and after each of the last N (default 1: every epoch, '
                        "as DeiT); an epoch without evaluation logs no test_* values and never writes best.pth")
    g.add_argument('--dist-eval', action='store_true',
                   help='split evaluation over the processes (exact: every image counted once)')
    g.add_argument('--print-freq', default=10, type=int,
                   help='progress line every N iterations; with several processes the loss sums and the stop '
                        'flag of SIGTERM/SIGINT are all-reduced on these iterations only')
    g.add_argument('--torchcompile', nargs='?', type=str, default=None, const='inductor', metavar='BACKEND',
                   help="torch.compile the model (not the loss) with this backend after DDP wrapping, as timm's "
                        "train.py; the flag alone: inductor; off by default. The evaluation runs a compiled "
                        'copy too (same parameters); the EMA stays eager')
    g.add_argument('--torchcompile-mode', type=str, default=None, metavar='MODE',
                   help="torch.compile mode with --torchcompile, e.g. 'default', 'reduce-overhead', 'max-autotune'")
    g.add_argument('--log-all-ranks', action='store_true',
                   help='print the per-epoch summary on every process, not only rank 0')

    g = p.add_argument_group('distributed (set by torchrun / torch.distributed.launch)')
    g.add_argument('--world_size', default=1, type=int, help='number of processes (taken from WORLD_SIZE)')
    g.add_argument('--dist_url', default='env://', help='url used to set up distributed training')
    g.add_argument('--local-rank', '--local_rank', dest='local_rank', default=None, type=int,
                   help='local rank (passed by torch.distributed.launch without --use_env)')
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Command line (``sys.argv[1:]`` by default) over ``--config`` YAML over built-in defaults;
    ``args.given``: the flags set on the command line or in ``--config`` (config.py)."""
    return parse_with_config(get_args_parser(), argv)


def _check_flags(args: argparse.Namespace) -> None:
    if args.broad and args.no_broad:
        raise UsageError('--broad and --no-broad exclude each other')
    if args.sched not in SCHEDULES:
        raise UsageError(f'unknown --sched {args.sched!r}; choose one of {", ".join(SCHEDULES)}')
    for flag, value in (('--batch-size', args.batch_size), ('--input-size', args.input_size),
                        ('--print-freq', args.print_freq), ('--eval-freq', args.eval_freq)):
        if value < 1:
            raise UsageError(f'{flag} must be at least 1, got {value}')
    if args.epochs < 0 or args.num_workers < 0 or args.threads < 0 or args.max_bad_images < 0:
        raise UsageError('--epochs, --num_workers, --threads and --max-bad-images must not be negative')
    if not 0 < args.eval_crop_ratio <= 1:
        raise UsageError(f'--eval-crop-ratio must be in (0, 1], got {args.eval_crop_ratio}')
    for flag, value in (('--fake-size', args.fake_size), ('--fake-val-size', args.fake_val_size),
                        ('--fake-classes', args.fake_classes)):
        if value < 1:
            raise UsageError(f'{flag} must be at least 1, got {value}')
    for flag, value in (('--train-subset', args.train_subset), ('--val-subset', args.val_subset)):
        if value is not None and value < 1:
            raise UsageError(f'{flag} must be at least 1, got {value}')
    why = pipeline.unsupported(args) if args.pipeline == 'fast' and not args.eval else None
    if why or args.benchmark_data < 0 or (args.benchmark_data and args.eval):
        raise UsageError(why or '--benchmark-data N (N >= 1) times the training loader, without --eval')
    if args.eval_ema and not args.eval:
        raise UsageError('--eval-ema goes with --eval')
    if args.torchcompile_mode and not args.torchcompile:
        raise UsageError('--torchcompile-mode goes with --torchcompile')
    if args.torchcompile:
        from torch._dynamo import list_backends
        backends = list_backends(exclude_tags=())
        if args.torchcompile not in backends:
            raise UsageError(f'--torchcompile {args.torchcompile}: not a torch.compile backend here; one of '
                             f'{", ".join(backends)}')
    if list(args.decay_milestones) != sorted(set(args.decay_milestones)):
        raise UsageError(f'--decay-milestones must increase, got {" ".join(map(str, args.decay_milestones))}')


# Model --------------------------------------------------------------------------------------------

# constructor arguments that a flag of this script sets, refused in --model-kwargs
_FLAG_KWARGS = {'num_classes': '--data-set', 'img_size': '--input-size', 'patch_size': '--patch-size',
                'stem': '--stem', 'broad': '--no-broad', 'broad_scale': '--broad-scale', 'broad_layers': '--broad-layers',
                'drop_rate': '--drop',
                'drop_path_rate': '--drop-path', 'in_chans': '(3 channels, fixed)', 'pretrained': '--finetune'}


def _check_model_flags(args: argparse.Namespace) -> None:
    """One line for an unknown --arch, a BViT-only flag on another model, or a bad --model-kwargs."""
    try:
        arch = canonical_arch(args.arch)
    except ValueError as e:  # 'unknown model NAME: ...'
        raise UsageError(str(e).replace('unknown model', 'unknown --arch', 1)) from None
    if is_bvit(arch):
        if args.broad:
            log('note: --broad has no effect on a BViT model, which has broad attention already')
    elif args.stem not in (None, 'none'):  # 'none' (plain patchify) is what other timm ViTs do anyway
        raise UsageError('--stem applies to BViT models only (other timm ViTs patchify plainly: --stem none or no --stem)')
    elif args.no_broad:
        raise UsageError('--no-broad applies to BViT models only (other timm models have no broad attention '
                         'unless --broad is given)')
    for item in args.model_kwargs:
        key = str(item).partition('=')[0].strip()
        if key in _FLAG_KWARGS:
            raise UsageError(f'--model-kwargs: {key} is set by {_FLAG_KWARGS[key]}, not here')
    try:
        parse_model_kwargs(args.model_kwargs)
        parse_broad_layers(args.broad_layers)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if args.broad_layers is not None and (args.no_broad or not (is_bvit(arch) or args.broad or arch.startswith('broad_'))):
        raise UsageError('--broad-layers needs broad attention (a BViT without --no-broad, --broad, or a broad_ model)')


def build_model(args: argparse.Namespace, num_classes: int) -> nn.Module:
    """The model of the flags (their record, :func:`bvit.builder.record_from_args`), with
    ``--drop`` and ``--drop-path``."""
    try:
        return create_model(record_from_args({**vars(args), 'nb_classes': num_classes}), drop_rate=args.drop,
                            drop_path_rate=args.drop_path)
    except ValueError as e:
        flag = '--broad' if str(e).startswith('broad attention') else f'--arch {args.arch}'
        raise UsageError(f'{flag}: {e}') from None


def compile_model(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``--torchcompile BACKEND`` (``--torchcompile-mode``): ``torch.compile(model)``, which shares
    ``model``'s parameters; compilation happens at the first call."""
    return torch.compile(model, backend=args.torchcompile, mode=args.torchcompile_mode)


def build_teacher(args: argparse.Namespace, num_classes: int, device: torch.device) -> Optional[nn.Module]:
    if args.distillation_type == 'none':
        return None
    import timm
    if not args.teacher_path:
        raise UsageError('--distillation-type needs --teacher-path (a checkpoint of --teacher-model; '
                         'nothing is downloaded)')
    if not timm.is_model(args.teacher_model):
        raise UsageError(f'unknown --teacher-model {args.teacher_model!r} (not a timm model name)')
    teacher = timm.create_model(args.teacher_model, pretrained=False, num_classes=num_classes)
    try:
        load_checkpoint(teacher, args.teacher_path)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(f'--teacher-path: {e}') from None
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def set_attn_only(model: nn.Module) -> None:
    """``--attn-only``: train the attention layers, the head, the position and patch embeddings."""
    for name, p in model.named_parameters():
        p.requires_grad_('.attn.' in name or name.startswith(('head.', 'pos_embed', 'patch_embed.')))


# Training parts -----------------------------------------------------------------------------------

def _loader(dataset: Any, sampler: Any, batch_size: int, args: argparse.Namespace, device: torch.device,
            drop_last: bool) -> DataLoader:
    return DataLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=args.num_workers,
                      pin_memory=bool(args.pin_mem and device.type == 'cuda'), drop_last=drop_last,
                      collate_fn=collate_skipping_unreadable,
                      worker_init_fn=ignore_stop_signals if args.num_workers else None)


def build_optimizer(args: argparse.Namespace, model: nn.Module) -> Tuple[torch.optim.Optimizer, float]:
    from timm.optim import create_optimizer_v2
    total_batch = args.batch_size * args.world_size
    lr = args.lr if args.unscale_lr else args.lr * total_batch / 512.0
    args.lr_scaled = lr
    opt_kwargs: Dict[str, Any] = dict(eps=args.opt_eps, **({'betas': tuple(args.opt_betas)} if args.opt_betas else {}))
    try:
        return create_optimizer_v2(model, opt=args.opt, lr=lr, weight_decay=args.weight_decay,
                                   momentum=args.momentum, **opt_kwargs), lr
    except ValueError as e:
        raise UsageError(f'--opt {args.opt}: {e}') from None


def build_scheduler(args: argparse.Namespace, optimizer: torch.optim.Optimizer) -> Any:
    """timm's per-epoch scheduler for ``--sched`` (None for 'none')."""
    if args.sched == 'none':
        return None
    from timm.scheduler import create_scheduler_v2
    try:
        scheduler, _ = create_scheduler_v2(
            optimizer, sched=args.sched, num_epochs=args.epochs, decay_epochs=args.decay_epochs,
            # timm's multistep decays one epoch before each milestone (bisect on t + 1); + 1 makes the
            # lr drop at the epochs named, as numbered in the logs, and agree with 'step'
            decay_milestones=[m + 1 for m in args.decay_milestones], cooldown_epochs=args.cooldown_epochs,
            patience_epochs=args.patience_epochs, decay_rate=args.decay_rate, min_lr=args.min_lr,
            warmup_lr=args.warmup_lr, warmup_epochs=args.warmup_epochs, noise=args.lr_noise,
            noise_pct=args.lr_noise_pct, noise_std=args.lr_noise_std, noise_seed=args.seed)
    except ValueError as e:
        raise UsageError(f'--sched {args.sched}: {e}') from None
    return scheduler


def build_mixup(args: argparse.Namespace, nb_classes: int) -> Optional[Callable]:
    if not (args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None):
        return None
    if args.batch_size % 2:
        raise UsageError(f'mixup/cutmix need an even --batch-size, got {args.batch_size}')
    from timm.data import Mixup  # draws from NumPy's global generator (saved with a mid-epoch stop)
    return Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                 prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                 label_smoothing=args.smoothing, num_classes=nb_classes)


@dataclass
class Training:
    """What the epoch loop trains, evaluates and saves (built by :func:`main`)."""

    model: nn.Module  # the one trained: DDP-wrapped and / or compiled
    model_without_ddp: nn.Module  # the one saved
    eval_model: nn.Module  # the one evaluated: a compiled copy with --torchcompile (same parameters)
    model_ema: Any  # timm's ModelEmaV3, or None
    optimizer: torch.optim.Optimizer
    scheduler: Any  # timm's per-epoch scheduler, or None (--sched none)
    scaler: Optional[NativeScaler]  # timm's, with fp16 autocast; None otherwise
    criterion: nn.Module
    mixup_fn: Optional[Callable]
    amp_dtype: Optional[torch.dtype]
    sampler_train: RepeatAugSampler
    loader_train: DataLoader
    to_device: Optional[Callable[[Any], torch.Tensor]]  # the pipeline's device steps (None: .to(device))
    evaluator: Evaluator

    def checkpoint(self, epoch: int, max_accuracy: float, args: argparse.Namespace,
                   position: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """:func:`utils.make_checkpoint` of these objects (``epoch``: the last finished one)."""
        return make_checkpoint(self.model_without_ddp, self.optimizer, self.scheduler, self.scaler, self.model_ema,
                               epoch, max_accuracy, args, position=position)


# Main ---------------------------------------------------------------------------------------------

def main(args: argparse.Namespace) -> Dict[str, Any]:
    """Run the training (or, with ``--eval``, the evaluation); returns the last metrics. The
    distributed teardown is :func:`cli`'s."""
    _check_flags(args)
    args.data_set = canonical_data_set(args.data_set)
    resume_obj = read_resume(args.resume) if args.resume else None
    if resume_obj is not None:  # the checkpoint's model, for the flags not given
        adopt_record(resume_obj, args, args.resume, getattr(args, 'given', ()))
    _check_model_flags(args)  # unknown names fail before anything else is loaded
    device = init_distributed(args, resolve_device(args.device))
    args.device_resolved = str(device)
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_determinism(args.deterministic)
    if device.type == 'cuda':
        setup_tf32(args.tf32)
    # the same seed on every rank: identical initial weights, so the EMA copy taken before DDP
    # broadcasts rank 0's weights is identical too (with seed + rank, as in DeiT, it is not)
    random_seed(args.seed)
    amp_dtype, args.precision = precision(args, device)
    log(environment_info(args))

    dataset_train, dataset_val, nb_classes = build_datasets(args, need_train=not args.eval)
    args.nb_classes = nb_classes
    if dataset_train is not None:
        sampler_train = RepeatAugSampler(dataset_train, args.world_size, args.rank, shuffle=True, seed=args.seed,
                                         num_repeats=3 if args.repeated_aug else 1)
        if len(sampler_train) < args.batch_size:
            raise UsageError(f'{len(sampler_train)} training images per process, fewer than one batch of '
                             f'{args.batch_size}; lower --batch-size')
        loader_train = _loader(dataset_train, sampler_train, args.batch_size, args, device, drop_last=True)
        to_device = pipeline.device_augment(args, device) if args.pipeline == 'fast' else None
        if args.benchmark_data:
            return pipeline.benchmark_loader(loader_train, sampler_train, args.benchmark_data, to_device, device, args)
    reduce_eval = bool(args.dist_eval and args.world_size > 1)
    sampler_val = (ShardSampler(dataset_val, args.world_size, args.rank) if reduce_eval
                   else torch.utils.data.SequentialSampler(dataset_val))
    loader_val = _loader(dataset_val, sampler_val, int(1.5 * args.batch_size), args, device, drop_last=False)

    model = build_model(args, nb_classes)
    if args.finetune:
        try:
            fresh = load_checkpoint(model, args.finetune, new_head=True)
        except (FileNotFoundError, ValueError) as e:
            raise UsageError(f'--finetune {e}') from None
        log(f'fine-tuning from {args.finetune}' + (f' (new {", ".join(fresh)})' if fresh else ''))
    if args.attn_only:
        set_attn_only(model)
    args.n_parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f'model {args.arch}: {args.n_parameters:,} trainable parameters, {nb_classes} classes, input '
        f'{args.input_size}; data {args.data_set}: {len(dataset_train) if dataset_train is not None else "-"} train / '
        f'{len(dataset_val)} val images; {args.world_size} process(es), precision {args.precision}' +
        (f'; torch.compile backend {args.torchcompile}' + (f' mode {args.torchcompile_mode}' if args.torchcompile_mode
                                                            else '') if args.torchcompile else ''))
    evaluator = Evaluator(loader_val, device, autocast_context(device, amp_dtype), reduce_eval,
                          print_freq=args.print_freq * 5, log_all_ranks=args.log_all_ranks,
                          max_bad_images=args.max_bad_images)
    if args.eval:
        if resume_obj is not None:
            try:
                load_checkpoint(model, resume_obj, use_ema=args.eval_ema)
            except ValueError as e:
                raise UsageError(f'{args.resume}: {e}') from None
        model.to(device)
        return evaluator(compile_model(model, args) if args.torchcompile else model)

    assert dataset_train is not None
    model.to(device)
    model_without_ddp = model
    model_ema = None
    if args.model_ema:
        from timm.utils import ModelEmaV3
        model_ema = ModelEmaV3(model, decay=args.model_ema_decay,
                               device=torch.device('cpu') if args.model_ema_force_cpu else None)
    if args.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == 'cuda' else None)
    if args.torchcompile:
        # after DDP, as PyTorch documents for DDP (its DDPOptimizer splits the graph at the gradient
        # buckets, so the all-reduce overlaps the backward) and as timm's train.py does
        model = compile_model(model, args)
    optimizer, lr = build_optimizer(args, model_without_ddp)
    scheduler = build_scheduler(args, optimizer)
    scaler = NativeScaler(device.type) if amp_dtype == torch.float16 else None  # a torch.amp.GradScaler's steps
    mixup_fn = build_mixup(args, nb_classes)
    criterion = DistillationLoss(build_base_criterion(mixup_fn is not None, args.smoothing, args.bce_loss),
                                 build_teacher(args, nb_classes, device), args.distillation_type,
                                 args.distillation_alpha, args.distillation_tau)

    start_epoch, max_accuracy, position = args.start_epoch, 0.0, None
    if resume_obj is not None:
        check_resume_schedule(resume_obj, args, args.resume)
        position = resume_position(resume_obj, args, args.resume)
        start_epoch, max_accuracy = restore_training_state(
            resume_obj, args.resume, model_without_ddp, optimizer, scheduler, scaler, model_ema)
        where = f', iteration {position["batches_done"] + 1}' if position else ''
        log(f'resumed from {args.resume}: continuing at epoch {start_epoch}{where}')

    prepare_output_dir(args.output_dir, args.resume)

    log(f'training epochs {start_epoch}..{args.epochs - 1}, lr {lr:.3g} (total batch {args.batch_size * args.world_size})')
    t = Training(model=model, model_without_ddp=model_without_ddp,
                 eval_model=compile_model(model_without_ddp, args) if args.torchcompile else model_without_ddp,
                 model_ema=model_ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler, criterion=criterion,
                 mixup_fn=mixup_fn, amp_dtype=amp_dtype, sampler_train=sampler_train, loader_train=loader_train,
                 to_device=to_device, evaluator=evaluator)
    stop = StopSignal().install()
    try:
        return train_epochs(args, device, t, start_epoch, max_accuracy, position, stop)
    finally:
        stop.restore()


# The epoch loop -----------------------------------------------------------------------------------

def train_epochs(args: argparse.Namespace, device: torch.device, t: Training, start_epoch: int,
                 max_accuracy: float, position: Optional[Dict[str, Any]], stop: StopSignal) -> Dict[str, Any]:
    """The epoch loop, from ``start_epoch`` (``position``: where in it a mid-epoch checkpoint
    stopped); returns the last evaluation's metrics."""
    output_dir = args.output_dir
    start_time = time.time()
    test_stats: Dict[str, Any] = {}
    bad_images = t.evaluator.bad_images  # one count of unreadable files per process, train and val
    for epoch in range(start_epoch, args.epochs):
        epoch_start = time.time()
        random_seed(epoch_seed(args.seed, epoch, args.rank))
        resume = None
        if position is not None and position['epoch'] == epoch:
            resume = position['ranks'][args.rank]
        t.sampler_train.set_epoch(epoch, start=resume['batches_done'] * args.batch_size if resume else 0)
        if t.scheduler is not None:
            t.scheduler.step(epoch)  # this epoch's value, before its first step (DeiT applies it an epoch late)
        train_stats = train_one_epoch(
            t.model, t.criterion, t.loader_train, t.optimizer, device, epoch, scaler=t.scaler,
            autocast=autocast_context(device, t.amp_dtype), clip_grad=args.clip_grad, model_ema=t.model_ema,
            mixup_fn=t.mixup_fn, set_training_mode=args.train_mode, print_freq=args.print_freq,
            num_epochs=args.epochs, stop=stop, resume=resume, bad_images=bad_images, to_device=t.to_device)
        if train_stats['stopped'] is not None:
            save_and_stop(args, stop, epoch, train_stats['stopped'],
                          lambda position: t.checkpoint(epoch - 1, max_accuracy, args, position=position))
        epoch_stats: Dict[str, Any] = {}
        ema_stats = None
        is_best = False
        if eval_due(epoch, args.epochs, args.eval_freq):
            test_stats = epoch_stats = t.evaluator(t.eval_model)
            if t.model_ema is not None and not (args.model_ema_force_cpu and device.type == 'cuda'):
                ema_stats = t.evaluator(t.model_ema.module, ema=True)
            is_best = test_stats['acc1'] > max_accuracy or not os.path.exists(os.path.join(output_dir, 'best.pth'))
            max_accuracy = max(max_accuracy, test_stats['acc1'])
            log(f'Max accuracy: {max_accuracy:.2f}%')
        if output_dir and is_main_process():
            ckpt = t.checkpoint(epoch, max_accuracy, args)
            save_checkpoint(ckpt, os.path.join(output_dir, 'checkpoint.pth'))
            if is_best:
                save_checkpoint(ckpt, os.path.join(output_dir, 'best.pth'))
        _append_epoch_log(args, epoch, train_stats, epoch_stats, ema_stats, max_accuracy,
                          time.time() - epoch_start)
        if all_reduce_sum([float(stop.requested)], device)[0] > 0 and epoch + 1 < args.epochs:
            stop_run(args.output_dir, stop, f'after epoch {epoch}', 'checkpoint.pth of that epoch')
    if test_stats:
        log(f'Training time {format_seconds(time.time() - start_time)}; final top-1 {test_stats["acc1"]:.2f}%, '
            f'best top-1 {max_accuracy:.2f}%')
    else:
        log(f'nothing to train: the run is at epoch {start_epoch} of {args.epochs}')
    return test_stats


def eval_due(epoch: int, epochs: int, freq: int) -> bool:
    """--eval-freq: evaluate after epoch ``epoch`` (0-based) of ``epochs`` when it ends a block of
    ``freq`` epochs or is one of the last ``freq`` (so the final epoch is always evaluated)."""
    return (epoch + 1) % freq == 0 or epoch >= epochs - freq


def _append_epoch_log(args: argparse.Namespace, epoch: int, train_stats: Dict[str, Any], test_stats: Dict[str, Any],
                      ema_stats: Optional[Dict[str, Any]], max_accuracy: float, seconds: float) -> None:
    record: Dict[str, Any] = {**{f'train_{k}': v for k, v in train_stats.items() if k != 'stopped'},
                              **{f'test_{k}': v for k, v in test_stats.items()}}
    if ema_stats is not None:
        record.update({f'test_ema_{k}': v for k, v in ema_stats.items()})
    record.update(epoch=epoch, n_parameters=args.n_parameters, max_accuracy=max_accuracy,
                  epoch_time_s=round(seconds, 2))  # training + evaluation + saving
    append_log_line(args.output_dir, record)


# Entry point: exit status and error lines ---------------------------------------------------------

def cli(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: exit status 0, 2 for expected problems (one ``error:`` line on stderr), 1 for
    a non-finite loss, 3 when SIGTERM / SIGINT stopped the training (resumable checkpoint)."""
    try:
        args = parse_args(argv)
        main(args)
    except UsageError as e:
        return _failed(2, str(e))
    except NonFiniteLossError as e:
        return _failed(1, str(e))
    except RunStopped:
        cleanup_distributed()  # every rank stops here together (rank 0's save is behind a barrier)
        return STOP_EXIT_STATUS
    except BaseException as e:  # a bug, or (on a peer of a failed rank) a broken collective
        if not is_dist():
            raise
        traceback.print_exc()
        return _failed(130 if isinstance(e, KeyboardInterrupt) else 1,
                       f'{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ""} '
                       '(traceback above; a broken collective means another process ended first: see its line)')
    cleanup_distributed()  # the normal end; an error leaves without a collective teardown (peers may wait for it)
    return 0


def _failed(status: int, message: str) -> int:
    """Print the ``error:`` line at once; in a distributed run then end this process without a
    collective teardown (:func:`utils.exit_without_teardown`), else return ``status``."""
    _print_error(message)
    if is_dist():
        exit_without_teardown(status)
    return status


def _print_error(message: str) -> None:
    rank = str(get_rank()) if is_dist() else os.environ.get('RANK', '0')
    tag = 'error' if rank in ('', '0') else f'error [rank {rank}]'
    message = ' '.join(message.split())  # one line
    write_line(sys.stderr, f'{tag}: {message}')


if __name__ == '__main__':
    sys.exit(cli())
