#!/usr/bin/env python
"""Precompute throughput: chunks/s and tokens/s of filling the soft-token cache, against the compressor's bare
forward over the same batches, on one process or several (``accelerate launch``).

``--num-chunks`` chunks of a jsonl(.gz) corpus (``text`` of each record; by default the wiki parts under
``shared/data/wiki/``), cut with the product's splitter (``chunk_documents``: ``--chunk-size`` tokens,
``--chunk-overlap``). For every ``--batch-sizes`` value, three measurements over the same chunks:

* ``precompute``: ``gmsa_rag.cache.precompute`` into a fresh cache (what ``python -m gmsa_rag.cache build``
  runs: keys, presence checks, token counts, length-sorted batches through ``model.compress``, serialising and
  writing every entry). Each process takes its shard; wall-clock time from a barrier before to one after.
* ``compress``: ``model.compress`` over the same length-sorted batches, nothing stored.
* ``forward``: the bare compressor forward (encoder stack, group merging, LSA) over the same batches,
  pre-tokenised, padded and already on the device, synchronised once at the end: the limit the others approach.

Rows of earlier runs with another process count are kept in the JSON and table, so a 1-process run followed by a
4-process run gives the scaling. The chunk list is cached under ``~/.cache/gmsa_rag/bench-chunks`` (built by
process 0, read by the others and by later runs).

Examples::

    python benchmarks/precompute.py --backbone smollm2 --device cpu --num-chunks 128 --batch-sizes 8,32
    python benchmarks/precompute.py --backbone llama7b-shape --device cuda --num-chunks 50000 --batch-sizes 32,128
    accelerate launch --num_processes 4 benchmarks/precompute.py --backbone llama7b-shape --device cuda \\
        --num-chunks 50000 --batch-sizes 32,128
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as bc  # noqa: E402

NAME = "precompute"
PHASES = ("precompute", "compress", "forward")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(p)
    p.add_argument("--data", nargs="+", type=Path, default=None,
                   help="jsonl(.gz) corpus files with a 'text' field (default: shared/data/wiki/wiki-*.jsonl.gz, "
                        "as many parts as --num-chunks needs)")
    p.add_argument("--num-chunks", type=int, default=None, help="chunks (default 50000 on GPU, 128 on CPU)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk (default 256, the product's)")
    p.add_argument("--chunk-overlap", type=int, default=32, help="token overlap (default 32)")
    p.add_argument("--batch-sizes", type=bc.parse_int_list, default=None,
                   help="chunks per compress call (default 32,128 on GPU; 8,32 on CPU)")
    p.add_argument("--rate", type=int, default=4, help="compression rate (default 4)")
    p.add_argument("--checkpoint", default=None, help="GMSA checkpoint (default: untrained compressor; timing only)")
    p.add_argument("--encoder-layers", type=int, default=8, help="k for an untrained compressor (default 8)")
    p.add_argument("--lsa-layers", type=int, default=1, help="LSA blocks for an untrained compressor (default 1)")
    p.add_argument("--phases", type=lambda s: [x for x in s.split(",") if x], default=list(PHASES),
                   help=f"subset of {','.join(PHASES)}")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="scratch soft-token cache, emptied before each precompute run (default: a temp folder)")
    p.add_argument("--keep-cache", action="store_true", help="leave the scratch cache on disk")
    p.add_argument("--chunk-cache", type=Path, default=None,
                   help="folder of cached chunk lists (default ~/.cache/gmsa_rag/bench-chunks)")
    p.add_argument("--name", default=None, help="output file stem (default precompute-<backbone>)")
    args = p.parse_args(argv)
    if set(args.phases) - set(PHASES):
        p.error(f"unknown phases {sorted(set(args.phases) - set(PHASES))}")
    return args


# --------------------------------------------------------------------------- processes


class Group:
    """This process among those of the launch (``accelerate launch`` / ``torchrun`` environment): index, count,
    barrier and gathering over a gloo process group (host objects only; no GPU communication)."""

    def __init__(self) -> None:
        from gmsa_rag.cache.precompute import process_shard

        self.index, self.count = process_shard()
        self.dist = None
        if self.count > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")
            self.dist = dist

    @property
    def main(self) -> bool:
        return self.index == 0

    def barrier(self) -> None:
        if self.dist is not None:
            self.dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        if self.dist is None:
            return [obj]
        out: list[Any] = [None] * self.count
        self.dist.all_gather_object(out, obj)
        return out


# --------------------------------------------------------------------------- data


def default_corpus() -> list[Path]:
    for root in (bc.REPO_ROOT / "shared" / "data" / "wiki", bc.REPO_ROOT.parent / "shared" / "data" / "wiki"):
        parts = sorted(root.glob("wiki-*.jsonl*")) if root.is_dir() else []
        if parts:
            return parts
    raise SystemExit("no corpus: pass --data FILE [FILE ...] (jsonl with a 'text' field)")


def load_chunks(files: list[Path], tokenizer, n: int, size: int, overlap: int, group: Group,
                folder: Path | None = None) -> tuple[list[str], str]:
    """The first ``n`` distinct chunks of the corpus, cut as the product cuts them (the cache keeps one entry per
    distinct text, so duplicates would make the phases differ); cached on disk, built by process 0."""
    from gmsa_rag.backbone import cache_root
    from gmsa_rag.cache import chunk_documents

    ident = json.dumps([[str(f.resolve()), f.stat().st_size] for f in files] +
                       [n, size, overlap, getattr(tokenizer, "name_or_path", ""), len(tokenizer)])
    path = Path(folder or cache_root() / "bench-chunks") / f"{hashlib.sha256(ident.encode()).hexdigest()[:16]}.jsonl.gz"
    if group.main and not path.exists():
        chunks: dict[str, None] = {}
        batch: list[str] = []
        used: list[str] = []
        for f in files:
            used.append(str(f))
            for record in bc.read_jsonl(f):
                if isinstance(record.get("text"), str) and record["text"].strip():
                    batch.append(record["text"])
                if len(batch) == 64:
                    chunks.update(dict.fromkeys(chunk_documents(batch, tokenizer, size, overlap)))
                    batch = []
                if len(chunks) >= n:
                    break
            if len(chunks) >= n:
                break
        if batch and len(chunks) < n:
            chunks.update(dict.fromkeys(chunk_documents(batch, tokenizer, size, overlap)))
        if len(chunks) < n:
            raise SystemExit(f"the corpus holds only {len(chunks)} distinct chunks; pass more --data files")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        with gzip.open(tmp, "wt", encoding="utf-8") as out:
            out.write(json.dumps({"source": ", ".join(used)}) + "\n")  # the files read (first line)
            for c in list(chunks)[:n]:
                out.write(json.dumps(c) + "\n")
        tmp.replace(path)
    group.barrier()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        header = json.loads(f.readline())
        return [json.loads(line) for line in f], header["source"]


# --------------------------------------------------------------------------- measurements


def batches_of(model, texts: list[str], batch_size: int) -> list[list[str]]:
    """Length-sorted (longest first) batches, as precompute makes them."""
    from gmsa_rag.cache.precompute import _token_lengths

    lengths = _token_lengths(model.tokenizer, texts)
    order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
    return [[texts[i] for i in order[s : s + batch_size]] for s in range(0, len(order), batch_size)]


def bare_forward(model, batches: list[list[str]], rate: int, device: torch.device) -> float:
    """Seconds of the compressor's forward over ``batches`` (``GMSAModel.soft_tokens_padded``: encoder stack on
    prefix + window, group merging or memory slots, LSA, optional norm), inputs prepared on the device
    beforehand and no host sync until the end."""
    prepared = []
    for batch in batches:
        windows = [w for ids in model.tokenize(batch) for w in model.windows(ids)]
        ids, mask = model.encoder_inputs(windows)
        prepared.append((ids, mask, torch.full((len(windows),), rate, device=device)))
    bc.sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for ids, mask, rates in prepared:
            model.soft_tokens_padded(ids, mask, rates)
    bc.sync(device)
    return time.perf_counter() - start


def measure(phase: str, model, chunks: list[str], mine: list[str], batch_size: int, args, device, group: Group,
            cache_dir: Path) -> dict[str, Any]:
    """One phase at one batch size; every process works on its shard; returns this process's numbers."""
    from gmsa_rag.cache import SoftTokenCache, precompute
    from gmsa_rag.cache.precompute import _token_lengths

    if phase == "precompute":
        from llama_index.core.schema import TextNode

        nodes = [TextNode(text=c) for c in chunks]  # used as they are, as nodes of a persisted index would be
        if group.main:  # a fresh cache, created by one process before the others open it
            shutil.rmtree(cache_dir, ignore_errors=True)
            SoftTokenCache(cache_dir, size_limit=2**50).close()
        group.barrier()
        with SoftTokenCache(cache_dir) as cache:
            group.barrier()
            bc.sync(device)
            start = time.perf_counter()
            report = precompute(model, cache, nodes, args.rate, batch_size=batch_size, progress=group.main,
                                shard=(group.index, group.count))
            bc.sync(device)
            local = time.perf_counter() - start
            group.barrier()
            wall = time.perf_counter() - start
        return {"chunks": report.computed, "tokens": report.tokens, "local_s": local, "wall_s": wall,
                "loop_s": report.compress_seconds}
    batches = batches_of(model, mine, batch_size)
    tokens = sum(_token_lengths(model.tokenizer, mine))
    group.barrier()
    start = time.perf_counter()
    if phase == "compress":
        bc.sync(device)
        with torch.no_grad():
            for batch in batches:
                model.compress(batch, args.rate, batch_size=batch_size)
        bc.sync(device)
        local = time.perf_counter() - start
    else:
        local = bare_forward(model, batches, args.rate, device)
    group.barrier()
    return {"chunks": len(mine), "tokens": tokens, "local_s": local, "wall_s": time.perf_counter() - start}


