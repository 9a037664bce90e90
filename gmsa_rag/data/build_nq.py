"""Build multi-document NaturalQuestions QA, "Lost in the Middle" style.

Input: NQ-Open "oracle" records (``question``, ``answers``, ``ctxs`` whose first
``isgold`` entry is the gold Wikipedia passage). For each question the output holds
``num_docs`` passages: the gold one plus ``num_docs - 1`` hard distractors, i.e. the
gold passages of *other* questions ranked by all-MiniLM-L6-v2 cosine similarity to
the question. A candidate is skipped when it is the question's own gold passage, or
when its normalised title + text contains any normalised answer as a whole-token
sequence (SQuAD normalisation, see :func:`contains_answer`; answers that normalise to
"" are ignored). Questions left with too few candidates are dropped (counted in
``meta.json``). Distractors keep their
similarity order; the gold passage is inserted at the gold position, which is fixed,
``cycle`` (example j gets position j mod num_docs) or ``random`` (seeded).

The split is by question, with questions that share a gold passage (or the same
normalised question text) kept on one side. Train distractors come from train gold
passages only, so no dev gold passage is seen in training; dev distractors come from
all passages. Questions and answers are copied verbatim.

Output (``--out-dir``): ``train.jsonl.gz``, ``dev.jsonl.gz`` in the input format
(``ctxs`` with ``title``, ``text``, ``hasanswer``, ``isgold``; plus ``gold_index``
and ``source_index``, the line number in the input, from 0) and ``meta.json``.

Run::

    python -m gmsa_rag.data.build_nq --out-dir data/nq-multidoc --num-docs 5 --dev-size 200 --seed 0
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Container, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from gmsa_rag.backbone import minilm_path
from gmsa_rag.data import DEFAULT_QA_DIR, REPO_ROOT
from gmsa_rag.data.jsonl import iter_records
from gmsa_rag.metrics import normalize_answer

__all__ = [
    "DEFAULT_INPUT",
    "BuildConfig",
    "GoldPosition",
    "parse_gold_position",
    "gold_positions",
    "read_records",
    "split_train_dev",
    "contains_answer",
    "ranked",
    "pick_distractors",
    "minilm_path",
    "minilm_embedder",
    "build_multidoc",
    "write_jsonl_gz",
    "main",
]

DEFAULT_INPUT: Path = REPO_ROOT.parent / "shared" / "data" / "nq-open-oracle.train.jsonl.gz"

GoldPosition = int | Literal["random", "cycle"]
Embedder = Callable[[list[str]], np.ndarray]


@dataclass(frozen=True)
class BuildConfig:
    """Parameters of one build."""

    num_docs: int = 5
    dev_size: int = 200
    seed: int = 0
    train_gold_position: GoldPosition = "random"
    dev_gold_position: GoldPosition = "cycle"


@dataclass
class BuildStats:
    """What a build did, saved in ``meta.json``."""

    input_questions: int = 0
    train: int = 0
    dev: int = 0
    skipped_too_few_distractors: int = 0
    distractors_rejected_for_answer: int = 0
    train_gold_positions: dict[int, int] = field(default_factory=dict)
    dev_gold_positions: dict[int, int] = field(default_factory=dict)
    mean_words_per_example: float = 0.0
    mean_distractor_similarity: float = 0.0
    mean_gold_similarity: float = 0.0


# ----------------------------------------------------------------- positions


def parse_gold_position(value: str | int) -> GoldPosition:
    """``"random"``, ``"cycle"`` or a non-negative integer position."""
    if isinstance(value, int) or value not in ("random", "cycle"):
        try:
            position = int(value)
        except ValueError as err:
            raise ValueError(f"gold position must be 'random', 'cycle' or an integer, got {value!r}") from err
        if position < 0:
            raise ValueError(f"gold position must be >= 0, got {position}")
        return position
    return value  # type: ignore[return-value]


def gold_positions(mode: GoldPosition, n_examples: int, num_docs: int, rng: random.Random) -> list[int]:
    """Gold position of each of ``n_examples`` examples, in ``0..num_docs-1``."""
    if mode == "cycle":
        return [j % num_docs for j in range(n_examples)]
    if mode == "random":
        return [rng.randrange(num_docs) for _ in range(n_examples)]
    if not 0 <= mode < num_docs:
        raise ValueError(f"gold position {mode} out of range for {num_docs} documents")
    return [mode] * n_examples


# ------------------------------------------------------------------- records


def read_records(path: Path, need_gold: bool = True) -> list[dict[str, Any]]:
    """Read oracle records; each needs a question, answers and (unless ``need_gold`` is off) an ``isgold`` context."""
    records = []
    for line_no, record in iter_records(path):
        golds = [c for c in record.get("ctxs", []) if c.get("isgold")]
        if not isinstance(record.get("question"), str) or not record.get("answers") or (need_gold and not golds):
            raise ValueError(f"{path}:{line_no}: need 'question', 'answers'{' and a gold context' * need_gold}")
        records.append(record)
    return records


def _gold(record: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in record["ctxs"] if c.get("isgold"))


def _passage_key(ctx: dict[str, Any]) -> str:
    return f"{ctx.get('title', '')}\n{ctx['text']}"


def split_train_dev(records: Sequence[dict[str, Any]], dev_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Split record indices; records sharing a gold passage or question stay together."""
    parent = list(range(len(records)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_seen: dict[str, int] = {}
    for i, record in enumerate(records):
        for key in ("p:" + _passage_key(_gold(record)), "q:" + normalize_answer(record["question"])):
            if key in first_seen:
                parent[find(i)] = find(first_seen[key])
            else:
                first_seen[key] = i
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(find(i), []).append(i)
    ordered = sorted(groups.values())
    random.Random(seed).shuffle(ordered)
    dev: list[int] = []
    train: list[int] = []
    for group in ordered:
        (dev if len(dev) + len(group) <= dev_size else train).extend(group)
    return sorted(train), sorted(dev)


def contains_answer(normalized_passage: str, normalized_answers: Sequence[str]) -> bool:
    """True when a non-empty normalised answer occurs in the normalised passage as whole tokens.

    Both sides are :func:`~gmsa_rag.metrics.normalize_answer` output (single-spaced), so
    this is contiguous token-sequence matching, as in DPR's ``has_answer``: answer "8"
    matches "season 8 aired" but not "2018".
    """
    padded = f" {normalized_passage} "
    return any(a and f" {a} " in padded for a in normalized_answers)


def ranked(scores: np.ndarray, head: int = 64) -> Iterator[int]:
    """Positions of ``scores`` by descending score, ties by position: ``np.argsort(-scores, kind="stable")``,
    computed lazily (a partial sort of the best ``head`` first, the full sort only if the caller reads on)."""
    n = len(scores)
    seen = 0
    if head < n:
        kth = np.partition(scores, n - head)[n - head]
        top = np.flatnonzero(scores >= kth)
        top = top[np.lexsort((top, -scores[top]))]
        yield from top.tolist()
        seen = len(top)
    if seen < n:
        yield from np.argsort(-scores, kind="stable")[seen:].tolist()


def pick_distractors(
    scores: np.ndarray,
    candidates: np.ndarray,
    k: int,
    skip: Container[int],
    normalized: Sequence[str],
    normalized_answers: Sequence[str],
) -> tuple[list[int], int]:
    """Up to ``k`` pool indices from ``candidates`` (``scores[i]`` belongs to ``candidates[i]``) by descending
    score, skipping those in ``skip`` and those whose normalised text contains an answer.

    Returns ``(picked, rejected_for_answer)``.
    """
    picked: list[int] = []
    rejected = 0
    if k <= 0:
        return picked, rejected
    for position in ranked(scores, head=4 * k + 32):
        j = int(candidates[position])
        if j in skip:
            continue
        if contains_answer(normalized[j], normalized_answers):
            rejected += 1
            continue
        picked.append(j)
        if len(picked) == k:
            break
    return picked, rejected


# ----------------------------------------------------------------- embedding


def minilm_embedder(batch_size: int = 64, device: str = "cpu", show_progress: bool = True,
                    max_seq_length: int | None = None) -> Embedder:
    """Return ``texts -> L2-normalised embeddings`` using the offline MiniLM model.

    ``max_seq_length`` truncates inputs to that many word pieces (the model's default, 256, when None).
    """
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path()), device=device)
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length

    def embed(texts: list[str]) -> np.ndarray:
        return model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=show_progress,
        )

    return embed


