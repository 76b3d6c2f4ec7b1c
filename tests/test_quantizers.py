"""Weight and activation quantizers: the formulas, the straight-through gradients and the
validation of their settings."""

from __future__ import annotations

import math

import pytest
import torch

from tbquant.config import ActivationQuantConfig, QuantizationConfig, WeightQuantConfig
from tbquant.pipeline.settings import DistillSettings
from tbquant.quantizers import ActivationQuantizer, QuantPoint, dequantize_weight, fake_quantize_weight, quantize_weight

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
SCHEMES = ["ternary", "binary", "twn", "bwn", "absmean"]


def random_weight(rows: int = 6, columns: int = 20, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, columns, generator=generator) * 0.3 + 0.05


def rounded(values: torch.Tensor, dtype_name: str) -> torch.Tensor:
    return values.to(STORAGE_DTYPES[dtype_name]).to(values.dtype)


# Weight quantizers


@pytest.mark.parametrize("scale_dtype", list(STORAGE_DTYPES))
def test_ternary_scale_per_row(scale_dtype):
    weight = random_weight()
    config = WeightQuantConfig(scheme="ternary", scale_dtype=scale_dtype)

    _, scale, offset = quantize_weight(weight, config)

    expected = rounded(4 / 3 * weight.abs().mean(dim=1), scale_dtype)
    assert offset is None
    assert scale.dtype == weight.dtype
    assert torch.equal(scale, expected)


def test_ternary_codes_thresholds():
    weight = random_weight()
    config = WeightQuantConfig(scheme="ternary", scale_dtype="float32")

    codes, scale, _ = quantize_weight(weight, config)

    ratio = weight / scale.unsqueeze(1)
    assert torch.equal(codes[ratio.abs() < 0.5], torch.zeros_like(codes[ratio.abs() < 0.5]))
    assert torch.equal(codes[ratio > 0.5], torch.ones_like(codes[ratio > 0.5]))
    assert torch.equal(codes[ratio < -0.5], -torch.ones_like(codes[ratio < -0.5]))
    assert codes.dtype == torch.int8


def test_ternary_codes_hand_example():
    # mean |W| = 0.6, so a = 0.8 and a weight becomes 0 below |0.4|.
    weight = torch.tensor([[0.9, -0.3, 0.5, -1.0, 0.1, 0.8]])
    config = WeightQuantConfig(scheme="ternary", scale_dtype="float32")

    codes, scale, _ = quantize_weight(weight, config)

    assert torch.allclose(scale, torch.tensor([0.8]))
    assert codes.tolist() == [[1, 0, 1, -1, 0, 1]]


@pytest.mark.parametrize("scheme", ["ternary", "binary"])
def test_center_subtracts_row_mean(scheme):
    weight = random_weight()
    config = WeightQuantConfig(scheme=scheme, center=True, scale_dtype="float32")

    codes, scale, offset = quantize_weight(weight, config)

    mean = weight.mean(dim=1)
    centered = weight - mean.unsqueeze(1)
    factor = 4 / 3 if scheme == "ternary" else 1.0
    assert torch.allclose(offset, mean)
    assert torch.allclose(scale, factor * centered.abs().mean(dim=1))
    if scheme == "binary":
        assert torch.equal(codes, torch.where(centered >= 0, 1, -1).to(torch.int8))


def test_center_offset_rounded_to_scale_dtype():
    weight = random_weight()
    config = WeightQuantConfig(scheme="ternary", center=True, scale_dtype="bfloat16")

    _, _, offset = quantize_weight(weight, config)

    assert torch.equal(offset, rounded(weight.mean(dim=1), "bfloat16"))


def test_center_off_ignores_row_mean():
    weight = random_weight() + 1.0  # every row mean far from 0
    config = WeightQuantConfig(scheme="binary", center=False, scale_dtype="float32")

    codes, scale, offset = quantize_weight(weight, config)

    assert offset is None
    assert torch.allclose(scale, weight.abs().mean(dim=1))
    assert torch.equal(codes, torch.where(weight >= 0, 1, -1).to(torch.int8))


