#!/usr/bin/env python
"""Answers against distinct training questions: a data-scaling curve from ``benchmarks/qa.py`` runs.

Each ``--run`` names a series (one reading, e.g. "4x"), how many distinct questions its reader trained on, and the
qa.py JSON file of its answers. Runs of one series and count (seeds) are averaged into one point (and shown one by one
in the plot). A series' slope is the least-squares fit of its points' accuracy on log2(questions), each count weighing
the same: points of accuracy per doubling of the questions, with a bootstrap interval that resamples the questions
(the same draw for every run of the series: they must have read the same questions). ``--fit-from N`` fits only the
counts from N up (the others are still shown). Runs no model.

    python benchmarks/qa.py --data data/qa-multidoc --limit 300 --keep-top 5 --rates 4 --system GMSA=gmsa:RUN_Q25 --name q25
    ...
    python benchmarks/data_scaling.py --run "4x@4401=results/q25.json" --run "4x@8721=results/q50.json" \\
        --run "4x@17537=results/full-seed0.json" --run "4x@17537=results/full-seed1.json" --out results/
"""
from __future__ import annotations

import argparse
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "data-scaling"


def run_spec(text: str) -> tuple[str, int, Path, str | None]:
    """``SERIES@QUESTIONS=FILE.json[:SYSTEM]`` as (series, questions, file, system or None)."""
    try:
        head, path, system = bc.labelled_file(text)
    except argparse.ArgumentTypeError:
        head = ""
    series, at, count = head.rpartition("@")
    if not (at and series and count.isdigit() and int(count) > 0):
        raise argparse.ArgumentTypeError(f"expected SERIES@QUESTIONS=FILE.json[:SYSTEM] (QUESTIONS a count above 0), "
                                         f"got {text!r}")
    return series, int(count), path, system


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=run_spec, action="append", required=True, metavar="SERIES@QUESTIONS=FILE.json[:SYSTEM]",
                   help="one reader's qa.py run: its series, the distinct questions it trained on, the file")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the questions (default 2000)")
    p.add_argument("--interval", type=float, default=90.0, help="the bootstrap interval, in percent (default 90)")
    p.add_argument("--fit-from", type=int, default=0, metavar="N", help="fit the slope over the counts from N up")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=NAME)
    p.add_argument("--title", default="Answers against distinct training questions")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if args.resamples < 1 or not 0 < args.interval < 100:
        p.error("--resamples must be at least 1 and --interval between 0 and 100")
    for series in {s for s, _, _, _ in args.run}:
        if len({n for s, n, _, _ in args.run if s == series and n >= args.fit_from}) < 2:
            p.error(f"series {series!r}: a slope needs runs at two question counts at least (from --fit-from up)")
    return args


def answers_right(path: Path, system: str | None) -> tuple[list[str], np.ndarray, dict[str, Any], str]:
    """A qa.py run's questions, whether each output holds a gold answer (qa.py's accuracy), its row and machine."""
    from gmsa_rag.metrics import answer_in_output

    payload, row = bc.run_row(path, "system", system, "system")
    outputs = payload.get("outputs", [])
    right = np.array([answer_in_output(o[row["system"]], o["answers"]) > 0 for o in outputs], dtype=bool)
    if not outputs or not math.isclose(100.0 * right.mean(), row["accuracy"], abs_tol=1e-6):
        raise SystemExit(f"{path}: its per-question outputs do not give its accuracy {row['accuracy']:.2f} "
                         "(a run without outputs, or another accuracy rule)")
    return [o["question"] for o in outputs], right, row, str(payload["meta"].get("machine"))


def slope(log2_questions: np.ndarray, accuracy: np.ndarray) -> float:
    """Least-squares accuracy points per doubling of the questions."""
    return float(np.polyfit(log2_questions, accuracy, 1)[0])


def series_fit(runs: list[dict[str, Any]], resamples: int, interval: float, seed: int) -> dict[str, Any]:
    """The slope of one series' runs (a count's runs averaged into one point) and its bootstrap interval over the
    questions (paired across runs)."""
    questions = runs[0]["questions"]
    for run in runs[1:]:
        if run["questions"] != questions:
            raise SystemExit(f"series {run['series']!r}: {run['file']} read other questions than {runs[0]['file']} "
                             "(a paired bootstrap needs the same questions in the same order)")
    counts = sorted({r["train_questions"] for r in runs})
    x = np.log2(counts)
    # counts x questions: the share of a count's runs that answered each question
    right = np.stack([np.mean([r["right"] for r in runs if r["train_questions"] == n], axis=0) for n in counts])
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, right.shape[1], size=(resamples, right.shape[1]))
    resampled = [slope(x, 100.0 * right[:, d].mean(axis=1)) for d in draws]
    tail = (100.0 - interval) / 2
    return {"series": runs[0]["series"], "runs": len(runs), "counts": ", ".join(f"{n:,}" for n in counts),
            "questions_read": right.shape[1], "slope": slope(x, 100.0 * right.mean(axis=1)),
            "low": float(np.percentile(resampled, tail)), "high": float(np.percentile(resampled, 100.0 - tail))}


