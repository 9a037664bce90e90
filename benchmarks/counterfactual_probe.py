#!/usr/bin/env python
"""Counterfactual probe: does a reader answer from the documents, or from what it learnt by heart?

``python -m gmsa_rag.data.counterfactual`` writes a dev split's questions with the answer in the gold passage swapped
for another question's answer of the same kind; ``benchmarks/qa.py`` reads them (and, for comparison, the same split
unswapped). This script sets those readings side by side, per reader, on the swapped questions: how often the output
holds the swapped-in answer (it followed the documents), how often the original answer (it answered from memory),
and its accuracy on the same questions unswapped. Runs no model: it replays the swap from the same arguments to find
each question's original answers.

    python -m gmsa_rag.data.counterfactual data/qa-multidoc --limit 200 --out runs/cf-dev200.jsonl.gz
    python benchmarks/qa.py --data runs/cf-dev200.jsonl.gz --keep-top 5 --rates 4 --system GMSA=gmsa:CKPT --name cf
    python benchmarks/qa.py --data data/qa-multidoc --limit 200 --keep-top 5 --rates 4 --system GMSA=gmsa:CKPT --name plain
    python benchmarks/counterfactual_probe.py --data data/qa-multidoc --limit 200 \\
        --run "GMSA 4x=results/cf.json" --unswapped "GMSA 4x=results/plain.json" --out results/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "counterfactual-probe"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="the QA set the swapped questions were written from")
    p.add_argument("--split", default="dev")
    p.add_argument("--limit", type=int, default=None, help="as given to gmsa_rag.data.counterfactual")
    p.add_argument("--max-docs", type=int, default=5, help="as given to gmsa_rag.data.counterfactual (default 5)")
    p.add_argument("--seed", type=int, default=0, help="as given to gmsa_rag.data.counterfactual (default 0)")
    p.add_argument("--run", type=bc.labelled_file, action="append", required=True, metavar="LABEL=FILE.json[:SYSTEM]",
                   help="a reader: its qa.py run over the swapped questions")
    p.add_argument("--unswapped", type=bc.labelled_file, action="append", default=[], metavar="LABEL=FILE.json[:SYSTEM]",
                   help="the same reader's qa.py run over the split unswapped (same label; optional)")
    p.add_argument("--name", default=NAME)
    p.add_argument("--title", default="Counterfactual probe: answers from the documents or from memory")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not args.data.exists():
        p.error(f"--data {args.data}: no such file or folder")
    labels = [label for label, _, _ in args.run]
    for label, _, _ in args.unswapped:
        if label not in labels:
            p.error(f"--unswapped {label!r} names no --run")
    return args


def outputs(path: Path, system: str | None) -> tuple[dict[str, str], str]:
    """A qa.py run's output per question, and the machine it ran on."""
    payload, row = bc.run_row(path, "system", system, "system")
    return {o["question"]: o[row["system"]] for o in payload.get("outputs", [])}, str(payload["meta"].get("machine"))


def reader_row(label: str, swapped: dict[str, str], unswapped: dict[str, str] | None,
               originals: dict[str, tuple[list[str], list[str]]]) -> dict[str, Any]:
    """Shares (percent) of the swapped questions the reader answered whose output holds the swapped-in answer, the
    original answer, and (given its unswapped run) a gold answer when unswapped."""
    from gmsa_rag.metrics import answer_in_output

    questions = [q for q in originals if q in swapped]
    if not questions:
        raise SystemExit(f"{label}: its run holds none of the {len(originals)} swapped questions: another --limit or "
                         f"--seed wrote them?")

    def share(hits) -> float:
        return 100.0 * sum(hits) / len(questions)

    row = {"label": label, "n": len(questions),
           "follows": share(answer_in_output(swapped[q], originals[q][1]) > 0 for q in questions),
           "original": share(answer_in_output(swapped[q], originals[q][0]) > 0 for q in questions), "unswapped": None}
    if unswapped is not None:
        missing = [q for q in questions if q not in unswapped]
        if missing:
            raise SystemExit(f"{label}: its unswapped run lacks {len(missing)} of the swapped questions")
        row["unswapped"] = share(answer_in_output(unswapped[q], originals[q][0]) > 0 for q in questions)
    return row


def plot(rows: list[dict[str, Any]]):
    fig, axes = bc.new_figure(width=8.0, height=0.7 * len(rows) + 2.5)
    ax = axes[0][0]
    y = list(range(len(rows)))[::-1]
    bars = [("unswapped", "unswapped: a gold answer"), ("follows", "swapped: the swapped-in answer"),
            ("original", "swapped: the original answer")]
    for k, (key, name) in enumerate(bars):
        values = [r[key] or 0.0 for r in rows]
        ax.barh([v + 0.25 - 0.25 * k for v in y], values, 0.25, label=name)
        for v, value in zip(y, values):
            ax.text(value + 0.5, v + 0.25 - 0.25 * k, f"{value:.1f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    ax.set_xlabel("% of the swapped questions")
    ax.set_xlim(0, min(100.0, max(max(r[key] or 0.0 for key, _ in bars) for r in rows) + 8))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3)
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    from gmsa_rag.data.counterfactual import counterfactual_pairs
    from gmsa_rag.data.qa import load_qa

    pairs = counterfactual_pairs(load_qa(args.data, args.split, args.limit), args.max_docs, args.seed)
    originals = {swapped.question: (shown.answers, swapped.answers) for shown, swapped in pairs}
    if not originals:
        raise SystemExit(f"{args.data} ({args.split}, limit {args.limit}) gives no counterfactual question")
    unswapped = {label: outputs(path, system) for label, path, system in args.unswapped}
    swapped = {label: outputs(path, system) for label, path, system in args.run}
    rows = [reader_row(label, answers, unswapped[label][0] if label in unswapped else None, originals)
            for label, (answers, _) in swapped.items()]
    machines = sorted({machine for _, machine in [*swapped.values(), *unswapped.values()]})
    C = bc.Column
    columns = [C("label", "reader"), C("n", "swapped questions"), C("unswapped", "unswapped: accuracy", 1),
               C("follows", "swapped: says the swapped-in answer", 1), C("original", "swapped: says the original answer", 1)]
    meta = {"machine": ", ".join(machines), "data": str(args.data), "split": args.split, "limit": args.limit, "max_docs": args.max_docs,
            "seed": args.seed, "runs": {label: str(path) for label, path, _ in args.run},
            "unswapped_runs": {label: str(path) for label, path, _ in args.unswapped}}
    paths = bc.write_outputs(args.out, args.name, args.title, meta, [("Results", columns, rows)], plot(rows),
                             [f"{len(pairs)} swapped questions (gmsa_rag.data.counterfactual on {args.data} "
                              f"{args.split}, limit {args.limit}, {args.max_docs} documents, seed {args.seed}); rows "
                              "read from benchmarks/qa.py JSON files (no model run here). 'says': the answer appears in "
                              "the output (accuracy's test). All in percent of the swapped questions each reader read."],
                             {"rows": rows})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
