"""Bad inputs to every command: one table of cases, run in-process through the CLI entry point.

Each case must end with its exit code, exactly one `Error:` line that names the bad value, no
traceback, and the files on disk (workspace, model and data) byte for byte as they were.
docs/bad-inputs.md lists every case with the message it gets, and each case checks that its
message matches the one documented. After changing a message, regenerate the page with

    TBQUANT_UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py

To cover a new command, add its cases to `CASES`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from support import TouchOnUnpickle, write_training_data

from tbquant.cli._errors import run_cli
from tbquant.cli.main import app

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
UPDATE_DOC = os.environ.get("TBQUANT_UPDATE_BAD_INPUTS_DOC") == "1"

# Added after `compress MODEL` in every compress case, before the case's own options (which win
# when they repeat one), so that a case that gets as far as training finishes in seconds.
SHORT_RUN = ("--steps", "0", "--batch-size", "2", "--max-length", "32", "--calibration-batches", "1", "--eval-batches", "1")


@dataclasses.dataclass
class Context:
    """What a case's `prepare` function may use: the workspace, the tiny model and its data."""

    workspace: Path
    model: Path
    train: Path
    valid: Path
    monkeypatch: pytest.MonkeyPatch


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        name: the case id, in the test name and the docs.
        args: the command line after `tbquant`, with `{work}` (an empty workspace, also the
            current directory), `{model}` (a tiny saved Llama), `{train}` and `{valid}` (its data).
            `compress` cases get `--output {work}/export` unless they set `--output`.
        names: texts the error line must contain, such as the bad value and the option.
        files: files to write into the workspace first, by name (str or bytes contents).
        prepare: a function that sets up anything else (copied models, the environment).
        exit_code: the expected exit status.
    """

    name: str
    args: tuple[str, ...]
    names: tuple[str, ...]
    files: dict[str, str | bytes] = dataclasses.field(default_factory=dict)
    prepare: Callable[[Context], None] | None = None
    exit_code: int = 2


# Preparations


def copy_model(context: Context, name: str = "model") -> Path:
    return Path(shutil.copytree(context.model, context.workspace / name))


def truncate_weights(context: Context) -> None:
    weights = copy_model(context) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def remove_weights(context: Context) -> None:
    (copy_model(context) / "model.safetensors").unlink()


def write_config(config: str) -> Callable[[Context], None]:
    def prepare(context: Context) -> None:
        (copy_model(context) / "config.json").write_text(config, encoding="utf-8")

    return prepare


def pickle_with_code(context: Context) -> None:
    """Replace the weights with a pytorch_model.bin whose unpickling would create a file."""
    folder = copy_model(context)
    (folder / "model.safetensors").unlink()
    torch.save({"model.norm.weight": TouchOnUnpickle(context.workspace / "model" / "executed")}, folder / "pytorch_model.bin")


def remote_code(context: Context) -> None:
    folder = context.workspace / "model"
    folder.mkdir()
    (folder / "custom.py").write_text("raise SystemExit('custom code ran')\n", encoding="utf-8")
    config = {"model_type": "tbquant-custom", "auto_map": {"AutoConfig": "custom.Config", "AutoModelForCausalLM": "custom.Model"}}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def truncated_gguf() -> bytes:
    """A GGUF v3 header announcing 1 tensor and 5 metadata entries, cut off inside the first entry."""
    return b"GGUF" + (3).to_bytes(4, "little") + (1).to_bytes(8, "little") + (5).to_bytes(8, "little") + (20).to_bytes(8, "little") + b"general"


def closed_loopback_endpoint() -> str:
    """Return an http URL on the loopback interface where no server listens."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def hub_unreachable(context: Context) -> None:
    """Leave offline mode; the hub endpoint is a closed loopback port in every case."""
    context.monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        context.monkeypatch.delenv(name, raising=False)


def read_only_output(context: Context) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write to read-only directories")
    folder = context.workspace / "read-only"
    folder.mkdir()
    folder.chmod(0o555)


DiskUsage = namedtuple("DiskUsage", "total used free")


def full_disk(context: Context) -> None:
    context.monkeypatch.setattr(shutil, "disk_usage", lambda path: DiskUsage(10**10, 10**10 - 2_000_000, 2_000_000))


def existing_output(context: Context) -> None:
    (context.workspace / "export").mkdir()
    (context.workspace / "export" / "notes.txt").write_text("keep me", encoding="utf-8")


# The cases


_MODEL = ("compress", "{model}")
_DATA = ("--data", "{train}", "--eval-data", "{valid}")

