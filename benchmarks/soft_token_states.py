#!/usr/bin/env python
"""Does the decoder read soft tokens the way it reads text? (seconds on a CPU)

For QA prompts that hold each question's gold passage as soft tokens (the product's prompt, decoder adapter on),
it reports per decoder layer the mean cosine between each position's hidden state and its input embedding, for
soft-token positions and for text positions, and the RMS of soft tokens against that of token embeddings. Text
states turn away from their input within a layer or two (the model contextualises them); soft tokens that keep a
cosine near 1 deep into the decoder are a static memory its attention copies from, not content it processes.

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
    for example in examples:
        soft = model.compress([example.gold_context], rate)
        rms.append(soft[0].float().pow(2).mean(-1).sqrt().mean().item())
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
    return (torch.cat(soft_columns, 1).mean(1).tolist(), torch.cat(text_columns, 1).mean(1).tolist(),
            sum(rms) / len(rms))


def main(argv=None) -> dict[str, Any]:
    from gmsa_rag.data.qa import load_qa

    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    checkpoint, data = bc.probe_inputs(args)
    examples = [e for e in load_qa(data, "dev") if e.gold_context is not None][: args.limit]
    if not examples:
        raise SystemExit(f"{data}: no question with a marked gold passage")
    model = bc.load_system(checkpoint, device, dtype, backbone=args.backbone)
    if model.config.method != "gmsa":
        raise SystemExit(f"{checkpoint} is a {model.config.method} checkpoint; this probe reads GMSA soft tokens")
    rates = [r for r in args.rates if r in model.config.rates]
    embed_rms = model.embed_tokens.weight.float().pow(2).mean(-1).sqrt().mean().item()

    rows, curves = [], {}
    fig, axes = bc.new_figure(width=6.5, height=4.0)
    ax = axes[0][0]
    for rate in rates:
        soft, text, soft_rms = layer_cosines(model, examples, rate)
        curves[rate] = {"soft": soft, "text": text}
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
    meta = {**bc.env_info(device, dtype), "checkpoint": str(checkpoint), "data": str(data), "questions": len(examples),
            "rates": rates}
    notes = [f"Prompts: the product's QA prompt over the gold passage alone, compressed at the rate, for the first "
             f"{len(examples)} questions of {data} that mark one; the decoder adapter is on as in serving.",
             "Cosines are averaged over all soft-token (or text) positions of all prompts."]
    out_dir = args.out or bc.default_out_dir(device)
    paths = bc.write_outputs(out_dir, args.name, f"Soft-token states in the decoder ({meta['machine']})", meta,
                             [("Results", columns, rows)], fig, notes, {"rows": rows, "curves": curves})
    print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "curves": curves, "paths": paths}


if __name__ == "__main__":
    main()
