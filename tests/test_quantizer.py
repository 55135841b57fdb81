"""Math of the balanced 2-bit fake quantizer: level grid, STE/LSQ gradients, Newton init, edge cases, dtypes."""

import math

import pytest
import torch
from conftest import requires_cpp_compiler

from peft_qat2bit import Balanced2BitFakeQuantizeConfig, Balanced2BitFakeQuantizer, QATLinear
from peft_qat2bit.quantizer import LEVELS, TINY_SCALE, NewtonResult, fake_quantize_balanced, newton_clip

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 16)]

# Hand-picked 2x4 weight for the gradient tests. With the per-tensor max |W| = 4 and f = 0.5 the step is
# s = 0.5 * 4 / 2 = 1, so v = W / s = W and the code is q = clamp(round(v + 0.5), -1, 2). "In range" means
# round(v + 0.5) lies in [-1, 2] before the clamp, as in torch.fake_quantize_per_tensor_affine.
#
#   w       v + 0.5  round  in range  q   q - 0.5  LSQ local grad        upstream g  g * local
#   0.25     0.75      1     yes      1     0.5     0.5 - 0.25   = 0.25       1        0.25
#  -0.875   -0.375     0     yes      0    -0.5    -0.5 + 0.875  = 0.375      2        0.75
#   1.875    2.375     2     yes      2     1.5     1.5 - 1.875  = -0.375    -1        0.375
#   3.25     3.75      4     no       2     1.5     1.5 (saturated)           0.5      0.75
#  -4.0     -3.5      -4     no      -1    -1.5    -1.5 (saturated)           2       -3.0
#   0.625    1.125     1     yes      1     0.5     0.5 - 0.625  = -0.125    -2        0.25
#  -1.75    -1.25     -1     yes     -1    -1.5    -1.5 + 1.75   = 0.25       1        0.25
#  -1.25    -0.75     -1     yes     -1    -1.5    -1.5 + 1.25   = -0.25      4       -1.0
#
# Row sums of g * local: 0.25 + 0.75 + 0.375 + 0.75 = 2.125 and -3.0 + 0.25 + 0.25 - 1.0 = -3.5, total -1.375.
# Sums over groups of 2 columns: row 0 -> 1.0, 1.125 and row 1 -> -2.75, -0.75.
# dL/df = dL/ds * max|W| / 2 = -1.375 * 4 / 2 = -2.75. Every number is a short binary fraction, so fp32 is exact.
HAND_WEIGHT = [[0.25, -0.875, 1.875, 3.25], [-4.0, 0.625, -1.75, -1.25]]
HAND_UPSTREAM = [[1.0, 2.0, -1.0, 0.5], [2.0, -2.0, 1.0, 4.0]]
HAND_OUTPUT = [[0.5, -0.5, 1.5, 1.5], [-1.5, 0.5, -1.5, -1.5]]
HAND_WEIGHT_GRAD = [[1.0, 2.0, -1.0, 0.0], [0.0, -2.0, 1.0, 4.0]]


def make_quantizer(weight, granularity, group_size=None, init="newton"):
    config = Balanced2BitFakeQuantizeConfig(granularity, group_size=group_size, init=init)
    quantizer = Balanced2BitFakeQuantizer(config, weight.shape, module_name="test.layer")
    quantizer.initialize_(weight)
    return quantizer


