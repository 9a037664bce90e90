import pytest
import torch

from gmsa_rag.backbone import load_backbone, tiny_backbone


def test_random_backbone_from_a_config_folder(tmp_path, tokenizer):
    tiny_backbone("qwen2").config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    a, tok = load_backbone(f"random:{tmp_path}")
    b, _ = load_backbone(f"random:{tmp_path}")
    assert type(a).__name__ == "Qwen2ForCausalLM" and len(tok) == len(tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))  # seeded


def test_missing_model_path_fails_clearly(tmp_path):
    with pytest.raises(OSError):
        load_backbone(str(tmp_path / "no-such-model"))
