#!/usr/bin/env python
"""Which of a question's documents holds its answer: BM25 against the decoder's own judgement.

For each question (its gold passage among its hardest distractors, as the trainer's dev shows them), the documents are
ranked by

  bm25        BM25 of the question against its documents (gmsa_rag.lexical; what the product's rerank uses)
  dense       cosine of MiniLM embeddings of the question and each document (the product's retriever, whose score
              every retrieved node carries; with --dense)
  soft@r      the checkpoint's decoder: how likely the question is after each document's r-x soft tokens (question
              likelihood, UPR; Sachan et al., 2022), its adapter on as for any soft-token prompt
  text        the base model: the same after each document as text (it reads every document's text, so it is a
              reference for what the words allow, not a way to serve)
  bm25+X      reciprocal-rank fusion of bm25 and X (ties: the BM25 order)

and the share of questions whose gold passage each ranks first (recall@1) or in its top two (recall@2) is reported.

    python benchmarks/rerank_probe.py --data data/qa-multidoc --limit 200 --rates 4 --text
    python benchmarks/rerank_probe.py --data data/qa-multidoc --limit 300 --rates --dense   # no decoder scores
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "rerank-probe"
RRF_K = 60  # reciprocal-rank fusion's constant (Cormack et al., 2009)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions (default 200)", limit_default=200)
    p.add_argument("--max-docs", type=int, default=5, help="documents per question of a pooled QA folder (default 5)")
    p.add_argument("--rates", type=int, nargs="*", default=[4], help="soft@r rankers (none: no decoder scores)")
    p.add_argument("--text", action="store_true", help="also rank by the base model reading each document as text")
    p.add_argument("--dense", action="store_true", help="also rank by MiniLM cosine (gmsa_rag.rag.load_embed_model)")
    return p.parse_args(argv)


def question_prompts(model, question: str, documents: Sequence[Any]) -> list:
    """One prompt per document in the QA layout up to the question, whose tokens are the scored target."""
    from gmsa_rag.prompt import QA_INSTRUCTION, chat_segments

    asked = model.tokenizer.encode(" " + question, add_special_tokens=False)
    prompts = []
    for document in documents:
        segments = chat_segments(model.tokenizer, [QA_INSTRUCTION + "\n\n", "Document [1]: ", document, "\n",
                                                   "\nQuestion:", list(asked)])
        question_span = [s for s in segments if s.token_ids == asked]
        question_span[-1].is_target = True
        prompts.append(segments)
    return prompts


@torch.no_grad()
def question_likelihoods(model, question: str, documents: Sequence[Any]) -> list[float]:
    """Mean log-probability of the question's tokens after each document (soft tokens: adapter on; text: off)."""
    return (-model.answer_losses(question_prompts(model, question, documents))).tolist()


def dense_scores(embed, question: str, documents: Sequence[str]) -> list[float]:
    """Cosine of the question's and each document's embedding (a LlamaIndex embedding that normalises, as the
    product's MiniLM does: the inner product is the cosine)."""
    asked = np.asarray(embed.get_query_embedding(question))
    return [float(np.dot(asked, d)) for d in embed.get_text_embedding_batch(list(documents))]


def ranks(scores: Sequence[float]) -> np.ndarray:
    """Rank of each document, 0 the best (ties: the given order)."""
    from gmsa_rag.lexical import best_first

    out = np.empty(len(scores), dtype=int)
    out[best_first(scores)] = np.arange(len(scores))
    return out


def fused(first: Sequence[float], second: Sequence[float]) -> list[float]:
    """Reciprocal-rank fusion of two score lists, ties broken by the first (a tiny share of its own RRF)."""
    a, b = ranks(first), ranks(second)
    return list(1.0 / (RRF_K + a) + 1.0 / (RRF_K + b) + 1e-9 / (RRF_K + a))


def recall(scores: Sequence[Sequence[float]], gold: Sequence[int], top: int) -> float:
    """% of questions whose gold document is among the ``top`` best-scored."""
    return 100.0 * float(np.mean([ranks(s)[g] < top for s, g in zip(scores, gold)]))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=200, gpu_limit=200)
    from gmsa_rag.data.qa import load_as_shown
    from gmsa_rag.lexical import bm25_scores
    from gmsa_rag.rag import load_embed_model

    if not data.exists():
        raise SystemExit(f"no QA data at {data}")
    examples = [e for e in load_as_shown(data, args.split, limit, args.max_docs) if e.gold_index is not None]
    if not examples:
        raise SystemExit(f"{data} has no questions with a marked gold passage")
    model = bc.load_system(checkpoint, device, dtype, args.backbone) if args.rates or args.text else None
    for rate in args.rates:
        model.config.check_rate(rate)
    embed = load_embed_model() if args.dense else None
    scores: dict[str, list[list[float]]] = {"bm25": []}
    for number, example in enumerate(examples, 1):
        scores["bm25"].append(bm25_scores(example.question, example.contexts))
        if embed is not None:
            scores.setdefault("dense", []).append(dense_scores(embed, example.question, example.contexts))
        for rate in args.rates:
            soft = model.compress(list(example.contexts), rate)
            scores.setdefault(f"soft@{rate}", []).append(question_likelihoods(model, example.question, soft))
        if args.text:
            scores.setdefault("text", []).append(question_likelihoods(model, example.question, example.contexts))
        if number % 50 == 0 or number == len(examples):
            print(f"{number}/{len(examples)} questions", flush=True)
    for name in [n for n in scores if n != "bm25"]:
        scores[f"bm25+{name}"] = [fused(a, b) for a, b in zip(scores["bm25"], scores[name])]
    gold = [e.gold_index for e in examples]
    rows = [{"ranker": name, "n": len(gold), "recall@1": recall(s, gold, 1), "recall@2": recall(s, gold, 2)}
            for name, s in scores.items()]
    fig, axes = bc.new_figure()
    ax = axes[0][0]
    ax.barh([r["ranker"] for r in rows], [r["recall@1"] for r in rows])
    ax.axvline(100.0 / args.max_docs, color="grey", linestyle=":", label="chance")
    ax.invert_yaxis()
    ax.set_xlabel("gold passage ranked first, % of questions")
    ax.legend()
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint) if model is not None else "(no decoder scores)",
            "data": str(data), "split": args.split,
            "questions": len(gold), "documents_per_question": args.max_docs,
            "command": "rerank_probe.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    notes = ["Each question's gold passage among its hardest distractors, at place index mod documents (the trainer's "
             "dev layout). dense: MiniLM cosine of question and document, as the product's retriever scores chunks. "
             "soft@r / text: mean log-probability of the question's tokens after the document in the QA prompt's "
             "layout (soft tokens: the checkpoint's decoder, adapter on; text: the base model). "
             f"bm25+X: reciprocal-rank fusion (k = {RRF_K}), ties in the BM25 order."]
    columns = [bc.Column("ranker", "ranker"), bc.Column("n", "n", 0), bc.Column("recall@1", "recall@1 %", 1),
               bc.Column("recall@2", "recall@2 %", 1)]
    out = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out, args.name, "Which document holds the answer: BM25 against the decoder", meta,
                             [("", columns, rows)], fig, notes, {"rows": rows, "gold": gold, "scores": scores})
    for row in rows:
        print(f"{row['ranker']:>14}  recall@1 {row['recall@1']:5.1f}  recall@2 {row['recall@2']:5.1f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
