"""The fused CPU kernels (`tbquant.nn.native`) against the torch path, and 16-bit weight storage."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbquant import packing
from tbquant.config import QuantizationConfig, WeightQuantConfig
from tbquant.nn import PackedLinear, QuantLinear, native
from tbquant.nn.convert import layout_for
from tbquant.nn.half import HalfStorageEmbedding, HalfStorageLinear, keep_stored_dtype
from tbquant.nn.linear import OUTPUT_TOLERANCE
from tbquant.quantizers.activation import ActivationQuantizer, QuantPoint

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the fused kernels are not built")


def packed_pair(scheme: str, bits: int | None, center: bool, in_features: int, bias: bool, non_negative: bool = False):
    generator = torch.Generator().manual_seed(in_features + (bits or 0))
    weight = nn.Parameter(torch.randn(37, in_features, generator=generator))
    bias_parameter = nn.Parameter(torch.randn(37, generator=generator)) if bias else None
    quantized = QuantLinear(weight, bias_parameter, WeightQuantConfig(scheme=scheme, center=center), bits).eval()
    if quantized.input_quantizer is not None:
        samples = torch.randn(64, in_features, generator=generator)
        quantized.input_quantizer.initialize_from(samples.abs() if non_negative else samples)
    layout = layout_for(QuantizationConfig(weights=quantized.weight_config))
    return quantized, PackedLinear.from_quant_linear(quantized, layout)


def torch_path(module: nn.Module, inputs: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Run `module` with the kernels turned off, as on a machine without a C compiler."""
    with monkeypatch.context() as patch:
        patch.setattr(native, "usable", lambda x: False)
        return module(inputs)


@pytest.mark.parametrize("scheme", ["ternary", "binary", "twn"])
@pytest.mark.parametrize("bits", [8, 4, 2, 1])
@pytest.mark.parametrize("center", [False, True])
@pytest.mark.parametrize("in_features", [45, 200])
@pytest.mark.parametrize("tokens", [1, 16, 40])
def test_integer_kernel_equals_torch_path(scheme, bits, center, in_features, tokens, monkeypatch):
    """Same codes, same int32 sums, same float operations in the same order: equal outputs.

    Up to `MAX_TOKENS` tokens run in the fused kernel, more (40) in the kernel's prefill path."""
    quantized, packed = packed_pair(scheme, bits, center, in_features, bias=True)
    inputs = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens))

    with torch.no_grad():
        fused = packed(inputs)
        reference = torch_path(packed, inputs, monkeypatch)
        fake = quantized(inputs)

    assert torch.equal(fused, reference)
    assert (fused - fake).abs().max().item() <= OUTPUT_TOLERANCE * max(1.0, fake.abs().max().item())


@pytest.mark.parametrize("bits", [8, 4, 2, 1])
def test_unsigned_activations_match(bits, monkeypatch):
    """Non-negative inputs: 8-bit codes reach 255 and are shifted into int8 by the kernel."""
    quantized, packed = packed_pair("ternary", bits, False, 130, bias=False, non_negative=True)
    inputs = torch.rand(3, 130, generator=torch.Generator().manual_seed(3)) * 4

    with torch.no_grad():
        fused = packed(inputs)
        reference = torch_path(packed, inputs, monkeypatch)

    assert not bool(quantized.input_quantizer.signed)
    assert torch.equal(fused, reference)


@pytest.mark.parametrize("scheme", ["ternary", "binary"])
@pytest.mark.parametrize("center", [False, True])
def test_float_kernel_matches_fake_quantized(scheme, center, monkeypatch):
    """Full-precision inputs sum in float32 in another order, so they agree within the tolerance."""
    quantized, packed = packed_pair(scheme, None, center, 93, bias=True)
    inputs = torch.randn(2, 5, 93, generator=torch.Generator().manual_seed(5))

    with torch.no_grad():
        fused = packed(inputs)
        reference = torch_path(packed, inputs, monkeypatch)
        fake = quantized(inputs)

    scale = max(1.0, fake.abs().max().item())
    assert fused.shape == (2, 5, 37)
    assert (fused - reference).abs().max().item() <= OUTPUT_TOLERANCE * scale
    assert (fused - fake).abs().max().item() <= OUTPUT_TOLERANCE * scale


