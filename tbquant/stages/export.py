"""Export stage: write the packed model as a `save_pretrained`-style directory.

Everything is written into a hidden staging directory next to the output, flushed to disk and
renamed into place at the end (`tbquant.atomic`), so an interrupted export never leaves a
half-written model where a user would load it. An existing output is replaced only with
`overwrite`, and is deleted only after the new export is in place. The free disk space is
checked against the size of the weights before anything is written.
"""

from __future__ import annotations

import copy
import json
import csv
import dataclasses
import logging
import os
import shutil
from pathlib import Path

from safetensors import SafetensorError

from tbquant.atomic import check_free_space, fsync_tree, make_staging_directory, recover_interrupted, replace_directory
from tbquant.errors import ExportError, TbquantError
from tbquant.integrity import write_checksums
from tbquant.card_facts import public_name
from tbquant.model_card import render_model_card
from tbquant.nn.attention import ATTENTION_IMPLEMENTATION
from tbquant.nn.embedding import PackedEmbedding
from tbquant.nn.linear import PackedLinear
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.state import PipelineState
from tbquant.serialization import LOAD_GUARD, WEIGHTS_NAME, build_quantization_config, export_state_dict, save_weights, write_json

logger = logging.getLogger(__name__)

# Room for everything besides the weights: tokenizer files (about 3.5 MB for a 49k-token BPE
# vocabulary), config, model card and training log, with a wide margin.
OTHER_FILES_BYTES = 32 * 1024 * 1024


def check_output(output: Path, overwrite: bool) -> None:
    """Reject an output path that cannot receive an export, before any work is done.

    Raises:
        ExportError: if `output` is a file, a non-empty directory without `overwrite`, or its
            parent directory is not writable.
    """
    recover_interrupted(output)
    if output.exists() and not output.is_dir():
        raise ExportError(f"output {output} is a file: pass a directory path with --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ExportError(f"output directory {output} exists and is not empty: pass --overwrite to replace it, or choose another --output")
    parent = output.resolve().parent
    if not parent.exists():
        raise ExportError(f"parent directory {parent} of output {output} does not exist: create it first")
    if not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write to {parent}: choose an --output in a writable directory")


def _save_config(state: PipelineState, directory: Path, tied: dict[str, str]) -> None:
    config = copy.deepcopy(state.model.config)
    config.quantization_config = build_quantization_config(state.settings.quantization, state.task, state.conversion, tied)
    if getattr(config, "_attn_implementation", None) == ATTENTION_IMPLEMENTATION:
        config._attn_implementation = None
    config.save_pretrained(directory)

    # transformers drops `transformers_weights` when it saves a config, so it is added afterwards.
    config_path = directory / "config.json"
    fields = json.loads(config_path.read_text(encoding="utf-8"))
    fields["transformers_weights"] = LOAD_GUARD
    write_json(config_path, fields)


def _apply_umask(directory: Path) -> None:
    """Give the staging directory and its files the permissions of a normally created directory
    (`mkdtemp` makes it private)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


@register_stage
class ExportStage:
    """Write config, packed weights, tokenizer, generation config, model card and training log."""

    name = "export"
    main_process_only = True

    def run(self, state: PipelineState) -> None:
        model = state.model
        if not any(isinstance(module, (PackedLinear, PackedEmbedding)) for module in model.modules()):
            raise TbquantError("the export stage needs a packed model: run the pack stage before export")
        output = Path(state.settings.output)
        check_output(output, state.settings.overwrite)
        replacing = output.exists()

        tensors, tied = export_state_dict(model, state.settings.quantization.fp_dtype)
        needed = sum(tensor.numel() * tensor.element_size() for tensor in tensors.values()) + OTHER_FILES_BYTES
        check_free_space(output.resolve().parent, needed, f"the export to {output}", "free some space, or choose another --output")

        staging = make_staging_directory(output)
        try:
            weights_bytes = _write_export(state, staging, tensors, tied)
            fsync_tree(staging)
            replace_directory(staging, output)
        except (OSError, SafetensorError) as error:
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            unchanged_note = f"; {output} was left as it was" if replacing else ""
            raise ExportError(f"writing the export to {output} failed: {reason}{unchanged_note}") from None
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

        state.info["output"] = str(output)
        logger.info("Exported to %s (%.1f MB of weights)", output, weights_bytes / 1e6)


def _write_export(state: PipelineState, staging: Path, tensors: dict, tied: dict[str, str]) -> int:
    """Write every file of the export into `staging`; returns the size of the weights file."""
    model = state.model
    save_weights(tensors, staging / WEIGHTS_NAME)
    write_checksums(staging)
    _save_config(state, staging, tied)
    if state.tokenizer is not None:
        state.tokenizer.save_pretrained(staging)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and state.task.value != "encoder":
        generation_config.save_pretrained(staging)

    weights_bytes = (staging / WEIGHTS_NAME).stat().st_size
    state.info["export_weights_bytes"] = weights_bytes
    state.info["fp32_bytes"] = 4 * state.info.get("parameters", 0)
    write_json(
        staging / "training_log.json",
        {
            "settings": _settings_record(state),
            "metrics": state.metrics,
            # The data source may be a local path, and the log is published with the model.
            "info": {**state.info, "data": public_name(state.info.get("data"))},
            "history": state.history,
            "calibration": state.calibration,
        },
    )
    if state.history:
        _write_loss_curve(state.history, staging / "loss_history.csv")
    (staging / "README.md").write_text(render_model_card(staging, Path(state.settings.output).name), encoding="utf-8")
    _apply_umask(staging)
    return weights_bytes


def _write_loss_curve(history: list[dict], path: Path) -> None:
    """Write the training and validation records as one CSV row per record, for plotting."""
    columns = list(dict.fromkeys(key for record in history for key in record))
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(history)


def _settings_record(state: PipelineState) -> dict:
    settings = state.settings
    return {
        "model": public_name(settings.model),
        "quantization": settings.quantization.to_dict(),
        "distill": dataclasses.asdict(settings.distill),
        "data": public_name(state.info.get("data")),
    }
