import pytest
import torch

from gmsa_rag import GMSAConfig
from gmsa_rag.layers import inner_model
from gmsa_rag.prompt import qa_segments

from gmsa_rag.testing import SAMPLE_TEXT as TEXT
from gmsa_rag.testing import tiny_gmsa as make_tiny


@pytest.mark.parametrize("method", ["gmsa", "tcp"])
@pytest.mark.parametrize("rate", [2, 4, 8, 16])
def test_soft_token_counts_for_every_rate(tokenizer, method, rate):
    model = make_tiny(tokenizer, method=method)
    texts = [TEXT, "A short one.", TEXT * 3]  # the last spans several 32-token windows
    soft = model.compress(texts, rate)
    for text, s in zip(texts, soft):
        ids = tokenizer.encode(text, add_special_tokens=False)
        windows = [ids[i : i + 32] for i in range(0, len(ids), 32)]
        assert s.shape == (sum(-(-len(w) // rate) for w in windows), model.hidden_size)
        assert torch.isfinite(s).all()


@pytest.mark.parametrize("method", ["gmsa", "tcp"])
def test_batching_and_padding_do_not_change_soft_tokens(tokenizer, method):
    model = make_tiny(tokenizer, method=method)
    texts = [TEXT, "Short.", TEXT[:77]]
    together = model.compress(texts, 4, batch_size=8)
    alone = [model.compress([t], 4)[0] for t in texts]
    for a, b in zip(together, alone):
        assert torch.allclose(a, b, atol=1e-5)


def test_texts_at_different_rates_compress_as_each_at_its_own(tokenizer):
    model = make_tiny(tokenizer)
    texts, rates = [TEXT, "Short.", TEXT * 2], [2, 8, 4]  # (the last spans two windows)
    mixed = model.compress(texts, rates, batch_size=8)
    for text, rate, soft in zip(texts, rates, mixed):
        alone = model.compress([text], rate)[0]
        assert soft.shape == alone.shape and torch.allclose(soft, alone, atol=1e-5)
    with pytest.raises(ValueError, match="one rate per text"):
        model.compress(texts, [2, 4])
    with pytest.raises(ValueError, match="not allowed"):
        model.compress(texts, [2, 3, 4])


def test_long_text_is_split_into_windows_in_order(tokenizer):
    model = make_tiny(tokenizer)
    ids = tokenizer.encode(TEXT * 2, add_special_tokens=False)
    soft = model.compress([TEXT * 2], 4)[0]
    pieces = [tokenizer.decode(ids[i : i + 32]) for i in range(0, len(ids), 32)]
    per_window = model.soft_tokens([ids[i : i + 32] for i in range(0, len(ids), 32)], [4] * len(pieces))
    assert torch.allclose(soft, torch.cat(per_window), atol=1e-5)


def test_soft_tokens_deterministic(tokenizer):
    a = make_tiny(tokenizer).compress([TEXT], 8)[0]
    b = make_tiny(tokenizer).compress([TEXT], 8)[0]
    assert torch.equal(a, b)


def test_gmsa_soft_tokens_are_normed_group_means_after_the_prefix(tokenizer):
    model = make_tiny(tokenizer, lsa_layers=0, encoder_norm=True, soft_token_norm=True)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:32]
    prefix = tokenizer.encode(model.config.encoder_prefix, add_special_tokens=False)
    assert prefix and model.prefix_ids == prefix
    hidden = model.encoder(input_ids=torch.tensor([prefix + ids]), use_cache=False).last_hidden_state[0, len(prefix):]
    expected = model.soft_norm(torch.stack([hidden[i : i + 8].mean(0) for i in range(0, 32, 8)]))
    assert torch.allclose(model.soft_tokens([ids], [8])[0], expected, atol=1e-5)


def test_legacy_config_reads_the_bare_window_and_keeps_raw_states(tokenizer):
    """Checkpoints of format 1: no prefix, no encoder norm, no soft-token norm (soft tokens = plain group means)."""
    model = make_tiny(tokenizer, lsa_layers=0, encoder_prefix="", encoder_norm=False, soft_token_norm=False)
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:32]
    hidden = model.encoder(input_ids=torch.tensor([ids]), use_cache=False).last_hidden_state[0]
    expected = torch.stack([hidden[i : i + 8].mean(0) for i in range(0, 32, 8)])
    assert torch.allclose(model.soft_tokens([ids], [8])[0], expected, atol=1e-5)


def test_encoder_output_is_the_base_models_final_norm(tokenizer):
    model = make_tiny(tokenizer, encoder_norm=True)
    assert torch.equal(model.encoder.norm.weight, inner_model(model.decoder).norm.weight)
    assert model.encoder.norm.weight.data_ptr() != inner_model(model.decoder).norm.weight.data_ptr()
    assert "encoder.norm.weight" not in model.compressor_parameters()  # frozen copy, not trained


@pytest.mark.parametrize("method", ["gmsa", "tcp"])
def test_soft_tokens_live_on_the_embedding_scale(tokenizer, method):
    """With soft_token_norm, soft-token RMS is within 1.5x of the token embeddings' RMS (the format-1 model was
    ~130x off on SmolLM2). Off by default: on SmolLM2 it stalled stage 1 (see the stage-1 ablations)."""
    model = make_tiny(tokenizer, method=method, soft_token_norm=True)
    soft = torch.cat(model.compress([TEXT, "Berlin is the capital of Germany."], 4))
    embed_rms = model.embed_tokens.weight.pow(2).mean().sqrt()
    soft_rms = soft.pow(2).mean().sqrt()
    assert 1 / 1.5 < float(soft_rms / embed_rms) < 1.5


def test_prefix_states_never_reach_a_soft_token(tokenizer):
    """Changing the prefix changes the encoder's context but the soft-token count stays ceil(n / r) of the text."""
    ids = tokenizer.encode(TEXT, add_special_tokens=False)[:30]
    a = make_tiny(tokenizer).soft_tokens([ids], [4])[0]
    b = make_tiny(tokenizer, encoder_prefix="Text:\n").soft_tokens([ids], [4])[0]
    assert a.shape == b.shape == (8, a.shape[1])
    assert not torch.allclose(a, b)


def test_lsa_and_encoder_start_as_copies_of_the_decoder_layers(tokenizer):
    model = make_tiny(tokenizer, lsa_layers=2)
    decoder_layers = inner_model(model.decoder).layers
    for copy, original in zip(model.lsa.layers, decoder_layers[:2]):
        for (n1, p1), (n2, p2) in zip(copy.state_dict().items(), original.state_dict().items()):
            assert n1 == n2 and torch.equal(p1, p2)
            assert p1.data_ptr() != p2.data_ptr()  # a copy, not shared
    base_q = decoder_layers[0].self_attn.q_proj.weight
    assert torch.equal(model.encoder.layers[0].self_attn.q_proj.base_layer.weight, base_q)
    assert model.embed_tokens is model.encoder.embed_tokens  # embeddings shared, not duplicated


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_families(tokenizer, family):
    model = make_tiny(tokenizer, family=family)
    soft = model.compress([TEXT], 4)
    assert soft[0].shape[1] == model.hidden_size
    assert isinstance(model.generate("What is it?", soft, max_new_tokens=3), str)


def test_generate_from_soft_tokens_matches_manual_greedy_decoding(tokenizer):
    model = make_tiny(tokenizer)
    soft = model.compress([TEXT, "Paris is in France."], 4)
    prompt = qa_segments(tokenizer, "Where is the tower?", soft)
    batch = model.build_batch([prompt])
    ids = []
    embeds = batch.inputs_embeds
    for _ in range(4):  # greedy decoding without a KV cache, the slow obvious way
        logits = model.decoder(inputs_embeds=embeds).logits[0, -1]
        nxt = int(logits.argmax())
        ids.append(nxt)
        embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[nxt]]))], 1)
    out = model.generate("Where is the tower?", soft, max_new_tokens=4, min_new_tokens=4)
    assert out == tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_batched_generation_equals_single(tokenizer):
    model = make_tiny(tokenizer)
    soft = model.compress([TEXT, "Paris is in France."], 4)
    single = [model.generate(q, c, max_new_tokens=4) for q, c in [("Where?", soft), ("Who?", soft[:1])]]
    batched = model.generate(["Where?", "Who?"], [soft, soft[:1]], max_new_tokens=4)
    assert batched == single


