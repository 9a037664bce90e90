"""Fused input projections for decoding: a layer's W_Q, W_K and W_V (and its MLP's gate and up projections) stored
once, as one matrix, and read by one matrix multiply.

A decode step reads every weight once; three small matrix multiplies over the same input cost more than one over
their concatenation (gpt-fast stores ``wqkv``; inductor's freezing concatenates them too, but into a second copy of
the weights). Here the separate ``nn.Linear`` modules stay where they are - state dict, peft LoRA wrappers and the
decoder adapter's switch unchanged - and their weights become views into one fused matrix. The first projection a
block calls (the *head*) multiplies by the whole matrix and hands the other slices of the product to the projections
the block calls next with the same input (the *tails*). A tail called first, or with another input, computes its
own product, so outputs never depend on the order of calls; peft's LoRA layers wrap the base layers and add their
updates as before.

For inference: where a projection's weight needs a gradient, the head computes its own slice only. Moving or
casting the model (``.to``) un-fuses it (the fused matrix is dropped, the views become separate tensors again);
:func:`fuse_projections` fuses it again, and checks that every view is still in place (peft's safe merge, for one,
replaces a weight's data), so calling it before each generation is cheap and safe.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Sibling projections fused together: attribute names on one module, in the order its forward calls them.
FUSED_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Group:
    """One fused group: its matrix (and bias), its members' output sizes, and the product handed to the tails.
    A plain object, not a module: the matrix is no parameter or buffer of the model."""

    def __init__(self, members: Sequence[nn.Linear]) -> None:
        self.members = list(members)
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.sizes = [m.out_features for m in self.members]
        self.starts = [sum(self.sizes[:i]) for i in range(len(self.sizes))]  # each member's first row in the matrix
        self.input: torch.Tensor | None = None  # what the head was called with, while tails have slices to take
        self.parts: tuple[torch.Tensor, ...] | None = None
        self.left = 0

    def build(self) -> None:
        """(Re)build the fused matrix from the members' current weights and make each weight a view into it."""
        with torch.no_grad():
            self.weight = torch.cat([m.weight.detach() for m in self.members])
            has_bias = self.members[0].bias is not None  # (all or none: see _groups)
            self.bias = torch.cat([m.bias.detach() for m in self.members]) if has_bias else None
            for member, start, size in zip(self.members, self.starts, self.sizes):
                member.weight.data = self.weight[start:start + size]
                if self.bias is not None:
                    member.bias.data = self.bias[start:start + size]
        if hasattr(torch, "_dynamo"):  # a captured step reads it in place, as it reads parameters
            torch._dynamo.mark_static_address(self.weight)
            if self.bias is not None:
                torch._dynamo.mark_static_address(self.bias)
        self.clear()

    def intact(self) -> bool:
        """Whether every member's weight (and bias) is still its view into the fused matrix."""
        return self.weight is not None and all(
            _is_view(member.weight, self.weight, start)
            and (self.bias is None or _is_view(member.bias, self.bias, start))
            for member, start in zip(self.members, self.starts))

    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            m.weight.requires_grad or (m.bias is not None and m.bias.requires_grad) for m in self.members)

    def clear(self) -> None:
        self.input, self.parts, self.left = None, None, 0


def _is_view(tensor: torch.Tensor, whole: torch.Tensor, row: int) -> bool:
    return (tensor.device == whole.device and tensor.dtype == whole.dtype
            and tensor.data_ptr() == whole.data_ptr() + row * whole.stride(0) * whole.element_size())


class FusedHead(nn.Linear):
    """The group member called first: one matrix multiply by the fused matrix, its own slice returned, the others
    kept for the tails."""

    _fused: _Group

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._fused
        # (compiled code cannot compare addresses: there only fuse_projections, which the engine calls before each
        # generation, checks the views)
        if group.weight is None or group.needs_grad() or not (torch.compiler.is_compiling() or group.intact()):
            return F.linear(input, self.weight, self.bias)
        parts = F.linear(input, group.weight, group.bias).split(group.sizes, dim=-1)
        group.input, group.parts, group.left = input, parts, len(parts) - 1
        return parts[0]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> nn.Module:  # .to(), .cuda(), .half(): views end
        self._fused.weight = self._fused.bias = None
        self._fused.clear()
        return super()._apply(fn, *args, **kwargs)


