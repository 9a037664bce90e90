"""Trainer tests on a tiny random LLaMA saved to disk (the trainer loads base models by path, like any HF model)."""
import collections
import json
import math
import random
import shutil
from dataclasses import replace

import pytest
import torch

from gmsa_rag.backbone import tiny_backbone
from gmsa_rag.checkpoint import CheckpointError, read_weights
from gmsa_rag.data.qa import QAExample, save_qa_jsonl
from gmsa_rag.model import GMSAModel
from gmsa_rag.samples import Sample, sample_rate
from gmsa_rag.errors import UsageError
from gmsa_rag.train import (Data, TrainConfig, check_resume, decoder_positions, dev_batch, evaluate, parse_args,
                             split_by_positions, step_batches, train)

CORPUS = (
    "The cat sat on the mat. It was a sunny day and the cat was happy to be outside in the garden.\n\n"
    "Rivers and lakes hold fresh water for many animals and plants that live near them."
)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-base")
    # A wide weight init makes the frozen random decoder's outputs depend strongly on its input, so a
    # compressor can steer it and the overfit check has signal (at 0.02 the logits are nearly uniform).
    tiny_backbone("llama", seed=0, initializer_range=0.3).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("qa") / "qa.jsonl"
    save_qa_jsonl(
        [
            QAExample("who wrote hamlet", ["Shakespeare"], ["Hamlet is a tragedy by William Shakespeare.", "Paris is in France."]),
            QAExample("capital of france", ["Paris"], ["Hamlet is a play.", "Paris is the capital of France."]),
        ],
        path,
    )
    return path


def ae_config(base_dir, corpus, out_dir, **overrides) -> TrainConfig:
    settings = dict(
        stage="ae", base_model=str(base_dir), data=[str(corpus)], out_dir=str(out_dir), encoder_layers=2,
        window=32, lora_rank=4, lora_alpha=8, rates=[2, 4], steps=6, batch_size=2, lr=3e-3, warmup_steps=0,
        schedule="constant", eval_every=1000, save_every=1000, log_every=1,
        min_chunk_tokens=8, max_chunk_tokens=32, token_cache=str(out_dir) + "-tokens",
    )
    settings.update(overrides)
    return TrainConfig(**settings)


def losses(out_dir) -> list[float]:
    lines = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def trained_state(checkpoint) -> dict[str, torch.Tensor]:
    return read_weights(checkpoint)


def test_ae_overfits_a_repeated_batch_and_changes_only_the_compressor(base_dir, corpus, tmp_path, tokenizer):
    final = train(ae_config(base_dir, corpus, tmp_path, steps=60, lr=1e-2, continuation_fraction=0, ae_decoder_lora=False,
                            multi_doc_fraction=0, min_chunk_tokens=16, max_chunk_tokens=16))
    curve = losses(tmp_path)
    assert sum(curve[-3:]) / 3 < 0.85 * curve[0], curve
    model = GMSAModel.from_pretrained(final)
    fresh = GMSAModel.from_base(model.config)
    for name, p in fresh.decoder.state_dict().items():  # decoder bit-identical
        assert torch.equal(p, model.decoder.state_dict()[name]), name
    for name, p in fresh.encoder.state_dict().items():  # encoder base weights bit-identical, LoRA changed
        changed = not torch.equal(p, model.encoder.state_dict()[name])
        assert changed == ("lora_" in name), name
    assert any(not torch.equal(p, model.lsa.state_dict()[n]) for n, p in fresh.lsa.state_dict().items() if "embed" not in n)


