"""Bit packing of ternary and binary codes: exact round trips, the documented byte layouts and
the checks on malformed packed tensors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tbquant import packing
from tbquant.packing import Layout

TERNARY_LAYOUTS = [Layout.TERNARY_DENSE, Layout.TERNARY_COMPACT]
ALL_LAYOUTS = [*TERNARY_LAYOUTS, Layout.BINARY]

# in_features values around the group sizes 4 (dense), 5 (compact) and 8 (binary).
SHAPES = [(1, 1), (3, 4), (2, 5), (4, 7), (5, 8), (3, 9), (2, 13), (6, 40), (7, 61), (16, 100)]


def random_codes(shape: tuple[int, int], layout: Layout, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if layout == Layout.BINARY:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(torch.int8)
    return torch.randint(-1, 2, shape, generator=generator).to(torch.int8)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_round_trip_exact(layout, shape):
    codes = random_codes(shape, layout)

    packed = packing.pack(codes, layout)
    unpacked = packing.unpack(packed, layout, shape[1])

    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], math.ceil(shape[1] / layout.values_per_byte))
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize(
    ("layout", "values_per_byte", "bits_per_weight"),
    [(Layout.TERNARY_DENSE, 4, 2.0), (Layout.TERNARY_COMPACT, 5, 1.6), (Layout.BINARY, 8, 1.0)],
    ids=lambda value: value.value if isinstance(value, Layout) else None,
)
def test_layout_density(layout, values_per_byte, bits_per_weight):
    assert layout.values_per_byte == values_per_byte
    assert layout.bits_per_weight == bits_per_weight


@pytest.mark.parametrize(
    ("in_features", "layout", "columns"),
    [
        (4, Layout.TERNARY_DENSE, 1),
        (5, Layout.TERNARY_DENSE, 2),
        (5, Layout.TERNARY_COMPACT, 1),
        (6, Layout.TERNARY_COMPACT, 2),
        (8, Layout.BINARY, 1),
        (9, Layout.BINARY, 2),
        (576, Layout.TERNARY_COMPACT, 116),
    ],
)
def test_packed_columns_rounds_up(in_features, layout, columns):
    assert packing.packed_columns(in_features, layout) == columns


def test_dense_docstring_example():
    codes = torch.tensor([[-1, 0, 1, 1]], dtype=torch.int8)

    packed = packing.pack(codes, Layout.TERNARY_DENSE)

    assert packed.tolist() == [[164]]


def test_compact_docstring_example():
    codes = torch.tensor([[-1, 0, 1, 1, 0]], dtype=torch.int8)

    packed = packing.pack(codes, Layout.TERNARY_COMPACT)

    assert packed.tolist() == [[156]]


def test_binary_docstring_example():
    codes = torch.tensor([[1, -1, -1, 1, 1, 1, -1, -1]], dtype=torch.int8)

    packed = packing.pack(codes, Layout.BINARY)

    assert packed.tolist() == [[57]]


@pytest.mark.parametrize(
    ("layout", "byte"),
    [(Layout.TERNARY_DENSE, 164), (Layout.TERNARY_COMPACT, 156), (Layout.BINARY, 57)],
    ids=lambda value: value.value if isinstance(value, Layout) else None,
)
def test_docstring_bytes_unpack(layout, byte):
    expected = {
        Layout.TERNARY_DENSE: [[-1, 0, 1, 1]],
        Layout.TERNARY_COMPACT: [[-1, 0, 1, 1, 0]],
        Layout.BINARY: [[1, -1, -1, 1, 1, 1, -1, -1]],
    }[layout]
    packed = torch.tensor([[byte]], dtype=torch.uint8)

    assert packing.unpack(packed, layout, len(expected[0])).tolist() == expected


@pytest.mark.parametrize("layout", TERNARY_LAYOUTS, ids=lambda layout: layout.value)
def test_ternary_padding_is_zero_code(layout):
    # Padding uses the unsigned code 1 (value 0): a row of one +1 packs like [+1, 0, 0, ...].
    packed = packing.pack(torch.tensor([[1]], dtype=torch.int8), layout)

    expected = 2 + 1 * 4 + 1 * 16 + 1 * 64 if layout == Layout.TERNARY_DENSE else 2 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81
    assert packed.tolist() == [[expected]]


def test_binary_padding_is_zero_bits():
    packed = packing.pack(torch.tensor([[1, 1, 1]], dtype=torch.int8), Layout.BINARY)

    assert packed.tolist() == [[0b111]]


def test_compact_byte_above_242_raises():
    packed = torch.tensor([[243]], dtype=torch.uint8)

    with pytest.raises(ValueError, match="243"):
        packing.unpack(packed, Layout.TERNARY_COMPACT, 5)


def test_compact_byte_242_is_all_plus_one():
    packed = torch.tensor([[242]], dtype=torch.uint8)

    assert packing.unpack(packed, Layout.TERNARY_COMPACT, 5).tolist() == [[1, 1, 1, 1, 1]]


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_wrong_columns_raises(layout):
    packed = torch.zeros((3, 4), dtype=torch.uint8)
    in_features = 4 * layout.values_per_byte + 1  # needs 5 columns

    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        packing.unpack(packed, layout, in_features)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_wrong_dtype_raises(layout):
    packed = torch.zeros((3, 1), dtype=torch.int16)

    with pytest.raises(ValueError, match="int16"):
        packing.unpack(packed, layout, layout.values_per_byte)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_one_dimensional_raises(layout):
    packed = torch.zeros(4, dtype=torch.uint8)

    with pytest.raises(ValueError, match="invalid packed tensor"):
        packing.unpack(packed, layout, 4)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_pack_one_dimensional_raises(layout):
    codes = torch.ones(8, dtype=torch.int8)

    with pytest.raises(ValueError, match=r"\(8,\)"):
        packing.pack(codes, layout)


def test_unknown_layout_raises():
    with pytest.raises(ValueError, match="ternary-sparse"):
        packing.unpack(torch.zeros((1, 1), dtype=torch.uint8), "ternary-sparse", 4)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_pack_accepts_layout_string(layout):
    codes = random_codes((2, 11), layout)

    assert torch.equal(packing.pack(codes, layout.value), packing.pack(codes, layout))


@st.composite
def code_matrices(draw, binary: bool):
    rows = draw(st.integers(min_value=1, max_value=6))
    columns = draw(st.integers(min_value=1, max_value=45))
    values = [-1, 1] if binary else [-1, 0, 1]
    flat = draw(st.lists(st.sampled_from(values), min_size=rows * columns, max_size=rows * columns))
    return torch.tensor(flat, dtype=torch.int8).view(rows, columns)


@settings(max_examples=150, deadline=None)
@given(codes=code_matrices(binary=False), layout=st.sampled_from(TERNARY_LAYOUTS))
def test_ternary_round_trip_property(codes, layout):
    packed = packing.pack(codes, layout)

    assert torch.equal(packing.unpack(packed, layout, codes.shape[1]), codes)


@settings(max_examples=150, deadline=None)
@given(codes=code_matrices(binary=True))
def test_binary_round_trip_property(codes):
    packed = packing.pack(codes, Layout.BINARY)

    assert torch.equal(packing.unpack(packed, Layout.BINARY, codes.shape[1]), codes)


@settings(max_examples=100, deadline=None)
@given(codes=code_matrices(binary=False), layout=st.sampled_from(TERNARY_LAYOUTS))
def test_rows_pack_independently_property(codes, layout):
    packed = packing.pack(codes, layout)

    for row in range(codes.shape[0]):
        assert torch.equal(packing.pack(codes[row : row + 1], layout), packed[row : row + 1])


@settings(max_examples=100, deadline=None)
@given(codes=code_matrices(binary=False))
def test_compact_bytes_at_most_242_property(codes):
    packed = packing.pack(codes, Layout.TERNARY_COMPACT)

    assert int(packed.max()) <= 242
