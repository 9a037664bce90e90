"""gmsa_rag: GMSA context compression (Group Merging + Layer Semantic Alignment) for RAG.

Data flow: documents -> chunks -> encoder -> group merge -> LSA -> soft tokens -> cache -> prompt -> decoder.

``GMSAConfig`` and ``GMSAModel`` are imported on first use, so that the command-line tools and the cache
answer ``--help`` and ``stats`` without importing torch and peft.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import GMSAConfig
    from .model import GMSAModel

__all__ = ["GMSAConfig", "GMSAModel"]
__version__ = "0.1.0"

_LAZY = {"GMSAConfig": ".config", "GMSAModel": ".model"}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