def test_ae_trains_on_quoted_spans(base_dir, corpus, tmp_path):
    final = train(ae_config(base_dir, corpus, tmp_path, steps=4, span_fraction=1.0, span_tokens=8, multi_doc_fraction=0.5,
                            min_chunk_tokens=16, max_chunk_tokens=24))
    curve = losses(tmp_path)
    assert final is not None and len(curve) == 4 and all(math.isfinite(x) and x > 0 for x in curve)
    assert json.loads((tmp_path / "train_config.json").read_text())["span_fraction"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    norms = [r["grad_norm"] for r in records if "loss" in r]  # before clipping, logged with the loss
    assert len(norms) == 4 and all(math.isfinite(g) and g > 0 for g in norms)


def test_ae_init_trains_a_stage1_checkpoint_further_from_its_weights(base_dir, corpus, tmp_path):
    first = train(ae_config(base_dir, corpus, tmp_path / "a", steps=3, span_fraction=0.0))
    start = read_weights(first)
    more = ae_config(base_dir, corpus, tmp_path / "b", steps=1, lr=1e-12, span_fraction=0.5, encoder_layers=1,
                     init=str(first))  # architecture flags yield to the checkpoint's
    second = train(more)
    after = read_weights(second)
    assert after.keys() == start.keys()
    assert all(torch.allclose(after[k].float(), start[k].float(), atol=1e-6) for k in start)  # lr ~0: where it began
    assert GMSAModel.from_pretrained(second).config.encoder_layers == 2


def test_init_that_is_not_a_checkpoint_is_refused_before_any_model_loads(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["--stage", "ae", "--init", str(tmp_path / "missing")])


def test_keft_dev_evaluation_can_score_the_gold_passage_alone(tokenizer):
    from gmsa_rag.testing import tiny_gmsa

    model = tiny_gmsa(tokenizer, rates=[2, 4])
    dev = [QAExample("who wrote hamlet", ["Shakespeare"], ["Paris is in France.", "Hamlet is by Shakespeare."], 1),
           QAExample("capital of france", ["Paris"], ["Hamlet is a play.", "Paris is the capital."]),  # no gold marked
           QAExample("river in egypt", ["Nile"], ["The Nile flows north.", "Rome is old.", "Snow is cold."], 0)]
    cfg = TrainConfig(stage="keft", init="unused", max_docs=3, eval_samples=3, eval_batch_size=2)
    plain = evaluate(model, dev, cfg)
    both = evaluate(model, dev, replace(cfg, eval_gold_only=True))
    assert set(plain) == {k for k in both if not k.startswith("gold_")} and {"accuracy@2x", "n@4x"} <= set(plain)
    assert both["n@2x"] == 3 and both["gold_n@2x"] == 2 and {"gold_accuracy@4x", "gold_f1@2x"} <= set(both)
    assert all(both[k] == plain[k] for k in plain)  # greedy: the 3-document figures are unchanged


def test_dev_evaluation_shared_by_processes_scores_as_one(tokenizer):
    """Each process generates every n-th dev batch; gathered back in order, the figures are those of one process."""
    from gmsa_rag.testing import tiny_gmsa

    model = tiny_gmsa(tokenizer, rates=[2, 4])
    dev = [QAExample(f"question {i}", [f"answer {i}"], [f"Passage {i} says answer {i}.", f"Other passage {i}."], i % 2)
           for i in range(5)]
    cfg = TrainConfig(stage="keft", init="unused", max_docs=2, eval_samples=5, eval_batch_size=2, eval_gold_only=True)
    alone = evaluate(model, dev, cfg)
    shares = {}
    evaluate(model, dev, cfg, shard=(1, 2), gather=lambda batches: shares.setdefault(len(shares), batches))
    second = iter(shares.values())
    shared = evaluate(model, dev, cfg, shard=(0, 2), gather=lambda batches: batches + next(second))
    assert shared == alone and alone["n@2x"] == 5 and alone["gold_n@4x"] == 5


def test_stage1_dev_evaluation_can_score_quoted_spans(tokenizer):
    from gmsa_rag.testing import tiny_gmsa

    model = tiny_gmsa(tokenizer, rates=[2, 4])
    passages = [tokenizer.encode(t, add_special_tokens=False) for t in (
        "The Nile is a river in Africa. It flows north into the Mediterranean Sea through Egypt and Sudan today.",
        "Paris is the capital of France and its largest city; the Seine runs through it from east to west, "
        "past the islands at its centre.")]
    samples, refs, new_tokens = dev_batch(passages, "span", 1, 4, 0, model)
    for ids, sample, ref in zip(passages, samples, refs):
        start = len(ids) // 2 - 3
        assert sample.task == "span" and sample.cue == ids[start : start + 6] and sample.target is None
        assert ref == tokenizer.decode(ids[start + 6 : start + 22]).strip() and new_tokens >= 16
    cfg = TrainConfig(eval_samples=2, eval_batch_size=2)
    plain = evaluate(model, passages, cfg)
    both = evaluate(model, passages, replace(cfg, eval_spans=True))
    assert all(both[k] == plain[k] for k in plain) and {"bleu@2x", "prefix_em@4x"} <= set(plain)
    assert {"span_bleu@2x", "span_prefix_em@4x"} <= set(both) and not any(k.startswith("span_") for k in plain)


def test_stage1_dev_evaluation_can_restore_each_passage_among_others(tokenizer):
    from gmsa_rag.testing import tiny_gmsa

    model = tiny_gmsa(tokenizer, rates=[2, 4])
    texts = ["The Nile is a river in Africa.", "Paris is the capital of France.", "Snow is cold and white.",
             "Rome is an old city in Italy.", "Tea grows on hills in Assam."]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    items = [(ids[0], ids[1:4]), (ids[4], ids[0:3])]
    samples, refs, new_tokens = dev_batch(items, "restore", 4, 2, 3, model)
    for j, ((passage, others), sample) in enumerate(zip(items, samples)):
        place = (3 + j) % 4
        assert sample.target_doc == place and sample.documents[place] == passage
        assert sample.documents[:place] + sample.documents[place + 1:] == others and sample.target is None
    assert refs == [tokenizer.decode(ids[0]).strip(), tokenizer.decode(ids[4]).strip()]
    cfg = TrainConfig(eval_samples=2, eval_batch_size=2)
    plain = evaluate(model, [ids[0], ids[4]], cfg)
    both = evaluate(model, [ids[0], ids[4]], cfg, among=[ids[1:4], ids[0:3]])
    assert all(both[k] == plain[k] for k in plain) and {"among_bleu@2x", "among_prefix_em@4x"} <= set(both)



def test_stage1_dev_evaluation_reports_the_restore_loss_per_rate(tokenizer):
    """restore_loss@Nx: the teacher-forced cross-entropy per token of restoring each passage alone, over all tokens of
    all batches (not a mean of batch means); shared by processes, the figure of one process."""
    import torch.nn.functional as F

    from gmsa_rag.samples import build_prompts
    from gmsa_rag.testing import tiny_gmsa
    from gmsa_rag.train import restore_loss

    model = tiny_gmsa(tokenizer, rates=[2, 4]).eval()
    texts = ["The Nile is a river in Africa. It flows north.", "Paris is the capital of France.", "Snow is cold."]
    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    scores = evaluate(model, ids, TrainConfig(eval_samples=3, eval_batch_size=2))
    for rate in (2, 4):
        logits, labels = model.target_logits(build_prompts(model, [Sample([i], i, rate=rate) for i in ids]))
        assert scores[f"restore_loss@{rate}x"] == pytest.approx(F.cross_entropy(logits.float(), labels).item(), rel=1e-5)
    assert scores["restore_loss@2x"] != scores["restore_loss@4x"]
    shares = {}
    restore_loss(model, ids, 4, 1, shard=(1, 2), gather=lambda parts: shares.setdefault(0, parts))
    shared = restore_loss(model, ids, 4, 1, shard=(0, 2), gather=lambda parts: parts + shares[0])
    assert shared == pytest.approx(scores["restore_loss@4x"], rel=1e-6)
    keft = evaluate(model, [QAExample("q?", ["Nile"], texts[:1])], TrainConfig(stage="keft", init="unused", max_docs=1,
                                                                                  eval_samples=1))
    assert not any(k.startswith("restore_loss") for k in keft)


def test_ae_init_can_grow_the_compressor_where_the_checkpoint_left_off(base_dir, corpus, tmp_path):
    """--lora_rank / --lsa_layers above an --init checkpoint's: its encoder LoRA widens and new LSA blocks are appended
    as the identity, so the soft tokens are the checkpoint's until the new capacity trains; both then train and save."""
    first = train(ae_config(base_dir, corpus, tmp_path / "a", steps=2))
    start = read_weights(first)
    grown = train(ae_config(base_dir, corpus, tmp_path / "b", steps=1, lr=1e-12, init=str(first), lora_rank=8,
                            lsa_layers=2))
    after = read_weights(grown)
    config = GMSAModel.from_pretrained(grown).config
    assert (config.lora_rank, config.lora_alpha, config.lsa_layers) == (8, 16, 2)
    for name, tensor in start.items():
        if name.startswith("encoder.") and "lora_A" in name:
            assert after[name].shape[0] == 8 and torch.allclose(after[name][:4].float(), tensor.float(), atol=1e-6)
        elif name.startswith("encoder.") and "lora_B" in name:
            assert after[name].shape[1] == 8 and torch.allclose(after[name][:, :4].float(), tensor.float(), atol=1e-6)
        else:
            assert torch.allclose(after[name].float(), tensor.float(), atol=1e-6), name
    new_block = {k: v for k, v in after.items() if k.startswith("lsa.layers.1.")}
    outputs = [v for k, v in new_block.items() if k.endswith(("o_proj.weight", "down_proj.weight"))]
    assert len(outputs) == 2 and all(v.abs().max() < 1e-9 for v in outputs)  # zero, but for one step at lr 1e-12
    # left out, the sizes are the checkpoint's (a stage 2 from a rank-4 stage 1 keeps rank 4); a new model gets 16 / 1
    assert (parse_args(["--stage", "ae", "--init", str(first)]).lora_rank, parse_args(["--stage", "ae"]).lora_rank) == (None, 16)
    assert parse_args(["--stage", "ae"]).lsa_layers == 1 and parse_args(["--stage", "ae", "--lsa_layers", "0"]).lsa_layers == 0
    kept = train(ae_config(base_dir, corpus, tmp_path / "c", steps=1, lr=1e-12, init=str(first), lora_rank=None,
                           lsa_layers=None))
    assert read_weights(kept).keys() == start.keys()
    assert (GMSAModel.from_pretrained(kept).config.lora_rank, GMSAModel.from_pretrained(kept).config.lsa_layers) == (4, 1)
    for bad in (["--lora_rank", "0"], ["--lsa_layers", "-1"]):
        with pytest.raises(SystemExit):
            parse_args(["--stage", "ae", *bad])
    assert any(v.any() for k, v in new_block.items() if k.endswith("q_proj.weight"))


def test_ae_run_builds_same_article_distractors_for_its_dev_passages(base_dir, corpus, tmp_path, tokenizer):
    cfg = ae_config(base_dir, corpus, tmp_path, eval_among=True, eval_samples=3, min_chunk_tokens=8, max_chunk_tokens=8)
    from gmsa_rag.train import load_data

    data = load_data(cfg, tokenizer)
    assert len(data.dev_among) == 3 and all(len(d) == 3 and all(len(x) == 8 for x in d) for d in data.dev_among)
    assert load_data(replace(cfg, eval_among=False), tokenizer).dev == data.dev  # the dev passages do not change
    assert load_data(cfg, tokenizer).dev_among == data.dev_among  # fixed


def test_keft_changes_only_decoder_qkv(base_dir, corpus, qa_file, tmp_path):
    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=2, ae_decoder_lora=False))  # the paper's stage 1
    keft = train(TrainConfig(stage="keft", init=str(ae), data=[str(qa_file)], dev_data=str(qa_file),
                             out_dir=str(tmp_path / "keft"), steps=12, batch_size=2, lr=1e-2, warmup_steps=0,
                             schedule="constant", eval_every=12, eval_samples=2, save_every=1000,
                             log_every=1))
    curve = losses(tmp_path / "keft")
    assert curve[-1] < curve[0], curve
    before, after = trained_state(ae), trained_state(keft)
    for name, tensor in before.items():  # the compressor is frozen in stage 2
        assert torch.equal(tensor, after[name]), name
    decoder = {n: t for n, t in after.items() if n.startswith("decoder.")}
    assert decoder and all("lora_" in n and any(f".{t}." in n for t in ("q_proj", "k_proj", "v_proj")) for n in decoder)
    assert all(t.abs().sum() > 0 for n, t in decoder.items() if "lora_B" in n)  # peft starts B at zero
    record = [json.loads(line) for line in (tmp_path / "keft" / "metrics.jsonl").read_text().splitlines()]
    assert {"exact_match@2x", "f1@4x", "accuracy@2x"} <= set(record[-1])


