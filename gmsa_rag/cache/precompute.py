"""Chunk a corpus and fill a :class:`SoftTokenCache` ahead of query time.

Cache keys are computed on the exact chunk text, so the chunks compressed here must be the very
strings the retriever later returns (``node.get_content()``). Two ways to guarantee it:

* best: build the index first, persist it, and precompute from the persisted folder: its docstore's
  nodes are used as-is, no re-chunking;
* or build the index's nodes with :func:`make_splitter` (same tokenizer, chunk size and overlap)
  from the same documents. Beware: LlamaIndex's splitter shortens chunks by the length of the
  document's *metadata string*; :func:`load_folder` therefore excludes its ``file_path`` (and a JSON-lines
  record's ``title``) metadata from the embed/LLM metadata, so chunks equal those of the bare text.

Sources on disk (:func:`load_source`): a folder of text files and JSON-lines files (``*.jsonl``, ``*.jsonl.gz``: one
document per record, its ``text`` field), one such file, or a persisted LlamaIndex storage folder.

Throughput: chunks are sorted by token length (little padding) and compressed ``batch_size`` at a time while a
writer thread serialises and stores the previous batch. Several processes (``accelerate launch -m gmsa_rag.cache
build ...`` or ``torchrun``, see :func:`process_shard`) write to the one cache, which is safe under concurrent
writers (diskcache: SQLite in WAL mode with a busy timeout). Each chunks only its share of the documents
(:func:`split_by_length`); with fewer than :data:`MIN_DOCUMENTS_PER_PROCESS` documents per process, each chunks
everything and takes a share of the chunk keys instead.
"""

from __future__ import annotations

import functools
import heapq
import inspect
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from ..data.jsonl import iter_records
from .store import SoftTokenCache, cache_key

if TYPE_CHECKING:  # llama_index is imported lazily (it is slow to import)
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "JSONL_SUFFIXES",
    "MIN_DOCUMENTS_PER_PROCESS",
    "SOURCE_SUFFIXES",
    "TEXT_SUFFIXES",
    "PrecomputeReport",
    "chunk_documents",
    "chunk_items",
    "collect_chunks",
    "load_file",
    "load_folder",
    "load_source",
    "make_splitter",
    "precompute",
    "process_device",
    "process_shard",
    "shard_of_items",
    "source_file_kind",
    "source_items",
    "split_by_length",
    "token_counter",
]

logger = logging.getLogger(__name__)

#: Chunk size in tokens (of the model's tokenizer) used by default for indexing and precompute.
DEFAULT_CHUNK_SIZE = 256
#: Chunk overlap in tokens used by default.
DEFAULT_CHUNK_OVERLAP = 32
#: File suffixes read from a source folder as one text document per file.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")
#: File suffixes read as JSON lines, one document per record (its ``text`` field); ``.gz``: gzip-compressed.
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
#: Every file suffix a source folder or a single source file may have.
SOURCE_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES
#: With fewer documents than this per process, processes split chunk keys instead of documents.
MIN_DOCUMENTS_PER_PROCESS = 4

Source = Union[str, os.PathLike, Sequence[Any]]


