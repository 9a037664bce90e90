#!/usr/bin/env python
"""Document attention: does the reader look at the gold document while it answers?

For the first N dev questions (a pooled folder laid out as the trainer's dev lays it out: the gold passage among
its hardest distractors), each system reads the question's documents and is teacher-forced on the gold answer. At
the positions that predict the answer tokens, the attention each head gives to each document (summed over the
document's positions, soft tokens or text tokens) is split into shares over the documents:

  gold share      the share of the document attention that goes to the gold document (chance: 1 / documents),
                  mean over heads, layers and questions; per layer in the plot
  gold first      how often the gold document gets the most attention (mean over heads and layers)
  best head       the gold share of the head that finds the gold document best (layer.head), mean over questions
  on documents    the share of all attention (to every earlier position) that goes to the documents at all

and, inside the gold document, whether it looks at the answer:

  answer share    of the attention on the gold document, the share on the positions that hold the answer (text
                  tokens overlapping its first occurrence; soft tokens whose group holds one of them), against
                  chance (those positions' share of the document's), mean over heads, layers and questions

Systems: the GMSA checkpoint reading soft tokens at ``--rate``; the base model (the checkpoint's decoder with its
adapter off) reading the same documents as text; ``--teacher``, a no-compress fine-tune reading them as text. Each
document is tokenized once, as the encoder tokenizes it, so every system sees the same layout. A reader that
answers from the gold document should look at it: if the text readers do and the soft-token reader spreads its
attention evenly, finding the document among its distractors is what the soft tokens lack; if it finds the
document but not the answer inside it, reading is.

    python benchmarks/document_attention.py --checkpoint checkpoints/smollm2-gmsa --data data/qa-multidoc \\
        --teacher runs/nc/s2-long-nocompress/checkpoints/step-0000800 --limit 32
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "document-attention"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N dev questions (default 16 on CPU, 128 on GPU)",
                      checkpoint_help="a GMSA checkpoint with a decoder adapter (default: the bundled one)")
    p.add_argument("--teacher", default=None, help="a no-compress fine-tune reading the text (optional)")
    p.add_argument("--rate", type=int, default=4)
    p.add_argument("--max-docs", type=int, default=5, help="documents a pooled folder's question shows (default 5)")
    return p.parse_args(argv)


def spans(prompt: Sequence, documents: Sequence[int]) -> tuple[list[tuple[int, int]], range]:
    """(start, end) positions of the given segments of a prompt, and the positions that predict its target tokens."""
    starts, at = [], 0
    for segment in prompt:
        starts.append(at)
        at += len(segment)
    target = len(prompt[-1])
    if not prompt[-1].is_target:
        raise ValueError("document_attention needs prompts with a target (the answer)")
    return [(starts[i], starts[i] + len(prompt[i])) for i in documents], range(at - target - 1, at - 1)


def answer_tokens(tokenizer, document: str, answers: Sequence[str]) -> list[int]:
    """Indices of the document's tokens (as the encoder tokenizes it) that overlap the first gold answer found in
    it, case-insensitively ([] if none is)."""
    low = document.lower()
    found = [(low.find(a.lower()), len(a)) for a in answers if a.strip() and a.lower() in low]
    if not found:
        return []
    begin, length = found[0]
    offsets = tokenizer(document, return_offsets_mapping=True, add_special_tokens=False)["offset_mapping"]
    return [i for i, (a, b) in enumerate(offsets) if a < begin + length and b > begin]


def soft_answer_positions(rate: int, window: int, n_tokens: int, answer: Sequence[int]) -> list[int]:
    """The soft tokens of a document of ``n_tokens`` tokens whose group (``rate`` tokens of an encoder window, as
    group merging forms them) holds one of the ``answer`` token indices."""
    groups = [(g, min(g + rate, end)) for start in range(0, n_tokens, window)
              for end in [min(start + window, n_tokens)] for g in range(start, end, rate)]
    return [j for j, (a, b) in enumerate(groups) if any(a <= t < b for t in answer)]


@torch.no_grad()
def reading_attention(model, prompt: Sequence, adapter: bool) -> torch.Tensor:
    """The attention of the positions that predict the answer tokens, per layer and head, over every position of
    the prompt ([layers, heads, T], the mean over those positions)."""
    _, readers = spans(prompt, [])
    batch = model.build_batch([prompt])
    with model.decoder_adapter(adapter):
        out = model.decoder.get_decoder()(inputs_embeds=batch.inputs_embeds, output_attentions=True, use_cache=False)
    return torch.stack([a[0, :, readers.start:readers.stop].float().mean(1) for a in out.attentions])


def measure(model, prompts: Sequence[Sequence], documents: Sequence[Sequence[int]], golds: Sequence[int],
            answers: Sequence[Sequence[int]], adapter: bool) -> dict[str, Any]:
    """One system's figures over all questions (see the module docstring); ``answers``: each prompt's positions
    holding the answer inside the gold document ([] where it was not found)."""
    gold, first, on_docs, in_answer, answer_chance = [], [], [], [], []
    for prompt, docs, g, answer in zip(prompts, documents, golds, answers):
        weights = reading_attention(model, prompt, adapter)  # [L, heads, T]
        doc_spans, _ = spans(prompt, docs)
        mass = torch.stack([weights[..., a:b].sum(-1) for a, b in doc_spans], dim=-1)  # [L, heads, D]
        shares = mass / mass.sum(-1, keepdim=True).clamp(min=1e-12)
        gold.append(shares[..., g])  # [L, heads]
        first.append((shares.argmax(-1) == g).float())
        on_docs.append(mass.sum(-1))
        if answer:
            in_answer.append(weights[..., answer].sum(-1) / mass[..., g].clamp(min=1e-12))
            answer_chance.append(len(answer) / (doc_spans[g][1] - doc_spans[g][0]))
    gold_t, first_t = torch.stack(gold), torch.stack(first)  # [Q, L, heads]
    per_head = gold_t.mean(0)
    layer, head = divmod(int(per_head.argmax()), per_head.shape[1])
    row = {"gold_share": float(gold_t.mean()), "gold_first": float(first_t.mean()),
           "best_head": f"{layer + 1}.{head}", "best_head_share": float(per_head.max()),
           "on_documents": float(torch.stack(on_docs).mean()),
           "gold_share_per_layer": gold_t.mean((0, 2)).tolist(), "answer_questions": len(in_answer)}
    if in_answer:
        answer_t = torch.stack(in_answer)  # [Q', L, heads]
        chance = sum(answer_chance) / len(answer_chance)
        per_head = answer_t.mean(0)
        layer, head = divmod(int(per_head.argmax()), per_head.shape[1])
        row.update({"answer_share": float(answer_t.mean()), "answer_chance": chance,
                    "answer_lift": float(answer_t.mean()) / chance, "answer_best_head": f"{layer + 1}.{head}",
                    "answer_best_head_share": float(per_head.max()),
                    "answer_share_per_layer": answer_t.mean((0, 2)).tolist()})
    return row


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_as_shown
    from gmsa_rag.prompt import qa_segments
    from gmsa_rag.samples import Sample, build_prompts, token_ids

    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=16, gpu_limit=128)
    if args.teacher and not Path(args.teacher).exists():
        raise SystemExit(f"--teacher {args.teacher}: no such checkpoint")
    if args.max_docs < 2:
        raise SystemExit("--max-docs must be at least 2 (one gold document among others)")
    examples = [e for e in load_as_shown(data, "dev", limit=limit, max_docs=args.max_docs) if e.gold_index is not None]
    if not examples:
        raise SystemExit(f"{data}: no dev question marks its gold passage")
    student = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    student.config.check_rate(args.rate)
    if not student.decoder_parameters():
        raise SystemExit(f"{checkpoint} has no decoder adapter (stage 2 trains one: give a checkpoint that has it)")
    readers = [("GMSA " + f"{args.rate}x soft tokens", student, True, True), ("base model, text", student, False, False)]
    if args.teacher:
        readers.append(("no-compress fine-tune, text", bc.load_system(args.teacher, device, dtype,
                                                                       backbone=args.backbone), False, True))
    for _, model, _, _ in readers:
        model.decoder.set_attn_implementation("eager")  # the fused kernels return no attention weights

    samples = [Sample(list(e.contexts), e.answers[0], question=e.question, rate=args.rate) for e in examples]
    soft_prompts = [p for s in samples for p in build_prompts(student, [s])]
    documents = [[i for i, seg in enumerate(p) if seg.embeds is not None] for p in soft_prompts]
    text_prompts = [qa_segments(student.tokenizer, s.question, token_ids(student, s.documents), s.target)
                    for s in samples]
    if any(len(t) != len(p) for t, p in zip(text_prompts, soft_prompts)):  # same segments, one per document
        raise SystemExit("document_attention: the text and soft-token prompts do not share a layout")
    golds = [e.gold_index for e in examples]
    text_answers, soft_answers = [], []
    for e, s, text, soft, docs in zip(examples, samples, text_prompts, soft_prompts, documents):
        tokens = answer_tokens(student.tokenizer, e.contexts[e.gold_index], e.answers)
        doc = docs[e.gold_index]
        text_at, soft_at = (sum(len(seg) for seg in p[:doc]) for p in (text, soft))
        text_answers.append([text_at + t for t in tokens])
        soft_answers.append([soft_at + j for j in soft_answer_positions(args.rate, student.config.window,
                                                                          len(text[doc]), tokens)])
    rows = []
    for name, model, soft, adapter in readers:
        prompts, answers = (soft_prompts, soft_answers) if soft else (text_prompts, text_answers)
        rows.append({"system": name, **measure(model, prompts, documents, golds, answers, adapter)})
        print(f"{name}: gold share {rows[-1]['gold_share']:.3f}", flush=True)

    chance = sum(1 / len(d) for d in documents) / len(documents)
    C = bc.Column
    columns = [C("system", "reader"), C("gold_share", "gold share", 3), C("gold_first", "gold first", 3),
               C("best_head", "best head"), C("best_head_share", "its gold share", 3),
               C("on_documents", "attention on documents", 3)]
    answer_columns = [C("system", "reader"), C("answer_questions", "questions", 0),
                      C("answer_share", "answer share", 3), C("answer_chance", "chance", 3),
                      C("answer_lift", "answer share / chance", 2), C("answer_best_head", "best head"),
                      C("answer_best_head_share", "its answer share", 3)]
    fig, axes = bc.new_figure(ncols=2, width=6.0, height=4.0)
    for ax, key, label, line in ((axes[0][0], "gold_share_per_layer", "gold document's share of document attention",
                                  chance),
                                 (axes[0][1], "answer_share_per_layer", "answer's share of gold-document attention",
                                  None)):
        for row in rows:
            if key in row:
                ax.plot(range(1, len(row[key]) + 1), row[key], "-o", ms=3, label=row["system"])
        if line is not None:
            ax.axhline(line, color="gray", ls="--", lw=1, label=f"chance ({line:.2f})")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "teacher": args.teacher,
            "data": str(data), "questions": len(examples), "rate": args.rate, "chance": chance}
    notes = [f"Data: the first {len(examples)} dev questions of {data} as an evaluation shows them (at most "
             f"{args.max_docs} documents, the gold one at place index mod count), teacher-forced on the first gold "
             f"answer; soft tokens at {args.rate}x.",
             "Attention from the positions that predict the answer tokens, each head's weights summed over a "
             "document's positions; shares over the documents, then the mean over positions, heads and layers "
             f"(gold first: the gold document's share is the largest). Chance: {chance:.3f}.",
             "Answer share: of the attention on the gold document, the share on the positions that hold the answer "
             "(the text tokens overlapping its first occurrence there; for soft tokens, those whose group holds one of "
             "them); chance: those positions' share of the document's. Questions whose answer is not in the gold "
             "document's text are left out of it.",
             "Eager attention (the weights themselves); the same model otherwise, fp32 on the CPU."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Document attention ({meta['machine']})", meta,
                             [("Which document", columns, rows),
                              ("Where in the gold document", answer_columns, [r for r in rows if "answer_share" in r])],
                             fig, notes, {"rows": rows})
    print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
