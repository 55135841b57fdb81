"""GGUF LoRA adapter export: the stage B adapter as a llama.cpp LoRA file for the Q2_K base.

llama.cpp (``src/llama-adapter.cpp``) reads an adapter from a GGUF file with ``general.type =
"adapter"``, ``adapter.type = "lora"``, the base model's architecture, and for each adapted weight
``<tensor>.lora_a`` (ggml shape ``[in, r]``, PEFT's ``lora_A.weight``) and ``<tensor>.lora_b``
(``[r, out]``, PEFT's ``lora_B.weight``). It adds ``scale * B (A x)`` to the base layer's output,
with ``scale = adapter_scale * alpha / r`` when ``adapter.lora.alpha`` is non-zero and
``scale = adapter_scale`` when it is 0. This writer multiplies PEFT's scaling of each layer into
``lora_b`` and writes alpha 0, so rsLoRA and per-layer ranks and alphas come out right, and llama.cpp's
``--lora-scaled FILE SCALE`` scales the adapter as PEFT would.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .gguf_export import ARCHITECTURES, _gguf_name, _model_arch, _permuted, _write_gguf_atomically

ADAPTER_TENSOR_TYPES = ("f32", "f16")
PEFT_PREFIX = "base_model.model."


@dataclass
class GGUFLoraExportReport:
    """Summary of a GGUF LoRA export: where it went, what it contains and its size."""

    path: Path
    architecture: str
    layers: int
    ranks: tuple[int, ...]
    parameters: int
    tensor_type: str
    file_bytes: int = 0

    def __str__(self) -> str:
        ranks = ", ".join(str(rank) for rank in self.ranks)
        return "\n".join([
            f"GGUF LoRA adapter: {self.path} (architecture {self.architecture})",
            f"  adapted linears: {self.layers}, rank {ranks}, {self.parameters:,} parameters in {self.tensor_type}",
            "  PEFT's scaling is multiplied into lora_b and adapter.lora.alpha is 0, so llama.cpp applies scale 1",
            f"  file size: {self.file_bytes:,} B",
        ])


def export_gguf_lora(
    peft_model_or_adapter,
    out_path: Union[str, Path],
    base_checkpoint: Union[str, Path, None] = None,
    tensor_type: str = "f32",
) -> GGUFLoraExportReport:
    """Write the active LoRA adapter of a PEFT model as a llama.cpp GGUF LoRA file, and return its report.

    Use it with the base written by ``export_gguf`` from the same stage A checkpoint, for example
    ``llama-cli -m base.gguf --lora adapter.gguf``. The file is written atomically.

    Args:
        peft_model_or_adapter: a ``PeftModel`` with a LoRA or ``QATLoraConfig`` adapter, or an adapter
            directory written by ``save_pretrained``.
        out_path: the .gguf file.
        base_checkpoint: with an adapter directory, the stage A checkpoint it was trained on; the
            default is the adapter's ``base_model_name_or_path``.
        tensor_type: type of the adapter tensors, f32 or f16.

    Raises:
        ValueError: for another architecture, a DoRA adapter, an adapter on something other than a
            linear layer, extra trained modules (``modules_to_save``, LoRA biases), or a layer that
            llama.cpp has no tensor name for.
    """
    import gguf

    if tensor_type not in ADAPTER_TENSOR_TYPES:
        raise ValueError(f"tensor_type={tensor_type!r} is invalid; expected one of {', '.join(ADAPTER_TENSOR_TYPES)}")
    model = _load_peft_model(peft_model_or_adapter, base_checkpoint)
    config = model.get_base_model().config
    if config.model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports the model types {', '.join(ARCHITECTURES)}, got {config.model_type!r}"
        )
    arch = ARCHITECTURES[config.model_type]
    pairs = _lora_pairs(model, config)
    dtype = np.float32 if tensor_type == "f32" else np.float16
    name_map = gguf.get_tensor_name_map(_model_arch(arch), config.num_hidden_layers)
    tensors = {}
    for name, (lora_a, lora_b) in pairs.items():
        gguf_name = _gguf_name(name_map, f"{name}.weight")
        tensors[f"{gguf_name}.lora_a"] = lora_a.numpy().astype(dtype)
        tensors[f"{gguf_name}.lora_b"] = lora_b.numpy().astype(dtype)

    def write(writer) -> None:
        writer.add_type("adapter")
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
        for tensor_name, array in tensors.items():
            writer.add_tensor(tensor_name, array)

    target = Path(out_path)
    _write_gguf_atomically(target, arch, write)
    report = GGUFLoraExportReport(
        path=target,
        architecture=arch,
        layers=len(pairs),
        ranks=tuple(sorted({lora_a.shape[0] for lora_a, _ in pairs.values()})),
        parameters=sum(lora_a.numel() + lora_b.numel() for lora_a, lora_b in pairs.values()),
        tensor_type=tensor_type,
    )
    report.file_bytes = target.stat().st_size
    return report


def _load_peft_model(peft_model_or_adapter, base_checkpoint):
    from peft import PeftModel

    if isinstance(peft_model_or_adapter, PeftModel):
        return peft_model_or_adapter
    from .checkpoint import load_qat_model

    adapter_dir = Path(peft_model_or_adapter)
    if not adapter_dir.is_dir():
        raise ValueError(f"adapter directory {adapter_dir} does not exist; check the path")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{adapter_dir} is not an adapter directory: {config_file.name} is missing")
    if base_checkpoint is None:
        from peft import PeftConfig

        base_checkpoint = PeftConfig.from_pretrained(str(adapter_dir)).base_model_name_or_path
        if not base_checkpoint or not Path(base_checkpoint).is_dir():
            raise ValueError(
                f"the adapter's base_model_name_or_path {base_checkpoint!r} is not a local directory; pass the "
                f"stage A checkpoint the adapter was trained on as base_checkpoint (CLI: --base)"
            )
    base = load_qat_model(str(base_checkpoint), dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir))


def _lora_pairs(model, config) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Return {layer name: (A, B * scaling)} for the active adapter, fp32 on the CPU, B rows as llama.cpp orders them."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    peft_config = model.peft_config[adapter]
    if getattr(peft_config, "modules_to_save", None):
        raise ValueError(
            f"the adapter also trains whole modules ({peft_config.modules_to_save}), which a GGUF LoRA file "
            f"cannot hold; merge it into a float model instead"
        )
    pairs = {}
    for full_name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        name = full_name.removeprefix(PEFT_PREFIX)
        if adapter in module.lora_embedding_A:
            raise ValueError(f"{name}: LoRA on an embedding cannot be written as a GGUF LoRA adapter")
        if adapter not in module.lora_A:
            continue
        if module.use_dora.get(adapter, False):
            raise ValueError(f"{name}: DoRA adapters cannot be written as a llama.cpp LoRA adapter; use plain LoRA")
        if module.lora_B[adapter].bias is not None:
            raise ValueError(f"{name}: LoRA biases (lora_bias=True) cannot be written as a llama.cpp LoRA adapter")
        lora_a = module.lora_A[adapter].weight.detach().float().cpu()
        lora_b = module.lora_B[adapter].weight.detach().float().cpu() * module.scaling[adapter]
        if lora_a.ndim != 2:
            raise ValueError(f"{name}: only LoRA on linear layers can be exported, got a {lora_a.ndim}-D lora_A")
        pairs[name] = (lora_a.contiguous(), _permuted(name, lora_b, config).contiguous())
    if not pairs:
        raise ValueError(f"the adapter {adapter!r} has no LoRA linear layers to export")
    return pairs