def test_ae_decoder_lora_trains_the_soft_token_adapter_and_keft_continues_it(base_dir, corpus, qa_file, tmp_path):
    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=3, ae_decoder_lora=True, decoder_lora_rank=4))
    state = trained_state(ae)
    adapter = {n: t for n, t in state.items() if n.startswith("decoder.")}
    assert adapter and all("lora_" in n for n in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n)  # trained (peft starts B at zero)
    model = GMSAModel.from_pretrained(ae)
    fresh = GMSAModel.from_base(replace(model.config, decoder_tuning="none"))
    ids = torch.tensor([[1, 5, 9, 3]])
    with model.decoder_adapter(False):  # the text path is still the base model
        torch.testing.assert_close(model.decoder(ids).logits, fresh.decoder(ids).logits)
    keft = train(TrainConfig(stage="keft", init=str(ae), data=[str(qa_file)], out_dir=str(tmp_path / "keft"), steps=1,
                             batch_size=2, warmup_steps=0, eval_every=1000, save_every=1000, decoder_mlp_lora_rank=2))
    after = trained_state(keft)
    assert all(torch.equal(state[n], t) for n, t in after.items() if not n.startswith("decoder."))
    mlp = {n: t for n, t in after.items() if n.startswith("decoder.") and ".mlp." in n and "lora_A" in n}  # added
    assert mlp and all(t.shape[0] == 2 for t in mlp.values())  # by --decoder_mlp_lora_rank


def test_no_compress_baseline_trains_the_same_parameters_on_text(base_dir, qa_file, tmp_path):
    final = train(TrainConfig(stage="keft", no_compress=True, base_model=str(base_dir), encoder_layers=2, window=32,
                              data=[str(qa_file)], dev_data=str(qa_file), out_dir=str(tmp_path), steps=2,
                              batch_size=2, eval_every=2, eval_samples=2, save_every=1000))
    assert any(n.startswith("decoder.") and ".q_proj.lora_" in n for n in read_weights(final))
    data = Data(None, [QAExample("q", ["a"], ["d1", "d2"])], [])
    [samples] = step_batches(0, data, TrainConfig(stage="keft", no_compress=True), [4], 0)
    assert all(s.rate is None and s.documents == ["d1", "d2"] for s in samples)


