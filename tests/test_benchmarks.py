"""Smoke tests of the benchmark scripts: each main() runs end to end on tiny random models and writes its files."""
from __future__ import annotations

import gzip
import importlib
import json
import sys
from pathlib import Path

import pytest
import torch

from gmsa_rag.testing import SAMPLE_TEXT, tiny_gmsa

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

PASSAGES = [
    SAMPLE_TEXT,
    "Mount Everest is Earth's highest mountain above sea level, located in the Mahalangur Himal sub-range "
    "of the Himalayas. The China-Nepal border runs across its summit point.",
    "The Great Barrier Reef is the world's largest coral reef system, composed of over 2,900 individual reefs "
    "and 900 islands stretching for over 2,300 kilometres off the coast of Queensland, Australia.",
]


def _bench(name: str):
    return importlib.import_module(name)


@pytest.fixture
def qa_file(tmp_path) -> Path:
    path = tmp_path / "qa.jsonl"
    records = [
        {"question": "Who designed the Eiffel Tower?", "answers": ["Gustave Eiffel"],
         "ctxs": [{"title": "Eiffel Tower", "text": PASSAGES[0], "isgold": True},
                  {"title": "Everest", "text": PASSAGES[1], "isgold": False}]},
        {"question": "Where is the Great Barrier Reef?", "answers": ["Queensland", "Australia"],
         "ctxs": [{"title": "Everest", "text": PASSAGES[1], "isgold": False},
                  {"title": "Reef", "text": PASSAGES[2], "isgold": True}]},
        {"question": "What is the highest mountain?", "answers": ["Mount Everest"],
         "ctxs": [{"title": "Everest", "text": PASSAGES[1], "isgold": True}]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return path


@pytest.fixture
def checkpoints(tokenizer, tmp_path) -> dict[str, Path]:
    out = {}
    for method in ("gmsa", "tcp"):
        model = tiny_gmsa(tokenizer, method=method, window=64)
        out[method] = model.save_pretrained(tmp_path / f"ckpt-{method}")
    return out


def _check_outputs(out_dir: Path, name: str) -> dict:
    for ext in ("md", "json", "png"):
        assert (out_dir / f"{name}.{ext}").stat().st_size > 0, ext
    assert (out_dir / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out_dir / f"{name}.json").read_text())
    assert data["meta"]["machine"] and data["rows"]
    return data


def test_machine_name_and_timing_helpers():
    common = _bench("common")
    assert common.machine_name("cpu").startswith("cpu-") and common.machine_name("cpu").endswith("core")
    timing, result = common.time_fn(lambda: 7, torch.device("cpu"), warmup=1, repeats=3)
    assert result == 7 and len(timing.samples) == 3 and timing.median >= 0
    spec = common.parse_system("mine=gmsa:/tmp/x:8")
    assert (spec.name, spec.kind, spec.path, spec.rate) == ("mine", "gmsa", "/tmp/x", 8)
    assert common.parse_system("b=base:").path is None
    with pytest.raises(Exception):
        common.parse_system("bad=gmsa:")
    table = common.markdown_table([common.Column("a", "A"), common.Column("b", "B", 1)], [{"a": "x", "b": 1.234}])
    assert "| x | 1.2 |" in table


def test_llama7b_shape_builder_uses_given_shape(tokenizer):
    common = _bench("common")
    model = common.build_llama7b_shape(len(tokenizer), torch.device("cpu"), torch.float32, hidden_size=32,
                                       intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=4)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.max_position_embeddings >= 8192
    assert model.get_input_embeddings().weight.shape == (len(tokenizer), 32)


def test_latency_runs_end_to_end(qa_file, tmp_path):
    out = tmp_path / "lat"
    result = _bench("latency").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file),
                                     "--lengths", "48,96", "--doc-tokens", "32", "--rates", "4,8",
                                     "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--fast", "--prefill", "graph",
                                     "--tune-kernels", "--out", str(out)])
    data = _check_outputs(out, "latency")
    assert data["meta"]["fast_path"] and not data["meta"]["fast_compiled"]  # the engine's static path, eager on CPU
    assert data["meta"]["fast_prefill"] == "graph"  # padded prefill, run eagerly here: still HF's tokens (below)
    assert data["meta"]["fast_tune_kernels"]  # (asked for; it changes what compiles, and nothing compiles on CPU)
    rows = result["rows"]
    assert len(rows) == 2 * (1 + 2 * 4)  # per length: uncompressed + 2 rates x (gmsa, tcp) x (cached, online)
    by = {(r["length"], r["method"], r["rate"]): r for r in rows}
    assert by[(96, "uncompressed", None)]["e2e_speedup"] == pytest.approx(1.0)
    assert by[(96, "gmsa-cached", 8)]["prompt_len"] < by[(96, "gmsa-cached", 4)]["prompt_len"] \
        < by[(96, "uncompressed", None)]["prompt_len"]
    assert by[(96, "gmsa-online", 4)]["compress_ms"] > 0
    assert all(r["fast_token_agreement"] == 1.0 and r["fast_e2e_s"] > 0 for r in rows)  # fp32: static == HF
    assert by[(96, "uncompressed", None)]["fast_ttft_speedup"] == pytest.approx(1.0)
    assert "fast TTFT ×" in (out / "latency.md").read_text()  # the product's CUDA path's ratio, tabulated
    assert "UNTRAINED" in (out / "latency.md").read_text()
    assert data["meta"]["question"] == "Who designed the Eiffel Tower?"


def test_qa_runs_end_to_end(qa_file, checkpoints, tmp_path):
    from gmsa_rag.data.qa import load_qa_jsonl

    out = tmp_path / "qa"
    result = _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base",
                                "--gmsa-checkpoint", str(checkpoints["gmsa"]), "--rates", "4", "8",
                                "--system", f"tcp8=tcp:{checkpoints['tcp']}:8", "--max-new-tokens", "4",
                                "--batch-size", "2", "--out", str(out)])
    data = _check_outputs(out, "qa")
    systems = [r["system"] for r in result["rows"]]
    assert systems == ["tcp8 r=8", "base (uncompressed)", "GMSA r=4", "GMSA r=8"]
    for r in result["rows"]:
        assert r["n"] == 3 and 0 <= r["f1"] <= 100 and r["ms_per_query"] > 0 and r["median_ms_per_query"] > 0
    assert len(data["outputs"]) == 3
    gold = _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--gold-only",
                              "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "gold")])
    assert gold["meta"]["documents_per_question"] == 1 and gold["rows"][0]["n"] == 3
    # --extractive (and beams): every answer is a span of its question's documents
    held = _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--gmsa-checkpoint",
                              str(checkpoints["gmsa"]), "--rates", "4", "--extractive", "--num-beams", "2",
                              "--max-new-tokens", "3", "--batch-size", "2", "--out", str(tmp_path / "held")])
    assert "extractive" in held["meta"]["decoding"] and "2 beams" in held["meta"]["decoding"]
    outputs = json.loads((tmp_path / "held" / "qa.json").read_text())["outputs"]
    by_question = {e.question: e.contexts for e in load_qa_jsonl(qa_file)}
    for row in outputs:
        answer = row["GMSA r=4"]
        assert answer and any(answer in c for c in by_question[row["question"]]), answer
    # a pooled QA folder: its dev split as the trainer's dev shows it (gold among the hardest distractors)
    pool = pooled_folder(qa_file, tmp_path / "pool")
    pooled = _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(pool), "--max-docs", "1", "--base",
                                "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "pooled")])
    assert pooled["meta"]["documents_per_question"] == 1 and pooled["rows"][0]["n"] == 3
    with pytest.raises(SystemExit, match="no QA data at"):
        _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(tmp_path / "nowhere"), "--base"])


def pooled_folder(qa_file, folder, train_suffix: str | None = None):
    """The QA file as a pooled QA folder (passages by id, gold among distractors) of a dev split, and with
    ``train_suffix`` a train split of the same questions with that suffix."""
    from gmsa_rag.data.qa import load_qa_jsonl

    folder.mkdir()
    examples = load_qa_jsonl(qa_file)
    texts = sorted({c for e in examples for c in e.contexts})
    ids = {t: i for i, t in enumerate(texts)}
    with gzip.open(folder / "passages.jsonl.gz", "wt") as fh:
        fh.writelines(json.dumps({"id": i, "title": "", "text": t}) + "\n" for t, i in ids.items())
    for split, suffix in (("dev", ""), ("train", train_suffix)):
        if suffix is None:
            continue
        with gzip.open(folder / f"{split}.jsonl.gz", "wt") as fh:
            for e in examples:
                others = [ids[c] for j, c in enumerate(e.contexts) if j != e.gold_index]
                fh.write(json.dumps({"question": e.question + suffix, "answers": e.answers,
                                     "gold": ids[e.contexts[e.gold_index]], "distractors": others}) + "\n")
    return folder


