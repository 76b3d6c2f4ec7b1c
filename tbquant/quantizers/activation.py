"""Activation quantization at 8, 4, 2 and 1 bits.

Two regimes, as in Liu et al., "Binary and Ternary Natural Language Generation"
(ACL 2023, arXiv 2306.01841), section 3.2:

- 1 and 2 bits ("elastic" quantization): one learned scale `alpha` per quantization point.
  Signed inputs: 2-bit `alpha * round(clamp(x / alpha, -1, 1))`, 1-bit `alpha * sign(x)`.
  Non-negative inputs: 2-bit levels {0, alpha, 2 alpha}, 1-bit {0, alpha}. The gradient of
  `alpha` is the LSQ one (Esser et al., 2020): `round(x / alpha) - x / alpha` inside the
  clip range and the clip level outside it, scaled by `1 / sqrt(numel * Qp)`. The input gets
  the straight-through gradient inside the clip range and 0 outside. `alpha` starts at
  `2 * mean|x| / sqrt(Qp)` (signed) or `4 * mean|x| / sqrt(Qp)` (non-negative), computed by
  the calibrate stage.
- 4 and 8 bits: dynamic absmax per token (over the last dimension), symmetric for signed
  inputs and `[0, max]` for non-negative ones, with a straight-through gradient. The paper's
  reference code uses one min-max range per tensor after clipping to +/-2.5, which makes a
  token's result depend on the rest of its batch and clips the large outlier features of
  Llama-style models. Per-token absmax (as in BitNet b1.58) is independent of batch
  composition, needs no clipping constant, and works for BART-style and Llama-style models,
  which is why it is the default here.
"""

from __future__ import annotations

import enum
import math

import torch
from torch import nn

# Lower bound of a dynamic per-token scale, so that all-zero tokens (padding) quantize to 0.
_MIN_DYNAMIC_SCALE = 1e-8

# Calibration marks a quantization point as non-negative when no observed value lies below
# this bound. It admits GELU (minimum about -0.17) and ReLU outputs and rejects normalised
# hidden states, whose minimum is a few units below zero.
NON_NEGATIVE_MIN = -0.2


def _native():
    """Return `tbquant.nn.native`, imported on first use (`tbquant.nn` imports this module)."""
    from tbquant.nn import native

    return native


class QuantPoint(str, enum.Enum):
    """Position of an activation quantizer in the network."""

    INPUT = "input"  # input of a quantized linear layer
    QUERY = "query"
    KEY = "key"
    VALUE = "value"
    PROBS = "probs"  # attention probabilities after softmax, always non-negative


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.round(x) - x).detach() + x


def _sign_ste(x: torch.Tensor) -> torch.Tensor:
    return (torch.where(x >= 0, 1.0, -1.0).to(x.dtype) - x).detach() + x


