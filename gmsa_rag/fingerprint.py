"""Cheap, dtype-insensitive fingerprints of model weights (to tie checkpoints and caches to their base)."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], salt: str = "") -> str:
    """sha256 over names, shapes and an evenly spaced sample of each tensor's values rounded to bf16.

    Rounding to bf16 makes an fp32 load and a bf16 load of the same weights agree; sampling keeps it fast
    for 7B models while any retrained or different model still changes the sampled values.
    """
    digest = hashlib.sha256(salt.encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
        sample = flat[::step][:_SAMPLES_PER_TENSOR].to(device="cpu", dtype=torch.bfloat16)
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()
