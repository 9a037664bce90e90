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
