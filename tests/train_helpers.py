"""What the training test files (test_train.py, test_train_engine.py, test_train_launch.py) share:
the tiny run's flags (TINY), DeiT's evaluation line (SUMMARY), train_hp run in-process or as a
process, log.txt read back, the cosine schedule written out, a tiny model and its loader."""
from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

import train_hp

REPO = Path(__file__).resolve().parents[1]

# A BViT-5M on 16x16 digits (conv stem -> 8x8 -> 2x2 grid of 4x4 patches), 4 steps per epoch,
# 61 validation images (odd on purpose). Mixup, cutmix, repeated augmentation and EMA stay on.
TINY = ['--data-set', 'DIGITS', '--input-size', '16', '--stem', 'conv', '--patch-size', '4',
        '--batch-size', '32', '--train-subset', '128', '--val-subset', '61', '--num_workers', '0',
        '--threads', '1', '--print-freq', '1000', '--unscale-lr', '--aa', 'none', '--reprob', '0',
        '--hflip', '0', '--warmup-epochs', '1', '--model-ema-decay', '0.9']

# DeiT's evaluation line, with the rank tag of --log-all-ranks and this script's EMA line
SUMMARY = re.compile(r'^(?:\[rank (\d+)\] )?\* (EMA )?Acc@1 ([\d.]+) Acc@5 ([\d.]+) loss ([\d.]+)  \(\d+ images\)$', re.M)


def run_cli(argv: List[str], capsys) -> Tuple[int, str, str]:
    capsys.readouterr()
    rc = train_hp.cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def read_log(path: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def clean_env() -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'LOCAL_WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')}
    env['OMP_NUM_THREADS'] = '1'
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    return env


def run_process(cmd: List[str]) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], cwd=REPO, env=clean_env(), capture_output=True, text=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def cosine_lr(epoch: int, lr: float, warmup_lr: float, warmup: int, min_lr: float, epochs: int) -> float:
    """The schedule, written out: linear warm-up from warmup_lr, then cosine from lr to min_lr."""
    if epoch < warmup:
        return warmup_lr + epoch * (lr - warmup_lr) / warmup
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Dropout(0.1), nn.Linear(16, 3))

    def forward(self, x):
        return self.net(x)


def _loader(n: int, batch: int = 4):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 3, 2, 2, generator=g), torch.randint(0, 3, (n,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=batch)
