"""Command line: ``python -m gmsa_rag.cache {build,stats,clear} ...``.

Arguments are checked before any model loads; known errors end in one line on stderr and an exit status
(listed by ``--help``). torch, transformers and the model code are imported by ``build`` only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import diskcache

from ..errors import (
    EXIT_DECLINED,
    EXIT_OK,
    EXIT_STATUS_HELP,
    UsageError,
    check_device,
    non_negative_int,
    positive_int,
    report_errors,
)
from .precompute import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    MIN_DOCUMENTS_PER_PROCESS,
    SOURCE_SUFFIXES,
    PrecomputeReport,
    precompute_rates,
    process_device,
    source_file_kind,
)
from .store import CacheDatabaseError, SoftTokenCache, check_cache_dir, default_cache_dir, remove_cache_files

if TYPE_CHECKING:
    from gmsa_rag.config import GMSAConfig
    from gmsa_rag.model import GMSAModel


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
        help="soft-token cache folder, the one `gmsa-rag ask --cache-dir` reads "
        f"(default: $GMSA_RAG_CACHE_DIR or {default_cache_dir()})",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m gmsa_rag.cache``."""
    common = dict(epilog=EXIT_STATUS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser = argparse.ArgumentParser(
        prog="python -m gmsa_rag.cache",
        description="Precompute, inspect and clear the GMSA soft-token cache.",
        **common,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,stats,clear}")

    b = sub.add_parser(
        "build",
        help="compress every chunk of a corpus not yet cached",
        description="Chunk SOURCE and compress every chunk not yet cached. SOURCE is one of:\n"
        "  a folder of .txt/.md/.markdown/.rst files and .jsonl/.jsonl.gz files (searched recursively),\n"
        "  one such file (JSON lines: one document per line, its \"text\" field; \"title\" kept as metadata),\n"
        "  a persisted LlamaIndex storage folder (docstore.json; its nodes are used as-is, which guarantees\n"
        "  cache hits at query time).\n\n"
        "Several GPUs: `accelerate launch --num_processes N -m gmsa_rag.cache build ...` starts a process per\n"
        "GPU. They divide the documents among themselves, balanced by length, and each chunks and compresses\n"
        f"only its own (with fewer than {MIN_DOCUMENTS_PER_PROCESS} documents per process, each chunks all and "
        "they divide the chunks);\nall write to the one cache and each prints the report of its own share.",
        **common,
    )
    b.add_argument("--source", required=True,
                   help="folder of text / .jsonl(.gz) files, one such file, or a persisted index folder")
    _add_cache_dir(b)
    b.add_argument("--rate", type=positive_int, nargs="+", required=True, metavar="RATE",
                   help="compression rate(s), each one of the model's rates; several (e.g. `--rate 8 2` for "
                   "GMSACompressor(rate=8, lead_rate=2)) fill the cache at each in turn, and --json then prints a "
                   "list of reports, one per rate")
    b.add_argument("--checkpoint", default=None, help="GMSA checkpoint folder (default: the bundled checkpoints/smollm2-gmsa)")
    b.add_argument("--batch-size", type=positive_int, default=8, help="chunks per compress call (default 8)")
    b.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cpu)")
    b.add_argument("--chunk-size", type=positive_int, default=DEFAULT_CHUNK_SIZE, help=f"tokens per chunk (default {DEFAULT_CHUNK_SIZE})")
    b.add_argument("--chunk-overlap", type=non_negative_int, default=DEFAULT_CHUNK_OVERLAP,
                   help=f"token overlap, less than --chunk-size (default {DEFAULT_CHUNK_OVERLAP})")
    b.add_argument("--size-limit", type=positive_int, default=None, help="cache size limit in bytes (default: keep the cache's setting)")
    b.add_argument("--eviction-policy", default=None, choices=sorted(diskcache.EVICTION_POLICY),
                   help="diskcache eviction policy (default: keep the cache's setting)")
    b.add_argument("--verify", action="store_true", help="checksum existing entries and recompute corrupt ones")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bars (weight loading, compression)")
    b.add_argument("--json", action="store_true", help="print the report as JSON")

    s = sub.add_parser("stats", help="show entries and size of a cache (reads it without writing)", **common)
    _add_cache_dir(s)
    s.add_argument("--json", action="store_true", help="print as JSON")

    c = sub.add_parser("clear", help="delete every entry of a cache", **common)
    _add_cache_dir(c)
    c.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    c.add_argument("--force", action="store_true",
                   help="if the cache's database is damaged, delete its database and value files "
                   "(other files in the folder are kept)")
    return parser


def _source_path(source: str) -> Path:
    """``--source`` as a path: an existing folder, or a file of a supported type."""
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--source {path} does not exist: pass a folder of text / .jsonl(.gz) files, "
                                "one such file, or a persisted index folder")
    if not path.is_dir() and (not path.is_file() or source_file_kind(path) is None):
        raise UsageError(f"--source {path} is not a supported file ({', '.join(SOURCE_SUFFIXES)}): pass such a "
                         "file or a folder")
    return path


