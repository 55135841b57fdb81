"""Packed 2-bit weights: code packing, Packed2BitLinear, the convert step, packed and snapped exports,
the loader, LoRA on the packed base and the CLI, on tiny Qwen3 models."""

import itertools
import json
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import qat_model_with_trained_f, qat_modules, randomize_lora_b, tiny_qwen3
from peft import PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchao.quantization import quantize_

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    Packed2BitLinear,
    QAT2BitConfig,
    QATLinear,
    QATLoraConfig,
    export_packed,
    export_snapped,
    load_packed,
    load_qat_model,
    save_qat_model,
)
from peft_qat2bit.checkpoint import record_layout
from peft_qat2bit.cli import main as cli_main
from peft_qat2bit.export import PACKED_FILE
from peft_qat2bit.packing import pack_codes, unpack_codes
from peft_qat2bit.tuner.layer import PackedLoraLinear

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 16)]
QUANTIZED_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)

# Loads a snapped export in a fresh interpreter that never imports peft_qat2bit.
LOAD_SNAPPED = """
import sys

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
path, batch_file, logits_file = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(path).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(batch_file)).logits, logits_file)
print("peft_qat2bit imported:", "peft_qat2bit" in sys.modules)
"""


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one CPU thread: the models are tiny, and a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def packed_modules(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, Packed2BitLinear)}


def token_batch(vocab_size=512):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, 12), generator=generator)


def logits(model, batch=None):
    model.eval()
    with torch.no_grad():
        return model(input_ids=token_batch() if batch is None else batch).logits


def safetensors_header(path):
    """Parse a safetensors header by hand: 8-byte little-endian length, then JSON."""
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + length])


def rewrite_metadata(path, **changes):
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    metadata.update(changes)
    save_file(tensors, str(path), metadata=metadata)


