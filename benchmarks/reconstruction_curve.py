"""Reconstruction against training tokens: several ``benchmarks/reconstruction.py`` runs of successive checkpoints
(the same chunks each time) as one learning curve, BLEU per rate against the encoder tokens each checkpoint had seen.
Reads the runs' JSON files; runs no model.

    python benchmarks/reconstruction_curve.py --point 148=results/reconstruction-148m.json \\
        --point 9.6=results/reconstruction-18m.json:TCP-AE --name stage1-curve --out results/
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import common as bc


def parse_point(text: str) -> tuple[float, Path, str | None]:
    """``MILLIONS=FILE.json[:SYSTEM]`` -> (tokens in millions, file, system or None: the file's only system)."""
    millions, sep, rest = text.partition("=")
    path, _, system = rest.partition(".json")
    try:
        tokens = float(millions)
    except ValueError:
        tokens = -1.0
    if not sep or not path or tokens <= 0:
        raise argparse.ArgumentTypeError(f"expected MILLIONS=FILE.json[:SYSTEM] with MILLIONS > 0, got {text!r}")
    return tokens, Path(path + ".json"), system.removeprefix(":") or None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--point", type=parse_point, action="append", required=True, metavar="MILLIONS=FILE.json[:SYSTEM]",
                   help="a checkpoint: the encoder tokens (millions) it had seen, and a reconstruction.py JSON "
                        "with one of its systems (may be left out when the file has one); one curve per system")
    p.add_argument("--length", type=int, default=128, help="chunk length of the table's per-rate columns (default 128)")
    p.add_argument("--metric", default="bleu", help="row key of reconstruction.py's JSON (default bleu)")
    p.add_argument("--name", default="reconstruction-curve", help="output file stem")
    p.add_argument("--title", default="Reconstruction against training tokens")
    p.add_argument("--note", action="append", default=[], help="a note for the markdown (repeatable)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    return p.parse_args(argv)


def load_point(tokens: float, path: Path, system: str | None, length: int, metric: str) -> dict[str, Any]:
    """One checkpoint's row: ``metric`` per rate at ``length`` and averaged over the file's lengths."""
    if not path.is_file():
        raise SystemExit(f"no such file: {path}")
    payload = json.loads(path.read_text())
    systems = sorted({r["system"] for r in payload["rows"]})
    if system is None and len(systems) != 1:
        raise SystemExit(f"{path} holds {len(systems)} systems ({', '.join(systems)}): name one as {path}:SYSTEM")
    system = system or systems[0]
    rows = [r for r in payload["rows"] if r["system"] == system]
    if not rows:
        raise SystemExit(f"{path} has no system {system!r} (it has {', '.join(systems)})")
    lengths = sorted({r["length"] for r in rows})
    if length not in lengths:
        raise SystemExit(f"{path}: no {length}-token chunks for {system} (lengths {lengths})")
    point: dict[str, Any] = {"system": system, "tokens_m": tokens, "file": path.name,
                             "chunks": rows[0].get("n"), "lengths": lengths}
    for rate in sorted({r["rate"] for r in rows}):
        at_rate = [r[metric] for r in rows if r["rate"] == rate]
        point[f"{rate}x"] = next(r[metric] for r in rows if r["rate"] == rate and r["length"] == length)
        point[f"mean_{rate}x"] = sum(at_rate) / len(at_rate)
    return point


def plot(points: list[dict[str, Any]], rates: list[int], length: int, metric: str):
    fig, axes = bc.new_figure(ncols=2, width=6.0, height=4.2)
    for ax, prefix, what in ((axes[0][0], "", f"{length}-token chunks"), (axes[0][1], "mean_", "mean over lengths")):
        for i, rate in enumerate(rates):
            for system, marker, style in _curves(points):
                xs = [p["tokens_m"] for p in points if p["system"] == system and f"{prefix}{rate}x" in p]
                ys = [p[f"{prefix}{rate}x"] for p in points if p["system"] == system and f"{prefix}{rate}x" in p]
                ax.plot(xs, ys, marker=marker, linestyle=style, color=f"C{i}", label=f"{system} {rate}x")
        ax.set_xscale("log")
        ax.set_xlabel("encoder tokens seen in training (M)")
        ax.set_ylabel(f"{metric} ({what})")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def _curves(points: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(system, marker, line style) per curve, the first system solid."""
    systems = list(dict.fromkeys(p["system"] for p in points))
    return [(s, "o" if i == 0 else "x", "-" if i == 0 else ":") for i, s in enumerate(systems)]


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    points = sorted((load_point(t, f, s, args.length, args.metric) for t, f, s in args.point),
                    key=lambda p: (p["system"], p["tokens_m"]))
    rates = sorted({int(k[:-1]) for p in points for k in p if k[:-1].isdigit() and k.endswith("x")})
    columns = [bc.Column("system", "system"), bc.Column("tokens_m", "tokens (M)", 1), bc.Column("file", "file")]
    columns += [bc.Column(f"{r}x", f"{args.metric} {r}x @{args.length}", 1) for r in rates]
    columns += [bc.Column(f"mean_{r}x", f"{r}x mean", 1) for r in rates]
    meta = {"machine": "reads reconstruction.py outputs (see each file's meta)", "metric": args.metric,
            "length": args.length, "files": [str(f) for _, f, _ in args.point]}
    bc.write_outputs(args.out, args.name, args.title, meta, [("", columns, points)],
                     plot(points, rates, args.length, args.metric), args.note, {"rows": points})
    print(bc.markdown_table(columns, points))
    return {"rows": points}


if __name__ == "__main__":
    main()
