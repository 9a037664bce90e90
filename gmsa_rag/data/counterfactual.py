"""Counterfactual answers: the gold passage's answer swapped for another question's answer of the same shape.

A stage-2 reader meets each of its ~17.6k training questions several times, and learns some answers by heart: further
training raised its train accuracy while dev fell (rounds 29-30). Here the gold passage's answer is replaced, wherever
the passage says it, by the answer of another training question of the same shape (a year for a year, a number for a
number, a name for a name), which then becomes the target. The question and the documents are the product's; what the
reader knew by heart is now wrong, and only the documents hold the answer (the counterfactual passages of Longpre et
al. 2021, "Entity-Based Knowledge Conflicts in Question Answering"). Stage 2 (``--counterfactual_fraction``) turns a
share of its samples into such questions, each draw a new substitute.

Run as a module it writes such questions for a QA set (a probe of reading against knowing, apart from the training mix)::

    python -m gmsa_rag.data.counterfactual data/qa-multidoc --split dev --limit 200 --out runs/cf-dev.jsonl.gz
"""
from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from gmsa_rag.data.qa import QAExample, dev_layout, write_questions_main

#: The shapes an answer is swapped within (see :func:`answer_shape`).
ANSWER_SHAPES = ("year", "percent", "money", "number", "date", "counted", "name", "phrase")
#: Longer answers are neither swapped nor used as substitutes (a swapped clause reads as a broken passage).
MAX_ANSWER_WORDS = 5
#: A (question word, shape) kind with fewer answers than this draws from its shape's whole pool instead.
MIN_KIND_ANSWERS = 20

_YEAR = re.compile(r"1\d{3}|20\d{2}")
_NUMBER = re.compile(r"[\d,.]+")
_MONTH = re.compile(r"\b(?:january|february|march|april|may|june|july|august|september|october|november|december)\b")
_QUESTION_WORD = re.compile(r"\b(how many|how much|how long|how old|who|whom|whose|when|where|which|what|why|how)\b")


def answer_shape(answer: str) -> str:
    """``year`` (four digits, 1000-2099), ``percent``, ``money``, ``number`` (digits alone), ``date`` (digits and a
    month), ``counted`` (any other answer with a digit: "4 games", "binary32"), ``name`` (capitalised) or ``phrase``."""
    answer = clean_answer(answer)
    if _YEAR.fullmatch(answer):
        return "year"
    if any(c.isdigit() for c in answer):
        if "%" in answer or "percent" in answer.lower():
            return "percent"
        if any(c in answer for c in "$£€¥"):
            return "money"
        if _NUMBER.fullmatch(answer):
            return "number"
        return "date" if _MONTH.search(answer.lower()) else "counted"
    return "name" if answer[:1].isupper() else "phrase"


def question_word(question: str) -> str:
    """The question's first question word ("how many" and the like as one), or ``other``."""
    found = _QUESTION_WORD.search(question.lower())
    return found.group(1) if found else "other"


def clean_answer(answer: str) -> str:
    """``answer`` without surrounding spaces and trailing punctuation ("Karl Marx." -> "Karl Marx")."""
    return answer.strip().rstrip(".,;:!?").strip()


def _pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """Whole-word, case-blind matches of any of ``phrases``, the longest first (so "Karl Marx" wins over "Karl")."""
    ordered = sorted({p.strip() for p in phrases if p.strip()}, key=len, reverse=True)
    return re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in ordered), re.IGNORECASE)


def mentions(text: str, phrase: str) -> bool:
    """Whether ``text`` holds ``phrase`` as whole words (case-blind)."""
    return bool(phrase.strip()) and _pattern([phrase]).search(text) is not None