@pytest.mark.parametrize("scale_dtype", list(STORAGE_DTYPES))
def test_binary_scale_per_row(scale_dtype):
    weight = random_weight()
    config = WeightQuantConfig(scheme="binary", scale_dtype=scale_dtype)

    codes, scale, _ = quantize_weight(weight, config)

    assert torch.equal(scale, rounded(weight.abs().mean(dim=1), scale_dtype))
    assert torch.equal(codes, torch.where(weight >= 0, 1, -1).to(torch.int8))


def test_twn_threshold_and_scale():
    weight = random_weight()
    config = WeightQuantConfig(scheme="twn", scale_dtype="float32")

    codes, scale, _ = quantize_weight(weight, config)

    threshold = 0.7 * weight.abs().mean(dim=1, keepdim=True)
    nonzero = weight.abs() > threshold
    expected_scale = (weight.abs() * nonzero).sum(dim=1) / nonzero.sum(dim=1)
    assert torch.equal(codes, (torch.sign(weight) * nonzero).to(torch.int8))
    assert torch.allclose(scale, expected_scale)


def test_bwn_scale_and_signs():
    weight = random_weight()
    config = WeightQuantConfig(scheme="bwn", scale_dtype="float32")

    codes, scale, _ = quantize_weight(weight, config)

    assert torch.allclose(scale, weight.abs().mean(dim=1))
    assert torch.equal(codes, torch.where(weight >= 0, 1, -1).to(torch.int8))


def test_absmean_one_scale_per_tensor():
    weight = random_weight()
    config = WeightQuantConfig(scheme="absmean", scale_dtype="float32")

    codes, scale, _ = quantize_weight(weight, config)

    expected_scale = weight.abs().mean()
    assert scale.shape == (weight.shape[0],)
    assert torch.allclose(scale, expected_scale.expand(weight.shape[0]))
    assert torch.equal(codes, torch.round(torch.clamp(weight / expected_scale, -1, 1)).to(torch.int8))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_codes_in_allowed_set(scheme):
    weight = random_weight(rows=16, columns=64)
    config = WeightQuantConfig(scheme=scheme)

    codes, _, _ = quantize_weight(weight, config)

    allowed = {-1, 1} if config.scheme.is_binary else {-1, 0, 1}
    assert set(codes.unique().tolist()) <= allowed


@pytest.mark.parametrize("scheme", SCHEMES)
def test_fake_quantize_matches_dequantize(scheme):
    weight = random_weight()
    config = WeightQuantConfig(scheme=scheme)

    codes, scale, offset = quantize_weight(weight, config)

    assert torch.equal(fake_quantize_weight(weight, config), dequantize_weight(codes, scale, offset, weight.dtype))


def test_dequantize_adds_offset():
    codes = torch.tensor([[1, 0, -1], [1, 1, -1]], dtype=torch.int8)
    scale = torch.tensor([0.5, 2.0])
    offset = torch.tensor([0.25, -1.0])

    weight = dequantize_weight(codes, scale, offset, torch.float32)

    assert weight.tolist() == [[0.75, 0.25, -0.25], [1.0, 1.0, -3.0]]


@pytest.mark.parametrize("scheme", ["ternary", "twn", "absmean"])
def test_zero_row_dequantizes_to_zero(scheme):
    weight = random_weight()
    weight[2] = 0.0
    config = WeightQuantConfig(scheme=scheme)

    codes, scale, offset = quantize_weight(weight, config)

    dequantized = dequantize_weight(codes, scale, offset, torch.float32)
    if scheme != "absmean":
        assert torch.equal(codes[2], torch.zeros_like(codes[2]))
    assert torch.equal(dequantized[2], torch.zeros_like(dequantized[2]))


