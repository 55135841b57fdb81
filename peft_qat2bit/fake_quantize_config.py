"""Configuration of the balanced 2-bit weight fake quantizer, as a torchao ``FakeQuantizeConfigBase``."""

from dataclasses import dataclass
from typing import Any, Optional, Union

from torchao.quantization.granularity import Granularity, PerAxis, PerGroup, PerTensor
from torchao.quantization.qat.fake_quantize_config import FakeQuantizeConfigBase

GRANULARITY_NAMES = ("per_tensor", "per_channel", "per_group")
INIT_METHODS = ("newton", "absmax")


def _granularity_from_name(name: str, group_size: Optional[int]) -> Granularity:
    if name == "per_tensor":
        return PerTensor()
    if name == "per_channel":
        return PerAxis(axis=0)
    if name == "per_group":
        if group_size is None:
            raise ValueError("granularity='per_group' needs group_size, for example group_size=64")
        return PerGroup(group_size)
    raise ValueError(f"Unknown granularity {name!r}; use one of {', '.join(GRANULARITY_NAMES)}")


def granularity_name(granularity: Granularity) -> str:
    """Return the string shortcut ("per_tensor", "per_channel", "per_group") of a torchao granularity."""
    if isinstance(granularity, PerTensor):
        return "per_tensor"
    if isinstance(granularity, PerAxis):
        return "per_channel"
    return "per_group"


@dataclass
class Balanced2BitFakeQuantizeConfig(FakeQuantizeConfigBase):
    """Settings of the balanced 2-bit weight fake quantizer with a learnable clipping factor ``f``.

    Weights are fake-quantized to ``s * {-1.5, -0.5, 0.5, 1.5}`` with ``s = f * max(|W|) / 2``, where
    ``max(|W|)`` and ``f`` are taken per tensor, per output channel or per group of input columns.

    Args:
        granularity: "per_tensor" (one ``f`` per weight, as in Apple's 2025 foundation model report),
            "per_channel" (one per output row) or "per_group" (one per ``group_size`` input columns of
            each row). torchao's ``PerTensor()``, ``PerAxis(0)`` and ``PerGroup(n)`` are accepted too.
        group_size: the number of input columns per group; required for "per_group" and must divide
            ``in_features`` of every quantized layer.
        init: how ``f`` starts. "newton" sets the MSE-optimal clip threshold found by the OCTAV-style
            Newton recursion; "absmax" sets ``f = 1``, that is the plain absmax scale.
        learnable_scale: whether ``f`` is an ``nn.Parameter`` that trains (True) or a frozen one.
        newton_iterations: the maximum number of Newton steps at initialisation.
        compile: run the quantizer's forward and backward as ``torch.compile`` kernels (Inductor,
            dynamic shapes) instead of eager elementwise ops. Outputs and weight gradients are the
            same, and the gradient of ``f`` may differ in its last bits because its sum runs in
            another order. The first steps compile, a few seconds per weight shape, and later steps
            are faster. Inductor needs Triton on a GPU and a C++ compiler on a CPU.

    Example::

        Balanced2BitFakeQuantizeConfig()                                  # per tensor, Newton init
        Balanced2BitFakeQuantizeConfig("per_group", group_size=64)
        Balanced2BitFakeQuantizeConfig("per_channel", init="absmax", learnable_scale=False)
        Balanced2BitFakeQuantizeConfig(compile=True)                      # fused kernels for training
    """

    granularity: Union[str, Granularity] = "per_tensor"
    group_size: Optional[int] = None
    init: str = "newton"
    learnable_scale: bool = True
    newton_iterations: int = 50
    compile: bool = False

    def __post_init__(self):
        if isinstance(self.granularity, str):
            self.granularity = _granularity_from_name(self.granularity, self.group_size)
        elif isinstance(self.granularity, PerAxis) and self.granularity.axis != 0:
            raise ValueError(
                f"Unsupported granularity {self.granularity}: scales are per output channel, use PerAxis(axis=0)"
            )
        elif not isinstance(self.granularity, (PerTensor, PerAxis, PerGroup)):
            raise ValueError(
                f"Unknown granularity {self.granularity!r}; use one of {', '.join(GRANULARITY_NAMES)}"
            )

        if isinstance(self.granularity, PerGroup):
            if self.group_size is not None and self.group_size != self.granularity.group_size:
                raise ValueError(
                    f"group_size={self.group_size} disagrees with {self.granularity}; give only one of them"
                )
            self.group_size = self.granularity.group_size
            if not isinstance(self.group_size, int) or self.group_size <= 0:
                raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(
                f"group_size={self.group_size} is only used with granularity='per_group', "
                f"not {granularity_name(self.granularity)!r}; drop group_size or switch granularity"
            )

        if self.init not in INIT_METHODS:
            raise ValueError(f"Unknown init {self.init!r}; use one of {', '.join(INIT_METHODS)}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be True or False, got {self.compile!r}")
        if self.newton_iterations < 1:
            raise ValueError(f"newton_iterations must be at least 1, got {self.newton_iterations}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form that ``from_dict`` reads back."""
        return {
            "granularity": granularity_name(self.granularity),
            "group_size": self.group_size,
            "init": self.init,
            "learnable_scale": self.learnable_scale,
            "newton_iterations": self.newton_iterations,
            "compile": self.compile,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Balanced2BitFakeQuantizeConfig":
        """Build a config from the output of ``to_dict``; files written before ``compile`` existed load too."""
        return cls(**data)

    def same_layout(self, other: "Balanced2BitFakeQuantizeConfig") -> bool:
        """Return whether both configs give ``f`` and the scales the same shape and meaning."""
        return self.granularity == other.granularity and self.learnable_scale == other.learnable_scale
