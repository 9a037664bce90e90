"""Tests for gmsa_rag.metrics, with hand-computed expected values."""

from __future__ import annotations

import math

import pytest

from gmsa_rag.metrics import (
    answer_in_output,
    bleu,
    exact_match,
    f1_score,
    normalize_answer,
    prefix_exact_match,
    qa_metrics,
    reconstruction_metrics,
    rouge_l,
    rouge_scores,
    sentence_bleu,
)


def test_normalize_answer() -> None:
    assert normalize_answer("The  Cat's hat!") == "cats hat"
    assert normalize_answer("An apple, a day") == "apple day"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match() -> None:
    assert exact_match("the Eiffel Tower.", ["Eiffel tower"]) == 1.0
    assert exact_match("Eiffel", ["Eiffel tower", "Paris"]) == 0.0
    assert exact_match("paris", ["Eiffel tower", "Paris"]) == 1.0
    assert exact_match("Paris", "paris") == 1.0  # a single answer string is accepted
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_f1_score() -> None:
    # precision 2/3, recall 2/2 -> F1 = 2 * (2/3) / (2/3 + 1) = 0.8
    assert f1_score("new york city", ["new york"]) == pytest.approx(0.8)
    # max over answers
    assert f1_score("new york city", ["boston", "new york"]) == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred "a b b", gold "b b c" (articles removed
    # -> "b b", "b b c"): overlap 2, p = 1, r = 2/3 -> F1 = 0.8
    assert f1_score("a b b", ["b b c"]) == pytest.approx(0.8)
    assert f1_score("nothing", ["something else"]) == 0.0
    # both normalise to empty -> match; one empty -> 0
    assert f1_score("the", ["a"]) == 1.0
    assert f1_score("", ["paris"]) == 0.0


def test_answer_in_output() -> None:
    assert answer_in_output("It was released in September 1987.", ["1987"]) == 1.0
    assert answer_in_output("It was released in 1988.", ["1987", "Sept 1987"]) == 0.0
    assert answer_in_output("The U.S.A. won", ["usa"]) == 1.0
    # answers that normalise to "" never match
    assert answer_in_output("anything", ["The"]) == 0.0


def test_qa_metrics_means_in_percent() -> None:
    preds = ["Paris", "it is new york city", "no idea"]
    answers = [["paris"], ["New York"], ["Rome"]]
    m = qa_metrics(preds, answers)
    assert m["n"] == 3
    assert m["exact_match"] == pytest.approx(100 / 3)
    # F1: 1.0, pred "it is new york city" vs "new york": p = 2/5, r = 1 -> 4/7, 0.0
    assert m["f1"] == pytest.approx(100 * (1 + 4 / 7) / 3)
    assert m["accuracy"] == pytest.approx(200 / 3)
    assert qa_metrics([], [])["n"] == 0
    with pytest.raises(ValueError):
        qa_metrics(["a"], [])


def test_prefix_exact_match() -> None:
    ref = "the cat sat on the mat"
    assert prefix_exact_match(ref, ref) == 1.0
    assert prefix_exact_match("the cat sat on a mat", ref) == pytest.approx(4 / 6)
    assert prefix_exact_match("The cat sat on the mat", ref) == 0.0  # case-sensitive
    assert prefix_exact_match("the cat", ref) == pytest.approx(2 / 6)  # stops at end of prediction
    assert prefix_exact_match(ref + " and more", ref) == 1.0  # trailing extra tokens ignored
    assert prefix_exact_match("the  cat\nsat", "the cat sat") == 1.0  # whitespace-insensitive split
    assert prefix_exact_match("", "") == 1.0
    assert prefix_exact_match("x", "") == 0.0


def test_bleu_hand_computed() -> None:
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # all n-gram precisions 1, hypothesis 4 tokens vs reference 6: BP = exp(1 - 6/4)
    assert bleu(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5), abs=1e-6)
    assert bleu(["x y z w"], ["a b c d"]) == pytest.approx(0.0)
    assert bleu([], []) == 0.0
    assert sentence_bleu("a b c d", "a b c d e f") == pytest.approx(100 * math.exp(-0.5), abs=1e-6)
    with pytest.raises(TypeError):
        bleu("a b", "a b")  # type: ignore[arg-type]


def test_rouge_hand_computed() -> None:
    # LCS("a b c d", "a b x d") = 3 -> P = R = F = 3/4
    assert rouge_l(["a b c d"], ["a b x d"]) == pytest.approx(75.0)
    scores = rouge_scores(["a b c d"], ["a b x d"])
    assert scores["rouge1"] == pytest.approx(75.0)
    assert scores["rouge2"] == pytest.approx(100 / 3)  # bigrams: only "a b" shared of 3
    # mean over pairs: 75 and 100
    assert rouge_l(["a b c d", "q"], ["a b x d", "q"]) == pytest.approx(87.5)


def test_reconstruction_metrics() -> None:
    refs = ["the cat sat on the mat", "a b c d e f"]
    preds = ["the cat sat on the mat", "a b c d"]
    m = reconstruction_metrics(preds, refs)
    assert m["n"] == 2
    assert m["exact_match"] == pytest.approx(50.0)
    assert m["prefix_em"] == pytest.approx(100 * (1 + 4 / 6) / 2)
    # rougeL of pair 2: LCS 4, P = 1, R = 4/6 -> F = 0.8
    assert m["rouge_l"] == pytest.approx(100 * (1 + 0.8) / 2)
    assert m["sentence_bleu"] == pytest.approx((100 + 100 * math.exp(-0.5)) / 2, abs=1e-6)
    assert 0 < m["bleu"] <= 100
    assert set(reconstruction_metrics([], [])) == set(m)
