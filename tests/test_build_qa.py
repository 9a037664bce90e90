"""Tests for gmsa_rag.data.build_qa (stage-2 QA set with pooled passages) and its loader, load_qa_pool."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gmsa_rag.data.build_nq import contains_answer, pick_distractors, ranked, write_jsonl_gz
from gmsa_rag.data.build_qa import DEFAULT_OUT_DIR, QABuildConfig, build_qa_pool, cached_embedder, wiki_chunks
from gmsa_rag.data.qa import format_context, is_qa_pool, load_qa, load_qa_pool
from gmsa_rag.metrics import normalize_answer
from gmsa_rag.train import TrainConfig, load_data, qa_sample
from test_data import _bow_embed, _synthetic_records  # the fake (bag-of-words) embedder of the build_nq tests

CONFIG = QABuildConfig(num_distractors=3, dev_size=4, seed=1, wiki_chunks=100)


def _gold(title: str, text: str) -> dict[str, Any]:
    return {"title": title, "text": text, "isgold": True}


def _inputs() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], list[dict[str, str]]]:
    qa = [{**r, "source": "synthetic", "id": str(i)} for i, r in enumerate(_synthetic_records())]
    nq_dev = [{"question": "who painted the dev mural", "answers": ["Dev Painter"],
               "ctxs": [_gold("Mural", "The dev mural was painted by Dev Painter.")]}]
    distractor = {"title": "Other", "text": "Unrelated.", "isgold": False}
    nq_train = [
        {"question": "what is the planet number 99 called", "answers": ["Planet99"], "source_index": 7,
         "ctxs": [distractor, _gold("Planet 99", "The planet number 99 is known as Planet99.")]},
        {"question": "Who painted the dev mural?", "answers": ["x"], "ctxs": [_gold("M", "Another mural text.")]},
        {"question": "a question about the mural", "answers": ["y"],
         "ctxs": [_gold("Mural", "The dev mural was painted by Dev Painter.")]},
    ]
    qa.append(dict(qa[0]))  # an exact duplicate
    chunks = [{"title": f"Wiki {t}", "text": f"Some {t} text about the {t} number and its history."} for t in
              ("river", "mountain", "king", "film", "song", "city")]
    chunks.append({"title": "River wiki trap", "text": "The river number 0 is Answer0 in this chunk."})
    chunks.append({"title": "Mural", "text": "The dev mural was painted by Dev Painter."})  # an NQ dev gold
    return qa, nq_train, nq_dev, chunks


def _build() -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]], Any]:
    qa, nq_train, nq_dev, chunks = _inputs()
    return build_qa_pool(qa, nq_train, nq_dev, chunks, _bow_embed, CONFIG)


def _check_pooled(passages: list[dict[str, Any]], train: list[dict[str, Any]], dev: list[dict[str, Any]],
                  k: int, nq_dev: list[dict[str, Any]] | None = None) -> None:
    """The guarantees of a pooled build (shared by the synthetic and the bundled data tests)."""
    by_id = {p["id"]: {**p, "text": " ".join(p["text"].split())} for p in passages}  # compare texts up to spaces
    assert sorted(by_id) == list(range(len(passages)))
    normalized = {i: normalize_answer(f"{p['title']} {p['text']}") for i, p in by_id.items()}
    for record in train + dev:
        answers = [normalize_answer(a) for a in record["answers"]]
        d = record["distractors"]
        assert len(d) <= k and len(set(d)) == len(d)
        assert record["gold"] not in d  # the gold is never its own distractor
        assert by_id[record["gold"]]["text"] not in {by_id[j]["text"] for j in d}  # nor a copy of its text
        assert not any(contains_answer(normalized[j], answers) for j in d)  # no distractor has an answer
    # dev and train share no gold passage and no question; train never shows a dev gold passage
    dev_gold = {by_id[r["gold"]]["text"] for r in dev}
    assert not dev_gold & {by_id[j]["text"] for r in train for j in [r["gold"], *r["distractors"]]}
    assert not {normalize_answer(r["question"]) for r in dev} & {normalize_answer(r["question"]) for r in train}
    if nq_dev is not None:  # nothing of the NQ dev set: no question, no gold passage
        dev_q = {normalize_answer(r["question"]) for r in nq_dev}
        dev_p = {" ".join(c["text"].split()) for r in nq_dev for c in r["ctxs"] if c.get("isgold")}
        assert not dev_q & {normalize_answer(r["question"]) for r in train + dev}
        assert not dev_p & {p["text"] for p in by_id.values()}


def test_build_qa_pool_guarantees() -> None:
    passages, train, dev, stats = _build()
    assert (passages, train, dev) == _build()[:3]  # deterministic
    qa, nq_train, nq_dev, _ = _inputs()
    _check_pooled(passages, train, dev, CONFIG.num_distractors, nq_dev)
    assert len(dev) == CONFIG.dev_size and all(r["source"] == "synthetic" for r in dev)
    assert stats.dropped_duplicate == 1
    assert stats.dropped_same_question_as_nq_dev == 1 and stats.dropped_gold_is_nq_dev_gold == 1
    assert stats.train == len(qa) - 1 - CONFIG.dev_size + 1  # QA minus duplicate minus dev, plus one NQ question
    nq = [r for r in train if r["id"] == "nq-multidoc-train-7"]
    assert len(nq) == 1 and nq[0]["question"] == nq_train[0]["question"]
    assert all(len(r["distractors"]) == 3 for r in train + dev) and stats.questions_with_fewer_distractors == 0
    # the answer-bearing wiki chunk is the best match of question 0 but never its distractor
    by_id = {p["id"]: p for p in passages}
    q0 = next(r for r in train + dev if r["id"] == "0")
    assert all("trap" not in by_id[j]["title"].lower() for j in q0["distractors"])
    assert stats.distractors_rejected_for_answer >= 1
    assert stats.pool_wiki_chunks > 0 and 0 < stats.distractors_from_wiki < 1
    # questions and answers verbatim
    source = {r["id"]: r for r in qa}
    for r in train + dev:
        if r["id"] in source:
            assert (r["question"], r["answers"]) == (source[r["id"]]["question"], source[r["id"]]["answers"])


def _write(folder: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    passages, train, dev, _ = _build()
    write_jsonl_gz(passages, folder / "passages.jsonl.gz")
    write_jsonl_gz(train, folder / "train.jsonl.gz")
    write_jsonl_gz(dev, folder / "dev.jsonl.gz")
    return passages, train, dev


def test_load_qa_pool_and_qa_sample(tmp_path: Path) -> None:
    passages, train, dev = _write(tmp_path)
    assert is_qa_pool(tmp_path) and not is_qa_pool(tmp_path / "train.jsonl.gz")
    context = {p["id"]: format_context(p["title"], p["text"]) for p in passages}
    for split, records in (("train", train), ("dev", dev)):
        examples = load_qa_pool(tmp_path, split)
        assert examples == load_qa(tmp_path, split)
        assert len(examples) == len(records)
        for example, record in zip(examples, records):
            assert example.gold_index == 0
            assert example.contexts == [context[record["gold"]]] + [context[j] for j in record["distractors"]]
            assert (example.question, example.answers) == (record["question"], record["answers"])
    assert len(load_qa_pool(tmp_path, "train", limit=2)) == 2
    # train.qa_sample shows the gold exactly once, among at most max_docs documents
    rng = random.Random(0)
    for example in load_qa_pool(tmp_path, "train"):
        for max_docs in (1, 2, 3, 10):
            sample = qa_sample(example, 4, max_docs, rng)
            assert sample.documents.count(example.contexts[0]) == 1
            assert len(sample.documents) <= max(max_docs, 1)
    # train.load_data takes the folder for --data and --dev_data
    data = load_data(TrainConfig(stage="keft", data=[str(tmp_path)], dev_data=str(tmp_path)), tokenizer=None)
    assert len(data.qa) == len(train) and len(data.dev) == len(dev)


def test_load_as_shown_lays_a_pool_out_as_the_trainer_dev_does(tmp_path: Path) -> None:
    """Benchmarks score the trainer's dev prompts: gold among the hardest distractors at place index mod count."""
    from gmsa_rag.data.qa import load_as_shown, save_qa_jsonl
    from gmsa_rag.train import dev_qa_sample

    _write(tmp_path)
    pooled = load_qa_pool(tmp_path, "dev")
    shown = load_as_shown(tmp_path, "dev", max_docs=3)
    assert len(shown) == len(pooled)
    for i, (example, as_shown) in enumerate(zip(pooled, shown)):
        assert as_shown.contexts == dev_qa_sample(example, 4, 3, i).documents
        assert as_shown.contexts[as_shown.gold_index] == example.contexts[0]
        assert len(as_shown.contexts) == min(3, len(example.contexts))
    assert len(load_as_shown(tmp_path, "dev", limit=1)) == 1
    save_qa_jsonl(shown, tmp_path / "shown.jsonl")  # a file comes back as stored
    assert load_as_shown(tmp_path / "shown.jsonl") == shown


