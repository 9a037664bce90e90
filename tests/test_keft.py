"""Stage 2 pieces: the decoder adapter (on for soft tokens, off for text), distillation, QA sampling, old checkpoints."""
import json
import random

import pytest
import torch

from gmsa_rag.checkpoint import CONFIG_FILE, load_checkpoint
from gmsa_rag.data.qa import QAExample
from gmsa_rag.model import group_means, hidden_state_distance
from gmsa_rag.prompt import qa_segments, shared_tail, soft_token_groups
from gmsa_rag.samples import Sample
from gmsa_rag.testing import tiny_gmsa
from gmsa_rag.train import TrainConfig, dev_gold_place, dev_qa_sample, docs_cap, parse_args, qa_sample

DOCS = ["Hamlet is a tragedy written by William Shakespeare.", "Paris is the capital of France."]


def with_trained_adapter(tokenizer, **config):
    model = tiny_gmsa(tokenizer, decoder_tuning="qkv_lora", **config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.decoder.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model


def test_text_prompts_run_on_the_pristine_base_model_with_the_adapter_loaded(tokenizer):
    """The uncompressed path answers exactly as the base model does, however the adapter was trained."""
    tuned = with_trained_adapter(tokenizer)
    plain = tiny_gmsa(tokenizer)  # same seed: the same base weights, no decoder adapter
    text_prompt = [qa_segments(tokenizer, "who wrote hamlet?", DOCS)]
    assert torch.equal(tuned.target_logits([qa_segments(tokenizer, "q?", DOCS, "Shakespeare")])[0],
                       plain.target_logits([qa_segments(tokenizer, "q?", DOCS, "Shakespeare")])[0])
    assert tuned.generate_from_segments(text_prompt, max_new_tokens=5) == plain.generate_from_segments(text_prompt, max_new_tokens=5)
    soft = tuned.compress(DOCS, 4)
    soft_prompt = [qa_segments(tokenizer, "q?", soft, "Shakespeare")]
    assert not torch.allclose(tuned.target_logits(soft_prompt)[0], plain.target_logits(soft_prompt)[0])  # adapter on


def test_mixed_batches_switch_the_adapter_per_prompt(tokenizer):
    tuned = with_trained_adapter(tokenizer)
    soft = tuned.compress(DOCS, 4)
    prompts = [qa_segments(tokenizer, "who wrote hamlet?", DOCS), qa_segments(tokenizer, "who wrote hamlet?", soft)]
    together = tuned.generate_from_segments(prompts, max_new_tokens=4)
    alone = [tuned.generate_from_segments([p], max_new_tokens=4)[0] for p in prompts]
    assert together == alone


def test_more_documents_than_stage_2_trained_on_are_warned_about_once(tokenizer, caplog):
    model = with_trained_adapter(tokenizer)
    soft = model.compress(DOCS, 4)
    assert len(DOCS) > 1 and model.trained_max_documents() is None  # nothing recorded: no warning
    with caplog.at_level("WARNING", logger="gmsa_rag.model"):
        model.generate_from_segments([qa_segments(tokenizer, "q?", soft)], max_new_tokens=2)
    assert not caplog.records
    model.config.extra = {"train_config": {"stage": "keft", "max_docs": 1, "no_compress": False}}
    assert model.trained_max_documents() == 1
    with caplog.at_level("WARNING", logger="gmsa_rag.model"):
        model.generate_from_segments([qa_segments(tokenizer, "q?", soft[:1])], max_new_tokens=2)  # as trained
        model.generate_from_segments([qa_segments(tokenizer, "q?", DOCS)], max_new_tokens=2)  # text: not soft tokens
        assert not caplog.records
        model.generate_from_segments([qa_segments(tokenizer, "q?", soft)], max_new_tokens=2)
        model.generate_from_segments([qa_segments(tokenizer, "q?", soft)], max_new_tokens=2)
    assert len(caplog.records) == 1  # once per model
    assert f"at most 1 document(s) and this one holds {len(DOCS)}" in caplog.text and "--rerank-top 1" in caplog.text


def test_always_mode_keeps_the_adapter_on_for_text(tokenizer):
    tuned = with_trained_adapter(tokenizer, decoder_adapter="always")
    plain = tiny_gmsa(tokenizer)
    prompt = [qa_segments(tokenizer, "q?", DOCS, "Shakespeare")]
    assert not torch.allclose(tuned.target_logits(prompt)[0], plain.target_logits(prompt)[0])


def test_distillation_loss_trains_only_the_adapter_against_the_text_reading_teacher(tokenizer):
    model = with_trained_adapter(tokenizer)
    model.set_stage("keft")
    samples = [Sample(DOCS, "Shakespeare", question="who wrote hamlet?", rate=4)]
    ce = model(samples)
    mixed = model(samples, distill_weight=0.5)
    assert torch.isfinite(mixed) and not torch.allclose(ce, mixed)
    mixed.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n and n.startswith("decoder.") for n in grads)


