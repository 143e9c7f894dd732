"""AWQ GEMM module tensors <-> compressed-tensors pack-quantized tensors (spec/gptq-awq.md §2).

CT packs 4-bit codes along K (word (n, j) nibble m = u[n, 8j + m]); AWQ packs them along N
in the order AWQ_ORDER (word (k, c) nibble i = u[8c + AWQ_ORDER[i], k]). So each 8 x 8 block
of nibbles (8 rows n of one CT word column j) is transposed, with the nibble order folded in.
That is done with three delta swaps on int32 words, each exchanging one bit of the word index
with one bit of the nibble index (a mask, a shift and three xors), on tiles that stay in the
cache; the word-index permutation left over is absorbed where the words are stored. Leading
(expert) dimensions pass through.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .errors import TensorError, UnsupportedError
from .gptq import ct_tensors, fields, gptq_scales, transposed, words_kept, words_of, zero_codes
from .gptq_config import AWQ_ORDER, ModuleScheme
from .scheme import QuantScheme, Strategy
from .spec import CROSS_WORD

__all__ = ["to_awq", "from_awq", "check_awq", "interleave", "deinterleave"]

_INVERSE = tuple(sorted(range(8), key=AWQ_ORDER.__getitem__))    # (0, 4, 1, 5, 2, 6, 3, 7)
# A block holds words p = 0..7 (word-index bits p2 p1 p0) of 8 nibbles (nibble bits q2 q1 q0).
# CT -> AWQ moves (row r in p, nibble m in q) to (word m, nibble _INVERSE[r] = (r0 r2 r1)):
# swap p2<->q1, then p1<->q0, then p0<->q2; (word distance, mask of the staying nibbles, shift).
_SWAPS = ((4, 0x00FF00FF, 8), (2, 0x0F0F0F0F, 4), (1, 0x0000FFFF, 16))
# After the swaps, word p holds the AWQ row m = 4*p0 + 2*p2 + p1 of the block.
_ROW_OF = tuple(4 * (p & 1) + 2 * (p >> 2 & 1) + (p >> 1 & 1) for p in range(8))
# (8-row blocks, words) per tile: 96 KiB of int32, inside the L2 cache, and under torch's parallel
# grain (32768 elements per op), so no op pays a thread-pool handoff (RESULTS.md)
_TILE = (32, 96)


def interleave(cols: torch.Tensor) -> torch.Tensor:
    """[..., N] in column order -> the order of AWQ's nibbles (each run of 8 by AWQ_ORDER)."""
    return cols.unflatten(-1, (-1, 8))[..., list(AWQ_ORDER)].flatten(-2)


def deinterleave(nibbles: torch.Tensor) -> torch.Tensor:
    """Inverse of interleave."""
    return nibbles.unflatten(-1, (-1, 8))[..., list(_INVERSE)].flatten(-2)


