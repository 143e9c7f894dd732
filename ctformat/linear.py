"""Quantized layers as torch modules: they keep a module's stored tensors (packed weights,
scales, ...) as buffers and dequantize on every call, with the Triton kernel for CUDA
tensors and its CPU twin otherwise (quant.decompress). forward(x) is `x @ W.T` of the
dequantized W, bit for bit, in the dtype the weight is dequantized to (spec §11.1).

Nothing here knows the on-disk layout: a layer built from a checkpoint dequantizes through
dequant.decompress_loaded, so every format the Checkpoint reads works unchanged.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .checkpoint import Checkpoint, Module
from .dequant import checked_shape, decompress_loaded, decompress_marlin
from .errors import UsageError
from .marlin import split_experts
from .quant import decompress
from .scheme import QuantScheme
from .spec import CROSS_WORD

__all__ = ["QuantLinear", "QuantExperts", "expert_layers", "expert_count"]

Dequantize = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class QuantLinear(nn.Module):
    """A Linear layer (no bias) stored quantized: W [out, in] is rebuilt on each forward."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], dequantize: Dequantize) -> None:
        super().__init__()
        for name, t in tensors.items():
            self.register_buffer(name, t)
        self._names = tuple(tensors)
        self._dequantize = dequantize          # stored tensors (local names) -> W

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, module: Module, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> QuantLinear:
        """One quantized module of a checkpoint (its bias, if any, is not part of it)."""
        if not module.quantized:
            raise UsageError(f"{module.prefix}: stored dense, not quantized")
        if expert_count(module):
            raise UsageError(f"{module.prefix}: a stack of {expert_count(module)} experts; "
                             "QuantExperts.from_checkpoint reads it")
        tensors = {s: ckpt.load(i.name, device) for s, i in module.tensors.items() if s != "bias"}
        return cls(tensors, partial(decompress_loaded, ckpt, module, dtype=dtype))

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = CROSS_WORD,
                     dtype: torch.dtype | None = None) -> QuantLinear:
        """From pack-quantized tensors in memory (weight_packed, weight_scale, weight_shape, ...)."""
        return cls(tensors, partial(decompress, scheme=scheme, layout=layout, dtype=dtype))

    def stored(self, device: str | torch.device | None = None) -> dict[str, torch.Tensor]:
        """The stored tensors by local name; with `device`, copies of them there (the layer
        itself stays where it is: streaming keeps packed weights on the host)."""
        tensors = {n: getattr(self, n) for n in self._names}
        return tensors if device is None else {n: t.to(device, non_blocking=True) for n, t in tensors.items()}

    def dequantize(self, stored: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The dense weight [out, in], from this layer's tensors (or `stored`, copies of them),
        on their device."""
        return self._dequantize(self.stored() if stored is None else stored)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantize().T           # [..., in] -> [..., out]


class QuantExperts(nn.Module):
    """One projection of E experts (e.g. every `experts.N.w1`), all of the same shape:
    W [E, out, in] is rebuilt on each forward and applied expert by expert."""

    def __init__(self, experts: Sequence[QuantLinear]) -> None:
        super().__init__()
        if not experts:
            raise UsageError("an expert stack needs at least one expert")
        self.experts = nn.ModuleList(experts)

    @classmethod
    def from_checkpoint(cls, ckpt: Checkpoint, modules: Sequence[Module], *,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> QuantExperts:
        """Per-expert modules in order, or stacked ones (3-D compressed-tensors, Marlin
        `experts.w13`/`.w2`), split into their experts."""
        return cls([layer for m in modules for layer in (
            expert_layers(ckpt, m, device=device, dtype=dtype) if expert_count(m)
            else [QuantLinear.from_checkpoint(ckpt, m, device=device, dtype=dtype)])])

    def dequantize(self) -> torch.Tensor:
        """[E, out, in], written expert by expert into one tensor."""
        first = self.experts[0].dequantize()
        out = first.new_empty((len(self.experts), *first.shape))
        out[0] = first
        for e, layer in enumerate(self.experts[1:], start=1):
            out[e] = layer.dequantize()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.dequantize().mT          # [E, tokens, in] -> [E, tokens, out]


def expert_count(module: Module) -> int | None:
    """E for a module stored as a stack of E experts (a 3-D weight), else None."""
    info = module.tensors.get("B") or module.tensors.get("weight_packed")
    return info.shape[0] if info is not None and len(info.shape) == 3 else None


def expert_layers(ckpt: Checkpoint, module: Module, *, parts: int = 1, device: str | torch.device | None = None,
                dtype: torch.dtype | None = None) -> list[QuantLinear]:
    """One QuantLinear per expert of a stacked module, and per part of each expert for a Marlin
    `w13` split into gate and up (`parts=2`; spec §10.6). Slicing is exact: every stored tensor
    carries the expert dimension first, and Marlin's layout is tile-local along N."""
    loaded = {s: ckpt.load(i.name, device) for s, i in module.tensors.items() if s != "bias"}
    if module.is_marlin:
        return [QuantLinear(t, partial(decompress_marlin, dtype=dtype)) for t in split_experts(loaded, parts)]
    stored_shape = loaded.pop("weight_shape")
    experts, *_, in_features = checked_shape(ckpt, module, stored_shape)
    dequantize = partial(decompress, scheme=module.scheme, layout=ckpt.word_layout(module, in_features), dtype=dtype)
    return [QuantLinear({**{k: t[e] for k, t in loaded.items()}, "weight_shape": stored_shape[1:]}, dequantize)
            for e in range(experts)]
