"""Stage B: the QAT2BIT_LORA PEFT method on tiny Qwen3 models, with real PEFT, TRL and checkpoints."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora_b, tiny_qwen3, tiny_sft_config, write_alpaca_file
from datasets import Dataset
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils.peft_types import PeftType
from torchao.quantization import quantize_
from trl import ScriptArguments, SFTConfig, SFTTrainer, TrlParser

from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    Balanced2BitFakeQuantizer,
    QAT2BitConfig,
    QATLinear,
    QATLoraConfig,
    load_qat_model,
    save_qat_model,
)
from peft_qat2bit.data import alpaca_to_chat
from peft_qat2bit.tuner import QATLoraLinear, QATLoraModel
from peft_qat2bit.tuner.base import quantized_layers

QUANTIZED_LAYERS = 14  # 2 decoder layers x (q, k, v, o, gate, up, down)

# Loads a saved adapter in a fresh interpreter that imports PEFT but not peft_qat2bit.
LOAD_WITHOUT_IMPORT = """
import sys

import peft
from transformers import AutoModelForCausalLM

stage_a_dir, adapter_dir = sys.argv[1:]
loads = [
    lambda: peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stage_a_dir), adapter_dir),
    lambda: peft.AutoPeftModelForCausalLM.from_pretrained(adapter_dir),
]
for load in loads:
    try:
        load()
    except Exception as error:
        print(f"{type(error).__name__}: {error}")
print("peft_qat2bit imported:", "peft_qat2bit" in sys.modules)
"""


def qat_model(seed=0, granularity="per_tensor", **overrides):
    model = tiny_qwen3(seed=seed, **overrides)
    quantize_(model, QAT2BitConfig(weight_config=Balanced2BitFakeQuantizeConfig(granularity)))
    return model


def token_batch(vocab_size=512):
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (2, 12), generator=generator)


def logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(input_ids=batch).logits


def base_layers(peft_model):
    """Return the QATLinear layers of a PEFT model by their names in the base model."""
    return quantized_layers(peft_model.get_base_model())


@pytest.fixture
def stage_a_dir(tmp_path):
    path = tmp_path / "stage_a"
    save_qat_model(qat_model(), str(path))
    return path


@pytest.fixture
def adapter_dir(stage_a_dir, tmp_path):
    peft_model = get_peft_model(load_qat_model(str(stage_a_dir)), QATLoraConfig(r=4, lora_alpha=8))
    randomize_lora_b(peft_model, seed=1)
    path = tmp_path / "adapter"
    peft_model.save_pretrained(str(path))
    return path, logits(peft_model, token_batch())


@pytest.fixture(autouse=True)
def one_thread():
    """Run each test on one CPU thread: the models are tiny, and a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def quantizer_calls(monkeypatch):
    """Record the module name of every Balanced2BitFakeQuantizer forward call."""
    calls = []
    original_forward = Balanced2BitFakeQuantizer.forward

    def counting_forward(self, weight):
        calls.append(self.module_name)
        return original_forward(self, weight)

    monkeypatch.setattr(Balanced2BitFakeQuantizer, "forward", counting_forward)
    return calls


def test_peft_type_registered():
    assert PeftType.QAT2BIT_LORA == "QAT2BIT_LORA"
    assert PeftType("QAT2BIT_LORA") is PeftType.QAT2BIT_LORA
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.QAT2BIT_LORA] is QATLoraConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.QAT2BIT_LORA] is QATLoraModel
    assert QATLoraConfig().peft_type is PeftType.QAT2BIT_LORA


def test_trainable_params_are_lora_only():
    peft_model = get_peft_model(qat_model(), QATLoraConfig(r=8, lora_alpha=8, lora_dropout=0.05))
    trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    lora_names = {name for name, _ in peft_model.named_parameters() if ".lora_A." in name or ".lora_B." in name}
    assert trainable == lora_names
    assert len(lora_names) == 2 * QUANTIZED_LAYERS
    for layer in base_layers(peft_model).values():
        assert not layer.weight_fake_quantizer.f.requires_grad


