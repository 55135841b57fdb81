"""An AdamW optimizer with a separate learning rate for the clip factors ``f``."""

from typing import Optional

import torch
from transformers import TrainingArguments

from .checkpoint import F_SUFFIX


def qat_parameter_groups(
    model: torch.nn.Module,
    learning_rate: float,
    f_learning_rate: Optional[float] = None,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Split the trainable parameters into weights and clip factors ``f``.

    ``f`` gets ``f_learning_rate`` (``learning_rate`` if None) and never any weight decay; the
    other parameters get ``learning_rate`` and ``weight_decay``.
    """
    weights, factors = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (factors if name.endswith(F_SUFFIX) else weights).append(param)
    groups = [{"params": weights, "lr": learning_rate, "weight_decay": weight_decay}]
    if factors:
        groups.append({"params": factors, "lr": f_learning_rate or learning_rate, "weight_decay": 0.0})
    return groups


def build_qat_optimizer(
    model: torch.nn.Module, args: TrainingArguments, f_learning_rate: Optional[float] = None
) -> torch.optim.AdamW:
    """Build torch's AdamW with the betas, epsilon, learning rate and weight decay of ``args``.

    Pass it as ``Trainer(optimizers=(optimizer, None))``; the Trainer still builds the learning-rate
    schedule, which scales both groups by the same factor.
    """
    groups = qat_parameter_groups(model, args.learning_rate, f_learning_rate, args.weight_decay)
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
