"""`tbquant eval`: task metrics of a model, side by side with its teacher."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from tbquant import __version__
from tbquant.data import Example, read_file
from tbquant.errors import DataError, TbquantError
from tbquant.card_facts import public_name
from tbquant.cli._terminal import make_console
from tbquant.model_card import update_eval_results, write_atomic

logger = logging.getLogger(__name__)
console = make_console()

# Table labels and model-index names of the figures, in display order.
FIGURE_LABELS = {
    "perplexity": "perplexity",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "bleu": "BLEU",
    "chrf": "chrF",
    "top1_agreement": "top-1 agreement with teacher (%)",
    "mean_kl": "mean KL(teacher || student), nats",
}
TASK_TYPES = {"text": "text-generation", "summarization": "summarization", "translation": "translation"}
SPLIT_NAMES = {"train", "valid", "validation", "dev", "test"}

EPILOG = (
    "Examples:\n\n"
    "  tbquant eval smollm2-ternary-a8 --teacher SmolLM2-135M-Instruct.Q4_1.gguf --data test.txt --limit 200\n\n"
    "  tbquant eval smollm2-ternary-a8 --data test.jsonl --few-shot 3 --prompt-template 'English: {source}\\nSpanish:' --limit 50\n\n"
    "  tbquant eval ./bart-ternary --teacher facebook/bart-base --data cnn_dm_test.jsonl --metric rouge --json scores.json"
)


def _read_examples(path: Path, option: str) -> list[Example]:
    if not path.exists():
        raise DataError(f"data file {path} not found: pass an existing .txt, .jsonl or .csv file with {option}")
    if path.is_dir():
        raise DataError(f"{path} is a directory: pass one .txt, .jsonl or .csv file with {option}")
    return read_file(path)


def _teacher_error(error: TbquantError) -> TbquantError:
    """Return `error` with the --teacher option named, so that it is not taken for MODEL's."""
    return type(error)(f"--teacher: {error}")


def _split_few_shot(examples: list[Example], count: int, data: Path, few_shot_data: Path | None) -> tuple[list[Example], list[Example]]:
    """Return the few-shot examples and the examples of `data` left to evaluate."""
    if count == 0:
        return [], examples
    source = _read_examples(few_shot_data, "--few-shot-data") if few_shot_data else examples
    pairs = [example for example in source if example.is_pair]
    if len(pairs) < count:
        raise DataError(
            f"--few-shot {count} needs {count} source/target pairs, but {few_shot_data or data} has {len(pairs)}: "
            "pass a smaller --few-shot, or more pairs with --few-shot-data"
        )
    if few_shot_data:
        return pairs[:count], examples
    return pairs[:count], [example for example in examples if not any(example is shot for shot in pairs[:count])]


def _dataset_name_and_split(path: Path) -> tuple[str, str | None]:
    """Derive a dataset name and split from a path such as `corpora/bible-en-es/test.jsonl`."""
    if path.stem.lower() in SPLIT_NAMES:
        return path.resolve().parent.name, path.stem.lower()
    return path.stem, None


def _progress_factory(progress: Progress):
    def start(description: str, total: int):
        task = progress.add_task(description, total=total)
        return lambda steps: progress.advance(task, steps)

    return start


def _format(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}%" if percent else f"{value:.4g}"


def _print_table(report, model: str, teacher: str | None) -> dict[str, float]:
    """Print the figures (side by side with the teacher's) and return the retention figures."""
    from tbquant.metrics import retention

    table = Table(title="tbquant eval", show_header=True, header_style="bold")
    table.add_column("figure")
    table.add_column(public_name(model), justify="right")
    if teacher is not None:
        table.add_column(f"teacher: {public_name(teacher)}", justify="right")
        table.add_column("retention", justify="right")
    retained: dict[str, float] = {}
    student_scores = report.scores["student"]
    for figure, label in FIGURE_LABELS.items():
        if figure in student_scores:
            row = [label, _format(student_scores[figure])]
            if teacher is not None:
                teacher_value = report.scores["teacher"][figure]
                share = retention(figure, student_scores[figure], teacher_value)
                if share is not None:
                    retained[figure] = share
                row += [_format(teacher_value), _format(share, percent=True)]
            table.add_row(*row)
        elif figure in report.agreement:
            table.add_row(label, _format(report.agreement[figure]), *(["", ""] if teacher is not None else []))
    console.print(table)
    return retained


