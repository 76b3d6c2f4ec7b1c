"""Distill stage: quantization-aware distillation of the student from the frozen teacher.

Recipe (Liu et al., ACL 2023, section 4): AdamW without weight decay, linear schedule with 5%
warm-up, learning rate 2.5e-4 to 5e-4, student initialised from the teacher's weights. The loss
is in `tbquant.losses`.
"""

from __future__ import annotations

import logging
import time

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from tbquant.errors import TbquantError
from tbquant.evaluation import evaluate, forward
from tbquant.losses import distillation_loss
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.state import PipelineState
from tbquant.quantizers.activation import ActivationQuantizer

logger = logging.getLogger(__name__)


def check_calibrated(model: torch.nn.Module) -> None:
    """Raise if a learned activation scale was never initialised."""
    missing = [
        module.name
        for module in model.modules()
        if isinstance(module, ActivationQuantizer) and module.learned and not bool(module.initialized)
    ]
    if missing:
        raise TbquantError(
            f"{len(missing)} activation scales are not initialised (first: {missing[0]}): "
            "run the calibrate stage before distill"
        )


@register_stage
class DistillStage:
    """Train the fake-quantized student to match the full-precision teacher."""

    name = "distill"

    def run(self, state: PipelineState) -> None:
        settings = state.settings.distill
        if state.conversion is None:
            raise TbquantError("the distill stage needs a quantized student: run the calibrate stage before distill")
        check_calibrated(state.model)
        if settings.steps == 0:
            logger.info("Distillation skipped (--steps 0): the export is plain post-training quantization")
            return

        torch.manual_seed(settings.seed)
        student, teacher, task = state.model, state.teacher, state.task
        details = settings.hidden_weight > 0 or settings.attention_weight > 0
        parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=settings.lr, weight_decay=settings.weight_decay)
        scheduler = get_linear_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.steps), settings.steps)
        batches = state.train_data.shuffled_batches(settings.batch_size, settings.seed)
        eval_batches = (
            state.eval_data.batches(settings.batch_size, limit=settings.eval_batches)
            if state.eval_data is not None and settings.eval_batches > 0
            else []
        )

        student.train()
        started = time.perf_counter()
        tokens_seen = 0
        with Progress(
            TextColumn("[bold]distill"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} tok/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=False,
        ) as progress:
            bar = progress.add_task("distill", total=settings.steps, loss="-", speed="-")
            for step in range(1, settings.steps + 1):
                parts_sum: dict[str, float] = {}
                for _ in range(settings.grad_accum):
                    batch = next(batches)
                    with torch.no_grad():
                        teacher_outputs = forward(teacher, batch, task, details, labels=False)
                    student_outputs = forward(student, batch, task, details, labels=settings.label_weight > 0)
                    terms = distillation_loss(student_outputs, teacher_outputs, batch, task, settings)
                    (terms.total / settings.grad_accum).backward()
                    tokens_seen += int(batch["attention_mask"].sum())
                    for key, value in terms.parts.items():
                        parts_sum[key] = parts_sum.get(key, 0.0) + value / settings.grad_accum

                grad_norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)

                elapsed = time.perf_counter() - started
                record = {"step": step, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm), "elapsed_s": elapsed}
                record.update({f"loss_{key}": value for key, value in parts_sum.items()})
                state.history.append(record)
                progress.update(bar, advance=1, loss=f"{parts_sum['total']:.4f}", speed=f"{tokens_seen / elapsed:.0f}")

                if eval_batches and settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
                    metrics = evaluate(student, eval_batches, task, teacher, settings)
                    state.history.append({"step": step, **{f"eval_{key}": value for key, value in metrics.items()}})
                    progress.console.log(f"step {step}: " + ", ".join(f"validation {key} {value:.4g}" for key, value in metrics.items()))

        elapsed = time.perf_counter() - started
        state.info["distill_seconds"] = elapsed
        state.info["distill_seconds_per_step"] = elapsed / settings.steps
        state.info["distill_tokens_per_second"] = tokens_seen / elapsed
        final = [record for record in state.history if "eval_distill_loss" in record]
        if final:
            for key, value in final[-1].items():
                if key != "step":
                    state.metrics[key.replace("eval_", "final_")] = value
        logger.info("Distilled for %d steps in %.0f s (%.2f s per step)", settings.steps, elapsed, elapsed / settings.steps)
        student.eval()
