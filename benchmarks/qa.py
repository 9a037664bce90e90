#!/usr/bin/env python
"""Multi-document QA accuracy (EM, F1, answer-in-output) and latency per query, for several systems.

Systems (any number; each compressed one at each ``--rates`` unless its spec names a rate):

  --base                      the base model reading the documents as text (uncompressed prompt)
  --nocompress-checkpoint D   uncompressed prompt on a checkpoint's fine-tuned decoder (same fine-tuning, no
                              compression)
  --gmsa-checkpoint D         GMSA soft tokens (documents compressed one by one) + the checkpoint's decoder
  --tcp-checkpoint D          TCP-AE soft tokens
  --system name=kind:path[:rate]   generic form; kind = base | text | gmsa | tcp (base: path = backbone)

Without any system: --base plus the repository's bundled checkpoints (checkpoints/smollm2-gmsa, -tcp) if present.
Data: the bundled dev split (``gmsa_rag.data.DEFAULT_QA_DIR``) or any "Lost in the Middle"-format jsonl via --data.
Greedy, batched generation; latency per query = (compression + generation) wall time / questions, warm-up excluded.

Examples::

    python benchmarks/qa.py --quick --base --gmsa-checkpoint checkpoints/smollm2-gmsa --rates 4 8
    python benchmarks/qa.py --device cuda --limit 200 --base --gmsa-checkpoint runs/keft --tcp-checkpoint runs/tcp
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402
from gmsa_rag.errors import non_negative_int, positive_int  # noqa: E402

NAME = "qa"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--data", default=None, help="QA jsonl(.gz), or a pooled QA folder such as data/qa-multidoc "
                   "(its --split laid out as the trainer's dev shows it: gold among the --max-docs - 1 hardest "
                   "distractors) (default: the bundled dev split)")
    p.add_argument("--split", default="dev", help="split of a pooled QA folder (default dev)")
    p.add_argument("--max-docs", type=positive_int, default=5, help="documents per question from a pooled QA folder (default 5)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N questions (default 200; --quick 8)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="questions per batch (default 8 on CPU, 16 on GPU)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24)
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "static"],
                   help="decoding path (gmsa_rag.engine); greedy output is the same, only speed differs")
    p.add_argument("--gold-only", action="store_true",
                   help="show each question its gold passage alone (the one-document variant; needs gold flags)")
    p.add_argument("--extractive", action="store_true",
                   help="hold every system's answers (text readers' too) to spans of the question's documents "
                        "(gmsa_rag.extractive)")
    p.add_argument("--extract-top", type=non_negative_int, default=0, metavar="K",
                   help="with --extractive: answers held to the K documents of best BM25 match to the question "
                        "(gmsa_rag.lexical); the prompt keeps every document (default 0: all documents)")
    p.add_argument("--extract-sentences", type=non_negative_int, default=0, metavar="K",
                   help="with --extractive: answers held to the K sentences of best BM25 match to the question among "
                        "the documents answers may quote (gmsa_rag.lexical; default 0: whole documents)")
    p.add_argument("--extract-penalty", type=float, default=None, metavar="NATS",
                   help="with --extractive: tokens that continue no span lose NATS instead of being forbidden, so "
                        "answers lean towards the documents' words but may leave them (default: forbidden)")
    p.add_argument("--keep-top", type=non_negative_int, default=0, metavar="K",
                   help="every system's prompt keeps only the K documents of best BM25 match to the question, best "
                        "first (a lexical rerank before the reader; default 0: all documents)")
    p.add_argument("--keep-confident", type=float, default=None, metavar="MARGIN",
                   help="with --keep-top: keep only the best match where its BM25 score leads the next by more than "
                        "MARGIN (gmsa_rag.lexical.lead; default: off)")
    p.add_argument("--best-last", action="store_true",
                   help="with --keep-top: the kept documents in the reverse order, the best match last (nearest "
                        "the question)")
    p.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search over the answers (default 1: greedy); with --extractive, over spans")
    p.add_argument("--per-document", action="store_true",
                   help="answer from each document alone, keep the answer the decoder scores best (gmsa_rag.per_document)")
    p.add_argument("--document-score", default="mean", choices=["mean", "sum"],
                   help="with --per-document: the answer's mean or summed log-probability (default mean)")
    p.add_argument("--contrast", type=float, default=0.0, metavar="ALPHA",
                   help="context-aware decoding: each token by how much the documents raise it over the question "
                        "alone, (1 + ALPHA) x with - ALPHA x without (gmsa_rag.contrast; greedy; default off)")
    p.add_argument("--expand-to", type=non_negative_int, default=0, metavar="R",
                   help="compressed systems: each document's best BM25-matching run of soft tokens read as its text, "
                        "as much as fits the decoder positions of rate R (gmsa_rag.expansion; default off)")
    p.add_argument("--expand-rate", type=positive_int, default=1, metavar="F",
                   help="with --expand-to: read the chosen run as soft tokens at rate F (the documents compressed "
                        "at F too; F divides the rate) instead of as text (default 1: text)")
    p.add_argument("--lead-rate", type=non_negative_int, default=0, metavar="F",
                   help="with --keep-top: compressed systems read each question's best BM25 match at rate F and the "
                        "other documents at the system's rate (positions spent where the answer most often is; "
                        "default 0: every document at the system's rate)")
    p.add_argument("--lead-count", type=positive_int, default=1, metavar="K",
                   help="with --lead-rate: each question's K best BM25 matches at the lead rate (default 1)")
    p.add_argument("--rates", type=positive_int, nargs="+", default=[4, 8], help="rates for compressed systems (default 4 8)")
    p.add_argument("--base", action="store_true", help="evaluate the base model on uncompressed prompts")
    p.add_argument("--nocompress-checkpoint", default=None)
    p.add_argument("--gmsa-checkpoint", default=None)
    p.add_argument("--tcp-checkpoint", default=None)
    p.add_argument("--system", type=bc.parse_system, action="append", default=[], metavar="NAME=KIND:PATH[:RATE]")
    p.add_argument("--name", default=NAME, help="output file stem (default qa)")
    return p.parse_args(argv)


def systems_from_args(args) -> tuple[list[bc.SystemSpec], list[str]]:
    from gmsa_rag.checkpoint import default_checkpoint

    notes: list[str] = []
    specs = list(args.system)
    if args.base:
        specs.append(bc.SystemSpec("base (uncompressed)", "base", args.backbone))
    if args.nocompress_checkpoint:
        specs.append(bc.SystemSpec("fine-tuned, uncompressed", "text", args.nocompress_checkpoint))
    if args.gmsa_checkpoint:
        specs.append(bc.SystemSpec("GMSA", "gmsa", args.gmsa_checkpoint))
    if args.tcp_checkpoint:
        specs.append(bc.SystemSpec("TCP-AE", "tcp", args.tcp_checkpoint))
    if not specs:
        specs.append(bc.SystemSpec("base (uncompressed)", "base", args.backbone))
        bundled = [(name, method, default_checkpoint(method)) for method, name in (("gmsa", "GMSA"), ("tcp", "TCP-AE"))]
        if args.backbone == "smollm2":  # (the bundled checkpoints were trained on SmolLM2: not beside another base)
            specs += [bc.SystemSpec(name, method, str(ckpt)) for name, method, ckpt in bundled if ckpt is not None]
        why = ("no bundled checkpoints found" if not any(c for *_, c in bundled) else
               f"the bundled checkpoints are SmolLM2's, not {args.backbone}'s")
        notes.append("No system given: the base model" + (" and the bundled checkpoints" if len(specs) > 1 else
                                                          f" only ({why})") + ".")
    return bc.expand_rates(specs, args.rates), notes


def load_model(spec: bc.SystemSpec, args, device, dtype):
    """A GMSAModel for the spec (for ``base``: a minimal wrapper around the base decoder for prompts/generation)."""
    if spec.kind == "base":
        decoder, tokenizer, notes = bc.load_decoder(spec.path or args.backbone, device, dtype, args.tokenizer)
        return bc.untrained_compressor(decoder, tokenizer, "gmsa", [], spec.path or args.backbone,
                                       encoder_layers=1, lsa_layers=0), notes
    model = bc.load_system(spec.path, device, dtype, tokenizer_name=args.tokenizer)
    notes = []
    if spec.kind in ("gmsa", "tcp") and model.config.method != spec.kind:
        notes.append(f"{spec.name}: checkpoint {spec.path} is a {model.config.method} model (system says {spec.kind}).")
    return model, notes


def evaluate(model, spec: bc.SystemSpec, examples, args, device) -> dict[str, Any]:
    from gmsa_rag.expansion import choose_expansions, expand_documents
    from gmsa_rag.metrics import answer_in_output, qa_metrics
    compressed = spec.kind in ("gmsa", "tcp")
    expanded_hits: list[float] = []  # with --expand-to: whether a question's runs read as text hold an answer

    def run(batch):
        t0 = time.perf_counter()
        questions = [e.question for e in batch]
        if compressed:
            flat = [c for e in batch for c in e.contexts]
            soft = model.compress(flat, document_rates(batch, spec.rate, args.lead_rate, args.lead_count)) if flat else []
            fine = model.compress(flat, args.expand_rate) if flat and args.expand_to and args.expand_rate > 1 else None
            contexts, i = [], 0
            for e in batch:
                contexts.append(soft[i : i + len(e.contexts)])
                if args.expand_to:
                    fine_softs = fine[i : i + len(e.contexts)] if fine is not None else None
                    chosen = choose_expansions(model, e.question, e.contexts, spec.rate, args.expand_to,
                                               args.expand_rate)
                    contexts[-1] = expand_documents(model, e.question, e.contexts, contexts[-1], spec.rate,
                                                    args.expand_to, fine_softs, args.expand_rate, chosen)
                    runs = [model.tokenizer.decode(ids[c.start : c.end]) for ids, c in chosen if c is not None]
                    expanded_hits.append(max((answer_in_output(t, e.answers) for t in runs), default=0.0))
                i += len(e.contexts)
        else:
            contexts = [list(e.contexts) for e in batch]
        bc.sync(device)
        t1 = time.perf_counter()
        extract_from = [list(e.contexts) for e in batch] if args.extractive else None  # answers: spans of these
        options: dict[str, Any] = {"num_beams": args.num_beams} if args.num_beams > 1 else {}
        if args.extract_top:
            options["extract_top"] = args.extract_top
        if args.extract_sentences:
            options["extract_sentences"] = args.extract_sentences
        if args.extract_penalty is not None:
            options["extract_penalty"] = args.extract_penalty
        if args.contrast:
            options["contrast"] = args.contrast
        if args.per_document:
            options.update(per_document=True, score=args.document_score)
        outputs = model.generate(questions, contexts, max_new_tokens=args.max_new_tokens, extract_from=extract_from,
                                 **options)
        bc.sync(device)
        prompts = ([[[d] for d in c] for c in contexts] if args.per_document  # one prompt per document
                   else [[c] for c in contexts])
        positions = [sum(len(s) for docs in ps for s in model.qa_prompt(q, docs))
                     for q, ps in zip(questions, prompts)]
        return outputs, t1 - t0, time.perf_counter() - t1, positions

    run(examples[:1])  # warm-up (kernels, allocator), untimed
    expanded_hits.clear()  # (counted over the timed questions only)
    predictions: list[str] = []
    compress_s = generate_s = 0.0
    positions: list[int] = []
    per_query_ms: list[float] = []  # each batch's time per question: its median leaves out one-off costs
    for start in bc.progress(range(0, len(examples), args.batch_size), spec.label):
        outputs, c_s, g_s, pos = run(examples[start : start + args.batch_size])
        predictions += outputs
        compress_s += c_s
        generate_s += g_s
        positions += pos
        per_query_ms.append((c_s + g_s) / len(outputs) * 1e3)
    n = len(examples)
    scores = qa_metrics(predictions, [e.answers for e in examples])
    return {
        "system": spec.label + (expansion_label(args) if compressed and args.expand_to else "")
                  + (lead_label(args) if compressed and args.lead_rate else ""),
        "kind": spec.kind, "rate": spec.rate, "checkpoint": spec.path if spec.kind != "base" else None,
        "n": n, "exact_match": scores["exact_match"], "f1": scores["f1"], "accuracy": scores["accuracy"],
        "ms_per_query": (compress_s + generate_s) / n * 1e3, "compress_ms_per_query": compress_s / n * 1e3,
        "generate_ms_per_query": generate_s / n * 1e3, "median_ms_per_query": statistics.median(per_query_ms),
        "mean_decoder_positions": sum(positions) / n,
        **({"answer_in_text_run": 100 * sum(expanded_hits) / n} if expanded_hits else {}),
        "predictions": predictions,
    }


def document_rates(batch: list, rate: int, lead_rate: int, lead_count: int = 1) -> list[int]:
    """The rate of every document of ``batch``, question by question: ``rate``; with ``lead_rate``, each question's
    first ``lead_count`` documents (with --keep-top its best matches, best first) at ``lead_rate``."""
    return [lead_rate if lead_rate and j < lead_count else rate for e in batch for j in range(len(e.contexts))]


def lead_matches(count: int) -> str:
    """The documents ``--lead-count`` reads at the lead rate, in words."""
    return "best match" if count == 1 else f"{count} best matches"


def lead_label(args) -> str:
    """What ``--lead-rate`` adds to a compressed system's name: the lead rate (and how many documents it reads)."""
    return f" lead {args.lead_rate}x" + (f" x{args.lead_count}" if args.lead_count > 1 else "")


