#!/usr/bin/env python
"""Latency of RAG answering with uncompressed prompts vs GMSA / TCP-AE soft tokens.

For each length of retrieved text (real passages cut to an exact token count, split into documents of
``--doc-tokens`` tokens, each document compressed on its own) and each compression rate, this measures:

  (a) ``uncompressed``  the documents as text in the same prompt template (the baseline of every ratio);
  (b) ``gmsa-cached``   GMSA soft tokens precomputed (a cache hit: compression not timed);
  (c) ``gmsa-online``   GMSA compressing the documents at query time (compression timed);
  (d) ``tcp-cached`` / ``tcp-online``  the same for the TCP-AE (ICAE-style memory token) baseline.

Per configuration: TTFT (prompt building [+ compression] + prefill + first token), decode ms/token, end-to-end
seconds for exactly ``--new-tokens`` tokens (no stop token), peak GPU memory and the analytic KV-cache size.
Decoding runs through the product's engine (``gmsa_rag.engine.GenerationEngine``, what
``GMSAModel.generate_from_segments`` calls) two ways: ``hf`` (Hugging Face ``generate``, dynamic cache) and,
where ``auto`` picks it (CUDA), the fast path ``static`` (static KV cache, decode step under
``torch.compile(mode="reduce-overhead")`` = CUDA graphs).

Examples::

    # CPU, real SmolLM2, a few minutes
    python benchmarks/latency.py --quick
    # GPU, LLaMA-2-7B-shaped random weights (timing needs no trained weights)
    python benchmarks/latency.py --backbone llama7b-shape --device cuda
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402
from gmsa_rag.checkpoint import CheckpointError, read_record  # noqa: E402
from gmsa_rag.errors import non_negative_int, positive_int  # noqa: E402

NAME = "latency"
METHODS = ("uncompressed", "gmsa-cached", "gmsa-online", "tcp-cached", "tcp-online")
LABELS = {"uncompressed": "uncompressed", "gmsa-cached": "GMSA cached", "gmsa-online": "GMSA online",
          "tcp-cached": "TCP-AE cached", "tcp-online": "TCP-AE online"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--lengths", type=bc.parse_int_list, default=None,
                   help="retrieved-context lengths in tokens (default: 512,1024,2048,4096,8192 on GPU; "
                        "256,512,1024 on CPU; --quick: 256,512)")
    p.add_argument("--rates", type=bc.parse_int_list, default=[4, 8, 16], help="compression rates (default 4,8,16)")
    p.add_argument("--methods", type=lambda s: [m for m in s.split(",") if m], default=list(METHODS),
                   help=f"subset of {','.join(METHODS)}")
    p.add_argument("--doc-tokens", type=positive_int, default=None,
                   help="tokens per retrieved document, each compressed on its own (default 256; --quick 128)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="answer length, forced (default 16; --quick 8)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed repeats, median reported (default 3 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed warm-up runs (default 2 on GPU, 1 on CPU)")
    p.add_argument("--checkpoint", default=None, help="GMSA checkpoint (default: untrained compressor; timing only)")
    p.add_argument("--tcp-checkpoint", default=None, help="TCP-AE checkpoint (default: untrained)")
    p.add_argument("--encoder-layers", type=positive_int, default=8, help="k for untrained compressors (default 8)")
    p.add_argument("--lsa-layers", type=non_negative_int, default=1, help="LSA blocks for untrained compressors (default 1)")
    p.add_argument("--data", default=None, help="passages: QA jsonl / jsonl corpus / text (default: dev split)")
    p.add_argument("--name", default=NAME, help="output file stem (default latency), e.g. to split a long run")
    p.add_argument("--no-fast", action="store_true", help="skip the static-cache engine (the fast path)")
    p.add_argument("--fast", action="store_true",
                   help="time the static-cache engine even where the engine's auto choice is HF generate")
    p.add_argument("--prefill", default="prompt", choices=["prompt", "bucket", "graph"],
                   help="the static-cache engine's prefill mode (gmsa_rag.engine.StaticCacheDecoder; default prompt)")
    p.add_argument("--tune-kernels", action="store_true",
                   help="the static-cache engine's compiled step tunes its kernels (GEMM autotuning and coordinate descent; "
                        "GMSAModel.generation_tune_kernels)")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="decode with the decoder's W_Q/W_K/W_V and gate/up fused into one matrix each, on both "
                        "engines, or not (one decoder; default: the product's choice, fused on CUDA only; "
                        "GMSAModel.generation_fuse_projections)")
    args = p.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown methods {sorted(unknown)}; choose from {METHODS}")
    for flag, path in (("--checkpoint", args.checkpoint), ("--tcp-checkpoint", args.tcp_checkpoint)):
        if path:
            try:
                read_record(path)
            except CheckpointError as err:
                p.error(f"{flag}: {err}")
    if args.data and not Path(args.data).exists():
        p.error(f"--data {args.data}: no such file or folder")
    return args


def apply_defaults(args, device: torch.device) -> None:
    gpu = device.type == "cuda"
    if args.lengths is None:
        args.lengths = [256, 512] if args.quick else ([512, 1024, 2048, 4096, 8192] if gpu else [256, 512, 1024])
    args.doc_tokens = args.doc_tokens or (128 if args.quick else 256)
    args.new_tokens = args.new_tokens or (8 if args.quick else 16)
    args.repeats = args.repeats or (3 if gpu else 5)
    args.warmup = args.warmup if args.warmup is not None else (2 if gpu else 1)
    if args.new_tokens < 2:
        raise SystemExit("--new-tokens must be at least 2 (decode time is (e2e - TTFT) / (new_tokens - 1))")


# --------------------------------------------------------------------------- decoding


def engine_generate(engine, model, prompts_fn: Callable[[], list], new_tokens: int) -> torch.Tensor:
    """Build the prompt batch and decode exactly ``new_tokens`` greedy tokens (no stop token) through a
    ``GenerationEngine``: the product's path minus turning ids into text. Returns the new token ids."""
    prompts = prompts_fn()
    batch = model.build_batch(prompts, padding_side="left")
    with model.decoder_adapter(model.adapter_wanted(prompts)):  # as the product: off for text (the base model)
        return engine.generate(batch.inputs_embeds, batch.attention_mask, new_tokens, stop_token_ids=(),
                               pad_token_id=model.tokenizer.pad_token_id)