def test_uncompressed_text_contexts_use_the_same_template(tokenizer):
    model = make_tiny(tokenizer)
    prompt = qa_segments(tokenizer, "Q?", [TEXT])
    text = "".join(tokenizer.decode(s.token_ids) for s in prompt)
    assert "Document [1]: " + TEXT in text and text.rstrip().endswith("assistant")
    assert isinstance(model.generate("Q?", [TEXT], max_new_tokens=2), str)


@pytest.mark.parametrize(
    "texts, rate, error",
    [
        ([""], 4, ValueError),
        (["   \n"], 4, ValueError),
        ([TEXT], 3, ValueError),
        ([TEXT], 32, ValueError),
        ([123], 4, TypeError),
        (TEXT, 4, TypeError),
    ],
)
def test_bad_input_errors(tiny, texts, rate, error):
    with pytest.raises(error):
        tiny.compress(texts, rate)


def test_rate_error_names_allowed_rates(tiny):
    with pytest.raises(ValueError, match=r"\[2, 4, 8, 16\]"):
        tiny.compress([TEXT], 5)


def test_prompt_longer_than_decoder_window_is_refused(tokenizer):
    model = make_tiny(tokenizer)
    model.decoder.config.max_position_embeddings = 64
    with pytest.raises(ValueError, match="window"):
        model.generate("Q?", [TEXT * 4], max_new_tokens=4)


