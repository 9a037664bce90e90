"""Chunk a corpus and fill a :class:`SoftTokenCache` ahead of query time.

Cache keys are computed on the exact chunk text, so the chunks compressed here must be the very
strings the retriever later returns (``node.get_content()``). Two ways to guarantee it:

* best: build the index first, persist it, and precompute from the persisted folder: its docstore's
  nodes are used as-is, no re-chunking;
* or build the index's nodes with :func:`make_splitter` (same tokenizer, chunk size and overlap)
  from the same documents. Beware: LlamaIndex's splitter shortens chunks by the length of the
  document's *metadata string*; :func:`load_folder` therefore excludes its ``file_path`` metadata
  from the embed/LLM metadata, so chunks equal those of the bare text.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence, Union

from .store import SoftTokenCache, cache_key, compute_and_store

if TYPE_CHECKING:  # llama_index is imported lazily (it is slow to import)
    from llama_index.core import Document
    from llama_index.core.node_parser import SentenceSplitter

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "TEXT_SUFFIXES",
    "PrecomputeReport",
    "chunk_documents",
    "collect_chunks",
    "load_folder",
    "make_splitter",
    "precompute",
    "token_counter",
]

logger = logging.getLogger(__name__)

#: Chunk size in tokens (of the model's tokenizer) used by default for indexing and precompute.
DEFAULT_CHUNK_SIZE = 256
#: Chunk overlap in tokens used by default.
DEFAULT_CHUNK_OVERLAP = 32
#: File suffixes read from a source folder.
TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst")

Source = Union[str, os.PathLike, Sequence[Any]]


@dataclass(frozen=True)
class PrecomputeReport:
    """What :func:`precompute` did. ``computed + skipped == unique_chunks``."""

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

    def as_dict(self) -> dict:
        """Plain-dict form (for JSON)."""
        return asdict(self)


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


def load_folder(folder: Union[str, os.PathLike], suffixes: Sequence[str] = TEXT_SUFFIXES) -> list["Document"]:
    """Read every text file under ``folder`` (recursive, sorted) as a UTF-8 ``Document``.

    Each gets ``metadata={"file_path": <path relative to folder>}``, excluded from the embed and LLM
    metadata so it does not change chunking. Build the index from these to match precompute.
    """
    from llama_index.core import Document

    root = Path(folder)
    if not root.is_dir():
        raise NotADirectoryError(f"not a folder: {root}")
    wanted = {s.lower() for s in suffixes}
    docs = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in wanted):
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            logger.warning("%s is not valid UTF-8; undecodable bytes replaced", path)
            text = raw.decode("utf-8", errors="replace")
        rel = path.relative_to(root).as_posix()
        docs.append(
            Document(
                text=text,
                metadata={"file_path": rel},
                excluded_embed_metadata_keys=["file_path"],
                excluded_llm_metadata_keys=["file_path"],
            )
        )
    return docs


def _docstore_items(persist_dir: Path) -> list[Any]:
    # Only the docstore is loaded (what StorageContext.from_defaults(persist_dir=...) does for it),
    # so a persisted index whose vector store is not the default one (e.g. FAISS) loads too.
    from llama_index.core.storage.docstore import SimpleDocumentStore

    return list(SimpleDocumentStore.from_persist_dir(str(persist_dir)).docs.values())


def collect_chunks(
    source: Source,
    tokenizer: Any = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
) -> tuple[list[str], int]:
    """Chunk texts of ``source`` and the number of empty chunks dropped.

    ``source``: a folder of text files (see :func:`load_folder`); a persisted LlamaIndex storage
    folder (has ``docstore.json``; its nodes are used as-is, ``Document`` entries are chunked); or a
    sequence of strings / ``Document`` (chunked) / other text nodes (used as-is).
    """
    from llama_index.core import Document
    from llama_index.core.schema import TextNode

    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if not path.exists():
            raise FileNotFoundError(
                f"source folder not found: {path} (to precompute raw texts, pass a list of strings)"
            )
        if not path.is_dir():
            raise NotADirectoryError(f"source must be a folder, got file {path}")
        items: list[Any] = _docstore_items(path) if (path / "docstore.json").is_file() else load_folder(path)
        if not items:
            logger.warning("source %s holds no documents or nodes", path)
    elif isinstance(source, Sequence):
        items = list(source)
    else:
        raise TypeError(f"source must be a folder path or a sequence of texts, got {type(source).__name__}")

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
            raise TypeError(
                f"source item {i} is {type(item).__name__}; expected str, Document or TextNode"
            )
    flush()
    return chunks, empty


def _check_model_rate(model: Any, rate: int) -> None:
    if isinstance(rate, bool) or not isinstance(rate, int):
        raise ValueError(f"rate must be an int, got {rate!r}")
    rates = getattr(getattr(model, "config", None), "rates", None)
    if rates is not None and rate not in tuple(rates):
        raise ValueError(f"rate {rate} is not supported by this model; allowed rates: {tuple(rates)}")
    if rate < 1:
        raise ValueError(f"rate must be >= 1, got {rate}")


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
) -> PrecomputeReport:
    """Compress every chunk of ``source`` that is not cached yet and store it in ``cache``.

    Args:
        model: has ``compress(texts, rate) -> list[Tensor]``, ``fingerprint``, ``config.rates``
            and ``tokenizer``.
        source: see :func:`collect_chunks`.
        rate: compression rate; must be one of ``model.config.rates`` (else ``ValueError``).
        tokenizer: token counter for chunking; default ``model.tokenizer`` (``None`` -> LlamaIndex's).
            Ignored for nodes of a persisted index, which are used as-is.
        progress: show a tqdm progress bar.
        verify: read and checksum existing entries (corrupt ones are recomputed) instead of only
            testing their presence.

    Empty / whitespace-only chunks are skipped and counted in ``empty_skipped``. Re-running is
    idempotent: cached chunks are skipped.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    _check_model_rate(model, rate)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    fingerprint = getattr(model, "fingerprint", None)
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("model.fingerprint must be a non-empty str")
    if isinstance(tokenizer, str) and tokenizer == "model":
        tokenizer = getattr(model, "tokenizer", None)

    chunks, empty = collect_chunks(source, tokenizer, chunk_size, chunk_overlap)
    unique: dict[str, str] = {}
    for text in chunks:
        unique.setdefault(cache_key(text, fingerprint, rate), text)
    if verify:
        missing = {k: t for k, t in unique.items() if cache.get(k) is None}
    else:
        missing = {k: t for k, t in unique.items() if k not in cache}

    with tqdm(total=len(missing), unit="chunk", desc=f"GMSA compress (rate {rate})", disable=not progress) as bar:
        compute_and_store(cache, missing, rate, model.compress, batch_size, progress=bar.update, keep=False)

    report = PrecomputeReport(
        source=str(source) if isinstance(source, (str, os.PathLike)) else f"<{len(source)} items>",
        cache_dir=str(cache.directory),
        fingerprint=fingerprint,
        rate=rate,
        total_chunks=len(chunks),
        unique_chunks=len(unique),
        computed=len(missing),
        skipped=len(unique) - len(missing),
        empty_skipped=empty,
        seconds=time.perf_counter() - t0,
    )
    logger.info("precompute: %s", report)
    return report
