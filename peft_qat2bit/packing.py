"""Real 2-bit weights: codes packed four per byte, and ``Packed2BitLinear``, the converted ``QATLinear``.

Packed layout: the codes ``q`` in {-1, 0, 1, 2} of a weight (out_features, in_features) are taken in
row-major order and stored as ``q + 1`` in 0..3, four per uint8 byte with the first code in the
lowest two bits, so byte ``k`` is ``c[4k] | c[4k+1] << 2 | c[4k+2] << 4 | c[4k+3] << 6``. When the
number of codes is not a multiple of 4, the last byte is padded with zero bits. The group view
(rows, groups, group_len) of a weight is a reshape of the same row-major order, so the codes of one
scale group are contiguous.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from .fake_quantize_config import Balanced2BitFakeQuantizeConfig, granularity_name
from .fake_quantizer import scale_shape
from .linear import QATLinear
from .quantizer import QMAX, QMIN, ZERO_POINT

CODES_PER_BYTE = 4
BITS_PER_CODE = 2
CODE_MASK = 0b11


def packed_size(numel: int) -> int:
    """Return the number of bytes that ``numel`` packed codes take, padding included."""
    return (numel + CODES_PER_BYTE - 1) // CODES_PER_BYTE


def _code_shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(0, CODES_PER_BYTE * BITS_PER_CODE, BITS_PER_CODE, dtype=torch.uint8, device=device)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in {-1, 0, 1, 2} (any shape, integer or float dtype) into ``packed_size(numel)`` bytes.

    Returns a 1-D uint8 tensor in the layout described in this module's docstring.

    Raises:
        ValueError: if a code is not an integer in {-1, 0, 1, 2}.
    """
    flat = codes.detach().reshape(-1)
    if flat.numel() > 0:
        invalid = (flat < QMIN) | (flat > QMAX)
        if flat.is_floating_point():
            invalid |= flat != flat.round()
        if invalid.any():
            value = flat[invalid][0].item()
            raise ValueError(
                f"cannot pack code {value}: 2-bit codes must be integers in {{{QMIN}, 0, 1, {QMAX}}}, as "
                f"balanced_codes returns them"
            )
    stored = (flat - QMIN).to(torch.uint8)
    stored = F.pad(stored, (0, packed_size(flat.numel()) * CODES_PER_BYTE - flat.numel()))
    shifted = stored.reshape(-1, CODES_PER_BYTE) << _code_shifts(stored.device)
    return shifted[:, 0] | shifted[:, 1] | shifted[:, 2] | shifted[:, 3]


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Return the first ``numel`` codes of ``packed`` as a 1-D int8 tensor with values in {-1, 0, 1, 2}.

    Raises:
        ValueError: if ``packed`` is not a 1-D uint8 tensor of ``packed_size(numel)`` bytes.
    """
    expected = packed_size(numel)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != expected:
        raise ValueError(
            f"packed codes must be a 1-D uint8 tensor of {expected} bytes for {numel} codes, got "
            f"{packed.dtype} of shape {tuple(packed.shape)}"
        )
    stored = (packed.unsqueeze(-1) >> _code_shifts(packed.device)) & CODE_MASK
    return stored.reshape(-1)[:numel].to(torch.int8) + QMIN


class _PackedLinearFunction(torch.autograd.Function):
    """``F.linear`` with a weight dequantized from packed codes, dequantized again in the backward pass.

    Plain autograd would keep every layer's float weight alive from the forward to the backward pass
    (the input gradient needs it), which is the memory the packed base is meant to save.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "Packed2BitLinear", bias: Optional[torch.Tensor]) -> torch.Tensor:
        ctx.layer = layer
        ctx.input_dtype = x.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, layer.dequantized_weight(), bias)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        grad_input = grad_bias = None
        # Under autocast grad_output is bf16 or fp16 while the dequantized weight is fp32, hence the casts.
        # NOTE: tested with CPU bf16 autocast only; CUDA autocast is untested.
        if ctx.needs_input_grad[0]:
            weight = ctx.layer.dequantized_weight().to(grad_output.dtype)
            grad_input = grad_output.matmul(weight).to(ctx.input_dtype)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(dim=0).to(ctx.bias_dtype)
        return grad_input, None, grad_bias


