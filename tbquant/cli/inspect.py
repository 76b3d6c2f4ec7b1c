"""`tbquant inspect`: size figures and settings of an export, without loading the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tbquant.cli.main import VerboseOpt, _setup_logging, app, console

EXAMPLES = (
    "Examples:\n\n"
    "  tbquant inspect smollm2-ternary-a8\n\n"
    "  tbquant inspect smollm2-ternary-a8 --json > figures.json\n\n"
    "  tbquant inspect smollm2-ternary-a8 --no-verify   (skip the SHA-256 check of the weights)"
)

CHECKSUM_TEXT = {
    "verified": "weights match checksums.sha256",
    "skipped": "not checked (--no-verify)",
    "missing": "none: the export has no checksums.sha256",
}


def _size(count: int) -> str:
    """Format a byte count with a decimal unit (kB, MB, GB), as file managers show sizes."""
    for unit, factor in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= factor:
            return f"{count / factor:.2f} {unit}"
    return f"{count} B"


def _number(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.{digits}f}{suffix}"


def _figures_row(label: str, figures: dict) -> list[str]:
    return [
        label,
        f"{figures['parameters']:,}",
        f"{figures['quantized_parameters']:,}",
        _number(figures["bits_per_weight"], 3),
        _size(figures["bytes"]),
        _number(figures["compression_vs_fp32"], 1, "x"),
        _number(figures["compression_vs_fp16"], 1, "x"),
    ]


def render(report: dict) -> None:
    """Print the figures of `inspect_export` as a table per group and a settings summary."""
    table = Table(title=f"tbquant export {report['path']}", header_style="bold")
    for column in ("group", "parameters", "quantized", "bits/weight", "bytes", "vs fp32", "vs fp16"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for name, figures in report["groups"].items():
        table.add_row(*_figures_row(name, figures))
    table.add_row("safetensors header", "", "", "", _size(report["header_bytes"]), "", "")
    table.add_section()
    table.add_row(*_figures_row("total (model.safetensors)", report["total"]), style="bold")
    table.add_row(*_figures_row(f"quantized layers ({report['quantized']['modules']})", report["quantized"]))
    console.print(table)

    weights, activations = report["weights"], report["activations"]
    centered = ", centered (per-row offsets)" if weights.get("center") else ""
    if activations["bits"] is None:
        activation_text = "full precision"
    else:
        attention = ", also q, k, v and attention probabilities" if activations["attention"] else ", linear-layer inputs only"
        activation_text = f"{activations['bits']}-bit, {activations['scales']} scales{attention}"
    full_precision = report["full_precision_modules"]
    listed_modules = ", ".join(full_precision[:6]) + (f" and {len(full_precision) - 6} more" if len(full_precision) > 6 else "")
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold")
    summary.add_column()
    summary.add_row("base model", report["base_model"] or "unknown (no training_log.json)")
    summary.add_row("architecture", f"{report['architecture']} ({report['task']})")
    summary.add_row("weights", f"{weights.get('scheme')}, {weights.get('layout')} layout, {weights.get('scale_dtype')} scales{centered}")
    summary.add_row("activations", activation_text)
    summary.add_row("full precision", f"{listed_modules or 'none'} (stored as {report['fp_dtype']})")
    if report["tied"]:
        summary.add_row("tied", ", ".join(f"{alias} -> {source}" for alias, source in report["tied"].items()))
    summary.add_row("export files", _size(sum(report["files"].values())) + f" in {len(report['files'])} files")
    summary.add_row("checksums", CHECKSUM_TEXT[report["checksums"]])
    console.print(summary)


@app.command("inspect", epilog=EXAMPLES)
def inspect_command(
    directory: Annotated[Path, typer.Argument(help="Export directory written by tbquant compress.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON instead of tables.")] = False,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="Check the weight files against the export's checksums.sha256 first.")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Show parameters, bits per weight, bytes on disk and compression ratios of an export, per module group.

    The weight files are first checked against the export's checksums.sha256, as loading does.
    """
    _setup_logging(verbose)
    from tbquant.inspection import inspect_export

    report = inspect_export(directory, verify=verify)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        render(report)
