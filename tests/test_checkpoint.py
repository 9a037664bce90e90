import json

import pytest
import torch

from gmsa_rag.checkpoint import CONFIG_FILE, INDEX_FILE, MAX_SHARD_BYTES, CheckpointError, attach_checkpoint, read_record, read_weights
from gmsa_rag.testing import SAMPLE_TEXT, tiny_gmsa


def _reload(tokenizer, path, **config):
    """Rebuild a model on a fresh tiny backbone (same seed = same base weights) and load the checkpoint."""
    fresh = tiny_gmsa(tokenizer, seed=0, **config)
    with torch.no_grad():  # make sure loading really overwrites, not reuses, the trained weights
        for p in fresh.trained_parameters().values():
            p.zero_()
    return attach_checkpoint(fresh, read_record(path), read_weights(path), path)


@pytest.mark.parametrize("config", [{}, {"method": "tcp"}, {"decoder_tuning": "qkv"}, {"decoder_tuning": "qkv_lora"},
                                    {"decoder_tuning": "qkv_lora", "decoder_mlp_lora_rank": 2},
                                    {"decoder_tuning": "full"}])
def test_round_trip_is_bit_exact(tokenizer, tmp_path, config):
    model = tiny_gmsa(tokenizer, **config)
    with torch.no_grad():
        for p in model.trained_parameters().values():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path, extra={"note": "unit test"})
    loaded = _reload(tokenizer, tmp_path, **config)
    original, restored = model.trained_parameters(), loaded.trained_parameters()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name
    assert torch.equal(model.compress([SAMPLE_TEXT], 4)[0], loaded.compress([SAMPLE_TEXT], 4)[0])
    assert loaded.fingerprint == model.fingerprint == read_record(tmp_path)["fingerprint"]
    assert loaded.config.extra == {"note": "unit test"}


def test_checkpoint_is_safetensors_shards_under_limit(tokenizer, tmp_path):
    tiny_gmsa(tokenizer, decoder_tuning="qkv").save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model*.safetensors"))
    assert shards and all(s.stat().st_size < MAX_SHARD_BYTES for s in shards)
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert record["base_model"] == "tiny-llama" and len(record["base_fingerprint"]) == 64


def test_other_base_model_is_refused(tokenizer, tmp_path):
    tiny_gmsa(tokenizer, seed=0).save_pretrained(tmp_path)
    other = tiny_gmsa(tokenizer, seed=1)  # same architecture, other base weights
    with pytest.raises(CheckpointError, match="trained on base model"):
        attach_checkpoint(other, read_record(tmp_path), read_weights(tmp_path), tmp_path)


def test_fingerprint_ignores_dtype_but_not_weights(tokenizer):
    model = tiny_gmsa(tokenizer)
    bf16 = tiny_gmsa(tokenizer)
    bf16.decoder.to(torch.bfloat16)
    from gmsa_rag.fingerprint import weights_fingerprint

    assert weights_fingerprint(bf16.decoder.state_dict().items()) == model.base_fingerprint
    assert tiny_gmsa(tokenizer, seed=3).base_fingerprint != model.base_fingerprint


def test_fingerprint_is_the_digest_every_saved_cache_was_keyed_by():
    """One host copy per device must not change the value: caches precomputed before are keyed by it."""
    import hashlib

    from gmsa_rag.fingerprint import weights_fingerprint

    def one_tensor_at_a_time(named, salt):  # the digest as first defined: each tensor sampled and copied alone
        digest = hashlib.sha256(salt.encode())
        for name, tensor in sorted(named, key=lambda item: item[0]):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step][:4096].to(device="cpu", dtype=torch.bfloat16)
            digest.update(f"{name}:{tuple(tensor.shape)};".encode())
            digest.update(sample.view(torch.int16).numpy().tobytes())
        return digest.hexdigest()

    g = torch.Generator().manual_seed(0)
    named = [("b.weight", torch.randn(300, 50, generator=g)), ("a.bias", torch.randn(7, generator=g)),
             ("c.weight", torch.randn(5000, 3, generator=g).to(torch.bfloat16)), ("d", torch.randn(2, 3, generator=g)[:, 1])]
    assert weights_fingerprint(named, salt="s") == one_tensor_at_a_time(named, "s")
    assert weights_fingerprint(named[:3], salt="s") != weights_fingerprint(named, salt="s")
    assert weights_fingerprint([], salt="s") == hashlib.sha256(b"s").hexdigest()


