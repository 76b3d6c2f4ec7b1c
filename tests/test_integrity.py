"""Weight checksums: written by the export, checked by `sha256sum -c` and by `load_quantized`."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from pathlib import Path

import pytest
import transformers
from support import packed_state, write_training_data

import tbquant
from tbquant.errors import ExportError
from tbquant.integrity import CHECKSUMS_NAME, verify_export
from tbquant.stages.export import ExportStage


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory) -> Path:
    """A tiny Llama export, shared read-only by the tests (they copy it before changing it)."""
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("integrity-data"), model_dir, "causal-lm")
    output = tmp_path_factory.mktemp("integrity") / "export"
    ExportStage().run(packed_state(model_dir, train, valid, output))
    return output


@pytest.fixture
def export_copy(exported, tmp_path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_checksums_list_weights(exported):
    lines = (exported / CHECKSUMS_NAME).read_text(encoding="utf-8").splitlines()
    digest = hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()

    assert lines == [f"{digest}  model.safetensors"]


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="sha256sum is not installed")
def test_sha256sum_accepts_checksums(exported):
    result = subprocess.run(["sha256sum", "-c", CHECKSUMS_NAME], cwd=exported, capture_output=True, text=True, check=False)

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "model.safetensors: OK"


def test_verify_accepts_export(exported):
    verify_export(exported)


def test_load_rejects_flipped_byte(export_copy):
    weights = export_copy / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 10)  # inside tensor data, so safetensors itself cannot notice

    with pytest.raises(ExportError) as raised:
        tbquant.load_quantized(export_copy)

    assert str(raised.value) == f"{weights} is corrupt (its SHA-256 checksum does not match {export_copy / CHECKSUMS_NAME}): export it again"


def test_auto_class_rejects_flipped_byte(export_copy):
    """transformers' own loading path checks the checksums too, where the export has them."""
    weights = export_copy / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 10)

    with pytest.raises(ExportError) as raised:
        transformers.AutoModelForCausalLM.from_pretrained(export_copy)

    assert str(raised.value).startswith(f"{weights} is corrupt")


def test_load_without_verify_skips_check(export_copy):
    weights = export_copy / "model.safetensors"
    flip_byte(weights, weights.stat().st_size - 10)

    model, _ = tbquant.load_quantized(export_copy, verify=False, load_tokenizer=False)

    assert model is not None


def test_load_rejects_missing_checksums(export_copy):
    (export_copy / CHECKSUMS_NAME).unlink()

    with pytest.raises(ExportError, match=f"{CHECKSUMS_NAME} not found.*verify=False"):
        tbquant.load_quantized(export_copy)


def test_verify_rejects_unlisted_weights(export_copy):
    shutil.copy(export_copy / "model.safetensors", export_copy / "extra.safetensors")

    with pytest.raises(ExportError, match="extra.safetensors is not listed"):
        verify_export(export_copy)


def test_verify_rejects_missing_weights(export_copy):
    (export_copy / "model.safetensors").unlink()

    with pytest.raises(ExportError, match="model.safetensors not found: the export is incomplete"):
        verify_export(export_copy)


@pytest.mark.parametrize("line", ["not a checksum line", f"{'0' * 64}  ../model.safetensors"], ids=["format", "path"])
def test_verify_rejects_bad_checksum_line(export_copy, line):
    (export_copy / CHECKSUMS_NAME).write_text(line + "\n", encoding="utf-8")

    with pytest.raises(ExportError, match="line 1"):
        verify_export(export_copy)
