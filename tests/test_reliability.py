"""Issue 13: every bad input and fault ends in one clear line and its exit status, and nothing is lost.

Both command-line tools run in-process on a tiny random GMSA checkpoint (saved to disk with its base
model, so that loading is the real code path) and the hashed bag-of-words embedding.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gmsa_rag import GMSAConfig, GMSAModel, cli, rag
from gmsa_rag.backbone import tiny_backbone
from gmsa_rag.cache import SoftTokenCache, cache_key
from gmsa_rag.cache.__main__ import main as cache_main
from gmsa_rag.errors import (
    EXIT_CACHE,
    EXIT_CHECKPOINT,
    EXIT_DEVICE,
    EXIT_INTERRUPTED,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_USAGE,
)

REPO = Path(__file__).resolve().parent.parent
QUESTION = "who was the author of the art of war"


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer) -> Path:
    """A tiny GMSA checkpoint whose base model is a local folder: loads for real, in about a second."""
    root = tmp_path_factory.mktemp("tiny")
    tiny_backbone("llama").save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    config = GMSAConfig(base_model=str(root / "base"), encoder_layers=2, lsa_layers=1, window=32,
                        lora_rank=4, lora_alpha=8)
    GMSAModel.from_base(config).save_pretrained(root / "ckpt")
    return root / "ckpt"


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fail the test if either tool starts loading a model."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(rag, "load_gmsa_model", refuse)
    monkeypatch.setattr(GMSAModel, "from_pretrained", refuse)


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of a CLI run (argparse errors exit through SystemExit)."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def ask_argv(small_docs: Path, checkpoint: Path, cache_dir: Path, index_dir: Path, *extra) -> list:
    return ["ask", QUESTION, "--docs", small_docs, "--checkpoint", checkpoint, "--cache-dir", cache_dir,
            "--index-dir", index_dir, "--embed", "hash", "--top-k", "2", "--max-new-tokens", "2",
            "--no-compare", "--no-progress", *extra]


def ask(capsys, *argv) -> dict:
    """The JSON report of a successful ``ask``."""
    status, out, err = run(cli.main, ask_argv(*argv, "--json"), capsys)
    assert status == EXIT_OK, err
    return json.loads(out)


def filled_cache(directory: Path, n: int = 4) -> dict[str, torch.Tensor]:
    """A healthy cache of ``n`` entries, one of them big enough for a value file; returns them."""
    entries = {cache_key(f"chunk {i}", "fp", 4): torch.randn(300 if i == 0 else 2, 32) for i in range(n)}
    with SoftTokenCache(directory) as cache:
        cache.put_many(entries)
    return entries


def assert_intact(directory: Path, entries: dict[str, torch.Tensor]) -> None:
    with SoftTokenCache(directory, readonly=True) as cache:
        assert len(cache) == len(entries)
        for key, tensor in entries.items():
            assert torch.equal(cache.get(key), tensor)


def assert_intact_count(cdir: Path, n: int) -> None:
    with SoftTokenCache(cdir, readonly=True) as cache:
        assert len(cache) == n


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, but SQLite's WAL files, which a reader of a writable folder may leave behind."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm")))
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in files}


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture()
def read_only(monkeypatch):
    """Make a folder read-only. Root writes anyway, so for root the cache is also told what an
    ordinary user's ``os.access`` would say."""
    made = []

    def make(folder: Path) -> Path:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
            made.append(path)
        if os.geteuid() == 0:
            real = os.access
            inside = folder.resolve()

            def access(path, mode, **kwargs):
                if mode & os.W_OK and Path(path).resolve().is_relative_to(inside):
                    return False
                return real(path, mode, **kwargs)

            monkeypatch.setattr(os, "access", access)
        return folder

    yield make
    for path in made:
        path.chmod(path.stat().st_mode | 0o200)


