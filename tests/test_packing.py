"""Bit packing of ternary and binary codes: exact round trips in both export formats, the
documented byte layouts, row lookups and the checks on malformed packed tensors."""

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
FORMATS = [packing.ROW_PADDED_FORMAT_VERSION, packing.STREAM_FORMAT_VERSION]

# in_features values around the group sizes 4 (dense), 5 (compact) and 8 (binary), single rows,
# and shapes whose code count is not a multiple of 5 while some rows are.
SHAPES = [(1, 1), (3, 4), (2, 5), (4, 7), (5, 8), (3, 9), (2, 13), (6, 40), (7, 61), (16, 100), (1, 576), (3, 576), (9, 3), (11, 1)]


def random_codes(shape: tuple[int, int], layout: Layout, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if layout == Layout.BINARY:
        return (torch.randint(0, 2, shape, generator=generator) * 2 - 1).to(torch.int8)
    return torch.randint(-1, 2, shape, generator=generator).to(torch.int8)


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_round_trip_exact(layout, shape, format_version):
    codes = random_codes(shape, layout)

    packed = packing.pack(codes, layout, format_version)
    unpacked = packing.unpack(packed, layout, *shape, format_version)

    assert packed.dtype == torch.uint8
    assert packed.shape == packing.packed_shape(*shape, layout, format_version)
    assert unpacked.dtype == torch.int8
    assert torch.equal(unpacked, codes)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_compact_stream_pads_only_the_last_byte(shape):
    out_features, in_features = shape
    codes = random_codes(shape, Layout.TERNARY_COMPACT)

    packed = packing.pack(codes, Layout.TERNARY_COMPACT)
    bits_per_weight = 8 * packed.numel() / (out_features * in_features)

    assert packed.shape == (math.ceil(out_features * in_features / 5),)
    assert bits_per_weight <= 1.6 + 8 / (out_features * in_features)
    assert packing.packed_bytes(out_features, in_features, Layout.TERNARY_COMPACT) == packed.numel()


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", [Layout.TERNARY_DENSE, Layout.BINARY], ids=lambda layout: layout.value)
def test_dense_and_binary_pad_rows_in_every_format(layout, format_version):
    codes = random_codes((3, 13), layout)

    packed = packing.pack(codes, layout, format_version)

    assert packed.shape == (3, packing.packed_columns(13, layout))
    assert torch.equal(packed, packing.pack(codes, layout, packing.ROW_PADDED_FORMAT_VERSION))


def test_packed_shape_docstring_example():
    assert packing.packed_shape(3, 576, Layout.TERNARY_COMPACT) == (346,)
    assert packing.packed_shape(3, 576, Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION) == (3, 116)


def test_current_export_format_writes_the_stream():
    from tbquant.serialization import FORMAT_VERSION

    assert packing.is_stream(Layout.TERNARY_COMPACT, FORMAT_VERSION)
    assert not packing.is_stream(Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION)


def test_stream_rows_start_inside_bytes():
    # Two rows of 7 values make 14 codes in 3 bytes. Row 1 starts at digit 2 of byte 1.
    codes = torch.tensor([[-1, 0, 1, 1, 0, 1, -1], [1, 1, 0, -1, -1, 0, 1]], dtype=torch.int8)

    packed = packing.pack(codes, Layout.TERNARY_COMPACT)

    unsigned = (codes.view(-1) + 1).tolist() + [1]
    expected = [sum(code * 3**digit for digit, code in enumerate(unsigned[index : index + 5])) for index in (0, 5, 10)]
    assert packed.tolist() == expected
    assert packing.unpack_rows(packed, Layout.TERNARY_COMPACT, 2, 7, torch.tensor([1])).tolist() == [codes[1].tolist()]


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"{shape[0]}x{shape[1]}")
def test_unpack_rows_equals_full_unpack(layout, shape, format_version):
    codes = random_codes(shape, layout)
    packed = packing.pack(codes, layout, format_version)
    rows = torch.randint(0, shape[0], (17,), generator=torch.Generator().manual_seed(1))
    rows[0], rows[-1] = 0, shape[0] - 1  # the first and the last row, which ends in the padded byte

    assert torch.equal(packing.unpack_rows(packed, layout, *shape, rows, format_version), codes[rows])


@pytest.mark.parametrize("row", [-1, 3])
def test_unpack_rows_out_of_range_raises(row):
    packed = packing.pack(random_codes((3, 7), Layout.TERNARY_COMPACT), Layout.TERNARY_COMPACT)

    with pytest.raises(IndexError, match="3 rows"):
        packing.unpack_rows(packed, Layout.TERNARY_COMPACT, 3, 7, torch.tensor([0, row]))


def test_unpack_rows_checks_the_bytes_it_reads():
    packed = packing.pack(random_codes((3, 7), Layout.TERNARY_COMPACT), Layout.TERNARY_COMPACT)
    packed[2] = 243  # byte 2 contains codes 10 to 14, in row 1 and row 2

    with pytest.raises(ValueError, match="243"):
        packing.unpack_rows(packed, Layout.TERNARY_COMPACT, 3, 7, torch.tensor([2]))


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

    assert packing.pack(codes, Layout.TERNARY_COMPACT).tolist() == [156]
    assert packing.pack(codes, Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION).tolist() == [[156]]


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

    assert packing.unpack(packed, layout, 1, len(expected[0]), packing.ROW_PADDED_FORMAT_VERSION).tolist() == expected


