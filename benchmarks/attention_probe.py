#!/usr/bin/env python
"""Attention probe: does the decoder look at the gold document when it starts to answer?

For each question, the product's 5-document prompt (the gold passage among its hardest distractors, gold at place
i mod 5 as the trainer's dev evaluation shows it) goes through the decoder once; the attention of the last prompt
position (whose output is the first answer token) is split over the documents' spans, per layer, averaged over
heads. Reported per system:

  docs mass     share of that attention on the documents at all (the rest: instruction, labels, question, sink)
  gold share    share of the documents' attention on the gold document; chance = its share of the documents' positions
  lift          gold share / chance (1 = no preference for the gold document)
  gold top      % of questions whose gold document gets the most attention per position (chance: 1 in 5)

Systems: GMSA at each rate (documents compressed one by one; its decoder adapter on), the base model reading the
documents as text (adapter off) and, with ``--text-checkpoint``, a no-compress fine-tune reading them as text.
Text documents enter as their token embeddings in separate spans, so their positions are exact; they are tokenized
on their own rather than inside the whole prompt (a token or two may differ at each boundary).

    python benchmarks/attention_probe.py --checkpoint runs/s2/checkpoints/step-0000345 --text-checkpoint runs/nc/... --limit 40
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "attention-probe"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions with a gold passage (default 40 CPU, 200 GPU)")
    p.add_argument("--text-checkpoint", default=None, help="a no-compress fine-tune to probe on text too")
    p.add_argument("--rates", type=int, nargs="+", default=[4])
    p.add_argument("--max-docs", type=int, default=5, help="documents per prompt (gold + hardest distractors)")
    return p.parse_args(argv)


@torch.no_grad()
def document_attention(model, question: str, documents: list, adapter: bool) -> tuple[torch.Tensor, list[int]]:
    """[layers, documents] attention mass of the last prompt position on each document's span (mean over heads),
    and each span's length in positions.

    ``documents`` are soft-token tensors or texts (fed as their token embeddings, so every span is exact)."""
    from gmsa_rag.prompt import qa_segments

    embed = model.embed_tokens
    spans = [d if isinstance(d, torch.Tensor) else embed(torch.tensor(model.tokenize([d])[0], device=model.device))
             for d in documents]
    segments = qa_segments(model.tokenizer, question, spans)
    bounds, pos = [], 0
    for seg in segments:
        if seg.embeds is not None:
            bounds.append((pos, pos + len(seg)))
        pos += len(seg)
    batch = model.build_batch([segments])
    stack = model.decoder.get_decoder()
    with model.decoder_adapter(adapter):
        out = stack(inputs_embeds=batch.inputs_embeds, output_attentions=True, use_cache=False)
    last = torch.stack([a[0, :, -1, :].float().mean(0) for a in out.attentions])  # [layers, T]
    return torch.stack([last[:, a:b].sum(-1) for a, b in bounds], dim=-1), [b - a for a, b in bounds]


def summarise(name: str, masses: list[torch.Tensor], lengths: list[list[int]], gold: list[int]) -> dict[str, Any]:
    """Means over questions of the probe's figures (and the per-layer lift curve)."""
    docs_mass, share, chance, top, lift_layers = [], [], [], [], []
    for mass, lens, g in zip(masses, lengths, gold):
        total = mass.sum(-1)  # [layers]
        length = torch.tensor(lens, dtype=torch.float)
        docs_mass.append(total.mean().item())
        s = (mass[:, g] / total.clamp(min=1e-9))
        c = (length[g] / length.sum()).item()
        share.append(s.mean().item())
        chance.append(c)
        lift_layers.append(s / c)
        per_position = mass.mean(0) / length
        top.append(float(int(per_position.argmax()) == g))
    n = len(masses)
    curve = torch.stack(lift_layers).mean(0)
    return {"system": name, "n": n, "docs_mass": 100 * sum(docs_mass) / n, "gold_share": 100 * sum(share) / n,
            "chance": 100 * sum(chance) / n, "lift": sum(s / c for s, c in zip(share, chance)) / n,
            "gold_top": 100 * sum(top) / n, "lift_by_layer": curve.tolist()}


def use_eager_attention(model) -> None:
    """Attention weights are returned only by the eager implementation."""
    decoder = model.decoder
    if hasattr(decoder, "set_attn_implementation"):
        decoder.set_attn_implementation("eager")
    else:
        decoder.config._attn_implementation = "eager"


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.train import dev_qa_sample

    args = parse_args(argv)
    device, dtype, checkpoint, data, limit = bc.probe_setup(args, cpu_limit=40, gpu_limit=200)
    examples = bc.gold_questions(data, args.split)[:limit]
    prompts = [dev_qa_sample(e, None, args.max_docs, i).documents for i, e in enumerate(examples)]
    gold = [docs.index(e.gold_context) for docs, e in zip(prompts, examples)]
    torch.manual_seed(args.seed)

    rows = []

    def run(name: str, model, docs_of, adapter: bool) -> None:
        masses, lengths = [], []
        for e, docs in zip(examples, prompts):
            mass, spans = document_attention(model, e.question, docs_of(docs), adapter)
            masses.append(mass.cpu())
            lengths.append(spans)
        rows.append(summarise(name, masses, lengths, gold))
        print(f"{name}: lift {rows[-1]['lift']:.2f}, gold top {rows[-1]['gold_top']:.1f}%", flush=True)

    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    use_eager_attention(model)
    run("base, text", model, lambda docs: docs, adapter=False)
    for rate in [r for r in args.rates if r in model.config.rates]:
        run(f"GMSA {rate}x", model, lambda docs, r=rate: model.compress(docs, r), adapter=True)
    if args.text_checkpoint:
        bc.free(model)
        model = bc.load_system(args.text_checkpoint, device, dtype, backbone=args.backbone)
        use_eager_attention(model)
        run("fine-tune, text", model, lambda docs: docs, adapter=model.config.decoder_adapter == "always")

    C = bc.Column
    columns = [C("system", "system"), C("n", "n", 0), C("docs_mass", "attention on documents %", 1),
               C("gold_share", "gold share of it %", 1), C("chance", "gold share by length %", 1),
               C("lift", "lift", 2), C("gold_top", "gold most attended %", 1)]
    fig, axes = bc.new_figure(width=7.0, height=4.0)
    ax = axes[0][0]
    for row in rows:
        ax.plot(range(len(row["lift_by_layer"])), row["lift_by_layer"], marker=".", label=row["system"])
    ax.axhline(1.0, color="tab:gray", lw=1, ls="--")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("gold share / chance (last prompt position)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "text_checkpoint": args.text_checkpoint,
            "data": str(data), "questions": len(examples), "max_docs": args.max_docs}
    notes = [f"Data: the first {len(examples)} questions of {data} with a marked gold passage; the gold passage among "
             f"its {args.max_docs - 1} hardest distractors (stored order), at place i mod {args.max_docs} for question i.",
             "Attention of the last prompt position (it predicts the first answer token), per layer, mean over heads; "
             "lift and gold share are means over questions of per-layer means."]
    out_dir = args.out or bc.default_out_dir(device)
    table = [{k: v for k, v in r.items() if k != "lift_by_layer"} for r in rows]
    paths = bc.write_outputs(out_dir, args.name, f"Attention probe ({meta['machine']})", meta,
                             [("Results", columns, table)], fig, notes, {"rows": rows})
    print(bc.markdown_table(columns, table))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
