"""Build the stage-2 (KEFT) QA training set: each question's gold passage plus ranked hard distractors.

Questions: the QA file ``shared/data/qa/qa_wiki_train.nqformat.jsonl.gz`` (one gold Wikipedia passage each)
and the train split of the bundled multi-document NQ set (``data/nq-multidoc/train.jsonl.gz``, its
``isgold`` passage). The NQ dev split is read only to exclude: any question whose normalised text equals a
dev question, or whose gold passage text equals a dev gold passage, is dropped. Wikipedia parts 14 and 15
(stage-1 dev and held-out test) are refused as inputs.

Distractor pool: the distinct gold passages of the kept questions plus a seeded sample of ``~100``-word
chunks of one Wikipedia part (``wiki-13``: each article's paragraphs packed into chunks of
``min_words``..``max_words`` words by :func:`gmsa_rag.data.corpus.chunk_texts`, titled with the article).
Questions and passages (``"{title}. {text}"``, truncated to ``max_seq_length`` word pieces) are embedded with
all-MiniLM-L6-v2; each question gets the ``num_distractors`` pool passages most similar to it (cosine),
skipping its own gold passage, any passage with the same text, and any passage whose normalised title + text
contains a normalised answer (:func:`gmsa_rag.data.build_nq.contains_answer`). The selection is shared with
``build_nq`` (:func:`~gmsa_rag.data.build_nq.pick_distractors`).

Split: ``dev_size`` questions of the QA file go to dev, grouped by gold passage and normalised question
(:func:`~gmsa_rag.data.build_nq.split_train_dev`); NQ questions and ``--extra-train`` files (e.g. EfficientQA
questions with retrieved gold passages, :mod:`gmsa_rag.data.build_retrieved`) are train only (one that shares a
gold passage or question with dev is dropped). Train distractors never include a dev gold passage; dev distractors
are drawn only from the passages the build has without the extra files, so adding them leaves dev as it was.

Output (``--out-dir``, default ``data/qa-multidoc``), each passage stored once:

- ``passages.jsonl.gz``: ``{"id": int, "title": str, "text": str}`` for every passage referenced below;
- ``train.jsonl.gz`` / ``dev.jsonl.gz``: ``{"question", "answers", "gold": passage id,
  "distractors": [passage ids, most similar first], "source", "id"}``;
- ``meta.json``: inputs, settings and statistics.

Read it with :func:`gmsa_rag.data.qa.load_qa_pool`. Embeddings are cached under
``$GMSA_RAG_HOME/embeddings`` so a rebuild (or an interrupted one) does not embed again.

Run::

    python -m gmsa_rag.data.build_qa --out-dir data/qa-multidoc
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gmsa_rag.backbone import cache_root
from gmsa_rag.data import DATA_DIR, DEFAULT_QA_DIR, REPO_ROOT
from gmsa_rag.data.build_nq import (
    Embedder,
    contains_answer,
    minilm_embedder,
    pick_distractors,
    read_records,
    split_train_dev,
    write_jsonl_gz,
)
from gmsa_rag.data.corpus import chunk_texts
from gmsa_rag.errors import positive_int
from gmsa_rag.metrics import normalize_answer

__all__ = [
    "DEFAULT_QA_INPUT",
    "DEFAULT_WIKI",
    "DEFAULT_OUT_DIR",
    "QABuildConfig",
    "QABuildStats",
    "cached_embedder",
    "wiki_chunks",
    "build_qa_pool",
    "main",
]

_SHARED = REPO_ROOT.parent / "shared" / "data"
DEFAULT_QA_INPUT: Path = _SHARED / "qa" / "qa_wiki_train.nqformat.jsonl.gz"
DEFAULT_WIKI: Path = _SHARED / "wiki" / "wiki-13.jsonl.gz"
DEFAULT_OUT_DIR: Path = DATA_DIR / "qa-multidoc"
#: Wikipedia parts that must never feed training data (stage-1 dev, held-out test).
FORBIDDEN_WIKI_PARTS = ("wiki-14", "wiki-15")
NQ_SOURCE = "nq-open-oracle (data/nq-multidoc train)"


@dataclass(frozen=True)
class QABuildConfig:
    """Parameters of one build."""

    num_distractors: int = 9
    dev_size: int = 300
    seed: int = 0
    wiki_chunks: int = 10000
    min_words: int = 60
    max_words: int = 150
    max_seq_length: int = 128


@dataclass
class QABuildStats:
    """What a build did, saved in ``meta.json``."""

    qa_questions_in: int = 0
    nq_train_questions_in: int = 0
    extra_train_questions_in: int = 0
    dropped_same_question_as_nq_dev: int = 0
    dropped_gold_is_nq_dev_gold: int = 0
    dropped_duplicate: int = 0
    dropped_nq_overlaps_qa_dev: int = 0
    gold_without_answer_string: int = 0
    train: int = 0
    dev: int = 0
    train_by_source: dict[str, int] = field(default_factory=dict)
    wiki_articles: int = 0
    wiki_chunks_cut: int = 0
    wiki_chunks_dropped_nq_dev_gold: int = 0
    pool_gold_passages: int = 0
    pool_wiki_chunks: int = 0
    pool_size: int = 0
    passages_stored: int = 0
    distractors_rejected_for_answer: int = 0
    questions_with_fewer_distractors: int = 0
    distractors_from_wiki: float = 0.0
    mean_gold_similarity: float = 0.0
    mean_distractor_similarity: float = 0.0
    mean_words_per_passage: float = 0.0


# ------------------------------------------------------------------ embedding cache


def cached_embedder(embed: Embedder, path: Path, block: int = 1024, progress: bool = True) -> Embedder:
    """Wrap ``embed`` with an on-disk cache (``.npz`` of text hashes and vectors) at ``path``.

    Texts already cached are not embedded again; new ones are embedded ``block`` at a time and the
    cache is saved after each block, so an interrupted build resumes where it stopped.
    """
    cache: dict[str, np.ndarray] = {}
    if path.exists():
        with np.load(path) as npz:
            cache = dict(zip(npz["keys"].tolist(), npz["vectors"]))

    def save() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        keys = sorted(cache)
        np.savez(tmp, keys=np.array(keys), vectors=np.stack([cache[k] for k in keys]).astype(np.float32))
        tmp.replace(path)

    def cached(texts: list[str]) -> np.ndarray:
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in cache))
        text_of = dict(zip(keys, texts))
        for start in tqdm(range(0, len(missing), block), desc="embedding (cached)", disable=not progress or not missing):
            part = missing[start:start + block]
            cache.update(zip(part, np.asarray(embed([text_of[k] for k in part]), dtype=np.float32)))
            save()
        if not keys:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([cache[k] for k in keys]).astype(np.float32)

    return cached


# ------------------------------------------------------------------------ inputs


def _check_wiki_part(path: Path) -> None:
    if any(path.name.startswith(part) for part in FORBIDDEN_WIKI_PARTS):
        raise ValueError(f"{path.name} is held out (stage-1 dev / test); use another Wikipedia part")


def wiki_chunks(path: Path, min_words: int, max_words: int) -> tuple[list[dict[str, str]], int]:
    """``({title, text}`` chunks of ``min_words``..``max_words`` words, number of articles) of one part.

    Each article's newline-separated paragraphs are packed by :func:`chunk_texts` (never across articles;
    an article's short tail is dropped) and each chunk is flattened to one line.
    """
    _check_wiki_part(path)
    chunks: list[dict[str, str]] = []
    articles = 0
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            record = json.loads(line)
            articles += 1
            paragraphs = record["text"].replace("\n", "\n\n")
            for chunk in chunk_texts([paragraphs], None, min_words, max_words):
                chunks.append({"title": record.get("title") or "", "text": " ".join(chunk.split())})
    return chunks, articles


def _gold(record: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in record["ctxs"] if c.get("isgold"))


def _text_key(text: str) -> str:
    return " ".join(text.split())


def _passage_key(title: str | None, text: str) -> tuple[str, str]:
    return title or "", text


# ----------------------------------------------------------------------- building


def _select_questions(
    qa: Sequence[dict[str, Any]], nq_train: Sequence[dict[str, Any]], dev_questions: set[str], dev_golds: set[str],
    stats: QABuildStats, extra_train: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Drop exact duplicates and questions whose normalised text is in ``dev_questions`` or whose gold text is
    in ``dev_golds`` (the NQ dev set); return ``(qa_kept, nq_kept, extra_kept)`` records."""
    seen: set[tuple[str, tuple[str, str], tuple[str, ...]]] = set()

    def keep(record: dict[str, Any]) -> bool:
        gold = _gold(record)
        if normalize_answer(record["question"]) in dev_questions:
            stats.dropped_same_question_as_nq_dev += 1
            return False
        if _text_key(gold["text"]) in dev_golds:
            stats.dropped_gold_is_nq_dev_gold += 1
            return False
        key = (normalize_answer(record["question"]), _passage_key(gold.get("title", ""), gold["text"]),
               tuple(sorted(normalize_answer(a) for a in record["answers"])))
        if key in seen:
            stats.dropped_duplicate += 1
            return False
        seen.add(key)
        return True

    nq_records = [{"question": r["question"], "answers": r["answers"], "ctxs": [{**_gold(r), "isgold": True}],
                   "source": NQ_SOURCE, "id": f"nq-multidoc-train-{r.get('source_index', i)}"}
                  for i, r in enumerate(nq_train)]
    return [r for r in qa if keep(r)], [r for r in nq_records if keep(r)], [r for r in extra_train if keep(r)]


