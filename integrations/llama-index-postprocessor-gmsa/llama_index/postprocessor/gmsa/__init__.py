"""GMSA soft-token compression of retrieved nodes for LlamaIndex."""
from llama_index.postprocessor.gmsa.base import CompressionStats, GMSACompressor, original_text

__all__ = ["CompressionStats", "GMSACompressor", "original_text"]
