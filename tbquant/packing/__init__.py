"""Bit packing of ternary and binary weight codes.

Three layouts, each packing one row of a `[out, in]` code matrix into whole bytes (rows are
padded independently, so row `r` of the packed matrix depends on row `r` of the codes only):

- `ternary-dense`: 4 codes per byte, 2 bits each, 2 bits per weight.
- `ternary-compact`: 5 codes per byte in base 3 (3^5 = 243 <= 256), 1.6 bits per weight.
- `binary`: 8 signs per byte, 1 bit per weight.

Ternary values {-1, 0, +1} are stored as the unsigned codes {0, 1, 2} (value + 1); padding
uses code 1 (value 0). Binary values {-1, +1} are stored as bits {0, 1}.
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


def packed_columns(in_features: int, layout: Layout) -> int:
    """Return the number of bytes that one packed row of `in_features` codes takes."""
    return math.ceil(in_features / layout.values_per_byte)


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


def pack(codes: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Pack a `[out, in]` int8 code matrix with `layout`."""
    if codes.dim() != 2:
        raise ValueError(f"invalid code tensor of shape {tuple(codes.shape)}: expected [out, in]")
    return _PACKERS[Layout(layout)][0](codes)


def unpack(packed: torch.Tensor, layout: Layout, in_features: int) -> torch.Tensor:
    """Unpack a `[out, bytes]` uint8 matrix to `[out, in_features]` int8 codes."""
    layout = Layout(layout)
    expected = packed_columns(in_features, layout)
    if packed.dim() != 2 or packed.shape[1] != expected or packed.dtype != torch.uint8:
        raise ValueError(
            f"invalid packed tensor of shape {tuple(packed.shape)} and dtype {packed.dtype}: "
            f"{layout.value} with {in_features} inputs needs uint8 [out, {expected}]"
        )
    return _PACKERS[layout][1](packed, in_features)
