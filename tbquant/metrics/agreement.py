"""Agreement of a compressed student with its teacher on the next-token distributions.

Both models read the same tokens. At every scored position t (the positions perplexity scores):

    top-1 agreement = mean over t of [argmax p_student(. | t) == argmax p_teacher(. | t)]   (percent)
    mean KL         = mean over t of sum_v p_teacher(v | t) * (log p_teacher(v | t) - log p_student(v | t))

KL(teacher || student) is measured in nats. It is the soft cross-entropy that logit
distillation minimises, minus the teacher's entropy, so 0 means identical distributions. No
generation is needed, which makes both figures a quick health check of a compressed model.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.nn import functional


@dataclasses.dataclass
class Agreement:
    """Running counts of top-1 matches and the KL divergence summed over positions."""

    matches: int = 0
    kl_total: float = 0.0
    positions: int = 0

    def add(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        """Add the logits `[n, vocab]` of both models at the same n positions."""
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(
                f"student and teacher logits differ in shape ({tuple(student_logits.shape)} and {tuple(teacher_logits.shape)})"
            )
        student_log_probs = functional.log_softmax(student_logits.float(), dim=-1)
        teacher_log_probs = functional.log_softmax(teacher_logits.float(), dim=-1)
        self.matches += int((student_log_probs.argmax(-1) == teacher_log_probs.argmax(-1)).sum())
        self.kl_total += functional.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="sum").item()
        self.positions += student_logits.shape[0]

    def results(self) -> dict[str, float]:
        """Return `top1_agreement` (percent) and `mean_kl` (nats per position)."""
        if self.positions == 0:
            raise ValueError("no positions were compared: the text is shorter than two tokens")
        return {"top1_agreement": 100.0 * self.matches / self.positions, "mean_kl": self.kl_total / self.positions}
