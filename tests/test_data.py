"""Tests for gmsa_rag.data: corpus loading/chunking, QA jsonl I/O, multi-document NQ builder."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from gmsa_rag.data import DEFAULT_AE_CORPUS, DEFAULT_QA_DIR
from gmsa_rag.data.build_nq import (
    DEFAULT_INPUT,
    BuildConfig,
    build_multidoc,
    contains_answer,
    gold_positions,
    main as build_nq_main,
    minilm_path,
    parse_gold_position,
    split_train_dev,
)
from gmsa_rag.data.corpus import (
    chunk_corpus,
    chunk_texts,
    iter_documents,
    load_texts,
    make_token_counter,
    split_paragraphs,
    split_sentences,
)
from gmsa_rag.data.qa import QAExample, format_context, load_qa_jsonl, save_qa_jsonl, split_context
from gmsa_rag.metrics import normalize_answer

# ------------------------------------------------------------------ corpus


def _write_gz(path: Path, text: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.write(text)


def test_load_texts_formats(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha one\n\nalpha two\n", encoding="utf-8")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.md").write_text("# beta\n\nbeta body", encoding="utf-8")
    _write_gz(sub / "c.txt.gz", "gamma")
    (sub / "ignored.py").write_text("print('x')", encoding="utf-8")
    records = [{"body": "delta"}, {"body": "epsilon", "other": 1}]
    _write_gz(tmp_path / "d.jsonl.gz", "\n".join(json.dumps(r) for r in records) + "\n\n")

    # folder: supported files only, sorted by path
    assert load_texts(tmp_path / "sub") == ["# beta\n\nbeta body", "gamma"]
    assert load_texts(tmp_path / "d.jsonl.gz", text_field="body") == ["delta", "epsilon"]
    assert load_texts([tmp_path / "a.txt", str(tmp_path / "sub" / "c.txt.gz")]) == [
        "alpha one\n\nalpha two\n",
        "gamma",
    ]
    with pytest.raises(FileNotFoundError):
        load_texts(tmp_path / "missing.txt")


def test_load_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2:"):
        load_texts(path)
    path.write_text('{"text": "ok"}\n\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: not a JSON record"):
        list(iter_documents(path))


def test_split_paragraphs_and_sentences() -> None:
    text = "First  line\nwraps here.\n\n\n  \nSecond.\r\n\r\nThird"
    assert split_paragraphs(text) == ["First line wraps here.", "Second.", "Third"]
    assert split_paragraphs("\n \n") == []
    para = 'It works. Does it? Yes! "Quoted." Then 3 more. e.g. lower stays'
    assert split_sentences(para) == ["It works.", "Does it?", "Yes!", '"Quoted."', "Then 3 more. e.g. lower stays"]


def _words(chunks: list[str]) -> list[str]:
    return [w for c in chunks for w in c.split()]


def test_chunk_texts_whitespace_bounds_and_order() -> None:
    rng = random.Random(0)
    docs = []
    for d in range(5):
        paras = []
        for p in range(rng.randint(1, 6)):
            sents = [" ".join(f"W{d}_{p}_{s}_{k}" for k in range(rng.randint(3, 12))) + "." for s in range(rng.randint(1, 8))]
            paras.append(" ".join(sents))
        docs.append("\n\n".join(paras))
    chunks = chunk_texts(docs, None, min_tokens=10, max_tokens=40)
    assert chunks == chunk_texts(docs, None, min_tokens=10, max_tokens=40)  # deterministic
    assert all(c.strip() for c in chunks)
    assert all(10 <= len(c.split()) <= 40 for c in chunks)
    # order preserved and nothing lost except possibly the final short tail
    all_words = [w for d in docs for w in d.split()]
    got = _words(chunks)
    assert all_words[: len(got)] == got
    assert len(all_words) - len(got) < 10


def test_chunk_long_paragraph_splits_at_sentences() -> None:
    para = " ".join(f"Sentence {i} has five words." for i in range(20))  # 100 words
    chunks = chunk_texts([para], None, min_tokens=5, max_tokens=22)
    assert all(c.endswith(".") for c in chunks)
    assert all(len(c.split()) <= 22 for c in chunks)
    assert [len(c.split()) for c in chunks] == [20] * 5
    # a single sentence longer than max_tokens is split at words
    long_sentence = " ".join(f"x{i}" for i in range(50)) + "."
    pieces = chunk_texts([long_sentence], None, min_tokens=1, max_tokens=16)
    assert [len(p.split()) for p in pieces] == [16, 16, 16, 2]
    assert _words(pieces) == long_sentence.split()


def test_chunk_carries_short_tails_across_documents() -> None:
    docs = ["one two three.", "four five.", "six seven eight nine ten."]
    assert chunk_texts(docs, None, min_tokens=5, max_tokens=8) == ["one two three.\n\nfour five.", "six seven eight nine ten."]
    # the final tail shorter than min_tokens is dropped
    assert chunk_texts(["a b c d e.", "f g."], None, min_tokens=5, max_tokens=6) == ["a b c d e."]
    with pytest.raises(ValueError):
        chunk_texts(["x"], None, min_tokens=0, max_tokens=4)


def test_token_counters() -> None:
    assert make_token_counter(None)("a b  c") == 3
    assert make_token_counter(lambda s: list(s))("abc") == 3  # callable returning ids
    assert make_token_counter(lambda s: {"input_ids": [1, 2]})("abc") == 2  # HF-style mapping
    chars = chunk_texts(["abcdef ghijkl.\n\nmnop."], lambda s: list(s), min_tokens=3, max_tokens=14)
    assert chars == ["abcdef ghijkl.", "mnop."]
    with pytest.raises(TypeError):
        make_token_counter(42)


def test_chunk_corpus_with_hf_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    text = "\n\n".join(
        " ".join(f"The {i}-th paragraph talks about topic number {j} in some detail." for j in range(i % 7 + 1))
        for i in range(30)
    )
    path = tmp_path / "doc.md"
    path.write_text(text, encoding="utf-8")
    chunks = chunk_corpus(path, tok, min_tokens=20, max_tokens=64)
    lengths = [len(tok.encode(c, add_special_tokens=False)) for c in chunks]
    assert chunks and all(20 <= n <= 64 for n in lengths)
    assert make_token_counter(tok)("hello world") == 2  # special tokens not counted


def test_bundled_ae_corpus() -> None:
    assert DEFAULT_AE_CORPUS.is_file()
    assert DEFAULT_AE_CORPUS.stat().st_size < 15 * 2**20
    docs = []
    for doc in iter_documents(DEFAULT_AE_CORPUS):
        docs.append(doc)
        if len(docs) == 20:
            break
    assert all(len(d.split()) >= 50 for d in docs)
    meta = json.loads(DEFAULT_AE_CORPUS.with_name("prose.meta.json").read_text())
    assert meta["words"] > 300_000


# ---------------------------------------------------------------------- QA


def _qa_record(q: str, answers: list[str], ctxs: list[tuple[str, str, bool]]) -> dict[str, Any]:
    return {"question": q, "answers": answers,
            "ctxs": [{"title": t, "text": x, "isgold": g, "hasanswer": g} for t, x, g in ctxs]}


def test_qa_jsonl_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "qa.jsonl.gz"
    rec = _qa_record("who?", ["Ann", "Anne"], [("T1", "first text", False), ("", "untitled", False), ("T3", "gold text", True)])
    _write_gz(path, json.dumps(rec) + "\n\n" + json.dumps({**rec, "ctxs": []}) + "\n")
    examples = load_qa_jsonl(path)
    assert examples[0] == QAExample("who?", ["Ann", "Anne"], ["Title: T1\nfirst text", "untitled", "Title: T3\ngold text"], 2)
    assert examples[0].gold_context == "Title: T3\ngold text"
    assert examples[1].contexts == [] and examples[1].gold_index is None
    assert load_qa_jsonl(path, limit=1) == examples[:1]

    out = tmp_path / "out" / "qa.jsonl"
    assert save_qa_jsonl(examples, out) == 2
    assert load_qa_jsonl(out) == examples
    saved = json.loads(out.read_text().splitlines()[0])
    assert saved["ctxs"][2] == {"title": "T3", "text": "gold text", "isgold": True}
    assert split_context(format_context("A", "b\nc")) == ("A", "b\nc")
    assert split_context("plain") == ("", "plain")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{oops", "not a JSON record"),
        ('{"answers": ["a"]}', "'question'"),
        ('{"question": "q", "answers": "a"}', "'answers'"),
        ('{"question": "q", "answers": ["a"], "ctxs": [{"title": "t"}]}', r"ctxs\[0\]"),
        ('["not", "an", "object"]', "JSON object"),
    ],
)
def test_qa_jsonl_malformed(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps(_qa_record("q", ["a"], [])) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"qa\.jsonl:2: .*{message}"):
        load_qa_jsonl(path)


def test_qa_example_validates_gold_index() -> None:
    with pytest.raises(ValueError):
        QAExample("q", ["a"], ["c"], gold_index=1)


# ----------------------------------------------------------- NQ multi-doc

TOPICS = ["river", "mountain", "king", "film", "song", "planet", "bridge", "war", "novel", "island",
          "city", "painter", "team", "language", "bird", "ship"]


def _synthetic_records() -> list[dict[str, Any]]:
    records = []
    for i, topic in enumerate(TOPICS):
        answer = f"Answer{i}"
        gold = {"title": f"{topic.title()} {i}", "text": f"The {topic} number {i} is known as {answer}. "
                f"It relates to {topic} things.", "hasanswer": True, "isgold": True}
        records.append({"question": f"what is the {topic} number {i} called", "answers": [answer, f"the {answer}"],
                        "ctxs": [gold], "nq_annotated_gold": {}})
    # a passage that shares words with question 0 and contains its answer: must never be a distractor for it
    records.append({"question": "which river mentions answer0 too", "answers": ["Other"],
                    "ctxs": [{"title": "River trap", "text": "The river number 0 trap says Answer0 as well.",
                              "hasanswer": True, "isgold": True}]})
    # two questions sharing one gold passage must land on the same side of the split
    shared = {"title": "Shared", "text": "A shared passage about bridge and war.", "isgold": True}
    records.append({"question": "shared one", "answers": ["x1"], "ctxs": [dict(shared)]})
    records.append({"question": "shared two", "answers": ["x2"], "ctxs": [dict(shared)]})
    return records


def _bow_embed(texts: list[str]) -> np.ndarray:
    """Deterministic bag-of-words hashing embedder (L2-normalised)."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, text in enumerate(texts):
        for word in normalize_answer(text).split():
            out[row, int(hashlib.md5(word.encode()).hexdigest(), 16) % 64] += 1.0
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _check_examples(examples: list[dict[str, Any]], records: list[dict[str, Any]], num_docs: int) -> None:
    for ex in examples:
        source = records[ex["source_index"]]
        assert ex["question"] == source["question"]  # verbatim, never modified
        assert ex["answers"] == source["answers"]
        assert len(ex["ctxs"]) == num_docs
        golds = [i for i, c in enumerate(ex["ctxs"]) if c["isgold"]]
        assert golds == [ex["gold_index"]]
        gold = ex["ctxs"][ex["gold_index"]]
        source_gold = source["ctxs"][0]
        assert (gold["title"], gold["text"]) == (source_gold["title"], source_gold["text"])
        answers = [normalize_answer(a) for a in ex["answers"]]
        texts = [(c["title"], c["text"]) for c in ex["ctxs"]]
        assert len(set(texts)) == num_docs  # no duplicate passages
        for i, ctx in enumerate(ex["ctxs"]):
            if i != ex["gold_index"]:
                assert not contains_answer(normalize_answer(f"{ctx['title']} {ctx['text']}"), answers)
                assert not ctx["hasanswer"]


