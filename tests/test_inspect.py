"""`tbquant inspect`: figures of real exports of tiny models, checked against the files on disk.

Each case compresses a tiny model with two distillation steps and exports it. The tests compare
the figures that `inspect_export` reads from headers with byte counts of the loaded tensors,
the file size, the pipeline's own packing figures and the shapes of the original model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open
from support import ARCHITECTURES, compress_settings, run_cli, write_training_data
from test_cli import assert_one_line_error

import tbquant
from tbquant.inspection import inspect_export

CASES = {
    # Tied embedding and head kept in float16, 8-bit dynamic activations.
    "llama-ternary-a8": {"architecture": "llama"},
    # Quantized shared embedding (so the head is untied), centred binary weights, learned 2-bit scales.
    "bart-binary-a2": {"architecture": "bart", "weights": "binary", "acts": 2, "center": True, "embeddings": "quantize"},
    # Dense 2-bit ternary codes, the feed-forward layers kept in full precision.
    "llama-dense-keep-mlp": {"architecture": "llama", "packing": "dense", "keep_full_precision": [r"\.mlp\."]},
}


Export = tuple[str, tbquant.PipelineState, Path]


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> Callable[[str], Export]:
    """Return a function that runs a case of `CASES` once and returns the case name, the finished
    pipeline state and the export directory."""
    built: dict[str, Export] = {}

    def build(name: str) -> Export:
        if name not in built:
            case = dict(CASES[name])
            architecture = case.pop("architecture")
            model_dir = tiny_model(architecture)
            folder = tmp_path_factory.mktemp(name)
            train, valid = write_training_data(folder / "data", model_dir, ARCHITECTURES[architecture].task)
            settings = compress_settings(model_dir, folder / "export", train, valid, steps=2, **case)
            state = tbquant.run_pipeline(settings, ["load", "calibrate", "distill", "pack", "export"])
            built[name] = (name, state, folder / "export")
        return built[name]

    return build


@pytest.fixture(params=sorted(CASES))
def export(request, exports) -> Export:
    return exports(request.param)


def stored_tensors(export_dir: Path) -> dict[str, int]:
    """Return the byte count of every tensor in the export, from the loaded tensors."""
    with safe_open(str(export_dir / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name).numel() * handle.get_tensor(name).element_size() for name in handle.keys()}


def linear_modules(model: torch.nn.Module) -> list[torch.nn.Linear]:
    return [module for module in model.modules() if isinstance(module, torch.nn.Linear)]


def test_total_bytes_equal_file_size(export):
    _, _, export_dir = export
    report = inspect_export(export_dir)
    file_size = (export_dir / "model.safetensors").stat().st_size

    assert report["total"]["bytes"] == file_size
    assert sum(group["bytes"] for group in report["groups"].values()) + report["header_bytes"] == file_size


def test_group_bytes_equal_tensor_bytes(export):
    _, _, export_dir = export
    report = inspect_export(export_dir)
    tensors = stored_tensors(export_dir)

    assert sum(group["bytes"] for group in report["groups"].values()) == sum(tensors.values())
    assert sum(group["tensors"] for group in report["groups"].values()) == len(tensors)
    assert report["total"]["tensors"] == len(tensors)


def test_quantized_figures_match_pack_stage(export):
    _, state, export_dir = export
    report = inspect_export(export_dir)
    tensors = stored_tensors(export_dir)
    packed_bytes = sum(size for name, size in tensors.items() if name.endswith((".weight_packed", ".weight_scale", ".weight_offset")))

    assert report["quantized"]["bytes"] == packed_bytes
    assert report["quantized"]["bytes"] == state.info["code_bytes"] + state.info["scale_bytes"]
    assert report["quantized"]["parameters"] == state.info["quantized_weights"]
    assert report["quantized"]["bits_per_weight"] == pytest.approx(state.info["bits_per_weight"])
    assert report["quantized"]["modules"] == len(state.conversion.quantized)


def test_total_parameters_match_model(export):
    _, state, export_dir = export
    report = inspect_export(export_dir)
    # An untied head is stored as its own full-precision copy of the embedding.
    extra = state.model.get_output_embeddings().weight.numel() if state.conversion.untied else 0

    assert report["total"]["parameters"] == state.info["parameters"] + extra


def test_ratios_follow_from_figures(export):
    _, _, export_dir = export
    report = inspect_export(export_dir)

    for figures in [report["total"], report["quantized"], *report["groups"].values()]:
        if not figures["parameters"]:
            continue
        assert figures["bits_per_weight"] == pytest.approx(8 * figures["bytes"] / figures["parameters"])
        assert figures["compression_vs_fp32"] == pytest.approx(4 * figures["parameters"] / figures["bytes"])
        assert figures["compression_vs_fp16"] == pytest.approx(2 * figures["parameters"] / figures["bytes"])


@pytest.mark.parametrize("name", ["llama-ternary-a8", "llama-dense-keep-mlp"])
def test_llama_groups_match_shapes(name, exports, tiny_model):
    _, _, export_dir = exports(name)
    report = inspect_export(export_dir)
    model = transformers.AutoModel.from_pretrained(tiny_model("llama"))
    attention = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    feed_forward = sum(p.numel() for n, p in model.named_parameters() if ".mlp." in n)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    groups = report["groups"]

    assert groups["attention"]["parameters"] == attention
    assert groups["attention"]["quantized_parameters"] == attention
    assert groups["feed-forward"]["parameters"] == feed_forward
    assert groups["feed-forward"]["quantized_parameters"] == (0 if name == "llama-dense-keep-mlp" else feed_forward)
    assert groups["norms"]["parameters"] == norms
    assert groups["embeddings"]["parameters"] == model.embed_tokens.weight.numel()
    assert groups["embeddings"]["bytes"] == 2 * model.embed_tokens.weight.numel()


def test_compact_codes_take_ceil_out_in_over_5(exports, tiny_model):
    _, _, export_dir = exports("llama-ternary-a8")
    report = inspect_export(export_dir)
    # The base model without its head: every linear layer is in a decoder layer and quantized.
    model = transformers.AutoModel.from_pretrained(tiny_model("llama"))
    code_bytes = sum(math.ceil(module.out_features * module.in_features / 5) for module in linear_modules(model))
    scale_bytes = 2 * sum(module.out_features for module in linear_modules(model))

    assert report["quantized"]["bytes"] == code_bytes + scale_bytes


def test_compact_layer_bits_per_weight(exports, tiny_model):
    _, _, export_dir = exports("llama-ternary-a8")
    report = inspect_export(export_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_model("llama"))
    linear = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear) and name != "lm_head"}

    assert sorted(report["layers"]) == sorted(linear)
    for name, module in linear.items():
        weights = module.out_features * module.in_features
        figures = report["layers"][name]
        assert figures["parameters"] == weights, name
        assert figures["code_bits_per_weight"] == 8 * math.ceil(weights / 5) / weights, name
        assert figures["code_bits_per_weight"] <= 1.6 + 8 / weights, name
        assert figures["bits_per_weight"] == 8 * (math.ceil(weights / 5) + 2 * module.out_features) / weights, name


def test_layer_figures_add_up(export):
    _, _, export_dir = export
    report = inspect_export(export_dir)
    layers = report["layers"].values()

    assert sum(layer["bytes"] for layer in layers) == report["quantized"]["bytes"]
    assert sum(layer["parameters"] for layer in layers) == report["quantized"]["parameters"]


@pytest.mark.parametrize(("name", "per_byte"), [("llama-dense-keep-mlp", 4), ("bart-binary-a2", 8)])
def test_dense_and_binary_layers_pad_rows(exports, name, per_byte):
    _, state, export_dir = exports(name)
    report = inspect_export(export_dir)

    assert report["layers"]
    for module_name, figures in report["layers"].items():
        module = state.model.get_submodule(module_name)
        rows = module.weight_scale.numel()
        columns = figures["parameters"] // rows
        assert figures["code_bytes"] == rows * math.ceil(columns / per_byte), module_name


def test_full_precision_modules_listed(export):
    name, _, export_dir = export
    report = inspect_export(export_dir)
    full_precision = report["full_precision_modules"]

    if name == "llama-dense-keep-mlp":
        assert "model.layers.0.mlp.up_proj" in full_precision
        assert "model.layers.1.mlp.down_proj" in full_precision
        assert report["groups"]["feed-forward"]["quantized_parameters"] == 0
    if name == "llama-ternary-a8":
        assert full_precision == ["model.embed_tokens", "lm_head"]
    if name == "bart-binary-a2":
        assert "model.shared" not in full_precision
        assert "lm_head" in full_precision
        assert report["groups"]["embeddings"]["quantized_parameters"] > 0


def test_settings_reported(export):
    name, _, export_dir = export
    report = inspect_export(export_dir)
    expected = {
        "llama-ternary-a8": ("ternary-compact", 8, "dynamic per token", False),
        "bart-binary-a2": ("binary", 2, "learned", True),
        "llama-dense-keep-mlp": ("ternary-dense", 8, "dynamic per token", False),
    }[name]

    assert report["weights"]["layout"] == expected[0]
    assert report["activations"]["bits"] == expected[1]
    assert report["activations"]["scales"] == expected[2]
    assert report["weights"]["center"] is expected[3]
    assert report["base_model"] == ("bart" if name.startswith("bart") else "llama")


def test_cli_json_equals_library(exports):
    _, _, export_dir = exports("bart-binary-a2")

    result = run_cli("inspect", str(export_dir), "--json")

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == json.loads(json.dumps(inspect_export(export_dir)))


def test_cli_table_shows_groups(exports):
    _, _, export_dir = exports("llama-ternary-a8")

    result = run_cli("inspect", str(export_dir))

    assert result.returncode == 0, result.stderr
    for label in ("attention", "feed-forward", "embeddings", "norms", "total (model.safetensors)", "quantized layers (14)"):
        assert label in result.stdout
    assert "8-bit, dynamic per token scales" in result.stdout


def copy_export(export_dir: Path, target: Path, *, without: str | None = None) -> Path:
    """Copy an export's files into `target`, leaving out the file named `without`."""
    target.mkdir()
    for item in export_dir.iterdir():
        if item.name != without:
            (target / item.name).write_bytes(item.read_bytes())
    return target


