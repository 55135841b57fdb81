"""The frozen 2-bit base of a QAT LoRA model: build it when missing, record its layout, check it on load."""

import os
from typing import Any

import torch
from torchao.quantization import quantize_

from ..api import QAT2BitConfig
from ..checkpoint import FORMAT_VERSION, apply_qat_checkpoint, read_scale_factors
from ..fake_quantize_config import Balanced2BitFakeQuantizeConfig
from ..linear import QATLinear
from ..packing import Packed2BitLinear
from .config import QATLoraConfig

# PEFT keeps the wrapped layer of a LoRA layer as its child "base_layer".
BASE_LAYER_SUFFIX = ".base_layer"


def quantized_layers(model: torch.nn.Module) -> dict[str, QATLinear | Packed2BitLinear]:
    """Return every ``QATLinear`` and ``Packed2BitLinear`` of ``model`` by layer name, the same before and after
    LoRA wraps it."""
    return {
        name.removesuffix(BASE_LAYER_SUFFIX): module
        for name, module in model.named_modules()
        if isinstance(module, (QATLinear, Packed2BitLinear))
    }


def describe_base(model: torch.nn.Module, f_initialized_by_adapter: bool) -> dict[str, Any]:
    """Return the stage A layout of ``model`` (as ``qat_layout`` writes it to ``config.json``) plus each weight shape.

    A packed base gives the same layout as the fake-quantized model it was converted from.
    ``f_initialized_by_adapter`` is True when ``get_peft_model`` quantized a float model itself, so a
    loader can rebuild ``f`` from the float weights instead of needing a stage A checkpoint.
    """
    configs: list[dict[str, Any]] = []
    modules: dict[str, int] = {}
    shapes: dict[str, list[int]] = {}
    for name, layer in quantized_layers(model).items():
        entry = layer.weight_config.to_dict()
        if entry not in configs:
            configs.append(entry)
        modules[name] = configs.index(entry)
        shapes[name] = [layer.out_features, layer.in_features]
    return {
        "format_version": FORMAT_VERSION,
        "configs": configs,
        "modules": modules,
        "shapes": shapes,
        "f_initialized_by_adapter": f_initialized_by_adapter,
    }


def prepare_base(model: torch.nn.Module, config: QATLoraConfig) -> None:
    """Give ``model`` its frozen 2-bit layers, then record their layout in ``config`` or check them against it.

    A model that already has ``QATLinear`` or ``Packed2BitLinear`` layers is used as it is, and a float
    model is quantized. A new adapter quantizes it with ``config``'s quantizer settings. A saved adapter
    rebuilds it from the stage A checkpoint at ``config.base_model_name_or_path``, or from the recorded
    settings if the adapter initialised ``f`` itself.
    """
    built_here = False
    if not quantized_layers(model):
        build_base(model, config)
        built_here = True
    if config.qat_layout is None:
        config.qat_layout = describe_base(model, f_initialized_by_adapter=built_here)
    else:
        check_base(model, config.qat_layout)


def build_base(model: torch.nn.Module, config: QATLoraConfig) -> None:
    """Quantize the float ``model`` in place as ``prepare_base`` describes."""
    layout = config.qat_layout
    if layout is None:
        quantize_(model, QAT2BitConfig(weight_config=config.quantizer_config()))
        return

    path = config.base_model_name_or_path
    factors = read_scale_factors(path) if _has_safetensors(path) else {}
    if factors:
        apply_qat_checkpoint(model, path, factors=factors)
    elif layout.get("f_initialized_by_adapter"):
        _quantize_as_recorded(model, layout)
    else:
        raise ValueError(
            f"this adapter was trained on a stage A model, whose clip factors f are missing from the float model "
            f"given, and base_model_name_or_path={path!r} is not a local stage A checkpoint; load the base with "
            f"peft_qat2bit.load_qat_model(<stage A checkpoint>) and pass it to PeftModel.from_pretrained"
        )


def _has_safetensors(path: Any) -> bool:
    return isinstance(path, str) and any(
        os.path.isfile(os.path.join(path, name)) for name in ("model.safetensors", "model.safetensors.index.json")
    )


def _quantize_as_recorded(model: torch.nn.Module, layout: dict[str, Any]) -> None:
    # NOTE: the new f equals the training-time f only if the float weights are identical and the init
    # rounds the same way. That holds on one machine; other device types are untested.
    configs = [Balanced2BitFakeQuantizeConfig.from_dict(entry) for entry in layout["configs"]]
    for name, index in layout["modules"].items():
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(f"the adapter quantizes {name!r}, but the model has no nn.Linear of that name")
        model.set_submodule(name, QATLinear.from_linear(linear, configs[index], module_name=name))


def check_base(model: torch.nn.Module, layout: dict[str, Any]) -> None:
    """Raise ValueError if the quantized layers of ``model`` differ from ``layout`` in name, settings or shape."""
    layers = quantized_layers(model)
    expected = set(layout["modules"])
    missing = sorted(expected - set(layers))
    extra = sorted(set(layers) - expected)
    if missing or extra:
        raise ValueError(
            f"the adapter was saved for another base: its qat_layout quantizes {len(expected)} layers, the model "
            f"{len(layers)} (only in the adapter: {missing[:3]}, only in the model: {extra[:3]}); load the stage A "
            f"checkpoint the adapter was trained on"
        )
    configs = [Balanced2BitFakeQuantizeConfig.from_dict(entry) for entry in layout["configs"]]
    for name, layer in layers.items():
        saved_config = configs[layout["modules"][name]]
        if not saved_config.same_layout(layer.weight_config):
            raise ValueError(
                f"the adapter was saved for another quantizer layout: {name} was {saved_config.to_dict()} in "
                f"training but is {layer.weight_config.to_dict()} in this model; load the stage A checkpoint the "
                f"adapter was trained on"
            )
        saved_shape = tuple(layout["shapes"][name])
        shape = (layer.out_features, layer.in_features)
        if saved_shape != shape:
            raise ValueError(
                f"the adapter was saved for another base: {name} had weight shape {saved_shape} in training but "
                f"has {shape} in this model; load the base model the adapter was trained on"
            )