# --------------------------------------------------------------------------- contexts


def make_context(tokenizer, stream: list[int], length: int, doc_tokens: int) -> list[str]:
    """The first ``length`` tokens of the passage stream as documents of ``doc_tokens`` tokens (text)."""
    ids = stream[:length]
    docs: list[str] = []
    for start in range(0, length, doc_tokens):
        text = tokenizer.decode(ids[start : start + doc_tokens])
        if docs and not text.strip():
            docs[-1] += text
        else:
            docs.append(text)
    return docs


def build_models(args, device, dtype):
    notes: list[str] = []
    max_positions = max(args.lengths) + 1024 + args.new_tokens
    decoder, tokenizer, load_notes = bc.load_decoder(args.backbone, device, dtype, args.tokenizer, max_positions)
    notes += load_notes
    models: dict[str, Any] = {}
    need = {m.split("-")[0] for m in args.methods if m != "uncompressed"}
    for method, ckpt in (("gmsa", args.checkpoint), ("tcp", args.tcp_checkpoint)):
        if method not in need and not (method == "gmsa" and "uncompressed" in args.methods):
            continue
        if ckpt:
            models[method] = bc.load_system(ckpt, device, dtype, backbone=args.backbone, tokenizer_name=args.tokenizer)
            bad = [r for r in args.rates if r not in models[method].config.rates]
            if bad and method in need:
                raise SystemExit(f"{ckpt} supports rates {list(models[method].config.rates)}, not {bad}")
            notes.append(f"{method.upper()} weights: checkpoint {ckpt}.")
        else:
            models[method] = bc.untrained_compressor(decoder, tokenizer, method, args.rates, args.backbone,
                                                     args.encoder_layers, args.lsa_layers)
            c = models[method].config
            notes.append(f"{'GMSA' if method == 'gmsa' else 'TCP-AE'}: UNTRAINED compressor (random LoRA/LSA init, "
                         f"k={c.encoder_layers} encoder layers, {c.lsa_layers} LSA block(s), window {c.window}): "
                         "timing only, its outputs are meaningless.")
    if "gmsa" not in models:  # the uncompressed baseline only needs the decoder and the prompt template
        models["gmsa"] = models["tcp"]
    return models, tokenizer, notes


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    apply_defaults(args, device)
    torch.manual_seed(args.seed)
    out_dir = args.out or bc.default_out_dir(device)
    env = bc.env_info(device, dtype)
    t0 = time.perf_counter()
    models, tokenizer, notes = build_models(args, device, dtype)
    base = models["gmsa"]
    decoder = base.decoder
    load_s = time.perf_counter() - t0
    print(f"models ready in {load_s:.1f} s", flush=True)
    passages, source = bc.load_passages(args.data)
    stream = bc.token_stream(tokenizer, passages, max(args.lengths))
    question = _question(source)

    from gmsa_rag.engine import GenerationEngine, select_engine

    hf = GenerationEngine(decoder, "hf", fuse_projections=args.fuse_projections)
    fast = None
    if not args.no_fast and (args.fast or select_engine(device) == "static"):
        fast = GenerationEngine(decoder, "static", prefill=args.prefill, tune_kernels=args.tune_kernels,
                                fuse_projections=args.fuse_projections)
    elif not args.no_fast:
        notes.append(f"The engine's auto choice on {device.type} is HF generate, so only it is timed (--fast adds "
                     "the static-cache engine).")

    rows: list[dict[str, Any]] = []
    n = args.new_tokens
    paths: dict = {}
    for done, length in enumerate(args.lengths, 1):
        docs = make_context(tokenizer, stream, length, args.doc_tokens)
        configs: list[tuple[str, int | None]] = [("uncompressed", None)] if "uncompressed" in args.methods else []
        for rate in args.rates:
            configs += [(m, rate) for m in args.methods if m != "uncompressed"]
        for row in measure_length(args, device, models, hf, fast, configs, docs, question, length):
            rows.append(row)
            print(_progress(row), flush=True)
        # speed-ups against the uncompressed prompt at this length
        ref = next((r for r in rows if r["length"] == length and r["method"] == "uncompressed"), None)
        for r in rows:
            if r["length"] == length and ref is not None:
                for key in ("ttft_ms", "e2e_s", "fast_ttft_ms", "fast_e2e_s"):
                    if r.get(key) and ref.get(key):
                        r[key.replace("_ms", "").replace("_s", "") + "_speedup"] = ref[key] / r[key]
        # written after every length, so that a run cut short still leaves its finished lengths
        meta = {**env, "backbone": args.backbone, "passages": source, "question": question,
                "lengths": args.lengths, "lengths_done": args.lengths[:done], "rates": args.rates,
                "doc_tokens": args.doc_tokens, "new_tokens": n, "repeats": args.repeats, "warmup": args.warmup,
                "fast_path": fast is not None,
                "fast_compiled": bool(fast is not None and fast.static.compiled),
                "fast_prefill": fast.static.prefill if fast is not None else None,
                "fast_tune_kernels": bool(fast is not None and fast.static.tune_kernels),
                "fuse_projections": hf.fuse_projections,
                "model_load_s": round(load_s, 1), "run_s": round(time.perf_counter() - t0, 1),
                "load_average_at_end": bc.load_average()}
        all_notes = notes + _definitions(args, device, fast)
        if done < len(args.lengths):
            all_notes.append(f"PARTIAL: lengths {args.lengths[done:]} not measured yet.")
        fig = plot(rows, args, fast is not None)
        paths = bc.write_outputs(out_dir, args.name, f"Latency: uncompressed vs GMSA / TCP-AE ({args.backbone}, "
                                 f"{meta['machine']})", meta,
                                 [("Results (medians)", _columns(fast is not None, device.type == "cuda"), rows)],
                                 fig, all_notes, {"rows": rows})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths, "meta": meta}


