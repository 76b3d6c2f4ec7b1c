"""Attention with quantized query, key, value states and attention probabilities.

transformers (5.x) routes the attention of every architecture tbquant supports through
`AttentionInterface`, keyed by `config._attn_implementation`. Registering one function under
the name "tbquant" quantizes all of them without forking any modeling file. The function
reads the quantizers from the attention module that calls it (`module.attention_quantizer`),
so the teacher, which has none, runs the same full-precision computation through it.

The quantization points follow Liu et al. (ACL 2023): query, key and value states before the
matmuls and the probabilities after softmax; the scores before softmax stay full precision.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from tbquant.quantizers.activation import ActivationQuantizer, QuantPoint

ATTENTION_IMPLEMENTATION = "tbquant"


class AttentionQuantizers(nn.Module):
    """The four activation quantizers of one attention module."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.query = ActivationQuantizer(bits, QuantPoint.QUERY)
        self.key = ActivationQuantizer(bits, QuantPoint.KEY)
        self.value = ActivationQuantizer(bits, QuantPoint.VALUE)
        self.probs = ActivationQuantizer(bits, QuantPoint.PROBS)


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """Expand `[batch, kv_heads, length, dim]` to `[batch, kv_heads * groups, length, dim]` (grouped-query attention)."""
    if groups == 1:
        return states
    batch, heads, length, dim = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)


def tbquant_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compute eager attention with optional quantization of q, k, v and the probabilities.

    Inputs are `[batch, heads, length, head_dim]` as transformers passes them; returns the
    output as `[batch, length, heads, head_dim]` and the full-precision probabilities, which
    distillation compares with the teacher's.
    """
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attention sinks (s_aux) are not supported by tbquant attention")
    quantizers: AttentionQuantizers | None = getattr(module, "attention_quantizer", None)

    if quantizers is not None:
        query = quantizers.query(query)
        key = quantizers.key(key)
        value = quantizers.value(value)

    groups = getattr(module, "num_key_value_groups", 1)
    key = _repeat_kv(key, groups)
    value = _repeat_kv(value, groups)

    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if position_bias is not None:
        scores = scores + position_bias  # T5's relative position bias
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]

    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    used_probs = quantizers.probs(probs) if quantizers is not None else probs

    output = torch.matmul(used_probs, value).transpose(1, 2).contiguous()
    return output, probs


def _register() -> None:
    # The eager mask is additive (0 or the dtype's minimum), which is what the function adds.
    AttentionInterface.register(ATTENTION_IMPLEMENTATION, tbquant_attention_forward)
    AttentionMaskInterface.register(ATTENTION_IMPLEMENTATION, eager_mask)


_register()


def is_attention_module(module: nn.Module) -> bool:
    """Return whether `module` is the module that calls the attention function.

    In transformers' modeling files that is the innermost module whose class name contains
    "Attention" and that owns the projections directly (LlamaAttention, BartAttention,
    T5Attention, GPT2Attention, BertSelfAttention); wrappers such as BertAttention or
    T5LayerSelfAttention own no projection themselves.
    """
    if "Attention" not in type(module).__name__:
        return False
    from tbquant.nn.linear import is_linear

    return any(is_linear(child) for child in module.children())


def set_attention_implementation(model: nn.Module) -> None:
    """Route every attention module of `model` (and its sub-configs) through tbquant attention."""
    for submodule in model.modules():
        config = getattr(submodule, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = ATTENTION_IMPLEMENTATION
