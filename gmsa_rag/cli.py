"""``gmsa-rag``: ask a question over a document folder with GMSA-compressed retrieval, and time it.

    gmsa-rag ask "who was the author of the art of war" [--docs DIR] [--rate 4] [--top-k 3]
             [--checkpoint DIR] [--cache-dir DIR] [--index-dir DIR] [--response-mode compact] [--json]
    gmsa-rag examples            # questions whose answers the bundled documents hold

``ask`` builds (once; then loads) a FAISS ``VectorStoreIndex`` over the documents with the offline
MiniLM embedder, answers through ``GMSACompressor`` + ``GMSALLM``, prints the answer and its sources,
then times the same query three ways: GMSA with compression not yet cached, GMSA with the soft tokens
cached, and the uncompressed baseline (the same LLM reading the raw text through the same prompt
builder).

Every argument is checked before any model loads; known errors end in one line on stderr and an exit
status (``--help`` lists them). Only ``ask`` imports torch, transformers and LlamaIndex.
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

from gmsa_rag.errors import EXIT_OK, EXIT_STATUS_HELP, UsageError, check_device, positive_int, report_errors

DOC_KINDS = "text (.txt/.md/.markdown/.rst) or JSON lines (.jsonl/.jsonl.gz, one document per record's \"text\")"

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


def _offline() -> None:
    """Everything runs offline (HF_HUB_OFFLINE=0 allows downloads): set before huggingface_hub is imported."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _quiet_libraries() -> None:
    """No weight-loading bars, no library chatter."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("sentence_transformers", "httpx", "faiss", "llama_index"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass
class AskInputs:
    """The checked inputs of ``ask``: everything is known to exist before any model loads."""

    docs: Path
    cache_dir: Path
    index_dir: Path | None
    checkpoint: Path | None


def check_ask(args: argparse.Namespace) -> AskInputs:
    """Check every argument of ``ask`` that can be checked without loading a model; raise on the first
    bad one with a message naming it and the fix. Paths first: they need no torch import."""
    from gmsa_rag.cache import check_cache_dir
    from gmsa_rag.cache.precompute import source_file_kind
    from gmsa_rag.rag import bundled_docs_dir

    if not args.question.strip():
        raise UsageError('the question is empty: pass one, e.g. gmsa-rag ask "who wrote the art of war?"')
    if args.extract_top < 0:
        raise UsageError(f"--extract-top must be 0 (all documents) or more, got {args.extract_top}")
    if args.extract_top and not args.extractive:
        raise UsageError("--extract-top K narrows extractive answers: add --extractive")
    if args.extract_penalty is not None and (not args.extract_penalty > 0 or not args.extractive):
        raise UsageError(f"--extract-penalty leans extractive answers: a number of nats > 0, with --extractive "
                         f"(got {args.extract_penalty})")
    if args.rerank_top is not None and args.rerank_top < 0:
        raise UsageError(f"--rerank-top must be 0 (keep all) or more, got {args.rerank_top}")
    if args.keep_confident is not None and args.keep_confident < 0:
        raise UsageError(f"--keep-confident must be 0 or more, got {args.keep_confident}")
    docs = Path(args.docs).expanduser() if args.docs else bundled_docs_dir()
    if docs is None:
        raise UsageError("no --docs given and no bundled examples/docs (not a source checkout): pass --docs DIR")
    if not docs.exists():
        raise FileNotFoundError(f"--docs {docs} not found: pass a folder or one file of {DOC_KINDS}")
    if docs.is_file() and source_file_kind(docs) is None:
        raise UsageError(f"--docs {docs} is not a document file: pass a folder or one file of {DOC_KINDS}")
    cache_dir = check_cache_dir(args.cache_dir)
    index_dir = Path(args.index_dir).expanduser() if args.index_dir else None
    if index_dir is not None and index_dir.exists() and not index_dir.is_dir():
        raise NotADirectoryError(f"--index-dir {index_dir} is a file, not a folder: pass a folder")

    from gmsa_rag.backbone import context_window
    from gmsa_rag.rag import model_config  # imports torch

    checkpoint, config = model_config(args.checkpoint)
    for flag, rate in (("--rate", args.rate), ("--lead-rate", args.lead_rate)):
        if rate is not None and rate not in config.rates:
            model = checkpoint or "the untrained default model"
            raise UsageError(f"{flag} {rate} is not allowed: {model} supports {list(config.rates)}")
    window = context_window(config.base_model)
    if window and args.max_new_tokens > window // 2:
        raise UsageError(f"--max-new-tokens {args.max_new_tokens} leaves too little of the base model's {window}-token "
                         f"window for the question and documents: use at most {window // 2}")
    check_device(args.device)
    return AskInputs(docs, cache_dir, index_dir, checkpoint)


def _provenance(run: RunTiming, readonly: bool) -> str:
    """Where a run's soft tokens came from, e.g. ``2 loaded from the disk cache, 1 compressed now``."""
    stored = "not stored: the cache is read-only" if readonly else "now in the disk cache"
    parts = [
        f"{run.disk_hits} loaded from the disk cache" if run.disk_hits else "",
        f"{run.computed} compressed now ({stored})" if run.computed else "",
        f"{run.memory_hits} already in memory" if run.memory_hits else "",
    ]
    return ", ".join(p for p in parts if p) or "nothing to compress"


