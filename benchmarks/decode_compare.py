"""Several ``benchmarks/decode.py`` runs side by side: one table and one chart of decode ms/token against the
weight-bandwidth limit (and 1.5x it), with each run's machine, date, settings and first-call time. Reads the runs'
JSON files; runs no model.

    python benchmarks/decode_compare.py --run "default=results/h200/decode-7b-default.json:static" \\
        --run "tuned=results/h200/decode-7b-maxautotune-cdt.json" --name decode-compare --out results/h200
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import common as bc

#: The multiple of the weight-bandwidth limit that issue 12 asks the decode step to reach.
TARGET_X_LIMIT = 1.5


def parse_args(argv=None) -> argparse.Namespace:
    return bc.parse_compare_args(argv, __doc__.split("\n\n")[0], "decode.py", "engine", "decode-compare",
                                 "Decode runs compared")


def load_row(label: str, path: Path, engine: str | None) -> dict[str, Any]:
    """The row of ``engine`` in a decode.py JSON, labelled, with the run's settings beside it."""
    payload, row = bc.run_row(path, "engine", engine, "engine")
    meta = payload["meta"]
    settings = [s for s in (meta.get("environment"), "tune_kernels" if meta.get("tune_kernels") else None,
                            "coordinate descent (option)" if meta.get("coordinate_descent_tuning") else None,
                            "fused projections" if meta.get("fuse_projections") else None) if s]
    return {"label": label, "file": path.name, "engine": row["engine"], "decode_ms": row["decode_ms_per_token"],
            "x_limit": row.get("over_limit"), "limit_ms": meta.get("weight_bandwidth_limit_ms"),
            "first_call_s": row.get("first_call_s"), "ttft_ms": row.get("ttft_ms"),
            "positions": row.get("prompt_positions"), "settings": ", ".join(settings) or "default",
            "machine": meta.get("device") or meta.get("machine"), "date": meta.get("date")}


def plot(rows: list[dict[str, Any]]):
    fig, axes = bc.new_figure(width=8.0, height=0.45 * len(rows) + 2.5)
    ax = axes[0][0]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, [r["decode_ms"] for r in rows], 0.6, color="tab:blue")
    for v, r in zip(y, rows):
        ax.text(r["decode_ms"] + 0.05, v, f"{r['decode_ms']:.2f} ms ({r['x_limit']:.2f}x)"
                if r["x_limit"] else f"{r['decode_ms']:.2f} ms", va="center", fontsize=7)
    limits = sorted({round(r["limit_ms"], 4) for r in rows if r["limit_ms"]})
    if len(limits) == 1:
        ax.axvline(limits[0], color="k", lw=1, label=f"weight-bandwidth limit ({limits[0]:.2f} ms)")
        ax.axvline(TARGET_X_LIMIT * limits[0], color="tab:red", ls="--", lw=1,
                   label=f"{TARGET_X_LIMIT}x the limit ({TARGET_X_LIMIT * limits[0]:.2f} ms)")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_yticks(y)
    ax.set_yticklabels([r["label"] for r in rows], fontsize=8)
    ax.set_xlim(0, max(r["decode_ms"] for r in rows) * 1.3)
    ax.set_xlabel("decode ms / token (batch 1)")
    ax.grid(True, axis="x", alpha=0.3)
    return fig


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    rows = [load_row(*run) for run in args.run]
    C = bc.Column
    columns = [C("label", "run"), C("decode_ms", "decode ms/token", 2), C("x_limit", "x limit", 2),
               C("first_call_s", "first call s", 1), C("ttft_ms", "TTFT ms", 1), C("positions", "prompt positions"),
               C("settings", "settings"), C("machine", "machine"), C("date", "date"), C("file", "file")]
    meta = {"runs": len(rows), "machine": ", ".join(sorted({str(r["machine"]) for r in rows}))}
    notes = ["Rows read from benchmarks/decode.py JSON files (no model run here). x limit = decode ms/token over the "
             "weight-bandwidth limit (decoder weight bytes / the card's peak bandwidth) that each run computed; "
             f"the red line is {TARGET_X_LIMIT}x that limit (issue 12's target).",
             "Runs on different machines differ by a few percent with the same settings: compare rows of one date "
             "and machine."]
    paths = bc.write_outputs(args.out, args.name, args.title, meta, [("Results", columns, rows)], plot(rows), notes,
                             {"rows": rows})
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return {"rows": rows, "paths": paths}


if __name__ == "__main__":
    main()
