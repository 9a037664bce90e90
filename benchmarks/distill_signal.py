#!/usr/bin/env python
"""Distillation signal: what stage 2's loss terms say on a checkpoint, before a GPU run spends time on them.

For the first N dev questions (a pooled folder laid out as the trainer's dev lays it out: the gold passage among its
hardest distractors), a student (GMSA checkpoint) reading the documents as soft tokens at one rate, and a teacher
reading them as text, each document as the encoder tokenized it (``--teacher``: a no-compress fine-tune; default:
the base model), the terms ``GMSAModel.forward`` mixes:

  ce       answer cross-entropy per token (teacher-forced)
  kl       KL(teacher || student) on the answer tokens          (``--distill_weight``)
  hidden   1 - cosine between the two decoders' hidden states, mean over layers and over the positions after the
           documents (question, chat turn, answer)              (``--distill_hidden_weight``)
  soft     1 - cosine between each soft token's states and the teacher's mean state over the text tokens it stands
           for, mean over layers and soft tokens                (``--distill_soft_weight``)

each with the norm of its gradient on the weights stage 2 trains (the decoder adapter; ``--compressor`` adds the
encoder LoRA and LSA), taken on the mean over all N questions. The ratio of the answer loss's gradient to a term's
is the weight that makes the term as strong as the answer loss. The same terms with another question's documents
as soft tokens (the teacher still reads the right ones) show whether a term tells right from wrong content.

    python benchmarks/distill_signal.py --checkpoint checkpoints/smollm2-gmsa \\
        --teacher runs/nc/s2-long-nocompress/checkpoints/step-0000800 --data data/qa-multidoc --limit 16
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "distill-signal"
TERMS = ("ce", "kl", "hidden", "soft")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N dev questions (default 8 on CPU, 64 on GPU)",
                      checkpoint_help="the student: a GMSA checkpoint (default: the bundled one)")
    p.add_argument("--teacher", default=None, help="a no-compress fine-tune reading the text (default: the base model)")
    p.add_argument("--rate", type=int, default=4)
    p.add_argument("--max-docs", type=int, default=5, help="documents a pooled folder's question shows (default 5)")
    p.add_argument("--batch-size", type=int, default=4, help="questions per forward pass")
    p.add_argument("--compressor", action="store_true", help="also take gradients on the encoder LoRA and LSA")
    return p.parse_args(argv)


def signal(student, teacher, examples, rate: int, batch_size: int) -> dict[str, Any]:
    """Mean terms with the own and another question's documents, per-layer hidden distances, and the gradient norm of
    each own-document term (of its mean over all questions) on the student's trainable weights."""
    from gmsa_rag.samples import Sample

    params = [p for p in student.parameters() if p.requires_grad]
    grads = {term: [torch.zeros_like(p, dtype=torch.float32) for p in params] for term in TERMS}
    sums: dict[str, Any] = {}
    n = len(examples)
    for start in range(0, n, batch_size):
        batch = range(start, min(start + batch_size, n))
        share = len(batch) / n
        text = [Sample(list(examples[i].contexts), examples[i].answers[0], question=examples[i].question) for i in batch]
        for docs in ("own", "other"):
            shown = [examples[i if docs == "own" else (i + 1) % n].contexts for i in batch]
            samples = [Sample(list(d), t.target, question=t.question, rate=rate) for d, t in zip(shown, text)]
            with torch.enable_grad() if docs == "own" else torch.no_grad():
                terms = student.distillation_terms(samples, teacher, hidden=True, soft=docs == "own", text_samples=text)
                if docs == "own":
                    for term in TERMS:
                        found = torch.autograd.grad(terms[term], params, retain_graph=True, allow_unused=True)
                        for total, g in zip(grads[term], found):
                            if g is not None:
                                total += share * g.float()
            for name, value in terms.items():
                key = f"{docs}:{name}"
                sums[key] = sums.get(key, 0) + share * value.detach().float().cpu()
    norms = {term: float(torch.sqrt(sum(g.pow(2).sum() for g in grads[term]))) for term in TERMS}
    return {"terms": {k: v.tolist() if v.dim() else float(v) for k, v in sums.items()}, "grad_norms": norms,
            "trainable": sum(p.numel() for p in params)}


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_as_shown

    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=8, gpu_limit=64)
    if args.teacher and not Path(args.teacher).exists():
        raise SystemExit(f"--teacher {args.teacher}: no such checkpoint")
    if args.max_docs < 1 or args.batch_size < 1:
        raise SystemExit("--max-docs and --batch-size must be at least 1")
    examples = load_as_shown(data, "dev", limit=limit, max_docs=args.max_docs)
    if len(examples) < 2:
        raise SystemExit(f"{data}: needs at least 2 dev questions (another question's documents are one condition)")
    student = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    student.config.check_rate(args.rate)
    if not student.decoder_parameters():
        raise SystemExit(f"{checkpoint} has no decoder adapter (stage 2 trains one: give a checkpoint that has it)")
    student.set_stage("keft")
    if args.compressor:
        for p in student.compressor_parameters().values():
            p.requires_grad_(True)
    teacher = None
    if args.teacher:
        teacher = bc.load_system(args.teacher, device, dtype, backbone=args.backbone)
        teacher.requires_grad_(False)
    torch.manual_seed(args.seed)
    result = signal(student, teacher, examples, args.rate, args.batch_size)

    terms, norms = result["terms"], result["grad_norms"]
    rows = [{"term": term, "own": terms[f"own:{term}"], "other": terms.get(f"other:{term}"),
             "own_vs_other": terms[f"own:{term}"] / terms[f"other:{term}"] if terms.get(f"other:{term}") else None,
             "grad_norm": norms[term], "weight_to_match_ce": norms["ce"] / norms[term] if norms[term] else None}
            for term in TERMS]
    C = bc.Column
    columns = [C("term", "term"), C("own", "own documents", 4), C("other", "another question's", 4),
               C("own_vs_other", "own / other", 2), C("grad_norm", "gradient norm (own)", 4),
               C("weight_to_match_ce", "weight matching ce's gradient", 1)]
    fig, axes = bc.new_figure(width=6.5, height=4.0)
    ax = axes[0][0]
    for term, color in (("hidden", "tab:blue"), ("soft", "tab:orange")):
        for docs, style in (("own", "-o"), ("other", "--s")):
            per_layer = terms.get(f"{docs}:{term}_per_layer")
            if per_layer is None:
                continue
            ax.plot(range(1, len(per_layer) + 1), per_layer, style, color=color, ms=3, label=f"{term}, {docs} documents")
    ax.set_xlabel("decoder layer (the last: after the final norm)")
    ax.set_ylabel("1 - cosine to the teacher's state")
    ax.legend(fontsize=8)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "teacher": args.teacher or "base model",
            "data": str(data), "questions": len(examples), "rate": args.rate, "trainable": result["trainable"]}
    notes = [f"Data: the first {len(examples)} dev questions of {data} as an evaluation shows them "
             f"(at most {args.max_docs} documents), soft tokens at {args.rate}x; target: the first gold answer.",
             "another question's: the student reads the next question's documents as soft tokens; the teacher still "
             "reads the question's own documents as text (soft has no such control: its teacher states are those "
             "of the very text each soft token stands for).",
             f"Gradients on {result['trainable']:,} trainable weights (stage 2's "
             f"{'decoder adapter, encoder LoRA and LSA' if args.compressor else 'decoder adapter'}), of each term's "
             "mean over all the questions."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Distillation signal ({meta['machine']})", meta,
                             [("Results", columns, rows)], fig, notes, {"rows": rows, **result})
    print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths, **result}


if __name__ == "__main__":
    main()
