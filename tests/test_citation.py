"""Cited answers: targets that open with the gold document's number, prompts that ask for it, generation that
strips it (and, extractive, holds the answer to the cited document)."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from gmsa_rag.citation import CITATION_TOKENS, cited, split_citation
from gmsa_rag.data.qa import QAExample
from gmsa_rag.prompt import CITE_INSTRUCTION, QA_INSTRUCTION
from gmsa_rag.testing import lively, tiny_gmsa
from gmsa_rag.train import TrainConfig, evaluate, parse_args, qa_sample

DOCS = ["Mount Everest is Earth's highest mountain.", "The tower was designed by Gustave Eiffel's company.",
        "Paris is the capital of France."]


def test_citations_read_back_and_bad_numbers_are_no_citation():
    assert cited("Sun Tzu", 2) == "[3] Sun Tzu" and split_citation(cited("Sun Tzu", 2)) == (2, "Sun Tzu")
    assert split_citation(" [1]Paris ", documents=3) == (0, "Paris")
    assert split_citation("[4] Paris", documents=3) == (None, "Paris")  # stripped, but no such document
    assert split_citation("[0] Paris") == (None, "Paris")
    assert split_citation("Paris [2]") == (None, "Paris [2]")


def test_cited_targets_name_the_gold_passages_place():
    example = QAExample("who designed it", ["Gustave Eiffel"], DOCS, gold_index=1)
    for seed in range(6):
        sample = qa_sample(example, 4, 3, random.Random(seed), min_docs=3, cite=True)
        place, answer = split_citation(sample.target, 3)
        assert answer == "Gustave Eiffel" and sample.documents[place] == DOCS[1]
    assert qa_sample(example, 4, 3, random.Random(0), min_docs=3).target == "Gustave Eiffel"  # off: unchanged
    plain = QAExample("q", ["a"], DOCS)  # no gold marked: nothing to cite
    assert qa_sample(plain, 4, 3, random.Random(0), cite=True).target == "a"
    with pytest.raises(SystemExit):
        parse_args(["--stage", "ae", "--cite_document", "true"])


@pytest.fixture()
def citing(tokenizer):
    return lively(tiny_gmsa(tokenizer, window=64, answer_cites=True))


def spy(model, monkeypatch, head: str):
    """Record generate_from_segments' calls; a call without the extractive processor (the citation's) returns
    ``head`` instead of decoding."""
    calls, real = [], model.generate_from_segments

    def generate_from_segments(prompts, max_new_tokens=32, **kwargs):
        calls.append((prompts, max_new_tokens, kwargs))
        if "logits_processor" not in kwargs:
            return [head] * len(prompts)
        return real(prompts, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(model, "generate_from_segments", generate_from_segments)
    return calls


def prompt_text(model, prompt) -> str:
    return model.tokenizer.decode([t for seg in prompt if seg.token_ids is not None for t in seg.token_ids])


def test_a_citing_model_is_asked_to_cite_and_answers_without_the_citation(citing, monkeypatch):
    contexts = [citing.compress(DOCS, 4)]
    monkeypatch.setattr(citing, "generate_from_segments", lambda prompts, **kw: ["[2] Gustave Eiffel"] * len(prompts))
    assert citing.generate(["Who designed it?"], contexts) == ["Gustave Eiffel"]
    calls = spy(citing, monkeypatch, "[2]")
    citing.generate(["Who designed it?"], contexts, max_new_tokens=4)
    assert CITE_INSTRUCTION in prompt_text(citing, calls[0][0][0])
    citing.config.answer_cites = False
    citing.generate(["Who designed it?"], contexts, max_new_tokens=4)
    assert QA_INSTRUCTION in prompt_text(citing, calls[-1][0][0]) and CITE_INSTRUCTION not in prompt_text(citing, calls[-1][0][0])


def test_extractive_answers_of_a_citing_model_quote_the_cited_document(citing, monkeypatch):
    contexts = [citing.compress(DOCS, 4), citing.compress(DOCS[:2], 4)]
    calls = spy(citing, monkeypatch, "[2]")
    answers = citing.generate(["Who?", "What?"], contexts, max_new_tokens=6, extract_from=[DOCS, DOCS[:2]])
    assert all(answer and answer in DOCS[1] for answer in answers), answers  # the second document, as cited
    (first, n_first, _), (second, _, kwargs) = calls
    assert n_first == CITATION_TOKENS and "logits_processor" in kwargs
    assert all(prompt_text(citing, p).endswith("[2]") and len(p) == len(q) + 1 for p, q in zip(second, first))
    calls.clear()
    spy(citing, monkeypatch, "no citation")  # none cited: every document may be quoted, no prefix
    answers = citing.generate(["Who?"], contexts[:1], max_new_tokens=6, extract_from=[DOCS])
    assert answers[0] and any(answers[0] in d for d in DOCS)


def test_dev_evaluation_of_a_citing_model_scores_the_citation(tokenizer, monkeypatch):
    model = tiny_gmsa(tokenizer, rates=[4])
    model.config.answer_cites = True
    dev = [QAExample("who wrote hamlet", ["Shakespeare"], ["Paris is in France.", "Hamlet is by Shakespeare."], 1),
           QAExample("river in egypt", ["Nile"], ["The Nile flows north.", "Rome is old."], 0)]
    # the dev layout puts question i's gold passage at place i mod 2: 0, then 1
    monkeypatch.setattr(model, "generate_from_segments", lambda prompts, **kw: ["[1] Shakespeare", "[1] Nile"][: len(prompts)])
    cfg = TrainConfig(stage="keft", init="unused", max_docs=2, eval_samples=2, eval_batch_size=2)
    scores = evaluate(model, dev, cfg)
    assert scores["cite_accuracy@4x"] == 50.0 and scores["exact_match@4x"] == 100.0
    gold = evaluate(model, dev, replace(cfg, eval_gold_only=True))
    assert gold["gold_cite_accuracy@4x"] == 100.0  # alone, the gold passage is document 1
