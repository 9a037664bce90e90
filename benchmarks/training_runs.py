#!/usr/bin/env python
"""Tables and plots from training runs' logs (``<run>/metrics.jsonl``): the recipe ablations and learning curves.

Every number comes from the runs' own logs: the dev evaluation the trainer ran (reconstruction BLEU per rate on
the dev corpus for stage 1, EM/F1/accuracy for stage 2), the tokens seen and the throughput it measured.

    python benchmarks/training_runs.py --runs runs/abl-* --baseline default --name stage1-ablations --out benchmarks/results/h100-x4
    python benchmarks/training_runs.py --runs runs/long runs/abl-tcp --name stage1-curves --curves --out ...
    python benchmarks/training_runs.py --throughput --runs runs/sweep/* --baseline eager16x4 --name stage1-throughput ...

``--winner KEY [KEY ...]`` prints the latest checkpoint of the run whose last evaluation is best by KEY (more keys
break ties; a tie that remains goes to the first run given) and nothing else, for a script that judges the winner
on held-out data next, e.g. after stage-2 ablations chosen on dev:

    ckpt=$(python benchmarks/training_runs.py --runs runs/r26/s2-* --winner accuracy@4x gold_accuracy@4x)

``--throughput`` compares training speed instead: the median of the tokens/s windows the trainer logged after the first
few (compile and warm-up), per run, against the baseline run, with each run's micro-batch, accumulation and --compile.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402


def read_run(path: Path) -> dict[str, Any]:
    """A run's config, training records and evaluation records."""
    records = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    config_file = path / "train_config.json"
    return {
        "name": path.name.removeprefix("abl-"),
        "config": json.loads(config_file.read_text()) if config_file.is_file() else {},
        "train": [r for r in records if "loss" in r],
        "evals": [r for r in records if any(k.startswith(("bleu@", "accuracy")) for k in r)],  # stage 1 / stage 2
    }


def summary_row(run: dict[str, Any], metric: str) -> dict[str, Any]:
    last_eval = run["evals"][-1] if run["evals"] else {}
    train = run["train"]
    tail = train[-5:]
    row = {"run": run["name"], "steps": max([r["step"] for r in train[-1:] + run["evals"][-1:]], default=0),
           "tokens_m": (last_eval.get("tokens") or (train[-1]["tokens"] if train else 0)) / 1e6,
           "loss": sum(r["loss"] for r in tail) / len(tail) if tail else None,
           "tok_s": sum(r["tokens_per_s"] for r in tail) / len(tail) if tail else None}
    for key, value in last_eval.items():
        if key.startswith(f"{metric}@") or key.startswith(("semantic@",)):
            row[key] = value
    if metric in last_eval:  # an uncompressed run (stage-2 no-compress baseline): one figure, no rate
        row["text"] = last_eval[metric]
    return row


def shift_records(runs: list[dict[str, Any]], flag: str, specs: list[str], key: str, unit: float) -> None:
    """Add what came before a run's log to ``key`` of its records: ``specs`` are ``RUN=NUMBER`` (NUMBER in ``unit``)."""
    for spec in specs:
        name, _, amount = spec.partition("=")
        run = next((r for r in runs if r["name"] == name), None)
        try:
            shift = float(amount) * unit
        except ValueError:
            run = None
        if run is None:
            raise SystemExit(f"{flag} {spec!r}: expected RUN=NUMBER with RUN one of {[r['name'] for r in runs]}")
        for record in run["train"] + run["evals"]:
            record[key] = record.get(key, 0) + (round(shift) if key == "step" else shift)


