"""Per-document answers: each document answered alone, the answer the decoder scores best kept."""
from __future__ import annotations

import pytest

from gmsa_rag.per_document import answer_per_document, document_scores
from gmsa_rag.testing import SAMPLE_TEXT, lively, tiny_gmsa

DOCS = [SAMPLE_TEXT, "The tower was designed by Gustave Eiffel's company.", "Mount Everest is Earth's highest mountain."]


@pytest.fixture(scope="module")
def model(tokenizer):
    return lively(tiny_gmsa(tokenizer, window=64))  # varied greedy tokens: answers differ from document to document


@pytest.mark.parametrize("score", ["mean", "sum"])
def test_the_best_scored_of_the_documents_answers_is_kept(model, score):
    documents = [DOCS, DOCS[1:]]
    contexts = [model.compress(docs, 4) for docs in documents]
    questions = ["Who designed it?", "How high is it?"]
    kept = model.generate(questions, contexts, max_new_tokens=6, per_document=True, score=score)
    for question, ctx, answer in zip(questions, contexts, kept):
        alone = [model.generate(question, [c], max_new_tokens=6) for c in ctx]
        scores = document_scores(model, [question] * len(ctx), [[c] for c in ctx], alone, score)
        assert len(set(alone)) > 1  # the choice means something
        assert answer == max(zip(scores, alone))[1]
    assert model.generate(questions[1], contexts[1], max_new_tokens=6, per_document=True, score=score) == kept[1]


def test_summed_scores_are_the_mean_times_the_answer_tokens(model, tokenizer):
    contexts = [[model.compress([DOCS[2]], 4)[0]]] * 2
    answers = ["Everest", "Earth's highest mountain"]
    mean = document_scores(model, ["Which?"] * 2, contexts, answers, "mean")
    total = document_scores(model, ["Which?"] * 2, contexts, answers, "sum")
    end = len(tokenizer.encode(tokenizer.eos_token, add_special_tokens=False))
    for m, t, a in zip(mean, total, answers):
        assert t == pytest.approx(m * (len(tokenizer.encode(a, add_special_tokens=False)) + end), rel=1e-4)
        assert m < 0


def test_extractive_answers_per_document_quote_their_own_document(model):
    contexts = [model.compress(DOCS, 4)]
    answer = model.generate(["What?"], contexts, max_new_tokens=6, per_document=True, extract_from=[DOCS])[0]
    assert answer and any(answer in d for d in DOCS), answer


def test_bad_options_are_refused(model):
    contexts = [model.compress(DOCS[:2], 4)]
    with pytest.raises(ValueError, match="score"):
        answer_per_document(model, ["Q?"], contexts, score="max")
    with pytest.raises(ValueError, match="extract_from"):
        answer_per_document(model, ["Q?"], contexts, extract_from=[DOCS[:1]])
    assert answer_per_document(model, ["Q?"], [[]]) == [""]  # no documents: nothing to answer from