def test_default_targets_every_qatlinear():
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    modules = peft_model.get_base_model().named_modules()
    adapted = {name for name, module in modules if isinstance(module, QATLoraLinear)}
    assert adapted == set(base_layers(peft_model))
    assert len(adapted) == QUANTIZED_LAYERS
    assert not isinstance(peft_model.get_base_model().lm_head, QATLoraLinear)


def test_float_model_quantized_then_lora():
    reference = qat_model()
    peft_model = get_peft_model(tiny_qwen3(), QATLoraConfig(r=8))
    layers = base_layers(peft_model)
    assert len(layers) == QUANTIZED_LAYERS
    for name, layer in layers.items():
        expected_f = reference.get_submodule(name).weight_fake_quantizer.f
        assert torch.equal(layer.weight_fake_quantizer.f, expected_f), name
    assert torch.equal(logits(peft_model, token_batch()), logits(reference, token_batch()))


def test_fresh_adapter_matches_stage_a():
    model = qat_model()
    expected = logits(model, token_batch())
    peft_model = get_peft_model(model, QATLoraConfig(r=8, lora_alpha=8, lora_dropout=0.05))
    assert torch.equal(logits(peft_model, token_batch()), expected)


def test_sft_trains_lora_only(tokenizer, alpaca_rows, tmp_path):
    model = qat_model(vocab_size=len(tokenizer))
    base_snapshot = [(name, param, param.detach().clone()) for name, param in model.named_parameters()]
    data = alpaca_to_chat(Dataset.from_list(alpaca_rows))
    args = tiny_sft_config(tmp_path, max_steps=4, learning_rate=1e-2)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
        peft_config=QATLoraConfig(r=8, lora_alpha=8, lora_dropout=0.05),
    )
    loss_before = trainer.evaluate()["eval_loss"]
    trainer.train()
    loss_after = trainer.evaluate()["eval_loss"]

    assert loss_after < loss_before - 0.05
    for name, param, before in base_snapshot:
        assert torch.equal(param, before), name


def test_quantized_weight_computed_once(quantizer_calls):
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    batch = token_batch()
    logits(peft_model, batch)
    assert len(quantizer_calls) == QUANTIZED_LAYERS

    logits(peft_model, batch)
    peft_model.train()
    peft_model(input_ids=batch, labels=batch).loss.backward()
    assert len(quantizer_calls) == QUANTIZED_LAYERS


def test_loaded_base_weights_refresh_cache(quantizer_calls):
    peft_model = get_peft_model(qat_model(seed=0), QATLoraConfig())
    other = qat_model(seed=1)
    reference = qat_model(seed=0)
    for name, layer in quantized_layers(reference).items():
        layer.load_state_dict(other.get_submodule(name).state_dict())
    batch = token_batch()
    expected = logits(reference, batch)
    logits(peft_model, batch)
    calls_before = len(quantizer_calls)

    for name, layer in base_layers(peft_model).items():
        layer.load_state_dict(other.get_submodule(name).state_dict())

    assert torch.equal(logits(peft_model, batch), expected)
    assert len(quantizer_calls) == calls_before + QUANTIZED_LAYERS


def test_weight_copy_refreshes_cache(quantizer_calls):
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    batch = token_batch()
    before = logits(peft_model, batch)
    calls_before = len(quantizer_calls)

    layer = base_layers(peft_model)["model.layers.0.mlp.up_proj"]
    with torch.no_grad():
        layer.weight.copy_(-layer.weight)

    assert not torch.equal(logits(peft_model, batch), before)
    assert len(quantizer_calls) == calls_before + 1


