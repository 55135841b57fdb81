"""Quantizer statistics of a whole model, for the Trainer's logs."""

import torch

from .checkpoint import qat_linears
from .quantizer import LEVELS


@torch.no_grad()
def quantizer_statistics(model: torch.nn.Module) -> dict[str, float]:
    """Return mean ``f``, the fraction of clipped weights and the occupancy of each level over all QAT layers.

    Keys: ``qat/mean_f``, ``qat/clip_fraction`` and ``qat/level_-1.5`` ... ``qat/level_1.5`` (each a
    fraction of all quantized weights). Returns an empty dict for a model without ``QATLinear``.
    """
    layers = qat_linears(model)
    if not layers:
        return {}
    f_sum = 0.0
    f_count = 0
    clipped = 0.0
    numel = 0.0
    level_counts = torch.zeros(len(LEVELS), dtype=torch.float64)
    for layer in layers.values():
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