def test_a_given_distillation_teacher_replaces_the_base_model(tokenizer, tmp_path):
    """--distill_teacher: the teacher's logits on the text prompt drive the KL term; the base model by default."""
    student = with_trained_adapter(tokenizer)
    samples = [Sample(DOCS, "Shakespeare", question="who wrote hamlet?", rate=4)]
    base_teacher = tiny_gmsa(tokenizer)  # same base weights, no adapter: what the default teacher is
    assert torch.allclose(student(samples, 0.5), student(samples, 0.5, teacher=base_teacher), atol=1e-6)
    tuned_teacher = with_trained_adapter(tokenizer, decoder_adapter="always")
    assert not torch.allclose(student(samples, 0.5), student(samples, 0.5, teacher=tuned_teacher))
    path = tuned_teacher.save_pretrained(tmp_path / "teacher")
    soft = student.save_pretrained(tmp_path / "soft")
    flags = ["--stage", "keft", "--init", str(soft), "--distill_weight", "0.5", "--distill_teacher"]
    assert parse_args(flags + [str(path)]).distill_teacher == str(path)
    for bad in (tmp_path / "soft", tmp_path / "missing"):  # not a no-compress fine-tune; not a checkpoint
        with pytest.raises(SystemExit):
            parse_args(flags + [str(bad)])


def test_hidden_state_distillation_compares_the_positions_both_prompts_share(tokenizer, tmp_path):
    """The states after the documents (question, chat turn, answer) line up token for token between a soft-token
    prompt and its text twin; the hidden term is 0 against itself and trains only the soft-token adapter."""
    model = with_trained_adapter(tokenizer)
    soft_prompt = qa_segments(tokenizer, "who wrote hamlet?", model.compress(DOCS, 4), "Shakespeare")
    text_prompt = qa_segments(tokenizer, "who wrote hamlet?", DOCS, "Shakespeare")
    after_docs = soft_prompt[-2].token_ids + soft_prompt[-1].token_ids  # "\n\nQuestion: ..." turn + the answer
    tail = shared_tail(soft_prompt, text_prompt)
    assert tail == len(after_docs)
    assert [t for seg in text_prompt for t in seg.token_ids][-tail:] == after_docs
    assert shared_tail(text_prompt, soft_prompt) == tail

    n = sum(len(seg) for seg in text_prompt)
    _, _, states = model.decode([text_prompt, text_prompt[:-1]], {"tail": [range(n - tail, n), [0, 1, 2]]})
    states = states["tail"]
    assert states.shape == (model.decoder.config.num_hidden_layers, tail + 3, model.decoder.config.hidden_size)
    assert hidden_state_distance(states, states).item() == pytest.approx(0.0, abs=1e-6)
    assert hidden_state_distance(states, states.flip(1)).item() > 0.01

    model.set_stage("keft")
    samples = [Sample(DOCS, "Shakespeare", question="who wrote hamlet?", rate=4)]
    plain, with_hidden = model(samples), model(samples, hidden_weight=1.0)
    assert with_hidden.item() > plain.item()
    with_hidden.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n and n.startswith("decoder.") for n in grads)
    teacher = with_trained_adapter(tokenizer, decoder_adapter="always").save_pretrained(tmp_path / "teacher")
    flags = ["--stage", "keft", "--init", str(model.save_pretrained(tmp_path / "soft")), "--distill_teacher", str(teacher)]
    assert parse_args(flags + ["--distill_hidden_weight", "0.5"]).distill_hidden_weight == 0.5
    with pytest.raises(SystemExit):  # a teacher with nothing to distil
        parse_args(flags)


