"""How often BM25 over a question's own documents ranks its gold passage first (gmsa_rag.lexical), against the
documents' order in the file and chance. Reads a QA file (or a pooled folder's split laid out as the trainer's dev
shows it); runs no model.

    python benchmarks/lexical_rank.py --data data/nq-multidoc/dev.jsonl.gz --limit 200 --out results/cpu-2core/
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common as bc

TOPS = (1, 2, 3)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, action="append", required=True,
                   help="QA jsonl(.gz) or pooled QA folder; may repeat (one row each)")
    p.add_argument("--split", default="dev")
    p.add_argument("--max-docs", type=int, default=5, help="documents per question of a pooled folder (default 5)")
    p.add_argument("--limit", type=int, default=200, help="first N questions of each (default 200)")
    p.add_argument("--name", default="lexical-rank")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p.parse_args(argv)


def gold_at(data: Path, split: str, limit: int, max_docs: int) -> dict[str, Any]:
    """Percent of questions whose gold passage is among the top 1/2/3 by BM25, by file order, and by chance."""
    from gmsa_rag.data.qa import load_as_shown
    from gmsa_rag.lexical import ranked

    if not data.exists():
        raise SystemExit(f"no QA data at {data}")
    examples = [e for e in load_as_shown(data, split, limit, max_docs) if e.gold_index is not None and len(e.contexts) > 1]
    if not examples:
        raise SystemExit(f"{data}: no question with a marked gold passage among several documents")
    row: dict[str, Any] = {"data": data.name if data.is_dir() else f"{data.parent.name}/{data.name}", "n": len(examples),
                           "documents": sum(len(e.contexts) for e in examples) / len(examples)}
    order = [ranked(e.question, e.contexts) for e in examples]
    for k in TOPS:
        row[f"bm25@{k}"] = 100 * sum(e.gold_index in o[:k] for e, o in zip(examples, order)) / len(examples)
        row[f"file@{k}"] = 100 * sum(e.gold_index < k for e in examples) / len(examples)
        row[f"chance@{k}"] = 100 * sum(min(k, len(e.contexts)) / len(e.contexts) for e in examples) / len(examples)
    return row


def plot(rows: list[dict[str, Any]]):
    fig, axes = bc.new_figure(ncols=len(rows), width=4.5, height=3.8)
    for ax, row in zip(axes[0], rows):
        for i, (kind, label) in enumerate((("bm25", "BM25"), ("file", "file order"), ("chance", "chance"))):
            ax.bar([k + (i - 1) * 0.27 for k in TOPS], [row[f"{kind}@{k}"] for k in TOPS], 0.27, label=label)
        ax.set_xticks(list(TOPS))
        ax.set_xlabel("gold passage among the top k")
        ax.set_ylabel("% of questions")
        ax.set_ylim(0, 100)
        ax.set_title(f"{row['data']} (n={row['n']})", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [gold_at(d, args.split, args.limit, args.max_docs) for d in args.data]
    C = bc.Column
    columns = [C("data", "data"), C("n", "n"), C("documents", "documents / question", 1)]
    columns += [C(f"{kind}@{k}", f"{kind} @{k}", 1) for kind in ("bm25", "file", "chance") for k in TOPS]
    meta = {"machine": bc.machine_name("cpu"), "split": args.split, "limit": args.limit}
    paths = bc.write_outputs(args.out, args.name, "Gold passage ranked first by BM25 over a question's documents", meta,
                             [("Results", columns, rows)], plot(rows),
                             ["BM25: gmsa_rag.lexical (bm25s, Lucene weighting, English stop words), the question "
                              "against its own documents; file order: the documents as the prompt shows them; "
                              "chance: k / documents. Percent of questions."], {"rows": rows})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
