"""Command line: ``python -m gmsa_rag.cache {build,stats,clear} ...``."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Sequence

from .precompute import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, precompute
from .store import SoftTokenCache, default_cache_dir


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return str(n)


def _add_cache_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--cache-dir",
        default=None,
        help=f"cache folder (default: $GMSA_RAG_CACHE_DIR or {default_cache_dir()})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gmsa_rag.cache``."""
    parser = argparse.ArgumentParser(
        prog="python -m gmsa_rag.cache",
        description="Precompute, inspect and clear the GMSA soft-token cache.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,stats,clear}")

    b = sub.add_parser(
        "build",
        help="compress every chunk of a corpus not yet cached",
        description="Chunk SOURCE and compress every chunk not yet cached. SOURCE is a folder of "
        ".txt/.md/.rst files or a persisted LlamaIndex storage folder (docstore.json; its nodes "
        "are used as-is, which guarantees cache hits at query time).",
    )
    b.add_argument("--source", required=True, help="folder of text files or persisted index folder")
    _add_cache_dir(b)
    b.add_argument("--rate", type=int, required=True, help="compression rate (one of the model's rates)")
    b.add_argument("--checkpoint", default=None, help="GMSA checkpoint folder (default: the project's default checkpoint)")
    b.add_argument("--batch-size", type=int, default=8, help="chunks per compress call (default 8)")
    b.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: the model's choice)")
    b.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, help=f"tokens per chunk (default {DEFAULT_CHUNK_SIZE})")
    b.add_argument("--chunk-overlap", type=int, default=DEFAULT_CHUNK_OVERLAP, help=f"token overlap (default {DEFAULT_CHUNK_OVERLAP})")
    b.add_argument("--size-limit", type=int, default=None, help="cache size limit in bytes (default: keep the cache's setting)")
    b.add_argument("--eviction-policy", default=None, help="diskcache eviction policy (default: keep the cache's setting)")
    b.add_argument("--verify", action="store_true", help="checksum existing entries and recompute corrupt ones")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    b.add_argument("--json", action="store_true", help="print the report as JSON")

    s = sub.add_parser("stats", help="show entries and size of a cache")
    _add_cache_dir(s)
    s.add_argument("--json", action="store_true", help="print as JSON")

    c = sub.add_parser("clear", help="delete every entry of a cache")
    _add_cache_dir(c)
    c.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    return parser


def _load_model(checkpoint: str | None, device: str | None):
    # Imported lazily: the cache package must import without the model code.
    from gmsa_rag.model import GMSAModel

    if checkpoint is None:
        from gmsa_rag.checkpoint import default_checkpoint

        checkpoint = default_checkpoint()
        if checkpoint is None:
            raise SystemExit("error: no default GMSA checkpoint found; pass --checkpoint DIR")
    kwargs = {"device": device} if device is not None else {}
    return GMSAModel.from_pretrained(checkpoint, **kwargs)


def _cmd_build(args: argparse.Namespace) -> int:
    with SoftTokenCache(args.cache_dir, size_limit=args.size_limit, eviction_policy=args.eviction_policy) as cache:
        model = _load_model(args.checkpoint, args.device)
        # Libraries print notices to stdout (e.g. LlamaIndex's splitter); keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            report = precompute(
                model,
                cache,
                args.source,
                args.rate,
                chunk_size=args.chunk_size,
                chunk_overlap=args.chunk_overlap,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                verify=args.verify,
            )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(
            f"{report.total_chunks} chunks ({report.unique_chunks} unique): {report.computed} computed, "
            f"{report.skipped} already cached, {report.empty_skipped} empty skipped "
            f"in {report.seconds:.1f} s -> {report.cache_dir}"
        )
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with SoftTokenCache(args.cache_dir) as cache:
        st = cache.stats()
    if args.json:
        d = st.as_dict()
        for k in ("hits", "misses", "corrupt_dropped", "puts"):  # per-process counters: meaningless here
            d.pop(k)
        print(json.dumps(d, indent=2))
    else:
        print(f"directory:       {st.directory}")
        print(f"entries:         {st.entries}")
        print(f"bytes on disk:   {st.bytes_on_disk} ({_human(st.bytes_on_disk)})")
        print(f"size limit:      {st.size_limit} ({_human(st.size_limit)})")
        print(f"eviction policy: {st.eviction_policy}")
    return 0


def _cmd_clear(args: argparse.Namespace) -> int:
    with SoftTokenCache(args.cache_dir) as cache:
        n = len(cache)
        if not args.yes:
            if not sys.stdin.isatty():
                print("error: refusing to clear without --yes (stdin is not a terminal)", file=sys.stderr)
                return 2
            answer = input(f"Delete all {n} entries of {cache.directory}? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                print("aborted")
                return 1
        removed = cache.clear()
    print(f"removed {removed} entries")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return {"build": _cmd_build, "stats": _cmd_stats, "clear": _cmd_clear}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