def test_each_soft_token_is_compared_with_the_text_tokens_it_stands_for(tokenizer):
    """--distill_soft_weight: soft token j of a window stands for tokens [j r, (j+1) r) of it; the teacher reads
    the document as the encoder tokenized it, so the groups are exact positions of the text prompt."""
    model = with_trained_adapter(tokenizer, window=8, rates=[2, 4, 8])
    long_doc = "Hamlet is a tragedy written by William Shakespeare sometime between 1599 and 1601."
    ids = model.tokenize([long_doc, DOCS[1]])
    soft_prompt = qa_segments(tokenizer, "q?", [model.compress([long_doc], 4)[0], model.compress([DOCS[1]], 4)[0]], "a")
    text_prompt = qa_segments(tokenizer, "q?", ids, "a")
    positions, groups = soft_token_groups(soft_prompt, text_prompt, window=8, rate=4)
    assert len(positions) == len(groups) == sum(len(seg) for seg in soft_prompt if seg.embeds is not None)
    flat = [t for seg in text_prompt for t in seg.token_ids]
    first = next(i for i, seg in enumerate(text_prompt) if seg.token_ids == ids[0])
    start = sum(len(seg) for seg in text_prompt[:first])
    windows = [ids[0][i:i + 8] for i in range(0, len(ids[0]), 8)]
    expected = [w[j:j + 4] for w in windows for j in range(0, len(w), 4)]
    assert [[flat[p] for p in g] for g in groups[:len(expected)]] == expected  # window-wise, the last group short
    assert groups[0][0] == start
    slots, at = [], 0
    for seg in soft_prompt:
        slots += range(at, at + len(seg)) if seg.embeds is not None else []
        at += len(seg)
    assert positions == slots
    with pytest.raises(ValueError):
        soft_token_groups(soft_prompt, text_prompt, window=8, rate=2)  # not how these soft tokens were made

    states = torch.arange(10.0).view(1, 5, 2)  # 1 layer, 5 positions, width 2: groups of 2 and 3 positions
    assert group_means(states, [2, 3]).tolist() == [[[1.0, 2.0], [6.0, 7.0]]]

    model.set_stage("keft")
    samples = [Sample([long_doc, DOCS[1]], "Shakespeare", question="who wrote hamlet?", rate=4)]
    terms = model.distillation_terms(samples, hidden=True, soft=True)
    assert terms["soft_per_layer"].shape == (model.decoder.config.num_hidden_layers,)
    assert 0 < terms["soft"].item() < 2 and 0 < terms["hidden"].item() < 2
    loss = model(samples, soft_weight=1.0)
    assert loss.item() > model(samples).item()
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all("lora_" in n and n.startswith("decoder.") for n in grads)
    mixed = soft_token_groups(qa_segments(tokenizer, "q?", [model.compress([long_doc], 2)[0],
                                                            model.compress([DOCS[1]], 4)[0]], "a"),
                              text_prompt, window=8, rate=[2, 4])  # --lead_rate: a rate per document
    assert len(mixed[1]) > len(groups) and all(len(g) <= 2 for g in mixed[1][:4])
    led = [Sample([long_doc, DOCS[1]], "Shakespeare", question="who wrote hamlet?", rate=4, document_rates=[2, 4])]
    assert model.distillation_terms(led, soft=True)["soft"].item() > 0  # the groups follow each document's rate


def test_answer_losses_are_per_prompt_means_of_the_target_tokens(tokenizer):
    model = tiny_gmsa(tokenizer)
    prompts = [qa_segments(tokenizer, "q?", DOCS, "Shakespeare"), qa_segments(tokenizer, "q2?", DOCS[:1], "Paris, France")]
    per_prompt = model.answer_losses(prompts)
    one = [model.loss([p]) for p in prompts]
    assert torch.allclose(per_prompt, torch.stack(one), atol=1e-5)


def test_qa_samples_show_the_gold_once_among_a_capped_number_of_distractors():
    example = QAExample("q", ["a"], ["gold", "d1", "d2", "d3", "d4", "d5"], gold_index=0)
    rng = random.Random(0)
    shown = [qa_sample(example, 4, 3, rng).documents for _ in range(200)]
    assert all(docs.count("gold") == 1 and 1 <= len(docs) <= 3 for docs in shown)
    assert {docs.index("gold") for docs in shown} == {0, 1, 2}  # gold position varied
    roomy = [qa_sample(example, 4, 10, rng).documents for _ in range(200)]  # a cap above what the example holds
    assert {len(docs) for docs in roomy} == set(range(1, 7)) and all(docs.count("gold") == 1 for docs in roomy)
    cfg = TrainConfig(max_docs=5, docs_curriculum=0.5)
    assert [docs_cap(cfg, p) for p in (0.0, 0.25, 0.5, 1.0)] == [1, 3, 5, 5]  # gold-only first, then the full prompt
    no_gold = QAExample("q", ["a"], ["x", "y"])
    assert qa_sample(no_gold, None, 1, rng).documents == ["x", "y"]  # unknown gold: documents as given


