"""Soft-token cache: compress each chunk once, reuse its soft tokens for every query.

See docs/cache.md.
"""

from .precompute import (
    DEFAULT_CHUNK_OVERLAP,
    DEFAULT_CHUNK_SIZE,
    PrecomputeReport,
    chunk_documents,
    collect_chunks,
    load_folder,
    make_splitter,
    precompute,
)
from .store import (
    CacheCorruptionError,
    CacheStats,
    SoftTokenCache,
    cache_key,
    default_cache_dir,
)

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "CacheCorruptionError",
    "CacheStats",
    "PrecomputeReport",
    "SoftTokenCache",
    "cache_key",
    "chunk_documents",
    "collect_chunks",
    "default_cache_dir",
    "load_folder",
    "make_splitter",
    "precompute",
]
