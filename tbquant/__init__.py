"""tbquant: ternary and binary quantization of transformer language models by quantization-aware
distillation (Liu et al., "Binary and Ternary Natural Language Generation", ACL 2023)."""

__version__ = "0.1.0"

from tbquant.config import ActivationQuantConfig, QuantizationConfig, WeightQuantConfig  # noqa: E402
from tbquant.hf_quantizer import register as _register_with_transformers  # noqa: E402
from tbquant.loading import load_quantized  # noqa: E402
from tbquant.pipeline import CompressSettings, DistillSettings, PipelineState, register_stage  # noqa: E402
from tbquant.pipeline.runner import run_pipeline  # noqa: E402

_register_with_transformers()

__all__ = [
    "ActivationQuantConfig",
    "CompressSettings",
    "DistillSettings",
    "PipelineState",
    "QuantizationConfig",
    "WeightQuantConfig",
    "__version__",
    "load_quantized",
    "register_stage",
    "run_pipeline",
]
