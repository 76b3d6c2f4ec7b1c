"""Full-precision layers that keep their 16-bit stored weights and compute in float32.

An export stores the tensors that stay full precision (token embeddings, the output head) in
`fp_dtype`, float16 by default. Loading the model in float32 would upcast them, which doubles
their memory: on SmolLM2-135M the tied embedding alone grows from 57 MB to 113 MB, more than all
the packed layers together. The student computed with exactly these rounded values in float32, so
keeping the 16-bit tensor and converting on use gives the same outputs.

`keep_stored_dtype` turns plain `nn.Embedding` and `nn.Linear` modules whose weight is 16-bit into
`HalfStorageEmbedding` and `HalfStorageLinear`, in place (shared weights stay shared). The weight
becomes a buffer, so that `model.parameters()`, and with it transformers' `model.dtype`, reports
the compute dtype. Lookups convert only the looked-up rows. The head converts its weight in row
chunks (`CHUNK_ROWS`), or, for a few tokens on CPU, reads the 16-bit weight directly in the fused
kernel of `tbquant.nn.native`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbquant.nn import native

HALF_DTYPES = (torch.float16, torch.bfloat16)

# Rows of a 16-bit head weight converted to the compute dtype at a time (about 9 MB in float32 for
# 576 input features).
CHUNK_ROWS = 4096

# Smaller weights are upcast as usual: keeping them 16-bit would save little.
MIN_ELEMENTS = 1 << 20


def _result_dtype(fn, dtype: torch.dtype) -> torch.dtype:
    """Return the dtype that `Module._apply(fn)` turns a floating tensor of `dtype` into."""
    probe = fn(torch.empty((), dtype=dtype))
    return probe.dtype


class _HalfStorage:
    """Shared behaviour: the 16-bit weight is a buffer, `compute_dtype` follows `.to()` and `.float()`."""

    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):
        self.compute_dtype = _result_dtype(fn, self.compute_dtype)
        return super()._apply(fn, recurse)


class HalfStorageEmbedding(_HalfStorage, nn.Embedding):
    """`nn.Embedding` with a 16-bit table; looked-up rows are returned in `compute_dtype`."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(
            input_ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse
        )
        return rows.to(self.compute_dtype)


class HalfStorageLinear(_HalfStorage, nn.Linear):
    """`nn.Linear` with a 16-bit weight, computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        leading = x.shape[:-1]
        flat = x.reshape(-1, self.in_features)
        if x.dtype == torch.float32 and flat.shape[0] <= native.MAX_HALF_TOKENS and native.usable(x):
            output = native.half_linear(flat.contiguous(), self.weight, None if bias is None else bias.contiguous())
            return output.view(*leading, self.out_features)

        output = torch.empty(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for start in range(0, self.out_features, CHUNK_ROWS):
            stop = min(start + CHUNK_ROWS, self.out_features)
            chunk_bias = None if bias is None else bias[start:stop]
            output[:, start:stop] = F.linear(flat, self.weight[start:stop].to(x.dtype), chunk_bias)
        return output.view(*leading, self.out_features)


def eligible_weights(model: nn.Module) -> set[int]:
    """Return the ids of the weights that may stay 16-bit: large, and used only by plain
    `nn.Embedding`/`nn.Linear` modules (a weight tied to a subclass, such as Gemma's scaled
    embedding, keeps the usual upcast)."""
    owners: dict[int, list[nn.Module]] = {}
    weights: dict[int, torch.Tensor] = {}
    for module in model.modules():
        weight = module._parameters.get("weight")
        if weight is not None:
            owners.setdefault(id(weight), []).append(module)
            weights[id(weight)] = weight
    return {
        key
        for key, modules in owners.items()
        if weights[key].numel() >= MIN_ELEMENTS and all(type(module) in (nn.Embedding, nn.Linear) for module in modules)
    }


def keep_stored_dtype(model: nn.Module, compute_dtype: torch.dtype) -> list[str]:
    """Turn large 16-bit `nn.Embedding`/`nn.Linear` weights into 16-bit buffers computed in `compute_dtype`.

    Only modules of exactly these classes are changed (subclasses may scale or reshape their
    output in ways this module does not know). Returns the names of the changed modules.
    """
    if compute_dtype in HALF_DTYPES:
        return []
    eligible = eligible_weights(model)
    changed = []
    buffers: dict[int, torch.Tensor] = {}  # one buffer per shared weight, so a tied head stays tied
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or id(weight) not in eligible or weight.dtype not in HALF_DTYPES:
            continue
        module.__class__ = HalfStorageEmbedding if isinstance(module, nn.Embedding) else HalfStorageLinear
        module.compute_dtype = compute_dtype
        del module._parameters["weight"]
        module.register_buffer("weight", buffers.setdefault(id(weight), weight.detach()))
        changed.append(name)
    return changed
