"""Packed 2-bit export and its loader, and the snapped float export.

``export_packed`` writes a directory with ``config.json``, the generation config and the tokenizer
when available, and ``packed_model.safetensors``. In that file each quantized linear ``<name>`` has
``<name>.packed`` (uint8 codes, layout in ``packing``) and ``<name>.scale`` (fp32, (rows, groups)),
and every other tensor of the model (embeddings, norms, a float ``lm_head``, biases) is stored under
its usual name. The safetensors metadata records the format version, the level set, the code layout
and each quantized layer's shape and quantizer settings. ``load_packed`` rebuilds the model from it.

``export_snapped`` writes an ordinary transformers checkpoint whose quantized weights are replaced by
their grid values ``s * (q - 0.5)``, for tools that do not know this package.
"""

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .checkpoint import LAYOUT_KEY, _apply_umask, _replace_directory, load_qat_model
from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .linear import QATLinear
from .packing import Packed2BitLinear
from .quantizer import LEVELS

logger = logging.getLogger(__name__)

PACKED_FILE = "packed_model.safetensors"
PACKING_FORMAT = "peft-qat2bit-packed"
FORMAT_VERSION = 1
CODE_LAYOUT = (
    "code q in {-1, 0, 1, 2} stored as q + 1, four per uint8 byte with the first code in the lowest two bits, "
    "row-major over (out_features, in_features), last byte zero-padded; weight = scale * (q - 0.5) in fp32"
)
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")

ModelOrCheckpoint = Union[torch.nn.Module, str, Path]


@dataclass
class PackedExportReport:
    """Sizes of a packed export, measured from the tensors written and the files on disk.

    ``bits_per_weight`` counts the codes and the fp32 scales of the quantized linears, over their
    weight count. Biases, embeddings, norms and float layers are ``other_tensor_bytes``.
    """

    path: Path
    quantized_layers: int
    quantized_weights: int
    code_bytes: int
    scale_bytes: int
    other_tensor_bytes: int
    file_bytes: int  # PACKED_FILE on disk, safetensors header included
    directory_bytes: int  # every file of the export directory

    @property
    def bits_per_weight(self) -> float:
        return (self.code_bytes + self.scale_bytes) * 8 / self.quantized_weights

    def __str__(self) -> str:
        return "\n".join(
            [
                f"packed export: {self.path}",
                f"  quantized linears: {self.quantized_layers} layers, {self.quantized_weights:,} weights",
                f"  codes {self.code_bytes:,} B + fp32 scales {self.scale_bytes:,} B = "
                f"{self.bits_per_weight:.4f} bits per weight",
                f"  other tensors (embeddings, norms, float layers, biases): {self.other_tensor_bytes:,} B",
                f"  {PACKED_FILE}: {self.file_bytes:,} B; directory total: {self.directory_bytes:,} B",
            ]
        )


def packed_layers(model: torch.nn.Module) -> dict[str, Packed2BitLinear]:
    """Return the packed form of every quantized linear of ``model`` by name.

    ``QATLinear`` layers are converted (the model is not changed); ``Packed2BitLinear`` layers are
    returned as they are.
    """
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, QATLinear):
            layers[name] = Packed2BitLinear.from_qat_linear(module, module_name=name)
        elif isinstance(module, Packed2BitLinear):
            layers[name] = module
    return layers