def _checkpoint_config(checkpoint: str | None) -> tuple[Path, "GMSAConfig"]:
    """The checkpoint folder to load and its config, read without loading any weights."""
    from gmsa_rag.checkpoint import CheckpointError, default_checkpoint, read_record
    from gmsa_rag.config import GMSAConfig

    path = Path(checkpoint).expanduser() if checkpoint is not None else default_checkpoint()
    if path is None:
        raise CheckpointError("no --checkpoint given and no bundled checkpoint (checkpoints/smollm2-gmsa)")
    return path, GMSAConfig.from_dict(read_record(path)["config"])


def _load_model(checkpoint: Path, device: str | None, progress: bool) -> "GMSAModel":
    from transformers.utils import logging as hf_logging

    from gmsa_rag.model import GMSAModel

    if not progress:
        hf_logging.disable_progress_bar()
    kwargs = {"device": device} if device is not None else {}
    return GMSAModel.from_pretrained(checkpoint, **kwargs)


def _cmd_build(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # offline like `gmsa-rag ask`; HF_HUB_OFFLINE=0 downloads
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    cache_dir = check_cache_dir(args.cache_dir)
    source = _source_path(args.source)
    checkpoint, config = _checkpoint_config(args.checkpoint)
    for rate in args.rate:
        if rate not in config.rates:
            raise UsageError(f"--rate {rate} is not allowed: {checkpoint} supports {list(config.rates)}")
    if args.device is not None:
        check_device(args.device)
    from gmsa_rag.cache.precompute import source_items

    items = source_items(source)  # read before any model loads: a bad record fails here, in one line
    if not items:
        raise UsageError(f"--source {source} holds no documents: pass a folder or file with some text")
    with SoftTokenCache(cache_dir, size_limit=args.size_limit, eviction_policy=args.eviction_policy) as cache:
        model = _load_model(checkpoint, process_device(args.device), progress=not args.no_progress)  # a GPU per process
        # Libraries print notices to stdout (e.g. LlamaIndex's splitter); keep stdout for the report.
        with contextlib.redirect_stdout(sys.stderr):
            reports = precompute_rates(
                model,
                cache,
                items,
                args.rate,  # (each once, in the order given)
                chunk_size=args.chunk_size,
                chunk_overlap=args.chunk_overlap,
                batch_size=args.batch_size,
                progress=not args.no_progress,
                verify=args.verify,
            )
    reports = [dataclasses.replace(report, source=str(source)) for report in reports]
    if args.json:
        dicts = [report.as_dict() for report in reports]
        print(json.dumps(dicts[0] if len(dicts) == 1 else dicts, indent=2))
    else:
        for report in reports:
            print(_report_line(report, several_rates=len(reports) > 1))
    return EXIT_OK


def _report_line(report: PrecomputeReport, several_rates: bool) -> str:
    """One line of ``build``'s text report: the chunks of this process's share at one rate."""
    share = (f"process {report.process_index} of {report.num_processes} (split by {report.split}, "
             f"{report.documents} documents): " if report.num_processes > 1 else "")
    rate = f"at {report.rate}x: " if several_rates else ""
    return (f"{share}{rate}{report.total_chunks} chunks ({report.unique_chunks} unique): {report.computed} computed, "
            f"{report.skipped} already cached, {report.empty_skipped} empty skipped "
            f"in {report.seconds:.1f} s -> {report.cache_dir}")


def _cmd_stats(args: argparse.Namespace) -> int:
    directory = check_cache_dir(args.cache_dir, must_exist=True)
    with SoftTokenCache(directory, readonly=True) as cache:
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
    return EXIT_OK


def _confirmed(question: str, yes: bool) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError("refusing to clear without --yes (stdin is not a terminal)")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")


def _cmd_clear(args: argparse.Namespace) -> int:
    directory = check_cache_dir(args.cache_dir, must_exist=True)
    try:
        with SoftTokenCache(directory) as cache:
            if not _confirmed(f"Delete all {len(cache)} entries of {directory}?", args.yes):
                print("aborted")
                return EXIT_DECLINED
            removed = cache.clear()
    except CacheDatabaseError as err:
        if not (args.force and err.damaged):
            raise
        if not _confirmed(f"Delete the damaged cache database and value files in {directory}?", args.yes):
            print("aborted")
            return EXIT_DECLINED
        print(f"removed the damaged cache in {directory} ({remove_cache_files(directory)} files)")
        return EXIT_OK
    print(f"removed {removed} entries")
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"build": _cmd_build, "stats": _cmd_stats, "clear": _cmd_clear}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "build" and args.chunk_overlap >= args.chunk_size:
        parser.error(f"--chunk-overlap ({args.chunk_overlap}) must be smaller than --chunk-size ({args.chunk_size})")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return report_errors(lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
