"""Built-in pipeline stages, registered on import: load, calibrate, distill, pack, export."""

from tbquant.stages.calibrate import CalibrateStage
from tbquant.stages.distill import DistillStage
from tbquant.stages.export import ExportStage
from tbquant.stages.load import LoadStage
from tbquant.stages.pack import PackStage

DEFAULT_PIPELINE = ("load", "calibrate", "distill", "pack", "export")

__all__ = ["DEFAULT_PIPELINE", "CalibrateStage", "DistillStage", "ExportStage", "LoadStage", "PackStage"]