# ------------------------------------------------------------------------------- damaged cache database
def test_damaged_cache_database_message_exit_status_and_clear_force(tmp_path, capsys, small_docs, checkpoint, no_model_load):
    cdir = tmp_path / "cache"
    filled_cache(cdir)
    (cdir / "NOTES.txt").write_text("not the cache's")
    with open(cdir / "cache.db", "r+b") as f:
        f.write(b"\xff" * 100)  # the SQLite header
    before = snapshot(cdir)
    fix = f"clear --force --yes --cache-dir {cdir}"
    for argv in (["stats", "--cache-dir", cdir], ["clear", "--yes", "--cache-dir", cdir]):
        status, _, err = run(cache_main, argv, capsys)
        line = one_line(err)
        assert status == EXIT_CACHE and f"soft-token cache {cdir} is damaged" in line and fix in line
    status, _, err = run(cli.main, ask_argv(small_docs, checkpoint, cdir, tmp_path / "idx"), capsys)
    assert status == EXIT_CACHE and fix in one_line(err)  # and no model was loaded
    assert snapshot(cdir) == before  # nothing deleted without --force

    status, out, err = run(cache_main, ["clear", "--force", "--yes", "--cache-dir", cdir], capsys)
    assert status == EXIT_OK and f"removed the damaged cache in {cdir}" in out
    assert sorted(p.name for p in cdir.iterdir()) == ["NOTES.txt"]  # only the cache's own files went
    assert_intact(cdir, filled_cache(cdir))  # usable again


def test_clear_force_on_a_healthy_cache_clears_entries(tmp_path, capsys):
    cdir = tmp_path / "cache"
    filled_cache(cdir, 3)
    status, out, _ = run(cache_main, ["clear", "--force", "--yes", "--cache-dir", cdir], capsys)
    assert status == EXIT_OK and "removed 3 entries" in out
    assert_intact(cdir, {})


# ------------------------------------------------------------------------------------ read-only cache
def test_read_only_cache_serves_stats_and_lookups_and_refuses_writes(tmp_path, capsys, small_docs, checkpoint, read_only):
    cdir, idx = tmp_path / "cache", tmp_path / "idx"
    assert ask(capsys, small_docs, checkpoint, cdir, idx)["runs"][0]["computed"] == 2
    before = snapshot(read_only(cdir))

    status, out, _ = run(cache_main, ["stats", "--cache-dir", cdir], capsys)
    assert status == EXIT_OK and "entries:         2" in out
    status, _, err = run(cache_main, ["clear", "--yes", "--cache-dir", cdir], capsys)
    line = one_line(err)
    assert status == EXIT_CACHE and f"soft-token cache {cdir} cannot be written" in line and "writable" in line

    report = ask(capsys, small_docs, checkpoint, cdir, idx)
    first = report["runs"][0]
    assert report["cache_readonly"] and first["disk_hits"] == 2 and first["computed"] == 0
    report = ask(capsys, small_docs, checkpoint, cdir, idx, "--top-k", "3")  # one chunk more: computed, not stored
    assert report["runs"][0]["disk_hits"] == 2 and report["runs"][0]["computed"] == 1
    status, out, _ = run(cli.main, ask_argv(small_docs, checkpoint, cdir, idx, "--top-k", "3"), capsys)
    assert status == EXIT_OK and "is read-only" in out and "1 compressed now (not stored: the cache is read-only)" in out
    assert snapshot(cdir) == before  # not a byte written


def test_read_only_cache_object_writes_nothing(tmp_path):
    cdir = tmp_path / "cache"
    entries = filled_cache(cdir, 3)
    before = snapshot(cdir)
    with SoftTokenCache(cdir, readonly=True) as cache:
        key = next(iter(entries))
        assert torch.equal(cache.get(key), entries[key]) and key in cache and len(cache) == 3
        cache.put(cache_key("new", "fp", 4), torch.ones(1, 2))
        assert not cache.delete(key) and len(cache) == 3 and cache.stats().entries == 3
        with pytest.raises(Exception, match="read-only"):
            cache.clear()
    assert snapshot(cdir) == before
    with SoftTokenCache(tmp_path / "absent", readonly=True) as cache:  # nothing is created
        assert len(cache) == 0 and cache.get(key) is None
    assert not (tmp_path / "absent").exists()


def test_read_only_cache_from_other_threads_and_after_close(tmp_path):
    import concurrent.futures

    entries = filled_cache(tmp_path / "cache", 3)
    cache = SoftTokenCache(tmp_path / "cache", readonly=True)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # e.g. GMSACompressor's async path
        got = list(pool.map(cache.get, entries))
    assert all(torch.equal(g, t) for g, t in zip(got, entries.values()))
    cache.close()
    assert len(cache) == 3 and cache.stats().entries == 3  # reconnects, like diskcache
    cache.close()


