"""Text generation for the ROUGE, BLEU and chrF metrics: decoding settings and prompts.

Sequence-to-sequence models read the source and generate the target. Decoder-only models
read a prompt: `few_shot` example pairs, each as the template filled with its source followed
by its target, then the template filled with the source to answer. The generated text is cut
at the first line break, because the examples end there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from tbquant.data import Example
from tbquant.pipeline.settings import Task

SOURCE_PLACEHOLDER = "{source}"

DEFAULT_TEMPLATES = {
    "summarization": "Article: {source}\nSummary:",
    "translation": "Source: {source}\nTranslation:",
}


@dataclasses.dataclass
class GenerationSettings:
    """Decoding settings passed to `model.generate`, plus batching and source truncation."""

    num_beams: int = 4
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    batch_size: int = 4
    max_source_length: int = 1024

    def __post_init__(self) -> None:
        positive = {"beams": self.num_beams, "max-new-tokens": self.max_new_tokens, "batch-size": self.batch_size,
                    "max-source-length": self.max_source_length}
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"invalid --{name} {value}: expected an integer of at least 1")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise ValueError(f"invalid --min-new-tokens {self.min_new_tokens}: expected a value from 0 to --max-new-tokens")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"invalid --no-repeat-ngram-size {self.no_repeat_ngram_size}: expected a value of at least 0")


def default_generation(kind: str, task: Task) -> GenerationSettings:
    """Return the decoding defaults for a data kind ("summarization" or "translation") and model task.

    Summarization with a sequence-to-sequence model uses BART's published CNN/DailyMail decoding
    (fairseq BART README: beam 4, length penalty 2.0, 55 to 140 tokens, no repeated trigram),
    the setting of Liu et al. (ACL 2023). Translation uses beam 4 and up to 128 tokens. Decoder-only
    models decode greedily with a length penalty of 1, because their outputs end at a line break.
    """
    if task == Task.CAUSAL_LM:
        return GenerationSettings(num_beams=1, max_new_tokens=128 if kind == "summarization" else 64)
    if kind == "summarization":
        return GenerationSettings(num_beams=4, max_new_tokens=140, min_new_tokens=55, length_penalty=2.0, no_repeat_ngram_size=3)
    return GenerationSettings(num_beams=4, max_new_tokens=128)


@dataclasses.dataclass
class PromptSettings:
    """Prompt format of a decoder-only model: template, few-shot examples and chat formatting."""

    template: str
    few_shot: list[Example] = dataclasses.field(default_factory=list)
    chat: bool = False

    def __post_init__(self) -> None:
        if SOURCE_PLACEHOLDER not in self.template:
            raise ValueError(f"invalid --prompt-template {self.template!r}: it must contain {SOURCE_PLACEHOLDER}")

    def fill(self, source: str) -> str:
        return self.template.replace(SOURCE_PLACEHOLDER, source)

    def build(self, source: str, tokenizer) -> str:
        """Return the prompt for `source`: the few-shot examples, then the filled template."""
        blocks = [f"{self.fill(example.source)} {example.target}" for example in self.few_shot]
        prompt = "\n\n".join([*blocks, self.fill(source)])
        if self.chat:
            messages = [{"role": "user", "content": prompt}]
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt


def max_positions(model) -> int | None:
    """Return the number of positions the model's position embeddings cover, if it has a limit."""
    config = model.config
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    task: Task,
    sources: list[str],
    settings: GenerationSettings,
    prompt: PromptSettings | None,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Generate one prediction per source, in order; `advance(n)` is called after each batch."""
    decoder_only = task == Task.CAUSAL_LM
    # Decoder-only models continue the prompt, so padding and truncation go on the left, where
    # they cut the oldest few-shot example first.
    tokenizer.padding_side = "left" if decoder_only else "right"
    tokenizer.truncation_side = "left" if decoder_only else "right"
    options = {
        "num_beams": settings.num_beams,
        "max_new_tokens": settings.max_new_tokens,
        "min_new_tokens": settings.min_new_tokens,
        "length_penalty": settings.length_penalty,
        "no_repeat_ngram_size": settings.no_repeat_ngram_size,
        "do_sample": False,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if decoder_only:
        options.update(stop_strings=["\n"], tokenizer=tokenizer)

    # Sources are truncated to fit the position embeddings; a decoder-only model also needs room for
    # the generated tokens.
    source_length = settings.max_source_length
    limit = max_positions(model)
    if limit is not None:
        source_length = min(source_length, limit - settings.max_new_tokens if decoder_only else limit)
        if source_length < 1:
            raise ValueError(f"invalid --max-new-tokens {settings.max_new_tokens}: the model has only {limit} positions")

    predictions: list[str] = []
    for start in range(0, len(sources), settings.batch_size):
        chunk = sources[start : start + settings.batch_size]
        texts = chunk
        if prompt is not None:
            # A sequence-to-sequence model gets the filled template only, such as T5's "summarize: {source}".
            texts = [prompt.build(source, tokenizer) if decoder_only else prompt.fill(source) for source in chunk]
        inputs = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=source_length)
        inputs.pop("token_type_ids", None)
        output = model.generate(**inputs, **options)
        if decoder_only:
            output = output[:, inputs["input_ids"].shape[1] :]
        for text in tokenizer.batch_decode(output, skip_special_tokens=True):
            predictions.append(text.strip().split("\n", 1)[0].strip() if decoder_only else text.strip())
        if advance is not None:
            advance(len(chunk))
    return predictions