@pytest.mark.parametrize("scheme", ["binary", "bwn"])
def test_zero_row_binary_has_zero_scale(scheme):
    weight = random_weight()
    weight[1] = 0.0

    codes, scale, offset = quantize_weight(weight, WeightQuantConfig(scheme=scheme))

    assert scale[1].item() == 0.0
    assert torch.equal(dequantize_weight(codes, scale, offset, torch.float32)[1], torch.zeros(weight.shape[1]))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_straight_through_gradient_identity(scheme):
    weight = random_weight().requires_grad_(True)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))

    (fake_quantize_weight(weight, WeightQuantConfig(scheme=scheme)) * upstream).sum().backward()

    assert torch.equal(weight.grad, upstream)


@pytest.mark.parametrize("scheme", ["ternary", "binary"])
@pytest.mark.parametrize("center", [False, True], ids=["uncentered", "centered"])
def test_clipped_gradient_mask(scheme, center):
    weight = random_weight().requires_grad_(True)
    config = WeightQuantConfig(scheme=scheme, center=center, clip_gradient=True)
    upstream = torch.randn(weight.shape, generator=torch.Generator().manual_seed(1))

    (fake_quantize_weight(weight, config) * upstream).sum().backward()

    _, scale, offset = quantize_weight(weight, config)
    centered = weight.detach() if offset is None else weight.detach() - offset.unsqueeze(1)
    inside = centered.abs() < scale.unsqueeze(1)
    assert torch.equal(weight.grad, upstream * inside)
    assert bool((~inside).any())  # the mask is not trivially all ones


def test_fake_quantize_without_grad_has_no_graph():
    weight = random_weight()

    result = fake_quantize_weight(weight, WeightQuantConfig())

    assert result.grad_fn is None


# Activation quantizers


def signed_activations(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, 16, generator=generator) * torch.tensor([0.1, 3.0, 40.0, 1.0, 7.0]).view(1, 5, 1)


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_error_bound_per_token(bits):
    x = signed_activations()
    quantizer = ActivationQuantizer(bits, QuantPoint.INPUT)

    with torch.no_grad():
        quantized = quantizer(x)

    levels = 2 ** (bits - 1) - 1
    half_step = x.abs().amax(dim=-1, keepdim=True) / levels / 2
    assert bool(((quantized - x).abs() <= half_step * (1 + 1e-5)).all())


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_levels_count(bits):
    x = signed_activations()
    quantizer = ActivationQuantizer(bits, QuantPoint.INPUT)

    with torch.no_grad():
        quantized = quantizer(x)

    scale = x.abs().amax(dim=-1, keepdim=True) / (2 ** (bits - 1) - 1)
    codes = quantized / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert int(codes.round().abs().max()) == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_independent_of_batch(bits):
    x = signed_activations()
    quantizer = ActivationQuantizer(bits, QuantPoint.INPUT)

    with torch.no_grad():
        whole = quantizer(x)
        first_token = quantizer(x[:, :1])

    assert torch.equal(whole[:, :1], first_token)


@pytest.mark.parametrize("bits", [8, 4])
def test_probs_quantizer_unsigned(bits):
    probs = torch.softmax(signed_activations(), dim=-1)
    quantizer = ActivationQuantizer(bits, QuantPoint.PROBS)

    with torch.no_grad():
        quantized = quantizer(probs)

    levels = 2**bits - 1
    half_step = probs.amax(dim=-1, keepdim=True) / levels / 2
    assert not bool(quantizer.signed)
    assert quantizer.levels_above_zero == levels
    assert bool((quantized >= 0).all())
    assert bool(((quantized - probs).abs() <= half_step * (1 + 1e-5)).all())


def test_dynamic_zero_token_stays_zero():
    x = torch.zeros(1, 2, 8)
    quantizer = ActivationQuantizer(8, QuantPoint.INPUT)

    with torch.no_grad():
        quantized = quantizer(x)

    assert torch.equal(quantized, x)


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_straight_through_gradient(bits):
    x = signed_activations().requires_grad_(True)

    ActivationQuantizer(bits, QuantPoint.INPUT)(x).sum().backward()

    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("bits", [2, 1])