class Packed2BitLinear(torch.nn.Module):
    """Linear layer whose frozen weight is stored as packed balanced 2-bit codes and fp32 scales.

    ``forward`` is ``F.linear(x, dequantized_weight(), bias)``. The float weight is rebuilt on every
    call and dropped afterwards, and the backward pass rebuilds it again, so the weight costs 2 bits
    per element (plus the scales) between calls. ``dequantized_weight()`` is bit-identical to
    ``QATLinear.quantized_weight()`` of the layer it was converted from.

    ``compute_dtype`` is the dtype of the dequantized weight. It follows ``.to(dtype)``, ``.half()``
    and similar casts, while ``scale`` stays fp32 because the dequantization math runs in fp32.

    Args:
        in_features, out_features, bias: as in ``nn.Linear``.
        weight_config: the quantizer settings the codes were made with; they fix the shape of ``scale``.
        compute_dtype: the dtype of the dequantized weight.
        module_name: the layer's name in the model, used in error messages.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_config: Optional[Balanced2BitFakeQuantizeConfig] = None,
        compute_dtype: torch.dtype = torch.float32,
        module_name: str = "",
        device=None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight_config = weight_config or Balanced2BitFakeQuantizeConfig()
        self.compute_dtype = compute_dtype
        self.module_name = module_name
        rows, groups = scale_shape(self.weight_config, torch.Size((out_features, in_features)))
        # (packed_size(out_features * in_features),) uint8: the row-major codes, four per byte.
        self.register_buffer(
            "packed", torch.zeros(packed_size(out_features * in_features), dtype=torch.uint8, device=device)
        )
        # (rows, groups) fp32: the step s = f * max|W| / 2 of each group, as the fake quantizer computed it.
        self.register_buffer("scale", torch.ones((rows, groups), dtype=torch.float32, device=device))
        if bias:
            self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_qat_linear(cls, qat_linear: QATLinear, module_name: Optional[str] = None) -> "Packed2BitLinear":
        """Convert ``qat_linear`` to its packed form, sharing its bias parameter.

        Raises:
            ValueError: if the layer's fake quantizer is disabled (as while a LoRA adapter is merged into
                it) or any of its clip factors ``f`` is not positive and finite.
        """
        quantizer = qat_linear.weight_fake_quantizer
        name = module_name if module_name is not None else quantizer.module_name
        if not quantizer.enabled:
            raise ValueError(
                f"{name or 'this QATLinear'}: the fake quantizer is disabled, so the weight is not on the 2-bit "
                f"grid (a merged LoRA adapter does this); unmerge the adapter before converting"
            )
        quantizer.check_scale()
        weight = qat_linear.weight
        with torch.no_grad():
            codes = quantizer.codes(weight)
            scale = quantizer.scale(weight).squeeze(-1)
        with torch.device("meta"):
            layer = cls(
                qat_linear.in_features,
                qat_linear.out_features,
                bias=False,
                weight_config=qat_linear.weight_config,
                compute_dtype=weight.dtype,
                module_name=name,
            )
        layer.packed = pack_codes(codes)
        layer.scale = scale.detach().clone()
        layer.bias = qat_linear.bias
        layer.train(qat_linear.training)
        return layer

    def dequantized_weight(self) -> torch.Tensor:
        """Return the weight ``scale * (code - 0.5)`` as (out_features, in_features) in ``compute_dtype``."""
        codes = unpack_codes(self.packed, self.out_features * self.in_features)
        rows, groups = self.scale.shape
        grouped = codes.reshape(rows, groups, -1).float()
        # The same fp32 operands and operation as the fake quantizer's forward, so the result is bit-identical.
        weight = self.scale.unsqueeze(-1) * (grouped - ZERO_POINT)
        return weight.reshape(self.out_features, self.in_features).to(self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias_trains = self.bias is not None and self.bias.requires_grad
        if torch.is_grad_enabled() and (x.requires_grad or bias_trains):
            return _PackedLinearFunction.apply(x, self, self.bias)
        return F.linear(x, self.dequantized_weight(), self.bias)

    def _apply(self, fn, recurse=True):
        # Keep scale in fp32 through .to(dtype) / .half() / .bfloat16(), and let compute_dtype follow the cast.
        scale = self.scale
        result = super()._apply(fn, recurse)
        if self.scale.dtype != torch.float32:
            self.scale = scale.to(device=self.scale.device, dtype=torch.float32)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return result

    def extra_repr(self) -> str:
        granularity = granularity_name(self.weight_config.granularity)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"granularity={granularity}, group_size={self.weight_config.group_size}, "
            f"compute_dtype={self.compute_dtype}"
        )
