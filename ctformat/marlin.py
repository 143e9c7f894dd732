"""The Marlin layout (spec §10): vLLM's gptq_marlin_repack weight tiles, permuted scales and
packed zero points, from and to compressed-tensors' pack-quantized tensors.

Everything here is a permutation of stored codes, never arithmetic on values, so both
directions are exact. The weight permutation is one reshape/permute of the packed bytes
(the tile structure of spec §10.2 written as tensor dimensions); kernels.marlin_repack is
the same map as one Triton pass, used for CUDA tensors.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .backend import use_triton
from .errors import TensorError, UnsupportedError
from .marlin_config import marlin_dims, marlin_group_size
from .spec import MARLIN_TILE

__all__ = ["repack", "unrepack", "permute_scales", "unpermute_scales", "pack_zero_points", "unpack_zero_points",
           "to_marlin", "to_ct", "split_experts", "marlin_check_shape"]

TILE_K, TILE_N = MARLIN_TILE
_ZP_INTERLEAVE = (0, 2, 4, 6, 1, 3, 5, 7)  # 4-bit zero points: order inside each 8-column run


# -- weights -----------------------------------------------------------------------------
# A 4-bit word of B covers rows k = 16kt + 8rhi + 2q + a and columns n = 64nt + 16w + 8cb + c;
# words run (kt, nt, c, q, w), nibbles (a, cb, rhi). CT's bytes hold the pair a = 0, 1 of
# one row n: byte (n, k // 2) = (n, 8kt + 4rhi + q). 8-bit: words (kt, nt, c, q, w, cb),
# bytes (a, rhi); CT byte (n, k) = (n, 16kt + 8rhi + 2q + a).
_U4_SRC = ("nt", "w", "cb", "c", "kt", "rhi", "q")        # CT bytes [N, K/2] as a view
_U4_DST = ("kt", "nt", "c", "q", "w", "cb", "rhi")
_U8_SRC = ("nt", "w", "cb", "c", "kt", "rhi", "q", "a")   # CT bytes [N, K]
_U8_DST = ("kt", "nt", "c", "q", "w", "cb", "a", "rhi")
_SIZES = {"w": 4, "cb": 2, "c": 8, "rhi": 2, "q": 4, "a": 2}


def _order(src: tuple[str, ...], dst: tuple[str, ...]) -> tuple[int, ...]:
    return tuple(src.index(d) for d in dst)


def _view(t: torch.Tensor, names: tuple[str, ...], kt: int, nt: int) -> torch.Tensor:
    sizes = dict(_SIZES, kt=kt, nt=nt)
    return t.reshape(*t.shape[:-2], *(sizes[n] for n in names))


def _lead(t: torch.Tensor, order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation `order` of t's trailing dimensions, leading (expert) ones kept."""
    k = t.ndim - len(order)
    return tuple(range(k)) + tuple(k + i for i in order)


def repack(weight_packed: torch.Tensor, num_bits: int, *, kernel: str = "auto") -> torch.Tensor:
    """CT weight_packed [..., N, K*b/32] (int32, packed along K) -> Marlin B [..., K/16, N*b/2]."""
    n, k = marlin_check_shape(weight_packed, num_bits)
    if use_triton(kernel, weight_packed):
        from .kernels import marlin_repack
        return marlin_repack(weight_packed, num_bits, k)
    kt, nt = k // TILE_K, n // TILE_N
    lead = weight_packed.shape[:-2]
    src = weight_packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        v = _view(src, _U8_SRC, kt, nt)
        out = v.permute(_lead(v, _order(_U8_SRC, _U8_DST)))
        return _words(out, lead, kt)
    v = _view(src, _U4_SRC, kt, nt)
    y = v.permute(_lead(v, _order(_U4_SRC, _U4_DST)))
    lo, hi = y[..., 0], y[..., 1]                      # the rhi = 0 and rhi = 1 bytes
    a0 = (lo & 0x0F) | (hi << 4)                       # rows a = 0 of both, as one byte
    a1 = (lo >> 4) | (hi & 0xF0)
    out = torch.stack((a0, a1), dim=-2)                # bytes (a, cb) of each word
    return _words(out, lead, kt)


