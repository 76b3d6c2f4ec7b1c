"""Model card (`README.md`) of an export, built with huggingface_hub's `ModelCard` and `ModelCardData`.

The card is rendered from the files of an export directory (see `tbquant.card_facts`).
`tbquant compress` renders it into the export, and `tbquant push-to-hub` renders it again right
before the upload, with the repository id in the usage example and any evaluation results added
since. The base model and the data are named by hub id or by file or directory name, so no
local path ends up in the card.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tbquant.card_facts import ExportFacts, read_export_facts

PAPER = "[Liu et al., *Binary and Ternary Natural Language Generation*, ACL 2023](https://arxiv.org/abs/2306.01841)"

_PIPELINE_TAGS = {"causal-lm": "text-generation", "seq2seq-lm": "text2text-generation", "encoder": "feature-extraction"}
_WEIGHT_FAMILIES = {"ternary": "ternary", "twn": "ternary", "absmean": "ternary", "binary": "binary", "bwn": "binary"}
_WEIGHT_METHODS = {
    "ternary": "statistics-based ternary weights, a = 4/3 * mean|W - mu| per output row (Liu et al., 2023)",
    "binary": "statistics-based binary weights, a = mean|W - mu| per output row (Liu et al., 2023)",
    "twn": "ternary weight networks (TWN): threshold 0.7 * mean|W|, one scale per row",
    "bwn": "binary weight networks (BWN): sign(W) * mean|W|, one scale per row",
    "absmean": "BitNet b1.58 absmean: round(W / mean|W|) clamped to [-1, 1], one scale per tensor",
}

def _row(*cells: Any) -> str:
    """Return a Markdown table row; a `|` inside a cell is escaped so that it does not split the cell."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _megabytes(size: float) -> str:
    return f"{size / 1e6:,.1f} MB"


def _activation_text(bits: int | None) -> str:
    if bits is None:
        return "full precision"
    if bits <= 2:
        return f"{bits} bit{'s' if bits > 1 else ''}, one learned scale per quantization point (LSQ gradient)"
    return f"{bits} bits, dynamic absmax scale per token"


def _weights_text(facts: ExportFacts) -> str:
    weights = facts.quantization.get("weights", {})
    info = facts.info
    text = _WEIGHT_METHODS.get(facts.scheme, facts.scheme)
    if _WEIGHT_FAMILIES.get(facts.scheme) == "ternary":
        text += f"; {weights.get('packing', 'compact')} packing"
    if weights.get("center"):
        text += "; row mean subtracted and stored"
    if "bits_per_weight" in info:
        text += f"; {info['code_bits_per_weight']:.2f} bits per weight for the codes, {info['bits_per_weight']:.2f} with the {weights.get('scale_dtype', 'float16')} scales"
    return text


def _module_policy(facts: ExportFacts, key: str) -> str:
    policy = facts.quantization.get(key, "keep")
    if policy == "quantize":
        return f"quantized ({_WEIGHT_FAMILIES.get(facts.scheme, facts.scheme)}, one scale per row)"
    return f"full precision ({facts.quantization.get('fp_dtype', 'float16')})"


def _quantization_section(facts: ExportFacts) -> list[str]:
    attention = facts.quantization.get("activations", {}).get("attention", True) and facts.activation_bits is not None
    rows = [
        _row("Linear weights in the transformer blocks", _weights_text(facts)),
        _row("Activations (inputs of quantized linear layers)", _activation_text(facts.activation_bits)),
        _row("Query, key, value states and attention probabilities", _activation_text(facts.activation_bits) if attention else "full precision"),
        _row("Token embedding", _module_policy(facts, "embeddings")),
        _row("Output head", _module_policy(facts, "head")),
        _row("Quantized modules", len(facts.quantization.get("quantized_modules", []))),
    ]
    return ["## Quantization", "", _row("Part", "Bit width"), _row("---", "---"), *rows, ""]


