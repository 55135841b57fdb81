"""LoRA quality recovery on the frozen 2-bit base, registered with PEFT as the method ``QAT2BIT_LORA``.

Importing this package (``import peft_qat2bit`` does) adds ``QAT2BIT_LORA`` to PEFT's ``PeftType`` and
registers ``QATLoraConfig`` and ``QATLoraModel``, so ``get_peft_model``, ``PeftModel.from_pretrained``
and ``AutoPeftModelForCausalLM.from_pretrained`` handle the method like one of PEFT's own.
"""

from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils.peft_types import register_peft_method

from .config import QATLoraConfig
from .layer import QATLoraLinear
from .model import QATLoraModel
from .peft_type import QAT2BIT_LORA

__all__ = ["QAT2BIT_LORA", "QATLoraConfig", "QATLoraLinear", "QATLoraModel"]

# The prefix is LoRA's, so adapter weights keep LoRA's names (lora_A, lora_B) in the state dict.
if QAT2BIT_LORA not in PEFT_TYPE_TO_CONFIG_MAPPING:
    register_peft_method(
        name=QAT2BIT_LORA.value.lower(), config_cls=QATLoraConfig, model_cls=QATLoraModel, prefix="lora_"
    )
