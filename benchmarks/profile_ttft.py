#!/usr/bin/env python
"""Where the time to first token goes: the product's path on a ~220-position prompt, phase by phase, and a
torch.profiler trace of it.

The model is the product's own (``GMSAModel.from_base`` on ``random:<config dir>``: a LLaMA-2-7B-shaped decoder
with random weights, untrained compressor; timing needs no trained weights). The prompt is the QA template with
``--context`` tokens of real passages in ``--doc-tokens``-token documents, compressed at ``--rate`` (1024 tokens at
8x: ~220 decoder positions). Cases:

* ``cached``: soft tokens already on the device (an in-memory hit);
* ``host``: soft tokens on the host, as read from the disk cache (adds their copy to the device);
* ``uncompressed``: the documents as text (the baseline of the TTFT ratio).

Per case, medians of ``--repeats`` runs of each phase: ``segments`` (chat template + tokenization,
``qa_segments``), ``assemble`` (``build_batch``: embedding + layout), ``engine`` (``GenerationEngine.generate``
with 1 new token: prefill + first token), ``product`` (``generate_from_segments(max_new_tokens=1)``, the whole
TTFT after retrieval), and ``bare prefill`` (one decoder forward over the same embeddings, no cache: the floor).
``overhead`` = product - bare prefill. Then a torch.profiler run (CPU + CUDA, all threads) of ``--profile-steps``
product calls of the ``cached`` case: its top operators go into the table, its Chrome trace next to it.

    python benchmarks/profile_ttft.py --device cuda             # the lead's GPU run (LLaMA-2-7B shape)
    python benchmarks/profile_ttft.py --shape tiny --device cpu # smoke test
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "profile_ttft"
SHAPES = {
    "llama7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, max_position_embeddings=8192, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="cuda, cpu ... (default: cuda if available)")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), bf16, fp16, fp32")
    p.add_argument("--shape", default="llama7b", choices=sorted(SHAPES), help="decoder shape (default llama7b)")
    p.add_argument("--config-dir", type=Path, default=None,
                   help="where the random model's config.json + tokenizer go (default: ~/.cache/gmsa_rag/configs/<shape>)")
    p.add_argument("--context", type=int, default=1024, help="retrieved tokens (default 1024)")
    p.add_argument("--doc-tokens", type=int, default=256, help="tokens per document (default 256)")
    p.add_argument("--rate", type=int, default=8, help="compression rate (default 8)")
    p.add_argument("--encoder-layers", type=int, default=8, help="encoder layers of the untrained compressor")
    p.add_argument("--engine", default="auto", choices=["auto", "hf", "static"], help="generation engine")
    p.add_argument("--prefill", default="prompt", choices=["prompt", "bucket", "graph"],
                   help="the static engine's prefill mode (gmsa_rag.engine.StaticCacheDecoder; default prompt)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs per phase (default 20)")
    p.add_argument("--warmup", type=int, default=5, help="untimed product calls first (compiles; default 5)")
    p.add_argument("--profile-steps", type=int, default=5, help="product calls under the profiler (default 5)")
    p.add_argument("--rows", type=int, default=40, help="operators in the table (default 40)")
    p.add_argument("--data", default=None, help="passages (default: the bundled QA dev split)")
    p.add_argument("--tokenizer", default="smollm2",
                   help="tokenizer name or folder (default: SmolLM2's; a folder works without its GGUF)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default benchmarks/results/<machine>/)")
    return p.parse_args(argv)


def random_model_dir(shape: str, tokenizer, path: Path | None) -> Path:
    """A folder with a LLaMA ``config.json`` of ``shape`` (vocabulary sized to the tokenizer) and the tokenizer:
    what ``load_backbone("random:<dir>")`` builds with random weights."""
    from transformers import AutoConfig

    from gmsa_rag.backbone import cache_root

    path = Path(path or cache_root() / "configs" / f"{shape}-shape")
    path.mkdir(parents=True, exist_ok=True)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), **SHAPES[shape])
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    bc.sync(device)
    start = time.perf_counter()
    fn()
    bc.sync(device)
    return time.perf_counter() - start


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    from gmsa_rag import GMSAConfig, GMSAModel
    from gmsa_rag.backbone import load_tokenizer
    from gmsa_rag.engine import engine_for
    from gmsa_rag.prompt import qa_segments

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency import make_context  # noqa: E402

    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    env = bc.env_info(device, dtype)
    tokenizer = load_tokenizer(args.tokenizer)
    config_dir = random_model_dir(args.shape, tokenizer, args.config_dir)
    rates = tuple(sorted({2, 4, 8, 16, args.rate}))
    config = GMSAConfig(base_model=f"random:{config_dir}", encoder_layers=args.encoder_layers, lsa_layers=1,
                        rates=rates)
    t0 = time.perf_counter()
    model = GMSAModel.from_base(config, device=device, dtype=dtype).eval()
    model.generation_engine, model.generation_prefill = args.engine, args.prefill
    load_s = time.perf_counter() - t0
    passages, source = bc.load_passages(args.data)
    docs = make_context(tokenizer, bc.token_stream(tokenizer, passages, args.context), args.context, args.doc_tokens)
    question = "What is the main topic of the documents?"
    soft = model.compress(docs, args.rate)
    contexts = {"cached": soft, "host": [s.cpu() for s in soft], "uncompressed": docs}
    engine = engine_for(model)
    decoder = model.decoder
    stem = f"{NAME}-{args.shape}" + ("" if args.prefill == "prompt" else f"-{args.prefill}")

    rows: list[dict[str, Any]] = []
    for case, ctx in contexts.items():
        segments = qa_segments(tokenizer, question, ctx)
        batch = model.build_batch([segments], padding_side="left")

        def engine_call():
            return engine.generate(batch.inputs_embeds, batch.attention_mask, 1,
                                   stop_token_ids=model.stop_token_ids(), pad_token_id=tokenizer.pad_token_id)

        def product():
            return model.generate_from_segments([qa_segments(tokenizer, question, ctx)], max_new_tokens=1)

        def bare():
            with torch.no_grad():
                return decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                               use_cache=False, logits_to_keep=1)

        phases = {"segments": lambda: qa_segments(tokenizer, question, ctx),
                  "assemble": lambda: model.build_batch([segments], padding_side="left"),
                  "engine": engine_call, "product": product, "bare prefill": bare}
        for _ in range(args.warmup):
            product()
            bare()
        samples: dict[str, list[float]] = {k: [] for k in phases}
        for _ in range(args.repeats):
            for name, fn in phases.items():  # round-robin, so drift spreads over all phases
                samples[name].append(timed(fn, device))
        med = {k: statistics.median(v) * 1e3 for k, v in samples.items()}
        rows.append({"case": case, "positions": int(batch.inputs_embeds.shape[1]), **{f"{k}_ms": v for k, v in med.items()},
                     "overhead_ms": med["product"] - med["bare prefill"], "samples_s": samples})
        print(f"{case:<13} {rows[-1]['positions']:>5} positions: " +
              "  ".join(f"{k} {v:.2f} ms" for k, v in med.items()), flush=True)
    for r in rows:
        r["ttft_ratio_vs_uncompressed"] = rows[-1]["product_ms"] / r["product_ms"]

    # The profiler run: product calls on the cached case, every thread (the engine decodes on its own thread on CUDA).
    from torch.profiler import ProfilerActivity, profile, record_function

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        from torch._C._profiler import _ExperimentalConfig

        extra = {"experimental_config": _ExperimentalConfig(profile_all_threads=True)}
    except (ImportError, TypeError):
        extra = {}
    with profile(activities=activities, record_shapes=True, **extra) as prof:
        for _ in range(args.profile_steps):
            with record_function("ttft.qa_segments"):
                segments = qa_segments(tokenizer, question, soft)
            with record_function("ttft.generate_from_segments"):
                model.generate_from_segments([segments], max_new_tokens=1)
            bc.sync(device)
    out_dir = Path(args.out or bc.default_out_dir(device))
    out_dir.mkdir(parents=True, exist_ok=True)
    trace = out_dir / f"{stem}.trace.json"
    prof.export_chrome_trace(str(trace))
    gpu = device.type == "cuda"
    key = "self_device_time_total" if gpu else "self_cpu_time_total"
    ops = []
    for e in sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[: args.rows]:
        ops.append({"op": e.key[:60], "calls": e.count, "per_call": e.count / args.profile_steps,
                    "cpu_total_ms": e.cpu_time_total / 1e3 / args.profile_steps,
                    "self_cpu_ms": e.self_cpu_time_total / 1e3 / args.profile_steps,
                    "device_total_ms": getattr(e, "device_time_total", 0) / 1e3 / args.profile_steps,
                    "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3 / args.profile_steps})
    table_txt = prof.key_averages().table(sort_by=key, row_limit=args.rows)
    (out_dir / f"{stem}.table.txt").write_text(table_txt)

    meta = {**env, "shape": args.shape, "base_model": config.base_model, "engine": engine.kind,
            "prefill": engine.static.prefill if engine.static is not None else None,
            "static_compiled": bool(engine.static is not None and engine.static.compiled),
            "context": args.context, "rate": args.rate, "doc_tokens": args.doc_tokens, "docs": len(docs),
            "repeats": args.repeats, "warmup": args.warmup, "profile_steps": args.profile_steps,
            "passages": source, "model_load_s": round(load_s, 1), "trace": trace.name,
            "load_average_at_end": bc.load_average()}
    notes = [
        "Decoder: random weights (timing only); compressor untrained (k encoder layers + 1 LSA block).",
        "Phases (medians, ms, taken round-robin): segments = qa_segments (chat template + tokenization, host); "
        "assemble = build_batch (one embedding call + layout, soft tokens moved to the device); engine = "
        "GenerationEngine.generate with 1 new token (prefill + first token); product = generate_from_segments "
        "(segments + assemble + engine + decoding the token to text) = TTFT after retrieval; bare prefill = one "
        "decoder forward, no cache, logits of the last position only; overhead = product - bare prefill.",
        "host = soft tokens on the host, as the disk cache returns them; cached = already on the device.",
        f"Operators: the profiler over {args.profile_steps} product calls of the 'cached' case, all threads, sorted "
        f"by self {'device' if gpu else 'CPU'} time, per call (ms); full table in {stem}.table.txt, "
        f"Chrome trace in {trace.name} (open in chrome://tracing or Perfetto).",
    ]
    C = bc.Column
    phase_cols = [C("case", "case"), C("positions", "decoder positions"), C("segments_ms", "segments ms", 3),
                  C("assemble_ms", "assemble ms", 3), C("engine_ms", "engine ms", 3), C("product_ms", "product (TTFT) ms", 3),
                  C("bare prefill_ms", "bare prefill ms", 3), C("overhead_ms", "overhead ms", 3),
                  C("ttft_ratio_vs_uncompressed", "TTFT × vs uncompressed")]
    op_cols = [C("op", "operator"), C("per_call", "calls per TTFT", 1), C("self_device_ms", "self device ms", 3),
               C("device_total_ms", "device total ms", 3), C("self_cpu_ms", "self CPU ms", 3),
               C("cpu_total_ms", "CPU total ms", 3)]
    fig, axes = bc.new_figure(width=7, height=4)
    ax = axes[0][0]
    parts = ["segments_ms", "assemble_ms", "bare prefill_ms"]
    left = [0.0] * len(rows)
    for part, color in zip(parts, ["tab:gray", "tab:orange", "tab:blue"]):
        vals = [r[part] for r in rows]
        ax.barh([r["case"] for r in rows], vals, left=left, color=color, label=part.replace("_ms", ""))
        left = [a + b for a, b in zip(left, vals)]
    ax.scatter([r["product_ms"] for r in rows], [r["case"] for r in rows], color="black", zorder=3, label="product TTFT")
    ax.set_xlabel("ms")
    ax.set_title(f"TTFT parts, {args.shape} shape, {meta['machine']}")
    ax.legend(fontsize=8)
    paths = bc.write_outputs(out_dir, stem, f"TTFT profile ({args.shape} shape, {meta['machine']})",
                             meta, [("Phases", phase_cols, rows), ("Top operators (cached case, per TTFT)", op_cols, ops)],
                             fig, notes, {"rows": rows, "operators": ops})
    print(f"wrote {', '.join(str(p) for p in paths.values())}, {trace}")
    return {"rows": rows, "operators": ops, "paths": paths, "meta": meta}


if __name__ == "__main__":
    main()
