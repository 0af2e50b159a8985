"""Training losses: timm's label-smoothing and soft-target cross entropy and binary cross entropy
(``--bce-loss``), and DeiT-style knowledge distillation from a timm teacher."""
from __future__ import annotations

from typing import Any, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from timm.loss import BinaryCrossEntropy, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import Tensor, nn


def _split_outputs(outputs: Union[Tensor, Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    """(class-token logits, distillation logits). Models with one head (BViT) give the same
    logits to both terms; DeiT's distilled models return a (cls, dist) pair."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(f'expected model outputs (cls, dist), got {len(outputs)} tensors')
        return outputs[0], outputs[1]
    return outputs, outputs


class DistillationLoss(nn.Module):
    """DeiT's distillation objective: ``(1 - alpha) * base(outputs, targets) + alpha * KD``.

    ``distillation_type`` 'soft': KL divergence between temperature-``tau`` softmaxes of student
    and teacher, times tau², normalised by the number of logits (so ``--distillation-alpha``
    weighs the same as in DeiT); 'hard': cross entropy against the teacher's argmax; 'none':
    the base loss alone. The teacher sees the same (mixed) images without gradients. Not timm's
    ``timm.task.LogitDistillationTask``: it has no 'hard' distillation, averages the soft term
    per image (``batchmean``, a factor of the class count above DeiT's), renormalises the
    teacher's input, and owns the model's forward and DDP wrapping.
    """

    def __init__(self, base_criterion: nn.Module, teacher: Optional[nn.Module], distillation_type: str = 'none',
                 alpha: float = 0.5, tau: float = 1.0) -> None:
        super().__init__()
        if distillation_type not in ('none', 'soft', 'hard'):
            raise ValueError(f"distillation_type must be 'none', 'soft' or 'hard', got {distillation_type!r}")
        if distillation_type != 'none' and teacher is None:
            raise ValueError('distillation needs a teacher model')
        self.base_criterion = base_criterion
        self.teacher = teacher
        self.distillation_type = distillation_type
        self.alpha = alpha
        self.tau = tau

    def forward(self, inputs: Tensor, outputs: Any, targets: Tensor) -> Tensor:
        cls_out, dist_out = _split_outputs(outputs)
        base = self.base_criterion(cls_out, targets)
        if self.distillation_type == 'none':
            return base
        assert self.teacher is not None
        with torch.no_grad():
            teacher_out = self.teacher(inputs)
            if isinstance(teacher_out, (tuple, list)):
                teacher_out = teacher_out[0]
        dist_out = dist_out.float()
        teacher_out = teacher_out.float()
        if self.distillation_type == 'soft':
            t = self.tau
            kd = F.kl_div(F.log_softmax(dist_out / t, dim=1), F.log_softmax(teacher_out / t, dim=1),
                          reduction='sum', log_target=True) * (t * t) / dist_out.numel()
        else:
            kd = F.cross_entropy(dist_out, teacher_out.argmax(dim=1))
        return base * (1.0 - self.alpha) + kd * self.alpha


def build_base_criterion(mixup_active: bool, smoothing: float, bce: bool) -> nn.Module:
    """The classification loss (timm's): BCE with ``--bce-loss``; soft-target CE when mixup/cutmix make
    the targets (the smoothing is then inside the mixed targets); label smoothing CE when
    ``smoothing`` > 0; plain CE otherwise."""
    if bce:  # DeiT III: positive (mixed) targets become 1 (target_threshold 0), integer ones one-hot
        return BinaryCrossEntropy(smoothing=0.0, target_threshold=0.0)
    if mixup_active:
        return SoftTargetCrossEntropy()
    if smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing)
    return nn.CrossEntropyLoss()


__all__ = ['DistillationLoss', 'build_base_criterion']
