"""Selective expansion: a compressed document with the run of it that best matches the question read as text.

Each GMSA soft token stands for one group of ``rate`` consecutive tokens (group merging), so the soft tokens of any
run of groups can be swapped for exactly the tokens they stand for. REFRAG (Lin et al., 2025) expands chosen chunks
of a compressed context back to text the same way. Here the decoder's budget is that of a lower rate: a document
compressed at ``rate`` (e.g. 8x, the cached soft tokens) gets back as text the run of groups whose words best match
the question (BM25), as many groups as keep it within the positions it would take at ``budget_rate`` (e.g. 4x).
The cache does not change: the text is the document's own, at hand wherever its soft tokens are.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from .lexical import bm25_scores, best_first
from .prompt import group_spans


@dataclass(frozen=True)
class Expansion:
    """Soft tokens ``[first, first + count)`` of a document, given back as its tokens ``[start, end)``."""

    first: int
    count: int
    start: int
    end: int


def expandable_groups(n_tokens: int, soft_count: int, rate: int, budget_rate: int) -> int:
    """How many soft tokens (each ``rate`` tokens as text) fit back as text within ``ceil(n_tokens / budget_rate)``
    decoder positions: each costs ``rate - 1`` more positions than its soft token."""
    if rate < 2 or budget_rate < 1:
        raise ValueError(f"rate must be >= 2 and budget_rate >= 1, got {rate} and {budget_rate}")
    spare = math.ceil(n_tokens / budget_rate) - soft_count
    return max(0, min(soft_count, spare // (rate - 1)))


def choose_expansion(question: str, token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, window: int,
                     rate: int, budget_rate: int) -> Expansion | None:
    """The run of groups of a document (``token_ids``, as the encoder tokenized it, compressed in windows of
    ``window`` tokens at ``rate``) with the best BM25 match to ``question`` among runs of the length the budget
    allows (ties: the earliest); None when no group fits or the question shares no word with the document."""
    spans = group_spans(len(token_ids), window, rate)
    count = expandable_groups(len(token_ids), len(spans), rate, budget_rate)
    if count == 0:
        return None
    runs = [(first, spans[first][0], spans[first + count - 1][1]) for first in range(len(spans) - count + 1)]
    scores = bm25_scores(question, [tokenizer.decode(token_ids[a:b]) for _, a, b in runs])
    best = best_first(scores)[0]
    if scores[best] <= 0:
        return None
    first, start, end = runs[best]
    return Expansion(first, count, start, end)


def expanded(soft: torch.Tensor, token_ids: Sequence[int], expansion: Expansion | None) -> torch.Tensor | tuple:
    """A document's context: its soft tokens, with ``expansion``'s run given back as text (a tuple of pieces)."""
    if expansion is None:
        return soft
    e = expansion
    pieces = (soft[: e.first], list(token_ids[e.start : e.end]), soft[e.first + e.count :])
    return tuple(p for p in pieces if len(p))


def expand_documents(model, question: str, texts: Sequence[str], softs: Sequence[torch.Tensor], rate: int,
                     budget_rate: int) -> list[torch.Tensor | tuple]:
    """Each document (``texts``, compressed into ``softs`` at ``rate`` by ``model``) as a context within the
    decoder positions of ``budget_rate``, its best-matching run of groups read as text."""
    if budget_rate >= rate:
        raise ValueError(f"the budget's rate ({budget_rate}x) must be below the soft tokens' ({rate}x)")
    if len(texts) != len(softs):
        raise ValueError(f"{len(texts)} documents but {len(softs)} soft-token tensors")
    contexts = []
    for ids, soft in zip(model.tokenize(list(texts)), softs):
        if len(group_spans(len(ids), model.config.window, rate)) != len(soft):
            raise ValueError(f"{len(soft)} soft tokens do not stand for a {len(ids)}-token document at {rate}x")
        choice = choose_expansion(question, ids, model.tokenizer, model.config.window, rate, budget_rate)
        contexts.append(expanded(soft, ids, choice))
    return contexts
