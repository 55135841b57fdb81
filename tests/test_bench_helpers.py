"""Helpers of bench/quality.py, bench/speed.py and bench/gguf_q2k.py on tiny models: quantizer swaps, bits, timing, Q2_K."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tokenizer, qat_model_with_trained_f, qat_modules, requires_cpp_compiler, tiny_qwen3

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_bench(name: str):
    if name in sys.modules:
        return sys.modules[name]
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


quality = load_bench("quality")
speed = load_bench("speed")
gguf_q2k = load_bench("gguf_q2k")


def untied_model():
    """A tiny Qwen3 with a separate lm_head, so that leaving lm_head out is visible."""
    return tiny_qwen3(tie_word_embeddings=False).train()


def forward_backward(model) -> torch.Tensor:
    batch = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    return loss


def test_bits_per_tensor():
    assert quality.bits_per_weight([(8, 64)], "per_tensor") == 2 + 32 / 512


def test_bits_per_channel():
    assert quality.bits_per_weight([(8, 64)], "per_channel", scale_bits=16) == 2 + 16 / 64


def test_bits_per_group():
    assert quality.bits_per_weight([(4, 64), (4, 128)], "per_group", group_size=16) == 4.0


def test_bits_per_group_needs_size():
    with pytest.raises(ValueError, match="group_size"):
        quality.bits_per_weight([(4, 64)], "per_group")


def test_bits_unknown_granularity():
    with pytest.raises(ValueError, match="per_row"):
        quality.bits_per_weight([(4, 64)], "per_row")


def test_linear_shapes_skip_lm_head():
    shapes = quality.linear_shapes(untied_model())
    assert len(shapes) == 2 * 7
    assert (512, 64) not in shapes


def test_paretoq_swap():
    from torchao.prototype.paretoq.models.utils_quant import QuantizeLinear

    model = untied_model()
    weight = model.model.layers[0].mlp.down_proj.weight.detach().clone()
    quality.apply_paretoq(model)
    down = model.model.layers[0].mlp.down_proj
    assert isinstance(down, QuantizeLinear)
    assert type(model.lm_head) is torch.nn.Linear
    assert torch.equal(down.weight, weight)
    assert torch.equal(down.weight_clip_val.squeeze(1), weight.abs().amax(dim=1))


def test_paretoq_trains_step_size():
    model = untied_model()
    quality.apply_paretoq(model)
    loss = forward_backward(model)
    assert math.isfinite(loss.item())
    assert model.model.layers[0].self_attn.q_proj.weight_clip_val.grad.abs().sum() > 0


def test_paretoq_rejects_bias():
    model = torch.nn.Sequential()
    model.add_module("proj", torch.nn.Linear(8, 8, bias=True))
    with pytest.raises(ValueError, match="proj has a bias"):
        quality.apply_paretoq(model)


def test_torchao_swap_per_group():
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model = untied_model()
    quality.apply_torchao_int2(model, "per_group", 16, range_learning=False, example_ids=None)
    assert isinstance(model.model.layers[1].self_attn.o_proj, FakeQuantizedLinear)
    assert type(model.lm_head) is torch.nn.Linear
    assert math.isfinite(forward_backward(model).item())


def test_torchao_range_learning_grads():
    model = untied_model()
    example = torch.randint(0, 512, (1, 16))
    quality.apply_torchao_int2(model, "per_channel", None, range_learning=True, example_ids=example)
    forward_backward(model)
    scale = model.model.layers[0].mlp.up_proj.weight_fake_quantizer.scale
    assert isinstance(scale, torch.nn.Parameter)
    assert scale.grad.abs().sum() > 0


def test_torchao_rejects_per_tensor():
    with pytest.raises(ValueError, match="per_tensor"):
        quality.apply_torchao_int2(untied_model(), "per_tensor", None, False, None)


def test_parameter_groups_split_scales():
    model = untied_model()
    quality.apply_paretoq(model)
    weights, scales = quality.parameter_groups(model, 1e-4, 1e-3, quality.PEER_SCALE_SUFFIXES)
    assert len(scales["params"]) == 2 * 7
    assert scales["lr"] == 1e-3
    assert weights["lr"] == 1e-4


def test_train_curve_and_update():
    model = untied_model()
    quality.apply_ours(model, "per_channel", None)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    blocks = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(1))
    groups = [{"params": [param for param in model.parameters() if param.requires_grad], "lr": 1e-2}]
    curve = quality.train(model, blocks, 3, 2, groups, lambda trained: 1.0, {2, 3}, step_offset=10)
    assert curve == [(12, 1.0), (13, 1.0)]
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


def test_train_with_teacher_lowers_kl():
    from peft_qat2bit.distill import distillation_kl_sum

    teacher = untied_model()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30.0)
    teacher.eval().requires_grad_(False)
    model = untied_model()
    quality.apply_ours(model, "per_channel", None)
    blocks = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))

    def kl(student):
        with torch.no_grad():
            kl_sum, count = distillation_kl_sum(student(input_ids=blocks).logits, teacher(input_ids=blocks).logits, blocks)
        return (kl_sum / count).item()

    before = kl(model)
    groups = [{"params": [param for param in model.parameters() if param.requires_grad], "lr": 3e-3}]
    quality.train(model, blocks, 12, 4, groups, lambda trained: 1.0, set(), teacher=teacher, alpha=0.0)
    assert kl(model) < 0.8 * before


def test_distilled_row_exists():
    rows = {row.name: row for row in quality.quality_rows()}
    assert rows["ours, per channel, distilled"].distill


def test_lora_peer_keeps_fake_quant():
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    model = untied_model()
    quality.apply_torchao_int2(model, "per_group", 16, range_learning=False, example_ids=None)
    peft_model = quality.add_lora(model, "torchao", rank=4)
    base_layer = peft_model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(base_layer, FakeQuantizedLinear)
    trainable = [name for name, param in peft_model.named_parameters() if param.requires_grad]
    assert all("lora_" in name for name in trainable)


def test_quality_rows_names_unique():
    names = [row.name for row in quality.quality_rows()]
    assert len(names) == len(set(names))


def test_plotted_rows_exist():
    names = {row.name for row in quality.quality_rows()}
    for plotted in quality.PLOTTED_ROWS:
        assert plotted in names


def test_format_table_shows_error():
    table = quality.format_table([{"name": "x", "error": "ValueError: bad", "bits_per_weight": 2.0}], 8, 4)
    assert "| x | 2.000 | failed: ValueError: bad | - |" in table


def test_summarize_median():
    summary = speed.summarize([3.0, 1.0, 2.0])
    assert summary["median"] == 2.0
    assert summary["min"] == 1.0
    assert summary["max"] == 3.0


def test_summarize_empty():
    with pytest.raises(ValueError, match="no timings"):
        speed.summarize([])


def test_paired_ratio():
    ratio = speed.paired_ratio([2.0, 3.0, 4.0], [1.0, 2.0, 4.0])
    assert ratio["median"] == 1.5
    assert ratio["min"] == 1.0


def test_paired_ratio_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        speed.paired_ratio([1.0], [1.0, 2.0])


def test_time_interleaved_order():
    calls = []
    first, second = speed.time_interleaved(lambda: calls.append("a"), lambda: calls.append("b"), repeats=2, warmup=1)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert len(first) == 2
    assert len(second) == 2


def test_training_step_updates():
    model = untied_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = model.lm_head.weight.detach().clone()
    speed.training_step(model, optimizer, torch.randint(0, 512, (1, 8)))()
    assert not torch.equal(model.lm_head.weight, before)


def test_newton_init_one_layer():
    result = speed.measure_newton_init("per_channel", layers=1)
    assert result["linears"] == 7
    assert result["total_s"] > 0


@requires_cpp_compiler
def test_quantizer_kernel_timing():
    args = speed.parse_args(["--repeats", "1", "--warmup", "1"])
    result = speed.measure_quantizer_kernel(args)
    assert result["shape"] == [1536, 512]
    assert result["compiled_s"]["count"] == 5  # --repeats 1 times 5 calls of the quantizer alone
    assert result["ratio"]["count"] == 5
    assert result["compiled_s"]["median"] > 0
    assert result["eager_s"]["median"] > 0
    assert result["ratio"]["median"] > 0


# bench/gguf_q2k.py


def test_pad_columns_to_whole_blocks():
    matrix = torch.arange(6.0).reshape(2, 3).numpy()
    padded = gguf_q2k.pad_columns(matrix, multiple=4)
    assert padded.shape == (2, 4)
    assert padded[:, :3].tolist() == matrix.tolist()
    assert padded[:, 3].tolist() == [0.0, 0.0]
    assert gguf_q2k.pad_columns(padded, multiple=4) is padded


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_our_q2k_weight_fp16_half_scale(granularity):
    # hidden 64 is a quarter of a Q2_K block, so every row is padded as SmolLM2's 576 columns are.
    model = qat_model_with_trained_f(granularity)
    for layer in qat_modules(model).values():
        quantizer = layer.weight_fake_quantizer
        with torch.no_grad():
            codes = quantizer.codes(layer.weight).reshape(layer.weight.shape)
            half_scale = (quantizer.scale(layer.weight) / 2).half().float().reshape(-1, 1)
            expected = half_scale * (2 * codes - 1)  # d * (2 q - 3) with q = code + 1
            stored = gguf_q2k.our_q2k_weight(layer)
            assert torch.equal(stored, expected)
            assert torch.allclose(stored, quantizer(layer.weight), rtol=2**-11, atol=0.0)


def test_our_q2k_weight_rejects_groups():
    model = qat_model_with_trained_f("per_group", group_size=16)
    layer = next(iter(qat_modules(model).values()))
    with pytest.raises(ValueError, match="per-group scales"):
        gguf_q2k.our_q2k_weight(layer)


def test_tensor_types_counts_2d_tensors(tmp_path):
    from peft_qat2bit.gguf_export import export_gguf

    tokenizer = build_tokenizer()
    shape = dict(hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=128)
    model = qat_model_with_trained_f("per_channel", vocab_size=len(tokenizer), **shape)
    export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)

    # 2 layers x 7 linears as Q2_K and the tied embedding in f16; norms are 1-D and not counted.
    assert gguf_q2k.tensor_types(tmp_path / "model.gguf") == "Q2_K x14, F16 x1"


@pytest.mark.slow
def test_ggml_q2k_round_trip_padding():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    library = gguf_q2k.ggml_library()
    torch.manual_seed(0)
    weight = torch.randn(8, 320)
    rounded = gguf_q2k.ggml_q2k_round_trip(library, weight)
    assert rounded.shape == weight.shape
    # The first 256 columns are a whole block and the last 64 a padded one; each rounds on its own.
    assert torch.equal(rounded[:, :256], gguf_q2k.ggml_q2k_round_trip(library, weight[:, :256]))
    assert torch.equal(rounded[:, 256:], gguf_q2k.ggml_q2k_round_trip(library, weight[:, 256:]))
    # Each 16-weight sub-block takes at most 4 values (q in 0..3) and stays near the weights.
    for sub_block in rounded.reshape(-1, 16):
        assert sub_block.unique().numel() <= 4
    assert (rounded - weight).abs().max() < weight.abs().max()
    importance = torch.rand(320)
    assert not torch.equal(gguf_q2k.ggml_q2k_round_trip(library, weight, importance), rounded)
