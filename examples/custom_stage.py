"""A third-party stage: log the fraction of zero codes of every ternary layer after packing.

Register it from your package's pyproject.toml:

    [project.entry-points."tbquant.stages"]
    sparsity = "custom_stage:SparsityStage"

then run it in a recipe: `stages: [load, calibrate, distill, pack, sparsity, export]`.
"""

import logging

from tbquant.nn import PackedLinear

logger = logging.getLogger(__name__)


class SparsityStage:
    """Log the share of zero weights in each packed ternary layer."""

    name = "sparsity"

    def run(self, state) -> None:
        for module_name, module in state.model.named_modules():
            if isinstance(module, PackedLinear):
                zeros = (module.codes() == 0).float().mean().item()
                logger.info("%s: %.1f%% zero weights", module_name, 100 * zeros)
