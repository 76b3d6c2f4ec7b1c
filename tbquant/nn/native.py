"""Fused CPU kernels for packed layers, compiled from `csrc/packed_cpu.c` on first use.

Decoding computes one token at a time, so a packed layer's cost is reading its codes, not
arithmetic. The torch path (`tbquant.nn.kernels`) unpacks the whole code matrix to one byte per
weight before its integer product. The fused kernel reads the 2-bit (or 1-bit) codes once, and
quantizes the activations, multiplies, and applies the scales, offsets and bias in one call. It
serves up to `MAX_TOKENS` tokens at a time. For more tokens (prefill), the kernel quantizes the
activations and rescales the products, while `torch._int_mm` multiplies on every core.

NOTE: the kernels run on the calling thread. Splitting a layer's rows over POSIX threads gave no
speed-up on the 2-core machine where they were measured (torch's OpenMP threads, which keep
spinning between operations, are a suspect), so decoding uses one core for the packed layers.

The kernel is plain C, built by the system C compiler (`CC`, else `cc`, `gcc` or `clang`) with
`-O3 -march=native`. The build is cached in `$TBQUANT_CACHE_DIR/kernels` (by default
`~/.cache/tbquant/kernels`), keyed by the source, the compiler and the CPU. Without a compiler,
or with `TBQUANT_NATIVE_KERNELS=0`, packed layers use the torch path, which gives the same
integer results more slowly.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ABI_VERSION = 5

# Largest number of tokens (rows of the input) that packed layers compute with the fused kernel.
# Beyond it the torch path's multi-threaded matrix product is faster. Measured on SmolLM2's
# 1536 x 576 and 576 x 576 layers (2-core CPU) at 16 tokens: kernel 241 and 104 us, torch path
# 298 and 157 us. At 32 tokens: kernel 465 and 193 us, torch path 313 and 178 us.
MAX_TOKENS = 16

# The same for 16-bit full-precision weights (`half_linear`). On SmolLM2's 49152 x 576 float16
# head, the kernel took 2.0, 4.3 and 7.9 ms at 1, 4 and 8 tokens, the chunked torch path 5.9, 7.8
# and 10.0 ms, and the float32 head 2.1, 4.5 and 7.0 ms. At 16 tokens the chunked path was faster
# (9.5 ms against 15.4 ms).
MAX_HALF_TOKENS = 8

# Activation quantization modes of `tbq_linear_int`.
DYNAMIC, LEARNED_ROUND, LEARNED_SIGN = 0, 1, 2

_FLAGS = ["-O3", "-march=native", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
_SOURCE = "packed_cpu.c"


class Layer(ctypes.Structure):
    """`tbq_layer` of the C source: a packed layer's codes, sums, scales and quantizer settings."""

    _fields_ = [
        ("planes", ctypes.c_void_p),
        ("height", ctypes.c_int64),
        ("columns", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("weight_sums", ctypes.c_void_p),
        ("row_scale", ctypes.c_void_p),
        ("row_offset", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("bits", ctypes.c_int32),
        ("mode", ctypes.c_int32),
        ("levels", ctypes.c_int32),
        ("is_signed", ctypes.c_int32),
        ("shift", ctypes.c_int32),
    ]


_pointer = ctypes.c_void_p
_layer = ctypes.POINTER(Layer)
_SIGNATURES = {
    "tbq_abi_version": ([], ctypes.c_int),
    "tbq_linear_int": ([_layer, _pointer, ctypes.c_int64, ctypes.c_float, _pointer], ctypes.c_int),
    "tbq_linear_float": ([_layer, _pointer, ctypes.c_int64, _pointer], ctypes.c_int),
    "tbq_quantize_rows": ([_layer, _pointer, ctypes.c_int64, ctypes.c_float, _pointer, _pointer, _pointer], None),
    "tbq_rescale": ([_layer, _pointer, ctypes.c_int64, ctypes.c_int64, _pointer, _pointer, _pointer], None),
    "tbq_fake_quantize": ([_pointer, ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, _pointer], None),
    "tbq_half_linear": (
        [_pointer, ctypes.c_int64, ctypes.c_int64, _pointer, ctypes.c_int, ctypes.c_int64, _pointer, _pointer],
        ctypes.c_int,
    ),
}


def _cache_dir() -> Path:
    root = os.environ.get("TBQUANT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "tbquant"
    )
    return Path(root) / "kernels"


def _find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_identity() -> str:
    """Describe the CPU for the cache key: `-march=native` code may not run on another CPU."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features", "CPU part"))}))
    except OSError:
        return platform.processor()


def source_path():
    """Return a context manager giving the path of the kernel source file."""
    return resources.as_file(resources.files("tbquant.nn") / "csrc" / _SOURCE)


def compile_library(compiler: str, source: Path, target: Path, flag_sets: list[list[str]] | None = None) -> None:
    """Compile `source` to the shared library `target`, atomically (parallel loaders may race).

    Each set of flags is tried in turn (by default `-march=native`, then without it).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    if flag_sets is None:
        flag_sets = [_FLAGS, [flag for flag in _FLAGS if flag != "-march=native"]]
    try:
        for flags in flag_sets:
            result = subprocess.run(
                [compiler, *flags, "-o", staging, str(source), "-lm"], capture_output=True, text=True, timeout=120, check=False
            )
            if result.returncode == 0:
                os.replace(staging, target)
                return
        raise RuntimeError(
            result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"{compiler} exited with {result.returncode}"
        )
    finally:
        if os.path.exists(staging):
            os.unlink(staging)


@functools.cache
def library() -> ctypes.CDLL | None:
    """Return the compiled kernel library, building it if needed, or None where it is unavailable."""
    if os.environ.get("TBQUANT_NATIVE_KERNELS", "1") == "0":
        logger.info("fused CPU kernels disabled by TBQUANT_NATIVE_KERNELS=0")
        return None
    compiler = _find_compiler()
    if compiler is None:
        logger.warning("no C compiler found (set CC): packed layers use the slower torch path on CPU")
        return None
    with source_path() as source:
        text = source.read_bytes()
        key = hashlib.sha256(
            b"\0".join([text, compiler.encode(), " ".join(_FLAGS).encode(), _cpu_identity().encode()])
        ).hexdigest()[:16]
        target = _cache_dir() / f"tbquant_cpu_{key}.so"
        try:
            if not target.is_file():
                logger.info("compiling the fused CPU kernels with %s (once, cached in %s)", compiler, target.parent)
                compile_library(compiler, source, target)
            handle = load_library(target)
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            logger.warning("could not build the fused CPU kernels (%s): packed layers use the slower torch path on CPU", error)
            return None

    if handle.tbq_abi_version() != ABI_VERSION:
        logger.warning("fused CPU kernels at %s have another ABI version: packed layers use the torch path", target)
        return None
    return handle


def load_library(path: Path) -> ctypes.CDLL:
    """Load a compiled kernel library and declare the C signatures of its functions."""
    handle = ctypes.CDLL(str(path))
    for name, (arguments, result) in _SIGNATURES.items():
        function = getattr(handle, name)
        function.argtypes = arguments
        function.restype = result
    return handle


def usable(x: torch.Tensor) -> bool:
    """Return whether the fused kernels can compute a layer on input `x` (CPU, no autograd)."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return False
    return library() is not None


def _address(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check(status: int) -> None:
    if status != 0:
        raise MemoryError("the fused CPU kernel could not allocate its workspace")


class PackedKernel:
    """A packed layer prepared for the fused kernel: the `Layer` structure and the tensors it points to.

    Args:
        planes: `[height, columns]` uint8 planar codes.
        bits: 2 (ternary) or 1 (binary).
        in_features: the real number of input features (`columns` is padded).
        weight_sums: `[out]` int32 `U[n]`.
        row_scale, row_offset, bias: `[out]` float32 (offset and bias may be None).
        quantizer: `(mode, levels, signed, shift)` for integer inputs, None for float inputs.
    """

    def __init__(
        self,
        planes: torch.Tensor,
        bits: int,
        in_features: int,
        weight_sums: torch.Tensor,
        row_scale: torch.Tensor,
        row_offset: torch.Tensor | None,
        bias: torch.Tensor | None,
        quantizer: tuple[int, int, bool, int] | None,
    ) -> None:
        # The tensors are kept here so that the addresses in the structure stay valid.
        self.tensors = (planes, weight_sums, row_scale, row_offset, bias)
        self.integer = quantizer is not None
        self.columns = planes.shape[1]
        self.out_features = weight_sums.shape[0]
        mode, levels, signed, shift = quantizer or (DYNAMIC, 0, False, 0)
        self.layer = Layer(
            planes.data_ptr(), planes.shape[0], planes.shape[1], in_features, self.out_features, weight_sums.data_ptr(),
            row_scale.data_ptr(), _address(row_offset), _address(bias), bits, mode, levels, int(signed), shift,
        )  # fmt: skip
        self.pointer = ctypes.pointer(self.layer)
        self._library = library()

    def __call__(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """Return the layer's output `[M, out]` float32 for `x` `[M, in]` float32, contiguous."""
        out = torch.empty(x.shape[0], self.out_features, dtype=torch.float32)
        if self.integer:
            status = self._library.tbq_linear_int(self.pointer, x.data_ptr(), x.shape[0], alpha, out.data_ptr())
        else:
            padding = self.columns - x.shape[1]
            if padding:
                x = torch.nn.functional.pad(x, (0, padding))
            status = self._library.tbq_linear_float(self.pointer, x.data_ptr(), x.shape[0], out.data_ptr())
        _check(status)
        return out

    def quantize(self, x: torch.Tensor, alpha: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return the int8 codes `c - shift` (`[M, columns]`), code sums `S` and scales `s` of `x`."""
        tokens = x.shape[0]
        codes = torch.empty(tokens, self.columns, dtype=torch.int8)
        code_sums = torch.empty(tokens, dtype=torch.float32)
        scales = torch.empty(tokens, dtype=torch.float32)
        self._library.tbq_quantize_rows(
            self.pointer, x.data_ptr(), tokens, alpha, codes.data_ptr(), code_sums.data_ptr(), scales.data_ptr()
        )
        return codes, code_sums, scales

    def rescale(self, products: torch.Tensor, code_sums: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        """Return the layer output `[M, out]` float32 from the int32 products `c' u` (`[M, rows]`, contiguous)."""
        tokens, rows = products.shape
        out = torch.empty(tokens, self.out_features, dtype=torch.float32)
        self._library.tbq_rescale(
            self.pointer, products.data_ptr(), tokens, rows, code_sums.data_ptr(), scales.data_ptr(), out.data_ptr()
        )
        return out


def half_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Return `x @ weight.T + bias` for float32 `x` `[M, in]` and a float16 or bfloat16 `weight`."""
    out = torch.empty(x.shape[0], weight.shape[0], dtype=torch.float32)
    status = library().tbq_half_linear(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), int(weight.dtype == torch.bfloat16),
        weight.shape[0], _address(bias), out.data_ptr(),
    )  # fmt: skip
    _check(status)
    return out


def fake_quantize(x: torch.Tensor, levels: int, signed: bool) -> torch.Tensor:
    """Return `x` (float32) fake-quantized per row of its last dimension by the dynamic quantizer."""
    x = x.contiguous()
    out = torch.empty_like(x)
    length = x.shape[-1]
    library().tbq_fake_quantize(x.data_ptr(), x.numel() // length if length else 0, length, levels, int(signed), out.data_ptr())
    return out