@dataclass(frozen=True)
class PrecomputeReport:
    """What :func:`precompute` did. ``computed + skipped == unique_chunks``.

    With several processes every count is this process's; ``split`` says how the work was divided:

    * ``"documents"`` (at least :data:`MIN_DOCUMENTS_PER_PROCESS` documents per process): the documents (or the
      nodes of a persisted index) were divided among the processes before chunking, balanced by text length.
      ``documents``, ``total_chunks`` and ``empty_skipped`` count this process's documents and their chunks,
      ``unique_chunks`` their distinct keys, all this process's to compute. Summed over the processes they give
      the whole source's numbers, except that a chunk text found in documents of two processes counts (and is
      computed, if missing) in both.
    * ``"chunk keys"`` (fewer documents): every process chunked the whole source, so ``documents``,
      ``total_chunks`` and ``empty_skipped`` are the whole source's; ``unique_chunks`` is this process's share
      (every ``num_processes``-th distinct key, in key order), and the shares add up to the source's.

    With one process (``split == "none"``) everything is the whole source's.
    """

    source: str
    cache_dir: str
    fingerprint: str
    rate: int
    total_chunks: int  # non-empty chunks found, duplicates included
    unique_chunks: int  # distinct chunk texts (distinct cache keys)
    computed: int  # compressed and stored in this run
    skipped: int  # already in the cache
    empty_skipped: int  # empty / whitespace-only chunks, ignored
    seconds: float
    tokens: int = 0  # tokens of the computed chunks (the model's tokenizer; words without one)
    compress_seconds: float = 0.0  # the compress + store loop alone
    process_index: int = 0
    num_processes: int = 1
    split: str = "none"  # how processes divided the work: "none" (one process), "documents" or "chunk keys"
    documents: int = 0  # documents, nodes or texts of the source that this process chunked

    @property
    def chunks_per_second(self) -> float:
        """Computed chunks per second of the compress + store loop."""
        return self.computed / self.compress_seconds if self.compress_seconds > 0 else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Tokens of computed chunks per second of the compress + store loop."""
        return self.tokens / self.compress_seconds if self.compress_seconds > 0 else 0.0

    def as_dict(self) -> dict:
        """Plain-dict form (for JSON), rates included."""
        return {**asdict(self), "chunks_per_second": self.chunks_per_second,
                "tokens_per_second": self.tokens_per_second}


def token_counter(tokenizer: Any) -> Callable[[str], list] | None:
    """A ``str -> list`` token function for the splitter from a HF tokenizer (special tokens off),
    any object with ``encode(text)``, or a plain callable. ``None`` -> LlamaIndex's default."""
    if tokenizer is None:
        return None
    encode = getattr(tokenizer, "encode", None)
    if callable(encode):
        try:
            encode("probe", add_special_tokens=False)
        except TypeError:
            return encode
        return functools.partial(encode, add_special_tokens=False)
    if callable(tokenizer):
        return tokenizer
    raise TypeError(f"tokenizer must have .encode() or be callable, got {type(tokenizer).__name__}")


