"""ggml block types and the codec between one CT pack-quantized module and ggml blocks (spec/gguf.md §1-§2).

Nothing is requantized: the codes a module stores are moved into ggml's block layout, with
each block's fp16 `d` taken from the module's scale. Every step is a whole-tensor torch op
(no loop over blocks), run in chunks of rows so temporaries stay near the cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import torch

from .errors import TensorError, UnsupportedError
from .pack import unpack_from_int32
from .scheme import QuantScheme, Strategy
from .spec import DENSE

__all__ = ["BlockType", "BLOCK_TYPES", "QK", "block_type_for", "ScaleCheck", "check_fp16", "check_g_idx",
           "module_values", "encode", "encode_module", "decode", "dequantize_blocks", "GGUFRefusal"]

QK = 32          # elements per block of every type below


@dataclass(frozen=True, slots=True)
class BlockType:
    name: str                 # gguf.GGMLQuantizationType member name
    type_id: int              # ggml_type value (ggml.h)
    block_size: int           # elements per block
    type_size: int            # bytes per block
    offset: int               # stored code = value + offset (0: signed int8)
    lo: int                   # value range the block holds: (q - z) in [lo, hi]
    hi: int
    schemes: tuple[tuple[int, bool], ...]    # (num_bits, symmetric) written in this type by default


# spec/gguf.md §1-§2. Q4_1 has no default scheme: it is only chosen for asym int4 on request.
BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, QK, 2 + 16, 8, -8, 7,
              ((1, True), (2, True), (3, True), (4, True), (1, False), (2, False), (3, False))),
    BlockType("Q4_1", 3, QK, 2 + 2 + 16, 0, 0, 15, ()),
    BlockType("Q5_0", 6, QK, 2 + 4 + 16, 16, -16, 15, ((5, True), (4, False))),
    BlockType("Q8_0", 8, QK, 2 + 32, 0, -128, 127,
              ((6, True), (7, True), (8, True), (5, False), (6, False), (7, False))),
)}
_BY_SCHEME = {key: t for t in BLOCK_TYPES.values() for key in t.schemes}
INT4_ASYM = ("q5_0", "q4_1")


class GGUFRefusal(UnsupportedError):
    """A module (or model) that cannot be written to GGUF exactly; carries a GGUF-NN rule."""

    def __init__(self, message: str, *, rule: str, where: str | None = None) -> None:
        super().__init__(f"{where}: {message} [{rule}]" if where else f"{message} [{rule}]")
        self.rule, self.where, self.message = rule, where, message


def block_type_for(scheme: QuantScheme, in_features: int, *, int4_asym: str = "q5_0",
                   where: str | None = None) -> BlockType:
    """The ggml type a module is repacked into, or GGUFRefusal (GGUF-02, GGUF-05, GGUF-06)."""
    if int4_asym not in INT4_ASYM:
        raise GGUFRefusal(f"int4_asym {int4_asym!r} is not one of {', '.join(INT4_ASYM)}", rule="GGUF-06")
    if scheme.strategy not in (Strategy.GROUP, Strategy.CHANNEL, Strategy.TENSOR):
        raise GGUFRefusal(f"strategy {scheme.strategy.value!r} has no ggml block type", rule="GGUF-02", where=where)
    if scheme.strategy is Strategy.GROUP and scheme.group_size % QK:
        raise GGUFRefusal(f"group_size {scheme.group_size}: a block of {QK} would span two scales", rule="GGUF-02",
                          where=where)
    if in_features % QK:
        raise GGUFRefusal(f"in_features {in_features} is not a multiple of the block size {QK}", rule="GGUF-02",
                          where=where)
    if scheme.num_bits == 4 and not scheme.symmetric and int4_asym == "q4_1":
        return BLOCK_TYPES["Q4_1"]
    found = _BY_SCHEME.get((scheme.num_bits, scheme.symmetric))
    if found is None:
        raise GGUFRefusal(f"asymmetric {scheme.num_bits}-bit: q - z needs {scheme.num_bits + 1} bits, which no "
                          "ggml block type with 8-bit codes holds", rule="GGUF-05", where=where)
    return found


# -- exactness -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ScaleCheck:
    """fp16 cast of a module's scales (or Q4_1 minimums): how many change, and by how much."""

    count: int                      # values with fp16(x) != x
    total: int
    first_index: tuple[int, ...] | None
    first_value: float | None
    max_rel_error: float            # max |fp16(x) - x| / |x| (inf for an overflow)

    @property
    def exact(self) -> bool:
        return self.count == 0


