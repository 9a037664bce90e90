"""Extractive decoding: answers held to spans of the question's documents."""
from __future__ import annotations

import pytest
import torch

from gmsa_rag.extractive import DocumentSpans, ExtractiveProcessor, word_starts
from gmsa_rag.testing import SAMPLE_TEXT, lively, tiny_gmsa

DOCS = ["The tower was designed by Gustave Eiffel's company.", "Mount Everest is Earth's highest mountain."]


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def spelled(tokenizer, allowed: set[int]) -> set[str]:
    return {tokenizer.decode([t]) for t in allowed}


def test_answers_open_a_word_with_or_without_its_space_and_follow_the_text(tokenizer):
    assert word_starts("Earth's 1.5 Gbit") == [0, 5, 6, 8, 9, 10, 12]
    spans = DocumentSpans(DOCS, tokenizer)
    opening = spelled(tokenizer, spans.allowed([]))
    assert {"G", " Gust", "Mount", " Mount", "E"} <= opening and "ust" not in opening
    # "Gustave" opening a reply is spelled G + ust + ave, the document's " Gustave" as " Gust" + "ave"
    assert ids(tokenizer, "Gustave") != ids(tokenizer, " Gustave")
    assert " E" in spelled(tokenizer, spans.allowed(ids(tokenizer, "Gustave")))
    assert spans.allowed(ids(tokenizer, "Gustave")) == spans.allowed(ids(tokenizer, " Gustave"))
    after = spelled(tokenizer, spans.allowed(ids(tokenizer, "Earth's")))  # "'s" follows Eiffel too: the whole
    assert " highest" in after and " company" not in after                 # answer so far decides
    assert spans.allowed(ids(tokenizer, "mountain.")) == set()  # a document's end: only stopping is left
    assert spans.allowed(ids(tokenizer, "Paris")) == set()
    assert spans.allowed(ids(tokenizer, "ower")) == set()  # not from the middle of a word
    with pytest.raises(ValueError):
        DocumentSpans([" "], tokenizer)


def test_the_processor_masks_all_but_the_continuations_and_stops(tokenizer):
    spans = DocumentSpans([DOCS[1]], tokenizer)
    stop = [tokenizer.eos_token_id]
    processor = ExtractiveProcessor([spans, spans], stop)
    scores = torch.zeros(2, len(tokenizer))
    first = processor(torch.zeros(2, 0, dtype=torch.long), scores)
    assert set(torch.isfinite(first[0]).nonzero().flatten().tolist()) == spans.allowed([])  # no empty answer
    opened = torch.tensor([ids(tokenizer, "Mount"), [stop[0]]])
    out = processor(opened, scores)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == spans.allowed(ids(tokenizer, "Mount")) | {stop[0]}
    assert torch.isfinite(out[1]).all()  # a finished row is left alone
    with pytest.raises(ValueError, match="rows"):
        processor(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, len(tokenizer)))
    # beam search: each question's beams are consecutive rows, held to that question's documents
    other = DocumentSpans([DOCS[0]], tokenizer)
    beams = ExtractiveProcessor([spans, other], stop)(torch.zeros(4, 0, dtype=torch.long), torch.zeros(4, len(tokenizer)))
    allowed = [set(torch.isfinite(row).nonzero().flatten().tolist()) for row in beams]
    assert allowed[0] == allowed[1] == spans.allowed([]) and allowed[2] == allowed[3] == other.allowed([])


def test_a_finite_penalty_leans_towards_the_spans_and_frees_an_answer_that_left_them(tokenizer):
    spans = DocumentSpans([DOCS[1]], tokenizer)
    stop = [tokenizer.eos_token_id]
    processor = ExtractiveProcessor([spans], stop, penalty=3.0)
    scores = torch.randn(1, len(tokenizer))

    def lowered(answer: list[int]) -> set[int]:
        shift = processor(torch.tensor([answer], dtype=torch.long), scores.clone()) - scores
        assert set(shift.flatten().round(decimals=4).tolist()) <= {0.0, -3.0}
        return set((shift[0] < 0).nonzero().flatten().tolist())

    everything = set(range(len(tokenizer)))
    assert everything - lowered([]) == spans.allowed([])  # the opening: any word of the documents, no stop
    mount = ids(tokenizer, "Mount")
    assert everything - lowered(mount) == spans.allowed(mount) | set(stop)
    assert everything - lowered(ids(tokenizer, "mountain.")) == set(stop)  # a document's end: stopping is free
    assert lowered(ids(tokenizer, "Paris")) == set()  # no span any more: decoded freely
    for penalty in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="penalty"):
            ExtractiveProcessor([spans], stop, penalty=penalty)


def test_the_extractive_penalty_runs_from_free_answers_to_spans(tokenizer):
    model = lively(tiny_gmsa(tokenizer, window=64))
    documents = [[SAMPLE_TEXT, DOCS[1]], [DOCS[0]]]
    contexts = [model.compress(docs, 4) for docs in documents]
    questions = ["Who designed it?", "What is it?"]
    free = model.generate(questions, contexts, max_new_tokens=8)
    held = model.generate(questions, contexts, max_new_tokens=8, extract_from=documents)
    assert free != held  # the check can fail
    assert model.generate(questions, contexts, max_new_tokens=8, extract_from=documents, extract_penalty=1e-6) == free
    assert model.generate(questions, contexts, max_new_tokens=8, extract_from=documents, extract_penalty=1e4) == held
    with pytest.raises(ValueError, match="extract_from"):
        model.generate(questions, contexts, extract_penalty=2.0)
    with pytest.raises(ValueError, match="> 0"):
        model.generate(questions, contexts, extract_from=documents, extract_penalty=0.0)
    with pytest.raises(ValueError, match="per_document"):
        model.generate(questions, contexts, extract_from=documents, extract_penalty=2.0, per_document=True)


def test_extractive_answers_are_spans_of_their_own_documents(tokenizer):
    model = lively(tiny_gmsa(tokenizer, window=64))  # unconstrained, the tiny decoder writes varied garbage
    documents = [[SAMPLE_TEXT, DOCS[1]], [DOCS[0]]]
    contexts = [model.compress(docs, 4) for docs in documents]
    questions = ["Who designed it?", "What is it?"]
    free = model.generate(questions, contexts, max_new_tokens=8)
    held = model.generate(questions, contexts, max_new_tokens=8, extract_from=documents)
    assert not all(any(f in d for d in docs) for f, docs in zip(free, documents))  # the check can fail
    for answer, docs in zip(held, documents):
        assert answer and any(answer in d for d in docs), answer
    assert model.generate(questions[1], contexts[1], max_new_tokens=8, extract_from=documents[1]) == held[1]
    from gmsa_rag.engine import engine_for

    model.generation_engine = "static"  # the static-cache engine takes the span processor too: the same answers
    assert model.generate(questions, contexts, max_new_tokens=8, extract_from=documents) == held
    assert engine_for(model).last_path == "static"
    model.generation_engine = "auto"
    beamed = model.generate(questions, contexts, max_new_tokens=8, extract_from=documents, num_beams=3)
    assert all(answer and any(answer in d for d in docs) for answer, docs in zip(beamed, documents)), beamed
    with pytest.raises(ValueError, match="document lists"):
        model.generate(questions, contexts, extract_from=documents[:1])
    with pytest.raises(TypeError):
        model.generate(questions, contexts, extract_from=["one text", "another"])
