"""The `tbquant` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.logging import RichHandler
from rich.table import Table

from tbquant import __version__
from tbquant.cli import hub
from tbquant.cli._compat import ParameterSource
from tbquant.cli._errors import run_cli
from tbquant.cli._terminal import configure_progress_bars, is_terminal, make_console, set_help_width
from tbquant.config import ActivationQuantConfig, QuantizationConfig, WeightQuantConfig
from tbquant.errors import TbquantError
from tbquant.cli._runtime_options import (
    RUNTIME_OPTIONS,
    CheckpointDirOpt,
    DeviceOpt,
    GradientCheckpointingOpt,
    KeepCheckpointsOpt,
    LogitChunkSizeOpt,
    MaxBadStepsOpt,
    MixedPrecisionOpt,
    ResumeOpt,
    SaveEveryOpt,
    TeacherDtypeOpt,
    is_main_process,
    worker_log_level,
)
from tbquant.pipeline.settings import CompressSettings, DistillSettings, RuntimeSettings

app = typer.Typer(
    name="tbquant",
    help="Ternary and binary quantization of transformer language models by quantization-aware distillation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = make_console()
set_help_width()

VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs, and tracebacks of failures.")]


def _setup_logging(verbose: bool) -> None:
    level = worker_log_level() or (logging.DEBUG if verbose else logging.INFO)
    handler = RichHandler(console=make_console(stderr=True), show_path=False, show_time=True, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("tbquant").setLevel(level)
    if not verbose:
        import transformers

        transformers.logging.set_verbosity_error()
    configure_progress_bars(show=is_terminal(sys.stderr))


def _version_callback(value: bool) -> None:
    if value:
        console.print(f"tbquant {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version_callback, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Ternary and binary quantization of transformer language models."""


