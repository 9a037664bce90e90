"""Selective expansion (``gmsa_rag.expansion``, ``qa.py --expand-to``): a compressed document whose best-matching
run of soft tokens is read as the tokens it stands for, within a lower rate's decoder positions."""
from __future__ import annotations

import math

import pytest
import torch

from gmsa_rag.expansion import choose_expansion, expand_documents, expandable_groups
from gmsa_rag.prompt import group_spans, prompt_length
from gmsa_rag.testing import tiny_gmsa

PASSAGE = ("The Art of War is an ancient Chinese military treatise dating from the Late Spring and Autumn Period. "
           "The work, which is attributed to the ancient Chinese military strategist Sun Tzu, is composed of 13 "
           "chapters. Each one is devoted to a different set of skills or art related to warfare and how it applies "
           "to military strategy and tactics.")


def test_groups_fit_the_budget_of_the_lower_rate():
    assert expandable_groups(128, 16, rate=8, budget_rate=4) == 2  # 32 positions: 16 soft + 2 x 7 more
    assert expandable_groups(256, 32, rate=8, budget_rate=4) == 4
    assert expandable_groups(20, 3, rate=8, budget_rate=4) == 0  # 5 positions: no group fits back
    assert expandable_groups(64, 4, rate=16, budget_rate=1) == 4  # budget of the text itself: every group
    with pytest.raises(ValueError):
        expandable_groups(64, 8, rate=1, budget_rate=1)


def test_the_run_with_the_question_words_is_read_as_its_own_tokens(tokenizer):
    model = tiny_gmsa(tokenizer, window=32, rates=[2, 4, 8])
    ids = model.tokenize([PASSAGE])[0]
    soft = model.compress([PASSAGE], 8)[0]
    choice = choose_expansion("Which strategist wrote it, Sun Tzu?", ids, tokenizer, 32, 8, 4)
    assert choice is not None and choice.count == expandable_groups(len(ids), len(soft), 8, 4) > 0
    spans = group_spans(len(ids), 32, 8)
    assert (choice.start, choice.end) == (spans[choice.first][0], spans[choice.first + choice.count - 1][1])
    assert "Sun Tzu" in tokenizer.decode(ids[choice.start:choice.end])

    [context] = expand_documents(model, "Which strategist wrote it, Sun Tzu?", [PASSAGE], [soft], 8, 4)
    before, text, after = context  # soft tokens before the run, its tokens, the soft tokens after it
    assert torch.equal(before, soft[: choice.first]) and torch.equal(after, soft[choice.first + choice.count:])
    assert text == ids[choice.start:choice.end]
    assert len(before) + len(text) + len(after) <= math.ceil(len(ids) / 4)  # within 4x's positions
    prompt = model.qa_prompt("Which strategist wrote it?", [context])
    plain = model.qa_prompt("Which strategist wrote it?", [soft])
    assert prompt_length(prompt) - prompt_length(plain) == len(text) - choice.count
    assert model.adapter_wanted([prompt])  # soft tokens in it: the decoder's adapter serves it


def test_no_shared_word_or_no_room_keeps_the_soft_tokens(tokenizer):
    model = tiny_gmsa(tokenizer, window=32, rates=[2, 4, 8])
    soft = model.compress([PASSAGE], 8)[0]
    [context] = expand_documents(model, "zebra quokka?", [PASSAGE], [soft], 8, 4)
    assert context is soft
    [short] = expand_documents(model, "Sun Tzu?", ["Sun Tzu wrote it."], model.compress(["Sun Tzu wrote it."], 8), 8, 4)
    assert isinstance(short, torch.Tensor)
    with pytest.raises(ValueError, match="must be below"):
        expand_documents(model, "Sun Tzu?", [PASSAGE], [soft], 8, 8)
    with pytest.raises(ValueError, match="do not stand for"):
        expand_documents(model, "Sun Tzu?", [PASSAGE], [model.compress([PASSAGE], 4)[0]], 8, 4)


def test_the_run_can_be_read_as_finer_soft_tokens_of_the_same_document(tokenizer):
    model = tiny_gmsa(tokenizer, window=32, rates=[2, 4, 8])
    ids = model.tokenize([PASSAGE])[0]
    coarse, fine = model.compress([PASSAGE], 8)[0], model.compress([PASSAGE], 2)[0]
    assert expandable_groups(120, 15, rate=8, budget_rate=4, fine_rate=2) == 5  # 30 positions: 15 + 5 x 3 more
    choice = choose_expansion("Sun Tzu?", ids, tokenizer, 32, 8, 4, fine_rate=2)
    [context] = expand_documents(model, "Sun Tzu?", [PASSAGE], [coarse], 8, 4, [fine], 2)
    before, middle, after = context
    fine_spans = group_spans(len(ids), 32, 2)
    inside = [i for i, (a, b) in enumerate(fine_spans) if choice.start <= a and b <= choice.end]
    assert torch.equal(middle, fine[inside]) and inside == list(range(inside[0], inside[-1] + 1))
    assert sum(b - a for a, b in (fine_spans[i] for i in inside)) == choice.end - choice.start  # the run, exactly
    assert torch.equal(before, coarse[: choice.first]) and torch.equal(after, coarse[choice.first + choice.count:])
    assert len(before) + len(middle) + len(after) <= math.ceil(len(ids) / 4)
    with pytest.raises(ValueError, match="fine_softs"):
        expand_documents(model, "Sun Tzu?", [PASSAGE], [coarse], 8, 4, fine_rate=2)
    with pytest.raises(ValueError):
        expandable_groups(120, 15, rate=8, budget_rate=4, fine_rate=3)
