"""Shared fixtures: SmolLM2's tokenizer (converted once per machine) and tiny random GMSA models."""
from __future__ import annotations

import pytest
import torch

from gmsa_rag.backbone import load_tokenizer
from gmsa_rag.testing import tiny_gmsa

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer("smollm2")


@pytest.fixture
def tiny(tokenizer):
    return tiny_gmsa(tokenizer)
