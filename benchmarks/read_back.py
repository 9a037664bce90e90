#!/usr/bin/env python
"""Read-back bound: are the facts in the soft tokens, and can the base model answer from what they restore?

For each question's gold passage and each rate r, the checkpoint restores the passage from its own soft tokens
("Repeat Document [1] exactly.", greedy, the stage-1 task); then the base model (decoder adapter off) answers the
question reading that restoration as text. Conditions:

  none          base model, no documents                 text-gold      base model reading the gold passage
  restored@r    base model reading the passage the checkpoint restored from its r-x soft tokens
  restored-among@r  (with --restore-among) the same, the passage restored from a stage-1 prompt that shows it among
                the hardest distractors (each compressed on its own; "Repeat Document [k] exactly."): does the
                decoder keep one document's content apart from the others'?
  soft-gold@r   (with --answer-checkpoint) that checkpoint answering directly from the soft tokens of the gold passage
  text-full     base model reading the gold passage among the question's hardest distractors (--max-docs in all, as
                the trainer's dev evaluation places them)
  soft-full@r   (with --answer-checkpoint) that checkpoint answering from the soft tokens of those documents

Beside the answers' EM / F1 / accuracy, ``answer kept`` is the share of questions whose gold answer appears in the
passage read (the original, or the restoration): what survives compression, whoever reads it. A restoration that
keeps the answers while direct answering fails says stage 2 is the bottleneck, not stage 1. A second table splits
the questions by whether restored@r keeps the answer and gives each reader's accuracy on both parts: if the soft-token
reader matches the text readers where the answer survives and fails where it does not, the soft tokens' fidelity on
answers (stage 1) bounds it; if it falls short where the answer survives, reading them (stage 2) does.

    python benchmarks/read_back.py --checkpoint checkpoints/smollm2-gmsa-ae --data data/qa-multidoc/dev.jsonl.gz --limit 100
    python benchmarks/read_back.py --device cuda --checkpoint runs/s1/checkpoints/<step> --answer-checkpoint runs/s2/... --limit 500
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "read-back"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions with a gold passage (default 60 CPU, 300 GPU)",
                      checkpoint_help="checkpoint whose soft tokens restore the passages (stage 1)")
    p.add_argument("--answer-checkpoint", default=None,
                   help="optional checkpoint answering directly from soft tokens (stage 2), for comparison")
    bc.add_reading_args(p)
    p.add_argument("--max-docs", type=int, default=5,
                   help="documents of the multi-document conditions (gold + hardest distractors; 1: skip them)")
    p.add_argument("--restore-among", action="store_true",
                   help="also restore each gold passage from among its --max-docs - 1 hardest distractors (restored-among@r)")
    p.add_argument("--rates", type=int, nargs="+", default=[2, 4, 8])
    return p.parse_args(argv)


def batches(items: Sequence, size: int, desc: str | None = None):
    """``items`` in slices of ``size``; with ``desc``, a progress line on stderr."""
    starts = range(0, len(items), size)
    for start in bc.progress(starts, desc) if desc else starts:
        yield items[start : start + size]


@torch.no_grad()
def restore(model, passages: list[str], rate: int, batch_size: int,
            documents: list[list[str]] | None = None) -> list[str]:
    """Each passage as the checkpoint restores it from its own soft tokens (greedy, the stage-1 prompt); with
    ``documents``, from a prompt showing those documents (the passage among them), each compressed on its own."""
    from gmsa_rag.samples import Sample, build_prompts, token_ids

    shown = documents or [[p] for p in passages]
    restored: list[str] = []
    for chunk, chunk_docs in zip(batches(passages, batch_size, f"restoring at {rate}x"), batches(shown, batch_size)):
        samples, lengths = [], []
        for passage, docs in zip(chunk, chunk_docs):
            ids = token_ids(model, docs)
            samples.append(Sample(ids, None, rate=rate, target_doc=docs.index(passage)))
            lengths.append(len(ids[samples[-1].target_doc]))
        restored += model.generate_from_segments(build_prompts(model, samples), max_new_tokens=max(lengths) + 8)
    return [text.strip() for text in restored]


@torch.no_grad()
def answer(model, questions: list[str], contexts: list[list], batch_size: int, max_new_tokens: int) -> list[str]:
    """Answers to ``questions`` from ``contexts`` (text: the base model; soft tokens: the checkpoint's adapter)."""
    outputs: list[str] = []
    for qs, cs in zip(batches(questions, batch_size, "answering"), batches(contexts, batch_size)):
        outputs += model.generate(qs, cs, max_new_tokens=max_new_tokens)
    return outputs


def right_document_share(restored: list[str], documents: list[list[str]], asked: list[str]) -> float:
    """% of restorations closer (sentence BLEU) to the document asked for than to any other document shown."""
    from gmsa_rag.metrics import sentence_bleu

    hits = 0
    for text, docs, target in zip(restored, documents, asked):
        closeness = [sentence_bleu(text, d) for d in docs]
        hits += closeness.index(max(closeness)) == docs.index(target)
    return 100.0 * hits / max(len(restored), 1)


def split_by_kept(kept: dict[int, list[bool]], read: dict[str, list[str]],
                  answers: list[list[str]]) -> list[dict[str, Any]]:
    """For each rate, each reader's accuracy on the questions whose restoration at that rate keeps a gold answer and
    on those whose restoration loses it (a reader that answers from soft tokens counts at its own rate only)."""
    from gmsa_rag.metrics import qa_metrics

    rows = []
    for rate, mask in kept.items():
        for part, wanted in (("kept", True), ("lost", False)):
            picked = [i for i, k in enumerate(mask) if k == wanted]
            row: dict[str, Any] = {"rate": rate, "part": part, "n": len(picked)}
            for name, predictions in read.items():
                if name.startswith("soft tokens") and not name.endswith(f"@{rate}x"):
                    continue
                row[name] = (qa_metrics([predictions[i] for i in picked], [answers[i] for i in picked])["accuracy"]
                             if picked else None)
            rows.append(row)
    return rows


def plot_split(ax, split: list[dict[str, Any]], readers: list[str]) -> None:
    """Grouped bars: each reader's accuracy where each rate's restoration keeps the answer and where it loses it."""
    groups = [f"{row['rate']}x {row['part']}\n(n={row['n']})" for row in split]
    shown = ["soft tokens", *[r for r in readers if not r.startswith("soft tokens")]]  # (a row holds its rate's only)
    width = 0.8 / len(shown)
    for k, reader in enumerate(shown):
        values = [next((v for name, v in row.items() if name.startswith(reader)), None) or 0.0 for row in split]
        ax.bar([i + (k - (len(shown) - 1) / 2) * width for i in range(len(split))], values, width=width, label=reader)
    ax.set_xticks(range(len(split)))
    ax.set_xticklabels(groups, fontsize=8)
    ax.set_ylabel("answer accuracy %")
    ax.set_title("by whether the restoration keeps the answer", fontsize=9)
    ax.legend(fontsize=8)


def score(condition: str, predictions: list[str], passages: list[str] | None, answers: list[list[str]],
          rate: int | None = None, restoration_bleu: float | None = None) -> dict[str, Any]:
    """One table row: the answers' metrics and how often the passage read still holds a gold answer."""
    from gmsa_rag.metrics import qa_metrics

    row = {"condition": condition, "rate": rate, "n": len(predictions), **qa_metrics(predictions, answers)}
    row["answer_kept"] = qa_metrics(passages, answers)["accuracy"] if passages is not None else None
    row["restoration_bleu"] = restoration_bleu
    return row


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.metrics import answer_in_output, reconstruction_metrics
    from gmsa_rag.train import dev_qa_sample

    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=60, gpu_limit=300)
    with_gold = bc.gold_questions(data, args.split)
    batch_size = args.batch_size or (8 if device.type == "cpu" else 64)
    torch.manual_seed(args.seed)

    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    cap = args.max_passage_tokens
    examples = list(itertools.islice(bc.passages_within(model, with_gold, cap), limit))
    if not examples:
        raise SystemExit(f"no gold passage of {data} has at most {cap} tokens")
    rates = [r for r in args.rates if r in model.config.rates]
    questions = [e.question for e in examples]
    answers = [e.answers for e in examples]
    gold = [e.gold_context for e in examples]
    read: dict[str, list[str]] = {"base model, text": answer(model, questions, [[g] for g in gold], batch_size,
                                                             args.max_new_tokens)}  # gold-passage answers, by reader
    kept: dict[int, list[bool]] = {}  # rate -> does restored@rate hold a gold answer, per question
    rows = [score("none", answer(model, questions, [[] for _ in examples], batch_size, args.max_new_tokens), None, answers),
            score("text-gold", read["base model, text"], gold, answers)]
    full = [dev_qa_sample(e, None, args.max_docs, i).documents for i, e in enumerate(examples)]
    if args.max_docs > 1:
        rows.append(score("text-full", answer(model, questions, full, batch_size, args.max_new_tokens), None, answers))
    samples: dict[str, list[str]] = {}
    for rate in rates:
        restored = restore(model, gold, rate, batch_size)
        bleu = reconstruction_metrics(restored, gold)["bleu"]
        predictions = answer(model, questions, [[r] for r in restored], batch_size, args.max_new_tokens)
        rows.append(score(f"restored@{rate}", predictions, restored, answers, rate, bleu))
        samples[f"restored@{rate}"] = restored[:5]
        kept[rate] = [bool(answer_in_output(r, a)) for r, a in zip(restored, answers)]
        print(f"rate {rate}: restoration BLEU {bleu:.1f}, answer kept {rows[-1]['answer_kept']:.1f}%, "
              f"accuracy reading it {rows[-1]['accuracy']:.1f}%", flush=True)
        if args.restore_among and args.max_docs > 1:
            restored = restore(model, gold, rate, batch_size, documents=full)
            bleu = reconstruction_metrics(restored, gold)["bleu"]
            predictions = answer(model, questions, [[r] for r in restored], batch_size, args.max_new_tokens)
            rows.append(score(f"restored-among@{rate}", predictions, restored, answers, rate, bleu))
            rows[-1]["right_document"] = right_document_share(restored, full, gold)
            samples[f"restored-among@{rate}"] = restored[:5]
            print(f"rate {rate}, among {args.max_docs - 1} distractors: restoration BLEU {bleu:.1f}, answer kept "
                  f"{rows[-1]['answer_kept']:.1f}%, closest to the asked document {rows[-1]['right_document']:.1f}%",
                  flush=True)
    if args.answer_checkpoint:
        bc.free(model)
        model = bc.load_system(args.answer_checkpoint, device, dtype, backbone=args.backbone)
        for rate in [r for r in rates if r in model.config.rates]:
            soft = [[s] for s in model.compress(gold, rate)]
            read[f"soft tokens @{rate}x"] = answer(model, questions, soft, batch_size, args.max_new_tokens)
            rows.append(score(f"soft-gold@{rate}", read[f"soft tokens @{rate}x"], None, answers, rate))
            if args.max_docs > 1:
                soft = [model.compress(docs, rate) for docs in full]
                rows.append(score(f"soft-full@{rate}", answer(model, questions, soft, batch_size, args.max_new_tokens),
                                  None, answers, rate))
    if args.text_checkpoint:
        bc.free(model)
        model = bc.load_system(args.text_checkpoint, device, dtype, backbone=args.backbone)
        read["fine-tune, text"] = answer(model, questions, [[g] for g in gold], batch_size, args.max_new_tokens)
        rows.append(score("fine-tune text-gold", read["fine-tune, text"], gold, answers))
        if args.max_docs > 1:
            rows.append(score("fine-tune text-full", answer(model, questions, full, batch_size, args.max_new_tokens),
                              None, answers))

    split = split_by_kept(kept, read, answers)
    C = bc.Column
    columns = [C("condition", "condition"), C("n", "n", 0), C("restoration_bleu", "restoration BLEU", 1),
               C("answer_kept", "answer kept in the passage read %", 1),
               C("right_document", "restoration closest to the asked document %", 1), C("exact_match", "EM", 1),
               C("f1", "F1", 1), C("accuracy", "accuracy", 1)]
    fig, axes = bc.new_figure(ncols=2 if split else 1, width=7.5, height=4.0)
    ax = axes[0][0]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["accuracy"] for r in rows], width=0.4, label="answer accuracy")
    ax.bar([i + 0.2 for i in x], [r["answer_kept"] or 0 for r in rows], width=0.4, label="answer kept in passage")
    ax.set_xticks(list(x))
    ax.set_xticklabels([r["condition"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("% of questions")
    ax.legend(fontsize=8)
    if split:
        plot_split(axes[0][1], split, list(read))
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "answer_checkpoint": args.answer_checkpoint,
            "text_checkpoint": args.text_checkpoint,
            "data": str(data), "questions": len(examples), "max_passage_tokens": cap, "max_docs": args.max_docs,
            "rates": rates}
    considered = with_gold.index(examples[-1]) + 1
    notes = [f"Data: the first {len(examples)} questions of {data} with a marked gold passage of at most "
             f"{cap or 'any number of'} tokens ({considered - len(examples)} longer ones among the first {considered} "
             "skipped); the gold passage is the only document. Greedy decoding; answers up to "
             f"{args.max_new_tokens} tokens; accuracy = a gold answer appears in the output (normalised).",
             "Restorations: the stage-1 prompt (one document, 'Repeat Document [1] exactly.'), up to the passage's "
             "length + 8 tokens. The base model (decoder adapter off) reads them as plain text."]
    if args.max_docs > 1:
        notes.append(f"*-full: the gold passage among the question's {args.max_docs - 1} hardest distractors (stored "
                     f"order), gold at place i mod {args.max_docs} for question i, as the trainer's dev evaluation "
                     "shows them.")
    out_dir = args.out or bc.default_out_dir(device)
    split_columns = [C("rate", "restored at", 0), C("part", "answer in the restoration", 0), C("n", "n", 0),
                     *[C(name, f"{name} accuracy", 1) for name in read]]
    notes.append("Split: the questions by whether the rate's restoration (the --checkpoint's soft tokens) holds a gold "
                 "answer; each reader's accuracy on each part. 'soft tokens @rx' is the --answer-checkpoint reading its "
                 "own r-x soft tokens of the gold passage (its compressor may have trained on in stage 2).")
    paths = bc.write_outputs(out_dir, args.name, f"Read-back bound ({meta['machine']})", meta,
                             [("Results", columns, rows), ("Answers where the restoration keeps the answer and where "
                                                           "it loses it", split_columns, split)], fig, notes,
                             {"rows": rows, "split": split, "restored_samples": samples})
    print(bc.markdown_table(columns, rows))
    print(bc.markdown_table(split_columns, split))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
