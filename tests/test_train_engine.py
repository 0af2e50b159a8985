"""Tests of engine.py and losses.py: the training loop and evaluation, the losses, mixed precision
on the CPU, compiled training (tiny models and tiny DIGITS runs on CPU)."""
from __future__ import annotations

import math
import sys
from typing import List

import pytest
from train_helpers import TINY, _loader, _Tiny, read_log, run_cli, run_process
import torch
import torch.nn.functional as F
from torch import nn

import train_hp
import engine
from engine import evaluate, train_one_epoch
from losses import DistillationLoss, build_base_criterion
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import NativeScaler


pytestmark = pytest.mark.usefixtures('one_torch_thread')  # see conftest.py


# Engine and losses ---------------------------------------------------------------------------------

def test_model_is_in_training_mode_inside_the_training_loop():
    model = _Tiny()
    modes: List[bool] = []
    model.register_forward_pre_hook(lambda m, i: modes.append(m.training))
    model.eval()  # e.g. left so by an evaluation
    criterion = DistillationLoss(nn.CrossEntropyLoss(), None)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(model, criterion, _loader(16), opt, torch.device('cpu'), 0, print_freq=2)
    assert modes == [True] * 4 and stats['lr'] == 0.1 and math.isfinite(stats['loss'])
    modes.clear()
    evaluate(_loader(10), model, torch.device('cpu'))
    assert modes == [False] * 3 and model.training  # evaluation puts the mode back


def test_timm_helpers_in_place_of_own_copies_give_the_same_numbers():
    import random
    import numpy as np
    from timm.utils import unwrap_model
    import datasets
    train_hp.random_seed(7)  # timm's, as the script seeds
    draws = (random.random(), float(np.random.rand()), torch.rand(1).item())
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    assert draws == (random.random(), float(np.random.rand()), torch.rand(1).item())
    model = _Tiny()
    assert unwrap_model(torch.compile(model)) is model  # engine's EMA update reads the plain module
    # the evaluation transform (timm's create_transform): DeiT's resize to int(size / ratio), bicubic, center crop
    from PIL import Image
    from torchvision import transforms
    img = Image.fromarray(np.random.RandomState(0).randint(0, 255, (40, 50, 3), dtype=np.uint8))
    for size, ratio in ((16, 0.875), (20, 0.875), (24, 1.0)):
        args = train_hp.parse_args(['--input-size', str(size), '--eval-crop-ratio', str(ratio)])
        ref = transforms.Compose([transforms.Resize(int(size / ratio), interpolation=transforms.InterpolationMode.BICUBIC),
                                  transforms.CenterCrop(size), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
        assert torch.equal(datasets.build_transform(False, args)(img), ref(img)), (size, ratio)


def test_evaluate_counts_each_image_once():
    model = _Tiny().eval()
    loader = _loader(11, batch=4)
    stats = evaluate(loader, model, torch.device('cpu'))
    x = torch.cat([b[0] for b in loader])
    y = torch.cat([b[1] for b in loader])
    with torch.no_grad():
        logits = model(x)
    assert stats['images'] == 11
    assert stats['acc1'] == pytest.approx(100 * (logits.argmax(1) == y).float().mean().item())
    assert stats['acc5'] == 100.0  # 3 classes: top-5 is top-3
    assert stats['loss'] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-6)


def test_losses():
    torch.manual_seed(0)
    logits, target = torch.randn(6, 5), torch.randint(0, 5, (6,))
    assert LabelSmoothingCrossEntropy(0.1)(logits, target) == pytest.approx(
        F.cross_entropy(logits, target, label_smoothing=0.1).item(), rel=1e-6)
    assert SoftTargetCrossEntropy()(logits, F.one_hot(target, 5).float()) == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    assert isinstance(build_base_criterion(True, 0.1, False), SoftTargetCrossEntropy)
    assert isinstance(build_base_criterion(False, 0.1, False), LabelSmoothingCrossEntropy)
    # --bce-loss, timm's BinaryCrossEntropy: integer targets one-hot, positive mixed targets 1 (DeiT III)
    bce = build_base_criterion(True, 0.1, True)
    assert isinstance(bce, BinaryCrossEntropy)
    one_hot = F.one_hot(target, 5).float()
    assert bce(logits, target).item() == pytest.approx(F.binary_cross_entropy_with_logits(logits, one_hot).item(),
                                                       rel=1e-6)
    mixed = 0.7 * one_hot + 0.3 * one_hot.roll(1, 0)
    assert bce(logits, mixed).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(logits, mixed.gt(0).float()).item(), rel=1e-6)
    assert build_base_criterion(False, 0.0, False)(logits, target).item() == pytest.approx(
        F.cross_entropy(logits, target).item(), rel=1e-6)
    teacher = nn.Linear(4, 5)
    x = torch.randn(6, 4)
    student = teacher(x).detach()
    hard = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'hard', alpha=1.0)(x, student, target)
    assert hard == pytest.approx(F.cross_entropy(student, student.argmax(1)).item(), rel=1e-6)
    soft = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=1.0, tau=2.0)(x, student, target)
    assert soft.item() == pytest.approx(0.0, abs=1e-6)  # a student equal to its teacher
    both = DistillationLoss(nn.CrossEntropyLoss(), teacher, 'soft', alpha=0.5)(x, (student, student + 1.0), target)
    assert both.item() == pytest.approx(0.5 * F.cross_entropy(student, target).item(), rel=1e-5)