def test_stages_unfreeze_only_their_parameters(tokenizer):
    model = make_tiny(tokenizer, decoder_tuning="qkv")
    model.set_stage("ae")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n and n.startswith("encoder.")) or n.startswith(("lsa.", "soft_norm.")) for n in trainable)
    assert not any("embed_tokens" in n for n in trainable)
    model.set_stage("keft")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("decoder.") and n.split(".")[-2] in ("q_proj", "k_proj", "v_proj") for n in trainable)


def test_config_validation():
    with pytest.raises(ValueError):
        GMSAConfig(method="other")
    with pytest.raises(ValueError):
        GMSAConfig(rates=(2, 1024), window=512)
    assert GMSAConfig.from_dict(GMSAConfig(rates=(8, 2)).to_dict()).rates == (2, 8)


@pytest.mark.parametrize("method", ["gmsa", "tcp"])
def test_encoder_passes_by_length_do_not_change_soft_tokens(tokenizer, method):
    """Windows grouped by length into several encoder passes give the soft tokens of one padded pass, in order."""
    ids = tokenizer.encode(TEXT * 2, add_special_tokens=False)
    windows = [ids[:30], ids[:5], ids[3:20], ids[:12], ids[7:32]]
    one_pass = make_tiny(tokenizer, method=method).soft_tokens(windows, [2, 4, 2, 8, 4])
    grouped = make_tiny(tokenizer, method=method, encoder_tokens_per_pass=40).soft_tokens(windows, [2, 4, 2, 8, 4])
    assert len(one_pass) == len(grouped) == 5
    for a, b in zip(one_pass, grouped):
        assert torch.allclose(a, b, atol=1e-5)


def test_length_groups_bound_the_padded_size():
    from gmsa_rag.model import length_groups

    lengths = [30, 5, 17, 12, 25, 100]
    groups = length_groups(lengths, 40)
    assert sorted(i for g in groups for i in g) == list(range(6))
    assert all(len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 40 for g in groups)
    assert [lengths[g[0]] for g in groups] == sorted(lengths[g[0]] for g in groups)  # short windows first


def test_right_padded_stacks_run_without_a_mask_and_match_the_masked_run(tokenizer):
    """run_stack drops the padding mask (fused causal attention); real positions are what a masked run gives."""
    from gmsa_rag.layers import run_stack

    model = make_tiny(tokenizer)
    ids, mask = model.encoder_inputs([[5, 6, 7, 8, 9, 10], [11, 12, 13]])
    embeds = model.embed_tokens(ids)
    fast = run_stack(model.encoder, embeds, mask)
    masked = model.encoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
    real = mask.bool()
    assert torch.allclose(fast[real], masked[real], atol=1e-5)
    with pytest.raises(ValueError, match="padded on the right"):
        run_stack(model.encoder, embeds, mask.flip(1))


