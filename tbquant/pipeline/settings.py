"""Settings of one compression run: the options of `tbquant compress`, as a typed object."""

from __future__ import annotations

import dataclasses
import enum
from pathlib import Path

from tbquant.config import QuantizationConfig


class Task(str, enum.Enum):
    """Model family, detected from the checkpoint's config."""

    CAUSAL_LM = "causal-lm"
    SEQ2SEQ_LM = "seq2seq-lm"
    ENCODER = "encoder"


@dataclasses.dataclass
class DistillSettings:
    """Quantization-aware distillation hyperparameters.

    The loss is `logit_weight * soft cross-entropy(teacher, student)` (padding masked)
    `+ hidden_weight * sum of per-layer hidden-state MSE` (each divided by the teacher's mean
    square at that layer when `normalize_hidden`)
    `+ attention_weight * sum of per-layer attention-probability MSE`
    `+ label_weight * cross-entropy on the labels`.
    """

    steps: int = 200
    # Sequences per process and micro-batch. One optimizer step trains on
    # batch_size * processes * grad_accum sequences (the global batch).
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 128
    lr: float = 2.5e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    logit_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    label_weight: float = 0.0
    temperature: float = 1.0
    # Llama-family residual streams grow to norms in the thousands in the last layers. A plain MSE
    # is dominated by them and swamps the logit loss, so each layer's MSE is divided by the
    # teacher's mean square there. False gives the reference code's plain MSE.
    normalize_hidden: bool = True
    eval_every: int = 50
    eval_batches: int = 8
    calibration_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        positive = {"batch_size": self.batch_size, "grad_accum": self.grad_accum, "max_length": self.max_length}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value}: expected an integer of at least 1")
        non_negative = {
            "steps": self.steps,
            "eval_every": self.eval_every,
            "eval_batches": self.eval_batches,
            "calibration_batches": self.calibration_batches,
            "logit_weight": self.logit_weight,
            "hidden_weight": self.hidden_weight,
            "attention_weight": self.attention_weight,
            "label_weight": self.label_weight,
            "weight_decay": self.weight_decay,
        }
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value}: expected a value of at least 0")
        if not self.lr > 0:
            raise ValueError(f"invalid --lr {self.lr}: expected a positive learning rate")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"invalid --warmup-ratio {self.warmup_ratio}: expected a value in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"invalid --temperature {self.temperature}: expected a positive value")


DEVICES = ("auto", "cpu", "cuda")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TEACHER_DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass
class RuntimeSettings:
    """Execution options of the distillation: device, precision, memory, checkpoints and faults.

    None of them changes what the student learns, except the precision options, which change rounding.

    Args:
        device: `auto` (CUDA when available), `cpu` or `cuda`. Under `accelerate launch` or
            `torchrun`, each process takes the device of its local rank.
        mixed_precision: `no`, `bf16` or `fp16` autocast of the student's forward pass, or None
            for the value `accelerate launch` passes (its `--mixed_precision`), else `no`. The
            student keeps fp32 master weights either way.
        teacher_dtype: dtype the frozen teacher is stored and run in.
        gradient_checkpointing: recompute the student's layer activations in the backward pass.
        logit_chunk_size: positions per chunk of the soft cross-entropy, which is recomputed per
            chunk in the backward pass instead of keeping `[positions, vocabulary]` float32
            intermediates; 0 computes it in one piece.
        save_every: write a checkpoint every N optimizer steps (0: only when interrupted).
        keep_checkpoints: how many of the latest checkpoints to keep.
        checkpoint_dir: where checkpoints go; None means `<output>.checkpoints` beside the output.
        resume: continue from the latest complete checkpoint in `checkpoint_dir`.
        max_bad_steps: stop after this many steps in a row with a non-finite loss or gradient.
    """

    device: str = "auto"
    mixed_precision: str | None = None
    teacher_dtype: str = "float32"
    gradient_checkpointing: bool = False
    logit_chunk_size: int = 0
    save_every: int = 100
    keep_checkpoints: int = 2
    checkpoint_dir: Path | None = None
    resume: bool = False
    max_bad_steps: int = 10

    def __post_init__(self) -> None:
        choices = {
            "device": (self.device, DEVICES),
            "mixed_precision": (self.mixed_precision or "no", MIXED_PRECISIONS),
            "teacher_dtype": (self.teacher_dtype, TEACHER_DTYPES),
        }
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value!r}: expected one of {', '.join(allowed)}")
        non_negative = {"logit_chunk_size": self.logit_chunk_size, "save_every": self.save_every}
        for name, value in non_negative.items():
            if value < 0:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value}: expected an integer of at least 0")
        positive = {"keep_checkpoints": self.keep_checkpoints, "max_bad_steps": self.max_bad_steps}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"invalid --{name.replace('_', '-')} {value}: expected an integer of at least 1")


@dataclasses.dataclass
class CompressSettings:
    """Everything a compression run needs besides the model itself.

    Args:
        model: hub id, local `save_pretrained` directory, or `.gguf` file.
        output: export directory.
        data: training data (file or directory); None uses the corpus shipped with tbquant.
        eval_data: validation data; None holds out part of `data`.
        overwrite: replace a non-empty `output`.
        trust_remote_code: allow a checkpoint's own Python code to run (off by default).
        runtime: device, precision, memory, checkpoint and fault-handling options.
    """

    model: str
    output: Path
    quantization: QuantizationConfig = dataclasses.field(default_factory=QuantizationConfig)
    distill: DistillSettings = dataclasses.field(default_factory=DistillSettings)
    data: Path | None = None
    eval_data: Path | None = None
    overwrite: bool = False
    trust_remote_code: bool = False
    revision: str | None = None
    runtime: RuntimeSettings = dataclasses.field(default_factory=RuntimeSettings)

    @property
    def checkpoint_dir(self) -> Path:
        """The checkpoint directory: `runtime.checkpoint_dir`, or `<output>.checkpoints` beside the output."""
        if self.runtime.checkpoint_dir is not None:
            return Path(self.runtime.checkpoint_dir)
        output = Path(self.output)
        return output.with_name(f"{output.name}.checkpoints")
