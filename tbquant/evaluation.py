"""Validation figures used during compression: perplexity and the distillation loss."""

from __future__ import annotations

import math

import torch
from torch import nn

from tbquant.pipeline.settings import DistillSettings, Task


def token_count(batch: dict[str, torch.Tensor], task: Task) -> int:
    """Return the number of tokens that the model's label loss averages over."""
    labels = batch["labels"]
    if task == Task.CAUSAL_LM:
        labels = labels[:, 1:]
    return int((labels != -100).sum())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Return `batch` with every tensor on `device` (the same tensors when they are already there)."""
    return {key: value.to(device) for key, value in batch.items()}


def forward(model: nn.Module, batch: dict[str, torch.Tensor], task: Task, details: bool, labels: bool = True):
    """Run `model` on `batch`, asking for hidden states and attentions when `details` is set.

    Without `labels`, causal models skip their label loss (a log-softmax over the vocabulary).
    Seq2seq models still receive the labels, because they build the decoder inputs from them.
    """
    inputs = to_device(batch, next(model.parameters()).device)
    if task == Task.ENCODER or (task == Task.CAUSAL_LM and not labels):
        inputs.pop("labels", None)
    return model(**inputs, output_hidden_states=details, output_attentions=details, return_dict=True)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    task: Task,
    teacher: nn.Module | None = None,
    settings: DistillSettings | None = None,
) -> dict[str, float]:
    """Compute the perplexity of `model` on `batches` (language models) and, with a teacher, the
    mean distillation loss."""
    from tbquant.losses import distillation_loss

    was_training = model.training
    model.eval()
    total_nll, total_tokens, distill_total = 0.0, 0, 0.0
    details = teacher is not None and settings is not None and (settings.hidden_weight > 0 or settings.attention_weight > 0)
    device = next(model.parameters()).device
    for batch in batches:
        batch = to_device(batch, device)
        outputs = forward(model, batch, task, details)
        if task != Task.ENCODER and outputs.loss is not None:
            tokens = token_count(batch, task)
            total_nll += outputs.loss.item() * tokens
            total_tokens += tokens
        if teacher is not None and settings is not None:
            teacher_outputs = forward(teacher, batch, task, details)
            distill_total += distillation_loss(outputs, teacher_outputs, batch, task, settings).parts["total"]
    model.train(was_training)

    results: dict[str, float] = {}
    if total_tokens:
        results["perplexity"] = math.exp(total_nll / total_tokens)
    if teacher is not None and settings is not None and batches:
        results["distill_loss"] = distill_total / len(batches)
    return results