def test_reconstruction_runs_end_to_end(qa_file, checkpoints, tmp_path):
    out = tmp_path / "rec"
    result = _bench("reconstruction").main(["--device", "cpu", "--data", str(qa_file), "--lengths", "16,40",
                                            "--rates", "4", "8", "--num-chunks", "2", "--margin", "2",
                                            "--gmsa-checkpoint", str(checkpoints["gmsa"]),
                                            "--tcp-checkpoint", str(checkpoints["tcp"]), "--out", str(out)])
    _check_outputs(out, "reconstruction")
    rows = result["rows"]
    assert len(rows) == 2 * 2 * 2
    assert {r["system"] for r in rows} == {"GMSA-AE", "TCP-AE"}
    assert {r["checkpoint"] for r in rows} == {str(checkpoints["gmsa"]), str(checkpoints["tcp"])}
    assert result["meta"]["checkpoints"]["GMSA-AE"] == str(checkpoints["gmsa"])
    rec = _bench("reconstruction")  # no system given: the stage-1 compressor, not the stage-2 checkpoint
    specs, _ = rec.systems_from_args(rec.parse_args(["--device", "cpu"]))
    assert [s.path for s in specs if s.kind == "gmsa"] == [str(BENCH.parent / "checkpoints" / "smollm2-gmsa-ae")]
    for r in rows:
        assert 0 <= r["bleu"] <= 100 and 0 <= r["prefix_em"] <= 100


def test_latency_times_text_prompts_on_the_base_model_and_soft_ones_with_the_adapter(tokenizer):
    latency = _bench("latency")
    model = tiny_gmsa(tokenizer, decoder_tuning="qkv_lora")  # a soft-token decoder adapter, as the shipped checkpoint
    assert model._decoder_lora_layers
    seen = []

    class Recorder:
        def generate(self, *args, **kwargs):
            seen.append({m.disable_adapters for m in model._decoder_lora_layers})
            return torch.zeros(1, 1, dtype=torch.long)

    text = [model.qa_prompt("Who?", ["Paris is in France."])]
    soft = [model.qa_prompt("Who?", model.compress(["Paris is in France."], 4))]
    latency.engine_generate(Recorder(), model, lambda: text, 2)
    latency.engine_generate(Recorder(), model, lambda: soft, 2)
    assert seen == [{True}, {False}]  # adapter off for the uncompressed baseline, as in the product


def test_qa_leaves_the_bundled_checkpoints_out_on_another_backbone():
    qa = _bench("qa")
    specs, notes = qa.systems_from_args(qa.parse_args(["--backbone", "tiny", "--device", "cpu"]))
    assert [s.kind for s in specs] == ["base"] and "base model only" in notes[0]


def test_reconstruction_untrained_on_a_tiny_backbone(tmp_path):
    out = tmp_path / "rec2"
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(PASSAGES))
    result = _bench("reconstruction").main(["--backbone", "tiny", "--device", "cpu", "--untrained", "--data", str(text),
                                            "--lengths", "16", "--rates", "8", "--num-chunks", "1", "--margin", "0",
                                            "--no-semantic", "--out", str(out)])
    assert len(result["rows"]) == 2 and result["rows"][0]["semantic"] is None
    assert "UNTRAINED" in (out / "reconstruction.md").read_text()


def test_decode_compares_engines_and_agrees(qa_file, tmp_path):
    out = tmp_path / "dec"
    result = _bench("decode").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--prompt", "48",
                                    "--new-tokens", "3", "--repeats", "1", "--warmup", "0",
                                    "--engines", "hf,static,static-stop", "--out", str(out)])
    data = _check_outputs(out, "decode-tiny")
    assert [r["engine"] for r in result["rows"]] == ["hf", "static", "static-stop"]
    assert [r["path"] for r in result["rows"]] == ["hf", "static", "static"]
    for r in data["rows"]:  # (e2e - TTFT may come out negative from one noisy run: not checked)
        assert r["agreement_with_hf"] == 1.0, r["engine"]
        assert r["step_ms_median"] > 0 and len(r["samples_s"]["steps"]) == 2  # CPU: per-step times by default
    assert data["meta"]["weight_bandwidth_limit_ms"] is None  # CPU: no bandwidth table


def test_decode_profiles_where_a_step_goes(qa_file, tmp_path):
    out = tmp_path / "prof"
    result = _bench("decode").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--prompt", "48",
                                    "--new-tokens", "3", "--repeats", "1", "--warmup", "0", "--engines", "static",
                                    "--profile", "static", "--out", str(out)])
    data = _check_outputs(out, "decode-tiny")
    rows = {r["kernel"]: r for r in data["profile"]}
    assert {"all matrix multiplies", "all other kernels", "device busy", "decode ms/token measured"} <= set(rows)
    parts = rows["all matrix multiplies"]["ms_per_step"] + rows["all other kernels"]["ms_per_step"]
    assert rows["device busy"]["ms_per_step"] == pytest.approx(parts) and parts > 0
    assert rows["all matrix multiplies"]["calls_per_step"] > 0  # (the tiny model's linear layers, on the CPU)
    assert "Where a decode step goes (static)" in (out / "decode-tiny.md").read_text()
    assert result["meta"]["tune_kernels"] is False
    with pytest.raises(SystemExit):
        _bench("decode").parse_args(["--engines", "hf", "--profile", "static"])

    compare = _bench("decode_compare")  # decode runs side by side, read back from their JSON
    made = compare.main(["--run", f"plain={out / 'decode-tiny.json'}", "--run", f"again={out / 'decode-tiny.json'}:static",
                         "--name", "cmp", "--out", str(tmp_path / "cmp")])
    assert [r["label"] for r in made["rows"]] == ["plain", "again"]
    assert made["rows"][0]["decode_ms"] == data["rows"][0]["decode_ms_per_token"] and made["rows"][0]["settings"] == "default"
    _check_outputs(tmp_path / "cmp", "cmp")
    with pytest.raises(SystemExit, match="no engine 'hf'"):
        compare.main(["--run", f"x={out / 'decode-tiny.json'}:hf", "--out", str(tmp_path / "cmp")])


def test_decode_profile_counts_fused_matrix_multiplies_as_such():
    kind = _bench("decode").kernel_kind
    for name in ("nvjet_sm90_tst_128x8_64x12_4x1_v_bz_TNT", "aten::mm", "triton_red_fused__unsafe_view_mm_mul_silu_t_view_7",
                 "triton_red_fused_mm_t_view_6", "triton_poi_fused_addmm_3"):
        assert kind(name) == "matmul", name
    for name in ("triton_red_fused__to_copy__unsafe_view_add_mean_mul_pow_rsqrt_12", "triton_poi_fused_summary_1",
                 "void cublasLt::splitKreduce_kernel<32, 16, int, float>", "aten::add"):
        assert kind(name) == "other", name


@pytest.mark.parametrize("tied", [True, False])
def test_decode_limit_counts_the_weights_a_step_reads(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    decoder = LlamaForCausalLM(config)
    every = sum(p.numel() * p.element_size() for p in decoder.parameters())
    table = 100 * 16 * 4
    # tied: the output layer streams the table; untied: a step gathers one row of the input table
    assert _bench("decode").decode_step_weight_bytes(decoder) == (every if tied else every - table + 16 * 4)


def test_profile_ttft_runs_on_a_tiny_shape(qa_file, tmp_path):
    out = tmp_path / "prof"
    result = _bench("profile_ttft").main(["--shape", "tiny", "--device", "cpu", "--data", str(qa_file),
                                          "--context", "96", "--doc-tokens", "32", "--encoder-layers", "2",
                                          "--repeats", "1", "--warmup", "0", "--profile-steps", "1", "--engine", "static",
                                          "--prefill", "bucket", "--config-dir", str(tmp_path / "cfg"), "--out", str(out)])
    data = _check_outputs(out, "profile_ttft-tiny-bucket")
    assert data["meta"]["prefill"] == "bucket"
    cases = {r["case"]: r for r in result["rows"]}
    assert set(cases) == {"cached", "host", "uncompressed"}
    assert cases["cached"]["positions"] < cases["uncompressed"]["positions"]
    assert any(op["op"] == "gmsa.prefill" for op in data["operators"])  # the engine's own label is in the trace
    assert (out / "profile_ttft-tiny-bucket.trace.json").stat().st_size > 0


def _corpus(tmp_path: Path) -> Path:
    import gzip

    path = tmp_path / "corpus.jsonl.gz"
    with gzip.open(path, "wt") as f:
        for i in range(6):
            text = " ".join(f"Article {i}, part {j}: {PASSAGES[j % 3]}" for j in range(i, i + 4))
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return path


def test_precompute_benchmark_one_then_two_processes(tmp_path):
    import os
    import subprocess

    out, corpus = tmp_path / "pre", _corpus(tmp_path)
    args = ["--backbone", "tiny", "--device", "cpu", "--data", str(corpus), "--num-chunks", "12", "--chunk-size", "48",
            "--chunk-overlap", "8", "--batch-sizes", "2,4", "--encoder-layers", "2", "--out", str(out),
            "--cache-dir", str(tmp_path / "scratch"), "--chunk-cache", str(tmp_path / "chunks")]
    result = _bench("precompute").main(args)
    assert [(r["batch_size"], r["phase"]) for r in result["rows"]] == [
        (b, p) for b in (2, 4) for p in ("precompute", "compress", "forward")]
    assert all(r["chunks"] == 12 and r["tokens"] > 12 and r["tokens_per_s"] > 0 for r in result["rows"])
    # the same through a 2-process launch (torchrun sets RANK / WORLD_SIZE as accelerate launch does)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          str(BENCH / "precompute.py"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    data = _check_outputs(out, "precompute-tiny")
    two = [r for r in data["rows"] if r["processes"] == 2]
    assert len(two) == 6 and all(r["chunks"] == 12 and len(r["per_process"]) == 2 for r in two)
    assert all(r["scaling_vs_1"] > 0 for r in two) and len(data["rows"]) == 12  # the 1-process rows kept


def test_soft_token_states_compares_soft_and_text_positions(qa_file, checkpoints, tmp_path):
    result = _bench("soft_token_states").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file),
                                               "--checkpoint", str(checkpoints["gmsa"]), "--rates", "4", "--limit", "2",
                                               "--out", str(tmp_path)])
    _check_outputs(tmp_path, "soft-token-states")
    curve = result["curves"][4]
    assert len(curve["soft"]) == len(curve["text"]) > 0
    assert all(-1.0 <= c <= 1.0 for c in curve["soft"] + curve["text"])
    assert result["rows"][0]["soft_rms"] > 0 and result["rows"][0]["embed_rms"] > 0
    kinds = [row["what"].split(" (")[0] for row in result["shared"]]
    assert kinds == ["soft tokens", "text states"]  # one rate: soft tokens at it, and the text states once
    for row in result["shared"]:
        assert -1.0 <= row["cos_with_mean"] <= 1.0 and 0.0 < row["top_share"] <= 100.0 and row["rms"] > 0


