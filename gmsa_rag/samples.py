"""Training samples and how they become decoder prompts (the same per-document scheme as inference).

* AE sample: one text chunk; its soft tokens + restore instruction -> the chunk itself (target).
* QA sample: question + retrieved documents (each compressed on its own, or plain text for the
  uncompressed baseline) -> the answer (target).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch

from .prompt import Context, Segment, ae_segments, qa_segments

if TYPE_CHECKING:
    from .model import GMSAModel


@dataclass
class Sample:
    """One training example. ``rate=None`` keeps documents as text (uncompressed baseline)."""

    documents: list[str]
    target: str | None  # None: no target segment (prompt for generation)
    question: str | None = None  # None: autoencoding of documents[0]
    rate: int | None = None


def sample_rate(rates: Sequence[int], rng: random.Random) -> int:
    """The compression rate of one sample, uniform over the configured set."""
    return rng.choice(list(rates))


def build_prompts(model: "GMSAModel", samples: Sequence[Sample]) -> list[list[Segment]]:
    """Compress every document of the batch in one encoder pass (per document, per window), build prompts."""
    windows, rates, owners = [], [], []
    for s, sample in enumerate(samples):
        if sample.rate is None:
            continue
        for d, ids in enumerate(model.tokenize(sample.documents)):
            for window in model.windows(ids):
                windows.append(window)
                rates.append(sample.rate)
                owners.append((s, d))
    soft = model.soft_tokens(windows, rates) if windows else []
    documents: list[list[list]] = [[[] for _ in sample.documents] for sample in samples]
    for (s, d), tokens in zip(owners, soft):
        documents[s][d].append(tokens)

    prompts = []
    for sample, docs in zip(samples, documents):
        contexts: list[Context] = list(sample.documents) if sample.rate is None else [_cat(parts) for parts in docs]
        if sample.question is None:
            prompts.append(ae_segments(model.tokenizer, contexts[0], sample.target))
        else:
            prompts.append(qa_segments(model.tokenizer, sample.question, contexts, sample.target))
    return prompts


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]
