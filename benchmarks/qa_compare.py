"""Several ``benchmarks/qa.py`` runs side by side: one table and one chart of accuracy and EM (with each row's
decoder positions, data, documents, decoding and machine). Reads the runs' JSON files; runs no model.

    python benchmarks/qa_compare.py --run "base, 5 docs=results/qa-base.json" \\
        --run "GMSA 4x=results/qa-gmsa.json:GMSA r=4" --name qa-compare --out results/
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import common as bc


def parse_args(argv=None) -> argparse.Namespace:
    return bc.parse_compare_args(argv, __doc__.split("\n\n")[0], "qa.py", "system", "qa-compare", "QA runs compared")


def load_row(label: str, path: Path, system: str | None) -> dict[str, Any]:
    """The row of ``system`` in a qa.py JSON, labelled, with the run's settings beside it (and, under
    ``_answers``, its per-question outputs for :func:`paired`)."""
    payload, row = bc.run_row(path, "system", system, "system")
    meta = payload["meta"]
    return {"label": label, "file": path.name, "system": row["system"], "n": row["n"], "accuracy": row["accuracy"],
            "exact_match": row["exact_match"], "f1": row["f1"], "positions": row["mean_decoder_positions"],
            "data": Path(meta.get("data", "")).name or meta.get("data"), "documents": meta.get("documents"),
            "decoding": meta.get("decoding"), "machine": meta.get("machine"),
            "_answers": [(o["question"], o["answers"], o[row["system"]]) for o in payload.get("outputs", [])]}


def paired(row: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """Questions ``row`` answers right that ``reference`` does not (gained) and the reverse (lost), with the two-sided
    sign test's p on them; empty when the two did not answer the same questions in the same order."""
    from gmsa_rag.metrics import answer_in_output

    mine, theirs = row["_answers"], reference["_answers"]
    if not mine or [q for q, _, _ in mine] != [q for q, _, _ in theirs]:
        return {}
    right = [(answer_in_output(a, g) > 0, answer_in_output(b, g) > 0) for (_, g, a), (_, _, b) in zip(mine, theirs)]
    gained = sum(row_right and not ref_right for row_right, ref_right in right)
    lost = sum(ref_right and not row_right for row_right, ref_right in right)
    return {"gained": gained, "lost": lost, "sign_p": sign_test(gained, lost)}


def sign_test(gained: int, lost: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven if either side were as likely."""
    n, k = gained + lost, min(gained, lost)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n) if n else 1.0


def plot(rows: list[dict[str, Any]]):
    fig, axes = bc.new_figure(width=8.0, height=0.5 * len(rows) + 2.5)
    ax = axes[0][0]
    y = list(range(len(rows)))[::-1]
    ax.barh([v + 0.2 for v in y], [r["accuracy"] for r in rows], 0.4, label="accuracy (a gold answer in the output)")
    ax.barh([v - 0.2 for v in y], [r["exact_match"] for r in rows], 0.4, label="exact match")
    for v, r in zip(y, rows):
        ax.text(r["accuracy"] + 0.5, v + 0.2, f"{r['accuracy']:.1f}", va="center", fontsize=7)
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    ax.set_xlim(0, min(100.0, max(max(r["accuracy"], r["exact_match"]) for r in rows) + 12))
    ax.set_xlabel("%")
    ax.legend(fontsize=7, loc="upper right")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [load_row(*run) for run in args.run]
    for row in rows[1:]:
        row.update(paired(row, rows[0]))
    for row in rows:
        del row["_answers"]
    C = bc.Column
    columns = [C("label", "run"), C("n", "n"), C("accuracy", "accuracy", 1), C("exact_match", "EM", 1),
               C("f1", "F1", 1), C("gained", "gained vs row 1"), C("lost", "lost vs row 1"), C("sign_p", "sign test p", 3),
               C("positions", "decoder positions", 0), C("documents", "documents"),
               C("decoding", "decoding"), C("machine", "machine"), C("file", "file")]
    meta = {"runs": len(rows), "machine": ", ".join(sorted({str(r["machine"]) for r in rows})),
            "data": ", ".join(sorted({str(r["data"]) for r in rows}))}
    paths = bc.write_outputs(args.out, args.name, args.title, meta, [("Results", columns, rows)], plot(rows),
                             ["Rows read from benchmarks/qa.py JSON files (no model run here); accuracy: a gold "
                              "answer appears in the output; EM / F1: SQuAD normalisation. All in percent.",
                              "gained / lost: questions a row answers (accuracy) and the first row does not, and the "
                              "reverse, where both answered the same questions; sign test p: two-sided, on those."],
                             {"rows": rows})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