@dataclass
class _Pool:
    passages: list[tuple[str, str]]  # (title, text)
    normalized: list[str]
    text_ids: dict[str, list[int]]  # text with whitespace collapsed -> pool ids
    index_of: dict[tuple[str, str], int]
    embeddings: np.ndarray
    n_gold: int


def _make_pool(golds: Sequence[tuple[str, str]], chunks: Sequence[tuple[str, str]], embed: Embedder) -> _Pool:
    passages: list[tuple[str, str]] = []
    index_of: dict[tuple[str, str], int] = {}
    for title, text in list(golds) + list(chunks):
        key = _passage_key(title, text)
        if key not in index_of:
            index_of[key] = len(passages)
            passages.append(key)
    n_gold = len({_passage_key(*g) for g in golds})
    text_ids: dict[str, list[int]] = {}
    for i, (_, text) in enumerate(passages):
        text_ids.setdefault(_text_key(text), []).append(i)
    normalized = [normalize_answer(f"{t} {x}") for t, x in passages]
    embeddings = np.asarray(embed([f"{t}. {x}" for t, x in passages]), dtype=np.float32)
    return _Pool(passages, normalized, text_ids, index_of, embeddings, n_gold)


def _distractors(
    records: Sequence[dict[str, Any]], q_emb: np.ndarray, pool: _Pool, candidates: np.ndarray, k: int,
    stats: QABuildStats, sims: dict[str, list[float]], desc: str, progress: bool, batch: int = 256,
) -> list[list[int]]:
    """Ranked distractor pool ids of each record, drawn from ``candidates``."""
    cand_emb = pool.embeddings[candidates]
    out: list[list[int]] = []
    for start in tqdm(range(0, len(records), batch), desc=desc, disable=not progress):
        scores = q_emb[start:start + batch] @ cand_emb.T
        for row, record in enumerate(records[start:start + batch]):
            gold = _gold(record)
            own = pool.index_of[_passage_key(gold.get("title", ""), gold["text"])]
            skip = set(pool.text_ids[_text_key(pool.passages[own][1])]) | {own}
            answers = [normalize_answer(a) for a in record["answers"]]
            picked, rejected = pick_distractors(scores[row], candidates, k, skip, pool.normalized, answers)
            stats.distractors_rejected_for_answer += rejected
            stats.questions_with_fewer_distractors += len(picked) < k
            q = q_emb[start + row]
            sims["gold"].append(float(pool.embeddings[own] @ q))
            sims["distractor"].extend(float(pool.embeddings[j] @ q) for j in picked)
            out.append(picked)
    return out


