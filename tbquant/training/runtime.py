"""The accelerate runtime of the distillation loop: processes, devices and precision.

One `Accelerator` serves a plain `tbquant compress` (one process, no process group) and runs
under `accelerate launch -m tbquant` or `torchrun -m tbquant` (one process per device, DDP,
or FSDP and DeepSpeed through an accelerate config file). The launcher sets the process
group's environment; tbquant starts no processes itself.
"""

from __future__ import annotations

import logging
import os

import torch
from accelerate import Accelerator, PartialState
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType

from tbquant.errors import TbquantError
from tbquant.pipeline.settings import RuntimeSettings

logger = logging.getLogger(__name__)

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Distributed types whose prepared model has every parameter in full on each process, which the
# checkpoint format of `tbquant.training.checkpoints` requires.
REPLICATED_TYPES = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def build_accelerator(runtime: RuntimeSettings) -> Accelerator:
    """Create the `Accelerator` for one distillation run.

    Raises:
        TbquantError: if `--device cuda` is requested on a machine without CUDA.
    """
    if runtime.device == "cuda" and not torch.cuda.is_available():
        raise TbquantError("--device cuda was requested but torch finds no CUDA device: use --device cpu or auto")

    init_process_state(runtime)
    # Parameters that get no gradient (such as BERT's pooler, which no loss term reads) would make
    # DDP wait for them forever, so DDP searches the graph for unused ones at each step.
    ddp_options = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=uses_cpu(runtime), mixed_precision=runtime.mixed_precision, kwargs_handlers=[ddp_options])
    logger.info(
        "Distillation runs on %s: %d process(es), distributed type %s, mixed precision %s",
        accelerator.device,
        accelerator.num_processes,
        str(accelerator.distributed_type.value).lower(),
        accelerator.mixed_precision,
    )
    return accelerator


def is_main_process() -> bool:
    """Return whether this process writes files and logs (rank 0, or the only process)."""
    return PartialState().is_main_process


def init_process_state(runtime: RuntimeSettings) -> PartialState:
    """Initialise accelerate's process state (and the process group under a launcher) for `runtime`.

    The process group's backend follows the device: gloo on the CPU, NCCL on CUDA. Later calls with the same settings return the same state.
    """
    # accelerate keeps its settings in a process-wide singleton that refuses a second, different
    # configuration. A single process (a library caller running several pipelines) starts afresh;
    # a launched process group keeps its state, since it runs one pipeline per process.
    # NOTE: `_reset_state` is private to accelerate (checked with accelerate 1.16).
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(cpu=uses_cpu(runtime))


def uses_cpu(runtime: RuntimeSettings) -> bool:
    """Return whether the run is on the CPU: `--device cpu`, or `auto` on a machine without CUDA.

    accelerate needs its `cpu` flag here: without CUDA and without the flag, it treats each
    launched process as a separate single-process run.
    """
    return runtime.device == "cpu" or (runtime.device == "auto" and not torch.cuda.is_available())
