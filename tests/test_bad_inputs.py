"""Bad inputs to every command: one table of cases, run in-process through the CLI entry point.

Each case must end with its exit code, exactly one `Error:` line that names the bad value, no
traceback, and the files on disk (workspace, model, data and export) byte for byte as they were.
docs/bad-inputs.md lists every case with the message it gets, and each case checks that its
message matches the one documented. After changing a message, regenerate the page with

    TBQUANT_UPDATE_BAD_INPUTS_DOC=1 pytest tests/test_bad_inputs.py

To cover a new command, add its cases to `CASES`.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import re
import shlex
import shutil
import socket
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from support import TouchOnUnpickle, compress_settings, write_training_data

from tbquant import run_pipeline
from tbquant.cli._errors import run_cli
from tbquant.cli.main import app
from tbquant.integrity import write_checksums

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
UPDATE_DOC = os.environ.get("TBQUANT_UPDATE_BAD_INPUTS_DOC") == "1"

# Added after `compress MODEL` in every compress case, before the case's own options (which win
# when they repeat one), so that a case that gets as far as training finishes in seconds.
SHORT_RUN = ("--steps", "0", "--batch-size", "2", "--max-length", "32", "--calibration-batches", "1", "--eval-batches", "1")


@dataclasses.dataclass
class Context:
    """What a case's `prepare` function may use: the workspace, the tiny model, its data and its export."""

    workspace: Path
    model: Path
    train: Path
    valid: Path
    export: Path
    monkeypatch: pytest.MonkeyPatch


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input.

    Args:
        name: the case id, in the test name and the docs.
        args: the command line after `tbquant`, with `{work}` (an empty workspace, also the
            current directory), `{model}` (a tiny saved Llama), `{train}` and `{valid}` (its data),
            `{export}` (a tbquant export of the tiny Llama).
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


def copy_export(context: Context) -> Path:
    return Path(shutil.copytree(context.export, context.workspace / "tiny-export"))


def damage_export(damage: Callable[[Path], None]) -> Callable[[Context], None]:
    """Return a preparation that copies the export to WORK/tiny-export and applies `damage` to the copy."""

    def prepare(context: Context) -> None:
        damage(copy_export(context))

    return prepare


def truncate_export_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def flip_last_weight_byte(folder: Path) -> None:
    """Change the last byte of the tensor data, so that the header still opens but the checksum differs."""
    weights = folder / "model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-1] ^= 0xFF
    weights.write_bytes(bytes(content))


def drop_norm_tensor(folder: Path) -> None:
    """Remove the final norm's weight from model.safetensors and list the new file's checksum."""
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    write_checksums(folder)


def add_unlisted_weights(folder: Path) -> None:
    """Add a second weight file that checksums.sha256 does not list."""
    shutil.copyfile(folder / "model.safetensors", folder / "model-extra.safetensors")


def write_export_config(config: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        (folder / "config.json").write_text(config, encoding="utf-8")

    return damage


def newer_format_version(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"]["format_version"] = 99
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def remove_files(*names: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        for name in names:
            (folder / name).unlink()

    return damage


def empty_stdin(context: Context) -> None:
    context.monkeypatch.setattr(sys, "stdin", io.StringIO(" \n\n"))


# A token in the format of Hugging Face user tokens; no server ever receives it.
FAKE_TOKEN = "hf_tbquantBadInputsToken0123456789ab"


def no_token(context: Context) -> None:
    """Leave offline mode, unset HF_TOKEN and point HF_HOME at an empty directory, so that no
    stored login exists."""
    hub_unreachable(context)
    home = context.workspace / "hf-home"
    home.mkdir()
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        context.monkeypatch.delenv(name, raising=False)
    context.monkeypatch.setenv("HF_HOME", str(home))
    context.monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(home))
    context.monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(home / "token"))
    context.monkeypatch.setattr(huggingface_hub.constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))


def fake_token(context: Context) -> None:
    context.monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)