# ------------------------------------------------------------------- building


@dataclass
class _Pool:
    """Unique gold passages with embeddings and normalised text."""

    ctxs: list[dict[str, Any]]
    keys: list[str]
    normalized: list[str]
    embeddings: np.ndarray
    index_of: dict[str, int]


def _make_pool(records: Sequence[dict[str, Any]], embed: Embedder) -> _Pool:
    ctxs: list[dict[str, Any]] = []
    index_of: dict[str, int] = {}
    for record in records:
        gold = _gold(record)
        key = _passage_key(gold)
        if key not in index_of:
            index_of[key] = len(ctxs)
            ctxs.append(gold)
    keys = [_passage_key(c) for c in ctxs]
    normalized = [normalize_answer(f"{c.get('title', '')} {c['text']}") for c in ctxs]
    embeddings = np.asarray(embed([f"{c.get('title', '')}. {c['text']}" for c in ctxs]), dtype=np.float32)
    return _Pool(ctxs, keys, normalized, embeddings, index_of)


def _distractor_ctx(ctx: dict[str, Any]) -> dict[str, Any]:
    return {"title": ctx.get("title", ""), "text": ctx["text"], "hasanswer": False, "isgold": False}


def _build_split(
    indices: list[int],
    records: Sequence[dict[str, Any]],
    q_emb: np.ndarray,
    pool: _Pool,
    allowed: np.ndarray,
    mode: GoldPosition,
    num_docs: int,
    rng: random.Random,
    stats: BuildStats,
    sims: dict[str, list[float]],
    desc: str,
    progress: bool,
) -> list[dict[str, Any]]:
    """Examples for the given record indices; ``allowed`` is a boolean mask over the pool."""
    candidates = np.flatnonzero(allowed)
    selected: list[tuple[int, list[int]]] = []
    for i in tqdm(indices, desc=desc, disable=not progress):
        record = records[i]
        own = pool.index_of[_passage_key(_gold(record))]
        answers = [normalize_answer(a) for a in record["answers"]]
        scores = pool.embeddings[candidates] @ q_emb[i]
        picked, rejected = pick_distractors(scores, candidates, num_docs - 1, {own}, pool.normalized, answers)
        stats.distractors_rejected_for_answer += rejected
        if len(picked) < num_docs - 1:
            stats.skipped_too_few_distractors += 1
            continue
        sims["gold"].append(float(pool.embeddings[own] @ q_emb[i]))
        sims["distractor"].extend(float(pool.embeddings[j] @ q_emb[i]) for j in picked)
        selected.append((i, picked))

    positions = gold_positions(mode, len(selected), num_docs, rng)
    examples = []
    for (i, picked), position in zip(selected, positions):
        record = records[i]
        ctxs = [_distractor_ctx(pool.ctxs[j]) for j in picked]
        ctxs.insert(position, {**_gold(record), "isgold": True})
        examples.append(
            {
                "question": record["question"],
                "answers": list(record["answers"]),
                "ctxs": ctxs,
                "gold_index": position,
                "source_index": i,
            }
        )
    return examples


