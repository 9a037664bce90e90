#!/usr/bin/env python
"""Does the decoder read soft tokens the way it reads text? (seconds on a CPU)

For QA prompts that hold each question's gold passage as soft tokens (the product's prompt, decoder adapter on),
it reports per decoder layer the mean cosine between each position's hidden state and its input embedding, for
soft-token positions and for text positions, and the RMS of soft tokens against that of token embeddings. Text
states turn away from their input within a layer or two (the model contextualises them); soft tokens that keep a
cosine near 1 deep into the decoder are a static memory its attention copies from, not content it processes.

A second table asks how much of the soft tokens is one vector shared by all documents: each soft token's cosine
with the mean soft token (over all passages), and the share of their energy in the few coordinates where that
mean is largest, beside the same figures for the text hidden states at the middle decoder layer (the base model's
"massive activations" live in a few coordinates too). Soft tokens that are mostly one shared vector can be walked
through by position (restoring) but hardly told apart by content (finding one document among several).

    python benchmarks/soft_token_states.py --checkpoint checkpoints/smollm2-gmsa-ae --limit 8 --rates 4
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "soft-token-states"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_probe_args(p, NAME, "first N questions with a gold passage", limit_default=8)
    p.add_argument("--rates", type=int, nargs="+", default=[4])
    return p.parse_args(argv)


@torch.no_grad()
def layer_cosines(model, examples, rate: int) -> tuple[list[float], list[float], float]:
    """Mean cosine(input, layer state) per layer for soft and text positions, and the soft tokens' mean RMS."""
    from gmsa_rag.prompt import assemble, qa_segments

    soft_columns, text_columns, rms = [], [], []  # [layers, positions] cosines of each prompt
    soft_tokens, text_states = [], []  # every soft token; text positions' hidden states at the middle layer
    for example in examples:
        soft = model.compress([example.gold_context], rate)
        rms.append(soft[0].float().pow(2).mean(-1).sqrt().mean().item())
        soft_tokens.append(soft[0].float().cpu())
        segments = qa_segments(model.tokenizer, example.question, soft)
        batch = assemble([segments], model.embed_tokens)
        is_soft = torch.zeros(batch.inputs_embeds.shape[1], dtype=torch.bool)
        position = 0
        for segment in segments:
            if segment.embeds is not None:
                is_soft[position : position + len(segment)] = True
            position += len(segment)
        with model.decoder_adapter(model.adapter_wanted([segments])):
            states = model.decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                                   output_hidden_states=True).hidden_states
        inputs = states[0][0].float()
        cos = torch.stack([torch.nn.functional.cosine_similarity(inputs, s[0].float(), dim=-1) for s in states[1:]])
        soft_columns.append(cos[:, is_soft])
        text_columns.append(cos[:, ~is_soft])
        is_text = ~is_soft
        is_text[0] = False  # the first position is the attention sink, with its own massive activations
        text_states.append(states[len(states) // 2][0].float()[is_text].cpu())
    shared = {"soft": shared_component(torch.cat(soft_tokens)), "text": shared_component(torch.cat(text_states))}
    return (torch.cat(soft_columns, 1).mean(1).tolist(), torch.cat(text_columns, 1).mean(1).tolist(),
            sum(rms) / len(rms), shared)


def shared_component(vectors: torch.Tensor, top: int = 3) -> dict[str, Any]:
    """How much of [N, H] ``vectors`` is one shared vector: mean cosine with their mean, RMS, and the ``top``
    coordinates where the mean is largest with their share of the vectors' energy."""
    mean = vectors.mean(0)
    cos = torch.nn.functional.cosine_similarity(vectors, mean[None], dim=-1)
    coords = mean.abs().topk(top).indices
    energy = vectors.pow(2)
    return {"cos_with_mean": cos.mean().item(), "rms": vectors.pow(2).mean().sqrt().item(),
            "top_coords": coords.tolist(), "top_share": (energy[:, coords].sum() / energy.sum()).item(),
            "top_mean_values": mean[coords].tolist()}


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    checkpoint, data = bc.probe_inputs(args)
    examples = bc.gold_questions(data, args.split)[: args.limit]
    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    if model.config.method != "gmsa":
        raise SystemExit(f"{checkpoint} is a {model.config.method} checkpoint; this probe reads GMSA soft tokens")
    rates = [r for r in args.rates if r in model.config.rates]
    embed_rms = model.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean().item()

    rows, curves, shared_rows = [], {}, []
    fig, axes = bc.new_figure(width=6.5, height=4.0)
    ax = axes[0][0]
    for rate in rates:
        soft, text, soft_rms, shared = layer_cosines(model, examples, rate)
        curves[rate] = {"soft": soft, "text": text}
        for kind, label in (("soft", "soft tokens (decoder input)"), ("text", f"text states (layer {len(soft) // 2})")):
            if kind == "text" and rate != rates[0]:
                continue  # the same text positions at every rate
            figures = shared[kind]
            shared_rows.append({"rate": rate if kind == "soft" else "-", "what": label, "rms": figures["rms"],
                                "cos_with_mean": figures["cos_with_mean"], "top_share": 100 * figures["top_share"],
                                "top_coords": ", ".join(f"{c}: {v:.0f}" for c, v in
                                                        zip(figures["top_coords"], figures["top_mean_values"]))})
        for layer in sorted({l for l in (1, 2, 4, 8, len(soft) // 2, len(soft)) if 1 <= l <= len(soft)}):
            rows.append({"rate": rate, "layer": layer, "soft": soft[layer - 1], "text": text[layer - 1],
                         "soft_rms": soft_rms, "embed_rms": embed_rms})
        layers = range(1, len(soft) + 1)
        ax.plot(layers, soft, marker=".", label=f"soft tokens {rate}x")
        if rate == rates[0]:
            ax.plot(layers, text, color="tab:gray", marker=".", label="text tokens")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cosine(input embedding, hidden state)")
    ax.legend(fontsize=8)
    C = bc.Column
    columns = [C("rate", "rate", 0), C("layer", "layer", 0), C("soft", "soft tokens", 3), C("text", "text tokens", 3),
               C("soft_rms", "soft-token RMS", 3), C("embed_rms", "embedding RMS", 3)]
    shared_columns = [C("rate", "rate"), C("what", "vectors"), C("rms", "RMS", 2),
                      C("cos_with_mean", "cosine with their mean", 3), C("top_share", "energy in the top 3 coordinates %", 1),
                      C("top_coords", "top coordinates of the mean: value")]
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "data": str(data), "questions": len(examples),
            "rates": rates}
    notes = [f"Prompts: the product's QA prompt over the gold passage alone, compressed at the rate, for the first "
             f"{len(examples)} questions of {data} that mark one; the decoder adapter is on as in serving.",
             "Cosines are averaged over all soft-token (or text) positions of all prompts.",
             "Shared component: the mean is taken over all soft tokens of all passages (so a high cosine means soft "
             "tokens of different documents point the same way); text states are the hidden states of the text "
             "positions of the same prompts (instruction, labels, question; not the first position, the attention "
             "sink) at the middle decoder layer."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Soft-token states in the decoder ({meta['machine']})", meta,
                             [("Results", columns, rows), ("Shared component", shared_columns, shared_rows)], fig, notes,
                             {"rows": rows, "curves": curves, "shared": shared_rows})
    print(bc.markdown_table(columns, rows))
    print(bc.markdown_table(shared_columns, shared_rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "curves": curves, "shared": shared_rows, "paths": paths}


if __name__ == "__main__":
    main()