def test_read_back_restores_then_answers(qa_file, checkpoints, tmp_path):
    result = _bench("read_back").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file),
                                       "--checkpoint", str(checkpoints["gmsa"]), "--answer-checkpoint",
                                       str(checkpoints["gmsa"]), "--text-checkpoint", str(checkpoints["gmsa"]),
                                       "--rates", "2", "4", "--limit", "3", "--max-new-tokens", "4", "--restore-among",
                                       "--out", str(tmp_path)])
    data = _check_outputs(tmp_path, "read-back")
    by_name = {row["condition"]: row for row in result["rows"]}
    assert set(by_name) == {"none", "text-gold", "text-full", "restored@2", "restored@4", "restored-among@2",
                            "restored-among@4", "soft-gold@2", "soft-gold@4", "soft-full@2", "soft-full@4",
                            "fine-tune text-gold", "fine-tune text-full"}
    assert by_name["restored-among@4"]["restoration_bleu"] is not None and len(data["restored_samples"]["restored-among@2"]) == 3
    assert 0 <= by_name["restored-among@2"]["right_document"] <= 100
    assert [(r["rate"], r["part"]) for r in data["split"]] == [(2, "kept"), (2, "lost"), (4, "kept"), (4, "lost")]
    assert sum(r["n"] for r in data["split"] if r["rate"] == 4) == 3
    split = _bench("read_back").split_by_kept(
        {4: [True, False, True]},
        {"base model, text": ["Paris", "Paris", "no"], "soft tokens @4x": ["Paris", "x", "Rome"], "soft tokens @2x": ["Paris"] * 3},
        [["Paris"], ["Paris"], ["Rome"]])
    assert split == [{"rate": 4, "part": "kept", "n": 2, "base model, text": 50.0, "soft tokens @4x": 100.0},
                     {"rate": 4, "part": "lost", "n": 1, "base model, text": 100.0, "soft tokens @4x": 0.0}]
    share = _bench("read_back").right_document_share
    assert share(["the cat sat", "a dog ran far"], [["a dog ran far", "the cat sat"], ["x y", "a dog ran far"]],
                 ["the cat sat", "x y"]) == 50.0
    bench, bc = _bench("read_back"), _bench("common")
    model = bc.load_system(checkpoints["gmsa"], torch.device("cpu"), torch.float32, backbone="tiny")
    alone = bench.restore(model, PASSAGES[:2], 4, 2)
    assert bench.restore(model, PASSAGES[:2], 4, 2, documents=[[PASSAGES[0]], [PASSAGES[1]]]) == alone
    # the passage restored is the one asked for, wherever it sits among the others
    among = bench.restore(model, PASSAGES[:2], 4, 2, documents=[[PASSAGES[2], PASSAGES[0]], [PASSAGES[1], PASSAGES[2]]])
    from gmsa_rag.samples import Sample, build_prompts, token_ids
    ids = token_ids(model, [PASSAGES[2], PASSAGES[0]])
    direct = model.generate_from_segments(build_prompts(model, [Sample(ids, None, rate=4, target_doc=1)]),
                                          max_new_tokens=len(ids[1]) + 8)
    assert among[0] == direct[0].strip()
    # that checkpoint's adapter serves soft tokens only: reading text it is the base model, answer for answer
    assert by_name["fine-tune text-gold"]["accuracy"] == by_name["text-gold"]["accuracy"]
    assert by_name["fine-tune text-full"]["f1"] == by_name["text-full"]["f1"]
    assert all(row["n"] == 3 for row in result["rows"])
    assert by_name["text-gold"]["answer_kept"] == 100.0  # every gold passage holds its answer
    assert by_name["none"]["answer_kept"] is None and by_name["restored@2"]["restoration_bleu"] is not None
    assert len(data["restored_samples"]["restored@4"]) == 3


def test_attention_probe_splits_the_answer_position_over_documents(qa_file, checkpoints, tmp_path):
    result = _bench("attention_probe").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file),
                                             "--checkpoint", str(checkpoints["gmsa"]), "--text-checkpoint",
                                             str(checkpoints["gmsa"]), "--rates", "4", "--limit", "3",
                                             "--out", str(tmp_path)])
    data = _check_outputs(tmp_path, "attention-probe")
    rows = {row["system"]: row for row in result["rows"]}
    assert set(rows) == {"base, text", "GMSA 4x", "fine-tune, text"}
    for row in rows.values():
        assert row["n"] == 3
        assert 0.0 < row["docs_mass"] <= 100.0 + 1e-6  # a share of one attention row
        assert 0.0 <= row["gold_share"] <= 100.0 + 1e-6 and 0.0 < row["chance"] < 100.0
        assert any(abs(row["gold_top"] - k * 100 / 3) < 1e-6 for k in range(4))  # a count out of 3 questions
        assert len(row["lift_by_layer"]) == len(data["rows"][0]["lift_by_layer"]) > 0
    # this checkpoint's adapter serves soft-token prompts only: as a "fine-tune" on text it is the base model again
    text, again = rows["base, text"], rows["fine-tune, text"]
    assert again["gold_share"] == pytest.approx(text["gold_share"]) and again["docs_mass"] == pytest.approx(text["docs_mass"])


def test_shared_component_finds_a_vector_common_to_all():
    torch = pytest.importorskip("torch")
    shared_component = _bench("soft_token_states").shared_component
    generator = torch.Generator().manual_seed(0)
    common = torch.zeros(64)
    common[[5, 17, 40]] = torch.tensor([50.0, -30.0, 20.0])
    mostly_shared = common + torch.randn(200, 64, generator=generator)
    figures = shared_component(mostly_shared)
    assert sorted(figures["top_coords"]) == [5, 17, 40] and figures["cos_with_mean"] > 0.95
    assert figures["top_share"] > 0.9
    spread = shared_component(torch.randn(200, 64, generator=generator))  # no shared vector
    assert spread["cos_with_mean"] < 0.3 and spread["top_share"] < 0.15


def test_answer_probe_scores_every_condition(qa_file, checkpoints, tmp_path):
    result = _bench("answer_probe").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file),
                                          "--checkpoint", str(checkpoints["gmsa"]), "--rates", "4", "--limit", "3",
                                          "--out", str(tmp_path)])
    _check_outputs(tmp_path, "answer-probe")
    by_name = {row["condition"]: row for row in result["rows"]}
    assert {"text-full", "text-gold", "none", "soft-full@4", "soft-gold@4", "soft-other@4"} <= set(by_name)
    assert all(row["n"] == 3 and row["loss"] > 0 for row in by_name.values())
    assert by_name["none"]["vs_none"] == 0.0
    # --split train: a pooled folder's training questions (to tell underfitting from overfitting)
    pool = pooled_folder(qa_file, tmp_path / "pool", train_suffix=" (train)")
    common = ["--backbone", "tiny", "--device", "cpu", "--data", str(pool), "--checkpoint", str(checkpoints["gmsa"]),
              "--rates", "4", "--limit", "2", "--out", str(tmp_path / "pool-out")]
    on_train = _bench("answer_probe").main(common + ["--split", "train"])
    on_dev = _bench("answer_probe").main(common)
    assert on_train["meta"]["split"] == "train" and on_dev["meta"]["split"] == "dev"
    assert on_train["rows"] != on_dev["rows"]  # other questions, other losses


