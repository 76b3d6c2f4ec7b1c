"""Quantization settings: what to quantize and how, separate from the modules that do it.

The configs validate in their constructors and raise `ValueError` naming the bad value and
the allowed ones, so that the CLI, recipes and the loader share one set of checks.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from typing import Any


class WeightScheme(str, enum.Enum):
    """Weight quantizer: the method of Liu et al. (2023) and the baselines of its tables."""

    TERNARY = "ternary"  # statistics-based, per output row, a = 4/3 * mean|W - mu|
    BINARY = "binary"  # statistics-based, per output row, a = mean|W - mu|
    TWN = "twn"  # ternary weight networks: threshold 0.7 * mean|W|, per row
    BWN = "bwn"  # binary weight networks: sign(W) * mean|W|, per row
    ABSMEAN = "absmean"  # BitNet b1.58: one scale per tensor, round(W / mean|W|)

    @property
    def is_binary(self) -> bool:
        return self in (WeightScheme.BINARY, WeightScheme.BWN)


class Packing(str, enum.Enum):
    """Layout of the integer codes in the exported checkpoint."""

    COMPACT = "compact"  # ternary: 5 trits per byte (1.6 bits per weight)
    DENSE = "dense"  # ternary: 4 two-bit codes per byte (2 bits per weight)


class ModulePolicy(str, enum.Enum):
    """Policy for the token embedding and for the output head."""

    KEEP = "keep"  # stays full precision
    QUANTIZE = "quantize"  # quantized with the weight scheme, per row


ACTIVATION_BITS = (8, 4, 2, 1)
STORAGE_DTYPES = ("float16", "bfloat16", "float32")


def _choice(enum_type: type[enum.Enum], value: Any, name: str) -> Any:
    if isinstance(value, enum_type):
        return value
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise ValueError(f"invalid {name} {value!r}: expected one of {allowed}") from None


@dataclasses.dataclass
class WeightQuantConfig:
    """Weight quantization settings for linear (and optionally embedding) layers.

    Args:
        scheme: the weight quantizer (`WeightScheme`).
        center: subtract the per-row mean `mu` before quantizing, as the paper does. The
            reference code uses `mu = 0`, which is the default here because it keeps the
            packed format free of an offset and lets inference run on integer codes alone.
        clip_gradient: clip the straight-through gradient to `|(W - mu) / a| < 1`. The paper
            does this for binary weights; the reference code, which produced the published
            numbers, does not, so the default is off.
        packing: layout of ternary codes on disk; binary codes always use 1 bit.
        scale_dtype: storage dtype of the per-row scales. Training rounds the scales to this
            dtype as well, so the exported model computes exactly what the student computed.
    """

    scheme: WeightScheme = WeightScheme.TERNARY
    center: bool = False
    clip_gradient: bool = False
    packing: Packing = Packing.COMPACT
    scale_dtype: str = "float16"

    def __post_init__(self) -> None:
        self.scheme = _choice(WeightScheme, self.scheme, "weight scheme")
        self.packing = _choice(Packing, self.packing, "packing")
        if self.scale_dtype not in STORAGE_DTYPES:
            raise ValueError(f"invalid scale dtype {self.scale_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        if self.center and self.scheme == WeightScheme.ABSMEAN:
            raise ValueError("invalid combination: the absmean scheme has one scale per tensor and no centering")


@dataclasses.dataclass
class ActivationQuantConfig:
    """Activation quantization settings for every quantization point.

    Args:
        bits: 8, 4, 2 or 1, or None for full-precision activations.
        attention: also quantize query, key and value states and the attention
            probabilities (through the registered attention function).
    """

    bits: int | None = 8
    attention: bool = True

    def __post_init__(self) -> None:
        if self.bits is not None and self.bits not in ACTIVATION_BITS:
            allowed = ", ".join(str(bits) for bits in ACTIVATION_BITS)
            raise ValueError(f"invalid activation bits {self.bits!r}: expected one of {allowed} or none")

    @property
    def learned(self) -> bool:
        """Whether the scales are learned (1 and 2 bits) rather than computed per token."""
        return self.bits is not None and self.bits <= 2


@dataclasses.dataclass
class QuantizationConfig:
    """Everything needed to turn a full-precision model into a quantized student and back.

    Args:
        weights: weight quantization settings.
        activations: activation quantization settings.
        embeddings: policy for token embeddings (`keep` or `quantize`).
        head: policy for the output head (`keep` or `quantize`).
        keep_full_precision: regular expressions; a module whose qualified name matches any of
            them (`re.search`) stays full precision.
        fp_dtype: storage dtype of the tensors that stay full precision in the export.
    """

    weights: WeightQuantConfig = dataclasses.field(default_factory=WeightQuantConfig)
    activations: ActivationQuantConfig = dataclasses.field(default_factory=ActivationQuantConfig)
    embeddings: ModulePolicy = ModulePolicy.KEEP
    head: ModulePolicy = ModulePolicy.KEEP
    keep_full_precision: list[str] = dataclasses.field(default_factory=list)
    fp_dtype: str = "float16"

    def __post_init__(self) -> None:
        if isinstance(self.weights, dict):
            self.weights = WeightQuantConfig(**self.weights)
        if isinstance(self.activations, dict):
            self.activations = ActivationQuantConfig(**self.activations)
        self.embeddings = _choice(ModulePolicy, self.embeddings, "embedding policy")
        self.head = _choice(ModulePolicy, self.head, "head policy")
        if self.fp_dtype not in STORAGE_DTYPES:
            raise ValueError(f"invalid full-precision dtype {self.fp_dtype!r}: expected one of {', '.join(STORAGE_DTYPES)}")
        for pattern in self.keep_full_precision:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"invalid module pattern {pattern!r}: {error}") from None

    def keeps(self, module_name: str) -> bool:
        """Return whether `module_name` matches a keep-full-precision pattern."""
        return any(re.search(pattern, module_name) for pattern in self.keep_full_precision)

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QuantizationConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})


def _jsonable(value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {key: _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    return value
