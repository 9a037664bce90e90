"""Gold passages retrieved for questions without one (gmsa_rag.data.build_retrieved), with a fake embedder."""
from __future__ import annotations

import json

import pytest

from gmsa_rag.data.build_retrieved import AnswerIndex, RetrievalConfig, main, retrieve_gold
from test_data import _bow_embed  # the bag-of-words embedder of the build_nq tests

CHUNKS = [
    ("wiki-00", {"title": "Paris", "text": "Paris is the capital and largest city of France, on the Seine."}),
    ("wiki-00", {"title": "Lyon", "text": "Lyon is a city in France; Paris is larger."}),
    ("wiki-01", {"title": "Seine", "text": "The Seine flows through Paris to the English Channel."}),
    ("wiki-01", {"title": "Madrid", "text": "Madrid is the capital of Spain."}),
]


def test_answer_index_matches_whole_tokens_only():
    index = AnswerIndex([["Paris"], ["the Seine", "Seine river"], ["2018"]])
    assert index.questions_in("in 2018 the seine flooded paris".split()) == {0, 1, 2}
    assert index.questions_in("parisian 20188 seines".split()) == set()


def test_the_most_similar_chunk_holding_an_answer_becomes_the_gold_passage():
    questions = [{"question": "what is the capital of france", "answers": ["Paris"]},
                 {"question": "which river flows through paris", "answers": ["Seine", "the Seine"]},
                 {"question": "capital of italy", "answers": ["Rome"]},  # no chunk holds it: dropped
                 {"question": "What is the capital of Spain?", "answers": ["Madrid"]}]  # an NQ dev question: dropped
    records, stats = retrieve_gold(questions, CHUNKS, _bow_embed, RetrievalConfig(min_similarity=0.0),
                                   exclude_questions={"what is capital of spain"})
    gold = {r["question"]: r["ctxs"][0] for r in records}
    assert set(gold) == {"what is the capital of france", "which river flows through paris"}
    assert gold["what is the capital of france"]["title"] == "Paris"  # not Lyon, which also says Paris
    assert gold["which river flows through paris"]["title"] in {"Paris", "Seine"} and all(c["isgold"] for c in gold.values())
    assert stats.dropped_same_question_as_nq_dev == 1 and stats.kept == 2 and stats.chunks_streamed == 4
    strict, stats = retrieve_gold(questions[:1], CHUNKS, _bow_embed, RetrievalConfig(min_similarity=0.999))
    assert strict == [] and stats.dropped_below_similarity == 1


def test_the_cli_refuses_held_out_parts_and_missing_files(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(SystemExit, match="held out"):
        main(["--questions", str(questions), "--wiki", str(tmp_path / "wiki-15.jsonl.gz"), "--out", str(tmp_path / "o.jsonl.gz")])
    with pytest.raises(SystemExit, match="missing input"):
        main(["--questions", str(questions), "--wiki", str(tmp_path / "wiki-03.jsonl.gz"), "--out", str(tmp_path / "o.jsonl.gz")])
