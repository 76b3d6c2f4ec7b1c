"""Loading a tbquant export back into a transformers model."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from tbquant.errors import ExportError
from tbquant.integrity import verify_export
from tbquant.pipeline.settings import Task
from tbquant.serialization import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME


def read_quantization_config(path: Path) -> dict:
    """Return the `quantization_config` of the export at `path`.

    Raises:
        ExportError: if `path` is not a tbquant export of a format this version reads.
    """
    if path.exists() and not path.is_dir():
        raise ExportError(f"{path} is a file, not an export directory: pass the --output directory of tbquant compress")
    if not path.is_dir():
        raise ExportError(f"export directory {path} not found: pass the --output directory of tbquant compress")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path} has no config.json: it is not a tbquant export")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_path} is not valid JSON ({error}): the export is corrupt, export it again") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else None
    if method != QUANT_METHOD:
        found = f"quant_method {method!r}" if method else "no quantization_config"
        raise ExportError(f"{path} is not a tbquant export (its config.json has {found}): pass the --output directory of tbquant compress")
    if quantization.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} uses export format {quantization['format_version']}: upgrade tbquant to read it")
    return quantization


def load_quantized(path: str | Path, device: str | torch.device = "cpu", load_tokenizer: bool = True, verify: bool = True):
    """Load a tbquant export with its transformers Auto class; returns `(model, tokenizer)`.

    This is `AutoModelForCausalLM` (or the seq2seq, masked-LM or bare encoder class that the
    export's task needs) `.from_pretrained(path)` through tbquant's registered quantizer, with
    checks that turn a missing or foreign directory into a one-line error. The model has packed
    modules in place of the quantized ones and the same activation quantizers as the student that
    was exported, so its outputs equal the student's within `OUTPUT_TOLERANCE`. With `verify`
    (the default), the weight files are first checked against the export's `checksums.sha256`.

    Raises:
        ExportError: if the export is missing, incomplete or corrupt, naming the corrupt file.
    """
    from tbquant.hf_quantizer import checksums_checked_by_caller
    from tbquant.stages.load import auto_class

    path = Path(path).expanduser()
    quantization = read_quantization_config(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise ExportError(f"{weights} not found: the export is incomplete, export it again")

    if verify:
        verify_export(path)
    config = AutoConfig.from_pretrained(path)
    cls = auto_class(Task(quantization["task"]), config)
    with checksums_checked_by_caller():
        model = cls.from_pretrained(path, dtype=torch.float32)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if load_tokenizer else None
    return model, tokenizer
