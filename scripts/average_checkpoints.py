#!/usr/bin/env python
"""Weight average ("model soup") of GMSA checkpoints of one architecture, saved as a checkpoint.

    python scripts/average_checkpoints.py OUT CHECKPOINT CHECKPOINT [CHECKPOINT ...] [--weights W W ...]

Uniform unless --weights gives one positive weight per checkpoint (normalised to sum to 1): a soup that is itself
the average of n readers counts as n of them, e.g. ``--weights 2 1`` adds a third reader to a soup of two uniformly.

Every checkpoint must hold the same tensors with the same shapes (e.g. readers trained further from one checkpoint
with the same adapter rank); the first one's model is loaded and its trained weights replaced by the mean. Round 30
averaged the shipped reader with the five rank-16 readers trained further from it (rounds 29-30): on qa-multidoc dev
it answers as the shipped reader does (28.0%, 4x, CPU; benchmarks/results/cpu-2core/qa-dev-soup-r30.md), so nothing
was shipped from it.

The average is computed in fp32 and stored in the dtype the first checkpoint stores (bf16 readers give a bf16 soup
of the same size). Its record keeps the stage-2 training config the inputs share, which the product reads for how
many documents to hand on and in which order, and lists the inputs; checkpoints whose stage 2 read other prompt
shapes (document order or count) are refused. Round 34 averaged the shipped reader with the equal-budget run from
the same stage 1: it beat both and is the bundled checkpoint (benchmarks/results/README.md, round 34).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from gmsa_rag.checkpoint import INDEX_FILE, CheckpointError, read_record, read_weights


def mean_state(paths: list[str], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """The element-wise mean (fp32) of the checkpoints' tensors, weighted by ``weights`` (normalised; default
    uniform); CheckpointError if they do not match."""
    states = [read_weights(p) for p in paths]
    for path, state in zip(paths[1:], states[1:]):
        if {n: t.shape for n, t in state.items()} != {n: t.shape for n, t in states[0].items()}:
            raise CheckpointError(f"{path} holds other tensors or shapes than {paths[0]}: they cannot be averaged")
    weight = torch.tensor(weights or [1.0] * len(paths), dtype=torch.float32)
    return {n: torch.tensordot(weight, torch.stack([s[n].float() for s in states]), dims=1) / weight.sum()
            for n in states[0]}


def soup_extra(paths: list[str], records: list[dict], weights: list[float] | None = None) -> dict:
    """The average's ``extra`` metadata: the inputs (with their weights, if not uniform), and the first one's stage-2
    training config (the product reads its document count and order); CheckpointError if the inputs' stage 2 read
    other prompt shapes."""
    from gmsa_rag.model import recorded_document_order, stage2_training

    shapes = {(recorded_document_order(r.get("extra")), stage2_training(r.get("extra")).get("max_docs")) for r in records}
    if len(shapes) > 1:
        raise CheckpointError(f"the checkpoints' stage 2 read other prompts (document order, most documents: "
                              f"{', '.join(sorted(map(str, shapes)))}): their average has no one shape to record")
    train = stage2_training(records[0].get("extra"))
    inputs = ({"uniform_average_of": list(paths)} if weights is None else
              {"weighted_average_of": [{"checkpoint": p, "weight": w} for p, w in zip(paths, weights)]})
    return {**inputs, **({"train_config": train} if train else {})}


def stored_dtype(path: str) -> torch.dtype:
    """The dtype a checkpoint stores its trained weights in: that of one tensor of its first shard (the checkpoint
    was read whole, checksums checked, by :func:`mean_state`)."""
    shards = json.loads((Path(path) / INDEX_FILE).read_text())["shards"]
    with safe_open(str(Path(path) / next(iter(shards))), framework="pt") as shard:
        return shard.get_tensor(next(iter(shard.keys()))).dtype


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder the averaged checkpoint is written to")
    parser.add_argument("checkpoints", nargs="+", help="two or more checkpoint folders")
    parser.add_argument("--weights", nargs="+", type=float, help="one positive weight per checkpoint (default: equal)")
    args = parser.parse_args(argv)
    if len(args.checkpoints) < 2:
        parser.error("give two or more checkpoints to average")
    if args.weights is not None and (len(args.weights) != len(args.checkpoints) or min(args.weights) <= 0):
        parser.error(f"--weights needs one positive weight per checkpoint ({len(args.checkpoints)}), got {args.weights}")
    try:
        records = [read_record(path) for path in args.checkpoints]  # each a checkpoint, before any weights load
        extra = soup_extra(args.checkpoints, records, args.weights)
        averaged = mean_state(args.checkpoints, args.weights)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from gmsa_rag.model import GMSAModel

    model = GMSAModel.from_pretrained(args.checkpoints[0], dtype=stored_dtype(args.checkpoints[0]))
    params = model.trained_parameters()
    if set(params) != set(averaged):
        print(f"error: {args.checkpoints[0]} loads other trained weights than it stores", file=sys.stderr)
        return 2
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(averaged[name].to(param.dtype))
    model.save_pretrained(args.out, extra=extra)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
