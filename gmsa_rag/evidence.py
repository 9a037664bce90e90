"""Quoted evidence: stage 2 can train the decoder to quote the words that lead to the answer before giving it.

Round 19 split the 4x loss: where the soft tokens still hold the answer (their restoration keeps it), the reader
answers from them 39% of the time against 62% for the text fine-tune (``benchmarks/results/README.md``). Restoring
is what stage 1 taught the decoder; picking the answer out of the soft tokens is what it does badly. With
``--quote_evidence`` the target becomes the answer's sentence, from at most :data:`QUOTE_WORDS` words before the
answer up to it, with the answer in bold::

    "an ancient Chinese military treatise attributed to **Sun Tzu**"

so the decoder first restores the place that holds the answer (conditioned on the question) and then reads the
answer off text it has just written, which it reads as text. The cost is the quoted words' decode steps
(``quote_tokens@r`` in the trainer's dev log). Generation strips the quote (:func:`split_quote`).
"""
from __future__ import annotations

import re
from typing import Sequence

from .lexical import split_sentences

QUOTE_WORDS = 12
"""Most words quoted before the answer (the sentence's words nearest to it)."""

QUOTE_TOKENS = 48
"""New tokens a quoting model may spend on its quote, on top of the answer's budget."""

_BOLD = "**"


def find_answer(answers: Sequence[str], passage: str) -> tuple[str, int, str] | None:
    """(the sentence of ``passage`` that holds an answer, where the answer starts in it, the answer as the passage
    writes it), trying the answers in order and the passage's body before its title line; None when none is there."""
    sentences = split_sentences(passage)
    body = [s for s in sentences if not s.startswith("Title: ")] + [s for s in sentences if s.startswith("Title: ")]
    for answer in answers:
        answer = answer.strip()
        if not answer:
            continue
        left = r"\b" if answer[0].isalnum() else ""
        right = r"\b" if answer[-1].isalnum() else ""
        pattern = re.compile(left + re.escape(answer) + right, re.IGNORECASE)
        for sentence in body:
            match = pattern.search(sentence)
            if match:
                return sentence, match.start(), match.group(0)
    return None


def quoted(answers: Sequence[str], passage: str, words: int = QUOTE_WORDS) -> str | None:
    """The training target: up to ``words`` words before the answer in its sentence, then the answer in bold; None
    when the passage does not hold any of ``answers``."""
    found = find_answer(answers, passage)
    if found is None:
        return None
    sentence, start, answer = found
    lead = sentence[:start].split()
    if lead and lead[0] == "Title:":
        lead = lead[1:]
    lead = lead[-words:] if words > 0 else []
    return " ".join([*lead, f"{_BOLD}{answer}{_BOLD}"])


def split_quote(text: str) -> tuple[str, str]:
    """(the quote, the answer) of a quoting model's output: the answer is the first bold span (to the end when it is
    never closed); output without bold is all answer."""
    opened = text.find(_BOLD)
    if opened < 0:
        return "", text.strip()
    rest = text[opened + len(_BOLD):]
    closed = rest.find(_BOLD)
    answer = rest if closed < 0 else rest[:closed]
    return text[:opened].strip(), answer.strip()