def flip_last_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[-1] ^= 0xFF
    path.write_bytes(bytes(content))


def test_checksums_verified(exports):
    _, _, export_dir = exports("llama-ternary-a8")

    result = run_cli("inspect", str(export_dir))

    assert result.returncode == 0, result.stderr
    assert inspect_export(export_dir)["checksums"] == "verified"
    assert "weights match checksums.sha256" in result.stdout
    assert "WARNING" not in result.stderr


def test_no_verify_inspects_corrupt_copy(exports, tmp_path):
    _, _, export_dir = exports("llama-ternary-a8")
    corrupt = copy_export(export_dir, tmp_path / "corrupt")
    flip_last_byte(corrupt / "model.safetensors")

    result = run_cli("inspect", str(corrupt), "--no-verify")

    assert result.returncode == 0, result.stderr
    assert "not checked (--no-verify)" in result.stdout
    assert inspect_export(corrupt, verify=False)["checksums"] == "skipped"
    with pytest.raises(tbquant.errors.ExportError, match="SHA-256"):
        inspect_export(corrupt)


def test_export_without_checksums_warns(exports, tmp_path):
    _, _, export_dir = exports("llama-ternary-a8")
    # Exports written before tbquant listed checksums have no checksums.sha256.
    older = copy_export(export_dir, tmp_path / "older", without="checksums.sha256")

    result = run_cli("inspect", str(older))

    warnings = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 0, result.stderr
    assert len(warnings) == 1, result.stderr
    assert "WARNING" in warnings[0]
    assert "checksums.sha256" in warnings[0]
    assert "none: the export has no checksums.sha256" in result.stdout
    assert inspect_export(older)["checksums"] == "missing"


