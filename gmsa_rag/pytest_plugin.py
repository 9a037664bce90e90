"""Pytest fixtures shared by the library's and the integrations' test suites (tiny random models, sample nodes).

Loaded by the repository's root ``conftest.py`` (``pytest_plugins``); nothing here runs outside tests.
"""
from __future__ import annotations

import pytest
import torch

from .backbone import load_tokenizer, tiny_backbone
from .config import GMSAConfig
from .model import GMSAModel
from .testing import tiny_gmsa

TEXTS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany and its most populous city.",
    "The Nile is a major river in northeastern Africa, flowing into the Mediterranean Sea.",
]


@pytest.fixture(scope="session", autouse=True)
def _two_threads():
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer (converted from the packaged GGUF once per machine)."""
    return load_tokenizer("smollm2")


@pytest.fixture
def tiny(tokenizer):
    """A tiny random GMSA model whose LoRA adapters are non-zero."""
    return tiny_gmsa(tokenizer)


@pytest.fixture()
def tiny_model(tokenizer):
    """A fresh tiny random GMSA model per test (its soft-token store starts empty)."""
    config = GMSAConfig(base_model="tiny", encoder_layers=2, lsa_layers=1, window=32, lora_rank=4, lora_alpha=8)
    return GMSAModel(tiny_backbone("llama"), tokenizer, config)


@pytest.fixture()
def small_docs(tmp_path):
    """A fresh folder holding three of the bundled example documents (for index and CLI tests)."""
    import shutil

    from .rag import bundled_docs_dir

    folder = tmp_path / "docs"
    folder.mkdir()
    for name in ("32-the-art-of-war.txt", "27-manchester-united-f-c.txt", "16-great-lakes.txt"):
        shutil.copy(bundled_docs_dir() / name, folder / name)
    return folder


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


@pytest.fixture(scope="session")
def no_whitespace(tokenizer):
    """generate kwargs that keep a tiny random model from emitting only blank tokens (answers are then
    non-empty nonsense, which is what the tests need)."""
    blank = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip()]
    return {"suppress_tokens": blank}
