"""The compression pipeline: settings, shared state, stage registry and runner."""

from tbquant.pipeline.registry import ENTRY_POINT_GROUP, Stage, available_stages, get_stage, register_stage
from tbquant.pipeline.settings import CompressSettings, DistillSettings, RuntimeSettings, Task
from tbquant.pipeline.state import PipelineState

__all__ = [
    "ENTRY_POINT_GROUP",
    "CompressSettings",
    "DistillSettings",
    "RuntimeSettings",
    "PipelineState",
    "Stage",
    "Task",
    "available_stages",
    "get_stage",
    "register_stage",
]