def export_packed(
    model_or_checkpoint: ModelOrCheckpoint,
    out_dir: Union[str, Path],
    float_dtype: Optional[torch.dtype] = None,
    tokenizer=None,
) -> PackedExportReport:
    """Write the real 2-bit model to ``out_dir`` and return its size report.

    The directory is written beside ``out_dir`` under a temporary name and moved into place when
    complete, so a failed export leaves nothing under ``out_dir`` (or the earlier export intact).

    Args:
        model_or_checkpoint: a model with ``QATLinear`` or ``Packed2BitLinear`` layers, or a stage A
            checkpoint directory, which is loaded with ``load_qat_model``.
        out_dir: the export directory.
        float_dtype: cast the float tensors (embeddings, norms, float layers, biases) and the compute
            dtype of the packed layers to this dtype. The default keeps each tensor's dtype, and only
            then are the loaded logits bit-identical to the fake-quantized model's.
        tokenizer: saved with the export. By default a checkpoint directory's tokenizer is copied.

    Raises:
        ValueError: if the model has no quantized layers or is wrapped by PEFT.
    """
    model, source = _load_source(model_or_checkpoint)
    layers = packed_layers(model)
    _check_exportable(model, layers)
    compute_dtype = float_dtype or _common_compute_dtype(layers)
    tensors = _packed_tensors(layers, float_dtype)
    other = _float_tensors(model, set(layers), float_dtype)
    tensors.update(other)

    def write(staging: Path) -> None:
        save_file(tensors, str(staging / PACKED_FILE), metadata=_metadata(layers, compute_dtype))
        model.config.save_pretrained(staging)
        _save_extras(staging, model, tokenizer, source)

    target = Path(out_dir)
    _write_atomically(target, write)
    report = PackedExportReport(
        path=target,
        quantized_layers=len(layers),
        quantized_weights=sum(layer.out_features * layer.in_features for layer in layers.values()),
        code_bytes=sum(layer.packed.nbytes for layer in layers.values()),
        scale_bytes=sum(layer.scale.nbytes for layer in layers.values()),
        other_tensor_bytes=sum(tensor.nbytes for key, tensor in tensors.items() if not _is_code_or_scale(key, layers)),
        file_bytes=(target / PACKED_FILE).stat().st_size,
        directory_bytes=sum(file.stat().st_size for file in target.rglob("*") if file.is_file()),
    )
    logger.info("%s", report)
    return report


def export_snapped(
    model_or_checkpoint: ModelOrCheckpoint,
    out_dir: Union[str, Path],
    float_dtype: Optional[torch.dtype] = None,
    tokenizer=None,
) -> Path:
    """Write a plain transformers checkpoint whose quantized weights hold their 2-bit grid values.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` loads it without this package: the file has no
    ``f`` tensors and config.json no ``qat2bit`` layout. The weights are stored in float, so the files
    are as large as the original model's. Arguments, atomic writing and errors are as in ``export_packed``.
    Returns ``out_dir`` as a ``Path``.
    """
    model, source = _load_source(model_or_checkpoint)
    layers = packed_layers(model)
    _check_exportable(model, layers)
    state = {}
    for name, layer in layers.items():
        state[f"{name}.weight"] = _cast(layer.dequantized_weight(), float_dtype)
        if layer.bias is not None:
            state[f"{name}.bias"] = _cast(layer.bias.detach(), float_dtype)
    state.update(_float_tensors(model, set(layers), float_dtype))

    def write(staging: Path) -> None:
        layout = getattr(model.config, LAYOUT_KEY, None)
        if layout is not None:
            delattr(model.config, LAYOUT_KEY)
        try:
            model.save_pretrained(staging, state_dict=state)
        finally:
            if layout is not None:
                setattr(model.config, LAYOUT_KEY, layout)
        _save_extras(staging, None, tokenizer, source)

    target = Path(out_dir)
    _write_atomically(target, write)
    return target


