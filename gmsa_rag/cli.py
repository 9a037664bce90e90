"""``gmsa-rag``: ask a question over a document folder with GMSA-compressed retrieval, and time it.

    gmsa-rag ask "who was the author of the art of war" [--docs DIR] [--rate 4] [--top-k 3]
             [--checkpoint DIR] [--cache-dir DIR] [--response-mode compact] [--json]
    gmsa-rag examples            # questions whose answers the bundled documents hold

``ask`` builds (once; then loads) a FAISS ``VectorStoreIndex`` over the documents with the offline
MiniLM embedder, answers through ``GMSACompressor`` + ``GMSALLM``, prints the answer and its sources,
then times the same query three ways: GMSA with compression not yet cached, GMSA with the soft tokens
cached, and the uncompressed baseline (the same LLM reading the raw text through the same prompt
builder).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

UNTRAINED_WARNING = (
    "WARNING: no trained GMSA checkpoint was found (pass --checkpoint DIR, or add checkpoints/smollm2-gmsa).\n"
    "         The compressor is UNTRAINED: its soft tokens do not carry the documents' content, so the\n"
    "         compressed answer below is NOT meaningful. Retrieval, caching, the prompt flow and the\n"
    "         timings are real; the uncompressed answer is the base model reading the text."
)


@dataclass
class RunTiming:
    """One timed query."""

    label: str
    answer: str = ""
    ttft: float | None = None
    """Seconds from the query call to the first streamed answer token (retrieval + compression/cache +
    prompt building + prefill + first decode step)."""
    total: float = 0.0
    compress_seconds: float = 0.0
    computed: int = 0
    disk_hits: int = 0
    memory_hits: int = 0
    prompt_positions: int = 0
    soft_tokens: int = 0
    new_tokens: int = 0
    sources: list[str] = field(default_factory=list)

    @property
    def decode_ms_per_token(self) -> float | None:
        if self.ttft is None or self.new_tokens < 2:
            return None
        return 1000 * (self.total - self.ttft) / (self.new_tokens - 1)

    def as_dict(self) -> dict:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["decode_ms_per_token"] = self.decode_ms_per_token
        return d


def timed_query(engine: Any, compressor: Any, llm: Any, question: str, label: str) -> RunTiming:
    """Run a streaming query and measure time to first token and end to end."""
    from gmsa_rag.rag import source_label

    start = time.perf_counter()
    response = engine.query(question)
    first = None
    text = ""
    for delta in response.response_gen:
        if first is None and delta.strip():
            first = time.perf_counter()
        text += delta
    end = time.perf_counter()
    cs, ls = compressor.last_stats, llm.last_stats
    return RunTiming(
        label=label,
        answer=text.strip(),
        ttft=(first - start) if first is not None else None,
        total=end - start,
        compress_seconds=cs.seconds,
        computed=cs.computed,
        disk_hits=cs.disk_hits,
        memory_hits=cs.memory_hits,
        prompt_positions=ls.prompt_positions,
        soft_tokens=ls.soft_tokens,
        new_tokens=ls.new_tokens,
        sources=[source_label(n) for n in response.source_nodes],
    )


def _fmt(x: float | None, unit: str = "s", digits: int = 2) -> str:
    return "   -  " if x is None else f"{x:.{digits}f}{unit}"


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - cosmetic only
        pass
    for name in ("sentence_transformers", "httpx", "faiss", "llama_index"):
        logging.getLogger(name).setLevel(logging.WARNING)


def cmd_ask(args: argparse.Namespace, out: Any = None) -> dict:
    """The ``ask`` command; returns the report (also printed)."""
    out = out or sys.stdout
    import torch

    from gmsa_rag.backbone import cache_root
    from gmsa_rag.cache import SoftTokenCache, default_cache_dir
    from gmsa_rag.rag import (
        build_or_load_index,
        bundled_docs_dir,
        hash_embedding,
        load_embed_model,
        load_gmsa_model,
        make_query_engine,
    )

    def say(line: str = "") -> None:
        if not args.json:
            print(line, file=out, flush=True)

    docs = Path(args.docs) if args.docs else bundled_docs_dir()
    if docs is None or not docs.is_dir():
        raise FileNotFoundError(f"document folder not found: {docs} (pass --docs DIR)")
    root = Path(args.cache_dir).expanduser() if args.cache_dir else None
    index_root = root / "indexes" if root else cache_root() / "indexes"
    soft_dir = root / "soft_tokens" if root else default_cache_dir()

    t_start = time.perf_counter()
    say(f"question: {args.question}")
    minfo = load_gmsa_model(args.checkpoint, device=args.device)
    model = minfo.model
    say(f"model:    {minfo.source} (loaded in {minfo.seconds:.1f} s; {torch.get_num_threads()} CPU threads)")
    if not minfo.trained:
        say(UNTRAINED_WARNING)
        if args.json:
            print(UNTRAINED_WARNING, file=sys.stderr)
    model.config.check_rate(args.rate)

    embed = load_embed_model() if args.embed == "minilm" else hash_embedding()
    info = build_or_load_index(docs, embed, model.tokenizer, persist_root=index_root)
    say(f"index:    {info.nodes} chunks from {docs} ({'built and persisted' if info.built else 'loaded'} in "
        f"{info.seconds:.1f} s: {info.persist_dir})")

    # One tiny generation first, so that one-time framework start-up does not land on the first timing.
    model.generate("Hello", [], max_new_tokens=2)

    report: dict[str, Any] = {
        "question": args.question,
        "trained": minfo.trained,
        "model": minfo.source,
        "rate": args.rate,
        "top_k": args.top_k,
        "response_mode": args.response_mode,
        "docs": str(docs),
        "index_dir": str(info.persist_dir),
        "soft_token_cache": str(soft_dir),
        "device": args.device,
        "threads": torch.get_num_threads(),
    }
    with SoftTokenCache(soft_dir) as cache:
        common = dict(top_k=args.top_k, response_mode=args.response_mode, streaming=True,
                      max_new_tokens=args.max_new_tokens)
        engine, compressor, llm = make_query_engine(info.index, model, rate=args.rate, cache=cache, **common)
        first = timed_query(engine, compressor, llm, args.question, "GMSA, first query")
        runs = [first]
        retrieved = [n for n in engine.retrieve(_bundle(args.question))]
        texts = [_original(n) for n in retrieved]
        t0 = time.perf_counter()
        model.compress(texts, args.rate)
        fresh_compress = time.perf_counter() - t0
        if not args.no_compare:
            runs.append(timed_query(engine, compressor, llm, args.question, "GMSA, soft tokens cached"))
            base_engine, base_comp, _ = make_query_engine(info.index, model, passthrough=True, llm=llm, **common)
            runs.append(timed_query(base_engine, base_comp, llm, args.question, "uncompressed text"))

    say()
    say(f"answer (GMSA, rate {args.rate}{', UNTRAINED compressor' if not minfo.trained else ''}): {first.answer}")
    say("sources:")
    for i, s in enumerate(first.sources, 1):
        say(f"  {i}. {s}")
    if len(runs) == 3:
        say(f"answer (uncompressed text, same LLM): {runs[2].answer}")
    how = (f"compressed now ({first.computed} chunk(s), now in the disk cache)" if first.computed
           else f"loaded from the disk cache ({first.disk_hits} chunk(s) compressed by an earlier run)"
           if first.disk_hits else "already in memory")
    say()
    say(f"compression: {len(texts)} retrieved chunk(s) -> {first.soft_tokens} soft tokens; first query: {how}, "
        f"{first.compress_seconds:.2f} s; compressing them from scratch takes {fresh_compress:.2f} s (one-time per chunk)")
    say(f"timing ({args.device}, {torch.get_num_threads()} threads; TTFT = query call -> first answer token):")
    say(f"  {'':28s} {'TTFT':>8s} {'end-to-end':>11s} {'compress':>9s} {'positions':>9s} {'new tok':>7s} {'decode/tok':>10s}")
    for r in runs:
        say(f"  {r.label:28s} {_fmt(r.ttft):>8s} {_fmt(r.total):>11s} {_fmt(r.compress_seconds):>9s} "
            f"{r.prompt_positions:9d} {r.new_tokens:7d} {_fmt(r.decode_ms_per_token, 'ms', 0):>10s}")
    if len(runs) == 3 and runs[1].ttft and runs[2].ttft:
        base, cached = runs[2], runs[1]
        report["speedup_ttft"] = base.ttft / cached.ttft
        report["speedup_end_to_end"] = base.total / cached.total
        say(f"  speed-up of GMSA (cached) over uncompressed: TTFT x{report['speedup_ttft']:.2f}, "
            f"end-to-end x{report['speedup_end_to_end']:.2f} (prompt {base.prompt_positions} -> "
            f"{cached.prompt_positions} positions; end-to-end also depends on how many tokens each answer has)")
    report.update(runs=[r.as_dict() for r in runs], fresh_compress_seconds=fresh_compress,
                  wall_seconds=time.perf_counter() - t_start)
    say(f"total wall time {report['wall_seconds']:.1f} s")
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    return report


def _bundle(question: str) -> Any:
    from llama_index.core.schema import QueryBundle

    return QueryBundle(question)


def _original(node_with_score: Any) -> str:
    from llama_index.postprocessor.gmsa import original_text

    return original_text(node_with_score.node)


def cmd_examples(args: argparse.Namespace, out: Any = None) -> int:
    out = out or sys.stdout
    from gmsa_rag.rag import example_questions

    for q in example_questions():
        print(f"{q['question']!r:80s} -> {q['answers'][0]}  ({q['document']})", file=out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmsa-rag",
        description="Retrieval-augmented QA with GMSA context compression (soft tokens instead of text).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ask,examples}")
    a = sub.add_parser("ask", help="answer a question over a document folder and time it with/without compression")
    a.add_argument("question")
    a.add_argument("--docs", default=None, help="folder of .txt/.md/.rst files (default: the bundled examples/docs)")
    a.add_argument("--rate", type=int, default=4, help="compression rate, one of the model's rates (default 4)")
    a.add_argument("--top-k", type=int, default=3, help="documents retrieved (default 3)")
    a.add_argument("--checkpoint", default=None, help="GMSA checkpoint folder (default: the bundled one, if any)")
    a.add_argument("--cache-dir", default=None,
                   help="folder for the persisted index (indexes/) and soft tokens (soft_tokens/) "
                        "(default: ~/.cache/gmsa_rag/indexes and the soft-token cache's default folder)")
    a.add_argument("--response-mode", default="compact",
                   choices=["compact", "refine", "tree_summarize", "simple_summarize", "accumulate"])
    a.add_argument("--max-new-tokens", type=int, default=32, help="answer budget in tokens (default 32)")
    a.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a.add_argument("--embed", default="minilm", choices=["minilm", "hash"],
                   help="retrieval embedding: the offline all-MiniLM-L6-v2 (default) or a hashed bag of words "
                        "(instant, for smoke tests)")
    a.add_argument("--no-compare", action="store_true", help="skip the cached and uncompressed timing runs")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("examples", help="list questions whose answers the bundled documents hold")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "examples":
            return cmd_examples(args)
        if args.top_k < 1:
            raise ValueError("--top-k must be at least 1")
        cmd_ask(args)
        return 0
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