def test_no_compress_fine_tune_trains_further_from_its_checkpoint(base_dir, corpus, qa_file, tmp_path):
    common = dict(stage="keft", no_compress=True, data=[str(qa_file)], batch_size=2, warmup_steps=0, eval_every=1000,
                  save_every=1000)
    first = train(TrainConfig(base_model=str(base_dir), encoder_layers=2, window=32, out_dir=str(tmp_path / "a"),
                              steps=2, lr=1e-2, **common))
    again = train(TrainConfig(init=str(first), out_dir=str(tmp_path / "b"), steps=1, lr=0.0, **common))
    before, after = read_weights(first), read_weights(again)
    lora = [n for n in before if n.startswith("decoder.") and ".lora_B" in n]
    assert lora and any(before[n].abs().sum() > 0 for n in lora)  # the first run moved its adapter from zero
    assert all(torch.equal(before[n], after[n]) for n in lora)  # the second starts from it (lr 0: unchanged)
    argv = ["--stage", "keft", "--data", str(qa_file)]
    with pytest.raises(SystemExit):  # soft tokens cannot train on from a text-only fine-tune
        parse_args([*argv, "--init", str(first)])
    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=1))
    with pytest.raises(SystemExit):  # nor a no-compress run from a GMSA checkpoint
        parse_args([*argv, "--no_compress", "true", "--init", str(ae)])


def test_keft_distills_from_a_no_compress_teacher(base_dir, corpus, qa_file, tmp_path):
    common = dict(data=[str(qa_file)], batch_size=2, warmup_steps=0, eval_every=1000, save_every=1000, log_every=1)
    teacher = train(TrainConfig(stage="keft", no_compress=True, base_model=str(base_dir), encoder_layers=2, window=32,
                                out_dir=str(tmp_path / "teacher"), steps=1, **common))
    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=1))
    final = train(TrainConfig(stage="keft", init=str(ae), distill_weight=0.5, distill_hidden_weight=0.5,
                              distill_teacher=str(teacher),
                              out_dir=str(tmp_path / "keft"), steps=2, **common))
    assert final is not None and all(torch.isfinite(torch.tensor(losses(tmp_path / "keft"))))
    logged = [json.loads(line) for line in (tmp_path / "keft" / "metrics.jsonl").read_text().splitlines()]
    terms = [row for row in logged if "loss" in row]
    assert terms and all({"loss_ce", "loss_kl", "loss_hidden"} <= set(row) and "loss_soft" not in row for row in terms)
    # the logged loss is the weighted mix of the logged terms (each unweighted)
    assert all(abs(r["loss"] - (0.5 * r["loss_ce"] + 0.5 * r["loss_kl"] + 0.5 * r["loss_hidden"])) < 1e-4 for r in terms)


def test_rate_sampling_covers_the_configured_set():
    rng = random.Random(0)
    counts = collections.Counter(sample_rate([2, 4, 8, 16], rng) for _ in range(4000))
    assert set(counts) == {2, 4, 8, 16} and min(counts.values()) > 800
    cfg = TrainConfig(stage="keft", batch_size=64)
    data = Data(None, [QAExample("q", ["a"], ["d"])], [])
    seen = {s.rate for step in range(4) for s in step_batches(step, data, cfg, [2, 4, 8, 16], 0)[0]}
    assert seen == {2, 4, 8, 16}
    weighted = collections.Counter(sample_rate([2, 4, 8, 16], rng, [0, 1, 3, 0]) for _ in range(4000))
    assert set(weighted) == {4, 8} and 2.5 < weighted[8] / weighted[4] < 3.5


def test_micro_batches_by_positions_stay_within_the_budget():
    samples = sorted((Sample(["x" * n], "answer", question="q", rate=None) for n in (40, 80, 120, 400, 4000)),
                     key=decoder_positions)
    sizes = [decoder_positions(s) for s in samples]
    budget = 2 * sizes[2]
    batches = split_by_positions(samples, budget, max_samples=8)
    assert [s for b in batches for s in b] == samples  # every sample once, in order
    assert all(len(b) == 1 or len(b) * max(map(decoder_positions, b)) <= budget for b in batches)
    assert batches[-1] == [samples[-1]] and len(batches) >= 3  # the long one alone
    assert [len(b) for b in split_by_positions(samples, 10**9, max_samples=2)] == [2, 2, 1]
    with pytest.raises(SystemExit):
        parse_args(["--micro_batch_tokens", "-1"])


def test_micro_batch_tokens_weigh_micro_batches_by_their_samples(base_dir, tmp_path):
    # four samples a step whose targets are equally long (so a token mean is a sample mean): as one micro-batch, and
    # split by a tiny budget into 4 micro-batches of 1, each weighted 1/4
    corpus = tmp_path / "long.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more" for i in range(2000)))
    fixed = dict(steps=2, batch_size=4, min_chunk_tokens=24, max_chunk_tokens=24, multi_doc_fraction=0.0)
    whole = train(ae_config(base_dir, corpus, tmp_path / "a", **fixed))
    split = train(ae_config(base_dir, corpus, tmp_path / "b", micro_batch_tokens=1, **fixed))
    assert whole and split
    norms = [[json.loads(line)["grad_norm"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()
              if "grad_norm" in line] for run in ("a", "b")]
    # the same gradient norm at both steps (the weights themselves differ at float noise that Adam's first steps
    # amplify where a gradient is near zero)
    assert len(norms[0]) == 2 and norms[0] == pytest.approx(norms[1], rel=1e-4)
    # the logged loss is the step's, over all its micro-batches (not the last micro-batch's alone)
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-4)
    # and a log line every 2 steps gives the mean of its steps
    assert train(ae_config(base_dir, corpus, tmp_path / "d", log_every=2, **fixed))
    assert losses(tmp_path / "d") == pytest.approx([sum(losses(tmp_path / "a")) / 2], rel=1e-4)
    assert train(ae_config(base_dir, corpus, tmp_path / "c", steps=2, batch_size=4, micro_batch_tokens=150))
    assert all(math.isfinite(x) for x in losses(tmp_path / "c"))  # micro-batches of unequal size train too
    one = Sample([[1] * 24], [2] * 24, rate=2)
    assert split_by_positions([one] * 4, 1, 4) == [[one]] * 4  # (run b's micro-batches: one sample each)