def build_multidoc(
    records: Sequence[dict[str, Any]], embed: Embedder, config: BuildConfig, progress: bool = False
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], BuildStats]:
    """Build ``(train, dev, stats)`` from oracle records with the given embedder."""
    if config.num_docs < 1:
        raise ValueError("num_docs must be >= 1")
    for mode in (config.train_gold_position, config.dev_gold_position):
        if isinstance(mode, int) and not 0 <= mode < config.num_docs:
            raise ValueError(f"gold position {mode} out of range for {config.num_docs} documents")
    stats = BuildStats(input_questions=len(records))
    train_idx, dev_idx = split_train_dev(records, config.dev_size, config.seed)
    pool = _make_pool(records, embed)
    q_emb = np.asarray(embed([r["question"] for r in records]), dtype=np.float32)

    train_mask = np.zeros(len(pool.ctxs), dtype=bool)
    for i in train_idx:
        train_mask[pool.index_of[_passage_key(_gold(records[i]))]] = True
    all_mask = np.ones(len(pool.ctxs), dtype=bool)

    sims: dict[str, list[float]] = {"gold": [], "distractor": []}
    rng = random.Random(config.seed + 1)
    args = (records, q_emb, pool)
    train = _build_split(train_idx, *args, train_mask, config.train_gold_position, config.num_docs, rng, stats, sims,
                         "train distractors", progress)
    dev = _build_split(dev_idx, *args, all_mask, config.dev_gold_position, config.num_docs, rng, stats, sims,
                       "dev distractors", progress)

    stats.train, stats.dev = len(train), len(dev)
    stats.train_gold_positions = dict(sorted(Counter(e["gold_index"] for e in train).items()))
    stats.dev_gold_positions = dict(sorted(Counter(e["gold_index"] for e in dev).items()))
    words = [sum(len(c["text"].split()) for c in e["ctxs"]) for e in train + dev]
    stats.mean_words_per_example = float(np.mean(words)) if words else 0.0
    stats.mean_gold_similarity = float(np.mean(sims["gold"])) if sims["gold"] else 0.0
    stats.mean_distractor_similarity = float(np.mean(sims["distractor"])) if sims["distractor"] else 0.0
    return train, dev, stats


