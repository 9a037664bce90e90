"""Slices of a base LM's Transformer stack, used by the encoder (first k layers) and LSA (lowest L layers)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import AutoModel, PreTrainedModel


def inner_model(base: PreTrainedModel) -> nn.Module:
    """The decoder-only Transformer inside a causal LM (``model.model`` for LLaMA, Qwen2, Mistral...)."""
    inner = base.get_decoder()
    if not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise TypeError(f"{type(base).__name__} has no `.layers`/`.embed_tokens` decoder stack; unsupported family")
    return inner


def copy_of_lowest_layers(base: PreTrainedModel, num_layers: int, keep_norm: bool = False) -> nn.Module:
    """A standalone copy of the base LM's lowest ``num_layers`` blocks, run on ``inputs_embeds``.

    Returns a model of the base's own class (so any family works) whose token embedding is shared with the
    base, not copied. Its final norm is a copy of the base's final norm with ``keep_norm`` (the authors' encoder
    output), else removed (raw residual-stream states).
    """
    inner = inner_model(base)
    total = len(inner.layers)
    if not 1 <= num_layers <= total:
        raise ValueError(f"cannot take {num_layers} layers of a {total}-layer model")
    config = copy.deepcopy(inner.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None) is not None:
        config.layer_types = list(config.layer_types)[:num_layers]
    dtype, device = next(inner.parameters()).dtype, next(inner.parameters()).device
    with torch.device(device):  # build in place (a 7B model's 8 encoder layers take minutes on a CPU)
        stack = AutoModel.from_config(config, dtype=dtype)
    for mine, theirs in zip(stack.layers, inner.layers):
        mine.load_state_dict(theirs.state_dict())
    stack.embed_tokens = inner.embed_tokens
    if keep_norm:
        stack.norm.load_state_dict(inner.norm.state_dict())
    else:
        stack.norm = nn.Identity()
    return stack


class EmbeddingScaleNorm(nn.Module):
    """RMSNorm whose gain starts at the per-dimension RMS of a token-embedding matrix.

    Puts soft tokens on the scale (and the per-dimension spread) of the embeddings the decoder reads.
    """

    def __init__(self, embedding: torch.Tensor, eps: float = 1e-6) -> None:
        super().__init__()
        rms = embedding.detach().float().pow(2).mean(0).sqrt()
        self.weight = nn.Parameter(rms.to(embedding.dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def run_stack(stack: nn.Module, embeds: torch.Tensor, mask: torch.Tensor,
              every_layer: bool = False) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Run a causal layer stack over [B, T, H] embeddings whose rows are padded on the right ([B, T] ``mask``);
    return its last hidden states (``every_layer``: the output of each layer, the last one after the final norm,
    as Hugging Face's ``hidden_states`` give them without the input embeddings).

    Under causal attention a real position only sees earlier positions, all real when padding is on the right,
    so the mask changes nothing a caller reads and is not passed: SDPA may then use its fused causal kernels
    (flash attention) rather than a masked path. The gain of this alone was not measured; the slow training
    steps of 2026-11-26 came from cuDNN attention's per-call host cost (see gmsa_rag.train). Rows padded on the
    left are refused where the mask is on the host (checking a mask on a GPU would wait for it every call; the
    package's own callers pad on the right by construction).
    """
    if mask is not None and mask.device.type == "cpu" and bool((mask[:, 1:] > mask[:, :-1]).any()):
        raise ValueError("run_stack needs rows padded on the right (a padding position precedes a real one)")
    if every_layer:
        return stack(inputs_embeds=embeds, use_cache=False, output_hidden_states=True).hidden_states[1:]
    return stack(inputs_embeds=embeds, use_cache=False).last_hidden_state


def own_parameters(stack: nn.Module) -> dict[str, nn.Parameter]:
    """A stack's parameters without the token embedding it shares with the base model."""
    return {name: p for name, p in stack.named_parameters() if not name.startswith("embed_tokens.")}