def load_packed(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None) -> torch.nn.Module:
    """Load a packed export as a transformers causal LM with ``Packed2BitLinear`` layers, in eval mode.

    The model class comes from the saved config.json, is built without allocating its weights, and
    takes the tensors of ``packed_model.safetensors`` as they are stored. It is ready for
    ``generate()``, and for ``PeftModel.from_pretrained`` with a ``QAT2BIT_LORA`` adapter.

    Args:
        path: the export directory.
        device: move the model there after loading; the default keeps it on the CPU.

    Raises:
        FileNotFoundError: if ``path`` has no packed_model.safetensors.
        ValueError: if the file is truncated or corrupted, has another format version, or does not
            match the model that config.json describes.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    directory = Path(path)
    file = directory / PACKED_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; write a packed export with export_packed or 'peft-qat2bit export'")
    layers, compute_dtype = _read_layout(file)
    config = AutoConfig.from_pretrained(directory)
    # Parameters stay on the meta device until the file's tensors are assigned. Buffers are built as
    # usual, because some of them (the rotary inv_freq) are not saved.
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=compute_dtype)
    for name, entry in layers.items():
        model.set_submodule(name, _empty_packed_layer(model, name, entry, compute_dtype, file))

    tensors = _read_tensors(file)
    _check_tensors(model, tensors, file)
    model.load_state_dict(tensors, strict=False, assign=True)
    _tie_or_raise(model, file)
    if (directory / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(directory)
    if device is not None:
        model.to(device)
    return model.eval()


def _load_source(model_or_checkpoint: ModelOrCheckpoint) -> tuple[torch.nn.Module, Optional[Path]]:
    if isinstance(model_or_checkpoint, torch.nn.Module):
        return model_or_checkpoint, None
    path = Path(model_or_checkpoint)
    return load_qat_model(str(path)), path


def _check_exportable(model: torch.nn.Module, layers: dict[str, Packed2BitLinear]) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if any(isinstance(module, BaseTunerLayer) for module in model.modules()):
        raise ValueError(
            "the model has PEFT adapter layers; export the base model (peft_model.get_base_model() after "
            "unload(), or the stage A checkpoint) and keep the adapter separate with save_pretrained"
        )
    if not layers:
        raise ValueError(
            "the model has no QATLinear or Packed2BitLinear layers; run quantize_(model, QAT2BitConfig()) and "
            "stage A training before exporting"
        )
    if getattr(model, "config", None) is None:
        raise ValueError(f"{type(model).__name__} has no transformers config; export a transformers model")


def _common_compute_dtype(layers: dict[str, Packed2BitLinear]) -> torch.dtype:
    dtypes = {layer.compute_dtype for layer in layers.values()}
    if len(dtypes) > 1:
        raise ValueError(
            f"the quantized layers compute in several dtypes {sorted(map(str, dtypes))}; pass float_dtype to pick one"
        )
    return dtypes.pop()


def _cast(tensor: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor.detach().contiguous()


def _packed_tensors(layers: dict[str, Packed2BitLinear], float_dtype: Optional[torch.dtype]) -> dict[str, torch.Tensor]:
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{name}.packed"] = layer.packed.contiguous()
        tensors[f"{name}.scale"] = layer.scale.contiguous()
        if layer.bias is not None:
            tensors[f"{name}.bias"] = _cast(layer.bias, float_dtype)
    return tensors


def _inside(key: str, layer_names: set[str]) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:end]) in layer_names for end in range(1, len(parts)))


def _is_code_or_scale(key: str, layers: dict[str, Packed2BitLinear]) -> bool:
    name, _, leaf = key.rpartition(".")
    return name in layers and leaf in ("packed", "scale")


def _float_tensors(
    model: torch.nn.Module, layer_names: set[str], float_dtype: Optional[torch.dtype]
) -> dict[str, torch.Tensor]:
    """Return the state-dict tensors of ``model`` outside ``layer_names``, each shared tensor once."""
    tensors = {}
    seen = set()
    for key, tensor in model.state_dict().items():
        if _inside(key, layer_names):
            continue
        # A tied weight (lm_head sharing the embedding) appears under both names; loading re-ties it.
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = _cast(tensor, float_dtype)
    return tensors


def _metadata(layers: dict[str, Packed2BitLinear], compute_dtype: torch.dtype) -> dict[str, str]:
    entries = {
        name: {
            "shape": [layer.out_features, layer.in_features],
            "scale_shape": list(layer.scale.shape),
            "bias": layer.bias is not None,
            "config": layer.weight_config.to_dict(),
        }
        for name, layer in layers.items()
    }
    return {
        "format": "pt",
        "packing_format": PACKING_FORMAT,
        "format_version": str(FORMAT_VERSION),
        "levels": json.dumps(list(LEVELS)),
        "code_layout": CODE_LAYOUT,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "layers": json.dumps(entries),
    }


def _save_extras(staging: Path, model: Optional[torch.nn.Module], tokenizer, source: Optional[Path]) -> None:
    if model is not None and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(staging)
    if tokenizer is None and source is not None and any((source / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    if tokenizer is not None:
        tokenizer.save_pretrained(staging)


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _apply_umask(staging)
    try:
        write(staging)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _unreadable(file: Path, error: Exception) -> ValueError:
    return ValueError(f"cannot read {file}: {error}. The file is truncated or corrupted; export the model again")


def _read_layout(file: Path) -> tuple[dict[str, Any], torch.dtype]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except SafetensorError as error:
        raise _unreadable(file, error) from error
    if metadata.get("packing_format") != PACKING_FORMAT:
        raise ValueError(
            f"{file} is not a peft-qat2bit packed export: its metadata lacks packing_format={PACKING_FORMAT!r}"
        )
    version = metadata.get("format_version")
    if version != str(FORMAT_VERSION):
        raise ValueError(
            f"{file} has format_version={version!r}, but this release reads version {FORMAT_VERSION}; install the "
            f"peft-qat2bit release that wrote it, or export the stage A checkpoint again with this one"
        )
    levels = json.loads(metadata.get("levels", "null"))
    if levels != list(LEVELS):
        raise ValueError(f"{file} has the level set {levels}, but this release dequantizes to {list(LEVELS)}")
    dtype_name = metadata.get("compute_dtype")
    if dtype_name not in FLOAT_DTYPES:
        raise ValueError(f"{file} has compute_dtype={dtype_name!r}; expected one of {', '.join(FLOAT_DTYPES)}")
    return json.loads(metadata["layers"]), FLOAT_DTYPES[dtype_name]


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except SafetensorError as error:
        raise _unreadable(file, error) from error


def _empty_packed_layer(
    model: torch.nn.Module, name: str, entry: dict[str, Any], compute_dtype: torch.dtype, file: Path
) -> Packed2BitLinear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(
            f"{file} has the quantized layer {name!r}, but the model that config.json describes has no nn.Linear "
            f"of that name; the config and the packed file come from different models, export again"
        )
    stored_shape = tuple(entry["shape"])
    config_shape = (linear.out_features, linear.in_features)
    if stored_shape != config_shape:
        raise ValueError(
            f"{file} stores {name} with weight shape {stored_shape}, but config.json gives it {config_shape}; "
            f"the config and the packed file come from different models, export again"
        )
    with torch.device("meta"):
        return Packed2BitLinear(
            linear.in_features,
            linear.out_features,
            bias=entry["bias"],
            weight_config=Balanced2BitFakeQuantizeConfig.from_dict(entry["config"]),
            compute_dtype=compute_dtype,
            module_name=name,
        )


def _check_tensors(model: torch.nn.Module, tensors: dict[str, torch.Tensor], file: Path) -> None:
    expected = model.state_dict()
    for key, tensor in tensors.items():
        if key not in expected:
            raise ValueError(
                f"{file} has the tensor {key!r}, which the model that config.json describes lacks; the config "
                f"and the packed file come from different models, export again"
            )
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{file} stores {key} with shape {tuple(tensor.shape)}, but the model that config.json describes "
                f"needs {tuple(expected[key].shape)}; the config and the packed file come from different models, "
                f"export again"
            )
        if key.endswith((".packed", ".scale")) and tensor.dtype != expected[key].dtype:
            raise ValueError(
                f"{file} stores {key} as {tensor.dtype}, expected {expected[key].dtype}; the file was not written "
                f"by export_packed, export again"
            )


def _meta_tensor_names(model: torch.nn.Module) -> list[str]:
    named = list(model.named_parameters()) + list(model.named_buffers())
    return [name for name, tensor in named if tensor.is_meta]


def _tie_or_raise(model: torch.nn.Module, file: Path) -> None:
    if _meta_tensor_names(model):
        model.tie_weights()
    missing = _meta_tensor_names(model)
    if missing:
        raise ValueError(
            f"{file} lacks {len(missing)} tensors that the model needs, such as {missing[:3]}; the file is "
            f"incomplete or comes from another model, export again"
        )
