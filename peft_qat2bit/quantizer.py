"""Math of the balanced 2-bit quantizer: fake quantization with STE/LSQ gradients and Newton clip search.

The level set is ``s * {-1.5, -0.5, 0.5, 1.5}``: a weight ``w`` gets the integer code
``q = clamp(round(w / s + 0.5), -1, 2)`` and the value ``s * (q - 0.5)``. With ``c = 2 * s`` the
codes cover ``[-c, c]``, so ``c`` is the clipping threshold. Everything here runs in fp32 whatever
the dtype of the weight, so bf16 rounding never picks a level.

Tensors are laid out in groups: ``(rows, groups, group_len)`` for weights and ``(rows, groups, 1)``
for scales. ``fake_quantizer.py`` maps the per-tensor, per-channel and per-group granularities
onto this layout.
"""

from dataclasses import dataclass

import torch

QMIN = -1
QMAX = 2
ZERO_POINT = 0.5
LEVELS = (-1.5, -0.5, 0.5, 1.5)

# Smallest scale used for an all-zero group, so that w / s stays finite and such a group quantizes to
# +-(TINY_SCALE / 2), which is zero for every practical purpose.
TINY_SCALE = torch.finfo(torch.float32).tiny


def balanced_codes(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return the integer codes in {-1, 0, 1, 2} (as fp32) that the quantizer picks for ``weight``."""
    ratio = weight.float() / scale.float()
    return torch.round(ratio + ZERO_POINT).clamp_(QMIN, QMAX)


class _BalancedFakeQuantize(torch.autograd.Function):
    """Balanced 2-bit fake quantization with a straight-through estimator and an LSQ scale gradient.

    For ``v = w / s`` inside the range, ``d out / d w = 1`` and ``d out / d s = (q - 0.5) - v``. Where
    the clamp saturates, ``d out / d w = 0`` and ``d out / d s = q - 0.5`` (that is -1.5 or 1.5).
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        scale32 = scale.float()
        # One fp32 buffer is rounded, clamped and rescaled in place: w / s -> q -> s * (q - 0.5).
        values = weight.float() / scale32
        values.add_(ZERO_POINT).round_().clamp_(QMIN, QMAX).sub_(ZERO_POINT).mul_(scale32)
        ctx.save_for_backward(weight, scale)
        return values.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        weight, scale = ctx.saved_tensors
        scale32 = scale.float()
        ratio = weight.float() / scale32
        level = torch.round(ratio + ZERO_POINT)  # the unclamped code, turned into q - 0.5 below
        in_range = (level >= QMIN) & (level <= QMAX)
        grad32 = grad_output.float()

        grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_weight = (grad32 * in_range).to(weight.dtype)

        grad_scale = None
        if ctx.needs_input_grad[1]:
            # (q - 0.5) - w / s inside the range and q - 0.5 where clamped, computed in place.
            level.clamp_(QMIN, QMAX).sub_(ZERO_POINT)
            level.sub_(ratio.mul_(in_range))
            grad_scale = level.mul_(grad32).sum(dim=-1, keepdim=True)
            # The scale may broadcast over more than the last axis, as a per-tensor scale does.
            grad_scale = grad_scale.sum_to_size(scale.shape).to(scale.dtype)
        return grad_weight, grad_scale


def fake_quantize_balanced(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Fake-quantize ``weight`` (rows, groups, group_len) with ``scale`` (rows, groups, 1).

    Returns a tensor of the dtype of ``weight`` whose values lie on ``scale * {-1.5, -0.5, 0.5, 1.5}``.
    Gradients reach ``weight`` through the straight-through estimator and ``scale`` through the LSQ
    formula; see ``_BalancedFakeQuantize``.
    """
    return _BalancedFakeQuantize.apply(weight, scale)


def quantization_mse(weight: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """Return the mean squared error per group (rows, groups) of quantizing with clip threshold ``clip``."""
    scale = (clip.float() / 2).clamp_min(TINY_SCALE).unsqueeze(-1)
    weight32 = weight.float()
    dequantized = scale * (balanced_codes(weight32, scale) - ZERO_POINT)
    return (dequantized - weight32).pow(2).mean(dim=-1)


@dataclass
class NewtonResult:
    """Outcome of ``newton_clip``: thresholds, how many iterations ran and the last relative step."""

    clip: torch.Tensor  # (rows, groups) fp32, the chosen clipping thresholds c
    iterations: int
    last_relative_step: float
    converged: bool


def newton_clip(
    weight: torch.Tensor,
    max_iterations: int = 50,
    tolerance: float = 1e-4,
) -> NewtonResult:
    """Find the MSE-optimal clipping threshold of every group with OCTAV's Newton-Raphson recursion.

    OCTAV (Sakr et al., ICML 2022) minimises ``J(c) = (Delta^2 / 12) P(|w| <= c) + E[(|w| - c_top)^2; |w| > c]``
    with the density terms of the derivative dropped. For the balanced grid the step is
    ``Delta = c / 2`` and a clipped weight lands on the top level ``c_top = 0.75 c`` (not on ``c`` as
    in OCTAV's grid), which gives the fixed point

        c <- E[|w| 1{|w| > c}] / (P(|w| <= c) / 36 + 0.75 P(|w| > c))

    started from ``c = mean(|w|)``. Each group then keeps whichever of the Newton threshold and
    ``c = max(|w|)`` (f = 1) has the lower measured MSE, so the result is never worse than f = 1.

    Args:
        weight: (rows, groups, group_len) weights, any float dtype. Must be finite.
        max_iterations: the maximum number of Newton steps.
        tolerance: stop once every group's relative change of ``c`` is below this. Groups of a few
            dozen weights have a piecewise-constant empirical objective and may use all iterations
            without meeting it; the MSE comparison with f = 1 still applies to them.

    Raises:
        ValueError: if ``weight`` contains NaN or Inf.
    """
    magnitude = weight.detach().float().abs()
    if not torch.isfinite(magnitude).all():
        raise ValueError(
            "weight contains NaN or Inf values, so no clipping threshold can be chosen; "
            "check the checkpoint or the training run that produced it"
        )
    # Sorting once turns each iteration's sums over |w| > c into a binary search and a prefix-sum
    # lookup per group, so an iteration costs O(groups * log(group_len)) instead of a pass over W.
    sorted_magnitude = magnitude.sort(dim=-1).values
    group_len = sorted_magnitude.shape[-1]
    prefix_sum = torch.nn.functional.pad(sorted_magnitude.double().cumsum(dim=-1), (1, 0))
    total = prefix_sum[..., -1]
    absmax = sorted_magnitude[..., -1]
    clip = (total / group_len).float()
    # The plain recursion overshoots on the balanced grid: on Gaussian weights its slope at the fixed
    # point is below -1, so it cycles between two values. Each group therefore takes a damped step that
    # starts at half the Newton step and halves again whenever the step changes sign.
    damping = torch.full_like(clip, 0.5)
    previous_step = torch.zeros_like(clip)
    last_step = 0.0
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        inside_count = torch.searchsorted(sorted_magnitude, clip.unsqueeze(-1), right=True).squeeze(-1)
        fraction_outside = (group_len - inside_count).double() / group_len
        clipped_mean = (total - prefix_sum.gather(-1, inside_count.unsqueeze(-1)).squeeze(-1)) / group_len
        denominator = (1.0 - fraction_outside) / 36.0 + 0.75 * fraction_outside
        target = (clipped_mean / denominator).float()
        # A target of 0 means nothing is clipped (c >= max|w|), where the fixed point pulls c down to
        # the largest weight, so aim at max|w| instead of collapsing the grid.
        target = torch.where(target > 0, target, absmax)

        step = target - clip
        damping = torch.where(step * previous_step < 0, damping * 0.5, damping)
        step = damping * step
        previous_step = step
        clip = clip + step
        last_step = (step.abs() / clip.clamp_min(TINY_SCALE)).max().item()
        if last_step < tolerance:
            break

    newton_error = quantization_mse(magnitude, clip)
    absmax_error = quantization_mse(magnitude, absmax)
    clip = torch.where(newton_error <= absmax_error, clip, absmax)
    return NewtonResult(
        clip=clip,
        iterations=iterations,
        last_relative_step=last_step,
        converged=last_step < tolerance,
    )
