"""Matrix products with packed ternary and binary weights, in pure torch.

In memory, a packed layer keeps its codes in a "planar" layout that unpacks with a few word-wide
shifts and masks, instead of the disk layouts of `tbquant.packing` (whose base-3 bytes need a
table lookup per byte). Ternary values `w` in {-1, 0, 1} are stored as `u = w + 1` in 2 bits and
binary values `w` in {-1, 1} as `u = (w + 1) / 2` in 1 bit, so both take at most 2 bits per
weight in memory. With `P = 8 / bits` planes, a row of `in_features` codes is padded with zero
codes to `padded` columns (a multiple of `8 * P`, so every plane is whole 64-bit words), and
byte `j` of the row holds the codes of columns `j, j + q, ..., j + (P - 1) * q`, with
`q = padded / P`, plane `i` in bits `bits * i` to `bits * i + bits - 1`.

Example (ternary, a row of 32 codes padded to 32, q = 8): byte 0 holds the codes of columns
0, 8, 16 and 24. With the values [-1, 0, 1, 1] there, `u` is [0, 1, 2, 2] and the byte is
0 | 1 << 2 | 2 << 4 | 2 << 6 = 164.

Unpacking shifts each 64-bit word right by `bits * i` and masks the low `bits` of every byte at
once, which writes the 8 columns `8k .. 8k + 7` of plane `i`.

Integer product. For activations quantized to integer codes `c` (per-token or per-tensor scale
`s`) and weights `a * w + mu` (per-row scale `a`, optional per-row offset `mu`):

    y[m, n] = s[m] * a[n] * sum_k c[m, k] w[n, k]  +  s[m] * mu[n] * sum_k c[m, k]

The sum is computed exactly in int32 by `torch._int_mm` (int8 x int8 -> int32) on the unsigned
codes `u`, with `c' = c - z` in int8 (`z` = 128 for unsigned 8-bit activations, whose codes
reach 255, else 0):

    sum_k c w = sum_k c' u + z * U[n] - S[m]                   (ternary, w = u - 1)
    sum_k c w = 2 * (sum_k c' u + z * U[n]) - S[m]             (binary,  w = 2u - 1)

where `U[n] = sum_k u[n, k]` and `S[m] = sum_k c[m, k]`.
"""

from __future__ import annotations

import torch

_WORD_BITS = 64
_MASKS = {2: 0x0303030303030303, 1: 0x0101010101010101}

# Unsigned 8-bit activation codes reach 255; they are shifted by this amount to fit in int8.
UNSIGNED_SHIFT = 128


def padded_columns(in_features: int, bits: int) -> int:
    """Return the row length, in codes, of the planar layout (a multiple of 64 / bits * 8 / 8)."""
    multiple = _WORD_BITS // bits
    return -(-in_features // multiple) * multiple


def pack_planes(unsigned_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[out, in]` unsigned codes (each below `2 ** bits`) into the planar layout, `[out, padded * bits / 8]` uint8."""
    rows, in_features = unsigned_codes.shape
    padded = padded_columns(in_features, bits)
    codes = torch.zeros(rows, padded, dtype=torch.uint8, device=unsigned_codes.device)
    codes[:, :in_features] = unsigned_codes.to(torch.uint8)

    planes_per_byte = 8 // bits
    width = padded // planes_per_byte
    packed = torch.zeros(rows, width, dtype=torch.uint8, device=unsigned_codes.device)
    for plane in range(planes_per_byte):
        packed |= codes[:, plane * width : (plane + 1) * width] << (bits * plane)
    return packed


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack the planar layout to `[out, padded]` uint8 unsigned codes, padding included."""
    rows, width = packed.shape
    planes_per_byte = 8 // bits
    words = packed.view(torch.int64)
    codes = torch.empty(rows, width * planes_per_byte, dtype=torch.uint8, device=packed.device)
    code_words = codes.view(torch.int64).view(rows, planes_per_byte, -1)
    mask = torch.tensor(_MASKS[bits], dtype=torch.int64, device=packed.device)
    for plane in range(planes_per_byte):
        torch.bitwise_and(torch.bitwise_right_shift(words, bits * plane), mask, out=code_words[:, plane])
    return codes


def int_mm_available(device: torch.device) -> bool:
    """Return whether the integer path runs on `device`: `torch._int_mm` on CPU.

    NOTE: CUDA's `torch._int_mm` needs more than 16 rows and multiples of 8, which decoding at
    batch 1 does not meet, so other devices use the float path of the same formula.
    """
    return device.type == "cpu" and hasattr(torch, "_int_mm")


def integer_product(shifted_codes: torch.Tensor, unsigned_weights: torch.Tensor) -> torch.Tensor:
    """Return `shifted_codes @ unsigned_weights.T`, `[M, N]`, exactly.

    `shifted_codes` is `[M, padded]` int8 and `unsigned_weights` `[N, padded]` uint8 with values of
    at most 2. On CPU this is `torch._int_mm` with int32 accumulation. Elsewhere it is a float32
    product, exact while `padded * 256 < 2 ** 24`, that is, below 65536 input features.
    """
    if int_mm_available(shifted_codes.device):
        return torch._int_mm(shifted_codes, unsigned_weights.view(torch.int8).t())
    return (shifted_codes.float() @ unsigned_weights.float().t()).round().to(torch.int32)


def code_dot_products(
    codes: torch.Tensor,
    unsigned_weights: torch.Tensor,
    weight_sums: torch.Tensor,
    binary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `sum_k c[m, k] w[n, k]` (`[M, N]`, int32) and `S[m] = sum_k c[m, k]` (`[M, 1]`, int32).

    Args:
        codes: `[M, in]` integer-valued activation codes (float), from -128 to 255.
        unsigned_weights: `[N, padded]` unpacked planar codes `u`.
        weight_sums: `[N]` int32 `U[n]`, the sum of each row of `u` over the real columns.
        binary: whether `w = 2u - 1` (binary) rather than `w = u - 1` (ternary).
    """
    shift = UNSIGNED_SHIFT if bool(codes.max() > 127) else 0
    shifted = (codes - shift).to(torch.int8)
    code_sums = shifted.sum(dim=1, keepdim=True, dtype=torch.int32) + shift * codes.shape[1]

    padding = unsigned_weights.shape[1] - shifted.shape[1]
    if padding:
        shifted = torch.nn.functional.pad(shifted, (0, padding))
    products = integer_product(shifted, unsigned_weights)

    if shift:
        products = products + shift * weight_sums
    if binary:
        products = 2 * products
    return products - code_sums, code_sums
