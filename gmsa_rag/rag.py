"""Building blocks of the RAG demo: the bundled documents, the offline MiniLM embedder, a persisted
FAISS-backed ``VectorStoreIndex``, the GMSA model, and query engines wired with the GMSA integrations.

torch, transformers, LlamaIndex and the integration packages are imported lazily, by the functions that
need them (``gmsa-rag examples`` and ``--help`` stay fast).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence, Union

from .cache import DEFAULT_CHUNK_OVERLAP, DEFAULT_CHUNK_SIZE, make_splitter
from .cache.precompute import BINARY_PROBE_BYTES, SOURCE_SUFFIXES, load_source

if TYPE_CHECKING:
    from llama_index.core import Document, VectorStoreIndex
    from llama_index.core.base.embeddings.base import BaseEmbedding

    from .config import GMSAConfig
    from .model import GMSAModel


EMBED_DIM = 384
REPO_ROOT = Path(__file__).resolve().parent.parent
INDEX_FORMAT = 1


def bundled_docs_dir() -> Path | None:
    """``examples/docs`` of the repository (40 Wikipedia passages), if this is a source checkout."""
    path = REPO_ROOT / "examples" / "docs"
    return path if path.is_dir() else None


def load_embed_model(path: str | Path | None = None) -> "BaseEmbedding":
    """The offline MiniLM as a LlamaIndex embedding (384-d, normalised: inner product = cosine)."""
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    from .backbone import minilm_path

    return HuggingFaceEmbedding(model_name=str(path or minilm_path()), device="cpu", normalize=True)


def hash_embedding(dim: int = 64) -> "BaseEmbedding":
    """A dependency-free bag-of-words embedding (hashed word counts, L2-normalised): deterministic and
    instant, for tests and smoke runs where MiniLM's load time or quality does not matter."""
    import re
    import zlib

    from llama_index.core.base.embeddings.base import BaseEmbedding
    from llama_index.core.bridge.pydantic import Field

    class HashEmbedding(BaseEmbedding):
        dim: int = Field(default=64, gt=0)

        @classmethod
        def class_name(cls) -> str:
            return "GMSAHashEmbedding"

        def _vec(self, text: str) -> list[float]:
            vec = [0.0] * self.dim
            for word in re.findall(r"\w+", text.lower()):
                vec[zlib.crc32(word.encode("utf-8")) % self.dim] += 1.0
            norm = sum(v * v for v in vec) ** 0.5 or 1.0
            return [v / norm for v in vec]

        def _get_query_embedding(self, query: str) -> list[float]:
            return self._vec(query)

        def _get_text_embedding(self, text: str) -> list[float]:
            return self._vec(text)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return self._vec(query)

    return HashEmbedding(dim=dim, model_name=f"hash-{dim}")


def is_binary(path: Path) -> bool:
    """A NUL byte in the first 8000 bytes, as git decides (what :func:`gmsa_rag.cache.load_folder` skips)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(BINARY_PROBE_BYTES)


def load_documents(docs_dir: str | Path) -> list["Document"]:
    """The documents of ``docs_dir`` (a folder of text and ``.jsonl`` / ``.jsonl.gz`` files, or one such file)
    exactly as :func:`gmsa_rag.cache.precompute.load_source` reads them, the loader of ``python -m gmsa_rag.cache
    build --source docs_dir`` (so both make the same chunks); binary files are skipped there."""
    return load_source(Path(docs_dir))


def _embed_identity(embed_model: Any) -> str:
    return f"{type(embed_model).__name__}:{getattr(embed_model, 'model_name', '')}"


def index_signature(
    documents: Sequence["Document"], embed_model: Any, tokenizer: Any, chunk_size: int, chunk_overlap: int
) -> str:
    """Hash of everything the persisted index depends on: documents (file names, titles + texts), chunking,
    embedder. A document without a ``title`` (a text file) hashes as before titles were read."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            [INDEX_FORMAT, _embed_identity(embed_model), getattr(tokenizer, "name_or_path", str(tokenizer)),
             chunk_size, chunk_overlap]
        ).encode()
    )
    for doc in documents:
        digest.update(doc.metadata["file_path"].encode() + b"\0" + doc.text.encode("utf-8", "surrogatepass") + b"\0")
        if "title" in doc.metadata:  # a JSON-lines record's title: metadata of its nodes
            digest.update(b"title\0" + str(doc.metadata["title"]).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:20]


