"""Fill-in-the-blank questions cut from a passage: more stage-2 questions without a question generator.

One sentence of the passage with one span blanked out (a number, or a run of capitalised words that does not open
the sentence) becomes the question and the span its answer. Answering needs what extractive QA needs and restoring
does not teach: find the sentence among the documents by its content, then copy the missing words from the middle
of a document. Stage 2 (``--cloze_fraction``) turns a share of its samples into such questions over the same
documents, so the prompt, the distractors and the number of documents stay the product's.

Run as a module it writes such questions for a QA set, as a probe of that skill apart from the training mix::

    python -m gmsa_rag.data.cloze data/qa-multidoc --split dev --limit 200 --out runs/cloze-dev.jsonl.gz
    python benchmarks/qa.py --data runs/cloze-dev.jsonl.gz --gmsa-checkpoint checkpoints/smollm2-gmsa --base
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gmsa_rag.data.qa import QAExample, dev_layout, split_context, write_questions_main

#: What the question says before the blanked sentence; the blank itself.
CLOZE_PROMPT = "Fill in the blank: "
BLANK = "___"

_SENTENCE = re.compile(r"[^.!?\n]*[^.!?\n\d][.!?](?=\s|$)|[^.!?\n]+$")
_NUMBER = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_NAME_WORD = r"(?:[A-Z][\w'’-]*\w|[A-Z])"
_NAME = rf"{_NAME_WORD}(?:\s+(?:(?:of|the|de|von|van|and|del|la|le)\s+)?{_NAME_WORD})*"
_SPAN = re.compile(rf"(?<![\w-])(?:{_NUMBER}|{_NAME})(?![\w-])")
#: Capitalised words that are no answer on their own (abbreviations cut by the sentence split, pronouns, articles).
_NOT_ANSWERS = frozenset({"A", "An", "The", "I", "It", "He", "She", "They", "We", "No", "St", "Mr", "Mrs", "Dr", "Jr"})


@dataclass(frozen=True)
class Cloze:
    """A fill-in-the-blank question and its answer (the blanked words)."""

    question: str
    answer: str


def cloze_spans(sentence: str, max_words: int = 5) -> list[tuple[int, int]]:
    """Character spans a question may blank out of ``sentence``: numbers and runs of capitalised words of at most
    ``max_words`` words, never the sentence's first word (capitalised for grammar, not as a name)."""
    opening = re.match(r"\s*\S+", sentence)
    first_word_end = opening.end() if opening else 0
    spans = []
    for match in _SPAN.finditer(sentence):
        if (match.start() < first_word_end or len(match.group().split()) > max_words
                or match.group() in _NOT_ANSWERS):
            continue
        spans.append(match.span())
    return spans


def make_cloze(passage: str, rng: random.Random, min_words: int = 6, max_words: int = 40) -> Cloze | None:
    """A cloze question from one sentence of ``passage`` (its text, not its ``Title:`` line) of ``min_words`` to
    ``max_words`` words (tables flattened into one long line are skipped) that holds a span to blank; None where no
    sentence does."""
    _, text = split_context(passage)
    candidates = []
    for match in _SENTENCE.finditer(text):
        sentence = match.group().strip()
        words = sum(any(c.isalpha() for c in w) for w in sentence.split())
        if min_words <= words <= max_words:
            spans = cloze_spans(sentence)
            if spans:
                candidates.append((sentence, spans))
    if not candidates:
        return None
    sentence, spans = rng.choice(candidates)
    start, end = rng.choice(spans)
    question = f"{CLOZE_PROMPT}{sentence[:start]}{BLANK}{sentence[end:]}"
    return Cloze(question=question, answer=sentence[start:end])


def cloze_example(example: QAExample, rng: random.Random) -> QAExample | None:
    """The same documents with a cloze question cut from the example's gold passage (so its distractors stay the
    hard ones retrieval gave it); None without a gold passage or a sentence to blank."""
    if example.gold_context is None:
        return None
    cloze = make_cloze(example.gold_context, rng)
    if cloze is None:
        return None
    return QAExample(cloze.question, [cloze.answer], list(example.contexts), example.gold_index)


def cloze_questions(examples: Sequence[QAExample], max_docs: int = 5, seed: int = 0) -> list[QAExample]:
    """A cloze question for each example of a split laid out as dev shows it (:func:`dev_layout`) that has a sentence
    to blank."""
    rng = random.Random(seed)
    return [c for i, e in enumerate(examples) if (c := cloze_example(dev_layout(e, max_docs, i), rng))]


def main(argv: list[str] | None = None) -> int:
    return write_questions_main(argv, "cloze", "Write cloze questions cut from the gold passages of a QA set, over "
                                "the same documents (gold among the hardest distractors, as dev shows them).",
                                cloze_questions)


if __name__ == "__main__":
    raise SystemExit(main())
