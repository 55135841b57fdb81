"""GGUF export: Q2_K blocks against gguf's own reader, files loaded by transformers, rejected layers,
the fallback, atomic writing and the CLI, on tiny Qwen3 and Llama models whose rows are 256 weights."""

import numpy as np
import pytest
import torch
from conftest import build_tokenizer, qat_model_with_trained_f, randomize_lora_b, tiny_qwen3
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torchao.quantization import quantize_
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
)

from peft import LoraConfig, get_peft_model

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    Packed2BitLinear,
    QAT2BitConfig,
    QATLoraConfig,
    save_qat_model,
)
from peft_qat2bit.cli import main as cli_main
from peft_qat2bit.gguf_export import export_gguf, q2k_blocks
from peft_qat2bit.gguf_lora import export_gguf_lora

# Rows of 256 and 512 weights fit whole Q2_K blocks. transformers 5.25 does not read the qwen3 head_dim
# from a GGUF file, so it takes Qwen3Config's default of 128, which the model must use too.
QWEN3_SHAPE = dict(
    hidden_size=256, intermediate_size=512, num_attention_heads=2, num_key_value_heads=1, head_dim=128
)
# A power of two survives the float32 metadata field exactly, so the loaded config matches ours.
RMS_EPS = 2.0**-20
Q2K_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def qwen3_qat(tokenizer, granularity="per_channel", group_size=None):
    return qat_model_with_trained_f(
        granularity, group_size=group_size, vocab_size=len(tokenizer), rms_norm_eps=RMS_EPS, **QWEN3_SHAPE
    )


def llama_qat(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=RMS_EPS,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).float().eval()
    quantize_(model, QAT2BitConfig(Balanced2BitFakeQuantizeConfig("per_channel")))
    return model


def packed_fp16_exact(model):
    """Convert to Packed2BitLinear and round every s / 2 to fp16, so Q2_K stores the weights bit for bit."""
    quantize_(model, QAT2BitConfig(step="convert"))
    for module in model.modules():
        if isinstance(module, Packed2BitLinear):
            module.scale = (module.scale / 2).half().float() * 2
    return model


def packed_modules(model):
    return {name: module for name, module in model.named_modules() if isinstance(module, Packed2BitLinear)}


def token_batch(tokenizer):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, len(tokenizer), (2, 12), generator=generator)


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch).logits


def gguf_tensors(path):
    return {tensor.name: tensor for tensor in GGUFReader(path).tensors}


def test_q2k_blocks_exact_for_fp16_scales():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 3, (3, 512), generator=generator)
    scale = torch.tensor([0.015625, 0.0234375, 3.0])  # s / 2 is an fp16 number
    ours = (scale[:, None] * (codes.float() - 0.5)).numpy()

    theirs = dequantize(q2k_blocks(codes, scale), GGMLQuantizationType.Q2_K).reshape(3, 512)

    assert np.array_equal(ours, theirs)


def test_q2k_blocks_error_is_fp16_rounding():
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-1, 3, (4, 256), generator=generator)
    scale = torch.rand(4, generator=generator) * 0.1 + 0.01
    ours = (scale[:, None] * (codes.float() - 0.5)).numpy()
    rounded = ((scale / 2).half().float() * 2)[:, None] * (codes.float() - 0.5)

    theirs = dequantize(q2k_blocks(codes, scale), GGMLQuantizationType.Q2_K).reshape(4, 256)

    assert np.array_equal(theirs, rounded.numpy())
    # fp16 keeps 11 significant bits, so s / 2 moves by at most 2**-11 of itself.
    assert np.all(np.abs(ours - theirs) <= np.abs(ours) * 2.0**-11)


def test_q2k_blocks_per_block_scale():
    generator = torch.Generator().manual_seed(2)
    codes = torch.randint(-1, 3, (2, 512), generator=generator)
    scale = torch.tensor([[0.5, 0.25], [0.125, 1.0]])  # one s per 256-weight block
    ours = (scale.repeat_interleave(256, dim=1) * (codes.float() - 0.5)).numpy()

    theirs = dequantize(q2k_blocks(codes, scale), GGMLQuantizationType.Q2_K).reshape(2, 512)

    assert np.array_equal(ours, theirs)


def test_q2k_blocks_size():
    blocks = q2k_blocks(torch.zeros(2, 512, dtype=torch.int8), 1.0)

    assert blocks.shape == (4, 84)
    assert blocks.dtype == np.uint8