def test_bad_settings_and_records_are_refused(tmp_path: Path) -> None:
    from dataclasses import replace

    from gmsa_rag.data.build_nq import read_records
    from gmsa_rag.data.build_qa import main

    qa, nq_train, nq_dev, chunks = _inputs()
    with pytest.raises(ValueError, match="leaves no QA question for train"):
        build_qa_pool(qa, nq_train, nq_dev, chunks, _bow_embed, replace(CONFIG, dev_size=len(qa)))
    for flag in ("--dev-size", "--num-distractors"):
        with pytest.raises(SystemExit):
            main([flag, "0"])
    broken = tmp_path / "qa.jsonl"
    broken.write_text(json.dumps(qa[0]) + "\n{cut\n")
    with pytest.raises(ValueError, match="qa.jsonl:2: not a JSON record"):
        read_records(broken)


def test_load_qa_pool_errors(tmp_path: Path) -> None:
    _write(tmp_path)
    write_jsonl_gz([{"question": "q", "answers": ["a"], "gold": 10_000, "distractors": []}], tmp_path / "bad.jsonl.gz")
    with pytest.raises(ValueError, match="bad.jsonl.gz:1"):
        load_qa_pool(tmp_path, "bad")


def test_pick_distractors_matches_stable_argsort() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, size=300).astype(np.float32)  # many ties
    assert list(ranked(scores, head=7)) == np.argsort(-scores, kind="stable").tolist()
    candidates = np.arange(300, 600)
    normalized = ["x answer y" if i % 3 == 0 else "plain" for i in range(600)]
    picked, rejected = pick_distractors(scores, candidates, 5, {int(candidates[np.argmax(scores)])}, normalized, ["answer"])
    expected = [int(candidates[p]) for p in np.argsort(-scores, kind="stable")
                if candidates[p] % 3 and candidates[p] != candidates[np.argmax(scores)]][:5]
    assert picked == expected and rejected > 0
    assert pick_distractors(scores, candidates, 0, set(), normalized, []) == ([], 0)