@pytest.mark.parametrize("layout", TERNARY_LAYOUTS, ids=lambda layout: layout.value)
def test_ternary_padding_is_zero_code(layout):
    # Padding uses the unsigned code 1 (value 0): a row of one +1 packs like [+1, 0, 0, ...].
    packed = packing.pack(torch.tensor([[1]], dtype=torch.int8), layout)

    expected = 2 + 1 * 4 + 1 * 16 + 1 * 64 if layout == Layout.TERNARY_DENSE else 2 + 1 * 3 + 1 * 9 + 1 * 27 + 1 * 81
    assert packed.reshape(-1).tolist() == [expected]


def test_binary_padding_is_zero_bits():
    packed = packing.pack(torch.tensor([[1, 1, 1]], dtype=torch.int8), Layout.BINARY)

    assert packed.tolist() == [[0b111]]


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
def test_compact_byte_above_242_raises(format_version):
    packed = torch.tensor([243], dtype=torch.uint8).view(packing.packed_shape(1, 5, Layout.TERNARY_COMPACT, format_version))

    with pytest.raises(ValueError, match="243"):
        packing.unpack(packed, Layout.TERNARY_COMPACT, 1, 5, format_version)


def test_compact_byte_242_is_all_plus_one():
    packed = torch.tensor([242], dtype=torch.uint8)

    assert packing.unpack(packed, Layout.TERNARY_COMPACT, 1, 5).tolist() == [[1, 1, 1, 1, 1]]


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_wrong_columns_raises(layout, format_version):
    packed = torch.zeros((3, 4), dtype=torch.uint8)
    in_features = 4 * layout.values_per_byte + 1  # needs 5 columns

    with pytest.raises(ValueError, match=r"\(3, 4\)"):
        packing.unpack(packed, layout, 3, in_features, format_version)


@pytest.mark.parametrize("format_version", FORMATS, ids=lambda version: f"format{version}")
@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_wrong_dtype_raises(layout, format_version):
    packed = torch.zeros(packing.packed_shape(3, layout.values_per_byte, layout, format_version), dtype=torch.int16)

    with pytest.raises(ValueError, match="int16"):
        packing.unpack(packed, layout, 3, layout.values_per_byte, format_version)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_unpack_row_padded_as_stream_raises(layout):
    # A format-1 matrix read as format 2 (and the reverse for ternary-compact) has the wrong shape.
    packed = torch.zeros(4, dtype=torch.uint8)

    with pytest.raises(ValueError, match="invalid packed tensor"):
        packing.unpack(packed, layout, 2, 4, packing.ROW_PADDED_FORMAT_VERSION)


def test_unpack_stream_with_wrong_length_raises():
    with pytest.raises(ValueError, match=r"format 2 need uint8 \[3\]"):
        packing.unpack(torch.zeros(4, dtype=torch.uint8), Layout.TERNARY_COMPACT, 2, 7)


@pytest.mark.parametrize("layout", ALL_LAYOUTS, ids=lambda layout: layout.value)
def test_pack_one_dimensional_raises(layout):
    codes = torch.ones(8, dtype=torch.int8)

    with pytest.raises(ValueError, match=r"\(8,\)"):
        packing.pack(codes, layout)


def test_unknown_layout_raises():
    with pytest.raises(ValueError, match="ternary-sparse"):
        packing.unpack(torch.zeros((1, 1), dtype=torch.uint8), "ternary-sparse", 1, 4)


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
@given(codes=code_matrices(binary=False), layout=st.sampled_from(TERNARY_LAYOUTS), format_version=st.sampled_from(FORMATS))
def test_ternary_round_trip_property(codes, layout, format_version):
    packed = packing.pack(codes, layout, format_version)

    assert torch.equal(packing.unpack(packed, layout, *codes.shape, format_version), codes)


@settings(max_examples=150, deadline=None)
@given(codes=code_matrices(binary=True))
def test_binary_round_trip_property(codes):
    packed = packing.pack(codes, Layout.BINARY)

    assert torch.equal(packing.unpack(packed, Layout.BINARY, *codes.shape), codes)


@settings(max_examples=100, deadline=None)
@given(codes=code_matrices(binary=False), layout=st.sampled_from(TERNARY_LAYOUTS))
def test_row_padded_rows_pack_independently_property(codes, layout):
    row_padded = packing.ROW_PADDED_FORMAT_VERSION
    packed = packing.pack(codes, layout, row_padded)

    for row in range(codes.shape[0]):
        assert torch.equal(packing.pack(codes[row : row + 1], layout, row_padded), packed[row : row + 1])


@settings(max_examples=100, deadline=None)
@given(codes=code_matrices(binary=False))
def test_stream_is_the_flattened_matrix_property(codes):
    stream = packing.pack(codes, Layout.TERNARY_COMPACT)
    one_row = codes.reshape(1, -1)

    assert torch.equal(stream, packing.pack(one_row, Layout.TERNARY_COMPACT, packing.ROW_PADDED_FORMAT_VERSION)[0])
    for row in range(codes.shape[0]):
        assert torch.equal(packing.unpack_rows(stream, Layout.TERNARY_COMPACT, *codes.shape, torch.tensor([row])), codes[row : row + 1])


@settings(max_examples=100, deadline=None)
@given(codes=code_matrices(binary=False), format_version=st.sampled_from(FORMATS))
def test_compact_bytes_at_most_242_property(codes, format_version):
    packed = packing.pack(codes, Layout.TERNARY_COMPACT, format_version)

    assert int(packed.max()) <= 242
