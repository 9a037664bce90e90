"""Evaluation metrics for QA answers and for autoencoder reconstructions.

QA metrics follow the SQuAD / NaturalQuestions-Open conventions:

* :func:`normalize_answer` lower-cases, strips punctuation, drops the articles
  "a", "an", "the" and collapses whitespace (the official SQuAD v1.1 normalisation).
* :func:`exact_match` and :func:`f1_score` compare a prediction with each gold answer
  and keep the best score.
* :func:`answer_in_output` is the accuracy used by "Lost in the Middle"
  (Liu et al., 2023; ``best_subspan_em``): 1 when any normalised gold answer is a
  substring of the normalised model output. It suits chatty models that answer in a
  full sentence.

Reconstruction metrics compare an autoencoder's output with the original chunk:
corpus / sentence BLEU (sacrebleu), ROUGE-1/2/L F-measure (rouge-score) and
:func:`prefix_exact_match`.

Scales: per-example QA scores and :func:`prefix_exact_match` are in ``[0, 1]``;
BLEU and ROUGE functions return ``0..100`` (sacrebleu's convention); the aggregate
helpers :func:`qa_metrics` and :func:`reconstruction_metrics` return every value in
percent (``0..100``) plus the example count ``"n"``.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from functools import lru_cache
from typing import Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "f1_score",
    "answer_in_output",
    "bleu",
    "sentence_bleu",
    "rouge_l",
    "rouge_scores",
    "prefix_exact_match",
    "qa_metrics",
    "reconstruction_metrics",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)

Answers = str | Sequence[str]


# --------------------------------------------------------------------------- QA


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _as_list(answers: Answers) -> list[str]:
    """Accept one gold answer or a list of them."""
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if not answers:
        raise ValueError("at least one gold answer is required")
    return answers


def exact_match(prediction: str, answers: Answers) -> float:
    """1.0 when the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _as_list(answers)))


def _token_f1(prediction: str, answer: str) -> float:
    """Bag-of-tokens F1 between two normalised strings (SQuAD definition)."""
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(answer).split()
    if not pred_tokens or not gold_tokens:
        # Both empty counts as a match; exactly one empty scores 0.
        return float(pred_tokens == gold_tokens)
    common = Counter(pred_tokens) & Counter(gold_tokens)
    overlap = sum(common.values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def f1_score(prediction: str, answers: Answers) -> float:
    """Token-level F1 of the prediction, maximised over the gold answers (in [0, 1])."""
    return max(_token_f1(prediction, a) for a in _as_list(answers))


def answer_in_output(prediction: str, answers: Answers) -> float:
    """1.0 when any normalised gold answer is a substring of the normalised prediction.

    Gold answers that normalise to the empty string (e.g. ``"the"``) never match, so an
    empty output cannot score.
    """
    pred = normalize_answer(prediction)
    for answer in _as_list(answers):
        gold = normalize_answer(answer)
        if gold and gold in pred:
            return 1.0
    return 0.0


def qa_metrics(predictions: Sequence[str], answers_list: Sequence[Answers]) -> dict[str, float]:
    """Mean QA scores in percent: ``exact_match``, ``f1``, ``accuracy`` (answer in output), ``n``."""
    _check_lengths(predictions, answers_list)
    n = len(predictions)
    if n == 0:
        return {"exact_match": 0.0, "f1": 0.0, "accuracy": 0.0, "n": 0}
    em = sum(exact_match(p, a) for p, a in zip(predictions, answers_list))
    f1 = sum(f1_score(p, a) for p, a in zip(predictions, answers_list))
    acc = sum(answer_in_output(p, a) for p, a in zip(predictions, answers_list))
    return {"exact_match": 100 * em / n, "f1": 100 * f1 / n, "accuracy": 100 * acc / n, "n": n}


# ---------------------------------------------------------------- reconstruction


def _check_lengths(predictions: Sequence[object], references: Sequence[object]) -> None:
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("expected sequences of strings, got a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} references"
        )


def bleu(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, 4-grams), 0..100."""
    import sacrebleu

    _check_lengths(predictions, references)
    if not predictions:
        return 0.0
    return float(sacrebleu.corpus_bleu(list(predictions), [list(references)]).score)


def sentence_bleu(prediction: str, reference: str) -> float:
    """Sentence-level BLEU of one prediction (sacrebleu's smoothed ``sentence_bleu``), 0..100."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, [reference]).score)


@lru_cache(maxsize=4)
def _rouge_scorer(types: tuple[str, ...]):  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(types), use_stemmer=False)


def rouge_scores(
    predictions: Sequence[str],
    references: Sequence[str],
    types: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, float]:
    """Mean ROUGE F-measures (0..100) keyed by ROUGE type, e.g. ``{"rougeL": 41.2}``.

    Uses rouge-score's default tokeniser (lower case, ASCII letters and digits only).
    """
    _check_lengths(predictions, references)
    types = tuple(types)
    if not predictions:
        return {t: 0.0 for t in types}
    scorer = _rouge_scorer(types)
    totals = dict.fromkeys(types, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)  # rouge-score takes (target, prediction)
        for t in types:
            totals[t] += scores[t].fmeasure
    return {t: 100 * v / len(predictions) for t, v in totals.items()}


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure over the pairs, 0..100."""
    return rouge_scores(predictions, references, types=("rougeL",))["rougeL"]


def prefix_exact_match(prediction: str, reference: str) -> float:
    """Fraction of the reference reproduced verbatim from its start, in [0, 1].

    Both strings are split on whitespace (``str.split()``). The score is the number of
    leading reference tokens that the prediction reproduces exactly (case- and
    punctuation-sensitive), up to the first mismatch or the end of either string,
    divided by the number of reference tokens. Extra prediction tokens after a fully
    reproduced reference do not lower the score. An empty reference scores 1.0 when
    the prediction is empty too, else 0.0.
    """
    ref_tokens = reference.split()
    pred_tokens = prediction.split()
    if not ref_tokens:
        return float(not pred_tokens)
    matched = 0
    for pred_tok, ref_tok in zip(pred_tokens, ref_tokens):
        if pred_tok != ref_tok:
            break
        matched += 1
    return matched / len(ref_tokens)


def reconstruction_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Reconstruction quality, all in percent.

    Keys: ``bleu`` (corpus), ``sentence_bleu`` (mean), ``rouge1``, ``rouge2``,
    ``rouge_l`` (mean F-measures), ``prefix_em`` (mean :func:`prefix_exact_match`),
    ``exact_match`` (share of outputs identical to the reference after whitespace
    collapsing) and ``n``.
    """
    _check_lengths(predictions, references)
    n = len(predictions)
    if n == 0:
        keys = ("bleu", "sentence_bleu", "rouge1", "rouge2", "rouge_l", "prefix_em", "exact_match")
        return {**dict.fromkeys(keys, 0.0), "n": 0}
    rouge = rouge_scores(predictions, references)
    pairs = list(zip(predictions, references))
    return {
        "bleu": bleu(predictions, references),
        "sentence_bleu": sum(sentence_bleu(p, r) for p, r in pairs) / n,
        "rouge1": rouge["rouge1"],
        "rouge2": rouge["rouge2"],
        "rouge_l": rouge["rougeL"],
        "prefix_em": 100 * sum(prefix_exact_match(p, r) for p, r in pairs) / n,
        "exact_match": 100 * sum(p.split() == r.split() for p, r in pairs) / n,
        "n": n,
    }
