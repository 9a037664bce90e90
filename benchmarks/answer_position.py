#!/usr/bin/env python
"""Answer-position probe: is an answer read as well from the middle of a passage as from its start?

For each dev question whose gold passage holds a gold answer string, the answer's position is the number of
passage tokens before its first occurrence. The question is answered from the gold passage alone, and accuracy is
reported per position bucket, under:

  text-gold       the base model reading the passage as text
  soft-gold@r     the checkpoint answering from the passage's r-x soft tokens (its decoder adapter on)
  fine-tune text  (with --text-checkpoint) a no-compress fine-tune reading the passage as text

Restoring walks a passage from its start, and a stage-2 model still restores first sentences word for word while
it answers poorly: accuracy that falls with the answer's position where the text readers' stays flat says reading
from the middle of the soft tokens is what fails.

    python benchmarks/answer_position.py --checkpoint runs/s2/checkpoints/<step> --text-checkpoint runs/nc/... --limit 120
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402
from read_back import answer  # noqa: E402

NAME = "answer-position"
DEFAULT_EDGES = (16, 48, 96)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions whose gold passage holds an answer (default 80 CPU, 400 GPU)",
                      checkpoint_help="checkpoint answering from soft tokens (stage 2)")
    bc.add_reading_args(p)
    p.add_argument("--rates", type=int, nargs="+", default=[2, 4])
    p.add_argument("--edges", type=int, nargs="+", default=list(DEFAULT_EDGES),
                   help="token offsets where position buckets start (default 16 48 96: 0-15, 16-47, 48-95, 96+)")
    return p.parse_args(argv)


def answer_offset(tokenizer, passage: str, answers: list[str]) -> int | None:
    """Tokens of ``passage`` before the first occurrence of any gold answer (case-insensitive); None if absent."""
    lowered = passage.lower()
    found = [lowered.find(a.lower()) for a in answers if a.strip()]
    found = [i for i in found if i >= 0]
    if not found:
        return None
    return len(tokenizer.encode(passage[: min(found)], add_special_tokens=False))


def bucket_names(edges: list[int]) -> list[str]:
    starts = [0, *edges]
    return [f"{a}-{b - 1}" for a, b in zip(starts, edges)] + [f"{edges[-1]}+"]


def bucket_of(offset: int, edges: list[int]) -> int:
    return sum(offset >= e for e in edges)


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.metrics import qa_metrics

    args = parse_args(argv)
    edges = sorted(args.edges)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=80, gpu_limit=400)
    batch_size = args.batch_size or (8 if device.type == "cpu" else 64)
    torch.manual_seed(args.seed)
    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    cap = args.max_passage_tokens
    examples, offsets = [], []
    for e in bc.passages_within(model, bc.gold_questions(data, args.split), cap):
        offset = answer_offset(model.tokenizer, e.gold_context, e.answers)
        if offset is not None:
            examples.append(e)
            offsets.append(offset)
        if len(examples) == limit:
            break
    if not examples:
        raise SystemExit(f"no gold passage of {data} holds its answer within {cap} tokens")
    questions = [e.question for e in examples]
    gold = [e.gold_context for e in examples]
    answers = [e.answers for e in examples]

    predictions: dict[str, list[str]] = {"text-gold": answer(model, questions, [[g] for g in gold], batch_size,
                                                             args.max_new_tokens)}
    for rate in [r for r in args.rates if r in model.config.rates]:
        soft = [[s] for s in model.compress(gold, rate)]
        predictions[f"soft-gold@{rate}"] = answer(model, questions, soft, batch_size, args.max_new_tokens)
    if args.text_checkpoint:
        bc.free(model)
        model = bc.load_system(args.text_checkpoint, device, dtype, backbone=args.backbone)
        predictions["fine-tune text"] = answer(model, questions, [[g] for g in gold], batch_size, args.max_new_tokens)

    names = bucket_names(edges)
    buckets = [bucket_of(o, edges) for o in offsets]
    rows = []
    for condition, preds in predictions.items():
        row: dict[str, Any] = {"condition": condition, "all": qa_metrics(preds, answers)["accuracy"], "n": len(preds)}
        for b, name in enumerate(names):
            picked = [i for i, k in enumerate(buckets) if k == b]
            row[name] = qa_metrics([preds[i] for i in picked], [answers[i] for i in picked])["accuracy"] if picked else None
        rows.append(row)
    counts = {"condition": "questions", "n": len(examples), **{n: sum(k == b for k in buckets) for b, n in enumerate(names)}}

    C = bc.Column
    columns = [C("condition", "condition"), C("n", "n", 0), C("all", "accuracy, all", 1)]
    columns += [C(name, f"answer at tokens {name}", 1) for name in names]
    fig, axes = bc.new_figure(width=6.5, height=4.0)
    ax = axes[0][0]
    for row in rows:
        ax.plot(names, [row[n] if row[n] is not None else float("nan") for n in names], marker="o", label=row["condition"])
    ax.set_xlabel("tokens of the gold passage before the answer")
    ax.set_ylabel("accuracy from the gold passage alone (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "text_checkpoint": args.text_checkpoint,
            "data": str(data), "questions": len(examples), "max_passage_tokens": cap, "edges": edges}
    notes = [f"Data: the first {len(examples)} questions of {data} whose gold passage (at most {cap or 'any number of'} "
             "tokens) contains a gold answer string; the gold passage is the only document. Greedy decoding; answers "
             f"up to {args.max_new_tokens} tokens; accuracy = a gold answer appears in the output (normalised).",
             "Position: tokens of the passage before the first occurrence of a gold answer (case-insensitive). "
             f"Questions per bucket: {', '.join(f'{n}: {counts[n]}' for n in names)}.",
             "text-gold runs on the base model (the checkpoint's adapter serves soft-token prompts only)."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Answer position probe ({meta['machine']})", meta,
                             [("Accuracy by where the answer sits in the gold passage", columns, rows + [counts])], fig,
                             notes, {"rows": rows, "counts": counts, "offsets": offsets})
    print(bc.markdown_table(columns, rows + [counts]))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "counts": counts, "paths": paths}


if __name__ == "__main__":
    main()
