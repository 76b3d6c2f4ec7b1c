"""Calibrate stage: turn the student into a fake-quantized model and initialise its activation
quantizers from real data.

The student's selected modules are replaced (`tbquant.nn.prepare_student`). Then a few batches
of training data run through it, and every activation quantizer records its input and passes
it through unchanged. Each quantizer then sets its signedness and, at 1 and 2 bits, its
initial scale from what it saw. Without this stage, learned quantizers refuse to run.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from accelerate import PartialState
from torch import nn

from tbquant.evaluation import evaluate, forward
from tbquant.nn.convert import prepare_student
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.state import PipelineState
from tbquant.quantizers.activation import ActivationQuantizer

logger = logging.getLogger(__name__)

# At most this many values per quantizer are kept for initialisation, sampled evenly.
_MAX_SAMPLES = 1 << 20


@contextmanager
def _observing(model: nn.Module):
    """Make every activation quantizer an identity that records its inputs."""
    quantizers = [module for module in model.modules() if isinstance(module, ActivationQuantizer)]
    samples: dict[ActivationQuantizer, list[torch.Tensor]] = {quantizer: [] for quantizer in quantizers}

    def record(quantizer: ActivationQuantizer, x: torch.Tensor) -> None:
        flat = x.detach().float().reshape(-1)
        step = max(1, flat.numel() // _MAX_SAMPLES)
        samples[quantizer].append(flat[::step].clone())

    for quantizer in quantizers:
        quantizer.observer = record
    try:
        yield samples
    finally:
        for quantizer in quantizers:
            quantizer.observer = None


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[dict[str, torch.Tensor]], task) -> list[dict]:
    """Initialise every activation quantizer of `model` from `batches`; return per-quantizer statistics.

    Raises:
        RuntimeError: if a quantizer saw no data (its module is never called by the model).
    """
    was_training = model.training
    model.eval()
    with _observing(model) as samples:
        for batch in batches:
            forward(model, batch, task, details=False)
    model.train(was_training)

    statistics = []
    for quantizer, chunks in samples.items():
        if not chunks:
            raise RuntimeError(f"activation quantizer {quantizer.name} received no input during calibration")
        values = torch.cat(chunks)
        quantizer.initialize_from(values)
        record = {
            "name": quantizer.name,
            "bits": quantizer.bits,
            "signed": bool(quantizer.signed),
            "min": values.min().item(),
            "max": values.max().item(),
            "mean_abs": values.abs().mean().item(),
        }
        if quantizer.learned:
            record["alpha"] = quantizer.alpha.item()
        statistics.append(record)
    return statistics


@register_stage
class CalibrateStage:
    """Replace the student's modules with fake-quantized ones and initialise activation scales."""

    name = "calibrate"

    def run(self, state: PipelineState) -> None:
        settings = state.settings
        state.conversion = prepare_student(state.model, settings.quantization)
        conversion = state.conversion
        logger.info(
            "Quantized %d linear layers and %d embeddings; %d attention modules quantize q/k/v and probabilities",
            len(conversion.linear),
            len(conversion.embeddings),
            len(conversion.attention),
        )
        if conversion.kept:
            logger.info("Kept full precision by pattern: %s", ", ".join(conversion.kept))
        if conversion.untied:
            logger.info("Untied the input embedding and the output head (only one of them is quantized)")

        # Every process calibrates on the same global batches (sequences per optimizer step), so the
        # initial scales do not depend on how processes and micro-batches share the work.
        batch_size = settings.distill.batch_size * PartialState().num_processes * settings.distill.grad_accum
        batches = state.train_data.batches(batch_size, limit=max(1, settings.distill.calibration_batches))
        state.calibration = calibrate(state.model, batches, state.task)
        tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
        if state.calibration:
            signed = sum(record["signed"] for record in state.calibration)
            logger.info(
                "Calibrated %d activation quantizers on %d tokens (%d signed, %d non-negative)",
                len(state.calibration),
                tokens,
                signed,
                len(state.calibration) - signed,
            )
            for record in state.calibration[:: max(1, len(state.calibration) // 8)]:
                logger.debug("calibration %s", record)

        if state.eval_data is not None and settings.distill.eval_batches > 0:
            eval_batches = state.eval_data.batches(batch_size, limit=settings.distill.eval_batches)
            teacher_metrics = evaluate(state.teacher, eval_batches, state.task)
            student_metrics = evaluate(state.model, eval_batches, state.task, state.teacher, settings.distill)
            for key, value in teacher_metrics.items():
                state.metrics[f"teacher_{key}"] = value
            for key, value in student_metrics.items():
                state.metrics[f"initial_{key}"] = value
            logger.info("Before distillation: teacher %s, quantized student %s", _format(teacher_metrics), _format(student_metrics))


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()) or "no metric"