def test_save_writes_adapter_only(adapter_dir, stage_a_dir):
    path, _ = adapter_dir
    files = sorted(file.name for file in path.iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "QAT2BIT_LORA"
    assert config["base_model_name_or_path"] == str(stage_a_dir)
    assert len(config["qat_layout"]["modules"]) == QUANTIZED_LAYERS
    assert config["qat_layout"]["f_initialized_by_adapter"] is False
    assert "import peft_qat2bit" in (path / "README.md").read_text()


def test_saved_tensors_are_lora_only(adapter_dir):
    from safetensors import safe_open

    path, _ = adapter_dir
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = list(handle.keys())
    assert len(keys) == 2 * QUANTIZED_LAYERS
    for key in keys:
        assert ".lora_A." in key or ".lora_B." in key, key


def test_peft_from_pretrained_exact(adapter_dir, stage_a_dir):
    path, expected = adapter_dir
    loaded = PeftModel.from_pretrained(load_qat_model(str(stage_a_dir)), str(path))
    assert torch.equal(logits(loaded, token_batch()), expected)


def test_auto_peft_rebuilds_qat_base(adapter_dir, stage_a_dir):
    path, expected = adapter_dir
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(path))
    layers = base_layers(loaded)
    stage_a = load_qat_model(str(stage_a_dir))
    assert len(layers) == QUANTIZED_LAYERS
    for name, layer in layers.items():
        assert torch.equal(layer.weight_fake_quantizer.f, stage_a.get_submodule(name).weight_fake_quantizer.f), name
    assert torch.equal(logits(loaded, token_batch()), expected)


def test_float_base_adapter_reloads_exact(tmp_path):
    float_dir = tmp_path / "float"
    tiny_qwen3().save_pretrained(str(float_dir))
    from transformers import AutoModelForCausalLM

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(float_dir)), QATLoraConfig(r=4))
    randomize_lora_b(peft_model, seed=2)
    peft_model.save_pretrained(str(tmp_path / "adapter"))

    loaded = AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter"))
    assert torch.equal(logits(loaded, token_batch()), logits(peft_model, token_batch()))


def test_load_without_import_fails(adapter_dir, stage_a_dir):
    path, _ = adapter_dir
    command = [sys.executable, "-c", LOAD_WITHOUT_IMPORT, str(stage_a_dir), str(path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    lines = result.stdout.splitlines()
    assert lines == ["KeyError: 'QAT2BIT_LORA'", "KeyError: 'QAT2BIT_LORA'", "peft_qat2bit imported: False"]


def test_disable_adapter_gives_2bit_base(stage_a_dir):
    peft_model = get_peft_model(load_qat_model(str(stage_a_dir)), QATLoraConfig())
    randomize_lora_b(peft_model, seed=3)
    batch = token_batch()
    with_adapter = logits(peft_model, batch)
    with peft_model.disable_adapter():
        without_adapter = logits(peft_model, batch)
    assert not torch.equal(with_adapter, without_adapter)
    assert torch.equal(without_adapter, logits(load_qat_model(str(stage_a_dir)), batch))


def test_named_adapters_switch():
    peft_model = get_peft_model(qat_model(), QATLoraConfig(r=4))
    peft_model.add_adapter("second", QATLoraConfig(r=8))
    randomize_lora_b(peft_model, seed=4)
    batch = token_batch()
    first = logits(peft_model, batch)

    peft_model.set_adapter("second")
    second = logits(peft_model, batch)
    peft_model.set_adapter("default")

    assert not torch.equal(first, second)
    assert torch.equal(logits(peft_model, batch), first)
    assert peft_model.peft_config["second"].qat_layout == peft_model.peft_config["default"].qat_layout


def test_merge_and_unload_warns_off_grid():
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    randomize_lora_b(peft_model, seed=5)
    batch = token_batch()
    expected = logits(peft_model, batch)

    with pytest.warns(UserWarning, match="off the balanced 2-bit grid"):
        merged = peft_model.merge_and_unload()

    layers = [module for module in merged.modules() if isinstance(module, torch.nn.Linear)]
    assert not any(isinstance(layer, QATLinear) for layer in layers)
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-5, atol=1e-5)


def test_unmerge_restores_base_exactly():
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    randomize_lora_b(peft_model, seed=6)
    batch = token_batch()
    expected = logits(peft_model, batch)
    weights = {name: layer.weight.detach().clone() for name, layer in base_layers(peft_model).items()}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        peft_model.merge_adapter()
    torch.testing.assert_close(logits(peft_model, batch), expected, rtol=1e-5, atol=1e-5)
    peft_model.unmerge_adapter()

    for name, layer in base_layers(peft_model).items():
        assert torch.equal(layer.weight, weights[name]), name
        assert layer.weight_fake_quantizer.enabled, name
    assert torch.equal(logits(peft_model, batch), expected)


def test_unload_returns_qat_model():
    model = qat_model()
    expected = logits(model, token_batch())
    peft_model = get_peft_model(model, QATLoraConfig())
    randomize_lora_b(peft_model, seed=7)
    unloaded = peft_model.unload()
    assert len([module for module in unloaded.modules() if isinstance(module, QATLinear)]) == QUANTIZED_LAYERS
    assert not any(isinstance(module, QATLoraLinear) for module in unloaded.modules())
    assert torch.equal(logits(unloaded, token_batch()), expected)


def test_unmatched_targets_raise():
    with pytest.raises(ValueError, match=r"\{'qproj'\} not found.*leave it None to adapt every QATLinear"):
        get_peft_model(qat_model(), QATLoraConfig(target_modules=["qproj"]))


def test_checkpoint_shape_mismatch_raises(adapter_dir):
    path, _ = adapter_dir
    smaller = tiny_qwen3(intermediate_size=96)
    message = (
        r"model.layers.0.mlp.down_proj: the weight in .*stage_a has shape \(64, 128\), "
        r"but the model's layer has \(64, 96\)"
    )
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(smaller, str(path))


def test_adapter_for_other_shapes_raises(adapter_dir):
    path, _ = adapter_dir
    message = r"saved for another base: model.layers.0.mlp.gate_proj had weight shape \(128, 64\)"
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(qat_model(intermediate_size=96), str(path))


def test_adapter_for_other_layout_raises(adapter_dir):
    path, _ = adapter_dir
    with pytest.raises(ValueError, match="saved for another quantizer layout: model.layers.0.self_attn.q_proj"):
        PeftModel.from_pretrained(qat_model(granularity="per_channel"), str(path))


def test_stage_a_adapter_needs_checkpoint(tmp_path):
    peft_model = get_peft_model(qat_model(), QATLoraConfig())
    peft_model.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match=r"base_model_name_or_path=None is not a local stage A checkpoint"):
        PeftModel.from_pretrained(tiny_qwen3(), str(tmp_path))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"r": 0}, r"r=0 is invalid: the LoRA rank must be a positive integer"),
        ({"r": -4}, r"r=-4 is invalid"),
        ({"lora_dropout": 1.5}, r"lora_dropout=1.5 is invalid"),
        ({"granularity": "per_row"}, r"Unknown granularity 'per_row'"),
        ({"granularity": "per_group"}, r"granularity='per_group' needs group_size"),
        ({"use_dora": True}, r"use_dora=True is not supported"),
        ({"init_lora_weights": "pissa"}, r"init_lora_weights='pissa' is not supported"),
    ],
)
def test_invalid_config_raises(settings, message):
    with pytest.raises(ValueError, match=message):
        QATLoraConfig(**settings)


