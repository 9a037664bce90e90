"""Selective expansion: a compressed document with the run of it that best matches the question read as text.

Each GMSA soft token stands for one group of ``rate`` consecutive tokens (group merging), so the soft tokens of any
run of groups can be swapped for exactly the tokens they stand for. REFRAG (Lin et al., 2025) expands chosen chunks
of a compressed context back to text the same way. Here the decoder's budget is that of a lower rate: a document
compressed at ``rate`` (e.g. 8x, the cached soft tokens) gets back as text the run of groups whose words best match
the question (BM25), as many groups as keep it within the positions it would take at ``budget_rate`` (e.g. 4x).
The cache does not change: the text is the document's own, at hand wherever its soft tokens are.

The run can instead be read at a finer rate (``fine_rate``, e.g. 2x soft tokens of the same document, a second
cache): its groups of ``rate`` tokens are then groups of ``fine_rate`` tokens, which line up with them wherever
``fine_rate`` divides ``rate`` and the encoder window.

Measured untrained (qa-multidoc dev, first 200, gold passage alone, 4x's positions; benchmarks/results/README.md,
round 21): as text, 17.0% against 30.0% at plain 4x; as 2x soft tokens, 25.5-28.5% against 25.5-30.0%. Not on the
product's path.
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


def expandable_groups(n_tokens: int, soft_count: int, rate: int, budget_rate: int, fine_rate: int = 1) -> int:
    """How many soft tokens (each ``rate`` tokens, read back as ``rate / fine_rate`` positions: text for
    ``fine_rate`` 1) fit within ``ceil(n_tokens / budget_rate)`` decoder positions: each costs
    ``rate / fine_rate - 1`` more positions than its soft token."""
    if rate < 2 or budget_rate < 1 or fine_rate < 1 or rate % fine_rate or fine_rate == rate:
        raise ValueError(f"need rate >= 2, budget_rate >= 1 and fine_rate a divisor of rate below it; got {rate}, "
                         f"{budget_rate} and {fine_rate}")
    spare = math.ceil(n_tokens / budget_rate) - soft_count
    return max(0, min(soft_count, spare // (rate // fine_rate - 1)))


def choose_expansion(question: str, token_ids: Sequence[int], tokenizer: PreTrainedTokenizerBase, window: int,
                     rate: int, budget_rate: int, fine_rate: int = 1) -> Expansion | None:
    """The run of groups of a document (``token_ids``, as the encoder tokenized it, compressed in windows of
    ``window`` tokens at ``rate``) with the best BM25 match to ``question`` among runs of the length the budget
    allows when read at ``fine_rate`` (ties: the earliest); None when no group fits or the question shares no word
    with the document."""
    spans = group_spans(len(token_ids), window, rate)
    count = expandable_groups(len(token_ids), len(spans), rate, budget_rate, fine_rate)
    if count == 0:
        return None
    runs = [(first, spans[first][0], spans[first + count - 1][1]) for first in range(len(spans) - count + 1)]
    scores = bm25_scores(question, [tokenizer.decode(token_ids[a:b]) for _, a, b in runs])
    best = best_first(scores)[0]
    if scores[best] <= 0:
        return None
    first, start, end = runs[best]
    return Expansion(first, count, start, end)


def expanded(soft: torch.Tensor, token_ids: Sequence[int], expansion: Expansion | None,
             fine: torch.Tensor | None = None, fine_spans: Sequence[tuple[int, int]] = ()) -> torch.Tensor | tuple:
    """A document's context: its soft tokens, with ``expansion``'s run given back as text (a tuple of pieces), or
    with ``fine`` (the document's finer soft tokens, standing for ``fine_spans``) as the fine soft tokens of the
    run."""
    if expansion is None:
        return soft
    e = expansion
    if fine is None:
        middle: torch.Tensor | list[int] = list(token_ids[e.start : e.end])
    else:
        middle = fine[[i for i, (a, b) in enumerate(fine_spans) if e.start <= a and b <= e.end]]
    pieces = (soft[: e.first], middle, soft[e.first + e.count :])
    return tuple(p for p in pieces if len(p))


def choose_expansions(model, question: str, texts: Sequence[str], rate: int, budget_rate: int,
                      fine_rate: int = 1) -> list[tuple[list[int], Expansion | None]]:
    """Each document's tokens (as ``model``'s encoder reads them) and its run to read more finely
    (:func:`choose_expansion`), for :func:`expand_documents`."""
    window = model.config.window
    return [(ids, choose_expansion(question, ids, model.tokenizer, window, rate, budget_rate, fine_rate))
            for ids in model.tokenize(list(texts))]


def expand_documents(model, question: str, texts: Sequence[str], softs: Sequence[torch.Tensor], rate: int,
                     budget_rate: int, fine_softs: Sequence[torch.Tensor] | None = None, fine_rate: int = 1,
                     chosen: Sequence[tuple[list[int], Expansion | None]] | None = None) -> list[torch.Tensor | tuple]:
    """Each document (``texts``, compressed into ``softs`` at ``rate`` by ``model``) as a context within the
    decoder positions of ``budget_rate``, its best-matching run of groups read as text, or with ``fine_softs``
    (the same documents compressed at ``fine_rate``) as those finer soft tokens. ``chosen``: the runs from
    :func:`choose_expansions`, when the caller has them already."""
    if budget_rate >= rate:
        raise ValueError(f"the budget's rate ({budget_rate}x) must be below the soft tokens' ({rate}x)")
    if (fine_softs is None) != (fine_rate == 1):
        raise ValueError("give fine_softs with a fine_rate above 1, and neither for text")
    window = model.config.window
    if fine_rate > 1 and window % rate:
        raise ValueError(f"the encoder window ({window}) must be a multiple of the rate ({rate}x) for groups to line up")
    if len(texts) != len(softs) or (fine_softs is not None and len(fine_softs) != len(texts)):
        raise ValueError(f"{len(texts)} documents but {len(softs)} soft-token tensors"
                         + (f" and {len(fine_softs)} fine ones" if fine_softs is not None else ""))
    if chosen is None:
        chosen = choose_expansions(model, question, texts, rate, budget_rate, fine_rate)
    contexts = []
    for d, ((ids, choice), soft) in enumerate(zip(chosen, softs)):
        spans = {r: group_spans(len(ids), window, r) for r in {rate, fine_rate}}
        fine = None if fine_softs is None else fine_softs[d]
        for r, tokens in ((rate, soft), (fine_rate, fine)):
            if tokens is not None and len(spans[r]) != len(tokens):
                raise ValueError(f"{len(tokens)} soft tokens do not stand for a {len(ids)}-token document at {r}x")
        contexts.append(expanded(soft, ids, choice, fine, spans[fine_rate]))
    return contexts
