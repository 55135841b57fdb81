"""GGUF export for llama.cpp: the quantized linears as exact Q2_K blocks built from the 2-bit codes.

A ggml Q2_K block contains 256 weights: ``scales`` uint8[16] (low nibble ``sc``, high nibble ``m``, one
pair per 16 weights), ``qs`` uint8[64] (2-bit ``q`` in 0..3), then ``d`` and ``dmin`` as fp16, and
decodes to ``d * sc * q - dmin * m`` (``gguf.quants.Q2_K.dequantize_blocks``). Our grid value
``s * (code - 0.5)`` with ``q = code + 1`` is ``s * (q - 1.5)``, which is that formula with ``sc = 2``,
``m = 3`` and ``d = dmin = s / 2``. So a block is exact up to the fp16 rounding of ``s / 2``, and exact
to the bit when ``s / 2`` is an fp16 normal number, provided that one ``s`` covers all 256 weights.
That is the case per tensor and per channel when ``in_features`` is a multiple of 256, and per
group when ``group_size`` is too. Smaller groups would need 16-weight sub-block scales that are small
integer multiples of one ``d``, which trained scales are not, so such layers are rejected unless
``fallback`` names a float type for them.
"""

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .export import (
    ModelOrCheckpoint,
    _check_exportable,
    _float_tensors,
    _load_source,
    packed_layers,
)
from .packing import Packed2BitLinear, unpack_codes
from .quantizer import QMIN

logger = logging.getLogger(__name__)

QK_K = 256  # weights per Q2_K block
Q2K_BLOCK_BYTES = 84  # 16 scale bytes + 64 code bytes + fp16 d + fp16 dmin
Q2K_SCALE_BYTE = 2 | 3 << 4  # sc = 2 in the low nibble, m = 3 in the high nibble
FLOAT_TYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = {"qwen3": "qwen3", "llama": "llama"}  # transformers model_type -> GGUF architecture
# llama.cpp chooses the pre-tokenizer regex from this name. Its converter finds the name by hashing the
# tokenizer's output; here it follows from the architecture.
# NOTE: a llama-arch model whose byte-level BPE is not the Llama 3 one gets the Llama 3 regex.
PRE_TOKENIZERS = {"qwen3": "qwen2", "llama": "llama-bpe"}
FP16_MAX = float(np.finfo(np.float16).max)
FP16_MIN_NORMAL = float(np.finfo(np.float16).tiny)


@dataclass
class GGUFExportReport:
    """Sizes and error of a GGUF export, measured from the tensors written and the file on disk.

    ``max_abs_error`` is the largest ``|our dequantized weight - gguf's Q2_K dequantized weight|`` over
    all Q2_K tensors, with gguf's own reader on the bytes written. It comes from rounding ``s / 2`` to fp16.
    """

    path: Path
    architecture: str
    float_type: str
    fallback: Optional[str] = None
    q2k_layers: int = 0
    q2k_weights: int = 0
    q2k_bytes: int = 0
    max_abs_error: float = 0.0
    fallback_layers: list[str] = field(default_factory=list)
    file_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        return self.q2k_bytes * 8 / self.q2k_weights if self.q2k_weights else 0.0

    def __str__(self) -> str:
        lines = [
            f"GGUF export: {self.path} (architecture {self.architecture})",
            (
                f"  Q2_K linears: {self.q2k_layers} layers, {self.q2k_weights:,} weights, {self.q2k_bytes:,} B = "
                f"{self.bits_per_weight:.4f} bits per weight"
            ),
            f"  max |our weight - gguf Q2_K weight|: {self.max_abs_error:.3g} (fp16 rounding of s/2)",
            f"  other 2-D float tensors: {self.float_type}; norms: f32",
        ]
        if self.fallback_layers:
            examples = ", ".join(self.fallback_layers[:3])
            more = ", ..." if len(self.fallback_layers) > 3 else ""
            lines.append(
                f"  written in {self.fallback} instead of Q2_K: {len(self.fallback_layers)} layers ({examples}{more})"
            )
        lines.append(f"  file size: {self.file_bytes:,} B")
        return "\n".join(lines)