@dataclass(frozen=True)
class AnswerPool:
    """The distinct short training answers by kind, (question word, shape), and by shape alone: where substitutes are
    drawn from, so a "who" name is swapped for another "who" name (a person, mostly) and not for a place."""

    by_kind: dict[tuple[str, str], tuple[str, ...]]
    by_shape: dict[str, tuple[str, ...]]

    @classmethod
    def from_examples(cls, examples: Iterable[QAExample]) -> AnswerPool:
        """Each example's first answer (cleaned) of at most :data:`MAX_ANSWER_WORDS` words, once, in first-seen order."""
        kinds: dict[tuple[str, str], dict[str, None]] = {}
        shapes: dict[str, dict[str, None]] = {}
        for example in examples:
            answer = clean_answer(example.answers[0])
            if answer and len(answer.split()) <= MAX_ANSWER_WORDS:
                shape = answer_shape(answer)
                kinds.setdefault((question_word(example.question), shape), {})[answer] = None
                shapes.setdefault(shape, {})[answer] = None
        return cls({k: tuple(v) for k, v in kinds.items()}, {k: tuple(v) for k, v in shapes.items()})

    def draw(self, question: str, shape: str, rng: random.Random) -> str | None:
        """A random answer of the question's kind, or of ``shape`` where that kind has few answers (None when the pool
        has no answer of ``shape``)."""
        answers = self.by_kind.get((question_word(question), shape), ())
        if len(answers) < MIN_KIND_ANSWERS:
            answers = self.by_shape.get(shape, ())
        return answers[rng.randrange(len(answers))] if answers else None


def counterfactual_example(example: QAExample, pool: AnswerPool, rng: random.Random,
                           tries: int = 8) -> QAExample | None:
    """The example with every mention of its longest answer the gold passage names (and of the answers within it or
    holding it: "Marx" for "Karl Marx") replaced by one substitute of the same kind, the substitute its only answer.
    Other answers the passage names stay (two people who died: the substitute is one of them). The substitute is drawn
    again (up to ``tries`` times) while it is one of the answers or already stands in the question or any document,
    where it would be ambiguous. None without a gold passage, when the gold passage names no answer (or only one longer
    than :data:`MAX_ANSWER_WORDS` words), or when no draw fits."""
    gold = example.gold_context
    if gold is None:
        return None
    named = [a for a in map(clean_answer, example.answers) if mentions(gold, a)]
    if not named:
        return None
    longest = max(named, key=len)
    if len(longest.split()) > MAX_ANSWER_WORDS:
        return None
    named = [a for a in named if mentions(longest, a) or mentions(a, longest)]
    shown = [example.question, *example.contexts]
    for _ in range(tries):
        substitute = pool.draw(example.question, answer_shape(longest), rng)
        if substitute is None:
            return None
        if any(mentions(a, substitute) or mentions(substitute, a) for a in example.answers):
            continue
        if any(mentions(text, substitute) for text in shown):
            continue
        contexts = list(example.contexts)
        contexts[example.gold_index] = _pattern(named).sub(lambda _: substitute, gold)
        return QAExample(example.question, [substitute], contexts, example.gold_index)
    return None


def counterfactual_pairs(examples: Sequence[QAExample], max_docs: int = 5,
                         seed: int = 0) -> list[tuple[QAExample, QAExample]]:
    """(as shown, swapped) for each example of a split laid out as dev shows it (:func:`dev_layout`) that gives a
    counterfactual question; substitutes come from the split's own answers. The same arguments give the same pairs,
    so a probe can find each swapped question's original answers again (``benchmarks/counterfactual_probe.py``)."""
    pool, rng = AnswerPool.from_examples(examples), random.Random(seed)
    shown = [dev_layout(e, max_docs, i) for i, e in enumerate(examples)]
    return [(e, c) for e in shown if (c := counterfactual_example(e, pool, rng))]


def main(argv: list[str] | None = None) -> int:
    return write_questions_main(
        argv, "counterfactual", "Write counterfactual questions for a QA set: the answer in the gold passage swapped "
        "for another question's answer of the same kind, over the same documents (gold among the hardest distractors, "
        "as dev shows them).", lambda examples, max_docs, seed: [s for _, s in counterfactual_pairs(examples, max_docs, seed)])


if __name__ == "__main__":
    raise SystemExit(main())
