"""Running `tbquant eval`: load the models, choose the metrics that fit, compute them.

With a teacher, every metric is computed for both models, on the same examples and tokens, and
the agreement metrics compare the two models' next-token distributions position by position.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from tbquant.data import Example, TokenizedData
from tbquant.errors import DataError, ModelLoadError, TbquantError
from tbquant.evaluation import forward
from tbquant.metrics.agreement import Agreement
from tbquant.metrics.generation import GenerationSettings, PromptSettings, default_generation, generate, max_positions
from tbquant.metrics.perplexity import IGNORE_INDEX, NegativeLogLikelihood, scored_logits, sliding_windows
from tbquant.metrics.rouge import rouge
from tbquant.metrics.translation import bleu_and_chrf
from tbquant.pipeline.settings import Task

logger = logging.getLogger(__name__)

METRICS = ("perplexity", "agreement", "rouge", "bleu", "chrf")
GENERATION_METRICS = ("rouge", "bleu", "chrf")

# Figures where a lower value is better; retention is teacher / student for them.
LOWER_IS_BETTER = {"perplexity", "mean_kl"}

# A pair file whose targets are on average shorter than this fraction of their sources is
# summarization data, otherwise translation data (used for source/target and input/output columns).
SUMMARY_LENGTH_RATIO = 0.5
SUMMARY_COLUMNS = {("article", "summary"), ("document", "summary")}

# Starts a progress phase (description, total steps) and returns the function that advances it.
ProgressFactory = Callable[[str, int], Callable[[int], None]]


@dataclasses.dataclass
class LoadedModel:
    """A model ready for evaluation, with where it came from."""

    source: str
    model: torch.nn.Module
    tokenizer: object
    task: Task
    is_export: bool


@dataclasses.dataclass
class EvalSettings:
    """Options of one evaluation, apart from the models and the data.

    `generation` None selects the defaults of `default_generation` for the data and model.
    """

    window: int = 1024
    stride: int = 512
    batch_size: int = 4
    generation: GenerationSettings | None = None
    prompt: PromptSettings | None = None

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"invalid --window {self.window}: expected at least 2 tokens")
        if not 1 <= self.stride <= self.window:
            raise ValueError(f"invalid --stride {self.stride}: expected a value from 1 to --window ({self.window})")
        if self.batch_size < 1:
            raise ValueError(f"invalid --batch-size {self.batch_size}: expected an integer of at least 1")


@dataclasses.dataclass
class EvalReport:
    """Figures by model ("student", "teacher"), agreement figures, counts and generated texts."""

    scores: dict[str, dict[str, float]]
    agreement: dict[str, float]
    counts: dict[str, int]
    predictions: dict[str, list[str]]
    generation: GenerationSettings | None


def is_export(path: Path) -> bool:
    """Return whether `path` is a tbquant export (its config.json names quant_method "tbquant")."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        quantization = json.loads(config.read_text(encoding="utf-8")).get("quantization_config") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False
    return isinstance(quantization, dict) and quantization.get("quant_method") == "tbquant"


def check_source(source: str) -> None:
    """Check a model argument of `load_for_eval` without loading anything: a tbquant export, or a
    path that `compress` accepts (an existing `.gguf` file or a directory with `config.json`).

    Hub ids pass unchecked, because looking them up in the cache or on the Hub is part of loading.

    Raises:
        ModelLoadError: naming the missing path or the unsupported kind of file.
    """
    from tbquant.stages.load import resolve_source

    path = Path(source).expanduser()
    if path.is_dir() and is_export(path):
        return
    resolve_source(source)


def load_for_eval(source: str, trust_remote_code: bool = False, revision: str | None = None, verify: bool = True) -> LoadedModel:
    """Load a tbquant export with `tbquant.load_quantized`, or anything `compress` loads."""
    from tbquant import load_quantized
    from tbquant.stages.load import detect_task, load_model_and_tokenizer

    path = Path(source).expanduser()
    if path.is_dir() and is_export(path):
        model, tokenizer = load_quantized(path, verify=verify)
        task = Task(json.loads((path / "config.json").read_text(encoding="utf-8"))["quantization_config"].get("task") or detect_task(model.config))
        exported = True
    else:
        model, tokenizer, task = load_model_and_tokenizer(source, trust_remote_code, revision)
        exported = False
    if tokenizer is None:
        raise ModelLoadError(f"model {source!r} has no tokenizer files: save the tokenizer next to the model")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    model.eval()
    return LoadedModel(source=source, model=model, tokenizer=tokenizer, task=task, is_export=exported)