def _full_precision_section(facts: ExportFacts, limit: int = 20) -> list[str]:
    fp_dtype = facts.quantization.get("fp_dtype", "float16")
    tied = facts.quantization.get("tied", {})
    lines = ["## Modules kept in full precision", ""]
    if facts.full_precision:
        lines.append(f"Weight matrices stored in {fp_dtype}:")
        lines.append("")
        for name, shape in facts.full_precision[:limit]:
            aliases = sorted(alias for alias, source in tied.items() if source == name)
            shared = f" (shared with `{'`, `'.join(aliases)}`)" if aliases else ""
            lines.append(f"- `{name.removesuffix('.weight')}`: {' x '.join(str(size) for size in shape)}{shared}")
        if len(facts.full_precision) > limit:
            lines.append(f"- and {len(facts.full_precision) - limit} more")
    else:
        lines.append("Every weight matrix is quantized.")
    lines.append("")
    lines.append(f"Norms, biases and other vectors ({facts.vectors} tensors) are stored in {fp_dtype}.")
    patterns = facts.quantization.get("keep_full_precision") or []
    if patterns:
        lines.append(f"Modules matching {', '.join(f'`{pattern}`' for pattern in patterns)} were kept in full precision on request.")
    lines.append("")
    return lines


def _size_section(facts: ExportFacts) -> list[str]:
    info = facts.info
    rows = [_row("This model: weights file", _megabytes(facts.weights_bytes), "")]
    rows.append(_row("This model: all files", _megabytes(facts.total_bytes), ""))
    if info.get("parameters"):
        fp32 = 4 * info["parameters"]
        rows.append(_row(f"Base model in float32 ({info['parameters'] / 1e6:.1f}M parameters)", _megabytes(fp32), f"{fp32 / facts.weights_bytes:.1f}x"))
        rows.append(_row("Base model in float16", _megabytes(fp32 / 2), f"{fp32 / 2 / facts.weights_bytes:.1f}x"))
    if info.get("base_checkpoint_bytes"):
        size = info["base_checkpoint_bytes"]
        rows.append(_row(f"Base checkpoint files ({facts.base_name})", _megabytes(size), f"{size / facts.weights_bytes:.1f}x"))
    return ["## Size on disk", "", _row("", "Size", "Ratio to this model's weights"), _row("---", "---", "---"), *rows, ""]


def _recipe_section(facts: ExportFacts) -> list[str]:
    settings = facts.log.get("settings", {})
    distill = settings.get("distill", {})
    lines = ["## Distillation recipe", ""]
    if not facts.log:
        return [*lines, "Not recorded: the export has no training log.", ""]
    if not distill.get("steps") or "distill_seconds" not in facts.info:
        return [*lines, "None: the weights were quantized after training (post-training quantization) without distillation.", ""]
    losses = ", ".join(
        f"{weight:g} x {name}"
        for name, weight in (
            ("soft cross-entropy on logits", distill.get("logit_weight", 0)),
            ("hidden-state MSE" + (" (normalized per layer)" if distill.get("normalize_hidden") else ""), distill.get("hidden_weight", 0)),
            ("attention-probability MSE", distill.get("attention_weight", 0)),
            ("cross-entropy on labels", distill.get("label_weight", 0)),
        )
        if weight
    )
    rows = [
        _row("Teacher", f"{facts.base_name} in full precision (the student starts from the same weights)"),
        _row("Data", settings.get("data") or facts.info.get("data") or "not recorded"),
        _row("Steps", distill.get("steps")),
        _row("Batch", f"{distill.get('batch_size')} sequences x {distill.get('grad_accum', 1)} accumulation steps, {distill.get('max_length')} tokens"),
        _row("Optimizer", f"AdamW, learning rate {distill.get('lr'):g}, weight decay {distill.get('weight_decay', 0):g}, "
             f"linear decay after {distill.get('warmup_ratio', 0):.0%} warm-up, gradient norm clipped at {distill.get('max_grad_norm', 0):g}"),
        _row("Loss", losses or "none"),
        _row("Temperature", f"{distill.get('temperature', 1):g}"),
        _row("Seed", distill.get("seed", 0)),
    ]
    if "distill_seconds_per_step" in facts.info:
        rows.append(_row("Time per step", f"{facts.info['distill_seconds_per_step']:.2f} s"))
    return [*lines, _row("Setting", "Value"), _row("---", "---"), *rows, ""]


