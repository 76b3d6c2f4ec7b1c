"""Matrix products with packed ternary and binary weights, in pure torch.

In memory, a packed layer keeps its codes in a "planar" layout that unpacks with a few word-wide
shifts and masks, instead of the disk layouts of `tbquant.packing` (whose base-3 bytes need a
table lookup per byte). Ternary values `w` in {-1, 0, 1} are stored as `u = w + 1` in 2 bits and
binary values `w` in {-1, 1} as `u = (w + 1) / 2` in 1 bit, so both take at most 2 bits per
weight in memory. With `P = 8 / bits` planes, an `[out, in]` code matrix is padded with zero
codes to `rows` (a multiple of `P`) by `columns` (a multiple of 8, so that rows are whole 64-bit
words). Byte `(r, j)` contains the codes of rows `r, r + h, ..., r + (P - 1) * h` in column `j`,
with `h = rows / P`; plane `i` sits in bits `bits * i` to `bits * i + bits - 1`.

Example (ternary, 8 rows, h = 2): byte (0, 0) contains column 0 of rows 0, 2, 4 and 6. With the
values [-1, 0, 1, 1] there, `u` is [0, 1, 2, 2] and the byte is 0 | 1 << 2 | 2 << 4 | 2 << 6 = 164.

Unpacking shifts each 64-bit word right by `bits * i` and masks the low `bits` of every byte at
once, which writes rows `i * h` to `(i + 1) * h - 1` of the unpacked matrix as one contiguous
block.

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

_MASKS = {2: 0x0303030303030303, 1: 0x0101010101010101}

# Unsigned 8-bit activation codes reach 255; they are shifted by this amount to fit in int8.
UNSIGNED_SHIFT = 128


def planes_per_byte(bits: int) -> int:
    return 8 // bits


def padded_shape(out_features: int, in_features: int, bits: int) -> tuple[int, int]:
    """Return the `(rows, columns)` of the unpacked planar matrix, padding included."""
    planes = planes_per_byte(bits)
    return -(-out_features // planes) * planes, -(-in_features // 8) * 8


def pack_planes(unsigned_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack `[out, in]` unsigned codes (each below `2 ** bits`) into the planar layout, `[rows / P, columns]` uint8."""
    out_features, in_features = unsigned_codes.shape
    rows, columns = padded_shape(out_features, in_features, bits)
    codes = torch.zeros(rows, columns, dtype=torch.uint8, device=unsigned_codes.device)
    codes[:out_features, :in_features] = unsigned_codes.to(torch.uint8)

    height = rows // planes_per_byte(bits)
    packed = torch.zeros(height, columns, dtype=torch.uint8, device=unsigned_codes.device)
    for plane in range(planes_per_byte(bits)):
        packed |= codes[plane * height : (plane + 1) * height] << (bits * plane)
    return packed


def unpack_planes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack the planar layout to `[rows, columns]` uint8 unsigned codes, padding included."""
    height, columns = packed.shape
    planes = planes_per_byte(bits)
    words = packed.view(torch.int64)
    codes = torch.empty(planes, height, columns // 8, dtype=torch.int64, device=packed.device)
    for plane in range(planes):
        torch.bitwise_right_shift(words, bits * plane, out=codes[plane])
        codes[plane].bitwise_and_(_MASKS[bits])
    return codes.view(torch.uint8).view(planes * height, columns)


def int_mm_available(device: torch.device) -> bool:
    """Return whether the integer path runs on `device`: `torch._int_mm` on CPU.

    NOTE: CUDA's `torch._int_mm` needs more than 16 rows and multiples of 8, which decoding at
    batch 1 does not meet, so other devices use the float path of the same formula.
    """
    return device.type == "cpu" and hasattr(torch, "_int_mm")


def integer_product(shifted_codes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Return `shifted_codes @ weights.T`, `[M, rows]` int32, exactly.

    `shifted_codes` is `[M, columns]` int8 and `weights` `[rows, columns]` int8 with values from
    -1 to 2. On CPU this is `torch._int_mm` with int32 accumulation. Elsewhere it is a float32
    product, exact while `columns * 256 < 2 ** 24`, that is, below 65536 input features.
    """
    if int_mm_available(shifted_codes.device):
        return torch._int_mm(shifted_codes, weights.t())
    return (shifted_codes.float() @ weights.float().t()).round().to(torch.int32)


def code_dot_products(
    codes: torch.Tensor,
    shift: int,
    unsigned_weights: torch.Tensor,
    weight_sums: torch.Tensor,
    binary: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return `sum_k c[m, k] w[n, k]` (`[M, N]`, int32) and `S[m] = sum_k c[m, k]` (`[M, 1]`, float32).

    The corrections of the formula in the module docstring go to whichever tensor is smaller.
    For few tokens (decoding) that is the `[M, N]` products. For many tokens (prefill) it is the
    freshly unpacked `[rows, columns]` weights, which are changed in place to contain `w`.

    Args:
        codes: `[M, in]` integer-valued activation codes (float), from -128 to 255.
        shift: `z`, subtracted from the codes so that they fit in int8 (0 or `UNSIGNED_SHIFT`).
        unsigned_weights: `[rows, columns]` unpacked planar codes `u`; may be changed in place.
        weight_sums: `[N]` int32 `U[n]`, the sum of each row of `u` over the real columns.
        binary: whether `w = 2u - 1` (binary) rather than `w = u - 1` (ternary).
    """
    tokens, in_features = codes.shape
    shifted = (codes - shift if shift else codes).to(torch.int8)
    code_sums = shifted.sum(dim=1, keepdim=True, dtype=torch.int32).float()
    if shift:
        code_sums += shift * in_features
    padding = unsigned_weights.shape[1] - in_features
    if padding:
        shifted = torch.nn.functional.pad(shifted, (0, padding))

    out_features = weight_sums.shape[0]
    weights = unsigned_weights.view(torch.int8)
    if 4 * tokens > weights.shape[1]:
        # Correct the weights: w = u - 1 or 2u - 1. Padding columns meet zero activation codes.
        if binary:
            weights.mul_(2)
        weights.sub_(1)
        products = integer_product(shifted, weights)[:, :out_features]
        if shift:
            signed_sums = (2 * weight_sums if binary else weight_sums) - in_features
            products = products + shift * signed_sums
        return products, code_sums

    products = integer_product(shifted, weights)[:, :out_features]
    if shift:
        products = products + shift * weight_sums
    if binary:
        products = 2 * products
    return products - code_sums.to(torch.int32), code_sums
