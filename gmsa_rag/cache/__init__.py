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
    precompute_rates,
)
from .store import (
    CacheCorruptionError,
    CacheDatabaseError,
    CacheStats,
    Lookup,
    SoftTokenCache,
    cache_is_writable,
    cache_key,
    check_cache_dir,
    default_cache_dir,
    remove_cache_files,
)

__all__ = [
    "DEFAULT_CHUNK_OVERLAP",
    "DEFAULT_CHUNK_SIZE",
    "CacheCorruptionError",
    "CacheDatabaseError",
    "CacheStats",
    "Lookup",
    "PrecomputeReport",
    "SoftTokenCache",
    "cache_is_writable",
    "cache_key",
    "check_cache_dir",
    "chunk_documents",
    "collect_chunks",
    "default_cache_dir",
    "load_folder",
    "make_splitter",
    "precompute",
    "precompute_rates",
    "remove_cache_files",
]
