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
from .pack import pack_to_int32, unpack_from_int32
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


def to_awq(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = DENSE) -> dict[str, torch.Tensor]:
    """A CT module's 4-bit tensors -> qweight [..., K, N/8], qzeros [..., G, N/8], scales [..., G, N]."""
    shape = tuple(int(v) for v in ct["weight_shape"].tolist())
    n, k = shape[-2], shape[-1]
    if scheme.num_bits != 4 or n % 8:
        raise UnsupportedError(f"AWQ GEMM stores 4-bit weights with out_features % 8 == 0, got "
                               f"{scheme.num_bits}-bit [{n}, {k}] [GCV-01/GCV-02]")
    groups = -(-k // scheme.group_size) if scheme.strategy is Strategy.GROUP else 1
    q = unpack_from_int32(ct["weight_packed"], 4, shape, layout=layout)           # [..., N, K] signed
    z = zero_codes(ct, scheme, n, groups, layout) - 8                              # [..., G, N] signed
    return {"qweight": pack_to_int32(interleave(q.transpose(-1, -2)).contiguous(), 4),
            "qzeros": pack_to_int32(interleave(z.to(torch.int8)).contiguous(), 4),
            "scales": gptq_scales(ct["weight_scale"], n)}


def _unpack(words: torch.Tensor, rows: int) -> torch.Tensor:
    """AWQ words [..., R, N/8] -> signed codes [..., R, N] in column order."""
    n = words.shape[-1] * 8
    return deinterleave(unpack_from_int32(words, 4, (*words.shape[:-1], n)))


def check_awq(a: Mapping[str, torch.Tensor], ms: ModuleScheme) -> list[TensorError]:
    """AWQ-06: with zero_point false every stored zero is 8."""
    if ms.sym and not bool((_unpack(a["qzeros"], 0) == 0).all()):
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
    q = _unpack(qweight, k).transpose(-1, -2).contiguous()                       # [..., N, K]
    z = _unpack(a["qzeros"], 0).to(torch.int16) + 8
    if scheme.symmetric and not bool((z == 8).all()):
        raise TensorError("the source is symmetric, but not every stored zero is 8", rule="GPTQ-11", where="qzeros")
    return ct_tensors(pack_to_int32(q, 4), a["scales"], z, None, scheme, n=n, k=k, dtypes=dtypes, layout=layout)
