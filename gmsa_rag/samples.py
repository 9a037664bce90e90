"""Training samples and how they become decoder prompts (the same per-document scheme as inference).

* Stage-1 sample (``question=None``): one or more documents, each compressed on its own and shown as a
  labelled span; the target is document ``target_doc`` itself (``task="restore"``, autoencoding), the
  text that follows it (``task="continue"``), or the words that follow a few quoted words (``cue``) inside it
  (``task="span"``: find a place by content, copy from the middle of a document, as extractive answers need).
* QA sample: question + retrieved documents (each compressed on its own, or plain text for the
  uncompressed baseline) -> the answer (target).

Documents and targets are text or token ids (the tokenized training corpus hands over ids).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Sequence, Union

import torch

from .lexical import lead_place
from .prompt import Context, Segment, ae_segments

if TYPE_CHECKING:
    from .model import GMSAModel


Text = Union[str, list[int]]


@dataclass
class Sample:
    """One training example. ``rate=None`` keeps documents as text (uncompressed baseline)."""

    documents: list[Text]
    target: Text | None  # None: no target segment (prompt for generation)
    question: str | None = None  # None: a stage-1 sample (restore, continue or quote documents[target_doc])
    rate: int | None = None
    task: Literal["restore", "continue", "span"] = "restore"
    target_doc: int = 0
    cue: Text | None = None  # task="span": the quoted words (text or token ids) the target follows
    document_rates: list[int] | None = None  # per-document rates instead of ``rate`` (a lead document finer)

    def rate_of(self, document: int) -> int | None:
        """The compression rate of ``documents[document]`` (None: every document kept as text)."""
        return self.document_rates[document] if self.document_rates and self.rate is not None else self.rate


def sample_rate(rates: Sequence[int], rng: random.Random, weights: Sequence[float] | None = None) -> int:
    """The compression rate of one sample, drawn from the configured set (uniform unless ``weights``)."""
    return rng.choices(list(rates), weights=list(weights) if weights else None)[0]


def lead_rates(count: int, rate: int, lead_rate: int, order: str) -> list[int]:
    """Per-document rates of a ranked prompt of ``count`` documents as ``GMSACompressor(lead_rate=)`` reads it: the
    best match (first with ``bm25_first``, last with ``bm25_last``) at ``lead_rate``, the others at ``rate``."""
    if order not in ("bm25_first", "bm25_last"):
        raise ValueError(f"a lead document needs a ranked document order (bm25_first or bm25_last), got {order!r}")
    lead = lead_place(count, order)
    return [lead_rate if d == lead else rate for d in range(count)]


def token_ids(model: "GMSAModel", documents: Sequence[Text]) -> list[list[int]]:
    """Token ids of each document (text is tokenized; id lists pass through)."""
    texts = [d for d in documents if isinstance(d, str)]
    encoded = iter(model.tokenize(texts) if texts else [])
    return [next(encoded) if isinstance(d, str) else list(d) for d in documents]


def build_prompts(model: "GMSAModel", samples: Sequence[Sample]) -> list[list[Segment]]:
    """Compress every document of the batch in one encoder pass (per document, per window), build prompts."""
    windows, rates, owners = [], [], []
    for s, sample in enumerate(samples):
        if sample.rate is None:
            continue
        for d, ids in enumerate(token_ids(model, sample.documents)):
            for window in model.windows(ids):
                windows.append(window)
                rates.append(sample.rate_of(d))
                owners.append((s, d))
    soft = model.soft_tokens(windows, rates) if windows else []
    documents: list[list[list]] = [[[] for _ in sample.documents] for sample in samples]
    for (s, d), tokens in zip(owners, soft):
        documents[s][d].append(tokens)

    prompts = []
    for sample, docs in zip(samples, documents):
        if sample.rate is None:
            contexts: list[Context] = [d if isinstance(d, str) else model.tokenizer.decode(d) for d in sample.documents]
        else:
            contexts = [_cat(parts) for parts in docs]
        if sample.question is None:
            cue = None
            if sample.task == "span":
                cue = (sample.cue if isinstance(sample.cue, str) else model.tokenizer.decode(sample.cue)).strip()
            prompts.append(ae_segments(model.tokenizer, contexts, sample.target_doc, sample.target,
                                       continuation=sample.task == "continue", cue=cue))
        else:
            prompts.append(model.qa_prompt(sample.question, contexts, sample.target))
    return prompts


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts) if len(parts) > 1 else parts[0]