def make_splitter(
    tokenizer: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> "SentenceSplitter":
    """The one :class:`SentenceSplitter` configuration used for caching: build index nodes with it too."""
    from llama_index.core.node_parser import SentenceSplitter

    if chunk_size < 1 or chunk_overlap < 0 or chunk_overlap >= chunk_size:
        raise ValueError(
            f"need chunk_size >= 1 and 0 <= chunk_overlap < chunk_size, "
            f"got chunk_size={chunk_size}, chunk_overlap={chunk_overlap}"
        )
    return SentenceSplitter(
        chunk_size=chunk_size, chunk_overlap=chunk_overlap, tokenizer=token_counter(tokenizer)
    )


def chunk_documents(
    texts: Sequence[Union[str, "Document"]],
    tokenizer: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> list[str]:
    """Split documents (strings or LlamaIndex ``Document`` objects) into chunk texts, in order.

    Identical to ``make_splitter(...).get_nodes_from_documents(docs)`` followed by
    ``node.get_content()`` (strings become metadata-free Documents). Empty / whitespace-only
    chunks are dropped.
    """
    from llama_index.core import Document

    docs = []
    for i, t in enumerate(texts):
        if isinstance(t, str):
            docs.append(Document(text=t))
        elif isinstance(t, Document):
            docs.append(t)
        else:
            raise TypeError(f"texts[{i}] must be str or llama_index Document, got {type(t).__name__}")
    splitter = make_splitter(tokenizer, chunk_size, chunk_overlap)
    chunks = [n.get_content() for n in splitter.get_nodes_from_documents(docs)]
    return [c for c in chunks if c.strip()]


BINARY_PROBE_BYTES = 8000


def source_file_kind(path: Union[str, os.PathLike], suffixes: Sequence[str] = SOURCE_SUFFIXES) -> str | None:
    """How a file named ``path`` is read, by its name (case-insensitive): ``"jsonl"`` if it ends in one of
    ``suffixes`` that is a :data:`JSONL_SUFFIXES`, ``"text"`` if its last suffix is another of ``suffixes``,
    else ``None`` (not a source file)."""
    wanted = {s.lower() for s in suffixes}
    name = Path(path).name.lower()
    if any(name.endswith(s) and name != s for s in wanted & set(JSONL_SUFFIXES)):
        return "jsonl"
    return "text" if Path(name).suffix in wanted else None


def _excluded_metadata_document(text: str, metadata: dict) -> "Document":
    """A ``Document`` whose metadata is kept out of the embed and LLM metadata (so it does not change chunking)."""
    from llama_index.core import Document

    keys = list(metadata)
    return Document(text=text, metadata=metadata, excluded_embed_metadata_keys=keys, excluded_llm_metadata_keys=keys)


def _read_text_file(path: Path) -> str | None:
    """The UTF-8 text of ``path`` (undecodable bytes replaced, with a warning); ``None`` for a binary file
    (a NUL byte in the first 8000 bytes, as git decides), with a warning."""
    raw = path.read_bytes()
    if b"\0" in raw[:BINARY_PROBE_BYTES]:
        logger.warning("skipping %s: a binary file, not text", path)
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("%s is not valid UTF-8; undecodable bytes replaced", path)
        return raw.decode("utf-8", errors="replace")


def load_file(path: Union[str, os.PathLike], name: str | None = None, kind: str | None = None) -> list["Document"]:
    """The documents of one source file: one per record of a ``.jsonl`` / ``.jsonl.gz`` file, else the whole
    file as one UTF-8 text (none for a binary file, with a warning).

    Metadata (excluded from the embed and LLM metadata, so chunking sees the bare text): ``file_path`` = ``name``
    (default: the file's name), and a record's ``title`` if it has one. ``kind`` (``"text"`` or ``"jsonl"``)
    overrides :func:`source_file_kind`.

    Raises:
        ValueError: the file's type is not supported, or a JSON-lines record is bad (names file and line).
    """
    path = Path(path)
    name = path.name if name is None else name
    kind = kind or source_file_kind(path)
    if kind is None:
        raise ValueError(f"unsupported source file {path}: expected one of {', '.join(SOURCE_SUFFIXES)}")
    if kind == "text":
        text = _read_text_file(path)
        return [] if text is None else [_excluded_metadata_document(text, {"file_path": name})]
    docs = []
    for _, record in iter_records(path, text_field="text"):
        metadata: dict = {"file_path": name}
        if record.get("title") is not None:
            metadata["title"] = str(record["title"])
        docs.append(_excluded_metadata_document(record["text"], metadata))
    return docs


def load_folder(folder: Union[str, os.PathLike], suffixes: Sequence[str] = SOURCE_SUFFIXES) -> list["Document"]:
    """Read every file under ``folder`` (recursive, sorted by path) whose name ends in one of ``suffixes`` with
    :func:`load_file`: a ``.jsonl`` / ``.jsonl.gz`` file gives a ``Document`` per record (its ``text`` field),
    any other file one UTF-8 ``Document``.

    Binary files with a text suffix (a NUL byte in the first 8000 bytes, as git decides: executables, images,
    random data, also UTF-16 text) are skipped with one warning each.

    Each gets ``metadata={"file_path": <path relative to folder>}`` (plus a record's ``title``), excluded from the
    embed and LLM metadata so it does not change chunking. Build the index from these to match precompute.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        kind = source_file_kind(path, suffixes)
        if kind is not None:
            docs.extend(load_file(path, path.relative_to(root).as_posix(), kind))
    return docs


def load_source(path: Union[str, os.PathLike]) -> list["Document"]:
    """The documents of a source folder (:func:`load_folder`) or of one source file (:func:`load_file`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a file of an unsupported type.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return load_folder(path)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    if not path.is_file():
        raise ValueError(f"source {path} is neither a folder nor a regular file")
    return load_file(path)


def _docstore_items(persist_dir: Path) -> list[Any]:
    # Only the docstore is loaded (what StorageContext.from_defaults(persist_dir=...) does for it),
    # so a persisted index whose vector store is not the default one (e.g. FAISS) loads too.
    from llama_index.core.storage.docstore import SimpleDocumentStore

    return list(SimpleDocumentStore.from_persist_dir(str(persist_dir)).docs.values())


def source_items(source: Source) -> list[Any]:
    """The documents or nodes of ``source`` (see :func:`collect_chunks`), not yet chunked."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"source not found: {path} (to precompute raw texts, pass a list of strings)"
            )
        if (path / "docstore.json").is_file():
            try:
                items: list[Any] = _docstore_items(path)
            except (ValueError, KeyError, TypeError) as err:  # (json errors are ValueErrors)
                raise ValueError(f"{path / 'docstore.json'}: not a LlamaIndex docstore ({err}); a folder holding "
                                 "one is read as a persisted index") from err
        else:
            items = load_source(path)
        if not items:
            logger.warning("source %s holds no documents or nodes", path)
        return items
    if isinstance(source, Sequence):
        return list(source)
    raise TypeError(f"source must be a path or a sequence of texts, got {type(source).__name__}")


def _item_text(item: Any, i: int) -> str:
    """The text of a source item: a string, a ``Document``'s text, a text node's content."""
    from llama_index.core import Document
    from llama_index.core.schema import TextNode

    if isinstance(item, str):
        return item
    if isinstance(item, Document):
        return item.text
    if isinstance(item, TextNode):
        return item.get_content()
    raise _unsupported_item(item, i)


def _unsupported_item(item: Any, i: int) -> TypeError:
    return TypeError(f"source item {i} is {type(item).__name__}; expected str, Document or TextNode")


def chunk_items(
    items: Sequence[Any],
    tokenizer: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> tuple[list[str], int]:
    """Chunk texts of ``items`` (strings and ``Document`` are chunked, other text nodes used as-is, in order)
    and the number of empty chunks dropped."""
    from llama_index.core import Document
    from llama_index.core.schema import TextNode

    chunks: list[str] = []
    empty = 0
    to_split: list[Any] = []

    def flush() -> None:
        nonlocal empty
        if to_split:
            chunks.extend(chunk_documents(to_split, tokenizer, chunk_size, chunk_overlap))
            empty += sum(1 for d in to_split if not (d if isinstance(d, str) else d.text).strip())
            to_split.clear()

    for i, item in enumerate(items):
        if isinstance(item, (str, Document)):
            to_split.append(item)
        elif isinstance(item, TextNode):
            flush()  # keep document order
            text = item.get_content()
            if text.strip():
                chunks.append(text)
            else:
                empty += 1
        else:
            raise _unsupported_item(item, i)
    flush()
    return chunks, empty


def collect_chunks(
    source: Source,
    tokenizer: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> tuple[list[str], int]:
    """Chunk texts of ``source`` and the number of empty chunks dropped.

    ``source``: a folder of text and JSON-lines files, or one such file (see :func:`load_source`); a persisted
    LlamaIndex storage folder (has ``docstore.json``; its nodes are used as-is, ``Document`` entries are
    chunked); or a sequence of strings / ``Document`` (chunked) / other text nodes (used as-is).
    """
    return chunk_items(source_items(source), tokenizer, chunk_size, chunk_overlap)


def split_by_length(lengths: Sequence[int], count: int) -> list[list[int]]:
    """Indices of the items each of ``count`` processes takes, balanced by ``lengths``: longest-processing-time
    greedy (longest item first, to the least-loaded process; ties to the lower index), so every process computes
    the same split. Each list is in ascending order."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    loads = [(0, p) for p in range(count)]  # a heap of (load, process)
    parts: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, p = heapq.heappop(loads)
        parts[p].append(i)
        heapq.heappush(loads, (load + lengths[i], p))
    return [sorted(part) for part in parts]


def shard_of_items(items: Sequence[Any], index: int, count: int) -> list[Any] | None:
    """The items (documents, nodes or texts) process ``index`` of ``count`` chunks, in source order: a split of
    ``items`` balanced by text length (:func:`split_by_length`); ``None`` when ``count`` is 1 or there are fewer
    than :data:`MIN_DOCUMENTS_PER_PROCESS` items per process (too few to balance: split chunk keys instead)."""
    if count == 1 or len(items) < MIN_DOCUMENTS_PER_PROCESS * count:
        return None
    lengths = [len(_item_text(item, i)) for i, item in enumerate(items)]
    own = split_by_length(lengths, count)[index]
    logger.info("process %d of %d chunks %d of %d documents (%d of %d characters)", index, count, len(own),
                len(items), sum(lengths[i] for i in own), sum(lengths))
    return [items[i] for i in own]


def _check_model_rate(model: Any, rate: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ValueError(f"rate must be an int, got {rate!r}")
    rates = getattr(getattr(model, "config", None), "rates", None)
    if rates is not None and rate not in tuple(rates):
        raise ValueError(f"rate {rate} is not supported by this model; allowed rates: {tuple(rates)}")
    if rate < 1:
        raise ValueError(f"rate must be >= 1, got {rate}")


def process_shard() -> tuple[int, int]:
    """(index, count) of this process among those started by ``accelerate launch`` or ``torchrun`` (their
    ``RANK`` / ``WORLD_SIZE``); (0, 1) for a plain run."""
    count = int(os.environ.get("WORLD_SIZE", "1") or 1)
    index = int(os.environ.get("RANK", "0") or 0)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"bad RANK={index} / WORLD_SIZE={count}")
    return index, count


def process_device(device: str | None) -> str | None:
    """The device this process should load the model on: under a multi-process launch, ``cuda`` (or no device,
    with CUDA present) becomes ``cuda:<LOCAL_RANK>`` so each process takes its own GPU; otherwise ``device``."""
    _, count = process_shard()
    if count == 1 or device not in (None, "cuda"):
        return device
    import torch

    if not torch.cuda.is_available():
        return device
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0') or 0)}"


def _token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text: one batched call for a Hugging Face tokenizer, ``encode`` per text otherwise, words
    without a tokenizer."""
    if not texts:
        return []
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    if callable(tokenizer) and hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    count = token_counter(tokenizer)
    return [len(count(t)) for t in texts]


def _compress_kwargs(model: Any, batch_size: int) -> dict:
    """Pass ``batch_size`` on to ``model.compress`` when it takes one (GMSAModel batches encoder windows)."""
    try:
        params = inspect.signature(model.compress).parameters
    except (TypeError, ValueError):
        return {}
    return {"batch_size": batch_size} if "batch_size" in params else {}


def precompute(
    model: Any,
    cache: SoftTokenCache,
    source: Source,
    rate: int,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    batch_size: int = 8,
    *,
    tokenizer: Any = "model",
    progress: bool = True,
    verify: bool = False,
    shard: tuple[int, int] | None = None,
) -> PrecomputeReport:
    """Compress every chunk of ``source`` that is not cached yet and store it in ``cache``.

    Args:
        model: has ``compress(texts, rate) -> list[Tensor]``, ``fingerprint``, ``config.rates``
            and ``tokenizer``.
        source: see :func:`collect_chunks`.
        rate: compression rate; must be one of ``model.config.rates`` (else ``ValueError``).
        batch_size: chunks per ``compress`` call (similar lengths together: chunks are sorted by tokens).
        tokenizer: token counter for chunking; default ``model.tokenizer`` (``None`` -> LlamaIndex's).
            Ignored for nodes of a persisted index, which are used as-is.
        progress: show a tqdm progress bar (chunks/s, and tokens/s after it); only on process 0.
        verify: read and checksum existing entries (corrupt ones are recomputed) instead of only
            testing their presence.
        shard: (index, count): this process's share, default :func:`process_shard`, so each process of a
            multi-process launch takes its own. With count > 1 the documents (or nodes) are divided among the
            processes before chunking (:func:`shard_of_items`), so each chunks only its own; with fewer than
            :data:`MIN_DOCUMENTS_PER_PROCESS` per process, each chunks the whole source and compresses every
            count-th distinct chunk from index on (in key order). See :class:`PrecomputeReport` for the counts.

    Empty / whitespace-only chunks are skipped and counted in ``empty_skipped``. Re-running is
    idempotent: cached chunks are skipped. Several rates: :func:`precompute_rates`.
    """
    return precompute_rates(model, cache, source, [rate], chunk_size, chunk_overlap, batch_size, tokenizer=tokenizer,
                            progress=progress, verify=verify, shard=shard)[0]


def precompute_rates(
    model: Any,
    cache: SoftTokenCache,
    source: Source,
    rates: Sequence[int],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    batch_size: int = 8,
    *,
    tokenizer: Any = "model",
    progress: bool = True,
    verify: bool = False,
    shard: tuple[int, int] | None = None,
) -> list[PrecomputeReport]:
    """:func:`precompute` at each of ``rates`` in turn (each once, in the order given), reading and chunking the
    source once: one report per rate. Every rate is checked before anything is read; the first report's
    ``seconds`` include the reading and chunking, the others' do not."""
    import torch
    from tqdm.auto import tqdm

    started = time.perf_counter()
    if isinstance(rates, (int, str)):
        raise ValueError(f"rates must be a sequence of rates, got {rates!r} (one rate: precompute)")
    rates = list(dict.fromkeys(rates))
    if not rates:
        raise ValueError("rates must name at least one rate")
    for rate in rates:
        _check_model_rate(model, rate)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    fingerprint = getattr(model, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("model.fingerprint must be a non-empty str")
    index, count = shard or process_shard()
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in [0, {count})")
    if isinstance(tokenizer, str) and tokenizer == "model":
        tokenizer = getattr(model, "tokenizer", None)

    items = source_items(source)
    own = shard_of_items(items, index, count)
    split = "none" if count == 1 else "chunk keys" if own is None else "documents"
    chunked = items if own is None else own
    chunks, empty = chunk_items(chunked, tokenizer, chunk_size, chunk_overlap)
    described = str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} items>"
    reports = []
    kwargs = _compress_kwargs(model, batch_size)
    text_tokens: dict[str, int] = {}  # each chunk's token count, counted once over all rates
    for rate in rates:
        unique: dict[str, str] = {}
        for text in chunks:
            unique.setdefault(cache_key(text, fingerprint, rate), text)
        if split == "chunk keys":
            mine = {k: unique[k] for k in sorted(unique)[index::count]}  # keys are hashes: an even, stable split
        else:
            mine = unique
        if verify:
            missing = {k: t for k, t in mine.items() if cache.get(k) is None}
        else:
            missing = {k: t for k, t in mine.items() if k not in cache}
        keys = list(missing)
        uncounted = [t for t in dict.fromkeys(missing.values()) if t not in text_tokens]
        text_tokens.update(zip(uncounted, _token_lengths(getattr(model, "tokenizer", None), uncounted)))
        lengths = {k: text_tokens[missing[k]] for k in keys}
        keys.sort(key=lambda k: lengths[k], reverse=True)  # longest first: a batch that does not fit fails at once

        t1 = time.perf_counter()
        done_tokens = 0
        label = f"GMSA compress (rate {rate})" + (f" [process {index} of {count}]" if count > 1 else "")
        show = progress and index == 0
        with tqdm(total=len(keys), unit="chunk", desc=label, disable=not show) as bar, \
                ThreadPoolExecutor(1, thread_name_prefix="gmsa-cache-writer") as writer:
            pending: list[Future] = []
            for start in range(0, len(keys), batch_size):
                batch_keys = keys[start : start + batch_size]
                with torch.no_grad():
                    result = list(model.compress([missing[k] for k in batch_keys], rate, **kwargs))
                if len(result) != len(batch_keys):
                    raise ValueError(f"compress returned {len(result)} tensors for {len(batch_keys)} texts")
                pairs = [(k, t.detach().to("cpu")) for k, t in zip(batch_keys, result)]
                while len(pending) >= 2:  # at most two batches waiting to be written
                    pending.pop(0).result()
                pending.append(writer.submit(cache.put_many, pairs))
                done_tokens += sum(lengths[k] for k in batch_keys)
                bar.update(len(batch_keys))
                bar.set_postfix_str(f"{done_tokens / max(time.perf_counter() - t1, 1e-9):,.0f} tok/s", refresh=False)
            for future in pending:
                future.result()
        loop_seconds = time.perf_counter() - t1
        reports.append(PrecomputeReport(
            source=described,
            cache_dir=str(cache.directory),
            fingerprint=fingerprint,
            rate=rate,
            total_chunks=len(chunks),
            unique_chunks=len(mine),
            computed=len(missing),
            skipped=len(mine) - len(missing),
            empty_skipped=empty,
            seconds=time.perf_counter() - started,
            tokens=done_tokens,
            compress_seconds=loop_seconds,
            process_index=index,
            num_processes=count,
            split=split,
            documents=len(chunked),
        ))
        logger.info("precompute: %s", reports[-1])
        started = time.perf_counter()  # the next rate's pass: the source is read and chunked already
    return reports
