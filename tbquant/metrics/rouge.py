"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum through Google's `rouge-score` package, with the
Porter stemmer, as summarization papers (Liu et al., ACL 2023, among them) report them.

Each figure is the mean F-measure over the examples, times 100. ROUGE-Lsum computes the
longest common subsequence per sentence, so sentences are put on separate lines first.
"""

from __future__ import annotations

import re

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# A sentence ends at ., ! or ? (optionally followed by one closing quote or bracket) before white
# space. NOTE: rouge-score's own splitter needs NLTK's punkt data, which is downloaded at run time,
# so this simpler rule is used instead. Abbreviations such as "Mr." also end a sentence here.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+")


def split_sentences(text: str) -> str:
    """Return `text` with one sentence per line, the input format of ROUGE-Lsum."""
    return "\n".join(sentence.strip() for sentence in _SENTENCE_END.split(text.strip()) if sentence.strip())


def rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Return the mean ROUGE F-measures (0 to 100) of `predictions` against `references`."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"expected as many predictions as references, at least one (got {len(predictions)} and {len(references)})")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, reference in zip(predictions, references):
        scores = scorer.score(split_sentences(reference), split_sentences(prediction))
        for name in ROUGE_TYPES:
            totals[name] += scores[name].fmeasure
    return {name: 100.0 * total / len(predictions) for name, total in totals.items()}