def main(argv=None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, type=Path, help="run folders (each with metrics.jsonl)")
    p.add_argument("--metric", nargs="+", default=["bleu"],
                   help="the per-rate evaluation metric(s) to tabulate, one table each (default bleu; e.g. span_bleu, "
                        "accuracy, gold_accuracy)")
    p.add_argument("--baseline", default=None, help="run name the 'vs baseline' column compares with")
    p.add_argument("--name", default="training-runs")
    p.add_argument("--title", default="Training runs")
    p.add_argument("--machine", default="", help="where the runs trained (for the header)")
    p.add_argument("--out", type=Path, default=None, help="output folder (needed but with --winner)")
    p.add_argument("--note", action="append", default=[], help="a note for the markdown (repeatable)")
    p.add_argument("--offset", action="append", default=[], metavar="RUN=MILLIONS",
                   help="tokens (millions) a run had seen before its log starts, e.g. one trained further with --init "
                        "(repeatable; shifts its curves and its tokens column)")
    p.add_argument("--step_offset", action="append", default=[], metavar="RUN=STEPS",
                   help="optimizer steps a run had taken before its log starts (repeatable; shifts its curves and its "
                        "steps column, e.g. the last of several chained runs on a whole-budget step axis)")
    p.add_argument("--x_axis", default="tokens", choices=["tokens", "steps"],
                   help="what the curves are drawn against (steps: runs whose steps saw different token counts)")
    p.add_argument("--throughput", action="store_true", help="tabulate and plot training speed (tokens/s) instead")
    p.add_argument("--skip", type=int, default=3, help="--throughput: logged windows left out at the start (default 3)")
    p.add_argument("--winner", nargs="+", default=None, metavar="KEY",
                   help="print the latest checkpoint of the run whose last evaluation is best by KEY "
                        "(e.g. accuracy@4x; more keys break ties) and stop")
    args = p.parse_args(argv)
    if args.out is None and not args.winner:
        p.error("--out is required (but with --winner)")

    folders = [r for r in args.runs if (r / "metrics.jsonl").is_file()]
    runs = [read_run(r) for r in folders]
    if not runs:
        raise SystemExit("no run folder with a metrics.jsonl among --runs")
    if args.winner:
        return {"winner": winner(folders, runs, args.winner)}
    if args.throughput:
        return throughput(runs, args)
    shift_records(runs, "--offset", args.offset, "tokens", 1e6)  # a run that continued another (--init)
    shift_records(runs, "--step_offset", args.step_offset, "step", 1)
    tables = [metric_table(runs, metric, args.baseline) for metric in args.metric]

    def x_of(record: dict[str, Any]) -> float:
        return record.get("step", 0) if args.x_axis == "steps" else record.get("tokens", 0) / 1e6

    x_label = "optimizer steps" if args.x_axis == "steps" else "tokens seen (M)"
    fig, axes = bc.new_figure(ncols=1 + len(args.metric), width=6.0, height=4.2)
    ax_loss = axes[0][0]
    colors = {run["name"]: f"C{i % 10}" for i, run in enumerate(runs)}  # one colour per run in every panel
    for run in runs:
        ax_loss.plot([x_of(r) for r in run["train"]], [r["loss"] for r in run["train"]], label=run["name"], lw=1,
                     color=colors[run["name"]])
    ax_loss.set_xlabel(x_label)
    ax_loss.set_ylabel("training loss")
    ax_loss.set_yscale("log")
    curves: dict[str, dict[str, list]] = {}  # metric -> run -> the (x, value@4x) points drawn
    for metric, ax_eval in zip(args.metric, axes[0][1:]):
        key = f"{metric}@4x"
        for run in runs:
            points = [(x_of(e), e.get(key, e.get(metric))) for e in run["evals"] if key in e or metric in e]
            curves.setdefault(metric, {})[run["name"]] = points
            if points:
                ax_eval.plot(*zip(*points), marker="o", label=run["name"], color=colors[run["name"]])
        ax_eval.set_xlabel(x_label)
        ax_eval.set_ylabel(f"dev {metric} @4x")
    for ax in axes[0]:
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    meta = {"machine": args.machine, "runs": [str(r) for r in args.runs]}
    sections = [(f"Results: {metric}" if len(tables) > 1 else "Results", columns, rows)
                for metric, (columns, rows) in zip(args.metric, tables)]
    paths = bc.write_outputs(args.out, args.name, args.title, meta, sections, fig, args.note,
                             {"rows": tables[0][1], "tables": {m: rows for m, (_, rows) in zip(args.metric, tables)},
                              "runs": runs})
    for _, columns, rows in sections:
        print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": tables[0][1], "tables": [rows for _, rows in tables], "curves": curves, "paths": paths}