def test_q2k_blocks_rejects_partial_block():
    with pytest.raises(ValueError, match="multiple of 256"):
        q2k_blocks(torch.zeros(2, 576, dtype=torch.int8), 1.0)


def test_q2k_blocks_rejects_fp16_overflow():
    with pytest.raises(ValueError, match="finite in fp16"):
        q2k_blocks(torch.zeros(1, 256, dtype=torch.int8), 1e6)


@pytest.mark.parametrize("granularity, group_size", [("per_tensor", None), ("per_channel", None), ("per_group", 256)])
def test_export_matches_gguf_reader(tmp_path, tokenizer, granularity, group_size):
    model = packed_fp16_exact(qwen3_qat(tokenizer, granularity, group_size))
    path = tmp_path / "model.gguf"

    report = export_gguf(model, path, tokenizer=tokenizer)

    tensors = gguf_tensors(path)
    for name, layer in packed_modules(model).items():
        index = name.split(".")[2]
        leaf = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[name.split(".")[-1]]
        tensor = tensors[f"blk.{index}.{leaf}.weight"]
        theirs = dequantize(tensor.data, tensor.tensor_type).reshape(layer.out_features, layer.in_features)
        assert tensor.tensor_type == GGMLQuantizationType.Q2_K, name
        assert np.array_equal(theirs, layer.dequantized_weight().numpy()), name
    assert report.max_abs_error == 0.0
    assert report.q2k_layers == Q2K_LAYERS


def test_report_fields(tmp_path, tokenizer):
    path = tmp_path / "model.gguf"

    report = export_gguf(qwen3_qat(tokenizer), path, tokenizer=tokenizer)

    assert report.bits_per_weight == 84 * 8 / 256
    assert report.file_bytes == path.stat().st_size
    assert 0.0 < report.max_abs_error < 1e-4
    assert "2.6250 bits per weight" in str(report)


def test_transformers_loads_qwen3(tmp_path, tokenizer):
    model = qwen3_qat(tokenizer)
    batch = token_batch(tokenizer)
    export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, float_type="f32")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")

    # Only the fp16 rounding of s / 2 (at most 2**-11 of each weight) separates the two models.
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=5e-3)


def test_transformers_loads_exact_qwen3(tmp_path, tokenizer):
    model = packed_fp16_exact(qwen3_qat(tokenizer))
    batch = token_batch(tokenizer)
    export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, float_type="f32")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")

    # Every weight is bit-identical, so only the order of float operations can differ.
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_transformers_loads_f16_floats(tmp_path, tokenizer):
    model = qwen3_qat(tokenizer)
    batch = token_batch(tokenizer)
    export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")

    # f16 embeddings add a relative error of 2**-11 per embedding value on top of the Q2_K scale rounding.
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=2e-2)


def test_transformers_loads_llama_permuted(tmp_path, tokenizer):
    model = packed_fp16_exact(llama_qat(tokenizer))
    batch = token_batch(tokenizer)
    export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, float_type="f32")

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    tensor = gguf_tensors(tmp_path / "model.gguf")["blk.0.attn_q.weight"]
    stored = dequantize(tensor.data, tensor.tensor_type).reshape(256, 256)

    # The file stores q_proj in llama.cpp's row order, and transformers undoes it on load.
    assert not np.array_equal(stored, packed_modules(model)["model.layers.0.self_attn.q_proj"].dequantized_weight().numpy())
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=1e-5, rtol=0)


def test_tokenizer_round_trip(tmp_path, tokenizer):
    export_gguf(qwen3_qat(tokenizer), tmp_path / "model.gguf", tokenizer=tokenizer)
    text = "Translate the sentence to French. The cat sleeps."

    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")

    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.chat_template == tokenizer.chat_template
    assert loaded.eos_token == "<|im_end|>"
    assert loaded.pad_token == "<|endoftext|>"


def test_q8_0_float_type(tmp_path, tokenizer):
    export_gguf(qwen3_qat(tokenizer), tmp_path / "model.gguf", tokenizer=tokenizer, float_type="q8_0")

    tensors = gguf_tensors(tmp_path / "model.gguf")

    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["output_norm.weight"].tensor_type == GGMLQuantizationType.F32


def test_per_group_rejected(tmp_path, tokenizer):
    model = qwen3_qat(tokenizer, "per_group", 64)

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj .*group_size=64.*fallback"):
        export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer)


