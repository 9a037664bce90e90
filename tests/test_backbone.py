import pytest
import torch

from gmsa_rag.backbone import BackboneUnavailableError, load_backbone, tiny_backbone


def test_random_backbone_from_a_config_folder(tmp_path, tokenizer):
    tiny_backbone("qwen2").config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    a, tok = load_backbone(f"random:{tmp_path}")
    b, _ = load_backbone(f"random:{tmp_path}")
    assert type(a).__name__ == "Qwen2ForCausalLM" and len(tok) == len(tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded


def test_missing_model_path_fails_clearly(tmp_path):
    with pytest.raises(BackboneUnavailableError, match=r"base model folder .*no-such-model cannot be loaded"):
        load_backbone(str(tmp_path / "no-such-model"))


def test_hub_id_offline_says_how_to_get_it(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(BackboneUnavailableError, match=r"'no-such-org/no-such-model' is not on this machine.*hf download"):
        load_backbone("no-such-org/no-such-model")


def test_converted_model_folder_is_written_by_any_process(tmp_path, tokenizer, monkeypatch):
    """The SmolLM2 conversion's writer: inside a torch.distributed job transformers' save_pretrained writes weights on
    rank 0 only; a conversion won by another rank must still leave a loadable folder (tied LM head written once)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from gmsa_rag import backbone
    from transformers.distributed import mixin

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    model = tiny_backbone()
    target = tmp_path / "converted"
    backbone.write_model_dir(model, tokenizer, target)
    assert backbone.is_converted(target)
    with safe_open(str(target / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and "model.embed_tokens.weight" in f.keys()
    loaded = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = torch.tensor([[1, 5, 9, 42]])
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits)


def test_a_folder_marked_finished_without_its_model_is_not_converted(tmp_path):
    from gmsa_rag.backbone import CONVERTED_MARK, is_converted

    (tmp_path / CONVERTED_MARK).touch()
    (tmp_path / "tokenizer.json").write_text("{}")
    assert not is_converted(tmp_path)
