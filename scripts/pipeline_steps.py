"""CPU time of each step of the two training input pipelines, per image, in one process.

    python scripts/pipeline_steps.py FOLDER [--images 300] [--size 224] [--rounds 3]

FOLDER: an ImageFolder (``FOLDER/train/<class>/*.jpg``, e.g. from scripts/photo_folder.py). One
torch thread; each step timed with ``time.process_time`` on the images in turn, medians over
``--rounds`` rounds. ``deit``: each transform of timm's ``create_transform`` (the ImageNet
recipe's flags) timed by itself, after PIL's decoding. ``fast``: reading the file, torchvision's
decoding, then the rest of ``pipeline.WorkerTransform`` (crop, resize, flip and RandAugment's
draw; the draw alone also timed), and the device steps run on the CPU on batches of 64, per image.
"""
from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from typing import Callable, Dict, List

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _ms(fn: Callable[[], None], count: int) -> float:
    t0 = time.process_time()
    fn()
    return 1e3 * (time.process_time() - t0) / count


def measure(folder: str, images: int, size: int) -> Dict[str, Dict[str, float]]:
    """{pipeline: {step: ms an image}} for one round over the first ``images`` files of ``folder``."""
    from PIL import Image

    import datasets
    import pipeline
    import train_hp
    files = sorted(glob.glob(os.path.join(folder, 'train', '*', '*')))[:images]
    n = len(files)
    out: Dict[str, Dict[str, float]] = {'deit': {}, 'fast': {}}
    flags = ['--config', os.path.join(ROOT, 'configs', 'bvit_5m_imagenet.yaml'), '--data-set', 'FAKE', '--input-size', str(size)]

    deit = datasets.build_transform(True, train_hp.parse_args(flags + ['--pipeline', 'deit']))
    decoded: List[Image.Image] = []
    out['deit']['decode (PIL)'] = _ms(lambda: decoded.extend(datasets._read_rgb(f) for f in files), n)
    stage: List[object] = list(decoded)
    for t in deit.transforms:
        done: List[object] = []
        out['deit'][type(t).__name__] = _ms(lambda: done.extend(t(x) for x in stage), n)
        stage = done

    args = train_hp.parse_args(flags + ['--pipeline', 'fast'])
    worker = pipeline.worker_transform(args)
    raw: List[torch.Tensor] = []
    out['fast']['read bytes'] = _ms(lambda: raw.extend(pipeline.read_bytes(f) for f in files), n)
    out['fast']['decode (torchvision)'] = _ms(lambda: [pipeline.decode(b) for b in raw], n)
    samples: List[object] = []
    whole = _ms(lambda: samples.extend(worker(b) for b in raw), n)
    draw = _ms(lambda: [worker.ra(pipeline._Recorded()) for _ in range(n)], n)
    out['fast']['crop, resize, flip'] = whole - out['fast']['decode (torchvision)'] - draw
    out['fast']['RandAugment draw'] = draw
    device = pipeline.device_augment(args, torch.device('cpu'))
    batches = [samples[i:i + 64] for i in range(0, n, 64)]
    out['fast']['device steps (on the CPU)'] = _ms(lambda: [device([torch.stack([s[0] for s in b]), torch.stack([s[1] for s in b])])
                                                            for b in batches], n)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('folder')
    p.add_argument('--images', type=int, default=300)
    p.add_argument('--size', type=int, default=224)
    p.add_argument('--rounds', type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rounds = [measure(args.folder, args.images, args.size) for _ in range(args.rounds)]
    print(f'# ms of CPU time an image, median [min-max] of {args.rounds} rounds, {args.images} images, '
          f'{args.size} px, 1 thread, torch {torch.__version__}')
    for which in ('deit', 'fast'):
        total = [sum(v for k, v in r[which].items() if k != 'device steps (on the CPU)') for r in rounds]
        for step in rounds[0][which]:
            v = [r[which][step] for r in rounds]
            print(f'{which:5s} {step:34s} {statistics.median(v):6.3f} [{min(v):.3f}-{max(v):.3f}]')
        print(f'{which:5s} {"in the workers, total":34s} {statistics.median(total):6.3f} [{min(total):.3f}-{max(total):.3f}]')
    return 0


if __name__ == '__main__':
    sys.exit(main())
