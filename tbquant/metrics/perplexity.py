"""Perplexity with a sliding window, as in the transformers guide "Perplexity of fixed-length
models" (https://huggingface.co/docs/transformers/perplexity).

A causal model reads the text as one token stream. A window of `window` tokens starts every
`stride` tokens, and each window scores only the tokens that the previous window did not score.
With `stride < window`, every token after the first is predicted once, with at least
`window - stride` tokens of context (fewer at the start of the text). With `stride == window`
the windows do not overlap, and the first token of each window is not scored:

    PPL = exp(-(1 / N) * sum_i log p(x_i | x_(j..i-1)))

with N the number of scored tokens and j the start of the window that scores x_i. A
sequence-to-sequence model scores each target given its source (teacher forcing), and N counts
the target tokens.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.nn import functional

from tbquant.pipeline.settings import Task

IGNORE_INDEX = -100


@dataclasses.dataclass
class Window:
    """One window of the token stream; `labels` is -100 on the tokens that only give context."""

    input_ids: torch.Tensor
    labels: torch.Tensor


def sliding_windows(token_ids: list[int], window: int, stride: int) -> list[Window]:
    """Cut a token stream into windows of `window` tokens that start every `stride` tokens."""
    if not 1 <= stride <= window:
        raise ValueError(f"invalid stride {stride}: expected a value from 1 to the window size {window}")
    windows: list[Window] = []
    previous_end = 0
    for begin in range(0, len(token_ids), stride):
        end = min(begin + window, len(token_ids))
        scored = end - previous_end
        input_ids = torch.tensor([token_ids[begin:end]], dtype=torch.long)
        labels = input_ids.clone()
        labels[:, : input_ids.shape[1] - scored] = IGNORE_INDEX
        windows.append(Window(input_ids, labels))
        previous_end = end
        if end == len(token_ids):
            break
    return windows


def scored_logits(logits: torch.Tensor, labels: torch.Tensor, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the logits `[n, vocab]` of the n scored positions and their target tokens `[n]`.

    A causal model's logits at position t predict token t + 1, so they are shifted against the
    labels. A sequence-to-sequence model's decoder logits line up with its labels.
    """
    if task == Task.CAUSAL_LM:
        logits, labels = logits[:, :-1], labels[:, 1:]
    mask = labels != IGNORE_INDEX
    return logits[mask], labels[mask]


@dataclasses.dataclass
class NegativeLogLikelihood:
    """Running sum of the negative log-likelihood (nats) of the scored tokens."""

    total: float = 0.0
    tokens: int = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Add the scored positions returned by `scored_logits`."""
        self.total += functional.cross_entropy(logits.float(), targets, reduction="sum").item()
        self.tokens += targets.numel()

    @property
    def perplexity(self) -> float:
        if self.tokens == 0:
            raise ValueError("no tokens were scored: the text is shorter than two tokens")
        return math.exp(self.total / self.tokens)
