"""`tbquant generate` and `tbquant.generation` on exports of tiny causal, seq2seq and encoder models.

The expected texts come from calling transformers' `generate()` directly on the model that
`tbquant.load_quantized` returns, so the tests check the command's tokenization, decoding
options and output against the library that users would call themselves.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from support import ARCHITECTURES, compress_settings, run_cli, write_training_data
from test_cli import assert_one_line_error

import tbquant
from tbquant.cli import _errors as cli_errors
from tbquant.cli.main import app
from tbquant.generation import GenerationOptions, build_inputs, generate_text
from tbquant.pipeline.settings import Task

TIMING = re.compile(r"(\d+) tokens in [\d.]+ s: [\d.]+ tokens/s")
PROMPT = "It is a truth universally acknowledged"
SOURCE = "In the beginning God created the heaven and the earth."


@pytest.fixture(scope="module")
def exports(tiny_model, tmp_path_factory) -> Callable[[str], Path]:
    """Return a function that compresses the tiny model of an architecture once (one distillation
    step) and returns its export directory."""
    built: dict[str, Path] = {}

    def build(architecture: str) -> Path:
        if architecture not in built:
            model_dir = tiny_model(architecture)
            folder = tmp_path_factory.mktemp(f"{architecture}-export")
            train, valid = write_training_data(folder / "data", model_dir, ARCHITECTURES[architecture].task)
            settings = compress_settings(model_dir, folder / "export", train, valid, steps=1)
            tbquant.run_pipeline(settings, ["load", "calibrate", "distill", "pack", "export"])
            built[architecture] = folder / "export"
        return built[architecture]

    return build


def reference_text(export_dir: Path, text: str, **generate_kwargs) -> str:
    """Return the new text that transformers' `generate()` produces on the loaded export."""
    model, tokenizer = tbquant.load_quantized(export_dir)
    encoded = tokenizer(text, return_token_type_ids=False, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, **generate_kwargs)
    start = encoded["input_ids"].shape[1] if not model.config.is_encoder_decoder else 1
    return tokenizer.decode(output[0, start:], skip_special_tokens=True)


# The command line


def test_causal_greedy_matches_transformers(exports):
    export_dir = exports("llama")

    result = run_cli("generate", str(export_dir), PROMPT, "--max-new-tokens", "6", "--greedy")

    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_text(export_dir, PROMPT, max_new_tokens=6, do_sample=False) + "\n"
    timing = TIMING.search(result.stderr)
    assert timing is not None, result.stderr
    assert 1 <= int(timing.group(1)) <= 6


def test_seq2seq_prompt_from_stdin(exports):
    export_dir = exports("bart")

    result = run_cli("generate", str(export_dir), "-", "--max-new-tokens", "5", "--num-beams", "2", stdin=SOURCE + "\n")

    assert result.returncode == 0, result.stderr
    assert result.stdout == reference_text(export_dir, SOURCE + "\n", max_new_tokens=5, num_beams=2) + "\n"
    assert TIMING.search(result.stderr) is not None, result.stderr


def test_chat_prompt_runs(exports):
    result = run_cli("generate", str(exports("llama")), "Hello", "--chat", "--max-new-tokens", "3", "--do-sample", "--seed", "1")

    assert result.returncode == 0, result.stderr
    assert TIMING.search(result.stderr) is not None, result.stderr


# The library


def test_chat_template_applied(exports):
    _, tokenizer = tbquant.load_quantized(exports("llama"))

    inputs = build_inputs(tokenizer, "Hello there", chat=True)
    text = tokenizer.decode(inputs["input_ids"][0])

    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape


def test_chat_without_template_rejected(exports):
    _, tokenizer = tbquant.load_quantized(exports("bart"))

    with pytest.raises(ValueError, match="no chat template"):
        build_inputs(tokenizer, "Hello", chat=True)