def _scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Return `x` unchanged, with its gradient multiplied by `factor`."""
    scaled = x * factor
    return (x - scaled).detach() + scaled


class ActivationQuantizer(nn.Module):
    """Fake quantizer for one quantization point.

    Args:
        bits: 8, 4, 2 or 1.
        point: where the quantizer sits; attention probabilities are always non-negative.

    Learned scales (1 and 2 bits) must be initialised with `initialize_from` before training;
    the forward pass raises an error naming the missing calibrate step otherwise.
    """

    def __init__(self, bits: int, point: QuantPoint) -> None:
        super().__init__()
        self.bits = bits
        self.point = QuantPoint(point)
        self.learned = bits <= 2
        self.name = ""  # qualified name, set by the converter for messages and reports
        self.observer = None  # during calibration: a callable that records inputs, which pass through unchanged
        self.register_buffer("signed", torch.tensor(self.point != QuantPoint.PROBS))
        if self.learned:
            self.alpha = nn.Parameter(torch.ones(()))
            self.register_buffer("initialized", torch.tensor(False))

    @property
    def levels_above_zero(self) -> int:
        """Qp: the number of positive levels, in units of the scale."""
        if self.learned:
            return 1 if (self.bits == 1 or bool(self.signed)) else 2
        return 2 ** (self.bits - 1) - 1 if bool(self.signed) else 2**self.bits - 1

    @torch.no_grad()
    def initialize_from(self, samples: torch.Tensor) -> None:
        """Set signedness and, for learned scales, the initial `alpha` from real activations."""
        samples = samples.detach().float()
        if self.point != QuantPoint.PROBS:
            self.signed.fill_(bool(samples.min() < NON_NEGATIVE_MIN))
        if self.learned:
            mean_magnitude = samples.abs().mean().clamp_min(_MIN_DYNAMIC_SCALE)
            factor = 2.0 if bool(self.signed) else 4.0
            self.alpha.fill_(factor * mean_magnitude / math.sqrt(self.levels_above_zero))
            self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self, x)
            return x
        if self.learned:
            return self._learned(x)
        return self._dynamic(x)

    @torch.no_grad()
    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the integer codes (as floats) and the scale of `x`, with `forward(x) == codes * scale`.

        The scale is `[..., 1]` (one per token) for dynamic quantizers and a scalar for learned
        ones. Packed layers compute with the codes directly.
        """
        if self.learned:
            self._check_initialized()
            return self._learned_codes(x / self.alpha), self.alpha.detach()
        # The same operations as `_dynamic_codes`, in place where the result is a new tensor.
        levels = self.levels_above_zero
        signed = bool(self.signed)
        scale = (x.abs() if signed else x).amax(dim=-1, keepdim=True).clamp_min_(_MIN_DYNAMIC_SCALE).div_(levels)
        codes = torch.div(x, scale).round_().clamp_(-levels if signed else 0, levels)
        return codes, scale

    def _dynamic_codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        levels = self.levels_above_zero
        if bool(self.signed):
            scale = x.detach().abs().amax(dim=-1, keepdim=True).clamp_min(_MIN_DYNAMIC_SCALE) / levels
            return torch.clamp(torch.round(x / scale), -levels, levels), scale
        scale = x.detach().amax(dim=-1, keepdim=True).clamp_min(_MIN_DYNAMIC_SCALE) / levels
        return torch.clamp(torch.round(x / scale), 0, levels), scale

    def _learned_codes(self, scaled: torch.Tensor) -> torch.Tensor:
        """Return the codes of `x / alpha`, with straight-through gradients."""
        if bool(self.signed):
            scaled = torch.clamp(scaled, -1, 1)
            return _sign_ste(scaled) if self.bits == 1 else _round_ste(scaled)
        return _round_ste(torch.clamp(scaled, 0, self.levels_above_zero))

    def _check_initialized(self) -> None:
        if not bool(self.initialized):
            raise RuntimeError(
                f"activation scale of {self.name or 'a quantizer'} is not initialised: run the calibrate "
                "stage (tbquant.stages.calibrate) before training or inference"
            )

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        native = _native()
        # The kernel does the same float operations in one call. On SmolLM2's 8 x 9 x 256 x 256
        # attention probabilities it took 2.3 ms against 41 ms for torch's eight operations.
        if not torch.is_grad_enabled() and x.dtype == torch.float32 and x.numel() > 0 and native.usable(x):
            return native.fake_quantize(x, self.levels_above_zero, bool(self.signed))
        codes, scale = self._dynamic_codes(x)
        quantized = codes * scale
        if not torch.is_grad_enabled():
            return quantized
        return (quantized - x).detach() + x

    def _learned(self, x: torch.Tensor) -> torch.Tensor:
        self._check_initialized()
        alpha = self.alpha
        if torch.is_grad_enabled() and alpha.requires_grad:
            alpha = _scale_gradient(alpha, 1.0 / math.sqrt(x.numel() * self.levels_above_zero))
        return self._learned_codes(x / alpha) * alpha

    def extra_repr(self) -> str:
        kind = "learned" if self.learned else "dynamic per-token"
        return f"bits={self.bits}, point={self.point.value}, {kind}"
