"""Extractive decoding: answers that are spans of the retrieved documents.

A reader of soft tokens finds the right document but often garbles its words (``benchmarks/attention_probe.py``,
``benchmarks/answer_errors.py``). The documents' text is at hand wherever their soft tokens are (they were
made from it), so decoding can be held to spans of it: at each step only the tokens whose text continues some
occurrence of the answer so far in one of the documents (or that end the answer) may be chosen. The decoder still
reads the soft tokens and picks among what is allowed; nothing of the documents' text enters the prompt.

Matching is on characters, not token ids, so an answer may open a document's mid-sentence word without its leading
space and be spelled by other tokens than the document's own tokenization ("Gustave" opening a reply is ``G`` +
``ustave``; inside a document it is `` Gustave``). An answer starts at the start of a word.

Limitation: a token whose text is part of one character (a byte-level piece of a CJK character, say) decodes to
U+FFFD and is never offered, so characters a byte-level tokenizer spells in several tokens cannot be quoted: extractive
answers suit scripts whose characters are whole tokens (Latin, accented Latin included), not Chinese or Japanese text.
"""
from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING, Any, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase

if TYPE_CHECKING:
    from .model import GMSAModel

LONGEST_PIECE = 32  # characters of a token's text looked up at each place (longer tokens are not offered)


@lru_cache(maxsize=4)
def token_texts(tokenizer: PreTrainedTokenizerBase) -> dict[str, tuple[int, ...]]:
    """Every token's text (as decoding it alone gives it) -> the ids that spell it; special and empty ones left out."""
    special = set(tokenizer.all_special_ids)
    found: dict[str, list[int]] = {}
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text and "\ufffd" not in text and len(text) <= LONGEST_PIECE:  # (a partial UTF-8 byte decodes to U+FFFD)
            found.setdefault(text, []).append(token_id)
    return {text: tuple(ids) for text, ids in found.items()}


def word_starts(text: str) -> list[int]:
    """Places in ``text`` where a word (or a number, a sign) begins."""
    return [i for i, c in enumerate(text) if not c.isspace() and (i == 0 or text[i - 1].isspace()
                                                                   or not (c.isalnum() and text[i - 1].isalnum()))]


class DocumentSpans:
    """One question's documents: which tokens may follow an answer's text so far."""

    def __init__(self, documents: Sequence[str], tokenizer: PreTrainedTokenizerBase) -> None:
        self.documents = [d for d in documents if d.strip()]
        if not self.documents:
            raise ValueError("extractive decoding needs at least one non-empty document")
        self.tokenizer = tokenizer
        self.pieces = token_texts(tokenizer)
        self.starts = [word_starts(d) for d in self.documents]
        self.start_sets = [set(s) for s in self.starts]

    def places(self, answer: str) -> list[tuple[int, int]]:
        """(document, end) of each occurrence of ``answer`` that starts a word (every word start if it is empty)."""
        found = []
        for d, (doc, starts) in enumerate(zip(self.documents, self.starts)):
            if not answer:
                found += [(d, s) for s in starts]
                continue
            at = doc.find(answer)
            while at >= 0:
                if at in self.start_sets[d]:
                    found.append((d, at + len(answer)))
                at = doc.find(answer, at + 1)
        return found

    def allowed(self, answer_ids: Sequence[int]) -> set[int]:
        """Ids of the tokens that may come next after the answer's tokens so far (stop tokens not included)."""
        return self.following(answer_ids) or set()

    def following(self, answer_ids: Sequence[int]) -> set[int] | None:
        """As :meth:`allowed`, but ``None`` where the answer so far is no span of any document (it left them)."""
        answer = self.tokenizer.decode(list(answer_ids)).lstrip() if answer_ids else ""
        places = self.places(answer)
        if not places:
            return None
        following: set[int] = set()
        seen: set[str] = set()
        for d, end in places:
            rest = self.documents[d][end : end + LONGEST_PIECE]
            if rest in seen:
                continue
            seen.add(rest)
            for k in range(1, len(rest) + 1):
                following.update(self.pieces.get(rest[:k], ()))
                if not answer:  # the reply's first token may carry the space the document has before the word
                    following.update(self.pieces.get(" " + rest[:k], ()))
        return following


class ExtractiveProcessor(LogitsProcessor):
    """Hugging Face logits processor holding each row of a batch to spans of its own documents; ``stop_ids`` may
    end an answer once it has a token (and always where no document continues it).

    ``penalty``: how many nats the tokens that continue no span lose. ``inf`` (the default) forbids them: every
    answer is a span. A finite penalty only leans the decoder towards the documents' words: it may still write
    words of its own where it is confident enough, and once its answer so far is no span of any document, that row
    decodes freely."""

    def __init__(self, spans: Sequence[DocumentSpans], stop_ids: Sequence[int], penalty: float = float("inf")) -> None:
        if not penalty > 0:
            raise ValueError(f"extractive penalty must be > 0 nats (inf: answers are spans), got {penalty}")
        self.spans = list(spans)
        self.stop = set(int(t) for t in stop_ids)
        self.penalty = float(penalty)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        rows = input_ids.shape[0]
        if rows % len(self.spans):
            raise ValueError(f"extractive decoding: {rows} rows against {len(self.spans)} document sets")
        beams = rows // len(self.spans)  # beam search: each question's beams are consecutive rows
        mask = torch.full_like(scores, -self.penalty)
        strict = self.penalty == float("inf")
        for row, ids in enumerate(input_ids.tolist()):
            spans = self.spans[row // beams]
            if any(t in self.stop for t in ids):  # finished: the engine pads it
                mask[row] = 0
                continue
            allowed = spans.following(ids)
            if allowed is None and not strict:  # left every span: free from here on
                mask[row] = 0
                continue
            allowed = allowed or set()
            if ids or not allowed:
                allowed = allowed | self.stop
            mask[row, sorted(allowed)] = 0
        return scores + mask


def extractive_processor(model: "GMSAModel", documents: Sequence[Sequence[str]],
                         generate_kwargs: dict[str, Any] | None = None,
                         penalty: float = float("inf")) -> LogitsProcessorList:
    """The logits processors for a batch of questions whose answers must quote their ``documents`` (text), or with
    a finite ``penalty`` lean towards quoting them (:class:`ExtractiveProcessor`), after any already in
    ``generate_kwargs``; the stop tokens are the model's (or ``generate_kwargs["eos_token_id"]``)."""
    if any(isinstance(docs, str) for docs in documents):
        raise TypeError("extract_from: give each question a list of documents (text), not a single string")
    if any(not isinstance(d, str) for docs in documents for d in docs):
        raise TypeError("extract_from: documents must be text")
    stop = (generate_kwargs or {}).get("eos_token_id")
    stop = model.stop_token_ids() if stop is None else [stop] if isinstance(stop, int) else list(stop)
    spans = [DocumentSpans(list(docs), model.tokenizer) for docs in documents]
    return LogitsProcessorList([*(generate_kwargs or {}).get("logits_processor", []),
                                ExtractiveProcessor(spans, stop, penalty)])
