"""Quantizer statistics of a whole model, for the Trainer's logs."""

from contextlib import contextmanager
from typing import Optional

import torch
from torch.distributed.fsdp import FSDPModule

from .checkpoint import qat_linears
from .quantizer import LEVELS


@torch.no_grad()
def quantizer_statistics(model: torch.nn.Module) -> dict[str, float]:
    """Return mean ``f``, the fraction of clipped weights and the occupancy of each level over all QAT layers.

    Keys: ``qat/mean_f``, ``qat/clip_fraction`` and ``qat/level_-1.5`` ... ``qat/level_1.5`` (each a
    fraction of all quantized weights). Returns an empty dict for a model without ``QATLinear``.

    Under FSDP2 the parameters of each sharded module are gathered while its layers are counted, one
    module at a time, so every rank must call this function.
    """
    layers = qat_linears(model)
    if not layers:
        return {}
    f_sum = 0.0
    f_count = 0
    clipped = 0.0
    numel = 0.0
    level_counts = torch.zeros(len(LEVELS), dtype=torch.float64)
    fsdp_modules = {name: module for name, module in model.named_modules() if isinstance(module, FSDPModule)}
    by_owner: dict[Optional[str], list[torch.nn.Module]] = {}
    for name, layer in layers.items():
        by_owner.setdefault(_fsdp_owner(name, fsdp_modules), []).append(layer)
    for owner, owned_layers in by_owner.items():
        with _unsharded(fsdp_modules.get(owner)):
            for layer in owned_layers:
                quantizer = layer.weight_fake_quantizer
                counts = quantizer.statistics(layer.weight)
                f_sum += quantizer.f.detach().double().sum().item()
                f_count += quantizer.f.numel()
                clipped += counts["clipped"].item()
                numel += counts["numel"].item()
                level_counts += counts["level_counts"].double().cpu()

    stats = {"qat/mean_f": f_sum / f_count, "qat/clip_fraction": clipped / numel}
    for level, count in zip(LEVELS, level_counts.tolist()):
        stats[f"qat/level_{level:+.1f}"] = count / numel
    return stats


def _fsdp_owner(layer_name: str, fsdp_modules: dict[str, torch.nn.Module]) -> Optional[str]:
    """Return the name of the innermost FSDP2 module that contains ``layer_name``, or None."""
    owners = [name for name in fsdp_modules if name == "" or layer_name.startswith(name + ".")]
    return max(owners, key=len) if owners else None


@contextmanager
def _unsharded(module: Optional[torch.nn.Module]):
    """Gather the parameters of an FSDP2 module for the block (an all-gather), then shard them again."""
    if module is None:
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