def q2k_blocks(codes: Union[torch.Tensor, np.ndarray], scale: Union[torch.Tensor, np.ndarray, float]) -> np.ndarray:
    """Encode codes in {-1, 0, 1, 2} with one step ``s`` per 256-weight block as Q2_K blocks.

    Args:
        codes: (rows, cols) integer codes; ``cols`` must be a multiple of 256.
        scale: the step ``s``: a scalar for the whole tensor, (rows,) or (rows, 1) per row, or
            (rows, cols / 256) per block.

    Returns:
        uint8 array (rows * cols / 256, 84), blocks in row-major order, which
        ``gguf.quants.Q2_K.dequantize_blocks`` decodes to ``fp16(s / 2) * (2 * (code + 1) - 3)``.

    Raises:
        ValueError: if ``cols`` is not a multiple of 256, a code is out of range, ``scale`` has
            another shape, or ``s / 2`` is not finite in fp16.
    """
    codes = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
    if codes.ndim != 2 or codes.shape[1] % QK_K:
        raise ValueError(f"Q2_K needs (rows, cols) codes with cols a multiple of {QK_K}, got shape {codes.shape}")
    if codes.size and (codes.min() < QMIN or codes.max() > QMIN + 3):
        raise ValueError(f"codes must be in {{-1, 0, 1, 2}}, got values from {codes.min()} to {codes.max()}")
    rows, cols = codes.shape
    half_scale = _half_scale_per_block(scale, rows, cols // QK_K)

    stored = (codes.astype(np.int16) - QMIN).astype(np.uint8).reshape(-1, QK_K)
    # gguf's reader takes bits 2k..2k+1 of qs byte 32h + l as weight 128h + 32k + l.
    by_shift = stored.reshape(-1, 2, 4, 32)
    qs = by_shift[:, :, 0] | by_shift[:, :, 1] << 2 | by_shift[:, :, 2] << 4 | by_shift[:, :, 3] << 6
    qs = qs.reshape(-1, QK_K // 4)

    n_blocks = stored.shape[0]
    scales = np.full((n_blocks, QK_K // 16), Q2K_SCALE_BYTE, dtype=np.uint8)
    d = half_scale.astype(np.float16).reshape(-1, 1).view(np.uint8)
    return np.concatenate([scales, qs, d, d], axis=1)


def _half_scale_per_block(scale, rows: int, blocks_per_row: int) -> np.ndarray:
    values = np.asarray(scale.detach().cpu() if isinstance(scale, torch.Tensor) else scale, dtype=np.float32)
    if values.size == 1:
        values = values.reshape(1, 1)
    elif values.size == rows:
        values = values.reshape(rows, 1)
    elif values.shape != (rows, blocks_per_row):
        raise ValueError(
            f"scale must be a scalar, (rows,) or (rows, cols / {QK_K}) = ({rows}, {blocks_per_row}), "
            f"got shape {values.shape}"
        )
    half = np.broadcast_to(values / 2, (rows, blocks_per_row))
    if not np.all(np.isfinite(half)) or np.any(np.abs(half) > FP16_MAX):
        raise ValueError(f"s / 2 must be finite in fp16 (at most {FP16_MAX}), got a maximum of {np.abs(half).max()}")
    return half


def export_gguf(
    model_or_checkpoint: ModelOrCheckpoint,
    out_path: Union[str, Path],
    tokenizer=None,
    float_type: str = "f16",
    fallback: Optional[str] = None,
) -> GGUFExportReport:
    """Write a llama.cpp GGUF file with the quantized linears as exact Q2_K, and return its report.

    The file is written beside ``out_path`` under a temporary name and moved into place when
    complete, so a failed export leaves nothing under ``out_path`` (or the earlier file intact).

    Args:
        model_or_checkpoint: a Qwen3 or Llama-family model with ``QATLinear`` or ``Packed2BitLinear``
            layers, or a stage A checkpoint directory, loaded with ``load_qat_model``.
        out_path: the .gguf file.
        tokenizer: a byte-level BPE tokenizer (GPT-2 style, as Qwen and Llama 3 use); the default
            loads it from the checkpoint directory.
        float_type: type of the other 2-D tensors (embeddings, a float output layer): f32, f16 or q8_0.
            Norms are always written in f32, as llama.cpp's converter does.
        fallback: write quantized linears that Q2_K cannot store exactly in this type (f32, f16 or q8_0)
            instead of rejecting them. Their weights are the dequantized grid values.

    Raises:
        ValueError: for another architecture, a tokenizer that is missing or not byte-level BPE, or a
            quantized linear that Q2_K cannot store exactly when ``fallback`` is None.
    """
    import gguf

    for name, value in (("float_type", float_type), ("fallback", fallback)):
        if value is not None and value not in FLOAT_TYPES:
            raise ValueError(f"{name}={value!r} is invalid; expected one of {', '.join(FLOAT_TYPES)}")
    model, source = _load_source(model_or_checkpoint)
    layers = packed_layers(model)
    _check_exportable(model, layers)
    config = model.config
    model_type = config.model_type
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"GGUF export supports the model types {', '.join(ARCHITECTURES)}, got {model_type!r}; "
            f"use export_snapped and llama.cpp's convert_hf_to_gguf.py for other architectures"
        )
    tokenizer = _resolve_tokenizer(tokenizer, source)
    arch = ARCHITECTURES[model_type]
    report = GGUFExportReport(path=Path(out_path), architecture=arch, float_type=float_type, fallback=fallback)

    tensors = _quantized_tensors(layers, config, fallback, report)
    tensors.update(_other_tensors(model, layers, float_type))
    name_map = gguf.get_tensor_name_map(_model_arch(arch), config.num_hidden_layers)

    def write(writer) -> None:
        _add_metadata(writer, config, arch)
        _add_tokenizer(writer, tokenizer, config, model_type)
        for hf_name, (array, raw_dtype) in tensors.items():
            writer.add_tensor(_gguf_name(name_map, hf_name), array, raw_dtype=raw_dtype)

    target = Path(out_path)
    _write_gguf_atomically(target, arch, write)
    report.file_bytes = target.stat().st_size
    return report


def _write_gguf_atomically(target: Path, arch: str, write) -> None:
    """Let ``write`` add metadata and tensors to a ``GGUFWriter`` on a temporary file, then move it to ``target``."""
    import gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(handle)
    temp = Path(temp_name)
    try:
        writer = gguf.GGUFWriter(temp, arch)
        try:
            write(writer)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
        finally:
            writer.close()
        # mkstemp creates the file with mode 0600; give it the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        temp.chmod(0o666 & ~umask)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _model_arch(arch: str):
    import gguf

    return {"qwen3": gguf.MODEL_ARCH.QWEN3, "llama": gguf.MODEL_ARCH.LLAMA}[arch]


def _resolve_tokenizer(tokenizer, source: Optional[Path]):
    if tokenizer is None and source is not None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError) as error:
            raise ValueError(
                f"cannot load a tokenizer from {source}: {error}. Save it into the checkpoint directory with "
                f"tokenizer.save_pretrained, or pass tokenizer= to export_gguf"
            ) from error
    if tokenizer is None:
        raise ValueError("a GGUF file needs the tokenizer; pass tokenizer= when exporting a model object")
    return tokenizer


def _quantized_tensors(
    layers: dict[str, Packed2BitLinear], config, fallback: Optional[str], report: GGUFExportReport
) -> dict[str, tuple[np.ndarray, object]]:
    import gguf

    problems = {name: problem for name, layer in layers.items() if (problem := _q2k_problem(layer)) is not None}
    if problems and fallback is None:
        first, reason = next(iter(problems.items()))
        others = f" ({len(problems) - 1} more layers likewise)" if len(problems) > 1 else ""
        raise ValueError(
            f"{first} cannot be written as exact Q2_K: {reason}{others}. Q2_K can store per-tensor or per-channel "
            f"layers whose in_features is a multiple of {QK_K}, and per-group layers whose group_size is. Pass "
            f"fallback='f16' (--fallback f16, or q8_0 / f32) to write the other layers in that type"
        )
    tensors = {}
    for name, layer in layers.items():
        if layer.bias is not None:
            tensors[f"{name}.bias"] = (_permuted(name, layer.bias.detach().float(), config).numpy(), None)
        if name in problems:
            weight = _permuted(name, layer.dequantized_weight().detach().float(), config)
            tensors[f"{name}.weight"] = _float_array(weight, fallback)
            report.fallback_layers.append(name)
            continue
        codes = unpack_codes(layer.packed, layer.out_features * layer.in_features)
        codes = _permuted(name, codes.reshape(layer.out_features, layer.in_features), config)
        scale = _permuted(name, _block_scale(layer), config)
        blocks = q2k_blocks(codes, scale)
        ours = _permuted(name, layer.dequantized_weight().detach().float(), config).numpy()
        theirs = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q2_K).reshape(ours.shape)
        report.max_abs_error = max(report.max_abs_error, float(np.abs(ours - theirs).max()))
        if np.any(np.abs(scale.numpy() / 2) < FP16_MIN_NORMAL):
            logger.warning("%s: some s / 2 are below the fp16 normal range, so Q2_K loses precision there", name)
        tensors[f"{name}.weight"] = (blocks.reshape(layer.out_features, -1), gguf.GGMLQuantizationType.Q2_K)
        report.q2k_layers += 1
        report.q2k_weights += layer.out_features * layer.in_features
        report.q2k_bytes += blocks.nbytes
    if problems:
        first, reason = next(iter(problems.items()))
        logger.warning(
            "%d quantized linears are written in %s instead of Q2_K, such as %s: %s",
            len(problems), fallback, first, reason,
        )
    return tensors


def _q2k_problem(layer: Packed2BitLinear) -> Optional[str]:
    """Return why Q2_K cannot store ``layer`` exactly, or None if one scale covers every 256-weight block."""
    if layer.in_features % QK_K:
        return f"in_features={layer.in_features} is not a multiple of the {QK_K}-weight Q2_K block"
    rows, groups = layer.scale.shape
    if groups == 1:
        return None
    per_block = layer.scale.repeat_interleave(layer.in_features // groups, dim=1).reshape(rows, -1, QK_K)
    if torch.equal(per_block, per_block[..., :1].expand_as(per_block)):
        return None
    return (
        f"its per-group scales (group_size={layer.weight_config.group_size}) vary inside a {QK_K}-weight Q2_K block, "
        f"which has one d for all its 16-weight sub-blocks"
    )


def _block_scale(layer: Packed2BitLinear) -> torch.Tensor:
    """Return the step of each 256-weight block, (out_features, in_features / 256).

    Call only when ``_q2k_problem`` returned None, so that one step covers each block.
    """
    groups = layer.scale.shape[1]
    per_weight = layer.scale.repeat_interleave(layer.in_features // groups, dim=1)
    return per_weight[:, ::QK_K].expand(layer.out_features, -1).clone()


def _permuted(name: str, rows: torch.Tensor, config) -> torch.Tensor:
    """Reorder the rows of a llama-arch q_proj or k_proj tensor as llama.cpp's converter does.

    llama.cpp's LLaMA graph applies rotary embeddings to adjacent pairs, where transformers rotates
    the two halves of each head. Its convert_hf_to_gguf.py therefore permutes these rows, and
    transformers' GGUF loader (``LlamaTensorProcessor``) undoes it. Qwen3 is stored as it is.
    """
    if config.model_type != "llama" or not name.endswith(("self_attn.q_proj", "self_attn.k_proj")):
        return rows
    heads = config.num_attention_heads if name.endswith("q_proj") else config.num_key_value_heads
    order = torch.arange(rows.shape[0]).reshape(heads, 2, rows.shape[0] // heads // 2).transpose(1, 2).reshape(-1)
    return rows[order]


def _float_array(tensor: torch.Tensor, float_type: str) -> tuple[np.ndarray, object]:
    import gguf

    array = tensor.detach().float().cpu().numpy()
    if array.ndim < 2 or float_type == "f32":
        return array, None
    if float_type == "f16":
        return array.astype(np.float16), None
    if array.shape[-1] % 32:
        raise ValueError(f"q8_0 needs rows that are a multiple of 32 weights, got shape {array.shape}; use f16")
    return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0


def _other_tensors(model: torch.nn.Module, layers: dict, float_type: str) -> dict[str, tuple[np.ndarray, object]]:
    tensors = {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, tensor in _float_tensors(model, set(layers), None).items():
        if tied and key == "lm_head.weight":
            continue
        tensors[key] = _float_array(_permuted(key.rpartition(".")[0], tensor, model.config), float_type)
    return tensors


def _gguf_name(name_map, hf_name: str) -> str:
    base, _, suffix = hf_name.rpartition(".")
    gguf_base = name_map.get_name(base)
    if gguf_base is None:
        raise ValueError(f"the tensor {hf_name} has no llama.cpp name in gguf's tensor map; it cannot be exported")
    return f"{gguf_base}.{suffix}"


def _rope_theta(config) -> float:
    parameters = getattr(config, "rope_parameters", None) or {}
    theta = parameters.get("rope_theta", getattr(config, "rope_theta", None))
    if theta is None:
        raise ValueError(f"{config.model_type} config has no rope_theta")
    if parameters.get("rope_type", "default") != "default":
        raise ValueError(
            f"rope_type={parameters['rope_type']!r} is not supported by this GGUF export; only default RoPE is written"
        )
    return float(theta)


def _add_metadata(writer, config, arch: str) -> None:
    import gguf

    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(getattr(config, "_name_or_path", "") or f"{arch} 2-bit QAT")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    # The file type names the main weight type; Q2_K is what the linears, the bulk of the weights, use.
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q2_K)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_tokenizer(writer, tokenizer, config, model_type: str) -> None:
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    model = state.get("model") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(state.get("pre_tokenizer")):
        raise ValueError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 style, as Qwen and Llama 3 use), got "
            f"{type(tokenizer).__name__} with model {model.get('type')!r}; convert this model with llama.cpp's "
            f"convert_hf_to_gguf.py from an export_snapped directory instead"
        )
    vocab = dict(model["vocab"])
    special = set()
    for added in state.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["id"])
    size = max(config.vocab_size, max(vocab.values()) + 1)
    if size > config.vocab_size:
        raise ValueError(
            f"the tokenizer has token ids up to {size - 1}, but the model's vocab_size is {config.vocab_size}; "
            f"pass the tokenizer the model was trained with"
        )
    tokens = [f"[PAD{index}]" for index in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.NORMAL
    for added in state.get("added_tokens", []):
        types[added["id"]] = gguf.TokenType.CONTROL if added["id"] in special else gguf.TokenType.USER_DEFINED
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZERS[model_type])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str):
        writer.add_chat_template(template)