def expected_f_shape(weight, granularity, group_size):
    out_features, in_features = weight.shape
    if granularity == "per_tensor":
        return (1, 1)
    if granularity == "per_channel":
        return (out_features, 1)
    return (out_features, in_features // group_size)


def independent_scale(weight, f):
    """Compute s = f * max|W| / 2 per group, (rows, groups, 1), without the quantizer's helpers."""
    rows, groups = f.shape
    grouped = weight.detach().float().reshape(rows, groups, -1)
    absmax = grouped.abs().amax(dim=-1, keepdim=True)
    return f.detach().float().unsqueeze(-1) * absmax / 2


def sample_weight(distribution, shape=(64, 256), seed=0):
    torch.manual_seed(seed)
    if distribution == "gaussian":
        return torch.randn(shape)
    if distribution == "student_t3":
        return torch.distributions.StudentT(3.0).sample(shape)
    return torch.distributions.Laplace(0.0, 1.0).sample(shape)


def weight_mse(quantizer, weight):
    with torch.no_grad():
        return (quantizer(weight) - weight).pow(2).mean()


# (a) Level grid


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_output_on_group_grid(granularity, group_size):
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    quantizer = make_quantizer(weight, granularity, group_size)
    rows, groups = quantizer.f.shape

    scale = independent_scale(weight, quantizer.f)
    grid = scale * torch.tensor(LEVELS)  # (rows, groups, 4)
    output = quantizer(weight).detach().reshape(rows, groups, -1)
    on_grid = (output.unsqueeze(-1) == grid.unsqueeze(-2)).any(dim=-1)

    assert tuple(quantizer.f.shape) == expected_f_shape(weight, granularity, group_size)
    assert bool(on_grid.all()), f"{int((~on_grid).sum())} outputs are off their group's grid"


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_output_is_nearest_level(granularity, group_size):
    torch.manual_seed(1)
    weight = torch.randn(8, 64)
    quantizer = make_quantizer(weight, granularity, group_size)
    rows, groups = quantizer.f.shape

    grouped = weight.reshape(rows, groups, -1)
    scale = independent_scale(weight, quantizer.f).expand_as(grouped)
    output = quantizer(weight).detach().reshape(rows, groups, -1)
    inside = grouped.abs() <= 2 * scale
    error = (output - grouped).abs()

    # Inside [-c, c] with c = 2s the nearest of the four levels is at most s / 2 away.
    assert bool((error[inside] <= scale[inside] / 2 * (1 + 1e-6)).all())
    # Beyond c the weight is clipped to the outer level of its sign.
    clipped_expected = torch.sign(grouped[~inside]) * 1.5 * scale[~inside]
    assert torch.equal(output[~inside], clipped_expected)


def test_newton_sets_f_below_one():
    torch.manual_seed(2)
    weight = torch.randn(32, 64)
    quantizer = make_quantizer(weight, "per_tensor")

    # Gaussian weights are clipped well inside max|W|, so the grid tests above also cover f != 1.
    assert quantizer.f.item() < 0.9


# (b) Gradients


def test_forward_hand_values():
    weight = torch.tensor(HAND_WEIGHT).reshape(1, 1, 8)
    scale = torch.ones(1, 1, 1)

    output = fake_quantize_balanced(weight, scale)

    assert torch.equal(output.reshape(2, 4), torch.tensor(HAND_OUTPUT))


def test_ste_weight_grad_hand_values():
    weight = torch.tensor(HAND_WEIGHT).reshape(2, 1, 4).requires_grad_()
    scale = torch.ones(2, 1, 1)

    output = fake_quantize_balanced(weight, scale)
    (output * torch.tensor(HAND_UPSTREAM).reshape(2, 1, 4)).sum().backward()

    assert torch.equal(weight.grad.reshape(2, 4), torch.tensor(HAND_WEIGHT_GRAD))


@pytest.mark.parametrize(
    ("scale_shape", "expected"),
    [
        ((1, 1, 1), [[[-1.375]]]),  # one scale for all 8 weights
        ((2, 1, 1), [[[2.125]], [[-3.5]]]),  # one scale per row
        ((2, 2, 1), [[[1.0], [1.125]], [[-2.75], [-0.75]]]),  # one scale per 2 columns
    ],
)
def test_lsq_scale_grad_hand_values(scale_shape, expected):
    rows, groups, _ = scale_shape
    weight = torch.tensor(HAND_WEIGHT).reshape(2, groups, -1)
    upstream = torch.tensor(HAND_UPSTREAM).reshape(2, groups, -1)
    scale = torch.ones(scale_shape, requires_grad=True)

    (fake_quantize_balanced(weight, scale) * upstream).sum().backward()

    assert torch.equal(scale.grad, torch.tensor(expected))


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=requires_cpp_compiler)])
def test_quantizer_grads_hand_values(compile):
    weight = torch.tensor(HAND_WEIGHT, requires_grad=True)
    quantizer = Balanced2BitFakeQuantizer(Balanced2BitFakeQuantizeConfig("per_tensor", compile=compile), weight.shape)
    with torch.no_grad():
        quantizer.f.fill_(0.5)

    output = quantizer(weight)
    (output * torch.tensor(HAND_UPSTREAM)).sum().backward()

    assert torch.equal(output.detach(), torch.tensor(HAND_OUTPUT))
    assert torch.equal(weight.grad, torch.tensor(HAND_WEIGHT_GRAD))
    assert torch.equal(quantizer.f.grad, torch.tensor([[-2.75]]))


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_f_grad_chain_rule(granularity, group_size):
    torch.manual_seed(3)
    weight = torch.randn(4, 32)
    upstream = torch.randn(4, 32)
    quantizer = make_quantizer(weight, granularity, group_size)
    rows, groups = quantizer.f.shape

    (quantizer(weight) * upstream).sum().backward()

    # dL/ds from the autograd function alone, with s as a leaf tensor.
    scale = independent_scale(weight, quantizer.f).requires_grad_()
    grouped_upstream = upstream.reshape(rows, groups, -1)
    (fake_quantize_balanced(weight.reshape(rows, groups, -1), scale) * grouped_upstream).sum().backward()
    absmax = weight.abs().reshape(rows, groups, -1).amax(dim=-1)
    expected = scale.grad.squeeze(-1) * absmax / 2

    assert torch.allclose(quantizer.f.grad, expected, rtol=1e-6, atol=0.0)