def data_kind(examples: list[Example]) -> str:
    """Return "text", "summarization" or "translation" for the examples of a data file.

    Pairs read from article/summary or document/summary columns are summarization data. For
    source/target and input/output columns, targets shorter than `SUMMARY_LENGTH_RATIO` of their
    sources on average make summarization data, otherwise translation data.
    """
    pairs = [example for example in examples if example.is_pair]
    if not pairs:
        return "text"
    if pairs[0].columns in SUMMARY_COLUMNS:
        return "summarization"
    source_chars = sum(len(example.source) for example in pairs)
    target_chars = sum(len(example.target) for example in pairs)
    return "summarization" if target_chars < SUMMARY_LENGTH_RATIO * source_chars else "translation"


def _has_logits(model: torch.nn.Module) -> bool:
    return model.get_output_embeddings() is not None


def choose_metrics(requested: list[str] | None, student: LoadedModel, teacher: LoadedModel | None, kind: str) -> list[str]:
    """Return the metrics to compute: `requested`, checked against the task and data, or the
    defaults for them.

    Raises:
        TbquantError: naming a metric that is unknown or does not fit the model or data.
    """
    task = student.task
    for name in requested or []:
        if name not in METRICS:
            raise TbquantError(f"unknown metric {name!r}: choose from {', '.join(METRICS)}")
        if name in GENERATION_METRICS and task == Task.ENCODER:
            raise TbquantError(
                f"metric {name} does not fit {student.source} ({type(student.model).__name__}, an encoder): "
                "it needs a model that generates text (causal or sequence-to-sequence LM)"
            )
        if name in GENERATION_METRICS and kind == "text":
            raise DataError(f"metric {name} needs source/target pairs, but the data has only a text column: pass a .jsonl or .csv file with pairs")
        if name == "perplexity" and task == Task.ENCODER:
            raise TbquantError(f"metric perplexity does not fit {student.source} ({type(student.model).__name__}, an encoder): use agreement with --teacher")
        if name == "perplexity" and task == Task.SEQ2SEQ_LM and kind == "text":
            raise DataError("metric perplexity of a sequence-to-sequence model needs source/target pairs: pass a .jsonl or .csv file with pairs")
        if name == "agreement" and teacher is None:
            raise TbquantError("metric agreement compares the model with its teacher: pass --teacher")
        if name == "agreement" and not _has_logits(student.model):
            raise TbquantError(f"metric agreement does not fit {student.source} ({type(student.model).__name__}): it has no language-model head")
    if requested:
        return list(dict.fromkeys(requested))

    metrics: list[str] = []
    if task == Task.CAUSAL_LM and kind == "text":
        metrics.append("perplexity")
    if task == Task.SEQ2SEQ_LM and kind != "text":
        metrics.append("perplexity")
    if task != Task.ENCODER and kind == "summarization":
        metrics.append("rouge")
    if task != Task.ENCODER and kind == "translation":
        metrics += ["bleu", "chrf"]
    if teacher is not None and _has_logits(student.model):
        metrics.append("agreement")
    if not metrics:
        raise TbquantError(
            f"no metric fits {student.source} ({type(student.model).__name__}, {task.value}) on this data: "
            "pass --teacher to measure agreement, or evaluate a language model"
        )
    return metrics


def _causal_text(examples: list[Example]) -> str:
    # The token stream of the perplexity guide: examples joined by blank lines, pairs as source, line break, target.
    return "\n\n".join(example.text if not example.is_pair else f"{example.source}\n{example.target}" for example in examples)


def _batches(loaded: LoadedModel, examples: list[Example], settings: EvalSettings) -> list[dict[str, torch.Tensor]]:
    """Return the batches that perplexity and agreement score, with -100 labels on unscored tokens."""
    tokenizer, task = loaded.tokenizer, loaded.task
    window = min(settings.window, max_positions(loaded.model) or settings.window)
    if task == Task.SEQ2SEQ_LM:
        return TokenizedData([example for example in examples if example.is_pair], tokenizer, task, window).batches(settings.batch_size)
    if task == Task.ENCODER:
        batches = TokenizedData(examples, tokenizer, task, window).batches(settings.batch_size)
        for batch in batches:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batches

    token_ids = tokenizer(_causal_text(examples))["input_ids"]
    if len(token_ids) < 2:
        raise DataError("the data tokenizes to fewer than two tokens: pass more text")
    windows = sliding_windows(token_ids, window, min(settings.stride, window))
    # Windows of the same length (all but the last) are stacked into batches.
    batches: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(windows), settings.batch_size):
        group = windows[start : start + settings.batch_size]
        for length in dict.fromkeys(item.input_ids.shape[1] for item in group):
            same = [item for item in group if item.input_ids.shape[1] == length]
            input_ids = torch.cat([item.input_ids for item in same])
            batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.cat([item.labels for item in same])})
    return batches