def test_distill_signal_scores_each_term_and_its_gradient(qa_file, checkpoints, tokenizer, tmp_path):
    teacher = tiny_gmsa(tokenizer, window=64, decoder_tuning="qkv_lora", decoder_adapter="always")
    with torch.no_grad():  # a teacher fine-tuned away from the base model
        for name, p in teacher.decoder.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.2)
    teacher_path = teacher.save_pretrained(tmp_path / "teacher")
    student = tiny_gmsa(tokenizer, window=64, decoder_tuning="qkv_lora").save_pretrained(tmp_path / "student")
    common = ["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--checkpoint", str(student),
              "--limit", "3", "--batch-size", "2", "--out", str(tmp_path)]
    result = _bench("distill_signal").main(common + ["--teacher", str(teacher_path)])
    _check_outputs(tmp_path, "distill-signal")
    rows = {row["term"]: row for row in result["rows"]}
    assert set(rows) == {"ce", "kl", "hidden", "soft"} and result["trainable"] > 0
    assert all(row["own"] > 0 and row["grad_norm"] > 0 for row in rows.values())
    assert all(rows[t]["other"] > 0 for t in ("ce", "kl", "hidden")) and rows["soft"]["other"] is None
    assert rows["ce"]["weight_to_match_ce"] == pytest.approx(1.0)
    assert len(result["terms"]["own:hidden_per_layer"]) == teacher.decoder.config.num_hidden_layers
    # the base model as teacher: the same student, another teacher, other KL and hidden terms
    base = _bench("distill_signal").main(common + ["--name", "base-teacher"])
    assert base["terms"]["own:ce"] == pytest.approx(result["terms"]["own:ce"], rel=1e-5)
    assert base["terms"]["own:kl"] != pytest.approx(result["terms"]["own:kl"], rel=1e-3)
    with pytest.raises(SystemExit):
        _bench("distill_signal").main(common + ["--teacher", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="no decoder adapter"):
        _bench("distill_signal").main(common + ["--checkpoint", str(checkpoints["gmsa"])])


def test_answer_probe_places_the_gold_document_among_hard_or_unrelated_ones():
    from gmsa_rag.data.qa import QAExample

    example = QAExample("q?", ["a"], ["d0", "GOLD", "d2", "d3", "d4", "d5"], gold_index=1)
    layouts = _bench("answer_probe").five_documents(example, ["u1", "u2", "u3", "u4", "u5"], place=2)
    assert layouts == {"hard5": ["d0", "d2", "GOLD", "d3", "d4"], "random5": ["u1", "u2", "GOLD", "u3", "u4"]}


def test_training_runs_tabulates_each_metric_against_the_baseline(tmp_path):
    for name, acc, gold in (("base", 4.0, 14.0), ("lever", 6.0, 13.0)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        records = [{"step": 5, "tokens": 1000, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 100.0},
                   {"step": 10, "tokens": 2000, "accuracy@4x": acc, "gold_accuracy@4x": gold}]
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    result = _bench("training_runs").main([
        "--runs", str(tmp_path / "runs" / "base"), str(tmp_path / "runs" / "lever"), "--metric", "accuracy",
        "gold_accuracy", "--baseline", "base", "--name", "t", "--out", str(tmp_path / "out")])
    accuracy, gold = result["tables"]
    assert [row["delta@4x"] for row in accuracy] == [0.0, 2.0]
    assert [row["delta@4x"] for row in gold] == [0.0, -1.0]
    markdown = (tmp_path / "out" / "t.md").read_text()
    assert "Results: accuracy" in markdown and "Results: gold_accuracy" in markdown
    assert (tmp_path / "out" / "t.png").is_file()
    assert result["curves"]["accuracy"]["lever"] == [(2000 / 1e6, 6.0)]  # against tokens seen, in millions
    for name, loss in (("base", 0.15751), ("lever", 0.15463)):  # a loss metric keeps the decimals it differs in
        run = tmp_path / "stage1" / name
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"step": 10, "tokens": 2000, "bleu@4x": 80.0,
                                                       "restore_loss@4x": loss}))
    _bench("training_runs").main(["--runs", str(tmp_path / "stage1" / "base"), str(tmp_path / "stage1" / "lever"),
                                  "--metric", "restore_loss", "--baseline", "base", "--name", "l", "--out", str(tmp_path / "out")])
    assert "| 0.1546 |" in (tmp_path / "out" / "l.md").read_text() and "| -0.0029 |" in (tmp_path / "out" / "l.md").read_text()

    by_step = _bench("training_runs").main([
        "--runs", str(tmp_path / "runs" / "base"), "--metric", "accuracy", "--x_axis", "steps", "--name", "s",
        "--out", str(tmp_path / "out")])
    assert by_step["curves"]["accuracy"]["base"] == [(10, 4.0)]

    shifted = _bench("training_runs").main([  # the last of chained runs, on the whole budget's axes
        "--runs", str(tmp_path / "runs" / "base"), "--metric", "accuracy", "--x_axis", "steps", "--step_offset",
        "base=1713", "--offset", "base=2.5", "--name", "o", "--out", str(tmp_path / "out")])
    assert shifted["curves"]["accuracy"]["base"] == [(1723, 4.0)]
    (row,) = shifted["tables"][0]
    assert row["steps"] == 1723 and row["tokens_m"] == pytest.approx(2.502)
    with pytest.raises(SystemExit, match="RUN=NUMBER"):
        _bench("training_runs").main(["--runs", str(tmp_path / "runs" / "base"), "--step_offset", "other=5",
                                      "--name", "o", "--out", str(tmp_path / "out")])


def test_training_runs_names_the_winner_by_its_last_evaluation(tmp_path, capsys):
    def run(name, evals, checkpoint="step-0000300"):
        folder = tmp_path / name
        (folder / "checkpoints" / checkpoint).mkdir(parents=True)
        (folder / "latest").write_text(checkpoint)
        records = [{"step": 5, "tokens": 1, "loss": 2.0, "lr": 1e-4, "tokens_per_s": 1.0}, *evals]
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
        return str(folder)

    early_best = run("a", [{"step": 150, "accuracy@4x": 20.0}, {"step": 300, "accuracy@4x": 8.0, "gold_accuracy@4x": 40}])
    tie_better_gold = run("b", [{"step": 300, "accuracy@4x": 8.0, "gold_accuracy@4x": 41}])
    later_but_worse = run("c", [{"step": 300, "accuracy@4x": 7.5, "gold_accuracy@4x": 50}])
    bench = _bench("training_runs")
    keys = ["--winner", "accuracy@4x", "gold_accuracy@4x"]
    result = bench.main(["--runs", early_best, tie_better_gold, later_but_worse, *keys])
    assert result["winner"] == tmp_path / "b" / "checkpoints" / "step-0000300"  # the last evaluation, not the best one
    assert capsys.readouterr().out.strip() == str(result["winner"])  # stdout: the path alone, for a script
    assert bench.main(["--runs", early_best, tie_better_gold, "--winner", "accuracy@4x"])["winner"].parent.parent.name == "a"
    better_last = run("d", [{"step": 300, "accuracy@4x": 9.0}])  # a's step 150 (20.0) is not what a ended with
    assert bench.main(["--runs", early_best, better_last, "--winner", "accuracy@4x"])["winner"].parent.parent.name == "d"
    with pytest.raises(SystemExit, match="no run among --runs has an evaluation with bleu@4x"):
        bench.main(["--runs", early_best, "--winner", "bleu@4x"])
    (tmp_path / "b" / "latest").unlink()
    with pytest.raises(SystemExit, match="has no checkpoint"):
        bench.main(["--runs", tie_better_gold, *keys])
    with pytest.raises(SystemExit):  # tables need --out
        bench.main(["--runs", early_best, "--metric", "accuracy"])


def test_training_runs_compares_throughput_after_the_warm_up_windows(tmp_path):
    for name, batch, compiled, speeds in (("eager", 16, False, [1.0, 50.0, 50.0, 60.0]),
                                          ("compiled", 64, True, [0.5, 150.0, 140.0, 160.0])):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "train_config.json").write_text(json.dumps({"batch_size": batch, "grad_accum": 2, "compile": compiled}))
        (run / "metrics.jsonl").write_text("\n".join(
            json.dumps({"step": 2 * i, "tokens": 100 * i, "loss": 1.0, "tokens_per_s": v}) for i, v in enumerate(speeds)))
    result = _bench("training_runs").main([
        "--throughput", "--skip", "1", "--runs", str(tmp_path / "runs" / "eager"), str(tmp_path / "runs" / "compiled"),
        "--baseline", "eager", "--name", "speed", "--out", str(tmp_path / "out")])
    eager, compiled = result["rows"]
    assert (eager["tok_s"], compiled["tok_s"]) == (50.0, 150.0)  # medians without the first (compile) window
    assert compiled["speedup"] == 3.0 and compiled["compile"] and compiled["micro_batch"] == 64
    assert (tmp_path / "out" / "speed.png").is_file() and "x vs eager" in (tmp_path / "out" / "speed.md").read_text()


