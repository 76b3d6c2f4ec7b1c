"""`PackedEmbedding` and `PackedLinear` in both export formats: row lookups, loading and saving
the disk layout of format 1 (row-padded) and format 2 (ternary-compact stream)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbquant import packing
from tbquant.config import WeightQuantConfig
from tbquant.nn import PackedEmbedding, PackedLinear, QuantEmbedding, QuantLinear
from tbquant.quantizers.weight import fake_quantize_weight

FORMATS = [packing.ROW_PADDED_FORMAT_VERSION, packing.STREAM_FORMAT_VERSION]
LAYOUTS = list(packing.Layout)


def quant_embedding(layout: packing.Layout, num_embeddings: int, embedding_dim: int, center: bool) -> QuantEmbedding:
    generator = torch.Generator().manual_seed(num_embeddings * embedding_dim)
    scheme = "binary" if layout == packing.Layout.BINARY else "ternary"
    weight = nn.Parameter(torch.randn(num_embeddings, embedding_dim, generator=generator))
    return QuantEmbedding(weight, None, WeightQuantConfig(scheme=scheme, center=center), embed_scale=2.0)


def packed_embedding(quantized: QuantEmbedding, layout: packing.Layout, format_version: int) -> PackedEmbedding:
    """Pack `quantized` as an export of `format_version` stores it and load that into a new module."""
    source = PackedEmbedding.from_quant_embedding(quantized, layout)
    state = source.state_dict()
    codes = packing.unpack(state["weight_packed"], layout, quantized.num_embeddings, quantized.embedding_dim)
    state["weight_packed"] = packing.pack(codes, layout, format_version)
    config = quantized.weight_config
    target = PackedEmbedding(
        quantized.num_embeddings, quantized.embedding_dim, None, layout, config.scale_dtype, config.center, 2.0, format_version
    )
    target.load_state_dict(state)
    return target


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: layout.value)
@pytest.mark.parametrize(("num_embeddings", "embedding_dim"), [(37, 13), (50, 576), (1, 7), (9, 3)])
def test_embedding_lookup_equals_dequantized_rows(layout, format_version, num_embeddings, embedding_dim):
    quantized = quant_embedding(layout, num_embeddings, embedding_dim, center=True)
    packed = packed_embedding(quantized, layout, format_version)
    ids = torch.randint(0, num_embeddings, (3, 11), generator=torch.Generator().manual_seed(2))
    ids[0, 0], ids[-1, -1] = 0, num_embeddings - 1

    with torch.no_grad():
        looked_up = packed(ids)
        expected = quantized(ids)

    assert packed.weight_packed.shape == packing.packed_shape(num_embeddings, embedding_dim, layout, format_version)
    assert torch.equal(looked_up, F.embedding(ids, packed.weight) * 2.0)
    assert torch.equal(looked_up, expected)


def test_embedding_lookup_out_of_range_raises():
    quantized = quant_embedding(packing.Layout.TERNARY_COMPACT, 9, 3, center=False)
    packed = packed_embedding(quantized, packing.Layout.TERNARY_COMPACT, packing.STREAM_FORMAT_VERSION)

    with pytest.raises(IndexError, match="9 rows"):
        packed(torch.tensor([[0, 9]]))


def test_embedding_formats_give_same_lookups():
    quantized = quant_embedding(packing.Layout.TERNARY_COMPACT, 40, 37, center=False)
    row_padded = packed_embedding(quantized, packing.Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION)
    stream = packed_embedding(quantized, packing.Layout.TERNARY_COMPACT, packing.STREAM_FORMAT_VERSION)
    ids = torch.randint(0, 40, (4, 9), generator=torch.Generator().manual_seed(3))

    assert row_padded.weight_packed.shape == (40, 8)
    assert stream.weight_packed.shape == (296,)
    assert torch.equal(row_padded(ids), stream(ids))


def quant_linear(in_features: int) -> QuantLinear:
    generator = torch.Generator().manual_seed(in_features)
    weight = nn.Parameter(torch.randn(24, in_features, generator=generator))
    module = QuantLinear(weight, None, WeightQuantConfig(), 8)
    return module.eval()


@pytest.mark.parametrize("in_features", [13, 40, 576])
def test_linear_loads_format1_codes(in_features):
    quantized = quant_linear(in_features)
    stream = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    state = stream.state_dict()
    codes, _, _ = quantized.quantized()
    state["weight_packed"] = packing.pack(codes, packing.Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION)
    row_padded = PackedLinear(in_features, 24, False, packing.Layout.TERNARY_COMPACT, "float16", False, 8, packing.ROW_PADDED_FORMAT_VERSION)
    inputs = torch.randn(5, in_features, generator=torch.Generator().manual_seed(4))

    row_padded.load_state_dict(state)

    with torch.no_grad():
        assert torch.equal(row_padded(inputs), stream(inputs))
        assert torch.equal(row_padded.codes(), codes)
    assert torch.equal(row_padded.state_dict()["weight_packed"], state["weight_packed"])


def test_linear_stream_byte_count():
    quantized = quant_linear(13)

    packed = PackedLinear.from_quant_linear(quantized, packing.Layout.TERNARY_COMPACT)
    packed.prepare_for_inference()
    weight_packed = packed.state_dict()["weight_packed"]

    assert weight_packed.shape == (63,)  # ceil(24 * 13 / 5), where rows padded to whole bytes take 72
    assert torch.equal(weight_packed, packing.pack(quantized.quantized()[0], packing.Layout.TERNARY_COMPACT))
    assert torch.equal(fake_quantize_weight(quantized.weight, quantized.weight_config), packed.dequantized_weight())
