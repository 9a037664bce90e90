#!/usr/bin/env python
"""Parallel documents: can a reader trained on one document a prompt read several if each looks like the only one?

Parallel context windows (Ratner et al., 2023), training-free, on soft tokens: the one-document prompt's opening
(instruction, "Document [1]: ") is shared; each document's soft tokens then sit at the same positions right after it
and see that opening and themselves only; the question and the answer see everything, at positions after the longest
document. With one document this is exactly the sequential prompt the reader was trained on. Both layouts are decoded
by the same greedy loop (the sequential one gives the product's answers), per question, at each rate.

    python benchmarks/parallel_documents.py --data data/qa-multidoc --max-docs 5 --limit 100 --rates 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "parallel-documents"
LAYOUTS = ("sequential", "parallel")
SHARED, QUESTION = -1, -2  # block ids of the shared opening and of the question / answer; documents are 0, 1, ...


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions (default 100 on CPU, 200 on GPU)")
    p.add_argument("--max-docs", type=int, default=5, help="documents per question of a pooled QA folder (default 5)")
    p.add_argument("--rates", type=int, nargs="+", default=[4])
    p.add_argument("--layouts", nargs="+", choices=LAYOUTS, default=list(LAYOUTS))
    p.add_argument("--max-new-tokens", type=int, default=24)
    return p.parse_args(argv)


def sequential_layout(model, question: str, documents: Sequence[torch.Tensor]) -> tuple[list, list[int], list[int]]:
    """The product's prompt (documents one after another): segments, each position's block and position id."""
    segments = model.qa_prompt(question, list(documents))
    length = sum(len(s) for s in segments)
    return segments, [QUESTION] * length, list(range(length))


def parallel_layout(model, question: str, documents: Sequence[torch.Tensor]) -> tuple[list, list[int], list[int]]:
    """The one-document prompt with every document's soft tokens in its document's place, all at the same positions:
    segments, each position's block (SHARED, a document's index, QUESTION) and position id."""
    from gmsa_rag.prompt import Segment

    opening, _, tail = model.qa_prompt(question, [documents[0]])
    segments = [opening, *(Segment(embeds=soft) for soft in documents), tail]
    blocks, positions = [SHARED] * len(opening), list(range(len(opening)))
    for index, soft in enumerate(segments[1:-1]):
        blocks += [index] * len(soft)
        positions += range(len(opening), len(opening) + len(soft))
    start = len(opening) + max(len(s) for s in segments[1:-1])
    return segments, blocks + [QUESTION] * len(tail), positions + list(range(start, start + len(tail)))


def attention_mask(blocks: Sequence[int]) -> torch.Tensor:
    """[T, T] boolean, True where a query position may attend a key position: causal, and a document's position sees
    the shared opening and its own document only."""
    block = torch.tensor(blocks)
    causal = torch.ones(len(blocks), len(blocks), dtype=torch.bool).tril()
    same = block[:, None] == block[None, :]
    shared_key = (block == SHARED)[None, :]
    question_query = (block == QUESTION)[:, None]
    return causal & (same | shared_key | question_query)


def prefill(model, segments: list, blocks: Sequence[int], positions: Sequence[int]):
    """The decoder over a prompt laid out by ``blocks`` and ``positions`` (its adapter on, as for any soft-token
    prompt): (logits [1, T, V], its KV cache, the cache's keyword for the decoder)."""
    from transformers import DynamicCache

    from gmsa_rag.engine import cache_keyword

    batch = model.build_batch([segments])
    device = batch.inputs_embeds.device
    cache_arg = cache_keyword(model.decoder)
    cache = DynamicCache()
    mask = attention_mask(blocks).to(device)[None, None]
    with model.decoder_adapter(True):
        logits = model.decoder(inputs_embeds=batch.inputs_embeds, attention_mask=mask, use_cache=True,
                               position_ids=torch.tensor([list(positions)], device=device), **{cache_arg: cache}).logits
    return logits, cache, cache_arg


@torch.no_grad()
def greedy_answer(model, segments: list, blocks: Sequence[int], positions: Sequence[int], max_new_tokens: int) -> str:
    """Greedy decoding from a laid-out prompt; new tokens follow its last position and see all of it."""
    logits, cache, cache_arg = prefill(model, segments, blocks, positions)
    device = logits.device
    stops = set(model.stop_token_ids())
    tokens: list[int] = []
    seen, next_position = len(blocks), int(max(positions)) + 1
    with model.decoder_adapter(True):
        while len(tokens) < max_new_tokens:
            token = int(logits[0, -1].argmax())
            if token in stops:
                break
            tokens.append(token)
            seen += 1
            logits = model.decoder(input_ids=torch.tensor([[token]], device=device),
                                   attention_mask=torch.ones(1, seen, dtype=torch.long, device=device),
                                   position_ids=torch.tensor([[next_position]], device=device), use_cache=True,
                                   **{cache_arg: cache}).logits
            next_position += 1
    return model.tokenizer.decode(tokens, skip_special_tokens=True).strip()


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.max_docs < 1:
        raise SystemExit(f"--max-docs must be at least 1, got {args.max_docs}")
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=100, gpu_limit=200)
    from gmsa_rag.data.qa import load_as_shown
    from gmsa_rag.metrics import qa_metrics

    if not data.exists():
        raise SystemExit(f"no QA data at {data}")
    examples = load_as_shown(data, args.split, limit, args.max_docs)
    model = bc.load_system(checkpoint, device, dtype, args.backbone)
    for rate in args.rates:
        model.config.check_rate(rate)
    layout_of = {"sequential": sequential_layout, "parallel": parallel_layout}
    answers: dict[str, list[str]] = {f"{layout}@{rate}": [] for rate in args.rates for layout in args.layouts}
    for number, example in enumerate(examples, 1):
        for rate in args.rates:
            documents = model.compress(list(example.contexts), rate)
            for layout in args.layouts:
                prompt = layout_of[layout](model, example.question, documents)
                answers[f"{layout}@{rate}"].append(greedy_answer(model, *prompt, args.max_new_tokens))
        if number % 25 == 0 or number == len(examples):
            print(f"{number}/{len(examples)} questions", flush=True)
    gold = [e.answers for e in examples]
    rows = [{"condition": name, "rate": int(name.split("@")[1]), "layout": name.split("@")[0], "n": len(said),
             **{k: v for k, v in qa_metrics(said, gold).items() if k != "n"}} for name, said in answers.items()]
    fig, axes = bc.new_figure()
    ax = axes[0][0]
    ax.bar([r["condition"] for r in rows], [r["accuracy"] for r in rows])
    ax.set_ylabel("accuracy %")
    ax.set_title(f"{args.max_docs} documents a question, greedy")
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "data": str(data), "split": args.split,
            "questions": len(examples), "documents_per_question": args.max_docs,
            "command": "parallel_documents.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    notes = ["sequential: the product's prompt, documents one after another (what qa.py and the trainer show); "
             "parallel: the one-document prompt's opening shared, every document's soft tokens at the same positions "
             "after it, seeing only it and themselves; the question and answer see all, after the longest document.",
             "Accuracy: a gold answer appears in the output; EM / F1: SQuAD normalisation, best over gold answers."]
    columns = [bc.Column("condition", "condition"), bc.Column("n", "n", 0), bc.Column("accuracy", "accuracy %", 1),
               bc.Column("exact_match", "EM %", 1), bc.Column("f1", "F1 %", 1)]
    out = args.out or bc.default_out_dir(device)
    outputs = [{"question": e.question, "answers": e.answers, **{k: v[i] for k, v in answers.items()}}
               for i, e in enumerate(examples)]
    paths = bc.write_outputs(out, args.name, "Parallel documents for a one-document reader", meta,
                             [("", columns, rows)], fig, notes, {"rows": rows, "outputs": outputs})
    for row in rows:
        print(f"{row['condition']:>16}  acc {row['accuracy']:5.1f}  EM {row['exact_match']:5.1f}  F1 {row['f1']:5.1f}")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"meta": meta, "rows": rows, "outputs": outputs}


if __name__ == "__main__":
    main()