def build_qa_pool(
    qa: Sequence[dict[str, Any]],
    nq_train: Sequence[dict[str, Any]],
    nq_dev: Sequence[dict[str, Any]],
    chunks: Sequence[dict[str, str]],
    embed: Embedder,
    config: QABuildConfig,
    progress: bool = False,
    extra_train: Sequence[dict[str, Any]] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], QABuildStats]:
    """Build ``(passages, train, dev, stats)`` (the records of the three output files).

    ``qa`` / ``nq_train`` / ``nq_dev`` / ``extra_train`` are oracle-style records (``question``, ``answers``,
    ``ctxs`` with an ``isgold`` passage); ``chunks`` are ``{title, text}`` Wikipedia chunks, of which
    ``config.wiki_chunks`` are sampled (seeded) into the pool. ``extra_train`` joins train only.
    """
    stats = QABuildStats(qa_questions_in=len(qa), nq_train_questions_in=len(nq_train),
                         extra_train_questions_in=len(extra_train), wiki_chunks_cut=len(chunks))
    nq_dev_questions = {normalize_answer(r["question"]) for r in nq_dev}
    nq_dev_golds = {_text_key(_gold(r)["text"]) for r in nq_dev}
    qa_kept, nq_kept, extra_kept = _select_questions(qa, nq_train, nq_dev_questions, nq_dev_golds, stats,
                                                     extra_train)
    allowed_chunks = [i for i, c in enumerate(chunks) if _text_key(c["text"]) not in nq_dev_golds]
    stats.wiki_chunks_dropped_nq_dev_gold = len(chunks) - len(allowed_chunks)

    if config.dev_size >= len(qa_kept):
        raise ValueError(f"dev_size {config.dev_size} leaves no QA question for train ({len(qa_kept)} kept): "
                         "pass a smaller --dev-size")
    train_idx, dev_idx = split_train_dev(qa_kept, config.dev_size, config.seed)
    dev = [qa_kept[i] for i in dev_idx]
    dev_questions = {normalize_answer(r["question"]) for r in dev}
    dev_gold_texts = {_text_key(_gold(r)["text"]) for r in dev}

    def clashes(record: dict[str, Any]) -> bool:
        return (normalize_answer(record["question"]) in dev_questions
                or _text_key(_gold(record)["text"]) in dev_gold_texts)

    train = [qa_kept[i] for i in train_idx]
    if any(clashes(r) for r in train):  # split_train_dev groups by title+text; also by text alone
        raise ValueError("a train question shares a gold passage text or a question with dev")
    stats.dropped_nq_overlaps_qa_dev = sum(clashes(r) for r in nq_kept + extra_kept)
    train += [r for r in nq_kept if not clashes(r)]
    core = len(train)  # train without the extra files
    train += [r for r in extra_kept if not clashes(r)]

    sample = sorted(random.Random(config.seed).sample(allowed_chunks, min(config.wiki_chunks, len(allowed_chunks))))
    golds = [(_gold(r).get("title", ""), _gold(r)["text"]) for r in train + dev]
    sampled = [(chunks[i]["title"], chunks[i]["text"]) for i in sample]
    pool = _make_pool(golds, sampled, embed)
    without_extra = {_passage_key(*g) for g in golds[:core] + golds[len(train):] + sampled}
    q_emb = np.asarray(embed([r["question"] for r in train + dev]), dtype=np.float32)
    stats.pool_size, stats.pool_gold_passages = len(pool.passages), pool.n_gold
    stats.pool_wiki_chunks = stats.pool_size - pool.n_gold

    dev_gold_ids = {i for r in dev for i in pool.text_ids[_text_key(_gold(r)["text"])]}
    train_cands = np.array([i for i in range(len(pool.passages)) if i not in dev_gold_ids], dtype=np.int64)
    all_cands = np.array([i for i, key in enumerate(pool.passages) if key in without_extra], dtype=np.int64)
    sims: dict[str, list[float]] = {"gold": [], "distractor": []}
    k = config.num_distractors
    train_d = _distractors(train, q_emb[:len(train)], pool, train_cands, k, stats, sims, "train distractors", progress)
    dev_d = _distractors(dev, q_emb[len(train):], pool, all_cands, k, stats, sims, "dev distractors", progress)

    # store only referenced passages, renumbered 0.. in pool order
    own = [pool.index_of[_passage_key(*g)] for g in golds]
    used = sorted(set(own) | {j for d in train_d + dev_d for j in d})
    new_id = {j: n for n, j in enumerate(used)}
    passages = [{"id": new_id[j], "title": pool.passages[j][0], "text": pool.passages[j][1]} for j in used]

    def out(records: Sequence[dict[str, Any]], gold_ids: Sequence[int], dists: Sequence[list[int]]) -> list[dict[str, Any]]:
        return [{"question": r["question"], "answers": list(r["answers"]), "gold": new_id[g],
                 "distractors": [new_id[j] for j in d], "source": r.get("source", ""), "id": str(r.get("id", ""))}
                for r, g, d in zip(records, gold_ids, dists)]

    train_out = out(train, own[:len(train)], train_d)
    dev_out = out(dev, own[len(train):], dev_d)

    answers_of = [[normalize_answer(a) for a in r["answers"]] for r in train + dev]
    stats.gold_without_answer_string = sum(not contains_answer(pool.normalized[g], a) for g, a in zip(own, answers_of))
    stats.train, stats.dev, stats.passages_stored = len(train_out), len(dev_out), len(passages)
    stats.train_by_source = dict(sorted(Counter(r["source"] for r in train_out).items()))
    all_d = [j for d in train_d + dev_d for j in d]
    stats.distractors_from_wiki = float(np.mean([j >= pool.n_gold for j in all_d])) if all_d else 0.0
    stats.mean_gold_similarity = float(np.mean(sims["gold"])) if sims["gold"] else 0.0
    stats.mean_distractor_similarity = float(np.mean(sims["distractor"])) if sims["distractor"] else 0.0
    stats.mean_words_per_passage = float(np.mean([len(p["text"].split()) for p in passages])) if passages else 0.0
    return passages, train_out, dev_out, stats


