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
CITE_INSTRUCTION = (
    "Answer the question using the documents below. Reply with the number of the document that holds the answer "
    "in brackets, then a short answer."
)
QUOTE_INSTRUCTION = (
    "Answer the question using the documents below. Quote the words that lead to the answer, then the answer in bold."
)
RESTORE_INSTRUCTION = "Repeat Document [{}] exactly."
CONTINUE_INSTRUCTION = "Continue the text of Document [{}]."
SPAN_INSTRUCTION = 'Quote the words that follow "{}" in the documents.'
_MARK = "<|gmsa_span_{}|>"
_MARK_RE = re.compile(r"<\|gmsa_span_(\d+)\|>")

Piece = Union[torch.Tensor, list]
"""Part of a document: soft tokens ([m, H] tensor) or token ids."""
Context = Union[torch.Tensor, str, tuple]
"""A document as soft tokens ([m, H] tensor), as plain text (the uncompressed baseline), or as a tuple of pieces in
order (soft tokens with a run of them given back as the token ids they stand for; :mod:`gmsa_rag.expansion`)."""


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
    parts: Sequence[Context | list[int]],
    answer: str | Sequence[int] | None = None,
) -> list[Segment]:
    """Render ``parts`` (text and soft-token spans, in order) as the user turn of the chat template.

    A part given as token ids (a list) becomes a span of exactly those tokens (a document as the encoder tokenized
    it). With ``answer`` (text or token ids) the assistant's reply (+ end of turn) is appended as the training target.
    """
    spans: list[torch.Tensor | list[int]] = []
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
            span = spans[int(piece)]
            segments.append(Segment(token_ids=list(span)) if isinstance(span, list) else Segment(embeds=span))
        elif piece:
            segments.append(Segment(token_ids=tokenizer.encode(piece, add_special_tokens=False)))
    if answer is not None:
        end = tokenizer.encode(tokenizer.eos_token or "", add_special_tokens=False)
        ids = tokenizer.encode(answer, add_special_tokens=False) if isinstance(answer, str) else list(answer)
        segments.append(Segment(token_ids=ids + end, is_target=True))
    return segments


def document_parts(contexts: Sequence[Context | list[int]]) -> list[Context | list[int]]:
    """One labelled span per document, in order: ``Document [i]: <span>`` (the layout of every prompt); a document
    given as a tuple of pieces takes its pieces in order."""
    parts: list[Context] = []
    for i, ctx in enumerate(contexts, 1):
        parts += [f"Document [{i}]: ", *(ctx if isinstance(ctx, tuple) else (ctx,)), "\n"]
    return parts


def qa_segments(
    tokenizer: PreTrainedTokenizerBase,
    question: str,
    contexts: Sequence[Context | list[int]],
    answer: str | None = None,
    instruction: str = QA_INSTRUCTION,
    question_first: bool = False,
) -> list[Segment]:
    """Instruction, one labelled span per document (retrieval order), then the question (a model trained to cite
    its documents takes ``instruction=CITE_INSTRUCTION``, see :func:`qa_instruction`). ``question_first`` states
    the question after the instruction too, so that the documents are read knowing it."""
    lead = f"Question: {question}\n\n" if question_first else ""
    parts: list[Context] = [instruction + "\n\n" + lead, *document_parts(contexts), f"\nQuestion: {question}"]
    return chat_segments(tokenizer, parts, answer)


def qa_instruction(cites: bool, quotes: bool = False) -> str:
    """The QA instruction of a model that answers plainly, opens its answers with a document number, or quotes the
    words that lead to its answer."""
    if cites and quotes:
        raise ValueError("a model either cites its document or quotes its evidence, not both")
    return CITE_INSTRUCTION if cites else QUOTE_INSTRUCTION if quotes else QA_INSTRUCTION