def expansion_label(args) -> str:
    """What ``--expand-to`` adds to a compressed system's name: the run read as text or finer soft tokens."""
    return f" +{'text' if args.expand_rate == 1 else f'{args.expand_rate}x'} run to {args.expand_to}x"


def gold_only(examples: list) -> list:
    """Each example with its gold passage as the only document (examples without a marked gold are dropped)."""
    from gmsa_rag.data.qa import QAExample

    return [QAExample(e.question, e.answers, [e.gold_context], 0) for e in examples if e.gold_index is not None]


def keep_best_matching(examples: list, top: int, best_last: bool = False,
                       confident_margin: float | None = None) -> list:
    """Each example with only its ``top`` documents of best BM25 match to the question, best first (a reranker's
    order, as ``BM25Rerank`` gives them) or with ``best_last`` best last (the gold place follows its passage, None
    when it is dropped); with ``confident_margin``, only the best where its score leads the next by more than that."""
    from gmsa_rag.data.qa import at_places
    from gmsa_rag.lexical import bm25_scores, kept_places

    return [at_places(e, kept_places(bm25_scores(e.question, e.contexts), top, best_last, confident_margin))
            for e in examples]


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_as_shown

    args = parse_args(argv)
    if args.max_docs < 1:
        raise SystemExit(f"--max-docs must be at least 1, got {args.max_docs}")
    if args.extract_top < 0 or args.keep_top < 0 or args.extract_sentences < 0:
        raise SystemExit("--extract-top, --extract-sentences and --keep-top must be 0 (all) or more")
    if (args.best_last or args.keep_confident is not None) and not args.keep_top:
        raise SystemExit("--best-last and --keep-confident act on the documents --keep-top keeps: add --keep-top")
    if args.lead_rate and (not args.keep_top or args.best_last or args.expand_to):
        raise SystemExit("--lead-rate reads the best BM25 match first at its own rate: add --keep-top, without "
                         "--best-last or --expand-to")
    if args.lead_count > 1 and not args.lead_rate:
        raise SystemExit("--lead-count says how many best matches --lead-rate reads: add --lead-rate")
    if args.keep_confident is not None and args.keep_confident < 0:
        raise SystemExit(f"--keep-confident must be 0 or more, got {args.keep_confident}")
    if args.extract_penalty is not None and not args.extract_penalty > 0:
        raise SystemExit(f"--extract-penalty must be > 0 nats, got {args.extract_penalty}")
    for flag, value in (("--extract-top", args.extract_top), ("--extract-sentences", args.extract_sentences),
                        ("--extract-penalty", args.extract_penalty)):
        if value and not args.extractive:
            raise SystemExit(f"{flag} acts on extractive answers: add --extractive")
        if value and args.per_document:
            raise SystemExit(f"{flag} does not combine with --per-document")
    if args.contrast < 0 or (args.contrast and (args.num_beams > 1 or args.per_document)):
        raise SystemExit("--contrast: a positive alpha, greedy (no --num-beams) and not --per-document")
    if args.expand_to < 0 or (args.expand_to and args.expand_to >= min(args.rates)):
        raise SystemExit(f"--expand-to {args.expand_to}: a budget's rate must be below every compressed rate "
                         f"({min(args.rates)}x here)")
    if args.expand_rate < 1 or (args.expand_rate > 1 and (not args.expand_to or args.expand_rate >= args.expand_to
                                                          or any(r % args.expand_rate for r in args.rates))):
        raise SystemExit(f"--expand-rate {args.expand_rate}: with --expand-to, below its rate and dividing every "
                         "compressed rate")
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    args.limit = args.limit or (8 if args.quick else 200)
    args.batch_size = args.batch_size or (8 if device.type == "cpu" else 16)
    torch.manual_seed(args.seed)
    out_dir = args.out or bc.default_out_dir(device)
    data = Path(args.data) if args.data else bc.find_qa_file("dev")
    if data is None:
        raise SystemExit("no QA data: pass --data FILE.jsonl(.gz) or build the bundled dev split "
                         "(python -m gmsa_rag.data.build_nq)")
    if not data.exists():
        raise SystemExit(f"no QA data at {data}")
    try:
        examples = load_as_shown(data, args.split, args.limit, args.max_docs)
    except FileNotFoundError as err:
        raise SystemExit(f"{data}: {err}") from err
    if not examples:
        raise SystemExit(f"{data} holds no examples")
    if args.gold_only:
        examples = gold_only(examples)
        if not examples:
            raise SystemExit(f"{data}: no example marks a gold passage (isgold), so --gold-only has nothing to show")
    if args.keep_top:
        examples = keep_best_matching(examples, args.keep_top, args.best_last, args.keep_confident)
    specs, notes = systems_from_args(args)
    bc.check_checkpoints(specs)  # (before any model loads)

    rows: list[dict[str, Any]] = []
    groups: dict[tuple, list[bc.SystemSpec]] = {}
    for s in specs:
        groups.setdefault((s.kind if s.kind == "base" else "ckpt", s.path), []).append(s)
    for (_, _), group in groups.items():
        model, load_notes = load_model(group[0], args, device, dtype)
        model.generation_engine = args.engine
        notes += load_notes
        for spec in group:
            row = evaluate(model, spec, examples, args, device)
            rows.append(row)
            print(f"{row['system']:<32} EM {row['exact_match']:5.1f}  F1 {row['f1']:5.1f}  acc {row['accuracy']:5.1f}  "
                  f"{row['ms_per_query']:8.1f} ms/query  ({row['mean_decoder_positions']:.0f} positions)", flush=True)
        del model
        bc.free()

    ctx_counts = sorted({len(e.contexts) for e in examples})
    meta = {**bc.env_info(device, dtype), "data": str(data), "questions": len(examples),
            "documents_per_question": ctx_counts if len(ctx_counts) > 1 else ctx_counts[0],
            "documents": ("gold passage only" if args.gold_only else "as in the file (gold among distractors)")
                         + (f", the {args.keep_top} of best BM25 match kept" if args.keep_top else "")
                         + (", best last" if args.best_last else "")
                         + (f", compressed systems read the {lead_matches(args.lead_count)} at {args.lead_rate}x"
                            if args.lead_rate else "")
                         + (f", only the best where its BM25 score leads by more than {args.keep_confident}"
                            if args.keep_confident is not None else ""),
            "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens, "engine": args.engine,
            "decoding": ("greedy" if args.num_beams == 1 else f"beam search, {args.num_beams} beams")
                        + (f", context-aware (alpha {args.contrast}: against the question without documents)"
                           if args.contrast else "")
                        + (", extractive (answers held to spans of the documents)"
                           if args.extractive and args.extract_penalty is None else "")
                        + (f", leaning extractive (tokens that continue no span of the documents lose "
                           f"{args.extract_penalty:g} nats)" if args.extract_penalty is not None else "")
                        + (f", held to the {args.extract_top} of best BM25 match" if args.extract_top else "")
                        + (f", then to the {args.extract_sentences} sentence(s) of best BM25 match"
                           if args.extract_sentences else "")
                        + (f", per document (each document answered alone, the answer of best {args.document_score} "
                           "log-probability kept)" if args.per_document else "")}
    notes += [
        "EM / F1: SQuAD normalisation, best over gold answers; accuracy: a gold answer appears in the output "
        "(Lost in the Middle). All in percent.",
        f"Latency: wall time of compression (documents one by one, batched) + generation (the model's engine: the "
        f"static cache on CUDA for greedy decoding, HF generate otherwise; max {args.max_new_tokens} new tokens, "
        f"batches of {args.batch_size}) divided by the questions (total ms/q), and the median over batches of a "
        "batch's time per question (median ms/q: leaves out one-off costs such as compiling for a new cache length); "
        "one warm-up question untimed. Positions: mean decoder input length (with --per-document: of a question's prompts together).",
    ]
    if args.expand_to:
        notes.append(f"--expand-to {args.expand_to}: each compressed document's run of soft tokens of best BM25 match "
                     + ("read as the tokens it stands for" if args.expand_rate == 1 else
                        f"read as its {args.expand_rate}x soft tokens")
                     + f", within {args.expand_to}x's decoder positions "
                     "(gmsa_rag.expansion); the run held an answer for "
                     + ", ".join(f"{r['answer_in_text_run']:.1f}% of questions ({r['system']})"
                                 for r in rows if "answer_in_text_run" in r) + ".")
    C = bc.Column
    columns = [C("system", "system"), C("n", "n"), C("exact_match", "EM", 1), C("f1", "F1", 1),
               C("accuracy", "accuracy", 1), C("mean_decoder_positions", "decoder positions", 0),
               C("compress_ms_per_query", "compress ms/q", 1), C("ms_per_query", "total ms/q", 1),
               C("median_ms_per_query", "median ms/q", 1)]
    fig = plot(rows)
    table_rows = [{k: v for k, v in r.items() if k != "predictions"} for r in rows]
    outputs = [{"question": e.question, "answers": e.answers,
                **{r["system"]: r["predictions"][i] for r in rows}} for i, e in enumerate(examples)]
    paths = bc.write_outputs(out_dir, args.name, f"Multi-document QA ({meta['machine']})", meta,
                             [("Results", columns, table_rows)], fig, notes, {"rows": table_rows, "outputs": outputs})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": table_rows, "paths": paths, "meta": meta}


def plot(rows):
    fig, axes = bc.new_figure(ncols=2, width=6.5, height=4.5)
    ax, ax_t = axes[0]
    labels = [r["system"] for r in rows]
    x = list(range(len(rows)))
    for i, (key, name) in enumerate((("exact_match", "EM"), ("f1", "F1"), ("accuracy", "accuracy"))):
        ax.bar([xi + (i - 1) * 0.27 for xi in x], [r[key] for r in rows], 0.27, label=name)
    ax.set_ylabel("%")
    ax.set_title("QA quality")
    ax.legend(fontsize=8)
    ax_t.bar(x, [r["generate_ms_per_query"] for r in rows], 0.6, label="generation")
    ax_t.bar(x, [r["compress_ms_per_query"] for r in rows], 0.6, bottom=[r["generate_ms_per_query"] for r in rows],
             label="compression")
    ax_t.set_ylabel("ms per query (batched)")
    ax_t.set_title("latency")
    ax_t.legend(fontsize=8)
    for a in (ax, ax_t):
        a.set_xticks(x)
        a.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
        a.grid(True, axis="y", alpha=0.3)
    return fig


if __name__ == "__main__":
    main()
