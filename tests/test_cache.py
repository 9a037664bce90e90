"""Tests of gmsa_rag.cache: soft-token store, precompute and CLI (CPU, fake model)."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import sqlite3
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import diskcache
import pytest
import torch

from gmsa_rag.cache import (
    PrecomputeReport,
    SoftTokenCache,
    cache_key,
    chunk_documents,
    load_folder,
    make_splitter,
    precompute,
)
from gmsa_rag.cache.__main__ import main as cli_main
from gmsa_rag.cache.store import DEFAULT_SIZE_LIMIT, decode_entry, encode_entry

FP = "fake-model@test"


# ---------------------------------------------------------------------------------------- helpers
class WhitespaceTokenizer:
    """HF-like: encode() adds a BOS unless add_special_tokens=False."""

    def __init__(self) -> None:
        self.special_calls = 0

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        if add_special_tokens:
            self.special_calls += 1
        return (["<s>"] if add_special_tokens else []) + text.split()


def fake_soft_tokens(text: str, rate: int, hidden: int = 16, dtype=torch.float32) -> torch.Tensor:
    m = max(1, math.ceil(len(text.split()) / rate))
    seed = int(hashlib.sha256(f"{rate}|{text}".encode()).hexdigest()[:12], 16)
    return torch.randn(m, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)


class FakeModel:
    def __init__(self, rates=(2, 4, 8), fingerprint: str = FP) -> None:
        self.config = SimpleNamespace(rates=tuple(rates))
        self.fingerprint = fingerprint
        self.tokenizer = WhitespaceTokenizer()
        self.calls: list[list[str]] = []

    def compress(self, texts: list[str], rate: int) -> list[torch.Tensor]:
        assert not torch.is_grad_enabled()
        self.calls.append(list(texts))
        return [fake_soft_tokens(t, rate) for t in texts]

    @property
    def n_compressed(self) -> int:
        return sum(len(c) for c in self.calls)


class CountingCompress:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str], rate: int) -> list[torch.Tensor]:
        self.calls.append(list(texts))
        return [fake_soft_tokens(t, rate) for t in texts]

    @property
    def texts(self) -> list[str]:
        return [t for c in self.calls for t in c]


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
            torch.float64: torch.int64}
    return torch.equal(a.contiguous().view(ints[a.dtype]), b.contiguous().view(ints[b.dtype]))


def prose(n_sentences: int, topic: str = "cats") -> str:
    return " ".join(f"Sentence {i} says something about {topic} number {i % 5}." for i in range(n_sentences))


@pytest.fixture
def cache(tmp_path: Path):
    with SoftTokenCache(tmp_path / "cache") as c:
        yield c


# ------------------------------------------------------------------------------------------- keys
def test_cache_key_is_stable_and_discriminating():
    k = cache_key("hello world", FP, 4)
    assert k == cache_key("hello world", FP, 4)
    assert len(k) == 64 and int(k, 16) >= 0
    others = {cache_key("hello world ", FP, 4), cache_key("hello world", FP + "x", 4),
              cache_key("hello world", FP, 8)}
    assert k not in others and len(others) == 3
    # No ambiguity between fields.
    assert cache_key("a", "b|4", 4) != cache_key("4|a", "b", 4)
    for bad in (0, -2, 2.0, True, "4"):
        with pytest.raises(ValueError):
            cache_key("x", FP, bad)
    with pytest.raises(ValueError):
        cache_key("x", "", 4)


# ---------------------------------------------------------------------------------- basic store ops
def test_hit_miss_and_stats(cache: SoftTokenCache):
    k1, k2 = cache_key("one", FP, 4), cache_key("two", FP, 4)
    assert cache.get(k1) is None
    assert k1 not in cache and len(cache) == 0
    cache.put(k1, torch.ones(2, 4))
    assert k1 in cache and k2 not in cache and len(cache) == 1
    assert torch.equal(cache.get(k1), torch.ones(2, 4))
    got1, got2 = cache.get_many([k1, k2])
    assert torch.equal(got1, torch.ones(2, 4)) and got2 is None
    st = cache.stats()
    assert st.entries == 1 and st.bytes_on_disk > 0
    assert st.hits == 2 and st.misses == 2 and st.corrupt_dropped == 0 and st.puts == 1
    assert st.size_limit == DEFAULT_SIZE_LIMIT
    cache.put_many({k2: torch.zeros(1, 4)})
    cache.put_many([(cache_key("three", FP, 4), torch.zeros(3, 4))])
    assert len(cache) == 3
    assert cache.clear() == 3 and len(cache) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [3, 700])  # small entries live in SQLite, large ones in files
def test_round_trip_bit_exact(cache: SoftTokenCache, dtype, rows):
    x = (torch.randn(rows, 64) * 100).to(dtype)
    x[0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0]).to(dtype)
    k = cache_key(f"text-{dtype}-{rows}", FP, 2)
    cache.put(k, x)
    y = cache.get(k)
    assert y.device.type == "cpu" and bits_equal(x, y)
    # Survives reopening the cache.
    cache.close()
    with SoftTokenCache(cache.directory) as again:
        assert bits_equal(x, again.get(k))


def test_put_copies_to_cpu_contiguous_and_detached(cache: SoftTokenCache):
    x = torch.randn(8, 5, requires_grad=True)
    view = x.t()  # non-contiguous [5, 8]
    k = cache_key("view", FP, 4)
    cache.put(k, view)
    y = cache.get(k)
    assert not y.requires_grad and torch.equal(y, view.detach())


@pytest.mark.parametrize(
    "bad, exc",
    [(torch.randn(4), ValueError), (torch.randn(1, 2, 3), ValueError), (torch.empty(0, 4), ValueError),
     (torch.ones(2, 2, dtype=torch.int64), ValueError), ([[1.0]], TypeError)],
)
def test_put_rejects_bad_values(cache: SoftTokenCache, bad, exc):
    with pytest.raises(exc):
        cache.put(cache_key("x", FP, 4), bad)
    assert len(cache) == 0


def test_values_are_raw_bytes_never_pickled(cache: SoftTokenCache):
    k_small, k_big = cache_key("s", FP, 4), cache_key("b", FP, 4)
    cache.put(k_small, torch.randn(2, 8))
    cache.put(k_big, torch.randn(512, 64))  # > 32 KiB -> file
    con = sqlite3.connect(cache.directory / "cache.db")
    modes = dict(con.execute("SELECT key, mode FROM Cache").fetchall())
    con.close()
    assert modes == {k_small: diskcache.core.MODE_RAW, k_big: diskcache.core.MODE_BINARY}
    with pytest.raises(TypeError):
        cache.backend.set("x", {"not": "bytes"})


def test_cache_is_picklable_and_reopens(cache: SoftTokenCache):
    k = cache_key("p", FP, 4)
    cache.put(k, torch.ones(1, 3))
    clone = pickle.loads(pickle.dumps(cache))
    assert clone.directory == cache.directory and torch.equal(clone.get(k), torch.ones(1, 3))


def test_existing_settings_kept_unless_given(tmp_path: Path):
    d = tmp_path / "c"
    with SoftTokenCache(d, size_limit=123_456_789, eviction_policy="least-recently-stored"):
        pass
    with SoftTokenCache(d) as c:
        st = c.stats()
        assert st.size_limit == 123_456_789 and st.eviction_policy == "least-recently-stored"
    with SoftTokenCache(d, size_limit=10**9) as c:
        assert c.stats().size_limit == 10**9
    with pytest.raises(ValueError, match="eviction_policy"):
        SoftTokenCache(d, eviction_policy="random")
    with pytest.raises(ValueError):
        SoftTokenCache(d, size_limit=0)


def _open_at_once(directory: str, barrier) -> None:
    barrier.wait(timeout=60)
    SoftTokenCache(directory).close()


def test_a_new_cache_opened_by_several_processes_at_once_keeps_its_settings(tmp_path: Path):
    # (every process of `accelerate launch -m gmsa_rag.cache build` opens the new cache at the same moment)
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(os.environ.get("GMSA_TEST_MP", default))
    for attempt in range(6):
        directory = str(tmp_path / f"new{attempt}")
        barrier = ctx.Barrier(3)
        procs = [ctx.Process(target=_open_at_once, args=(directory, barrier)) for _ in range(3)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=120)
            assert p.exitcode == 0
        with SoftTokenCache(directory, readonly=True) as cache:
            st = cache.stats()
            assert (st.size_limit, st.eviction_policy) == (DEFAULT_SIZE_LIMIT, "least-recently-used"), attempt


def test_a_relative_folder_opens_read_only(tmp_path: Path, monkeypatch):
    SoftTokenCache(tmp_path / "rel").close()
    monkeypatch.chdir(tmp_path)
    with SoftTokenCache("rel", readonly=True) as cache:
        assert len(cache) == 0 and cache.directory == tmp_path / "rel"


def test_default_dir_env_override(tmp_path: Path, monkeypatch):
    from gmsa_rag.cache import default_cache_dir

    monkeypatch.setenv("GMSA_RAG_CACHE_DIR", str(tmp_path / "envcache"))
    assert default_cache_dir() == tmp_path / "envcache"
    with SoftTokenCache() as c:
        assert c.directory == tmp_path / "envcache"
    monkeypatch.delenv("GMSA_RAG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "gmsa_rag" / "soft_tokens"


# ------------------------------------------------------------------------------------- corruption
def _value_file(cache: SoftTokenCache, key: str) -> Path:
    con = sqlite3.connect(cache.directory / "cache.db")
    (filename,) = con.execute("SELECT filename FROM Cache WHERE key = ?", (key,)).fetchone()
    con.close()
    assert filename, "expected a file-backed entry"
    return cache.directory / filename


def _corrupt_inline_flip(cache, key):
    blob = bytearray(cache.backend.get(key))
    blob[-3] ^= 0xFF  # inside the safetensors payload
    cache.backend.set(key, bytes(blob))


def _corrupt_garbage(cache, key):
    cache.backend.set(key, b"\x00garbage" * 3)


def _corrupt_header(cache, key):
    blob = bytearray(cache.backend.get(key))
    blob[15] = ord("}")  # breaks the JSON header
    cache.backend.set(key, bytes(blob))


def _corrupt_file_flip(cache, key):
    path = _value_file(cache, key)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _corrupt_file_truncate(cache, key):
    path = _value_file(cache, key)
    path.write_bytes(path.read_bytes()[:-100])


def _corrupt_file_missing(cache, key):
    _value_file(cache, key).unlink()


def _corrupt_other_key(cache, key):
    other = cache_key("some other chunk", FP, 4)
    cache.put(other, torch.ones(1, 16))
    cache.backend.set(key, cache.backend.get(other))  # valid entry, wrong key


def _corrupt_pickled(cache, key):
    # Write a pickled value under the key through a plain diskcache (as a foreign writer might).
    with diskcache.Cache(str(cache.directory)) as raw:
        raw.set(key, {"evil": "pickle"})


@pytest.mark.parametrize(
    "corrupt, big",
    [(_corrupt_inline_flip, False), (_corrupt_garbage, False), (_corrupt_header, False),
     (_corrupt_other_key, False), (_corrupt_pickled, False), (_corrupt_file_flip, True),
     (_corrupt_file_truncate, True), (_corrupt_file_missing, True)],
)
def test_corruption_detected_dropped_and_recomputed(cache: SoftTokenCache, caplog, corrupt, big):
    text = prose(200 if big else 3)  # big: > 32 KiB of soft tokens at rate 2 -> file-backed
    rate = 2 if big else 4
    compress = CountingCompress()
    (first,) = cache.get_or_compute([text], rate, FP, compress)
    key = cache_key(text, FP, rate)
    assert key in cache and compress.texts == [text]

    corrupt(cache, key)
    with caplog.at_level(logging.WARNING, logger="gmsa_rag.cache.store"):
        (again,) = cache.get_or_compute([text], rate, FP, compress)
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert bits_equal(first, again)
    assert compress.texts == [text, text]  # recomputed, never served corrupt
    assert cache.stats().corrupt_dropped == 1
    assert bits_equal(cache.get(key), first)

    # Plain get on a corrupted entry: None, and the entry is deleted.
    corrupt(cache, key)
    n_before = len(cache)
    assert cache.get(key) is None
    assert key not in cache and len(cache) == n_before - 1
    assert cache.stats().corrupt_dropped == 2


def test_decode_entry_validates():
    k = cache_key("t", FP, 4)
    blob = encode_entry(k, torch.randn(2, 3))
    assert decode_entry(blob, k).shape == (2, 3)
    from gmsa_rag.cache import CacheCorruptionError

    for bad in (b"", blob[:-1], blob + b"x", b"XXXXXX" + blob[6:]):
        with pytest.raises(CacheCorruptionError):
            decode_entry(bad, k)
    with pytest.raises(CacheCorruptionError):
        decode_entry(blob, cache_key("other", FP, 4))


# ---------------------------------------------------------------------------------- concurrency
N_KEYS = 30


def _expected(i: int) -> torch.Tensor:
    rows = 300 if i % 3 == 0 else 2 + i  # mix of file-backed and inline entries
    g = torch.Generator().manual_seed(1000 + i)
    return torch.randn(rows, 32, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)


def _worker(directory: str, wid: int, queue) -> None:
    try:
        torch.set_num_threads(1)
        cache = SoftTokenCache(directory)
        order = list(range(N_KEYS))
        order = order[wid * 7 % N_KEYS:] + order[: wid * 7 % N_KEYS]
        bad = 0
        for rnd in range(8):
            for i in order:
                k = cache_key(f"chunk {i}", FP, 4)
                if (i + wid + rnd) % 2:
                    cache.put(k, _expected(i))
                got = cache.get(k)
                if got is not None and not bits_equal(got, _expected(i)):
                    bad += 1
        # get_or_compute from several processes at once, on overlapping texts.
        texts = [f"shared text {j} " * (j + 1) for j in range(10)]
        outs = cache.get_or_compute(texts, 4, FP, lambda ts, r: [fake_soft_tokens(t, r) for t in ts], 3)
        bad += sum(not bits_equal(o, fake_soft_tokens(t, 4)) for o, t in zip(outs, texts))
        queue.put((wid, bad, cache.stats().corrupt_dropped, None))
        cache.close()
    except BaseException as exc:  # report, don't hang the parent
        queue.put((wid, -1, -1, repr(exc)))


def test_concurrent_processes(tmp_path: Path):
    directory = str(tmp_path / "shared")
    SoftTokenCache(directory).close()  # create it once, as a deployment would
    # fork is fast (no re-import of torch); the workers only run tiny, single-threaded tensor ops.
    # GMSA_TEST_MP=spawn runs the same test with fresh interpreters.
    default = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.get_context(os.environ.get("GMSA_TEST_MP", default))
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(directory, w, queue)) for w in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for wid, bad, corrupt, err in results:
        assert err is None, f"worker {wid}: {err}"
        assert bad == 0 and corrupt == 0, (wid, bad, corrupt)
    with SoftTokenCache(directory) as cache:
        assert len(cache) == N_KEYS + 10
        for i in range(N_KEYS):
            assert bits_equal(cache.get(cache_key(f"chunk {i}", FP, 4)), _expected(i))
        assert cache.stats().corrupt_dropped == 0
        assert cache.backend.check() == []  # diskcache's own consistency check


# ------------------------------------------------------------------------------- get_or_compute
def test_get_or_compute_only_misses_in_order(cache: SoftTokenCache):
    texts = [f"document number {i} " + "word " * i for i in range(7)]
    compress = CountingCompress()
    first = cache.get_or_compute(texts[:3], 4, FP, compress, batch_size=2)
    assert sorted(compress.texts) == sorted(texts[:3])
    assert all(len(c) <= 2 for c in compress.calls)

    query = [texts[5], texts[1], texts[5], texts[6], texts[0], texts[4]]
    compress.calls.clear()
    out = cache.get_or_compute(query, 4, FP, compress, batch_size=2)
    assert sorted(compress.texts) == sorted([texts[5], texts[6], texts[4]])  # duplicate computed once
    assert [len(c) for c in compress.calls] == [2, 1]
    for t, o in zip(query, out):
        assert o.device.type == "cpu" and bits_equal(o, fake_soft_tokens(t, 4))
    assert bits_equal(out[1], first[1])

    compress.calls.clear()
    cache.get_or_compute(query, 4, FP, compress)
    assert compress.calls == []
    cache.get_or_compute(query[:1], 8, FP, compress)  # other rate -> other key
    assert compress.texts == [texts[5]]


def test_get_or_compute_errors(cache: SoftTokenCache):
    compress = CountingCompress()
    for bad in ([""], ["ok text", "   \n"]):
        with pytest.raises(ValueError, match="empty"):
            cache.get_or_compute(bad, 4, FP, compress)
    with pytest.raises(ValueError, match="batch_size"):
        cache.get_or_compute(["a"], 4, FP, compress, batch_size=0)
    with pytest.raises(ValueError, match="returned 1 tensors for 2"):
        cache.get_or_compute(["a b", "c d"], 4, FP, lambda ts, r: [torch.ones(1, 2)])
    with pytest.raises(ValueError, match="shape"):
        cache.get_or_compute(["a b"], 4, FP, lambda ts, r: [torch.ones(2)])
    assert compress.calls == [] and len(cache) == 0
    assert cache.get_or_compute([], 4, FP, compress) == []


# ---------------------------------------------------------------------------------------- eviction
def test_size_limit_eviction(tmp_path: Path):
    limit = 400_000
    with SoftTokenCache(tmp_path / "small", size_limit=limit, eviction_policy="least-recently-stored") as c:
        keys = [cache_key(f"e{i}", FP, 4) for i in range(30)]
        for i, k in enumerate(keys):
            c.put(k, torch.full((200, 64), float(i)))  # ~51 KiB each, file-backed
        st = c.stats()
        assert st.entries < 30
        assert st.bytes_on_disk <= limit + 60_000
        assert torch.equal(c.get(keys[-1]), torch.full((200, 64), 29.0))  # newest kept
        assert c.get(keys[0]) is None  # oldest evicted
        assert st.corrupt_dropped == 0


# ---------------------------------------------------------------------------------------- chunking
def test_chunk_documents_uses_tokenizer_without_special_tokens_and_matches_splitter():
    from llama_index.core import Document

    tok = WhitespaceTokenizer()
    docs = [prose(40, "dogs"), "", "   ", prose(3, "fish")]
    chunks = chunk_documents(docs, tok, chunk_size=40, chunk_overlap=8)
    assert tok.special_calls == 0  # encode() always called with add_special_tokens=False
    assert len(chunks) > 3 and all(c.strip() for c in chunks)
    assert all(len(c.split()) <= 40 for c in chunks)
    nodes = make_splitter(tok, 40, 8).get_nodes_from_documents([Document(text=d) for d in docs])
    assert chunks == [n.get_content() for n in nodes if n.get_content().strip()]
    assert chunks == chunk_documents(docs, tok, chunk_size=40, chunk_overlap=8)  # deterministic
    with pytest.raises(ValueError):
        make_splitter(tok, 10, 10)


def test_load_folder_metadata_does_not_change_chunking(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(prose(30, "apples"))
    (tmp_path / "sub" / "b.md").write_text("# Title\n\n" + prose(30, "bananas"))
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    docs = load_folder(tmp_path)
    assert [d.metadata["file_path"] for d in docs] == ["a.txt", "sub/b.md"]
    tok = WhitespaceTokenizer()
    from_docs = chunk_documents(docs, tok, 32, 4)
    from_texts = chunk_documents([d.text for d in docs], tok, 32, 4)
    assert from_docs == from_texts


def write_jsonl(path: Path, records: list, blank_lines: bool = False) -> Path:
    """``records`` as JSON lines (gzip-compressed for a ``.gz`` name); a record that is a str is written as is."""
    import gzip

    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    text = ("\n\n" if blank_lines else "\n").join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


LONG_TITLE = "A title long enough to shorten every chunk if it counted as metadata " * 4


def test_load_folder_reads_jsonl_records_and_their_metadata_does_not_change_chunking(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text(prose(30, "apples"))
    write_jsonl(tmp_path / "sub" / "wiki.jsonl.gz",
                [{"title": LONG_TITLE, "text": prose(40, "bears"), "id": 1}, {"text": prose(5, "owls")}], blank_lines=True)
    write_jsonl(tmp_path / "z.JSONL", [{"title": 7, "text": prose(20, "eels")}])
    (tmp_path / "notes.json").write_text('{"text": "not read"}')
    docs = load_folder(tmp_path)
    assert [d.text for d in docs] == [prose(30, "apples"), prose(40, "bears"), prose(5, "owls"), prose(20, "eels")]
    assert [d.metadata for d in docs] == [{"file_path": "a.txt"}, {"file_path": "sub/wiki.jsonl.gz", "title": LONG_TITLE},
                                          {"file_path": "sub/wiki.jsonl.gz"}, {"file_path": "z.JSONL", "title": "7"}]
    assert all(d.excluded_embed_metadata_keys == d.excluded_llm_metadata_keys == list(d.metadata) for d in docs)
    tok = WhitespaceTokenizer()
    assert chunk_documents(docs, tok, 32, 4) == chunk_documents([d.text for d in docs], tok, 32, 4)
    assert [d.text for d in load_folder(tmp_path, suffixes=(".txt",))] == [prose(30, "apples")]
    assert [d.text for d in load_folder(tmp_path, suffixes=(".json",))] == ['{"text": "not read"}']  # as text


@pytest.mark.parametrize("name, records, message", [
    ("bad.jsonl", [{"text": "fine"}, {"title": "no text"}], r"bad.jsonl:2: the record has no string \"text\" field"),
    ("bad.jsonl", [{"text": "fine"}, "", {"text": 3}], r"bad.jsonl:3: the record has no string \"text\" field"),
    ("bad.jsonl.gz", ["[1, 2]"], r"bad.jsonl.gz:1: a record must be a JSON object, got list"),
    ("bad.jsonl.gz", [{"text": "fine"}, '{"text": "cut'], r"bad.jsonl.gz:2: not a JSON record \(Unterminated string"),
])
def test_bad_jsonl_records_fail_in_one_line_naming_file_and_line(tmp_path: Path, name, records, message):
    write_jsonl(tmp_path / name, records)
    with pytest.raises(ValueError, match=message) as err:
        load_folder(tmp_path)
    assert "\n" not in str(err.value) and str(tmp_path / name) in str(err.value)


def test_damaged_gzip_and_single_file_sources(cache: SoftTokenCache, tmp_path: Path):
    from gmsa_rag.cache.precompute import load_source

    (tmp_path / "damaged.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match=r"damaged.jsonl.gz: cannot be read as JSON lines"):
        load_source(tmp_path / "damaged.jsonl.gz")
    (tmp_path / "scan.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=r"unsupported source file .*scan.pdf: expected one of .*\.jsonl\.gz"):
        precompute(FakeModel(), cache, tmp_path / "scan.pdf", 4, progress=False)
    with pytest.raises(FileNotFoundError, match="source not found"):
        load_source(tmp_path / "missing.jsonl")

    records = [{"title": LONG_TITLE, "text": prose(30, "whales")}, {"text": prose(12, "seals")}, {"text": " "}]
    one = write_jsonl(tmp_path / "one.jsonl.gz", records)
    model = FakeModel()
    rep = precompute(model, cache, one, 4, chunk_size=40, chunk_overlap=4, progress=False)
    chunks = chunk_documents([r["text"] for r in records], model.tokenizer, 40, 4)
    assert rep.documents == 3 and rep.empty_skipped == 1 and rep.computed == len(set(chunks)) > 2
    assert all(cache_key(c, FP, 4) in cache for c in chunks)
    assert [d.metadata["file_path"] for d in load_source(one)] == ["one.jsonl.gz"] * 3
    text_file = tmp_path / "page.md"
    text_file.write_text(prose(25, "otters"))
    rep = precompute(model, cache, text_file, 4, chunk_size=40, chunk_overlap=4, progress=False)
    assert rep.documents == 1 and rep.computed > 1
    assert all(cache_key(c, FP, 4) in cache for c in chunk_documents([prose(25, "otters")], model.tokenizer, 40, 4))


def test_index_nodes_equal_precompute_chunks_for_a_jsonl_folder(tmp_path: Path, tokenizer):
    """`gmsa-rag ask`'s index and `python -m gmsa_rag.cache build` read a folder with one loader: same chunks."""
    from gmsa_rag.cache import collect_chunks
    from gmsa_rag.rag import build_or_load_index, hash_embedding

    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.txt").write_text(prose(20, "apples"))
    write_jsonl(src / "wiki-00.jsonl.gz", [{"title": LONG_TITLE, "text": prose(30, "bears")},
                                            {"title": "Owls", "text": prose(9, "owls")}, {"text": prose(14, "eels")}])
    info = build_or_load_index(src, hash_embedding(), tokenizer, persist_root=tmp_path / "indexes",
                               chunk_size=48, chunk_overlap=8)
    nodes = list(info.index.docstore.docs.values())
    chunks, empty = collect_chunks(src, tokenizer, 48, 8)
    assert [n.get_content() for n in nodes] == chunks and empty == 0
    assert {n.metadata.get("title") for n in nodes} == {None, LONG_TITLE, "Owls"}
    assert any("bears" in c for c in chunks) and any("eels" in c for c in chunks)  # the records were read
    model = FakeModel()
    model.tokenizer = tokenizer
    with SoftTokenCache(tmp_path / "cache") as cache:
        rep = precompute(model, cache, src, 4, chunk_size=48, chunk_overlap=8, progress=False)
        assert rep.documents == 4 and rep.computed == len(set(chunks))
        assert all(cache_key(n.get_content(), FP, 4) in cache for n in nodes)


