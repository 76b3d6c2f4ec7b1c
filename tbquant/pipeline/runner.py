"""Running a pipeline: the default one, or the stages a recipe file names."""

from __future__ import annotations

import logging
import time
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tbquant.errors import TbquantError
from tbquant.pipeline.registry import get_stage
from tbquant.pipeline.settings import CompressSettings
from tbquant.pipeline.state import PipelineState
from tbquant.training.checkpoints import check_checkpoint_dir, remove_checkpoints
from tbquant.training.runtime import init_process_state

logger = logging.getLogger(__name__)


def _syntax_error(error: Exception) -> str:
    """Describe a YAML or TOML parse error in one line, with its location."""
    problem = getattr(error, "problem", None)
    mark = getattr(error, "problem_mark", None)
    if problem and mark is not None:
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return str(error).splitlines()[0]


def read_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML or TOML recipe: `stages` (a list of stage names) and `options` (compress options).

    Raises:
        TbquantError: if the file is missing, malformed, or has unknown keys.
    """
    if path.is_dir():
        raise TbquantError(f"recipe {path} is a directory: pass a .yaml, .yml or .toml file with --recipe")
    if not path.is_file():
        raise TbquantError(f"recipe file {path} not found: check the path given to --recipe")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TbquantError(f"recipe file {path} is not valid UTF-8 (byte {error.start}): save it as UTF-8") from None
    try:
        if path.suffix.lower() == ".toml":
            recipe = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            recipe = yaml.safe_load(text) or {}
        else:
            raise TbquantError(f"unsupported recipe file {path}: use a .yaml, .yml or .toml file")
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as error:
        raise TbquantError(f"invalid recipe file {path}: {_syntax_error(error)}") from None
    if not isinstance(recipe, dict):
        raise TbquantError(f"invalid recipe file {path}: expected a mapping with 'stages' and 'options'")
    unknown = set(recipe) - {"stages", "options"}
    if unknown:
        raise TbquantError(f"invalid recipe file {path}: unknown keys {', '.join(sorted(unknown))}; expected 'stages' and 'options'")
    stages = recipe.get("stages")
    if stages is not None and (not isinstance(stages, list) or not all(isinstance(name, str) for name in stages) or not stages):
        raise TbquantError(f"invalid recipe file {path}: 'stages' must be a non-empty list of stage names")
    options = recipe.get("options") or {}
    if not isinstance(options, dict):
        raise TbquantError(f"invalid recipe file {path}: 'options' must be a mapping of compress options")
    return {"stages": stages, "options": options}


def run_pipeline(settings: CompressSettings, stages: list[str] | tuple[str, ...] | None = None) -> PipelineState:
    """Run `stages` (default: load, calibrate, distill, pack, export) on a fresh state.

    Every stage name is resolved before the first one runs, so a typo fails at once. Under
    `accelerate launch` or `torchrun`, every process runs the pipeline; a stage class with
    `main_process_only = True` (pack and export) runs on the main process alone.
    """
    from tbquant.stages import DEFAULT_PIPELINE

    names = list(stages or DEFAULT_PIPELINE)
    stage_classes = [get_stage(name) for name in names]
    if "export" in names:
        from tbquant.stages.export import check_output

        check_output(Path(settings.output), settings.overwrite)
    runs_distillation = "distill" in names and settings.distill.steps > 0
    if runs_distillation:
        check_checkpoint_dir(settings.checkpoint_dir, settings.runtime.resume, settings.overwrite)

    process = init_process_state(settings.runtime)
    if runs_distillation and settings.runtime.resume:
        # After init_process_state, which sets up the process group whose size the checkpoint records.
        from tbquant.stages.distill import check_resume_settings

        check_resume_settings(settings)
    state = PipelineState(settings=settings)
    for name, stage_class in zip(names, stage_classes):
        if getattr(stage_class, "main_process_only", False) and not process.is_main_process:
            logger.debug("Stage %s runs on the main process only", name)
            continue
        started = time.perf_counter()
        logger.info("Stage %s", name)
        stage_class().run(state)
        state.info.setdefault("stage_seconds", {})[name] = time.perf_counter() - started
    # Under a launcher, the other processes wait for the main one to finish writing the export.
    process.wait_for_everyone()
    if "export" in names and "distill" in names and process.is_main_process:
        # A checkpoint can only continue the same run to the same number of steps, so after the
        # export is written it has no further use.
        removed = remove_checkpoints(settings.checkpoint_dir)
        if removed:
            logger.info("Removed %d checkpoint(s) in %s after the export", removed, settings.checkpoint_dir)
    return state
