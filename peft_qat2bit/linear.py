"""``QATLinear``: an ``nn.Linear`` whose weight passes through the balanced 2-bit fake quantizer."""

import torch
import torch.nn.functional as F

from .fake_quantize_config import Balanced2BitFakeQuantizeConfig
from .fake_quantizer import Balanced2BitFakeQuantizer


class QATLinear(torch.nn.Linear):
    """Linear layer that computes ``x @ fake_quant(W).T + b`` during QAT.

    The float weight stays the trained parameter; ``weight_fake_quantizer`` owns ``f``. Use
    ``from_linear`` to wrap an existing layer (sharing its parameters) and ``to_linear`` to get a
    plain ``nn.Linear`` with the same float weight back.

    When neither the weight nor ``f`` requires grad (a frozen base, as in LoRA recovery), the
    quantized weight is computed once and reused. The cache is keyed by the storage and version
    counter of both tensors, so ``.to()``, a dtype change, ``load_state_dict`` or any in-place
    update of the weight or ``f`` recomputes it.

    NOTE: an in-place edit through ``.data`` (``layer.weight.data.copy_(w)``) does not bump the
    version counter and leaves a stale cache; edit under ``torch.no_grad()`` instead.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        weight_config: Balanced2BitFakeQuantizeConfig | None = None,
        module_name: str = "",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_config = weight_config or Balanced2BitFakeQuantizeConfig()
        self.weight_fake_quantizer = Balanced2BitFakeQuantizer(
            self.weight_config, self.weight.shape, module_name=module_name, device=device
        )
        self._cached_weight: torch.Tensor | None = None
        self._cache_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)

    def quantized_weight(self) -> torch.Tensor:
        """Return the fake-quantized weight: differentiable while it trains, cached once frozen."""
        quantizer = self.weight_fake_quantizer
        f = quantizer.f
        if self.weight.requires_grad or f.requires_grad or not quantizer.enabled:
            self._cached_weight = self._cache_key = None
            return quantizer(self.weight)

        key = (
            self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device,
            f.data_ptr(), f._version,
        )
        if key != self._cache_key:
            with torch.no_grad():
                self._cached_weight = quantizer(self.weight)
            self._cache_key = key
        return self._cached_weight

    @classmethod
    def from_linear(
        cls,
        linear: torch.nn.Linear,
        weight_config: Balanced2BitFakeQuantizeConfig | None = None,
        module_name: str = "",
        initialize: bool = True,
    ) -> "QATLinear":
        """Wrap ``linear``, sharing its weight and bias parameters, and initialise ``f`` from its weight.

        Args:
            linear: the layer to wrap. Its parameters are reused, not copied.
            weight_config: the quantizer settings; the default is per tensor with Newton init.
            module_name: the layer's name in the model, used in error messages.
            initialize: set ``f`` from the weight now. Pass False when ``f`` is loaded afterwards,
                or when the weight lives on the meta device.
        """
        weight_config = weight_config or Balanced2BitFakeQuantizeConfig()
        device = linear.weight.device
        with torch.device("meta"):
            new_linear = cls(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                weight_config=weight_config,
                module_name=module_name,
            )
        new_linear.weight = linear.weight
        new_linear.bias = linear.bias
        new_linear.weight_fake_quantizer = Balanced2BitFakeQuantizer(
            weight_config, linear.weight.shape, module_name=module_name, device=device
        )
        if initialize and device.type != "meta":
            new_linear.weight_fake_quantizer.initialize_(linear.weight)
        new_linear.train(linear.training)
        return new_linear

    def to_linear(self) -> torch.nn.Linear:
        """Return a plain ``nn.Linear`` that shares this layer's float weight and bias, dropping ``f``."""
        with torch.device("meta"):
            linear = torch.nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        linear.weight = self.weight
        linear.bias = self.bias
        linear.train(self.training)
        return linear
