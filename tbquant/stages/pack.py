"""Pack stage: turn the trained student into integer codes plus per-row scales.

Before packing, every full-precision tensor that the export stores (norms, biases, embeddings
and head when kept) is rounded to the export's `fp_dtype`, so the exported model computes
exactly what the packed student computes here. The stage then checks this: it runs one batch
through the student before and after packing and records the largest logit difference.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from tbquant import packing
from tbquant.errors import TbquantError
from tbquant.evaluation import forward
from tbquant.nn.convert import convert_to_packed
from tbquant.nn.embedding import PackedEmbedding, QuantEmbedding
from tbquant.nn.linear import OUTPUT_TOLERANCE, PackedLinear, QuantLinear
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.state import PipelineState
from tbquant.quantizers.activation import ActivationQuantizer
from tbquant.quantizers.weight import storage_dtype

logger = logging.getLogger(__name__)


@torch.no_grad()
def round_full_precision(model: nn.Module, dtype_name: str) -> None:
    """Round the tensors that stay full precision to `dtype_name` in place (values only; the
    dtype stays float32 for training and inference)."""
    dtype = storage_dtype(dtype_name)
    latent = {id(module.weight) for module in model.modules() if isinstance(module, (QuantLinear, QuantEmbedding))}
    learned_scales = {id(module.alpha) for module in model.modules() if isinstance(module, ActivationQuantizer) and module.learned}
    for parameter in model.parameters():
        if id(parameter) in latent or id(parameter) in learned_scales or not parameter.is_floating_point():
            continue
        parameter.copy_(parameter.to(dtype).to(parameter.dtype))


def packed_size(model: nn.Module) -> dict[str, float]:
    """Return the number of quantized weights and the bytes their codes, scales and offsets take."""
    weights, code_bytes, scale_bytes = 0, 0, 0
    seen = set()
    for module in model.modules():
        if not isinstance(module, (PackedLinear, PackedEmbedding)) or id(module) in seen:
            continue
        seen.add(id(module))
        rows = module.weight_scale.numel()
        columns = module.in_features if isinstance(module, PackedLinear) else module.embedding_dim
        weights += rows * columns
        code_bytes += packing.packed_bytes(rows, columns, module.layout, module.format_version)
        scale_bytes += module.weight_scale.numel() * module.weight_scale.element_size()
        if module.weight_offset is not None:
            scale_bytes += module.weight_offset.numel() * module.weight_offset.element_size()
    return {
        "quantized_weights": weights,
        "code_bytes": code_bytes,
        "scale_bytes": scale_bytes,
        "bits_per_weight": 8 * (code_bytes + scale_bytes) / weights if weights else 0.0,
        "code_bits_per_weight": 8 * code_bytes / weights if weights else 0.0,
    }


def _reference_output(model: nn.Module, batch, task) -> torch.Tensor:
    outputs = forward(model, batch, task, details=False)
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def _record_layer_io(model: nn.Module) -> tuple[dict[nn.Module, tuple[torch.Tensor, torch.Tensor]], list]:
    """Record the input and output of every fake-quantized module on the next forward pass."""
    records: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, inputs, output):
        records[module] = (inputs[0].detach(), output.detach())

    handles = [module.register_forward_hook(record) for module in model.modules() if isinstance(module, (QuantLinear, QuantEmbedding))]
    return records, handles


def _largest_layer_difference_by_name(records: dict, names: dict[nn.Module, str], packed_by_name: dict[str, nn.Module]) -> float:
    """Run each packed module on the input its fake-quantized module saw and return the largest
    output difference, relative to the largest output magnitude (at least 1)."""
    largest = 0.0
    for quantized, (inputs, expected) in records.items():
        packed = packed_by_name[names[quantized]]
        difference = (packed(inputs) - expected).abs().max().item()
        largest = max(largest, difference / max(1.0, expected.abs().max().item()))
    return largest


@register_stage
class PackStage:
    """Replace fake-quantized modules by packed ones and verify that each layer computes the same.

    The check runs one batch through the student, recording every quantized layer's input and
    output, then runs each packed layer on the recorded input. The outputs must agree within
    `OUTPUT_TOLERANCE`, the float32 rounding of the fake-quantized product. The whole model's
    logits are compared too, for the record only: a rounding difference that moves an activation
    across a rounding boundary changes one activation code, and later layers carry that on.
    """

    name = "pack"
    main_process_only = True

    def run(self, state: PipelineState) -> None:
        if state.conversion is None:
            raise TbquantError("the pack stage needs a quantized student: run the calibrate stage before pack")
        model = state.model
        model.eval()
        round_full_precision(model, state.settings.quantization.fp_dtype)

        data = state.eval_data if state.eval_data is not None else state.train_data
        batch = data.batches(min(2, state.settings.distill.batch_size), limit=1)[0]
        with torch.no_grad():
            records, handles = _record_layer_io(model)
            before = _reference_output(model, batch, state.task)
            for handle in handles:
                handle.remove()
            quantized_names = {module: name for name, module in model.named_modules(remove_duplicate=False) if module in records}
            count = convert_to_packed(model, state.settings.quantization)
            packed_by_name = {name: model.get_submodule(name) for name in quantized_names.values()}
            layer_difference = _largest_layer_difference_by_name(records, quantized_names, packed_by_name)
            after = _reference_output(model, batch, state.task)

        difference = (before - after).abs().max().item()
        state.info["pack_max_relative_layer_difference"] = layer_difference
        state.info["pack_max_abs_logit_difference"] = difference
        state.info.update(packed_size(model))
        logger.info(
            "Packed %d modules: %.3f bits per quantized weight (%.2f for the codes); largest layer output change %.3g "
            "(relative), largest logit change %.3g",
            count,
            state.info["bits_per_weight"],
            state.info["code_bits_per_weight"],
            layer_difference,
            difference,
        )
        if layer_difference > OUTPUT_TOLERANCE:
            # Packed and fake-quantized layers use the same codes and scales, so any difference
            # beyond float32 rounding means the packed weights are wrong.
            raise TbquantError(f"packing changed a layer's outputs by {layer_difference:.3g} (relative): this is a bug in tbquant, please report it")
