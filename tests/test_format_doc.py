"""docs/format.md against the code: its worked examples, its field table and the dtypes it states.

The worked examples are the ```text blocks of the page. A block with a `layout:` line is a
packing example (of the current export format unless a `format:` line names another, of one
row unless a `shape:` line gives `out in`), a block with a `scheme:` line a quantization example
of one row of weights.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from support import compress_settings, model_output, real_batch, write_training_data

import tbquant
from tbquant import packing
from tbquant.config import QuantizationConfig, WeightQuantConfig
from tbquant.nn.convert import ConversionReport
from tbquant.pipeline.settings import Task
from tbquant.quantizers.weight import quantize_weight
from tbquant.serialization import FORMAT_VERSION, build_quantization_config

FORMAT_DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"


def text_blocks() -> list[dict[str, str]]:
    """Return every ```text block of the page as a map from each line's key to the rest of the line."""
    blocks = re.findall(r"```text\n(.*?)```", FORMAT_DOC.read_text(encoding="utf-8"), flags=re.DOTALL)
    parsed = []
    for block in blocks:
        fields = {}
        for line in block.strip().splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        parsed.append(fields)
    return parsed


def numbers(text: str, kind: type = int) -> list:
    return [kind(item) for item in text.replace("|", " ").split()]


PACKING_EXAMPLES = [block for block in text_blocks() if "layout" in block]
SCALE_EXAMPLES = [block for block in text_blocks() if "scheme" in block]


def example_format(example: dict[str, str]) -> int:
    return int(example.get("format", FORMAT_VERSION))


def example_id(example: dict[str, str]) -> str:
    return f"{example['layout']}-format{example_format(example)}"


def test_every_layout_has_example():
    current = [block["layout"] for block in PACKING_EXAMPLES if example_format(block) == FORMAT_VERSION]
    row_padded = [block["layout"] for block in PACKING_EXAMPLES if example_format(block) == packing.ROW_PADDED_FORMAT_VERSION]

    assert sorted(current) == sorted(layout.value for layout in packing.Layout)
    assert row_padded == [packing.Layout.TERNARY_COMPACT.value]
    assert len(SCALE_EXAMPLES) == 3


def padded_codes(values: torch.Tensor, layout: packing.Layout, format_version: int) -> list[int]:
    """Return the codes of `values` in stored order with the padding codes the layout adds."""
    per_byte = layout.values_per_byte
    padding = 0 if layout == packing.Layout.BINARY else 1
    rows = [values.reshape(-1).tolist()] if packing.is_stream(layout, format_version) else values.tolist()
    codes = []
    for row in rows:
        if layout == packing.Layout.BINARY:
            row_codes = [1 if value > 0 else 0 for value in row]
        else:
            row_codes = [value + 1 for value in row]
        codes += row_codes + [padding] * (-len(row_codes) % per_byte)
    return codes


@pytest.mark.parametrize("example", PACKING_EXAMPLES, ids=[example_id(block) for block in PACKING_EXAMPLES])
def test_packing_example_matches_code(example):
    layout = packing.Layout(example["layout"])
    format_version = example_format(example)
    flat_values = numbers(example["values"])
    out_features, in_features = numbers(example["shape"]) if "shape" in example else (1, len(flat_values))
    values = torch.tensor(flat_values, dtype=torch.int8).view(out_features, in_features)
    stored_bytes = numbers(example["bytes"])
    groups = [numbers(group) for group in example["codes"].split("|")]
    packed = torch.tensor(stored_bytes, dtype=torch.uint8).view(packing.packed_shape(out_features, in_features, layout, format_version))

    assert [len(numbers(row)) for row in example["values"].split("|")] == [in_features] * out_features
    assert packing.pack(values, layout, format_version).reshape(-1).tolist() == stored_bytes
    assert torch.equal(packing.unpack(packed, layout, out_features, in_features, format_version), values)
    assert all(len(group) == layout.values_per_byte for group in groups)
    assert len(groups) == len(stored_bytes)
    assert [code for group in groups for code in group] == padded_codes(values, layout, format_version)


@pytest.mark.parametrize("example", SCALE_EXAMPLES, ids=[f"{block['scheme']}-center-{block['center']}" for block in SCALE_EXAMPLES])
def test_scale_example_matches_code(example):
    config = WeightQuantConfig(scheme=example["scheme"], center=example["center"] == "true")
    weights = torch.tensor([numbers(example["weights"], float)])
    layout = packing.Layout.BINARY if config.scheme.is_binary else packing.Layout.TERNARY_COMPACT

    codes, scale, offset = quantize_weight(weights, config)

    assert scale.item() == float(example["scale"])
    assert codes[0].tolist() == numbers(example["values"])
    assert packing.pack(codes, layout).reshape(-1).tolist() == numbers(example["bytes"])
    if config.center:
        assert offset.item() == float(example["offset"])
    else:
        assert offset is None


def test_field_table_lists_every_field():
    text = FORMAT_DOC.read_text(encoding="utf-8")
    section = text.split("## quantization_config", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `([a-z_.]+)` \|", section, flags=re.MULTILINE))
    fields = build_quantization_config(QuantizationConfig(), Task.CAUSAL_LM, ConversionReport(), {})
    expected = set()
    for name, value in fields.items():
        # Nested settings are documented per key; `tied` is a map of tensor names.
        if isinstance(value, dict) and name != "tied":
            expected.update(f"{name}.{key}" for key in value)
        else:
            expected.add(name)

    assert documented == expected


def test_float32_scales_stored_as_float32(tiny_model, tmp_path):
    # The format stores weight scales in scale_dtype even when fp_dtype is narrower.
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path / "data", model_dir, "causal-lm")
    settings = compress_settings(model_dir, tmp_path / "export", train, valid, steps=1)
    settings.quantization.weights.scale_dtype = "float32"
    state = tbquant.run_pipeline(settings, ["load", "calibrate", "distill", "pack", "export"])

    with safe_open(str(tmp_path / "export" / "model.safetensors"), framework="pt") as handle:
        dtypes = {name: handle.get_slice(name).get_dtype() for name in handle.keys()}
    loaded, tokenizer = tbquant.load_quantized(tmp_path / "export")
    batch = real_batch(tokenizer, "causal-lm")

    assert {dtype for name, dtype in dtypes.items() if name.endswith(".weight_scale")} == {"F32"}
    assert dtypes["model.norm.weight"] == "F16"
    assert torch.equal(model_output(loaded, batch), model_output(state.model, batch))