# ------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build the stage-2 QA set: gold passage + ranked MiniLM hard distractors.")
    p.add_argument("--qa", type=Path, default=DEFAULT_QA_INPUT, help="QA file with one gold passage a question")
    p.add_argument("--nq-dir", type=Path, default=DEFAULT_QA_DIR, help="multi-doc NQ folder (train.jsonl.gz used, "
                   "dev.jsonl.gz only excluded)")
    p.add_argument("--wiki", type=Path, default=DEFAULT_WIKI, help="one Wikipedia part (not wiki-14/15)")
    p.add_argument("--extra-train", type=Path, nargs="*", default=[],
                   help="oracle-format files whose questions join train only (e.g. build_retrieved's output)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR)
    d = QABuildConfig()
    p.add_argument("--num-distractors", type=positive_int, default=d.num_distractors)
    p.add_argument("--dev-size", type=positive_int, default=d.dev_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--wiki-chunks", type=positive_int, default=d.wiki_chunks, help="chunks sampled into the pool")
    p.add_argument("--min-words", type=positive_int, default=d.min_words)
    p.add_argument("--max-words", type=positive_int, default=d.max_words)
    p.add_argument("--max-seq-length", type=int, default=d.max_seq_length, help="MiniLM input truncation (word pieces)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="MiniLM encoding batch size")
    p.add_argument("--cache", type=Path, default=None,
                   help="embedding cache file (default $GMSA_RAG_HOME/embeddings/minilm-<max-seq-length>.npz)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = QABuildConfig(num_distractors=args.num_distractors, dev_size=args.dev_size, seed=args.seed,
                           wiki_chunks=args.wiki_chunks, min_words=args.min_words, max_words=args.max_words,
                           max_seq_length=args.max_seq_length)
    started = time.perf_counter()
    qa = read_records(args.qa)
    nq_train = read_records(args.nq_dir / "train.jsonl.gz")
    nq_dev = read_records(args.nq_dir / "dev.jsonl.gz")
    extra = [r for path in args.extra_train for r in read_records(path)]
    chunks, articles = wiki_chunks(args.wiki, config.min_words, config.max_words)
    progress = not args.no_progress
    cache = args.cache or cache_root() / "embeddings" / f"minilm-{config.max_seq_length}.npz"
    embed = cached_embedder(minilm_embedder(batch_size=args.batch_size, show_progress=False,
                                            max_seq_length=config.max_seq_length), cache, progress=progress)
    passages, train, dev, stats = build_qa_pool(qa, nq_train, nq_dev, chunks, embed, config, progress=progress,
                                                extra_train=extra)
    stats.wiki_articles = articles
    write_jsonl_gz(passages, args.out_dir / "passages.jsonl.gz")
    write_jsonl_gz(train, args.out_dir / "train.jsonl.gz")
    write_jsonl_gz(dev, args.out_dir / "dev.jsonl.gz")
    meta = {"inputs": {"qa": args.qa.name, "nq_train": "nq-multidoc/train.jsonl.gz", "wiki": args.wiki.name,
                       **({"extra_train": [p.name for p in args.extra_train]} if args.extra_train else {})},
            "config": asdict(config), "embedding_model": "all-MiniLM-L6-v2", "stats": asdict(stats)}
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2), file=sys.stderr)
    print(f"built in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