def test_learned_raises_before_initialize(bits):
    quantizer = ActivationQuantizer(bits, QuantPoint.INPUT)
    quantizer.name = "model.layers.0.mlp.up_proj.input_quantizer"

    with pytest.raises(RuntimeError, match=r"model\.layers\.0\.mlp\.up_proj\.input_quantizer.*calibrate"):
        quantizer(torch.randn(2, 4))


@pytest.mark.parametrize("bits", [2, 1])
def test_learned_initial_alpha_signed(bits):
    samples = signed_activations()
    quantizer = ActivationQuantizer(bits, QuantPoint.INPUT)

    quantizer.initialize_from(samples)

    expected = 2 * samples.abs().mean() / math.sqrt(1)
    assert bool(quantizer.initialized)
    assert bool(quantizer.signed)
    assert torch.allclose(quantizer.alpha.detach(), expected)


def test_learned_initial_alpha_non_negative():
    samples = torch.relu(signed_activations())
    quantizer = ActivationQuantizer(2, QuantPoint.INPUT)

    quantizer.initialize_from(samples)

    expected = 4 * samples.abs().mean() / math.sqrt(2)
    assert not bool(quantizer.signed)
    assert quantizer.levels_above_zero == 2
    assert torch.allclose(quantizer.alpha.detach(), expected)


def test_learned_2bit_signed_levels():
    quantizer = ActivationQuantizer(2, QuantPoint.INPUT)
    quantizer.initialize_from(signed_activations())
    quantizer.alpha.data.fill_(0.5)
    x = torch.tensor([[0.3, -1.2, 0.05, 0.7, -0.2]])

    with torch.no_grad():
        quantized = quantizer(x)

    assert quantized.tolist() == [[0.5, -0.5, 0.0, 0.5, -0.0]]


def test_learned_1bit_signed_levels():
    quantizer = ActivationQuantizer(1, QuantPoint.INPUT)
    quantizer.initialize_from(signed_activations())
    quantizer.alpha.data.fill_(0.5)
    x = torch.tensor([[0.3, -1.2, 0.0, 0.7, -0.2]])

    with torch.no_grad():
        quantized = quantizer(x)

    assert quantized.tolist() == [[0.5, -0.5, 0.5, 0.5, -0.5]]


def test_learned_2bit_unsigned_levels():
    quantizer = ActivationQuantizer(2, QuantPoint.PROBS)
    quantizer.initialize_from(torch.rand(4, 8))
    quantizer.alpha.data.fill_(0.4)
    x = torch.tensor([[0.1, 0.45, 0.9, 2.0, 0.0]])

    with torch.no_grad():
        quantized = quantizer(x)

    assert torch.allclose(quantized, torch.tensor([[0.0, 0.4, 0.8, 0.8, 0.0]]))


def test_lsq_alpha_gradient_signed_2bit():
    # x / alpha = [0.6, -2.4, 0.1, 1.4]: inside the clip range the gradient is
    # round(x / alpha) - x / alpha (0.4 and -0.1), outside it is the clip level (-1 and +1).
    # The sum 0.3 is scaled by 1 / sqrt(numel * Qp) = 1 / sqrt(4 * 1).
    quantizer = ActivationQuantizer(2, QuantPoint.INPUT)
    quantizer.initialize_from(signed_activations())
    quantizer.alpha.data.fill_(0.5)
    x = torch.tensor([0.3, -1.2, 0.05, 0.7], requires_grad=True)

    quantizer(x).sum().backward()

    assert quantizer.alpha.grad.item() == pytest.approx(0.3 / math.sqrt(4), abs=1e-6)
    assert x.grad.tolist() == [1.0, 0.0, 1.0, 0.0]