def test_qa_samples_can_show_the_full_prompt_with_the_hardest_distractors():
    example = QAExample("q", ["a"], ["d1", "gold", "d2", "d3", "d4", "d5", "d6"], gold_index=1)
    rng = random.Random(0)
    full = [qa_sample(example, 4, 5, rng, min_docs=5).documents for _ in range(100)]
    assert all(len(docs) == 5 and docs.count("gold") == 1 for docs in full)
    assert {d for docs in full for d in docs} == {"gold", "d1", "d2", "d3", "d4", "d5", "d6"}  # random distractors
    hardest = [qa_sample(example, 4, 5, rng, min_docs=5, hardest=True).documents for _ in range(100)]
    assert all(sorted(docs) == ["d1", "d2", "d3", "d4", "gold"] for docs in hardest)  # the first four, as ranked
    assert len({tuple(docs) for docs in hardest}) > 10  # in varied order, gold anywhere
    early = [qa_sample(example, 4, 2, rng, min_docs=5).documents for _ in range(20)]  # the curriculum's cap wins
    assert all(len(docs) <= 2 for docs in early)
    with pytest.raises(SystemExit):
        parse_args(["--stage", "keft", "--no_compress", "true", "--min_docs", "6", "--max_docs", "5"])
    cfg = parse_args(["--stage", "keft", "--no_compress", "true", "--min_docs", "5", "--distractors", "hardest"])
    assert cfg.min_docs == 5 and cfg.distractors == "hardest"


def test_dev_prompts_show_the_hardest_distractors_with_the_gold_at_every_place_in_turn():
    example = QAExample("q", ["a"], ["gold", "d1", "d2", "d3", "d4", "d5"], gold_index=0)
    shown = [dev_qa_sample(example, 4, 3, j).documents for j in range(6)]
    assert shown[:3] == [["gold", "d1", "d2"], ["d1", "gold", "d2"], ["d1", "d2", "gold"]] and shown[3] == shown[0]
    assert dev_qa_sample(example, None, 1, 5).documents == ["gold"]  # gold only


ORDER_EXAMPLE = QAExample("who wrote the art of war", ["Sun Tzu"],
                          ["The Art of War was written by Sun Tzu", "Pasta recipes", "War and Peace, a novel of war",
                           "Art museums of Paris"], gold_index=0)


@pytest.mark.parametrize("order", ["bm25_first", "bm25_last"])
def test_documents_in_bm25_order_put_the_best_match_first_or_last_in_training_and_dev_alike(order):
    rng = random.Random(0)
    end = 0 if order == "bm25_first" else -1
    samples = [qa_sample(ORDER_EXAMPLE, 4, 4, rng, min_docs=4, cite=True, order=order) for _ in range(20)]
    assert all(s.documents[end] == ORDER_EXAMPLE.contexts[0] for s in samples)  # the gold shares the question's words
    place = 1 if order == "bm25_first" else 4
    assert all(s.target == f"[{place}] Sun Tzu" for s in samples)  # the citation follows the gold's new place
    assert len({tuple(s.documents) for s in samples}) == 1  # one order, whatever the random layout
    for j in range(4):
        assert dev_qa_sample(ORDER_EXAMPLE, 4, 4, j, order).documents == samples[0].documents
        assert dev_gold_place(ORDER_EXAMPLE, 4, j, order) == place - 1
    given = [qa_sample(ORDER_EXAMPLE, 4, 4, rng, min_docs=4).documents for _ in range(40)]
    assert len({docs.index(ORDER_EXAMPLE.contexts[0]) for docs in given}) == 4  # given: the gold anywhere
    cfg = parse_args(["--stage", "keft", "--no_compress", "true", "--doc_order", order])
    assert cfg.doc_order == order
    with pytest.raises(SystemExit):
        parse_args(["--stage", "ae", "--doc_order", order])


