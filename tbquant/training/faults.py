"""Numerical faults of the distillation loop: non-finite steps and degenerate activation scales."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from tbquant.errors import TbquantError
from tbquant.quantizers.activation import ActivationQuantizer

logger = logging.getLogger(__name__)

# A learned activation scale (LSQ alpha) is reported when it leaves this range relative to its
# calibrated value. Below the lower bound, nearly every input lands on the clip levels, so the
# scale has collapsed. Above the upper bound, nearly every input rounds to zero, so it has exploded.
COLLAPSE_RATIO = 1e-3
EXPLOSION_RATIO = 1e3


class TrainingError(TbquantError):
    """A distillation run that cannot continue, such as one whose loss stays non-finite."""

    exit_code = 1


class ScaleMonitor:
    """Watch the learned activation scales of a student and report each degenerate one by layer.

    Every quantizer is reported at most once per process, at the first step its scale is non-finite,
    not positive, below `COLLAPSE_RATIO` or above `EXPLOSION_RATIO` times its reference value.
    NOTE: after --resume the reference is the resumed scale, not the calibrated one, and faults
    reported before the interruption are reported again if they persist.
    """

    def __init__(self, model: nn.Module) -> None:
        self.quantizers = [
            module for module in model.modules() if isinstance(module, ActivationQuantizer) and module.learned
        ]
        self.initial = torch.stack([quantizer.alpha.detach().float().clone() for quantizer in self.quantizers]) if self.quantizers else None
        self.reported: dict[str, dict] = {}

    def check(self, step: int) -> list[dict]:
        """Return the scales that became degenerate at `step` (each also logged as a warning)."""
        if self.initial is None:
            return []
        current = torch.stack([quantizer.alpha.detach().float() for quantizer in self.quantizers]).cpu()
        ratio = current / self.initial.cpu()
        faulty = ~torch.isfinite(current) | (current <= 0) | (ratio < COLLAPSE_RATIO) | (ratio > EXPLOSION_RATIO)
        found = []
        for index in faulty.nonzero().flatten().tolist():
            name = self.quantizers[index].name
            if name in self.reported:
                continue
            value, initial = current[index].item(), self.initial[index].item()
            if not math.isfinite(value):
                kind = "became non-finite"
            elif value > initial:
                kind = "exploded"
            else:
                kind = "collapsed"
            record = {"step": step, "layer": name, "alpha": value, "calibrated_alpha": initial, "fault": kind}
            self.reported[name] = record
            found.append(record)
            logger.warning("step %d: activation scale of %s %s: alpha %.3g (calibrated %.3g)", step, name, kind, value, initial)
        return found


def is_finite(value: float | torch.Tensor) -> bool:
    return math.isfinite(float(value))
