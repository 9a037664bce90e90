"""BM25Rerank: keep the retrieved chunks that share the question's words best.

Dense retrieval returns chunks about the same thing; among them, the one that holds the answer most often also
shares the question's rarer words (measured on held-out NQ questions among MiniLM's hardest distractors: BM25 over a
question's five chunks puts the answer's passage first 84.5% of the time; ``benchmarks/results/README.md``, round 15).
Placed before ``GMSACompressor``, it also spares compressing the chunks it drops.
"""
from __future__ import annotations

from typing import List, Optional

from llama_index.core.bridge.pydantic import Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from gmsa_rag.lexical import best_first, bm25_scores

from .base import original_text


class BM25Rerank(BaseNodePostprocessor):
    """Rerank retrieved nodes by BM25 against the query (the nodes themselves the collection) and keep ``top_n``,
    best first, each scored with its BM25 score."""

    top_n: int = Field(default=1, ge=1, description="nodes kept")

    @classmethod
    def class_name(cls) -> str:
        return "BM25Rerank"

    def _postprocess_nodes(
        self,
        nodes: List[NodeWithScore],
        query_bundle: Optional[QueryBundle] = None,
    ) -> List[NodeWithScore]:
        if query_bundle is None:
            raise ValueError("BM25Rerank needs the query: call it with a query bundle (query engines do)")
        texts = [original_text(n) for n in nodes]
        scores = bm25_scores(query_bundle.query_str, texts)
        return [NodeWithScore(node=nodes[i].node, score=scores[i]) for i in best_first(scores)[: self.top_n]]
