"""ggml block types and the codec between one CT pack-quantized module and ggml blocks (spec/gguf.md §1-§2).

Nothing is requantized: the codes a module stores are moved into ggml's block layout, with
each block's fp16 `d` taken from the module's scale. The output is one uint8 buffer of blocks,
each field (d, m, qh, qs) a strided numpy view of it, filled in cache-sized chunks: each
chunk's codes are computed with word arithmetic on 64-bit lanes (no per-block Python) and
stored straight into its slice of the buffer, so every byte of the output is written once;
on several cores, chunks go to worker threads.

The checks that need tensor data (GCV-03 g_idx, GCV-04 scales, GCV-07 zero points) are
separate functions, run over the whole model before any output exists (to_gguf's preflight).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch

from . import native as compiled
from .errors import GGUFRefusal
from .pack import unpack_from_int32
from .scheme import QuantScheme, Strategy
from .spec import CROSS_WORD, GGUF_REFUSALS

__all__ = ["BlockType", "BLOCK_TYPES", "QK", "INT4_ASYM", "block_type_for", "ScaleCheck", "check_fp16",
           "check_g_idx", "check_zero_points", "module_values", "encode", "encode_module", "decode",
           "dequantize_blocks", "refuse"]

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
    fields: tuple[tuple[str, str], ...]      # the block as a numpy structured dtype, in byte order

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(list(self.fields))


# spec/gguf.md §1-§2. Q4_1 has no default scheme: it is only chosen for asym int4 on request.
BLOCK_TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("Q4_0", 2, QK, 2 + 16, 8, -8, 7,
              ((1, True), (2, True), (3, True), (4, True), (1, False), (2, False), (3, False)),
              (("d", "<u2"), ("qs", "V16"))),
    BlockType("Q4_1", 3, QK, 2 + 2 + 16, 0, 0, 15, (), (("d", "<u2"), ("m", "<u2"), ("qs", "V16"))),
    BlockType("Q5_0", 6, QK, 2 + 4 + 16, 16, -16, 15, ((5, True), (4, False)),
              (("d", "<u2"), ("qh", "<u4"), ("qs", "V16"))),
    BlockType("Q8_0", 8, QK, 2 + 32, 0, -128, 127,
              ((6, True), (7, True), (8, True), (5, False), (6, False), (7, False)), (("d", "<u2"), ("qs", "V32"))),
)}
_BY_SCHEME = {key: t for t in BLOCK_TYPES.values() for key in t.schemes}
INT4_ASYM = ("q5_0", "q4_1")


def refuse(rule: str, message: str, where: str | None = None, option: str | None = None) -> GGUFRefusal:
    assert rule in GGUF_REFUSALS, rule
    return GGUFRefusal(message, rule=rule, where=where, option=option)


def block_type_for(scheme: QuantScheme, in_features: int, *, int4_asym: str = "q5_0",
                   where: str | None = None) -> BlockType:
    """The ggml type a module is repacked into, or GGUFRefusal (GCV-02, GCV-05, GCV-06)."""
    if int4_asym not in INT4_ASYM:
        raise refuse("GCV-06", f"int4_asym {int4_asym!r} is not one of {', '.join(INT4_ASYM)}", option="int4_asym")
    if scheme.strategy not in (Strategy.GROUP, Strategy.CHANNEL, Strategy.TENSOR):
        raise refuse("GCV-02", f"strategy {scheme.strategy.value!r} has no ggml block type", where)
    if scheme.strategy is Strategy.GROUP and scheme.group_size % QK:
        raise refuse("GCV-02", f"group_size {scheme.group_size}: a block of {QK} would span two scales", where)
    if in_features % QK:
        raise refuse("GCV-02", f"in_features {in_features} is not a multiple of the block size {QK}", where)
    if scheme.num_bits == 4 and not scheme.symmetric and int4_asym == "q4_1":
        return BLOCK_TYPES["Q4_1"]
    found = _BY_SCHEME.get((scheme.num_bits, scheme.symmetric))
    if found is None:
        raise refuse("GCV-05", f"asymmetric {scheme.num_bits}-bit: q - z needs {scheme.num_bits + 1} bits, which no "
                     "ggml block type with 8-bit codes holds", where)
    return found


# -- exactness (checked before any output exists) ------------------------------------------------
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

    def merge(self, other: ScaleCheck) -> ScaleCheck:
        first = self if self.count else other
        return ScaleCheck(self.count + other.count, self.total + other.total, first.first_index, first.first_value,
                          max(self.max_rel_error, other.max_rel_error))

    def refusal(self, where: str | None, what: str = "scales") -> GGUFRefusal:
        return refuse("GCV-04", f"{self.count} of {self.total} {what} change in fp16, the first at "
                      f"{list(self.first_index)} ({self.first_value!r}); max relative error {self.max_rel_error:.3g}",
                      where, option="allow_lossy")


def check_fp16(x: torch.Tensor) -> ScaleCheck:
    """Compare every value with its fp16 cast, in float64 (spec/gguf.md §2, GCV-04). A float16,
    bfloat16 or float32 tensor is first compared in numpy, in float32 (which holds both sides
    exactly): the common all-exact case takes four passes over the scales and no torch op."""
    if x.dtype in (torch.float16, torch.bfloat16, torch.float32):
        bits = _fp16_bits(x)
        if np.array_equal(bits.view(np.float16).astype(np.float32), _float32(x)):
            return ScaleCheck(0, x.numel(), None, None, 0.0)
    exact = x.to(torch.float64)
    cast = torch.from_numpy(_fp16_bits(x).view(np.float16)).reshape(x.shape).to(torch.float64)
    bad = cast != exact
    count = int(bad.sum())
    if not count:
        return ScaleCheck(0, x.numel(), None, None, 0.0)
    first = tuple(int(i) for i in torch.nonzero(bad)[0].tolist())
    rel = ((cast - exact).abs() / exact.abs())[bad]
    rel = torch.where(torch.isnan(rel), torch.tensor(float("inf"), dtype=rel.dtype), rel)
    return ScaleCheck(count, x.numel(), first, float(exact[first]), float(rel.max()))


def minimums(scale: torch.Tensor, zero_point: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Q4_1's per-group minimum m = -s * z_u in float64 (z signed, as unpacked)."""
    return -scale.to(torch.float64) * (zero_point.to(torch.float64) + (1 << (num_bits - 1)))