def test_answer_position_buckets_accuracy_by_where_the_answer_sits(qa_file, checkpoints, tmp_path, tokenizer):
    bench = _bench("answer_position")
    assert bench.answer_offset(tokenizer, "Paris is big.", ["Rome"]) is None
    assert bench.answer_offset(tokenizer, "It is in Paris.", ["paris"]) == len(tokenizer.encode("It is in ", add_special_tokens=False))
    assert bench.bucket_names([16, 48]) == ["0-15", "16-47", "48+"]
    assert [bench.bucket_of(o, [16, 48]) for o in (0, 15, 16, 48, 500)] == [0, 0, 1, 2, 2]
    result = bench.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--checkpoint",
                         str(checkpoints["gmsa"]), "--text-checkpoint", str(checkpoints["gmsa"]), "--rates", "2", "4",
                         "--limit", "3", "--max-new-tokens", "4", "--edges", "4", "--out", str(tmp_path)])
    data = _check_outputs(tmp_path, "answer-position")
    by_name = {row["condition"]: row for row in result["rows"]}
    assert set(by_name) == {"text-gold", "soft-gold@2", "soft-gold@4", "fine-tune text"}
    assert result["counts"]["n"] == 3 and result["counts"]["0-3"] + result["counts"]["4+"] == 3
    assert len(data["offsets"]) == 3
    # that checkpoint's adapter serves soft tokens only: reading text it is the base model
    assert by_name["fine-tune text"]["all"] == by_name["text-gold"]["all"]


def test_answer_overlap_splits_accuracy_by_the_questions_word_overlap(tmp_path):
    """Overlap counts the question's content words in the answer's sentence; accuracy is split into thirds by it."""
    from gmsa_rag.data.qa import QAExample, save_qa_jsonl

    bench = _bench("answer_overlap")
    passage = "Paris is large. The Eiffel Tower was designed by Gustave Eiffel's company. It opened in 1889."
    assert bench.answer_sentence(passage, ["1889"]) == "It opened in 1889."
    assert bench.answer_sentence(passage, ["Rome"]) == passage
    # content words: designed, famous, tower (who/the: function words; eiffel: the answer's own) -> 2 of 3 in it
    assert bench.question_overlap("Who designed the famous Eiffel Tower?", passage, ["Gustave Eiffel"]) == \
        pytest.approx(2 / 3)
    assert bench.question_overlap("Who designed the tower?", passage, ["Gustave Eiffel"]) == 1.0
    assert bench.question_overlap("When was it opened to visitors?", passage, ["1889"]) == pytest.approx(1 / 2)
    assert bench.question_overlap("Who?", passage, ["x"]) == 0.0
    rows, bounds = bench.accuracy_by_third([0.9, 0.1, 0.5, 0.2, 0.8, 0.6], {"s": [1, 0, 0, 0, 1, 1]})
    assert rows[0]["low"] == 0.0 and rows[0]["middle"] == 50.0 and rows[0]["high"] == 100.0 and rows[0]["all"] == 50.0
    assert bounds == [0.2, 0.6, 0.9]
    questions = ["Who designed the tower?", "When was it opened to visitors?", "Who?"]
    answers = [["Gustave Eiffel"], ["1889"], ["x"]]
    data = tmp_path / "dev.jsonl"
    save_qa_jsonl([QAExample(q, a, ["Big Ben is in London.", passage], gold_index=1) for q, a in zip(questions, answers)],
                  data)
    results = tmp_path / "qa.json"
    results.write_text(json.dumps({"outputs": [{"question": q, "answers": a, "base": o} for q, a, o in
                                               zip(questions, answers, ["Gustave Eiffel", "in 1900", "no"])]}))
    out = bench.main(["--results", str(results), "--data", str(data), "--out", str(tmp_path / "out")])
    assert out["overlaps"] == [1.0, 0.5, 0.0] and out["rows"][0]["high"] == 100.0 and out["rows"][0]["low"] == 0.0
    assert (tmp_path / "out" / "answer-overlap.md").is_file()


def test_answer_errors_sorts_answers_by_what_they_are(tmp_path):
    """Right / a wrong span of the gold passage / a distractor's span / partial copies / words from nowhere."""
    from gmsa_rag.data.qa import QAExample, save_qa_jsonl

    kind = _bench("answer_errors").error_kind
    gold, others = "The Eiffel Tower was designed by Gustave Eiffel's company in Paris.", ["Big Ben is in London."]
    assert kind("Gustave Eiffel", ["Gustave Eiffel"], gold, others) == "right"
    assert kind("in Paris", ["Gustave Eiffel"], gold, others) == "wrong span of the gold"
    assert kind("London", ["Gustave Eiffel"], gold, others) == "span of a distractor"
    assert kind("Paris tower company", ["Gustave Eiffel"], gold, others) == "mostly gold words"
    assert kind("Napoleon Bonaparte", ["Gustave Eiffel"], gold, others) == "not in the documents"
    assert kind(" ", ["Gustave Eiffel"], gold, others) == "empty"
    data = tmp_path / "dev.jsonl"
    save_qa_jsonl([QAExample("who designed it?", ["Gustave Eiffel"], [others[0], gold], gold_index=1)], data)
    results = tmp_path / "qa.json"
    results.write_text(json.dumps({"outputs": [{"question": "who designed it?", "answers": ["Gustave Eiffel"],
                                                "GMSA r=4": "London", "base": "Gustave Eiffel did"}]}))
    rows = {r["system"]: r for r in _bench("answer_errors").main(
        ["--results", str(results), "--data", str(data), "--out", str(tmp_path / "out")])["rows"]}
    assert rows["GMSA r=4"]["span of a distractor"] == 100.0 and rows["base"]["right"] == 100.0
    assert (tmp_path / "out" / "answer-errors.md").is_file()
    split = {r["system"]: r for r in _bench("answer_errors").main(
        ["--results", str(results), "--data", str(data), "--out", str(tmp_path / "split"), "--by-bm25-rank"])["rows"]}
    assert set(split) == {"GMSA r=4, gold ranked first by BM25", "base, gold ranked first by BM25"}  # "designed"
    lower = QAExample("where is it?", ["London"], [gold, others[0]], gold_index=1)  # shares no word with either
    assert _bench("answer_errors").bm25_group(lower) == "gold ranked lower by BM25"
    results.write_text(json.dumps({"outputs": [{"question": "another?", "answers": ["x"], "base": "x"}]}))
    with pytest.raises(ValueError, match="do not follow the data file"):
        _bench("answer_errors").main(["--results", str(results), "--data", str(data), "--out", str(tmp_path / "o")])