# --------------------------------------------------------------------------------------- precompute
def test_precompute_list_idempotent_and_keys_hit(cache: SoftTokenCache):
    model = FakeModel()
    docs = [prose(50, "ships"), prose(20, "trains"), "", prose(20, "trains")]  # a duplicate document
    rep = precompute(model, cache, docs, 4, chunk_size=48, chunk_overlap=8, batch_size=3, progress=False)
    assert isinstance(rep, PrecomputeReport)
    assert rep.empty_skipped == 1 and rep.total_chunks > rep.unique_chunks
    assert rep.computed == rep.unique_chunks == len(cache) and rep.skipped == 0
    assert all(len(c) <= 3 for c in model.calls)

    chunks = chunk_documents(docs, model.tokenizer, 48, 8)
    for text in chunks:
        assert bits_equal(cache.get(cache_key(text, FP, 4)), fake_soft_tokens(text, 4))

    model.calls.clear()
    rep2 = precompute(model, cache, docs, 4, chunk_size=48, chunk_overlap=8, progress=False)
    assert rep2.computed == 0 and rep2.skipped == rep.unique_chunks and model.calls == []

    # Another rate is another set of keys; verify=True recomputes a corrupted entry.
    rep3 = precompute(model, cache, docs, 8, chunk_size=48, chunk_overlap=8, progress=False)
    assert rep3.computed == rep.unique_chunks
    victim = cache_key(chunks[0], FP, 8)
    cache.backend.set(victim, b"junk")
    model.calls.clear()
    assert precompute(model, cache, docs, 8, 48, 8, progress=False).computed == 0  # presence only
    rep4 = precompute(model, cache, docs, 8, 48, 8, progress=False, verify=True)
    assert rep4.computed == 1 and model.calls == [[chunks[0]]]


