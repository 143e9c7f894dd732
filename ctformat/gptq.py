"""GPTQ v1/v2 module tensors <-> compressed-tensors pack-quantized tensors (spec/gptq-awq.md §1).

GPTQ's bit streams are CT's (one per weight row over K for qweight, one per group row over N
for qzeros), so codes move through ctformat.pack unchanged and `qweight = weight_packed.T`.
Only the zero point's v1 offset and the scale dtype are arithmetic, both exact or refused.
Every function takes leading (expert) dimensions.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import TensorError, UnsupportedError
from .gptq_config import GPTQ_V1, ModuleScheme
from .pack import pack_to_int32, unpack_from_int32
from .scheme import QuantScheme, Strategy
from .spec import DENSE, PADDED

__all__ = ["scale_cast_loss", "zero_codes", "gptq_scales", "to_gptq", "from_gptq", "check_gptq", "ct_tensors"]


def scale_cast_loss(scale: torch.Tensor) -> tuple[int, float]:
    """(scales the float16 cast changes, largest absolute change) (§5)."""
    if scale.dtype == torch.float16:
        return 0, 0.0
    back = scale.to(torch.float16).to(scale.dtype)
    changed = back != scale
    n = int(changed.sum())
    return n, float((back.double() - scale.double()).abs()[changed].max()) if n else 0.0


def zero_codes(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, n: int, groups: int, layout: str) -> torch.Tensor:
    """Unsigned zero points z [..., G, N] (int16) of a CT module: 2^(b-1) when symmetric."""
    b, off = scheme.num_bits, 1 << (scheme.num_bits - 1)
    lead = ct["weight_packed"].shape[:-2]
    zp = ct.get("weight_zero_point")
    if zp is None:
        return torch.full((*lead, groups, n), off, dtype=torch.int16)
    if zp.dtype == torch.int32:                       # packed along N (dim -2)
        zp = unpack_from_int32(zp, b, (*lead, n, zp.shape[-1]), packed_dim=0, layout=layout)
    elif zp.numel() == 1:                             # tensor strategy: one I8 value
        zp = zp.reshape(1, 1).expand(n, 1)
    return zp.transpose(-1, -2).to(torch.int16) + off


def gptq_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    """CT weight_scale [..., N, G] (or [1] for tensor strategy) -> float16 [..., G, N]."""
    s = scale.reshape(1, 1).expand(n, 1) if scale.numel() == 1 and scale.ndim == 1 else scale
    return s.transpose(-1, -2).to(torch.float16).contiguous()


def _dense_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """weight_packed in the DENSE layout (a PADDED 3/5/6/7-bit tensor is repacked)."""
    if layout == DENSE or 8 % bits == 0:
        return packed
    return pack_to_int32(unpack_from_int32(packed, bits, shape, layout=layout), bits)


def to_gptq(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, *, fmt: str = GPTQ_V1,
            layout: str = DENSE) -> dict[str, torch.Tensor]:
    """A CT module's tensors (local names) -> qweight, qzeros, scales, g_idx (§1.3)."""
    shape = tuple(int(v) for v in ct["weight_shape"].tolist())
    n, k, b = shape[-2], shape[-1], scheme.num_bits
    gs = scheme.group_size if scheme.strategy is Strategy.GROUP else k
    groups = -(-k // gs)
    z = zero_codes(ct, scheme, n, groups, layout)
    if fmt == GPTQ_V1:
        if bool((z == 0).any()):
            raise UnsupportedError(f"a zero point of 0 has no GPTQ v1 encoding (z - 1 overflows); write "
                                   f"gptq_v2 or AWQ [GCV-04]")
        z = z - 1
    lead = shape[:-2]
    g_idx = ct.get("weight_g_idx")
    if g_idx is None:
        g_idx = (torch.arange(k, dtype=torch.int32) // gs).expand(*lead, k).contiguous()
    off = 1 << (b - 1)
    return {"qweight": _dense_codes(ct["weight_packed"], b, shape, layout).transpose(-1, -2).contiguous(),
            "qzeros": pack_to_int32((z - off).to(torch.int8), b),
            "scales": gptq_scales(ct["weight_scale"], n),
            "g_idx": g_idx.to(torch.int32)}


def _unpack_zeros(qzeros: torch.Tensor, bits: int, n: int, v1: bool) -> torch.Tensor:
    """qzeros [..., G, ceil(N*b/32)] -> real zeros z [..., G, N] (int16; v1 adds the 1 back)."""
    z = unpack_from_int32(qzeros, bits, (*qzeros.shape[:-1], n)).to(torch.int16) + (1 << (bits - 1))
    return z + 1 if v1 else z


def check_gptq(g: Mapping[str, torch.Tensor], ms: ModuleScheme, *, v1: bool, k: int) -> list[TensorError]:
    """The data rules GPTQ-07/08/09 of one module's loaded tensors (§7)."""
    issues: list[TensorError] = []
    b, n = ms.bits, g["scales"].shape[-1]
    groups = g["scales"].shape[-2]
    g_idx = g.get("g_idx")
    if g_idx is not None:
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            issues.append(TensorError(f"entries span [{int(g_idx.min())}, {int(g_idx.max())}], outside [0, {groups})",
                                      rule="GPTQ-07", where="g_idx"))
        elif not ms.desc_act and not torch.equal(g_idx.to(torch.int64), _trivial(g_idx.shape, k, ms.group_size)):
            issues.append(TensorError("differs from k // group_size, but desc_act is false", rule="GPTQ-07",
                                      where="g_idx"))
    z = _unpack_zeros(g["qzeros"], b, n, v1)
    if v1 and bool((z == 1 << b).any()):
        issues.append(TensorError(f"stores {(1 << b) - 1}, which v1 reads as zero point {1 << b}, outside the "
                                  f"{b}-bit codes", rule="GPTQ-08", where="qzeros"))
    elif ms.sym and not bool((z == 1 << (b - 1)).all()):
        issues.append(TensorError(f"sym is true, but not every zero point is {1 << (b - 1)}", rule="GPTQ-08",
                                  where="qzeros"))
    for name, count in (("qweight", k), ("qzeros", n)):
        w = g[name] if name == "qzeros" else g[name].transpose(-1, -2)
        if (count * b) % 32 and not torch.equal(pack_to_int32(unpack_from_int32(w, b, (*w.shape[:-1], count)), b), w):
            issues.append(TensorError("padding bits are not zero", rule="GPTQ-09", where=name))
    return issues


def _trivial(shape, k: int, group_size: int) -> torch.Tensor:
    gs = k if group_size == -1 else group_size
    return (torch.arange(k) // gs).expand(shape)


def ct_tensors(packed: torch.Tensor, scale: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor | None,
               scheme: QuantScheme, *, n: int, k: int, dtypes: Mapping[str, str], layout: str = DENSE
               ) -> dict[str, torch.Tensor]:
    """CT tensors from DENSE weight_packed [..., N, W], scales [..., G, N], real zeros z [..., G, N]
    (checked by the caller) in the target scheme, layout and dtypes (§1.4)."""
    from .checkpoint import torch_dtype
    b, lead = scheme.num_bits, packed.shape[:-2]
    out: dict[str, torch.Tensor] = {}
    if g_idx is not None and scheme.has_g_idx:
        out["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    if layout == PADDED and 8 % b:
        packed = pack_to_int32(unpack_from_int32(packed, b, (*lead, n, k)), b, layout=PADDED)
    out["weight_packed"] = packed.contiguous()
    s = scale.transpose(-1, -2)
    if scheme.strategy is Strategy.TENSOR:
        s = s.reshape(-1)[:1]
    out["weight_scale"] = s.to(torch_dtype(dtypes["weight_scale"])).contiguous()
    if not scheme.symmetric:
        zp = (z - (1 << (b - 1))).to(torch.int8).transpose(-1, -2)      # [..., N, G]
        if scheme.strategy is Strategy.TENSOR:
            zp = zp.reshape(-1)[:1]
        elif dtypes.get("weight_zero_point", "I32") == "I32":
            zp = pack_to_int32(zp, b, packed_dim=0, layout=layout)
        out["weight_zero_point"] = zp.contiguous()
    out["weight_shape"] = torch.tensor([*lead, n, k], dtype=torch_dtype(dtypes.get("weight_shape", "I64")))
    return out


def from_gptq(g: Mapping[str, torch.Tensor], ms: ModuleScheme, scheme: QuantScheme, *, v1: bool, k: int,
              dtypes: Mapping[str, str], layout: str = DENSE) -> dict[str, torch.Tensor]:
    """A GPTQ module's tensors -> its CT tensors in `scheme` (the inverse of to_gptq), after the
    data rules; `k` = in_features (len(g_idx), or rows(qweight)*32/b)."""
    issues = check_gptq(g, ms, v1=v1, k=k)
    if issues:
        raise issues[0]
    n = g["scales"].shape[-1]
    z = _unpack_zeros(g["qzeros"], ms.bits, n, v1)
    return ct_tensors(g["qweight"].transpose(-1, -2).contiguous(), g["scales"], z, g.get("g_idx"), scheme,
                      n=n, k=k, dtypes=dtypes, layout=layout)