@dataclass
class IndexInfo:
    index: "VectorStoreIndex"
    persist_dir: Path
    built: bool
    nodes: int
    seconds: float


Docs = Union[str, os.PathLike, Sequence["Document"]]


def build_or_load_index(
    docs: Docs,
    embed_model: Any,
    tokenizer: Any,
    persist_root: str | Path | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    chunk_overlap: int = DEFAULT_CHUNK_OVERLAP,
    dim: int | None = None,
    progress: bool = False,
) -> IndexInfo:
    """A ``VectorStoreIndex`` in a FAISS ``IndexFlatIP`` over ``docs``: a folder (read with
    :func:`load_documents`) or the documents it returned.

    Chunks are made with :func:`gmsa_rag.cache.make_splitter` (the model's tokenizer), so that
    ``python -m gmsa_rag.cache build --source <persist_dir>`` precomputes exactly the retrieved chunks.
    The index is persisted under ``persist_root/<signature>`` and loaded from there when nothing changed.
    Each process writes a new index into its own temporary folder and renames it into place, so that
    processes building the same index at once neither mix their files nor fail. ``progress`` shows
    bars for chunking and embedding.
    """
    import faiss
    from llama_index.core import StorageContext, VectorStoreIndex, load_index_from_storage
    from llama_index.vector_stores.faiss import FaissVectorStore

    start = time.perf_counter()
    from .backbone import cache_root

    documents = load_documents(docs) if isinstance(docs, (str, os.PathLike)) else list(docs)
    if not documents:
        where = docs if isinstance(docs, (str, os.PathLike)) else "the documents given"
        raise ValueError(f"no documents ({', '.join(SOURCE_SUFFIXES)}) in {where}: pass a folder of text or "
                         "JSON-lines files")
    persist_root = Path(persist_root) if persist_root is not None else cache_root() / "indexes"
    persist_dir = persist_root / index_signature(documents, embed_model, tokenizer, chunk_size, chunk_overlap)
    if (persist_dir / "docstore.json").is_file() and (persist_dir / "default__vector_store.json").is_file():
        vector_store = FaissVectorStore.from_persist_dir(str(persist_dir))
        storage = StorageContext.from_defaults(vector_store=vector_store, persist_dir=str(persist_dir))
        index = load_index_from_storage(storage, embed_model=embed_model)
        return IndexInfo(index, persist_dir, False, len(index.docstore.docs), time.perf_counter() - start)

    splitter = make_splitter(tokenizer, chunk_size, chunk_overlap)
    nodes = [n for n in splitter.get_nodes_from_documents(documents, show_progress=progress) if n.get_content().strip()]
    if dim is None:
        dim = len(embed_model.get_text_embedding("dimension probe"))
    vector_store = FaissVectorStore(faiss_index=faiss.IndexFlatIP(dim))
    storage = StorageContext.from_defaults(vector_store=vector_store)
    index = VectorStoreIndex(nodes, storage_context=storage, embed_model=embed_model, show_progress=progress)
    _persist_once(index, persist_dir)
    return IndexInfo(index, persist_dir, True, len(nodes), time.perf_counter() - start)