def test_precompute_unknown_rate(cache: SoftTokenCache):
    model = FakeModel(rates=(2, 4))
    with pytest.raises(ValueError, match=r"rate 3 is not supported.*\(2, 4\)"):
        precompute(model, cache, ["some text here."], 3, progress=False)
    assert model.calls == [] and len(cache) == 0


def test_precompute_bad_source(cache: SoftTokenCache, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="list of strings"):
        precompute(FakeModel(), cache, str(tmp_path / "nope"), 4, progress=False)
    with pytest.raises(TypeError):
        precompute(FakeModel(), cache, [123], 4, progress=False)


def test_precompute_folder(cache: SoftTokenCache, tmp_path: Path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "one.txt").write_text(prose(40, "rivers"))
    (src / "two.md").write_text(prose(10, "lakes"))
    (src / "empty.txt").write_text("  \n")
    model = FakeModel()
    rep = precompute(model, cache, src, 2, chunk_size=40, chunk_overlap=4, progress=False)
    assert rep.computed == rep.unique_chunks > 2 and rep.empty_skipped == 1
    # An index built from the same loader + splitter produces nodes whose texts all hit.
    nodes = make_splitter(model.tokenizer, 40, 4).get_nodes_from_documents(load_folder(src))
    assert all(cache_key(n.get_content(), FP, 2) in cache for n in nodes)
    assert precompute(model, cache, src, 2, chunk_size=40, chunk_overlap=4, progress=False).computed == 0