def fake_token_and(damage: Callable[[Path], None]) -> Callable[[Context], None]:
    """Return a preparation that leaves offline mode, sets a token and damages a copy of the export,
    so that only the export's checks stand between the command and the (unreachable) Hub."""

    def prepare(context: Context) -> None:
        hub_unreachable(context)
        fake_token(context)
        damage(copy_export(context))

    return prepare


def fake_token_and_export_copy(context: Context) -> None:
    fake_token(context)
    copy_export(context)


# The cases


# Two translation pairs for the eval cases.
PAIRS = '{"source": "Good morning.", "target": "Buenos dias."}\n{"source": "Thank you.", "target": "Gracias."}\n'
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
    # inspect
    Case("inspect-missing", ("inspect", "{work}/absent"), ("{work}/absent", "not found")),
    Case("inspect-is-file", ("inspect", "{work}/notes.txt"), ("notes.txt", "is a file"), files={"notes.txt": "text"}),
    Case("inspect-not-export", ("inspect", "{model}"), ("{model}", "not a tbquant export")),
    Case("inspect-config-not-json", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export/config.json", "not valid JSON"), prepare=damage_export(write_export_config("{not json"))),
    Case("inspect-config-not-object", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export", "not a tbquant export"), prepare=damage_export(write_export_config("[]"))),
    Case("inspect-newer-format", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export", "format 99", "upgrade tbquant"), prepare=damage_export(newer_format_version)),
    Case("inspect-weights-missing", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export/model.safetensors", "not found"), prepare=damage_export(remove_files("model.safetensors"))),
    # --no-verify skips the checksums, so the safetensors header is what fails.
    Case("inspect-weights-truncated", ("inspect", "{work}/tiny-export", "--no-verify"), ("{work}/tiny-export/model.safetensors", "corrupt"), prepare=damage_export(truncate_export_weights)),
    Case("inspect-checksum-mismatch", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export/model.safetensors", "SHA-256"), prepare=damage_export(flip_last_weight_byte)),
    Case("inspect-weights-unlisted", ("inspect", "{work}/tiny-export"), ("{work}/tiny-export/model-extra.safetensors", "not listed"), prepare=damage_export(add_unlisted_weights)),
    Case("inspect-unknown-option", ("inspect", "{export}", "--csv"), ("--csv",)),
    # generate
    Case("generate-empty-prompt", ("generate", "{export}", ""), ("empty prompt", "PROMPT")),
    Case("generate-empty-stdin", ("generate", "{export}", "-"), ("empty prompt", "standard input"), prepare=empty_stdin),
    Case("generate-missing", ("generate", "{work}/absent", "Hello"), ("{work}/absent", "not found")),
    Case("generate-not-export", ("generate", "{model}", "Hello"), ("{model}", "not a tbquant export")),
    Case("generate-no-tokenizer", ("generate", "{work}/tiny-export", "Hello"), ("{work}/tiny-export", "tokenizer"), prepare=damage_export(remove_files("tokenizer.json", "tokenizer_config.json"))),
    Case("generate-checksum-mismatch", ("generate", "{work}/tiny-export", "Hello"), ("{work}/tiny-export/model.safetensors", "SHA-256"), prepare=damage_export(flip_last_weight_byte)),
    Case("generate-checksums-missing", ("generate", "{work}/tiny-export", "Hello"), ("{work}/tiny-export/checksums.sha256", "not found"), prepare=damage_export(remove_files("checksums.sha256"))),
    Case("generate-tensor-missing", ("generate", "{work}/tiny-export", "Hello"), ("{work}/tiny-export", "model.norm.weight"), prepare=damage_export(drop_norm_tensor)),
    Case("generate-temperature-zero", ("generate", "{export}", "Hello", "--temperature", "0"), ("--temperature", "0")),
    Case("generate-top-p", ("generate", "{export}", "Hello", "--top-p", "1.5"), ("--top-p", "1.5")),
    Case("generate-max-new-tokens", ("generate", "{export}", "Hello", "--max-new-tokens", "0"), ("--max-new-tokens", "0")),
    Case("generate-greedy-with-temperature", ("generate", "{export}", "Hello", "--greedy", "--temperature", "0.7"), ("--temperature", "--greedy")),
    Case("generate-device", ("generate", "{export}", "Hello", "--device", "tpu0"), ("--device", "'tpu0'")),
    # eval
    Case("eval-model-missing", ("eval", "{work}/absent", "--data", "{valid}"), ("{work}/absent", "not found")),
    Case("eval-teacher-missing", ("eval", "{export}", "--data", "{valid}", "--teacher", "{work}/absent"), ("{work}/absent", "--teacher")),
    # The teacher's path is checked before MODEL, whose corrupt weights would fail to load.
    Case("eval-teacher-checked-first", ("eval", "{work}/tiny-export", "--data", "{valid}", "--teacher", "{work}/absent"), ("--teacher", "{work}/absent", "not found"), prepare=damage_export(flip_last_weight_byte)),
    Case("eval-teacher-is-file", ("eval", "{export}", "--data", "{valid}", "--teacher", "{work}/notes.txt"), ("--teacher", "notes.txt", "is a file"), files={"notes.txt": "text"}),
    Case("eval-checksum-mismatch", ("eval", "{work}/tiny-export", "--data", "{valid}"), ("{work}/tiny-export/model.safetensors", "SHA-256"), prepare=damage_export(flip_last_weight_byte)),
    Case("eval-file-missing", ("eval", "{export}", "--data", "{work}/absent.jsonl"), ("absent.jsonl", "not found", "--data")),
    Case("eval-without-data", ("eval", "{export}"), ("--data",)),
    Case("eval-file-empty", ("eval", "{export}", "--data", "{work}/empty.jsonl"), ("empty.jsonl", "contains no text"), files={"empty.jsonl": "\n"}),
    Case("eval-file-no-columns", ("eval", "{export}", "--data", "{work}/qa.jsonl"), ("qa.jsonl", "answer, question"), files={"qa.jsonl": '{"question": "q", "answer": "a"}\n'}),
    Case("eval-unknown-metric", ("eval", "{export}", "--data", "{valid}", "--metric", "accuracy"), ("--metric", "'accuracy'", "perplexity")),
    Case("eval-metric-needs-pairs", ("eval", "{export}", "--data", "{valid}", "--metric", "bleu"), ("bleu", "source/target pairs")),
    Case("eval-agreement-without-teacher", ("eval", "{export}", "--data", "{valid}", "--metric", "agreement"), ("agreement", "--teacher")),
    Case("eval-template-without-source", ("eval", "{export}", "--data", "{work}/pairs.jsonl", "--prompt-template", "Translate:"), ("--prompt-template", "'Translate:'", "{{source}}"), files={"pairs.jsonl": PAIRS}),
    Case("eval-few-shot-too-many", ("eval", "{export}", "--data", "{work}/pairs.jsonl", "--few-shot", "5"), ("--few-shot 5", "has 2"), files={"pairs.jsonl": PAIRS}),
    Case("eval-limit-zero", ("eval", "{export}", "--data", "{valid}", "--limit", "0"), ("--limit", "0")),
    Case("eval-stride-over-window", ("eval", "{export}", "--data", "{valid}", "--window", "16", "--stride", "32"), ("--stride", "32", "16")),
    Case("eval-update-card-not-export", ("eval", "{model}", "--data", "{valid}", "--update-card"), ("{model}", "--update-card")),
    Case("eval-json-folder-missing", ("eval", "{export}", "--data", "{valid}", "--json", "{work}/absent/scores.json"), ("{work}/absent", "--json")),
    # push-to-hub: the Hub endpoint is a closed port on 127.0.0.1, and no case gets as far as a request
    Case("push-repo-id", ("push-to-hub", "{export}", "tester/bad--name"), ("'tester/bad--name'", "repository id")),
    Case("push-repo-id-three-parts", ("push-to-hub", "{export}", "a/b/c"), ("'a/b/c'", "repository id")),
    Case("push-no-token", ("push-to-hub", "{export}", "tester/tiny"), ("no Hugging Face token", "HF_TOKEN", "--token"), prepare=no_token),
    Case("push-offline", ("push-to-hub", "{export}", "tester/tiny"), ("HF_HUB_OFFLINE",), prepare=fake_token),
    Case("push-offline-save-card", ("push-to-hub", "{work}/tiny-export", "tester/tiny", "--save-card"), ("HF_HUB_OFFLINE",), prepare=fake_token_and_export_copy),
    Case("push-missing", ("push-to-hub", "{work}/absent", "tester/tiny", "--dry-run"), ("{work}/absent", "not found")),
    Case("push-is-file", ("push-to-hub", "{work}/notes.txt", "tester/tiny", "--dry-run"), ("notes.txt", "is a file"), files={"notes.txt": "text"}),
    Case("push-not-export", ("push-to-hub", "{model}", "tester/tiny", "--dry-run"), ("{model}", "not a tbquant export")),
    Case("push-config-not-json", ("push-to-hub", "{work}/tiny-export", "tester/tiny", "--dry-run"), ("config.json", "{work}/tiny-export", "not valid JSON"), prepare=damage_export(write_export_config("{not json"))),
    Case("push-weights-truncated", ("push-to-hub", "{work}/tiny-export", "tester/tiny"), ("model.safetensors", "{work}/tiny-export", "corrupt"), prepare=fake_token_and(truncate_export_weights)),
    Case("push-checksum-mismatch", ("push-to-hub", "{work}/tiny-export", "tester/tiny"), ("{work}/tiny-export/model.safetensors", "SHA-256"), prepare=fake_token_and(flip_last_weight_byte)),
    Case("push-tensor-missing", ("push-to-hub", "{work}/tiny-export", "tester/tiny", "--dry-run"), ("{work}/tiny-export", "model.norm.weight"), prepare=damage_export(drop_norm_tensor)),
    Case("push-no-tokenizer", ("push-to-hub", "{work}/tiny-export", "tester/tiny", "--dry-run"), ("{work}/tiny-export", "tokenizer"), prepare=damage_export(remove_files("tokenizer.json", "tokenizer_config.json"))),
    Case("push-empty-revision", ("push-to-hub", "{export}", "tester/tiny", "--revision", "", "--dry-run"), ("--revision", "''")),
    Case("push-empty-commit-message", ("push-to-hub", "{export}", "tester/tiny", "--commit-message", " ", "--dry-run"), ("--commit-message",)),
    # Other commands
    Case("stages-unknown-option", ("stages", "--all"), ("--all",)),
    Case("unknown-command", ("quantize", "{model}"), ("quantize",)),
]


# Running a case


@pytest.fixture(scope="module")
def model_files(tiny_model, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """Return the tiny Llama, its training and validation text, and its export (no distillation)."""
    model_dir = tiny_model("llama")
    train, valid = write_training_data(tmp_path_factory.mktemp("bad-inputs-data"), model_dir, "causal-lm")
    export = tmp_path_factory.mktemp("bad-inputs-export") / "export"
    run_pipeline(compress_settings(model_dir, export, train, valid, steps=0))
    return model_dir, train, valid, export


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


# The placeholders of `Case.args`, with the names that docs/bad-inputs.md shows for them.
PLACEHOLDERS = {"work": "WORK", "model": "MODEL", "train": "TRAIN", "valid": "VALID", "export": "EXPORT"}


def normalize(message: str, values: dict[str, str]) -> str:
    """Replace the test's temporary paths in `message` by their placeholder names."""
    message = re.sub(r"http://127\.0\.0\.1:\d+", "http://127.0.0.1:PORT", message)
    for name in PLACEHOLDERS:
        for form in (str(Path(values[name]).resolve()), values[name]):
            message = message.replace(form, PLACEHOLDERS[name])
    return message


def run_in_process(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["tbquant", *args])
    code = run_cli(app)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input(case, model_files, tmp_path, monkeypatch, capsys):
    model_dir, train, valid, export = model_files
    workspace = tmp_path / "work"
    workspace.mkdir()
    values = {"work": str(workspace), "model": str(model_dir), "train": str(train), "valid": str(valid), "export": str(export)}
    for name, content in case.files.items():
        path = workspace / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content, encoding="utf-8")
    # No case may reach the real hub, whatever the environment of the test run.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", closed_loopback_endpoint())
    if case.prepare is not None:
        case.prepare(Context(workspace, model_dir, train, valid, export, monkeypatch))
    monkeypatch.chdir(workspace)
    monkeypatch.setenv("COLUMNS", "200")
    before = file_bytes(workspace, model_dir, train.parent, export)

    code, stdout, stderr = run_in_process(command_line(case, values), monkeypatch, capsys)

    errors = [line for line in stderr.splitlines() if line.startswith("Error:")]
    assert code == case.exit_code, stderr
    assert "Traceback" not in stdout + stderr
    assert len(errors) == 1, stderr
    assert [line for line in stderr.splitlines() if line.strip()][-1] == errors[0]
    assert "this is a bug in tbquant" not in errors[0]
    for name in case.names:
        assert name.format(**values) in errors[0]
    assert file_bytes(workspace, model_dir, train.parent, export) == before

    message = normalize(errors[0].removeprefix("Error: "), values)
    if UPDATE_DOC:
        record_message(case, message, code)
    assert documented_messages().get(case.name) == message, "docs/bad-inputs.md is out of date: see this file's docstring"


# docs/bad-inputs.md


DOC_HEADER = """# Bad inputs and the messages they get

Every case below is a test in `tests/test_bad_inputs.py`: the command exits with the status
shown, prints exactly one `Error:` line (the message below) and no traceback, and changes no
file on disk. In the commands, `MODEL` is a tiny saved Llama model, and `TRAIN` and `VALID` are
its training and validation text. `EXPORT` is a tbquant export of that model (ternary weights,
8-bit activations, no distillation steps). `WORK` is an empty directory that is also the current
directory. Cases that damage an export damage a copy of `EXPORT` in `WORK/tiny-export`. Every
`compress` command also gets `--output WORK/export`, unless it sets `--output`, and options that
keep the run short (`--steps 0 --batch-size 2 --max-length 32 --calibration-batches 1
--eval-batches 1`).

Every case runs in Hugging Face offline mode (`HF_HUB_OFFLINE=1`) with the Hub endpoint
(`HF_ENDPOINT`) at a closed port on 127.0.0.1. The cases `hub-id-unreachable`, `push-no-token`,
`push-weights-truncated` and `push-checksum-mismatch` leave offline mode. The cases
`push-offline`, `push-offline-save-card`, `push-weights-truncated` and `push-checksum-mismatch`
set `HF_TOKEN`, and `push-no-token` unsets it and sets `HF_HOME` to an empty directory. No
`push-to-hub` case sends a request.

The table is generated by the tests (`TBQUANT_UPDATE_BAD_INPUTS_DOC=1 pytest
tests/test_bad_inputs.py`), which also check that it matches what the commands print.

| case | command | exit | message |
| --- | --- | --- | --- |
"""

_ROW = re.compile(r"^\| `([^`]+)` \| .* \| (\d+) \| (.*) \|$")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _shown(argument: str) -> str:
    """Quote an argument for the shell when it is empty or contains white space."""
    return shlex.quote(argument) if not argument or any(character.isspace() for character in argument) else argument


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
        command = " ".join(_shown(argument.format(**PLACEHOLDERS)) for argument in entry.args)
        documented = messages.get(entry.name, "(not yet recorded)")
        rows.append(f"| `{entry.name}` | `tbquant {_cell(command)}` | {entry.exit_code} | {_cell(documented)} |\n")
    DOC.write_text(DOC_HEADER + "".join(rows), encoding="utf-8")


def test_doc_lists_every_case():
    assert list(documented_messages()) == [case.name for case in CASES]


def test_at_least_thirty_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 30