def test_wiki_chunks_and_held_out_parts(tmp_path: Path) -> None:
    para = " ".join(f"w{i}" for i in range(50))
    path = tmp_path / "wiki-13.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(json.dumps({"title": "A", "text": "\n".join([para] * 5)}) + "\n")
        fh.write(json.dumps({"title": "B", "text": "too short"}) + "\n")
    chunks, articles = wiki_chunks(path, 60, 150)
    assert articles == 2 and chunks and all(c["title"] == "A" for c in chunks)
    assert all(60 <= len(c["text"].split()) <= 150 and "\n" not in c["text"] for c in chunks)
    for part in ("wiki-14.jsonl.gz", "wiki-15.jsonl.gz"):
        with pytest.raises(ValueError, match="held out"):
            wiki_chunks(tmp_path / part, 60, 150)


def test_cached_embedder(tmp_path: Path) -> None:
    calls: list[int] = []

    def embed(texts: list[str]) -> np.ndarray:
        calls.append(len(texts))
        return _bow_embed(texts)

    cache = tmp_path / "e.npz"
    first = cached_embedder(embed, cache, block=2, progress=False)(["a b", "c", "a b", "d e"])
    again = cached_embedder(embed, cache, block=2, progress=False)(["d e", "a b", "f"])
    assert calls == [2, 1, 1]  # three new texts in blocks of two, then only "f"
    np.testing.assert_allclose(again[:2], first[[3, 0]])
    np.testing.assert_allclose(again[2], _bow_embed(["f"])[0])


