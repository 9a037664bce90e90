"""Context-aware decoding: each answer token chosen by how much the documents raise it over the question alone.

Shi et al. (2024), "Trusting Your Evidence: Hallucinate Less with Context-aware Decoding": decode from
``(1 + alpha) * logits(question + documents) - alpha * logits(question alone)``, so that what the reader would say
without the documents counts against a token and what they add counts for it. Here the two prompts are rows of one
batch (each question's documented row, then its bare row), both read by the same decoder (the adapter of the
documented prompt, on for soft tokens), and the contrast is a logits processor: the two rows get the same scores and
so the same greedy token, and any processor after it (extractive spans) sees consecutive pairs as one question's
beams. The bare prompt is the same instruction and question with no documents: a short extra prefill and one more
row in each decode step.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import LogitsProcessor

from .prompt import Segment

if TYPE_CHECKING:
    from .model import GMSAModel


class ContextContrast(LogitsProcessor):
    """Rows in pairs (documented, bare): both get ``(1 + alpha) * documented - alpha * bare`` (log-probabilities),
    over the tokens the documented row finds plausible (probability at least ``plausibility`` times its most
    likely token's: contrastive decoding's constraint, Li et al. 2023, without which the contrast favours tokens
    that neither row would write)."""

    def __init__(self, alpha: float, plausibility: float = 0.1) -> None:
        if not alpha > 0:
            raise ValueError(f"the contrast's alpha must be positive, got {alpha}")
        if not 0 <= plausibility < 1:
            raise ValueError(f"plausibility must be in [0, 1), got {plausibility}")
        self.alpha = float(alpha)
        self.plausibility = float(plausibility)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows, vocab = scores.shape
        if rows % 2:
            raise ValueError(f"context-aware decoding pairs its rows; got {rows}")
        pairs = scores.float().log_softmax(-1).view(rows // 2, 2, vocab)
        mixed = (1 + self.alpha) * pairs[:, 0] - self.alpha * pairs[:, 1]
        if self.plausibility:
            floor = pairs[:, 0].max(-1, keepdim=True).values + math.log(self.plausibility)
            mixed = mixed.masked_fill(pairs[:, 0] < floor, float("-inf"))
        return mixed.repeat_interleave(2, dim=0).to(scores.dtype)


def generate_contrasted(model: "GMSAModel", questions: Sequence[str], prompts: Sequence[Sequence[Segment]],
                        alpha: float, max_new_tokens: int, processors: Sequence[Any] = (),
                        **generate_kwargs: Any) -> list[str]:
    """Greedy answers to ``prompts`` (one per question) under context-aware decoding with ``alpha``; ``processors``
    (built for one row per question, such as extractive spans) run after the contrast on each pair."""
    from transformers import LogitsProcessorList

    if len(questions) != len(prompts):
        raise ValueError(f"{len(questions)} questions but {len(prompts)} prompts")
    if generate_kwargs.get("num_beams", 1) not in (None, 1) or generate_kwargs.get("do_sample"):
        raise ValueError("context-aware decoding is greedy: no beams or sampling")
    adapter = model.adapter_wanted(prompts)
    if any(model.adapter_wanted([p]) != adapter for p in prompts):
        raise ValueError("context-aware decoding: give one batch soft-token documents only or text only")
    paired: list[Sequence[Segment]] = []
    for question, prompt in zip(questions, prompts):
        bare = model.qa_prompt(question, [], question_first=model.config.question_first and adapter)
        paired += [prompt, bare]
    generate_kwargs["logits_processor"] = LogitsProcessorList([ContextContrast(alpha), *processors])
    texts = model.generate_from_segments(paired, max_new_tokens=max_new_tokens, adapter=adapter, **generate_kwargs)
    return texts[0::2]
