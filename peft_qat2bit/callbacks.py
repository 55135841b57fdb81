"""Trainer callbacks for QAT: an EMA of the trainable parameters and quantizer statistics in the logs."""

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn
from transformers import TrainerCallback

from .checkpoint import record_layout
from .stats import quantizer_statistics

logger = logging.getLogger(__name__)

EMA_FILE = "ema.safetensors"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Return the whole tensor of an FSDP2 shard (a collective, so every rank must call it), else ``tensor``."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(staging), metadata=metadata)
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


class EMACallback(TrainerCallback):
    """Keep an exponential moving average of the trainable parameters, with constant decay.

    After every optimizer step, ``ema = decay * ema + (1 - decay) * param`` (torch's
    ``get_ema_multi_avg_fn``), with the average kept in fp32 on the parameter's device. The
    average of ``f`` is kept like any other trainable parameter.

    Each Trainer checkpoint gets an ``ema.safetensors`` (written by the main process only, atomically).
    Under FSDP2 the averages are sharded like their parameters, and every rank takes part in gathering
    them before the main process writes the file.
    When training resumes from ``checkpoint-N`` of ``output_dir`` the average is read back from
    there; pass ``resume_from`` for a checkpoint stored elsewhere.

    Args:
        decay: the EMA decay, in (0, 1); 0.999 averages over about the last 1000 steps.
        apply_at_end: copy the EMA into the model's parameters when training ends, so that the
            following ``save_model`` / ``save_qat_model`` writes the EMA weights.
        resume_from: the checkpoint directory to read the EMA from when resuming.
    """

    def __init__(self, decay: float = 0.999, apply_at_end: bool = False, resume_from: Optional[str] = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}; 0.999 is a common choice")
        self.decay = decay
        self.apply_at_end = apply_at_end
        self.resume_from = resume_from
        self._update = get_ema_multi_avg_fn(decay)
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        self.averages: list[torch.Tensor] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        model = _unwrap(model)
        named = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
        self.names = [name for name, _ in named]
        self.params = [param for _, param in named]
        self.averages = [param.detach().float().clone() for param in self.params]
        if state.global_step > 0:
            checkpoint = Path(self.resume_from or Path(args.output_dir) / f"checkpoint-{state.global_step}")
            self.load(checkpoint / EMA_FILE)

    @torch.no_grad()
    def on_step_end(self, args, state, control, **kwargs):
        current = [param.detach().float() for param in self.params]
        self._update(self.averages, current, state.global_step)

    def on_save(self, args, state, control, **kwargs):
        sharded = any(isinstance(average, DTensor) for average in self.averages)
        if not state.is_world_process_zero and not sharded:
            return
        averages = self.state_dict()
        if not state.is_world_process_zero:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint.mkdir(parents=True, exist_ok=True)
        _atomic_save_file(averages, checkpoint / EMA_FILE, self._metadata(state.global_step))

    @torch.no_grad()
    def on_train_end(self, args, state, control, **kwargs):
        if self.apply_at_end:
            self.copy_to_model()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the whole averages by parameter name (fp32, on the CPU); under FSDP2, call it on every rank."""
        return {
            name: _full_tensor(average.detach()).cpu().contiguous() for name, average in zip(self.names, self.averages)
        }

    def _metadata(self, step: int) -> dict[str, str]:
        return {"decay": repr(self.decay), "step": str(step)}

    def save(self, path: Path, step: int) -> None:
        """Write the averages to ``path`` as safetensors, atomically; under FSDP2, call it on every rank."""
        _atomic_save_file(self.state_dict(), Path(path), self._metadata(step))

    def load(self, path: Path) -> None:
        """Read averages written by ``save``; names and shapes must match the trainable parameters."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"resuming at a saved step, but no EMA state was found at {path}; pass "
                f"EMACallback(resume_from=<checkpoint dir>) or train without resuming"
            )
        saved = load_file(str(path))
        missing = sorted(set(self.names) - set(saved))
        unexpected = sorted(set(saved) - set(self.names))
        if missing or unexpected:
            raise ValueError(
                f"EMA state {path} does not match the trainable parameters (missing {missing[:3]}, "
                f"unexpected {unexpected[:3]}); resume with the same model and trainable parameters"
            )
        for name, average in zip(self.names, self.averages):
            if saved[name].shape != average.shape:
                raise ValueError(
                    f"EMA state {path}: {name} has shape {tuple(saved[name].shape)}, "
                    f"the parameter has {tuple(average.shape)}; resume with the same model"
                )
            value = saved[name].to(average.device)
            if isinstance(average, DTensor):
                value = distribute_tensor(value, average.device_mesh, average.placements)
            average.copy_(value)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the trainable parameters with their averages."""
        for param, average in zip(self.params, self.averages):
            param.copy_(average)


class QATStatsCallback(TrainerCallback):
    """Log quantizer statistics (mean ``f``, clip fraction, level occupancy) at each logging step.

    The statistics are sent through ``trainer.log``, so the progress bar, ``log_history``,
    TensorBoard and W&B all get them. At the start of training it also stores the quantization
    layout in ``model.config`` (so every checkpoint carries it) and warns when ``weight_decay`` is
    not 0, the value the QAT recipe uses.

    Usage::

        trainer = SFTTrainer(...)
        trainer.add_callback(QATStatsCallback(trainer))
    """

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.weight_decay != 0:
            logger.warning(
                "weight_decay=%s: the QAT recipe uses 0, because decay pulls weights toward zero, which is not "
                "a level of the balanced 2-bit grid; set weight_decay=0.0 unless you mean it",
                args.weight_decay,
            )
        record_layout(_unwrap(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not control.should_log:
            return
        stats = quantizer_statistics(_unwrap(model))
        if stats:
            self.trainer.log(stats)
            # Trainer.log clears should_log on the shared control object; set it again so the Trainer
            # still writes its own loss record for this step.
            control.should_log = True