def _question(source: str) -> str:
    """The first question of the passages' QA file (any question will do for timing)."""
    try:
        for record in bc.read_jsonl(Path(source)):
            if isinstance(record.get("question"), str):
                q = record["question"].strip()
                return q if q.endswith("?") else q + "?"
    except Exception:  # plain-text data or no QA file: any question will do for timing
        pass
    return "What is the main topic of the documents?"


class Case:
    """One (method, rate) at one context length: its prompt builder, timing samples and result row."""

    def __init__(self, args, models, method: str, rate: int | None, docs: list[str], question: str, length: int):
        from gmsa_rag.prompt import qa_segments

        tok = models["gmsa"].tokenizer
        kind, _, mode = method.partition("-")
        self.model = model = models["gmsa"] if kind == "uncompressed" else models[kind]
        self.compress = None
        if kind == "uncompressed":
            def prompts():
                return [qa_segments(tok, question, docs)]
            soft = None
        elif mode == "cached":
            soft = model.compress(docs, rate)

            def prompts():
                return [qa_segments(tok, question, soft)]
        else:
            soft = model.compress(docs, rate)
            self.compress = lambda: model.compress(docs, rate)

            def prompts():
                return [qa_segments(tok, question, model.compress(docs, rate))]
        self.prompts = prompts
        self.samples: dict[str, list[float]] = {}
        self.hf_tokens = self.fast_tokens = None
        prompt_len = int(model.build_batch(prompts()).inputs_embeds.shape[1])
        self.row: dict[str, Any] = {
            "length": length, "method": method, "label": LABELS[method] + (f" r={rate}" if rate else ""),
            "rate": rate, "docs": len(docs), "soft_tokens": None if soft is None else int(sum(x.shape[0] for x in soft)),
            "prompt_len": prompt_len, "kv_cache_mib": bc.kv_cache_mib(model.decoder, prompt_len + args.new_tokens,
                                                                      model.dtype),
        }

    def add(self, key: str, seconds: float) -> None:
        self.samples.setdefault(key, []).append(seconds)

    def median(self, key: str) -> float | None:
        return bc.Timing(self.samples[key]).median if self.samples.get(key) else None


