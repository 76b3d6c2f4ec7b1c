"""Quantizers: the formulas of weight and activation quantization, in one place."""

from tbquant.quantizers.activation import ActivationQuantizer, QuantPoint
from tbquant.quantizers.weight import dequantize_weight, fake_quantize_weight, quantize_weight

__all__ = [
    "ActivationQuantizer",
    "QuantPoint",
    "dequantize_weight",
    "fake_quantize_weight",
    "quantize_weight",
]
