"""Save and load stage A (QAT) models: float weights and every ``f`` in safetensors, layout in config.json.

The layout (which layers are quantized, with which settings) is stored as ``qat2bit`` in the model's
``config.json``; the ``f`` tensors are ordinary parameters named ``<layer>.weight_fake_quantizer.f``.
Checkpoints written by the ``Trainer`` carry the layout when ``QATStatsCallback`` is attached; without
it the loader infers the granularity from the shapes of ``f``.
"""

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import safe_open

from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .linear import QATLinear

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAYOUT_KEY = "qat2bit"
F_SUFFIX = ".weight_fake_quantizer.f"


def qat_linears(model: torch.nn.Module) -> dict[str, QATLinear]:
    """Return every ``QATLinear`` of ``model`` by its dotted name."""
    return {name: module for name, module in model.named_modules() if isinstance(module, QATLinear)}


def qat_layout(model: torch.nn.Module) -> dict[str, Any]:
    """Describe which layers of ``model`` are quantized and with which settings, as JSON-ready data."""
    configs: list[dict[str, Any]] = []
    modules: dict[str, int] = {}
    for name, module in qat_linears(model).items():
        entry = module.weight_config.to_dict()
        if entry not in configs:
            configs.append(entry)
        modules[name] = configs.index(entry)
    return {"format_version": FORMAT_VERSION, "configs": configs, "modules": modules}


def record_layout(model: torch.nn.Module) -> None:
    """Store ``qat_layout(model)`` in ``model.config`` so every ``save_pretrained`` writes it."""
    config = getattr(model, "config", None)
    if config is not None:
        setattr(config, LAYOUT_KEY, qat_layout(model))