def test_train_lora_recovery_script_runs(tokenizer, alpaca_rows, tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from train_lora_recovery import LoraArguments, main

    checkpoint = tmp_path / "stage_a"
    save_qat_model(qat_model(vocab_size=len(tokenizer)), str(checkpoint))
    tokenizer.save_pretrained(str(checkpoint))
    data_file = write_alpaca_file(tmp_path, alpaca_rows)
    output_dir = tmp_path / "adapter"

    parser = TrlParser((ScriptArguments, SFTConfig, LoraArguments))
    script_args, training_args, lora_args = parser.parse_args_and_config(
        args=[
            "--qat_checkpoint", str(checkpoint),
            "--dataset_name", str(data_file),
            "--output_dir", str(output_dir),
            "--max_steps", "2",
            "--per_device_train_batch_size", "4",
            "--assistant_only_loss", "true",
            "--max_length", "64",
            "--lora_r", "4",
            "--report_to", "none",
            "--use_cpu", "true",
            "--bf16", "false",
            "--save_strategy", "no",
        ]
    )
    trainer = main(script_args, training_args, lora_args)

    assert (output_dir / "adapter_model.safetensors").is_file()
    assert not (output_dir / "model.safetensors").exists()
    loaded = AutoPeftModelForCausalLM.from_pretrained(str(output_dir))
    batch = token_batch(len(tokenizer))
    assert torch.equal(logits(loaded, batch), logits(trainer.model, batch))