def plot(runs: list[dict[str, Any]], rows: list[dict[str, Any]], fits: list[dict[str, Any]]):
    fig, axes = bc.new_figure(width=7.0, height=4.5)
    ax = axes[0][0]
    for k, fit in enumerate(fits):
        color = f"C{k}"
        mine = [r for r in rows if r["series"] == fit["series"]]
        ax.plot([r["train_questions"] for r in mine], [r["accuracy"] for r in mine], "o-", color=color,
                label=f"{fit['series']}: {fit['slope']:+.1f} per doubling ({fit['low']:+.1f} to {fit['high']:+.1f})")
        points = [r for r in runs if r["series"] == fit["series"]]
        ax.scatter([r["train_questions"] for r in points], [r["accuracy"] for r in points], s=14, color=color,
                   alpha=0.45, marker="x")
    ax.set_xscale("log", base=2)
    counts = sorted({r["train_questions"] for r in runs})
    ax.set_xticks(counts, [f"{n:,}" for n in counts], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("distinct training questions (log 2)")
    ax.set_ylabel("accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    return fig


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    runs = []
    for series, count, path, system in args.run:
        questions, right, row, machine = answers_right(path, system)
        runs.append({"series": series, "train_questions": count, "file": str(path), "questions": questions,
                     "right": right, "accuracy": row["accuracy"], "exact_match": row["exact_match"], "f1": row["f1"],
                     "machine": machine})
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        grouped[run["series"], run["train_questions"]].append(run)
    series_names = list(dict.fromkeys(r["series"] for r in runs))
    rows = [{"series": series, "train_questions": count, "runs": len(group),
             **{key: float(np.mean([r[key] for r in group])) for key in ("accuracy", "exact_match", "f1")},
             "each": ", ".join(f"{r['accuracy']:.1f}" for r in group)}
            for (series, count), group in sorted(grouped.items(), key=lambda item: (series_names.index(item[0][0]),
                                                                                      item[0][1]))]
    fits = [series_fit([r for r in runs if r["series"] == s and r["train_questions"] >= args.fit_from],
                       args.resamples, args.interval, args.seed) for s in series_names]
    C = bc.Column
    columns = [C("series", "series"), C("train_questions", "training questions"), C("runs", "runs"),
               C("accuracy", "accuracy", 1), C("each", "each run"), C("exact_match", "EM", 1), C("f1", "F1", 1)]
    fit_columns = [C("series", "series"), C("counts", "fitted counts"), C("runs", "runs"),
                   C("questions_read", "questions read"),
                   C("slope", "accuracy points per doubling", 2), C("low", f"{args.interval:g}% low", 2),
                   C("high", f"{args.interval:g}% high", 2)]
    meta = {"machine": ", ".join(sorted({r["machine"] for r in runs})), "resamples": args.resamples,
            "interval": args.interval, "seed": args.seed, "fit_from": args.fit_from,
            "runs": [{k: r[k] for k in ("series", "train_questions", "file")} for r in runs]}
    notes = ["Rows read from benchmarks/qa.py JSON files (no model run here); accuracy: a gold answer appears in the "
             "output, recomputed per question from each file's outputs (it must equal the file's own). 'accuracy' "
             "averages a count's runs; 'each run' lists them. Slope: least squares of the counts' accuracy on "
             f"log2(training questions), each count one point; interval: {args.resamples} bootstrap resamples of the questions read, the "
             "same draw for every run of a series. It covers which questions were read, not training noise: runs "
             "of another seed move the points too (compare a count's runs in 'each run')."]
    paths = bc.write_outputs(args.out, args.name, args.title, meta,
                             [("Results", columns, rows), ("Slope per doubling of the questions", fit_columns, fits)],
                             plot(runs, rows, fits), notes, {"rows": rows, "fits": fits})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "fits": fits, "paths": paths}


if __name__ == "__main__":
    main()
