"""``QAT2BitConfig`` and its torchao ``quantize_`` handler, plus module-name filters.

Usage::

    from torchao.quantization import quantize_
    from peft_qat2bit import QAT2BitConfig, module_filter

    quantize_(model, QAT2BitConfig())                                  # every Linear but lm_head
    quantize_(model, QAT2BitConfig(), filter_fn=module_filter(["q_proj", "v_proj"]))
    quantize_(model, QAT2BitConfig(step="convert"))                    # QATLinear -> Packed2BitLinear
"""

import re
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch
from torchao.core.config import AOBaseConfig
from torchao.quantization.transform_module import register_quantize_module_handler

from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .linear import QATLinear
from .packing import Packed2BitLinear

STEPS = ("prepare", "convert")

ModulePatterns = Union[str, Sequence[str]]


def name_matches(name: str, patterns: ModulePatterns) -> bool:
    """Match a module name as PEFT's ``target_modules`` does.

    A string is a regular expression that must match the whole name. A list of names matches a
    module whose name equals one of them or ends with ``"." + name``.
    """
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == pattern or name.endswith("." + pattern) for pattern in patterns)


@dataclass
class QAT2BitConfig(AOBaseConfig):
    """torchao ``quantize_`` config that swaps ``nn.Linear`` layers for balanced 2-bit ``QATLinear``.

    Args:
        weight_config: the fake quantizer settings; the default is per tensor with Newton init.
        step: "prepare" inserts the fake quantizer and initialises ``f``. "convert" replaces every
            ``QATLinear`` with a ``Packed2BitLinear`` that stores the 2-bit codes packed four per byte
            and computes the same weight. ``weight_config`` and ``exclude_modules`` do not apply to it.
            Run it with the default ``filter_fn``, because ``module_filter`` skips ``QATLinear`` layers.
        exclude_modules: names never quantized, matched as PEFT's ``target_modules``: a list of
            names or name suffixes, or one regular expression. The default keeps ``lm_head``
            in float; embeddings are not ``nn.Linear`` and are never touched. Pass ``()`` to
            quantize ``lm_head`` too.
    """

    weight_config: Balanced2BitFakeQuantizeConfig = field(default_factory=Balanced2BitFakeQuantizeConfig)
    step: str = "prepare"
    exclude_modules: ModulePatterns = ("lm_head",)

    def __post_init__(self):
        if self.step not in STEPS:
            raise ValueError(f"Unknown step {self.step!r}; use one of {', '.join(STEPS)}")
        if not isinstance(self.weight_config, Balanced2BitFakeQuantizeConfig):
            raise TypeError(
                f"weight_config must be a Balanced2BitFakeQuantizeConfig, got {type(self.weight_config).__name__}"
            )


def _name_in_quantize_call() -> Optional[str]:
    """Return the name of the module that torchao's ``quantize_`` is handling, if called from there.

    ``quantize_`` passes only the module to a handler. Its recursive helper keeps the dotted name in
    the local ``cur_fqn`` (with a trailing dot), which is read here so that ``exclude_modules`` works
    with the default ``filter_fn``.
    """
    # NOTE: this reads a local variable of a private torchao function; checked against torchao 0.18.
    frame = sys._getframe(1)
    for _ in range(8):
        if frame is None:
            return None
        if frame.f_code.co_name == "_replace_with_custom_fn_if_matches_filter":
            name = frame.f_locals.get("cur_fqn")
            return name[:-1] if isinstance(name, str) else None
        frame = frame.f_back
    return None


@register_quantize_module_handler(QAT2BitConfig)
def _qat2bit_transform(module: torch.nn.Module, config: QAT2BitConfig) -> torch.nn.Module:
    if config.step == "convert":
        # torchao's default filter_fn passes a QATLinear, since it is an nn.Linear.
        if not isinstance(module, QATLinear):
            return module
        return Packed2BitLinear.from_qat_linear(module, module_name=_name_in_quantize_call())
    if isinstance(module, QATLinear) or not isinstance(module, torch.nn.Linear):
        return module
    name = _name_in_quantize_call()
    if name is not None and config.exclude_modules and name_matches(name, config.exclude_modules):
        return module
    return QATLinear.from_linear(module, config.weight_config, module_name=name or "")


class ModuleNameFilter:
    """``filter_fn`` for ``quantize_`` that selects ``nn.Linear`` layers by name.

    Names match as PEFT's ``target_modules``. When ``quantize_`` starts at the root module, the filter
    checks the whole model once and raises if no ``nn.Linear`` matches, so a typo never leaves a
    model silently unquantized.
    """

    def __init__(self, target_modules: ModulePatterns):
        if not isinstance(target_modules, str) and len(target_modules) == 0:
            raise ValueError("target_modules is empty; give names such as ['q_proj', 'v_proj'] or a regex")
        self.target_modules = target_modules

    def __call__(self, module: torch.nn.Module, name: str) -> bool:
        if name == "":
            self.check_matches(module)
        return isinstance(module, torch.nn.Linear) and not isinstance(module, QATLinear) and (
            name_matches(name, self.target_modules)
        )

    def check_matches(self, model: torch.nn.Module) -> None:
        """Raise ValueError if no ``nn.Linear`` of ``model`` matches ``target_modules``."""
        linear_names = [name for name, child in model.named_modules() if isinstance(child, torch.nn.Linear)]
        if not any(name_matches(name, self.target_modules) for name in linear_names):
            examples = ", ".join(linear_names[:5]) or "none"
            raise ValueError(
                f"target_modules={self.target_modules!r} matches no nn.Linear in the model "
                f"(its linear layers include: {examples}); fix the names or the regex"
            )


def module_filter(target_modules: ModulePatterns) -> ModuleNameFilter:
    """Return a ``filter_fn`` for ``quantize_`` that keeps the ``nn.Linear`` layers named by ``target_modules``."""
    return ModuleNameFilter(target_modules)