def check_fp16(x: torch.Tensor) -> ScaleCheck:
    """Compare every value with its fp16 cast, in float64 (spec/gguf.md §2, GGUF-04)."""
    exact = x.to(torch.float64)
    cast = x.to(torch.float16).to(torch.float64)
    bad = cast != exact
    count = int(bad.sum())
    if not count:
        return ScaleCheck(0, x.numel(), None, None, 0.0)
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    rel = ((cast - exact).abs() / exact.abs())[bad]
    rel = torch.where(torch.isnan(rel), torch.tensor(float("inf"), dtype=rel.dtype), rel)
    return ScaleCheck(count, x.numel(), first, float(exact[first]), float(rel.max()))


def check_g_idx(g_idx: torch.Tensor, group_size: int, where: str | None = None) -> None:
    """Only the identity act-order (g_idx[j] == j // gs) survives in GGUF (GGUF-03)."""
    g = g_idx.to(torch.int64).reshape(-1, g_idx.shape[-1])
    want = torch.arange(g.shape[-1], device=g.device) // group_size
    bad = torch.nonzero(g != want)
    if bad.numel():
        col = int(bad[0, 1])
        raise GGUFRefusal(f"weight_g_idx puts column {col} in group {int(g[bad[0, 0], col])}, not {col // group_size}; "
                          "GGUF has no column permutation", rule="GGUF-03", where=where)


