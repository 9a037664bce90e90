#!/usr/bin/env python
"""Decode speed of the generation engines: Hugging Face generate vs the static-KV-cache path of gmsa_rag.engine.

One prompt (the product's QA template with real passages as one text document, about ``--prompt`` decoder
positions), greedy, exactly ``--new-tokens`` tokens (no stop tokens), through ``GenerationEngine.generate`` - the
call ``GMSAModel.generate_from_segments`` makes. Per engine: TTFT (prompt assembly + prefill + first token),
end-to-end time, decode ms/token = (e2e - TTFT) / (new tokens - 1), medians of ``--repeats`` runs taken
round-robin over the engines, and the share of tokens equal to HF's. With ``--token-times`` (default on CPU) the
timed runs also stream, and the gaps between consecutive tokens give a per-step median that load from other
processes on a shared CPU distorts far less than whole-run times (a burst of load hits a few steps, not the median). On GPU also the weight-bandwidth limit of
one decode step: bytes of the decoder's weights / the card's memory bandwidth.

Engines: ``hf`` (HF generate, dynamic cache), ``static`` (static cache; decode step compiled into CUDA graphs on
CUDA, eager elsewhere), ``static-compiled`` (static cache, step under torch.compile on any device: on CPU,
inductor without CUDA graphs), ``static-stop`` (``static`` with a stop token that never comes: the cost of the
per-step stop check).

Examples::

    python benchmarks/decode.py --device cpu                              # SmolLM2, CPU: which engine auto picks
    python benchmarks/decode.py --backbone llama7b-shape --device cuda    # 7B shape on a GPU, with the limit
"""
from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402
from gmsa_rag.errors import non_negative_int, positive_int  # noqa: E402

NAME = "decode"
ENGINES = ("hf", "static", "static-compiled", "static-stop")
#: Peak memory bandwidth (GB/s) of known cards, for the weight-bandwidth limit (SXM parts).
BANDWIDTH_GBS = {"h200": 4800.0, "h100": 3350.0, "gh200": 4000.0, "a100": 2039.0, "l40s": 864.0, "l4": 300.0}


def decode_step_weight_bytes(decoder) -> int:
    """Bytes of weights one decode step reads: every parameter, but of an input embedding table that the output
    layer does not share only the one row the step looks up."""
    total = sum(p.numel() * p.element_size() for p in decoder.parameters())
    embed = decoder.get_input_embeddings().weight
    output = decoder.get_output_embeddings()
    if output is None or output.weight is not embed:  # untied: the step gathers one row, it does not stream the table
        total -= (embed.shape[0] - 1) * embed.shape[1] * embed.element_size()
    return total


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--engines", type=lambda s: [e for e in s.split(",") if e], default=None,
                   help=f"subset of {','.join(ENGINES)} (default: hf,static,static-stop on GPU; hf,static on CPU)")
    p.add_argument("--prompt", type=positive_int, default=200, help="decoder positions of the prompt, about (default 200)")
    p.add_argument("--new-tokens", type=positive_int, default=None, help="tokens decoded, forced (default 32; --quick 8)")
    p.add_argument("--batch", type=positive_int, default=1, help="copies of the prompt decoded together (default 1)")
    p.add_argument("--repeats", type=positive_int, default=None, help="timed runs per engine, median reported (default 5; "
                   "--quick 2)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="untimed runs per engine first (default 2; --quick 1)")
    p.add_argument("--token-times", action=argparse.BooleanOptionalAction, default=None,
                   help="time every decode step through a streamer (default: on for CPU, off for GPU, where the "
                        "per-token host sync would change what is measured)")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the limit (default: the card's, from a table of known GPUs)")
    p.add_argument("--profile", default=None, metavar="ENGINE",
                   help="after timing, profile one e2e run of this engine (torch.profiler, CPU + CUDA): where a decode "
                        "step's device time goes, kernel by kernel, against its wall time (a second table)")
    p.add_argument("--tune-kernels", action="store_true",
                   help="the compiled engines tune their kernels (GEMM autotuning and coordinate descent; "
                        "GenerationEngine(tune_kernels=True), GMSAModel.generation_tune_kernels)")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="every engine decodes with the decoder's W_Q/W_K/W_V and gate/up fused into one matrix each, "
                        "or not (default: the product's choice, fused on CUDA only; "
                        "GenerationEngine(fuse_projections=...), GMSAModel.generation_fuse_projections)")
    p.add_argument("--data", default=None, help="passages (default: the bundled QA dev split)")
    p.add_argument("--name", default=None, help="output file stem (default decode-<backbone>)")
    args = p.parse_args(argv)
    for flag, full, quick in (("new_tokens", 32, 8), ("repeats", 5, 2), ("warmup", 2, 1)):
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else full)
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2")
    if args.profile and args.profile not in (args.engines or ENGINES):
        p.error(f"--profile {args.profile}: not among the engines timed")
    if args.engines and set(args.engines) - set(ENGINES):
        p.error(f"unknown engines {sorted(set(args.engines) - set(ENGINES))}; choose from {ENGINES}")
    return args