def test_per_group_fallback_f16(tmp_path, tokenizer):
    model = qwen3_qat(tokenizer, "per_group", 64)
    batch = token_batch(tokenizer)

    report = export_gguf(model, tmp_path / "model.gguf", tokenizer=tokenizer, fallback="f16")

    tensors = gguf_tensors(tmp_path / "model.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="model.gguf")
    assert tensors["blk.0.attn_q.weight"].tensor_type == GGMLQuantizationType.F16
    assert len(report.fallback_layers) == Q2K_LAYERS
    assert report.q2k_layers == 0
    assert f"written in f16 instead of Q2_K: {Q2K_LAYERS} layers" in str(report)
    assert torch.allclose(logits(loaded, batch), logits(model, batch), atol=2e-2)


def test_failed_export_leaves_no_file(tmp_path, tokenizer):
    path = tmp_path / "model.gguf"

    with pytest.raises(ValueError):
        export_gguf(qwen3_qat(tokenizer, "per_group", 64), path, tokenizer=tokenizer)

    assert list(tmp_path.iterdir()) == []


def test_failed_export_keeps_earlier_file(tmp_path, tokenizer, monkeypatch):
    path = tmp_path / "model.gguf"
    export_gguf(qwen3_qat(tokenizer), path, tokenizer=tokenizer)
    earlier = path.read_bytes()

    def fail(self):
        raise OSError("disk full")

    monkeypatch.setattr("gguf.GGUFWriter.write_tensors_to_file", fail)
    with pytest.raises(OSError, match="disk full"):
        export_gguf(qwen3_qat(tokenizer), path, tokenizer=tokenizer)

    assert path.read_bytes() == earlier
    assert [entry.name for entry in tmp_path.iterdir()] == ["model.gguf"]


def test_rejects_missing_tokenizer(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="needs the tokenizer"):
        export_gguf(qwen3_qat(tokenizer), tmp_path / "model.gguf")


def test_rejects_invalid_float_type(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="float_type='bf16' is invalid"):
        export_gguf(qwen3_qat(tokenizer), tmp_path / "model.gguf", tokenizer=tokenizer, float_type="bf16")


def test_cli_gguf(tmp_path, tokenizer, capsys):
    checkpoint = tmp_path / "stage_a"
    save_qat_model(qwen3_qat(tokenizer), str(checkpoint))
    tokenizer.save_pretrained(checkpoint)

    code = cli_main(["export", str(checkpoint), str(tmp_path / "model.gguf"), "--format", "gguf"])

    assert code == 0
    assert "2.6250 bits per weight" in capsys.readouterr().out
    assert gguf_tensors(tmp_path / "model.gguf")["blk.1.ffn_down.weight"].tensor_type == GGMLQuantizationType.Q2_K


def test_cli_gguf_rejects_per_group(tmp_path, tokenizer, capsys):
    checkpoint = tmp_path / "stage_a"
    save_qat_model(qwen3_qat(tokenizer, "per_group", 64), str(checkpoint))
    tokenizer.save_pretrained(checkpoint)

    with pytest.raises(SystemExit) as raised:
        cli_main(["export", str(checkpoint), str(tmp_path / "model.gguf"), "--format", "gguf"])

    assert raised.value.code == 1
    assert "--fallback f16" in capsys.readouterr().err


def test_cli_gguf_rejects_float_dtype(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_main(["export", str(tmp_path), str(tmp_path / "model.gguf"), "--format", "gguf", "--float-dtype", "float16"])

    assert raised.value.code == 2
    assert "use --float-type" in capsys.readouterr().err


@pytest.mark.slow
def test_llama_cpp_reads_export(tmp_path, tokenizer):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    model = packed_fp16_exact(qwen3_qat(tokenizer))
    path = tmp_path / "tiny.gguf"
    export_gguf(model, path, tokenizer=tokenizer, float_type="f32")
    ids = tokenizer("Eat a balanced diet and sleep well.", add_special_tokens=False)["input_ids"]

    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_threads=1, verbose=False)
    try:
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
        completion = llm("Eat a", max_tokens=4, temperature=0)["choices"][0]["text"]
    finally:
        llm.close()

    ours = logits(model, torch.tensor([ids]))[0]
    # llama.cpp quantizes the activations to 8 bits (Q8_K) for its Q2_K dot products. The logits
    # therefore agree closely but not exactly, while the next-token choice agrees everywhere.
    assert (ours - theirs).abs().max() < 0.05
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
    assert isinstance(completion, str)


# GGUF LoRA adapters


def with_adapter(model, seed=1, **config):
    settings = dict(r=8, lora_alpha=16, lora_dropout=0.0)
    peft_model = get_peft_model(model, QATLoraConfig(**{**settings, **config}))
    randomize_lora_b(peft_model, seed)
    return peft_model.eval()


def lora_module(peft_model, name):
    return peft_model.get_submodule(f"base_model.model.{name}")


def test_lora_metadata(tmp_path, tokenizer):
    path = tmp_path / "adapter.gguf"
    report = export_gguf_lora(with_adapter(qwen3_qat(tokenizer)), path)

    reader = GGUFReader(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "qwen3"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == 0.0
    assert len(reader.tensors) == 2 * Q2K_LAYERS
    assert report.layers == Q2K_LAYERS
    assert report.ranks == (8,)
    assert report.file_bytes == path.stat().st_size


def test_lora_tensors_carry_scaling(tmp_path, tokenizer):
    peft_model = with_adapter(qwen3_qat(tokenizer))
    path = tmp_path / "adapter.gguf"
    export_gguf_lora(peft_model, path)

    tensors = gguf_tensors(path)
    module = lora_module(peft_model, "model.layers.1.self_attn.q_proj")
    lora_a = tensors["blk.1.attn_q.weight.lora_a"]
    lora_b = tensors["blk.1.attn_q.weight.lora_b"]
    # ggml lists shapes innermost first: lora_a is [in, r] and lora_b is [r, out].
    assert lora_a.shape.tolist() == [256, 8]
    assert lora_b.shape.tolist() == [8, 256]
    assert np.array_equal(np.asarray(lora_a.data), module.lora_A["default"].weight.detach().numpy())
    # lora_alpha / r = 16 / 8 = 2 is a power of two, so the scaled B is exact.
    assert np.array_equal(np.asarray(lora_b.data), 2.0 * module.lora_B["default"].weight.detach().numpy())


def test_lora_rslora_rank_pattern(tmp_path, tokenizer):
    peft_model = with_adapter(qwen3_qat(tokenizer), use_rslora=True, rank_pattern={"q_proj": 4})
    path = tmp_path / "adapter.gguf"
    report = export_gguf_lora(peft_model, path)

    tensors = gguf_tensors(path)
    for name, gguf_name, scaling in (
        ("model.layers.0.self_attn.q_proj", "blk.0.attn_q", 16 / 4**0.5),
        ("model.layers.0.self_attn.k_proj", "blk.0.attn_k", 16 / 8**0.5),
    ):
        expected = scaling * lora_module(peft_model, name).lora_B["default"].weight.detach()
        assert torch.allclose(torch.from_numpy(np.array(tensors[f"{gguf_name}.weight.lora_b"].data)), expected), name
    assert report.ranks == (4, 8)


def test_lora_llama_b_rows_permuted(tmp_path, tokenizer):
    peft_model = with_adapter(llama_qat(tokenizer))
    path = tmp_path / "adapter.gguf"
    export_gguf_lora(peft_model, path)

    tensors = gguf_tensors(path)
    module = lora_module(peft_model, "model.layers.0.self_attn.q_proj")
    lora_b = 2.0 * module.lora_B["default"].weight.detach()
    # 4 heads of 64 rows: llama.cpp's converter interleaves the two 32-row halves of each head.
    order = torch.arange(256).reshape(4, 2, 32).transpose(1, 2).reshape(-1)
    assert np.array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data), lora_b[order].numpy())
    assert np.array_equal(
        np.asarray(tensors["blk.0.attn_q.weight.lora_a"].data), module.lora_A["default"].weight.detach().numpy()
    )
    v_proj = lora_module(peft_model, "model.layers.0.self_attn.v_proj")
    assert np.array_equal(
        np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data), 2.0 * v_proj.lora_B["default"].weight.detach().numpy()
    )