def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    bc.sync(device)
    start = time.perf_counter()
    result = fn()
    bc.sync(device)
    return time.perf_counter() - start, result


def measure_length(args, device, models, hf, fast, configs, docs, question, length) -> list[dict[str, Any]]:
    """Time every configuration at one context length.

    Warm-up runs first (they also compile the fast path for new cache buckets); then the timed repeats run
    round-robin over the configurations, so that load from other processes spreads over all of them.
    """
    n = args.new_tokens
    cases = [Case(args, models, method, rate, docs, question, length) for method, rate in configs]
    fast_ok = fast is not None
    for c in cases:
        for _ in range(args.warmup):
            engine_generate(hf, c.model, c.prompts, n)
        if fast_ok and "fast_error" not in c.row:
            try:
                c.row["fast_first_call_s"], _ = timed(lambda: engine_generate(fast, c.model, c.prompts, n), device)
                for _ in range(args.warmup + 1):  # CUDA-graph trees record on the first runs of a shape
                    engine_generate(fast, c.model, c.prompts, n)
                    engine_generate(fast, c.model, c.prompts, 1)
            except Exception as err:  # keep the HF numbers; say why the fast path is missing
                c.row["fast_error"] = f"{type(err).__name__}: {err}"[:500]
                print(f"fast path failed for {c.row['label']} @ {length}: {c.row['fast_error']}", file=sys.stderr)
    for _ in range(args.repeats):
        for c in cases:
            if c.compress is not None:
                c.add("compress", timed(c.compress, device)[0])
            c.add("ttft", timed(lambda: engine_generate(hf, c.model, c.prompts, 1), device)[0])
            t, c.hf_tokens = timed(lambda: engine_generate(hf, c.model, c.prompts, n), device)
            c.add("e2e", t)
            if fast_ok and "fast_error" not in c.row:
                c.add("fast_ttft", timed(lambda: engine_generate(fast, c.model, c.prompts, 1), device)[0])
                t, c.fast_tokens = timed(lambda: engine_generate(fast, c.model, c.prompts, n), device)
                c.add("fast_e2e", t)
    rows = []
    for c in cases:
        if c.hf_tokens.shape[1] != n:
            raise RuntimeError(f"generate returned {c.hf_tokens.shape[1]} tokens, expected {n}")
        row = c.row
        if device.type == "cuda":
            _, row["peak_gib"], row["peak_delta_gib"] = bc.peak_memory(
                lambda: engine_generate(hf, c.model, c.prompts, n), device)
        compress, ttft, e2e = c.median("compress"), c.median("ttft"), c.median("e2e")
        row.update({"compress_ms": compress * 1e3 if compress else None, "ttft_ms": ttft * 1e3,
                    "decode_ms_per_token": (e2e - ttft) / (n - 1) * 1e3, "e2e_s": e2e})
        if c.samples.get("fast_e2e"):
            f_ttft, f_e2e = c.median("fast_ttft"), c.median("fast_e2e")
            row.update({"fast_ttft_ms": f_ttft * 1e3, "fast_decode_ms_per_token": (f_e2e - f_ttft) / (n - 1) * 1e3,
                        "fast_e2e_s": f_e2e,
                        "fast_token_agreement": float((c.fast_tokens == c.hf_tokens).float().mean())})
        row["timings_s"] = {k: v for k, v in c.samples.items()}
        rows.append(row)
    return rows