def test_answer_errors_lays_a_pooled_folder_out_as_the_outputs_were_made(qa_file, tmp_path):
    """--max-docs lays a pooled folder out as qa.py's did; outputs made with other documents per question are refused
    in one line rather than scored against the wrong distractors."""
    from gmsa_rag.data.qa import load_as_shown

    pool = pooled_folder(qa_file, tmp_path / "pool")
    shown = load_as_shown(pool, max_docs=2)
    results = tmp_path / "qa.json"
    results.write_text(json.dumps({
        "meta": {"documents_per_question": 2, "documents": "as in the file (gold among distractors)"},
        "outputs": [{"question": e.question, "answers": e.answers, "base": e.answers[0]} for e in shown]}))
    args = ["--results", str(results), "--data", str(pool), "--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit, match="answered 2 documents per question: pass --max-docs 2"):
        _bench("answer_errors").main(args)
    rows = _bench("answer_errors").main(args + ["--max-docs", "2"])["rows"]
    assert rows[0]["n"] == len(shown) and rows[0]["right"] == 100.0



def test_qa_keeps_or_extracts_from_the_best_matching_documents(qa_file, checkpoints, tmp_path):
    from gmsa_rag.data.qa import load_qa_jsonl
    from gmsa_rag.lexical import best_matching, best_sentences

    qa = _bench("qa")
    examples = load_qa_jsonl(qa_file)
    kept = qa.keep_best_matching(examples, 1)
    assert [len(e.contexts) for e in kept] == [1, 1, 1] and [e.gold_index for e in kept] == [0, 0, 0]
    assert kept[1].contexts == [examples[1].contexts[1]]  # the reef passage, not the first retrieved
    two, last = qa.keep_best_matching(examples, 2), qa.keep_best_matching(examples, 2, best_last=True)
    assert all(b.contexts == a.contexts[::-1] and b.contexts[-1] == k.contexts[0] for a, b, k in zip(two, last, kept))
    assert [b.gold_index for b in last] == [len(a.contexts) - 1 - a.gold_index for a in two]  # the gold follows
    with pytest.raises(SystemExit, match="add --keep-top"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--best-last"])
    from gmsa_rag.lexical import bm25_scores, lead

    leads = [lead(bm25_scores(e.question, e.contexts)) for e in examples]
    margin = sorted(leads)[0]  # the smallest lead: every other example is confident
    confident = qa.keep_best_matching(examples, 2, confident_margin=margin)
    assert [len(c.contexts) for c in confident] == [min(len(e.contexts), 1 if d > margin else 2)
                                                  for e, d in zip(examples, leads)]
    assert any(len(c.contexts) == 1 < len(e.contexts) for c, e in zip(confident, examples))
    assert [c.contexts[0] for c in confident] == [t.contexts[0] for t in two]  # the best kept either way
    with pytest.raises(SystemExit, match="add --keep-top"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--keep-confident", "1"])
    result = qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--keep-top", "1",
                      "--max-new-tokens", "2", "--batch-size", "2", "--out", str(tmp_path / "kept")])
    assert result["meta"]["documents_per_question"] == 1 and "best BM25 match kept" in result["meta"]["documents"]
    held = qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--gmsa-checkpoint",
                    str(checkpoints["gmsa"]), "--rates", "4", "--extractive", "--extract-top", "1",
                    "--max-new-tokens", "3", "--batch-size", "2", "--out", str(tmp_path / "held")])
    assert held["meta"]["documents_per_question"] == [1, 2] and "held to the 1 of best" in held["meta"]["decoding"]
    outputs = json.loads((tmp_path / "held" / "qa.json").read_text())["outputs"]
    for row, e in zip(outputs, examples):
        top = e.contexts[best_matching(e.question, e.contexts, 1)[0]]
        assert row["GMSA r=4"] and row["GMSA r=4"] in top, (row, top)
    with pytest.raises(SystemExit, match="add --extractive"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--extract-top", "1"])
    with pytest.raises(SystemExit, match="add --extractive"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--extract-penalty", "2"])
    with pytest.raises(SystemExit, match="> 0 nats"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--extractive",
                 "--extract-penalty", "0"])
    def answers(*flags: str) -> list[str]:
        out = tmp_path / "-".join(flags or ("free",))
        run = qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", *flags,
                       "--max-new-tokens", "3", "--batch-size", "2", "--out", str(out)])
        assert ("lose 1e-06 nats" in run["meta"]["decoding"]) == ("--extract-penalty" in flags)
        return [row["base (uncompressed)"] for row in json.loads((out / "qa.json").read_text())["outputs"]]

    free, held = answers(), answers("--extractive")
    assert free != held  # the check can fail
    assert answers("--extractive", "--extract-penalty", "1e-6") == free  # a vanishing lean: free answers
    sentence = qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--extractive",
                        "--extract-sentences", "1", "--max-new-tokens", "3", "--batch-size", "2",
                        "--out", str(tmp_path / "sentence")])
    assert "then to the 1 sentence(s) of best BM25 match" in sentence["meta"]["decoding"]
    outputs = json.loads((tmp_path / "sentence" / "qa.json").read_text())["outputs"]
    for row, e in zip(outputs, examples):
        (best,) = best_sentences(e.question, e.contexts, 1)
        assert row["base (uncompressed)"] and row["base (uncompressed)"] in best, (row, best)
    with pytest.raises(SystemExit, match="add --extractive"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--extract-sentences", "1"])


def test_qa_lead_rate_reads_each_questions_best_match_at_its_own_rate(qa_file, checkpoints, tmp_path):
    qa = _bench("qa")

    from gmsa_rag.data.qa import QAExample

    batch = [QAExample("q1", ["x"], ["a", "b"], 0), QAExample("q2", ["y"], ["c", "d", "e"], 1)]
    assert qa.document_rates(batch, 4, 2) == [2, 4, 2, 4, 4]  # each question's first document at the lead rate
    assert qa.document_rates(batch, 4, 0) == [4] * 5
    assert qa.document_rates(batch, 8, 2, 2) == [2, 2, 2, 2, 8]  # --lead-count 2: each question's two best matches
    with pytest.raises(SystemExit, match="add --lead-rate"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--keep-top", "2",
                 "--lead-count", "2"])
    with pytest.raises(SystemExit, match="add --keep-top"):
        qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--lead-rate", "2"])
    common = ["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--gmsa-checkpoint",
              str(checkpoints["gmsa"]), "--keep-top", "2", "--max-new-tokens", "2", "--batch-size", "2"]
    plain = qa.main(common + ["--rates", "4", "--out", str(tmp_path / "plain")])["rows"][0]
    fine = qa.main(common + ["--rates", "2", "--out", str(tmp_path / "fine")])["rows"][0]
    led = qa.main(common + ["--rates", "4", "--lead-rate", "2", "--out", str(tmp_path / "led")])
    row = led["rows"][0]
    assert row["system"] == "GMSA r=4 lead 2x" and "best match at 2x" in led["meta"]["documents"]
    # one of two documents read at 2x: more positions than every document at 4x, fewer than every one at 2x
    assert plain["mean_decoder_positions"] < row["mean_decoder_positions"] < fine["mean_decoder_positions"]
    both = qa.main(common + ["--rates", "4", "--lead-rate", "2", "--lead-count", "2", "--out", str(tmp_path / "both")])
    assert both["rows"][0]["system"] == "GMSA r=4 lead 2x x2" and "2 best matches at 2x" in both["meta"]["documents"]
    assert both["rows"][0]["mean_decoder_positions"] == fine["mean_decoder_positions"]  # both kept documents at 2x


def test_long_benchmark_loops_show_progress_on_stderr(qa_file, tmp_path, capsys):
    assert list(_bench("common").progress(range(3), "restoring at 4x")) == [0, 1, 2]
    assert "restoring at 4x" in capsys.readouterr().err
    _bench("qa").main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--max-new-tokens",
                       "2", "--batch-size", "2", "--out", str(tmp_path)])
    assert "base (uncompressed)" in capsys.readouterr().err  # each system's loop over its batches


def test_qa_compare_tabulates_rows_of_several_runs(qa_file, checkpoints, tmp_path):
    qa = _bench("qa")
    base = qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--base", "--max-new-tokens", "2",
                    "--batch-size", "2", "--out", str(tmp_path), "--name", "base"])
    qa.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--gmsa-checkpoint",
             str(checkpoints["gmsa"]), "--rates", "4", "8", "--max-new-tokens", "2", "--batch-size", "2",
             "--out", str(tmp_path), "--name", "gmsa"])
    compare = _bench("qa_compare")
    result = compare.main(["--run", f"text={tmp_path / 'base.json'}", "--run", f"8x={tmp_path / 'gmsa.json'}:GMSA r=8",
                           "--out", str(tmp_path / "cmp"), "--name", "cmp"])
    _check_outputs(tmp_path / "cmp", "cmp")
    rows = result["rows"]
    assert [r["label"] for r in rows] == ["text", "8x"] and rows[1]["system"] == "GMSA r=8"
    assert rows[0]["accuracy"] == base["rows"][0]["accuracy"] and rows[0]["n"] == 3
    assert "gained" not in rows[0] and rows[1]["gained"] + rows[1]["lost"] <= 3 and 0 < rows[1]["sign_p"] <= 1
    assert compare.sign_test(14, 4) == pytest.approx(0.0309, abs=1e-4) and compare.sign_test(0, 0) == 1.0
    with pytest.raises(SystemExit, match="name one"):
        compare.main(["--run", f"x={tmp_path / 'gmsa.json'}", "--out", str(tmp_path / "cmp")])
    with pytest.raises(SystemExit, match="no system"):
        compare.main(["--run", f"x={tmp_path / 'gmsa.json'}:GMSA r=16", "--out", str(tmp_path / "cmp")])
    before = (tmp_path / "gmsa.json").read_bytes()
    with pytest.raises(SystemExit):  # the table would overwrite a run it reads: refused, the run kept
        compare.main(["--run", f"x={tmp_path / 'gmsa.json'}:GMSA r=8", "--out", str(tmp_path), "--name", "gmsa"])
    assert (tmp_path / "gmsa.json").read_bytes() == before


