"""Packed inference and the transformers integration: exports of every tiny architecture loaded
through their Auto class, compared layer by layer with the fake-quantized student, generation with
the KV cache, the error without tbquant, corrupt exports, and what loading allocates.

Exports are made by post-training quantization (load, calibrate, pack, export), which builds the
same packed modules as a distillation run in a fraction of its time.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from support import ARCHITECTURES, compress_settings, real_batch, write_training_data
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import tbquant
from tbquant.errors import ExportError
from tbquant.integrity import CHECKSUMS_NAME, write_checksums
from tbquant.nn import PackedEmbedding, PackedLinear, QuantLinear, kernels
from tbquant.nn.half import MIN_ELEMENTS, HalfStorageEmbedding, HalfStorageLinear
from tbquant.nn.linear import OUTPUT_TOLERANCE
from tbquant.pipeline.registry import get_stage
from tbquant.stages.pack import round_full_precision

AUTO_CLASS_BY_ARCHITECTURE = {
    "llama": transformers.AutoModelForCausalLM,
    "gemma": transformers.AutoModelForCausalLM,
    "gpt2": transformers.AutoModelForCausalLM,
    "bart": transformers.AutoModelForSeq2SeqLM,
    "mbart": transformers.AutoModelForSeq2SeqLM,
    "marian": transformers.AutoModelForSeq2SeqLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
    "bert": transformers.AutoModel,
    "bert-mlm": transformers.AutoModelForMaskedLM,
}


@dataclasses.dataclass
class Exported:
    """A post-training-quantized export and the fake-quantized student it was packed from."""

    architecture: str
    output: Path
    student: nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase


def export_ptq(model_dir: Path, folder: Path, architecture: str, **options) -> Exported:
    task = ARCHITECTURES[architecture].task
    train, valid = write_training_data(folder / "data", model_dir, task)
    settings = compress_settings(model_dir, folder / "export", train, valid, **options)
    state = tbquant.run_pipeline(settings, ["load", "calibrate"])
    state.model.eval()
    round_full_precision(state.model, settings.quantization.fp_dtype)
    student = copy.deepcopy(state.model)
    for name in ("pack", "export"):
        get_stage(name)().run(state)
    return Exported(architecture, folder / "export", student, state.tokenizer)


@pytest.fixture(scope="module", params=list(AUTO_CLASS_BY_ARCHITECTURE))
def exported(request, tiny_model, tmp_path_factory) -> Exported:
    return export_ptq(tiny_model(request.param), tmp_path_factory.mktemp(request.param), request.param)


def load_auto(exported: Exported) -> nn.Module:
    return AUTO_CLASS_BY_ARCHITECTURE[exported.architecture].from_pretrained(exported.output)


def test_auto_class_loads_packed_model(exported):
    model = load_auto(exported)

    assert type(model).__name__ == ARCHITECTURES[exported.architecture].model_class
    assert type(model.hf_quantizer).__name__ == "TbquantHfQuantizer"
    packed = [module for module in model.modules() if isinstance(module, PackedLinear)]
    assert packed
    assert not any(isinstance(module, QuantLinear) for module in model.modules())


def test_layers_equal_fake_quantized(exported):
    """Each packed layer, run on the input its fake-quantized layer saw, gives the same output."""
    model = load_auto(exported)
    batch = real_batch(exported.tokenizer, ARCHITECTURES[exported.architecture].task)
    records = {}

    def record(name):
        def hook(module, inputs, output):
            records[name] = (inputs[0].detach(), output.detach())

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in exported.student.named_modules() if isinstance(module, QuantLinear)]
    with torch.no_grad():
        exported.student(**batch)
    for handle in handles:
        handle.remove()

    assert records
    for name, (inputs, expected) in records.items():
        with torch.no_grad():
            actual = model.get_submodule(name)(inputs)
        relative = (actual - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        assert relative <= OUTPUT_TOLERANCE, name


def test_logits_close_to_fake_quantized(exported):
    """Whole-model outputs agree closely: float rounding can move an activation code by one step,
    and later layers carry that on, so this bound is looser than the per-layer one."""
    model = load_auto(exported)
    batch = real_batch(exported.tokenizer, ARCHITECTURES[exported.architecture].task)
    with torch.no_grad():
        expected = exported.student(**batch)
        actual = model(**batch)
    expected = getattr(expected, "logits", None) if getattr(expected, "logits", None) is not None else expected.last_hidden_state
    actual = getattr(actual, "logits", None) if getattr(actual, "logits", None) is not None else actual.last_hidden_state

    mean_difference = (actual - expected).abs().mean().item()
    assert mean_difference <= 1e-2 * expected.abs().mean().item()


def test_load_quantized_same_as_auto(exported):
    model, tokenizer = tbquant.load_quantized(exported.output)
    auto = load_auto(exported)
    batch = real_batch(tokenizer, ARCHITECTURES[exported.architecture].task)
    with torch.no_grad():
        first = model(**batch)
        second = auto(**batch)
    key = "logits" if getattr(first, "logits", None) is not None else "last_hidden_state"

    assert torch.equal(getattr(first, key), getattr(second, key))


def test_no_float_weight_of_quantized_layers(exported):
    """After loading, a quantized layer contains its planar codes, scales and row sums only."""
    model = load_auto(exported)
    for name, module in model.named_modules():
        if not isinstance(module, PackedLinear):
            continue
        tensors = dict(module.named_parameters(recurse=False)) | dict(module.named_buffers(recurse=False))
        assert module.weight_packed is None, name
        assert module.weight_planes.dtype == torch.uint8, name
        largest_float = max(tensor.numel() for tensor in tensors.values() if tensor.is_floating_point())
        assert largest_float <= module.out_features, name
        rows, columns = kernels.padded_shape(module.out_features, module.in_features, module.code_bits)
        assert module.weight_planes.numel() == rows * columns * module.code_bits // 8, name


class _AllocationRecorder(TorchDispatchMode):
    """Record the shape and dtype of every tensor that an operation creates off the meta device."""

    def __init__(self) -> None:
        super().__init__()
        self.created: set[tuple[tuple[int, ...], torch.dtype]] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for tensor in result if isinstance(result, (tuple, list)) else [result]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.created.add((tuple(tensor.shape), tensor.dtype))
        return result


@pytest.mark.parametrize("architecture", ["llama", "bart"])
def test_loading_allocates_no_float_weight(tiny_model, tmp_path, architecture):
    """No float tensor with the shape of a quantized layer's weight is created while loading."""
    exported = export_ptq(tiny_model(architecture), tmp_path, architecture)
    recorder = _AllocationRecorder()
    with recorder:
        model = load_auto(exported)

    quantized_shapes = {(module.out_features, module.in_features) for module in model.modules() if isinstance(module, PackedLinear)}
    quantized_shapes |= {(columns, rows) for rows, columns in quantized_shapes}
    float_shapes = {shape for shape, dtype in recorder.created if dtype.is_floating_point}
    assert recorder.created
    assert not quantized_shapes & float_shapes


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
def test_generate_with_cache(tiny_model, tmp_path, architecture):
    exported = export_ptq(tiny_model(architecture), tmp_path, architecture)
    model = load_auto(exported)
    inputs = exported.tokenizer(["It is a truth universally"], return_tensors="pt")
    settings = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": exported.tokenizer.eos_token_id}

    cached = model.generate(**inputs, use_cache=True, return_dict_in_generate=True, **settings)
    uncached = model.generate(**inputs, use_cache=False, **settings)

    assert cached.sequences.shape[1] > inputs["input_ids"].shape[1]
    assert cached.past_key_values.get_seq_length() == cached.sequences.shape[1] - 1
    assert torch.equal(cached.sequences, uncached)