# ------------------------------------------------------------------------ one meaning of --cache-dir
def test_both_tools_read_and_write_the_same_cache_dir(tmp_path, capsys, small_docs, checkpoint):
    cdir, idx = tmp_path / "cache", tmp_path / "idx"
    report = ask(capsys, small_docs, checkpoint, tmp_path / "first", idx)
    assert not {"indexes", "soft_tokens"} & {p.name for p in (tmp_path / "first").iterdir()}
    index_dir = Path(report["index_dir"])
    assert index_dir.parent == idx

    status, out, err = run(cache_main, ["build", "--source", index_dir, "--cache-dir", cdir, "--checkpoint", checkpoint,
                                        "--rate", "4", "--no-progress", "--json"], capsys)
    assert status == EXIT_OK, err
    built = json.loads(out)["computed"]
    first = ask(capsys, small_docs, checkpoint, cdir, idx)["runs"][0]
    assert first["disk_hits"] == 2 and first["computed"] == 0  # the cache built for the store is used
    assert_intact_count(cdir, built)


def test_layout_of_an_older_ask_cache_dir_is_recognised(tmp_path, capsys, small_docs, checkpoint, no_model_load):
    old = tmp_path / "old"
    filled_cache(old / "soft_tokens", 2)
    (old / "indexes").mkdir()
    for main, argv in ((cache_main, ["stats", "--cache-dir", old]),
                       (cli.main, ask_argv(small_docs, checkpoint, old, tmp_path / "idx"))):
        status, _, err = run(main, argv, capsys)
        assert status == EXIT_USAGE and f"pass --cache-dir {old / 'soft_tokens'}" in one_line(err)
    assert_intact_count(old / "soft_tokens", 2)


# ------------------------------------------------------------------------- hits from valid reads only
def test_hits_count_only_valid_reads(tmp_path, capsys, small_docs, checkpoint):
    cdir, idx = tmp_path / "cache", tmp_path / "idx"
    ask(capsys, small_docs, checkpoint, cdir, idx)
    with SoftTokenCache(cdir) as cache:
        victim = next(iter(cache.backend))
        cache.backend.set(victim, b"damaged entry")
    first = ask(capsys, small_docs, checkpoint, cdir, idx)["runs"][0]
    assert first["disk_hits"] == 1 and first["computed"] == 1
    status, out, _ = run(cli.main, ask_argv(small_docs, checkpoint, cdir, idx), capsys)
    assert status == EXIT_OK and "2 loaded from the disk cache" in out  # recomputed and stored again


# ----------------------------------------------------------------------------------------- binary files
def test_binary_files_are_skipped_with_one_warning_each(tmp_path, caplog, small_docs, tokenizer):
    (small_docs / "elf.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    noise = random.Random(0).randbytes(4096)
    assert b"\0" in noise
    (small_docs / "random.txt").write_bytes(noise)
    (small_docs / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me, a text in Latin-1.".encode("latin-1"))
    for _ in range(2):  # each run warns once per file
        caplog.clear()
        info = rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer, persist_root=tmp_path / "idx")
        files = {n.metadata["file_path"] for n in info.index.docstore.docs.values()}
        assert files == {"32-the-art-of-war.txt", "27-manchester-united-f-c.txt", "16-great-lakes.txt", "latin1.txt"}
        messages = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        for name in ("elf.txt", "random.txt"):
            assert [m for m in messages if name in m] == [f"skipping {small_docs / name}: a binary file, not text"]
        assert len([m for m in messages if "latin1.txt" in m and "not valid UTF-8" in m]) == 1
        assert len(messages) == 3


def test_cache_build_skips_binary_files_too(tmp_path, caplog, small_docs):
    """`python -m gmsa_rag.cache build --source <folder>` reads folders with the same loader: binaries skipped."""
    from gmsa_rag.cache import load_folder

    (small_docs / "elf.txt").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 8)
    files = {d.metadata["file_path"] for d in load_folder(small_docs)}
    assert "elf.txt" not in files and "32-the-art-of-war.txt" in files
    assert [r.getMessage() for r in caplog.records if "elf.txt" in r.getMessage()] == [
        f"skipping {small_docs / 'elf.txt'}: a binary file, not text"]


