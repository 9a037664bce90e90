"""Lexical match of a question to its documents (gmsa_rag.lexical) and extractive answers held to the best ones."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gmsa_rag.lexical import best_documents, best_matching, best_sentences, bm25_scores, ranked, split_sentences
from gmsa_rag.testing import lively, tiny_gmsa

DOCS = [
    "Clausewitz wrote On War, a treatise on military strategy and politics.",
    "The Art of War is an ancient Chinese military treatise attributed to Sun Tzu.",
    "Paris is the capital and most populous city of France.",
]


def test_bm25_ranks_the_document_sharing_the_questions_rare_words():
    scores = bm25_scores("who was the author of the art of war", DOCS)
    assert len(scores) == 3 and scores[1] > scores[0] > scores[2] == 0.0
    assert best_matching("who was the author of the art of war", DOCS, 1) == [1]
    assert best_matching("which city is the capital of france", DOCS, 2) == [0, 2]  # retrieval order, tie -> first
    assert ranked("which city is the capital of france", DOCS) == [2, 0, 1]  # best first
    assert best_documents("which city is the capital of france", DOCS, 1) == [DOCS[2]]
    assert best_documents("which city is the capital of france", DOCS, 0) == DOCS  # 0: all of them
    assert bm25_scores("who was the", DOCS) == [0.0, 0.0, 0.0]  # stop words only: no preference
    assert best_matching("who was the", DOCS, 2) == [0, 1]
    assert bm25_scores("anything", []) == []
    assert bm25_scores("who wrote it", ["It is in the, of the.", "   "]) == [0.0, 0.0]  # documents of stop words
    assert best_matching("who wrote it", ["It is in the.", "  "], 1) == [0]
    with pytest.raises(ValueError, match="at least 1"):
        best_matching("war", DOCS, 0)


def test_extract_top_holds_answers_to_the_best_matching_documents(tokenizer):
    model = lively(tiny_gmsa(tokenizer, window=64))
    questions = ["To whom is the Art of War attributed?", "What is the capital of France?"]
    contexts = [model.compress(DOCS, 4) for _ in questions]
    documents = [DOCS, DOCS]
    held = model.generate(questions, contexts, max_new_tokens=6, extract_from=documents, extract_top=1)
    assert held[0] and held[0] in DOCS[1], held  # the tiny decoder's spans, each from the one best-matching document
    assert held[1] and held[1] in DOCS[2], held
    both = model.generate(questions, contexts, max_new_tokens=6, extract_from=documents, extract_top=3)
    assert both == model.generate(questions, contexts, max_new_tokens=6, extract_from=documents)  # top >= count: all
    with pytest.raises(ValueError, match="extract_from"):
        model.generate(questions, contexts, extract_top=1)
    with pytest.raises(ValueError, match="per_document"):
        model.generate(questions, contexts, extract_from=documents, extract_top=1, per_document=True)


def test_sentences_split_at_ends_not_at_initials_or_numbers():
    text = ('Title: The Art of War\nThe Art of War is old. It dates from 5.5 centuries B.C. as the U.S. Army says. '
            'J. K. Rowling did not write it! Did Dr. Who? "No," he said.')
    assert split_sentences(text) == [
        "Title: The Art of War", "The Art of War is old.", "It dates from 5.5 centuries B.C. as the U.S. Army says.",
        "J. K. Rowling did not write it!", "Did Dr. Who?", '"No," he said.']
    assert split_sentences(" \n\n ") == []


def test_best_sentences_pools_the_documents_sentences_in_document_order():
    documents = ["Paris is in France. The Art of War was written by Sun Tzu.", "Clausewitz wrote On War. It is long."]
    question = "which general called sun tzu wrote the art of war"
    assert best_sentences(question, documents, 1) == ["The Art of War was written by Sun Tzu."]
    assert best_sentences(question, documents, 2) == ["The Art of War was written by Sun Tzu.", "Clausewitz wrote On War."]
    assert best_sentences(question, documents, 9) == split_sentences(documents[0]) + split_sentences(documents[1])
    with pytest.raises(ValueError, match="at least 1"):
        best_sentences(question, documents, 0)


def test_extract_sentences_holds_answers_to_the_best_matching_sentences(tokenizer):
    model = lively(tiny_gmsa(tokenizer, window=64))
    documents = ["Paris is the capital of France. The Art of War is attributed to Sun Tzu. Rome is old."]
    question = "To whom is the Art of War attributed?"
    contexts = [model.compress(documents, 4)]
    held = model.generate([question], contexts, max_new_tokens=6, extract_from=[documents], extract_sentences=1)
    assert held[0] and held[0] in "The Art of War is attributed to Sun Tzu.", held  # a span of that sentence only
    with pytest.raises(ValueError, match="extract_sentences: give the documents"):
        model.generate([question], contexts, extract_sentences=1)
    with pytest.raises(ValueError, match="0 \\(off\\) or more"):
        model.generate([question], contexts, extract_from=[documents], extract_sentences=-1)


def test_bm25s_loads_on_first_use_with_jax_told_not_to_take_the_gpu():
    code = ("import os, sys, gmsa_rag.lexical, gmsa_rag.train, gmsa_rag.evidence\n"
            "assert 'bm25s' not in sys.modules, 'bm25s imported early'\n"
            "gmsa_rag.lexical.bm25_scores('war', ['On War'])\n"
            "assert 'bm25s' in sys.modules\n"
            "print(os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'])\n")
    env = {k: v for k, v in os.environ.items() if k != "XLA_PYTHON_CLIENT_PREALLOCATE"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "false"
    own = {**env, "XLA_PYTHON_CLIENT_PREALLOCATE": "true"}
    mine = subprocess.run([sys.executable, "-c", code], env=own, capture_output=True, text=True, timeout=300)
    assert mine.stdout.strip() == "true"  # a user's own setting is kept