def _progress(row) -> str:
    s = (f"[{row['length']:>5} tok] {row['label']:<22} prompt {row['prompt_len']:>5}  TTFT {row['ttft_ms']:8.1f} ms  "
         f"decode {row['decode_ms_per_token']:7.2f} ms/tok  e2e {row['e2e_s']:7.3f} s")
    if row.get("fast_e2e_s"):
        s += f" | fast TTFT {row['fast_ttft_ms']:7.1f} ms decode {row['fast_decode_ms_per_token']:6.2f} ms/tok e2e {row['fast_e2e_s']:6.3f} s"
    if row.get("peak_gib"):
        s += f" | peak {row['peak_gib']:.2f} GiB"
    return s


def _columns(fast: bool, gpu: bool) -> list[bc.Column]:
    C = bc.Column
    cols = [C("length", "context tok"), C("label", "system"), C("prompt_len", "decoder positions"),
            C("compress_ms", "compress ms", 1), C("ttft_ms", "TTFT ms", 1), C("ttft_speedup", "TTFT ×"),
            C("decode_ms_per_token", "decode ms/tok"), C("e2e_s", "e2e s", 3), C("e2e_speedup", "e2e ×")]
    if fast:
        cols += [C("fast_ttft_ms", "fast TTFT ms", 1), C("fast_ttft_speedup", "fast TTFT ×"),
                 C("fast_decode_ms_per_token", "fast decode ms/tok"),
                 C("fast_e2e_s", "fast e2e s", 3), C("fast_e2e_speedup", "fast e2e ×")]
    if gpu:
        cols += [C("peak_gib", "peak GiB"), C("peak_delta_gib", "peak over resident GiB", 3)]
    cols.append(C("kv_cache_mib", "KV cache MiB", 1))
    return cols