def test_distillation_from_a_timm_teacher_file(tmp_path, capsys):
    import timm
    teacher = timm.create_model('resnet10t', num_classes=10)
    path = tmp_path / 'teacher.pth'
    torch.save({'model': teacher.state_dict()}, path)
    rc, _, err = run_cli(TINY + ['--epochs', '1', '--train-subset', '64', '--distillation-type', 'hard',
                                 '--teacher-model', 'resnet10t', '--teacher-path', path], capsys)
    assert rc == 0, err
    rc, _, err = run_cli(TINY + ['--distillation-type', 'soft', '--teacher-model', 'resnet10t'], capsys)
    assert rc == 2 and '--teacher-path' in err


# Mixed precision on the CPU -----------------------------------------------------------------------

# Tolerances, relative to float32 (||amp - fp32|| / ||fp32||, per output and per parameter
# gradient), about 3x what was measured on these models: bfloat16 keeps 8 significant bits
# (measured: outputs 0.9%, gradients 2.0%), float16 11 bits (0.13%, 0.2%).
AMP_TOLERANCE = {torch.bfloat16: {'out': 0.03, 'grad': 0.06}, torch.float16: {'out': 0.005, 'grad': 0.01}}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _amp_models():
    import timm
    import bvit.models  # noqa: F401
    from bvit.broad import add_broad_attention
    torch.manual_seed(0)
    # BViT (its own blocks; in train mode model(x) computes only the class token's broad row) and
    # a timm ViT converted by add_broad_attention: both run their broad attention under autocast
    yield 'bvit', timm.create_model('bvit_5m', num_classes=10, img_size=16, patch_size=4, stem='conv'), 16
    yield 'vit+broad', add_broad_attention(timm.create_model(
        'vit_tiny_patch16_224', depth=2, img_size=32, patch_size=8, num_classes=10), scale=0.4), 32


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16], ids=['bf16', 'fp16'])
def test_cpu_autocast_training_and_evaluation_steps_are_close_to_float32(dtype):
    from engine import autocast_context
    tol = AMP_TOLERANCE[dtype]
    cpu = torch.device('cpu')
    for name, model, size in _amp_models():
        g = torch.Generator().manual_seed(1)
        data = torch.utils.data.TensorDataset(torch.randn(8, 3, size, size, generator=g),
                                              torch.randint(0, 10, (8,), generator=g))
        loader = torch.utils.data.DataLoader(data, batch_size=8)
        x, y = data.tensors
        model.train()
        ref_out = model(x)
        F.cross_entropy(ref_out, y).backward()
        ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        with torch.no_grad():
            with autocast_context(cpu, dtype)():
                out = model(x)
        assert out.dtype == dtype and _rel(out, ref_out) < tol['out'], name
        # one training step (plain SGD, lr 1: the weight change is the gradient), scaled with fp16
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = torch.optim.SGD(model.parameters(), lr=1.0)
        # (init_scale 2^10: at the default 2^16 these float16 gradients overflow and the scaler,
        # rightly, skips the step and halves the scale; a step must happen here)
        scaler = NativeScaler('cpu') if dtype == torch.float16 else None
        if scaler is not None:
            scaler.load_state_dict({**scaler.state_dict(), 'scale': 2.0 ** 10})
        train_one_epoch(model, DistillationLoss(nn.CrossEntropyLoss(), None), loader, opt, cpu, 0, scaler=scaler,
                        autocast=autocast_context(cpu, dtype), print_freq=1000)
        if scaler is not None:
            assert scaler.state_dict()['scale'] == 1024.0  # no overflow: the step was taken
        for n, p in model.named_parameters():
            assert _rel(before[n] - p.detach(), ref_grads[n]) < tol['grad'], (name, n)
        ref_eval = evaluate(loader, model, cpu)
        amp_eval = evaluate(loader, model, cpu, autocast_context(cpu, dtype))
        assert amp_eval['images'] == 8 and amp_eval['loss'] == pytest.approx(ref_eval['loss'], rel=tol['out'])