def test_precompute_from_persisted_index_is_exact(cache: SoftTokenCache, tmp_path: Path):
    from llama_index.core import Document, StorageContext, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    # Index built with some other splitter settings: precompute must use its nodes as they are.
    docs = [Document(text=prose(30, "stars"), metadata={"source": "a very long metadata value " * 3}),
            Document(text=prose(12, "moons"))]
    nodes = make_splitter(WhitespaceTokenizer(), 64, 10).get_nodes_from_documents(docs)
    index = VectorStoreIndex(nodes, embed_model=MockEmbedding(embed_dim=8))
    persist = tmp_path / "index"
    index.storage_context.persist(persist_dir=str(persist))

    model = FakeModel()
    rep = precompute(model, cache, persist, 4, chunk_size=16, chunk_overlap=2, progress=False)
    loaded = StorageContext.from_defaults(persist_dir=str(persist)).docstore.docs.values()
    texts = [n.get_content() for n in loaded]
    assert rep.total_chunks == len(texts) == len(nodes)
    assert sorted(t for c in model.calls for t in c) == sorted(set(texts))
    retriever = index.as_retriever(similarity_top_k=3)
    for hit in retriever.retrieve("stars"):
        assert cache_key(hit.node.get_content(), FP, 4) in cache
    assert precompute(model, cache, persist, 4, progress=False).computed == 0


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_stats_clear_build(tmp_path: Path, monkeypatch, capsys):
    cdir = tmp_path / "clicache"
    with SoftTokenCache(cdir) as c:
        c.put(cache_key("x", FP, 4), torch.ones(1, 2))

    assert cli_main(["stats", "--cache-dir", str(cdir)]) == 0
    assert "entries:         1" in capsys.readouterr().out
    assert cli_main(["clear", "--cache-dir", str(cdir)]) == 2  # stdin is not a tty: needs --yes
    assert cli_main(["clear", "--cache-dir", str(cdir), "--yes"]) == 0
    assert "removed 1" in capsys.readouterr().out

    # build, with a fake gmsa_rag.model (the real one is written elsewhere) and a checkpoint record only.
    created = {}

    class FakeGMSAModel:
        @staticmethod
        def from_pretrained(checkpoint, device=None):
            created["args"] = (checkpoint, device)
            return FakeModel()

    monkeypatch.setitem(sys.modules, "gmsa_rag.model", types.SimpleNamespace(GMSAModel=FakeGMSAModel))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "gmsa_config.json").write_text(json.dumps({"format_version": 1, "config": {"rates": [2, 4, 8]}, "base_model": "tiny", "base_fingerprint": "0" * 64}))
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text(prose(30))
    argv = ["build", "--source", str(src), "--cache-dir", str(cdir), "--rate", "4",
            "--checkpoint", str(ckpt), "--device", "cpu", "--no-progress", "--json", "--chunk-size", "40", "--chunk-overlap", "4"]
    assert cli_main(argv) == 0
    rep = json.loads(capsys.readouterr().out)
    assert created["args"] == (ckpt, "cpu") and rep["computed"] > 0 and rep["skipped"] == 0
    assert cli_main(argv) == 0
    assert json.loads(capsys.readouterr().out)["computed"] == 0
    assert cli_main(argv[:5] + ["--rate", "5"] + argv[7:]) == 2
    assert "--rate 5 is not allowed" in capsys.readouterr().err

    monkeypatch.setattr("gmsa_rag.checkpoint.default_checkpoint", lambda: None)
    assert cli_main(argv[:5] + argv[9:] + ["--rate", "4"]) == 3
    assert "no --checkpoint given" in capsys.readouterr().err