def test_resume_continues_from_the_saved_step_exactly(base_dir, corpus, tmp_path):
    straight = train(ae_config(base_dir, corpus, tmp_path / "a", steps=6, save_every=2))
    interrupted = tmp_path / "b"
    train(ae_config(base_dir, corpus, interrupted, steps=6, save_every=2))
    for late in ("step-0000006",):  # pretend the run died after step 4
        shutil.rmtree(interrupted / "checkpoints" / late)
    (interrupted / "latest").write_text("step-0000004")
    resumed = train(ae_config(base_dir, corpus, interrupted, steps=6, save_every=2))
    rows = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]  # 5 and 6 ran again; their old rows dropped
    assert [r["step"] for r in rows if "loss" not in r] == [6]  # (the final dev scores, once)
    a, b = trained_state(straight), trained_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_resumed_token_budget_ends_where_an_uninterrupted_run_ends_between_log_lines(base_dir, corpus, tmp_path):
    budget = dict(steps=1000, max_tokens=400, log_every=4, save_every=3)
    straight = train(ae_config(base_dir, corpus, tmp_path / "a", **budget))
    paused = tmp_path / "b"
    train(ae_config(base_dir, corpus, paused, stop_after_minutes=1e-9, **budget))  # pauses after step 1 (unlogged)
    resumed = train(ae_config(base_dir, corpus, paused, **budget))
    a, b = (json.loads((c / "trainer_state.json").read_text()) for c in (straight, resumed))
    assert a["step"] == b["step"] and a["tokens"] == b["tokens"] >= 400  # (the pause's step was not logged)
    assert all(torch.equal(x, y) for x, y in zip(read_weights(straight).values(), read_weights(resumed).values()))


def test_resuming_refuses_a_changed_model_and_names_a_damaged_checkpoints_neighbours(base_dir, corpus, tmp_path, capsys):
    def refuse(message):
        raise UsageError(message)

    run = tmp_path / "run"
    train(ae_config(base_dir, corpus, run, steps=4, save_every=2))
    check_resume(ae_config(base_dir, corpus, run, steps=8), refuse)  # a longer budget: said, allowed
    assert "with changed flags: steps 4 -> 8" in capsys.readouterr().out
    for changed in (dict(encoder_layers=1), dict(rates=[4]), dict(encoder_prefix="Passage: ")):
        with pytest.raises(UsageError, match=f"--{next(iter(changed))} .* differs from the run in"):
            check_resume(ae_config(base_dir, corpus, run, **changed), refuse)
    with pytest.raises(SystemExit):  # stage 1 trained further: its architecture is the checkpoint's
        parse_args(["--init", str(run / "checkpoints" / "step-0000004"), "--rates", "4"])
    assert "--rates 4: the model of --init" in capsys.readouterr().err
    (run / "latest").rename(run / "latest.away")  # the checkpoints copied without their pointer: refused, kept
    with pytest.raises(UsageError, match=r"holds checkpoints \(step-0000002, step-0000004\) but no 'latest'"):
        check_resume(ae_config(base_dir, corpus, run, steps=8), refuse)
    with pytest.raises(CheckpointError, match="but no 'latest'"):  # (the Python API, past the flag checks)
        train(ae_config(base_dir, corpus, run, steps=8))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002", "step-0000004"]
    (run / "latest.away").rename(run / "latest")
    (run / "checkpoints" / "step-0000004" / "trainer_state.json").write_text("{cut")
    with pytest.raises(CheckpointError, match="cannot resume from .*step-0000004.*earlier: step-0000002"):
        train(ae_config(base_dir, corpus, run, steps=8))


