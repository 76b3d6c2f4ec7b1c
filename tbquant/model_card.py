"""Model card (`README.md`) of an export, built with huggingface_hub's `ModelCard`.

The card names the base model by hub id, or by file or directory name for local checkpoints,
so no local path ends up in it.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

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