def test_the_fp16_step_is_timms_native_scaler_and_equals_a_grad_scaler_step_with_clipping():
    """engine's step with timm's NativeScaler against the GradScaler step it replaced (scale,
    backward, unscale, clip, step, update): the same parameters and scaler state after fp16 steps
    with clipping that acts, the first ones skipped for overflowing fp16 gradients (scale halved)."""
    from engine import _optimizer_step, autocast_context
    cpu = torch.device('cpu')
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(6)]
    scale = 2.0 ** 20  # the scaled fp16 gradients overflow (> 65504) at first: steps skipped, the scale halved

    def run(step_fn):
        torch.manual_seed(0)
        model = _Tiny()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        norms = []
        for x, y in batches:
            with autocast_context(cpu, torch.float16)():
                loss = F.cross_entropy(model(x), y)
            step_fn(loss, opt, list(model.parameters()), norms)
        return model.state_dict(), norms

    reference = torch.amp.GradScaler('cpu', init_scale=scale)

    def grad_scaler_step(loss, opt, params, norms):
        opt.zero_grad(set_to_none=True)
        reference.scale(loss).backward()
        reference.unscale_(opt)
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 0.05)))
        reference.step(opt)
        reference.update()

    native = NativeScaler('cpu')
    native.load_state_dict({**native.state_dict(), 'scale': scale})

    def native_scaler_step(loss, opt, params, norms):
        _optimizer_step(loss, opt, native, params, 0.05)

    want, norms = run(grad_scaler_step)
    got, _ = run(native_scaler_step)
    skipped = sum(not math.isfinite(n) for n in norms)
    assert 1 <= skipped <= 4 and min(n for n in norms if math.isfinite(n)) > 0.05  # steps taken, clipped
    assert reference.get_scale() == native.state_dict()['scale'] == scale / 2 ** skipped
    assert native.state_dict() == reference.state_dict()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert not torch.equal(want['net.3.weight'], run(lambda loss, opt, params, norms: None)[0]['net.3.weight'])


def test_amp_on_cpu_is_used_when_asked_and_states_its_precision(tmp_path, capsys):
    out = tmp_path / 'fp16'
    rc, stdout, err = run_cli(TINY + ['--epochs', '1', '--train-subset', '64', '--amp', '--amp-dtype', 'fp16',
                                      '--output_dir', out], capsys)
    assert rc == 0, err
    assert stdout.splitlines()[0].startswith('environment: ')
    assert 'precision fp16 autocast on cpu with gradient scaler' in stdout.splitlines()[0]
    scaler = torch.load(out / 'checkpoint.pth', weights_only=True)['scaler']
    assert scaler['scale'] == 65536.0  # the CPU gradient scaler ran and was saved
    assert engine.precision(train_hp.parse_args([]), torch.device('cpu')) == (None, 'float32')  # CPU default
    assert engine.precision(train_hp.parse_args(['--amp-dtype', 'bf16']), torch.device('cuda'))[0] == torch.bfloat16
    assert engine.precision(train_hp.parse_args(['--no-amp']), torch.device('cuda')) == (
        None, 'float32, TF32 float32 matmuls and convolutions')
    assert engine.precision(train_hp.parse_args(['--no-amp', '--no-tf32']), torch.device('cuda')) == (None, 'float32')


# Compiled training --------------------------------------------------------------------------------------

COMPILE_RUN = TINY + ['--batch-size', '16', '--sched', 'none', '--epochs', '1', '--model-kwargs', 'depth=4']


def test_compiled_ddp_training_ends_with_the_weights_of_eager_and_evaluates(tmp_path):
    """torch.compile after DDP (aot_eager, 2 gloo processes, 4 steps at lr 1e-3 with drop-path,
    mixup and the EMA): the weights of eager training (measured: equal, difference 0.0), and the
    evaluation on the compiled copy gives eager's numbers."""
    runs = {}
    for name, extra in (('eager', []), ('compiled', ['--torchcompile', 'aot_eager'])):
        r = run_process([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                         'train_hp.py', *COMPILE_RUN, *extra, '--output_dir', tmp_path / name])
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = torch.load(tmp_path / name / 'checkpoint.pth', weights_only=True), read_log(tmp_path / name / 'log.txt')
    (eager, eager_log), (compiled, compiled_log) = runs['eager'], runs['compiled']
    assert compiled['args']['torchcompile'] == 'aot_eager' and eager['args']['torchcompile'] is None
    assert not any(k.startswith(('_orig_mod.', 'module.')) for k in compiled['model'])  # the plain model's keys
    torch.manual_seed(0)
    initial = train_hp.build_model(train_hp.parse_args(COMPILE_RUN), 10).state_dict()
    assert max((eager['model'][k] - initial[k]).abs().max().item() for k in initial) > 1e-3  # it trained
    for key in ('model', 'model_ema'):
        diff = max((eager[key][k] - compiled[key][k]).abs().max().item() for k in eager[key])
        assert diff <= 1e-6, (key, diff)
    assert compiled_log[0]['train_loss'] == pytest.approx(eager_log[0]['train_loss'], abs=1e-6)
    for k in ('test_acc1', 'test_acc5', 'test_ema_acc1'):
        assert compiled_log[0][k] == eager_log[0][k], k
    assert compiled_log[0]['test_loss'] == pytest.approx(eager_log[0]['test_loss'], abs=1e-5)


def test_compiled_bvit_training_step_under_autocast():
    import timm
    model = timm.create_model('bvit_5m', num_classes=10, img_size=16, patch_size=4, depth=2)
    compiled = torch.compile(model, backend='aot_eager')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = compiled(torch.randn(4, 3, 16, 16))
    out.float().sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