CASES = [
    # Models: paths, files and content
    Case("model-missing", ("compress", "{work}/missing-model"), ("missing-model", "not found")),
    Case("model-is-file", ("compress", "{work}/notes.txt"), ("notes.txt", "is a file"), files={"notes.txt": "text"}),
    Case("model-dir-without-config", ("compress", "{work}/empty"), ("empty", "config.json"), prepare=lambda c: (c.workspace / "empty").mkdir()),
    Case("config-not-json", ("compress", "{work}/model"), ("{work}/model/config.json", "not valid JSON"), prepare=write_config("{not json")),
    Case("config-unknown-model-type", ("compress", "{work}/model"), ("{work}/model", "no-such-type"), prepare=write_config('{"model_type": "no-such-type"}')),
    Case("weights-missing", ("compress", "{work}/model"), ("{work}/model",), prepare=remove_weights),
    Case("weights-truncated", ("compress", "{work}/model", *_DATA), ("{work}/model", "truncated or corrupt"), prepare=truncate_weights),
    Case("weights-pickle-with-code", ("compress", "{work}/model", *_DATA), ("{work}/model", "rejected", "pickled objects"), prepare=pickle_with_code),
    Case("remote-code-without-flag", ("compress", "{work}/model"), ("{work}/model", "--trust-remote-code"), prepare=remote_code),
    Case("gguf-missing", ("compress", "{work}/absent.gguf"), ("absent.gguf", "not found")),
    Case("gguf-no-magic", ("compress", "{work}/model.gguf"), ("model.gguf", "magic"), files={"model.gguf": b"this is not a GGUF file\n"}),
    Case("gguf-bad-version", ("compress", "{work}/model.gguf"), ("model.gguf", "v2 and v3"), files={"model.gguf": b"GGUF" + bytes(range(256)) * 4}),
    Case("gguf-truncated", ("compress", "{work}/model.gguf"), ("model.gguf", "truncated"), files={"model.gguf": truncated_gguf()}),
    Case("nothing-to-quantize", (*_MODEL, *_DATA, "--keep", ".*"), ("nothing to quantize", "--keep")),
    # Environment
    Case("hub-id-offline-uncached", ("compress", "tbquant-tests/no-such-model"), ("'tbquant-tests/no-such-model'", "not in the local Hugging Face cache")),
    Case("hub-id-unreachable", ("compress", "tbquant-tests/no-such-model"), ("'tbquant-tests/no-such-model'", "cannot be reached"), prepare=hub_unreachable),
    Case("output-read-only", (*_MODEL, "--output", "{work}/read-only/export"), ("read-only", "writable"), prepare=read_only_output),
    Case("disk-full", (*_MODEL, *_DATA), ("not enough disk space", "MB is free", "--output"), prepare=full_disk),
    # Data files
    Case("data-missing", (*_MODEL, "--data", "{work}/absent.txt"), ("absent.txt", "not found")),
    Case("data-empty", (*_MODEL, "--data", "{work}/empty.txt"), ("empty.txt", "contains no text"), files={"empty.txt": "\n\n"}),
    Case("data-not-utf8", (*_MODEL, "--data", "{work}/latin1.txt"), ("latin1.txt", "UTF-8"), files={"latin1.txt": "caf\u00e9\n".encode("latin-1")}),
    Case("data-suffix", (*_MODEL, "--data", "{work}/table.parquet"), ("table.parquet", "unsupported"), files={"table.parquet": b"PAR1"}),
    Case("data-empty-directory", (*_MODEL, "--data", "{work}/corpus"), ("corpus", "has no"), prepare=lambda c: (c.workspace / "corpus").mkdir()),
    Case("jsonl-syntax", (*_MODEL, "--data", "{work}/broken.jsonl"), ("broken.jsonl", "line 2", "invalid JSON"), files={"broken.jsonl": '{"text": "a"}\n{"text": \n'}),
    Case("jsonl-not-object", (*_MODEL, "--data", "{work}/list.jsonl"), ("list.jsonl", "line 1", "list"), files={"list.jsonl": "[1, 2]\n"}),
    Case("jsonl-no-text-column", (*_MODEL, "--data", "{work}/qa.jsonl"), ("qa.jsonl", "answer, question"), files={"qa.jsonl": '{"question": "q", "answer": "a"}\n'}),
    Case("jsonl-text-not-string", (*_MODEL, "--data", "{work}/number.jsonl"), ("number.jsonl", "'text'", "string"), files={"number.jsonl": '{"text": 5}\n'}),
    Case("csv-no-text-column", (*_MODEL, "--data", "{work}/table.csv"), ("table.csv", "row 2", "id, label"), files={"table.csv": "id,label\n1,a\n"}),
    Case("eval-data-missing", (*_MODEL, "--data", "{train}", "--eval-data", "{work}/absent.jsonl"), ("absent.jsonl", "--eval-data")),
    Case("eval-data-empty", (*_MODEL, "--data", "{train}", "--eval-data", "{work}/empty.jsonl"), ("empty.jsonl", "contains no text"), files={"empty.jsonl": "\n"}),
    # Options and option combinations
    Case("weights-scheme", (*_MODEL, "--weights", "foo"), ("--weights", "'foo'", "ternary")),
    Case("acts-bits", (*_MODEL, "--acts", "3"), ("--acts", "3", "none")),
    Case("acts-word", (*_MODEL, "--acts", "eight"), ("--acts", "'eight'")),
    Case("packing", (*_MODEL, "--packing", "sparse"), ("--packing", "'sparse'")),
    Case("embeddings-policy", (*_MODEL, "--embeddings", "drop"), ("--embeddings", "'drop'")),
    Case("head-policy", (*_MODEL, "--head", "fp8"), ("--head", "'fp8'")),
    Case("fp-dtype", (*_MODEL, "--fp-dtype", "float64"), ("--fp-dtype", "'float64'")),
    Case("scale-dtype", (*_MODEL, "--scale-dtype", "int8"), ("--scale-dtype", "'int8'")),
    Case("keep-regex", (*_MODEL, "--keep", "layers.(0"), ("--keep", "'layers.(0'")),
    Case("lr-zero", (*_MODEL, "--lr", "0"), ("--lr", "0")),
    Case("batch-size-zero", (*_MODEL, "--batch-size", "0"), ("--batch-size", "0")),
    Case("steps-negative", (*_MODEL, "--steps", "-1"), ("--steps", "-1")),
    Case("warmup-ratio", (*_MODEL, "--warmup-ratio", "1.5"), ("--warmup-ratio", "1.5")),
    Case("temperature-zero", (*_MODEL, "--temperature", "0"), ("--temperature", "0")),
    Case("steps-not-integer", (*_MODEL, "--steps", "abc"), ("'abc'", "--steps")),
    Case("unknown-option", (*_MODEL, "--no-such-option", "1"), ("--no-such-option",)),
    Case("absmean-with-center", (*_MODEL, "--weights", "absmean", "--center"), ("absmean", "centering")),
    # Output directory
    Case("output-is-file", (*_MODEL, "--output", "{work}/export"), ("export", "is a file"), files={"export": "a file"}),
    Case("output-not-empty", (*_MODEL, *_DATA), ("export", "--overwrite"), prepare=existing_output),
    Case("output-parent-missing", (*_MODEL, "--output", "{work}/absent/export"), ("absent", "does not exist")),
    # Recipes
    Case("recipe-missing", (*_MODEL, "--recipe", "{work}/absent.yaml"), ("absent.yaml", "not found")),
    Case("recipe-directory", (*_MODEL, "--recipe", "{work}"), ("is a directory", "--recipe")),
    Case("recipe-suffix", (*_MODEL, "--recipe", "{work}/recipe.json"), ("recipe.json", "unsupported"), files={"recipe.json": "{}"}),
    Case("recipe-not-utf8", (*_MODEL, "--recipe", "{work}/r.yaml"), ("r.yaml", "UTF-8"), files={"r.yaml": "steps: caf\u00e9\n".encode("latin-1")}),
    Case("recipe-yaml-syntax", (*_MODEL, "--recipe", "{work}/r.yaml"), ("r.yaml", "invalid recipe file"), files={"r.yaml": "stages: [load\n"}),
    Case("recipe-python-tag", (*_MODEL, "--recipe", "{work}/r.yaml"), ("r.yaml", "python/object/apply"), files={"r.yaml": "stages: !!python/object/apply:os.getcwd []\n"}),
    Case("recipe-unknown-key", (*_MODEL, "--recipe", "{work}/r.toml"), ("r.toml", "unknown keys steps"), files={"r.toml": "steps = 3\n"}),
    Case("recipe-stages-not-list", (*_MODEL, "--recipe", "{work}/r.yaml"), ("r.yaml", "'stages'"), files={"r.yaml": "stages: load\n"}),
    Case("recipe-unknown-stage", (*_MODEL, "--recipe", "{work}/r.yaml"), ("unknown stage 'nope'",), files={"r.yaml": "stages: [load, nope]\n"}),
    Case("recipe-unknown-option", (*_MODEL, "--recipe", "{work}/r.yaml"), ("'stepz'",), files={"r.yaml": "options: {stepz: 2}\n"}),
    Case("recipe-bad-value", (*_MODEL, "--recipe", "{work}/r.yaml"), ("--weights", "'foo'"), files={"r.yaml": "options: {weights: foo}\n"}),
    Case("recipe-export-unpacked", (*_MODEL, *_DATA, "--recipe", "{work}/r.yaml"), ("export", "pack"), files={"r.yaml": "stages: [load, export]\n"}),
    # Other commands
    Case("stages-unknown-option", ("stages", "--all"), ("--all",)),
    Case("unknown-command", ("quantize", "{model}"), ("quantize",)),
]


