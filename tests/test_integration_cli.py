"""The `gmsa-rag` job and its helpers: FAISS index persistence, the ask command (tiny model), and one
real run on SmolLM2 + MiniLM (marked real_model)."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gmsa_rag import GMSAConfig, GMSAModel, cli, rag
from gmsa_rag.backbone import load_tokenizer, tiny_backbone
from gmsa_rag.markers import store_for

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "examples" / "docs"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer, monkeypatch):
    config = GMSAConfig(base_model="tiny", encoder_layers=2, lsa_layers=1, window=32, lora_rank=4, lora_alpha=8)
    model = GMSAModel(tiny_backbone("llama"), tokenizer, config)
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    real = model.generate_from_segments
    # keep the random model from answering with blank tokens only (so that a first token exists)
    monkeypatch.setattr(model, "generate_from_segments", lambda p, **kw: real(p, suppress_tokens=blank, **kw))
    monkeypatch.setattr(rag, "load_gmsa_model", lambda checkpoint=None, device="cpu": rag.ModelInfo(
        model, False, "tiny random test model", 0.0))
    return model


def test_bundled_docs_and_questions():
    files = sorted(DOCS.glob("*.txt"))
    assert len(files) == 40
    questions = rag.example_questions()
    assert len(questions) == 40
    for q in questions:
        text = (DOCS / q["document"]).read_text()
        assert any(" ".join(a.split()) in text for a in q["answers"]), q


def test_faiss_index_is_persisted_and_reloaded(small_docs, tmp_path, tokenizer):
    embed = rag.hash_embedding()
    first = rag.build_or_load_index(small_docs, embed, tokenizer, persist_root=tmp_path / "idx")
    assert first.built and first.nodes == 3
    assert (first.persist_dir / "default__vector_store.json").is_file()
    second = rag.build_or_load_index(small_docs, embed, tokenizer, persist_root=tmp_path / "idx")
    assert not second.built and second.persist_dir == first.persist_dir and second.nodes == 3
    from llama_index.vector_stores.faiss import FaissVectorStore

    assert isinstance(second.index.vector_store, FaissVectorStore)
    hits = second.index.as_retriever(similarity_top_k=1).retrieve("Lake Superior largest great lake")
    assert hits[0].node.metadata["file_path"] == "16-great-lakes.txt"
    (small_docs / "16-great-lakes.txt").write_text("Changed text.\n")  # any change -> a new index
    third = rag.build_or_load_index(small_docs, embed, tokenizer, persist_root=tmp_path / "idx")
    assert third.built and third.persist_dir != first.persist_dir


def ask_json(small_docs, tmp_path, new_tokens: int, *flags: str) -> list[str]:
    """``gmsa-rag ask`` the demo's question over the small folder, two chunks, a JSON report, on the hash embedder."""
    return ["ask", "who was the author of the art of war", "--docs", str(small_docs), "--cache-dir", str(tmp_path / "c"),
            "--index-dir", str(tmp_path / "idx"), "--embed", "hash", "--top-k", "2", "--max-new-tokens",
            str(new_tokens), "--json", *flags]


def test_ask_json_report(tiny_model, small_docs, tmp_path, capsys):
    argv = ask_json(small_docs, tmp_path, 3)
    assert cli.main(argv) == 0
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert "UNTRAINED" in err and report["trained"] is False
    first, cached, text = report["runs"]
    assert first["computed"] == 2 and cached["memory_hits"] == 2 and cached["computed"] == 0
    assert text["soft_tokens"] == 0 and text["prompt_positions"] > cached["prompt_positions"] > 0
    assert first["sources"][0].split("] ")[1].startswith("32-the-art-of-war.txt")
    assert report["speedup_ttft"] > 0 and report["speedup_end_to_end"] > 0
    # second run (a new process has an empty in-memory store): the soft tokens come from the disk cache
    store_for(tiny_model).clear()
    assert cli.main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["runs"][0]["disk_hits"] == 2 and again["runs"][0]["computed"] == 0


