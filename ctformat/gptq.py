"""GPTQ v1/v2 module tensors <-> compressed-tensors pack-quantized tensors (spec/gptq-awq.md §1).

GPTQ's bit streams are CT's (one per weight row over K for qweight, one per group row over N
for qzeros): qweight is weight_packed transposed word for word, and for 2, 4 and 8 bits qzeros
is weight_zero_point transposed (v1: one less in every field, a word subtraction). So the cost
of a conversion is one blocked transpose of the weight words; scales, zero points and g_idx
are 1/group_size of the data. Only the zero point's v1 offset and the scale dtype are
arithmetic, both exact or refused. Every function takes leading (expert) dimensions and runs
on the device of its tensors.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .dtypes import torch_dtype
from .errors import TensorError, UnsupportedError
from .gptq_config import GPTQ_V1, ModuleScheme
from .pack import pack_to_int32, unpack_from_int32
from .scheme import QuantScheme, Strategy
from .spec import CROSS_WORD, PADDED

__all__ = ["scale_cast_loss", "zero_codes", "gptq_scales", "gptq_qzeros", "to_gptq", "stored_zeros", "check_gptq",
           "ct_tensors", "words_kept", "from_gptq", "transposed", "fields", "words_of"]

# A 1 in every field of a word, for the widths whose fields tile a word (spec/gptq-awq.md §1.2)
_ONES = {2: 0x55555555, 4: 0x11111111, 8: 0x01010101}
# A transposed copy in tiles of this many (rows, columns): both sides stay in the cache (torch's
# own transposed copy is slower; RESULTS.md), and each copy stays under torch's parallel grain
# (32768 elements), so no copy pays a thread-pool handoff, which on a busy CPU costs more than it
# saves
_TILE = (128, 128)


def _i32(word: int) -> int:
    """An unsigned 32-bit pattern as the int32 torch stores."""
    return word - (1 << 32) if word >= 1 << 31 else word


def transposed(x: torch.Tensor) -> torch.Tensor:
    """x [..., R, C] as a contiguous [..., C, R], copied tile by tile on the CPU."""
    if x.device.type != "cpu" or x.shape[-1] * x.shape[-2] < _TILE[0] * _TILE[1]:
        return x.transpose(-1, -2).contiguous()
    x = x.contiguous()
    rows, cols = x.shape[-2:]
    out = torch.empty((*x.shape[:-2], cols, rows), dtype=x.dtype)
    ti, tj = _TILE
    for src, dst in zip(x.view(-1, rows, cols), out.view(-1, cols, rows)):
        for i in range(0, rows, ti):
            block, dcol = src[i:i + ti], dst[:, i:i + ti]
            for j in range(0, cols, tj):
                dcol[j:j + tj].copy_(block[:, j:j + tj].T)
    return out


def fields(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned fields [..., R, W*32/b] (int16) of int32 words [..., R, W], b in 2, 4, 8."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
    f = (words.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return f.flatten(-2).to(torch.int16)


def words_of(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of fields: unsigned values [..., R, V] (V a multiple of 32/b) -> int32 words."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=values.device)
    v = values.to(torch.int32).unflatten(-1, (-1, per)) << shifts
    out = v[..., 0].clone()
    for i in range(1, per):
        out |= v[..., i]
    return out


def scale_cast_loss(scale: torch.Tensor) -> tuple[int, float]:
    """(scales the float16 cast changes, largest absolute change) (§5)."""
    if scale.dtype == torch.float16:
        return 0, 0.0
    back = scale.to(torch.float16).to(scale.dtype)
    if torch.equal(back, scale):
        return 0, 0.0
    changed = back != scale
    n = int(changed.sum())
    return n, float((back.double() - scale.double()).abs()[changed].max()) if n else 0.0


def zero_codes(zp: torch.Tensor | None, scheme: QuantScheme, n: int, groups: int, layout: str,
               lead: tuple[int, ...] = (), device: torch.device | None = None) -> torch.Tensor:
    """Unsigned zero points z [..., G, N] (int16) of a CT module's weight_zero_point (None when
    symmetric: every z is 2^(b-1))."""
    b, off = scheme.num_bits, 1 << (scheme.num_bits - 1)
    if zp is None:
        return torch.full((*lead, groups, n), off, dtype=torch.int16, device=device)
    if zp.dtype == torch.int32 and b in _ONES:        # packed along N: each column's fields, in order
        return fields(zp.transpose(-1, -2), b)[..., :n]
    if zp.dtype == torch.int32:                       # packed along N (dim -2)
        zp = unpack_from_int32(zp, b, (*zp.shape[:-2], n, zp.shape[-1]), packed_dim=0, layout=layout)
    elif zp.numel() == 1:                             # tensor strategy: one I8 value
        zp = zp.reshape(1, 1).expand(n, 1)
    return zp.transpose(-1, -2).to(torch.int16) + off


def gptq_scales(scale: torch.Tensor, n: int) -> torch.Tensor:
    """CT weight_scale [..., N, G] (or [1] for tensor strategy) -> float16 [..., G, N] (one
    copy that casts and transposes)."""
    s = scale.reshape(1, 1).expand(n, 1) if scale.numel() == 1 and scale.ndim == 1 else scale
    s = s.transpose(-1, -2)
    return torch.empty(s.shape, dtype=torch.float16, device=s.device).copy_(s)


def _whole_words(count: int, bits: int) -> bool:
    """Fields of `bits` tile words and `count` of them fill whole words: words move as they are."""
    return bits in _ONES and count * bits % 32 == 0


def gptq_qzeros(zp: torch.Tensor | None, scheme: QuantScheme, n: int, groups: int, *, v1: bool, layout: str,
                lead: tuple[int, ...] = (), device: torch.device | None = None) -> torch.Tensor:
    """qzeros [..., G, ceil(N*b/32)] of a CT module: the stored zeros z (v1: z - 1) packed along N."""
    b, off = scheme.num_bits, 1 << (scheme.num_bits - 1)
    if zp is None and _whole_words(n, b):             # every zero 2^(b-1): one word, repeated
        word = (off - (1 if v1 else 0)) * _ONES[b]
        return torch.full((*lead, groups, n * b // 32), _i32(word), dtype=torch.int32, device=device)
    if zp is None:                                    # one row (zero padding bits), repeated
        row = pack_to_int32(torch.full((1, n), -1 if v1 else 0, dtype=torch.int8, device=device), b)
        return row.expand(*lead, groups, row.shape[-1]).contiguous()
    if zp.dtype == torch.int32 and _whole_words(n, b):
        if v1 and bool((fields(zp, b) == 0).any()):
            raise _no_v1_zero()
        words = transposed(zp)                        # the same stream, rows and columns swapped
        return words - _i32(_ONES[b]) if v1 else words
    z = zero_codes(zp, scheme, n, groups, layout, lead, device)
    if v1 and bool((z == 0).any()):
        raise _no_v1_zero()
    return pack_to_int32((z - off - (1 if v1 else 0)).to(torch.int8), b)


def _no_v1_zero() -> UnsupportedError:
    return UnsupportedError("a zero point of 0 has no GPTQ v1 encoding (z - 1 overflows); write gptq_v2 or AWQ",
                            rule="QCV-04")


def _dense_codes(packed: torch.Tensor, bits: int, shape: tuple[int, ...], layout: str) -> torch.Tensor:
    """weight_packed in the cross-word layout (a padded 3/5/6/7-bit tensor is repacked)."""
    if layout == CROSS_WORD or 8 % bits == 0:
        return packed
    return pack_to_int32(unpack_from_int32(packed, bits, shape, layout=layout), bits)


def to_gptq(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, *, fmt: str = GPTQ_V1,
            layout: str = CROSS_WORD) -> dict[str, torch.Tensor]:
    """A CT module's tensors (local names) -> qweight, qzeros, scales, g_idx (§1.3)."""
    shape = tuple(int(v) for v in ct["weight_shape"].tolist())
    n, k, lead = shape[-2], shape[-1], shape[:-2]
    packed = ct["weight_packed"]
    gs = scheme.group_size if scheme.strategy is Strategy.GROUP else k
    groups = -(-k // gs)
    g_idx = ct.get("weight_g_idx")
    if g_idx is None:
        g_idx = (torch.arange(k, dtype=torch.int32, device=packed.device) // gs).expand(*lead, k).contiguous()
    return {"qweight": transposed(_dense_codes(packed, scheme.num_bits, shape, layout)),
            "qzeros": gptq_qzeros(ct.get("weight_zero_point"), scheme, n, groups, v1=fmt == GPTQ_V1, layout=layout,
                                  lead=lead, device=packed.device),
            "scales": gptq_scales(ct["weight_scale"], n),
            "g_idx": g_idx.to(torch.int32)}


def stored_zeros(qzeros: torch.Tensor, bits: int, n: int, v1: bool) -> torch.Tensor:
    """qzeros [..., G, ceil(N*b/32)] -> the real zeros z [..., G, N] (int16; v1 adds the 1 back)."""
    if bits in _ONES:
        z = fields(qzeros, bits)[..., :n]
    else:
        z = unpack_from_int32(qzeros, bits, (*qzeros.shape[:-1], n)).to(torch.int16) + (1 << (bits - 1))
    return z + 1 if v1 else z


def check_gptq(g: Mapping[str, torch.Tensor], ms: ModuleScheme, *, v1: bool, k: int) -> list[TensorError]:
    """The data rules GPTQ-07/08/09 of one module's loaded tensors (§7)."""
    issues: list[TensorError] = []
    b, n = ms.bits, g["scales"].shape[-1]
    groups = g["scales"].shape[-2]
    g_idx = g.get("g_idx")
    if g_idx is not None and g_idx.numel():
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= groups:
            issues.append(TensorError(f"entries span [{lo}, {hi}], outside [0, {groups})", rule="GPTQ-07",
                                      where="g_idx"))
        elif not ms.desc_act and not torch.equal(g_idx.to(torch.int64), _trivial(g_idx, k, ms.group_size)):
            issues.append(TensorError("differs from k // group_size, but desc_act is false", rule="GPTQ-07",
                                      where="g_idx"))
    if ms.sym and _whole_words(n, b):                 # the common case: every word the symmetric one
        word = _i32(((1 << (b - 1)) - (1 if v1 else 0)) * _ONES[b])
        if torch.equal(g["qzeros"], torch.full_like(g["qzeros"], word)):
            return issues + _padding_issues(g, b, n, k)
    z = stored_zeros(g["qzeros"], b, n, v1)
    if v1 and bool((z == 1 << b).any()):
        issues.append(TensorError(f"stores {(1 << b) - 1}, which v1 reads as zero point {1 << b}, outside the "
                                  f"{b}-bit codes", rule="GPTQ-08", where="qzeros"))
    elif ms.sym and not bool((z == 1 << (b - 1)).all()):
        issues.append(TensorError(f"sym is true, but not every zero point is {1 << (b - 1)}", rule="GPTQ-08",
                                  where="qzeros"))
    return issues + _padding_issues(g, b, n, k)


def _padding_issues(g: Mapping[str, torch.Tensor], b: int, n: int, k: int) -> list[TensorError]:
    """GPTQ-09: the bits after the last value of each qweight column and qzeros row are zero."""
    issues = []
    for name, count in (("qweight", k), ("qzeros", n)):
        w = g[name] if name == "qzeros" else g[name].transpose(-1, -2)
        if (count * b) % 32 and not torch.equal(pack_to_int32(unpack_from_int32(w, b, (*w.shape[:-1], count)), b), w):
            issues.append(TensorError("padding bits are not zero", rule="GPTQ-09", where=name))
    return issues


def _trivial(g_idx: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    gs = k if group_size == -1 else group_size
    return (torch.arange(k, device=g_idx.device) // gs).expand(g_idx.shape)


def ct_tensors(packed: torch.Tensor, scale: torch.Tensor, z: torch.Tensor | None, g_idx: torch.Tensor | None,
               scheme: QuantScheme, *, n: int, k: int, dtypes: Mapping[str, str], layout: str = CROSS_WORD,
               zp_words: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """CT tensors from cross-word weight_packed [..., N, W], scales [..., G, N] and the real zeros
    z [..., G, N] (or the finished weight_zero_point words `zp_words`), checked by the caller,
    in the target scheme, layout and dtypes (§1.4)."""
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
    if zp_words is not None:
        out["weight_zero_point"] = zp_words
    elif not scheme.symmetric:
        zp = (z - (1 << (b - 1))).to(torch.int8).transpose(-1, -2)      # [..., N, G]
        if scheme.strategy is Strategy.TENSOR:
            zp = zp.reshape(-1)[:1]
        elif dtypes.get("weight_zero_point", "I32") == "I32":
            zp = pack_to_int32(zp, b, packed_dim=0, layout=layout)
        out["weight_zero_point"] = zp.contiguous()
    out["weight_shape"] = torch.tensor([*lead, n, k], dtype=torch_dtype(dtypes.get("weight_shape", "I64")))
    return out


def words_kept(scheme: QuantScheme, n: int, dtypes: Mapping[str, str], layout: str) -> bool:
    """Whether the CT zero points are the GPTQ/AWQ zero words rearranged (packed I32 along N,
    whole words, cross-word), so no field is unpacked."""
    return (not scheme.symmetric and scheme.strategy is not Strategy.TENSOR and layout == CROSS_WORD
            and dtypes.get("weight_zero_point", "I32") == "I32" and _whole_words(n, scheme.num_bits))


def from_gptq(g: Mapping[str, torch.Tensor], ms: ModuleScheme, scheme: QuantScheme, *, v1: bool, k: int,
              dtypes: Mapping[str, str], layout: str = CROSS_WORD) -> dict[str, torch.Tensor]:
    """A GPTQ module's tensors -> its CT tensors in `scheme` (the inverse of to_gptq), after the
    data rules; `k` = in_features (len(g_idx), or rows(qweight)*32/b)."""
    issues = check_gptq(g, ms, v1=v1, k=k)
    if issues:
        raise issues[0]
    n, b, qzeros = g["scales"].shape[-1], ms.bits, g["qzeros"]
    z = zp_words = None
    if words_kept(scheme, n, dtypes, layout):         # v1: no field is 2^b - 1 (GPTQ-08), so no carry
        zp_words = transposed(qzeros + _i32(_ONES[b]) if v1 else qzeros)
    elif not scheme.symmetric:
        z = stored_zeros(qzeros, b, n, v1)
    return ct_tensors(transposed(g["qweight"]), g["scales"], z, g.get("g_idx"), scheme, n=n, k=k, dtypes=dtypes,
                      layout=layout, zp_words=zp_words)