# Running a case


@pytest.fixture(scope="module")
def model_files(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path]:
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("bad-inputs-data"), model_dir, "causal-lm")
    return model_dir, train, valid


def command_line(case: Case, values: dict[str, str]) -> list[str]:
    args = [argument.format(**values) for argument in case.args]
    if args[0] == "compress":
        if "--output" not in args:
            args += ["--output", f"{values['work']}/export"]
        args[2:2] = SHORT_RUN
    return args


def file_bytes(*folders: Path) -> dict[str, bytes | None]:
    """Return every path below `folders` with its bytes (None for a directory)."""
    state: dict[str, bytes | None] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            state[str(path)] = None if path.is_dir() else path.read_bytes()
    return state


def normalize(message: str, values: dict[str, str]) -> str:
    """Replace the test's temporary paths in `message` by their placeholder names."""
    message = re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:PORT", message)
    for name in ("work", "model", "train", "valid"):
        for form in (str(Path(values[name]).resolve()), values[name]):
            message = message.replace(form, name.upper())
    return message


def run_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tbquant", *args])
    code = run_cli(app)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, model_files, tmp_path, monkeypatch, capsys):
    model_dir, train, valid = model_files
    workspace = tmp_path / "work"
    workspace.mkdir()
    values = {"work": str(workspace), "model": str(model_dir), "train": str(train), "valid": str(valid)}
    for name, content in case.files.items():
        path = workspace / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    # No case may reach the real hub, whatever the environment of the test run.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_loopback_endpoint())
    if case.prepare is not None:
        case.prepare(Context(workspace, model_dir, train, valid, monkeypatch))
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("COLUMNS", "200")
    before = file_bytes(workspace, model_dir, train.parent)

    code, stdout, stderr = run_in_process(command_line(case, values), monkeypatch, capsys)

    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert code == case.exit_code, stderr
    assert "Traceback" not in stdout + stderr
    assert len(errors) == 1, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1] == errors[0]
    assert "this is a bug in tbquant" not in errors[0]
    for name in case.names:
        assert name.format(**values) in errors[0]
    assert file_bytes(workspace, model_dir, train.parent) == before

    message = normalize(errors[0].removeprefix("Error: "), values)
    if UPDATE_DOC:
        record_message(case, message, code)
    assert documented_messages().get(case.name) == message, "docs/bad-inputs.md is out of date: see this file's docstring"


