"""Cited answers: stage 2 can train the decoder to open each answer with the number of the document that holds it.

With soft tokens the reader answers from the gold passage alone far better than from it among hard distractors
(round 14 in ``benchmarks/results/README.md``: 52.0% against 26.0% at 4x, extractive): what fails is choosing the
document. ``--cite_document`` makes that choice an explicit, supervised first step: the target becomes
``"[3] Sun Tzu"`` (the gold passage's place among the documents shown), the prompt asks for it
(:data:`gmsa_rag.prompt.CITE_INSTRUCTION`), and generation reads the number and returns the answer without it; with
extractive decoding the answer is then held to the cited document alone.
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Sequence

from .prompt import Segment

if TYPE_CHECKING:
    from .model import GMSAModel

_CITATION = re.compile(r"^\s*\[(\d+)\]\s*")


def citation_prefix(place: int) -> str:
    """What a cited answer starts with, before the answer's words (``place`` counts from 0; the space belongs to
    the answer's first token, as the tokenizer splits :func:`cited` targets)."""
    return f"[{place + 1}]"


def cited(answer: str, place: int) -> str:
    """The training target: the answer opened by its document's number (``place`` counts from 0)."""
    return f"{citation_prefix(place)} {answer}"


def split_citation(text: str, documents: int | None = None) -> tuple[int | None, str]:
    """(cited document's place from 0, or None; the answer without the citation). A number outside 1..``documents``
    is no citation: it is stripped and None returned."""
    match = _CITATION.match(text)
    if not match:
        return None, text.strip()
    place = int(match.group(1)) - 1
    answer = text[match.end():].strip()
    if place < 0 or (documents is not None and place >= documents):
        return None, answer
    return place, answer


CITATION_TOKENS = 6
"""New tokens enough for a citation ("[12]" and the space after it) when it is generated on its own."""


def generate_cited(model: "GMSAModel", prompts: Sequence[Sequence[Segment]], counts: Sequence[int],
                   documents: Sequence[Sequence[str]] | None, max_new_tokens: int, **generate_kwargs: Any) -> list[str]:
    """Answers of a citing model (``GMSAConfig.answer_cites``) without their citations. ``counts``: documents per
    prompt. With ``documents`` (each prompt's documents as text) the citation is generated first, freely and
    greedily; the answer then follows it, held to spans of the cited document (of all of them when the model
    cited none) by :mod:`gmsa_rag.extractive`."""
    if documents is None:
        raw = model.generate_from_segments(prompts, max_new_tokens=max_new_tokens, **generate_kwargs)
        return [split_citation(text, n)[1] for text, n in zip(raw, counts)]
    from .extractive import extractive_processor

    first = {k: v for k, v in generate_kwargs.items() if k not in ("num_beams", "logits_processor", "streamer")}
    heads = model.generate_from_segments(prompts, max_new_tokens=CITATION_TOKENS, **first)
    places = [split_citation(head, n)[0] for head, n in zip(heads, counts)]
    continued, held = [], []
    for prompt, docs, place in zip(prompts, documents, places):
        if place is None:
            continued.append(list(prompt))
            held.append(list(docs))
        else:
            prefix = model.tokenizer.encode(citation_prefix(place), add_special_tokens=False)
            continued.append([*prompt, Segment(token_ids=prefix)])
            held.append([docs[place]])
    generate_kwargs["logits_processor"] = extractive_processor(model, held, generate_kwargs)
    return model.generate_from_segments(continued, max_new_tokens=max_new_tokens, **generate_kwargs)