def test_full_decoder_tuning_trains_every_decoder_weight_but_the_shared_embedding(tokenizer):
    model = tiny_gmsa(tokenizer, decoder_tuning="full")
    tuned = model.decoder_parameters()
    assert any("mlp" in n for n in tuned) and any("norm" in n for n in tuned)
    assert all(p is not model.embed_tokens.weight for p in tuned.values())
    assert not any("lora_" in n for n in tuned)


def test_format1_checkpoints_load_with_the_architecture_they_were_trained_with(tokenizer, tmp_path, monkeypatch):
    model = tiny_gmsa(tokenizer, encoder_prefix="", encoder_norm=False, soft_token_norm=False)
    path = model.save_pretrained(tmp_path / "old")
    record = json.loads((path / CONFIG_FILE).read_text())
    record["format_version"] = 1
    for key in ("encoder_prefix", "encoder_norm", "soft_token_norm", "decoder_adapter"):
        record["config"].pop(key)
    (path / CONFIG_FILE).write_text(json.dumps(record))
    import gmsa_rag.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    loaded = load_checkpoint(path)
    assert (loaded.config.encoder_prefix, loaded.config.encoder_norm, loaded.config.soft_token_norm) == ("", False, False)
    assert torch.equal(loaded.compress(DOCS, 4)[0], model.compress(DOCS, 4)[0])
    record["format_version"] = 99
    (path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(Exception, match="unsupported checkpoint format 99"):
        load_checkpoint(path)


def test_full_decoder_tuning_from_an_adapter_checkpoint_folds_the_adapter_in(tokenizer, tmp_path, monkeypatch):
    """The authors' stage 2 (every decoder weight trains) can start from a stage-1 checkpoint with a decoder adapter:
    the adapter is merged into W_Q/W_K/W_V, so soft-token prompts read the same, and nothing LoRA is left."""
    model = with_trained_adapter(tokenizer)
    path = model.save_pretrained(tmp_path / "stage1")
    import gmsa_rag.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    merged = load_checkpoint(path, decoder_tuning="full")
    soft_prompt = [qa_segments(tokenizer, "q?", model.compress(DOCS, 4), "Shakespeare")]
    assert torch.allclose(merged.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0], atol=1e-5)
    assert torch.equal(merged.compress(DOCS, 4)[0], model.compress(DOCS, 4)[0])  # the encoder is untouched
    assert merged.config.decoder_tuning == "full"
    assert not any("lora_" in n for n in merged.decoder.state_dict())
    merged.set_stage("keft")
    tuned = {n for n, p in merged.decoder.named_parameters() if p.requires_grad}
    assert any("mlp" in n for n in tuned) and any("q_proj" in n for n in tuned)


def test_a_soft_token_center_is_saved_and_can_be_added_to_a_checkpoint_without_one(tokenizer, tmp_path, monkeypatch):
    import gmsa_rag.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    model = tiny_gmsa(tokenizer)
    path = model.save_pretrained(tmp_path / "plain")
    added = load_checkpoint(path, soft_token_center=True)  # starts at zero: the checkpoint's soft tokens unchanged
    assert added.config.soft_token_center and torch.equal(added.compress(DOCS, 4)[0], model.compress(DOCS, 4)[0])
    windows = [tokenizer.encode(d, add_special_tokens=False) for d in DOCS]
    added.calibrate_soft_center(windows)
    again = load_checkpoint(added.save_pretrained(tmp_path / "centred"))
    assert again.config.soft_token_center and torch.equal(again.soft_center, added.soft_center)
    assert torch.allclose(again.compress(DOCS, 4)[0], model.compress(DOCS, 4)[0] - added.soft_center, atol=1e-5)
    assert again.fingerprint != model.fingerprint


def test_a_decoder_mlp_adapter_is_on_for_soft_tokens_only(tokenizer):
    """--decoder_mlp_lora_rank: LoRA on gate/up/down beside q/k/v, at its own rank, off for plain text."""
    tuned = with_trained_adapter(tokenizer, decoder_mlp_lora_rank=2)
    ranks = {n.split(".")[-4]: p.shape[0] for n, p in tuned.decoder.named_parameters() if "lora_A" in n}
    assert ranks == {"q_proj": 16, "k_proj": 16, "v_proj": 16, "gate_proj": 2, "up_proj": 2, "down_proj": 2}
    plain = tiny_gmsa(tokenizer)
    text_prompt = [qa_segments(tokenizer, "q?", DOCS, "Shakespeare")]
    assert torch.equal(tuned.target_logits(text_prompt)[0], plain.target_logits(text_prompt)[0])
    attention_only = with_trained_adapter(tokenizer)  # the same q/k/v weights (same generator order for them)
    soft_prompt = [qa_segments(tokenizer, "q?", tuned.compress(DOCS, 4), "Shakespeare")]
    assert not torch.allclose(tuned.target_logits(soft_prompt)[0], attention_only.target_logits(soft_prompt)[0])
    with pytest.raises(ValueError, match="decoder_mlp_lora_rank needs decoder_tuning='qkv_lora'"):
        tiny_gmsa(tokenizer, decoder_mlp_lora_rank=2)