def test_build_multidoc_guarantees() -> None:
    records = _synthetic_records()
    config = BuildConfig(num_docs=4, dev_size=5, seed=3)
    train, dev, stats = build_multidoc(records, _bow_embed, config)
    assert (train, dev) == build_multidoc(records, _bow_embed, config)[:2]  # deterministic
    assert len(dev) == 5 and len(train) == len(records) - 5
    assert stats.skipped_too_few_distractors == 0
    _check_examples(train + dev, records, 4)
    assert [e["gold_index"] for e in dev] == [0, 1, 2, 3, 0]  # cycled
    # disjoint by question and by gold passage; train never shows a dev gold passage
    train_src = {e["source_index"] for e in train}
    dev_src = {e["source_index"] for e in dev}
    assert not train_src & dev_src
    dev_gold = {records[i]["ctxs"][0]["text"] for i in dev_src}
    assert not dev_gold & {records[i]["ctxs"][0]["text"] for i in train_src}
    assert not dev_gold & {c["text"] for e in train for c in e["ctxs"]}
    # the answer-bearing trap is never question 0's distractor, even though it is the most similar
    ex0 = next(e for e in train + dev if e["source_index"] == 0)
    assert all("trap" not in c["title"].lower() for c in ex0["ctxs"])
    assert stats.distractors_rejected_for_answer >= 1


