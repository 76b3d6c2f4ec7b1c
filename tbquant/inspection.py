"""Size figures of a tbquant export, read from its config and safetensors header.

No tensor data is read. The figures come from `config.json` (the `quantization_config`) and
from the tensor shapes and dtypes in the header of `model.safetensors`. A model skeleton built
on the meta device (no memory for weights) gives each tensor's module, the module's type and
the number of inputs of each packed weight.

Each stored tensor belongs to one group: attention (projections and quantizers of attention
modules), feed-forward (the other linear layers of the repeated blocks), embeddings, head,
norms, or other. A group's parameters are the weights it stands for: `out * in` for a packed
weight and the element count for a full-precision parameter. Scales, offsets, activation
quantizer state and buffers take bytes but count as no parameters. `out * in` comes from the
skeleton's weight shape, because a packed tensor's shape depends on the layout (a
ternary-compact stream is one-dimensional).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig

from tbquant.errors import ExportError
from tbquant.integrity import CHECKSUMS_NAME, verify_export
from tbquant.loading import read_quantization_config
from tbquant.nn.attention import is_attention_module
from tbquant.nn.linear import is_linear
from tbquant.pipeline.settings import Task
from tbquant.serialization import WEIGHTS_NAME

logger = logging.getLogger(__name__)

GROUPS = ("attention", "feed-forward", "embeddings", "head", "norms", "other")

# Tensor names that a packed module stores besides its float parameters.
_PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_offset")


@dataclasses.dataclass
class GroupFigures:
    """Parameters and bytes on disk of one group of tensors."""

    parameters: int = 0
    quantized_parameters: int = 0
    bytes: int = 0
    tensors: int = 0

    @property
    def bits_per_weight(self) -> float | None:
        return 8 * self.bytes / self.parameters if self.parameters else None

    def ratio(self, bytes_per_parameter: int) -> float | None:
        """Compression ratio against storing every parameter in `bytes_per_parameter` bytes."""
        return bytes_per_parameter * self.parameters / self.bytes if self.bytes and self.parameters else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameters": self.parameters,
            "quantized_parameters": self.quantized_parameters,
            "bytes": self.bytes,
            "tensors": self.tensors,
            "bits_per_weight": self.bits_per_weight,
            "compression_vs_fp32": self.ratio(4),
            "compression_vs_fp16": self.ratio(2),
        }


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: dtype name ("F16", "U8", ...), shape and byte count."""

    dtype: str
    shape: tuple[int, ...]
    bytes: int


def read_header(weights: Path) -> tuple[dict[str, TensorEntry], int]:
    """Return the tensors listed in the header of a safetensors file and the header size.

    The header size is the 8-byte little-endian length prefix plus the JSON header, the part of
    the file that contains no tensor data. Byte counts come from each tensor's `data_offsets`.

    Raises:
        ExportError: if the file is missing or not a valid safetensors file.
    """
    if not weights.is_file():
        raise ExportError(f"{weights} not found: the export is incomplete, export it again")
    try:
        # safe_open validates the header against the file size before the header is trusted.
        with safe_open(str(weights), framework="pt"):
            pass
        with weights.open("rb") as handle:
            (header_length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_length))
    except (SafetensorError, OSError, ValueError, struct.error) as error:
        raise ExportError(f"{weights} is not a readable safetensors file ({str(error).splitlines()[0]}): the export is corrupt, export it again") from None
    header.pop("__metadata__", None)
    entries = {
        name: TensorEntry(info["dtype"], tuple(info["shape"]), info["data_offsets"][1] - info["data_offsets"][0])
        for name, info in header.items()
    }
    return entries, 8 + header_length


def _meta_skeleton(path: Path, task: Task) -> nn.Module:
    """Build the export's full-precision architecture on the meta device (no weight memory)."""
    from tbquant.stages.load import auto_class

    config = AutoConfig.from_pretrained(path)
    model_config = copy.deepcopy(config)
    del model_config.quantization_config
    with init_empty_weights():
        return auto_class(task, model_config).from_config(model_config)


def _owner(modules: dict[str, nn.Module], tensor_name: str) -> str:
    """Return the longest prefix of `tensor_name` that names a module of the skeleton.

    Activation quantizers do not exist in the full-precision skeleton, so their state
    (`...q_proj.input_quantizer.signed`) belongs to the module that owns the quantizer.
    """
    parts = tensor_name.split(".")[:-1]
    while parts and ".".join(parts) not in modules:
        parts.pop()
    return ".".join(parts)


