"""Group Merging: average the encoder's hidden states over consecutive groups of r tokens."""
from __future__ import annotations

import torch


def group_merge(hidden: torch.Tensor, mask: torch.Tensor, rates: torch.Tensor | int,
                num_groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked mean over consecutive groups of ``rate`` real tokens, per sample.

    Args:
        hidden: [B, T, H] encoder hidden states.
        mask: [B, T] 1 for real tokens, 0 for padding (padding may sit anywhere; it is never averaged in).
        rates: one rate for the batch or a [B] tensor of per-sample rates.
        num_groups: G below, when the caller knows it (else it is read back from the device, a wait on a GPU).

    Returns:
        merged [B, G, H] with G = max_b ceil(n_b / r_b) (the last group of a sample may be short), and
        a [B, G] mask of the groups that exist. Sums run in fp32; the result has ``hidden``'s dtype.
    """
    batch, length, width = hidden.shape
    mask = mask.to(hidden.device).bool()
    rates = torch.as_tensor(rates, device=hidden.device).long().expand(batch)
    lengths = mask.sum(1)
    n_groups = (lengths + rates - 1) // rates
    num_groups = max(int(n_groups.max()) if num_groups is None else num_groups, 1)
    position = mask.long().cumsum(1) - 1  # index among the sample's real tokens
    group = torch.where(mask, position // rates[:, None], num_groups)  # padding goes to an overflow slot
    index = group.unsqueeze(-1).expand(batch, length, width)
    sums = hidden.new_zeros(batch, num_groups + 1, width, dtype=torch.float32)
    sums.scatter_add_(1, index, hidden.float())
    counts = hidden.new_zeros(batch, num_groups + 1, dtype=torch.float32)
    counts.scatter_add_(1, group, mask.float())
    merged = sums[:, :num_groups] / counts[:, :num_groups].clamp(min=1).unsqueeze(-1)
    group_mask = torch.arange(num_groups, device=hidden.device)[None, :] < n_groups[:, None]
    return merged.to(hidden.dtype) * group_mask.unsqueeze(-1), group_mask.long()
