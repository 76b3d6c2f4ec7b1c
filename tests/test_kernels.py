"""The planar in-memory layout, the integer product and `PackedLinear` against `QuantLinear`."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbquant import packing
from tbquant.config import QuantizationConfig, WeightQuantConfig
from tbquant.nn import PackedLinear, QuantLinear, kernels
from tbquant.nn.convert import layout_for
from tbquant.nn.linear import OUTPUT_TOLERANCE
from tbquant.quantizers.weight import dequantize_weight


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("out_features", [1, 7, 8, 24])
@pytest.mark.parametrize("in_features", [1, 31, 32, 100, 576])
def test_planes_round_trip(bits, out_features, in_features):
    generator = torch.Generator().manual_seed(in_features)
    unsigned = torch.randint(0, 2 if bits == 1 else 3, (out_features, in_features), generator=generator, dtype=torch.uint8)

    packed = kernels.pack_planes(unsigned, bits)
    unpacked = kernels.unpack_planes(packed, bits)

    rows, columns = kernels.padded_shape(out_features, in_features, bits)
    assert packed.shape == (rows * bits // 8, columns)
    assert unpacked.shape == (rows, columns)
    assert torch.equal(unpacked[:out_features, :in_features], unsigned)
    assert not unpacked[out_features:].any()
    assert not unpacked[:, in_features:].any()


def test_planes_worked_example():
    """The docstring's example: column 0 of rows 0, 2, 4 and 6 with values [-1, 0, 1, 1] makes byte 164."""
    unsigned = torch.ones(8, 8, dtype=torch.uint8)
    unsigned[[0, 2, 4, 6], 0] = torch.tensor([0, 1, 2, 2], dtype=torch.uint8)

    packed = kernels.pack_planes(unsigned, 2)

    assert packed.shape == (2, 8)
    assert packed[0, 0].item() == 164


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("unsigned_activations", [False, True])
@pytest.mark.parametrize("tokens", [5, 40])
def test_code_dot_products_exact(binary, unsigned_activations, tokens):
    """Few tokens correct the products, many tokens (4 * 40 > 72 columns) correct the weights."""
    generator = torch.Generator().manual_seed(0)
    in_features = 70
    low, high = (0, 256) if unsigned_activations else (-127, 128)
    codes = torch.randint(low, high, (tokens, in_features), generator=generator).float()
    values = torch.randint(0, 2, (9, in_features), generator=generator) * 2 - 1 if binary else torch.randint(-1, 2, (9, in_features), generator=generator)
    unsigned = (values + 1) // 2 if binary else values + 1
    planes = kernels.unpack_planes(kernels.pack_planes(unsigned, 1 if binary else 2), 1 if binary else 2)

    shift = kernels.UNSIGNED_SHIFT if unsigned_activations else 0

    dots, sums = kernels.code_dot_products(codes, shift, planes, unsigned.sum(dim=1, dtype=torch.int32), binary)

    assert dots.dtype == torch.int32
    assert torch.equal(dots.long(), codes.long() @ values.long().t())
    assert torch.equal(sums.squeeze(1).long(), codes.long().sum(dim=1))


def quant_linear(scheme: str, center: bool, bits: int | None, in_features: int, bias: bool = True) -> QuantLinear:
    generator = torch.Generator().manual_seed(in_features)
    weight = nn.Parameter(torch.randn(24, in_features, generator=generator))
    bias_parameter = nn.Parameter(torch.randn(24, generator=generator)) if bias else None
    module = QuantLinear(weight, bias_parameter, WeightQuantConfig(scheme=scheme, center=center), bits)
    if module.input_quantizer is not None:
        samples = torch.randn(64, in_features, generator=generator)
        module.input_quantizer.initialize_from(samples)
    return module.eval()


@pytest.mark.parametrize("scheme", ["ternary", "binary", "twn", "absmean"])
@pytest.mark.parametrize("bits", [8, 4, 2, 1, None])
@pytest.mark.parametrize("center", [False, True])
def test_packed_linear_matches_quant_linear(scheme, bits, center):
    if center and scheme == "absmean":
        pytest.skip("absmean has no centering")
    quantized = quant_linear(scheme, center, bits, in_features=45)
    layout = layout_for(QuantizationConfig(weights=quantized.weight_config))
    packed = PackedLinear.from_quant_linear(quantized, layout)
    inputs = torch.randn(2, 9, 45, generator=torch.Generator().manual_seed(1))

    with torch.no_grad():
        expected = quantized(inputs)
        actual = packed(inputs)

    relative = (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())
    assert actual.shape == expected.shape
    assert relative <= OUTPUT_TOLERANCE


def test_unsigned_eight_bit_inputs_match():
    """Non-negative inputs use codes up to 255, which the integer path shifts into int8."""
    quantized = quant_linear("ternary", False, 8, in_features=64)
    quantized.input_quantizer.initialize_from(torch.rand(16, 64))
    packed = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    inputs = torch.rand(4, 64)

    with torch.no_grad():
        expected = quantized(inputs)
        actual = packed(inputs)

    assert not bool(quantized.input_quantizer.signed)
    assert (actual - expected).abs().max().item() <= OUTPUT_TOLERANCE * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("layout", list(packing.Layout))
def test_state_dict_keeps_disk_layout(layout):
    scheme = "binary" if layout == packing.Layout.BINARY else "ternary"
    quantized = quant_linear(scheme, False, 8, in_features=37)
    packed = PackedLinear.from_quant_linear(quantized, layout)
    disk = packed.weight_packed.clone()

    packed.prepare_for_inference()
    state = packed.state_dict()

    assert packed.weight_packed is None
    assert torch.equal(state["weight_packed"], disk)
    assert "weight_planes" not in state


def test_load_state_dict_after_prepare():
    quantized = quant_linear("ternary", True, 8, in_features=40)
    source = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    target = PackedLinear(40, 24, True, packing.Layout.TERNARY_COMPACT, "float16", True, 8)
    target.prepare_for_inference()
    inputs = torch.randn(3, 40)

    target.load_state_dict(source.state_dict())

    with torch.no_grad():
        assert torch.equal(target(inputs), source(inputs))


def test_dequantized_weight_matches_fake_quantized():
    quantized = quant_linear("ternary", True, None, in_features=33)
    packed = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    packed.prepare_for_inference()

    codes, scale, offset = quantized.quantized()

    assert torch.equal(packed.codes(), codes)
    assert torch.equal(packed.dequantized_weight(), dequantize_weight(codes, scale.half(), offset.half(), torch.float32))
    assert packed.weight.device.type == "meta"
    assert packed.weight.shape == (24, 33)


def test_float_fallback_equals_int_mm(monkeypatch):
    """Devices without the integer path (CUDA at batch 1) use a float product of the same codes."""
    quantized = quant_linear("ternary", True, 8, in_features=96)
    packed = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    inputs = torch.randn(5, 96)
    with torch.no_grad():
        integer = packed(inputs)
        monkeypatch.setattr(kernels, "int_mm_available", lambda device: False)
        fallback = packed(inputs)

    assert torch.equal(fallback, integer)
