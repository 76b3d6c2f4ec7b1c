"""Distillation losses between the full-precision teacher and the quantized student.

Source: Liu et al., "Binary and Ternary Natural Language Generation" (ACL 2023), section 3.3,
which sums a soft cross-entropy on the logits, the MSE of every layer's hidden states and the
MSE of the attention probabilities, all weighted 1. Differences from the reference code: the
logit loss is masked so padding positions do not count, and each term has its own weight.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tbquant.pipeline.settings import DistillSettings, Task


@dataclasses.dataclass
class LossTerms:
    """The weighted total and its unweighted parts, for logging."""

    total: torch.Tensor
    parts: dict[str, float]


def _soft_cross_entropy_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sum over positions of `weights * -sum_v p_teacher(v) * log p_student(v)`."""
    teacher_probs = F.softmax(teacher_logits.float() / temperature, dim=-1)
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_position = -(teacher_probs * student_log_probs).sum(dim=-1)
    return (per_position * weights).sum()


def soft_cross_entropy(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
    chunk_size: int = 0,
) -> torch.Tensor:
    """Mean over unmasked positions of `-sum_v p_teacher(v) * log p_student(v)` at `temperature`.

    With `chunk_size > 0`, the positions are processed `chunk_size` at a time, and each chunk's
    float32 softmax intermediates are recomputed in the backward pass instead of being kept
    (activation checkpointing). Peak memory then grows with `chunk_size * vocabulary` instead of
    `positions * vocabulary`; the result is the same up to float summation order.
    """
    weights = mask.to(torch.float32)
    count = weights.sum().clamp_min(1)
    if chunk_size <= 0:
        return _soft_cross_entropy_sum(student_logits, teacher_logits, weights, temperature) / count

    vocabulary = student_logits.shape[-1]
    student_flat = student_logits.reshape(-1, vocabulary)
    teacher_flat = teacher_logits.reshape(-1, vocabulary)
    weights_flat = weights.reshape(-1)
    total = torch.zeros((), device=student_logits.device)
    for start in range(0, student_flat.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total = total + checkpoint(
            _soft_cross_entropy_sum,
            student_flat[chunk],
            teacher_flat[chunk],
            weights_flat[chunk],
            temperature,
            use_reentrant=False,
        )
    return total / count


def masked_mse(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, normalize: bool = False) -> torch.Tensor:
    """MSE over the positions where `mask` (`[batch, length]`) is set; `student` is `[batch, length, ...]`.

    With `normalize`, the MSE is divided by the teacher's mean square over the same positions.
    """
    weights = mask.to(torch.float32)
    count = weights.sum().clamp_min(1)
    squared = (student.float() - teacher.float()).pow(2)
    error = (squared.reshape(*squared.shape[:2], -1).mean(dim=-1) * weights).sum() / count
    if not normalize:
        return error
    power = (teacher.float().pow(2).reshape(*teacher.shape[:2], -1).mean(dim=-1) * weights).sum() / count
    return error / power.clamp_min(1e-8)


def attention_mse(student: torch.Tensor, teacher: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """MSE of `[batch, heads, queries, keys]` attention probabilities over unmasked query rows."""
    squared = (student.float() - teacher.float()).pow(2).mean(dim=(1, 3))
    weights = query_mask.to(squared.dtype)
    return (squared * weights).sum() / weights.sum().clamp_min(1)


def _sides(outputs, task: Task, batch: dict[str, torch.Tensor]):
    """Yield (hidden states, attentions, mask) for each stack: encoder and decoder, or the one stack."""
    if task == Task.SEQ2SEQ_LM:
        decoder_mask = batch["labels"] != -100
        yield outputs.encoder_hidden_states, outputs.encoder_attentions, batch["attention_mask"]
        yield outputs.decoder_hidden_states, outputs.decoder_attentions, decoder_mask
        yield None, outputs.cross_attentions, decoder_mask
    else:
        yield outputs.hidden_states, outputs.attentions, batch["attention_mask"]


def logits_mask(task: Task, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Return the positions whose next-token distribution is compared: real tokens only."""
    if task == Task.SEQ2SEQ_LM:
        return batch["labels"] != -100
    return batch["attention_mask"].bool()


def distillation_loss(
    student_outputs,
    teacher_outputs,
    batch: dict[str, torch.Tensor],
    task: Task,
    settings: DistillSettings,
    logit_chunk_size: int = 0,
) -> LossTerms:
    """Combine the distillation terms that have a non-zero weight.

    `logit_chunk_size` computes the soft cross-entropy in chunks of positions (see `soft_cross_entropy`).
    """
    total = torch.zeros((), device=batch["input_ids"].device)
    parts: dict[str, float] = {}

    student_logits = getattr(student_outputs, "logits", None)
    if settings.logit_weight > 0 and student_logits is not None:
        loss = soft_cross_entropy(
            student_logits, teacher_outputs.logits, logits_mask(task, batch), settings.temperature, logit_chunk_size
        )
        total = total + settings.logit_weight * loss
        parts["logits"] = loss.item()
    elif student_logits is None and settings.logit_weight > 0:
        # A bare encoder has no logits: its last hidden state takes their place.
        loss = masked_mse(student_outputs.last_hidden_state, teacher_outputs.last_hidden_state, batch["attention_mask"])
        total = total + settings.logit_weight * loss
        parts["last_hidden"] = loss.item()

    if settings.hidden_weight > 0 or settings.attention_weight > 0:
        hidden_loss = torch.zeros((), device=total.device)
        attention_loss = torch.zeros((), device=total.device)
        for (student_hidden, student_attention, mask), (teacher_hidden, teacher_attention, _) in zip(
            _sides(student_outputs, task, batch), _sides(teacher_outputs, task, batch)
        ):
            if settings.hidden_weight > 0 and student_hidden is not None:
                for student_layer, teacher_layer in zip(student_hidden, teacher_hidden):
                    hidden_loss = hidden_loss + masked_mse(student_layer, teacher_layer, mask, settings.normalize_hidden)
            if settings.attention_weight > 0 and student_attention is not None:
                for student_layer, teacher_layer in zip(student_attention, teacher_attention):
                    attention_loss = attention_loss + attention_mse(student_layer, teacher_layer, mask)
        if settings.hidden_weight > 0:
            total = total + settings.hidden_weight * hidden_loss
            parts["hidden"] = hidden_loss.item()
        if settings.attention_weight > 0:
            total = total + settings.attention_weight * attention_loss
            parts["attention"] = attention_loss.item()

    if settings.label_weight > 0 and getattr(student_outputs, "loss", None) is not None:
        total = total + settings.label_weight * student_outputs.loss
        parts["labels"] = student_outputs.loss.item()

    parts["total"] = total.item()
    return LossTerms(total=total, parts=parts)