def _persist_once(index: "VectorStoreIndex", persist_dir: Path) -> None:
    """Persist ``index`` into a temporary folder of this process, then rename it to ``persist_dir``
    (atomic); if another process got there first, keep theirs (the same index)."""
    tmp = persist_dir.with_name(f"{persist_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        index.storage_context.persist(persist_dir=str(tmp))
        tmp.rename(persist_dir)
    except OSError:
        if not persist_dir.is_dir():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class ModelInfo:
    model: "GMSAModel"
    trained: bool
    source: str
    seconds: float


def model_config(checkpoint: str | Path | None = None) -> tuple[Path | None, "GMSAConfig"]:
    """The checkpoint :func:`load_gmsa_model` loads for ``checkpoint`` (``None``: no checkpoint, an
    untrained compressor) and its config, read without loading any weights (to check arguments first).

    Raises:
        CheckpointError: ``checkpoint`` is not a readable GMSA checkpoint.
    """
    from .checkpoint import default_checkpoint, read_record
    from .config import GMSAConfig

    path = Path(checkpoint).expanduser() if checkpoint is not None else default_checkpoint()
    return path, GMSAConfig.from_dict(read_record(path)["config"]) if path is not None else GMSAConfig()


def load_gmsa_model(checkpoint: str | Path | None = None, device: str = "cpu") -> ModelInfo:
    """The GMSA model of ``checkpoint``, else the bundled default checkpoint, else an *untrained*
    compressor on SmolLM2 (seeded, so that its soft tokens, fingerprint and cache entries are stable)."""
    import torch

    from .config import GMSAConfig
    from .model import GMSAModel

    start = time.perf_counter()
    path, _ = model_config(checkpoint)
    if path is not None:
        model = GMSAModel.from_pretrained(path, device=device)
        return ModelInfo(model.eval(), True, str(path), time.perf_counter() - start)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = GMSAModel.from_base(GMSAConfig(), device=device)
    finally:
        torch.random.set_rng_state(state)
    return ModelInfo(model.eval(), False, "untrained compressor on smollm2 (no checkpoint)", time.perf_counter() - start)


def make_query_engine(
    index: "VectorStoreIndex",
    model: "GMSAModel",
    rate: int = 4,
    top_k: int = 3,
    cache: Any = None,
    passthrough: bool = False,
    response_mode: str = "compact",
    streaming: bool = False,
    max_new_tokens: int = 32,
    llm: Any = None,
    extractive: bool = False,
    extract_top: int = 0,
    extract_penalty: float = float("inf"),
    rerank_top: int | None = None,
    confident_margin: float | None = None,
    lead_rate: int | None = None,
) -> tuple[Any, Any, Any]:
    """(query engine, GMSACompressor, GMSALLM) over ``index``; ``passthrough`` gives the uncompressed
    baseline (same retrieval, same LLM, same prompt builder, raw text instead of soft tokens); ``extractive``:
    answers are spans of the retrieved chunks (``GMSALLM(extractive=True)``), with ``extract_top`` of only the chunks
    of best BM25 match to the question, and ``extract_penalty`` nats lost by a token that continues no span instead
    of forbidding it (``inf``); ``rerank_top``: of the ``top_k`` retrieved chunks, only the ``rerank_top``
    of best BM25 match reach the compressor and the LLM (``GMSACompressor(top_n=)``; ``None``: as many as the
    checkpoint's stage 2 trained on, ``0``: all); ``confident_margin``: only the best match where its BM25 score leads
    the next by more than this (``GMSACompressor(confident_margin=)``); ``lead_rate``: the best-ranked chunk at this
    rate, the others at ``rate`` (``GMSACompressor(lead_rate=)``)."""
    from llama_index.llms.gmsa import GMSALLM, gmsa_query_engine_kwargs
    from llama_index.postprocessor.gmsa import GMSACompressor

    llm = llm or GMSALLM(model, max_new_tokens=max_new_tokens, extractive=extractive, extract_top=extract_top,
                         extract_penalty=extract_penalty)
    compressor = GMSACompressor(model, rate=rate, cache=cache, store=llm.store, passthrough=passthrough,
                                top_n=rerank_top, confident_margin=confident_margin, lead_rate=lead_rate)
    engine = index.as_query_engine(
        llm=llm,
        similarity_top_k=top_k,
        node_postprocessors=[compressor],
        response_mode=response_mode,
        streaming=streaming,
        **gmsa_query_engine_kwargs(),
    )
    return engine, compressor, llm


def source_label(node_with_score: Any, words: int = 12) -> str:
    """``[score] file — first words…`` for one retrieved node (compressed or not)."""
    from llama_index.postprocessor.gmsa import original_text

    node = node_with_score.node
    text = " ".join(original_text(node).split())
    head = " ".join(text.split()[:words])
    if len(text.split()) > words:
        head += " …"
    name = node.metadata.get("file_path") or node.metadata.get("file_name") or node.node_id[:8]
    score = f"{node_with_score.score:.3f}" if node_with_score.score is not None else "  -  "
    return f"[{score}] {name} — {head}"


def example_questions(path: str | Path | None = None) -> list[dict]:
    """The questions bundled with the demo documents (``examples/questions.jsonl``)."""
    path = Path(path) if path is not None else REPO_ROOT / "examples" / "questions.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


__all__: Sequence[str] = [
    "EMBED_DIM",
    "IndexInfo",
    "ModelInfo",
    "build_or_load_index",
    "bundled_docs_dir",
    "example_questions",
    "hash_embedding",
    "index_signature",
    "is_binary",
    "load_documents",
    "load_embed_model",
    "load_gmsa_model",
    "make_query_engine",
    "model_config",
    "source_label",
]