# docs/bad-inputs.md


DOC_HEADER = """# Bad inputs and the messages they get

Every case below is a test in `tests/test_bad_inputs.py`: the command exits with the status
shown, prints exactly one `Error:` line (the message below) and no traceback, and changes no
file on disk. In the commands, `MODEL` is a tiny saved Llama model, `TRAIN` and `VALID` its
training and validation text, and `WORK` an empty directory that is also the current
directory. Every `compress` command also gets `--output WORK/export`, unless it sets
`--output`, and options that keep the run short (`--steps 0 --batch-size 2 --max-length 32
--calibration-batches 1 --eval-batches 1`). The table is generated by the tests
(`TBQUANT_UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py`), which also check that it
matches what the commands print.

| case | command | exit | message |
| --- | --- | --- | --- |
"""

_ROW = re.compile(r"^\| `([^`]+)` \| .* \| (\d+) \| (.*) \|$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def documented_messages() -> dict[str, str]:
    """Return the message of each case in docs/bad-inputs.md, by case name."""
    if not DOC.is_file():
        return {}
    messages = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        match = _ROW.match(line)
        if match:
            messages[match.group(1)] = match.group(3).replace("\\|", "|")
    return messages


def record_message(case: Case, message: str, code: int) -> None:
    """Write `message` into the row of `case` in docs/bad-inputs.md, keeping the other rows."""
    messages = documented_messages()
    messages[case.name] = message
    rows = []
    for entry in CASES:
        placeholders = {"work": "WORK", "model": "MODEL", "train": "TRAIN", "valid": "VALID"}
        command = " ".join(argument.format(**placeholders) for argument in entry.args)
        documented = messages.get(entry.name, "(not yet recorded)")
        rows.append(f"| `{entry.name}` | `tbquant {_cell(command)}` | {entry.exit_code} | {_cell(documented)} |\n")
    DOC.write_text(DOC_HEADER + "".join(rows), encoding="utf-8")


def test_doc_lists_every_case():
    assert list(documented_messages()) == [case.name for case in CASES]


def test_at_least_thirty_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 30
