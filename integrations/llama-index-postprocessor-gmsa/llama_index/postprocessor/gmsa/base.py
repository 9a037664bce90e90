"""GMSACompressor: a LlamaIndex node postprocessor that compresses retrieved chunks into GMSA soft tokens.

Each retrieved node's text is compressed (or fetched from the soft-token cache), its soft tokens are put
into a :class:`gmsa_rag.markers.SoftTokenStore` shared with ``GMSALLM``, and the node handed on is a
*copy* whose text is the marker ``<gmsa:{key}>``. The original text stays in the copy's metadata
(``gmsa_original_text``, hidden from the LLM and the embedder) so that sources can still be shown.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import asdict, dataclass
from typing import Any, List, Optional

from llama_index.core.bridge.pydantic import ConfigDict, Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

from gmsa_rag.cache import SoftTokenCache, cache_key
from gmsa_rag.lexical import DOCUMENT_ORDERS, bm25_scores, kept_places, lead_place
from gmsa_rag.markers import SoftTokenStore, marker, store_for, text_key

logger = logging.getLogger(__name__)

ORIGINAL_TEXT_KEY = "gmsa_original_text"
KEY_KEY = "gmsa_key"
RATE_KEY = "gmsa_rate"
SOFT_TOKENS_KEY = "gmsa_soft_tokens"
_OWN_KEYS = (ORIGINAL_TEXT_KEY, KEY_KEY, RATE_KEY, SOFT_TOKENS_KEY)


@dataclass
class CompressionStats:
    """What one postprocess call did (``GMSACompressor.last_stats``)."""

    nodes: int = 0
    """Text nodes handled (others pass through unchanged)."""
    memory_hits: int = 0
    """Soft tokens already in the shared in-memory store."""
    disk_hits: int = 0
    """Read (and checksummed) from the on-disk :class:`~gmsa_rag.cache.SoftTokenCache`; a corrupt entry
    counts as ``computed``."""
    computed: int = 0
    """Compressed now (distinct chunks)."""
    soft_tokens: int = 0
    """Soft tokens handed to the LLM (0 with ``passthrough``)."""
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def best_matching_nodes(nodes: List[NodeWithScore], query: str, top_n: int, best_last: bool = False,
                        confident_margin: Optional[float] = None) -> List[NodeWithScore]:
    """The ``top_n`` (0: all) of ``nodes`` whose chunk text matches ``query`` best by BM25 (the nodes themselves the
    collection), best first or with ``best_last`` best last, each scored with its BM25 score; with
    ``confident_margin`` only the best where it leads the next by more than that (``gmsa_rag.lexical.kept_places``)."""
    scores = bm25_scores(query, [original_text(n) for n in nodes])
    return [NodeWithScore(node=nodes[i].node, score=scores[i])
            for i in kept_places(scores, top_n, best_last, confident_margin)]


def original_text(node: Any) -> str:
    """The chunk text behind a (possibly compressed) node, for showing sources."""
    inner = getattr(node, "node", node)
    meta = getattr(inner, "metadata", None) or {}
    if ORIGINAL_TEXT_KEY in meta:
        return meta[ORIGINAL_TEXT_KEY]
    return inner.get_content(metadata_mode=MetadataMode.NONE)


class GMSACompressor(BaseNodePostprocessor):
    """Replace retrieved nodes' text by references to their GMSA soft tokens.

    Args:
        model: a :class:`gmsa_rag.GMSAModel` (not serialised).
        rate: compression rate, one of ``model.config.rates``.
        cache: optional :class:`gmsa_rag.cache.SoftTokenCache`; chunks compressed once are reused by every
            later query and process (``python -m gmsa_rag.cache build`` can fill it ahead of time).
        store: the in-memory store shared with ``GMSALLM``; default: the one owned by ``model``
            (:func:`gmsa_rag.markers.store_for`), which a ``GMSALLM`` on the same model uses too.
        batch_size: chunks per ``model.compress`` call.
        passthrough: do not compress: the marker stands for the raw chunk text. With the same LLM this
            is the uncompressed baseline read through the very same prompt builder.
        top_n: of more retrieved nodes, hand on only the ``top_n`` of best BM25 match to the query, best first
            (as :class:`BM25Rerank` does; without a query, the first ``top_n`` in the order given). ``None``
            (default): as many as the checkpoint's stage 2 trained its reader on
            (``GMSAModel.trained_max_documents()``; all when the checkpoint does not say), since a reader trained
            on one document answers far worse over several (the model card). ``0``: all of them.
        document_order: the order of the nodes handed on: ``bm25_first`` (best BM25 match to the query first),
            ``bm25_last`` (best last, nearest the question) or ``given`` (as retrieved; with ``top_n``, best first).
            ``None`` (default): the order the checkpoint's stage 2 trained its reader on
            (``GMSAModel.trained_document_order()``), since a reader trained on ranked documents leans on their order.
        confident_margin: hand on only the best BM25 match where its score leads the next by more than this
            (``gmsa_rag.lexical.lead``); ``None`` (default): off. Round 27 chose 0.57 on qa-multidoc dev for five
            retrieved documents (held-out NQ dev at 4x: see ``benchmarks/results/README.md``); BM25 scores depend on
            the documents compared, so another ``similarity_top_k`` may want another margin.
        lead_rate: the compression rate of the best-ranked node handed on (first, or last with ``bm25_last``), the
            others at ``rate``: decoder positions spent where the answer most often is. ``None`` (default): every
            node at ``rate``. E.g. ``rate=8, lead_rate=2`` (round 29, held-out NQ dev: see the results README).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = Field(exclude=True, description="gmsa_rag.GMSAModel that compresses the chunks")
    cache: Optional[Any] = Field(default=None, exclude=True, description="optional SoftTokenCache")
    store: Any = Field(default=None, exclude=True, description="SoftTokenStore shared with GMSALLM")
    rate: int = Field(default=4, description="compression rate (one of the model's rates)")
    batch_size: int = Field(default=8, ge=1, description="chunks per compress call")
    passthrough: bool = Field(default=False, description="hand over raw text instead of soft tokens")
    top_n: Optional[int] = Field(default=None, ge=0, description="nodes handed on, best BM25 match first (None: as "
                                 "many as the checkpoint's stage 2 trained on; 0: all)")
    document_order: Optional[str] = Field(default=None, description="order of the nodes handed on: bm25_first, "
                                          "bm25_last or given (None: the checkpoint's trained order)")
    confident_margin: Optional[float] = Field(default=None, ge=0, description="hand on only the best BM25 match "
                                              "where its score leads the next by more than this (None: off)")
    lead_rate: Optional[int] = Field(default=None, description="compression rate of the best-ranked node handed on "
                                     "(None: rate, as every other node)")

    _last_stats: CompressionStats = PrivateAttr(default_factory=CompressionStats)

    def __init__(
        self,
        model: Any,
        rate: int = 4,
        cache: Optional[SoftTokenCache] = None,
        store: Optional[SoftTokenStore] = None,
        batch_size: int = 8,
        passthrough: bool = False,
        top_n: Optional[int] = None,
        document_order: Optional[str] = None,
        confident_margin: Optional[float] = None,
        lead_rate: Optional[int] = None,
        **kwargs: Any,
    ) -> None:
        if not passthrough:
            model.config.check_rate(rate)
            if lead_rate is not None:
                model.config.check_rate(lead_rate)
        if document_order is not None and document_order not in DOCUMENT_ORDERS:
            raise ValueError(f"document_order must be one of {', '.join(DOCUMENT_ORDERS)} or None; got {document_order!r}")
        if cache is not None and not isinstance(cache, SoftTokenCache):
            raise TypeError(f"cache must be a gmsa_rag.cache.SoftTokenCache, got {type(cache).__name__}")
        super().__init__(
            model=model,
            rate=rate,
            cache=cache,
            store=store if store is not None else store_for(model),
            batch_size=batch_size,
            passthrough=passthrough,
            top_n=top_n,
            document_order=document_order,
            confident_margin=confident_margin,
            lead_rate=lead_rate,
            **kwargs,
        )

    @classmethod
    def class_name(cls) -> str:
        return "GMSACompressor"

    @property
    def documents_kept(self) -> int:
        """How many retrieved nodes each query hands on (0: all): ``top_n``, or the checkpoint's trained shape."""
        if self.top_n is not None:
            return self.top_n
        return self.model.trained_max_documents() or 0

    @property
    def documents_order(self) -> str:
        """The order of the nodes each query hands on: ``document_order``, or the checkpoint's trained order."""
        return self.document_order or self.model.trained_document_order()

    def _rerank(self, nodes: List[NodeWithScore], query_bundle: Optional[QueryBundle]) -> List[NodeWithScore]:
        """The nodes handed on: as many as :attr:`documents_kept`, in :attr:`documents_order` (a ``given`` order that
        drops some or keeps a confident best is the reranker's, best first), each scored with its BM25 score."""
        keep, order = self.documents_kept, self.documents_order
        if query_bundle is None:
            return list(nodes[:keep] if keep else nodes)
        if order == "given" and self.confident_margin is None and (not keep or len(nodes) <= keep):
            return list(nodes)
        return best_matching_nodes(list(nodes), query_bundle.query_str, keep, order == "bm25_last",
                                   self.confident_margin)

    @property
    def last_stats(self) -> CompressionStats:
        """Counts and time of the latest postprocess call."""
        return self._last_stats

    # ------------------------------------------------------------------ soft tokens
    def _fetch(self, texts: list[str], rates: list[int], stats: CompressionStats) -> list[str]:
        """Make sure every text's document is in the store at its rate; return their keys (input order)."""
        if self.passthrough:
            keys = [text_key(t) for t in texts]
            for k, t in zip(keys, texts):
                self.store.put(k, t)
            return keys
        fingerprint = self.model.fingerprint
        keys = [cache_key(t, fingerprint, r) for t, r in zip(texts, rates)]
        missing: dict[int, dict[str, str]] = {}  # rate -> key -> text
        for k, t, r in zip(keys, texts, rates):
            if k in self.store:
                stats.memory_hits += 1
            else:
                missing.setdefault(r, {})[k] = t
        for rate, pending in missing.items():
            miss_keys, miss_texts = list(pending), list(pending.values())
            if self.cache is not None:
                found = self.cache.lookup(miss_texts, rate, fingerprint, self.model.compress, batch_size=self.batch_size)
                tensors = found.tensors
                stats.disk_hits, stats.computed = stats.disk_hits + found.hits, stats.computed + found.computed
            else:
                tensors = self.model.compress(miss_texts, rate, batch_size=self.batch_size)
                stats.computed += len(miss_keys)
            self.store.put_many(zip(miss_keys, tensors))
        for k, t in zip(keys, texts):  # what each was made from: GMSALLM(extractive=True) quotes it
            self.store.put_source(k, t)
        return keys

    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        start = time.perf_counter()
        stats = CompressionStats()
        nodes = self._rerank(nodes, query_bundle)
        todo = [
            i
            for i, n in enumerate(nodes)
            if isinstance(n.node, TextNode) and n.node.get_content(metadata_mode=MetadataMode.NONE).strip()
        ]
        texts = [nodes[i].node.get_content(metadata_mode=MetadataMode.NONE) for i in todo]
        lead = lead_place(len(nodes), self.documents_order)  # the best-ranked node handed on
        rates = [self.lead_rate if self.lead_rate is not None and i == lead else self.rate for i in todo]
        keys = self._fetch(texts, rates, stats) if texts else []
        out = list(nodes)
        for i, text, key, rate in zip(todo, texts, keys, rates):
            doc = self.store.get(key)
            size = int(doc.shape[0]) if doc is not None and not isinstance(doc, str) else 0
            stats.soft_tokens += size
            out[i] = NodeWithScore(node=self._replace(nodes[i].node, text, key, size, rate), score=nodes[i].score)
        stats.nodes = len(todo)
        stats.seconds = time.perf_counter() - start
        self._last_stats = stats
        logger.debug("GMSACompressor: %s", stats)
        return out

    async def _apostprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        # Compression is CPU/GPU-bound torch work: run it off the event loop.
        return await asyncio.to_thread(self._postprocess_nodes, nodes, query_bundle)

    def _replace(self, node: TextNode, text: str, key: str, size: int, rate: int) -> TextNode:
        """A copy of ``node`` whose text is the marker; the docstore's node is left untouched."""
        metadata = {k: v for k, v in node.metadata.items() if k not in _OWN_KEYS}
        metadata.update({ORIGINAL_TEXT_KEY: text, KEY_KEY: key})
        if not self.passthrough:
            metadata.update({RATE_KEY: rate, SOFT_TOKENS_KEY: size})
        # The LLM must see the marker alone (the soft tokens stand for the chunk text, not its metadata);
        # the embedder must never see the original text twice.
        excluded_embed = list(dict.fromkeys([*node.excluded_embed_metadata_keys, *_OWN_KEYS]))
        return node.model_copy(
            update={
                "text": marker(key),
                "metadata": metadata,
                "excluded_llm_metadata_keys": list(metadata),
                "excluded_embed_metadata_keys": excluded_embed,
                "relationships": dict(node.relationships),
            }
        )
