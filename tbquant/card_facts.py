"""Facts that the model card states, read from an export's files and from the base model.

`read_export_facts` reads an export directory: `config.json` (the quantization config),
`model.safetensors` (which tensors stayed full precision, the size on disk), `training_log.json`
(base model, data, distillation recipe, validation figures) and, when `tbquant eval` wrote it,
`eval_results.json`. `read_base_model_facts` runs at load time and records the base model's
license, languages and size in the training log.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, metadata_load, try_to_load_from_cache
from safetensors import SafetensorError, safe_open

from tbquant.errors import ExportError

logger = logging.getLogger(__name__)

TRAINING_LOG_NAME = "training_log.json"
# Written by `tbquant eval --update-card`: a JSON list of objects whose keys are keyword
# arguments of huggingface_hub's `EvalResult`.
EVAL_RESULTS_NAME = "eval_results.json"

# Files that hold a checkpoint's weights, for the size of the base model on disk.
_WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")


def is_local(source: str) -> bool:
    """Return whether a model or data source is a local path rather than a hub id."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def public_name(source: str | None) -> str | None:
    """Return a name for a model or data source that is safe to publish: a hub id as is, a local
    path reduced to its last component."""
    if source is None:
        return None
    return Path(source).expanduser().name if is_local(source) else source


# Facts about the base model, recorded at load time in the training log


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    facts: dict[str, Any] = {}
    for key, name in (("general.license", "base_license"), ("general.languages", "base_languages")):
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            facts[name] = value if isinstance(value, list) else str(value)
    return facts


def _readme_metadata(readme: Path | None) -> dict[str, Any]:
    if readme is None or not readme.is_file():
        return {}
    metadata = metadata_load(readme) or {}
    facts: dict[str, Any] = {}
    if isinstance(metadata.get("license"), str):
        facts["base_license"] = metadata["license"]
    language = metadata.get("language")
    if isinstance(language, (str, list)):
        facts["base_languages"] = [language] if isinstance(language, str) else [str(item) for item in language]
    return facts


def _weights_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for pattern in _WEIGHT_FILE_PATTERNS for path in folder.glob(pattern) if path.is_file())


def read_base_model_facts(model: str, revision: str | None = None) -> dict[str, Any]:
    """Read what the card states about a base model without downloading anything.

    Returns a dict with `base_model_hub_id` (None for a local source), and where the source
    records them `base_license`, `base_languages` (from GGUF metadata, or the `license` and
    `language` of a checkpoint's README.md, for hub ids the cached one) and
    `base_checkpoint_bytes` (size of the source's weight files).
    """
    path = Path(model).expanduser()
    facts: dict[str, Any] = {"base_model_hub_id": None if is_local(model) else model}
    try:
        if path.suffix.lower() == ".gguf" and path.is_file():
            facts.update(_gguf_metadata(path))
            facts["base_checkpoint_bytes"] = path.stat().st_size
        elif path.is_dir():
            facts.update(_readme_metadata(path / "README.md"))
            facts["base_checkpoint_bytes"] = _weights_bytes(path)
        elif not is_local(model):
            config = try_to_load_from_cache(model, "config.json", revision=revision)
            readme = try_to_load_from_cache(model, "README.md", revision=revision)
            facts.update(_readme_metadata(Path(readme) if isinstance(readme, str) else None))
            if isinstance(config, str):
                facts["base_checkpoint_bytes"] = _weights_bytes(Path(config).parent)
    except (OSError, ValueError, KeyError) as error:
        # The card then omits these facts; compression does not depend on them.
        logger.warning("Could not read the license or size of %s: %s", public_name(model), error)
    if not facts.get("base_checkpoint_bytes"):
        facts.pop("base_checkpoint_bytes", None)
    return facts


# Facts about an export, read from its files


