"""Evaluation metrics of `tbquant eval`, one module per family.

- `perplexity`: sliding-window perplexity (causal) and teacher-forced perplexity (seq2seq);
- `agreement`: top-1 agreement and KL divergence between student and teacher predictions;
- `rouge`: ROUGE-1/2/L/Lsum through rouge-score;
- `translation`: BLEU and chrF through sacrebleu;
- `generation`: decoding settings and prompts for the generation metrics;
- `suite`: loading the models, choosing the metrics that fit, and running them.
"""

from tbquant.metrics.suite import (
    METRICS,
    EvalReport,
    EvalSettings,
    LoadedModel,
    check_source,
    choose_metrics,
    data_kind,
    load_for_eval,
    retention,
    run_evaluation,
)

__all__ = [
    "METRICS",
    "EvalReport",
    "EvalSettings",
    "LoadedModel",
    "check_source",
    "choose_metrics",
    "data_kind",
    "load_for_eval",
    "retention",
    "run_evaluation",
]
