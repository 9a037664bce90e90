"""Cheap, dtype-insensitive fingerprints of model weights (to tie checkpoints and caches to their base)."""
from __future__ import annotations

import hashlib
from typing import Iterable

import torch

_SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(named_tensors: Iterable[tuple[str, torch.Tensor]], salt: str = "") -> str:
    """sha256 over names, shapes and an evenly spaced sample of each tensor's values rounded to bf16.

    Rounding to bf16 makes an fp32 load and a bf16 load of the same weights agree; sampling keeps it fast
    for 7B models while any retrained or different model still changes the sampled values. The samples travel to
    the host in one copy per device (one synchronisation on a GPU, not one per tensor: ``GMSACompressor`` asks for
    the model's fingerprint on every query).
    """
    items = sorted(named_tensors, key=lambda item: item[0])
    samples = _on_host([_sample(tensor) for _, tensor in items])
    digest = hashlib.sha256(salt.encode())
    for (name, tensor), sample in zip(items, samples):
        digest.update(f"{name}:{tuple(tensor.shape)};".encode())
        digest.update(sample.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def _sample(tensor: torch.Tensor) -> torch.Tensor:
    """Up to ``_SAMPLES_PER_TENSOR`` evenly spaced values of ``tensor`` in bf16, where the tensor lives."""
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
    return flat[::step][:_SAMPLES_PER_TENSOR].to(torch.bfloat16)


def _on_host(samples: list[torch.Tensor]) -> list[torch.Tensor]:
    """The samples on the CPU, each device's concatenated and copied at once, in the given order."""
    out: list[torch.Tensor | None] = [None] * len(samples)
    by_device: dict[torch.device, list[int]] = {}
    for i, sample in enumerate(samples):
        by_device.setdefault(sample.device, []).append(i)
    for indices in by_device.values():
        host = torch.cat([samples[i] for i in indices]).cpu()
        for i, part in zip(indices, host.split([samples[i].numel() for i in indices])):
            out[i] = part
    return out  # type: ignore[return-value]