def test_generate_seq2seq(tiny_model, tmp_path):
    exported = export_ptq(tiny_model("bart"), tmp_path, "bart")
    model = load_auto(exported)
    inputs = exported.tokenizer(["in the beginning god created the heaven"], return_tensors="pt", return_token_type_ids=False)

    generated = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)

    assert generated.shape[0] == 1
    assert 1 < generated.shape[1] <= 6


@pytest.fixture(scope="module")
def llama_export(tiny_model, tmp_path_factory) -> Exported:
    return export_ptq(tiny_model("llama"), tmp_path_factory.mktemp("llama-corrupt"), "llama")


def test_missing_tbquant_raises(llama_export):
    """In a process where tbquant cannot be imported, transformers raises an error naming it."""
    script = (
        "import sys\n"
        "sys.modules['tbquant'] = None\n"
        "try:\n"
        "    import tbquant\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('tbquant is still importable')\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(llama_export.output)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)

    assert result.returncode != 0
    assert "ValueError" in result.stderr
    assert "pip install tbquant" in result.stderr


def corrupt_copy(exported: Exported, folder: Path, change) -> Path:
    """Copy the export to `folder` and rewrite its weights with `change(tensors)`."""
    target = folder / "export"
    target.mkdir(parents=True)
    for file in exported.output.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    tensors = load_file(str(target / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})
    # Without checksums, both loading paths skip the checksum check that would name the changed
    # file first. These tests cover the structural checks.
    (target / CHECKSUMS_NAME).unlink()
    return target


def assert_one_line_export_error(path: Path, expected: str) -> None:
    for load in (lambda: tbquant.load_quantized(path, verify=False), lambda: transformers.AutoModelForCausalLM.from_pretrained(path)):
        with pytest.raises(ExportError) as error:
            load()
        assert "\n" not in str(error.value)
        assert expected in str(error.value)


def test_missing_tensor_error(llama_export, tmp_path):
    path = corrupt_copy(llama_export, tmp_path, lambda tensors: tensors.pop("model.layers.1.mlp.up_proj.weight_packed"))

    assert_one_line_export_error(path, "missing tensor model.layers.1.mlp.up_proj.weight_packed")


def test_wrong_shape_error(llama_export, tmp_path):
    def change(tensors):
        name = "model.layers.0.self_attn.q_proj.weight_packed"
        tensors[name] = tensors[name][:-1].contiguous()

    path = corrupt_copy(llama_export, tmp_path, change)

    assert_one_line_export_error(path, "tensor model.layers.0.self_attn.q_proj.weight_packed has shape")


def test_truncated_file_error(llama_export, tmp_path):
    path = corrupt_copy(llama_export, tmp_path, lambda tensors: None)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    assert_one_line_export_error(path, "is not a readable safetensors file")


def test_newer_format_error(llama_export, tmp_path):
    path = corrupt_copy(llama_export, tmp_path, lambda tensors: None)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"]["format_version"] = 99
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")

    with pytest.raises(ValueError, match="upgrade tbquant"):
        transformers.AutoModelForCausalLM.from_pretrained(path)


def mapped_files() -> set[str]:
    """Return the paths of the files memory-mapped into this process (Linux)."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return {line.split(maxsplit=5)[5].strip() for line in maps if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_weights_file_unmapped_after_load(exported):
    """Tensors are copied out of the memory-mapped file, so it does not stay resident."""
    model = load_auto(exported)

    assert str((exported.output / "model.safetensors").resolve()) not in mapped_files()
    assert model is not None


def test_large_16bit_weights_stay_16bit(exported):
    """Large full-precision embeddings and heads keep their stored float16 and compute in float32."""
    model = load_auto(exported)
    half_storage = [module for module in model.modules() if isinstance(module, (HalfStorageEmbedding, HalfStorageLinear))]

    assert model.dtype == torch.float32
    for module in half_storage:
        assert module.weight.dtype == torch.float16
        assert module.weight.numel() >= MIN_ELEMENTS
    if exported.architecture == "llama":
        # The tiny Llama's tied 49152 x 32 embedding and head stay one float16 tensor.
        assert isinstance(model.get_input_embeddings(), HalfStorageEmbedding)
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_save_pretrained_explains_alternatives(exported, tmp_path, caplog):
    model = load_auto(exported)

    with caplog.at_level("WARNING", logger="tbquant.hf_quantizer"), pytest.raises(ValueError):
        model.save_pretrained(tmp_path / "copy")

    assert "tbquant push-to-hub" in caplog.text
    assert not (tmp_path / "copy" / "model.safetensors").exists()


# Exports of format 1: ternary-compact codes padded to whole bytes in every row.


def stream_to_codes(stream: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Decode a format-2 ternary-compact stream: 5 base-3 digits per byte, the first the least significant."""
    digits = (stream.long().unsqueeze(1) // torch.tensor([1, 3, 9, 27, 81])) % 3
    return (digits.view(-1)[: out_features * in_features] - 1).view(out_features, in_features)


def pack_rows_format1(codes: torch.Tensor) -> torch.Tensor:
    """Encode codes as format-1 exports stored them: each row padded with code 1 to a multiple of 5."""
    unsigned = nn.functional.pad(codes + 1, (0, -codes.shape[1] % 5), value=1)
    digits = unsigned.view(codes.shape[0], -1, 5)
    return (digits * torch.tensor([1, 3, 9, 27, 81])).sum(dim=-1).to(torch.uint8)


def write_format1_copy(exported: Exported, folder: Path) -> Path:
    """Copy a ternary-compact export to `folder`, rewritten as format 1 (checksums included)."""
    model, _ = tbquant.load_quantized(exported.output)

    def to_row_padded(tensors):
        for name in [name for name in tensors if name.endswith(".weight_packed")]:
            module = model.get_submodule(name.removesuffix(".weight_packed"))
            in_features = module.embedding_dim if isinstance(module, PackedEmbedding) else module.in_features
            out_features = tensors[name.replace("weight_packed", "weight_scale")].numel()
            tensors[name] = pack_rows_format1(stream_to_codes(tensors[name], out_features, in_features))

    target = corrupt_copy(exported, folder, to_row_padded)
    config = json.loads((target / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"]["format_version"] = 1
    (target / "config.json").write_text(json.dumps(config), encoding="utf-8")
    write_checksums(target)
    return target


def model_outputs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        outputs = model(**batch)
    return outputs.logits if getattr(outputs, "logits", None) is not None else outputs.last_hidden_state


@pytest.mark.parametrize(("architecture", "options"), [("llama", {}), ("bart", {"embeddings": "quantize"})], ids=["llama", "bart-embeddings"])
def test_format1_export_loads_identically(tiny_model, tmp_path, architecture, options):
    exported = export_ptq(tiny_model(architecture), tmp_path / "current", architecture, **options)
    old = write_format1_copy(exported, tmp_path / "format1")
    current, tokenizer = tbquant.load_quantized(exported.output)
    loaded, _ = tbquant.load_quantized(old)
    batch = real_batch(tokenizer, ARCHITECTURES[architecture].task)

    packed = [module for module in loaded.modules() if isinstance(module, (PackedLinear, PackedEmbedding))]
    stored = load_file(str(old / "model.safetensors"))
    assert packed
    assert {module.format_version for module in packed} == {1}
    for name, tensor in stored.items():
        if name.endswith(".weight_packed"):
            module = loaded.get_submodule(name.removesuffix(".weight_packed"))
            in_features = module.embedding_dim if isinstance(module, PackedEmbedding) else module.in_features
            assert tensor.shape == (stored[name.replace("weight_packed", "weight_scale")].numel(), math.ceil(in_features / 5)), name
    assert torch.equal(model_outputs(loaded, batch), model_outputs(current, batch))


def test_format1_export_state_dict_keeps_format1(llama_export, tmp_path):
    old = write_format1_copy(llama_export, tmp_path)
    loaded, _ = tbquant.load_quantized(old)
    stored = load_file(str(old / "model.safetensors"))

    state = loaded.state_dict()

    for name, tensor in stored.items():
        if name.endswith(".weight_packed"):
            assert torch.equal(state[name], tensor), name


def test_stream_labelled_format1_error(llama_export, tmp_path):
    path = corrupt_copy(llama_export, tmp_path, lambda tensors: None)
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"]["format_version"] = 1
    (path / "config.json").write_text(json.dumps(config), encoding="utf-8")

    assert_one_line_export_error(path, "weight_packed has shape")


def test_invalid_code_byte_error(llama_export, tmp_path):
    """A ternary-compact byte above 242 packs no codes: loading names the tensor."""

    def change(tensors):
        name = "model.layers.0.self_attn.q_proj.weight_packed"
        tensors[name][0] = 255

    path = corrupt_copy(llama_export, tmp_path, change)

    assert_one_line_export_error(path, "tensor model.layers.0.self_attn.q_proj.weight_packed of the export is invalid")
