"""Training checkpoints that `tbquant compress --resume` continues from.

A checkpoint is a directory `step-NNNNNN` inside the checkpoint directory:

- `student.safetensors`: every parameter and buffer of the fake-quantized student (latent fp32
  weights, learned activation scales);
- `training_state.pt`: optimizer and scheduler state and the random number generator states of
  every process, read back with `torch.load(weights_only=True)`, so loading runs no pickled code;
- `trainer_state.json`: the step, the data position, fault counters, the loss history and the
  fingerprint of the run's settings, which a resumed run must match.

Writing is atomic: the files go into a hidden temporary directory, each file and the directory
are fsynced, and the directory is renamed to its final name. A directory named `step-*` is
therefore always complete, and a kill during a save leaves only a hidden temporary directory,
which the next save removes.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from tbquant.errors import TbquantError

logger = logging.getLogger(__name__)

PREFIX = "step-"
STUDENT_FILE = "student.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAINER_STATE_FILE = "trainer_state.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:06d}"


def list_checkpoints(directory: Path) -> list[Path]:
    """Return the complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [path for path in directory.iterdir() if path.is_dir() and path.name.startswith(PREFIX) and path.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda path: int(path.name[len(PREFIX) :]))


def latest_checkpoint(directory: Path) -> Path | None:
    checkpoints = list_checkpoints(directory)
    return checkpoints[-1] if checkpoints else None


def check_checkpoint_dir(directory: Path, resume: bool, overwrite: bool) -> None:
    """Reject a run that would mix its checkpoints with another run's, before any work is done.

    Raises:
        TbquantError: with `resume` and no complete checkpoint in `directory`, or without `resume`
            and `overwrite` when `directory` already contains checkpoints.
    """
    latest = latest_checkpoint(directory)
    if resume and latest is None:
        raise TbquantError(f"--resume was given but {directory} contains no complete checkpoint: run without --resume to start")
    if not resume and latest is not None and not overwrite:
        raise TbquantError(
            f"checkpoint directory {directory} already contains checkpoints (latest: {latest.name}): "
            "pass --resume to continue that run, or --overwrite to delete them and start over"
        )


def remove_checkpoints(directory: Path) -> int:
    """Delete every checkpoint and leftover temporary directory in `directory`, and the directory
    itself when nothing else is left in it. Returns the number of checkpoints deleted."""
    found = list_checkpoints(directory)
    for path in found:
        shutil.rmtree(path)
    _remove_temporary(directory)
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    return len(found)


def _remove_temporary(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.glob(f".{PREFIX}*.tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


def capture_rng_state() -> dict[str, Any]:
    """Return the random number generator states of this process.

    NOTE: numpy's generator is not saved because tbquant does not draw from it.
    """
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


def _fsync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def save_checkpoint(
    directory: Path,
    step: int,
    student: torch.nn.Module,
    training_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write the checkpoint of `step` atomically and delete all but the latest `keep` checkpoints.

    Returns the checkpoint's path.
    """
    directory.mkdir(parents=True, exist_ok=True)
    _remove_temporary(directory)
    final = directory / checkpoint_name(step)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=directory))
    try:
        save_model(student, str(staging / STUDENT_FILE))
        torch.save(training_state, staging / TRAINING_STATE_FILE)
        (staging / TRAINER_STATE_FILE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        for path in staging.iterdir():
            _fsync_file(path)
        _fsync_directory(staging)
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        _fsync_directory(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)

    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return final


def read_trainer_state(path: Path) -> dict[str, Any]:
    """Return the trainer state (step, data position, fingerprint) of checkpoint `path`.

    Raises:
        TbquantError: if its trainer_state.json is missing or not valid JSON.
    """
    try:
        return json.loads((path / TRAINER_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise TbquantError(
            f"cannot read checkpoint {path}: {TRAINER_STATE_FILE} is missing or invalid ({type(error).__name__}): "
            "delete the checkpoint to resume from an earlier one, or pass another --checkpoint-dir to start over"
        ) from None


def load_checkpoint(path: Path, student: torch.nn.Module) -> dict[str, Any]:
    """Load the student's tensors from checkpoint `path` in place and return its training state
    (optimizer, scheduler, random states) without running pickled code.

    Raises:
        TbquantError: if the checkpoint's files are missing or do not fit the student.
    """
    try:
        missing, unexpected = load_model(student, str(path / STUDENT_FILE), strict=False)
        training_state = torch.load(path / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise TbquantError(f"cannot read checkpoint {path}: {first_line}") from None
    if missing or unexpected:
        raise TbquantError(
            f"checkpoint {path} does not fit the student (missing {len(missing)}, unexpected {len(unexpected)} tensors, "
            f"first: {(missing + unexpected)[0]}): resume with the settings the checkpoint was made with"
        )
    return training_state


def _flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_fingerprint(path: Path, saved: dict[str, Any], current: dict[str, Any]) -> None:
    """Raise if checkpoint `path` was made with other settings than this run, naming each difference.

    Raises:
        TbquantError: listing `name: checkpoint value, this run value` for every setting that differs.
    """
    saved_flat, current_flat = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    differences = [
        f"{key} is {saved_flat.get(key)!r} in the checkpoint and {current_flat.get(key)!r} now"
        for key in sorted(set(saved_flat) | set(current_flat))
        if saved_flat.get(key) != current_flat.get(key)
    ]
    if differences:
        raise TbquantError(
            f"checkpoint {path} comes from a different run: {'; '.join(differences)}. "
            "Resume with the same model and settings, or pass another --checkpoint-dir to start over"
        )