def test_corrupted_shard_is_detected(tokenizer, tmp_path):
    tiny_gmsa(tokenizer).save_pretrained(tmp_path)
    shard = next(tmp_path.glob("model*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted"):
        read_weights(tmp_path)


def test_truncated_or_missing_files_are_detected(tokenizer, tmp_path):
    tiny_gmsa(tokenizer).save_pretrained(tmp_path)
    (tmp_path / INDEX_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        read_weights(tmp_path)
    with pytest.raises(CheckpointError, match="not a GMSA checkpoint"):
        read_record(tmp_path / "nowhere")


def test_architecture_mismatch_is_refused(tokenizer, tmp_path):
    tiny_gmsa(tokenizer, lsa_layers=1).save_pretrained(tmp_path)
    other = tiny_gmsa(tokenizer, lsa_layers=2)
    with pytest.raises(CheckpointError, match="do not match"):
        attach_checkpoint(other, read_record(tmp_path), read_weights(tmp_path), tmp_path)


@pytest.mark.parametrize("damage", [
    lambda r: r.pop("config"), lambda r: r.pop("base_fingerprint"), lambda r: r["config"].update(rates="48"),
    lambda r: r["config"].update(unknown_field=1), lambda r: r["config"].update(window=1),
])
def test_damaged_records_are_checkpoint_errors(tokenizer, tmp_path, damage):
    tiny_gmsa(tokenizer).save_pretrained(tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    damage(record)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="damaged record"):
        read_record(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="unsupported checkpoint format"):
        read_record(tmp_path)


def test_fingerprint_is_computed_again_only_when_a_compressor_tensor_changed(tokenizer, monkeypatch):
    """GMSACompressor asks for it every query: it is cached while the compressor's tensors stand as they were."""
    import gmsa_rag.model as model_module

    model = tiny_gmsa(tokenizer)
    computed = []
    real = model_module.weights_fingerprint
    monkeypatch.setattr(model_module, "weights_fingerprint", lambda *a, **k: computed.append(1) or real(*a, **k))
    first = model.fingerprint
    assert model.fingerprint == first and len(computed) == 1  # asked again: not recomputed
    name, weight = next(iter(model.compressor_parameters().items()))
    saved = weight.detach().clone()
    weight.requires_grad_(True)
    weight.grad = torch.ones_like(weight)
    torch.optim.SGD([weight], lr=0.5).step()  # an optimizer step: counted by PyTorch
    stepped = model.fingerprint
    assert stepped != first and len(computed) == 2
    with torch.no_grad():
        weight.copy_(saved)  # the weights as loaded again
    assert model.fingerprint == first
    weight.data.add_(1.0)  # a write PyTorch does not count: stale until forgotten
    assert model.fingerprint == first
    model.forget_fingerprint()
    assert model.fingerprint not in (first, stepped)
    weight.data = saved.clone()  # a new storage: noticed
    assert model.fingerprint == first


def _average_checkpoints_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "average_checkpoints.py"
    spec = importlib.util.spec_from_file_location("average_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _perturbed_checkpoints(tokenizer, tmp_path, count, dtype=torch.float32, extra=None):
    """``count`` tiny checkpoints whose trained weights differ (seeded noise), saved in ``dtype`` with ``extra``."""
    paths = []
    for seed in range(count):
        model = tiny_gmsa(tokenizer)
        with torch.no_grad():
            for p in model.trained_parameters().values():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        paths.append(str(model.to(dtype).save_pretrained(tmp_path / f"ck{seed}", extra=extra)))
    return paths


def test_average_checkpoints_is_the_elementwise_mean(tokenizer, tmp_path):
    """scripts/average_checkpoints.py: the mean of every stored tensor; checkpoints of other shapes refused."""
    script = _average_checkpoints_script()
    paths = _perturbed_checkpoints(tokenizer, tmp_path, 3)
    mean = script.mean_state(paths)
    states = [read_weights(p) for p in paths]
    assert mean.keys() == states[0].keys()
    for name, tensor in mean.items():
        assert torch.allclose(tensor, (states[0][name] + states[1][name] + states[2][name]) / 3), name
    assert not torch.allclose(mean[name], states[0][name])
    wider = str(tiny_gmsa(tokenizer, lora_rank=8).save_pretrained(tmp_path / "wider"))
    with pytest.raises(CheckpointError, match="other tensors or shapes"):
        script.mean_state([paths[0], wider])


def test_average_checkpoints_weights_count_a_soup_as_its_readers(tokenizer, tmp_path, capsys):
    """--weights 2 1 adds a third reader to a soup of two as the uniform soup of all three would; the record names
    each input's weight; weights that do not fit the checkpoints are refused before anything is read."""
    script = _average_checkpoints_script()
    paths = _perturbed_checkpoints(tokenizer, tmp_path, 3)
    states = [read_weights(p) for p in paths]
    pair_model = tiny_gmsa(tokenizer)  # the uniform soup of the first two
    with torch.no_grad():
        for name, param in pair_model.trained_parameters().items():
            param.copy_((states[0][name] + states[1][name]) / 2)
    pair = str(pair_model.save_pretrained(tmp_path / "pair"))
    weighted = script.mean_state([pair, paths[2]], [2, 1])
    assert script.stored_dtype(paths[0]) == torch.float32
    for name, tensor in script.mean_state(paths).items():
        assert torch.allclose(weighted[name], tensor, atol=1e-6), name
    assert not torch.allclose(weighted[name], script.mean_state([pair, paths[2]])[name])
    extra = script.soup_extra(paths[:2], [{}, {}], [2.0, 1.0])
    assert extra == {"weighted_average_of": [{"checkpoint": paths[0], "weight": 2.0},
                                             {"checkpoint": paths[1], "weight": 1.0}]}
    for weights in (["2"], ["1", "0"]):
        with pytest.raises(SystemExit):
            script.main([str(tmp_path / "soup"), *paths[:2], "--weights", *weights])
        assert "--weights needs one positive weight per checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_average_checkpoints_stores_the_soup_as_its_inputs_are_stored(tokenizer, tmp_path, monkeypatch):
    """A soup of bf16 checkpoints is a bf16 checkpoint (the fp32 mean rounded once), not an fp32 one twice the size."""
    from gmsa_rag.model import GMSAModel

    script = _average_checkpoints_script()
    ranked = {"train_config": {"stage": "keft", "max_docs": 5, "doc_order": "bm25_first"}, "step": 300}
    paths = _perturbed_checkpoints(tokenizer, tmp_path, 2, torch.bfloat16, ranked)
    assert script.stored_dtype(paths[0]) == torch.bfloat16

    def from_pretrained(path, dtype=None, **_):  # the tiny backbone is not loadable by name
        return attach_checkpoint(tiny_gmsa(tokenizer).to(dtype or torch.float32), read_record(path),
                                 read_weights(path), path)

    monkeypatch.setattr(GMSAModel, "from_pretrained", staticmethod(from_pretrained))
    assert script.main([str(tmp_path / "soup"), *paths]) == 0
    soup, mean = read_weights(tmp_path / "soup"), script.mean_state(paths)
    assert soup.keys() == mean.keys()
    for name, tensor in soup.items():
        assert tensor.dtype == torch.bfloat16, name
        assert torch.equal(tensor, mean[name].to(torch.bfloat16)), name
    assert read_record(tmp_path / "soup")["extra"] == {"uniform_average_of": paths,
                                                       "train_config": ranked["train_config"]}


def test_average_checkpoints_refuses_readers_of_other_prompt_shapes(tokenizer, tmp_path, capsys):
    """The product reads the document count and order from the average's record: inputs that disagree are refused
    in one line, before any weights load, and nothing is written."""
    script = _average_checkpoints_script()
    paths = []
    for order in ("bm25_first", "given"):
        extra = {"train_config": {"stage": "keft", "max_docs": 5, "doc_order": order}}
        paths += _perturbed_checkpoints(tokenizer, tmp_path / order, 1, extra=extra)
    assert script.main([str(tmp_path / "soup"), *paths]) == 2
    assert "read other prompts" in capsys.readouterr().err
    assert not (tmp_path / "soup").exists()


def test_a_checkpoints_compressor_can_grow_and_starts_where_it_was(tokenizer, tmp_path, monkeypatch):
    """load_checkpoint(lora_rank=, lsa_layers=) above the checkpoint's: the encoder LoRA widens (alpha / r kept) and new
    LSA blocks start as the identity, so the soft tokens are the checkpoint's; the new parts learn, save and load back
    at the new sizes; lower values keep the checkpoint's; a model without LSA cannot grow one."""
    import gmsa_rag.backbone as backbone
    from gmsa_rag.checkpoint import load_checkpoint

    monkeypatch.setattr(backbone, "load_backbone", lambda *a, **k: (tiny_gmsa(tokenizer).decoder, tokenizer))
    model = tiny_gmsa(tokenizer)
    path = model.save_pretrained(tmp_path / "small")
    grown = load_checkpoint(path, lora_rank=8, lsa_layers=3)
    assert (grown.config.lora_rank, grown.config.lora_alpha, grown.config.lsa_layers) == (8, 16, 3)
    assert len(grown.lsa.layers) == 3
    window = tokenizer.encode(SAMPLE_TEXT, add_special_tokens=False)[:32]
    torch.testing.assert_close(grown.soft_tokens([window], [4])[0], model.soft_tokens([window], [4])[0])
    grown.set_stage("ae")
    grown.soft_tokens([window], [4])[0].pow(2).sum().backward()
    params = grown.compressor_parameters()
    wide = [p.grad[:, 4:] for n, p in params.items() if n.startswith("encoder.") and "q_proj.lora_B" in n]
    assert wide and all(g.abs().sum() > 0 for g in wide)  # the new columns learn
    assert all(params[f"lsa.layers.{i}.{m}"].grad.abs().sum() > 0
               for i in (1, 2) for m in ("self_attn.o_proj.weight", "mlp.down_proj.weight"))
    with torch.no_grad():
        for name, p in params.items():
            if name.startswith("lsa.layers.2.") and name.endswith("down_proj.weight"):
                p.add_(0.01)
    again = load_checkpoint(grown.save_pretrained(tmp_path / "grown"))
    assert (again.config.lora_rank, again.config.lsa_layers) == (8, 3)
    torch.testing.assert_close(again.soft_tokens([window], [4])[0], grown.soft_tokens([window], [4])[0])
    assert not torch.allclose(again.soft_tokens([window], [4])[0], model.soft_tokens([window], [4])[0])
    kept = load_checkpoint(tmp_path / "grown", lora_rank=2, lsa_layers=1)
    assert (kept.config.lora_rank, kept.config.lsa_layers) == (8, 3)
    none = tiny_gmsa(tokenizer, lsa_layers=0).save_pretrained(tmp_path / "no-lsa")
    with pytest.raises(CheckpointError, match="has no LSA blocks to grow"):
        load_checkpoint(none, lsa_layers=2)
