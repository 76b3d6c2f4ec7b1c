"""Bit packing of ternary and binary weight codes.

Three layouts of a `[out, in]` code matrix:

- `ternary-dense`: 4 codes per byte, 2 bits each, 2 bits per weight.
- `ternary-compact`: 5 codes per byte in base 3 (3^5 = 243 <= 256), 1.6 bits per weight.
- `binary`: 8 signs per byte, 1 bit per weight.

Ternary values {-1, 0, +1} are stored as the unsigned codes {0, 1, 2} (value + 1); padding
uses code 1 (value 0). Binary values {-1, +1} are stored as bits {0, 1}.

How the rows meet depends on the export's `format_version`:

- row-padded (`ternary-dense` and `binary` in every format, `ternary-compact` in format 1): each
  row is packed on its own into `ceil(in / k)` whole bytes, a `[out, ceil(in / k)]` matrix;
- stream (`ternary-compact` from format 2): the codes of the whole matrix in row-major order,
  5 per byte, only the last byte padded, a `[ceil(out * in / 5)]` vector. Row `r` starts at
  code `r * in`, which is digit `(r * in) % 5` of byte `(r * in) // 5`. Row padding would cost
  up to 4 codes per row: 116 bytes for a 576-input row, 1.611 bits per weight instead of 1.6.
"""

from __future__ import annotations

import enum
import math

import torch


class Layout(str, enum.Enum):
    """Packing layout of a quantized weight on disk."""

    TERNARY_DENSE = "ternary-dense"
    TERNARY_COMPACT = "ternary-compact"
    BINARY = "binary"

    @property
    def values_per_byte(self) -> int:
        return {Layout.TERNARY_DENSE: 4, Layout.TERNARY_COMPACT: 5, Layout.BINARY: 8}[self]

    @property
    def bits_per_weight(self) -> float:
        return 8 / self.values_per_byte


# Export format versions (`format_version` of an export's quantization_config) that changed the
# packing. Format 1 padded every row, and format 2 writes `ternary-compact` codes as one stream.
ROW_PADDED_FORMAT_VERSION = 1
STREAM_FORMAT_VERSION = 2


def is_stream(layout: Layout, format_version: int = STREAM_FORMAT_VERSION) -> bool:
    """Return whether `layout` packs the whole matrix as one stream in export format `format_version`."""
    return Layout(layout) == Layout.TERNARY_COMPACT and format_version >= STREAM_FORMAT_VERSION


def packed_columns(in_features: int, layout: Layout) -> int:
    """Return the number of bytes that one row-padded row of `in_features` codes takes."""
    return math.ceil(in_features / Layout(layout).values_per_byte)


def packed_shape(out_features: int, in_features: int, layout: Layout, format_version: int = STREAM_FORMAT_VERSION) -> tuple[int, ...]:
    """Return the shape of the packed uint8 tensor of a `[out_features, in_features]` code matrix.

    Example: a `[3, 576]` ternary-compact matrix packs to `(346,)` in format 2 (1728 codes, 5 per
    byte, the last byte holding 3 codes and 2 padding codes) and to `(3, 116)` in format 1.
    """
    layout = Layout(layout)
    if is_stream(layout, format_version):
        return (math.ceil(out_features * in_features / layout.values_per_byte),)
    return (out_features, packed_columns(in_features, layout))


def packed_bytes(out_features: int, in_features: int, layout: Layout, format_version: int = STREAM_FORMAT_VERSION) -> int:
    """Return the number of bytes that the codes of a `[out_features, in_features]` matrix take."""
    return math.prod(packed_shape(out_features, in_features, layout, format_version))


def _pad_columns(codes: torch.Tensor, multiple: int, fill: int) -> torch.Tensor:
    remainder = codes.shape[1] % multiple
    if remainder == 0:
        return codes
    padding = codes.new_full((codes.shape[0], multiple - remainder), fill)
    return torch.cat([codes, padding], dim=1)