def unrepack(b: torch.Tensor, n: int, num_bits: int) -> torch.Tensor:
    """Marlin B [..., K/16, N*b/2] -> CT weight_packed [..., N, K*b/32]: the inverse of repack."""
    kt = b.shape[-2]
    if b.dtype != torch.int32 or b.shape[-1] * 2 != n * num_bits or n % TILE_N:
        raise TensorError(f"B {list(b.shape)} {b.dtype} is not the Marlin tiling of {n} columns of "
                          f"{num_bits} bits", rule="MRL-03")
    nt, lead = n // TILE_N, b.shape[:-2]
    src = b.contiguous().view(torch.uint8)
    if num_bits == 8:
        y = src.reshape(*lead, *(dict(_SIZES, kt=kt, nt=nt)[d] for d in _U8_DST))
        out = y.permute(_lead(y, _order(_U8_DST, _U8_SRC)))
        return _words(out, lead, n)
    y = src.reshape(*lead, kt, nt, 8, 4, 4, 2, 2)       # (kt, nt, c, q, w, a, cb)
    a0, a1 = y[..., 0, :], y[..., 1, :]
    lo = (a0 & 0x0F) | (a1 << 4)                        # the rhi = 0 byte: rows a = 0, 1
    hi = (a0 >> 4) | (a1 & 0xF0)
    z = torch.stack((lo, hi), dim=-1)                   # (kt, nt, c, q, w, cb, rhi)
    out = z.permute(_lead(z, _order(_U4_DST, _U4_SRC)))
    return _words(out, lead, n)


def _words(t: torch.Tensor, lead, rows: int) -> torch.Tensor:
    """Bytes in their final order -> int32 words [..., rows, -1] (little-endian)."""
    return t.contiguous().reshape(*lead, rows, -1).view(torch.int32)


def marlin_check_shape(weight_packed: torch.Tensor, num_bits: int) -> tuple[int, int]:
    """(N, K) of a CT weight_packed that Marlin can tile, else a refusal naming the limit."""
    if num_bits not in (4, 8):
        raise UnsupportedError(f"Marlin stores 4- and 8-bit weights, not {num_bits}-bit", rule="MCV-01")
    if weight_packed.dtype != torch.int32:
        raise TensorError(f"weight_packed is {weight_packed.dtype}, not int32", rule="TEN-04")
    n, k = weight_packed.shape[-2], weight_packed.shape[-1] * 32 // num_bits
    if n % TILE_N or k % TILE_K:
        raise UnsupportedError(f"weight [{n}, {k}]: Marlin tiles need out_features % 64 == 0 and "
                               f"in_features % 16 == 0", rule="MCV-03")
    return n, k


# -- scales and zero points ------------------------------------------------------------
def _single(group_size: int, k: int) -> bool:
    """Channel-wise, or one group covering all of K, uses the 32-entry permutation."""
    return group_size == -1 or group_size >= k