def test_many_tokens_use_prefill_path(monkeypatch):
    _, packed = packed_pair("ternary", 8, False, 64, bias=False)
    calls = []
    monkeypatch.setattr(native.PackedKernel, "__call__", lambda self, *args: calls.append(args))

    with torch.no_grad():
        output = packed(torch.randn(native.MAX_TOKENS + 1, 64))

    assert calls == []
    assert output.shape == (native.MAX_TOKENS + 1, 37)


def test_gradients_use_torch_path():
    """The kernel has no backward pass, so inputs that need gradients take the torch path."""
    _, packed = packed_pair("ternary", None, False, 64, bias=False)
    inputs = torch.randn(2, 64, requires_grad=True)

    packed(inputs).sum().backward()

    assert inputs.grad is not None
    assert not native.usable(inputs)


def test_kernel_rebuilt_after_load_state_dict():
    _, source = packed_pair("ternary", 8, True, 40, bias=True)
    target = PackedLinear(40, 37, True, packing.Layout.TERNARY_COMPACT, "float16", True, 8)
    inputs = torch.randn(1, 40)
    with torch.no_grad():
        target(inputs)

    target.load_state_dict(source.state_dict())

    with torch.no_grad():
        assert torch.equal(target(inputs), source(inputs))


def run_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **environment}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=120, check=False
    )