def winner(folders: list[Path], runs: list[dict[str, Any]], keys: list[str]) -> Path:
    """The latest checkpoint of the run (``runs``, read from ``folders``) whose last evaluation holding every key is
    best by ``keys`` in order; printed. A clear exit where no run has such an evaluation or the best has no
    checkpoint."""
    from gmsa_rag.train import latest_checkpoint

    scored = []
    for path, run in zip(folders, runs):
        last = next((e for e in reversed(run["evals"]) if all(k in e for k in keys)), None)
        if last is not None:
            scored.append((tuple(last[k] for k in keys), path))
    if not scored:
        raise SystemExit(f"no run among --runs has an evaluation with {', '.join(keys)}")
    best = max(scored, key=lambda item: item[0])[1]  # (max keeps the first of equal scores)
    checkpoint = latest_checkpoint(str(best))
    if checkpoint is None:
        raise SystemExit(f"{best} scored best by {', '.join(keys)} but has no checkpoint")
    for score, path in scored:
        print(f"{path}: {', '.join(f'{k} {v:g}' for k, v in zip(keys, score))}", file=sys.stderr)
    print(checkpoint)
    return checkpoint


def throughput(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Median logged tokens/s per run after ``args.skip`` windows, against the baseline run; tokens/s per window."""
    import statistics

    rows = []
    for run in runs:
        rates = [r["tokens_per_s"] for r in run["train"]][args.skip :]
        config = run["config"]
        rows.append({"run": run["name"], "micro_batch": config.get("batch_size"), "accum": config.get("grad_accum"),
                     "compile": bool(config.get("compile")), "windows": len(rates),
                     "steps": run["train"][-1]["step"] if run["train"] else 0,
                     "tok_s": statistics.median(rates) if rates else None,
                     "spread": f"{min(rates) / 1e3:.0f}-{max(rates) / 1e3:.0f}k" if rates else ""})
    base = next((row for row in rows if row["run"] == args.baseline and row["tok_s"]), None)
    for row in rows:
        row["speedup"] = row["tok_s"] / base["tok_s"] if base and row["tok_s"] else None
    C = bc.Column
    columns = [C("run", "run"), C("micro_batch", "micro-batch", 0), C("accum", "accumulation", 0),
               C("compile", "compiled blocks"), C("steps", "steps", 0), C("windows", "windows timed", 0),
               C("tok_s", "tokens/s (median)", 0), C("spread", "range"), C("speedup", f"x vs {args.baseline}", 2)]
    fig, axes = bc.new_figure(ncols=1, width=7.0, height=4.2)
    ax = axes[0][0]
    for i, run in enumerate(runs):
        ax.plot([r["step"] for r in run["train"]], [r["tokens_per_s"] / 1e3 for r in run["train"]], marker=".",
                label=run["name"], color=f"C{i % 10}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("encoder tokens/s (thousands), per logged window")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    meta = {"machine": args.machine, "runs": [str(r) for r in args.runs], "windows_skipped": args.skip}
    paths = bc.write_outputs(args.out, args.name, args.title, meta, [("Results", columns, rows)], fig, args.note,
                             {"rows": rows, "runs": runs})
    print(bc.markdown_table(columns, rows))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "paths": paths}


def metric_table(runs: list[dict[str, Any]], metric: str, baseline: str | None) -> tuple[list, list[dict[str, Any]]]:
    """Columns and one summary row per run for one per-rate metric, with deltas against the baseline run."""
    rows = [summary_row(r, metric) for r in runs]
    rates = sorted({int(k.split("@")[1].rstrip("x")) for row in rows for k in row if k.startswith(f"{metric}@")})
    base = next((row for row in rows if row["run"] == baseline), None)
    for row in rows:
        if base is not None:
            for r in rates:
                key = f"{metric}@{r}x"
                if key in row and key in base:
                    row[f"delta@{r}x"] = row[key] - base[key]
    C = bc.Column
    digits = 4 if "loss" in metric else 1  # losses in nats differ in the third decimal; scores in percent
    columns = [C("run", "run"), C("steps", "steps", 0), C("tokens_m", "tokens (M)", 1), C("loss", "train loss", 3),
               C("tok_s", "tokens/s", 0)]
    columns += [C(f"{metric}@{r}x", f"{metric} {r}x", digits) for r in rates]
    if any("text" in row for row in rows):
        columns.append(C("text", f"{metric} uncompressed", digits))
    if base is not None:
        columns += [C(f"delta@{r}x", f"Δ{r}x vs {baseline}", digits) for r in rates]
    return columns, rows


if __name__ == "__main__":
    main()