def _parse_acts(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise TbquantError(f"invalid --acts {value!r}: expected 8, 4, 2, 1 or none") from None


def _default_output(model: str, weights: str, acts: str) -> Path:
    name = Path(model.rstrip("/")).name.removesuffix(".gguf").removesuffix(".GGUF") or "model"
    return Path(f"{name}-{weights}-a{acts.lower()}")


# Options of `compress` that a recipe's `options` table may set, with their Python names.
_RECIPE_OPTIONS = {
    "weights", "acts", "packing", "center", "clip_gradient", "embeddings", "head", "keep", "fp_dtype", "scale_dtype",
    "quantize_attention", "data", "eval_data", "steps", "batch_size", "grad_accum", "max_length", "lr", "weight_decay",
    "warmup_ratio", "max_grad_norm", "seed", "eval_every", "eval_batches", "calibration_batches", "logit_weight",
    "hidden_weight", "attention_weight", "label_weight", "temperature", "normalize_hidden", "output", "overwrite",
    *RUNTIME_OPTIONS,
}


def _apply_recipe(ctx: typer.Context, options: dict, recipe_options: dict) -> None:
    """Fill options the user did not give on the command line from the recipe's `options`."""
    for key, value in recipe_options.items():
        name = key.replace("-", "_")
        if name not in _RECIPE_OPTIONS:
            raise TbquantError(f"unknown recipe option {key!r}: use the name of a tbquant compress option, such as steps or weights")
        if ctx.get_parameter_source(name) in (ParameterSource.DEFAULT, None):
            options[name] = value


# Config errors name values the way the library does; the CLI names the option instead.
_CONFIG_PHRASES = {
    "weight scheme": "--weights",
    "activation bits": "--acts",
    "packing": "--packing",
    "embedding policy": "--embeddings",
    "head policy": "--head",
    "full-precision dtype": "--fp-dtype",
    "scale dtype": "--scale-dtype",
    "module pattern": "--keep",
}


def build_settings(model: str, options: dict) -> CompressSettings:
    """Turn compress options into validated settings.

    Raises:
        TbquantError: naming the first invalid value.
    """
    try:
        acts = options["acts"]
        bits = _parse_acts(str(acts))
        quantization = QuantizationConfig(
            weights=WeightQuantConfig(
                scheme=options["weights"],
                center=options["center"],
                clip_gradient=options["clip_gradient"],
                packing=options["packing"],
                scale_dtype=options["scale_dtype"],
            ),
            activations=ActivationQuantConfig(bits=bits, attention=options["quantize_attention"]),
            embeddings=options["embeddings"],
            head=options["head"],
            keep_full_precision=list(options["keep"] or []),
            fp_dtype=options["fp_dtype"],
        )
        runtime = RuntimeSettings(**{name: options[name] for name in RUNTIME_OPTIONS})
        distill = DistillSettings(
            **{name: options[name] for name in (
                "steps", "batch_size", "grad_accum", "max_length", "lr", "weight_decay", "warmup_ratio", "max_grad_norm",
                "logit_weight", "hidden_weight", "attention_weight", "label_weight", "temperature", "normalize_hidden", "eval_every",
                "eval_batches", "calibration_batches", "seed",
            )}
        )
    except (ValueError, TypeError) as error:
        message = str(error)
        for phrase, option in _CONFIG_PHRASES.items():
            message = message.replace(f"invalid {phrase} ", f"invalid {option} ")
        raise TbquantError(message) from None
    output = Path(options["output"]) if options["output"] else _default_output(model, quantization.weights.scheme.value, str(acts))
    return CompressSettings(
        model=model,
        output=output,
        quantization=quantization,
        distill=distill,
        data=Path(options["data"]) if options["data"] else None,
        eval_data=Path(options["eval_data"]) if options["eval_data"] else None,
        overwrite=options["overwrite"],
        trust_remote_code=options["trust_remote_code"],
        revision=options["revision"],
        runtime=runtime,
    )


def _print_summary(state) -> None:
    metrics, info = state.metrics, state.info
    table = Table(title="tbquant compress: before and after", show_header=True, header_style="bold")
    table.add_column("")
    table.add_column("value", justify="right")
    labels = [
        ("teacher_perplexity", "teacher perplexity (validation)"),
        ("initial_perplexity", "quantized, before distillation"),
        ("final_perplexity", "quantized, after distillation"),
        ("initial_distill_loss", "distillation loss before"),
        ("final_distill_loss", "distillation loss after"),
    ]
    for key, label in labels:
        if key in metrics:
            table.add_row(label, f"{metrics[key]:.4g}")
    if "bits_per_weight" in info:
        table.add_row("bits per quantized weight", f"{info['bits_per_weight']:.3f}")
    if "export_weights_bytes" in info:
        table.add_row("weights file", f"{info['export_weights_bytes'] / 1e6:.1f} MB")
        table.add_row("fp32 checkpoint", f"{info['fp32_bytes'] / 1e6:.1f} MB")
        table.add_row("compression vs fp32", f"{info['fp32_bytes'] / info['export_weights_bytes']:.1f}x")
    if "distill_seconds_per_step" in info:
        table.add_row("seconds per distillation step", f"{info['distill_seconds_per_step']:.2f}")
    if "output" in info:
        table.add_row("export", info["output"])
    console.print(table)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  tbquant compress facebook/bart-base --weights ternary --acts 8\n\n"
        "  tbquant compress ./SmolLM2-135M-Instruct.Q4_1.gguf --weights binary --acts 8 --steps 300 -o smollm2-binary\n\n"
        "  tbquant compress ./my-model --data corpus.txt --acts none --steps 0   (post-training quantization only)"
    )
)
def compress(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Hub id, local save_pretrained directory, or .gguf file.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Export directory \\[default: MODEL-WEIGHTS-aACTS].")] = None,
    weights: Annotated[str, typer.Option(help="Weight quantizer: ternary, binary, or the baselines twn, bwn, absmean.")] = "ternary",
    acts: Annotated[str, typer.Option(help="Activation bits: 8, 4, 2, 1 or none.")] = "8",
    packing: Annotated[str, typer.Option(help="Ternary packing: compact (1.6 bits per weight) or dense (2 bits).")] = "compact",
    center: Annotated[bool, typer.Option("--center/--no-center", help="Subtract each row's mean before quantizing (stored as an offset).")] = False,
    clip_gradient: Annotated[bool, typer.Option("--clip-gradient/--no-clip-gradient", help="Zero the weight gradient where |W - mu| >= scale.")] = False,
    embeddings: Annotated[str, typer.Option(help="Token embedding: keep (full precision) or quantize.")] = "keep",
    head: Annotated[str, typer.Option(help="Output head: keep (full precision) or quantize.")] = "keep",
    keep: Annotated[Optional[list[str]], typer.Option(help="Regular expression; matching modules stay full precision. Repeatable.")] = None,
    quantize_attention: Annotated[bool, typer.Option("--quantize-attention/--no-quantize-attention", help="Quantize q, k, v and attention probabilities too.")] = True,
    fp_dtype: Annotated[str, typer.Option(help="Storage dtype of full-precision tensors: float16, bfloat16 or float32.")] = "float16",
    scale_dtype: Annotated[str, typer.Option(help="Storage dtype of per-row weight scales: float16, bfloat16 or float32.")] = "float16",
    data: Annotated[Optional[Path], typer.Option(help="Training data: .txt, .jsonl, .csv or a directory \\[default: shipped Austen corpus].")] = None,
    eval_data: Annotated[Optional[Path], typer.Option(help="Validation data \\[default: 5% held out from --data].")] = None,
    steps: Annotated[int, typer.Option(help="Distillation steps (optimizer updates); 0 skips distillation.")] = 200,
    batch_size: Annotated[int, typer.Option(help="Sequences per micro-batch.")] = 4,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per optimizer step.")] = 1,
    max_length: Annotated[int, typer.Option(help="Tokens per training sequence.")] = 128,
    lr: Annotated[float, typer.Option(help="Peak learning rate of AdamW.")] = 2.5e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.0,
    warmup_ratio: Annotated[float, typer.Option(help="Fraction of the steps spent in linear warm-up.")] = 0.05,
    max_grad_norm: Annotated[float, typer.Option(help="Gradient clipping norm.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Random seed for data order and initialisation.")] = 0,
    eval_every: Annotated[int, typer.Option(help="Validate every N steps (0: only at the end).")] = 50,
    eval_batches: Annotated[int, typer.Option(help="Validation batches per evaluation (0: no validation).")] = 8,
    calibration_batches: Annotated[int, typer.Option(help="Batches used to initialise activation scales.")] = 4,
    logit_weight: Annotated[float, typer.Option(help="Weight of the soft cross-entropy between teacher and student logits.")] = 1.0,
    hidden_weight: Annotated[float, typer.Option(help="Weight of the hidden-state MSE summed over layers.")] = 1.0,
    attention_weight: Annotated[float, typer.Option(help="Weight of the attention-probability MSE summed over layers.")] = 1.0,
    label_weight: Annotated[float, typer.Option(help="Weight of the cross-entropy on the labels.")] = 0.0,
    temperature: Annotated[float, typer.Option(help="Softmax temperature of the logit distillation.")] = 1.0,
    normalize_hidden: Annotated[bool, typer.Option("--normalize-hidden/--no-normalize-hidden", help="Divide each layer's hidden-state MSE by the teacher's mean square.")] = True,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML or TOML file with 'stages' and 'options' for a custom pipeline.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --output directory.")] = False,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the checkpoint's own Python code to run.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit).")] = None,
    device: DeviceOpt = "auto",
    mixed_precision: MixedPrecisionOpt = None,
    teacher_dtype: TeacherDtypeOpt = "float32",
    gradient_checkpointing: GradientCheckpointingOpt = False,
    logit_chunk_size: LogitChunkSizeOpt = 0,
    save_every: SaveEveryOpt = 100,
    keep_checkpoints: KeepCheckpointsOpt = 2,
    checkpoint_dir: CheckpointDirOpt = None,
    resume: ResumeOpt = False,
    max_bad_steps: MaxBadStepsOpt = 10,
    verbose: VerboseOpt = False,
) -> None:
    """Quantize a model to ternary or binary weights, distill it from the original, and export it packed."""
    _setup_logging(verbose)
    options = dict(ctx.params)
    stages = None
    if recipe is not None:
        from tbquant.pipeline.runner import read_recipe

        parsed = read_recipe(recipe)
        stages = parsed["stages"]
        _apply_recipe(ctx, options, parsed["options"])
    settings = build_settings(model, options)

    from tbquant.pipeline.runner import run_pipeline

    state = run_pipeline(settings, stages)
    if is_main_process():
        _print_summary(state)


@app.command("stages")
def list_stages() -> None:
    """List the registered pipeline stages, built-in and from plugins."""
    from tbquant.pipeline.registry import available_stages

    table = Table(show_header=True, header_style="bold")
    table.add_column("stage")
    table.add_column("class")
    table.add_column("description")
    for name, cls in available_stages().items():
        table.add_row(name, f"{cls.__module__}.{cls.__qualname__}", (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
    console.print(table)


# Modules under tbquant/cli register their commands on `app` when imported.
from tbquant.cli import generate, inspect  # noqa: F401
from tbquant.cli.eval import EPILOG as _EVAL_EPILOG, eval_command  # noqa: E402

app.command("eval", epilog=_EVAL_EPILOG)(eval_command)
app.command("push-to-hub", epilog=hub.EXAMPLES)(hub.push_to_hub)


def main() -> None:
    raise SystemExit(run_cli(app))


if __name__ == "__main__":
    main()
