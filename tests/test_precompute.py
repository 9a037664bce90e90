"""precompute throughput machinery: length-sorted batches, token counts, shards, several processes on one cache."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from gmsa_rag.cache import SoftTokenCache, cache_key, precompute
from gmsa_rag.cache.precompute import process_device, process_shard

FP = "fp-test"


class Words:
    """A tokenizer whose tokens are words."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[str]:
        return text.split()


class WordModel:
    """compress -> one soft token per 4 words; records every call and the batch_size it got."""

    def __init__(self) -> None:
        self.config = SimpleNamespace(rates=(4,))
        self.fingerprint = FP
        self.tokenizer = Words()
        self.calls: list[tuple[list[str], int | None]] = []

    def compress(self, texts: list[str], rate: int, batch_size: int | None = None) -> list[torch.Tensor]:
        assert not torch.is_grad_enabled()
        self.calls.append((list(texts), batch_size))
        return [torch.full((-(-len(t.split()) // rate), 3), float(len(t.split()))) for t in texts]


def docs(n: int) -> list[str]:
    """n one-chunk documents of different lengths (3 to 3 + n - 1 words)."""
    return [" ".join(f"w{i}x{j}" for j in range(3 + (i * 7) % n)) + "." for i in range(n)]


def test_batches_are_sorted_by_tokens_and_counted(tmp_path: Path):
    model = WordModel()
    texts = docs(11)
    with SoftTokenCache(tmp_path / "c") as cache:
        rep = precompute(model, cache, texts, 4, chunk_size=200, chunk_overlap=0, batch_size=4, progress=False)
        assert rep.computed == 11 == len(cache)
        for t in texts:
            assert cache.get(cache_key(t, FP, 4))[0, 0] == len(t.split())
    sizes = [len(batch) for batch, _ in model.calls]
    assert sizes == [4, 4, 3] and all(bs == 4 for _, bs in model.calls)  # batch_size reaches compress
    order = [len(t.split()) for batch, _ in model.calls for t in batch]
    assert order == sorted(order, reverse=True)  # longest first, similar lengths in a batch
    assert rep.tokens == sum(len(t.split()) for t in texts)
    assert rep.compress_seconds > 0 and rep.tokens_per_second == pytest.approx(rep.tokens / rep.compress_seconds)
    d = rep.as_dict()
    assert d["chunks_per_second"] > 0 and d["num_processes"] == 1 and d["process_index"] == 0


def test_shards_split_the_chunks_between_processes(tmp_path: Path):
    texts = docs(9)
    models = [WordModel(), WordModel()]
    with SoftTokenCache(tmp_path / "c") as cache:
        reps = [precompute(m, cache, texts, 4, chunk_size=200, chunk_overlap=0, progress=False, shard=(i, 2))
                for i, m in enumerate(models)]
        seen = [sorted(t for batch, _ in m.calls for t in batch) for m in models]
        assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(texts)
        assert abs(len(seen[0]) - len(seen[1])) <= 1  # an even split
        assert [r.computed for r in reps] == [len(s) for s in seen] and reps[1].process_index == 1
        assert precompute(WordModel(), cache, texts, 4, chunk_size=200, chunk_overlap=0, progress=False,
                          shard=(0, 1)).computed == 0
    with pytest.raises(ValueError, match="shard"):
        precompute(WordModel(), SoftTokenCache(tmp_path / "d"), texts, 4, progress=False, shard=(2, 2))


def test_shard_and_device_come_from_the_launcher(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert process_shard() == (0, 1) and process_device("cuda") == "cuda" and process_device(None) is None
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_shard() == (5, 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert process_device("cuda") == "cuda:1" and process_device(None) == "cuda:1"
    assert process_device("cpu") == "cpu" and process_device("cuda:3") == "cuda:3"  # explicit choices stay


WORKER = textwrap.dedent("""
    import sys, torch
    from types import SimpleNamespace
    from gmsa_rag.cache import SoftTokenCache, precompute

    class Words:
        def encode(self, text, add_special_tokens=True):
            return text.split()

    class Model:
        config = SimpleNamespace(rates=(4,))
        fingerprint = "fp-test"
        tokenizer = Words()
        def compress(self, texts, rate):
            return [torch.full((2, 3), float(len(t))) for t in texts]

    texts = [f"document number {i}" + " word" * (i % 13) for i in range(120)]
    with SoftTokenCache(sys.argv[1]) as cache:
        rep = precompute(Model(), cache, texts, 4, chunk_size=400, chunk_overlap=0, batch_size=3, progress=False)
    print(rep.process_index, rep.num_processes, rep.computed)
""")


def test_launched_processes_fill_one_cache_together(tmp_path: Path):
    """Three processes as accelerate launch starts them (RANK / WORLD_SIZE), writing to one cache at once."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = []
    for rank in range(3):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path / "shared")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(out.split())
    assert sorted(r[0] for r in results) == ["0", "1", "2"] and sum(int(r[2]) for r in results) == 120
    texts = [f"document number {i}" + " word" * (i % 13) for i in range(120)]
    with SoftTokenCache(tmp_path / "shared") as cache:
        assert len(cache) == 120
        for t in texts:
            assert torch.equal(cache.get(cache_key(t, FP, 4)), torch.full((2, 3), float(len(t))))


# ------------------------------------------------------------------- documents split before chunking
def test_split_by_length_is_balanced_complete_and_deterministic():
    from gmsa_rag.cache.precompute import split_by_length

    lengths = [(i * 7919) % 1000 + 1 for i in range(200)]
    for count in (1, 2, 3, 7):
        parts = split_by_length(lengths, count)
        assert sorted(i for part in parts for i in part) == list(range(200))
        assert all(part == sorted(part) for part in parts) and parts == split_by_length(lengths, count)
        loads = [sum(lengths[i] for i in part) for part in parts]
        assert max(loads) - min(loads) <= max(lengths)  # greedy longest-first: within one item's length
    assert split_by_length([5, 1, 1, 1, 1, 5, 3], 2) == [[0, 4, 6], [1, 2, 3, 5]]
    assert split_by_length([], 3) == [[], [], []]
    with pytest.raises(ValueError, match="count"):
        split_by_length([1], 0)


def mixed_folder(root: Path) -> Path:
    """Text files and a jsonl.gz of records of varied lengths; one record repeats a text file's text."""
    import gzip
    import json

    from gmsa_rag.testing import SAMPLE_TEXT

    root.mkdir()
    sentences = SAMPLE_TEXT.split(". ")
    (root / "eiffel.txt").write_text(SAMPLE_TEXT * 2)
    (root / "paris.md").write_text("Paris is the capital of France. " * 3)
    records = [{"title": f"Record {i}", "text": " ".join(sentences[: 1 + i % len(sentences)]) + f" Fact {i}." * (1 + i % 5)}
               for i in range(12)]
    records.append({"title": "Again", "text": "Paris is the capital of France. " * 3})  # a duplicate document
    records.append({"text": "   "})
    with gzip.open(root / "wiki-00.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write("".join(json.dumps(r) + "\n" for r in records))
    return root


def test_processes_chunk_only_their_documents_and_together_cover_the_source(tiny, tmp_path: Path):
    """shard=(i, n) for n = 1, 2, 3 (tiny GMSA model), each process into a cache of its own: together they compute
    every chunk key of the single-process run, each key by exactly one process (but a chunk text found in two
    documents), and each chunks only its own documents."""
    from gmsa_rag.cache import chunk_documents, load_folder

    src = mixed_folder(tmp_path / "docs")
    docs = load_folder(src)
    assert len(docs) == 16  # 4 per process for n = 3: documents are split
    chunks = chunk_documents(docs, tiny.tokenizer, 48, 8)
    all_keys = {cache_key(c, tiny.fingerprint, 4) for c in chunks}
    documents_of: dict[str, int] = {}  # chunk key -> number of documents it occurs in
    for doc in docs:
        for key in {cache_key(c, tiny.fingerprint, 4) for c in chunk_documents([doc], tiny.tokenizer, 48, 8)}:
            documents_of[key] = documents_of.get(key, 0) + 1
    in_two_documents = {k for k, m in documents_of.items() if m > 1}
    assert in_two_documents and set(documents_of) == all_keys
    for n in (1, 2, 3):
        owned: list[set[str]] = []
        reports = []
        for i in range(n):
            with SoftTokenCache(tmp_path / f"cache-{i}-of-{n}") as cache:
                rep = precompute(tiny, cache, src, 4, chunk_size=48, chunk_overlap=8, batch_size=4, progress=False,
                                 shard=(i, n))
                assert rep.computed == rep.unique_chunks == len(cache) and rep.process_index == i
                assert precompute(tiny, cache, src, 4, chunk_size=48, chunk_overlap=8, progress=False,
                                  shard=(i, n)).computed == 0  # re-runs skip what is cached
                owned.append(set(cache.backend))
                reports.append(rep)
        assert set().union(*owned) == all_keys
        for a in range(n):
            for b in range(a + 1, n):
                assert owned[a] & owned[b] <= in_two_documents
        assert [r.split for r in reports] == (["none"] if n == 1 else ["documents"] * n)
        assert sum(r.documents for r in reports) == len(docs) and sum(r.empty_skipped for r in reports) == 1
        assert sum(r.total_chunks for r in reports) == len(chunks)
        if n > 1:  # nobody chunked the whole source
            assert all(0 < r.documents < len(docs) and r.total_chunks < len(chunks) for r in reports)


def precompute_as_three_processes(tmp_path: Path, texts: list[str]):
    """``texts`` precomputed at 4x into one cache as processes 0, 1, 2 of 3 (one model each): their reports, their
    models (what each compressed) and how many entries the cache holds."""
    models = [WordModel() for _ in range(3)]
    with SoftTokenCache(tmp_path / "c") as cache:
        reports = [precompute(m, cache, texts, 4, chunk_size=200, chunk_overlap=0, progress=False, shard=(i, 3))
                   for i, m in enumerate(models)]
        return reports, models, len(cache)


def test_too_few_documents_per_process_split_chunk_keys(tmp_path: Path):
    """Fewer than 4 documents per process: each chunks everything and takes every n-th key (today's split)."""
    texts = docs(11)
    reps, models, cached = precompute_as_three_processes(tmp_path, texts)
    assert cached == 11
    assert [r.split for r in reps] == ["chunk keys"] * 3
    assert all(r.total_chunks == 11 and r.documents == 11 for r in reps) and sum(r.unique_chunks for r in reps) == 11
    seen = [{t for batch, _ in m.calls for t in batch} for m in models]
    assert sorted(t for s in seen for t in s) == sorted(texts)


def test_documents_split_keeps_each_process_to_its_own(tmp_path: Path):
    """12 one-chunk documents over 3 processes: each compresses only chunks of its own documents, balanced by
    length, and reports their counts (not the whole source's)."""
    texts = docs(12)
    reps, models, cached = precompute_as_three_processes(tmp_path, texts)
    assert cached == 12
    assert [r.split for r in reps] == ["documents"] * 3 and sum(r.documents for r in reps) == 12
    assert [r.total_chunks for r in reps] == [r.documents for r in reps] == [r.computed for r in reps]
    words = [sum(len(t.split()) for batch, _ in m.calls for t in batch) for m in models]
    assert max(words) - min(words) <= max(len(t.split()) for t in texts)


def test_several_rates_chunk_the_source_once_and_fill_each_rate(tmp_path: Path, monkeypatch):
    """precompute_rates: the same cache as one precompute per rate, with the source read and chunked once."""
    import importlib

    from gmsa_rag.cache import precompute_rates

    precompute_module = importlib.import_module("gmsa_rag.cache.precompute")  # the module (the package exports the function)

    chunked = []
    real_chunk_items = precompute_module.chunk_items
    monkeypatch.setattr(precompute_module, "chunk_items", lambda *a, **k: chunked.append(1) or real_chunk_items(*a, **k))
    counted = []
    real_token_lengths = precompute_module._token_lengths
    monkeypatch.setattr(precompute_module, "_token_lengths", lambda tok, t: counted.extend(t) or real_token_lengths(tok, t))
    model = WordModel()
    model.config.rates = (2, 4)
    texts = docs(7)
    with SoftTokenCache(tmp_path / "c") as cache:
        reports = precompute_rates(model, cache, texts, [4, 2, 4], chunk_size=200, chunk_overlap=0, progress=False)
        assert len(chunked) == 1 and [r.rate for r in reports] == [4, 2]  # each rate once, in the order given
        assert all(r.computed == r.unique_chunks == 7 and r.documents == 7 for r in reports)
        assert sorted(counted) == sorted(texts)  # each chunk's tokens counted once, not once per rate
        assert reports[0].tokens == reports[1].tokens == sum(len(t.split()) for t in texts)
        for t in texts:
            for rate in (2, 4):
                assert cache.get(cache_key(t, FP, rate)).shape[0] == -(-len(t.split()) // rate)
        again = precompute_rates(model, cache, texts, [2, 4], chunk_size=200, chunk_overlap=0, progress=False)
        assert [r.skipped for r in again] == [7, 7] and not any(r.computed for r in again)
    with pytest.raises(ValueError, match="rate 8 is not supported"):
        precompute_rates(model, cache, texts, [4, 8], progress=False)
    assert len(chunked) == 2  # the bad rate is refused before the source is read
    with pytest.raises(ValueError, match="sequence of rates"):
        precompute_rates(model, cache, texts, 4, progress=False)