def build_prompt(model, tokenizer, passages: list[str], positions: int, question: str) -> list:
    """The QA prompt with one text document sized so that the decoder reads about ``positions`` positions."""
    from gmsa_rag.prompt import qa_segments

    overhead = sum(len(s) for s in qa_segments(tokenizer, question, [""]))
    ids = bc.token_stream(tokenizer, passages, max(positions - overhead, 1))[: max(positions - overhead, 1)]
    return qa_segments(tokenizer, question, [tokenizer.decode(ids)])


class StepTimer:
    """A streamer (``put``/``end``) that notes when each token arrives; the prompt's put is skipped."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.times.append(time.perf_counter())
        self.prompt_seen = True

    def end(self) -> None:
        pass

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.times, self.times[1:])]


def make_engines(names: list[str], decoder, tune_kernels: bool = False, fuse: bool | None = None) -> dict[str, Any]:
    from gmsa_rag.engine import GenerationEngine

    made = {}
    for name in names:
        if name == "hf":
            made[name] = GenerationEngine(decoder, "hf", fuse_projections=fuse)
        elif name == "static-compiled":
            made[name] = GenerationEngine(decoder, "static", compile_step=True, tune_kernels=tune_kernels,
                                          fuse_projections=fuse)
        else:  # static, static-stop: what the product builds for "static"
            made[name] = made.get("static") or GenerationEngine(decoder, "static", tune_kernels=tune_kernels,
                                                                fuse_projections=fuse)
    return made


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    device = bc.resolve_device(args.device)
    dtype = bc.resolve_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    token_times = (not gpu) if args.token_times is None else args.token_times
    engines = args.engines or (["hf", "static", "static-stop"] if gpu else ["hf", "static"])
    torch.manual_seed(args.seed)
    env = bc.env_info(device, dtype)
    t0 = time.perf_counter()
    decoder, tokenizer, notes = bc.load_decoder(args.backbone, device, dtype, args.tokenizer,
                                                args.prompt + args.new_tokens + 64)
    model = bc.untrained_compressor(decoder, tokenizer, "gmsa", [4], args.backbone, encoder_layers=1, lsa_layers=0)
    load_s = time.perf_counter() - t0
    passages, source = bc.load_passages(args.data)
    prompts = [build_prompt(model, tokenizer, passages, args.prompt, "What is the main topic of the documents?")]
    prompts = prompts * args.batch
    made = make_engines(engines, decoder, args.tune_kernels, args.fuse_projections)
    n = args.new_tokens
    # A stop token that never comes (checked below): the static path then runs its per-step stop check.
    never = [len(tokenizer) - 1]

    def run(name: str, tokens: int, streamer: StepTimer | None = None) -> torch.Tensor:
        batch = model.build_batch(prompts, padding_side="left")
        stop = never if name == "static-stop" else ()
        return made[name].generate(batch.inputs_embeds, batch.attention_mask, tokens, stop_token_ids=stop,
                                   pad_token_id=tokenizer.pad_token_id, streamer=streamer)

    first_call: dict[str, float] = {}
    for name in engines:
        first_call[name] = timed(lambda: run(name, n), device)[0]
        for _ in range(args.warmup):
            run(name, n)
            run(name, 1)
    samples: dict[str, dict[str, list[float]]] = {e: {"ttft": [], "e2e": [], "steps": []} for e in engines}
    outputs: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):
        for name in engines:
            samples[name]["ttft"].append(timed(lambda: run(name, 1), device)[0])
            timer = StepTimer() if token_times else None
            seconds, outputs[name] = timed(lambda: run(name, n, timer), device)
            samples[name]["e2e"].append(seconds)
            if timer is not None:
                samples[name]["steps"] += timer.gaps()

    weight_bytes = decode_step_weight_bytes(decoder)
    bandwidth = args.bandwidth_gbs or (BANDWIDTH_GBS.get(bc.machine_name(device)) if gpu else None)
    limit_ms = weight_bytes / (bandwidth * 1e9) * 1e3 if bandwidth else None
    reference = outputs.get("hf")
    rows = []
    for name in engines:
        ttft, e2e = statistics.median(samples[name]["ttft"]), statistics.median(samples[name]["e2e"])
        decode_ms = (e2e - ttft) / (n - 1) * 1e3
        out = outputs[name]
        if out.shape[1] != n:
            raise RuntimeError(f"{name} returned {out.shape[1]} tokens, expected {n}")
        rows.append({
            "engine": name, "path": made[name].last_path,
            "compiled": bool(made[name].static is not None and made[name].static.compiled),
            "prompt_positions": int(model.build_batch(prompts[:1]).inputs_embeds.shape[1]), "batch": args.batch,
            "ttft_ms": ttft * 1e3, "e2e_s": e2e, "decode_ms_per_token": decode_ms,
            "decode_spread": (max(samples[name]["e2e"]) - min(samples[name]["e2e"])) / e2e,
            "step_ms_median": statistics.median(samples[name]["steps"]) * 1e3 if samples[name]["steps"] else None,
            "step_ms_p25": _quantile(samples[name]["steps"], 0.25),
            "step_ms_p75": _quantile(samples[name]["steps"], 0.75),
            "first_call_s": first_call[name],
            "agreement_with_hf": None if reference is None else float((out == reference).float().mean()),
            "over_limit": decode_ms / limit_ms if limit_ms else None,
            "samples_s": samples[name],
        })
        step = rows[-1]["step_ms_median"]
        print(f"{name:<16} TTFT {ttft * 1e3:8.2f} ms  decode {decode_ms:7.2f} ms/token  e2e {e2e:7.3f} s  "
              + (f"step median {step:7.2f} ms  " if step else "") + f"(first call {first_call[name]:.1f} s)", flush=True)
    profile_rows: list[dict[str, Any]] = []
    if args.profile:
        row = next(r for r in rows if r["engine"] == args.profile)
        profile_rows = profile_run(lambda: run(args.profile, n), device, n - 1, row["decode_ms_per_token"])
    hf_row = next((r for r in rows if r["engine"] == "hf"), None)
    for r in rows:
        if hf_row is not None and r is not hf_row:
            r["decode_speedup_vs_hf"] = hf_row["decode_ms_per_token"] / r["decode_ms_per_token"]
            r["ttft_speedup_vs_hf"] = hf_row["ttft_ms"] / r["ttft_ms"]
            if r["step_ms_median"] and hf_row["step_ms_median"]:
                r["step_speedup_vs_hf"] = hf_row["step_ms_median"] / r["step_ms_median"]
            # paired: the runs of both engines in one round came one after the other
            pairs = list(zip(hf_row["samples_s"]["e2e"], r["samples_s"]["e2e"]))
            r["rounds_faster_than_hf"] = f"{sum(b < a for a, b in pairs)}/{len(pairs)}"
    from gmsa_rag.engine import select_engine

    meta = {**env, "backbone": args.backbone, "passages": source, "prompt_positions": rows[0]["prompt_positions"],
            "new_tokens": n, "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
            "auto_engine_here": select_engine(device), "weight_gib": round(weight_bytes / 2**30, 3),
            "bandwidth_gbs": bandwidth, "weight_bandwidth_limit_ms": limit_ms, "model_load_s": round(load_s, 1),
            "tune_kernels": args.tune_kernels,
            "fuse_projections": any(engine.fuse_projections for engine in made.values()),
            "load_average_at_end": bc.load_average()}
    notes = notes + [
        f"Greedy, exactly {n} new tokens (no stop token), batch {args.batch}, through GenerationEngine.generate "
        "(what GMSAModel.generate_from_segments calls); each run includes prompt assembly (build_batch).",
        f"TTFT = one run with 1 new token; decode ms/token = (e2e - TTFT) / {n - 1}; medians of {args.repeats} runs "
        f"taken round-robin over the engines after {args.warmup} warm-up runs each (compilation happens in the "
        "first call, whose time is listed apart). spread = (max - min) / median of e2e.",
        "static: StaticCache bucketed to powers of two (>= 256 positions); the decode step is compiled with "
        "torch.compile(mode='reduce-overhead') (CUDA graphs) on CUDA, eager elsewhere. static-stop: the same with "
        "a stop token that never comes, so the per-step stop check runs. agreement = share of tokens equal to HF's.",
    ]
    if token_times:
        notes.append("step ms = gaps between consecutive tokens of the timed e2e runs (a streamer notes each token's "
                     f"arrival): {args.repeats} x {n - 1} steps per engine, median and quartiles. 'rounds faster' = "
                     "rounds in which this engine's e2e run beat HF's run of the same round.")
    if limit_ms:
        notes.append(f"Weight-bandwidth limit = {weight_bytes / 1e9:.2f} GB of decoder weights / {bandwidth:.0f} GB/s "
                     f"= {limit_ms:.2f} ms per decode step (batch {args.batch}); 'x limit' = decode ms/token / limit.")
    cols = [bc.Column("engine", "engine"), bc.Column("path", "path"), bc.Column("compiled", "compiled"),
            bc.Column("prompt_positions", "positions"), bc.Column("ttft_ms", "TTFT ms"),
            bc.Column("decode_ms_per_token", "decode ms/tok"), bc.Column("decode_spread", "spread"),
            bc.Column("e2e_s", "e2e s", 3), bc.Column("decode_speedup_vs_hf", "decode × vs HF"),
            bc.Column("ttft_speedup_vs_hf", "TTFT × vs HF"), bc.Column("rounds_faster_than_hf", "rounds faster"), bc.Column("agreement_with_hf", "agreement"),
            bc.Column("first_call_s", "first call s", 1)]
    if token_times:
        cols[6:6] = [bc.Column("step_ms_median", "step ms median"), bc.Column("step_ms_p25", "step p25"),
                     bc.Column("step_ms_p75", "step p75"), bc.Column("step_speedup_vs_hf", "step × vs HF")]
    if limit_ms:
        cols.append(bc.Column("over_limit", "x limit"))
    tables = [("Results (medians)", cols, rows)]
    if profile_rows:
        notes.append(f"Profile of one {args.profile} e2e run ({n} tokens, torch.profiler): per kernel (device "
                     f"activity; CPU operators where there is no device), time and calls per decode step = totals / "
                     f"{n - 1}, share of the device time; 'device busy' = every kernel's time per step against the "
                     "decode ms/token measured above (the rest: the device idle, waiting on the host). Prefill and "
                     "the first token are in the totals, a few % of them at this length.")
        tables.append((f"Where a decode step goes ({args.profile})", PROFILE_COLUMNS, profile_rows))
    fig, axes = bc.new_figure(ncols=2, width=5.0, height=3.8)
    labels = [r["engine"] for r in rows]
    axes[0][0].bar(labels, [r["step_ms_median"] or r["decode_ms_per_token"] for r in rows], color="tab:blue")
    if limit_ms:
        axes[0][0].axhline(limit_ms, color="black", linestyle="--", label=f"weight-bandwidth limit {limit_ms:.2f} ms")
        axes[0][0].legend(fontsize=8)
    axes[0][0].set_ylabel("decode ms/token" + (" (step median)" if token_times else ""))
    axes[0][1].bar(labels, [r["ttft_ms"] for r in rows], color="tab:orange")
    axes[0][1].set_ylabel("TTFT ms")
    for ax in axes[0]:
        ax.set_title(f"{args.backbone}, {meta['machine']}, {meta['prompt_positions']} positions", fontsize=9)
    paths = bc.write_outputs(args.out or bc.default_out_dir(device), args.name or f"{NAME}-{args.backbone}",
                             f"Decode engines: HF generate vs static KV cache ({args.backbone}, {meta['machine']})",
                             meta, tables, fig, notes, {"rows": rows, "profile": profile_rows})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "meta": meta, "paths": paths}


PROFILE_COLUMNS = [bc.Column("kernel", "kernel"), bc.Column("kind", "kind"), bc.Column("ms_per_step", "ms / step", 3),
                   bc.Column("calls_per_step", "calls / step", 1), bc.Column("share", "share of device time")]

#: Kernel-name fragments of matrix multiplies (cuBLAS, cuBLASLt, CUTLASS, Triton mm templates), and the CPU
#: operators that are one.
GEMM_MARKS = ("gemm", "gemv", "cutlass", "nvjet", "xmma", "triton_tem")
GEMM_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")
#: A Triton kernel of torch.compile's that holds a matrix multiply fused with other operators (its name lists them:
#: "triton_red_fused__unsafe_view_mm_mul_silu_t_view_7"), as coordinate-descent tuning makes of batch-1 decode.
_FUSED_MM = re.compile(r"^triton_\w*?_fused_\w*?(?<![a-z])(?:add|b)?mm(?![a-z])")


def kernel_kind(name: str) -> str:
    """``matmul`` for a matrix-multiply kernel or operator (fused with others or not), else ``other``."""
    if name in GEMM_OPS or _FUSED_MM.match(name) or any(mark in name.lower() for mark in GEMM_MARKS):
        return "matmul"
    return "other"


def profile_run(run, device, steps: int, decode_ms: float, top: int = 15) -> list[dict[str, Any]]:
    """Profile one call of ``run`` and return the ``top`` kernels by device time per decode step (``steps`` of them),
    then the sums: every matrix multiply, everything else, the device busy and the decode ms/token measured."""
    from torch.profiler import ProfilerActivity, profile

    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    bc.sync(device)
    with profile(activities=activities) as prof:
        run()
        bc.sync(device)
    kernels = []
    for event in prof.key_averages():
        on_device = getattr(event, "device_type", None) is not None and event.device_type.name == "CUDA"
        if gpu and not on_device:
            continue
        seconds = (getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)) if gpu \
            else event.self_cpu_time_total
        if seconds > 0:
            kernels.append((event.key, seconds / 1e3, event.count))
    total = sum(ms for _, ms, _ in kernels) or 1.0
    kernels.sort(key=lambda k: -k[1])

    rows = [{"kernel": name[:90], "kind": kernel_kind(name), "ms_per_step": ms / steps, "calls_per_step": count / steps,
             "share": ms / total} for name, ms, count in kernels[:top]]
    for label, chosen in (("all matrix multiplies", "matmul"), ("all other kernels", "other")):
        picked = [(ms, count) for name, ms, count in kernels if kernel_kind(name) == chosen]
        rows.append({"kernel": label, "kind": chosen, "ms_per_step": sum(ms for ms, _ in picked) / steps,
                     "calls_per_step": sum(c for _, c in picked) / steps, "share": sum(ms for ms, _ in picked) / total})
    rows.append({"kernel": "device busy", "kind": "sum", "ms_per_step": total / steps,
                 "calls_per_step": sum(c for *_, c in kernels) / steps, "share": 1.0})
    rows.append({"kernel": "decode ms/token measured", "kind": "wall", "ms_per_step": decode_ms,
                 "calls_per_step": None, "share": None})
    return rows


def _quantile(values: list[float], q: float) -> float | None:
    """The q-quantile of ``values`` in ms (None when empty)."""
    if len(values) < 2:
        return values[0] * 1e3 if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] * 1e3


def timed(fn, device) -> tuple[float, Any]:
    bc.sync(device)
    start = time.perf_counter()
    result = fn()
    bc.sync(device)
    return time.perf_counter() - start, result


if __name__ == "__main__":
    main()
