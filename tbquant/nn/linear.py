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
from tbquant.nn import kernels, native
from tbquant.quantizers.activation import ActivationQuantizer, QuantPoint
from tbquant.quantizers.weight import dequantize_weight, fake_quantize_weight, quantize_weight, storage_dtype

# Largest difference between the outputs of a packed layer and of the fake-quantized layer it was
# packed from, on the same input, relative to the largest output magnitude (at least 1). Both use
# the same codes and scales. The packed layer sums exactly in int32, while the fake-quantized one
# sums float32 products. That rounding measured below 2e-7 of the largest output on random layers
# of 32 to 576 inputs, so the bound leaves a wide margin.
OUTPUT_TOLERANCE = 1e-5


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

    Buffers saved in the export: `weight_packed` (uint8, in the disk `layout` of export format
    `format_version`, shaped by `packing.packed_shape`), `weight_scale` (`[out]`) and, for
    mean-centred weights, `weight_offset` (`[out]`).

    Before the first forward pass (or through `prepare_for_inference`), the codes move to the
    planar layout of `tbquant.nn.kernels` (2 bits per ternary weight, 1 per binary weight, rows padded to a
    multiple of 4 or 8 and columns to a multiple of 8) and
    `weight_packed` is dropped; `state_dict` packs them back to the disk layout. No float copy of
    the weight is kept: every forward pass computes from the codes. On CPU, up to
    `native.MAX_TOKENS` tokens go through the fused kernel of `tbquant.nn.native`, which reads
    the packed codes directly. More tokens, and other devices, unpack the codes first.

    With an input quantizer, the product is integer work: int8 activation codes times the
    weight codes, accumulated in int32 (the fused kernel, or `torch._int_mm` on CPU), then
    scaled by the activation scale and the row scale. Its outputs equal those of the fake-quantized `QuantLinear` up to
    float32 rounding, because both use the same codes and scales (`OUTPUT_TOLERANCE`). Without
    an input quantizer, the codes are dequantized by `dequantize_weight` for each forward pass
    and multiplied in the input's dtype, which is exactly what `QuantLinear` computes.
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
        format_version: int = packing.STREAM_FORMAT_VERSION,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.layout = packing.Layout(layout)
        self.format_version = format_version
        self.code_bits = 1 if self.layout == packing.Layout.BINARY else 2
        dtype = storage_dtype(scale_dtype)
        self.register_buffer("weight_packed", torch.zeros(self._packed_shape(), dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features, dtype=dtype))
        self.register_buffer("weight_offset", torch.zeros(out_features, dtype=dtype) if centered else None)
        self.register_buffer("weight_planes", None, persistent=False)
        self.register_buffer("weight_code_sums", None, persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.input_quantizer = ActivationQuantizer(activation_bits, QuantPoint.INPUT) if activation_bits else None
        self._native_kernel: native.PackedKernel | None = None

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

    @property
    def binary(self) -> bool:
        return self.layout == packing.Layout.BINARY

    def _packed_shape(self) -> tuple[int, ...]:
        return packing.packed_shape(self.out_features, self.in_features, self.layout, self.format_version)

    @torch.no_grad()
    def prepare_for_inference(self) -> None:
        """Move the codes from the disk layout to the planar in-memory layout, dropping `weight_packed`."""
        if self.weight_planes is not None:
            return
        codes = packing.unpack(self.weight_packed, self.layout, self.out_features, self.in_features, self.format_version)
        unsigned = (codes + 1) // 2 if self.binary else codes + 1
        self.weight_planes = kernels.pack_planes(unsigned, self.code_bits)
        self.weight_code_sums = unsigned.sum(dim=1, dtype=torch.int32)
        self.weight_packed = None

    def _unsigned_codes(self) -> torch.Tensor:
        self.prepare_for_inference()
        return kernels.unpack_planes(self.weight_planes, self.code_bits)

    def codes(self) -> torch.Tensor:
        """Return the `[out, in]` int8 weight codes, in {-1, 0, 1} or {-1, 1}."""
        if self.weight_planes is None:
            return packing.unpack(self.weight_packed, self.layout, self.out_features, self.in_features, self.format_version)
        unsigned = self._unsigned_codes()[: self.out_features, : self.in_features].view(torch.int8)
        return 2 * unsigned - 1 if self.binary else unsigned - 1

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Return the `[out, in]` weight `scale * codes + offset` in `dtype` (a new tensor each call)."""
        return dequantize_weight(self.codes(), self.weight_scale, self.weight_offset, dtype)

    @property
    def weight(self) -> torch.Tensor:
        """A meta tensor with the shape and dtype of the dequantized weight.

        It serves code that reads `module.weight.dtype` or `.shape`, as T5's feed-forward does.
        `dequantized_weight()` returns the values."""
        dtype = self.bias.dtype if self.bias is not None else torch.float32
        return torch.empty(self.out_features, self.in_features, dtype=dtype, device="meta")

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight_packed is None:
            destination[prefix + "weight_packed"] = packing.pack(self.codes(), self.layout, self.format_version)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.weight_packed is None:
            self.weight_packed = torch.zeros(self._packed_shape(), dtype=torch.uint8, device=self.weight_scale.device)
        self.weight_planes = None
        self.weight_code_sums = None
        self._native_kernel = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self.input_quantizer
        if (
            x.numel() <= native.MAX_TOKENS * self.in_features
            and (quantizer is None or quantizer.observer is None)
            and native.usable(x)
        ):
            return self._native_forward(x)
        if quantizer is None:
            weight = self.dequantized_weight(x.dtype)
            return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))
        return self._integer_forward(x)

    def _integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer.observer is None and kernels.int_mm_available(x.device) and native.usable(x):
            return self._native_prefill(x)
        leading = x.shape[:-1]
        codes, activation_scale = self.input_quantizer.quantize(x.reshape(-1, self.in_features).float())
        quantizer = self.input_quantizer
        shift = kernels.UNSIGNED_SHIFT if quantizer.levels_above_zero > 127 else 0
        dots, code_sums = kernels.code_dot_products(codes, shift, self._unsigned_codes(), self.weight_code_sums, self.binary)

        # y = s * a * dots + s * mu * S + bias, in float32 (the int32 dots convert exactly).
        output = dots * activation_scale
        output *= self.weight_scale.float()
        if self.weight_offset is not None:
            output += (activation_scale * code_sums) * self.weight_offset.float()
        if self.bias is not None:
            output += self.bias.float()
        return output.view(*leading, self.out_features).to(x.dtype)

    def _native_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute a few tokens with the fused CPU kernel (`tbquant.nn.native`): same formula, one call."""
        kernel = self._native_kernel or self._build_native_kernel()
        output = kernel(x.reshape(-1, self.in_features).float().contiguous(), self._learned_scale())
        return output.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _native_prefill(self, x: torch.Tensor) -> torch.Tensor:
        """Many tokens: quantize and rescale in the kernel, multiply with `torch._int_mm` on all cores."""
        kernel = self._native_kernel or self._build_native_kernel()
        codes, code_sums, scales = kernel.quantize(x.reshape(-1, self.in_features).float().contiguous(), self._learned_scale())
        products = torch._int_mm(codes, self._unsigned_codes().view(torch.int8).t())
        output = kernel.rescale(products, code_sums, scales)
        return output.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def _learned_scale(self) -> float:
        """Return the input quantizer's learned scale `alpha`, or 1.0 (ignored by the kernel) for dynamic ones."""
        quantizer = self.input_quantizer
        return float(quantizer.alpha) if quantizer is not None and quantizer.learned else 1.0

    def _build_native_kernel(self) -> native.PackedKernel:
        """Prepare the fused kernel's view of this layer (once; `_apply` and loading reset it)."""
        self.prepare_for_inference()
        quantizer = self.input_quantizer
        settings = None
        if quantizer is not None:
            levels = quantizer.levels_above_zero
            signed = bool(quantizer.signed)
            if not quantizer.learned:
                mode = native.DYNAMIC
            else:
                quantizer._check_initialized()
                mode = native.LEARNED_SIGN if quantizer.bits == 1 and signed else native.LEARNED_ROUND
            settings = (mode, levels, signed, kernels.UNSIGNED_SHIFT if levels > 127 else 0)
        self._native_kernel = native.PackedKernel(
            self.weight_planes,
            self.code_bits,
            self.in_features,
            self.weight_code_sums,
            self.weight_scale.float().contiguous(),
            None if self.weight_offset is None else self.weight_offset.float().contiguous(),
            None if self.bias is None else self.bias.detach().float().contiguous(),
            settings,
        )
        return self._native_kernel

    def _apply(self, fn, recurse=True):
        # Moving or converting the module replaces its tensors: the kernel's addresses go stale.
        self._native_kernel = None
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, layout={self.layout.value}, format_version={self.format_version}"
