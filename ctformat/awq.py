"""AWQ GEMM module tensors <-> compressed-tensors pack-quantized tensors (spec/gptq-awq.md §2).

AWQ packs 4-bit codes along N, eight per word, in the order AWQ_ORDER. Reordering the
columns of each run of eight turns that into CT's plain order, so the words are built and
read by ctformat.pack. Leading (expert) dimensions pass through.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import TensorError, UnsupportedError
from .gptq import ct_tensors, gptq_scales, zero_codes
from .gptq_config import AWQ_ORDER, ModuleScheme
from .scheme import QuantScheme, Strategy
from .spec import DENSE

__all__ = ["to_awq", "from_awq", "check_awq", "interleave", "deinterleave"]

_INVERSE = tuple(sorted(range(8), key=AWQ_ORDER.__getitem__))    # (0, 4, 1, 5, 2, 6, 3, 7)


def interleave(cols: torch.Tensor) -> torch.Tensor:
    """[..., N] in column order -> the order of AWQ's nibbles (each run of 8 by AWQ_ORDER)."""
    return cols.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2)


def deinterleave(nibbles: torch.Tensor) -> torch.Tensor:
    """Inverse of interleave."""
    return nibbles.unflatten(-1, (-1, 8))[..., list(_INVERSE)].flatten(-2)


# AWQ_ORDER puts columns 8c + (0, 2), (4, 6), (1, 3), (5, 7) into bytes 0..3 of word c (low, high
# nibble): with j = 4*b2 + 2*b1 + b0, column 8c + j is byte b2 + 2*b0, nibble b1. So words are
# built from uint8 code planes directly: one transpose of the codes, a few nibble ops.
def _words_from_codes(u: torch.Tensor) -> torch.Tensor:
    """Unsigned codes [..., R, N] (uint8) -> AWQ words [..., R, N/8]."""
    v = u.unflatten(-1, (-1, 2, 2, 2))                                # [..., c, b2, b1, b0]
    lo, hi = v[..., 0, :].transpose(-1, -2), v[..., 1, :].transpose(-1, -2)   # [..., c, b0, b2]
    return (lo | (hi << 4)).contiguous().flatten(-3).view(torch.int32)


def _codes_from_words(w: torch.Tensor) -> torch.Tensor:
    """AWQ words [..., R, N/8] -> unsigned codes [..., R, N] (uint8)."""
    by = w.contiguous().view(torch.uint8).unflatten(-1, (-1, 2, 2))   # [..., c, b0, b2]
    v = torch.stack((by & 0x0F, by >> 4), dim=-1)                     # [..., c, b0, b2, b1]
    return v.permute(*range(v.ndim - 3), v.ndim - 2, v.ndim - 1, v.ndim - 3).flatten(-4)


def _ct_codes(packed: torch.Tensor, shape) -> torch.Tensor:
    """CT 4-bit weight_packed [..., N, K/8] -> unsigned codes [..., N, K] (uint8)."""
    by = packed.contiguous().view(torch.uint8)
    return torch.stack((by & 0x0F, by >> 4), dim=-1).flatten(-2)[..., : shape[-1]]


def to_awq(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = DENSE) -> dict[str, torch.Tensor]:
    """A CT module's 4-bit tensors -> qweight [..., K, N/8], qzeros [..., G, N/8], scales [..., G, N]."""
    shape = tuple(int(v) for v in ct["weight_shape"].tolist())
    n, k = shape[-2], shape[-1]
    if scheme.num_bits != 4 or n % 8:
        raise UnsupportedError(f"AWQ GEMM stores 4-bit weights with out_features % 8 == 0, got "
                               f"{scheme.num_bits}-bit [{n}, {k}] [GCV-01/GCV-02]")
    groups = -(-k // scheme.group_size) if scheme.strategy is Strategy.GROUP else 1
    u = _ct_codes(ct["weight_packed"], shape).transpose(-1, -2)                     # [..., K, N]
    z = zero_codes(ct, scheme, n, groups, layout).to(torch.uint8)                   # [..., G, N]
    return {"qweight": _words_from_codes(u), "qzeros": _words_from_codes(z),
            "scales": gptq_scales(ct["weight_scale"], n)}


def check_awq(a: Mapping[str, torch.Tensor], ms: ModuleScheme) -> list[TensorError]:
    """AWQ-06: with zero_point false every stored zero is 8."""
    if ms.sym and not bool((_codes_from_words(a["qzeros"]) == 8).all()):
        return [TensorError("zero_point is false, but not every stored zero is 8", rule="AWQ-06", where="qzeros")]
    return []


def from_awq(a: Mapping[str, torch.Tensor], ms: ModuleScheme, scheme: QuantScheme, *,
             dtypes: Mapping[str, str], layout: str = DENSE) -> dict[str, torch.Tensor]:
    """An AWQ module's tensors -> its CT tensors in `scheme` (the inverse of to_awq)."""
    issues = check_awq(a, ms)
    if issues:
        raise issues[0]
    qweight = a["qweight"]
    k, n = qweight.shape[-2], qweight.shape[-1] * 8
    u = _codes_from_words(qweight).transpose(-1, -2)                             # [..., N, K]
    packed = (u[..., 0::2] | (u[..., 1::2] << 4)).contiguous().view(torch.int32)   # k % 8 == 0 (AWQ-04)
    z = _codes_from_words(a["qzeros"]).to(torch.int16)
    if scheme.symmetric and not bool((z == 8).all()):
        raise TensorError("the source is symmetric, but not every stored zero is 8", rule="GPTQ-11", where="qzeros")
    return ct_tensors(packed, a["scales"], z, None, scheme, n=n, k=k, dtypes=dtypes, layout=layout)
