"""Shapes and dtypes of GPTQ, AWQ and CT module tensors, and the header-only GPTQ/AWQ rules
(spec/gptq-awq.md §1, §2, §7). Torch-free: writers plan from these, validate checks with them.
"""
from __future__ import annotations

from typing import Mapping

from .errors import TensorError
from .gptq_config import AWQ_METHOD, AWQ_PARAMS, GPTQ_PARAMS, ModuleScheme
from .header import TensorInfo
from .scheme import QuantScheme, Strategy, packed_width

__all__ = ["gptq_shapes", "awq_shapes", "ct_shapes", "in_features", "check_header"]

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


def check_header(tensors: Mapping[str, TensorInfo], ms: ModuleScheme, method: str) -> list[TensorError]:
    """GPTQ-02..06 / AWQ-02..05 of one module, from its headers (§7)."""
    awq = method == AWQ_METHOD
    pre = "AWQ" if awq else "GPTQ"
    allowed = set(AWQ_PARAMS if awq else GPTQ_PARAMS) | {"bias"}
    need = set(AWQ_PARAMS if awq else GPTQ_PARAMS[:3]) | ({"g_idx"} if ms.desc_act and not awq else set())
    issues = []
    if need - set(tensors) or set(tensors) - allowed:
        issues.append(TensorError(f"has {sorted(tensors)}; needs {sorted(need)}, allows also bias"
                                  + ("" if awq else " and g_idx"), rule=f"{pre}-02"))
        return issues
    k = in_features(tensors, ms, method)
    q, s = tensors["qweight"], tensors["scales"]
    if k is None or len(s.shape) < 2:
        issues.append(TensorError(f"qweight {list(q.shape)} gives no in_features for {ms.bits} bits",
                                  rule=f"{pre}-03", where="qweight"))
        return issues
    n, lead = s.shape[-1], tuple(s.shape[:-2])
    if awq and (n % 8 or (ms.group_size != -1 and k % ms.group_size)):
        issues.append(TensorError(f"[{n}, {k}] needs out_features % 8 == 0 and in_features % group_size == 0",
                                  rule="AWQ-04", where="scales"))
        return issues
    want = (awq_shapes if awq else gptq_shapes)(n, k, ms, lead)
    rule = {"qweight": f"{pre}-03", "scales": f"{pre}-04", "qzeros": f"{pre}-05", "g_idx": "GPTQ-06"}
    for name, (code, shape) in want.items():
        got = tensors.get(name)
        if got is None:
            continue
        codes = ("F16", "BF16", "F32") if name == "scales" else (code,)
        if got.dtype not in codes or tuple(got.shape) != shape:
            issues.append(TensorError(f"{got.dtype} {list(got.shape)}, expected {'/'.join(codes)} {list(shape)}",
                                      rule=rule[name], where=name))
    if not awq and not issues and s.dtype != "F16":
        issues.append(TensorError(f"scales are {s.dtype}; GPTQ loaders hold F16 and cast", rule="GPTQ-10",
                                  where="scales"))
    return issues
