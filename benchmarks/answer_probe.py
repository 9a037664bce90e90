#!/usr/bin/env python
"""Answer-loss probe: how much do soft tokens help the decoder answer? (teacher-forced, minutes on a GPU)

For each question, the mean cross-entropy per token of its (first) gold answer, teacher-forced, under:

  text-full        all documents as text            text-gold   the gold document alone as text
  none             no documents at all
  soft-full@r      all documents as soft tokens     soft-gold@r the gold document alone as soft tokens
  soft-other@r     another question's documents as soft tokens (the same amount of soft tokens, wrong content)
  text-hard5 / soft-hard5@r      the gold document among its 4 hardest distractors (the product's and dev's prompt)
  text-random5 / soft-random5@r  the gold document among 4 unrelated documents (other questions' gold passages)

hard5 against random5 separates two ways extra documents can cost answers: documents too alike to tell apart
(hard5 far above random5) or the mere presence of more documents (both far above gold alone).

Soft tokens worth anything put soft-* well below ``none`` and soft-other; the gap to text-* is what compression
still loses. Prompts are the product's own (``GMSAModel.qa_prompt``), each document compressed on its own;
a decoder adapter, if the checkpoint has one, is on exactly for the soft-token prompts. Use it to compare recipes
before a long run; report it beside the QA results.

    python benchmarks/answer_probe.py --checkpoint checkpoints/smollm2-gmsa --limit 40
    python benchmarks/answer_probe.py --device cuda --checkpoint runs/keft/checkpoints/step-0001000 --limit 500
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "answer-probe"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions (default 40 on CPU, 200 on GPU)",
                      checkpoint_help="GMSA (or TCP-AE) checkpoint (default: the bundled one)")
    p.add_argument("--rates", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass (default 4 CPU, 32 GPU)")
    return p.parse_args(argv)


def five_documents(example, unrelated: list[str], place: int) -> dict[str, list[str]]:
    """The gold document at ``place`` among its 4 hardest distractors (stored order) and among 4 unrelated ones."""
    gold = example.gold_context
    hardest = [d for i, d in enumerate(example.contexts) if i != example.gold_index][:4]
    return {kind: [*others[:place], gold, *others[place:]] for kind, others in
            (("hard5", hardest), ("random5", unrelated[:4]))}


def conditions(example, other, rate: int | None, model, unrelated: list[str] = (), place: int = 0) -> dict[str, list]:
    """The document lists each condition shows (text, or soft tokens compressed per document)."""
    gold = example.gold_context
    layouts = five_documents(example, list(unrelated), place) if gold is not None and len(unrelated) >= 4 else {}
    if rate is None:
        found = {"text-full": list(example.contexts), "none": []}
        if gold is not None:
            found["text-gold"] = [gold]
        found.update({f"text-{kind}": docs for kind, docs in layouts.items()})
        return found
    found = {f"soft-full@{rate}": model.compress(list(example.contexts), rate),
             f"soft-other@{rate}": model.compress(list(other.contexts), rate)}
    if gold is not None:
        found[f"soft-gold@{rate}"] = model.compress([gold], rate)
    found.update({f"soft-{kind}@{rate}": model.compress(docs, rate) for kind, docs in layouts.items()})
    return found


@torch.no_grad()
def probe(model, examples, rates: list[int], batch_size: int) -> dict[str, list[float]]:
    """Per-question answer losses for every condition."""
    losses: dict[str, list[float]] = {}
    pending: dict[str, list] = {}

    def flush(name: str) -> None:
        if pending.get(name):
            losses.setdefault(name, []).extend(model.answer_losses(pending[name]).tolist())
            pending[name] = []

    for i, example in enumerate(examples):
        other = examples[(i + 1) % len(examples)]
        unrelated = ([e.gold_context or e.contexts[0] for e in (examples[(i + k) % len(examples)] for k in range(1, 5))]
                     if len(examples) >= 5 else [])  # (fewer questions: the 5-document layouts are skipped)
        for rate in [None, *rates]:
            for name, docs in conditions(example, other, rate, model, unrelated, place=i % 5).items():
                pending.setdefault(name, []).append(model.qa_prompt(example.question, docs, example.answers[0]))
                if len(pending[name]) >= batch_size:
                    flush(name)
    for name in list(pending):
        flush(name)
    return losses


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_qa

    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=40, gpu_limit=200)
    examples = load_qa(data, args.split, limit=limit)
    batch_size = args.batch_size or (4 if device.type == "cpu" else 32)
    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    rates = [r for r in args.rates if r in model.config.rates]
    torch.manual_seed(args.seed)
    losses = probe(model, examples, rates, batch_size)

    order = (["text-full", "text-hard5", "text-random5", "text-gold", "none"]
             + [f"soft-{k}@{r}" for r in rates for k in ("full", "hard5", "random5", "gold", "other")])
    rows = [{"condition": name, "n": len(losses[name]), "loss": sum(losses[name]) / len(losses[name])}
            for name in order if losses.get(name)]
    none = next((r["loss"] for r in rows if r["condition"] == "none"), None)
    for row in rows:
        row["vs_none"] = row["loss"] - none if none is not None else None
    C = bc.Column
    columns = [C("condition", "condition"), C("n", "n", 0), C("loss", "answer loss / token", 3),
               C("vs_none", "vs no documents", 3)]
    fig, axes = bc.new_figure(width=7.5, height=4.0)
    ax = axes[0][0]
    ax.bar(range(len(rows)), [r["loss"] for r in rows],
           color=["tab:gray" if not r["condition"].startswith("soft") else "tab:blue" for r in rows])
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([r["condition"] for r in rows], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("teacher-forced answer loss per token")
    if none is not None:
        ax.axhline(none, color="tab:red", lw=1, ls="--", label="no documents")
        ax.legend(fontsize=8)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "data": str(data), "split": args.split,
            "questions": len(examples), "rates": rates}
    notes = [f"Data: the first {len(examples)} questions of {data} (a pooled folder: its {args.split} split); loss on "
             "the first gold answer (+ end of turn).",
             "soft-other: the documents of the next question in the file, compressed at the same rate.",
             "hard5 / random5: the gold document at place i mod 5 among its 4 hardest distractors (the dev prompt) or "
             "among the gold passages of the next 4 questions in the file (unrelated topics); questions with a "
             "marked gold passage only."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Answer-loss probe ({meta['machine']})", meta,
                             [("Results", columns, rows)], fig, notes, {"rows": rows, "losses": losses})
    print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths, "meta": meta}


if __name__ == "__main__":
    main()