def test_cli_build_takes_a_jsonl_file_and_refuses_other_files(tmp_path: Path, monkeypatch, capsys):
    loads = []

    class FakeGMSAModel:
        @staticmethod
        def from_pretrained(checkpoint, device=None):
            loads.append(checkpoint)
            return FakeModel()

    monkeypatch.setitem(sys.modules, "gmsa_rag.model", types.SimpleNamespace(GMSAModel=FakeGMSAModel))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "gmsa_config.json").write_text(json.dumps({"format_version": 1, "config": {"rates": [2, 4, 8]}, "base_model": "tiny", "base_fingerprint": "0" * 64}))
    src = write_jsonl(tmp_path / "wiki.jsonl.gz", [{"title": "T", "text": prose(30)}, {"text": prose(8, "dogs")}])
    argv = ["build", "--cache-dir", str(tmp_path / "c"), "--rate", "4", "--checkpoint", str(ckpt),
            "--no-progress", "--chunk-size", "40", "--chunk-overlap", "4"]
    assert cli_main(argv + ["--source", str(src), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["documents"] == 2 and rep["computed"] == rep["unique_chunks"] > 2 and rep["split"] == "none"
    assert cli_main(argv + ["--source", str(src)]) == 0
    assert capsys.readouterr().out.startswith(f"{rep['total_chunks']} chunks ({rep['unique_chunks']} unique): 0 computed")

    other = tmp_path / "notes.pdf"
    other.write_bytes(b"%PDF")
    assert cli_main(argv + ["--source", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--source {other} is not a supported file" in err and ".jsonl.gz" in err and len(err.splitlines()) == 1
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"title": "no text"}])
    loaded = len(loads)
    assert cli_main(argv + ["--source", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f'error: {bad}:2: the record has no string "text" field\n'
    (tmp_path / "empty").mkdir()
    assert cli_main(argv + ["--source", str(tmp_path / "empty")]) == 2
    assert "holds no documents" in capsys.readouterr().err
    assert len(loads) == loaded  # refused before any model loads


def test_cli_build_fills_several_rates_in_one_run(tmp_path: Path, monkeypatch, capsys):
    """`--rate 8 2` (for GMSACompressor(rate=8, lead_rate=2)) caches every chunk at both rates with one model load."""
    loads, model = [], FakeModel()

    class FakeGMSAModel:
        @staticmethod
        def from_pretrained(checkpoint, device=None):
            loads.append(checkpoint)
            return model

    monkeypatch.setitem(sys.modules, "gmsa_rag.model", types.SimpleNamespace(GMSAModel=FakeGMSAModel))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "gmsa_config.json").write_text(json.dumps({"format_version": 1, "config": {"rates": [2, 4, 8]}, "base_model": "tiny", "base_fingerprint": "0" * 64}))
    src = write_jsonl(tmp_path / "wiki.jsonl", [{"text": prose(30)}, {"text": prose(12, "dogs")}])
    cdir = tmp_path / "c"
    argv = ["build", "--source", str(src), "--cache-dir", str(cdir), "--checkpoint", str(ckpt), "--no-progress",
            "--chunk-size", "40", "--chunk-overlap", "4"]
    assert cli_main(argv + ["--rate", "8", "2", "8", "--json"]) == 0
    reports = json.loads(capsys.readouterr().out)
    assert [r["rate"] for r in reports] == [8, 2] and len(loads) == 1  # each rate once, in the order given
    assert reports[0]["computed"] == reports[1]["computed"] == reports[0]["unique_chunks"] > 1
    with SoftTokenCache(cdir) as cache:
        assert len(cache) == 2 * reports[0]["unique_chunks"]
    assert cli_main(argv + ["--rate", "2", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["at 2x", "at 8x"] and all(" 0 computed" in line for line in lines)
    assert cli_main(argv + ["--rate", "8", "5"]) == 2  # every rate checked before anything is computed
    assert "--rate 5 is not allowed" in capsys.readouterr().err and len(loads) == 2


def test_cli_help():
    with pytest.raises(SystemExit) as e:
        cli_main(["--help"])
    assert e.value.code == 0


# ------------------------------------------------------------- with the real (tiny, random) GMSA model
def test_precompute_with_tiny_gmsa_model(cache: SoftTokenCache, tiny, tmp_path: Path):
    from gmsa_rag.testing import SAMPLE_TEXT

    docs = [SAMPLE_TEXT * 3, "Paris is the capital of France. " * 4, " "]
    with pytest.raises(ValueError, match="rate 3"):
        precompute(tiny, cache, docs, 3, progress=False)
    rep = precompute(tiny, cache, docs, 4, chunk_size=48, chunk_overlap=8, batch_size=2, progress=False)
    assert rep.computed == rep.unique_chunks >= 3 and rep.empty_skipped == 1
    chunks = chunk_documents(docs, tiny.tokenizer, 48, 8)
    assert all(len(tiny.tokenizer.encode(c, add_special_tokens=False)) <= 48 for c in chunks)
    fingerprint = tiny.fingerprint
    for text, direct in zip(chunks, tiny.compress(chunks, 4)):
        stored = cache.get(cache_key(text, fingerprint, 4))
        assert stored.shape == direct.shape and stored.dtype == direct.dtype
        torch.testing.assert_close(stored, direct.cpu(), rtol=1e-4, atol=1e-5)
    assert precompute(tiny, cache, docs, 4, chunk_size=48, chunk_overlap=8, progress=False).computed == 0
    # Query-time path: every chunk is a hit.
    calls = CountingCompress()
    cache.get_or_compute(chunks, 4, fingerprint, calls)
    assert calls.calls == []
