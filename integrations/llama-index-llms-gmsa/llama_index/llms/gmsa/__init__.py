"""LlamaIndex LLM that answers from GMSA soft tokens (markers placed by GMSACompressor)."""
from gmsa_rag.markers import GMSAPromptError, UnknownMarkerError
from llama_index.llms.gmsa.base import (
    GMSALLM,
    ContextWindowError,
    GenerationStats,
    gmsa_prompt_templates,
    gmsa_query_engine_kwargs,
)

__all__ = [
    "GMSALLM",
    "ContextWindowError",
    "GMSAPromptError",
    "GenerationStats",
    "UnknownMarkerError",
    "gmsa_prompt_templates",
    "gmsa_query_engine_kwargs",
]
