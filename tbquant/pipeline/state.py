"""The state object that pipeline stages read and update."""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from tbquant.nn.convert import ConversionReport
from tbquant.pipeline.settings import CompressSettings, Task


@dataclasses.dataclass
class PipelineState:
    """Everything that flows between stages.

    Attributes:
        settings: the run's options.
        model: the student: the loaded model, fake-quantized after calibrate, packed after pack.
        teacher: the frozen full-precision model.
        tokenizer: the checkpoint's tokenizer.
        task: causal LM, seq2seq LM or encoder.
        train_data, eval_data: `tbquant.data.TokenizedData` (eval_data may be None).
        conversion: what the calibrate stage replaced.
        metrics: figures for the summary and the model card, by name.
        history: one record per logged training step or validation.
        info: free-form facts about the run (data source, sizes, timings).
    """

    settings: CompressSettings
    model: nn.Module | None = None
    teacher: nn.Module | None = None
    tokenizer: Any = None
    task: Task | None = None
    train_data: Any = None
    eval_data: Any = None
    conversion: ConversionReport | None = None
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    calibration: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    info: dict[str, Any] = dataclasses.field(default_factory=dict)
