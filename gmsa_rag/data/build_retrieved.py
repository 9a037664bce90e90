"""Gold passages for questions that come without one, retrieved from Wikipedia chunks.

For NQ-style questions with answers and no passage (``shared/data/qa/efficientqa-dev-test.questions.jsonl.gz``:
3,569 EfficientQA questions), find a Wikipedia chunk that holds an answer and is about the question, and write
the question in the oracle format ``build_qa`` reads (``question``, ``answers``, ``ctxs`` = that one passage
with ``isgold``), so that it can join the stage-2 training set (``build_qa --extra-train``).

1. **Candidates:** every chunk (``min_words``..``max_words`` words of one article, titled, cut as ``build_qa``
   cuts its distractor chunks) whose normalised title + text contains a normalised answer as whole tokens
   (:func:`~gmsa_rag.data.build_nq.contains_answer`'s rule), streamed over the given Wikipedia parts.
2. **Lexical ranking:** a question keeps its ``lexical_top`` candidates with the most IDF weight of the
   question's content words (document frequencies over all chunks streamed).
3. **MiniLM re-ranking:** those are embedded with all-MiniLM-L6-v2; the most similar to the question becomes
   its gold passage if its cosine similarity is at least ``min_similarity``, else the question is dropped.

Measured on the EfficientQA file over wiki-00..13 (546,145 chunks, 12 minutes on 2 CPU cores): 2,851 of 3,569
questions have an answer-holding chunk, 1,912 at cosine >= 0.3, 639 at >= 0.6 (the default). Read by hand, most
passages under 0.6 hold the answer string by chance (a "2016" in another team's history) and about half of those
at 0.6-0.7 support the answer: the 50,240 articles of ``wiki/`` are too few for most of these questions. The
output is therefore not part of ``data/qa-multidoc`` (see ``docs/data.md``).

Wikipedia parts 14 and 15 (stage-1 dev, held-out test) are refused. Questions whose normalised text equals a
question of the NQ dev set (the issue's judge) are dropped here too (``build_qa`` checks again).

Run::

    python -m gmsa_rag.data.build_retrieved --out data/efficientqa-retrieved.jsonl.gz
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gmsa_rag.backbone import cache_root
from gmsa_rag.data import DEFAULT_QA_DIR
from gmsa_rag.data.build_nq import Embedder, minilm_embedder, read_records, write_jsonl_gz
from gmsa_rag.data.build_qa import _SHARED, _check_wiki_part, cached_embedder, wiki_chunks
from gmsa_rag.metrics import normalize_answer

__all__ = ["RetrievalConfig", "RetrievalStats", "AnswerIndex", "retrieve_gold", "main"]

DEFAULT_QUESTIONS: Path = _SHARED / "qa" / "efficientqa-dev-test.questions.jsonl.gz"
DEFAULT_PARTS: tuple[Path, ...] = tuple(_SHARED / "wiki" / f"wiki-{i:02d}.jsonl.gz" for i in range(14))
SOURCE = "efficientqa (answers only; gold passage retrieved from wiki)"

#: Words too common to say what a question is about (the question words and the commonest function words).
STOPWORDS = frozenset(
    "who what when where which why how whom whose is are was were be been being do does did has have had "
    "in on at of to for from by with as and or but not no that this these those it its into about over after "
    "before than then there their they he she his her him them we you your i me my our us can could will would "
    "shall should may might must s name named called first last most many much one two".split()
)


@dataclass(frozen=True)
class RetrievalConfig:
    """Parameters of one retrieval."""

    min_words: int = 60
    max_words: int = 150
    lexical_top: int = 10
    min_similarity: float = 0.6
    max_seq_length: int = 128


@dataclass
class RetrievalStats:
    """What a retrieval did (saved next to its output)."""

    questions_in: int = 0
    dropped_same_question_as_nq_dev: int = 0
    dropped_no_answer_tokens: int = 0
    chunks_streamed: int = 0
    questions_with_candidates: int = 0
    dropped_below_similarity: int = 0
    kept: int = 0
    mean_candidates: float = 0.0
    mean_gold_similarity: float = 0.0
    by_part: dict[str, int] = field(default_factory=dict)


def _tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


class AnswerIndex:
    """Finds, in one pass over a token list, which questions have an answer in it (as whole tokens)."""

    def __init__(self, answers: Sequence[Sequence[str]]) -> None:
        self.by_first: dict[str, list[tuple[tuple[str, ...], int]]] = {}
        for qi, options in enumerate(answers):
            for answer in dict.fromkeys(tuple(_tokens(a)) for a in options):
                if answer:
                    self.by_first.setdefault(answer[0], []).append((answer, qi))

    def questions_in(self, tokens: Sequence[str]) -> set[int]:
        """Indices of the questions one of whose answers occurs in ``tokens``."""
        found: set[int] = set()
        for i, token in enumerate(tokens):
            for answer, qi in self.by_first.get(token, ()):
                if qi not in found and tuple(tokens[i:i + len(answer)]) == answer:
                    found.add(qi)
        return found


def _chunks(parts: Iterable[Path], config: RetrievalConfig) -> Iterator[tuple[str, dict[str, str]]]:
    for part in parts:
        chunks, _ = wiki_chunks(part, config.min_words, config.max_words)
        for chunk in chunks:
            yield part.name.split(".")[0], chunk


def retrieve_gold(
    questions: Sequence[dict[str, Any]],
    chunks: Iterable[tuple[str, dict[str, str]]],
    embed: Embedder,
    config: RetrievalConfig,
    exclude_questions: set[str] = frozenset(),
    progress: bool = False,
) -> tuple[list[dict[str, Any]], RetrievalStats]:
    """Oracle-format records (one retrieved gold passage each) for ``questions`` (``question``, ``answers``),
    from ``chunks`` (``(part name, {title, text})``); ``exclude_questions``: normalised questions to drop."""
    stats = RetrievalStats(questions_in=len(questions))
    kept: list[dict[str, Any]] = []
    for q in questions:
        if normalize_answer(q["question"]) in exclude_questions:
            stats.dropped_same_question_as_nq_dev += 1
        elif not any(_tokens(a) for a in q["answers"]):
            stats.dropped_no_answer_tokens += 1
        else:
            kept.append(q)
    index = AnswerIndex([q["answers"] for q in kept])
    content = [{w for w in _tokens(q["question"]) if w not in STOPWORDS} for q in kept]
    vocabulary = set().union(*content) if content else set()
    document_frequency: Counter[str] = Counter()
    candidates: list[list[int]] = [[] for _ in kept]  # chunk ids per question
    stored: dict[int, tuple[str, dict[str, str], frozenset[str]]] = {}  # chunk id -> (part, chunk, its words)
    for cid, (part, chunk) in enumerate(tqdm(chunks, desc="chunks", unit=" chunk", disable=not progress), start=1):
        tokens = _tokens(f"{chunk['title']} {chunk['text']}")
        words = frozenset(tokens)
        document_frequency.update(words & vocabulary)
        hits = index.questions_in(tokens)
        if hits:
            stored[cid] = (part, chunk, words & vocabulary)
            for qi in hits:
                candidates[qi].append(cid)
        stats.chunks_streamed = cid

    n = max(stats.chunks_streamed, 1)
    idf = {w: math.log(n / (1 + document_frequency[w])) for w in vocabulary}
    shortlists: list[list[int]] = []
    for qi, cids in enumerate(candidates):
        shortlists.append(heapq.nlargest(config.lexical_top, cids,
                                         key=lambda c: sum(idf[w] for w in content[qi] & stored[c][2])))
    stats.questions_with_candidates = sum(bool(c) for c in candidates)
    stats.mean_candidates = float(np.mean([len(c) for c in candidates])) if candidates else 0.0

    shortlisted = sorted({c for s in shortlists for c in s})
    texts = [f"{stored[c][1]['title']}. {stored[c][1]['text']}" for c in shortlisted]
    vectors = dict(zip(shortlisted, np.asarray(embed(texts), dtype=np.float32))) if texts else {}
    question_vectors = np.asarray(embed([q["question"] for q in kept]), dtype=np.float32) if kept else None
    records, similarities = [], []
    for qi, shortlist in enumerate(shortlists):
        if not shortlist:
            continue
        scored = [(float(vectors[c] @ question_vectors[qi]), c) for c in shortlist]
        similarity, best = max(scored)
        if similarity < config.min_similarity:
            stats.dropped_below_similarity += 1
            continue
        part, chunk, _ = stored[best]
        similarities.append(similarity)
        stats.by_part[part] = stats.by_part.get(part, 0) + 1
        q = kept[qi]
        records.append({"question": q["question"], "answers": list(q["answers"]),
                        "ctxs": [{"title": chunk["title"], "text": chunk["text"], "isgold": True,
                                  "similarity": round(similarity, 4)}],
                        "source": SOURCE, "id": q.get("id", f"efficientqa-{qi}")})
    stats.kept = len(records)
    stats.mean_gold_similarity = float(np.mean(similarities)) if similarities else 0.0
    stats.by_part = dict(sorted(stats.by_part.items()))
    return records, stats


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Retrieve a gold Wikipedia passage for questions that have none.")
    p.add_argument("--questions", type=Path, default=DEFAULT_QUESTIONS, help="jsonl(.gz) of question + answers")
    p.add_argument("--wiki", type=Path, nargs="+", default=list(DEFAULT_PARTS),
                   help="Wikipedia parts to search (default wiki-00..13; never wiki-14/15)")
    p.add_argument("--nq-dir", type=Path, default=DEFAULT_QA_DIR, help="multi-doc NQ folder whose dev questions are dropped")
    p.add_argument("--out", type=Path, required=True, help="output oracle-format .jsonl.gz (+ .meta.json beside it)")
    d = RetrievalConfig()
    p.add_argument("--lexical-top", type=int, default=d.lexical_top, help="candidates re-ranked with MiniLM")
    p.add_argument("--min-similarity", type=float, default=d.min_similarity, help="least question-passage cosine kept")
    p.add_argument("--min-words", type=int, default=d.min_words)
    p.add_argument("--max-words", type=int, default=d.max_words)
    p.add_argument("--limit", type=int, default=0, help="first N questions only (0: all)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    for part in args.wiki:
        try:
            _check_wiki_part(part)
        except ValueError as err:
            raise SystemExit(str(err)) from None
    missing = [str(p) for p in [args.questions, *args.wiki] if not p.is_file()]
    if missing:
        raise SystemExit(f"missing input file(s): {', '.join(missing)}")
    config = RetrievalConfig(min_words=args.min_words, max_words=args.max_words, lexical_top=args.lexical_top,
                             min_similarity=args.min_similarity)
    started = time.perf_counter()
    questions = read_records(args.questions, need_gold=False)[: args.limit or None]
    dev = read_records(args.nq_dir / "dev.jsonl.gz")
    cache = cache_root() / "embeddings" / f"minilm-{config.max_seq_length}.npz"
    embed = cached_embedder(minilm_embedder(show_progress=False, max_seq_length=config.max_seq_length), cache,
                            progress=not args.no_progress)
    records, stats = retrieve_gold(questions, _chunks(args.wiki, config), embed, config,
                                   {normalize_answer(r["question"]) for r in dev}, progress=not args.no_progress)
    write_jsonl_gz(records, args.out)
    meta = {"inputs": {"questions": args.questions.name, "wiki": [p.name for p in args.wiki]},
            "config": asdict(config), "embedding_model": "all-MiniLM-L6-v2", "stats": asdict(stats),
            "seconds": round(time.perf_counter() - started)}
    args.out.with_name(args.out.name.split(".")[0] + ".meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
