"""BM25Rerank: keep the retrieved chunks that share the question's words best.

Dense retrieval returns chunks about the same thing; among them, the one that holds the answer most often also
shares the question's rarer words (measured on held-out NQ questions among MiniLM's hardest distractors: BM25 over a
question's five chunks puts the answer's passage first 84.5% of the time; ``benchmarks/results/README.md``, round 15).
``GMSACompressor`` keeps the best-matching nodes the same way by itself (its ``top_n``); this postprocessor does it
anywhere else in a pipeline.
"""
from __future__ import annotations

from typing import List, Optional

from llama_index.core.bridge.pydantic import Field
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from .base import best_matching_nodes


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
        return best_matching_nodes(nodes, query_bundle.query_str, self.top_n)