def permute_scales(scale: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """CT weight_scale [..., N, G] -> Marlin s [..., G, N]: within runs of 64 entries an 8x8
    transpose; for a single group, runs of 32 ordered (m, i, b) -> (i, m, b) for 4x4x2."""
    s = scale.transpose(-1, -2).contiguous()
    lead = s.shape[:-2]
    if _single(group_size, k):
        out = s.reshape(*lead, -1, 4, 4, 2).transpose(-3, -2)
    else:
        out = s.reshape(*lead, -1, 8, 8).transpose(-1, -2)
    return out.contiguous().reshape(s.shape)


def unpermute_scales(s: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """Marlin s [..., G, N] -> CT weight_scale [..., N, G] (both permutations are involutions)."""
    lead = s.shape[:-2]
    if _single(group_size, k):
        out = s.reshape(*lead, -1, 4, 4, 2).transpose(-3, -2)
    else:
        out = s.reshape(*lead, -1, 8, 8).transpose(-1, -2)
    return out.contiguous().reshape(s.shape).transpose(-1, -2).contiguous()


def pack_zero_points(zp: torch.Tensor) -> torch.Tensor:
    """Unsigned 4-bit zero points [..., G, N] -> Marlin zp [..., G, N/8] int32: the 8x8
    transpose of the scales (always, even for one group), the 4-bit interleave, then 8 per
    word along N, value i at bits 4i."""
    lead, g = zp.shape[:-2], zp.shape[-2]
    z = zp.to(torch.uint8).reshape(*lead, -1, 8, 8).transpose(-1, -2)
    z = z.reshape(*lead, -1, 8)[..., list(_ZP_INTERLEAVE)]
    z = z.reshape(*lead, -1, 4, 2)
    return _words(z[..., 0] | (z[..., 1] << 4), lead, g)


def unpack_zero_points(zp: torch.Tensor) -> torch.Tensor:
    """Marlin zp [..., G, N/8] int32 -> unsigned zero points [..., G, N] uint8."""
    lead, g = zp.shape[:-2], zp.shape[-2]
    by = zp.contiguous().view(torch.uint8).reshape(*lead, -1, 4)
    z = torch.stack((by & 0x0F, by >> 4), dim=-1).reshape(*lead, -1, 8)
    inverse = sorted(range(8), key=_ZP_INTERLEAVE.__getitem__)
    z = z[..., inverse].reshape(*lead, -1, 8, 8).transpose(-1, -2)
    return z.contiguous().reshape(*lead, g, -1)


# -- codes along K (act-order row order) -------------------------------------------------
def _codes(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """CT words [..., N, K*b/32] -> unsigned codes [..., N, K] (uint8), for 4 and 8 bits."""
    by = packed.contiguous().view(torch.uint8)
    if num_bits == 8:
        return by
    return torch.stack((by & 0x0F, by >> 4), dim=-1).reshape(*by.shape[:-1], -1)


def _pack_codes(codes: torch.Tensor, num_bits: int) -> torch.Tensor:
    if num_bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.contiguous().view(torch.int32)


def _zp_codes(zp: torch.Tensor, n: int) -> torch.Tensor:
    """CT 4-bit zero point -> unsigned codes [..., G, N]: I32 packed along N (dim -2) stores
    the codes already; I8 [..., N, G] stores zp, so add 8."""
    if zp.dtype == torch.int8:
        return (zp.to(torch.int16) + 8).to(torch.uint8).transpose(-1, -2).contiguous()
    return _codes(zp.transpose(-1, -2), 4)[..., :n]


def _ct_zero_point(z: torch.Tensor, dtype_code: str) -> torch.Tensor:
    """Unsigned codes [..., G, N] -> CT weight_zero_point as I32 [..., ceil(N/8), G] or I8 [..., N, G]."""
    if dtype_code == "I8":
        return (z.to(torch.int16) - 8).to(torch.int8).transpose(-1, -2).contiguous()
    pad = -z.shape[-1] % 8
    if pad:
        z = torch.nn.functional.pad(z, (0, pad))
    return _pack_codes(z, 4).transpose(-1, -2).contiguous()


# -- one module ------------------------------------------------------------------------
def to_marlin(tensors: Mapping[str, torch.Tensor], num_bits: int, group_size: int | None, *,
              scale_dtype: torch.dtype | None = None, kernel: str = "auto") -> dict[str, torch.Tensor]:
    """A CT module's tensors (local names; weight_shape not needed) -> its Marlin tensors.

    `group_size` is the scheme's (None for channel-wise). Stacked [E, N, ...] inputs give
    stacked outputs.
    """
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    n, k = marlin_check_shape(packed, num_bits)
    out: dict[str, torch.Tensor] = {}
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None:
        perm = torch.argsort(g_idx.to(torch.int64), dim=-1, stable=True)
        codes = torch.gather(_codes(packed, num_bits), -1,
                             perm.unsqueeze(-2).expand(*packed.shape[:-1], k))
        packed = _pack_codes(codes, num_bits)
        out_g = torch.gather(g_idx.to(torch.int32), -1, perm)
    out["B"] = repack(packed, num_bits, kernel=kernel)
    s = permute_scales(scale, marlin_group_size(group_size, k), k)
    out["s"] = s if scale_dtype is None else s.to(scale_dtype)
    zp = tensors.get("weight_zero_point")
    if zp is not None:
        out["zp"] = pack_zero_points(_zp_codes(zp, n))
    if g_idx is not None:
        out["g_idx"], out["perm"] = out_g, perm.to(torch.int32)
    return out


def to_ct(tensors: Mapping[str, torch.Tensor], *, scale_dtype: torch.dtype | None = None,
          zero_point_dtype: str = "I32", shape_dtype: torch.dtype = torch.int64) -> dict[str, torch.Tensor]:
    """A Marlin module's tensors -> its CT tensors (weight_packed, weight_scale, weight_shape,
    weight_zero_point, weight_g_idx as present): the exact inverse of to_marlin."""
    b, s = tensors["B"], tensors["s"]
    k, n, bits, groups = marlin_dims(b.shape, s.shape)
    gs = k // groups if groups > 1 else -1
    packed = unrepack(b, n, bits)
    out: dict[str, torch.Tensor] = {}
    if "perm" in tensors:
        perm = tensors["perm"].to(torch.int64)
        lead = packed.shape[:-1]
        codes = torch.empty(*lead, k, dtype=torch.uint8, device=b.device)
        codes.scatter_(-1, perm.unsqueeze(-2).expand(*lead, k), _codes(packed, bits))
        packed = _pack_codes(codes, bits)
        g_idx = torch.empty_like(tensors["g_idx"])
        g_idx.scatter_(-1, perm, tensors["g_idx"])
        out["weight_g_idx"] = g_idx
    out["weight_packed"] = packed
    scale = unpermute_scales(s, gs, k)
    out["weight_scale"] = scale if scale_dtype is None else scale.to(scale_dtype)
    if "zp" in tensors:
        out["weight_zero_point"] = _ct_zero_point(unpack_zero_points(tensors["zp"]), zero_point_dtype)
    out["weight_shape"] = torch.tensor([*b.shape[:-2], n, k], dtype=shape_dtype)
    return out


def split_experts(tensors: Mapping[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A stacked module's Marlin tensors -> one dict per expert and part (w13: gate, up), in
    that order. Exact: the layout is tile-local along N (spec §10.6)."""
    out = []
    for e in range(tensors["B"].shape[0]):
        chunks = {k: tensors[k][e].chunk(parts, dim=-1) for k in ("B", "s", "zp") if k in tensors}
        out += [{k: c[j].contiguous() for k, c in chunks.items()} for j in range(parts)]
    return out