def write_jsonl_gz(records: Sequence[dict[str, Any]], path: Path) -> None:
    """Write JSON lines, gzip'd with a fixed header so identical builds give identical bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


# ------------------------------------------------------------------------ CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Build multi-document NQ QA (gold + MiniLM hard distractors).")
    p.add_argument("--input", type=Path, default=DEFAULT_INPUT, help="nq-open-oracle jsonl(.gz)")
    p.add_argument("--out-dir", type=Path, default=DEFAULT_QA_DIR)
    p.add_argument("--num-docs", type=int, default=5, help="passages per question, gold included")
    p.add_argument("--dev-size", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-gold-position", type=parse_gold_position, default="random",
                   help="'random', 'cycle' or a fixed index")
    p.add_argument("--dev-gold-position", type=parse_gold_position, default="cycle",
                   help="'random', 'cycle' or a fixed index")
    p.add_argument("--batch-size", type=int, default=64, help="MiniLM encoding batch size")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    config = BuildConfig(
        num_docs=args.num_docs,
        dev_size=args.dev_size,
        seed=args.seed,
        train_gold_position=args.train_gold_position,
        dev_gold_position=args.dev_gold_position,
    )
    records = read_records(args.input)
    embed = minilm_embedder(batch_size=args.batch_size, show_progress=not args.no_progress)
    train, dev, stats = build_multidoc(records, embed, config, progress=not args.no_progress)
    write_jsonl_gz(train, args.out_dir / "train.jsonl.gz")
    write_jsonl_gz(dev, args.out_dir / "dev.jsonl.gz")
    meta = {"input": args.input.name, "config": asdict(config), "embedding_model": "all-MiniLM-L6-v2",
            "stats": asdict(stats)}
    (args.out_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