def test_bad_flags_and_data_are_refused_in_one_line_before_a_model_loads(base_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as shown:
        parse_args(["--help"])  # (help texts are %-formatted by argparse)
    assert shown.value.code == 0 and "--schedule" in capsys.readouterr().out
    (tmp_path / "typo.yaml").write_text("stesp: 5\n")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv, message in (
        (["--steps", "0"], "--steps must be at least 1"), (["--log_every", "0"], "--log_every must be at least 1"),
        (["--multi_doc_fraction", "2"], "--multi_doc_fraction is a share"),
        (["--data", str(tmp_path / "nowhere.jsonl")], "no such file"),
        (["--config", str(tmp_path / "typo.yaml")], "unknown: ['stesp']"),
        (["--rate_weights", "1", "2"], "one weight >= 0 per rate"),
        (["--lr=-1e-4"], "--lr must be above 0"), (["--max_grad_norm", "0"], "--max_grad_norm must be above 0"),
        (["--compressor_lr=-1"], "--compressor_lr must be 0 or more"),
        (["--distill_weight=-0.5"], "--distill_weight must be 0 or more"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert message in capsys.readouterr().err
    keft = TrainConfig(stage="keft", no_compress=True, base_model=str(base_dir), data=[str(empty)],
                       out_dir=str(tmp_path / "run"))
    with pytest.raises(UsageError, match="no training examples"):
        train(keft)
    assert not (tmp_path / "run").exists()  # nothing written


def test_wsd_run_extended_while_stable_ends_as_one_planned_that_long(base_dir, corpus, tmp_path):
    for bad in ("0", "1.5"):
        with pytest.raises(SystemExit):
            parse_args(["--schedule", "wsd", "--decay_fraction", bad])
    wsd = dict(schedule="wsd", decay_fraction=0.5, save_every=2)
    planned = train(ae_config(base_dir, corpus, tmp_path / "a", steps=12, **wsd))
    extended = tmp_path / "b"
    train(ae_config(base_dir, corpus, extended, steps=8, stop_after_minutes=1e-9, **wsd))  # pauses after step 1
    resumed = train(ae_config(base_dir, corpus, extended, steps=12, **wsd))  # the budget raised while stable
    lrs = [json.loads(line)["lr"] for line in (extended / "metrics.jsonl").read_text().splitlines() if "lr" in line]
    assert lrs[:7] == [3e-3] * 7 and lrs[-1] < 1e-3
    a, b = trained_state(planned), trained_state(resumed)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_flags_from_yaml_file_with_command_line_override(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text("stage: ae\nsteps: 77\nlr: 0.5\nrates: [4, 8]\n")
    cfg = parse_args(["--config", str(file), "--lr", "0.25"])
    assert (cfg.steps, cfg.lr, cfg.rates) == (77, 0.25, [4, 8])
    with pytest.raises(SystemExit):
        parse_args(["--stage", "keft"])  # keft needs --init or --no-compress


def test_two_process_ddp_run_saves_and_resumes(base_dir, corpus, tmp_path):
    """The multi-GPU code path (DDP through accelerate), here on two CPU processes over gloo."""
    import os
    import subprocess
    import sys

    out = tmp_path / "ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
        "-m", "gmsa_rag.train", "--stage", "ae", "--base_model", str(base_dir), "--data", str(corpus),
        "--out_dir", str(out), "--encoder_layers", "2", "--window", "32", "--lora_rank", "4", "--lora_alpha", "8",
        "--rates", "2", "4", "--batch_size", "2", "--save_every", "2", "--log_every", "1", "--eval_every", "1000",
        "--min_chunk_tokens", "8", "--max_chunk_tokens", "32", "--warmup_steps", "0",
        "--token_cache", str(tmp_path / "tokens"),
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    first = subprocess.run([*command, "--steps", "2"], env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "2 process(es)" in first.stdout
    resumed = subprocess.run([*command, "--steps", "4"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "from step 2" in resumed.stdout
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out / "latest").read_text() == "step-0000004"


def test_two_process_ddp_keft_trains_adapter_and_compressor(base_dir, corpus, qa_file, tmp_path):
    """Stage 2 on the multi-GPU path (two CPU processes over gloo): the decoder adapter and, with --compressor_lr,
    the compressor train in DDP; the two processes' weights stay identical (one checkpoint)."""
    import os
    import subprocess
    import sys

    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=1))
    out = tmp_path / "keft-ddp"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29563",
        "-m", "gmsa_rag.train", "--stage", "keft", "--init", str(ae), "--data", str(qa_file), "--out_dir", str(out),
        "--rates", "2", "4", "--batch_size", "2", "--grad_accum", "2", "--steps", "2", "--lr", "1e-2",
        "--compressor_lr", "1e-2", "--warmup_steps", "0", "--save_every", "1000", "--eval_every", "1000",
        "--log_every", "1", "--docs_curriculum", "0.5", "--dev_data", str(qa_file), "--eval_batch_size", "1",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "2 process(es)" in run.stdout
    before, after = trained_state(ae), trained_state(out / "checkpoints" / "step-0000002")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert any(n.startswith("decoder.") for n in changed) and any(n.startswith("encoder.") for n in changed)
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "n@2x" in line]
    assert [(r["step"], r["n@2x"], r["n@4x"]) for r in evals] == [(2, 2, 2)]  # a dev batch from each process


def test_gradient_checkpointing_and_accumulation_match_plain_training(base_dir, corpus, tmp_path):
    """Recomputing activations must not change the result; accumulation runs its micro-batches."""
    plain = train(ae_config(base_dir, corpus, tmp_path / "plain", steps=2, grad_accum=2))
    checkpointed = train(ae_config(base_dir, corpus, tmp_path / "ckpt", steps=2, grad_accum=2, grad_checkpointing=True))
    a, b = trained_state(plain), trained_state(checkpointed)
    assert all(torch.allclose(a[n], b[n], atol=1e-6) for n in a)
    single = trained_state(train(ae_config(base_dir, corpus, tmp_path / "single", steps=2)))
    assert any(not torch.equal(a[n], single[n]) for n in a)  # the second micro-batch contributed


def test_ae_soft_token_center_is_calibrated_at_the_start_and_trained(base_dir, corpus, tmp_path):
    first = train(ae_config(base_dir, corpus, tmp_path / "a", steps=2))
    final = train(ae_config(base_dir, corpus, tmp_path / "b", steps=3, init=str(first), soft_token_center=True))
    model = GMSAModel.from_pretrained(final)
    assert model.config.soft_token_center
    state = read_weights(final)
    assert float(state["soft_center"].float().pow(2).mean().sqrt()) > 0.01  # calibrated, then trained on
    fresh = train(ae_config(base_dir, corpus, tmp_path / "c", steps=1, lr=1e-12, soft_token_center=True))
    assert float(read_weights(fresh)["soft_center"].float().abs().max()) > 0  # a fresh model is calibrated too


def test_compiled_training_matches_eager_and_still_scores_dev(base_dir, corpus, qa_file, tmp_path, monkeypatch):
    """--compile runs the same training in both stages (blocks compiled, here with a backend that needs no C
    compiler); the dev evaluation generates eagerly beside it."""
    flags = dict(steps=2, grad_accum=2, eval_every=2, eval_samples=2, dev_data=str(corpus))
    eager = trained_state(train(ae_config(base_dir, corpus, tmp_path / "eager", **flags)))
    original = GMSAModel.compile_blocks
    monkeypatch.setattr(GMSAModel, "compile_blocks", lambda self, backend="aot_eager": original(self, backend))
    out = tmp_path / "compiled"
    compiled = trained_state(train(ae_config(base_dir, corpus, out, compile=True, **flags)))
    assert compiled.keys() == eager.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-4, atol=1e-5)
    assert any("bleu@2x" in line for line in (out / "metrics.jsonl").read_text().splitlines())
    keft = dict(stage="keft", init=str(out / "checkpoints" / (out / "latest").read_text()), data=[str(qa_file)],
                dev_data=str(qa_file), steps=2, batch_size=2, lr=1e-2, warmup_steps=0, schedule="constant",
                eval_every=2, eval_samples=2, save_every=1000, log_every=1, compressor_lr=1e-3)
    plain = trained_state(train(TrainConfig(out_dir=str(tmp_path / "keft-eager"), **keft)))
    compiled = trained_state(train(TrainConfig(out_dir=str(tmp_path / "keft-compiled"), compile=True, **keft)))
    for name in plain:  # stage 2 too: the decoder adapter and, with --compressor_lr, the compressor
        torch.testing.assert_close(compiled[name], plain[name], rtol=1e-4, atol=1e-5)


def keft_with(base_dir, corpus, tmp_path, **options) -> tuple[GMSAModel, GMSAModel, dict]:
    """Two stage-2 steps on two questions with ``options`` from a one-step stage 1: (the stage-2 checkpoint, the
    stage-1 one, the last logged metrics)."""
    qa = tmp_path / "qa.jsonl"
    save_qa_jsonl([QAExample("who wrote hamlet", ["Shakespeare"], ["Paris is in France.", "Hamlet is by Shakespeare."], 1),
                   QAExample("capital of france", ["Paris"], ["Paris is the capital of France.", "Hamlet is a play."], 0)], qa)
    ae = train(ae_config(base_dir, corpus, tmp_path / "ae", steps=1))
    final = train(TrainConfig(stage="keft", init=str(ae), data=[str(qa)], dev_data=str(qa), out_dir=str(tmp_path / "keft"),
                              steps=2, batch_size=2, warmup_steps=0, eval_every=2, eval_samples=2, save_every=1000,
                              eval_gold_only=True, **options))
    logged = [json.loads(line) for line in (tmp_path / "keft" / "metrics.jsonl").read_text().splitlines()]
    return GMSAModel.from_pretrained(final), GMSAModel.from_pretrained(ae), logged[-1]


def test_keft_can_train_cited_answers_with_the_question_first_and_the_checkpoint_remembers_both(base_dir, corpus, tmp_path):
    final, older, logged = keft_with(base_dir, corpus, tmp_path, cite_document=True, question_first=True)
    assert {"cite_accuracy@2x", "gold_cite_accuracy@4x", "accuracy@2x"} <= set(logged)
    assert final.config.answer_cites and final.config.question_first
    assert not older.config.answer_cites and not older.config.question_first  # older and stage-1 checkpoints: plain


def test_keft_can_train_quoted_evidence_and_the_checkpoint_remembers_it(base_dir, corpus, tmp_path):
    final, older, logged = keft_with(base_dir, corpus, tmp_path, quote_evidence=True, quote_words=4)
    assert {"quote_tokens@2x", "gold_quote_tokens@4x", "accuracy@2x"} <= set(logged)
    assert final.config.answer_quotes and not older.config.answer_quotes


def test_quoted_evidence_and_cited_answers_are_refused_together():
    with pytest.raises(SystemExit):
        parse_args(["--stage", "keft", "--no_compress", "true", "--quote_evidence", "true", "--cite_document", "true"])


LEAD_EXAMPLE = QAExample("who wrote the art of war", ["Sun Tzu"],
                         ["Pasta recipes", "The Art of War was written by Sun Tzu", "Art museums of Paris"], 1)


@pytest.mark.parametrize("order", ["bm25_first", "bm25_last"])
def test_lead_rate_samples_compress_the_best_match_finer_in_a_share_of_the_batch(order):
    """--lead_rate: in about --lead_fraction of the samples the best BM25 match (first or last, as the product's
    lead_rate reads it) is at the lead rate and the others at the sample's rate; off, the batches are unchanged."""
    data = Data(None, [LEAD_EXAMPLE], [])
    base = dict(stage="keft", batch_size=16, min_docs=3, max_docs=3, doc_order=order)
    end = 0 if order == "bm25_first" else -1
    samples = [s for step in range(4) for s in step_batches(step, data, TrainConfig(**base, lead_rate=2), [4, 8], 0)[0]]
    lead = [s for s in samples if s.document_rates]
    assert 0.25 < len(lead) / len(samples) < 0.75
    for s in lead:
        assert s.documents[end] == LEAD_EXAMPLE.contexts[1] and s.rate_of(end % len(s.documents)) == 2
        assert [s.rate_of(d) for d in range(len(s.documents))].count(s.rate) == len(s.documents) - 1
    every = step_batches(0, data, TrainConfig(**base, lead_rate=2, lead_fraction=1.0), [4], 0)[0]
    assert all(s.document_rates for s in every)
    assert decoder_positions(every[0]) > decoder_positions(replace(every[0], document_rates=None))
    off = step_batches(0, data, TrainConfig(**base), [4, 8], 0)[0]
    assert not any(s.document_rates for s in off)
    # no draw while --lead_rate is off: a run without it gets the batches it got before the option existed
    assert [s.rate for s in off] == [4, 4, 8, 4, 4, 8, 4, 8, 4, 8, 4, 4, 4, 4, 8, 4]


def test_lead_rate_dev_evaluation_scores_the_lead_layout_at_each_coarser_rate(tokenizer):
    from gmsa_rag.testing import tiny_gmsa

    model = tiny_gmsa(tokenizer, rates=[2, 4, 8])
    dev = [LEAD_EXAMPLE, QAExample("river in egypt", ["Nile"], ["The Nile flows north.", "Rome is old."], 0)]
    cfg = TrainConfig(stage="keft", init="unused", max_docs=3, eval_samples=2, eval_batch_size=2,
                      doc_order="bm25_first")
    plain = evaluate(model, dev, cfg)
    led = evaluate(model, dev, replace(cfg, lead_rate=2))
    assert {k for k in led if k.startswith("lead2_")} == {f"lead2_{k}" for k in plain if k.endswith(("@4x", "@8x"))}
    assert all(led[k] == plain[k] for k in plain)  # greedy: the uniform figures are unchanged
    samples, _, _ = dev_batch(dev, "qa", 3, 8, 0, model, "bm25_first", lead_rate=2)
    assert [samples[0].rate_of(d) for d in range(3)] == [2, 8, 8] and samples[0].documents[0] == LEAD_EXAMPLE.contexts[1]


@pytest.mark.parametrize("argv", [["--doc_order", "given", "--lead_rate", "2"],  # no best match to lead with
                                  ["--doc_order", "bm25_first", "--lead_rate", "8"],  # not a rate of the model
                                  ["--doc_order", "bm25_first", "--lead_rate", "2", "--lead_fraction", "1.5"]])
def test_lead_rate_is_validated_before_a_model_loads(argv, tokenizer, tmp_path, capsys):
    from gmsa_rag.testing import tiny_gmsa

    tiny_gmsa(tokenizer, rates=[2, 4]).save_pretrained(tmp_path / "init")
    flags = ["--stage", "keft", "--init", str(tmp_path / "init"), "--out_dir", str(tmp_path / "run")]
    assert parse_args([*flags, "--doc_order", "bm25_last", "--lead_rate", "2"]).lead_rate == 2
    with pytest.raises(SystemExit):
        parse_args([*flags, *argv])
    assert "--lead_" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # text has no lead document to compress
        parse_args(["--stage", "keft", "--no_compress", "true", "--doc_order", "bm25_first", "--lead_rate", "2"])


@pytest.mark.parametrize("target", ["document", "span"])
def test_restore_fraction_turns_a_share_of_qa_samples_into_stage1_targets_over_their_own_documents(target):
    """--restore_fraction: about that share of the samples keep their documents, order and rates but ask for one of
    them restored (or, for a span, the words after a few quoted ones) instead of the answer; off, no draw is made."""
    example = QAExample("who wrote the art of war", ["Sun Tzu"], [
        "Pasta recipes from the north of Italy use butter and rice more than olive oil and dried pasta shapes",
        "The Art of War is an ancient Chinese military treatise attributed to Sun Tzu a general of the late Spring",
        "Art museums of Paris hold paintings from every century and the Louvre is the largest of all of them"], 1)
    data = Data(None, [example], [])
    base = dict(stage="keft", batch_size=32, min_docs=3, max_docs=3, doc_order="bm25_first", lead_rate=2)
    cfg = TrainConfig(**base, restore_fraction=0.5, restore_target=target)
    samples = [s for step in range(4) for s in step_batches(step, data, cfg, [4, 8], 0)[0]]
    restoring = [s for s in samples if s.question is None]
    assert 0.3 < len(restoring) / len(samples) < 0.7
    assert {s.target_doc for s in restoring} == {0, 1, 2}  # any document of the prompt
    for s in restoring:
        assert s.documents[0] == example.contexts[1]  # the prompt as the QA sample had it: ranked, lead rate kept
        source = s.documents[s.target_doc]
        if target == "document":
            assert s.task == "restore" and s.target == source
        else:
            assert s.task == "span" and 4 <= len(s.cue.split()) <= 8 and 8 <= len(s.target.split()) <= 16
            assert f"{s.cue} {s.target}" in source
    assert any(s.document_rates for s in restoring)
    off = step_batches(0, data, TrainConfig(**base), [4, 8], 0)[0]
    assert [s.rate for s in off] == [s.rate for s in step_batches(0, data, replace(cfg, restore_fraction=0.0),
                                                                   [4, 8], 0)[0]]
    assert all(s.question for s in off)


def test_keft_with_restoring_mixed_in_logs_each_kinds_loss(base_dir, corpus, tmp_path):
    final, _, logged = keft_with(base_dir, corpus, tmp_path, restore_fraction=0.5, log_every=1)
    rows = [json.loads(line) for line in (tmp_path / "keft" / "metrics.jsonl").read_text().splitlines()]
    kinds = [r for r in rows if "loss" in r]
    assert all(r["loss_restore"] > 0 for r in kinds if "loss_restore" in r) and any("loss_restore" in r for r in kinds)
    assert all(r["loss_answer"] > 0 for r in kinds if "loss_answer" in r)
    assert "accuracy@2x" in logged


@pytest.mark.parametrize("argv", [["--stage", "keft", "--no_compress", "true", "--restore_fraction", "0.25"],
                                  ["--stage", "ae", "--restore_fraction", "0.25"],
                                  ["--stage", "keft", "--no_compress", "true", "--restore_fraction", "1.5"],
                                  ["--stage", "keft", "--no_compress", "true", "--restore_weight", "-1"]])
def test_restore_fraction_is_validated_before_a_model_loads(argv, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert "--restore_" in capsys.readouterr().err


def test_train_fraction_trains_on_nested_shares_of_the_questions(tmp_path, tokenizer):
    from gmsa_rag.data.qa import question_share
    from gmsa_rag.train import load_data

    examples = [QAExample(f"question number {i}", [str(i)], [f"The answer is {i}."]) for i in range(400)]
    examples += [QAExample(f"question number {i}", ["again"], ["A second example of the question."]) for i in range(40)]
    path = tmp_path / "qa.jsonl"
    save_qa_jsonl(examples, path)
    shares = {f: question_share(examples, f) for f in (0.25, 0.5, 1.0)}
    asked = {f: {e.question for e in s} for f, s in shares.items()}
    assert shares[1.0] == examples
    assert asked[0.25] < asked[0.5] < asked[1.0]  # nested
    assert 60 < len(asked[0.25]) < 140 and 150 < len(asked[0.5]) < 250  # about the share
    assert all(e in shares[0.5] for e in shares[0.25])  # in the file's order, every example of a question together
    for i in range(40):  # both examples of a question, or neither
        assert sum(e.question == f"question number {i}" for e in shares[0.5]) in (0, 2)
    copies = [replace(e) for e in reversed(examples)]
    assert question_share(copies, 0.5) == list(reversed(shares[0.5]))  # by question, not by place or object
    cfg = TrainConfig(stage="keft", data=[str(path)], dev_data=str(path), train_fraction=0.25)
    assert load_data(cfg, tokenizer).qa == shares[0.25]
    assert load_data(replace(cfg, train_fraction=1.0), tokenizer).qa == examples
    with pytest.raises(ValueError):
        question_share(examples, 0)


@pytest.mark.parametrize("argv", [["--stage", "keft", "--no_compress", "true", "--train_fraction", "0"],
                                  ["--stage", "keft", "--no_compress", "true", "--train_fraction", "1.5"],
                                  ["--stage", "ae", "--train_fraction", "0.5"]])
def test_train_fraction_is_validated(argv):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert parse_args(["--stage", "keft", "--no_compress", "true", "--train_fraction", "0.5"]).train_fraction == 0.5