def ae_segments(
    tokenizer: PreTrainedTokenizerBase,
    contexts: Sequence[Context],
    target_doc: int = 0,
    text: str | Sequence[int] | None = None,
    continuation: bool = False,
    cue: str | None = None,
) -> list[Segment]:
    """Stage-1 prompt over labelled documents (soft tokens): restore document ``target_doc`` (autoencoding),
    with ``continuation`` write the text that follows it, or with a ``cue`` (a few words quoted from one of the
    documents, which one unsaid) the words that follow the cue there. ``text`` is the target."""
    if cue is not None:
        instruction = SPAN_INSTRUCTION.format(cue)
    else:
        instruction = (CONTINUE_INSTRUCTION if continuation else RESTORE_INSTRUCTION).format(target_doc + 1)
    parts = [*document_parts(contexts), "\n" + instruction]
    return chat_segments(tokenizer, parts, text)


def prompt_length(segments: Sequence[Segment]) -> int:
    """Decoder positions of a prompt."""
    return sum(len(seg) for seg in segments)


def shared_tail(prompt: Sequence[Segment], twin: Sequence[Segment]) -> int:
    """How many final positions two prompts of the same sample share token for token (e.g. one with soft tokens and
    one with the documents as text): what follows the last soft-token span (question, chat turn, answer), where the
    two decoders' states can be compared."""
    def tail(segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for seg in reversed(segments):
            if seg.token_ids is None:
                break
            ids = seg.token_ids + ids
        return ids

    a, b = tail(prompt), tail(twin)
    shared = 0
    while shared < min(len(a), len(b)) and a[-1 - shared] == b[-1 - shared]:
        shared += 1
    return shared


def group_spans(n_tokens: int, window: int, rate: int) -> list[tuple[int, int]]:
    """The [start, end) token span each soft token of an ``n_tokens``-token document stands for: group merging
    compresses encoder windows of ``window`` tokens, each in consecutive groups of ``rate`` (a window's last group may
    be short)."""
    windows = [(start, min(start + window, n_tokens)) for start in range(0, n_tokens, window)]
    return [(g, min(g + rate, end)) for start, end in windows for g in range(start, end, rate)]


def soft_token_groups(soft_prompt: Sequence[Segment], text_prompt: Sequence[Segment], window: int,
                      rate: int | Sequence[int]) -> tuple[list[int], list[list[int]]]:
    """Where each soft token of ``soft_prompt`` sits and the positions in ``text_prompt`` of the tokens it stands for.

    The two prompts must have the same layout with each soft-token span of the first a token span in the second (the
    document as the encoder tokenized it, compressed in windows of ``window`` tokens at ``rate``, as group merging
    does; a list gives each soft-token span its own rate, in order)."""
    if len(soft_prompt) != len(text_prompt):
        raise ValueError("soft_token_groups: the prompts do not have the same layout")
    span_rates = iter([rate] * len(soft_prompt) if isinstance(rate, int) else rate)
    soft_positions: list[int] = []
    groups: list[list[int]] = []
    soft_at = text_at = 0
    for soft, text in zip(soft_prompt, text_prompt):
        if soft.embeds is not None:
            n, rate = len(text), next(span_rates)
            spans = group_spans(n, window, rate)
            if len(spans) != len(soft) or text.token_ids is None:
                raise ValueError(f"soft_token_groups: a span of {len(soft)} soft tokens against {n} tokens at {rate}x")
            soft_positions += range(soft_at, soft_at + len(soft))
            groups += [list(range(text_at + a, text_at + b)) for a, b in spans]
        elif len(soft) != len(text):
            raise ValueError("soft_token_groups: the prompts do not have the same layout")
        soft_at, text_at = soft_at + len(soft), text_at + len(text)
    return soft_positions, groups


def flat_index(prompts: Sequence[Sequence[Segment]], positions: Sequence[Sequence[int]],
               device: torch.device) -> torch.Tensor:
    """Flat (row * T + position) index of the given positions of each prompt in a batch of them, in order."""
    longest = max(prompt_length(segments) for segments in prompts)
    index = [row * longest + pos for row, row_positions in enumerate(positions) for pos in row_positions]
    return to_device(torch.tensor(index, dtype=torch.long), device)


@dataclass
class DecoderBatch:
    inputs_embeds: torch.Tensor  # [B, T, H]
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 where no loss is taken
    target_ids: torch.Tensor | None = None  # [N]: the target tokens of the batch, row by row (what labels hold)
    predictors: torch.Tensor | None = None  # [N]: flat (row * T + position) index of the place predicting each


def assemble(
    prompts: Sequence[Sequence[Segment]],
    embed: torch.nn.Embedding,
    padding_side: str = "right",
) -> DecoderBatch:
    """Turn segment lists into one padded batch of decoder inputs (left padding for generation).

    The layout (where each token and soft token goes) is planned on the host and sent to the embedding's device in
    one copy; all token segments of the batch are embedded in one call; soft-token segments are cast to its dtype,
    those not on its device moved in one copy. Differentiable with respect to the soft tokens.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    device, dtype = embed.weight.device, embed.weight.dtype
    lengths = [prompt_length(segments) for segments in prompts]
    batch, longest = len(lengths), max(lengths)
    # Flat destinations (row * longest + position) of every text token, soft token and target token.
    ids: list[int] = []
    id_slots: list[int] = []
    target_ids: list[int] = []
    target_slots: list[int] = []
    # soft tokens already on the device, and those elsewhere (e.g. cache hits on the host): one copy for these
    soft: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    soft_slots: tuple[list[int], list[int]] = ([], [])
    for row, (segments, n) in enumerate(zip(prompts, lengths)):
        pos = row * longest + (0 if padding_side == "right" else longest - n)
        for seg in segments:
            span = range(pos, pos + len(seg))
            if seg.token_ids is not None:
                ids += seg.token_ids
                id_slots += span
                if seg.is_target:
                    target_ids += seg.token_ids
                    target_slots += span
            else:
                away = int(seg.embeds.device != device)
                soft[away].append(seg.embeds)
                soft_slots[away].extend(span)
            pos += len(seg)
    predicted = [(t, s) for t, s in zip(target_ids, target_slots) if s % longest]  # a row's first place has none
    predicted_ids, predictors = [t for t, _ in predicted], [s - 1 for _, s in predicted]
    parts = [ids, id_slots, soft_slots[0], soft_slots[1], target_ids, target_slots, lengths, predicted_ids, predictors]
    plan = to_device(torch.tensor([x for part in parts for x in part], dtype=torch.long), device)
    (ids_t, id_slots_t, near_slots, away_slots, target_ids_t, target_slots_t, lengths_t, predicted_ids_t,
     predictors_t) = plan.split([len(p) for p in parts])

    flat = torch.zeros(batch * longest, embed.embedding_dim, dtype=dtype, device=device)
    if ids:
        flat = flat.index_copy(0, id_slots_t, embed(ids_t))
    for spans, slots in zip(soft, (near_slots, away_slots)):
        if spans:
            flat = flat.index_copy(0, slots, _gather(spans, device, dtype))
    labels = torch.full((batch * longest,), -100, dtype=torch.long, device=device)
    if target_ids:
        labels[target_slots_t] = target_ids_t
    columns = torch.arange(longest, device=device)
    if padding_side == "right":
        mask = columns[None, :] < lengths_t[:, None]
    else:
        mask = columns[None, :] >= (longest - lengths_t)[:, None]
    return DecoderBatch(flat.view(batch, longest, -1), mask.long(), labels.view(batch, longest), predicted_ids_t,
                        predictors_t)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU through pinned memory without waiting for the work queued there (a plain
    copy from pageable memory would stall the host until the GPU has caught up)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _gather(spans: list[torch.Tensor], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Soft-token spans concatenated in order on ``device``: spans on one other device move in one copy."""
    if all(s.device == spans[0].device for s in spans):
        return torch.cat(spans).to(device=device, dtype=dtype)
    return torch.cat([s.to(device=device, dtype=dtype) for s in spans])  # spread over several devices
