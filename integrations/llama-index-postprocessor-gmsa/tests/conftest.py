import pytest

from gmsa_rag import GMSAConfig, GMSAModel
from gmsa_rag.backbone import load_tokenizer, tiny_backbone

TEXTS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany and its most populous city.",
    "The Nile is a major river in northeastern Africa, flowing into the Mediterranean Sea.",
]


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer()


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh tiny random GMSA model per test (its soft-token store starts empty)."""
    config = GMSAConfig(base_model="tiny", encoder_layers=2, lsa_layers=1, window=32, lora_rank=4, lora_alpha=8)
    return GMSAModel(tiny_backbone("llama"), tokenizer, config)


@pytest.fixture()
def texts():
    return list(TEXTS)


@pytest.fixture()
def nodes():
    from llama_index.core.schema import NodeWithScore, TextNode

    return [
        NodeWithScore(
            node=TextNode(text=t, id_=f"node-{i}", metadata={"title": f"doc {i}"}, excluded_llm_metadata_keys=[]),
            score=1.0 - i / 10,
        )
        for i, t in enumerate(TEXTS)
    ]