def test_soft_token_center_starts_at_the_mean_soft_token_and_keeps_their_differences(tokenizer):
    """With soft_token_center, soft tokens are the uncentred ones minus one learned vector; calibration sets it to
    their mean over the given windows at every rate, so the centred soft tokens average to zero there."""
    plain = make_tiny(tokenizer)
    model = make_tiny(tokenizer, soft_token_center=True)
    assert "soft_center" in model.compressor_parameters() and not bool(model.soft_center.any())
    windows = [tokenizer.encode(t, add_special_tokens=False)[:32] for t in (TEXT, "Berlin is the capital of Germany.",
                                                                           TEXT[40:])]
    center = model.calibrate_soft_center(windows)
    assert bool(center.any())
    every = []
    for rate in model.config.rates:
        for mine, theirs in zip(model.soft_tokens(windows, [rate] * 3), plain.soft_tokens(windows, [rate] * 3)):
            assert torch.allclose(mine, theirs - center, atol=1e-5)
            every.append(mine)
    assert torch.cat(every).mean(0).abs().max() < 1e-3 * center.abs().max()
    assert model.config.architecture_key != plain.config.architecture_key  # caches built without it do not match


def test_soft_token_center_needs_the_option_and_some_windows(tokenizer):
    with pytest.raises(ValueError, match="no soft-token centre"):
        make_tiny(tokenizer).calibrate_soft_center([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least one window"):
        make_tiny(tokenizer, soft_token_center=True).calibrate_soft_center([])


def test_compiled_blocks_give_the_eager_loss_and_gradients(tokenizer):
    """Regional compilation (``compile_blocks``) changes how blocks run, not what they compute, for batches of
    varied shape (dynamic shapes: no recompile per length); generation under force_eager still works."""
    from gmsa_rag.samples import Sample

    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    batches = [[Sample([ids[:30]], ids[:30], rate=2), Sample([ids[5:20], ids[:9]], ids[5:20], rate=4, target_doc=0)],
               [Sample([ids[3:28]], ids[3:28], rate=4)]]
    eager = make_tiny(tokenizer, decoder_tuning="qkv_lora")
    compiled = make_tiny(tokenizer, decoder_tuning="qkv_lora")
    assert compiled.compile_blocks(backend="aot_eager") == 2 + 4 + 1  # encoder, decoder, LSA blocks
    for model in (eager, compiled):
        model.set_stage("ae")
    for samples in batches:
        losses = [model(samples) for model in (eager, compiled)]
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
        for loss in losses:
            loss.backward()
    grads = [{n: p.grad for n, p in m.compressor_parameters().items()} for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys() and all(g is not None for g in grads[1].values())
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-5)
    soft = compiled.compress([TEXT], 4)
    with torch.compiler.set_stance("force_eager"):
        assert compiled.generate("Where is it?", soft, max_new_tokens=3) == eager.generate("Where is it?", soft,
                                                                                          max_new_tokens=3)


def test_inputs_that_would_be_misread_are_refused_and_numpy_rates_taken(tokenizer):
    import copy

    import numpy as np

    model = make_tiny(tokenizer)
    soft = model.compress([TEXT], np.int64(4))  # a numpy integer is a rate like any other
    assert len(soft) == 1 and soft[0].shape[0] > 0
    with pytest.raises(TypeError, match="wrap it in a list"):
        model.generate("Where?", TEXT, max_new_tokens=1)  # (was read as one document per character)
    with pytest.raises(TypeError, match="wrap it in a list"):
        model.generate(["Where?"], [soft[0]], max_new_tokens=1)  # (was read as one document per row)
    with pytest.raises(ValueError, match=r"\[n, hidden\]"):
        model.generate("Where?", [soft[0][0]], max_new_tokens=1)
    with pytest.raises(ValueError, match="no questions"):
        model.generate([], [], max_new_tokens=1)
    with pytest.raises(ValueError, match="batch_size"):
        model.compress([TEXT], 4, batch_size=0)
    model.generate("Where?", soft, max_new_tokens=2)
    twin = copy.deepcopy(model)  # (the generation engine, with its lock, stays behind)
    assert twin.generate("Where?", soft, max_new_tokens=2) == model.generate("Where?", soft, max_new_tokens=2)