# -- CT module -> values and per-block scales ------------------------------------------------
def module_values(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = DENSE,
                  where: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q - z as int16 [..., out, in], scale per block [..., out, in/32], z_u per block or None).

    The value q - z equals u - z_u, so it is what every block type stores (with its offset).
    """
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    n_in = shape[-1]
    if scheme.strategy is Strategy.GROUP and "weight_g_idx" in tensors:
        check_g_idx(tensors["weight_g_idx"], scheme.group_size, where)
    q = unpack_from_int32(tensors["weight_packed"], scheme.num_bits, shape, layout=layout)
    scale = _per_block(tensors["weight_scale"], scheme, shape)
    zp = tensors.get("weight_zero_point")
    if zp is None:
        return q, scale, None
    if zp.dtype == torch.int32:       # packed along dim 0 (CT >= 0.9.4)
        groups = tensors["weight_scale"].shape[-1]
        zp = unpack_from_int32(zp, scheme.num_bits, (*shape[:-1], groups), packed_dim=0, layout=layout)
    # integer casts in numpy: torch's int8 -> int16 conversion is ~20x slower on the CPU
    z = _per_block(zp.cpu(), scheme, shape).contiguous().numpy().astype(np.int16)
    v = q.cpu().numpy().astype(np.int16).reshape(*z.shape, QK) - z[..., None]
    return torch.from_numpy(v.reshape(shape)), scale, torch.from_numpy(z + (1 << (scheme.num_bits - 1)))


def _per_block(p: torch.Tensor, scheme: QuantScheme, shape: tuple[int, ...]) -> torch.Tensor:
    """Scale or zero point [..., out, G] (or [1]) -> one entry per 32-block [..., out, in/32]."""
    nb = shape[-1] // QK
    if scheme.strategy is Strategy.TENSOR:
        return p.reshape(-1)[:1].expand(*shape[:-1], nb)
    if scheme.strategy is Strategy.CHANNEL:
        return p.expand(*shape[:-1], nb)
    per = scheme.group_size // QK
    return p.repeat_interleave(per, dim=-1) if per > 1 else p


# -- values -> block bytes ---------------------------------------------------------------------
def encode(v: torch.Tensor, d: torch.Tensor, btype: BlockType, m: torch.Tensor | None = None) -> torch.Tensor:
    """Values [..., in] (integers in the type's range), d [..., in/32] (fp16-castable) -> uint8 blocks
    [..., in/32 * type_size], built on the host. For Q4_1, `v` is the unsigned nibble and `m` the
    per-block minimum."""
    lead, n_in = v.shape[:-1], v.shape[-1]
    nb = n_in // QK
    vals = v.cpu().reshape(-1, QK).numpy()
    dh = d.cpu().to(torch.float16).reshape(-1).numpy().view(np.int16)
    mh = None if m is None else m.cpu().to(torch.float16).reshape(-1).numpy().view(np.int16)
    out = np.empty((vals.shape[0], btype.type_size), dtype=np.uint8)
    step = max(1, _CHUNK_VALUES // QK)
    for r in range(0, vals.shape[0], step):
        _encode_blocks(vals[r:r + step], dh[r:r + step], None if mh is None else mh[r:r + step], btype,
                       out[r:r + step])
    return torch.from_numpy(out).reshape(*lead, nb * btype.type_size)


_CHUNK_VALUES = 1 << 18     # values per step: a few temporaries of this size stay in L2


def _encode_blocks(v: np.ndarray, d: np.ndarray, m: np.ndarray | None, btype: BlockType, out: np.ndarray) -> None:
    """v [n, 32] integers, d/m [n] fp16 bits (int16) -> out [n, type_size] uint8."""
    out16 = out.view(np.int16)              # every type_size is even: d, m, qh, qs are 2-byte aligned
    out16[:, 0] = d
    if btype.name == "Q8_0":
        out[:, 2:] = v.astype(np.int8).view(np.uint8)
        return
    u = (v + btype.offset).astype(np.uint8)                # 0..15 (Q4_x) or 0..31 (Q5_0)
    out[:, btype.type_size - 16:] = (u[:, :16] & 0x0F) | (u[:, 16:] << 4)   # elements j and j + 16 share byte j
    if btype.name == "Q4_1":
        out16[:, 1] = m
    elif btype.name == "Q5_0":                              # bit 4 of element j is bit j of qh (LE uint32)
        out[:, 2:6] = np.packbits((u >> 4) & 1, axis=-1, bitorder="little")


def encode_module(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, btype: BlockType, *,
                  layout: str = DENSE, allow_lossy: bool = False,
                  where: str | None = None) -> tuple[torch.Tensor, ScaleCheck]:
    """One CT module -> (uint8 blocks [..., out, in/32 * type_size], fp16 check of its d and m).

    Refuses (GGUF-03, GGUF-04, GGUF-07) unless every block holds the module's values exactly.
    """
    fast = scheme.symmetric and (scheme.num_bits, btype.name) in (_SHUFFLE, _XOR)
    if fast:
        if scheme.strategy is Strategy.GROUP and "weight_g_idx" in tensors:
            check_g_idx(tensors["weight_g_idx"], scheme.group_size, where)
        check = check_fp16(tensors["weight_scale"])
    else:
        v, d, z_u = module_values(tensors, scheme, layout=layout, where=where)
        m = None
        if btype.name == "Q4_1":            # n = u = v + z_u, m = -s * z_u
            v = (v.unflatten(-1, (-1, QK)) + z_u.unsqueeze(-1)).flatten(-2)
            m = -d.to(torch.float64) * z_u.to(torch.float64)
        if v.numel():
            vmin, vmax = torch.aminmax(v)
            if vmin < btype.lo or vmax > btype.hi:
                raise GGUFRefusal(f"values q - z span [{int(vmin)}, {int(vmax)}], outside {btype.name}'s "
                                  f"[{btype.lo}, {btype.hi}] (zero point outside the int{scheme.num_bits} range)",
                                  rule="GGUF-07", where=where)
        check = check_fp16(tensors["weight_scale"])
        if m is not None:
            check = _merge(check, check_fp16(m))
    if not check.exact and not allow_lossy:
        raise GGUFRefusal(f"{check.count} of {check.total} scales change in fp16, the first at "
                          f"{list(check.first_index)} ({check.first_value!r}); max relative error "
                          f"{check.max_rel_error:.3g} (pass --allow-lossy to write fp16(s))", rule="GGUF-04", where=where)
    if fast:
        return _encode_bytes(tensors, scheme, btype), check
    return encode(v, d, btype, m), check


# Schemes whose CT bytes already are the block's codes, so blocks are built from the packed
# bytes without unpacking: int4 (nibble u = q + 8 is Q4_0's nibble, only the order differs)
# and int8 (byte u = q + 128, Q8_0 stores q = u ^ 0x80).
_SHUFFLE, _XOR = (4, "Q4_0"), (8, "Q8_0")


def _encode_bytes(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, btype: BlockType) -> torch.Tensor:
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    nb = shape[-1] // QK
    # blocks are built on the host, where the GGUF writer needs them
    src = tensors["weight_packed"].cpu().contiguous().view(torch.uint8).reshape(-1, QK * scheme.num_bits // 8)
    d = _per_block(tensors["weight_scale"].cpu(), scheme, shape).to(torch.float16).reshape(-1)
    out = torch.empty(src.shape[0], btype.type_size, dtype=torch.uint8)
    out16 = out.view(torch.int16)                          # every field is 2-byte aligned
    out16[:, 0] = d.view(torch.int16)
    if btype.name == "Q8_0":
        np.bitwise_xor(src.numpy(), 0x80, out=out.numpy()[:, 2:])
    else:
        _shuffle_q4(src, out16[:, 1:])
    return out.reshape(*shape[:-1], nb * btype.type_size)


def _shuffle_q4(src: torch.Tensor, qs16: torch.Tensor) -> None:
    """CT int4 bytes [n, 16] (byte c: elements 2c, 2c+1) -> Q4_0 qs as int16 pairs [n, 8] (CPU).

    Q4_0 byte j holds elements j and j + 16. With x = CT bytes 0..7 and y = CT bytes 8..15 as
    64-bit lanes, Q4_0 byte 2m is (x_m & 0xF) | (y_m & 0xF) << 4 and byte 2m+1 is
    x_m >> 4 | (y_m & 0xF0): six lane ops, then the two byte streams are interleaved. This runs
    in numpy, whose uint8/int16 casts and strided copies are several times faster than torch's.
    """
    s, q = src.numpy(), qs16.numpy()
    step = max(1, _CHUNK_VALUES // 16)
    for r in range(0, s.shape[0], step):
        a = s[r:r + step].view(np.uint64)
        x, y = a[:, 0], a[:, 1]
        pair = np.empty((a.shape[0], 8, 2), dtype=np.uint8)
        pair[..., 0] = ((x & _LOW) | ((y & _LOW) << _FOUR)).view(np.uint8).reshape(-1, 8)
        pair[..., 1] = (((x >> _FOUR) & _LOW) | (y & _HIGH)).view(np.uint8).reshape(-1, 8)
        q[r:r + step] = pair.view(np.int16).reshape(-1, 8)


_LOW, _HIGH, _FOUR = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0xF0F0F0F0F0F0F0F0), np.uint64(4)


def _merge(a: ScaleCheck, b: ScaleCheck) -> ScaleCheck:
    first = a if a.count else b
    return ScaleCheck(a.count + b.count, a.total + b.total, first.first_index, first.first_value,
                      max(a.max_rel_error, b.max_rel_error))


# -- block bytes -> values (reading GGUF back) -----------------------------------------------
def decode(raw: torch.Tensor, btype: BlockType) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """uint8 blocks [..., nb * type_size] -> (stored values [..., nb * 32] int16 with the type's offset
    removed (Q4_1: the unsigned nibble), d fp16 [..., nb], m fp16 [..., nb] for Q4_1 else None)."""
    lead = raw.shape[:-1]
    b = raw.reshape(*lead, -1, btype.type_size)
    d = b[..., 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = b[..., 2:4].contiguous().view(torch.float16).squeeze(-1) if btype.name == "Q4_1" else None
    if btype.name == "Q8_0":
        v = b[..., 2:].contiguous().view(torch.int8).to(torch.int16)
    else:
        qs = b[..., btype.type_size - 16:].to(torch.int16)
        u = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
        if btype.name == "Q5_0":
            qh = b[..., 2:6].to(torch.int16)
            bits = (qh.unsqueeze(-1) >> torch.arange(8, device=raw.device)) & 1        # [..., nb, 4, 8]
            u = u | (bits.flatten(-2) << 4)
        v = u - btype.offset
    return v.flatten(-2), d, m


def dequantize_blocks(raw: torch.Tensor, btype: BlockType, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The values a ggml reader computes from the blocks, in `dtype` (float64: exact)."""
    v, d, m = decode(raw, btype)
    w = v.to(dtype).unflatten(-1, (-1, QK)) * d.to(dtype).unsqueeze(-1)
    if m is not None:
        w = w + m.to(dtype).unsqueeze(-1)
    return w.flatten(-2)
