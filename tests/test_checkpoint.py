"""Save and load of stage A models with ``save_qat_model`` / ``load_qat_model``, and ``quantizer_statistics``."""

import json

import pytest
import torch

from conftest import logits_of, qat_model_with_trained_f, qat_modules, tiny_qwen3, token_ids
from peft_qat2bit import (
    Balanced2BitFakeQuantizeConfig,
    load_qat_model,
    quantizer_statistics,
    save_qat_model,
)
from peft_qat2bit.quantizer import LEVELS

GRANULARITIES = [("per_tensor", None), ("per_channel", None), ("per_group", 16)]


def edit_config_json(path, edit):
    config_file = path / "config.json"
    config = json.loads(config_file.read_text())
    edit(config)
    config_file.write_text(json.dumps(config))


# Round trip


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_roundtrip_logits_exact(tmp_path, granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    expected = logits_of(model)

    save_qat_model(model, tmp_path / "ckpt")
    loaded = load_qat_model(tmp_path / "ckpt")

    assert torch.equal(logits_of(loaded), expected)


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_roundtrip_state_exact(tmp_path, granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    expected = model.state_dict()

    save_qat_model(model, tmp_path / "ckpt")
    loaded = load_qat_model(tmp_path / "ckpt").state_dict()

    assert loaded.keys() == expected.keys()
    for key, tensor in expected.items():
        assert loaded[key].dtype == tensor.dtype, key
        assert torch.equal(loaded[key], tensor), key


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_roundtrip_keeps_layout(tmp_path, granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    expected = {name: module.weight_config.to_dict() for name, module in qat_modules(model).items()}

    save_qat_model(model, tmp_path / "ckpt")
    loaded = load_qat_model(tmp_path / "ckpt")

    assert {name: module.weight_config.to_dict() for name, module in qat_modules(loaded).items()} == expected


def test_loaded_model_train_ready(tmp_path):
    model = qat_model_with_trained_f("per_channel")
    save_qat_model(model, tmp_path / "ckpt")

    loaded = load_qat_model(tmp_path / "ckpt")
    loaded.train()
    loaded(token_ids(), labels=token_ids()).loss.backward()
    parameter_names = {name for name, _ in loaded.named_parameters()}

    assert qat_modules(loaded).keys() == qat_modules(model).keys()
    for name, module in qat_modules(loaded).items():
        f = module.weight_fake_quantizer.f
        assert f"{name}.weight_fake_quantizer.f" in parameter_names, name
        assert f.requires_grad, name
        assert f.dtype == torch.float32, name
        assert f.grad is not None, name
        assert module.weight.grad is not None, name


def test_load_infers_layout_without_key(tmp_path):
    # A Trainer checkpoint written without QATStatsCallback has no qat2bit entry in config.json.
    model = qat_model_with_trained_f("per_group", 16)
    expected = logits_of(model)
    save_qat_model(model, tmp_path / "ckpt")
    edit_config_json(tmp_path / "ckpt", lambda config: config.pop("qat2bit"))

    loaded = load_qat_model(tmp_path / "ckpt")
    layer = loaded.model.layers[0].mlp.down_proj

    assert layer.weight_config.to_dict()["group_size"] == 16
    assert torch.equal(logits_of(loaded), expected)


def test_load_matching_config_keeps_f(tmp_path):
    model = qat_model_with_trained_f("per_channel")
    save_qat_model(model, tmp_path / "ckpt")
    expected = model.model.layers[1].self_attn.o_proj.weight_fake_quantizer.f.detach()

    # init differs, but init does not change the layout, and a loaded f is never re-initialised.
    requested = Balanced2BitFakeQuantizeConfig("per_channel", init="absmax")
    loaded = load_qat_model(tmp_path / "ckpt", weight_config=requested)

    assert torch.equal(loaded.model.layers[1].self_attn.o_proj.weight_fake_quantizer.f.detach(), expected)


# Invalid checkpoints


def test_load_other_layout_rejected(tmp_path):
    save_qat_model(qat_model_with_trained_f("per_channel"), tmp_path / "ckpt")
    requested = Balanced2BitFakeQuantizeConfig("per_group", group_size=16)

    with pytest.raises(ValueError) as excinfo:
        load_qat_model(tmp_path / "ckpt", weight_config=requested)

    message = str(excinfo.value)
    assert "saved with {'granularity': 'per_channel'" in message
    assert "weight_config={'granularity': 'per_group', 'group_size': 16" in message


def test_load_plain_model_rejected(tmp_path):
    tiny_qwen3().save_pretrained(tmp_path / "plain")

    with pytest.raises(ValueError, match="weight_fake_quantizer.f' tensors, so it is not a QAT checkpoint"):
        load_qat_model(tmp_path / "plain")


def test_load_format_version_99(tmp_path):
    save_qat_model(qat_model_with_trained_f(), tmp_path / "ckpt")
    edit_config_json(tmp_path / "ckpt", lambda config: config["qat2bit"].update(format_version=99))

    with pytest.raises(ValueError, match="format_version=99"):
        load_qat_model(tmp_path / "ckpt")


def test_save_plain_model_rejected(tmp_path):
    with pytest.raises(ValueError, match="no QATLinear layers"):
        save_qat_model(tiny_qwen3(), tmp_path / "ckpt")

    assert list(tmp_path.iterdir()) == []


# Atomic save


def test_save_replaces_directory(tmp_path):
    save_qat_model(qat_model_with_trained_f(seed=0), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "stale.txt").write_text("left from the first save")
    second = qat_model_with_trained_f(seed=1)

    save_qat_model(second, tmp_path / "ckpt")
    loaded = load_qat_model(tmp_path / "ckpt")

    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]
    assert not (tmp_path / "ckpt" / "stale.txt").exists()
    assert torch.equal(logits_of(loaded), logits_of(second))


def test_save_keeps_subdirectories(tmp_path):
    """Scripts save the final model into the Trainer's output_dir, beside its checkpoint-N directories."""
    save_qat_model(qat_model_with_trained_f(seed=0), tmp_path / "out")
    (tmp_path / "out" / "checkpoint-2").mkdir()
    (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").write_text("{}")

    save_qat_model(qat_model_with_trained_f(seed=1), tmp_path / "out")

    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").read_text() == "{}"
    assert [path.name for path in tmp_path.iterdir()] == ["out"]


def test_failed_save_keeps_old(tmp_path, monkeypatch):
    first = qat_model_with_trained_f(seed=0)
    save_qat_model(first, tmp_path / "ckpt")
    weights_before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()

    second = qat_model_with_trained_f(seed=1)

    def save_one_file_then_fail(save_directory, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"truncated")
        raise OSError("No space left on device")

    monkeypatch.setattr(second, "save_pretrained", save_one_file_then_fail)

    with pytest.raises(OSError, match="No space left"):
        save_qat_model(second, tmp_path / "ckpt")

    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == weights_before
    assert torch.equal(logits_of(load_qat_model(tmp_path / "ckpt")), logits_of(first))


def test_save_creates_parent(tmp_path):
    save_qat_model(qat_model_with_trained_f(), tmp_path / "runs" / "stage_a")

    assert (tmp_path / "runs" / "stage_a" / "model.safetensors").is_file()
    assert [path.name for path in (tmp_path / "runs").iterdir()] == ["stage_a"]


# quantizer_statistics


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_stats_levels_sum_one(granularity, group_size):
    stats = quantizer_statistics(qat_model_with_trained_f(granularity, group_size))
    level_total = sum(stats[f"qat/level_{level:+.1f}"] for level in LEVELS)

    assert level_total == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_stats_clip_fraction_range(granularity, group_size):
    stats = quantizer_statistics(qat_model_with_trained_f(granularity, group_size))

    assert 0.0 <= stats["qat/clip_fraction"] <= 1.0
    # Newton clips inside max|W|, so some weights lie beyond c.
    assert stats["qat/clip_fraction"] > 0.0


@pytest.mark.parametrize(("granularity", "group_size"), GRANULARITIES)
def test_stats_mean_f_all_elements(granularity, group_size):
    model = qat_model_with_trained_f(granularity, group_size)
    all_f = torch.cat([module.weight_fake_quantizer.f.detach().flatten() for module in qat_modules(model).values()])

    stats = quantizer_statistics(model)

    assert stats["qat/mean_f"] == pytest.approx(all_f.double().mean().item(), rel=1e-12)


def test_stats_level_fractions_exact():
    model = qat_model_with_trained_f("per_group", 16)
    counts = torch.zeros(len(LEVELS), dtype=torch.float64)
    total = 0
    for module in qat_modules(model).values():
        quantizer = module.weight_fake_quantizer
        rows, groups = quantizer.f.shape
        grouped_weight = module.weight.detach().reshape(rows, groups, -1)
        scale = quantizer.f.detach().unsqueeze(-1) * grouped_weight.abs().amax(dim=-1, keepdim=True) / 2
        output = module.quantized_weight().detach().reshape(rows, groups, -1)
        for index, level in enumerate(LEVELS):
            counts[index] += (output == scale * level).sum().item()
        total += output.numel()

    stats = quantizer_statistics(model)

    assert counts.sum().item() == total
    for index, level in enumerate(LEVELS):
        assert stats[f"qat/level_{level:+.1f}"] == pytest.approx(counts[index].item() / total, abs=1e-12), level


def test_stats_plain_model_empty():
    assert quantizer_statistics(tiny_qwen3()) == {}


def test_load_adapter_directory_hints(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="is a PEFT adapter directory"):
        load_qat_model(str(tmp_path))


def test_load_missing_directory_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_qat_model(str(tmp_path / "missing"))


def test_loaded_name_is_absolute(tmp_path, monkeypatch):
    save_qat_model(qat_model_with_trained_f("per_channel", None), tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    loaded = load_qat_model("ckpt")
    assert loaded.name_or_path == str((tmp_path / "ckpt").resolve())
