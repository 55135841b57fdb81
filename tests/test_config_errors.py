"""Invalid settings and invalid clip factors raise errors that name the offending value."""

import math
import re

import pytest
import torch
from torchao.quantization import quantize_
from torchao.quantization.granularity import PerAxis, PerGroup

from peft_qat2bit import Balanced2BitFakeQuantizeConfig, QAT2BitConfig, QATLinear, module_filter

Q_PROJ = "model.layers.0.self_attn.q_proj"


def qat_names(model):
    return {name for name, module in model.named_modules() if isinstance(module, QATLinear)}


def set_f(model, name, value):
    quantizer = dict(model.named_modules())[name].weight_fake_quantizer
    with torch.no_grad():
        quantizer.f.fill_(value)


def token_ids():
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (2, 8), generator=generator)


# Config validation


def test_unknown_granularity_named():
    with pytest.raises(ValueError, match="'per_row'"):
        Balanced2BitFakeQuantizeConfig("per_row")


def test_unknown_granularity_lists_choices():
    with pytest.raises(ValueError, match="per_tensor, per_channel, per_group"):
        Balanced2BitFakeQuantizeConfig("per_row")


def test_per_axis_one_rejected():
    with pytest.raises(ValueError, match=re.escape("PerAxis(axis=0)")):
        Balanced2BitFakeQuantizeConfig(PerAxis(axis=1))


def test_group_size_not_dividing(tiny_model):
    config = QAT2BitConfig(Balanced2BitFakeQuantizeConfig("per_group", group_size=48))

    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64"):
        quantize_(tiny_model, config)

    assert qat_names(tiny_model) == set()


def test_group_size_with_per_channel():
    with pytest.raises(ValueError, match="group_size=16 .*'per_channel'"):
        Balanced2BitFakeQuantizeConfig("per_channel", group_size=16)


def test_group_size_with_per_tensor():
    with pytest.raises(ValueError, match="group_size=16 .*'per_tensor'"):
        Balanced2BitFakeQuantizeConfig("per_tensor", group_size=16)


def test_per_group_without_size():
    with pytest.raises(ValueError, match="'per_group' needs group_size"):
        Balanced2BitFakeQuantizeConfig("per_group")


@pytest.mark.parametrize("group_size", [0, -16])
def test_group_size_not_positive(group_size):
    with pytest.raises(ValueError, match=f"positive integer, got {group_size}"):
        Balanced2BitFakeQuantizeConfig("per_group", group_size=group_size)


def test_group_size_conflicts_granularity():
    with pytest.raises(ValueError, match="group_size=16 disagrees with"):
        Balanced2BitFakeQuantizeConfig(PerGroup(32), group_size=16)


def test_unknown_init_named():
    with pytest.raises(ValueError, match="'kmeans'.*newton, absmax"):
        Balanced2BitFakeQuantizeConfig(init="kmeans")


def test_compile_not_bool():
    with pytest.raises(ValueError, match="compile must be True or False, got 'yes'"):
        Balanced2BitFakeQuantizeConfig(compile="yes")


def test_config_without_compile_key_loads():
    # Checkpoints written before the compile field existed have no "compile" entry.
    saved = Balanced2BitFakeQuantizeConfig("per_channel").to_dict()
    del saved["compile"]
    assert Balanced2BitFakeQuantizeConfig.from_dict(saved).compile is False
    assert Balanced2BitFakeQuantizeConfig.from_dict({**saved, "compile": True}).compile is True


def test_newton_iterations_zero():
    with pytest.raises(ValueError, match="newton_iterations must be at least 1, got 0"):
        Balanced2BitFakeQuantizeConfig(newton_iterations=0)


def test_unknown_step_named():
    with pytest.raises(ValueError, match="'quantize'"):
        QAT2BitConfig(step="quantize")


def test_weight_config_wrong_type():
    with pytest.raises(TypeError, match="got dict"):
        QAT2BitConfig(weight_config={"granularity": "per_tensor"})


# Module filters


def test_filter_matches_nothing(tiny_model):
    with pytest.raises(ValueError, match=re.escape("target_modules=['qproj', 'vproj'] matches no nn.Linear")):
        quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(["qproj", "vproj"]))

    assert qat_names(tiny_model) == set()


def test_filter_regex_matches_nothing(tiny_model):
    pattern = r".*\.attn\.q"

    with pytest.raises(ValueError, match=re.escape(f"target_modules={pattern!r} matches no")):
        quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(pattern))


def test_filter_error_lists_linears(tiny_model):
    with pytest.raises(ValueError, match=re.escape(Q_PROJ)):
        quantize_(tiny_model, QAT2BitConfig(), filter_fn=module_filter(["qproj"]))


def test_filter_empty_list():
    with pytest.raises(ValueError, match="target_modules is empty"):
        module_filter([])


# Clip factor f during training


@pytest.mark.parametrize("bad_f", [0.0, -0.25, math.nan, math.inf])
def test_bad_f_in_training(tiny_model, bad_f):
    quantize_(tiny_model, QAT2BitConfig())
    set_f(tiny_model, Q_PROJ, bad_f)
    tiny_model.train()

    with pytest.raises(ValueError, match=re.escape(Q_PROJ) + ": 1 of 1 clip factors f"):
        tiny_model(token_ids())


def test_bad_f_per_channel_count(tiny_model):
    quantize_(tiny_model, QAT2BitConfig(Balanced2BitFakeQuantizeConfig("per_channel")))
    quantizer = dict(tiny_model.named_modules())[Q_PROJ].weight_fake_quantizer
    with torch.no_grad():
        quantizer.f[3, 0] = 0.0
        quantizer.f[5, 0] = math.nan
    tiny_model.train()

    with pytest.raises(ValueError, match=re.escape(Q_PROJ) + ": 2 of 64 clip factors f"):
        tiny_model(token_ids())


def test_bad_f_skipped_in_eval(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())
    set_f(tiny_model, Q_PROJ, 0.0)
    tiny_model.eval()

    logits = tiny_model(token_ids()).logits

    assert logits.shape == (2, 8, 512)


def test_bad_f_skipped_no_grad(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())
    set_f(tiny_model, Q_PROJ, -1.0)
    tiny_model.train()

    with torch.no_grad():
        logits = tiny_model(token_ids()).logits

    assert logits.shape == (2, 8, 512)


def test_bad_f_caught_after_valid_forward(tiny_model):
    # The check is skipped while f keeps its version, so an in-place edit after a valid forward must
    # still be caught by the next training forward.
    quantize_(tiny_model, QAT2BitConfig())
    tiny_model.train()
    tiny_model(token_ids())
    set_f(tiny_model, Q_PROJ, -1.0)

    with pytest.raises(ValueError, match=re.escape(Q_PROJ) + ": 1 of 1 clip factors f"):
        tiny_model(token_ids())


def test_bad_f_caught_after_data_swap(tiny_model):
    quantize_(tiny_model, QAT2BitConfig())
    tiny_model.train()
    tiny_model(token_ids())
    quantizer = dict(tiny_model.named_modules())[Q_PROJ].weight_fake_quantizer
    quantizer.f.data = torch.zeros_like(quantizer.f)

    with pytest.raises(ValueError, match=re.escape(Q_PROJ) + ": 1 of 1 clip factors f"):
        tiny_model(token_ids())