def test_build_multidoc_fixed_position_and_bounds() -> None:
    records = _synthetic_records()
    train, dev, _ = build_multidoc(records, _bow_embed, BuildConfig(3, 4, 0, train_gold_position=2, dev_gold_position=0))
    assert {e["gold_index"] for e in train} == {2} and {e["gold_index"] for e in dev} == {0}
    with pytest.raises(ValueError):
        build_multidoc(records, _bow_embed, BuildConfig(3, 4, 0, train_gold_position=3))


def test_split_and_positions() -> None:
    records = _synthetic_records()
    train, dev = split_train_dev(records, 6, seed=1)
    assert sorted(train + dev) == list(range(len(records))) and len(dev) == 6
    n = len(records)
    assert {n - 2, n - 1} <= set(train) or {n - 2, n - 1} <= set(dev)  # shared gold passage together
    assert gold_positions("cycle", 7, 3, random.Random(0)) == [0, 1, 2, 0, 1, 2, 0]
    assert set(gold_positions("random", 200, 3, random.Random(0))) == {0, 1, 2}
    assert parse_gold_position("2") == 2 and parse_gold_position("random") == "random"
    with pytest.raises(ValueError):
        parse_gold_position("middle")


def test_contains_answer_is_token_level() -> None:
    assert contains_answer("season 8 aired in 2018", ["8"])
    assert not contains_answer("aired in 2018", ["8"])
    assert contains_answer("born in new york city", ["new york"])
    assert not contains_answer("anything", [""])