def _evaluation_section(facts: ExportFacts) -> list[str]:
    lines = ["## Evaluation", ""]
    if facts.eval_results:
        lines += [_row("Task", "Dataset", "Split", "Metric", "Value"), _row("---", "---", "---", "---", "---")]
        for result in facts.eval_results:
            task = result.task_name or result.task_type
            dataset = result.dataset_name or result.dataset_type
            metric = result.metric_name or result.metric_type
            value = f"{result.metric_value:.4g}" if isinstance(result.metric_value, float) else result.metric_value
            lines.append(_row(task, dataset, result.dataset_split or "", metric, value))
        lines.append("")
    metrics = facts.log.get("metrics", {})
    if metrics:
        lines += ["Validation figures measured during compression:", "", _row("Figure", "Value"), _row("---", "---")]
        lines += [_row(name.replace("_", " "), f"{value:.4g}") for name, value in sorted(metrics.items()) if isinstance(value, (int, float))]
        lines.append("")
    if len(lines) == 2:
        lines += ["No evaluation results yet: `tbquant eval --update-card` adds them.", ""]
    return lines


def _transformers_loads_exports() -> bool:
    """Return whether the tbquant quantization method is registered with transformers, so that
    its Auto classes load an export directly."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    from tbquant.serialization import QUANT_METHOD

    return QUANT_METHOD in AUTO_QUANTIZER_MAPPING


def _auto_class(facts: ExportFacts) -> str:
    task = facts.quantization.get("task")
    if task == "causal-lm":
        return "AutoModelForCausalLM"
    if task == "seq2seq-lm":
        return "AutoModelForSeq2SeqLM"
    architectures = facts.config.get("architectures") or []
    return "AutoModelForMaskedLM" if any(name.endswith("ForMaskedLM") for name in architectures) else "AutoModel"


def _usage_section(facts: ExportFacts, location: str) -> list[str]:
    lines = ["## Usage", "", "```bash", "pip install tbquant", "```", ""]
    if _transformers_loads_exports():
        auto_class = _auto_class(facts)
        code = [
            "import tbquant  # registers the tbquant quantization method with transformers",
            f"from transformers import AutoTokenizer, {auto_class}",
            "",
            f'model = {auto_class}.from_pretrained("{location}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{location}")',
        ]
    else:
        fetch = f'snapshot_download("{location}")' if "/" in location else f'"{location}"'
        code = [
            *(["from huggingface_hub import snapshot_download", ""] if "/" in location else []),
            "import tbquant",
            "",
            "# A transformers model with packed ternary or binary layers, and its tokenizer",
            f"model, tokenizer = tbquant.load_quantized({fetch})",
        ]
    return [*lines, "```python", *code, "```", ""]


def build_card_data(facts: ExportFacts, model_name: str) -> ModelCardData:
    """Return the card's metadata: base model, library, tags, license, pipeline tag and model-index."""
    family = _WEIGHT_FAMILIES.get(facts.scheme, facts.scheme)
    tags = ["tbquant", "quantization", family]
    if facts.scheme != family:
        tags.append(facts.scheme)
    if facts.config.get("model_type"):
        tags.append(facts.config["model_type"])
    languages = facts.info.get("base_languages")
    return ModelCardData(
        base_model=facts.base_hub_id,
        library_name="tbquant",
        license=facts.info.get("base_license"),
        language=languages or None,
        pipeline_tag=_PIPELINE_TAGS.get(facts.quantization.get("task", "")),
        tags=tags,
        model_name=model_name if facts.eval_results else None,
        eval_results=facts.eval_results or None,
    )


