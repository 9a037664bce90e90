#!/usr/bin/env python
"""Where a training step's time and memory go: wall time per phase and the torch profiler's top operators.

Takes the trainer's own flags (``python -m gmsa_rag.train --help``) and runs its samples, model and loss, one
process, no optimizer (the phases that scale with data: prompt building with the encoder, the decoder loss, the
backward pass). Writes ``profile-train-step.md`` (phase table, peak memory, operator tables) to ``--out``.

    python benchmarks/profile_train_step.py --out results/ -- --stage keft --init checkpoints/smollm2-gmsa-ae \\
        --data data/qa-multidoc --max_docs 5 --batch_size 8 --grad_accum 8
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gmsa_rag.samples import build_prompts  # noqa: E402
from gmsa_rag.train import build_model, distillation, load_data, parse_args, step_batches  # noqa: E402


def main(argv: list[str] | None = None) -> str:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument("--steps", type=int, default=2, help="profiled optimizer steps (after one warm-up step)")
    p.add_argument("--cudnn-sdp", dest="cudnn_sdp_off", action="store_false",
                   help="leave cuDNN attention on (the trainer turns it off; this shows why)")
    args = p.parse_args(argv[:split])
    cfg = parse_args(argv[split + 1 :])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.enable_cudnn_sdp(not args.cudnn_sdp_off)  # what gmsa_rag.train does: off
    model = build_model(cfg, device)
    if cfg.compile:  # as the trainer does (the warm-up step below compiles)
        model.compile_blocks()
    data = load_data(cfg, model.tokenizer)
    model.train()
    rates = list(model.config.rates)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    distill = distillation(cfg, model)
    seconds: dict[str, float] = defaultdict(float)

    def timed(name: str, fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with record_function(name):
            out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] += time.perf_counter() - start
        return out

    def step(index: int) -> None:
        for samples in step_batches(index, data, cfg, rates, 0):
            with autocast:
                if distill.active:
                    loss = timed("loss (prompts, encoder, decoder, teacher)", lambda: model(
                        samples, distill.distill_weight, distill.teacher, distill.hidden_weight, distill.soft_weight))
                else:
                    prompts = timed("prompts + encoder", lambda: build_prompts(model, samples))
                    loss = timed("decoder loss", lambda: model.loss(prompts))
            timed("backward", loss.backward)
        model.zero_grad(set_to_none=True)

    step(0)
    seconds.clear()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    wall = time.perf_counter()
    with profile(activities=activities) as prof:
        for i in range(1, args.steps + 1):
            step(i)
    wall = (time.perf_counter() - wall) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    lines = [f"# Training step profile ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'})", "",
             f"flags: `{' '.join(argv[split + 1:])}`", "",
             f"- wall per optimizer step ({cfg.batch_size} x {cfg.grad_accum} samples): {wall:.3f} s",
             f"- peak allocated memory: {peak:.2f} GiB", "", "| phase | s / step |", "|---|---:|"]
    lines += [f"| {name} | {t / args.steps:.3f} |" for name, t in seconds.items()]
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    lines += ["", f"## Top operators by {sort}", "", "```",
              prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=60), "```"]
    if device.type == "cuda":
        lines += ["", "## Top operators by cpu_time_total", "", "```",
                  prof.key_averages().table(sort_by="cpu_time_total", row_limit=20, max_name_column_width=60), "```"]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile-train-step.md").write_text(text)
    print("\n".join(lines[:12 + len(seconds)]))
    return text


if __name__ == "__main__":
    main()
