"""Per-document answers: read each retrieved document on its own, keep the answer the decoder is surest of.

A reader of soft tokens answers far better from the gold passage alone than from it among four hard distractors
(``benchmarks/qa.py --gold-only``): the distractors' soft tokens blur what it reads. Each document is compressed on
its own anyway, so the decoder can also be asked once per document (the prompts of a question share nothing and
run as one batch: about the positions of the joint prompt, decoded side by side). Each document's answer is then
scored by the decoder itself, the mean log-probability of its tokens and end of turn given that document's prompt
(teacher-forced), and the best-scored answer is returned: RAG-Sequence's choice with a uniform document prior
(Lewis et al., 2020), the maximum in place of the sum. Documents whose answer is empty are passed over.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal, Sequence

import torch

from .prompt import Context

if TYPE_CHECKING:
    from .model import GMSAModel

Score = Literal["mean", "sum"]
SCORES: tuple[str, ...] = ("mean", "sum")


def answer_per_document(
    model: "GMSAModel",
    questions: Sequence[str],
    contexts: Sequence[Sequence[Context]],
    max_new_tokens: int = 32,
    extract_from: Sequence[Sequence[str]] | None = None,
    score: Score = "mean",
    **generate_kwargs: Any,
) -> list[str]:
    """One answer per question: each of its documents answered alone, the answer with the best ``score`` kept.

    ``score``: ``mean`` log-probability per answer token (end of turn included) or their ``sum``. ``extract_from``
    (each question's documents as text) holds each document's answer to spans of that document.
    """
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if model.config.answer_cites:
        raise ValueError("per-document answers need a model that answers without citing a document (answer_cites)")
    if extract_from is not None and [len(d) for d in extract_from] != [len(c) for c in contexts]:
        raise ValueError("extract_from: give each question the text of each of its documents")
    owner = [i for i, ctx in enumerate(contexts) for _ in ctx]
    flat_questions = [questions[i] for i in owner]
    flat_contexts = [[c] for ctx in contexts for c in ctx]
    flat_texts = [[t] for docs in extract_from for t in docs] if extract_from is not None else None
    answers = model.generate(flat_questions, flat_contexts, max_new_tokens=max_new_tokens, extract_from=flat_texts,
                             **generate_kwargs) if owner else []
    scores = document_scores(model, flat_questions, flat_contexts, answers, score)
    best: dict[int, tuple[float, str]] = {}
    for i, answer, value in zip(owner, answers, scores):
        value = value if answer else float("-inf")  # an empty answer says nothing
        if i not in best or value > best[i][0]:
            best[i] = (value, answer)
    return [best[i][1] if i in best else "" for i in range(len(questions))]


@torch.no_grad()
def document_scores(model: "GMSAModel", questions: Sequence[str], contexts: Sequence[Sequence[Context]],
                    answers: Sequence[str], score: Score = "mean") -> list[float]:
    """The decoder's log-probability of each answer (+ end of turn) given its prompt: per token or summed."""
    if not answers:
        return []
    prompts = [model.qa_prompt(q, c, answer=a) for q, c, a in zip(questions, contexts, answers)]
    mean_loss = model.answer_losses(prompts).float().cpu()  # (the adapter follows the prompts, as in generation)
    if score == "sum":
        counts = torch.tensor([sum(len(seg) for seg in p if seg.is_target) for p in prompts], dtype=torch.float32)
        return (-mean_loss * counts).tolist()
    return (-mean_loss).tolist()
