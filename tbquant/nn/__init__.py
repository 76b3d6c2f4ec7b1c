"""Modules that replace a model's layers: fake-quantized for training, packed for export."""

from tbquant.nn.attention import ATTENTION_IMPLEMENTATION, AttentionQuantizers
from tbquant.nn.convert import ConversionReport, convert_to_packed, prepare_student
from tbquant.nn.embedding import PackedEmbedding, QuantEmbedding
from tbquant.nn.linear import PackedLinear, QuantLinear

__all__ = [
    "ATTENTION_IMPLEMENTATION",
    "AttentionQuantizers",
    "ConversionReport",
    "PackedEmbedding",
    "PackedLinear",
    "QuantEmbedding",
    "QuantLinear",
    "convert_to_packed",
    "prepare_student",
]