# ------------------------------------------------------------------------- messages, not tracebacks
@pytest.mark.parametrize("question", ["", "   "])
def test_empty_question(tmp_path, capsys, small_docs, checkpoint, question, no_model_load):
    argv = ask_argv(small_docs, checkpoint, tmp_path / "c", tmp_path / "idx")
    argv[1] = question
    status, _, err = run(cli.main, argv, capsys)
    assert status == EXIT_USAGE and "the question is empty" in one_line(err)


def corrupt_copy(checkpoint: Path, dest: Path) -> Path:
    shutil.copytree(checkpoint, dest)
    shard = sorted(dest.glob("model*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return dest


def build_argv(source: Path, cache_dir: Path, checkpoint: Path, *extra) -> list:
    return ["build", "--source", source, "--cache-dir", cache_dir, "--checkpoint", checkpoint, "--rate", "4", *extra]


@pytest.mark.parametrize("problem", ["missing", "corrupted"])
def test_checkpoint_errors_in_both_tools(tmp_path, capsys, small_docs, checkpoint, problem):
    bad = tmp_path / "missing" if problem == "missing" else corrupt_copy(checkpoint, tmp_path / "bad")
    cdir = tmp_path / "cache"
    entries = filled_cache(cdir)
    expect = "is not a GMSA checkpoint" if problem == "missing" else "is corrupted (checksum mismatch)"
    for main, argv in ((cache_main, build_argv(small_docs, cdir, bad)), (cli.main, ask_argv(small_docs, bad, cdir, tmp_path / "idx"))):
        status, _, err = run(main, argv, capsys)
        line = one_line(err)
        assert status == EXIT_CHECKPOINT and str(bad) in line and expect in line and "pass --checkpoint" in line
    assert_intact(cdir, entries)


def test_base_model_not_on_this_machine(tmp_path, small_docs, checkpoint):
    """In fresh processes: both tools must turn offline mode on before huggingface_hub is imported (else
    the Hub is retried for about a minute, with warnings, before the same error)."""
    hub = shutil.copytree(checkpoint, tmp_path / "hub")
    record = json.loads((hub / "gmsa_config.json").read_text())
    record["base_model"] = record["config"]["base_model"] = "no-such-org/no-such-model"
    (hub / "gmsa_config.json").write_text(json.dumps(record))
    env = {k: v for k, v in subprocess_env().items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    for module, argv in (("gmsa_rag.cache", build_argv(small_docs, tmp_path / "c", hub)),
                         ("gmsa_rag.cli", ask_argv(small_docs, hub, tmp_path / "c", tmp_path / "i"))):
        proc = subprocess.run([sys.executable, "-m", module, *map(str, argv)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=tmp_path)
        line = one_line(proc.stderr)
        assert proc.returncode == EXIT_MODEL
        assert "'no-such-org/no-such-model' is not on this machine" in line and "hf download" in line


def test_unavailable_device_is_refused_before_loading(tmp_path, capsys, small_docs, checkpoint, no_model_load):
    device = "cuda:99" if torch.cuda.is_available() else "cuda"
    for main, argv in ((cache_main, build_argv(small_docs, tmp_path / "c", checkpoint, "--device", device)),
                       (cli.main, ask_argv(small_docs, checkpoint, tmp_path / "c", tmp_path / "i", "--device", device))):
        status, _, err = run(main, argv, capsys)
        assert status == EXIT_DEVICE and f"torch device {device!r} is not available" in one_line(err)


def test_stats_and_clear_never_create_a_cache(tmp_path, capsys):
    typo = tmp_path / "typo" / "path"
    for argv in (["stats", "--cache-dir", typo], ["clear", "--yes", "--cache-dir", typo]):
        status, _, err = run(cache_main, argv, capsys)
        assert status == EXIT_USAGE and f"no soft-token cache at {typo}" in one_line(err)
    assert not (tmp_path / "typo").exists()
    file = tmp_path / "file"
    file.write_text("x")
    status, _, err = run(cache_main, ["stats", "--cache-dir", file], capsys)
    assert status == EXIT_USAGE and f"--cache-dir {file} is a file" in one_line(err)


BAD_ARGUMENTS = [
    ("ask", ["--rate", "0"], "--rate"),
    ("ask", ["--rate", "3"], "--rate 3 is not allowed"),
    ("ask", ["--lead-rate", "3"], "--lead-rate 3 is not allowed"),
    ("ask", ["--lead-rate", "0"], "--lead-rate"),
    ("ask", ["--rate", "four"], "--rate"),
    ("ask", ["--top-k", "0"], "--top-k"),
    ("ask", ["--max-new-tokens", "0"], "--max-new-tokens"),
    ("ask", ["--docs", "/no/such/folder"], "--docs /no/such/folder not found"),
    ("build", ["--rate", "3"], "--rate 3 is not allowed"),
    ("build", ["--batch-size", "0"], "--batch-size"),
    ("build", ["--chunk-size", "0"], "--chunk-size"),
    ("build", ["--chunk-overlap", "-1"], "--chunk-overlap"),
    ("build", ["--chunk-size", "64", "--chunk-overlap", "64"], "--chunk-overlap (64) must be smaller"),
    ("build", ["--size-limit", "0"], "--size-limit"),
    ("build", ["--eviction-policy", "random"], "--eviction-policy"),
    ("build", ["--source", "/no/such/folder"], "--source /no/such/folder does not exist"),
]


@pytest.mark.parametrize("tool, bad, message", BAD_ARGUMENTS)
def test_bad_arguments_are_refused_before_any_model_loads(tmp_path, capsys, small_docs, checkpoint, no_model_load, tool, bad, message):
    argv = (ask_argv(small_docs, checkpoint, tmp_path / "c", tmp_path / "i") if tool == "ask"
            else build_argv(small_docs, tmp_path / "c", checkpoint))
    status, _, err = run(cli.main if tool == "ask" else cache_main, argv + bad, capsys)
    assert status == EXIT_USAGE and message in err and "Traceback" not in err
    assert not (tmp_path / "c").exists()


def subprocess_env() -> dict[str, str]:
    """This checkout's code first on the path, whatever the installed editable copies point to."""
    paths = [REPO, *sorted((REPO / "integrations").glob("llama-index-*"))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}


def test_help_examples_and_stats_do_not_import_the_model_stack(tmp_path):
    filled_cache(tmp_path / "cache", 2)
    script = f"""
import contextlib, io, sys
from gmsa_rag import cli
from gmsa_rag.cache.__main__ import main as cache_main
with contextlib.redirect_stdout(io.StringIO()) as out:
    for argv in (["--help"], ["ask", "--help"]):
        try:
            cli.main(argv)
        except SystemExit:
            pass
    for argv in (["stats", "--help"], ["build", "--help"]):
        try:
            cache_main(argv)
        except SystemExit:
            pass
    assert cli.main(["examples"]) == 0
    assert cache_main(["stats", "--cache-dir", {str(tmp_path / "cache")!r}]) == 0
assert "exit status:" in out.getvalue() and "entries:         2" in out.getvalue()
print(sorted(m for m in ("torch", "transformers", "peft", "llama_index.core", "safetensors") if m in sys.modules))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=subprocess_env(), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------- index builds
def test_index_build_uses_a_folder_of_its_own_and_keeps_an_index_persisted_first(tmp_path, small_docs, tokenizer, monkeypatch):
    from llama_index.core import StorageContext

    real_persist = StorageContext.persist
    folders = []

    def persist_while_another_process_wins(self, persist_dir, **kwargs):
        folders.append(Path(persist_dir))
        real_persist(self, persist_dir=persist_dir, **kwargs)
        final = Path(persist_dir).parent / Path(persist_dir).name.split(".tmp-")[0]
        real_persist(self, persist_dir=str(final))  # the other process renames its folder first

    monkeypatch.setattr(StorageContext, "persist", persist_while_another_process_wins)
    info = rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer, persist_root=tmp_path / "idx")
    assert info.built and f".tmp-{os.getpid()}-" in folders[0].name
    assert [p.name for p in (tmp_path / "idx").iterdir()] == [info.persist_dir.name]  # no leftovers
    monkeypatch.undo()
    again = rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer, persist_root=tmp_path / "idx")
    assert not again.built and again.nodes == info.nodes


def _build_in_process(small_docs, tokenizer, root, barrier, queue) -> None:
    try:
        barrier.wait(timeout=60)
        info = rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer, persist_root=root)
        queue.put((info.persist_dir.name, info.nodes, None))
    except BaseException as exc:  # report, don't hang the parent
        queue.put((None, 0, repr(exc)))


def test_two_processes_build_the_same_index_at_once(tmp_path, small_docs, tokenizer):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    barrier, queue = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_build_in_process, args=(small_docs, tokenizer, tmp_path / "idx", barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [r[2] for r in results] == [None, None]
    assert results[0][:2] == results[1][:2]
    assert [p.name for p in (tmp_path / "idx").iterdir()] == [results[0][0]]
    assert not rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer, persist_root=tmp_path / "idx").built


def test_progress_bars_and_no_progress(tmp_path, capsys, small_docs, checkpoint):
    from transformers.utils import logging as hf_logging

    rag.build_or_load_index(small_docs, rag.hash_embedding(), tokenizer_of(checkpoint), persist_root=tmp_path / "a", progress=True)
    assert "Generating embeddings" in capsys.readouterr().err
    status, _, err = run(cli.main, ask_argv(small_docs, checkpoint, tmp_path / "c", tmp_path / "b"), capsys)
    assert status == EXIT_OK and "Generating embeddings" not in err and "Parsing nodes" not in err

    hf_logging.enable_progress_bar()
    status, _, err = run(cache_main, build_argv(small_docs, tmp_path / "c1", checkpoint), capsys)
    assert status == EXIT_OK and "Loading weights" in err and "GMSA compress" in err
    status, _, err = run(cache_main, build_argv(small_docs, tmp_path / "c2", checkpoint, "--no-progress"), capsys)
    assert status == EXIT_OK and "Loading weights" not in err and "GMSA compress" not in err


def tokenizer_of(checkpoint: Path):
    from gmsa_rag.backbone import load_tokenizer

    return load_tokenizer(json.loads((checkpoint / "gmsa_config.json").read_text())["base_model"])


# ----------------------------------------------------------------------------------------------- Ctrl-C
def test_ctrl_c_during_build_keeps_what_was_stored(tmp_path, capsys, small_docs, checkpoint, monkeypatch):
    cdir = tmp_path / "cache"
    real = GMSAModel.compress
    calls = []

    def compress_then_ctrl_c(self, texts, rate, batch_size=16):
        calls.append(len(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, texts, rate, batch_size=batch_size)

    monkeypatch.setattr(GMSAModel, "compress", compress_then_ctrl_c)
    argv = build_argv(small_docs, cdir, checkpoint, "--batch-size", "2", "--chunk-size", "128", "--chunk-overlap", "8",
                      "--no-progress", "--json")
    status, out, err = run(cache_main, argv, capsys)
    line = one_line(err)
    assert status == EXIT_INTERRUPTED and line.startswith("error: interrupted (Ctrl-C)") and "are kept" in line
    assert_intact_count(cdir, 2)  # the first batch
    monkeypatch.undo()
    status, out, err = run(cache_main, argv, capsys)
    report = json.loads(out)
    assert status == EXIT_OK and report["skipped"] == 2 and report["computed"] == report["unique_chunks"] - 2


def test_ctrl_c_during_ask(tmp_path, capsys, small_docs, checkpoint, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(rag, "load_gmsa_model", interrupted)
    status, _, err = run(cli.main, ask_argv(small_docs, checkpoint, tmp_path / "c", tmp_path / "i"), capsys)
    assert status == EXIT_INTERRUPTED and one_line(err).startswith("error: interrupted")



def test_ask_reads_one_jsonl_file_and_refuses_a_file_of_another_kind(tmp_path, capsys, small_docs, checkpoint):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"title": p.stem, "text": p.read_text()}) for p in sorted(small_docs.iterdir())))
    report = ask(capsys, corpus, checkpoint, tmp_path / "c", tmp_path / "i")
    assert report["docs"] == str(corpus) and report["runs"][0]["computed"] == 2  # two retrieved chunks compressed
    image = tmp_path / "notes.png"
    image.write_bytes(b"\x89PNG\r\n")
    status, _, err = run(cli.main, ask_argv(image, checkpoint, tmp_path / "c2", tmp_path / "i2"), capsys)
    assert status == EXIT_USAGE and f"--docs {image} is not a document file" in one_line(err)
    assert "JSON lines" in err and not (tmp_path / "c2").exists()
