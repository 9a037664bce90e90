"""Decoder inputs: chat template text interleaved with per-document soft-token spans.

A prompt is a list of :class:`Segment` s (token ids or soft-token embeddings). Training (AE, KEFT, the
uncompressed baseline) and generation all build their inputs here, so the decoder sees one format.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from transformers import PreTrainedTokenizerBase

QA_INSTRUCTION = (
    "Answer the question using the documents below. Reply with a short answer only."
)
RESTORE_INSTRUCTION = "Repeat Document [{}] exactly."
CONTINUE_INSTRUCTION = "Continue the text of Document [{}]."
_MARK = "<|gmsa_span_{}|>"
_MARK_RE = re.compile(r"<\|gmsa_span_(\d+)\|>")

Context = Union[torch.Tensor, str]
"""A document as soft tokens ([m, H] tensor) or, for the uncompressed baseline, as plain text."""


@dataclass
class Segment:
    """A run of decoder input: token ids, or precomputed embeddings (soft tokens)."""

    token_ids: list[int] | None = None
    embeds: torch.Tensor | None = None
    is_target: bool = False  # loss is taken on these tokens (teacher forcing)

    def __len__(self) -> int:
        return len(self.token_ids) if self.token_ids is not None else int(self.embeds.shape[0])


def chat_segments(
    tokenizer: PreTrainedTokenizerBase,
    parts: Sequence[Context],
    answer: str | Sequence[int] | None = None,
) -> list[Segment]:
    """Render ``parts`` (text and soft-token spans, in order) as the user turn of the chat template.

    With ``answer`` (text or token ids) the assistant's reply (+ end of turn) is appended as the training target.
    """
    spans: list[torch.Tensor] = []
    text: list[str] = []
    for part in parts:
        if isinstance(part, str):
            text.append(part)
        else:
            text.append(_MARK.format(len(spans)))
            spans.append(part)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "".join(text)}], tokenize=False, add_generation_prompt=True
    )
    segments: list[Segment] = []
    for i, piece in enumerate(_MARK_RE.split(rendered)):
        if i % 2 == 1:
            segments.append(Segment(embeds=spans[int(piece)]))
        elif piece:
            segments.append(Segment(token_ids=tokenizer.encode(piece, add_special_tokens=False)))
    if answer is not None:
        end = tokenizer.encode(tokenizer.eos_token or "", add_special_tokens=False)
        ids = tokenizer.encode(answer, add_special_tokens=False) if isinstance(answer, str) else list(answer)
        segments.append(Segment(token_ids=ids + end, is_target=True))
    return segments


def document_parts(contexts: Sequence[Context]) -> list[Context]:
    """One labelled span per document, in order: ``Document [i]: <span>`` (the layout of every prompt)."""
    parts: list[Context] = []
    for i, ctx in enumerate(contexts, 1):
        parts += [f"Document [{i}]: ", ctx, "\n"]
    return parts


def qa_segments(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    contexts: Sequence[Context],
    answer: str | None = None,
    instruction: str = QA_INSTRUCTION,
) -> list[Segment]:
    """Instruction, one labelled span per document (retrieval order), then the question."""
    parts: list[Context] = [instruction + "\n\n", *document_parts(contexts), f"\nQuestion: {question}"]
    return chat_segments(tokenizer, parts, answer)


def ae_segments(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    target_doc: int = 0,
    text: str | Sequence[int] | None = None,
    continuation: bool = False,
) -> list[Segment]:
    """Stage-1 prompt over labelled documents (soft tokens): restore document ``target_doc`` (autoencoding) or,
    with ``continuation``, write the text that follows it. ``text`` is the target."""
    template = CONTINUE_INSTRUCTION if continuation else RESTORE_INSTRUCTION
    parts = [*document_parts(contexts), "\n" + template.format(target_doc + 1)]
    return chat_segments(tokenizer, parts, text)


@dataclass
class DecoderBatch:
    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 where no loss is taken


def assemble(
    prompts: Sequence[Sequence[Segment]],
    embed: torch.nn.Embedding,
    padding_side: str = "right",
) -> DecoderBatch:
    """Turn segment lists into one padded batch of decoder inputs (left padding for generation).

    Token segments are embedded with ``embed``; soft-token segments are cast to its device and dtype.
    """
    device, dtype = embed.weight.device, embed.weight.dtype
    rows, label_rows = [], []
    for segments in prompts:
        pieces, labels = [], []
        for seg in segments:
            if seg.token_ids is not None:
                ids = torch.tensor(seg.token_ids, dtype=torch.long, device=device)
                pieces.append(embed(ids))
                labels.append(ids if seg.is_target else torch.full_like(ids, -100))
            else:
                pieces.append(seg.embeds.to(device=device, dtype=dtype))
                labels.append(torch.full((len(seg),), -100, dtype=torch.long, device=device))
        rows.append(torch.cat(pieces))
        label_rows.append(torch.cat(labels))
    longest = max(r.shape[0] for r in rows)
    embeds = torch.zeros(len(rows), longest, rows[0].shape[1], dtype=rows[0].dtype, device=device)
    mask = torch.zeros(len(rows), longest, dtype=torch.long, device=device)
    labels = torch.full((len(rows), longest), -100, dtype=torch.long, device=device)
    for b, (row, lab) in enumerate(zip(rows, label_rows)):
        n = row.shape[0]
        span = slice(0, n) if padding_side == "right" else slice(longest - n, longest)
        embeds[b, span], mask[b, span], labels[b, span] = row, 1, lab
    return DecoderBatch(embeds, mask, labels)
