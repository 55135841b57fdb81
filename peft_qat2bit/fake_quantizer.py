"""``Balanced2BitFakeQuantizer``: the torchao fake quantizer module that owns the learnable factor ``f``."""

import functools
from collections.abc import Callable
from typing import Optional

import torch
from torchao.quantization.granularity import PerAxis, PerTensor
from torchao.quantization.qat.fake_quantizer import FakeQuantizerBase

from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .quantizer import QMAX, QMIN, TINY_SCALE, ZERO_POINT, balanced_codes, fake_quantize_balanced, newton_clip


def scale_shape(config: Balanced2BitFakeQuantizeConfig, weight_shape: torch.Size) -> tuple[int, int]:
    """Return the shape (rows, groups) of ``f`` for a 2-D weight of ``weight_shape`` under ``config``."""
    out_features, in_features = weight_shape
    granularity = config.granularity
    if isinstance(granularity, PerTensor):
        return (1, 1)
    if isinstance(granularity, PerAxis):
        return (out_features, 1)
    if in_features % granularity.group_size != 0:
        raise ValueError(
            f"group_size={granularity.group_size} does not divide in_features={in_features}; "
            f"pick a group_size that divides {in_features} or leave this layer out of quantization"
        )
    return (out_features, in_features // granularity.group_size)


def group_scale(grouped: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Return ``s = f * max(|W|) / 2`` (rows, groups, 1) fp32 for a weight viewed as (rows, groups, group_len).

    ``max(|W|)`` is detached and ``s`` is at least ``TINY_SCALE``.
    """
    absmax = grouped.detach().float().abs().amax(dim=-1).clamp_min(TINY_SCALE)
    # Clamping s, not only max|W|, keeps an all-zero group's s a normal float. TINY_SCALE / 2 is
    # subnormal, and torch.set_flush_denormal(True) would flush it to 0 and turn 0 / s into NaN.
    return (f.float() * absmax / 2).clamp_min(TINY_SCALE).unsqueeze(-1)


def fake_quantize_weight(weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Fake-quantize a 2-D ``weight`` with the clip factors ``f`` (rows, groups).

    Gradients reach ``weight`` by the straight-through estimate and ``f`` by the LSQ formula of
    ``fake_quantize_balanced``.
    """
    grouped = weight.reshape(*f.shape, -1)
    return fake_quantize_balanced(grouped, group_scale(grouped, f)).reshape(weight.shape)


@functools.cache
def compiled_fake_quantize_weight() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return ``fake_quantize_weight`` compiled by ``torch.compile`` (built on first use, then shared).

    Shapes are dynamic, so the layers of a model share a few kernels instead of compiling one per
    weight shape.

    NOTE: tested on a CPU (Inductor's C++ backend) only; the GPU (Triton) path has not been run.
    """
    return torch.compile(fake_quantize_weight, dynamic=True)


class Balanced2BitFakeQuantizer(FakeQuantizerBase):
    """Fake-quantizes a 2-D weight to the balanced 2-bit grid with the learnable clip factor ``f``.

    ``f`` has shape (rows, groups): (1, 1) per tensor, (out_features, 1) per channel and
    (out_features, in_features // group_size) per group. It stays fp32 when the module is cast to
    another dtype, because the scale math runs in fp32. The scale is ``f * max(|W|) / 2`` with
    ``max(|W|)`` detached, so the weight gradient is the plain straight-through estimate.

    Args:
        config: the quantizer settings.
        weight_shape: (out_features, in_features) of the weight this quantizer serves.
        module_name: the layer's name in the model, used in error messages.
    """

    def __init__(
        self,
        config: Balanced2BitFakeQuantizeConfig,
        weight_shape: torch.Size,
        module_name: str = "",
        device: Optional[torch.device] = None,
    ):
        super().__init__()
        if len(weight_shape) != 2:
            raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(weight_shape)}")
        self.config = config
        self.weight_shape = torch.Size(weight_shape)
        self.module_name = module_name
        self.enabled = True
        shape = scale_shape(config, self.weight_shape)
        self.f = torch.nn.Parameter(
            torch.ones(shape, dtype=torch.float32, device=device), requires_grad=config.learnable_scale
        )
        self._checked_version: Optional[tuple[int, int]] = None  # (data_ptr, _version) of the last valid f

    def group_view(self, weight: torch.Tensor) -> torch.Tensor:
        """Reshape a weight (out, in) to (rows, groups, group_len) as the scales see it."""
        rows, groups = self.f.shape
        return weight.reshape(rows, groups, -1)

    def scale(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the step ``s = f * max(|W|) / 2`` as (rows, groups, 1) fp32, at least ``TINY_SCALE``."""
        return group_scale(self.group_view(weight), self.f)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        if self.training and torch.is_grad_enabled():
            # f changes only in optimizer steps and loads, which bump its version, so further forwards
            # of the same step (gradient accumulation, activation checkpointing) skip the device sync.
            version = (self.f.data_ptr(), self.f._version)
            if version != self._checked_version:
                self.check_scale()
                self._checked_version = version
        if self.config.compile:
            return compiled_fake_quantize_weight()(weight, self.f)
        return fake_quantize_weight(weight, self.f)

    def check_scale(self) -> None:
        """Raise ValueError if any ``f`` is zero, negative, NaN or Inf."""
        f = self.f.detach()
        bad = ~(torch.isfinite(f) & (f > 0))
        if bad.any():
            raise ValueError(
                f"{self.module_name or 'a quantized layer'}: {int(bad.sum())} of {f.numel()} clip factors f "
                f"are <= 0 or not finite (min f = {f.min().item():.4g}), so its scale is invalid; lower the "
                f"learning rate of f or resume from an earlier checkpoint"
            )

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the integer codes in {-1, 0, 1, 2} (rows, groups, group_len) fp32 for ``weight``."""
        return balanced_codes(self.group_view(weight.detach()), self.scale(weight).detach())

    @torch.no_grad()
    def initialize_(self, weight: torch.Tensor) -> None:
        """Set ``f`` from ``weight`` by the configured init ("newton" or "absmax").

        Raises:
            ValueError: if the weight contains NaN or Inf.
        """
        grouped = self.group_view(weight.detach()).float()
        if not torch.isfinite(grouped).all():
            raise ValueError(
                f"{self.module_name or 'layer'}: weight contains NaN or Inf values, so no scale can be "
                f"initialised; check the checkpoint or the training run that produced it"
            )
        if self.config.init == "absmax":
            self.f.fill_(1.0)
            return
        absmax = grouped.abs().amax(dim=-1)
        clip = newton_clip(grouped, max_iterations=self.config.newton_iterations).clip
        # An all-zero group has no scale to learn: f = 1 keeps it at the tiny fallback scale.
        factor = torch.where(absmax > 0, clip / absmax.clamp_min(TINY_SCALE), torch.ones_like(absmax))
        self.f.copy_(factor)

    @torch.no_grad()
    def statistics(self, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return counts for logging: clipped weights and weights per level (fp32 scalars / (4,))."""
        grouped = self.group_view(weight.detach()).float()
        scale = self.scale(weight).detach()
        unclamped = torch.round(grouped / scale + ZERO_POINT)
        clipped = ((unclamped < QMIN) | (unclamped > QMAX)).sum()
        codes = unclamped.clamp(QMIN, QMAX).flatten().to(torch.int64) - QMIN
        level_counts = torch.bincount(codes, minlength=4).float()
        return {"clipped": clipped.float(), "level_counts": level_counts, "numel": torch.tensor(float(grouped.numel()))}

    def _apply(self, fn, recurse=True):
        # Keep f in fp32 through .to(dtype) / .half() / .bfloat16(): only its device follows the cast.
        original = self.f.data
        original_grad = self.f.grad
        result = super()._apply(fn, recurse)
        if self.f.dtype != torch.float32:
            self.f.data = original.to(device=self.f.device, dtype=torch.float32)
        if self.f.grad is not None and self.f.grad.dtype != torch.float32:
            self.f.grad = original_grad.to(device=self.f.device, dtype=torch.float32)
        return result

    def extra_repr(self) -> str:
        return f"config={self.config}, f_shape={tuple(self.f.shape)}"

    def __repr__(self) -> str:
        return torch.nn.Module.__repr__(self)
