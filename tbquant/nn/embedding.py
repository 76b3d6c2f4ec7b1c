"""Quantized token embeddings: per-row (per token) ternary or binary, like linear weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tbquant import packing
from tbquant.config import WeightQuantConfig
from tbquant.quantizers.weight import dequantize_weight, fake_quantize_weight, quantize_weight, storage_dtype


def _embed_scale(module: nn.Module) -> float:
    # BART and Gemma multiply the looked-up vectors by a constant (sqrt(d_model) or 1.0).
    # Gemma also keeps the constant as a float. The float is readable while transformers builds
    # the model on the meta device, but the tensor copy is not.
    scale = getattr(module, "scalar_embed_scale", None)
    if scale is None:
        scale = getattr(module, "embed_scale", None)
    if scale is None:
        return 1.0
    return float(scale)


class QuantEmbedding(nn.Module):
    """Token embedding with a fake-quantized table; statistics are taken per token row."""

    def __init__(self, weight: nn.Parameter, padding_idx: int | None, weight_config: WeightQuantConfig, embed_scale: float = 1.0) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight = weight
        self.padding_idx = padding_idx
        self.weight_config = weight_config
        self.embed_scale = embed_scale

    @classmethod
    def from_embedding(cls, module: nn.Embedding, weight_config: WeightQuantConfig) -> QuantEmbedding:
        return cls(module.weight, module.padding_idx, weight_config, _embed_scale(module))

    def quantized(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        return quantize_weight(self.weight, self.weight_config)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = fake_quantize_weight(self.weight, self.weight_config)
        embeddings = F.embedding(input_ids, weight, self.padding_idx)
        return embeddings * self.embed_scale if self.embed_scale != 1.0 else embeddings

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weights={self.weight_config.scheme.value}"


class PackedEmbedding(nn.Module):
    """Token embedding stored as packed codes and per-row scales (same buffers as `PackedLinear`).

    The codes stay in the disk layout of export format `format_version`, and a lookup unpacks
    only the rows it needs (`packing.unpack_rows`).
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None,
        layout: packing.Layout,
        scale_dtype: str,
        centered: bool,
        embed_scale: float = 1.0,
        format_version: int = packing.STREAM_FORMAT_VERSION,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.padding_idx = padding_idx
        self.layout = packing.Layout(layout)
        self.format_version = format_version
        self.embed_scale = embed_scale
        dtype = storage_dtype(scale_dtype)
        shape = packing.packed_shape(num_embeddings, embedding_dim, self.layout, format_version)
        self.register_buffer("weight_packed", torch.zeros(shape, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, dtype=dtype))
        self.register_buffer("weight_offset", torch.zeros(num_embeddings, dtype=dtype) if centered else None)

    @classmethod
    def from_quant_embedding(cls, module: QuantEmbedding, layout: packing.Layout) -> PackedEmbedding:
        config = module.weight_config
        packed = cls(
            module.num_embeddings,
            module.embedding_dim,
            module.padding_idx,
            layout,
            config.scale_dtype,
            config.center,
            module.embed_scale,
        )
        codes, scale, offset = module.quantized()
        dtype = storage_dtype(config.scale_dtype)
        packed.weight_packed = packing.pack(codes, layout)
        packed.weight_scale = scale.to(dtype)
        if offset is not None:
            packed.weight_offset = offset.to(dtype)
        return packed

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized float32 table, for code that reads `module.weight`; lookups unpack only
        the rows they need."""
        codes = packing.unpack(self.weight_packed, self.layout, self.num_embeddings, self.embedding_dim, self.format_version)
        return dequantize_weight(codes, self.weight_scale, self.weight_offset, torch.float32)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Only the looked-up rows are unpacked, so the table stays packed in memory.
        flat = input_ids.reshape(-1)
        codes = packing.unpack_rows(self.weight_packed, self.layout, self.num_embeddings, self.embedding_dim, flat, self.format_version)
        offset = None if self.weight_offset is None else self.weight_offset[flat]
        rows = dequantize_weight(codes, self.weight_scale[flat], offset, torch.float32)
        embeddings = rows.view(*input_ids.shape, self.embedding_dim)
        return embeddings * self.embed_scale if self.embed_scale != 1.0 else embeddings

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, layout={self.layout.value}, format_version={self.format_version}"
