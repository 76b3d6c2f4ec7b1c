"""Corpus-level BLEU and chrF through `sacrebleu`, with its default settings (BLEU: 13a
tokenization, exponential smoothing; chrF: character 6-grams, beta 2), one reference per
example."""

from __future__ import annotations


def bleu_and_chrf(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Return `bleu` and `chrf` (0 to 100) of `predictions` against `references`."""
    import sacrebleu

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"expected as many predictions as references, at least one (got {len(predictions)} and {len(references)})")
    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references]).score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