def render_model_card(directory: str | Path, location: str | None = None) -> str:
    """Render the model card of the export in `directory` as Markdown with YAML metadata.

    `location` is the Hub repository id or the export's directory name, for the title and the
    usage example (default: the name of `directory`).

    Raises:
        ExportError: if the export's files are missing or unreadable.
    """
    directory = Path(directory)
    facts = read_export_facts(directory)
    location = location or directory.name
    model_name = location.split("/")[-1]
    bits = facts.activation_bits
    family = _WEIGHT_FAMILIES.get(facts.scheme, facts.scheme)
    version = facts.quantization.get("tbquant_version", "")
    body = [
        "",
        f"# {model_name}",
        "",
        (
            f"{facts.base_name} with {family} weights and {f'{bits}-bit' if bits else 'full-precision'} activations, "
            f"compressed with [tbquant](https://pypi.org/project/tbquant/) {version} by quantization-aware distillation "
            f"from the full-precision model, following {PAPER}. The quantized weights are stored packed: "
            "integer codes plus one scale per output row."
        ),
        "",
        "## Method",
        "",
        (
            "The student starts from the base model's weights. Every linear layer in the transformer blocks gets a "
            "weight quantizer with one scale per output row computed from the row's statistics, and its inputs get an "
            "activation quantizer. Gradients pass the rounding through the straight-through estimator. The student is "
            "trained to match the frozen full-precision teacher (the base model) on its logits, hidden states and "
            "attention probabilities, then its weights are packed."
        ),
        "",
        *_quantization_section(facts),
        *_full_precision_section(facts),
        *_size_section(facts),
        *_recipe_section(facts),
        *_evaluation_section(facts),
        *_usage_section(facts, location),
    ]
    data = build_card_data(facts, model_name)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body)))




EVAL_RESULTS_NAME = "eval_results.json"


def _eval_result_key(result: dict) -> tuple:
    """Identify a result by task, dataset, split, metric and metric arguments, so a new
    measurement replaces an old one of the same figure."""
    return (
        result.get("task_type"),
        result.get("dataset_type"),
        result.get("dataset_split"),
        result.get("metric_type"),
        json.dumps(result.get("metric_args"), sort_keys=True),
    )


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def update_eval_results(export_dir: Path, results: list[dict], model_name: str) -> list[dict]:
    """Merge `results` into the export's `eval_results.json` and refresh its card's model-index.

    `eval_results.json` is a JSON list of objects whose keys are `huggingface_hub.EvalResult`
    keyword arguments. A result replaces a stored one with the same task, dataset, split, metric
    and metric arguments. The card (`README.md`) keeps its text and other metadata; its
    `model-index` is rebuilt from all stored results through `ModelCardData(eval_results=...,
    model_name=...)`. Both files are replaced atomically. Returns the stored results.

    Raises:
        ExportError: if the stored `eval_results.json` or a result is invalid.
    """
    from tbquant.errors import ExportError

    path = export_dir / EVAL_RESULTS_NAME
    stored: list[dict] = []
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ExportError(f"{path} is not valid JSON ({error}): delete it and run tbquant eval --update-card again") from None
        if not isinstance(stored, list) or not all(isinstance(result, dict) for result in stored):
            raise ExportError(f"{path} is not a JSON list of objects: delete it and run tbquant eval --update-card again")
    merged = {_eval_result_key(result): result for result in stored}
    merged.update({_eval_result_key(result): result for result in results})
    try:
        eval_results = [EvalResult(**result) for result in merged.values()]
    except (TypeError, ValueError) as error:
        raise ExportError(f"{path} contains an entry that is not an EvalResult ({error}): delete it and run tbquant eval --update-card again") from None

    write_atomic(path, json.dumps(list(merged.values()), indent=2) + "\n")

    # The card is rendered from the export's files, eval_results.json included, so the results
    # appear in both the model-index and the body. An export without its training log or
    # weights keeps its card text and gets only the new model-index.
    readme = export_dir / "README.md"
    try:
        text = render_model_card(export_dir, model_name)
    except ExportError:
        card = ModelCard.load(readme) if readme.is_file() else ModelCard(f"---\n{ModelCardData(library_name='tbquant').to_yaml()}\n---\n")
        card.data.model_name = model_name
        card.data.eval_results = eval_results
        text = str(card)
    write_atomic(readme, text)
    return list(merged.values())