class FusedTail(nn.Linear):
    """A group member called after the head: its slice of the head's product, when called with the same input."""

    _fused: _Group
    _index: int

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        group = self._fused
        if group.parts is None or group.input is not input:
            return F.linear(input, self.weight, self.bias)
        part = group.parts[self._index]
        group.left -= 1
        if group.left == 0:
            group.clear()  # nothing kept between calls
        return part


def _base_linear(module: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` under a projection (peft wraps it as ``base_layer``), or None: also for a layer whose
    weight accelerate moves in at each call (a ``device_map`` with offloading: ``_hf_hook``) or that has no data."""
    base = getattr(module, "base_layer", module)
    if type(base) not in (nn.Linear, FusedHead, FusedTail) or hasattr(base, "_hf_hook"):
        return None
    return None if base.weight.device.type == "meta" else base


def _groups(model: nn.Module) -> list[list[nn.Linear]]:
    found = []
    for module in model.modules():
        for names in FUSED_GROUPS:
            members = [_base_linear(getattr(module, n)) if isinstance(getattr(module, n, None), nn.Module) else None
                       for n in names]
            if all(m is not None for m in members) and len({(m.in_features, m.weight.device, m.weight.dtype,
                                                             m.bias is None) for m in members}) == 1:
                found.append(members)
    return found


def fuse_projections(model: nn.Module) -> int:
    """Fuse every group of sibling projections (:data:`FUSED_GROUPS`) of ``model`` in place, and fuse again any whose
    matrix was dropped or whose views were replaced; returns the number of groups fused now. Outputs are unchanged
    (one matrix multiply instead of several, the same products)."""
    fused = 0
    for members in _groups(model):
        group = getattr(members[0], "_fused", None)
        if isinstance(members[0], FusedHead) and group is not None and group.members == members and group.intact():
            continue
        group = _Group(members)
        group.build()
        for index, member in enumerate(members):
            member.__class__ = FusedHead if index == 0 else FusedTail
            member._fused = group
            member._index = index
        fused += 1
    return fused


def unfuse_projections(model: nn.Module) -> int:
    """Undo :func:`fuse_projections`: plain ``nn.Linear`` modules with weights of their own again; returns the
    number of groups un-fused."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, (FusedHead, FusedTail)):
            count += isinstance(module, FusedHead)
            with torch.no_grad():
                module.weight.data = module.weight.data.clone()
                if module.bias is not None:
                    module.bias.data = module.bias.data.clone()
            module._fused.weight = module._fused.bias = None
            module._fused.clear()
            del module._fused
            module.__dict__.pop("_index", None)
            module.__class__ = nn.Linear
    return count


def _fused_groups(model: nn.Module) -> list[_Group]:
    return [m._fused for m in model.modules() if isinstance(m, FusedHead)]


def is_fused(model: nn.Module) -> bool:
    """Whether ``model`` has fused groups, all intact."""
    groups = _fused_groups(model)
    return bool(groups) and all(g.intact() for g in groups)


class KeptFused:
    """Keeps a model's projections fused across calls of :meth:`ensure`: the first fuses them
    (:func:`fuse_projections`), later ones check only the groups found then and fuse again where one was undone.
    A walk over every module of the model cost 4.4 ms of host time on the 2-core CPU (SmolLM2), checking its 60 groups
    0.25 ms: this sits in front of every generation's prefill."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.groups: list[_Group] | None = None  # None: not fused yet

    def ensure(self) -> None:
        if self.groups is not None and all(g.intact() for g in self.groups):
            return
        fuse_projections(self.model)
        self.groups = _fused_groups(self.model)
