"""Model card (`README.md`) of an export, built with huggingface_hub's `ModelCard`.

The card names the base model by hub id, or by file or directory name for local checkpoints,
so no local path ends up in it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from tbquant.pipeline.state import PipelineState

_PIPELINE_TAGS = {"causal-lm": "text-generation", "seq2seq-lm": "text2text-generation", "encoder": "feature-extraction"}


def is_local(source: str) -> bool:
    """Return whether a model or data source is a local path rather than a hub id."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def public_name(source: str | None) -> str | None:
    """Return a name for a model or data source that is safe to publish: a hub id as is, a local
    path reduced to its last component."""
    if source is None:
        return None
    return Path(source).expanduser().name if is_local(source) else source


def _row(name: str, value) -> str:
    return f"| {name} | {value} |"


def render_model_card(state: PipelineState) -> str:
    """Return the model card of the run in `state` as Markdown with YAML metadata."""
    settings = state.settings
    quantization = settings.quantization
    info, metrics = state.info, state.metrics
    base = public_name(settings.model)
    is_hub_id = not is_local(settings.model)
    scheme = quantization.weights.scheme.value
    acts = quantization.activations.bits or "none"

    data = ModelCardData(
        library_name="tbquant",
        base_model=settings.model if is_hub_id else None,
        pipeline_tag=_PIPELINE_TAGS.get(state.task.value),
        tags=["tbquant", "quantization", scheme, f"w-{scheme}", f"a{acts}", info.get("model_type", "")],
    )

    fp32_mb = info.get("fp32_bytes", 0) / 1e6
    export_mb = info.get("export_weights_bytes", 0) / 1e6
    rows = [
        _row("Base model", base),
        _row("Weights", f"{scheme}, one scale per output row ({quantization.weights.packing.value} packing)"),
        _row("Bits per quantized weight (codes + scales)", f"{info.get('bits_per_weight', 0):.3f}"),
        _row("Activations", f"{acts} bits"),
        _row("Token embedding / output head", f"{quantization.embeddings.value} / {quantization.head.value}"),
        _row("Full-precision tensors stored as", quantization.fp_dtype),
        _row("Weights file", f"{export_mb:.1f} MB (fp32 base model: {fp32_mb:.1f} MB)"),
        _row("Distillation", "none (post-training quantization)" if "distill_seconds" not in info else f"{settings.distill.steps} steps, batch {settings.distill.batch_size} x {settings.distill.grad_accum}, "
             f"{settings.distill.max_length} tokens, lr {settings.distill.lr:g}, data: {public_name(info.get('data'))}"),
    ]
    score_rows = [_row(name.replace("_", " "), f"{value:.4g}") for name, value in sorted(metrics.items())]

    body = "\n".join(
        [
            "",
            f"# {base} ({scheme} weights, {acts}-bit activations)",
            "",
            "Compressed with [tbquant](https://pypi.org/project/tbquant/) by quantization-aware distillation "
            "from the full-precision model, following Liu et al., *Binary and Ternary Natural Language "
            "Generation* (ACL 2023). The weights are stored packed.",
            "",
            "| Setting | Value |",
            "| --- | --- |",
            *rows,
            "",
            "## Validation scores measured during compression",
            "",
            "| Figure | Value |",
            "| --- | --- |",
            *(score_rows or [_row("none", "no validation data")]),
            "",
            "## Usage",
            "",
            "```python",
            "import tbquant",
            "",
            'model, tokenizer = tbquant.load_quantized("path/to/this/model")',
            "```",
            "",
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n{body}"))


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

    readme = export_dir / "README.md"
    if readme.is_file():
        card = ModelCard.load(readme)
    else:
        card = ModelCard(f"---\n{ModelCardData(library_name='tbquant').to_yaml()}\n---\n")
    card.data.model_name = model_name
    card.data.eval_results = eval_results

    write_atomic(path, json.dumps(list(merged.values()), indent=2) + "\n")
    write_atomic(readme, str(card))
    return list(merged.values())