@requires_cpp_compiler
@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_compiled_matches_eager(granularity, group_size):
    torch.manual_seed(5)
    weight = torch.randn(24, 64)
    upstream = torch.randn(24, 64)
    results = []
    for compile in (False, True):
        config = Balanced2BitFakeQuantizeConfig(granularity, group_size=group_size, compile=compile)
        quantizer = Balanced2BitFakeQuantizer(config, weight.shape)
        quantizer.initialize_(weight)
        leaf = weight.clone().requires_grad_()
        output = quantizer(leaf)
        (output * upstream).sum().backward()
        results.append((output.detach(), leaf.grad, quantizer.f.grad))

    (eager_output, eager_weight_grad, eager_f_grad), (output, weight_grad, f_grad) = results
    assert torch.equal(output, eager_output)
    assert torch.equal(weight_grad, eager_weight_grad)
    # The f gradient is a sum, which the compiled kernel may add up in another order.
    assert torch.allclose(f_grad, eager_f_grad, rtol=1e-5, atol=1e-6)

def test_weight_grad_ignores_absmax():
    # max|W| is detached, so the largest weight gets the STE gradient only and nothing through the scale.
    weight = torch.tensor([[1.0, -0.375, 0.25, -0.0625]], requires_grad=True)
    quantizer = Balanced2BitFakeQuantizer(Balanced2BitFakeQuantizeConfig("per_tensor"), weight.shape)
    with torch.no_grad():
        quantizer.f.fill_(0.625)

    quantizer(weight).sum().backward()

    # s = 0.625 * 1 / 2 = 0.3125, so v + 0.5 = 3.7, -0.7, 1.3, 0.3, which round to 4 (saturated), -1, 1, 0.
    assert torch.equal(weight.grad, torch.tensor([[0.0, 1.0, 1.0, 1.0]]))


# (c) Newton clip initialisation


