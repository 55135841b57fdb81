"""Balanced 2-bit quantization-aware training and LoRA quality recovery for Hugging Face causal LMs."""

from .api import QAT2BitConfig, module_filter
from .callbacks import EMACallback, QATStatsCallback
from .checkpoint import load_qat_model, qat_linears, save_qat_model
from .export import export_packed, export_snapped, load_packed
from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .fake_quantizer import Balanced2BitFakeQuantizer
from .linear import QATLinear
from .packing import Packed2BitLinear
from .stats import quantizer_statistics
from .tuner import QATLoraConfig

__version__ = "0.1.0"

__all__ = [
    "Balanced2BitFakeQuantizeConfig",
    "Balanced2BitFakeQuantizer",
    "EMACallback",
    "Packed2BitLinear",
    "QAT2BitConfig",
    "QATLinear",
    "QATLoraConfig",
    "QATStatsCallback",
    "export_packed",
    "export_snapped",
    "load_packed",
    "load_qat_model",
    "module_filter",
    "qat_linears",
    "quantizer_statistics",
    "save_qat_model",
]