class _Classifier:
    """Lookup of the group (one of `GROUPS`) that a module of the skeleton belongs to."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = dict(model.named_modules(remove_duplicate=False))
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.head_names = {name for name, module in self.modules.items() if head is not None and module is head}
        self.attention_names = {name for name, module in self.modules.items() if is_attention_module(module)}

    def group(self, module_name: str) -> str:
        module = self.modules.get(module_name)
        if module_name in self.head_names:
            return "head"
        if module is not None and "Norm" in type(module).__name__:
            return "norms"
        prefixes = [".".join(module_name.split(".")[:index]) for index in range(1, module_name.count(".") + 2)]
        if any(prefix in self.attention_names for prefix in prefixes):
            return "attention"
        if isinstance(module, nn.Embedding):
            return "embeddings"
        if module is not None and is_linear(module) and any(part.isdigit() for part in module_name.split(".")):
            return "feed-forward"
        return "other"


def check_checksums(path: Path, verify: bool = True) -> str:
    """Check the weight files of the export at `path` against its `checksums.sha256`.

    Returns "verified", "skipped" (`verify` is False) or "missing". An export written before
    tbquant listed checksums has no `checksums.sha256`, so it is reported as "missing" with a
    warning instead of being rejected, unlike `tbquant.load_quantized`.

    Raises:
        ExportError: naming the first weight file that is missing, unlisted or corrupt.
    """
    if not verify:
        return "skipped"
    if not (path / CHECKSUMS_NAME).is_file():
        logger.warning("%s has no %s (an export made before tbquant wrote checksums): its weights were not verified", path, CHECKSUMS_NAME)
        return "missing"
    verify_export(path)
    return "verified"


def inspect_export(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """Return the size figures and settings of the export at `path`, ready for JSON.

    With `verify` (the default), the weight files are first checked against the export's
    `checksums.sha256` (see `check_checksums`).

    Keys: `path`, `base_model`, `architecture`, `task`, `weights`, `activations`, `fp_dtype`,
    `groups` (figures per group), `total` (figures of the whole weights file), `quantized`
    (figures of the packed modules alone), `layers` (figures of each packed module, by name:
    `code_bytes` and `code_bits_per_weight` count its codes alone, `bytes` and
    `bits_per_weight` its codes, scales and offsets), `full_precision_modules`, `tied`,
    `header_bytes`, `files` (bytes of every file in the export) and `checksums` (the result of
    `check_checksums`).

    Raises:
        ExportError: if `path` is not a readable tbquant export, or a weight file is corrupt.
    """
    path = Path(path).expanduser()
    quantization = read_quantization_config(path)
    checksums = check_checksums(path, verify)
    task = Task(quantization["task"])
    weights_path = path / WEIGHTS_NAME
    entries, header_bytes = read_header(weights_path)
    skeleton = _meta_skeleton(path, task)
    classifier = _Classifier(skeleton)
    parameters = dict(skeleton.named_parameters(remove_duplicate=False))
    quantized_modules = set(quantization.get("quantized_modules", []))

    groups = {name: GroupFigures() for name in GROUPS}
    quantized = GroupFigures()
    layers: dict[str, dict[str, Any]] = {}
    for tensor_name, entry in entries.items():
        owner = _owner(classifier.modules, tensor_name)
        group = groups[classifier.group(owner)]
        size = entry.bytes
        weight_count = 0
        if owner in quantized_modules and tensor_name.rpartition(".")[2] in _PACKED_SUFFIXES:
            layer = layers.setdefault(owner, {"parameters": 0, "code_bytes": 0, "bytes": 0})
            if tensor_name.endswith(".weight_packed"):
                weight_count = math.prod(classifier.modules[owner].weight.shape)
                layer["parameters"] = weight_count
                layer["code_bytes"] = size
            layer["bytes"] += size
            quantized.parameters += weight_count
            quantized.quantized_parameters += weight_count
            quantized.bytes += size
            quantized.tensors += 1
            group.quantized_parameters += weight_count
        elif tensor_name in parameters:
            weight_count = math.prod(entry.shape)
        group.parameters += weight_count
        group.bytes += size
        group.tensors += 1

    total = GroupFigures(
        parameters=sum(group.parameters for group in groups.values()),
        quantized_parameters=quantized.parameters,
        bytes=weights_path.stat().st_size,
        tensors=len(entries),
    )
    activations = quantization.get("activations", {})
    bits = activations.get("bits")
    if bits is None:
        scales = None
    elif bits <= 2:
        scales = "learned"
    else:
        scales = "dynamic per token"
    return {
        "path": str(path),
        "base_model": _base_model(path),
        "architecture": (getattr(skeleton.config, "architectures", None) or [type(skeleton).__name__])[0],
        "task": task.value,
        "weights": {**quantization.get("weights", {}), "layout": quantization.get("layout")},
        "activations": {
            "bits": bits,
            "attention": bool(activations.get("attention")) and bool(quantization.get("attention_modules")),
            "scales": scales,
        },
        "fp_dtype": quantization.get("fp_dtype"),
        "groups": {name: figures.to_dict() for name, figures in groups.items() if figures.tensors},
        "total": total.to_dict(),
        "quantized": {"modules": len(quantized_modules), **quantized.to_dict()},
        "layers": {name: _layer_figures(layers[name]) for name in sorted(layers)},
        "full_precision_modules": _full_precision_modules(classifier, entries, quantized_modules, quantization.get("tied", {})),
        "tied": quantization.get("tied", {}),
        "header_bytes": header_bytes,
        "files": {item.name: item.stat().st_size for item in sorted(path.iterdir()) if item.is_file()},
        "checksums": checksums,
    }


def _layer_figures(layer: dict[str, int]) -> dict[str, Any]:
    """Add the bits per weight to a packed module's `parameters`, `code_bytes` and `bytes`."""
    parameters = layer["parameters"]
    return {
        **layer,
        "code_bits_per_weight": 8 * layer["code_bytes"] / parameters if parameters else None,
        "bits_per_weight": 8 * layer["bytes"] / parameters if parameters else None,
    }


def _full_precision_modules(classifier: _Classifier, entries: dict[str, TensorEntry], quantized_modules: set[str], tied: dict[str, str]) -> list[str]:
    """Return the linear and embedding modules whose weight is stored (or tied) in full precision."""
    names = []
    stored = {name for name, entry in entries.items() if entry.dtype in ("F16", "BF16", "F32")}
    for name, module in classifier.modules.items():
        if name in quantized_modules or not (is_linear(module) or isinstance(module, nn.Embedding)):
            continue
        weight_name = f"{name}.weight"
        if weight_name in stored or tied.get(weight_name) in stored:
            names.append(name)
    return names


def _base_model(path: Path) -> str | None:
    """Return the model the export was compressed from, as its training log records it."""
    log_path = path / "training_log.json"
    try:
        log = json.loads(log_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return (log.get("settings") or {}).get("model") or (log.get("info") or {}).get("base_model")