def save_qat_model(model: torch.nn.Module, save_directory: str, **save_pretrained_kwargs) -> None:
    """Save a stage A model with ``save_pretrained`` (safetensors), writing the directory atomically.

    The files are written to a temporary directory beside ``save_directory`` and moved into place
    only when complete, so a failed save leaves any earlier checkpoint under that name intact. Files of
    an earlier save are replaced, but its subdirectories (the Trainer's ``checkpoint-N``, logs) are kept,
    because scripts save the final model into the Trainer's ``output_dir``.
    """
    if not qat_linears(model):
        raise ValueError(
            "the model has no QATLinear layers; run quantize_(model, QAT2BitConfig()) before saving it as a QAT model"
        )
    record_layout(model)
    target = Path(save_directory)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    _apply_umask(staging)
    try:
        model.save_pretrained(staging, safe_serialization=True, **save_pretrained_kwargs)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _apply_umask(directory: Path) -> None:
    """Give a ``mkdtemp`` directory (mode 0700) the mode a plain ``mkdir`` would have given it."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)


def _replace_directory(source: Path, target: Path) -> None:
    if not target.exists():
        os.replace(source, target)
        return
    backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
    previous = backup / target.name
    os.replace(target, previous)
    try:
        os.replace(source, target)
    except OSError:
        os.replace(previous, target)
        shutil.rmtree(backup, ignore_errors=True)
        raise
    for entry in previous.iterdir():
        if entry.is_dir() and not (target / entry.name).exists():
            os.replace(entry, target / entry.name)
    # Reached only when every subdirectory moved: a failed move above leaves the backup on disk.
    shutil.rmtree(backup, ignore_errors=True)


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist; check the path")
    if (path / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"{path} is a PEFT adapter directory, not a stage A checkpoint; load the adapter with "
            f"PeftModel.from_pretrained(load_qat_model(<stage A checkpoint>), {str(path)!r})"
        )
    raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path}")


def stored_weight_dtype(path: str) -> torch.dtype:
    """Return the dtype of the first non-``f`` floating-point tensor stored in a checkpoint."""
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(F_SUFFIX):
                    continue
                dtype = handle.get_slice(key).get_dtype()
                if dtype in _FLOAT_DTYPES:
                    return _FLOAT_DTYPES[dtype]
    return torch.float32


_FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def read_scale_factors(path: str) -> dict[str, torch.Tensor]:
    """Read every ``f`` tensor of a saved QAT model, keyed by the name of its layer."""
    factors = {}
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(F_SUFFIX):
                    factors[key[: -len(F_SUFFIX)]] = handle.get_tensor(key)
    return factors


def _stored_weight_shapes(path: str) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in _safetensors_files(Path(path)):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key.endswith(".weight"):
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def _infer_config(f_shape: torch.Size, weight_shape: torch.Size) -> Balanced2BitFakeQuantizeConfig:
    rows, groups = f_shape
    out_features, in_features = weight_shape
    if (rows, groups) == (1, 1):
        return Balanced2BitFakeQuantizeConfig("per_tensor")
    if (rows, groups) == (out_features, 1):
        return Balanced2BitFakeQuantizeConfig("per_channel")
    if rows == out_features and in_features % groups == 0:
        return Balanced2BitFakeQuantizeConfig("per_group", group_size=in_features // groups)
    raise ValueError(f"f of shape {tuple(f_shape)} does not fit a weight of shape {tuple(weight_shape)}")


def _saved_configs(model_config: Any) -> dict[str, Balanced2BitFakeQuantizeConfig]:
    layout = getattr(model_config, LAYOUT_KEY, None)
    if layout is None:
        return {}
    version = layout.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"the checkpoint's qat2bit layout has format_version={version!r}, but this release reads "
            f"version {FORMAT_VERSION}; install the peft-qat2bit release that wrote it"
        )
    configs = [Balanced2BitFakeQuantizeConfig.from_dict(entry) for entry in layout["configs"]]
    return {name: configs[index] for name, index in layout["modules"].items()}


def load_qat_model(
    path: str,
    weight_config: Optional[Balanced2BitFakeQuantizeConfig] = None,
    model_class=None,
    **from_pretrained_kwargs,
):
    """Load a stage A model saved by ``save_qat_model`` or a ``Trainer`` checkpoint, ready to train or evaluate.

    Float weights and every ``f`` come back bit-exactly; ``f`` is not re-initialised.

    Args:
        path: the checkpoint directory.
        weight_config: if given, the quantizer settings the caller expects; a checkpoint saved with
            another granularity or group size raises ValueError.
        model_class: the transformers class to load with; defaults to ``AutoModelForCausalLM``.
        **from_pretrained_kwargs: passed to ``from_pretrained`` (``device_map``, ...). ``dtype``
            defaults to the dtype of the stored weights, so they load without rounding.
    """
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class

    # A resolved path makes base_model_name_or_path of a later adapter usable from any directory.
    if os.path.isdir(path):
        path = str(Path(path).resolve())
    factors = read_scale_factors(path)
    if not factors:
        raise ValueError(
            f"{path} contains no '*{F_SUFFIX}' tensors, so it is not a QAT checkpoint; "
            f"load it with from_pretrained and run quantize_(model, QAT2BitConfig()) instead"
        )
    # config.json may name another dtype than the stored tensors (the Trainer records its autocast
    # dtype there), and loading in that dtype would round the weights, so default to the stored one.
    from_pretrained_kwargs.setdefault("dtype", stored_weight_dtype(path))
    transformers_logger = logging.getLogger("transformers.modeling_utils")
    level = transformers_logger.level
    # The f tensors are unknown to the float model class; they are loaded below, so hide that warning.
    transformers_logger.setLevel(logging.ERROR)
    try:
        model = model_class.from_pretrained(path, **from_pretrained_kwargs)
    finally:
        transformers_logger.setLevel(level)
    return apply_qat_checkpoint(model, path, weight_config, factors)


def apply_qat_checkpoint(
    model: torch.nn.Module,
    path: str,
    weight_config: Optional[Balanced2BitFakeQuantizeConfig] = None,
    factors: Optional[dict[str, torch.Tensor]] = None,
) -> torch.nn.Module:
    """Swap the layers that the stage A checkpoint at ``path`` quantized for ``QATLinear``, with its ``f``.

    ``model`` must already hold the checkpoint's float weights, as after ``from_pretrained(path)``: only
    ``f`` and the layout are read here. ``load_qat_model`` does both steps.

    Raises:
        ValueError: if a quantized layer is missing from ``model`` or its weight shape differs from the
            checkpoint's, or if the layout differs from ``weight_config``.
    """
    if factors is None:
        factors = read_scale_factors(path)
    stored_shapes = _stored_weight_shapes(path)
    saved = _saved_configs(model.config)
    modules = dict(model.named_modules())
    for name, f in factors.items():
        linear = modules.get(name)
        if not isinstance(linear, torch.nn.Linear):
            raise ValueError(
                f"the checkpoint has f for {name!r}, but the model has no nn.Linear of that name; "
                f"check that {path} was saved from this architecture"
            )
        stored_shape = stored_shapes.get(name + ".weight")
        if stored_shape is not None and stored_shape != tuple(linear.weight.shape):
            raise ValueError(
                f"{name}: the weight in {path} has shape {stored_shape}, but the model's layer has "
                f"{tuple(linear.weight.shape)}; use a model of the size that checkpoint was saved from"
            )
        config = saved.get(name) or _infer_config(f.shape, linear.weight.shape)
        if weight_config is not None and not config.same_layout(weight_config):
            raise ValueError(
                f"{name} was saved with {config.to_dict()} but weight_config={weight_config.to_dict()} was "
                f"requested; load without weight_config or with the one the checkpoint was trained with"
            )
        qat_linear = QATLinear.from_linear(linear, config, module_name=name, initialize=False)
        quantizer = qat_linear.weight_fake_quantizer
        if quantizer.f.shape != f.shape:
            raise ValueError(
                f"{name}: saved f has shape {tuple(f.shape)}, but {config.to_dict()} needs "
                f"{tuple(quantizer.f.shape)}; the checkpoint does not match its own layout"
            )
        with torch.no_grad():
            quantizer.f.copy_(f)
        parent_name, _, child_name = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child_name, qat_linear)
    record_layout(model)
    return model