def test_build_nq_cli_with_real_minilm(tmp_path: Path) -> None:
    records = _synthetic_records()[:10]
    src = tmp_path / "in.jsonl.gz"
    _write_gz(src, "".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    assert build_nq_main(["--input", str(src), "--out-dir", str(out), "--num-docs", "3",
                          "--dev-size", "3", "--seed", "0", "--no-progress"]) == 0
    dev = load_qa_jsonl(out / "dev.jsonl.gz")
    train = load_qa_jsonl(out / "train.jsonl.gz")
    assert len(dev) == 3 and len(train) == 7
    assert [e.gold_index for e in dev] == [0, 1, 2]
    assert all(len(e.contexts) == 3 for e in train + dev)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["stats"]["dev"] == 3


# --------------------------------------------------- bundled NQ multi-doc data


def _read(path: Path) -> list[dict[str, Any]]:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


@pytest.mark.skipif(not (DEFAULT_QA_DIR / "dev.jsonl.gz").exists(), reason="bundled QA data not built")
def test_bundled_nq_multidoc() -> None:
    meta = json.loads((DEFAULT_QA_DIR / "meta.json").read_text())
    num_docs = meta["config"]["num_docs"]
    train, dev = _read(DEFAULT_QA_DIR / "train.jsonl.gz"), _read(DEFAULT_QA_DIR / "dev.jsonl.gz")
    assert len(dev) == meta["stats"]["dev"] and len(train) == meta["stats"]["train"]
    assert [e["gold_index"] for e in dev] == [j % num_docs for j in range(len(dev))]
    assert not {e["question"] for e in train} & {e["question"] for e in dev}
    dev_gold = {e["ctxs"][e["gold_index"]]["text"] for e in dev}
    assert not dev_gold & {c["text"] for e in train for c in e["ctxs"]}
    if DEFAULT_INPUT.exists():
        records = _read(DEFAULT_INPUT)
        _check_examples(train + dev, records, num_docs)
    assert len(load_qa_jsonl(DEFAULT_QA_DIR / "dev.jsonl.gz")) == len(dev)
