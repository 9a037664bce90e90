"""gmsa_rag: GMSA context compression (Group Merging + Layer Semantic Alignment) for RAG.

Data flow: documents -> chunks -> encoder -> group merge -> LSA -> soft tokens -> cache -> prompt -> decoder.
"""
from .config import GMSAConfig
from .model import GMSAModel

__all__ = ["GMSAConfig", "GMSAModel"]
__version__ = "0.1.0"