def test_lora_f16_tensors(tmp_path, tokenizer):
    path = tmp_path / "adapter.gguf"
    export_gguf_lora(with_adapter(qwen3_qat(tokenizer)), path, tensor_type="f16")
    assert gguf_tensors(path)["blk.0.ffn_up.weight.lora_b"].tensor_type == GGMLQuantizationType.F16


def test_lora_from_adapter_directory(tmp_path, tokenizer):
    model = qwen3_qat(tokenizer)
    checkpoint = tmp_path / "stage_a"
    save_qat_model(model, str(checkpoint))
    peft_model = with_adapter(model)
    peft_model.save_pretrained(tmp_path / "adapter")
    export_gguf_lora(peft_model, tmp_path / "from_model.gguf")

    export_gguf_lora(tmp_path / "adapter", tmp_path / "from_directory.gguf", base_checkpoint=checkpoint)

    from_model = gguf_tensors(tmp_path / "from_model.gguf")
    from_directory = gguf_tensors(tmp_path / "from_directory.gguf")
    assert from_model.keys() == from_directory.keys()
    for name in from_model:
        assert np.array_equal(np.asarray(from_model[name].data), np.asarray(from_directory[name].data)), name


def test_lora_missing_base_rejected(tmp_path, tokenizer):
    peft_model = with_adapter(qwen3_qat(tokenizer))
    peft_model.peft_config["default"].base_model_name_or_path = str(tmp_path / "gone")
    peft_model.save_pretrained(tmp_path / "adapter")

    with pytest.raises(ValueError, match="pass the stage A checkpoint"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf")
    assert not (tmp_path / "adapter.gguf").exists()


def test_lora_dora_rejected(tmp_path):
    model = get_peft_model(tiny_qwen3(hidden_size=256, head_dim=128), LoraConfig(r=4, use_dora=True, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA adapters cannot be written"):
        export_gguf_lora(model, tmp_path / "adapter.gguf")


def test_lora_modules_to_save_rejected(tmp_path):
    config = LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = get_peft_model(tiny_qwen3(hidden_size=256, head_dim=128, tie_word_embeddings=False), config)
    with pytest.raises(ValueError, match="also trains whole modules"):
        export_gguf_lora(model, tmp_path / "adapter.gguf")


def test_lora_embedding_rejected(tmp_path):
    model = get_peft_model(tiny_qwen3(hidden_size=256, head_dim=128), LoraConfig(r=4, target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match="LoRA on an embedding"):
        export_gguf_lora(model, tmp_path / "adapter.gguf")


def test_lora_rejects_invalid_tensor_type(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="tensor_type='q8_0' is invalid"):
        export_gguf_lora(with_adapter(qwen3_qat(tokenizer)), tmp_path / "adapter.gguf", tensor_type="q8_0")


def test_cli_export_lora(tmp_path, tokenizer, capsys):
    model = qwen3_qat(tokenizer)
    checkpoint = tmp_path / "stage_a"
    save_qat_model(model, str(checkpoint))
    peft_model = with_adapter(model)
    peft_model.save_pretrained(tmp_path / "adapter")

    code = cli_main(["export-lora", str(tmp_path / "adapter"), str(tmp_path / "adapter.gguf"), "--base", str(checkpoint)])

    assert code == 0
    assert "adapted linears: 14, rank 8" in capsys.readouterr().out
    assert "blk.0.attn_q.weight.lora_a" in gguf_tensors(tmp_path / "adapter.gguf")


def test_cli_export_lora_rejects_missing_adapter(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        cli_main(["export-lora", str(tmp_path / "nothing"), str(tmp_path / "adapter.gguf")])

    assert raised.value.code == 1
    assert f"adapter directory {tmp_path / 'nothing'} does not exist" in capsys.readouterr().err


def test_lora_rejects_directory_without_config(tmp_path):
    (tmp_path / "adapter").mkdir()
    with pytest.raises(ValueError, match="adapter_config.json is missing"):
        export_gguf_lora(tmp_path / "adapter", tmp_path / "adapter.gguf")


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ["qwen3", "llama"])
def test_llama_cpp_applies_lora(tmp_path, tokenizer, architecture):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it compiles llama.cpp)")
    base = packed_fp16_exact(qwen3_qat(tokenizer) if architecture == "qwen3" else llama_qat(tokenizer))
    export_gguf(base, tmp_path / "base.gguf", tokenizer=tokenizer, float_type="f32")
    ids = tokenizer("Eat a balanced diet and sleep well.", add_special_tokens=False)["input_ids"]
    base_logits = logits(base, torch.tensor([ids]))[0]
    peft_model = with_adapter(base)
    export_gguf_lora(peft_model, tmp_path / "adapter.gguf")

    llm = llama_cpp.Llama(
        model_path=str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "adapter.gguf"),
        logits_all=True, n_ctx=64, n_threads=1, verbose=False,
    )
    try:
        llm.eval(ids)
        theirs = torch.tensor(llm.scores[: len(ids)])
    finally:
        llm.close()

    ours = logits(peft_model, torch.tensor([ids]))[0]
    # The adapter moves the logits far more than llama.cpp's 8-bit activation rounding does.
    assert (ours - base_logits).abs().max() > 0.2
    assert (ours - theirs).abs().max() < 0.05
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))
