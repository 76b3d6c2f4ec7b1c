"""Weight quantization: statistics-based ternary and binary weights with one scale per row.

Source: Liu et al., "Binary and Ternary Natural Language Generation", ACL 2023
(arXiv 2306.01841), section 3.1, and the baselines of its tables:

- ternary (the paper's method), with mu the row mean or 0:
      a = 4/3 * mean(|W - mu|),   codes = round(clamp((W - mu) / a, -1, 1))
  so a weight becomes 0 when |W - mu| < a / 2, which keeps the three levels roughly
  equally used while `a` matches the average magnitude;
- binary (the paper's method):  a = mean(|W - mu|),   codes = sign(W - mu)
- TWN (Li et al., 2016):  delta = 0.7 * mean|W|,  codes = sign(W) * [|W| > delta],
      a = mean of |W| over the kept weights;
- BWN (Rastegari et al., 2016):  a = mean|W|,  codes = sign(W);
- BitNet b1.58 absmean (Ma et al., 2024):  one a = mean|W| per tensor,
      codes = round(clamp(W / a, -1, 1)).

All statistics are per output row (dim=1) of a `[out, in]` weight except absmean, and the
scale is excluded from the gradient. The dequantized weight is `a * codes + mu`. The
gradient reaches the latent weight through the straight-through estimator, optionally
clipped to |(W - mu) / a| < 1.
"""

from __future__ import annotations

import torch

from tbquant.config import WeightQuantConfig, WeightScheme

# Smallest scale used as a divisor: an all-zero row gets codes 0 (ternary) or +1 with a
# zero scale (binary), and dequantizes to zeros either way.
_MIN_SCALE = 1e-12

_STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(name: str) -> torch.dtype:
    return _STORAGE_DTYPES[name]


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, config: WeightQuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize a `[out, in]` weight to integer codes, per-row scales and optional offsets.

    Returns:
        codes: int8 tensor of the weight's shape with values in {-1, 0, 1} (ternary) or
            {-1, 1} (binary).
        scale: `[out]` tensor, already rounded to `config.scale_dtype` but kept in the
            weight's dtype.
        offset: `[out]` row means `mu` (rounded the same way) when `config.center`, else None.
    """
    weight = weight.detach()
    scheme = config.scheme
    rounding = storage_dtype(config.scale_dtype)

    offset = None
    centered = weight
    if config.center:
        offset = weight.mean(dim=1, keepdim=True).to(rounding).to(weight.dtype)
        centered = weight - offset

    magnitude = centered.abs()
    if scheme == WeightScheme.TERNARY:
        scale = 4.0 / 3.0 * magnitude.mean(dim=1, keepdim=True)
    elif scheme in (WeightScheme.BINARY, WeightScheme.BWN):
        scale = magnitude.mean(dim=1, keepdim=True)
    elif scheme == WeightScheme.TWN:
        threshold = 0.7 * magnitude.mean(dim=1, keepdim=True)
        kept = magnitude > threshold
        scale = (magnitude * kept).sum(dim=1, keepdim=True) / kept.sum(dim=1, keepdim=True).clamp_min(1)
    else:  # ABSMEAN: one scale for the whole tensor, stored once per row for a uniform format.
        scale = magnitude.mean().expand(weight.shape[0], 1)
    scale = scale.to(rounding).to(weight.dtype)

    if scheme.is_binary:
        codes = torch.where(centered >= 0, 1, -1)
    elif scheme == WeightScheme.TWN:
        codes = torch.sign(centered) * (magnitude > threshold)
    else:
        codes = torch.round(torch.clamp(centered / scale.clamp_min(_MIN_SCALE), -1, 1))

    return codes.to(torch.int8), scale.squeeze(1), None if offset is None else offset.squeeze(1)


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Compute `a * codes + mu` row by row, in `dtype`.

    The student and the exported model both go through this function, so the weights they
    compute with are bit-identical.
    """
    weight = codes.to(dtype) * scale.to(dtype).unsqueeze(1)
    if offset is not None:
        weight = weight + offset.to(dtype).unsqueeze(1)
    return weight


class _StraightThrough(torch.autograd.Function):
    """Return the quantized weight in the forward pass and pass the gradient to the latent
    weight unchanged (or masked) in the backward pass."""

    @staticmethod
    def forward(ctx, latent: torch.Tensor, quantized: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(mask)
        return quantized

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (mask,) = ctx.saved_tensors
        grad = grad_output if mask is None else grad_output * mask
        return grad, None, None


def fake_quantize_weight(weight: torch.Tensor, config: WeightQuantConfig) -> torch.Tensor:
    """Quantize and dequantize `weight`, with a straight-through gradient to the latent weight."""
    codes, scale, offset = quantize_weight(weight, config)
    quantized = dequantize_weight(codes, scale, offset, weight.dtype)
    if not (torch.is_grad_enabled() and weight.requires_grad):
        return quantized

    mask = None
    if config.clip_gradient:
        centered = weight.detach() if offset is None else weight.detach() - offset.unsqueeze(1)
        mask = (centered.abs() < scale.unsqueeze(1)).to(weight.dtype)
    return _StraightThrough.apply(weight, quantized, mask)
