"""On-disk cache of GMSA soft tokens, keyed by (chunk text, model fingerprint, rate).

Storage format of one entry (raw bytes; nothing is ever pickled)::

    b"GMSAST" | u8 format version | u32 LE header length | JSON header | safetensors payload

The JSON header holds the cache key, the payload's sha256, its length, and the tensor's shape and
dtype.  Every read checks all of them; an entry that fails any check is deleted, logged and reported
as a miss, never returned as data.

The backend is :class:`diskcache.Cache` (SQLite + files), which is safe to share between threads and
between processes (each process opens its own connection; forking is handled by diskcache). A cache
opened with ``readonly=True`` reads the same files through a read-only SQLite connection and writes
nothing (stats of any cache, lookups in a cache this process may not write).

torch and safetensors are imported when a tensor is first encoded or decoded, so that opening a cache
for its statistics stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import diskcache

if TYPE_CHECKING:
    import torch

    CompressFn = Callable[[list[str], int], Sequence[torch.Tensor]]

__all__ = [
    "CacheCorruptionError",
    "CacheDatabaseError",
    "CacheStats",
    "DEFAULT_EVICTION_POLICY",
    "DEFAULT_SIZE_LIMIT",
    "FORMAT_VERSION",
    "KEY_SCHEME",
    "Lookup",
    "SoftTokenCache",
    "cache_is_writable",
    "cache_key",
    "check_cache_dir",
    "decode_entry",
    "default_cache_dir",
    "encode_entry",
    "remove_cache_files",
]

logger = logging.getLogger(__name__)

#: Version of the value format (header layout); bump when it changes.
FORMAT_VERSION = 1
#: Prefix mixed into every key; bump when the key derivation changes.
KEY_SCHEME = "gmsa_rag.soft_tokens.v1"
#: Default size limit for a newly created cache (an existing cache keeps its stored setting).
DEFAULT_SIZE_LIMIT = 8 * 2**30
#: Default eviction policy for a newly created cache.
DEFAULT_EVICTION_POLICY = "least-recently-used"

_MAGIC = b"GMSAST"
_PREFIX = struct.Struct("<6sBI")  # magic, version, header length
_TENSOR_NAME = "soft_tokens"
_MAX_HEADER = 1 << 16
_DBNAME = diskcache.core.DBNAME
_VALUE_DIRS = "[0-9a-f][0-9a-f]/[0-9a-f][0-9a-f]"  # diskcache's value files: <2 hex>/<2 hex>/<hex>.val


class CacheCorruptionError(ValueError):
    """A stored entry failed validation (bad magic, checksum, shape, dtype or key)."""


class CacheDatabaseError(RuntimeError):
    """The cache as a whole cannot be used: its SQLite database is damaged, or this process may not
    write the folder. ``damaged`` tells which; the message names the folder and the fix."""

    def __init__(self, directory: str | os.PathLike, reason: str, damaged: bool) -> None:
        self.directory, self.damaged = Path(directory), damaged
        if damaged:
            problem = "is damaged"
            fix = (f"delete it with `python -m gmsa_rag.cache clear --force --yes --cache-dir {directory}` "
                   "(or remove the folder); its soft tokens are recomputed when needed")
        else:
            problem = "cannot be written"
            fix = (f"make {directory} writable, or pass --cache-dir with a writable folder "
                   "(`stats` and `gmsa-rag ask` can read it as it is)")
        super().__init__(f"soft-token cache {directory} {problem} ({reason}): {fix}")


@contextlib.contextmanager
def _database_errors(directory: str | os.PathLike) -> Iterator[None]:
    """Turn SQLite errors into :class:`CacheDatabaseError` naming ``directory``."""
    try:
        yield
    except sqlite3.Error as exc:
        raise CacheDatabaseError(directory, str(exc), damaged=not _is_access_error(exc)) from exc


def _is_access_error(exc: sqlite3.Error) -> bool:
    """SQLite could not open, write or lock the database (as opposed to finding it damaged)."""
    access = ("unable to open", "readonly", "locked", "permission")
    return isinstance(exc, sqlite3.OperationalError) and any(word in str(exc) for word in access)


def cache_is_writable(directory: str | os.PathLike) -> bool:
    """Whether this process may write the cache in ``directory`` (or create it there)."""
    path = Path(directory).expanduser()
    db = path / _DBNAME
    if db.exists():
        return os.access(db, os.W_OK) and os.access(path, os.W_OK)
    existing = next(p for p in (path, *path.parents) if p.exists())
    return existing.is_dir() and os.access(existing, os.W_OK)


def check_cache_dir(directory: str | os.PathLike | None, must_exist: bool = False) -> Path:
    """The cache folder ``directory`` (``None`` -> :func:`default_cache_dir`), checked for the mistakes a
    command line makes: a file, the layout of an older ``gmsa-rag ask --cache-dir``, or (with
    ``must_exist``) no cache at all. Raises ``NotADirectoryError``, ``ValueError``, ``FileNotFoundError``."""
    path = Path(directory).expanduser() if directory is not None else default_cache_dir()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"--cache-dir {path} is a file, not a folder: pass the soft-token cache folder")
    old = path / "soft_tokens"
    if not (path / _DBNAME).exists() and (old / _DBNAME).exists():
        raise ValueError(f"{path} has the layout of an older `gmsa-rag ask --cache-dir` (soft_tokens/ inside): "
                         f"pass --cache-dir {old}")
    if must_exist and not (path / _DBNAME).is_file():
        raise FileNotFoundError(f"no soft-token cache at {path} (no {_DBNAME}): fix the path, or build one with "
                                f"`python -m gmsa_rag.cache build --cache-dir {path} --source DIR --rate 4`")
    return path


def remove_cache_files(directory: str | os.PathLike) -> int:
    """Delete a cache's database and value files, whatever state they are in (other files in the folder
    are left alone); return how many files were removed."""
    path = Path(directory).expanduser()
    database = [path / f"{_DBNAME}{suffix}" for suffix in ("", "-wal", "-shm")]
    files = [*(f for f in database if f.exists()), *path.glob(f"{_VALUE_DIRS}/*.val")]
    for file in files:
        file.unlink()
    for folder in [*path.glob(_VALUE_DIRS), *path.glob(_VALUE_DIRS.split("/")[0])]:
        with contextlib.suppress(OSError):  # not empty: holds something that is not ours
            folder.rmdir()
    return len(files)


def _stored_settings(db: Path) -> dict[str, object]:
    """The size limit and eviction policy a cache database holds ({} for none yet; damage is left to diskcache)."""
    if not db.is_file():
        return {}
    try:
        with contextlib.closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True, timeout=60)) as con:
            return dict(con.execute("SELECT key, value FROM Settings WHERE key IN ('size_limit', 'eviction_policy')"))
    except sqlite3.Error:  # (no Settings table yet, or a damaged file)
        return {}


def default_cache_dir() -> Path:
    """Default cache directory: ``$GMSA_RAG_CACHE_DIR``, else ``$XDG_CACHE_HOME/gmsa_rag/soft_tokens``
    (``~/.cache/gmsa_rag/soft_tokens`` when XDG_CACHE_HOME is unset)."""
    env = os.environ.get("GMSA_RAG_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "gmsa_rag" / "soft_tokens"


def _check_rate(rate: int) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int) or rate < 1:
        raise ValueError(f"rate must be a positive int, got {rate!r}")
    return rate


def cache_key(text: str, fingerprint: str, rate: int) -> str:
    """sha256 hex key of (chunk text, model fingerprint, compression rate).

    The text is used exactly as given (no normalisation): key on the very string you compress,
    e.g. ``node.get_content()`` of a retrieved LlamaIndex node.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ValueError("fingerprint must be a non-empty str identifying the model")
    _check_rate(rate)
    payload = json.dumps([KEY_SCHEME, fingerprint, rate, text], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def _check_tensor(tensor: object, what: str = "value") -> torch.Tensor:
    import torch

    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2 or tensor.shape[0] < 1:
        raise ValueError(f"{what} must have shape [m >= 1, hidden], got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{what} must be a floating-point tensor, got {tensor.dtype}")
    return tensor


def encode_entry(key: str, tensor: torch.Tensor) -> bytes:
    """Serialise ``tensor`` (moved to CPU) into the checksummed entry format."""
    from safetensors.torch import save as _st_save

    t = _check_tensor(tensor).detach().to("cpu").contiguous()
    payload = _st_save({_TENSOR_NAME: t}, metadata={"key": key})
    header = json.dumps(
        {
            "key": key,
            "sha256": hashlib.sha256(payload).hexdigest(),
            "nbytes": len(payload),
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
        },
        separators=(",", ":"),
    ).encode("utf-8")
    return _PREFIX.pack(_MAGIC, FORMAT_VERSION, len(header)) + header + payload


def decode_entry(blob: bytes, key: str | None = None) -> torch.Tensor:
    """Validate and deserialise an entry; raise :class:`CacheCorruptionError` on any mismatch."""
    from safetensors.torch import load as _st_load

    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CacheCorruptionError(f"stored value is {type(blob).__name__}, not bytes")
    blob = bytes(blob)
    if len(blob) < _PREFIX.size:
        raise CacheCorruptionError("entry shorter than its prefix")
    magic, version, hlen = _PREFIX.unpack_from(blob)
    if magic != _MAGIC:
        raise CacheCorruptionError("bad magic")
    if version != FORMAT_VERSION:
        raise CacheCorruptionError(f"unsupported format version {version}")
    if hlen > _MAX_HEADER or _PREFIX.size + hlen > len(blob):
        raise CacheCorruptionError("bad header length")
    try:
        header = json.loads(blob[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
        want_sha, nbytes = str(header["sha256"]), int(header["nbytes"])
        shape, dtype, stored_key = list(header["shape"]), str(header["dtype"]), header["key"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CacheCorruptionError(f"unreadable header: {exc}") from None
    if key is not None and stored_key != key:
        raise CacheCorruptionError("entry stored under a different key")
    payload = blob[_PREFIX.size + hlen :]
    if len(payload) != nbytes:
        raise CacheCorruptionError(f"payload is {len(payload)} bytes, header says {nbytes}")
    if hashlib.sha256(payload).hexdigest() != want_sha:
        raise CacheCorruptionError("checksum mismatch")
    try:
        tensor = _st_load(payload)[_TENSOR_NAME]
    except Exception as exc:  # safetensors raises its own error types
        raise CacheCorruptionError(f"unreadable safetensors payload: {exc}") from None
    if list(tensor.shape) != shape or str(tensor.dtype).removeprefix("torch.") != dtype:
        raise CacheCorruptionError("tensor shape/dtype differ from header")
    return tensor


class _BytesOnlyDisk(diskcache.Disk):
    """diskcache Disk that stores only ``bytes`` and refuses to unpickle anything it reads."""

    def store(self, value, read, key=diskcache.core.UNKNOWN):  # type: ignore[override]
        if read or type(value) is not bytes:
            raise TypeError("SoftTokenCache stores raw bytes only")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):  # type: ignore[override]
        if mode == diskcache.core.MODE_PICKLE:
            raise CacheCorruptionError("entry is pickled; refusing to unpickle it")
        return super().fetch(mode, filename, value, read)


class _ReadOnlyBackend:
    """The part of :class:`diskcache.Cache` that :class:`SoftTokenCache` reads, over a read-only SQLite
    connection: nothing is created, written or counted. Values are read by diskcache's own ``Disk``.
    A folder without a database reads as an empty cache. Threads share the connection, one at a time;
    after :meth:`close` the next read reconnects."""

    def __init__(self, directory: str, timeout: float) -> None:
        self.directory = directory
        self._db = Path(directory, _DBNAME)
        self._timeout = timeout
        self._disk = _BytesOnlyDisk(directory)
        self._lock = threading.Lock()
        self._con: sqlite3.Connection | None = None
        self._settings = {"size_limit": DEFAULT_SIZE_LIMIT, "eviction_policy": DEFAULT_EVICTION_POLICY}
        con = self._connection()
        if con is not None:
            self._settings.update(con.execute("SELECT key, value FROM Settings"))

    def _connection(self) -> sqlite3.Connection | None:
        if self._con is None and self._db.is_file():
            # Without write access SQLite cannot make the WAL index; `immutable` reads the file as it is.
            flags = "mode=ro" if os.access(self.directory, os.W_OK) else "mode=ro&immutable=1"
            self._con = sqlite3.connect(f"{self._db.as_uri()}?{flags}", uri=True, timeout=self._timeout,
                                        isolation_level=None, check_same_thread=False)
        return self._con

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        with self._lock:
            con = self._connection()
            return None if con is None else con.execute(sql, params).fetchone()

    def get(self, key: str) -> bytes | None:
        row = self._one("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1"
                        " AND (expire_time IS NULL OR expire_time > ?)", (key, time.time()))
        return None if row is None else self._disk.fetch(*row, False)

    def __contains__(self, key: str) -> bool:
        return self._one("SELECT 1 FROM Cache WHERE key = ? AND raw = 1"
                         " AND (expire_time IS NULL OR expire_time > ?)", (key, time.time())) is not None

    def __len__(self) -> int:
        row = self._one("SELECT value FROM Settings WHERE key = 'count'")
        return int(row[0]) if row else 0

    def volume(self) -> int:
        size = self._one("SELECT value FROM Settings WHERE key = 'size'")
        if size is None:
            return 0
        (pages,), (page_size,) = self._one("PRAGMA page_count"), self._one("PRAGMA page_size")
        return pages * page_size + size[0]

    @property
    def size_limit(self) -> int:
        return int(self._settings["size_limit"])

    @property
    def eviction_policy(self) -> str:
        return str(self._settings["eviction_policy"])

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None


@dataclass(frozen=True)
class CacheStats:
    """Snapshot of a cache. ``hits``/``misses``/``corrupt_dropped`` count this process's calls on
    this :class:`SoftTokenCache` object only; ``entries`` and ``bytes_on_disk`` are global."""

    directory: str
    entries: int
    bytes_on_disk: int
    size_limit: int
    eviction_policy: str
    hits: int
    misses: int
    corrupt_dropped: int
    puts: int

    def as_dict(self) -> dict:
        """Plain-dict form (for JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class Lookup:
    """What :meth:`SoftTokenCache.lookup` found: the soft tokens in input order, how many distinct texts
    were read valid from the cache, and how many were compressed now (a corrupt entry counts there)."""

    tensors: list[torch.Tensor]
    hits: int
    computed: int


class SoftTokenCache:
    """Process-safe on-disk cache mapping :func:`cache_key` strings to soft-token tensors.

    Args:
        directory: cache folder (created if needed); ``None`` -> :func:`default_cache_dir`.
        size_limit: max bytes before diskcache evicts entries. ``None`` keeps the setting stored in
            an existing cache, or uses :data:`DEFAULT_SIZE_LIMIT` for a new one.
        eviction_policy: one of diskcache's policies (``least-recently-used``,
            ``least-recently-stored``, ``least-frequently-used``, ``none``); ``None`` as above.
        timeout: SQLite busy timeout in seconds (concurrent writers wait up to this long).
        readonly: read without writing anything: nothing is created, ``put``/``put_many`` store
            nothing (so :meth:`get_or_compute` still returns every tensor), a corrupt entry is a miss
            left in place, ``delete`` removes nothing and ``clear`` raises. For statistics, and for
            lookups in a cache this process may not write (see :func:`cache_is_writable`). In a
            writable folder SQLite may leave its WAL files (``cache.db-wal``, ``-shm``) behind.
        **diskcache_settings: other diskcache settings (e.g. ``cull_limit``), passed through.

    Raises:
        CacheDatabaseError: the database is damaged, or (unless ``readonly``) the folder is not writable.

    Tensors are stored and returned on CPU, bit-exact, in their own dtype.
    """

    def __init__(
        self,
        directory: str | os.PathLike | None = None,
        *,
        size_limit: int | None = None,
        eviction_policy: str | None = None,
        timeout: float = 60.0,
        readonly: bool = False,
        **diskcache_settings: object,
    ) -> None:
        path = (Path(directory).expanduser() if directory is not None else default_cache_dir()).absolute()
        if eviction_policy is not None and eviction_policy not in diskcache.EVICTION_POLICY:
            raise ValueError(
                f"unknown eviction_policy {eviction_policy!r}; "
                f"choose from {sorted(diskcache.EVICTION_POLICY)}"
            )
        if size_limit is not None and (isinstance(size_limit, bool) or int(size_limit) <= 0):
            raise ValueError(f"size_limit must be a positive number of bytes, got {size_limit!r}")
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(f"soft-token cache folder {path} is a file: pass a folder")
        if not readonly and not cache_is_writable(path):
            raise CacheDatabaseError(path, "no write permission", damaged=False)
        # Every setting is passed explicitly: the stored one, else ours. (diskcache writes its own defaults, 1 GiB and
        # least-recently-stored, for any not passed, over rows that another process opening a new cache at the same
        # moment, e.g. every process of `accelerate launch -m gmsa_rag.cache build`, has just written.)
        stored = _stored_settings(path / _DBNAME)
        settings = dict(diskcache_settings)
        settings["size_limit"] = int(size_limit if size_limit is not None
                                     else stored.get("size_limit", DEFAULT_SIZE_LIMIT))
        settings["eviction_policy"] = eviction_policy or stored.get("eviction_policy", DEFAULT_EVICTION_POLICY)
        self._init_args = (str(path), timeout, readonly, dict(settings))
        self.readonly = readonly
        with self._errors():
            self._cache = (
                _ReadOnlyBackend(str(path), timeout)
                if readonly
                else diskcache.Cache(str(path), timeout=timeout, disk=_BytesOnlyDisk, **settings)
            )
        self._lock = threading.Lock()
        self._hits = self._misses = self._corrupt = self._puts = 0

    # -- pickling (e.g. to hand a cache to spawned worker processes): reopen by directory --------
    def __getstate__(self) -> tuple:
        return self._init_args

    def __setstate__(self, state: tuple) -> None:
        directory, timeout, readonly, settings = state
        self.__init__(directory, timeout=timeout, readonly=readonly, **settings)  # type: ignore[misc]

    @property
    def directory(self) -> Path:
        """The cache folder."""
        return Path(self._init_args[0])

    @property
    def backend(self) -> diskcache.Cache:
        """The underlying :class:`diskcache.Cache` (for maintenance; values are raw entry bytes).
        Read-only caches have a reader with ``get``, ``in``, ``len`` and ``volume()`` only."""
        return self._cache

    def _errors(self) -> contextlib.AbstractContextManager[None]:
        """SQLite errors of this cache -> :class:`CacheDatabaseError` naming its folder."""
        return _database_errors(self._init_args[0])

    def _count(self, hits: int = 0, misses: int = 0, corrupt: int = 0, puts: int = 0) -> None:
        with self._lock:
            self._hits += hits
            self._misses += misses
            self._corrupt += corrupt
            self._puts += puts

    def _read(self, key: str) -> torch.Tensor | None:
        """Read and validate one entry without touching the hit/miss counters."""
        try:
            with self._errors():
                blob = self._cache.get(key)
                if blob is None:
                    # diskcache reports a row whose value file vanished as a plain miss; drop the row.
                    if key in self._cache:
                        self._drop_corrupt(key, CacheCorruptionError("value file missing"))
                    return None
            return decode_entry(blob, key)
        except (CacheCorruptionError, OSError, UnicodeDecodeError) as exc:
            self._drop_corrupt(key, exc)
            return None

    def _drop_corrupt(self, key: str, exc: BaseException) -> None:
        if self.readonly:
            self._count(corrupt=1)
            logger.warning("soft-token cache: corrupt entry %s left in the read-only cache (%s)", key, exc)
            return
        # Re-check under the cache's lock so a good value written meanwhile by another process is kept.
        with self._errors(), self._cache.transact():
            try:
                blob = self._cache.get(key)
                if blob is None:
                    still_bad = key in self._cache
                else:
                    decode_entry(blob, key)
                    still_bad = False
            except Exception:
                still_bad = True
            if still_bad:
                self._cache.delete(key)
        if still_bad:
            self._count(corrupt=1)
            logger.warning("soft-token cache: dropped corrupt entry %s (%s)", key, exc)

    def get(self, key: str) -> torch.Tensor | None:
        """Return the CPU tensor stored under ``key``, or ``None`` if absent or corrupt (then deleted)."""
        tensor = self._read(key)
        self._count(hits=tensor is not None, misses=tensor is None)
        return tensor

    def get_many(self, keys: Iterable[str]) -> list[torch.Tensor | None]:
        """:meth:`get` for each key, in order."""
        return [self.get(k) for k in keys]

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` (shape [m, hidden], floating point; copied to CPU) under ``key``."""
        self.put_many([(key, tensor)])

    def put_many(
        self, items: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]
    ) -> None:
        """Store several entries (all serialised first, then written; nothing when read-only)."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        for key, _ in pairs:
            if not isinstance(key, str) or not key:
                raise ValueError("key must be a non-empty str (use cache_key())")
        blobs = [(k, encode_entry(k, t)) for k, t in pairs]
        if self.readonly:
            return
        with self._errors():
            for k, b in blobs:
                self._cache.set(k, b)
        self._count(puts=len(blobs))

    def delete(self, key: str) -> bool:
        """Remove ``key``; return whether it was removed (never, when read-only)."""
        if self.readonly:
            return False
        with self._errors():
            return bool(self._cache.delete(key))

    def __contains__(self, key: object) -> bool:
        """Cheap presence test (does not read or validate the value)."""
        with self._errors():
            return isinstance(key, str) and key in self._cache

    def __len__(self) -> int:
        with self._errors():
            return len(self._cache)

    def stats(self) -> CacheStats:
        """Entries and bytes on disk (whole cache) plus this object's hit/miss/corrupt counters."""
        with self._lock:
            hits, misses, corrupt, puts = self._hits, self._misses, self._corrupt, self._puts
        with self._errors():
            return CacheStats(
                directory=str(self.directory),
                entries=len(self._cache),
                bytes_on_disk=int(self._cache.volume()),
                size_limit=int(self._cache.size_limit),
                eviction_policy=str(self._cache.eviction_policy),
                hits=hits,
                misses=misses,
                corrupt_dropped=corrupt,
                puts=puts,
            )

    def clear(self) -> int:
        """Delete every entry; return how many were removed."""
        if self.readonly:
            raise CacheDatabaseError(self.directory, "opened read-only", damaged=False)
        with self._errors():
            return int(self._cache.clear())

    def close(self) -> None:
        """Close this process's database connection (the object can still be used; it reopens)."""
        self._cache.close()

    def __enter__(self) -> "SoftTokenCache":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SoftTokenCache({str(self.directory)!r}{', readonly=True' if self.readonly else ''})"

    def get_or_compute(
        self,
        texts: Sequence[str],
        rate: int,
        fingerprint: str,
        compress_fn: CompressFn,
        batch_size: int = 8,
    ) -> list[torch.Tensor]:
        """Soft tokens for every text, in input order, computing only cache misses
        (:meth:`lookup` without the counts)."""
        return self.lookup(texts, rate, fingerprint, compress_fn, batch_size).tensors

    def lookup(
        self,
        texts: Sequence[str],
        rate: int,
        fingerprint: str,
        compress_fn: CompressFn,
        batch_size: int = 8,
    ) -> Lookup:
        """Soft tokens for every text, in input order, computing only cache misses; with the counts of
        valid cache reads and of texts compressed now.

        Misses (absent or corrupt entries) are de-duplicated, sorted by length (less padding) and
        passed to ``compress_fn(list_of_texts, rate) -> list[Tensor]`` in batches of ``batch_size``;
        results are stored, then everything is returned on CPU.

        Raises:
            ValueError: a text is empty or whitespace-only (it has nothing to compress), the rate or
                batch size is invalid, or ``compress_fn`` returns the wrong number/shape of tensors.
        """
        texts = list(texts)
        _check_rate(rate)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] must be str, got {type(t).__name__}")
            if not t.strip():
                raise ValueError(
                    f"texts[{i}] is empty or whitespace-only; there is nothing to compress "
                    "(filter empty chunks before compressing)"
                )
        keys = [cache_key(t, fingerprint, rate) for t in texts]
        found: dict[str, torch.Tensor] = {}
        missing: dict[str, str] = {}  # key -> text, first occurrence, insertion ordered
        for key, text in zip(keys, texts):
            if key in found or key in missing:
                continue
            tensor = self.get(key)
            if tensor is None:
                missing[key] = text
            else:
                found[key] = tensor
        hits = len(found)
        if missing:
            found.update(compute_and_store(self, missing, rate, compress_fn, batch_size))
        return Lookup([found[k] for k in keys], hits=hits, computed=len(missing))