def test_lsq_alpha_gradient_unsigned_2bit():
    # x / alpha = [0.25, 1.125, 2.25, 5.0] with levels {0, 1, 2}: -0.25 - 0.125 + 2 + 2 = 3.625,
    # scaled by 1 / sqrt(4 * 2).
    quantizer = ActivationQuantizer(2, QuantPoint.PROBS)
    quantizer.initialize_from(torch.rand(4, 8))
    quantizer.alpha.data.fill_(0.4)
    x = torch.tensor([0.1, 0.45, 0.9, 2.0], requires_grad=True)

    quantizer(x).sum().backward()

    assert quantizer.alpha.grad.item() == pytest.approx(3.625 / math.sqrt(8), abs=1e-6)
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_lsq_alpha_gradient_signed_1bit():
    # x / alpha = [0.6, -2.4, -0.2, 1.4]: sign - x / alpha inside (0.4, -0.8), clip level outside.
    quantizer = ActivationQuantizer(1, QuantPoint.INPUT)
    quantizer.initialize_from(signed_activations())
    quantizer.alpha.data.fill_(0.5)
    x = torch.tensor([0.3, -1.2, -0.1, 0.7], requires_grad=True)

    quantizer(x).sum().backward()

    expected = (0.4 - 1.0 - 0.8 + 1.0) / math.sqrt(4)
    assert quantizer.alpha.grad.item() == pytest.approx(expected, abs=1e-6)


def test_observer_passes_input_through():
    quantizer = ActivationQuantizer(2, QuantPoint.INPUT)
    seen = []
    quantizer.observer = lambda module, x: seen.append(x)
    x = torch.randn(3, 4)

    result = quantizer(x)

    assert result is x
    assert len(seen) == 1


# Validation of settings


@pytest.mark.parametrize(
    ("make", "value"),
    [
        (lambda: WeightQuantConfig(scheme="quaternary"), "'quaternary'"),
        (lambda: WeightQuantConfig(packing="sparse"), "'sparse'"),
        (lambda: WeightQuantConfig(scale_dtype="int8"), "'int8'"),
        (lambda: ActivationQuantConfig(bits=3), "3"),
        (lambda: ActivationQuantConfig(bits=16), "16"),
        (lambda: QuantizationConfig(embeddings="drop"), "'drop'"),
        (lambda: QuantizationConfig(head="fp8"), "'fp8'"),
        (lambda: QuantizationConfig(fp_dtype="float64"), "'float64'"),
        (lambda: QuantizationConfig(keep_full_precision=["layers.(0"]), "'layers.(0'"),
        (lambda: DistillSettings(batch_size=0), "--batch-size 0"),
        (lambda: DistillSettings(steps=-1), "--steps -1"),
        (lambda: DistillSettings(lr=0.0), "--lr 0.0"),
        (lambda: DistillSettings(warmup_ratio=1.0), "--warmup-ratio 1.0"),
        (lambda: DistillSettings(temperature=0.0), "--temperature 0.0"),
    ],
    ids=[
        "scheme",
        "packing",
        "scale-dtype",
        "acts-3",
        "acts-16",
        "embeddings",
        "head",
        "fp-dtype",
        "keep-pattern",
        "batch-size",
        "steps",
        "lr",
        "warmup-ratio",
        "temperature",
    ],
)
def test_invalid_setting_names_value(make, value):
    with pytest.raises(ValueError) as raised:
        make()

    assert value in str(raised.value)


def test_center_with_absmean_raises():
    with pytest.raises(ValueError, match="absmean"):
        WeightQuantConfig(scheme="absmean", center=True)


def test_config_dict_round_trip():
    config = QuantizationConfig(
        weights=WeightQuantConfig(scheme="binary", center=True, scale_dtype="bfloat16"),
        activations=ActivationQuantConfig(bits=2, attention=False),
        embeddings="quantize",
        keep_full_precision=[r"layers\.0\."],
    )

    restored = QuantizationConfig.from_dict(config.to_dict())

    assert restored == config


def test_keeps_matches_by_search():
    config = QuantizationConfig(keep_full_precision=[r"layers\.1\.mlp"])

    assert config.keeps("model.layers.1.mlp.up_proj")
    assert not config.keeps("model.layers.11.mlp.up_proj")


@pytest.mark.parametrize(("bits", "learned"), [(None, False), (8, False), (4, False), (2, True), (1, True)])
def test_activation_config_learned(bits, learned):
    assert ActivationQuantConfig(bits=bits).learned is learned
