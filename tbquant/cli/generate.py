"""`tbquant generate`: text from a packed export, with the decoding rate."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Annotated

import typer

from tbquant.cli._errors import error_console
from tbquant.cli.main import VerboseOpt, _setup_logging, app
from tbquant.errors import ExportError, TbquantError

EXAMPLES = (
    "Examples:\n\n"
    "  tbquant generate smollm2-ternary-a8 \"The capital of France is\" --max-new-tokens 20\n\n"
    "  tbquant generate smollm2-ternary-a8 \"Write a haiku about rain.\" --chat --do-sample --temperature 0.7 --seed 1\n\n"
    "  echo \"Translate: good morning\" | tbquant generate my-bart-export - --num-beams 4"
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _read_prompt(prompt: str) -> str:
    """Return the prompt, read from standard input when it is "-".

    Raises:
        TbquantError: if the prompt is empty or only white space.
    """
    if prompt == "-":
        prompt = sys.stdin.read()
        source = "standard input"
    else:
        source = "PROMPT"
    if not prompt.strip():
        raise TbquantError(f"empty prompt on {source}: pass the text as PROMPT, or '-' to read it from standard input")
    return prompt


def _options(values: dict):
    """Build validated `GenerationOptions`, naming command-line options in errors."""
    from tbquant.generation import SAMPLING_OPTIONS, GenerationOptions

    sampling = [name for name in SAMPLING_OPTIONS if values[name] is not None]
    if values["do_sample"] is False and sampling:
        raise TbquantError(f"--{sampling[0].replace('_', '-')} needs sampling, but --greedy turns it off: drop one of them")
    try:
        return GenerationOptions(**values)
    except ValueError as error:
        message = str(error)
        # The library names settings by field; the command line names them by option.
        for field in dataclasses.fields(GenerationOptions):
            message = message.replace(f"invalid {field.name} ", f"invalid --{field.name.replace('_', '-')} ")
        raise TbquantError(message) from None


def _task_of(directory: Path):
    from tbquant.loading import read_quantization_config
    from tbquant.pipeline.settings import Task

    task = Task(read_quantization_config(directory.expanduser())["task"])
    if task == Task.ENCODER:
        raise ExportError(f"{directory} is an encoder export, which generates no text: pass a causal-lm or seq2seq-lm export")
    if not any((directory.expanduser() / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(f"{directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): export it again with its tokenizer")
    return task


def _device(name: str):
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise TbquantError(f"invalid --device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TbquantError(f"--device {name} requested but no CUDA device is available: use --device cpu")
    return device


@app.command("generate", epilog=EXAMPLES)
def generate_command(
    directory: Annotated[Path, typer.Argument(help="Export directory written by tbquant compress.")],
    prompt: Annotated[str, typer.Argument(help="Prompt text (causal LM) or source text (seq2seq LM); '-' reads it from standard input.")],
    max_new_tokens: Annotated[int, typer.Option(help="Maximum number of tokens to generate.")] = 64,
    do_sample: Annotated[
        bool | None,
        typer.Option(
            "--do-sample/--greedy",
            help="Sample, or decode greedily (beam search with --num-beams) \\[default: sample when --temperature, --top-p or --top-k is set, else as generation_config.json says].",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature, above 0 (turns sampling on).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling: keep the smallest token set with this total probability, in (0, 1].")] = None,
    top_k: Annotated[int | None, typer.Option(help="Sample among the K most likely tokens (0 disables the filter).")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (1: no beam search).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="Penalty for tokens already present, above 0 (1.0 disables it).")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed, for reproducible sampling.")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt as a user message with the tokenizer's chat template.")] = False,
    device: Annotated[str, typer.Option(help="Device to run on: cpu, cuda or cuda:N.")] = "cpu",
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checking the weights against checksums.sha256.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Generate text from an export and report tokens per second (text on stdout, timing on stderr)."""
    _setup_logging(verbose)
    options = _options(
        {
            "max_new_tokens": max_new_tokens,
            "do_sample": do_sample,
            "temperature": temperature,
            "top_p": top_p,
            "top_k": top_k,
            "num_beams": num_beams,
            "repetition_penalty": repetition_penalty,
            "seed": seed,
            "chat": chat,
        }
    )
    text = _read_prompt(prompt)
    task = _task_of(directory)
    target = _device(device)

    import tbquant
    from tbquant.generation import generate_text

    model, tokenizer = tbquant.load_quantized(directory, device=target, verify=not no_verify)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise TbquantError(f"the tokenizer of {directory} has no chat template: drop --chat")
    result = generate_text(model, tokenizer, task, text, options)

    typer.echo(result.text)
    timing = f"{result.new_tokens} tokens in {result.seconds:.2f} s: {result.tokens_per_second:.1f} tokens/s"
    if result.decode_tokens_per_second is not None:
        timing += f" (first token after {result.first_token_seconds:.3f} s for {result.prompt_tokens} prompt tokens, then {result.decode_tokens_per_second:.1f} tokens/s)"
    error_console.print(timing, style="dim", markup=False, highlight=False)