def check_g_idx(g_idx: torch.Tensor, group_size: int, where: str | None = None) -> None:
    """Only the identity act-order (g_idx[j] == j // gs) survives in GGUF (GCV-03)."""
    g = g_idx.to(torch.int64).reshape(-1, g_idx.shape[-1])
    want = torch.arange(g.shape[-1], device=g.device) // group_size
    bad = torch.nonzero(g != want)
    if bad.numel():
        col = int(bad[0, 1])
        raise refuse("GCV-03", f"weight_g_idx puts column {col} in group {int(g[bad[0, 0], col])}, not "
                     f"{col // group_size}; GGUF has no column permutation", where)


def check_zero_points(z: torch.Tensor, scheme: QuantScheme, btype: BlockType, where: str | None = None) -> None:
    """Every stored value q - z of the module fits the block type (GCV-07), judged from the signed
    zero points alone: q spans the int range, so q - z fits [lo, hi] for every q exactly when
    hi_b - hi <= z <= lo_b - lo."""
    if not z.numel() or btype.name == "Q4_1":        # Q4_1 stores u itself, 0..15
        return
    lo_b, hi_b = -(1 << (scheme.num_bits - 1)), (1 << (scheme.num_bits - 1)) - 1
    zmin, zmax = (int(v) for v in torch.aminmax(z.to(torch.int32)))
    if zmin < hi_b - btype.hi or zmax > lo_b - btype.lo:
        raise refuse("GCV-07", f"zero points span [{zmin}, {zmax}]: values q - z would leave {btype.name}'s "
                     f"[{btype.lo}, {btype.hi}] (zero point outside the int{scheme.num_bits} range)", where)


# -- CT module -> values and per-block scales ------------------------------------------------
def _shape(tensors: Mapping[str, torch.Tensor]) -> tuple[int, ...]:
    return tuple(int(v) for v in tensors["weight_shape"].tolist())


def signed_zero_points(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme,
                       layout: str = CROSS_WORD) -> torch.Tensor | None:
    """The module's zero points, signed, [..., out, G] (or as stored for tensor strategy)."""
    zp = tensors.get("weight_zero_point")
    if zp is None or zp.dtype != torch.int32:
        return zp
    shape = _shape(tensors)
    groups = tensors["weight_scale"].shape[-1]
    return unpack_from_int32(zp, scheme.num_bits, (*shape[:-1], groups), packed_dim=0, layout=layout)