def test_lexical_rank_counts_the_gold_passage_among_the_best_matches(qa_file, tmp_path):
    result = _bench("lexical_rank").main(["--data", str(qa_file), "--out", str(tmp_path), "--name", "lr"])
    _check_outputs(tmp_path, "lr")
    (row,) = result["rows"]
    assert row["n"] == 2 and row["documents"] == 2  # the one-document question is left out
    assert row["bm25@1"] == 100.0 and row["file@1"] == 50.0 and row["chance@1"] == 50.0 and row["bm25@2"] == 100.0
    with pytest.raises(SystemExit, match="no QA data"):
        _bench("lexical_rank").main(["--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)])


def test_reconstruction_curve_puts_checkpoints_on_one_token_axis(tmp_path):
    def run_file(name: str, scores: dict[str, float]) -> Path:  # a reconstruction.py JSON: system -> BLEU at 2x/128
        rows = [{"system": system, "rate": rate, "length": length, "n": 24, "bleu": bleu / rate + length / 64}
                for system, bleu in scores.items() for rate in (2, 4) for length in (64, 128)]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {"machine": "cpu-2core"}, "rows": rows}))
        return path

    early, late = run_file("early", {"GMSA-AE": 80.0, "TCP-AE": 4.0}), run_file("late", {"GMSA-AE": 96.0})
    curve = _bench("reconstruction_curve")
    result = curve.main(["--point", f"148={late}", "--point", f"13.2={early}:GMSA-AE", "--point", f"9.6={early}:TCP-AE",
                         "--out", str(tmp_path / "out"), "--name", "curve"])
    _check_outputs(tmp_path / "out", "curve")
    rows = result["rows"]
    assert [(r["system"], r["tokens_m"]) for r in rows] == [("GMSA-AE", 13.2), ("GMSA-AE", 148.0), ("TCP-AE", 9.6)]
    assert rows[1]["2x"] == 96.0 / 2 + 2 and rows[1]["4x"] == 96.0 / 4 + 2  # at 128 tokens
    assert rows[1]["mean_2x"] == 96.0 / 2 + 1.5  # mean of 64 and 128 tokens
    with pytest.raises(SystemExit, match="name one"):
        curve.main(["--point", f"10={early}", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no 256-token chunks"):
        curve.main(["--point", f"10={late}", "--length", "256", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):  # argparse: tokens must be a positive number
        curve.main(["--point", f"many={late}", "--out", str(tmp_path / "out")])


def test_qa_reads_the_best_matching_run_as_text_within_the_lower_rates_positions(qa_file, checkpoints, tmp_path):
    qa = _bench("qa")
    common = ["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--gmsa-checkpoint",
              str(checkpoints["gmsa"]), "--max-new-tokens", "2", "--batch-size", "2"]
    plain = qa.main(common + ["--rates", "2", "8", "--out", str(tmp_path / "plain")])
    expanded = qa.main(common + ["--rates", "8", "--expand-to", "2", "--out", str(tmp_path / "expanded")])
    finer = qa.main(common + ["--rates", "8", "--expand-to", "4", "--expand-rate", "2", "--out", str(tmp_path / "fine")])
    positions = {r["system"]: r["mean_decoder_positions"] for r in plain["rows"] + expanded["rows"] + finer["rows"]}
    assert positions["GMSA r=8"] < positions["GMSA r=8 +text run to 2x"] <= positions["GMSA r=2"]
    assert positions["GMSA r=8"] < positions["GMSA r=8 +2x run to 4x"] < positions["GMSA r=2"]
    with pytest.raises(SystemExit, match="below every compressed rate"):
        qa.main(common + ["--rates", "4", "--expand-to", "4"])
    with pytest.raises(SystemExit, match="dividing every"):
        qa.main(common + ["--rates", "8", "--expand-to", "4", "--expand-rate", "3"])


def test_benchmark_arguments_are_checked_before_any_model_loads(qa_file, checkpoints, tmp_path, capsys):
    qa, latency, decode = _bench("qa"), _bench("latency"), _bench("decode")
    common = ["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file)]
    with pytest.raises(SystemExit, match="is not a GMSA checkpoint"):
        qa.main(common + ["--gmsa-checkpoint", str(tmp_path / "nowhere")])
    with pytest.raises(SystemExit, match="rate 3 is not one of"):
        qa.main(common + ["--gmsa-checkpoint", str(checkpoints["gmsa"]), "--rates", "3"])
    for argv in (["--batch-size", "-2"], ["--max-new-tokens", "0"], ["--limit", "0"]):
        with pytest.raises(SystemExit):
            qa.parse_args(argv)
    for argv in (["--lengths", "0"], ["--repeats", "0"], ["--checkpoint", str(tmp_path / "nowhere")],
                 ["--data", str(tmp_path / "nowhere")]):
        with pytest.raises(SystemExit):
            latency.parse_args(argv)
    assert "no such file" in capsys.readouterr().err
    quick = decode.parse_args(["--quick"])
    assert (quick.new_tokens, quick.repeats, quick.warmup) == (8, 2, 1)


def test_parallel_documents_lays_out_a_one_document_reader_over_several(qa_file, checkpoints, tokenizer, tmp_path):
    """Sequential: the product's prompt and answers; parallel: one document is the sequential prompt itself, and with
    several each is seen by the question alone, so their order does not change what it reads."""
    bench = _bench("parallel_documents")
    model = _bench("common").load_system(checkpoints["gmsa"], torch.device("cpu"), torch.float32, "tiny")
    documents = model.compress(["The Eiffel Tower is in Paris.", "Mount Everest is in Nepal.", "The Nile is long."], 4)
    question = "Where is the Eiffel Tower?"
    sequential = bench.sequential_layout(model, question, documents)
    product = model.generate_from_segments([sequential[0]], max_new_tokens=6)[0]
    assert bench.greedy_answer(model, *sequential, max_new_tokens=6) == product
    one = bench.parallel_layout(model, question, documents[:1])
    alone = bench.sequential_layout(model, question, documents[:1])
    assert one[2] == alone[2] and torch.equal(bench.attention_mask(one[1]), bench.attention_mask(alone[1]))
    assert bench.greedy_answer(model, *one, 6) == model.generate_from_segments([one[0]], max_new_tokens=6)[0]
    segments, blocks, positions = bench.parallel_layout(model, question, documents)
    lengths = [len(d) for d in documents]
    opening = blocks.count(bench.SHARED)
    assert [blocks.count(i) for i in range(3)] == lengths
    assert positions[opening + lengths[0]] == opening  # the second document starts where the first did
    assert positions[opening + sum(lengths)] == opening + max(lengths)  # the question right after the longest
    mask = bench.attention_mask(blocks)
    first, second = opening, opening + lengths[0]
    assert mask[second, opening - 1] and not mask[second, first] and mask[-1, first] and mask[-1, second]
    with torch.no_grad():
        forward = bench.prefill(model, segments, blocks, positions)[0][0, -1]
        backward = bench.prefill(model, *bench.parallel_layout(model, question, documents[::-1]))[0][0, -1]
    assert torch.allclose(forward, backward, atol=1e-5)
    result = bench.main(["--device", "cpu", "--checkpoint", str(checkpoints["gmsa"]), "--backbone", "tiny",
                         "--data", str(qa_file), "--max-docs", "2", "--limit", "2", "--rates", "4",
                         "--max-new-tokens", "3", "--out", str(tmp_path)])
    data = _check_outputs(tmp_path, "parallel-documents")
    assert [r["condition"] for r in result["rows"]] == ["sequential@4", "parallel@4"]
    assert len(data["outputs"]) == 2 and all(r["n"] == 2 for r in result["rows"])


def test_rerank_probe_ranks_documents_by_bm25_and_by_question_likelihood(qa_file, checkpoints, tmp_path):
    bench = _bench("rerank_probe")
    assert list(bench.ranks([0.1, 0.9, 0.5])) == [2, 0, 1] and list(bench.ranks([1.0, 1.0])) == [0, 1]
    # fusion: first for one ranker and third for the other beats second for both (1/60 + 1/62 > 2/61); the two
    # documents so placed tie, and the first ranker's order decides
    assert list(bench.ranks(bench.fused([3, 2, 1], [1, 2, 3]))) == [0, 2, 1]
    assert list(bench.ranks(bench.fused([3, 2, 1], [2, 3, 1]))) == [0, 1, 2]
    assert bench.recall([[0.1, 0.9], [0.8, 0.2]], [1, 1], 1) == 50.0 and bench.recall([[0.1, 0.9]], [0], 2) == 100.0
    model = _bench("common").load_system(checkpoints["gmsa"], torch.device("cpu"), torch.float32, "tiny")
    prompts = bench.question_prompts(model, "Who built it?", ["A text.", "Another text."])
    asked = model.tokenizer.encode(" Who built it?", add_special_tokens=False)
    assert [[s.token_ids for s in p if s.is_target] for p in prompts] == [[asked], [asked]]
    result = bench.main(["--device", "cpu", "--checkpoint", str(checkpoints["gmsa"]), "--backbone", "tiny",
                         "--data", str(qa_file), "--max-docs", "2", "--rates", "4", "--text", "--out", str(tmp_path)])
    _check_outputs(tmp_path, "rerank-probe")
    assert [r["ranker"] for r in result["rows"]] == ["bm25", "soft@4", "text", "bm25+soft@4", "bm25+text"]
    assert all(r["n"] == 3 and 0 <= r["recall@1"] <= r["recall@2"] <= 100 for r in result["rows"])


def test_rerank_probe_dense_ranker_needs_no_decoder(qa_file, tmp_path, monkeypatch):
    import gmsa_rag.rag as rag

    bench = _bench("rerank_probe")
    embed = rag.hash_embedding()
    scores = bench.dense_scores(embed, "who built the bridge", ["the bridge was built by Roebling", "rain in May"])
    assert scores[0] > scores[1] and abs(bench.dense_scores(embed, "rain", ["rain"])[0] - 1.0) < 1e-6  # cosine
    monkeypatch.setattr(rag, "load_embed_model", lambda: embed)  # (the probe's MiniLM; hashed words here)
    monkeypatch.setattr(_bench("common"), "load_system", lambda *a, **k: pytest.fail("no decoder was asked for"))
    result = bench.main(["--device", "cpu", "--data", str(qa_file), "--max-docs", "2", "--rates", "--dense",
                         "--out", str(tmp_path)])
    assert [r["ranker"] for r in result["rows"]] == ["bm25", "dense", "bm25+dense"]
    assert result["meta"]["checkpoint"] == "(no decoder scores)"


def test_restore_tokens_splits_the_restore_loss_by_answer_tokens_and_surprisal(qa_file, checkpoints, tmp_path, tokenizer):
    """Answer tokens are those overlapping a gold answer (every occurrence, any case); the per-token scores are those of
    the model's own loss, and each split's token counts add up to the whole."""
    import torch.nn.functional as F

    from gmsa_rag.samples import Sample, build_prompts

    bench = _bench("restore_tokens")
    ids, spans = bench.answer_spans(tokenizer, "Paris is in France. paris is big.", ["Paris", "Rome"])
    assert ids == tokenizer.encode("Paris is in France. paris is big.", add_special_tokens=False)
    assert len(spans) == 2 and all(tokenizer.decode([ids[i] for i in s]).strip().lower() == "paris" for s in spans)
    assert bench.answer_spans(tokenizer, "Rome is old.", ["Paris"])[1] == []
    surprisal, unseen = bench.unigram_surprisal(tokenizer, ["the cat the dog the end"])
    the = tokenizer.encode(" the", add_special_tokens=False)[0]
    assert surprisal[the] < surprisal[tokenizer.encode(" cat", add_special_tokens=False)[0]] < unseen
    assert bench.bucket_names([4.0, 8.0]) == ["0-4", "4-8", "8+"]

    from common import load_system

    model = load_system(checkpoints["gmsa"], torch.device("cpu"), torch.float32, backbone="tiny")
    passages = [tokenizer.encode(t, add_special_tokens=False) for t in ("The Nile flows north.", "Snow is cold and white.")]
    scores = bench.token_scores(model, passages, 4, batch_size=2)
    for ids, (losses, hits) in zip(passages, scores):
        logits, labels = model.target_logits(build_prompts(model, [Sample([ids], ids, rate=4)]))
        assert labels[: len(ids)].tolist() == ids and len(losses) == len(hits) == len(ids)
        assert losses == pytest.approx(F.cross_entropy(logits[: len(ids)].float(), labels[: len(ids)], reduction="none").tolist(), rel=1e-4, abs=1e-5)

    result = bench.main(["--backbone", "tiny", "--device", "cpu", "--data", str(qa_file), "--checkpoint",
                         str(checkpoints["gmsa"]), "--rates", "2", "4", "--limit", "3", "--edges", "8", "12",
                         "--out", str(tmp_path)])
    data = _check_outputs(tmp_path, "restore-tokens")
    for rate in (2, 4):
        parts = {r["tokens_of"]: r for r in result["rows"] if r["rate"] == rate}
        assert parts["answer"]["tokens"] > 0 and parts["answer"]["tokens"] + parts["other"]["tokens"] == parts["all"]["tokens"]
        assert parts["answer"]["loss_share"] + parts["other"]["loss_share"] == pytest.approx(100.0)
        assert 0.0 <= parts["answer"]["answers_kept_whole"] <= 100.0
        assert sum(b["tokens"] for b in result["buckets"] if b["rate"] == rate) == parts["all"]["tokens"]
    assert data["meta"]["answer_occurrences"] >= 3


def test_counterfactual_probe_scores_readers_on_the_swapped_questions(tmp_path):
    from gmsa_rag.data.counterfactual import counterfactual_pairs
    from gmsa_rag.data.qa import QAExample, format_context, load_qa, save_qa_jsonl

    people = ["Ada Lovelace", "Alan Turing", "Grace Hopper", "Claude Shannon"]
    source = tmp_path / "qa.jsonl"
    save_qa_jsonl([QAExample(f"who wrote note {i}", [name], [format_context("Notes", f"Note {i} was written by {name}."),
                                                             format_context("Other", "Nothing here.")], 0)
                   for i, name in enumerate(people)], source)
    pairs = counterfactual_pairs(load_qa(source), max_docs=2, seed=0)
    assert len(pairs) == 4 and all(s.answers[0] in people and s.answers != e.answers for e, s in pairs)

    def qa_run(name: str, answer_for) -> Path:  # a qa.py JSON: one system, its output per question
        outputs = [{"question": q, "answers": a, "GMSA r=4": answer_for(q, a)} for q, a in
                   [(s.question, s.answers) for _, s in pairs]]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {"machine": "cpu-2core"}, "rows": [{"system": "GMSA r=4"}], "outputs": outputs}))
        return path

    original = {s.question: e.answers[0] for e, s in pairs}
    reads = qa_run("reads", lambda q, a: a[0])  # says every swapped-in answer
    recalls = qa_run("recalls", lambda q, a: original[q] if q.endswith(("0", "1", "2")) else "no idea")
    plain = qa_run("plain", lambda q, a: original[q] if q.endswith("0") else "no idea")  # 1 of 4 right unswapped
    probe = _bench("counterfactual_probe")
    result = probe.main(["--data", str(source), "--max-docs", "2", "--run", f"reads={reads}", "--run",
                         f"recalls={recalls}", "--unswapped", f"recalls={plain}", "--out", str(tmp_path / "out")])
    _check_outputs(tmp_path / "out", "counterfactual-probe")
    rows = {r["label"]: r for r in result["rows"]}
    assert rows["reads"] == {"label": "reads", "n": 4, "follows": 100.0, "original": 0.0, "unswapped": None}
    assert rows["recalls"] == {"label": "recalls", "n": 4, "follows": 0.0, "original": 75.0, "unswapped": 25.0}
    foreign = tmp_path / "foreign.json"  # a run over other questions (another --limit or --seed wrote them)
    foreign.write_text(json.dumps({"meta": {}, "rows": [{"system": "s"}], "outputs": [{"question": "q", "s": "a"}]}))
    with pytest.raises(SystemExit, match="none of the 4 swapped questions"):
        probe.main(["--data", str(source), "--max-docs", "2", "--run", f"x={foreign}", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="gives no counterfactual question"):
        probe.main(["--data", str(source), "--limit", "0", "--run", f"x={reads}", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit):
        probe.main(["--data", str(source), "--run", f"x={reads}", "--unswapped", f"y={plain}", "--out", str(tmp_path)])


def test_data_scaling_fits_accuracy_per_doubling_of_the_questions(tmp_path):
    questions = [f"question {i}" for i in range(8)]

    def qa_run(name: str, right: int, accuracy: float | None = None, asked=questions) -> str:
        outputs = [{"question": q, "answers": ["yes"], "GMSA r=4": "yes" if i < right else "no"} for i, q in enumerate(asked)]
        row = {"system": "GMSA r=4", "accuracy": 100.0 * right / len(asked) if accuracy is None else accuracy,
               "exact_match": 10.0, "f1": 20.0}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"meta": {"machine": "cpu-2core"}, "rows": [row], "outputs": outputs}))
        return str(path)

    scaling = _bench("data_scaling")
    runs = ["--run", f"4x@1000={qa_run('a', 2)}", "--run", f"4x@2000={qa_run('b', 4)}",
            "--run", f"4x@4000={qa_run('c', 5)}", "--run", f"4x@4000={qa_run('d', 7)}",  # two seeds at 4000
            "--run", f"lead@1000={qa_run('e', 4)}", "--run", f"lead@4000={qa_run('f', 4)}"]
    result = scaling.main([*runs, "--resamples", "200", "--out", str(tmp_path / "out")])
    _check_outputs(tmp_path / "out", "data-scaling")
    assert [(r["series"], r["train_questions"]) for r in result["rows"]] == [  # by series as given, then count
        ("4x", 1000), ("4x", 2000), ("4x", 4000), ("lead", 1000), ("lead", 4000)]
    rows = {(r["series"], r["train_questions"]): r for r in result["rows"]}
    assert rows["4x", 4000]["runs"] == 2 and rows["4x", 4000]["accuracy"] == 75.0 and rows["4x", 1000]["accuracy"] == 25.0
    fits = {f["series"]: f for f in result["fits"]}
    # least squares over the counts at log2 = 0, 1, 2 (accuracy 25, 50 and the two seeds' 75): 25 points per doubling
    # (the runs as points, 25 / 50 / 62.5 / 87.5, would give 26.1)
    assert fits["4x"]["slope"] == pytest.approx(25.0) and fits["lead"]["slope"] == pytest.approx(0.0)
    assert fits["4x"]["low"] <= fits["4x"]["slope"] <= fits["4x"]["high"] and fits["4x"]["questions_read"] == 8
    fitted = scaling.main([*runs[:8], "--fit-from", "2000", "--resamples", "50", "--out", str(tmp_path / "out")])
    assert fitted["fits"][0]["slope"] == pytest.approx(25.0) and fitted["fits"][0]["counts"] == "2,000, 4,000"
    assert len(fitted["rows"]) == 3  # the count below --fit-from is still shown
    with pytest.raises(SystemExit):  # lead has one count from 2000 up: no slope
        scaling.main([*runs, "--fit-from", "2000", "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="other questions"):
        scaling.main(["--run", f"4x@1000={qa_run('a', 2)}", "--run", f"4x@2000={qa_run('g', 2, asked=questions[:4])}",
                      "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="do not give its accuracy"):
        scaling.main(["--run", f"4x@1000={qa_run('h', 2, accuracy=50.0)}", "--run", f"4x@2000={qa_run('b', 4)}",
                      "--out", str(tmp_path / "out")])
    for bad in (["--run", f"4x={qa_run('a', 2)}"], ["--run", f"4x@0={qa_run('a', 2)}", "--run", f"4x@2000={qa_run('b', 4)}"],
                ["--run", f"4x@1000={qa_run('a', 2)}"]):
        with pytest.raises(SystemExit):  # no count / a zero count / one count only: no slope
            scaling.main([*bad, "--out", str(tmp_path / "out")])