@dataclasses.dataclass
class ExportFacts:
    """Facts about an export that the card states, read from its files.

    Attributes:
        config: `config.json` without its `quantization_config`.
        quantization: the `quantization_config` of `config.json`.
        log: `training_log.json`, or an empty dict when the export has none.
        eval_results: the entries of `eval_results.json`.
        weights_bytes: size of `model.safetensors`.
        total_bytes: size of every file of the export.
        full_precision: (tensor name, shape) of every full-precision weight matrix, tied aliases
            excluded.
        vectors: number of full-precision one-dimensional tensors (norms, biases).
    """

    config: dict[str, Any]
    quantization: dict[str, Any]
    log: dict[str, Any]
    eval_results: list[EvalResult]
    weights_bytes: int
    total_bytes: int
    full_precision: list[tuple[str, list[int]]]
    vectors: int

    @property
    def info(self) -> dict[str, Any]:
        return self.log.get("info", {})

    @property
    def scheme(self) -> str:
        return self.quantization.get("weights", {}).get("scheme", "ternary")

    @property
    def activation_bits(self) -> int | None:
        return self.quantization.get("activations", {}).get("bits")

    @property
    def base_name(self) -> str:
        return self.log.get("settings", {}).get("model") or self.info.get("base_model") or "unknown base model"

    @property
    def base_hub_id(self) -> str | None:
        """The base model's hub id; exports written before it was recorded guess it from the name."""
        if "base_model_hub_id" in self.info:
            return self.info["base_model_hub_id"]
        name = self.base_name
        return name if name.count("/") == 1 and not name.lower().endswith(".gguf") else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ExportError(f"{path.name} in {path.parent.name} is not valid JSON ({error}): export the model again") from None


def read_eval_results(directory: Path) -> list[EvalResult]:
    """Return the evaluation results stored in `eval_results.json`, or [] when there is none.

    `verify_token` is dropped: the card carries no tokens.

    Raises:
        ExportError: if the file is not a JSON list of `EvalResult` arguments.
    """
    path = directory / EVAL_RESULTS_NAME
    if not path.is_file():
        return []
    entries = _read_json(path)
    if not isinstance(entries, list):
        raise ExportError(f"{EVAL_RESULTS_NAME} must contain a JSON list of evaluation results: run tbquant eval --update-card again")
    results = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ExportError(f"entry {index} of {EVAL_RESULTS_NAME} is not a JSON object: run tbquant eval --update-card again")
        arguments = {key: value for key, value in entry.items() if key != "verify_token"}
        try:
            results.append(EvalResult(**arguments))
        except (TypeError, ValueError) as error:
            raise ExportError(f"entry {index} of {EVAL_RESULTS_NAME} is invalid ({error}): run tbquant eval --update-card again") from None
    return results


def _tensor_layout(weights: Path) -> tuple[list[tuple[str, list[int]]], int]:
    """Return the full-precision weight matrices of a packed checkpoint and its count of vectors."""
    matrices: list[tuple[str, list[int]]] = []
    vectors = 0
    try:
        with safe_open(str(weights), framework="pt") as handle:
            names = set(handle.keys())
            for name in sorted(names):
                module = name.rsplit(".", 1)[0]
                if f"{module}.weight_packed" in names or name.endswith(".alpha"):
                    continue
                tensor = handle.get_slice(name)
                if not tensor.get_dtype().startswith(("F", "BF")):
                    continue
                shape = list(tensor.get_shape())
                if len(shape) >= 2:
                    matrices.append((name, shape))
                else:
                    vectors += 1
    except (SafetensorError, OSError) as error:
        raise ExportError(f"{weights.name} in {weights.parent.name} is not a readable safetensors file ({error}): export the model again") from None
    return matrices, vectors


def read_export_facts(directory: str | Path) -> ExportFacts:
    """Read the facts the model card states from the files of an export directory.

    Raises:
        ExportError: if `config.json` or the weights are missing or unreadable.
    """
    from tbquant.serialization import WEIGHTS_NAME

    directory = Path(directory)
    config_path, weights = directory / "config.json", directory / WEIGHTS_NAME
    for path in (config_path, weights):
        if not path.is_file():
            raise ExportError(f"{directory} has no {path.name}: it is not a complete tbquant export")
    config = _read_json(config_path)
    quantization = config.pop("quantization_config", None) or {}
    log_path = directory / TRAINING_LOG_NAME
    log = _read_json(log_path) if log_path.is_file() else {}
    full_precision, vectors = _tensor_layout(weights)
    return ExportFacts(
        config=config,
        quantization=quantization,
        log=log if isinstance(log, dict) else {},
        eval_results=read_eval_results(directory),
        weights_bytes=weights.stat().st_size,
        total_bytes=sum(path.stat().st_size for path in directory.rglob("*") if path.is_file() and path.name != "README.md"),
        full_precision=full_precision,
        vectors=vectors,
    )