@pytest.mark.skipif(not (DEFAULT_OUT_DIR / "passages.jsonl.gz").exists(), reason="bundled qa-multidoc not built")
def test_bundled_qa_multidoc() -> None:
    from gmsa_rag.data import DEFAULT_QA_DIR
    from gmsa_rag.data.build_nq import read_records

    def read(name: str) -> list[dict[str, Any]]:
        with gzip.open(DEFAULT_OUT_DIR / name, "rt", encoding="utf-8") as fh:
            return [json.loads(line) for line in fh]

    meta = json.loads((DEFAULT_OUT_DIR / "meta.json").read_text())
    passages, train, dev = read("passages.jsonl.gz"), read("train.jsonl.gz"), read("dev.jsonl.gz")
    assert (len(train), len(dev), len(passages)) == (meta["stats"]["train"], meta["stats"]["dev"],
                                                    meta["stats"]["passages_stored"])
    nq_dev = read_records(DEFAULT_QA_DIR / "dev.jsonl.gz")
    _check_pooled(passages, train, dev, meta["config"]["num_distractors"], nq_dev)
    assert sum(len(r["distractors"]) < meta["config"]["num_distractors"] for r in train + dev) == \
        meta["stats"]["questions_with_fewer_distractors"]
    total = sum(f.stat().st_size for f in DEFAULT_OUT_DIR.iterdir())
    assert total <= 12 * 2**20


def test_extra_train_questions_join_train_and_leave_dev_as_it_was() -> None:
    """--extra-train: its questions are train only, deduplicated and kept off the NQ dev set, and dev (questions,
    gold passages, distractors) is the same as without them."""
    qa, nq_train, nq_dev, chunks = _inputs()
    extra = [{"question": "which river flows past the extra town", "answers": ["Extrariver"], "source": "extra",
              "id": "e1", "ctxs": [_gold("Extra town", "The river number 0 flows past the extra town: Extrariver.")]},
             {"question": "Who painted the dev mural", "answers": ["Dev Painter"], "source": "extra", "id": "e2",
              "ctxs": [_gold("Mural copy", "Somebody painted it.")]}]  # an NQ dev question: dropped
    passages, train, dev, stats = build_qa_pool(qa, nq_train, nq_dev, chunks, _bow_embed, CONFIG, extra_train=extra)
    _check_pooled(passages, train, dev, CONFIG.num_distractors, nq_dev)
    assert [r["id"] for r in train if r["source"] == "extra"] == ["e1"] and stats.extra_train_questions_in == 2
    base_passages, base_train, base_dev, _ = _build()

    def resolved(records, pool):
        text = {p["id"]: p["text"] for p in pool}
        return [(r["question"], text[r["gold"]], [text[j] for j in r["distractors"]]) for r in records]

    assert resolved(dev, passages) == resolved(base_dev, base_passages)
    assert len(train) == len(base_train) + 1
