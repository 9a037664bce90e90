"""Lexical match of a question to its retrieved documents (BM25 through ``bm25s``).

Dense retrieval ranks documents by meaning, so the documents it returns beside the one that holds the answer are
about the same thing (the stage-2 data's distractors are exactly MiniLM's closest passages that lack the answer).
Which of them shares the question's rarer words is a different, cheap signal: BM25 over one question's handful of
documents, a millisecond a question. Extractive decoding can then hold the answer to the best-matching documents
(``GMSAModel.generate(extract_top=...)``) while the decoder still reads all of them as soft tokens.
"""
from __future__ import annotations

import logging
import os
import re
from typing import Sequence

import numpy as np

# a sentence ends at . ! or ? followed by space and a capital, digit or opening quote/bracket, but not after an initial
# or a short abbreviation ("U.S. Army", "J. K. Rowling", "Dr. Who"); each line is a sentence of its own (a document's
# "Title: ..." line among them)
_SENTENCE_END = re.compile(r"(?<=[.!?])(?<!\b[A-Z]\.)(?<!\b[A-Z][a-z]\.)\s+(?=[\"'(\[]?[A-Z0-9])")


def bm25_scores(question: str, documents: Sequence[str]) -> list[float]:
    """BM25 (Lucene weighting, English stop words removed) of ``question`` against each document, the documents
    themselves the collection."""
    if not documents:
        return []
    bm25s = _bm25s()
    corpus = bm25s.tokenize(list(documents), stopwords="en", show_progress=False)
    query = bm25s.tokenize([question], stopwords="en", show_progress=False, return_ids=False)[0]
    if not query or not corpus.vocab:  # (documents of stop words and punctuation only: nothing to match)
        return [0.0] * len(documents)
    retriever = bm25s.BM25()
    retriever.index(corpus, show_progress=False)
    return [float(s) for s in retriever.get_scores(query)]


def _bm25s():
    """bm25s, imported on first use: where JAX is installed bm25s runs a JAX op at import, and JAX then takes 75% of
    the GPU's memory unless told otherwise (measured on an H200: three training processes ran out of memory at load
    time). Unless the user set it, JAX is told to allocate on demand."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its logger to DEBUG: one line per index built
    return bm25s


def best_first(scores: Sequence[float]) -> list[int]:
    """Places ordered by score, highest first (ties: the given order)."""
    return [int(i) for i in np.argsort(-np.asarray(scores, dtype=float), kind="stable")]


def ranked(question: str, documents: Sequence[str]) -> list[int]:
    """Places of ``documents``, best BM25 match to ``question`` first (ties: retrieval order)."""
    return best_first(bm25_scores(question, documents))


#: How a prompt orders its documents: as given (retrieval's order; in training the gold passage at a random place), or
#: by BM25 match to the question, best first (a reranker's order) or best last (nearest the question).
DOCUMENT_ORDERS = ("given", "bm25_first", "bm25_last")


def ordered(question: str, documents: Sequence[str], order: str) -> list[int]:
    """Places of ``documents`` in the order ``order`` (one of :data:`DOCUMENT_ORDERS`) shows them; ``bm25_last`` is
    ``bm25_first`` reversed."""
    if order not in DOCUMENT_ORDERS:
        raise ValueError(f"document order must be one of {', '.join(DOCUMENT_ORDERS)}; got {order!r}")
    if order == "given":
        return list(range(len(documents)))
    return kept_places(bm25_scores(question, documents), best_last=order == "bm25_last")


def lead_place(count: int, order: str) -> int:
    """Where the best-ranked of ``count`` documents shown in ``order`` stands (the one a lead rate reads finer): last
    with ``bm25_last``, first otherwise (``given`` hands the best-ranked first, as retrieval ranks them)."""
    return count - 1 if order == "bm25_last" else 0


def lead(scores: Sequence[float]) -> float:
    """How far the best score leads the next (``inf`` with fewer than two): a confident rerank keeps the best document
    alone when it leads by more than a margin (measured in round 27: a reader of five ranked documents loses ~3.5
    points to the other four where the best is the gold one)."""
    top = sorted((float(s) for s in scores), reverse=True)
    return top[0] - top[1] if len(top) > 1 else float("inf")


def kept_places(scores: Sequence[float], keep: int = 0, best_last: bool = False,
                confident_margin: float | None = None) -> list[int]:
    """What a BM25 rerank hands on, from each document's score: the places of the ``keep`` best (0: all), best first
    or with ``best_last`` best last; with ``confident_margin``, only the best where its score leads the next by more
    than that (:func:`lead`)."""
    if confident_margin is not None and lead(scores) > confident_margin:
        return best_first(scores)[:1]
    places = best_first(scores)[: keep or None]
    return places[::-1] if best_last else places


def best_matching(question: str, documents: Sequence[str], top: int) -> list[int]:
    """Places of the ``top`` documents that match ``question`` best (ties: retrieval order), in retrieval order."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    return sorted(ranked(question, documents)[:top])


def best_documents(question: str, documents: Sequence[str], top: int) -> list[str]:
    """The ``top`` documents of best match to ``question`` (all when ``top`` is 0), in retrieval order: the texts an
    extractive answer may quote under ``extract_top``."""
    if top == 0 or top >= len(documents):
        return list(documents)
    return [documents[i] for i in best_matching(question, documents, top)]


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (each line split at sentence ends), stripped, empty ones left out."""
    return [s.strip() for line in text.splitlines() for s in _SENTENCE_END.split(line) if s.strip()]


def best_sentences(question: str, documents: Sequence[str], top: int) -> list[str]:
    """The ``top`` sentences of ``documents`` (all of them pooled) of best BM25 match to ``question``, in document
    order: the texts an extractive answer may quote under ``extract_sentences``."""
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    sentences = [s for document in documents for s in split_sentences(document)]
    return [sentences[i] for i in best_matching(question, sentences, top)] if sentences else list(documents)