def test_disabled_kernels_fall_back(tmp_path):
    result = run_python(
        """
        import torch
        from tbquant.nn import native
        print(native.library() is None, native.usable(torch.zeros(1)))
        """,
        TBQUANT_NATIVE_KERNELS="0",
        TBQUANT_CACHE_DIR=str(tmp_path),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_failed_compile_warns_and_falls_back(tmp_path):
    result = run_python(
        """
        import logging
        logging.basicConfig(level=logging.WARNING)
        from tbquant.nn import native
        print(native.library() is None)
        """,
        CC="false",
        TBQUANT_CACHE_DIR=str(tmp_path),
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "could not build the fused CPU kernels" in result.stderr
    assert not list((tmp_path / "kernels").glob("*.so"))


def test_compiled_library_cached(tmp_path):
    code = """
        import logging
        logging.basicConfig(level=logging.INFO)
        from tbquant.nn import native
        print(native.library() is not None)
        """
    first = run_python(code, TBQUANT_CACHE_DIR=str(tmp_path))
    built = list((tmp_path / "kernels").glob("tbquant_cpu_*.so"))
    second = run_python(code, TBQUANT_CACHE_DIR=str(tmp_path))

    assert first.stdout.strip() == "True", first.stderr
    assert "compiling the fused CPU kernels" in first.stderr
    assert len(built) == 1
    assert second.stdout.strip() == "True", second.stderr
    assert "compiling" not in second.stderr


def keep_small_weights(model: nn.Module, monkeypatch) -> list[str]:
    """Run `keep_stored_dtype` with the size threshold lowered to fit these small weights."""
    monkeypatch.setattr("tbquant.nn.half.MIN_ELEMENTS", 1)
    return keep_stored_dtype(model, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tokens", [1, 4, 9])
def test_half_linear_equals_upcast(dtype, bias, tokens, monkeypatch):
    weight = torch.randn(300, 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    module = nn.Linear(96, 300, bias=bias)
    module.weight = nn.Parameter(weight, requires_grad=False)
    changed = keep_small_weights(nn.Sequential(module), monkeypatch)
    inputs = torch.randn(2, tokens, 96, generator=torch.Generator().manual_seed(tokens))
    expected = F.linear(inputs, weight.float(), module.bias)

    with torch.no_grad():
        fused = module(inputs)
        chunked = torch_path(module, inputs, monkeypatch)

    scale = max(1.0, expected.abs().max().item())
    assert changed == ["0"]
    assert isinstance(module, HalfStorageLinear)
    assert module.weight.dtype == dtype
    assert fused.dtype == torch.float32
    assert (fused - expected).abs().max().item() <= 1e-6 * scale
    assert (chunked - expected).abs().max().item() <= 1e-6 * scale


def test_tied_embedding_stays_tied(monkeypatch):
    embedding = nn.Embedding(1000, 64)
    head = nn.Linear(64, 1000, bias=False)
    head.weight = embedding.weight
    embedding.weight.data = embedding.weight.data.half()
    model = nn.ModuleDict({"embed": embedding, "head": head})

    changed = keep_small_weights(model, monkeypatch)
    ids = torch.tensor([[1, 5, 999]])
    rows = model["embed"](ids)

    assert sorted(changed) == ["embed", "head"]
    assert isinstance(model["embed"], HalfStorageEmbedding)
    assert model["embed"].weight is model["head"].weight
    assert list(model.parameters()) == []
    assert rows.dtype == torch.float32
    assert torch.equal(rows, embedding.weight.float()[ids])


def test_compute_dtype_follows_conversion(monkeypatch):
    model = nn.Sequential(nn.Embedding(100, 16))
    model[0].weight.data = model[0].weight.data.half()
    keep_small_weights(model, monkeypatch)

    model.double()

    assert model[0].compute_dtype == torch.float64
    assert model[0].weight.dtype == torch.float64
    assert model(torch.tensor([3])).dtype == torch.float64


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_fake_quantize_equals_torch(bits, signed, monkeypatch):
    """Dynamic per-token fake quantization: the kernel and torch give the same floats."""
    quantizer = ActivationQuantizer(bits, QuantPoint.QUERY)
    quantizer.signed.fill_(signed)
    generator = torch.Generator().manual_seed(bits)
    inputs = torch.randn(2, 3, 7, 64, generator=generator)
    inputs[0, 0, 0] = 0.0  # an all-zero token takes the minimum scale
    inputs[0, 0, 1, :4] = torch.tensor([0.5, 1.5, -2.5, 127.0])  # ties round to even
    if not signed:
        inputs = inputs.abs()

    with torch.no_grad():
        fused = quantizer(inputs)
        reference = torch_path(quantizer, inputs, monkeypatch)

    assert torch.equal(fused, reference)


# Instruction sets of the inner loops: AVX-512 VNNI where this machine's compiler targets it,
# AVX2 with FMA and F16C (x86-64-v3), and the portable loops (baseline x86-64, SSE2 only).
VARIANT_FLAGS = {
    "avx2": ["-O3", "-march=x86-64-v3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"],
    "portable": ["-O3", "-march=x86-64", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"],
}


@pytest.fixture(scope="module", params=list(VARIANT_FLAGS))
def variant_library(request, tmp_path_factory):
    """Build the kernels for an older instruction set, so that its code path runs on this machine."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the variants are x86-64 instruction sets")
    target = tmp_path_factory.mktemp("kernels") / f"{request.param}.so"
    with native.source_path() as source:
        native.compile_library(native._find_compiler(), source, target, [VARIANT_FLAGS[request.param]])
    return native.load_library(target)


@pytest.mark.parametrize("scheme", ["ternary", "binary"])
@pytest.mark.parametrize("non_negative", [False, True])
def test_instruction_set_variants_agree(variant_library, scheme, non_negative, monkeypatch):
    """Every build of the kernels gives the same outputs: exactly for integer work, and within
    float rounding for float inputs and 16-bit weights."""
    _, integer = packed_pair(scheme, 8, True, 200, bias=True, non_negative=non_negative)
    _, floating = packed_pair(scheme, None, False, 200, bias=True)
    head = nn.Linear(200, 300, bias=False)
    head.weight = nn.Parameter(head.weight.detach().half(), requires_grad=False)
    keep_small_weights(nn.Sequential(head), monkeypatch)
    quantizer = ActivationQuantizer(8, QuantPoint.PROBS)
    inputs = torch.randn(3, 200, generator=torch.Generator().manual_seed(7))
    if non_negative:
        inputs = inputs.abs()
    prefill = torch.randn(40, 200, generator=torch.Generator().manual_seed(8))

    def run_all():
        integer._native_kernel = floating._native_kernel = None
        return [integer(inputs), integer(prefill), floating(inputs), head(inputs), quantizer(inputs.abs())]

    with torch.no_grad():
        default = run_all()
        monkeypatch.setattr(native, "library", lambda: variant_library)
        variant = run_all()

    assert torch.equal(variant[0], default[0])
    assert torch.equal(variant[1], default[1])
    assert torch.allclose(variant[2], default[2], rtol=0, atol=OUTPUT_TOLERANCE * max(1.0, default[2].abs().max().item()))
    assert torch.allclose(variant[3], default[3], rtol=0, atol=1e-6 * max(1.0, default[3].abs().max().item()))
    assert torch.equal(variant[4], default[4])
