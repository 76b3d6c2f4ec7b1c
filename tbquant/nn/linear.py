"""Quantized linear layers.

`QuantLinear` is the student's layer during distillation: a full-precision latent weight,
fake-quantized on every forward pass. `PackedLinear` is the exported layer: integer codes
packed into bytes plus per-row scales. Both quantize their input with the same
`ActivationQuantizer` and dequantize weights with the same function, so a packed model
computes exactly what the student computed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbquant import packing
from tbquant.config import WeightQuantConfig
from tbquant.quantizers.activation import ActivationQuantizer, QuantPoint
from tbquant.quantizers.weight import dequantize_weight, fake_quantize_weight, quantize_weight, storage_dtype


def _is_conv1d(module: nn.Module) -> bool:
    # GPT-2's projections are transformers' Conv1D: a linear layer with a [in, out] weight.
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear(module: nn.Module) -> bool:
    """Return whether `module` is a linear layer that tbquant can quantize."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class QuantLinear(nn.Module):
    """Linear layer with fake-quantized weights and (optionally) input activations.

    Args:
        weight: latent full-precision weight `[out, in]`.
        bias: full-precision bias `[out]` or None.
        weight_config: weight quantization settings.
        activation_bits: bits of the input quantizer, or None for full-precision inputs.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None,
        weight_config: WeightQuantConfig,
        activation_bits: int | None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.weight_config = weight_config
        self.input_quantizer = ActivationQuantizer(activation_bits, QuantPoint.INPUT) if activation_bits else None

    @classmethod
    def from_linear(cls, module: nn.Module, weight_config: WeightQuantConfig, activation_bits: int | None) -> QuantLinear:
        """Build from `nn.Linear` (sharing its parameters) or `Conv1D` (transposing its weight)."""
        if _is_conv1d(module):
            weight = nn.Parameter(module.weight.detach().t().contiguous(), requires_grad=module.weight.requires_grad)
        else:
            weight = module.weight
        return cls(weight, module.bias, weight_config, activation_bits)

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return the integer codes, scales and offsets of the current latent weight."""
        return quantize_weight(self.weight, self.weight_config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        weight = fake_quantize_weight(self.weight, self.weight_config)
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weights={self.weight_config.scheme.value}"


class PackedLinear(nn.Module):
    """Linear layer whose weight is stored as packed integer codes and per-row scales.

    Buffers: `weight_packed` (uint8 `[out, bytes]`), `weight_scale` (`[out]`) and, for
    mean-centred weights, `weight_offset` (`[out]`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        layout: packing.Layout,
        scale_dtype: str,
        centered: bool,
        activation_bits: int | None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layout = packing.Layout(layout)
        dtype = storage_dtype(scale_dtype)
        columns = packing.packed_columns(in_features, self.layout)
        self.register_buffer("weight_packed", torch.zeros(out_features, columns, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=dtype))
        self.register_buffer("weight_offset", torch.zeros(out_features, dtype=dtype) if centered else None)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.input_quantizer = ActivationQuantizer(activation_bits, QuantPoint.INPUT) if activation_bits else None
        self._dequantized: torch.Tensor | None = None

    @classmethod
    def from_quant_linear(cls, module: QuantLinear, layout: packing.Layout) -> PackedLinear:
        """Pack the current weight of a trained `QuantLinear`, keeping its input quantizer."""
        config = module.weight_config
        packed = cls(
            module.in_features,
            module.out_features,
            module.bias is not None,
            layout,
            config.scale_dtype,
            config.center,
            None,
        )
        codes, scale, offset = module.quantized()
        dtype = storage_dtype(config.scale_dtype)
        packed.weight_packed = packing.pack(codes, layout)
        packed.weight_scale = scale.to(dtype)
        if offset is not None:
            packed.weight_offset = offset.to(dtype)
        if module.bias is not None:
            packed.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
        packed.input_quantizer = module.input_quantizer
        return packed

    def codes(self) -> torch.Tensor:
        return packing.unpack(self.weight_packed, self.layout, self.in_features)

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """Return the `[out, in]` weight `scale * codes + offset`, cached after the first call."""
        if self._dequantized is None or self._dequantized.dtype != dtype or self._dequantized.device != self.weight_packed.device:
            self._dequantized = dequantize_weight(self.codes(), self.weight_scale, self.weight_offset, dtype)
        return self._dequantized

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized `[out, in]` float32 weight, for code that reads `module.weight` (T5's
        feed-forward checks its dtype); computing uses the packed buffers."""
        return self.dequantized_weight(torch.float32)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._dequantized = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        # NOTE: the codes are unpacked to a cached float weight on first use. Memory at inference
        # time is therefore that of a float model: the packed form saves disk, not RAM.
        weight = self.dequantized_weight(torch.float32).to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout.value}"
