"""``QATLoraConfig``: PEFT's ``LoraConfig`` for LoRA quality recovery on a frozen balanced 2-bit base."""

import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from peft import LoraConfig
from peft.utils.peft_types import TaskType

from ..fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .peft_type import QAT2BIT_LORA

# Initialisations that only set A and B. PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA and EVA also rewrite the
# base weight or need it in float, which would move a frozen 2-bit base off its grid.
SUPPORTED_LORA_INITS = (True, False, "gaussian", "orthogonal")

MODEL_CARD_HEADING = "## Loading this adapter"
MODEL_CARD_TEXT = f"""{MODEL_CARD_HEADING}

This is a peft-qat2bit `QAT2BIT_LORA` adapter: LoRA trained on top of a frozen balanced 2-bit
fake-quantized base model. PEFT does not know this method by itself, so run `import peft_qat2bit`
before loading, because the import registers it with PEFT. Without the import,
`PeftModel.from_pretrained` and `AutoPeftModelForCausalLM.from_pretrained` fail with
`KeyError: 'QAT2BIT_LORA'`.

```python
import peft_qat2bit
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")
```

`base_model_name_or_path` in `adapter_config.json` names the stage A (QAT) checkpoint, and
`qat_layout` records which layers are quantized and how. Loading rebuilds the 2-bit base from that
checkpoint, including its learned clip factors `f`. While AutoPeft loads the float model first,
transformers reports the `*.weight_fake_quantizer.f` tensors as UNEXPECTED keys, and the adapter's
loader then reads them. To load the base yourself, pass `peft_qat2bit.load_qat_model(checkpoint)`
to `PeftModel.from_pretrained`.
"""


@dataclass
class QATLoraConfig(LoraConfig):
    """LoRA configuration for quality recovery (stage B) on a balanced 2-bit QAT model.

    All of ``LoraConfig`` applies. The adapters go on the ``QATLinear`` layers, whose float weights and
    clip factors ``f`` stay frozen. The forward pass reuses their 2-bit weights, computed once. On a
    model without ``QATLinear`` layers, ``get_peft_model`` first quantizes every ``nn.Linear`` except
    ``lm_head`` with the settings below, as ``quantize_(model, QAT2BitConfig(...))`` does.

    Example::

        import peft_qat2bit
        from peft import get_peft_model

        peft_model = get_peft_model(qat_model, QATLoraConfig(r=32, lora_alpha=32, lora_dropout=0.05))
    """

    task_type: Optional[Union[str, TaskType]] = field(
        default="CAUSAL_LM",
        metadata={"help": "The PEFT task type. CAUSAL_LM, the default, is what AutoPeftModelForCausalLM loads."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Names (or name suffixes) of the layers to adapt, or one regular expression, as in LoraConfig. "
            "The default None adapts every QATLinear layer, that is every layer stage A quantized; lm_head "
            "stays out because stage A keeps it in float. Layers that are not QATLinear get PEFT's plain LoRA."
        },
    )
    granularity: str = field(
        default="per_tensor",
        metadata={
            "help": "Only for a model without QATLinear layers: the scale granularity of the 2-bit quantizer "
            "applied before LoRA, one of per_tensor, per_channel, per_group."
        },
    )
    group_size: Optional[int] = field(
        default=None,
        metadata={"help": "Only with granularity='per_group': input columns per scale group, e.g. 64."},
    )
    init: str = field(
        default="newton",
        metadata={
            "help": "Only for a model without QATLinear layers: how f starts, 'newton' (MSE-optimal clip) or "
            "'absmax' (f = 1)."
        },
    )
    qat_layout: Optional[dict[str, Any]] = field(
        default=None,
        metadata={
            "help": "Written by the tuner, not by hand: the quantized layers of the base (name, settings, weight "
            "shape) and whether f was initialised by the adapter or came with the base. Loading the adapter "
            "checks the base against it."
        },
    )

    def __post_init__(self):
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"r={self.r!r} is invalid: the LoRA rank must be a positive integer, for example r=8")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is invalid: use a probability in [0, 1), e.g. 0.05")
        if self.use_dora:
            raise ValueError(
                "use_dora=True is not supported: DoRA normalises by the base weight it reads, which is the float "
                "weight, not the 2-bit one the forward pass uses; set use_dora=False"
            )
        if self.init_lora_weights not in SUPPORTED_LORA_INITS:
            raise ValueError(
                f"init_lora_weights={self.init_lora_weights!r} is not supported: it changes or needs the float base "
                f"weight, which stays frozen on the 2-bit grid; use one of {SUPPORTED_LORA_INITS}"
            )
        # Raises with the field name and the accepted values if a quantizer setting is invalid.
        self.quantizer_config()
        super().__post_init__()
        self.peft_type = QAT2BIT_LORA

    def quantizer_config(self) -> Balanced2BitFakeQuantizeConfig:
        """Return the quantizer settings used on a model that has not been through stage A."""
        return Balanced2BitFakeQuantizeConfig(self.granularity, group_size=self.group_size, init=self.init)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write ``adapter_config.json`` and add a loading section to ``README.md`` in ``save_directory``."""
        super().save_pretrained(save_directory, **kwargs)
        card_path = os.path.join(save_directory, "README.md")
        text = ""
        if os.path.exists(card_path):
            with open(card_path, encoding="utf-8") as card:
                text = card.read()
        if MODEL_CARD_HEADING not in text:
            with open(card_path, "w", encoding="utf-8") as card:
                card.write(text.rstrip("\n") + "\n\n" + MODEL_CARD_TEXT if text else MODEL_CARD_TEXT)
