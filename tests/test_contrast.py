"""Context-aware decoding (``GMSAModel.generate(contrast=alpha)``, ``qa.py --contrast``): each token chosen by how
much the documents raise it over the question alone, both read by the same decoder."""
from __future__ import annotations

import math

import pytest
import torch

from gmsa_rag.contrast import ContextContrast
from gmsa_rag.testing import SAMPLE_TEXT, lively, tiny_gmsa

QUESTION = "Who designed the tower?"


def test_pairs_of_rows_get_the_same_contrasted_scores():
    documented = torch.tensor([[2.0, 1.0, 0.0, -9.0]])
    bare = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
    scores = torch.cat([documented, bare])
    out = ContextContrast(alpha=1.0, plausibility=0.0)(torch.zeros(2, 0, dtype=torch.long), scores)
    lp_with, lp_bare = documented.log_softmax(-1), bare.log_softmax(-1)
    expected = 2 * lp_with - lp_bare
    assert torch.allclose(out[0], expected[0]) and torch.equal(out[0], out[1])
    assert out[0].argmax() == 1  # the token the documents raise, not the one the question alone prefers
    held = ContextContrast(alpha=1.0, plausibility=0.1)(torch.zeros(2, 0, dtype=torch.long), scores)
    assert torch.isinf(held[0, 3]) and held[0, 3] < 0  # far below the documented row's best: never chosen
    assert torch.isfinite(held[0, :3]).all()
    with pytest.raises(ValueError, match="pairs"):
        ContextContrast(1.0)(torch.zeros(3, 0, dtype=torch.long), torch.zeros(3, 4))
    for bad in ({"alpha": 0.0}, {"alpha": 1.0, "plausibility": 1.0}):
        with pytest.raises(ValueError):
            ContextContrast(**bad)


def _first_token_by_hand(model, soft, alpha: float, plausibility: float = 0.1) -> int:
    rows = []
    with torch.no_grad(), model.decoder_adapter(True):  # the bare question is read by the soft-token reader too
        for prompt in (model.qa_prompt(QUESTION, [soft]), model.qa_prompt(QUESTION, [])):
            batch = model.build_batch([prompt])
            logits = model.decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).logits
            rows.append(logits[0, -1].float().log_softmax(-1))
    mixed = (1 + alpha) * rows[0] - alpha * rows[1]
    mixed[rows[0] < rows[0].max() + math.log(plausibility)] = float("-inf")
    return int(mixed.argmax())


@pytest.mark.parametrize("engine", ["hf", "static"])
def test_the_first_answer_token_is_the_contrasted_argmax(tokenizer, engine):
    model = lively(tiny_gmsa(tokenizer))
    model.generation_engine = engine
    soft = model.compress([SAMPLE_TEXT], 4)[0]
    token = _first_token_by_hand(model, soft, alpha=1.0)
    answer = model.generate(QUESTION, [soft], max_new_tokens=1, contrast=1.0)
    assert answer == tokenizer.decode([token], skip_special_tokens=True).strip()
    assert model.generate([QUESTION, QUESTION], [[soft], [soft]], max_new_tokens=4, contrast=1.0) == \
        [model.generate(QUESTION, [soft], max_new_tokens=4, contrast=1.0)] * 2  # rows pair up per question


def test_contrast_holds_extractive_answers_to_the_documents(tokenizer):
    model = lively(tiny_gmsa(tokenizer))
    soft = model.compress([SAMPLE_TEXT], 4)[0]
    answer = model.generate(QUESTION, [soft], max_new_tokens=4, contrast=0.5, extract_from=[SAMPLE_TEXT])
    assert answer and answer in SAMPLE_TEXT


def test_contrast_refuses_what_it_cannot_pair(tokenizer):
    model = lively(tiny_gmsa(tokenizer))
    soft = model.compress([SAMPLE_TEXT], 4)[0]
    with pytest.raises(ValueError, match="greedy"):
        model.generate(QUESTION, [soft], max_new_tokens=2, contrast=1.0, num_beams=2)
    with pytest.raises(ValueError, match="per document"):
        model.generate(QUESTION, [soft], max_new_tokens=2, contrast=1.0, per_document=True)
    with pytest.raises(ValueError, match="soft-token documents only or text only"):
        model.generate([QUESTION, QUESTION], [[soft], [SAMPLE_TEXT]], max_new_tokens=2, contrast=1.0)