def _definitions(args, device, fast) -> list[str]:
    n = args.new_tokens
    notes = [
        f"Context: real passages ({args.doc_tokens}-token documents) cut to exactly the listed token count; "
        "documents are compressed one by one (batched), as in RAG serving. 'decoder positions' = what the decoder "
        "reads: chat template + instruction + documents (text or soft tokens) + question.",
        "TTFT = build the prompt (+ compress, for 'online') + prefill + first token, through the generation engine "
        "(gmsa_rag.engine, the product's path) with 1 new token; first the 'hf' engine (HF generate). "
        "'cached' soft tokens are already on the device (a hit in memory; disk reads not included).",
        f"e2e = the same with exactly {n} new tokens (no stop token); decode ms/tok = (e2e - TTFT) / {n - 1}.",
        f"Medians of {args.repeats} timed runs after {args.warmup} warm-up run(s), the repeats taken round-robin "
        "over all systems of a length (so background load spreads evenly); × = speed-up over the uncompressed "
        "prompt at the same length (higher is better). Raw samples are in the JSON.",
        "KV cache MiB is analytic (decoder positions + new tokens, batch 1).",
    ]
    if fast:
        step = ("under torch.compile(mode='reduce-overhead') (CUDA graphs)" if fast.static.compiled else "eager")
        notes.append(f"fast = the engine's static path: static KV cache (powers of two, >= 256 positions) + decode "
                     f"step {step}; prefill mode '{fast.static.prefill}' (prompt: eager over the prompt's own "
                     "length, then copied in; bucket: eager, straight into the static cache; graph: left-padded to a "
                     "multiple of 64 positions, straight in, compiled with the step); compile time excluded (warm-up). "
                     "fast_token_agreement in the JSON = share of tokens equal to HF greedy's; with random weights the logits "
                     "are near-ties in bf16, so it is low there (the two paths agree exactly in an fp32 test).")
    if device.type == "cuda":
        notes.append("peak GiB = torch.cuda.max_memory_allocated during one HF e2e run (all weights resident: decoder "
                     "+ both compressors); 'over resident' = peak minus memory allocated before the run.")
    return notes


def plot(rows, args, fast: bool):
    fig, axes = bc.new_figure(ncols=3, width=6.2, height=4.8)
    ax_ttft, ax_e2e, ax_bar = axes[0]
    path = "fast path" if fast else "HF generate"
    ttft_key, e2e_key = ("fast_ttft_ms", "fast_e2e_s") if fast else ("ttft_ms", "e2e_s")
    styles = {"uncompressed": "-", "gmsa-cached": "-", "gmsa-online": "--", "tcp-cached": ":", "tcp-online": "-."}
    colors = {r: c for r, c in zip(args.rates, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple",
                                                "tab:brown"])}
    series: dict[str, list] = {}
    for r in rows:
        series.setdefault(r["label"], []).append(r)
    for label, rs in series.items():
        method, rate = rs[0]["method"], rs[0]["rate"]
        kw = dict(linestyle=styles[method], marker="o" if method.startswith("gmsa") else "s", markersize=3,
                  color="black" if method == "uncompressed" else colors.get(rate),
                  linewidth=2.5 if method == "uncompressed" else 1.3, label=label)
        xs = [r["length"] for r in rs]
        ax_ttft.plot(xs, [r[ttft_key] for r in rs], **kw)
        ys = [r.get(e2e_key) for r in rs]
        if all(y is not None for y in ys):
            ax_e2e.plot(xs, ys, **kw)
    for ax, title, unit in ((ax_ttft, f"TTFT ({path})", "ms"),
                            (ax_e2e, f"end-to-end, {args.new_tokens} tokens ({path})", "s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(args.lengths)
        ax.set_xticklabels([str(x) for x in args.lengths])
        ax.set_yscale("log")
        ax.set_xlabel("retrieved context (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_ttft.legend(fontsize=6, ncol=2)
    longest = max(args.lengths)
    bars = [r for r in rows if r["length"] == longest and r["method"] != "uncompressed"]
    prefix = "fast_" if fast else ""
    x = range(len(bars))
    ax_bar.bar([i - 0.2 for i in x], [r.get(f"{prefix}ttft_speedup") or 0 for r in bars], 0.4, label=f"TTFT ({path})")
    ax_bar.bar([i + 0.2 for i in x], [r.get(f"{prefix}e2e_speedup") or 0 for r in bars], 0.4, label=f"e2e ({path})")
    ax_bar.axhline(1.0, color="black", linewidth=0.8)
    ax_bar.set_xticks(list(x))
    ax_bar.set_xticklabels([r["label"] for r in bars], rotation=60, ha="right", fontsize=7)
    ax_bar.set_ylabel("speed-up over uncompressed (×)")
    ax_bar.set_title(f"speed-up at {longest} context tokens")
    ax_bar.legend(fontsize=8)
    return fig


if __name__ == "__main__":
    main()