@torch.no_grad()
def _score_tokens(models: list[LoadedModel], batches, compare: bool, advance) -> tuple[list[NegativeLogLikelihood], Agreement | None]:
    """Run every model on every batch once; accumulate each model's NLL and, with `compare`, the
    agreement of the first model (student) with the second (teacher)."""
    task = models[0].task
    likelihoods = [NegativeLogLikelihood() for _ in models]
    agreement = Agreement() if compare else None
    for batch in batches:
        selected = []
        for loaded, likelihood in zip(models, likelihoods):
            logits = forward(loaded.model, batch, task, details=False, labels=False).logits
            logits, targets = scored_logits(logits, batch["labels"], task)
            if task != Task.ENCODER:
                likelihood.add(logits, targets)
            selected.append(logits)
        if agreement is not None:
            agreement.add(selected[0], selected[1])
        advance(1)
    return likelihoods, agreement


def _same_tokenizer(first: LoadedModel, second: LoadedModel) -> bool:
    return first.tokenizer.get_vocab() == second.tokenizer.get_vocab()


def run_evaluation(
    student: LoadedModel,
    teacher: LoadedModel | None,
    examples: list[Example],
    metrics: list[str],
    settings: EvalSettings,
    progress: ProgressFactory | None = None,
) -> EvalReport:
    """Compute `metrics` for the student and, when given, the teacher on `examples`."""
    progress = progress or (lambda description, total: lambda steps: None)
    if teacher is not None and teacher.task != student.task:
        raise TbquantError(f"the teacher {teacher.source} is a {teacher.task.value} model but the student is a {student.task.value} model: pass a teacher of the same kind")
    if "agreement" in metrics and teacher is None:
        raise TbquantError("metric agreement compares the model with its teacher: pass --teacher")
    models = {"student": student, **({"teacher": teacher} if teacher is not None else {})}
    report = EvalReport(scores={role: {} for role in models}, agreement={}, counts={"examples": len(examples)}, predictions={}, generation=None)

    if "perplexity" in metrics or "agreement" in metrics:
        _run_token_metrics(models, examples, metrics, settings, progress, report)
    if any(name in GENERATION_METRICS for name in metrics):
        _run_generation_metrics(models, examples, metrics, settings, progress, report)
    return report


def _run_token_metrics(models: dict[str, LoadedModel], examples, metrics, settings, progress, report: EvalReport) -> None:
    """Add perplexity and agreement to `report`, with one forward pass per model and batch.

    Models with the same tokenizer read the same batches in one loop. Agreement needs that.
    """
    compare = "agreement" in metrics
    student, teacher = models["student"], models.get("teacher")
    shared = teacher is not None and _same_tokenizer(student, teacher)
    if compare and not shared:
        raise TbquantError(f"agreement needs the same tokenizer for both models, but {student.source} and {teacher.source} differ: drop --metric agreement")
    role_groups = [list(models)] if shared else [[role] for role in models]

    for roles in role_groups:
        group = [models[role] for role in roles]
        batches = _batches(group[0], examples, settings)
        advance = progress(f"scoring tokens ({', '.join(roles)})", len(batches))
        likelihoods, agreement = _score_tokens(group, batches, compare, advance)
        if "perplexity" in metrics:
            for role, likelihood in zip(roles, likelihoods):
                report.scores[role]["perplexity"] = likelihood.perplexity
                report.counts["scored_tokens" if role == "student" else f"{role}_scored_tokens"] = likelihood.tokens
        if agreement is not None:
            report.agreement = agreement.results()
            report.counts["compared_positions"] = agreement.positions


def _run_generation_metrics(models: dict[str, LoadedModel], examples, metrics, settings, progress, report: EvalReport) -> None:
    """Add ROUGE, BLEU and chrF to `report`: generate for every source, then score against the references."""
    requested = [name for name in metrics if name in GENERATION_METRICS]
    pairs = [example for example in examples if example.is_pair]
    sources = [example.source for example in pairs]
    references = [example.target for example in pairs]
    kind = "summarization" if "rouge" in requested else "translation"
    report.generation = settings.generation or default_generation(kind, models["student"].task)

    for role, loaded in models.items():
        advance = progress(f"generating ({role})", len(pairs))
        predictions = generate(loaded.model, loaded.tokenizer, loaded.task, sources, report.generation, settings.prompt, advance)
        report.predictions[role] = predictions
        if "rouge" in requested:
            report.scores[role].update(rouge(predictions, references))
        if "bleu" in requested or "chrf" in requested:
            figures = bleu_and_chrf(predictions, references)
            report.scores[role].update({name: value for name, value in figures.items() if name in requested})
    report.counts["generated_examples"] = len(pairs)


def retention(figure: str, student: float, teacher: float) -> float | None:
    """Return the student's figure as a percentage of the teacher's (teacher / student for
    figures where lower is better), or None when it is undefined."""
    if figure in LOWER_IS_BETTER:
        return 100.0 * teacher / student if student else None
    return 100.0 * student / teacher if teacher else None