@pytest.mark.parametrize("distribution", ["gaussian", "student_t3", "laplace"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_newton_mse_below_absmax(distribution, granularity):
    weight = sample_weight(distribution)
    newton = make_quantizer(weight, granularity, init="newton")
    absmax = make_quantizer(weight, granularity, init="absmax")

    assert weight_mse(newton, weight) < weight_mse(absmax, weight)


@pytest.mark.parametrize("distribution", ["gaussian", "student_t3", "laplace"])
@pytest.mark.parametrize(("granularity", "group_size"), [("per_channel", None), ("per_group", 16)])
def test_newton_groups_never_worse(distribution, granularity, group_size):
    weight = sample_weight(distribution)
    newton = make_quantizer(weight, granularity, group_size, init="newton")
    absmax = make_quantizer(weight, granularity, group_size, init="absmax")
    rows, groups = newton.f.shape

    with torch.no_grad():
        newton_mse = (newton(weight) - weight).pow(2).reshape(rows, groups, -1).mean(dim=-1)
        absmax_mse = (absmax(weight) - weight).pow(2).reshape(rows, groups, -1).mean(dim=-1)

    # Each group keeps f = 1 where Newton would be worse. A group whose Newton threshold converged onto
    # max|W| can end with f a few ulp above 1, which moves its MSE by float round-off only, hence the 1e-5.
    assert bool((newton_mse <= absmax_mse * (1 + 1e-5)).all())


@pytest.mark.parametrize("distribution", ["gaussian", "student_t3", "laplace"])
def test_newton_near_grid_optimum(distribution):
    weight = sample_weight(distribution)
    newton = make_quantizer(weight, "per_tensor")
    quantizer = make_quantizer(weight, "per_tensor", init="absmax")

    best = math.inf
    for f in torch.linspace(0.01, 1.0, 100).tolist():
        with torch.no_grad():
            quantizer.f.fill_(f)
        best = min(best, weight_mse(quantizer, weight).item())

    # A per-tensor group of 16384 weights has a smooth MSE curve, so Newton lands within 1% of the best f.
    assert weight_mse(newton, weight).item() <= 1.01 * best


@pytest.mark.parametrize("distribution", ["gaussian", "student_t3", "laplace"])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_newton_converges_large_groups(distribution, granularity):
    weight = sample_weight(distribution)
    rows = 1 if granularity == "per_tensor" else weight.shape[0]

    result = newton_clip(weight.reshape(rows, 1, -1), max_iterations=50)

    assert isinstance(result, NewtonResult)
    assert result.converged
    assert result.iterations < 50
    assert result.last_relative_step < 1e-4
    assert result.clip.shape == (rows, 1)


# (d) Zero, constant and non-finite weights


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_zero_weight_tiny_output(granularity, group_size):
    weight = torch.zeros(4, 32, requires_grad=True)
    quantizer = make_quantizer(weight, granularity, group_size)

    output = quantizer(weight)
    output.sum().backward()

    assert torch.equal(quantizer.f.detach(), torch.ones_like(quantizer.f))
    assert bool(torch.isfinite(output).all())
    assert bool((output.abs() <= TINY_SCALE).all())
    assert bool(torch.isfinite(quantizer.f.grad).all())
    assert bool(torch.isfinite(weight.grad).all())


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_zero_weight_flush_denormal(granularity, group_size):
    weight = torch.zeros(4, 32)
    quantizer = make_quantizer(weight, granularity, group_size)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        output = quantizer(weight).detach()
    finally:
        torch.set_flush_denormal(False)

    # A subnormal scale would be flushed to 0 here, and 0 / 0 would give NaN.
    assert bool(torch.isfinite(output).all())
    assert bool((output.abs() <= TINY_SCALE).all())


def test_zero_group_beside_nonzero():
    torch.manual_seed(4)
    weight = torch.randn(2, 32)
    weight[0, :16] = 0.0
    quantizer = make_quantizer(weight, "per_group", 16)

    output = quantizer(weight).detach()

    assert quantizer.f[0, 0].item() == 1.0
    assert bool((output[0, :16].abs() <= TINY_SCALE).all())
    assert bool((output[0, 16:].abs() > 1e-3).all())


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_constant_weight_finite(granularity, group_size):
    weight = torch.full((4, 32), 0.3, requires_grad=True)
    quantizer = make_quantizer(weight, granularity, group_size)

    output = quantizer(weight)
    output.sum().backward()

    assert bool(torch.isfinite(quantizer.f).all())
    assert bool((quantizer.f > 0).all())
    assert bool(torch.isfinite(output).all())
    assert bool((output == output.flatten()[0]).all())
    assert bool(torch.isfinite(quantizer.f.grad).all())


@pytest.mark.parametrize("bad_value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("init", ["newton", "absmax"])
def test_initialize_rejects_nonfinite(bad_value, init):
    weight = torch.randn(4, 32)
    weight[2, 5] = bad_value
    config = Balanced2BitFakeQuantizeConfig("per_channel", init=init)
    quantizer = Balanced2BitFakeQuantizer(config, weight.shape, module_name="test.layer")

    with pytest.raises(ValueError, match="NaN"):
        quantizer.initialize_(weight)


@pytest.mark.parametrize("bad_value", [math.nan, math.inf])
def test_from_linear_rejects_nonfinite(bad_value):
    linear = torch.nn.Linear(32, 4)
    with torch.no_grad():
        linear.weight[1, 3] = bad_value

    with pytest.raises(ValueError, match=r"blocks\.0\.proj: weight contains NaN"):
        QATLinear.from_linear(linear, module_name="blocks.0.proj")


def test_newton_clip_rejects_nan():
    weight = torch.randn(1, 1, 64)
    weight[0, 0, 7] = math.nan

    with pytest.raises(ValueError, match="NaN"):
        newton_clip(weight)


# (e) Autocast and bf16 weights


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_autocast_codes_fp32_weight(granularity, group_size):
    torch.manual_seed(5)
    weight = torch.randn(64, 256)
    quantizer = make_quantizer(weight, granularity, group_size)
    reference_codes = quantizer.codes(weight)
    reference_output = quantizer(weight)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = quantizer.codes(weight)
        output = quantizer(weight)

    assert torch.equal(codes, reference_codes)
    assert output.dtype == torch.float32
    assert torch.equal(output, reference_output)


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_autocast_codes_bf16_weight(granularity, group_size):
    torch.manual_seed(6)
    weight = torch.randn(64, 256).to(torch.bfloat16)
    quantizer = make_quantizer(weight, granularity, group_size)
    # The same values in fp32 outside autocast are the reference.
    reference_codes = quantizer.codes(weight.float())
    reference_output = quantizer(weight.float())

    with torch.autocast("cpu", dtype=torch.bfloat16):
        codes = quantizer.codes(weight)
        output = quantizer(weight)

    assert torch.equal(codes, reference_codes)
    assert output.dtype == torch.bfloat16
    assert torch.equal(output, reference_output.to(torch.bfloat16))


def test_autocast_linear_grads_fp32():
    torch.manual_seed(7)
    layer = QATLinear.from_linear(torch.nn.Linear(64, 16), Balanced2BitFakeQuantizeConfig("per_channel"))
    inputs = torch.randn(3, 64)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(inputs)
    output.float().sum().backward()

    assert output.dtype == torch.bfloat16
    assert layer.weight_fake_quantizer.f.grad.dtype == torch.float32
    assert bool(torch.isfinite(layer.weight_fake_quantizer.f.grad).all())


# (f) dtype of f


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_f_stays_fp32_after_cast(granularity, group_size):
    torch.manual_seed(8)
    layer = QATLinear.from_linear(
        torch.nn.Linear(64, 16), Balanced2BitFakeQuantizeConfig(granularity, group_size=group_size)
    )
    f_before = layer.weight_fake_quantizer.f.detach().clone()

    layer.to(torch.bfloat16)
    f_after = layer.weight_fake_quantizer.f

    assert layer.weight.dtype == torch.bfloat16
    assert f_after.dtype == torch.float32
    assert isinstance(f_after, torch.nn.Parameter)
    assert f_after.requires_grad
    assert torch.equal(f_after.detach(), f_before)


def test_f_fp32_after_half_roundtrip():
    torch.manual_seed(9)
    layer = QATLinear.from_linear(torch.nn.Linear(64, 16), Balanced2BitFakeQuantizeConfig("per_channel"))
    f_before = layer.weight_fake_quantizer.f.detach().clone()

    layer.half()
    layer.float()

    # A round trip through fp16 would round most f values if f were cast along with the weight.
    assert torch.equal(layer.weight_fake_quantizer.f.detach(), f_before)


def test_bf16_layer_forward_backward():
    torch.manual_seed(10)
    layer = QATLinear.from_linear(torch.nn.Linear(64, 16), Balanced2BitFakeQuantizeConfig("per_group", group_size=16))
    layer.to(torch.bfloat16)
    inputs = torch.randn(3, 64, dtype=torch.bfloat16)

    output = layer(inputs)
    output.float().sum().backward()

    assert output.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.bfloat16
    assert layer.weight_fake_quantizer.f.grad.dtype == torch.float32