def test_ask_lead_rate_reads_the_best_ranked_chunk_at_its_own_rate(tiny_model, small_docs, tmp_path, capsys):
    argv = ask_json(small_docs, tmp_path, 3, "--no-compare")
    assert cli.main(argv) == 0
    plain = json.loads(capsys.readouterr().out)
    assert cli.main(argv + ["--lead-rate", "2"]) == 0
    led = json.loads(capsys.readouterr().out)
    assert plain["lead_rate"] is None and led["lead_rate"] == 2
    # one of the two chunks at 2x instead of 4x: more soft tokens, and compressed anew (its 2x tokens were not cached)
    assert led["runs"][0]["soft_tokens"] > plain["runs"][0]["soft_tokens"] and led["runs"][0]["computed"] == 1


def test_ask_extractive_answers_quote_the_retrieved_chunks(tiny_model, small_docs, tmp_path, capsys):
    argv = ask_json(small_docs, tmp_path, 4, "--extractive")
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    documents = [p.read_text() for p in small_docs.rglob("*.txt")]
    assert report["extractive"] is True and len(report["runs"]) == 3
    for run in report["runs"]:  # GMSA (fresh, cached) and the uncompressed text: each a span of a chunk
        assert run["answer"] and any(run["answer"] in d for d in documents), run["answer"]
    # --extract-top 1: every answer quotes the retrieved chunk that shares the question's rare words
    assert cli.main(argv + ["--extract-top", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    art_of_war = next(p.read_text() for p in small_docs.rglob("*art-of-war*"))
    assert report["extract_top"] == 1
    for run in report["runs"]:
        assert run["answer"] and run["answer"] in art_of_war, run["answer"]
    assert cli.main(argv[:-1] + ["--extract-top", "1"]) == 2  # without --extractive: refused before any model loads
    assert "add --extractive" in capsys.readouterr().err
    # --extract-penalty: a lean, not a hold: a vanishing one answers as free decoding does
    def answers(extra: list[str]) -> list[str]:
        assert cli.main(extra) == 0
        report = json.loads(capsys.readouterr().out)
        return [run["answer"] for run in report["runs"]], report

    free, _ = answers(argv[:-1])
    held, _ = answers(argv)
    assert free != held  # the check below can fail
    leaning, report = answers(argv + ["--extract-penalty", "1e-6"])
    assert report["extract_penalty"] == 1e-6 and leaning == free
    for bad in (argv[:-1] + ["--extract-penalty", "4"], argv + ["--extract-penalty", "0"]):
        assert cli.main(bad) == 2
        assert "--extract-penalty leans extractive answers" in capsys.readouterr().err
    # --rerank-top 1: of the two retrieved chunks only the best BM25 match is compressed and read
    assert cli.main(argv + ["--rerank-top", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rerank_top"] == 1
    for run in report["runs"]:
        assert len(run["sources"]) == 1 and "32-the-art-of-war.txt" in run["sources"][0], run["sources"]
        assert run["answer"] and run["answer"] in art_of_war, run["answer"]
    assert cli.main(argv + ["--rerank-top", "-1"]) == 2


def test_ask_keeps_by_default_as_many_chunks_as_the_checkpoint_was_trained_to_read(tiny_model, small_docs, tmp_path,
                                                                                   capsys):
    argv = ask_json(small_docs, tmp_path, 2, "--no-compare")
    text_argv = [a for a in argv if a != "--json"]  # the report as text
    assert cli.main(argv) == 0  # nothing recorded (an untrained model): every retrieved chunk is read
    report = json.loads(capsys.readouterr().out)
    assert report["rerank_top"] == 0 and len(report["runs"][0]["sources"]) == 2
    tiny_model.config.extra = {"train_config": {"stage": "keft", "max_docs": 1, "no_compress": False}}
    assert cli.main(argv) == 0  # a one-document stage 2: BM25 keeps the best-matching chunk
    report = json.loads(capsys.readouterr().out)
    assert report["rerank_top"] == 1 and len(report["runs"][0]["sources"]) == 1
    assert "32-the-art-of-war.txt" in report["runs"][0]["sources"][0]
    assert cli.main(text_argv) == 0
    assert "rerank:   BM25 keeps the 1 of the 2 retrieved chunks" in capsys.readouterr().out  # and says so
    assert cli.main(argv + ["--rerank-top", "0"]) == 0  # asked for all: all
    report = json.loads(capsys.readouterr().out)
    assert report["rerank_top"] == 0 and len(report["runs"][0]["sources"]) == 2
    tiny_model.config.extra["train_config"].update(max_docs=5, doc_order="bm25_last")  # a reader of ranked chunks
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rerank_top"] == 5 and report["document_order"] == "bm25_last"
    sources = report["runs"][0]["sources"]
    assert len(sources) == 2 and "32-the-art-of-war.txt" in sources[1]  # the best match last, nearest the question
    assert cli.main(text_argv) == 0
    assert "order:    the chunks reach the reader in BM25 order, best match last" in capsys.readouterr().out
    assert cli.main(argv + ["--keep-confident", "0"]) == 0  # the art-of-war chunk leads: it alone is read
    report = json.loads(capsys.readouterr().out)
    assert report["keep_confident"] == 0.0 and len(report["runs"][0]["sources"]) == 1
    assert "32-the-art-of-war.txt" in report["runs"][0]["sources"][0]
    assert cli.main(argv + ["--keep-confident", "-1"]) == 2


def test_ask_engine_choice(tiny_model, small_docs, tmp_path, capsys):
    from gmsa_rag.engine import select_engine

    base = ["ask", "who wrote it", "--docs", str(small_docs), "--cache-dir", str(tmp_path / "c"), "--embed", "hash",
            "--max-new-tokens", "2", "--no-compare", "--json"]
    for extra, expected in (([], select_engine("cpu")), (["--engine", "static"], "static"), (["--engine", "hf"], "hf")):
        assert cli.main(base + extra) == 0
        assert json.loads(capsys.readouterr().out)["engine"] == expected
    # --device cuda: auto is the static path with CUDA graphs (select_engine on the model's device)
    assert select_engine("cuda:0", "auto") == "static"


def test_ask_text_output(tiny_model, small_docs, tmp_path, capsys):
    argv = ["ask", "which is the largest great lake", "--docs", str(small_docs), "--cache-dir",
            str(tmp_path / "c"), "--index-dir", str(tmp_path / "idx"), "--embed", "hash", "--max-new-tokens", "2", "--response-mode", "refine"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    for needle in ("UNTRAINED", "answer (GMSA, rate 4", "sources:", "16-great-lakes.txt", "speed-up", "TTFT"):
        assert needle in out


def test_ask_errors(tiny_model, small_docs, tmp_path, capsys):
    assert cli.main(["ask", "q", "--docs", str(tmp_path / "missing"), "--embed", "hash"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["ask", "q", "--docs", str(small_docs), "--rate", "3", "--embed", "hash",
                     "--cache-dir", str(tmp_path / "c")]) == 2
    assert "not allowed" in capsys.readouterr().err
    assert cli.main(["ask", "q", "--docs", str(small_docs), "--max-new-tokens", "9000", "--embed", "hash",
                     "--cache-dir", str(tmp_path / "c")]) == 2
    assert "--max-new-tokens 9000 leaves too little of the base model's" in capsys.readouterr().err
    assert cli.main(["ask", "q", "--docs", str(small_docs), "--extract-top", "-1", "--extractive"]) == 2
    assert "--extract-top must be 0" in capsys.readouterr().err
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("  \n\n ")
    assert cli.main(["ask", "q", "--docs", str(blank), "--embed", "hash", "--cache-dir", str(tmp_path / "c")]) == 2
    assert "no documents with text in" in capsys.readouterr().err


def test_examples_and_module_entry_point(capsys):
    assert cli.main(["examples"]) == 0
    assert "art of war" in capsys.readouterr().out
    proc = subprocess.run([sys.executable, "-m", "gmsa_rag.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ask" in proc.stdout


@pytest.mark.real_model
def test_real_cli_on_smollm2(tmp_path, small_docs, capsys):
    """The real job: SmolLM2 (untrained compressor unless a checkpoint is bundled) + MiniLM + FAISS."""
    argv = ["ask", "who was the author of the art of war", "--docs", str(small_docs), "--top-k", "2",
            "--cache-dir", str(tmp_path / "c"), "--index-dir", str(tmp_path / "idx"), "--max-new-tokens", "8", "--json"]
    assert cli.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    first, cached, text = report["runs"]
    assert first["sources"][0].split("] ")[1].startswith("32-the-art-of-war.txt")
    kept = min(report["rerank_top"] or 2, 2)  # as many as the bundled checkpoint was trained to read (5: both)
    assert len(first["sources"]) == kept and first["computed"] == kept and cached["memory_hits"] == kept
    assert text["prompt_positions"] > cached["prompt_positions"] > 0
    assert cached["soft_tokens"] > 0 and text["answer"]
