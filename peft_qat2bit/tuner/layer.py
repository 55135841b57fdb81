"""PEFT LoRA ``Linear`` back-ends for the frozen 2-bit bases: ``QATLinear`` and ``Packed2BitLinear``."""

import warnings
from typing import Optional

import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

OFF_GRID_WARNING = (
    "merging LoRA into a QATLinear adds B @ A to the 2-bit weight, so the merged weights are float values "
    "off the balanced 2-bit grid and the layer no longer quantizes; keep the adapter unmerged to deploy the "
    "2-bit base with a separate adapter"
)


class QATLoraLinear(LoraLinear):
    """LoRA on a ``QATLinear``: ``QATLinear(x) + B(A(dropout(x))) * scaling``.

    The forward pass, adapter bookkeeping and delta weight are PEFT's. The base output comes from
    ``QATLinear.forward``, which reuses its cached 2-bit weight while the base is frozen.

    Only merging differs, because the base weight that the forward pass uses is ``fake_quant(W)``, not
    the float ``W`` stored in ``base_layer.weight``. ``merge`` sets ``base_layer.weight`` to
    ``fake_quant(W) + delta``, turns the fake quantizer off and warns that the weights left the grid.
    ``unmerge`` restores the float ``W``, the bias and the quantizer switch bit-exactly.
    """

    def __init__(self, base_layer: torch.nn.Module, adapter_name: str, **kwargs) -> None:
        super().__init__(base_layer, adapter_name, **kwargs)
        # The base's float weight, bias and quantizer switch from before the merge, while adapters are merged.
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._unmerged_bias: Optional[torch.Tensor] = None
        self._quantizer_was_enabled = True

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        warnings.warn(OFF_GRID_WARNING, UserWarning, stacklevel=2)
        base = self.get_base_layer()
        if not self.merged:
            self._unmerged_weight = base.weight.data
            self._unmerged_bias = base.bias.data.clone() if base.bias is not None else None
            self._quantizer_was_enabled = base.weight_fake_quantizer.enabled
            base.weight.data = base.quantized_weight().detach().clone()
            base.weight_fake_quantizer.enabled = False
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged:
                self._restore_base()

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        self._restore_base()
        self.merged_adapters.clear()

    def _restore_base(self) -> None:
        base = self.get_base_layer()
        base.weight.data = self._unmerged_weight
        if self._unmerged_bias is not None:
            base.bias.data = self._unmerged_bias
        base.weight_fake_quantizer.enabled = self._quantizer_was_enabled
        self._unmerged_weight = self._unmerged_bias = None

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> torch.nn.Module:
        """Return the module that replaces this layer on ``unload`` / ``merge_and_unload``.

        Without merging that is the ``QATLinear`` base. With merged adapters it is a plain
        ``nn.Linear`` holding ``fake_quant(W) + delta``, since those weights are no longer 2-bit.
        """
        if not merge:
            if self.merged:
                self.unmerge()
            return self.get_base_layer()

        self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        if not self.merged:
            return self.get_base_layer()
        self._unmerged_weight = self._unmerged_bias = None
        return self.get_base_layer().to_linear()


PACKED_MERGE_ERROR = (
    "cannot merge LoRA into a Packed2BitLinear: its weight is stored as 2-bit codes, which cannot hold "
    "fake_quant(W) + B @ A; keep the adapter separate, or load it on the fake-quantized stage A model "
    "(load_qat_model) and merge there"
)


class PackedLoraLinear(LoraLinear):
    """LoRA on a ``Packed2BitLinear``: ``Packed2BitLinear(x) + B(A(dropout(x))) * scaling``.

    The forward pass, adapter bookkeeping and delta weight are PEFT's; the base output comes from the
    packed layer's forward, which dequantizes its weight per call. The base has no float weight, so
    the adapters take their device and dtype from ``packed`` and ``compute_dtype``, and merging raises.
    ``unload()`` returns the packed layer.
    """

    def _get_in_out_features(self, module: torch.nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: torch.nn.Module):
        return base_layer.packed.device, base_layer.compute_dtype

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        if check_adapters_to_merge(self, adapter_names):
            raise ValueError(PACKED_MERGE_ERROR)

    def unload_and_optionally_merge_module(
        self, merge: bool, safe_merge: bool, adapter_names: Optional[list[str]]
    ) -> torch.nn.Module:
        """Return the ``Packed2BitLinear`` base on ``unload``; raise on ``merge_and_unload``."""
        if merge:
            raise ValueError(PACKED_MERGE_ERROR)
        return self.get_base_layer()