def cmd_ask(args: argparse.Namespace, out: Any = None) -> dict:
    """The ``ask`` command; returns the report (also printed)."""
    out = out or sys.stdout
    _offline()
    inputs = check_ask(args)
    _quiet_libraries()
    import torch

    from gmsa_rag.cache import SoftTokenCache, cache_is_writable
    from gmsa_rag.engine import engine_for
    from gmsa_rag.rag import build_or_load_index, hash_embedding, load_documents, load_embed_model, load_gmsa_model, make_query_engine

    def say(line: str = "") -> None:
        if not args.json:
            print(line, file=out, flush=True)

    t_start = time.perf_counter()
    say(f"question: {args.question}")
    documents = load_documents(inputs.docs)
    if not any(d.text.strip() for d in documents):  # (files of whitespace only: nothing to retrieve)
        raise UsageError(f"no documents with text in {inputs.docs}: pass --docs with a folder or file of {DOC_KINDS}")
    readonly = not cache_is_writable(inputs.cache_dir)
    with SoftTokenCache(inputs.cache_dir, readonly=readonly) as cache:  # a damaged cache fails here, before the model loads
        if readonly:
            say(f"cache:    {inputs.cache_dir} is read-only: cached soft tokens are used, new ones are not stored")
        minfo = load_gmsa_model(inputs.checkpoint, device=args.device)
        model = minfo.model
        model.generation_engine = args.engine
        say(f"model:    {minfo.source} (loaded in {minfo.seconds:.1f} s; {torch.get_num_threads()} CPU threads)")
        if not minfo.trained:
            say(UNTRAINED_WARNING)
            if args.json:
                print(UNTRAINED_WARNING, file=sys.stderr)

        embed = load_embed_model() if args.embed == "minilm" else hash_embedding()
        info = build_or_load_index(documents, embed, model.tokenizer, persist_root=inputs.index_dir,
                                   progress=not args.no_progress)
        say(f"index:    {info.nodes} chunks from {inputs.docs} ({'built and persisted' if info.built else 'loaded'} in "
            f"{info.seconds:.1f} s: {info.persist_dir})")

        rerank_top = args.rerank_top
        if rerank_top is None:  # the prompt shape the checkpoint's stage 2 trained on (0: all chunks)
            rerank_top = model.trained_max_documents() or 0
            if rerank_top and rerank_top < args.top_k:
                say(f"rerank:   BM25 keeps the {rerank_top} of the {args.top_k} retrieved chunks that best match the "
                    f"question: the checkpoint was trained on prompts of {rerank_top} document(s) (--rerank-top 0 "
                    "keeps all)")
        order = model.trained_document_order()
        if order != "given":
            say(f"order:    the chunks reach the reader in BM25 order, best match {order.split('_')[1]}, as its stage 2 "
                "was trained")

        # One tiny generation first, so that one-time framework start-up does not land on the first timing.
        model.generate("Hello", [], max_new_tokens=2)

        report: dict[str, Any] = {
            "question": args.question,
            "trained": minfo.trained,
            "model": minfo.source,
            "rate": args.rate,
            "lead_rate": args.lead_rate,
            "top_k": args.top_k,
            "response_mode": args.response_mode,
            "docs": str(inputs.docs),
            "index_dir": str(info.persist_dir),
            "soft_token_cache": str(inputs.cache_dir),
            "cache_readonly": readonly,
            "device": args.device,
            "engine": engine_for(model).kind,
            "extractive": args.extractive,
            "extract_top": args.extract_top,
            "extract_penalty": args.extract_penalty,
            "rerank_top": rerank_top,
            "document_order": order,
            "keep_confident": args.keep_confident,
            "threads": torch.get_num_threads(),
        }
        common = dict(top_k=args.top_k, response_mode=args.response_mode, streaming=True,
                      max_new_tokens=args.max_new_tokens, rerank_top=rerank_top, confident_margin=args.keep_confident)
        engine, compressor, llm = make_query_engine(info.index, model, rate=args.rate, lead_rate=args.lead_rate,
                                                    cache=cache, extractive=args.extractive,
                                                    extract_top=args.extract_top,
                                                    extract_penalty=args.extract_penalty or float("inf"), **common)
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
    lead = f", best match at {args.lead_rate}x" if args.lead_rate else ""
    say(f"answer (GMSA, rate {args.rate}{lead}{', UNTRAINED compressor' if not minfo.trained else ''}): {first.answer}")
    say("sources:")
    for i, s in enumerate(first.sources, 1):
        say(f"  {i}. {s}")
    if len(runs) == 3:
        say(f"answer (uncompressed text, same LLM): {runs[2].answer}")
    say()
    say(f"compression: {len(texts)} retrieved chunk(s) -> {first.soft_tokens} soft tokens; first query: "
        f"{_provenance(first, readonly)}, {first.compress_seconds:.2f} s; compressing them from scratch takes "
        f"{fresh_compress:.2f} s (one-time per chunk)")
    say(f"timing ({args.device}, {torch.get_num_threads()} threads, {report['engine']} decoding; "
        "TTFT = query call -> first streamed answer word, shown once the token after it is decoded):")
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
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gmsa-rag",
        description="Retrieval-augmented QA with GMSA context compression (soft tokens instead of text).",
        epilog=EXIT_STATUS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{ask,examples}")
    a = sub.add_parser("ask", help="answer a question over a document folder and time it with/without compression",
                       epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    a.add_argument("question")
    a.add_argument("--docs", default=None, help=f"folder (searched recursively) or one file of {DOC_KINDS} "
                   "(default: the bundled examples/docs); binary files are skipped")
    a.add_argument("--rate", type=positive_int, default=4, help="compression rate, one of the model's rates (default 4)")
    a.add_argument("--lead-rate", type=positive_int, default=None,
                   help="the best-ranked document at this rate, the others at --rate (e.g. --rate 8 --lead-rate 2: "
                        "positions spent where the answer most often is; default: every document at --rate)")
    a.add_argument("--top-k", type=positive_int, default=3, help="documents retrieved (default 3)")
    a.add_argument("--checkpoint", default=None, help="GMSA checkpoint folder (default: the bundled one, if any)")
    a.add_argument("--cache-dir", default=None,
                   help="soft-token cache folder, the same as `python -m gmsa_rag.cache build --cache-dir` "
                        "(default: $GMSA_RAG_CACHE_DIR or ~/.cache/gmsa_rag/soft_tokens); read-only folders "
                        "are read without storing anything")
    a.add_argument("--index-dir", default=None,
                   help="folder for the persisted FAISS indexes, one per document set "
                        "(default: $GMSA_RAG_HOME/indexes or ~/.cache/gmsa_rag/indexes)")
    a.add_argument("--response-mode", default="compact",
                   choices=["compact", "refine", "tree_summarize", "simple_summarize"],
                   help="LlamaIndex response synthesis (default compact; accumulate is left out: it cannot stream)")
    a.add_argument("--max-new-tokens", type=positive_int, default=32, help="answer budget in tokens (default 32)")
    a.add_argument("--device", default="cpu", help="torch device (default cpu)")
    a.add_argument("--engine", default="auto", choices=["auto", "hf", "static"],
                   help="decoding engine (gmsa_rag.engine): auto = static KV cache + CUDA graphs on CUDA, Hugging Face "
                        "generate on CPU (faster there); hf or static to force one (default auto)")
    a.add_argument("--embed", default="minilm", choices=["minilm", "hash"],
                   help="retrieval embedding: the offline all-MiniLM-L6-v2 (default) or a hashed bag of words "
                        "(instant, for smoke tests)")
    a.add_argument("--extractive", action="store_true",
                   help="answer with a span of the retrieved chunks (both the GMSA and the uncompressed runs)")
    a.add_argument("--extract-top", type=int, default=0, metavar="K",
                   help="with --extractive: quote only the K retrieved chunks of best BM25 match to the question "
                        "(default 0: any of them)")
    a.add_argument("--extract-penalty", type=float, default=None, metavar="NATS",
                   help="with --extractive: a token that continues no span of the chunks loses NATS (e.g. 4) instead "
                        "of being forbidden, so answers lean towards the chunks' words but may leave them")
    a.add_argument("--rerank-top", type=int, default=None, metavar="K",
                   help="keep only the K retrieved chunks of best BM25 match to the question (GMSACompressor's top_n) before "
                        "compressing; both runs; 0: all --top-k chunks (default: as many as the checkpoint's stage 2 "
                        "read a prompt, 5 for the bundled one; all for a checkpoint that does not say); the chunks "
                        "reach the reader in the order its stage 2 read (the bundled one: BM25 order, best first)")
    a.add_argument("--keep-confident", type=float, default=None, metavar="MARGIN",
                   help="keep only the best BM25 match where its score leads the next chunk's by more than MARGIN "
                        "(GMSACompressor's confident_margin; round 27 chose 0.57 for five chunks on dev data; "
                        "default: off)")
    a.add_argument("--no-compare", action="store_true", help="skip the cached and uncompressed timing runs")
    a.add_argument("--no-progress", action="store_true", help="hide the progress bars of an index build")
    a.add_argument("--json", action="store_true", help="print the report as JSON")
    sub.add_parser("examples", help="list questions whose answers the bundled documents hold")
    return parser


def _run(args: argparse.Namespace) -> int:
    if args.command == "examples":
        return cmd_examples(args)
    cmd_ask(args)
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status (see ``--help``)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return report_errors(lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