# --------------------------------------------------------------------------- main


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    group = Group()
    from gmsa_rag.cache.precompute import process_device

    device = bc.resolve_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device(process_device("cuda") or "cuda")  # cuda:<LOCAL_RANK> under a multi-process launch
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dtype = bc.resolve_dtype(args.dtype, device)
    gpu = device.type == "cuda"
    args.num_chunks = args.num_chunks or (50000 if gpu else 128)
    args.batch_sizes = args.batch_sizes or ([32, 128] if gpu else [8, 32])
    torch.manual_seed(args.seed)
    env = bc.env_info(device, dtype)
    t0 = time.perf_counter()
    if args.checkpoint:
        model = bc.load_system(args.checkpoint, device, dtype, backbone=args.backbone, tokenizer_name=args.tokenizer)
        notes = [f"Compressor: checkpoint {args.checkpoint}."]
    else:
        decoder, tokenizer, notes = bc.load_decoder(args.backbone, device, dtype, args.tokenizer)
        model = bc.untrained_compressor(decoder, tokenizer, "gmsa", [args.rate], args.backbone, args.encoder_layers,
                                        args.lsa_layers)
        c = model.config
        notes.append(f"Compressor: UNTRAINED GMSA (k={c.encoder_layers} encoder layers, {c.lsa_layers} LSA block(s), "
                     f"window {c.window}): timing only.")
    model.eval()
    load_s = time.perf_counter() - t0
    chunks, source = load_chunks(args.data or default_corpus(), model.tokenizer, args.num_chunks, args.chunk_size,
                                 args.chunk_overlap, group, args.chunk_cache)
    mine = [chunks[i] for i in range(group.index, len(chunks), group.count)]
    from gmsa_rag.cache.precompute import _token_lengths

    total_tokens = sum(_token_lengths(model.tokenizer, chunks))
    cache_dir = args.cache_dir or Path(tempfile.gettempdir()) / f"gmsa-precompute-bench-{args.backbone}"
    if group.main:
        print(f"{len(chunks)} chunks, {total_tokens} tokens ({total_tokens / len(chunks):.0f} per chunk); "
              f"{group.count} process(es); model ready in {load_s:.1f} s", flush=True)
    rows: list[dict[str, Any]] = []
    for batch_size in args.batch_sizes:
        if gpu:  # one untimed pass over a few batches: kernels, allocator
            with torch.no_grad():
                for batch in batches_of(model, mine[: batch_size * 2], batch_size):
                    model.compress(batch, args.rate, batch_size=batch_size)
        for phase in args.phases:
            local = measure(phase, model, chunks, mine, batch_size, args, device, group, cache_dir)
            parts = group.gather(local)
            if not group.main:
                continue
            wall = max(p["wall_s"] for p in parts)
            chunks_n, tokens_n = sum(p["chunks"] for p in parts), sum(p["tokens"] for p in parts)
            row = {"processes": group.count, "batch_size": batch_size, "phase": phase, "chunks": chunks_n,
                   "tokens": tokens_n, "wall_s": wall, "chunks_per_s": chunks_n / wall, "tokens_per_s": tokens_n / wall,
                   "tokens_per_s_per_process": tokens_n / wall / group.count,
                   "slowest_process_s": max(p["local_s"] for p in parts), "per_process": parts}
            rows.append(row)
            print(f"[{group.count} proc] batch {batch_size:>4} {phase:<10} {row['chunks_per_s']:10.1f} chunks/s "
                  f"{row['tokens_per_s']:12.0f} tokens/s ({wall:.2f} s)", flush=True)
    if not args.keep_cache and group.main:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not group.main:
        return {}

    out_dir = args.out or bc.default_out_dir(device)
    name = args.name or f"{NAME}-{args.backbone}"
    previous = out_dir / f"{name}.json"
    if previous.exists():  # keep the rows of other process counts: the scaling table
        try:
            rows = [r for r in json.loads(previous.read_text()).get("rows", []) if r["processes"] != group.count] + rows
        except (ValueError, KeyError):
            pass
    rows.sort(key=lambda r: (r["processes"], r["batch_size"], PHASES.index(r["phase"])))
    forward = {(r["processes"], r["batch_size"]): r for r in rows if r["phase"] == "forward"}
    single = {(r["batch_size"], r["phase"]): r for r in rows if r["processes"] == 1}
    for r in rows:
        f = forward.get((r["processes"], r["batch_size"]))
        r["limit_over_this"] = f["tokens_per_s"] / r["tokens_per_s"] if f else None
        one = single.get((r["batch_size"], r["phase"]))
        r["scaling_vs_1"] = r["tokens_per_s"] / one["tokens_per_s"] if one else None
    meta = {**env, "backbone": args.backbone, "corpus": source, "num_chunks": len(chunks), "tokens": total_tokens,
            "chunk_size": args.chunk_size, "chunk_overlap": args.chunk_overlap, "rate": args.rate,
            "processes_this_run": group.count, "batch_sizes": args.batch_sizes, "model_load_s": round(load_s, 1),
            "load_average_at_end": bc.load_average()}
    notes += [
        f"{len(chunks)} chunks of {source} cut by gmsa_rag.cache.chunk_documents ({args.chunk_size} tokens, overlap "
        f"{args.chunk_overlap}); tokens = the model tokenizer's count of the chunks ({total_tokens} in all).",
        "precompute = gmsa_rag.cache.precompute into a fresh cache (keys, presence checks, token counts, length-sorted "
        "batches through model.compress, serialising + writing every entry on a writer thread), wall-clock from a "
        "barrier before to one after, all processes; compress = model.compress over the same length-sorted batches, "
        "nothing stored; forward = the compressor's bare forward (encoder stack + group merging + LSA) over the same "
        "batches, inputs tokenised, padded and on the device beforehand, synchronised once at the end.",
        "Each process takes every n-th chunk (its shard). 'limit / this' = forward tokens/s over this row's tokens/s "
        "(1.0 = at the bare-forward limit); 'x vs 1 proc' = tokens/s over the 1-process row of the same batch size "
        "and phase (rows of earlier runs with other process counts are kept).",
    ]
    C = bc.Column
    cols = [C("processes", "processes"), C("batch_size", "batch"), C("phase", "phase"), C("chunks", "chunks"),
            C("wall_s", "wall s", 2), C("chunks_per_s", "chunks/s", 1), C("tokens_per_s", "tokens/s", 0),
            C("tokens_per_s_per_process", "tokens/s per process", 0), C("limit_over_this", "limit / this"),
            C("scaling_vs_1", "x vs 1 proc")]
    fig, axes = bc.new_figure(ncols=2, width=5.5, height=4)
    ax, ax2 = axes[0]
    styles = {"precompute": "-", "compress": "--", "forward": ":"}
    for procs, phase in sorted({(r["processes"], r["phase"]) for r in rows}):
        pts = [r for r in rows if r["processes"] == procs and r["phase"] == phase]
        ax.plot([r["batch_size"] for r in pts], [r["tokens_per_s"] for r in pts], styles[phase], marker="o",
                label=f"{phase}, {procs} proc")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size (chunks)")
    ax.set_ylabel("tokens/s (all processes)")
    ax.set_title(f"precompute throughput, {args.backbone}, {meta['machine']}", fontsize=9)
    ax.legend(fontsize=7)
    procs_list = sorted({r["processes"] for r in rows})
    best = [max((r["tokens_per_s"] for r in rows if r["processes"] == p and r["phase"] == "precompute"), default=0)
            for p in procs_list]
    ax2.bar([str(p) for p in procs_list], best, color="tab:blue")
    ax2.set_xlabel("processes")
    ax2.set_ylabel("best precompute tokens/s")
    ax2.set_title("scaling", fontsize=9)
    paths = bc.write_outputs(out_dir, name, f"Precompute throughput ({args.backbone}, {meta['machine']})", meta,
                             [("Results", cols, rows)], fig, notes, {"rows": rows})
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return {"rows": rows, "meta": meta, "paths": paths}


if __name__ == "__main__":
    main()
