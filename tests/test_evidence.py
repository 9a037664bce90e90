"""Quoted evidence (``--quote_evidence``): targets that quote the words leading to the answer with the answer in
bold, prompts that ask for it, generation that returns the bold answer alone."""
from __future__ import annotations

import random

import pytest

from gmsa_rag.data.qa import QAExample
from gmsa_rag.evidence import QUOTE_TOKENS, find_answer, quoted, split_quote
from gmsa_rag.prompt import QA_INSTRUCTION, QUOTE_INSTRUCTION
from gmsa_rag.testing import lively, tiny_gmsa
from gmsa_rag.train import qa_sample

PASSAGE = ("Title: The Art of War\nThe Art of War is an ancient Chinese military treatise dating from the Late "
           "Spring and Autumn Period. The work, which is attributed to the ancient Chinese military strategist "
           "Sun Tzu, is composed of 13 chapters.")


def test_the_quote_ends_at_the_answer_in_its_own_sentence():
    whole = "The work, which is attributed to the ancient Chinese military strategist **Sun Tzu**"
    assert quoted(["Sun Tzu"], PASSAGE) == whole  # the sentence's words before the answer, 11 of them
    assert quoted(["Sun Tzu"], PASSAGE, words=7) == "attributed to the ancient Chinese military strategist **Sun Tzu**"
    assert quoted(["sun tzu"], PASSAGE, words=2) == "military strategist **Sun Tzu**"  # the passage's own casing
    assert quoted(["Sun Tzu"], PASSAGE, words=0) == "**Sun Tzu**"
    assert quoted(["13"], PASSAGE, words=3) == "is composed of **13**"
    assert quoted(["Zhuge Liang"], PASSAGE) is None


def test_answers_are_whole_words_tried_in_order_body_before_title():
    assert find_answer(["War"], PASSAGE)[0].startswith("The Art of War is")  # the body, not the title line
    assert find_answer(["Art"], "Title: Art\nThe article is long.")[0] == "Title: Art"  # "article" is no match
    assert quoted(["Art"], "Title: Art\nThe article is long.") == "**Art**"  # (the title's label is not quoted)
    assert find_answer(["Confucius", "Sun Tzu"], PASSAGE)[2] == "Sun Tzu"


def test_the_answer_is_the_first_bold_span():
    assert split_quote("attributed to **Sun Tzu**") == ("attributed to", "Sun Tzu")
    assert split_quote("attributed to **Sun Tzu") == ("attributed to", "Sun Tzu")  # cut before it closed
    assert split_quote("Sun Tzu") == ("", "Sun Tzu")  # no bold: all answer
    assert split_quote("**a** and **b**") == ("", "a")


def test_quoted_targets_come_from_the_gold_passage():
    example = QAExample("who wrote it", ["Sun Tzu"], ["Paris is the capital of France.", PASSAGE], gold_index=1)
    sample = qa_sample(example, 4, 2, random.Random(0), min_docs=2, quote_words=3)
    assert sample.target == "Chinese military strategist **Sun Tzu**"
    assert qa_sample(example, 4, 2, random.Random(0)).target == "Sun Tzu"  # off: unchanged
    missing = QAExample("who", ["Confucius"], [PASSAGE], gold_index=0)  # the gold passage lacks it: plain answer
    assert qa_sample(missing, 4, 1, random.Random(0), quote_words=3).target == "Confucius"


@pytest.fixture()
def quoting(tokenizer):
    return lively(tiny_gmsa(tokenizer, window=64, answer_quotes=True))


def test_a_quoting_model_asks_for_the_quote_and_returns_the_bold_answer(quoting, monkeypatch):
    soft = quoting.soft_tokens([quoting.tokenize([PASSAGE])[0][:64]], [4])
    prompt = quoting.qa_prompt("who wrote it", soft)
    text = quoting.tokenizer.decode([i for seg in prompt if seg.token_ids for i in seg.token_ids])
    assert QUOTE_INSTRUCTION in text and QA_INSTRUCTION not in text
    budgets = []

    def generate_from_segments(prompts, max_new_tokens=32, **kwargs):
        budgets.append(max_new_tokens)
        return ["attributed to **Sun Tzu** and more"] * len(prompts)

    monkeypatch.setattr(quoting, "generate_from_segments", generate_from_segments)
    assert quoting.generate("who wrote it", soft, max_new_tokens=8) == "Sun Tzu"
    assert budgets == [8 + QUOTE_TOKENS]  # the quote has its own budget on top of the answer's
    with pytest.raises(ValueError, match="quotes its evidence"):
        quoting.generate("who wrote it", soft, extract_from=[PASSAGE])


def test_a_quoting_model_generates_through_the_engine(quoting):
    soft = quoting.soft_tokens([quoting.tokenize([PASSAGE])[0][:64]], [4])
    answer = quoting.generate("who wrote it", soft, max_new_tokens=4)
    assert isinstance(answer, str) and "**" not in answer