def compute_and_store(
    cache: SoftTokenCache,
    missing: Mapping[str, str],
    rate: int,
    compress_fn: CompressFn,
    batch_size: int,
    progress: Callable[[int], object] | None = None,
    keep: bool = True,
) -> dict[str, torch.Tensor]:
    """Compress ``missing`` (key -> text) in length-sorted batches and store each batch.

    Returns key -> CPU tensor (empty when ``keep`` is False). ``progress(n)`` is called after each
    batch with the number of texts done in it.
    """
    import torch

    order = sorted(missing, key=lambda k: len(missing[k]), reverse=True)
    out: dict[str, torch.Tensor] = {}
    for start in range(0, len(order), batch_size):
        batch_keys = order[start : start + batch_size]
        batch_texts = [missing[k] for k in batch_keys]
        with torch.no_grad():
            result = compress_fn(batch_texts, rate)
        result = list(result)
        if len(result) != len(batch_texts):
            raise ValueError(
                f"compress_fn returned {len(result)} tensors for {len(batch_texts)} texts"
            )
        cpu = []
        for k, t in zip(batch_keys, result):
            _check_tensor(t, "compress_fn output")
            cpu.append((k, t.detach().to("cpu").contiguous()))
        cache.put_many(cpu)
        if keep:
            out.update(cpu)
        if progress is not None:
            progress(len(batch_keys))
    return out