def test_table_not_cut_when_piped(exports):
    _, _, export_dir = exports("llama-ternary-a8")

    # stdout is a pipe and COLUMNS is unset, as in `tbquant inspect DIR > out.txt` from a script.
    result = run_cli("inspect", str(export_dir), env={"COLUMNS": None})

    assert result.returncode == 0, result.stderr
    total_rows = [line for line in result.stdout.splitlines() if "total (model.safetensors)" in line]
    assert len(total_rows) == 1, result.stdout
    assert "…" not in result.stdout
    assert "also q, k, v and attention probabilities" in result.stdout


def test_table_follows_columns(exports):
    _, _, export_dir = exports("llama-ternary-a8")

    result = run_cli("inspect", str(export_dir), env={"COLUMNS": "60"})

    assert result.returncode == 0, result.stderr
    assert max(len(line) for line in result.stdout.splitlines()) <= 60


# Errors


def test_not_an_export(tiny_model):
    result = run_cli("inspect", str(tiny_model("llama")))

    assert_one_line_error(result, "is not a tbquant export")


def test_truncated_weights(exports, tmp_path):
    _, _, export_dir = exports("llama-ternary-a8")
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in export_dir.iterdir():
        data = item.read_bytes()
        (broken / item.name).write_bytes(data[: len(data) // 2] if item.name == "model.safetensors" else data)

    result = run_cli("inspect", str(broken))

    assert_one_line_error(result, "model.safetensors", "corrupt")


def test_missing_weights(exports, tmp_path):
    _, _, export_dir = exports("llama-ternary-a8")
    broken = tmp_path / "no-weights"
    broken.mkdir()
    (broken / "config.json").write_bytes((export_dir / "config.json").read_bytes())

    with pytest.raises(tbquant.errors.ExportError, match="model.safetensors not found"):
        inspect_export(broken)