def _card_results(report, kind: str, dataset: str, split: str | None, settings: dict, teacher: str | None) -> list[dict]:
    """Return the figures as `huggingface_hub.EvalResult` keyword arguments."""
    results = []
    figures = {**report.scores["student"], **report.agreement}
    for figure, value in figures.items():
        arguments: dict | None = None
        if figure == "perplexity" and kind == "text":
            arguments = {"window": settings["window"], "stride": settings["stride"]}
        if figure in ("top1_agreement", "mean_kl"):
            arguments = {"teacher": public_name(teacher)}
        results.append(
            {
                "task_type": TASK_TYPES[kind],
                "task_name": TASK_TYPES[kind].replace("-", " ").capitalize(),
                "dataset_type": dataset,
                "dataset_name": dataset,
                "dataset_split": split,
                "metric_type": figure,
                "metric_name": FIGURE_LABELS[figure],
                "metric_value": round(value, 4),
                "metric_args": arguments,
            }
        )
    return results


def eval_command(
    model: Annotated[str, typer.Argument(help="tbquant export, hub id, local save_pretrained directory, or .gguf file.")],
    data: Annotated[Path, typer.Option(help="Evaluation data: .txt (paragraphs), .jsonl or .csv (text, or source/target pairs).")],
    teacher: Annotated[Optional[str], typer.Option(help="Model to compare with (any MODEL form); every figure is shown for both.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option(help="perplexity, agreement, rouge, bleu or chrf; repeatable \\[default: chosen from the task and data].")] = None,
    limit: Annotated[Optional[int], typer.Option(help="Evaluate only the first N examples (paragraphs or pairs).")] = None,
    window: Annotated[int, typer.Option(help="Perplexity window in tokens (capped at the model's maximum positions).")] = 1024,
    stride: Annotated[int, typer.Option(help="Tokens between the starts of two perplexity windows.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Windows or examples per forward pass or generate call.")] = 4,
    beams: Annotated[Optional[int], typer.Option(help="Beam search width \\[default: 4; 1 for decoder-only models].")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Maximum generated tokens \\[default: 140 summarization, 128 translation; decoder-only 128 and 64].")] = None,
    min_new_tokens: Annotated[Optional[int], typer.Option(help="Minimum generated tokens \\[default: 55 for seq2seq summarization, else 0].")] = None,
    length_penalty: Annotated[Optional[float], typer.Option(help="Beam search length penalty (exponent of the length) \\[default: 2.0 for seq2seq summarization, else 1.0].")] = None,
    no_repeat_ngram_size: Annotated[Optional[int], typer.Option(help="Forbid repeating n-grams of this size (0: off) \\[default: 3 for seq2seq summarization, else 0].")] = None,
    max_source_length: Annotated[int, typer.Option(help="Source or prompt tokens kept (prompts lose their start).")] = 1024,
    prompt_template: Annotated[Optional[str], typer.Option(help="Prompt with a {source} placeholder; a typed \\n is a line break \\[default for decoder-only: 'Source: {source}\\nTranslation:' or 'Article: {source}\\nSummary:'].")] = None,
    few_shot: Annotated[int, typer.Option(help="Example pairs put before each prompt (decoder-only), taken from --few-shot-data or the start of --data.")] = 0,
    few_shot_data: Annotated[Optional[Path], typer.Option(help="File with the few-shot pairs \\[default: the first pairs of --data, which are then not evaluated].")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt in the tokenizer's chat template as a user message.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="Write every figure, the generated texts, the settings, model paths and tbquant version to this JSON file.")] = None,
    update_card: Annotated[bool, typer.Option(help="Write the figures into MODEL's eval_results.json and model card (MODEL must be a tbquant export).")] = False,
    dataset_name: Annotated[Optional[str], typer.Option(help="Dataset name for --update-card \\[default: the data file's folder when the file is a split such as test.jsonl, else its stem].")] = None,
    dataset_split: Annotated[Optional[str], typer.Option(help="Dataset split for --update-card \\[default: the file stem when it is train, valid, validation, dev or test].")] = None,
    trust_remote_code: Annotated[bool, typer.Option(help="Allow the checkpoints' own Python code to run.")] = False,
    revision: Annotated[Optional[str], typer.Option(help="Hub revision (branch, tag or commit) of MODEL and --teacher.")] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip checking exports' weights against their checksums.sha256.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs, and tracebacks of failures.")] = False,
) -> None:
    """Measure a model on task data (perplexity, ROUGE, BLEU, chrF, agreement), side by side with its teacher."""
    from tbquant.cli.main import _setup_logging
    from tbquant.metrics import METRICS, EvalSettings, check_source, choose_metrics, data_kind, load_for_eval, run_evaluation
    from tbquant.metrics.generation import DEFAULT_TEMPLATES, PromptSettings, default_generation
    from tbquant.pipeline.settings import Task

    _setup_logging(verbose)
    if limit is not None and limit < 1:
        raise TbquantError(f"invalid --limit {limit}: expected an integer of at least 1")
    if few_shot < 0:
        raise TbquantError(f"invalid --few-shot {few_shot}: expected an integer of at least 0")
    for name in metric or []:
        if name not in METRICS:
            raise TbquantError(f"invalid --metric {name!r}: expected {', '.join(METRICS[:-1])} or {METRICS[-1]}")
    if update_card:
        from tbquant.metrics.suite import is_export

        if not is_export(Path(model).expanduser()):
            raise TbquantError(f"--update-card needs a tbquant export as MODEL, but {model} is not one: drop --update-card")
    if json_path is not None and not json_path.parent.is_dir():
        raise TbquantError(f"folder {json_path.parent} of --json {json_path} not found: create it or pass another path")
    examples = _read_examples(data, "--data")
    kind = data_kind(examples)
    try:
        settings = EvalSettings(window=window, stride=stride, batch_size=batch_size)
    except ValueError as error:
        raise TbquantError(str(error)) from None

    # Both paths are checked before either model loads, so that a bad --teacher fails at once.
    check_source(model)
    if teacher is not None:
        try:
            check_source(teacher)
        except TbquantError as error:
            raise _teacher_error(error) from None

    logger.info("Loading %s", model)
    student = load_for_eval(model, trust_remote_code, revision, verify=not no_verify)
    loaded_teacher = None
    if teacher is not None:
        logger.info("Loading the teacher %s", teacher)
        try:
            loaded_teacher = load_for_eval(teacher, trust_remote_code, revision, verify=not no_verify)
        except TbquantError as error:
            raise _teacher_error(error) from None
    metrics = choose_metrics(metric, student, loaded_teacher, kind)

    generates = any(name in ("rouge", "bleu", "chrf") for name in metrics)
    if few_shot and not generates:
        logger.warning("--few-shot %d is ignored: it applies only to the generation metrics rouge, bleu and chrf", few_shot)
    shots, examples = _split_few_shot(examples, few_shot if generates else 0, data, few_shot_data)
    if few_shot and student.task != Task.CAUSAL_LM:
        raise TbquantError(f"--few-shot applies to decoder-only models, but {model} is a {student.task.value} model: drop --few-shot")
    if chat and student.tokenizer.chat_template is None:
        raise TbquantError(f"--chat needs a chat template, but the tokenizer of {model} has none: drop --chat")
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise DataError(f"no examples are left to evaluate in {data} after the --few-shot examples: pass more data")
    if generates:
        overrides = {"num_beams": beams, "max_new_tokens": max_new_tokens, "min_new_tokens": min_new_tokens,
                 "length_penalty": length_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
        generation_kind = "summarization" if "rouge" in metrics else "translation"
        try:
            settings.generation = dataclasses.replace(
                default_generation(generation_kind, student.task),
                batch_size=batch_size,
                max_source_length=max_source_length,
                **{name: value for name, value in overrides.items() if value is not None},
            )
            template = prompt_template or (DEFAULT_TEMPLATES[generation_kind] if student.task == Task.CAUSAL_LM else None)
            if template is not None:
                settings.prompt = PromptSettings(template=template.replace("\\n", "\n"), few_shot=shots, chat=chat)
        except ValueError as error:
            raise TbquantError(str(error)) from None

    logger.info("Metrics: %s on %d examples of %s (%s data)", ", ".join(metrics), len(examples), data, kind)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=make_console(stderr=True)) as progress:
        report = run_evaluation(student, loaded_teacher, examples, metrics, settings, _progress_factory(progress))
    retained = _print_table(report, model, teacher)

    settings_record = {
        "window": settings.window,
        "stride": settings.stride,
        "batch_size": settings.batch_size,
        "limit": limit,
        "generation": dataclasses.asdict(report.generation) if report.generation else None,
        "prompt_template": settings.prompt.template if settings.prompt else None,
        "few_shot": len(shots),
        "chat": chat,
    }
    if json_path is not None:
        record = {
            "tbquant_version": __version__,
            "model": {"path": model, "task": student.task.value, "tbquant_export": student.is_export},
            "teacher": {"path": teacher, "task": loaded_teacher.task.value, "tbquant_export": loaded_teacher.is_export} if loaded_teacher else None,
            "data": {"path": str(data), "kind": kind},
            "metrics": metrics,
            "settings": settings_record,
            "results": report.scores,
            "agreement": report.agreement,
            "retention": retained,
            "counts": report.counts,
            "predictions": report.predictions,
        }
        write_atomic(json_path, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
        logger.info("Wrote %s", json_path)
    if update_card:
        default_name, default_split = _dataset_name_and_split(data)
        results = _card_results(report, kind, dataset_name or default_name, dataset_split or default_split, settings_record, teacher)
        export = Path(model).expanduser()
        update_eval_results(export, results, model_name=export.resolve().name)
        logger.info("Updated %s and the model card of %s", export / "eval_results.json", export)
