"""Options of `tbquant compress` for devices, processes, precision, memory, checkpoints and faults."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

# Python names of these options, which are also the fields of `RuntimeSettings`.
RUNTIME_OPTIONS = (
    "device",
    "mixed_precision",
    "teacher_dtype",
    "gradient_checkpointing",
    "logit_chunk_size",
    "save_every",
    "keep_checkpoints",
    "checkpoint_dir",
    "resume",
    "max_bad_steps",
)

DeviceOpt = Annotated[str, typer.Option(help="Device: auto (CUDA when available), cpu or cuda.")]
MixedPrecisionOpt = Annotated[
    Optional[str],
    typer.Option(help="Autocast of the student: no, bf16 or fp16 \\[default: accelerate launch's --mixed_precision, else no]."),
]
TeacherDtypeOpt = Annotated[str, typer.Option(help="Dtype of the frozen teacher: float32, bfloat16 or float16.")]
GradientCheckpointingOpt = Annotated[
    bool, typer.Option("--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute the student's activations in the backward pass to save memory.")
]
LogitChunkSizeOpt = Annotated[int, typer.Option(help="Token positions per chunk of the logit loss, to save memory (0: one chunk).")]
SaveEveryOpt = Annotated[int, typer.Option(help="Write a checkpoint every N steps and at the last step (0: only on Ctrl-C or SIGTERM).")]
KeepCheckpointsOpt = Annotated[int, typer.Option(help="Number of latest checkpoints to keep.")]
CheckpointDirOpt = Annotated[Optional[Path], typer.Option(help="Checkpoint directory \\[default: OUTPUT.checkpoints beside the output].")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the latest complete checkpoint in the checkpoint directory.")]
MaxBadStepsOpt = Annotated[int, typer.Option(help="Stop after this many steps in a row with a non-finite loss or gradient.")]


def process_rank() -> int:
    """Return this process's global rank as set by `accelerate launch` or `torchrun` (0 without them)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    return process_rank() == 0


def worker_log_level() -> int | None:
    """Return WARNING for processes other than the main one, which alone logs progress; None for the main one."""
    return logging.WARNING if not is_main_process() else None