def _swap(blocks: torch.Tensor, order) -> None:
    """The delta swaps, in place, on words [..., 8, W] (dim -2 is p)."""
    lead, w = blocks.shape[:-2], blocks.shape[-1]
    for d, mask, shift in order:
        v = blocks.view(*lead, 8 // (2 * d), 2, d, w)
        x, y = v.select(-3, 0), v.select(-3, 1)
        t = x >> shift                    # arithmetic shift: the sign bits land outside the mask
        t ^= y
        t &= mask
        y ^= t
        x ^= t << shift


def _awq_words(packed: torch.Tensor) -> torch.Tensor:
    """CT 4-bit weight_packed [N, K/8] (N % 8 == 0) -> AWQ qweight [K, N/8]."""
    n, w = packed.shape
    c = n // 8
    out = torch.empty(w * 8, c, dtype=torch.int32, device=packed.device)
    src, dst = packed.view(c, 8, w), out.view(w, 8, c)
    tc, tw = _TILE if packed.device.type == "cpu" else (c, w)
    for c0 in range(0, c, tc):
        for j0 in range(0, w, tw):
            blocks = src[c0:c0 + tc, :, j0:j0 + tw].clone()
            _swap(blocks, _SWAPS)
            part = dst[j0:j0 + tw, :, c0:c0 + tc]
            for p, m in enumerate(_ROW_OF):
                part[:, m].copy_(blocks[:, p].T)
    return out


def _ct_words(qweight: torch.Tensor) -> torch.Tensor:
    """AWQ qweight [K, N/8] (K % 8 == 0) -> CT 4-bit weight_packed [N, K/8]."""
    k, c = qweight.shape
    w = k // 8
    out = torch.empty(c * 8, w, dtype=torch.int32, device=qweight.device)
    src, dst = qweight.view(w, 8, c), out.view(c, 8, w)
    tc, tw = _TILE if qweight.device.type == "cpu" else (c, w)
    for c0 in range(0, c, tc):
        for j0 in range(0, w, tw):
            part = src[j0:j0 + tw, :, c0:c0 + tc]
            blocks = torch.empty(part.shape[2], 8, part.shape[0], dtype=torch.int32, device=qweight.device)
            for p, m in enumerate(_ROW_OF):
                blocks[:, p].copy_(part[:, m].T)
            _swap(blocks, _SWAPS[::-1])
            dst[c0:c0 + tc, :, j0:j0 + tw].copy_(blocks)
    return out


def _per_module(fn, t: torch.Tensor) -> torch.Tensor:
    """fn over the trailing matrix of each expert."""
    if t.ndim == 2:
        return fn(t.contiguous())
    flat = t.reshape(-1, *t.shape[-2:])
    return torch.stack([fn(x.contiguous()) for x in flat]).reshape(*t.shape[:-2], *fn(flat[0]).shape)


def _ct_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """CT 4-bit weight_packed [..., N, ceil(K/8)] -> unsigned codes [..., N, K] (int16)."""
    return fields(packed, 4)[..., :k]


def to_awq(ct: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = CROSS_WORD) -> dict[str, torch.Tensor]:
    """A CT module's 4-bit tensors -> qweight [..., K, N/8], qzeros [..., G, N/8], scales [..., G, N]."""
    shape = tuple(int(v) for v in ct["weight_shape"].tolist())
    n, k, lead = shape[-2], shape[-1], shape[:-2]
    if scheme.num_bits != 4 or n % 8:
        raise UnsupportedError(f"AWQ GEMM stores 4-bit weights with out_features % 8 == 0, got "
                               f"{scheme.num_bits}-bit [{n}, {k}]", rule="QCV-01" if scheme.num_bits != 4 else "QCV-02")
    packed = ct["weight_packed"]
    groups = -(-k // scheme.group_size) if scheme.strategy is Strategy.GROUP else 1
    if k % 8 == 0:
        qweight = _per_module(_awq_words, packed)
    else:                                   # a ragged last word: through the codes
        qweight = words_of(interleave(_ct_codes(packed, k).transpose(-1, -2)), 4)
    zp = ct.get("weight_zero_point")
    if zp is None:                          # every zero 8: 0x88888888
        qzeros = torch.full((*lead, groups, n // 8), -0x77777778, dtype=torch.int32, device=packed.device)
    else:
        z = zero_codes(zp, scheme, n, groups, layout, lead, packed.device)
        qzeros = words_of(interleave(z), 4)
    return {"qweight": qweight, "qzeros": qzeros, "scales": gptq_scales(ct["weight_scale"], n)}


def awq_zeros(qzeros: torch.Tensor) -> torch.Tensor:
    """AWQ qzeros [..., G, N/8] -> zeros z [..., G, N] (int16) in column order."""
    return deinterleave(fields(qzeros, 4))


def check_awq(a: Mapping[str, torch.Tensor], ms: ModuleScheme) -> list[TensorError]:
    """AWQ-06: with zero_point false every stored zero is 8."""
    if ms.sym and not bool((a["qzeros"] == -0x77777778).all()):
        return [TensorError("zero_point is false, but not every stored zero is 8", rule="AWQ-06", where="qzeros")]
    return []


def from_awq(a: Mapping[str, torch.Tensor], ms: ModuleScheme, scheme: QuantScheme, *,
             dtypes: Mapping[str, str], layout: str = CROSS_WORD) -> dict[str, torch.Tensor]:
    """An AWQ module's tensors -> its CT tensors in `scheme` (the inverse of to_awq)."""
    issues = check_awq(a, ms)
    if issues:
        raise issues[0]
    qweight, qzeros = a["qweight"], a["qzeros"]
    k, n = qweight.shape[-2], qweight.shape[-1] * 8
    if k % 8 == 0:
        packed = _per_module(_ct_words, qweight)
    else:                                   # a ragged last word: through the codes, padded with zeros
        u = deinterleave(fields(qweight, 4)).transpose(-1, -2)
        packed = words_of(torch.cat([u, u.new_zeros(*u.shape[:-1], -k % 8)], dim=-1), 4)
    z = zp_words = None
    if scheme.symmetric:
        if not bool((qzeros == -0x77777778).all()):
            raise TensorError("the source is symmetric, but not every stored zero is 8", rule="GPTQ-11",
                              where="qzeros")
    elif words_kept(scheme, n, dtypes, layout):
        zp_words = transposed(words_of(awq_zeros(qzeros), 4))
    else:
        z = awq_zeros(qzeros)
    return ct_tensors(packed, a["scales"], z, None, scheme, n=n, k=k, dtypes=dtypes, layout=layout,
                      zp_words=zp_words)
