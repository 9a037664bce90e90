#!/usr/bin/env python
"""Restore-token probe: which tokens do a passage's soft tokens lose, and are the answers among them?

Each dev question's gold passage is restored from its own r-x soft tokens, teacher-forced (the stage-1 prompt, one
document), and every passage token gets its cross-entropy and whether it is the top-1 prediction. Tokens are then
split two ways:

  answer / other   tokens inside an occurrence of a gold answer string in the passage, against the rest; an answer
                   occurrence counts as "kept whole" when every one of its tokens is the top-1 prediction
  surprisal        the token's unigram self-information, -ln p(token), p counted over every context passage of the
                   split's questions (gold and distractors): frequent words low, names and rare pieces high

If the answers' tokens restore worse than the rest, or loss piles up on rare tokens, a restoring loss that weighs
them more has a target; if they restore like any other token, what the soft tokens lose is spread evenly and only
more fidelity overall (capacity, a larger backbone) helps.

    python benchmarks/restore_tokens.py --checkpoint checkpoints/smollm2-gmsa-ae --rates 4 8 --limit 80
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from itertools import islice
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "restore-tokens"
DEFAULT_EDGES = (4.0, 6.0, 8.0, 10.0, 12.0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions whose gold passage fits --max-passage-tokens (default 60 CPU, 300 GPU)",
                      checkpoint_help="checkpoint whose soft tokens restore the passages (stage 1 or 2; default: the "
                                      "bundled stage-2 one)")
    p.add_argument("--rates", type=int, nargs="+", default=[4])
    p.add_argument("--max-passage-tokens", type=int, default=256,
                   help="keep questions whose gold passage has at most this many tokens (default 256; 0: all)")
    p.add_argument("--batch-size", type=int, default=None, help="passages per forward pass (default 8 CPU, 32 GPU)")
    p.add_argument("--edges", type=float, nargs="+", default=list(DEFAULT_EDGES),
                   help="surprisal (nats) where buckets start (default 4 6 8 10 12)")
    return p.parse_args(argv)


def answer_spans(tokenizer, passage: str, answers: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """The passage's token ids and, for every occurrence of a gold answer (case-insensitive), the indices of the
    tokens that overlap it."""
    encoded = tokenizer(passage, add_special_tokens=False, return_offsets_mapping=True)
    offsets = encoded["offset_mapping"]
    lowered, spans = passage.lower(), []
    for answer in {a.strip().lower() for a in answers if a.strip()}:
        start = lowered.find(answer)
        while start >= 0:
            end = start + len(answer)
            spans.append([i for i, (a, b) in enumerate(offsets) if a < end and b > start])
            start = lowered.find(answer, start + 1)
    return list(encoded["input_ids"]), [s for s in spans if s]


def unigram_surprisal(tokenizer, passages: Sequence[str]) -> tuple[dict[int, float], float]:
    """-ln p(token) from add-one counts over ``passages`` (dict of the seen tokens, and the value of an unseen one)."""
    counts: Counter[int] = Counter()
    for start in range(0, len(passages), 256):
        for ids in tokenizer(list(passages[start : start + 256]), add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    total = sum(counts.values()) + len(tokenizer)
    return {t: -math.log((c + 1) / total) for t, c in counts.items()}, -math.log(1 / total)


def bucket_names(edges: Sequence[float]) -> list[str]:
    starts = [0.0, *edges]
    return [f"{a:g}-{b:g}" for a, b in zip(starts, edges)] + [f"{edges[-1]:g}+"]


@torch.no_grad()
def token_scores(model, passages: Sequence[list[int]], rate: int, batch_size: int) -> list[tuple[list[float], list[bool]]]:
    """(cross-entropy, is top-1) of every token of each passage restored from its own soft tokens, teacher-forced."""
    import torch.nn.functional as F

    from gmsa_rag.model import target_counts
    from gmsa_rag.samples import Sample, build_prompts

    scores = []
    for start in bc.progress(range(0, len(passages), batch_size), f"restore {rate}x"):
        batch = passages[start : start + batch_size]
        prompts = build_prompts(model, [Sample([ids], ids, rate=rate) for ids in batch])
        logits, labels = model.target_logits(prompts)
        losses = F.cross_entropy(logits.float(), labels, reduction="none").tolist()
        hits = (logits.argmax(-1) == labels).tolist()
        at = 0
        for ids, targets in zip(batch, target_counts(prompts)):  # each target: the passage, then the turn's end
            scores.append((losses[at : at + len(ids)], hits[at : at + len(ids)]))
            at += targets
    return scores


def summary(losses: Sequence[float], hits: Sequence[bool], total_loss: float) -> dict[str, Any]:
    n = len(losses)
    return {"tokens": n, "loss": sum(losses) / n if n else None, "top1": 100.0 * sum(hits) / n if n else None,
            "loss_share": 100.0 * sum(losses) / total_loss if total_loss else None}


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_qa

    args = parse_args(argv)
    edges = sorted(args.edges)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=60, gpu_limit=300)
    batch_size = args.batch_size or (8 if device.type == "cpu" else 32)
    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    tokenizer, cap = model.tokenizer, args.max_passage_tokens
    examples = list(islice(bc.passages_within(model, bc.gold_questions(data, args.split), cap), limit))
    if not examples:
        raise SystemExit(f"no gold passage of {data} has at most {cap} tokens")
    passages, spans = map(list, zip(*(answer_spans(tokenizer, e.gold_context, e.answers) for e in examples)))
    if passages != model.tokenize([e.gold_context for e in examples]):
        raise SystemExit("the tokenizer's offsets do not match the ids the model compresses")
    surprisal, unseen = unigram_surprisal(tokenizer, [c for e in load_qa(data, args.split) for c in e.contexts])
    names = bucket_names(edges)
    bucket = [[sum(surprisal.get(t, unseen) >= x for x in edges) for t in ids] for ids in passages]
    on_answer = [{i for span in found for i in span} for found in spans]

    rows, buckets = [], []
    for rate in [r for r in args.rates if r in model.config.rates]:
        scores = token_scores(model, passages, rate, batch_size)
        flat = [(l, h, i in on_answer[p], bucket[p][i]) for p, (ls, hs) in enumerate(scores) for i, (l, h) in
                enumerate(zip(ls, hs))]
        total = sum(l for l, *_ in flat)
        kept = [all(scores[p][1][i] for i in span) for p, found in enumerate(spans) for span in found]
        for part, keep in (("all", lambda a: True), ("answer", lambda a: a), ("other", lambda a: not a)):
            picked = [(l, h) for l, h, a, _ in flat if keep(a)]
            rows.append({"rate": rate, "tokens_of": part, **summary([l for l, _ in picked], [h for _, h in picked], total),
                         "answers_kept_whole": 100.0 * sum(kept) / len(kept) if part == "answer" and kept else None})
        for b, name in enumerate(names):
            picked = [(l, h) for l, h, _, k in flat if k == b]
            buckets.append({"rate": rate, "surprisal": name, **summary([l for l, _ in picked], [h for _, h in picked],
                                                                        total)})

    C = bc.Column
    token_columns = [C("rate", "rate", 0), C("tokens_of", "tokens"), C("tokens", "n", 0), C("loss", "loss (nats)", 3),
                     C("top1", "top-1 %", 1), C("loss_share", "share of the loss %", 1),
                     C("answers_kept_whole", "answers kept whole %", 1)]
    bucket_columns = [C("rate", "rate", 0), C("surprisal", "surprisal (nats)"), C("tokens", "n", 0),
                      C("loss", "loss (nats)", 3), C("top1", "top-1 %", 1), C("loss_share", "share of the loss %", 1)]
    fig, axes = bc.new_figure(ncols=2, width=5.5, height=4.0)
    left, right = axes[0]
    for rate in sorted({r["rate"] for r in buckets}):
        mine = [r for r in buckets if r["rate"] == rate]
        left.plot(names, [r["loss"] if r["loss"] is not None else float("nan") for r in mine], marker="o", label=f"{rate}x")
        parts = {r["tokens_of"]: r for r in rows if r["rate"] == rate}
        right.bar([f"{rate}x answer", f"{rate}x other"], [parts["answer"]["loss"] or 0.0, parts["other"]["loss"] or 0.0])
    left.set_xlabel("unigram surprisal of the token (nats)")
    left.set_ylabel("restore loss per token (nats)")
    left.legend(fontsize=8)
    left.grid(True, alpha=0.3)
    right.set_ylabel("restore loss per token (nats)")
    right.grid(True, axis="y", alpha=0.3)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "data": str(data), "split": args.split,
            "passages": len(passages), "answer_occurrences": sum(map(len, spans)), "max_passage_tokens": cap,
            "edges": edges}
    notes = [f"Data: the gold passages (at most {cap or 'any number of'} tokens) of the first {len(passages)} "
             f"questions of {data} ({args.split}), {sum(map(len, spans))} gold-answer occurrences in them. Each passage "
             "is restored alone from its own soft tokens (the stage-1 prompt), teacher-forced: loss and top-1 per token.",
             "Answer tokens: those overlapping an occurrence of a gold answer string (case-insensitive); kept whole: "
             "every token of the occurrence is the top-1 prediction.",
             "Surprisal: -ln p(token), add-one unigram counts over every context passage of the split's questions."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Restore-token probe ({meta['machine']})", meta,
                             [("Answer tokens against the rest", token_columns, rows),
                              ("By the token's unigram surprisal", bucket_columns, buckets)], fig, notes,
                             {"rows": rows, "buckets": buckets})
    print(bc.markdown_table(token_columns, rows))
    print(bc.markdown_table(bucket_columns, buckets))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "buckets": buckets, "paths": paths}


if __name__ == "__main__":
    main()
