"""Tiny randomly initialised GMSA models for tests and smoke runs (no weights needed)."""
from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from .backbone import tiny_backbone
from .config import GMSAConfig
from .model import GMSAModel

SAMPLE_TEXT = (
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
    "It is named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 to 1889."
)


def tiny_gmsa(tokenizer: PreTrainedTokenizerBase, family: str = "llama", seed: int = 0, **config) -> GMSAModel:
    """A GMSA model on a 4-layer, 64-wide random backbone; ``config`` overrides GMSAConfig fields.

    LoRA B matrices start at zero in peft; here they get small random values so adapters matter in tests.
    """
    settings = dict(base_model=f"tiny-{family}", encoder_layers=2, lsa_layers=1, window=32, lora_rank=4, lora_alpha=8)
    settings.update(config)
    model = GMSAModel(tiny_backbone(family, seed=seed), tokenizer, GMSAConfig(**settings))
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model


def lively(model: GMSAModel) -> GMSAModel:
    """Larger random decoder weights (in place): the tiny model's greedy tokens then vary from step to step and row
    to row (with the default init it repeats one token), so that equal or constrained outputs mean something."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.decoder.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model