def pack_ternary_dense(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes 4 per byte, the first code in the lowest two bits.

    Example: the row [-1, 0, 1, 1] becomes unsigned codes [0, 1, 2, 2] and the byte
    0 | 1 << 2 | 2 << 4 | 2 << 6 = 0b10_10_01_00 = 164.
    """
    unsigned = _pad_columns(codes.to(torch.int16) + 1, 4, fill=1)
    groups = unsigned.view(codes.shape[0], -1, 4)
    packed = groups[..., 0] | (groups[..., 1] << 2) | (groups[..., 2] << 4) | (groups[..., 3] << 6)
    return packed.to(torch.uint8)


def unpack_ternary_dense(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_ternary_dense`: return int8 codes in {-1, 0, 1} of shape `[out, in_features]`."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.int16, device=packed.device)
    unsigned = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & 0b11
    return (unsigned.view(packed.shape[0], -1)[:, :in_features] - 1).to(torch.int8)


_POWERS_OF_THREE = (1, 3, 9, 27, 81)


def pack_ternary_compact(codes: torch.Tensor) -> torch.Tensor:
    """Pack ternary codes 5 per byte as a base-3 number, the first code the least significant digit.

    Example: the row [-1, 0, 1, 1, 0] becomes unsigned codes [0, 1, 2, 2, 1] and the byte
    0 + 1 * 3 + 2 * 9 + 2 * 27 + 1 * 81 = 156.
    """
    unsigned = _pad_columns(codes.to(torch.int16) + 1, 5, fill=1)
    groups = unsigned.view(codes.shape[0], -1, 5)
    weights = torch.tensor(_POWERS_OF_THREE, dtype=torch.int16, device=codes.device)
    return (groups * weights).sum(dim=-1).to(torch.uint8)


def _base3_table(device: torch.device) -> torch.Tensor:
    """Return the `[243, 5]` table of the five ternary values that each byte value encodes."""
    values = torch.arange(243, dtype=torch.int16, device=device).unsqueeze(1)
    weights = torch.tensor(_POWERS_OF_THREE, dtype=torch.int16, device=device)
    return ((values // weights) % 3 - 1).to(torch.int8)


def unpack_ternary_compact(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_ternary_compact`: return int8 codes in {-1, 0, 1} of shape `[out, in_features]`.

    Raises:
        ValueError: if a byte is above 242, which no ternary row packs to.
    """
    if packed.numel() and int(packed.max()) > 242:
        raise ValueError(f"invalid ternary-compact byte {int(packed.max())}: values must be at most 242")
    table = _base3_table(packed.device)
    return table[packed.long()].view(packed.shape[0], -1)[:, :in_features]


def pack_binary(codes: torch.Tensor) -> torch.Tensor:
    """Pack binary codes 8 per byte, the first code in the lowest bit (+1 is bit 1, -1 is bit 0).

    Example: the row [1, -1, -1, 1, 1, 1, -1, -1] becomes the bits 1,0,0,1,1,1,0,0 from the
    lowest bit up, the byte 0b00111001 = 57.
    """
    bits = _pad_columns((codes > 0).to(torch.int16), 8, fill=0)
    groups = bits.view(codes.shape[0], -1, 8)
    shifts = torch.arange(8, dtype=torch.int16, device=codes.device)
    return (groups << shifts).sum(dim=-1).to(torch.uint8)


def unpack_binary(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Inverse of `pack_binary`: return int8 codes in {-1, 1} of shape `[out, in_features]`."""
    shifts = torch.arange(8, dtype=torch.int16, device=packed.device)
    bits = (packed.to(torch.int16).unsqueeze(-1) >> shifts) & 1
    return (bits.view(packed.shape[0], -1)[:, :in_features] * 2 - 1).to(torch.int8)


_PACKERS = {
    Layout.TERNARY_DENSE: (pack_ternary_dense, unpack_ternary_dense),
    Layout.TERNARY_COMPACT: (pack_ternary_compact, unpack_ternary_compact),
    Layout.BINARY: (pack_binary, unpack_binary),
}


def pack(codes: torch.Tensor, layout: Layout, format_version: int = STREAM_FORMAT_VERSION) -> torch.Tensor:
    """Pack a `[out, in]` int8 code matrix with `layout` as export format `format_version` stores it.

    Returns a tensor of shape `packed_shape(out, in, layout, format_version)`. A stream is the
    packing of the flattened matrix as a single row.
    """
    if codes.dim() != 2:
        raise ValueError(f"invalid code tensor of shape {tuple(codes.shape)}: expected [out, in]")
    layout = Layout(layout)
    if is_stream(layout, format_version):
        return _PACKERS[layout][0](codes.reshape(1, -1)).view(-1)
    return _PACKERS[layout][0](codes)


def _check_packed(packed: torch.Tensor, layout: Layout, out_features: int, in_features: int, format_version: int) -> None:
    expected = packed_shape(out_features, in_features, layout, format_version)
    if tuple(packed.shape) != expected or packed.dtype != torch.uint8:
        raise ValueError(
            f"invalid packed tensor of shape {tuple(packed.shape)} and dtype {packed.dtype}: {layout.value} "
            f"codes of a [{out_features}, {in_features}] matrix in format {format_version} need uint8 {list(expected)}"
        )


def unpack(packed: torch.Tensor, layout: Layout, out_features: int, in_features: int, format_version: int = STREAM_FORMAT_VERSION) -> torch.Tensor:
    """Inverse of `pack`: return the `[out_features, in_features]` int8 codes.

    Raises:
        ValueError: if `packed` does not have the shape and dtype of such a matrix in `layout`
            and `format_version`, or contains a ternary-compact byte above 242.
    """
    layout = Layout(layout)
    _check_packed(packed, layout, out_features, in_features, format_version)
    if is_stream(layout, format_version):
        return _PACKERS[layout][1](packed.reshape(1, -1), out_features * in_features).view(out_features, in_features)
    return _PACKERS[layout][1](packed, in_features)


def unpack_rows(
    packed: torch.Tensor, layout: Layout, out_features: int, in_features: int, rows: torch.Tensor, format_version: int = STREAM_FORMAT_VERSION
) -> torch.Tensor:
    """Return the int8 codes of the rows `rows` (a 1-D index tensor) only, as `[len(rows), in_features]`.

    A row-padded matrix is indexed by row. In a stream, row `r` covers the bytes from
    `(r * in) // 5` on, starting at digit `(r * in) % 5`: the bytes that cover every requested row
    are gathered into one `[len(rows), span]` block, unpacked, and each row's codes taken from
    its starting digit.

    Raises:
        IndexError: if a row is outside `[0, out_features)`.
        ValueError: as `unpack`.
    """
    layout = Layout(layout)
    _check_packed(packed, layout, out_features, in_features, format_version)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= out_features):
        raise IndexError(f"row index out of range: the matrix has {out_features} rows")
    if not is_stream(layout, format_version):
        return _PACKERS[layout][1](packed[rows], in_features)

    per_byte = layout.values_per_byte
    start = rows.long() * in_features
    first_byte, first_digit = start // per_byte, start % per_byte
    # A row that starts at the last digit of a byte needs the most bytes.
    span = math.ceil((per_byte - 1 + in_features) / per_byte)
    offsets = torch.arange(span, device=packed.device)
    byte_index = (first_byte.unsqueeze(1) + offsets).clamp_(max=packed.numel() - 1)
    digits = unpack_ternary_compact(packed[byte_index], span * per_byte)
    columns = first_digit.unsqueeze(1) + torch.arange(in_features, device=packed.device)
    return digits.gather(1, columns)
