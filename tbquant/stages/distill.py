"""Distill stage: quantization-aware distillation of the student from the frozen teacher.

Recipe (Liu et al., ACL 2023, section 4): AdamW without weight decay, linear schedule with 5%
warm-up, learning rate 2.5e-4 to 5e-4, student initialised from the teacher's weights. The loss
is in `tbquant.losses`.

The loop runs on Hugging Face accelerate, in one process or in several started by `accelerate
launch` or `torchrun`:

- data: every micro-batch is a global batch of `batch_size * processes` sequences drawn in a
  seeded order; process `r` trains on its `r`-th slice. The order depends only on the seed and
  the global batch, so one process with `--batch-size 4` trains on the same data per step as
  two with `--batch-size 2`.
- the student is prepared by accelerate (DDP wrapping, or FSDP and DeepSpeed from an accelerate
  config); gradients are averaged over processes at the last micro-batch of each step. The
  teacher is frozen, so it is only moved to the device, never wrapped.
- learned activation scales are parameters of the student. DDP broadcasts rank 0's parameters
  and buffers when it wraps the student and averages their gradients, so every rank holds the
  same scales; the stage checks this at the end by comparing a hash of the student on all ranks.
- the main process alone logs, shows progress and writes checkpoints; the others wait for it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate.utils import gather_object
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from transformers import get_linear_schedule_with_warmup

from tbquant.errors import TbquantError
from tbquant.evaluation import evaluate, forward, to_device
from tbquant.losses import distillation_loss
from tbquant.pipeline.registry import register_stage
from tbquant.pipeline.settings import CompressSettings
from tbquant.pipeline.state import PipelineState
from tbquant.quantizers.activation import ActivationQuantizer
from tbquant.training import checkpoints
from tbquant.training.faults import ScaleMonitor, TrainingError, is_finite
from tbquant.training.runtime import REPLICATED_TYPES, TORCH_DTYPES, build_accelerator

logger = logging.getLogger(__name__)

# Distillation settings that do not change what the student learns, so a resumed run may change them.
_RESUMABLE_SETTINGS = ("eval_every", "eval_batches")


def settings_fingerprint(settings: CompressSettings) -> dict:
    """Return the part of a run's checkpoint fingerprint that follows from its settings alone:
    quantization, distillation settings (except `_RESUMABLE_SETTINGS`) and number of processes.

    `check_resume_settings` compares it with a checkpoint before any model is loaded.
    """
    distill = {key: value for key, value in vars(settings.distill).items() if key not in _RESUMABLE_SETTINGS}
    return {
        "quantization": settings.quantization.to_dict(),
        "distill": distill,
        "processes": int(torch.distributed.get_world_size()) if dist.is_available() and dist.is_initialized() else 1,
    }


def check_resume_settings(settings: CompressSettings) -> None:
    """Reject a `--resume` whose latest checkpoint was made with other settings, before the model loads.

    Only the settings are compared here. The distill stage compares the whole fingerprint,
    including the model and the number of training sequences, once they are loaded.

    Raises:
        TbquantError: as `checkpoints.check_fingerprint`, naming each setting that differs.
    """
    path = checkpoints.latest_checkpoint(settings.checkpoint_dir)
    if path is None:
        return
    current = settings_fingerprint(settings)
    saved = checkpoints.read_trainer_state(path)["fingerprint"]
    checkpoints.check_fingerprint(path, {key: saved.get(key) for key in current}, current)


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


def state_hash(model: torch.nn.Module) -> str:
    """Return the SHA-256 of every parameter and buffer of `model`, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class InterruptRequest:
    """Turn the first SIGINT or SIGTERM into a request to checkpoint and stop after the current
    step; a second SIGINT interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def _handle(self, number: int, frame) -> None:
        if self.requested and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: saving a checkpoint after this step, then stopping", signal.Signals(number).name)

    def __enter__(self) -> InterruptRequest:
        with contextlib.suppress(ValueError):  # signal handlers can only be set in the main thread
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


class DistillationRun:
    """One distillation run: the prepared student, teacher, optimizer, data position and counters."""

    def __init__(self, state: PipelineState) -> None:
        self.state = state
        self.settings = state.settings.distill
        self.runtime = state.settings.runtime
        self.task = state.task
        self.details = self.settings.hidden_weight > 0 or self.settings.attention_weight > 0
        self.checkpoint_dir = state.settings.checkpoint_dir
        self.fingerprint = self._fingerprint()

        self.accelerator = accelerator = build_accelerator(self.runtime)
        self.rank, self.processes = accelerator.process_index, accelerator.num_processes
        global_batch = self.settings.batch_size * self.processes
        if self.processes > 1 and len(state.train_data) < global_batch:
            raise TbquantError(
                f"the training data has {len(state.train_data)} sequences, fewer than one global batch of {global_batch} "
                f"(--batch-size {self.settings.batch_size} x {self.processes} processes): pass more data or a smaller --batch-size"
            )

        torch.manual_seed(self.settings.seed)
        student = state.model.to(accelerator.device)
        if self.runtime.gradient_checkpointing:
            _set_activation_checkpointing(student, True)
        self.teacher = state.teacher.to(accelerator.device, dtype=TORCH_DTYPES[self.runtime.teacher_dtype])
        self.parameters = [parameter for parameter in student.parameters() if parameter.requires_grad]
        optimizer = torch.optim.AdamW(self.parameters, lr=self.settings.lr, weight_decay=self.settings.weight_decay)
        self.scheduler = get_linear_schedule_with_warmup(
            optimizer, int(self.settings.warmup_ratio * self.settings.steps), self.settings.steps
        )

        self.step = 0
        self.tokens_seen = 0
        self.bad_steps_in_row = 0
        self.bad_steps = 0
        self.last_checkpoint: Path | None = None
        if self.runtime.resume:
            self._resume(student, optimizer)
        elif accelerator.is_main_process and checkpoints.list_checkpoints(self.checkpoint_dir):
            # check_checkpoint_dir allowed this only with --overwrite.
            checkpoints.remove_checkpoints(self.checkpoint_dir)

        self.replicated = accelerator.distributed_type in REPLICATED_TYPES
        # FSDP and DeepSpeed shard the student in place, so the main process keeps an unsharded
        # copy on the CPU that receives the trained tensors for pack and export.
        # NOTE: this path is untested here: accelerate runs FSDP only on GPUs, and none was available.
        self.export_copy = copy.deepcopy(student).to("cpu") if not self.replicated and accelerator.is_main_process else None

        # The scheduler is stepped here once per optimizer step, so it is not handed to accelerate,
        # whose prepared scheduler steps once per process.
        self.student, self.optimizer = accelerator.prepare(student, optimizer)
        self.batches = self._local_batches(skip=self.step * self.settings.grad_accum)
        self.monitor = ScaleMonitor(accelerator.unwrap_model(self.student))

    def _fingerprint(self) -> dict:
        """Return what a checkpoint must share with this run to be resumed by it."""
        state = self.state
        first_weight = next(iter(state.teacher.state_dict().values())).detach().float().cpu().contiguous()
        return {
            "model": {
                "architecture": state.info.get("architecture"),
                "parameters": state.info.get("parameters"),
                "first_tensor_sha256": hashlib.sha256(first_weight.numpy().tobytes()).hexdigest(),
            },
            **settings_fingerprint(state.settings),
            "train_sequences": len(state.train_data),
        }

    def _resume(self, student: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
        path = checkpoints.latest_checkpoint(self.checkpoint_dir)
        if path is None:
            raise TbquantError(f"--resume was given but {self.checkpoint_dir} contains no complete checkpoint: run without --resume to start")
        trainer_state = checkpoints.read_trainer_state(path)
        checkpoints.check_fingerprint(path, trainer_state["fingerprint"], self.fingerprint)
        training_state = checkpoints.load_checkpoint(path, student)

        optimizer.load_state_dict(training_state["optimizer"])
        self.scheduler.load_state_dict(training_state["scheduler"])
        checkpoints.restore_rng_state(training_state["rng"][self.rank])
        self.step = trainer_state["step"]
        self.tokens_seen = trainer_state["tokens_seen"]
        self.bad_steps = trainer_state["bad_steps"]
        self.bad_steps_in_row = trainer_state["bad_steps_in_row"]
        self.state.history[:] = trainer_state["history"]
        self.last_checkpoint = path
        logger.info("Resuming from %s (step %d of %d)", path, self.step, self.settings.steps)

    def _local_batches(self, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Yield this process's slice of each global micro-batch, after skipping `skip` of them."""
        data, size = self.state.train_data, self.settings.batch_size
        stream = data.shuffled_indices(size * self.processes, self.settings.seed)
        for _ in range(skip):
            next(stream)
        for indices in stream:
            local = indices[self.rank * size : (self.rank + 1) * size]
            yield to_device(data.collate([data.items[index] for index in local]), self.accelerator.device)

    def train_step(self) -> dict:
        """Run one optimizer step over `grad_accum` micro-batches and return its history record.

        A step whose loss or gradient is not finite on any process leaves the student unchanged.
        """
        settings, accelerator = self.settings, self.accelerator
        parts_sum: dict[str, float] = {}
        finite_loss = True
        for micro in range(settings.grad_accum):
            batch = next(self.batches)
            last = micro == settings.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(self.student):
                with torch.no_grad():
                    teacher_outputs = forward(self.teacher, batch, self.task, self.details, labels=False)
                student_outputs = forward(self.student, batch, self.task, self.details, labels=settings.label_weight > 0)
                terms = distillation_loss(student_outputs, teacher_outputs, batch, self.task, settings, self.runtime.logit_chunk_size)
                accelerator.backward(terms.total / settings.grad_accum)
            finite_loss = finite_loss and is_finite(terms.parts["total"])
            self.tokens_seen += int(batch["attention_mask"].sum()) * self.processes
            for key, value in terms.parts.items():
                parts_sum[key] = parts_sum.get(key, 0.0) + value / settings.grad_accum

        grad_norm = accelerator.clip_grad_norm_(self.parameters, settings.max_grad_norm)
        finite_loss = self._all_processes(finite_loss)
        bad = not (finite_loss and is_finite(grad_norm))
        if bad and finite_loss and accelerator.scaler is not None:
            # fp16: the gradient scaler skips the update on overflow and lowers its scale, which is
            # routine, not a fault.
            bad = False
        if not bad:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1

        record = {"step": self.step, "lr": self.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
        record.update({f"loss_{key}": value for key, value in self._mean_over_processes(parts_sum).items()})
        if bad:
            self._count_bad_step(record)
        else:
            self.bad_steps_in_row = 0
        faults = self.monitor.check(self.step)
        if faults:
            self.state.info.setdefault("activation_scale_faults", []).extend(faults)
        return record

    def _mean_over_processes(self, values: dict[str, float]) -> dict[str, float]:
        """Return the mean of each value over the processes, so that the history describes the global batch."""
        if self.processes == 1:
            return values
        tensor = torch.tensor(list(values.values()), dtype=torch.float64, device=self.accelerator.device)
        dist.all_reduce(tensor)
        return dict(zip(values, (tensor / self.processes).tolist()))

    def _all_processes(self, flag: bool) -> bool:
        """Return whether `flag` holds on every process (one all-reduce when there are several)."""
        if self.processes == 1:
            return flag
        value = torch.tensor([0.0 if flag else 1.0], device=self.accelerator.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return value.item() == 0.0

    def _count_bad_step(self, record: dict) -> None:
        record["skipped"] = True
        self.bad_steps += 1
        self.bad_steps_in_row += 1
        logger.warning(
            "step %d: non-finite loss or gradient (loss %s, gradient norm %s): update skipped (%d in a row)",
            self.step,
            record.get("loss_total"),
            record["grad_norm"],
            self.bad_steps_in_row,
        )
        if self.bad_steps_in_row >= self.runtime.max_bad_steps:
            checkpoint = str(self.last_checkpoint) if self.last_checkpoint else "none"
            raise TrainingError(
                f"distillation stopped at step {self.step}: {self.bad_steps_in_row} steps in a row had a non-finite loss "
                f"or gradient (--max-bad-steps {self.runtime.max_bad_steps}); last good checkpoint: {checkpoint}. "
                "Lower --lr, or check the data and the model"
            )

    def save(self) -> None:
        """Write a checkpoint of the current step from the main process; the others wait for it."""
        accelerator = self.accelerator
        if not self.replicated:
            logger.warning("No checkpoint written at step %d: checkpoints are not supported under %s", self.step, accelerator.distributed_type.value)
            return
        rng_states = gather_object([checkpoints.capture_rng_state()])
        hashes = self.check_processes_agree()
        path = self.checkpoint_dir / checkpoints.checkpoint_name(self.step)
        if accelerator.is_main_process:
            training_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_states}
            trainer_state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "bad_steps": self.bad_steps,
                "bad_steps_in_row": self.bad_steps_in_row,
                "fingerprint": self.fingerprint,
                "process_student_sha256": hashes,
                "history": self.state.history,
            }
            path = checkpoints.save_checkpoint(
                self.checkpoint_dir,
                self.step,
                accelerator.unwrap_model(self.student),
                training_state,
                trainer_state,
                self.runtime.keep_checkpoints,
            )
            logger.info("Saved checkpoint %s", path)
        accelerator.wait_for_everyone()
        self.last_checkpoint = path

    def stop_requested(self, interrupt: InterruptRequest) -> bool:
        """Return whether any process received SIGINT or SIGTERM, so that all stop at the same step."""
        return not self._all_processes(not interrupt.requested)

    def check_processes_agree(self) -> list[str]:
        """Return the SHA-256 of the student on every process (empty with one process).

        Raises:
            TrainingError: if any process's weights or activation scales differ from the others'.
        """
        if self.processes == 1 or not self.replicated:
            return []
        hashes = gather_object([state_hash(self.accelerator.unwrap_model(self.student))])
        if len(set(hashes)) != 1:
            short = ", ".join(value[:12] for value in hashes)
            raise TrainingError(f"the processes hold different students at step {self.step} (SHA-256 {short}): this is a bug in tbquant")
        return hashes

    def finish(self) -> torch.nn.Module | None:
        """Check that every process has the same student and return it, unwrapped, on the CPU.

        Under FSDP or DeepSpeed, the full tensors are gathered into the main process's unsharded
        copy, and the other processes return None (they run no later stage).
        """
        self.accelerator.wait_for_everyone()
        self.state.info["process_student_sha256"] = self.check_processes_agree()
        if self.runtime.gradient_checkpointing:
            _set_activation_checkpointing(self.accelerator.unwrap_model(self.student), False)
        self.teacher.to("cpu", dtype=torch.float32)
        if not self.replicated:
            full_state = self.accelerator.get_state_dict(self.student)
            if self.export_copy is None:
                return None
            self.export_copy.load_state_dict(full_state)
            return self.export_copy
        # keep_fp32_wrapper=False removes the autocast wrapper that mixed precision puts on
        # forward, so the pack stage and the export compute in float32.
        return self.accelerator.unwrap_model(self.student, keep_fp32_wrapper=False).to("cpu")


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

        run = DistillationRun(state)
        if not run.replicated and run.runtime.save_every:
            # NOTE: checkpoints contain full tensors, and this format cannot yet gather the shards of FSDP or DeepSpeed.
            raise TbquantError(f"checkpoints are not supported under {run.accelerator.distributed_type.value}: pass --save-every 0")
        eval_batches = (
            state.eval_data.batches(settings.batch_size * run.processes, limit=settings.eval_batches)
            if state.eval_data is not None and settings.eval_batches > 0
            else []
        )
        first_step = run.step
        started = time.perf_counter()
        tokens_at_start = run.tokens_seen
        run.student.train()
        with InterruptRequest() as interrupt, _progress(run.accelerator.is_main_process) as progress:
            bar = progress.add_task("distill", total=settings.steps, completed=run.step, loss="-", speed="-")
            while run.step < settings.steps:
                record = run.train_step()
                elapsed = time.perf_counter() - started
                record["elapsed_s"] = elapsed
                state.history.append(record)
                speed = (run.tokens_seen - tokens_at_start) / elapsed
                progress.update(bar, advance=1, loss=f"{record.get('loss_total', float('nan')):.4f}", speed=f"{speed:.0f}")

                step = run.step
                if eval_batches and settings.eval_every and (step % settings.eval_every == 0 or step == settings.steps):
                    metrics = evaluate(run.student, eval_batches, state.task, run.teacher, settings)
                    state.history.append({"step": step, **{f"eval_{key}": value for key, value in metrics.items()}})
                    if run.accelerator.is_main_process:
                        progress.console.log(f"step {step}: " + ", ".join(f"validation {key} {value:.4g}" for key, value in metrics.items()))

                stop = run.stop_requested(interrupt)
                every = run.runtime.save_every
                # A skipped step gets no periodic checkpoint, so the last one precedes the fault.
                periodic = every and (step % every == 0 or step == settings.steps) and not record.get("skipped")
                if stop or periodic:
                    run.save()
                if stop:
                    raise KeyboardInterrupt

        elapsed = time.perf_counter() - started
        state.model = run.finish()
        steps_run = max(1, run.step - first_step)
        state.info["distill_seconds"] = elapsed
        state.info["distill_seconds_per_step"] = elapsed / steps_run
        state.info["distill_tokens_per_second"] = (run.tokens_seen - tokens_at_start) / elapsed if elapsed > 0 else 0.0
        state.info["distill_processes"] = run.processes
        state.info["skipped_steps"] = run.bad_steps
        final = [record for record in state.history if "eval_distill_loss" in record]
        if final:
            for key, value in final[-1].items():
                if key != "step":
                    state.metrics[key.replace("eval_", "final_")] = value
        logger.info("Distilled for %d steps in %.0f s (%.2f s per step)", steps_run, elapsed, elapsed / steps_run)
        if state.model is not None:
            state.model.eval()


def _set_activation_checkpointing(model: torch.nn.Module, enabled: bool) -> None:
    """Turn recomputation of layer activations in the backward pass on or off (non-reentrant
    checkpointing, which works with DDP). transformers 5.25 deprecates `gradient_checkpointing_*`
    in favour of `activation_checkpointing_*`, so the new methods are used where they exist."""
    if hasattr(model, "activation_checkpointing_enable"):
        if enabled:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif enabled:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _progress(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]distill"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("{task.fields[speed]} tok/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=False,
        disable=not enabled,
    )