def test_result_counts_new_tokens(exports):
    model, tokenizer = tbquant.load_quantized(exports("llama"))
    prompt_tokens = tokenizer(PROMPT, return_tensors="pt")["input_ids"].shape[1]

    result = generate_text(model, tokenizer, Task.CAUSAL_LM, PROMPT, GenerationOptions(max_new_tokens=5, do_sample=False))

    assert result.prompt_tokens == prompt_tokens
    assert 1 <= result.new_tokens <= 5
    assert result.text == reference_text(exports("llama"), PROMPT, max_new_tokens=5, do_sample=False)
    assert result.tokens_per_second == pytest.approx(result.new_tokens / result.seconds)
    assert 0 < result.first_token_seconds <= result.seconds


def test_seed_reproduces_sampling(exports):
    model, tokenizer = tbquant.load_quantized(exports("llama"))
    options = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3)

    first = generate_text(model, tokenizer, Task.CAUSAL_LM, PROMPT, options)
    second = generate_text(model, tokenizer, Task.CAUSAL_LM, PROMPT, options)

    assert first.text == second.text


def test_beam_search_has_no_first_token_time(exports):
    model, tokenizer = tbquant.load_quantized(exports("bart"))

    result = generate_text(model, tokenizer, Task.SEQ2SEQ_LM, SOURCE, GenerationOptions(max_new_tokens=4, num_beams=2))

    assert result.first_token_seconds is None
    assert result.decode_tokens_per_second is None
    assert result.new_tokens >= 1


def test_sampling_option_turns_sampling_on():
    assert GenerationOptions(top_k=5).generate_kwargs() == {"max_new_tokens": 64, "do_sample": True, "top_k": 5}
    assert GenerationOptions().generate_kwargs() == {"max_new_tokens": 64}


@pytest.mark.parametrize(
    ("setting", "value"),
    [("max_new_tokens", 0), ("temperature", 0.0), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("num_beams", 0), ("repetition_penalty", 0.0)],
)
def test_invalid_option_rejected(setting, value):
    with pytest.raises(ValueError, match=f"invalid {setting} {value!r}"):
        GenerationOptions(**{setting: value})


# Errors on the command line. They run in this process: a subprocess would spend seconds on imports
# for each one.


def run_in_process(capsys, monkeypatch, *args: str, stdin: str = "") -> subprocess.CompletedProcess:
    """Run `tbquant ARGS` through the command line's error handling in this process."""
    monkeypatch.setattr(sys, "argv", ["tbquant", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()
    code = cli_errors.run_cli(app)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def test_empty_prompt(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("llama")), "   ")

    assert_one_line_error(result, "empty prompt", "PROMPT")


def test_empty_stdin(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("llama")), "-", stdin="\n")

    assert_one_line_error(result, "empty prompt", "standard input")


def test_encoder_export(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("bert")), "Hello")

    assert_one_line_error(result, "encoder export", "causal-lm or seq2seq-lm")


def test_not_an_export(tiny_model, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(tiny_model("llama")), "Hello")

    assert_one_line_error(result, "is not a tbquant export")


def test_zero_temperature(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("llama")), "Hello", "--temperature", "0")

    assert_one_line_error(result, "--temperature", "0.0", "above 0")


def test_greedy_with_temperature(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("llama")), "Hello", "--greedy", "--temperature", "0.7")

    assert_one_line_error(result, "--temperature", "--greedy")


def test_chat_without_template(exports, capsys, monkeypatch):
    result = run_in_process(capsys, monkeypatch, "generate", str(exports("bart")), "Hello", "--chat")

    assert_one_line_error(result, "no chat template", "--chat")


def test_missing_checksums_rejected_then_skipped(exports, tmp_path, capsys, monkeypatch):
    """An export without checksums.sha256 (as written before checksums existed) runs with --no-verify."""
    import shutil

    copy = tmp_path / "export"
    shutil.copytree(exports("llama"), copy)
    (copy / "checksums.sha256").unlink()

    rejected = run_in_process(capsys, monkeypatch, "generate", str(copy), "Hello", "--max-new-tokens", "3")
    accepted = run_in_process(capsys, monkeypatch, "generate", str(copy), "Hello", "--max-new-tokens", "3", "--no-verify")

    assert_one_line_error(rejected, "checksums.sha256 not found", "--no-verify")
    assert accepted.returncode == 0, accepted.stderr
    assert accepted.stdout.strip()
