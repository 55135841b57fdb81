"""``QATLoraModel``: PEFT's ``LoraModel`` that puts LoRA on the 2-bit ``QATLinear`` and ``Packed2BitLinear`` layers."""

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.error import NoMatchingPeftModuleError

from ..linear import QATLinear
from ..packing import Packed2BitLinear
from .base import prepare_base, quantized_layers
from .config import QATLoraConfig
from .layer import PackedLoraLinear, QATLoraLinear


class QATLoraModel(LoraModel):
    """LoRA tuner for quality recovery on a frozen balanced 2-bit model (``peft_type`` ``QAT2BIT_LORA``).

    Before adapters are added, ``prepare_base`` makes sure the model has its 2-bit layers (it quantizes
    a float model) and that they match the adapter's recorded ``qat_layout``. Targets are matched as in
    LoRA; the default is every ``QATLinear`` or ``Packed2BitLinear``. A ``QATLinear`` target gets a
    ``QATLoraLinear``, a ``Packed2BitLinear`` target a ``PackedLoraLinear``, any other target PEFT's
    usual LoRA layer. PEFT then freezes everything but the LoRA matrices, so the base weights, every
    ``f`` and the packed codes stay fixed.
    """

    prefix: str = "lora_"

    def _prepare_adapter_config(self, peft_config: QATLoraConfig, model_config: dict) -> QATLoraConfig:
        # target_modules=None means every QATLinear, which is only known once _prepare_model has run.
        return peft_config

    def _prepare_model(self, peft_config: QATLoraConfig, model: torch.nn.Module) -> None:
        super()._prepare_model(peft_config, model)
        prepare_base(model, peft_config)
        if peft_config.target_modules is None:
            peft_config.target_modules = set(quantized_layers(model))

    def inject_adapter(self, model: torch.nn.Module, adapter_name: str, *args, **kwargs) -> None:
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
        except NoMatchingPeftModuleError as error:
            names = sorted(quantized_layers(model))[:4]
            raise NoMatchingPeftModuleError(
                f"{error} The model's QATLinear layers include {names}; give target_modules as such names or "
                f"name suffixes (e.g. ['q_proj', 'v_proj']), or leave it None to adapt every QATLinear."
            ) from error

    @staticmethod
    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        base_layer = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
        if isinstance(base_layer, QATLinear) and kwargs.get("parameter_name") is None:
            kwargs.pop("parameter_name", None)
            return QATLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        if isinstance(base_layer, Packed2BitLinear) and kwargs.get("parameter_name") is None:
            kwargs.pop("parameter_name", None)
            return PackedLoraLinear(target, adapter_name, config=lora_config, **kwargs)
        return LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)

    def _replace_module(self, parent, child_name, new_module, child):
        base_layer = child.get_base_layer() if isinstance(child, BaseTunerLayer) else child
        if not isinstance(base_layer, Packed2BitLinear):
            return super()._replace_module(parent, child_name, new_module, child)
        # LoraModel places the adapter by the base layer's weight, which a packed layer lacks. PackedLoraLinear
        # has already put the adapter on the device of the packed codes.
        setattr(parent, child_name, new_module)
