"""The export format: a `save_pretrained`-style directory with packed weights.

- `config.json`: the model's config with a `quantization_config` whose `quant_method` is
  "tbquant" (`build_quantization_config` lists its fields) and `transformers_weights` set to
  `LOAD_GUARD`, so that transformers without tbquant fails instead of loading random weights;
- `model.safetensors`: packed codes (`<module>.weight_packed`, uint8, shaped by
  `tbquant.packing.packed_shape`), per-row scales
  (`<module>.weight_scale`) and offsets (`<module>.weight_offset`, only for centred weights),
  learned activation scales (`<quantizer>.alpha`, float32), quantizer flags (bool) and every
  full-precision tensor in `fp_dtype`. Tensors shared by several modules (tied embeddings) are
  stored once; `quantization_config["tied"]` maps each other name to the stored one;
- `checksums.sha256`: the SHA-256 digest of each weight file (`tbquant.integrity`);
- tokenizer files, `generation_config.json`, `README.md` (model card), `training_log.json` and
  `loss_history.csv`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from tbquant import __version__
from tbquant.config import QuantizationConfig
from tbquant.nn.convert import ConversionReport, layout_for
from tbquant.pipeline.settings import Task
from tbquant.quantizers.weight import storage_dtype

QUANT_METHOD = "tbquant"
# Version 2 stores ternary-compact codes as one stream per tensor, while version 1 padded every
# row to whole bytes (`tbquant.packing`). The loader reads both.
FORMAT_VERSION = 2
WEIGHTS_NAME = "model.safetensors"

# Value of `transformers_weights` in an export's config.json. It is not a `.safetensors` name, so
# transformers 5 rejects it, quoting it, unless tbquant's quantizer replaces it by WEIGHTS_NAME.
LOAD_GUARD = "model.safetensors is a tbquant export: pip install tbquant and import tbquant before loading it"


def build_quantization_config(config: QuantizationConfig, task: Task, conversion: ConversionReport, tied: dict[str, str]) -> dict[str, Any]:
    """Return the `quantization_config` entry of an export's `config.json`.

    Fields: `quant_method`, `format_version`, `tbquant_version`, `task`, `layout` (packing
    layout of all quantized weights), the `QuantizationConfig` fields (`weights`,
    `activations`, `embeddings`, `head`, `keep_full_precision`, `fp_dtype`),
    `quantized_modules`, `attention_modules` (modules whose q/k/v and probabilities are
    quantized), `untied` (input embedding and head untied by tbquant) and `tied`.
    """
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "tbquant_version": __version__,
        "task": task.value,
        "layout": layout_for(config).value,
        **config.to_dict(),
        "quantized_modules": conversion.quantized,
        "attention_modules": conversion.attention,
        "untied": conversion.untied,
        "tied": tied,
    }


def export_state_dict(model: nn.Module, fp_dtype: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Collect the tensors to save: shared tensors once, floats cast to `fp_dtype`.

    Returns the tensors by name and the map from each dropped duplicate name to the kept one.
    """
    dtype = storage_dtype(fp_dtype)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=False).items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        # Learned activation scales stay float32, and weight scales and offsets keep their own
        # `scale_dtype`, which may be float32 while `fp_dtype` is not.
        if tensor.dtype == torch.float32 and not name.endswith((".alpha", ".weight_scale", ".weight_offset")):
            tensor = tensor.to(dtype)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors, tied


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", "quant_method": QUANT_METHOD})


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n", encoding="utf-8")
