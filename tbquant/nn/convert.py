"""Module replacement: full-precision model -> fake-quantized student -> packed model.

Which modules are quantized (one rule for every architecture):

- every linear layer (`nn.Linear`, or GPT-2's `Conv1D`) inside the model's repeated blocks,
  that is, whose qualified name passes through an `nn.ModuleList` (`model.layers.3.mlp.up_proj`,
  `encoder.block.0.layer.0.SelfAttention.q`, `transformer.h.0.attn.c_attn`). Poolers,
  classification heads and projections outside the blocks stay full precision;
- the token embedding (every `nn.Embedding` that shares the input embedding's weight) when the
  embedding policy is `quantize`; positional and token-type embeddings stay full precision;
- the output head when the head policy is `quantize`;
- except modules whose name matches a `keep_full_precision` pattern.

When the input embedding and the output head are tied and only one of them is quantized, they
are untied: the other keeps a full-precision copy of the shared weight, and
`config.tie_word_embeddings` becomes False.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from tbquant import packing
from tbquant.config import ModulePolicy, QuantizationConfig
from tbquant.errors import TbquantError
from tbquant.nn.attention import AttentionQuantizers, is_attention_module, set_attention_implementation
from tbquant.nn.embedding import PackedEmbedding, QuantEmbedding
from tbquant.nn.linear import PackedLinear, QuantLinear, is_linear
from tbquant.quantizers.activation import ActivationQuantizer


@dataclasses.dataclass
class ConversionReport:
    """Record of the modules that a conversion changed, by qualified name."""

    linear: list[str] = dataclasses.field(default_factory=list)
    embeddings: list[str] = dataclasses.field(default_factory=list)
    attention: list[str] = dataclasses.field(default_factory=list)
    kept: list[str] = dataclasses.field(default_factory=list)
    untied: bool = False

    @property
    def quantized(self) -> list[str]:
        return self.linear + self.embeddings


def layout_for(config: QuantizationConfig) -> packing.Layout:
    if config.weights.scheme.is_binary:
        return packing.Layout.BINARY
    if config.weights.packing.value == "dense":
        return packing.Layout.TERNARY_DENSE
    return packing.Layout.TERNARY_COMPACT


def _in_repeated_block(model: nn.Module, name: str) -> bool:
    module = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part) if not part.isdigit() else module[int(part)]
        if isinstance(module, nn.ModuleList):
            return True
    return False


def _set_module(model: nn.Module, name: str, replacement: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, replacement)


def _untie(model: nn.Module) -> None:
    head = model.get_output_embeddings()
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    for submodule in model.modules():
        config = getattr(submodule, "config", None)
        if config is not None and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


def _plan(model: nn.Module, config: QuantizationConfig) -> tuple[list[str], list[str], list[str], list[str], bool]:
    """Select the modules to replace, without changing the model."""
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = head is not None and embedding is not None and head.weight is embedding.weight

    linear, embeddings, attention, kept = [], [], [], []
    for name, module in model.named_modules():
        if not name:
            continue
        is_head = module is head
        is_token_embedding = isinstance(module, nn.Embedding) and embedding is not None and module.weight is embedding.weight
        candidate = (
            (is_head and config.head == ModulePolicy.QUANTIZE)
            or (is_token_embedding and config.embeddings == ModulePolicy.QUANTIZE)
            or (not is_head and is_linear(module) and _in_repeated_block(model, name))
        )
        if candidate and config.keeps(name):
            kept.append(name)
        elif candidate:
            (embeddings if is_token_embedding else linear).append(name)
        if is_attention_module(module) and not config.keeps(name):
            attention.append(name)

    head_quantized = head is not None and any(model.get_submodule(name) is head for name in linear)
    embedding_quantized = bool(embeddings)
    untie = tied and head_quantized != embedding_quantized
    return linear, embeddings, attention, kept, untie


def _replace(model: nn.Module, config: QuantizationConfig, packed: bool, format_version: int = packing.STREAM_FORMAT_VERSION) -> ConversionReport:
    linear, embeddings, attention, kept, untie = _plan(model, config)
    if untie:
        _untie(model)
    bits = config.activations.bits
    layout = layout_for(config)

    # Modules of one kind that share one weight (tied embeddings) share one replacement module.
    # The keys hold the kind, because a tied head and embedding are quantized as two modules.
    replacements: dict[tuple[str, int], nn.Module] = {}
    for name in linear:
        module = model.get_submodule(name)
        key = ("linear", id(module.weight))
        if key not in replacements:
            if packed:
                replacements[key] = PackedLinear(
                    module.in_features if hasattr(module, "in_features") else module.weight.shape[0],
                    module.out_features if hasattr(module, "out_features") else module.nf,
                    module.bias is not None,
                    layout,
                    config.weights.scale_dtype,
                    config.weights.center,
                    bits,
                    format_version,
                )
            else:
                replacements[key] = QuantLinear.from_linear(module, config.weights, bits)
        _set_module(model, name, replacements[key])

    for name in embeddings:
        module = model.get_submodule(name)
        key = ("embedding", id(module.weight))
        if key not in replacements:
            if packed:
                replacements[key] = PackedEmbedding(
                    module.num_embeddings,
                    module.embedding_dim,
                    module.padding_idx,
                    layout,
                    config.weights.scale_dtype,
                    config.weights.center,
                    QuantEmbedding.from_embedding(module, config.weights).embed_scale,
                    format_version,
                )
            else:
                replacements[key] = QuantEmbedding.from_embedding(module, config.weights)
        _set_module(model, name, replacements[key])

    if bits is not None and config.activations.attention:
        for name in attention:
            model.get_submodule(name).attention_quantizer = AttentionQuantizers(bits)
    else:
        attention = []
    set_attention_implementation(model)
    name_quantizers(model)
    return ConversionReport(linear=linear, embeddings=embeddings, attention=attention, kept=kept, untied=untie)


def name_quantizers(model: nn.Module) -> None:
    """Give every activation quantizer its qualified name, for error messages and reports."""
    for name, module in model.named_modules():
        if isinstance(module, ActivationQuantizer):
            module.name = name


def prepare_student(model: nn.Module, config: QuantizationConfig) -> ConversionReport:
    """Replace the selected modules of `model` in place with fake-quantized ones.

    Raises:
        TbquantError: if the model has no module to quantize.
    """
    report = _replace(model, config, packed=False)
    if not report.quantized:
        raise TbquantError(
            f"nothing to quantize in {type(model).__name__}: no linear layer inside repeated blocks "
            "(check --keep patterns, or use --embeddings quantize / --head quantize)"
        )
    return report


def build_packed_skeleton(model: nn.Module, config: QuantizationConfig, format_version: int = packing.STREAM_FORMAT_VERSION) -> ConversionReport:
    """Replace the selected modules of a freshly built model with empty packed modules, ready for
    `load_state_dict` from an export of format `format_version`."""
    return _replace(model, config, packed=True, format_version=format_version)


def convert_to_packed(model: nn.Module, config: QuantizationConfig) -> int:
    """Replace every fake-quantized module of a trained student with its packed form, in place.

    Returns the number of packed modules.
    """
    layout = layout_for(config)
    converted: dict[int, nn.Module] = {}
    targets = [(name, module) for name, module in model.named_modules(remove_duplicate=False) if isinstance(module, (QuantLinear, QuantEmbedding))]
    for name, module in targets:
        if id(module) not in converted:
            if isinstance(module, QuantLinear):
                converted[id(module)] = PackedLinear.from_quant_linear(module, layout)
            else:
                converted[id(module)] = PackedEmbedding.from_quant_embedding(module, layout)
        _set_module(model, name, converted[id(module)])
    return len(converted)