def module_values(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = CROSS_WORD,
                  where: str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q - z as int16 [..., out, in], scale per block [..., out, in/32], z_u per block or None):
    the value every block type stores (with its offset)."""
    shape = _shape(tensors)
    if scheme.strategy is Strategy.GROUP and "weight_g_idx" in tensors:
        check_g_idx(tensors["weight_g_idx"], scheme.group_size, where)
    q = unpack_from_int32(tensors["weight_packed"], scheme.num_bits, shape, layout=layout)
    scale = _per_block(tensors["weight_scale"], scheme, shape)
    zp = signed_zero_points(tensors, scheme, layout)
    if zp is None:
        return q.to(torch.int16), scale, None
    z = _per_block(zp, scheme, shape).to(torch.int16)
    v = q.to(torch.int16).unflatten(-1, (-1, QK)) - z.unsqueeze(-1)
    return v.flatten(-2), scale, z + (1 << (scheme.num_bits - 1))


def _per_block(p: torch.Tensor, scheme: QuantScheme, shape: tuple[int, ...]) -> torch.Tensor:
    """Scale or zero point [..., out, G] (or [1]) -> one entry per 32-block [..., out, in/32]."""
    nb = shape[-1] // QK
    if scheme.strategy is Strategy.TENSOR:
        return p.reshape(-1)[:1].expand(*shape[:-1], nb)
    if scheme.strategy is Strategy.CHANNEL:
        return p.expand(*shape[:-1], nb)
    per = scheme.group_size // QK
    return p.repeat_interleave(per, dim=-1) if per > 1 else p


def _blocks_per_scale(scheme: QuantScheme, shape: tuple[int, ...]) -> int:
    """Consecutive blocks (in row-major block order) that share one scale entry."""
    if scheme.strategy is Strategy.TENSOR:
        return int(np.prod(shape)) // QK
    if scheme.strategy is Strategy.CHANNEL:
        return shape[-1] // QK
    return scheme.group_size // QK


def _float32(x: torch.Tensor) -> np.ndarray:
    """A float16/bfloat16/float32 tensor as float32, flat, exact (bfloat16: bits shifted left by 16)."""
    x = x.detach().cpu().contiguous().reshape(-1)
    if x.dtype == torch.bfloat16:
        return np.left_shift(x.view(torch.int16).numpy().view(np.uint16), 16, dtype=np.uint32).view(np.float32)
    return x.numpy().astype(np.float32, copy=False)


_CAST_STEP = 1 << 14           # below torch's parallel grain (32768): each slice is cast inline, one thread


def _fp16_bits(x: torch.Tensor) -> np.ndarray:
    """fp16(x) (round to nearest even, torch's cast) as uint16 bits, flat. Cast in slices that
    torch runs inline: its vectorized cast stays, its thread pool (which stalls on a loaded
    machine, and competes with the codec's worker threads) is never entered."""
    x = x.detach().cpu().contiguous().reshape(-1)
    if x.dtype == torch.float16:
        return x.view(torch.int16).numpy().view(np.uint16)
    out = torch.empty(x.shape, dtype=torch.float16)
    for i in range(0, len(x), _CAST_STEP):
        out[i:i + _CAST_STEP].copy_(x[i:i + _CAST_STEP])
    return out.view(torch.int16).numpy().view(np.uint16)


# -- the block array ---------------------------------------------------------------------------
_CHUNK_BLOCKS = 1 << 14        # blocks per step (256 KiB of int4 codes): every temporary stays in L2
_L4, _H4 = np.uint64(0x0F0F0F0F0F0F0F0F), np.uint64(0xF0F0F0F0F0F0F0F0)
_BIT4 = np.uint64(0x0101010101010101)
_GATHER = np.uint64(0x0102040810204080)      # bit 8j of a lane -> bit 56 + j (no two partial products meet)
_S4, _S56 = np.uint64(4), np.uint64(56)
_M16, _M256 = np.uint64(16), np.uint16(256)


def encode_module(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, btype: BlockType, *,
                  layout: str = CROSS_WORD, out: np.ndarray | None = None,
                  native: bool | str | None = None) -> torch.Tensor:
    """One CT module -> uint8 blocks [..., out, in/32 * type_size], d = fp16(s) (m = fp16(-s z_u));
    written into `out` (uint8, that many bytes) when given, e.g. one expert's slice of a stack.

    `native`: the compiled codec (spec/gguf.md §2.1, the same bytes) when it can be built and maps
    the layout (None, the default), required (True, or a build variant of ctformat.native: 'auto',
    'scalar'; RuntimeError when it cannot be had), or never (False: the numpy codec).

    The data checks (check_g_idx, check_fp16, check_zero_points) are the caller's, before
    any output exists; this only moves codes."""
    shape = _shape(tensors)
    nb = int(np.prod(shape)) // QK
    dest = np.empty(nb * btype.type_size, np.uint8) if out is None else out.reshape(-1)
    per = _blocks_per_scale(scheme, shape)
    zp = signed_zero_points(tensors, scheme, layout)
    d16 = _fp16_bits(tensors["weight_scale"])
    m16 = _fp16_bits(minimums(tensors["weight_scale"], zp, scheme.num_bits)) if btype.name == "Q4_1" else None
    lib = _native_codec(native)
    if lib is not None and _native_maps(scheme.num_bits, btype, layout):
        adds = np.zeros(1, np.uint8) if btype.name == "Q4_1" else _block_adds(zp, btype, scheme.num_bits)
        _native_encode(lib, tensors["weight_packed"], dest, nb, scheme.num_bits, btype, d16, m16, adds, per)
        return torch.from_numpy(dest).reshape(*shape[:-1], shape[-1] // QK * btype.type_size)
    out = _fields(dest, btype)

    def meta(r: int, n: int) -> None:         # d (and m) of blocks [r, r + n), while they are in cache
        out["d"][r:r + n] = _spread(d16, per, r, n)
        if m16 is not None:
            out["m"][r:r + n] = _spread(m16, per, r, n)
    packed = tensors["weight_packed"].detach().cpu().contiguous()
    b = scheme.num_bits
    ct = packed.view(torch.uint8).numpy().reshape(-1)
    if b == 4 and (scheme.symmetric and btype.name == "Q4_0" or btype.name == "Q4_1"):
        _q4_from_int4(ct.reshape(nb, 16), out["qs"], meta)
    elif scheme.symmetric and (b, btype.name) == (8, "Q8_0"):
        _q8_0_from_int8(ct.reshape(nb, 32), out["qs"], meta)
    elif (b, btype.name) == (4, "Q5_0"):
        _q5_0_from_int4(ct.reshape(nb, 16), _block_adds(zp, btype, b), per, out, meta)
    elif b < 4 and btype.name == "Q4_0" and layout == CROSS_WORD:
        _q4_0_from_low_bits(ct.reshape(nb, 4 * b), b, _block_adds(zp, btype, b), per, out["qs"], meta)
    else:
        _from_values(packed, zp, scheme, btype, shape, layout, out, meta)
    return torch.from_numpy(dest).reshape(*shape[:-1], shape[-1] // QK * btype.type_size)


# -- the compiled codec (spec/gguf.md §2.1) ------------------------------------------------------
_NATIVE_TYPES = {"Q4_0": 0, "Q4_1": 1, "Q5_0": 2, "Q8_0": 3}


def _native_codec(native: bool | str | None):
    """The ctypes library `native` asks for, or None for the numpy path."""
    if native is False:
        return None
    variant = native if isinstance(native, str) else "auto"
    lib = compiled.codec(variant)
    if lib is None and native is not None:
        raise RuntimeError(f"the compiled GGUF codec ({variant}) is not available: CTFORMAT_NATIVE is off or "
                           f"{compiled.SOURCE.name} does not build with the C compiler")
    return lib


def _native_maps(b: int, btype: BlockType, layout: str) -> bool:
    """Blocks are whole groups of 4b bytes: the dense layout, or a width whose padded layout is
    the same bytes (1, 2, 4, 8 bits)."""
    return btype.name in _NATIVE_TYPES and (layout == CROSS_WORD or 8 % b == 0)


def _native_encode(lib, packed: torch.Tensor, dest: np.ndarray, nb: int, b: int, btype: BlockType,
                   d16: np.ndarray, m16: np.ndarray | None, adds: np.ndarray, per: int) -> None:
    """ctf_encode over chunks of blocks (worker threads on several cores: ctypes releases the GIL)."""
    ct = packed.detach().cpu().contiguous().view(torch.uint8).numpy().reshape(-1)
    assert ct.size == nb * 4 * b and dest.size == nb * btype.type_size and dest.flags.c_contiguous
    d16 = np.ascontiguousarray(d16)
    m16 = d16 if m16 is None else np.ascontiguousarray(m16)
    adds = np.ascontiguousarray(adds, np.uint8)
    args = (ct.ctypes.data, dest.ctypes.data)
    rest = (b, _NATIVE_TYPES[btype.name], d16.ctypes.data, m16.ctypes.data, adds.ctypes.data, int(adds.size == 1),
            per)

    def body(r: int, n: int, scratch: dict) -> None:
        if lib.ctf_encode(*args, r, n, *rest):
            raise ValueError(f"ctf_encode does not map {b}-bit codes to {btype.name}")
    _chunks(nb, _NATIVE_CHUNK, body)
    del ct, d16, m16, adds                    # the buffers the library read stay alive until here


_NATIVE_CHUNK = 1 << 15        # blocks per call: ~0.6 MiB of Q4_0, a few microseconds of ctypes each


def _fields(dest: np.ndarray, btype: BlockType) -> dict[str, np.ndarray]:
    """Each field of the blocks in `dest` (uint8, a whole number of blocks) as a strided view of
    it, so every chunk's codes are stored straight into the output. A field whose offset is not a
    multiple of its size (Q5_0's qh) is a view of bytes (V4): assign `.view("V4")` of uint32."""
    nb, views, offset = dest.size // btype.type_size, {}, 0
    for name, code in btype.fields:
        dt = np.dtype(code)
        if dt.kind != "V" and (offset % dt.itemsize or btype.type_size % dt.itemsize):
            dt = np.dtype(f"V{dt.itemsize}")
        views[name] = np.ndarray((nb,), dt, dest, offset, (btype.type_size,))
        offset += dt.itemsize
    return views


def _spread(values: np.ndarray, per: int, r: int, n: int) -> np.ndarray:
    """Per-block entries of blocks [r, r + n) when each of `values` covers `per` consecutive blocks."""
    if per == 1:
        return values[r:r + n]
    first, last = r // per, (r + n - 1) // per
    if first == last:
        return np.full(n, values[first], values.dtype)
    return np.repeat(values[first:last + 1], per)[r - first * per:r - first * per + n]


def _chunks(total: int, step: int, body: Callable[[int, int, dict], None]) -> None:
    """body(start, count, scratch) over [0, total) in steps; on several cores, chunks are handed
    to worker threads one at a time (numpy releases the GIL in its loops; each thread keeps its
    own scratch buffers), so a descheduled thread delays one chunk, not every step."""
    starts = range(0, total, step)
    workers = _workers()
    if workers == 1 or len(starts) < 2 * workers:
        scratch: dict = {}
        for r in starts:
            body(r, min(step, total - r), scratch)
        return
    local = threading.local()

    def run(r: int) -> None:
        if not hasattr(local, "scratch"):
            local.scratch = {}
        body(r, min(step, total - r), local.scratch)
    list(_pool(workers).map(run, starts))


def _buffer(scratch: dict, key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    buf = scratch.get(key)
    if buf is None or buf.shape != shape:
        buf = scratch[key] = np.empty(shape, dtype)
    return buf


def _workers() -> int:
    return max(1, min(_MAX_WORKERS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1))


def _pool(workers: int) -> ThreadPoolExecutor:
    with _POOL_LOCK:
        if workers not in _POOLS:
            _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="ctformat-ggml")
        return _POOLS[workers]


_MAX_WORKERS = 8               # more threads than this only contend for memory bandwidth
_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _q4_from_int4(ct: np.ndarray, qs: np.ndarray, meta: Callable[[int, int], None]) -> None:
    """CT int4 bytes [nb, 16] (byte c: elements 2c, 2c+1; the nibble u = q + 8 is already Q4_0's
    code, and Q4_1's) -> qs, chunk by chunk (_q4_qs)."""
    words = ct.view(np.uint64).reshape(-1, 2)
    step = min(_CHUNK_BLOCKS, len(words))

    def body(r: int, n: int, scratch: dict) -> None:
        _q4_qs(words[r:r + n, 0], words[r:r + n, 1], qs[r:r + n], scratch, step)
        meta(r, n)
    _chunks(len(words), step, body)


def _q4_qs(x: np.ndarray, y: np.ndarray, qs: np.ndarray, scratch: dict, step: int) -> None:
    """Nibble codes of elements 0-15 (x) and 16-31 (y) of n blocks, as 64-bit lanes (element e at
    bits 4e) -> the blocks' qs (byte j: element j, element j + 16).

    The even qs bytes are A = x's low nibbles | y's low nibbles << 4 (byte m: elements 2m,
    2m + 16) and the odd ones B = x's high nibbles >> 4 | y's high nibbles (elements 2m + 1,
    2m + 17): x's high nibbles trade places with y's low ones, a delta swap of six lane ops
    (t = (x >> 4 ^ y) & 0x0F.., A = x ^ t << 4, B = y ^ t; the shift left is a multiply, numpy's
    faster op). A and B are interleaved bytewise as uint16 lanes B * 256 + A (two ufuncs, each
    casting its uint8 input in cache-sized buffers) and stored as one 16-byte item per block."""
    n = len(x)
    ab = _buffer(scratch, "ab", (2, step), np.uint64)
    t = _buffer(scratch, "t", (step,), np.uint64)[:n]
    wide = _buffer(scratch, "wide", (step * 8,), np.uint16)[:8 * n]
    a, b = ab[0, :n], ab[1, :n]
    np.right_shift(x, _S4, out=t)
    np.bitwise_xor(t, y, out=t)
    np.bitwise_and(t, _L4, out=t)
    np.multiply(t, _M16, out=a)
    np.bitwise_xor(a, x, out=a)
    np.bitwise_xor(y, t, out=b)
    np.multiply(b.view(np.uint8), _M256, out=wide, dtype=np.uint16)
    np.add(wide, a.view(np.uint8), out=wide, dtype=np.uint16)
    qs[:] = wide.view("V16")


def _block_adds(zp: torch.Tensor | None, btype: BlockType, b: int) -> np.ndarray:
    """Per scale group, what turns the CT code u = q + 2^(b-1) into the stored code (type offset
    + q - z): offset - z_u, as uint8 (z_u = z + 2^(b-1); one entry for a module without zero points)."""
    z_u = np.full(1, 1 << (b - 1), np.int16) if zp is None else zp.to(torch.int16).reshape(-1).numpy() + (1 << (b - 1))
    return (btype.offset - z_u).astype(np.uint8)


def _lanes(adds: np.ndarray, k: int) -> np.ndarray:
    """Each group's add replicated into every byte (k = 8) or nibble (k = 4) of a 64-bit lane."""
    return adds.astype(np.uint64) * np.uint64(0x0101010101010101 if k == 8 else 0x1111111111111111)


def _add_lanes(lanes: np.ndarray, group: np.ndarray, per: int, r: int, n: int) -> None:
    """lanes [n, L] (blocks [r, r + n)) += the lane of each block's group (`per` blocks a group)."""
    flat, width = lanes.reshape(-1), lanes.shape[1]
    if len(group) == 1:
        np.add(flat, group[0], out=flat)
    else:
        np.add(flat, _spread(group, per * width, r * width, n * width), out=flat)


def _q5_0_from_int4(ct: np.ndarray, adds: np.ndarray, per: int, out: dict[str, np.ndarray],
                    meta: Callable[[int, int], None]) -> None:
    """CT int4 bytes [nb, 16] with zero points -> Q5_0 (code c = u + 16 - z_u, 1..31).

    Per chunk: the nibbles spread to one code per byte (uint16 lanes (w | w << 4) & 0x0F0F),
    each block's add on 64-bit lanes (c < 32: no byte overflows), then qs = low nibbles of
    elements j | j + 16 and qh = bit 4 of every element gathered by a multiply (bit 8i + 4 of
    a lane -> bit 56 + i), eight elements a lane, narrowed to the four qh bytes."""
    nb = len(ct)
    step = min(_CHUNK_BLOCKS // 2, nb)
    group = _lanes(adds, 8)

    def body(r: int, n: int, scratch: dict) -> None:
        w = _buffer(scratch, "w", (step * 16,), np.uint16)[:16 * n]
        t16 = _buffer(scratch, "t16", (step * 16,), np.uint16)[:16 * n]
        np.copyto(w, ct[r:r + n].reshape(-1), casting="unsafe")
        np.multiply(w, np.uint16(16), out=t16)
        np.bitwise_or(w, t16, out=w)
        np.bitwise_and(w, np.uint16(0x0F0F), out=w)                  # byte i: code of element i
        lanes = w.view(np.uint64).reshape(n, 4)
        _add_lanes(lanes, group, per, r, n)
        t = _buffer(scratch, "t", (step, 4), np.uint64)[:n]
        np.bitwise_and(lanes, _L4, out=t)
        qs = _buffer(scratch, "qs", (step, 2), np.uint64)[:n]
        for k in (0, 1):                   # 1-D strided lanes: numpy's [n, 2] loops run two items a call
            np.multiply(t[:, k + 2], _M16, out=qs[:, k])
            np.bitwise_or(qs[:, k], t[:, k], out=qs[:, k])
        out["qs"][r:r + n] = qs.view("V16").reshape(-1)
        np.right_shift(lanes, _S4, out=t)
        np.bitwise_and(t, _BIT4, out=t)
        np.multiply(t, _GATHER, out=t)
        np.right_shift(t, _S56, out=t)
        qh = _buffer(scratch, "qh", (step, 4), np.uint8)[:n]
        np.copyto(qh, t, casting="unsafe")
        out["qh"][r:r + n] = qh.view("V4").reshape(-1)
        meta(r, n)
    _chunks(nb, step, body)


def _spread_masks(b: int) -> list[tuple[np.uint64, np.uint64, np.uint64]]:
    """(keep, move, shift) rounds that spread 16 fields of b bits (at bits b*i) to nibbles (bits
    4i): halves of 8, 4, 2, 1 fields, the upper half of each moved up at every round."""
    pos = [b * i for i in range(16)]
    rounds = []
    for g in (8, 4, 2, 1):
        keep = move = 0
        for i in range(16):
            mask = ((1 << b) - 1) << pos[i]
            if (i // g) % 2:
                move |= mask
                pos[i] += g * (4 - b)
            else:
                keep |= mask
        rounds.append((np.uint64(keep), np.uint64(move), np.uint64(1 << (g * (4 - b)))))
    assert pos == [4 * i for i in range(16)]
    return rounds


def _q4_0_from_low_bits(ct: np.ndarray, b: int, adds: np.ndarray, per: int, qs: np.ndarray,
                        meta: Callable[[int, int], None]) -> None:
    """CT 1-, 2- or 3-bit codes (the dense layout: a block's 32 values are 4b bytes, value i at
    bits b*i) -> Q4_0 (code u + 8 - z_u, which never leaves its nibble).

    Elements 0-15 and 16-31 are read as 64-bit lanes (bytes 0.. and 2b.., shifted), spread to
    nibbles by four mask-and-shift rounds (a shift left is a multiply), given the block's add
    (a plain lane add: no nibble overflows) and reordered as int4 (_q4_qs)."""
    nb, nbytes = ct.shape
    step = min(_CHUNK_BLOCKS, nb)
    rounds = _spread_masks(b)
    group = _lanes(adds, 4)
    width = {1: np.uint16, 2: np.uint32, 3: np.uint64}[b]       # holds 16 fields from a half's first byte
    lo = np.ndarray((nb,), width, ct, 0, (nbytes,))
    hi = np.ndarray((nb,), width, ct, (2 * b if b < 3 else 4), (nbytes,))   # b = 3: bytes 4..11, >> 16
    drop = np.uint64(16 if b == 3 else 0)

    def body(r: int, n: int, scratch: dict) -> None:
        xy = _buffer(scratch, "xy", (step, 2), np.uint64)[:n]
        keep = _buffer(scratch, "keep", (step, 2), np.uint64)[:n]
        np.copyto(xy[:, 0], lo[r:r + n], casting="unsafe")
        np.copyto(xy[:, 1], hi[r:r + n], casting="unsafe")
        np.right_shift(xy[:, 1], drop, out=xy[:, 1])
        for keep_mask, move_mask, mul in rounds:
            np.bitwise_and(xy, keep_mask, out=keep)
            np.bitwise_and(xy, move_mask, out=xy)
            np.multiply(xy, mul, out=xy)
            np.bitwise_or(xy, keep, out=xy)
        _add_lanes(xy, group, per, r, n)
        _q4_qs(xy[:, 0], xy[:, 1], qs[r:r + n], scratch, step)
        meta(r, n)
    _chunks(nb, step, body)


def _q8_0_from_int8(ct: np.ndarray, qs: np.ndarray, meta: Callable[[int, int], None]) -> None:
    """CT int8 bytes u = q + 128 -> Q8_0's signed q = u ^ 0x80, one lane op per 8 bytes."""
    words = ct.view(np.uint64).reshape(-1, 4)
    step = min(_CHUNK_BLOCKS // 2, len(words))
    flip = np.uint64(0x8080808080808080)

    def body(r: int, n: int, scratch: dict) -> None:
        t = _buffer(scratch, "t", (step, 4), np.uint64)[:n]
        np.bitwise_xor(words[r:r + n], flip, out=t)
        qs[r:r + n] = t.view("V32").reshape(-1)
        meta(r, n)
    _chunks(len(words), step, body)


def _from_values(packed: torch.Tensor, zp: torch.Tensor | None, scheme: QuantScheme, btype: BlockType,
                 shape: tuple[int, ...], layout: str, out: dict[str, np.ndarray],
                 meta: Callable[[int, int], None]) -> None:
    """Every other scheme: per chunk of blocks, the stored codes u, plus one constant per block
    (the type's offset minus z_u; Q4_1 stores u itself), into the qs (and qh) fields."""
    b, nb = scheme.num_bits, len(out["d"])
    per = _blocks_per_scale(scheme, shape)
    z_u = (1 << (b - 1)) if zp is None else zp.to(torch.int16).reshape(-1).numpy() + (1 << (b - 1))
    add = np.asarray((btype.offset - z_u) if btype.name != "Q4_1" else 0, dtype=np.int16)
    add = np.repeat(add.astype(np.uint8), per) if add.ndim else np.full(nb, add, np.uint8)   # mod 256
    if b in (4, 8):                    # CT bytes are the codes (two per byte for 4 bits): numpy only
        ct = packed.view(torch.uint8).numpy().reshape(nb, QK * b // 8)

        def body(r: int, n: int, scratch: dict) -> None:
            if b == 8:
                u = ct[r:r + n].copy()
            else:                      # byte k -> (low nibble, high nibble) = elements 2k, 2k + 1
                w = ct[r:r + n].astype(np.uint16)
                u = ((w & 0x0F) | ((w & 0xF0) << 4)).view(np.uint8)
            u += add[r:r + n, None]
            _store_codes(u, btype, _rows(out, r, n))
            meta(r, n)
        _chunks(nb, _CHUNK_BLOCKS, body)
        return
    n_in = shape[-1]
    rows, nbr = nb // (n_in // QK), n_in // QK
    p2 = packed.reshape(rows, packed.shape[-1])
    step = max(1, (_CHUNK_BLOCKS * 16) // nbr)        # torch unpack: few, long steps (each op syncs threads)
    for r in range(0, rows, step):
        n = min(step, rows - r)
        q = unpack_from_int32(p2[r:r + n], b, (n, n_in), layout=layout)
        u = q.numpy().view(np.uint8).reshape(-1, QK) + np.uint8(1 << (b - 1))      # u = q + 2^(b-1), mod 256
        u += add[r * nbr:(r + n) * nbr, None]
        _store_codes(u, btype, _rows(out, r * nbr, n * nbr))
        meta(r * nbr, n * nbr)


def _rows(fields: dict[str, np.ndarray], r: int, n: int) -> dict[str, np.ndarray]:
    return {k: v[r:r + n] for k, v in fields.items()}


def _store_codes(u: np.ndarray, btype: BlockType, out: dict[str, np.ndarray]) -> None:
    """Stored codes [n, 32] (uint8: Q8_0's int8 bytes, or nibble codes 0..15 / 0..31) -> the qs
    (and qh) fields of `out` (_fields views)."""
    if btype.name == "Q8_0":
        out["qs"][:] = u.view("V32").reshape(-1)
        return
    lanes = u.view(np.uint64).reshape(-1, 4)                   # elements 0-7, 8-15, 16-23, 24-31
    qs = np.empty((len(u), 2), np.uint64)
    for k in (0, 1):                                           # byte j: element j | element j + 16 << 4
        np.left_shift(lanes[:, k + 2] & _L4, _S4, out=qs[:, k])
        np.bitwise_or(qs[:, k], lanes[:, k] & _L4, out=qs[:, k])
    out["qs"][:] = qs.view("V16").reshape(-1)
    if btype.name == "Q5_0":                                   # bit 4 of element j -> bit j of qh
        qh = np.zeros(len(u), np.uint64)
        for k in range(4):
            byte = (((lanes[:, k] >> _S4) & _BIT4) * _GATHER) >> _S56
            qh |= byte << np.uint64(8 * k)
        out["qh"][:] = qh.astype(np.uint32).view("V4")


def encode(v: torch.Tensor, d: torch.Tensor, btype: BlockType, m: torch.Tensor | None = None) -> torch.Tensor:
    """Values [..., in] (integers in the type's range; Q4_1: the unsigned nibble), d (and m)
    [..., in/32] -> uint8 blocks [..., in/32 * type_size]."""
    lead, n_in = v.shape[:-1], v.shape[-1]
    vals = v.detach().cpu().to(torch.int16).reshape(-1, QK).numpy()
    dest = np.empty(len(vals) * btype.type_size, np.uint8)
    out = _fields(dest, btype)
    out["d"][:] = _fp16_bits(d)
    if m is not None:
        out["m"][:] = _fp16_bits(m)
    _store_codes((vals + btype.offset).astype(np.uint8), btype, out)
    return torch.from_numpy(dest).reshape(*lead, n_in // QK * btype.type_size)


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
