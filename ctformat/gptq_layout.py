"""Shapes and dtypes of GPTQ, AWQ and CT module tensors (spec/gptq-awq.md §1, §2, §7).
Torch-free: conversions plan from these, validate_gptq checks headers against them.
"""
from __future__ import annotations

from typing import Mapping

from .gptq_config import AWQ_METHOD, ModuleScheme
from .header import TensorInfo
from .scheme import QuantScheme, Strategy, packed_width

__all__ = ["gptq_shapes", "awq_shapes", "ct_shapes", "in_features"]

Shapes = dict[str, tuple[str, tuple[int, ...]]]      # suffix -> (dtype code, shape)


def gptq_shapes(n: int, k: int, ms: ModuleScheme, lead: tuple[int, ...] = ()) -> Shapes:
    g, b = ms.num_groups(k), ms.bits
    return {"qweight": ("I32", (*lead, -(-k * b // 32), n)), "qzeros": ("I32", (*lead, g, -(-n * b // 32))),
            "scales": ("F16", (*lead, g, n)), "g_idx": ("I32", (*lead, k))}


def awq_shapes(n: int, k: int, ms: ModuleScheme, lead: tuple[int, ...] = ()) -> Shapes:
    g = ms.num_groups(k)
    return {"qweight": ("I32", (*lead, k, n // 8)), "qzeros": ("I32", (*lead, g, n // 8)),
            "scales": ("F16", (*lead, g, n))}


def ct_shapes(n: int, k: int, scheme: QuantScheme, dtypes: Mapping[str, str], layout: str,
              lead: tuple[int, ...] = ()) -> Shapes:
    """The CT tensors of one module, in the order compressed-tensors' files list them."""
    b = scheme.num_bits
    tensor = scheme.strategy is Strategy.TENSOR
    out: Shapes = {}
    if scheme.has_g_idx:
        out["weight_g_idx"] = ("I32", (*lead, k))
    out["weight_packed"] = ("I32", (*lead, n, packed_width(k, b, layout)))
    out["weight_scale"] = (dtypes["weight_scale"], (1,) if tensor else (*lead, *scheme.scale_shape(n, k)))
    out["weight_shape"] = (dtypes.get("weight_shape", "I64"), (len(lead) + 2,))
    if not scheme.symmetric:
        zdt = "I8" if tensor else dtypes.get("weight_zero_point", "I32")
        g = scheme.num_groups(k)
        shape = (1,) if tensor else (*lead, n, g) if zdt == "I8" else (*lead, packed_width(n, b, layout), g)
        out["weight_zero_point"] = (zdt, shape)
    return out


def in_features(tensors: Mapping[str, TensorInfo], ms: ModuleScheme, method: str) -> int | None:
    """K of a GPTQ/AWQ module from its headers: len(g_idx), else qweight's rows (None if it cannot tell)."""
    if "g_idx" in tensors and len(tensors["g_idx"].shape) >= 1:
        return tensors["g_idx"].shape[-1]
    q = tensors.get("qweight")
    if q is None or len(q.shape) < 2:
        return None
    rows = q.shape[-2]
    if method == AWQ_METHOD:
        return rows
    return rows * 32 // ms.bits if rows * 32 % ms.bits == 0 else None