@pytest.fixture
def stage_a_dir(tmp_path, tokenizer):
    path = tmp_path / "stage_a"
    save_qat_model(qat_model_with_trained_f(), str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def packed_dir(tmp_path):
    path = tmp_path / "packed"
    export_packed(qat_model_with_trained_f(), path)
    return path


# Packing


def test_pack_every_code_tuple():
    tuples = list(itertools.product(range(-1, 3), repeat=4))
    codes = torch.tensor(tuples, dtype=torch.int8)
    expected = [sum((code + 1) << (2 * index) for index, code in enumerate(quad)) for quad in tuples]

    packed = pack_codes(codes)

    assert packed.dtype == torch.uint8
    assert packed.tolist() == expected
    assert sorted(packed.tolist()) == list(range(256))
    assert torch.equal(unpack_codes(packed, codes.numel()), codes.reshape(-1))


def test_unpack_every_byte_value():
    packed = torch.arange(256, dtype=torch.uint8)
    expected = [[((byte >> (2 * index)) & 3) - 1 for index in range(4)] for byte in range(256)]

    codes = unpack_codes(packed, 4 * 256)

    assert codes.dtype == torch.int8
    assert codes.reshape(256, 4).tolist() == expected
    assert torch.equal(pack_codes(codes), packed)


@pytest.mark.parametrize("shape", [(0,), (1,), (2,), (3,), (5,), (6,), (7,), (3, 5), (7, 3), (2, 3, 3)])
def test_roundtrip_any_numel(shape):
    generator = torch.Generator().manual_seed(len(shape) * 10 + shape[0])
    codes = torch.randint(-1, 3, shape, generator=generator, dtype=torch.int8)

    packed = pack_codes(codes)

    assert packed.numel() == (codes.numel() + 3) // 4
    assert torch.equal(unpack_codes(packed, codes.numel()).reshape(shape), codes)
    assert torch.equal(pack_codes(codes.float()), packed)
    if codes.numel() % 4:
        assert packed[-1].item() >> (2 * (codes.numel() % 4)) == 0


@pytest.mark.parametrize("value", [3.0, -2.0, 0.5, float("nan")])
def test_pack_invalid_code_raises(value):
    codes = torch.tensor([0.0, 1.0, value])
    with pytest.raises(ValueError, match="cannot pack code"):
        pack_codes(codes)


def test_unpack_wrong_length_raises():
    with pytest.raises(ValueError, match="1-D uint8 tensor of 3 bytes for 9 codes, got torch.uint8 of shape \\(2,\\)"):
        unpack_codes(torch.zeros(2, dtype=torch.uint8), 9)


# Packed2BitLinear and the convert step


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_dequantized_equals_fake_quant(granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    for name, layer in qat_modules(model).items():
        packed = Packed2BitLinear.from_qat_linear(layer)
        assert packed.scale.dtype == torch.float32, name
        assert torch.equal(packed.dequantized_weight(), layer.quantized_weight()), name


def test_bf16_dequantized_equals_fake_quant():
    model = qat_model_with_trained_f("per_channel").to(torch.bfloat16)
    for name, layer in qat_modules(model).items():
        packed = Packed2BitLinear.from_qat_linear(layer)
        weight = packed.dequantized_weight()
        assert weight.dtype == torch.bfloat16, name
        assert torch.equal(weight, layer.quantized_weight()), name


def test_cast_keeps_scale_fp32():
    layer = Packed2BitLinear.from_qat_linear(qat_modules(qat_model_with_trained_f())["model.layers.0.mlp.up_proj"])
    expected = layer.dequantized_weight().to(torch.bfloat16)

    layer.to(torch.bfloat16)

    assert layer.scale.dtype == torch.float32
    assert layer.compute_dtype == torch.bfloat16
    assert layer.packed.dtype == torch.uint8
    assert torch.equal(layer.dequantized_weight(), expected)


@pytest.mark.parametrize("autocast", [False, True])
def test_input_and_bias_grads_match_linear(autocast):
    torch.manual_seed(0)
    config = Balanced2BitFakeQuantizeConfig("per_group", group_size=16)
    qat_linear = QATLinear.from_linear(torch.nn.Linear(64, 32), config)
    layer = Packed2BitLinear.from_qat_linear(qat_linear)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_reference = x.detach().clone().requires_grad_(True)
    bias_reference = layer.bias.detach().clone().requires_grad_(True)

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
        out_reference = F.linear(x_reference, layer.dequantized_weight(), bias_reference)
    out.float().pow(2).sum().backward()
    out_reference.float().pow(2).sum().backward()

    assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert x.grad.dtype == torch.float32
    assert torch.equal(out, out_reference)
    assert torch.equal(x.grad, x_reference.grad)
    assert torch.equal(layer.bias.grad, bias_reference.grad)


def test_backward_saves_no_float_weight():
    layer = Packed2BitLinear.from_qat_linear(qat_modules(qat_model_with_trained_f())["model.layers.0.mlp.up_proj"])
    x = torch.randn(2, 3, 64, requires_grad=True)
    saved_numels = []

    def record(tensor):
        saved_numels.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(record, lambda tensor: tensor):
        out = layer(x)
    out.sum().backward()

    assert 128 * 64 not in saved_numels
    assert x.grad is not None


def test_convert_logits_equal():
    model = qat_model_with_trained_f("per_group", 16)
    expected = logits(model)

    quantize_(model, QAT2BitConfig(step="convert"))

    assert len(packed_modules(model)) == QUANTIZED_LAYERS
    assert qat_modules(model) == {}
    assert type(model.lm_head) is torch.nn.Linear
    assert model.model.layers[1].mlp.down_proj.module_name == "model.layers.1.mlp.down_proj"
    assert torch.equal(logits(model), expected)


def test_convert_disabled_quantizer_raises():
    model = qat_model_with_trained_f()
    model.model.layers[0].self_attn.q_proj.weight_fake_quantizer.enabled = False
    with pytest.raises(ValueError, match="model.layers.0.self_attn.q_proj: the fake quantizer is disabled"):
        quantize_(model, QAT2BitConfig(step="convert"))


# Packed export and loader


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_export_load_bit_exact(tmp_path, granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    expected = logits(model)

    export_packed(model, tmp_path / "packed")
    loaded = load_packed(tmp_path / "packed")

    assert packed_modules(loaded).keys() == qat_modules(model).keys()
    for name, layer in qat_modules(model).items():
        reference = Packed2BitLinear.from_qat_linear(layer)
        restored = loaded.get_submodule(name)
        assert torch.equal(restored.packed, reference.packed), name
        assert torch.equal(restored.scale, reference.scale), name
        assert restored.weight_config.to_dict() == layer.weight_config.to_dict(), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert torch.equal(logits(loaded), expected)


def test_export_converted_model(tmp_path):
    model = qat_model_with_trained_f("per_channel")
    expected = logits(model)
    quantize_(model, QAT2BitConfig(step="convert"))

    export_packed(model, tmp_path / "packed")
    loaded = load_packed(tmp_path / "packed")

    for name, layer in packed_modules(model).items():
        assert torch.equal(loaded.get_submodule(name).packed, layer.packed), name
        assert torch.equal(loaded.get_submodule(name).scale, layer.scale), name
    assert torch.equal(logits(loaded), expected)


def test_export_file_contents(packed_dir):
    file = packed_dir / PACKED_FILE
    with safe_open(str(file), framework="pt") as handle:
        keys = set(handle.keys())
        metadata = handle.metadata()
    layers = json.loads(metadata["layers"])

    assert len(layers) == QUANTIZED_LAYERS
    assert layers["model.layers.0.mlp.down_proj"]["shape"] == [64, 128]
    assert layers["model.layers.0.mlp.down_proj"]["config"]["granularity"] == "per_tensor"
    assert metadata["format_version"] == "1"
    assert json.loads(metadata["levels"]) == [-1.5, -0.5, 0.5, 1.5]
    assert metadata["compute_dtype"] == "float32"
    for name in layers:
        assert f"{name}.packed" in keys, name
        assert f"{name}.scale" in keys, name
        assert f"{name}.weight" not in keys, name
    assert not any(key.endswith(".f") for key in keys)
    assert "lm_head.weight" not in keys
    assert (packed_dir / "config.json").is_file()
    assert (packed_dir / "generation_config.json").is_file()


def test_loaded_generate_matches(packed_dir):
    model = qat_model_with_trained_f()
    batch = token_batch()[:1]

    expected = model.generate(input_ids=batch, max_new_tokens=4, do_sample=False, pad_token_id=0)
    generated = load_packed(packed_dir).generate(input_ids=batch, max_new_tokens=4, do_sample=False, pad_token_id=0)

    assert torch.equal(generated, expected)


def test_bf16_checkpoint_logits_equal(tmp_path):
    save_qat_model(qat_model_with_trained_f("per_channel").to(torch.bfloat16), tmp_path / "stage_a")
    # Compared with the loaded checkpoint, not with the cast model: .to(bfloat16) also casts the rotary
    # inv_freq buffer, which is not saved and which from_pretrained and load_packed compute in fp32.
    expected = logits(load_qat_model(str(tmp_path / "stage_a")))

    export_packed(tmp_path / "stage_a", tmp_path / "packed")
    loaded = load_packed(tmp_path / "packed")

    assert loaded.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert torch.equal(logits(loaded), expected)


def test_float_dtype_bf16_export(tmp_path):
    model = qat_model_with_trained_f()
    export_packed(model, tmp_path / "packed", float_dtype=torch.bfloat16)
    loaded = load_packed(tmp_path / "packed")
    up_proj = loaded.model.layers[0].mlp.up_proj

    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16
    assert up_proj.scale.dtype == torch.float32
    assert up_proj.compute_dtype == torch.bfloat16
    expected = model.model.layers[0].mlp.up_proj.quantized_weight().to(torch.bfloat16)
    assert torch.equal(up_proj.dequantized_weight(), expected)


@pytest.mark.parametrize(
    ("granularity", "overrides"),
    [("per_tensor", {}), ("per_channel", {"hidden_size": 640, "intermediate_size": 640, "head_dim": 160,
                                          "num_hidden_layers": 1})],
)
def test_bits_per_weight_bound(tmp_path, granularity, overrides):
    model = qat_model_with_trained_f(granularity, **overrides)
    numel = sum(layer.weight.numel() for layer in qat_modules(model).values())

    report = export_packed(model, tmp_path / "packed")

    header = safetensors_header(tmp_path / "packed" / PACKED_FILE)
    names = set(qat_modules(model))
    code_and_scale_bytes = 0
    for key, entry in header.items():
        name, _, leaf = key.rpartition(".")
        if name in names and leaf in ("packed", "scale"):
            start, end = entry["data_offsets"]
            code_and_scale_bytes += end - start
    assert report.quantized_weights == numel
    assert report.bits_per_weight == code_and_scale_bytes * 8 / numel
    assert report.bits_per_weight <= 2.05
    assert report.file_bytes == (tmp_path / "packed" / PACKED_FILE).stat().st_size


# Snapped export


def test_snapped_loads_without_package(tmp_path):
    model = qat_model_with_trained_f("per_channel")
    record_layout(model)  # as save_qat_model and QATStatsCallback do
    batch = token_batch()
    torch.save(batch, tmp_path / "batch.pt")
    export_snapped(model, tmp_path / "snapped")

    command = [sys.executable, "-c", LOAD_SNAPPED, str(tmp_path / "snapped"), str(tmp_path / "batch.pt"),
               str(tmp_path / "logits.pt")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["peft_qat2bit imported: False"]
    assert torch.equal(torch.load(tmp_path / "logits.pt"), logits(model, batch))
    with safe_open(str(tmp_path / "snapped" / "model.safetensors"), framework="pt") as handle:
        assert not any(key.endswith(".f") for key in handle.keys())
    assert "qat2bit" not in json.loads((tmp_path / "snapped" / "config.json").read_text())
    assert "qat2bit" in model.config.to_dict()


# Invalid files


def test_load_truncated_file_raises(packed_dir):
    file = packed_dir / PACKED_FILE
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupted; export the model again"):
        load_packed(packed_dir)


def test_load_corrupted_header_raises(packed_dir):
    file = packed_dir / PACKED_FILE
    data = bytearray(file.read_bytes())
    data[8:40] = b"#" * 32
    file.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="truncated or corrupted; export the model again"):
        load_packed(packed_dir)


def test_load_format_version_99_raises(packed_dir):
    rewrite_metadata(packed_dir / PACKED_FILE, format_version="99")
    with pytest.raises(ValueError, match="format_version='99', but this release reads version 1"):
        load_packed(packed_dir)


def test_load_config_shape_mismatch_raises(packed_dir):
    config_file = packed_dir / "config.json"
    config = json.loads(config_file.read_text())
    config["intermediate_size"] = 96
    config_file.write_text(json.dumps(config))
    message = r"stores model.layers.0.mlp.gate_proj with weight shape \(128, 64\), but config.json gives it \(96, 64\)"
    with pytest.raises(ValueError, match=message):
        load_packed(packed_dir)


def test_load_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="packed_model.safetensors not found"):
        load_packed(tmp_path)


def test_failed_export_keeps_old(tmp_path, monkeypatch):
    first = qat_model_with_trained_f(seed=0)
    export_packed(first, tmp_path / "packed")
    old_bytes = (tmp_path / "packed" / PACKED_FILE).read_bytes()

    def write_partial_then_fail(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("No space left on device")

    monkeypatch.setattr("peft_qat2bit.export.save_file", write_partial_then_fail)
    with pytest.raises(OSError, match="No space left"):
        export_packed(qat_model_with_trained_f(seed=1), tmp_path / "packed")
    with pytest.raises(OSError, match="No space left"):
        export_packed(qat_model_with_trained_f(seed=1), tmp_path / "other")

    assert sorted(path.name for path in tmp_path.iterdir()) == ["packed"]
    assert (tmp_path / "packed" / PACKED_FILE).read_bytes() == old_bytes


def test_export_plain_model_raises(tmp_path):
    with pytest.raises(ValueError, match="no QATLinear or Packed2BitLinear layers"):
        export_packed(tiny_qwen3(), tmp_path / "packed")
    assert list(tmp_path.iterdir()) == []


# LoRA on the packed base


def test_adapter_on_packed_equals_fake_quant(stage_a_dir, tmp_path):
    peft_model = get_peft_model(load_qat_model(str(stage_a_dir)), QATLoraConfig(r=4, lora_alpha=8))
    randomize_lora_b(peft_model, seed=1)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    expected = logits(peft_model)

    export_packed(stage_a_dir, tmp_path / "packed")
    loaded = PeftModel.from_pretrained(load_packed(tmp_path / "packed"), str(tmp_path / "adapter"))

    lora_layers = [module for module in loaded.modules() if isinstance(module, PackedLoraLinear)]
    assert len(lora_layers) == QUANTIZED_LAYERS
    assert torch.equal(logits(loaded), expected)


@pytest.mark.parametrize(
    ("other_base", "message"),
    [
        (lambda: qat_model_with_trained_f("per_channel"), "saved for another quantizer layout: model.layers.0.self_attn.q_proj"),
        (lambda: qat_model_with_trained_f(intermediate_size=96), r"model.layers.0.mlp.gate_proj had weight shape \(96, 64\)"),
    ],
)
def test_adapter_for_other_base_raises(packed_dir, tmp_path, other_base, message):
    peft_model = get_peft_model(other_base(), QATLoraConfig(r=4))
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(load_packed(packed_dir), str(tmp_path / "adapter"))


def test_lora_trains_on_packed_base(packed_dir, tmp_path):
    peft_model = get_peft_model(load_packed(packed_dir), QATLoraConfig(r=4, lora_alpha=8))
    randomize_lora_b(peft_model, seed=2)
    buffers = {name: buffer.clone() for name, buffer in peft_model.named_buffers()}
    trainable = {name: param for name, param in peft_model.named_parameters() if param.requires_grad}
    batch = token_batch()
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)

    peft_model.train()
    loss_before = peft_model(input_ids=batch, labels=batch).loss
    loss_before.backward()
    optimizer.step()
    loss_after = peft_model(input_ids=batch, labels=batch).loss

    assert len(trainable) == 2 * QUANTIZED_LAYERS
    for name, param in trainable.items():
        assert ".lora_A." in name or ".lora_B." in name, name
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name
    assert loss_after < loss_before
    for name, buffer in peft_model.named_buffers():
        assert torch.equal(buffer, buffers[name]), name

    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(load_packed(packed_dir), str(tmp_path / "adapter"))
    assert torch.equal(logits(reloaded), logits(peft_model))


def test_packed_merge_raises(packed_dir):
    peft_model = get_peft_model(load_packed(packed_dir), QATLoraConfig(r=4))
    with pytest.raises(ValueError, match="cannot merge LoRA into a Packed2BitLinear"):
        peft_model.merge_and_unload()
    unloaded = peft_model.unload()
    assert len(packed_modules(unloaded)) == QUANTIZED_LAYERS


# CLI


def test_cli_export_packed(stage_a_dir, tmp_path):
    out = tmp_path / "packed"
    command = [sys.executable, "-m", "peft_qat2bit.cli", "export", str(stage_a_dir), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stderr
    assert "bits per weight" in result.stdout
    assert (out / "tokenizer.json").is_file()
    assert torch.equal(logits(load_packed(out)), logits(load_qat_model(str(stage_a_dir))))


def test_cli_export_snapped(stage_a_dir, tmp_path, capsys):
    assert cli_main(["export", str(stage_a_dir), str(tmp_path / "snapped"), "--format", "snapped"]) == 0
    assert "snapped float export" in capsys.readouterr().out
    assert (tmp_path / "snapped" / "model.safetensors").is_file()


def test_cli_missing_checkpoint_exits(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        cli_main(["export", str(tmp_path / "missing"), str(tmp_path / "out")])
    assert excinfo.value.code == 1
    assert "peft-qat2bit export: error: checkpoint directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