def test_a_decoder_mlp_adapter_can_be_added_to_a_checkpoint_without_one(tokenizer, tmp_path, monkeypatch):
    """Stage 2 from an attention-only checkpoint: the MLP LoRA starts at zero, so the model answers as the checkpoint
    does until it trains; it is saved and loads back with its rank; another rank is refused clearly."""
    import gmsa_rag.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    model = with_trained_adapter(tokenizer)
    path = model.save_pretrained(tmp_path / "qkv")
    added = load_checkpoint(path, decoder_mlp_lora_rank=2)
    assert added.config.decoder_mlp_lora_rank == 2
    assert any(".gate_proj.lora_A" in n for n in added.decoder_parameters())
    soft_prompt = [qa_segments(tokenizer, "q?", model.compress(DOCS, 4), "Shakespeare")]
    torch.testing.assert_close(added.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0])
    added.set_stage("keft")
    assert all(p.requires_grad for n, p in added.decoder_parameters().items() if ".down_proj.lora_" in n)
    with torch.no_grad():
        for name, p in added.decoder_parameters().items():
            if ".up_proj.lora_B" in name:
                p.add_(0.1)
    again = load_checkpoint(added.save_pretrained(tmp_path / "mlp"))
    assert again.config.decoder_mlp_lora_rank == 2
    torch.testing.assert_close(again.target_logits(soft_prompt)[0], added.target_logits(soft_prompt)[0])
    with pytest.raises(Exception, match="already has a decoder MLP adapter of rank 2"):
        load_checkpoint(tmp_path / "mlp", decoder_mlp_lora_rank=4)


def test_a_checkpoints_decoder_adapter_can_be_widened(tokenizer, tmp_path, monkeypatch):
    """--decoder_lora_rank above a checkpoint's: its LoRA factors fill the wider adapter, the new part starts at zero,
    alpha / r is kept, so the model answers as the checkpoint does; it trains, saves and loads back at the new rank.
    The text path stays the base model's; a lower rank keeps the checkpoint's."""
    import gmsa_rag.backbone as backbone

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    model = with_trained_adapter(tokenizer)
    path = model.save_pretrained(tmp_path / "r16")
    wide = load_checkpoint(path, decoder_lora_rank=32)
    assert (wide.config.decoder_lora_rank, wide.config.decoder_lora_alpha) == (32, 64)
    ranks = {p.shape[0] for n, p in wide.decoder_parameters().items() if "lora_A" in n}
    assert ranks == {32}
    soft_prompt = [qa_segments(tokenizer, "q?", model.compress(DOCS, 4), "Shakespeare")]
    torch.testing.assert_close(wide.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0])
    text_prompt = [qa_segments(tokenizer, "q?", DOCS, "Shakespeare")]
    assert torch.equal(wide.target_logits(text_prompt)[0], tiny_gmsa(tokenizer).target_logits(text_prompt)[0])
    wide.set_stage("keft")
    wide.target_logits(soft_prompt)[0].sum().backward()
    new_part = [p.grad[:, 16:] for n, p in wide.decoder_parameters().items() if ".q_proj.lora_B" in n]
    assert new_part and all(g.abs().sum() > 0 for g in new_part)  # the new columns learn
    with torch.no_grad():
        for name, p in wide.decoder_parameters().items():
            if ".v_proj.lora_B" in name:
                p[:, 16:].add_(0.1)
    again = load_checkpoint(wide.save_pretrained(tmp_path / "r32"))
    assert again.config.decoder_lora_rank == 32
    torch.testing.assert_close(again.target_logits(soft_prompt)[0], wide.target_logits(soft_prompt)[0])
    assert not torch.allclose(again.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0])
    assert load_checkpoint(path, decoder_lora_rank=8).config.decoder_lora_rank == 16


