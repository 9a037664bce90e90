"""GMSA soft-token compression of retrieved nodes for LlamaIndex (and a lexical reranker to put before it)."""
from llama_index.postprocessor.gmsa.base import CompressionStats, GMSACompressor, original_text
from llama_index.postprocessor.gmsa.rerank import BM25Rerank

__all__ = ["BM25Rerank", "CompressionStats", "GMSACompressor", "original_text"]
