"""A hub id resolves through the Hugging Face cache, and works offline from it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from support import run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _populate_cache(hf_home: Path, repo_id: str, model_dir: Path) -> None:
    """Lay out `model_dir` in the cache as `hf download` leaves a model repository."""
    repo = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for path in model_dir.iterdir():
        shutil.copy2(path, snapshot / path.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)


def test_cached_hub_id_compresses_offline(tiny_model, tmp_path):
    hf_home = tmp_path / "hf"
    _populate_cache(hf_home, "tbquant-tests/tiny-llama", tiny_model("llama"))
    output = tmp_path / "export"

    result = run_cli(
        "compress", "tbquant-tests/tiny-llama", "--steps", "1", "--batch-size", "2", "--max-length", "32",
        "--eval-batches", "1", "--calibration-batches", "1", "--output", str(output),
        env={"HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"},
    )

    assert result.returncode == 0, result.stderr
    card = (output / "README.md").read_text(encoding="utf-8")
    assert "base_model: tbquant-tests/tiny-llama" in card
    config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    assert config["quantization_config"]["quant_method"] == "tbquant"


def test_uncached_hub_id_fails_offline(tmp_path):
    result = run_cli(
        "compress", "tbquant-tests/not-there", "--output", str(tmp_path / "export"),
        env={"HF_HOME": str(tmp_path / "empty-hf"), "HF_HUB_OFFLINE": "1"},
    )

    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2
    assert errors[-1].startswith("Error: model 'tbquant-tests/not-there' is not in the local Hugging Face cache")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "export").exists()
