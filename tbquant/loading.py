"""Loading a tbquant export back into a transformers model."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoTokenizer

from tbquant.config import QuantizationConfig
from tbquant.errors import ExportError
from tbquant.integrity import verify_export
from tbquant.nn.convert import build_packed_skeleton
from tbquant.pipeline.settings import Task
from tbquant.serialization import FORMAT_VERSION, QUANT_METHOD, WEIGHTS_NAME


def read_quantization_config(path: Path) -> dict:
    """Return the `quantization_config` of the export at `path`.

    Raises:
        ExportError: if `path` is not a tbquant export of a format this version reads.
    """
    if not path.is_dir():
        raise ExportError(f"export directory {path} not found: pass the --output directory of tbquant compress")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ExportError(f"{path} has no config.json: it is not a tbquant export")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{config_path} is not valid JSON ({error}): the export is corrupt, export it again") from None
    quantization = config.get("quantization_config") or {}
    if quantization.get("quant_method") != QUANT_METHOD:
        raise ExportError(f"{path} is not a tbquant export (quant_method {quantization.get('quant_method')!r})")
    if quantization.get("format_version", 0) > FORMAT_VERSION:
        raise ExportError(f"{path} uses export format {quantization['format_version']}: upgrade tbquant to read it")
    return quantization


def _read_tensors(weights: Path) -> dict[str, torch.Tensor]:
    if not weights.is_file():
        raise ExportError(f"{weights} not found: the export is incomplete, export it again")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            return {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise ExportError(f"{weights} is not a readable safetensors file ({str(error).splitlines()[0]}): the export is corrupt") from None


def load_quantized(path: str | Path, device: str | torch.device = "cpu", load_tokenizer: bool = True, verify: bool = True):
    """Rebuild a quantized model from a tbquant export; returns `(model, tokenizer)`.

    The model has packed modules in place of the quantized ones and the same activation
    quantizers as the student that was exported, so its outputs equal the student's. With
    `verify` (the default), the weight files are first checked against the export's
    `checksums.sha256`.

    Raises:
        ExportError: if the export is missing, incomplete or corrupt, naming the corrupt file.
    """
    from tbquant.stages.load import AUTO_CLASSES, auto_class

    path = Path(path).expanduser()
    quantization = read_quantization_config(path)
    if verify:
        verify_export(path)
    task = Task(quantization["task"])
    config = AutoConfig.from_pretrained(path)
    model_config = copy.deepcopy(config)
    del model_config.quantization_config
    if quantization.get("untied"):
        # The export unties a tied head from a quantized embedding and stores
        # tie_word_embeddings=False. Building with False would also untie the embeddings that
        # stay tied (a seq2seq model's encoder and decoder tables), so the model is built tied
        # and the skeleton unties the head again, as compression did.
        model_config.tie_word_embeddings = True
    cls = AUTO_CLASSES.get(task) or auto_class(task, model_config)
    model = cls.from_config(model_config, dtype=torch.float32)

    build_packed_skeleton(model, QuantizationConfig.from_dict(quantization))
    tensors = _read_tensors(path / WEIGHTS_NAME)
    for alias, source in quantization.get("tied", {}).items():
        if source in tensors:
            tensors[alias] = tensors[source]
    expected = set(model.state_dict())
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        detail = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {unexpected[0]}"
        raise ExportError(f"{path / WEIGHTS_NAME} does not match its config ({detail}): the export is corrupt, export it again")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), str(error).splitlines()[0])
        raise ExportError(f"{path / WEIGHTS_NAME} does not match its config ({first}): the export is corrupt") from None

    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path) if load_tokenizer else None
    return model, tokenizer