def test_decoder_adapter_dropout_acts_in_training_on_soft_token_prompts_only(tokenizer, tmp_path, capsys):
    """--decoder_lora_dropout: soft-token prompts vary between training forwards and not in eval mode, where they
    answer as without dropout; text prompts (adapter off) never change; the flag is validated before a model loads."""
    model, plain = with_trained_adapter(tokenizer), with_trained_adapter(tokenizer)
    model.set_decoder_lora_dropout(0.5)
    soft_prompt = [qa_segments(tokenizer, "q?", model.compress(DOCS, 4), "Shakespeare")]
    text_prompt = [qa_segments(tokenizer, "q?", DOCS, "Shakespeare")]
    model.train()
    torch.manual_seed(0)
    first, second = model.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0]
    assert not torch.allclose(first, second)
    assert torch.equal(model.target_logits(text_prompt)[0], model.target_logits(text_prompt)[0])
    model.eval(), plain.eval()
    torch.testing.assert_close(model.target_logits(soft_prompt)[0], plain.target_logits(soft_prompt)[0])
    model.set_decoder_lora_dropout(0.0)
    model.train()
    torch.testing.assert_close(model.target_logits(soft_prompt)[0], model.target_logits(soft_prompt)[0])
    flags = ["--stage", "keft", "--no_compress", "true", "--out_dir", str(tmp_path)]
    assert parse_args(flags + ["--decoder_lora_dropout", "0.1"]).decoder_lora_dropout == 0.1
    for bad in ("1", "-0.1"):
        with pytest.raises(SystemExit):
            parse_args(flags + ["--decoder_lora_dropout", bad])
        assert "--decoder_lora_dropout is a probability" in capsys.readouterr().err


def test_prompts_compress_each_document_at_its_own_rate(tokenizer):
    """Sample.document_rates (the trainer's --lead_rate): each document's soft tokens are those of its own rate."""
    from gmsa_rag.samples import build_prompts

    model = tiny_gmsa(tokenizer, rates=[2, 4])

    def soft(sample):
        return [s.embeds for s in build_prompts(model, [sample])[0] if s.embeds is not None]

    at2, at4 = soft(Sample(DOCS, "a", question="q", rate=2)), soft(Sample(DOCS, "a", question="q", rate=4))
    mixed = soft(Sample(DOCS, "a", question="q", rate=4, document_rates=[2, 4]))
    assert len(mixed) == 2 and mixed[0].shape[0] > mixed[1].shape[0]
    torch.testing.assert_close(mixed[0], at2[0])
    torch.testing.assert_close(mixed[1], at4[1])
    as_text = Sample(DOCS, "a", question="q", rate=None, document_rates=[2, 4])  # the teacher's copy of a lead sample
    assert as_text.rate_of(0) is None and not soft(as_text)


def test_mixed_restoring_weighs_each_kind_by_its_share_of_samples_with_its_own_token_mean(tokenizer):
    """--restore_fraction's loss: answers and stage-1 targets each count with their mean token loss, weighted by
    their share of the samples (the restoring kind times its weight), so a long restored document does not drown
    the answers; one kind alone gives the plain mean."""
    model = tiny_gmsa(tokenizer)
    model.eval()
    answer = Sample(DOCS, "William Shakespeare", question="who wrote hamlet?", rate=2)
    restore = Sample(DOCS, DOCS[0] + " " + DOCS[1], rate=2, target_doc=0)
    per_sample = [model(s) for s in ([answer], [restore])]  # each alone: its mean token loss
    for weight in (1.0, 0.25):
        mixed = model([answer, restore, answer], restore_weight=weight)
        assert torch.allclose(mixed, 2 / 3 * per_sample[0] + weight / 3 * per_sample[1], atol=1e-5)
        assert torch.allclose(model.loss_terms["answer"], per_sample[0], atol=1e-5)
        assert torch.allclose(model.loss_terms["restore"], per_sample[1], atol=1e-5)
    plain = model([answer, restore])  # without the weighting: one mean over all target tokens, the restored text's
    assert plain > 0.8 * per_sample[1] and not torch.allclose(plain, model([answer, restore], restore_weight=1.0))
    assert torch.allclose(model([answer, answer], restore_weight=0.25), per_sample[0], atol=1e-5)
    with pytest.raises(ValueError, match="distilled"):
        model([answer, restore], distill_weight=0.5, restore_weight=1.0)
