"""Triton kernel for pack-quantized dequantization (spec §5): one pass from int32 words,
scales, zero points and g_idx to dense weights, for 1, 2, 4 and 8 bits (where a value never
straddles a word; both layouts agree). Imported only where it runs: on a CUDA device, or on
the CPU under TRITON_INTERPRET=1 (how CI tests the kernel itself).

Bit-exactness with the torch path (quant.dequantize): (q - zp) * scale is exact in fp32 for
8-bit integers times a bf16/fp16 scale, so rounding that product once to the scale dtype, then
to the output dtype, gives the same bits torch computes. bf16 rounding is done with integer
operations (round to nearest even) so the interpreter, which truncates, agrees with the GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["dequantize_packed", "marlin_repack"]

_KIND = {torch.bfloat16: 0, torch.float16: 1, torch.float32: 2}
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"     # Triton runs kernels on the CPU, truncating bf16


def _bits_view(t: torch.Tensor) -> torch.Tensor:
    """bf16 tensors reach the interpreter as int16 bits; on a GPU they stay bf16."""
    return t.view(torch.int16) if _INTERPRET and t.dtype == torch.bfloat16 else t
# (rows, words, warps) per program of the tiled kernel, by bits. Tuned on an H100
# (benchmarks/bench_dequant_gpu.py --sweep).
_BLOCKS = {1: (16, 16, 4), 2: (16, 32, 4), 4: (4, 128, 4), 8: (8, 256, 4)}


@triton.jit
def _round(v, KIND: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 -> the value of dtype KIND nearest to it (ties to even), still as fp32. NATIVE uses
    the hardware conversion (round to nearest even on GPUs); the interpreter needs the integer
    version because it truncates."""
    if KIND == 0 and NATIVE:
        out = v.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.float32)
    elif KIND == 0:
        bits = v.to(tl.uint32, bitcast=True)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))     # keep NaN a NaN
    elif KIND == 1:
        out = v.to(tl.float16, fp_downcast_rounding="rtne").to(tl.float32)
    else:
        out = v
    return out


@triton.jit
def _store(at, w, mask, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr):
    """fp32 values (already rounded to OUT_KIND) stored as OUT_KIND; bf16 goes to the
    interpreter as int16 bits. The output is never read back: stream it past L2."""
    if OUT_KIND == 0 and NATIVE:
        tl.store(at, w.to(tl.bfloat16), mask=mask, cache_modifier=".cs")
    elif OUT_KIND == 0:
        tl.store(at, (w.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif OUT_KIND == 1:
        tl.store(at, w.to(tl.float16), mask=mask, cache_modifier=".cs" if NATIVE else "")
    else:
        tl.store(at, w, mask=mask, cache_modifier=".cs" if NATIVE else "")


@triton.jit
def _dequant_kernel(packed_ptr, scale_ptr, zp_ptr, gidx_ptr, out_ptr,
                    R, K, W, GS, ROWS, ZROWS, stride_p, stride_s, stride_z, stride_o,
                    BITS: tl.constexpr, HAS_ZP: tl.constexpr, HAS_GIDX: tl.constexpr,
                    SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr, ROW_SCALE: tl.constexpr,
                    WORD_SCALE: tl.constexpr, ZP_PACKED: tl.constexpr, NATIVE: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_W: tl.constexpr):
    # A program covers BLOCK_R rows x BLOCK_W words; values stay [rows, words, PER] so each
    # word's PER values are written next to each other (no reshuffle between registers).
    PER: tl.constexpr = 32 // BITS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    wcols = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    rmask = rows < R
    r3 = rows.to(tl.int64)[:, None, None]
    # contiguity 1: loads stay in the store's register layout (see the flat kernel)
    words = tl.load(packed_ptr + r3 * stride_p + tl.max_contiguous(wcols, 1)[None, :, None],
                    mask=rmask[:, None, None] & (wcols < W)[None, :, None], other=0, eviction_policy="evict_first")
    lane = tl.arange(0, PER)[None, None, :]
    q = ((words >> (lane * BITS)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
    cols = wcols[None, :, None] * PER + lane                       # [1, W, PER]
    mask = rmask[:, None, None] & (cols < K)
    if ROW_SCALE:           # one group covers this block's columns: one scale per row
        g = (tl.program_id(1) * BLOCK_W * PER) // GS
        smask = rmask[:, None, None]
    elif HAS_GIDX:          # any column may use any group
        g = tl.load(gidx_ptr + cols, mask=cols < K, other=0).to(tl.int32)
        smask = mask
    elif WORD_SCALE:        # a word's values share one group: one scale per row and word
        g = (wcols[None, :, None] * PER) // GS
        smask = rmask[:, None, None] & (wcols < W)[None, :, None]
    else:
        g = cols // GS
        smask = mask
    s_at = scale_ptr + r3 * stride_s + g
    if SCALE_KIND == 0 and not NATIVE:     # bf16 arrives as int16 bits: widen to fp32 exactly
        s = (tl.load(s_at, mask=smask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
            tl.float32, bitcast=True)
    else:
        s = tl.load(s_at, mask=smask, other=1).to(tl.float32)
    if HAS_ZP:
        if ZP_PACKED:       # int32 words along each expert's rows (dim -2), as stored since CT 0.9.4
            local = r3 % ROWS
            zw = tl.load(zp_ptr + ((r3 // ROWS) * ZROWS + local // PER) * stride_z + g, mask=smask, other=0)
            q = q - (((zw >> ((local % PER) * BITS).to(tl.int32)) & ((1 << BITS) - 1)) - (1 << (BITS - 1)))
        else:
            q = q - tl.load(zp_ptr + r3 * stride_z + g, mask=smask, other=0).to(tl.int32)
    w = _round(_round(q.to(tl.float32) * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
    _store(out_ptr + r3 * stride_o + cols, w, mask, OUT_KIND, NATIVE)


@triton.jit
def _load_scale(at, mask, other, KIND: tl.constexpr, NATIVE: tl.constexpr, EVICT: tl.constexpr):
    """A bf16/fp16/fp32 scale as fp32 (bf16 arrives as int16 bits in the interpreter)."""
    if KIND == 0 and not NATIVE:     # widen the bits: exact
        s = (tl.load(at, mask=mask, other=other).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
            tl.float32, bitcast=True)
    else:
        s = tl.load(at, mask=mask, other=other, eviction_policy=EVICT).to(tl.float32)
    return s


@triton.jit
def _packed_zero(zp_ptr, r, g, GROUPS, ROWS, ZROWS, mask, other, BITS: tl.constexpr, PER: tl.constexpr,
                 ZP_ALIGNED: tl.constexpr, EVICT: tl.constexpr):
    # Row r's zero point for group g, from int32 words packed along each expert's rows: the
    # word is row r // PER where experts hold whole words, else counted from the expert's start.
    if ZP_ALIGNED:
        zrow = r // PER
        nib = r % PER
    else:
        e = r // ROWS
        zrow = e * ZROWS + (r - e * ROWS) // PER
        nib = (r - e * ROWS) % PER
    zw = tl.load(zp_ptr + zrow * GROUPS + g, mask=mask, other=other, eviction_policy=EVICT)
    return ((zw >> (nib * BITS).to(tl.int32)) & ((1 << BITS) - 1)) - (1 << (BITS - 1))


@triton.jit
def _dequant_flat_kernel(packed_ptr, scale_ptr, zp_ptr, gidx_ptr, out_ptr, NC, GROUPS, CPG, CW, ROWS, ZROWS,
                         BITS: tl.constexpr, VEC: tl.constexpr, SUB: tl.constexpr, WSHIFT: tl.constexpr,
                         HAS_ZP: tl.constexpr, ZP_PACKED: tl.constexpr, ZP_ALIGNED: tl.constexpr,
                         HAS_GIDX: tl.constexpr, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                         NATIVE: tl.constexpr, WIDE: tl.constexpr, BLOCK: tl.constexpr, EVEN: tl.constexpr):
    # The packed tensor as a flat run of chunks of VEC words (one int32, or two as one int64):
    # chunk i holds outputs i*PERC .. i*PERC+PERC-1 of the flat output, all in one row (and,
    # without g_idx, one group). A program covers BLOCK chunks as [chunks, SUB, LANES] values:
    # a chunk's values are SUB runs of 16 bytes (one per thread), and every thread loads the
    # chunk, scale and zero point of its run itself (threads of one chunk read the same
    # address: one transaction), so no value crosses threads.
    PER: tl.constexpr = 32 // BITS
    PERC: tl.constexpr = PER * VEC
    LANES: tl.constexpr = PERC // SUB
    if WIDE:        # more than 2**31 values: 64-bit offsets
        cid = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    else:
        cid = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    # Contiguity 1 keeps every load in the store's register layout (one run per thread): a
    # vectorized load would go through shared memory to be re-laid out.
    cl = tl.max_contiguous(cid, 1)[:, None] + tl.zeros([1, SUB], dtype=cid.dtype)     # [BLOCK, SUB]
    cmask = None if EVEN else cl < NC
    other = None if EVEN else 0
    chunk = tl.load(packed_ptr + cl, mask=cmask, other=other, eviction_policy="evict_first")
    at = tl.arange(0, SUB)[None, :, None] * LANES + tl.arange(0, LANES)[None, None, :]   # [1, SUB, LANES]
    if VEC == 1:
        u = (chunk.to(tl.uint32, bitcast=True)[:, :, None] >> (at * BITS)) & ((1 << BITS) - 1)
    else:           # little-endian: word 2i in the low half
        u = ((chunk.to(tl.uint64, bitcast=True)[:, :, None] >> (at * BITS).to(tl.uint64))
             & ((1 << BITS) - 1)).to(tl.uint32)
    q = u.to(tl.int32) - (1 << (BITS - 1))
    vmask = None if EVEN else cmask[:, :, None]
    if HAS_GIDX:    # any column may use any group: one scale (and zero point) per value
        r = cl // CW
        g = tl.load(gidx_ptr + (cl - r * CW)[:, :, None] * PERC + at, mask=vmask, other=other).to(tl.int32)
        r = r[:, :, None]
        si = r * GROUPS + g
        zmask = vmask
        s = _load_scale(scale_ptr + si, vmask, other, SCALE_KIND, NATIVE, "")
    else:           # one group per chunk: a scale serves CPG neighbouring chunks, keep it in L2
        si = cl >> WSHIFT if WSHIFT >= 0 else cl // CPG
        zmask = cmask
        s = _load_scale(scale_ptr + si, cmask, other, SCALE_KIND, NATIVE, "evict_last")[:, :, None]
        if HAS_ZP and ZP_PACKED:
            r = si // GROUPS
            g = si - r * GROUPS
    if HAS_ZP:
        ZEVICT: tl.constexpr = "" if HAS_GIDX else "evict_last"
        if ZP_PACKED:       # int32 words along each expert's rows (dim -2), as stored since CT 0.9.4
            z = _packed_zero(zp_ptr, r, g, GROUPS, ROWS, ZROWS, zmask, other, BITS, PER, ZP_ALIGNED, ZEVICT)
        else:               # int8, shaped like the scale
            z = tl.load(zp_ptr + si, mask=zmask, other=other, eviction_policy=ZEVICT).to(tl.int32)
        q = q - (z if HAS_GIDX else z[:, :, None])
    w = _round(_round(q.to(tl.float32) * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
    _store(out_ptr + cid[:, None, None] * PERC + at, w, vmask, OUT_KIND, NATIVE)


@triton.jit
def _dequant_gidx_rows_kernel(packed_ptr, scale_ptr, zp_ptr, gidx_ptr, out_ptr, R, CW, GROUPS, ROWS, ZROWS,
                              BITS: tl.constexpr, SUB: tl.constexpr, HAS_ZP: tl.constexpr,
                              ZP_PACKED: tl.constexpr, ZP_ALIGNED: tl.constexpr, SCALE_KIND: tl.constexpr,
                              OUT_KIND: tl.constexpr, NATIVE: tl.constexpr, BLOCK_R: tl.constexpr,
                              BLOCK_C: tl.constexpr, EVEN: tl.constexpr):
    # g_idx schemes, one program per BLOCK_R rows x BLOCK_C words of each: the words' g_idx
    # entries are loaded once and serve every row, which the program then walks one by one
    # with the flat kernel's [words, SUB, LANES] layout (so nothing is re-laid out, whatever
    # order the compiler gives the rows).
    PER: tl.constexpr = 32 // BITS
    LANES: tl.constexpr = PER // SUB
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cl = tl.max_contiguous(c, 1)[:, None] + tl.zeros([1, SUB], dtype=c.dtype)          # [BLOCK_C, SUB]
    at = tl.arange(0, SUB)[None, :, None] * LANES + tl.arange(0, LANES)[None, None, :]  # [1, SUB, LANES]
    other = None if EVEN else 0
    cmask = None if EVEN else cl < CW
    g = tl.load(gidx_ptr + cl[:, :, None] * PER + at, mask=None if EVEN else cmask[:, :, None],
                other=other).to(tl.int32)
    for i in tl.static_range(BLOCK_R):
        r = tl.program_id(0).to(tl.int64) * BLOCK_R + i
        mask = None if EVEN else cmask & (cl * 0 + r < R)      # the row's validity, as a tensor
        vmask = None if EVEN else mask[:, :, None]
        word = tl.load(packed_ptr + r * CW + cl, mask=mask, other=other, eviction_policy="evict_first")
        u = (word.to(tl.uint32, bitcast=True)[:, :, None] >> (at * BITS)) & ((1 << BITS) - 1)
        q = u.to(tl.int32) - (1 << (BITS - 1))
        s = _load_scale(scale_ptr + r * GROUPS + g, vmask, other, SCALE_KIND, NATIVE, "")
        if HAS_ZP:
            if ZP_PACKED:   # int32 words along each expert's rows (dim -2)
                z = _packed_zero(zp_ptr, r, g, GROUPS, ROWS, ZROWS, vmask, other, BITS, PER, ZP_ALIGNED, "")
            else:           # int8, shaped like the scale
                z = tl.load(zp_ptr + r * GROUPS + g, mask=vmask, other=other).to(tl.int32)
            q = q - z
        w = _round(_round(q.to(tl.float32) * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
        _store(out_ptr + (r * CW + cl[:, :, None]) * PER + at, w, vmask, OUT_KIND, NATIVE)


# Flat kernel settings: (packed words per program, warps) by (case, bits), case "sym", "zp" or
# "g_idx"; cases not listed take FLAT_DEFAULT (H100 and H200 sweeps of symmetric int4,
# benchmarks/bench_dequant_gpu.py --sweep, which also tunes the other cases).
FLAT_DEFAULT = (1024, 16)
FLAT: dict[tuple[str, int], tuple[int, int]] = {}
VEC = {1: 1, 2: 1, 4: 1, 8: 2}     # words per thread (two 8-bit words: one 16-byte bf16 store)
# How g_idx schemes run: "flat" (the flat kernel: each word loads its columns' g_idx entries)
# or "rows" (a program loads the g_idx of its words once and walks BLOCK_R rows with it);
# "16" narrows g_idx to int16 first (half the index traffic, one more small launch).
GIDX = "flat"
GIDX_VARIANTS = ("flat", "flat16", "rows", "rows16")
GIDX_ROWS = (8, 256, 8)            # rows, words, warps per program of the "rows" variant
_FLAT_LIMIT = 2**31                # values beyond which the flat kernel takes 64-bit offsets


def _pow2_log(v: int) -> int:
    """log2(v) for a power of two, else -1."""
    return v.bit_length() - 1 if v > 0 and v & (v - 1) == 0 else -1


def _flat_view(p2: torch.Tensor, vec: int) -> torch.Tensor | None:
    """The packed words as chunks of `vec` words (int64 for two), or None where they cannot be."""
    flat = p2.reshape(-1)
    if vec == 1:
        return flat
    if flat.numel() % 2 or flat.storage_offset() % 2:
        return None
    return flat.view(torch.int64)


def _dequant_flat(p2, s2, z2, g, o2, *, num_bits: int, in_features: int, group_size: int, rows: int) -> bool:
    """Run the flat kernel when the case fits it (contiguous rows of whole words, each chunk in
    one group); False leaves the case to the tiled kernel."""
    per = 32 // num_bits
    n = p2.shape[0]
    if in_features != p2.shape[-1] * per or s2.numel() == 1:
        return False
    if g is None and (in_features % group_size or group_size % per or s2.shape[-1] != in_features // group_size):
        return False
    vec = VEC[num_bits]
    if in_features % (per * vec) or (g is None and group_size % (per * vec)):
        vec = 1
    chunks = _flat_view(p2, vec)
    if chunks is None:
        vec, chunks = 1, p2.reshape(-1)
    perc = per * vec
    nc = n * in_features // perc
    words, warps = FLAT.get(("g_idx" if g is not None else "zp" if z2 is not None else "sym", num_bits), FLAT_DEFAULT)
    block = max(1, words // vec)
    cpg = max(1, group_size // perc)
    sub = max(1, perc * o2.element_size() // 16)        # 16-byte runs per chunk
    zp_packed = z2 is not None and z2.dtype == torch.int32
    _dequant_flat_kernel[(triton.cdiv(nc, block),)](
        chunks, _bits_view(s2), z2 if z2 is not None else chunks, g if g is not None else chunks, _bits_view(o2),
        nc, s2.shape[-1], cpg, in_features // perc, rows, -(-rows // per),
        BITS=num_bits, VEC=vec, SUB=sub, WSHIFT=-1 if g is not None else _pow2_log(cpg), HAS_ZP=z2 is not None,
        ZP_PACKED=zp_packed, ZP_ALIGNED=rows % per == 0, HAS_GIDX=g is not None, SCALE_KIND=_KIND[s2.dtype],
        OUT_KIND=_KIND[o2.dtype], NATIVE=not _INTERPRET, WIDE=n * in_features >= _FLAT_LIMIT, BLOCK=block,
        EVEN=nc % block == 0, num_warps=warps)
    return True


def _dequant_gidx_rows(p2, s2, z2, g, o2, *, num_bits: int, in_features: int, rows: int) -> bool:
    """Run the "rows" g_idx kernel when rows hold whole words; False leaves it to the tiled kernel."""
    per = 32 // num_bits
    n, cw = p2.shape
    if in_features != cw * per or s2.numel() == 1:
        return False
    block_r, block_c, warps = GIDX_ROWS
    _dequant_gidx_rows_kernel[(triton.cdiv(n, block_r), triton.cdiv(cw, block_c))](
        p2, _bits_view(s2), z2 if z2 is not None else p2, g, _bits_view(o2), n, cw, s2.shape[-1], rows,
        -(-rows // per), BITS=num_bits, SUB=max(1, per * o2.element_size() // 16), HAS_ZP=z2 is not None,
        ZP_PACKED=z2 is not None and z2.dtype == torch.int32, ZP_ALIGNED=rows % per == 0,
        SCALE_KIND=_KIND[s2.dtype], OUT_KIND=_KIND[o2.dtype], NATIVE=not _INTERPRET, BLOCK_R=block_r,
        BLOCK_C=block_c, EVEN=n % block_r == 0 and cw % block_c == 0, num_warps=warps)
    return True


def dequantize_packed(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      g_idx: torch.Tensor | None, *, num_bits: int, in_features: int, group_size: int,
                      dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense [..., out, in] from packed [..., out, words] and scale [..., out, groups] (or [1]).

    `zero_point` is int8 shaped like the scale, or int32 packed along rows (as stored);
    `group_size` is in_features for channel and tensor strategies.
    """
    if num_bits not in (1, 2, 4, 8):
        raise ValueError(f"the kernel handles 1, 2, 4 and 8 bits, got {num_bits}")
    lead, rows = packed.shape[:-2], packed.shape[-2]
    n = rows
    for d in lead:
        n *= d
    dtype = dtype or scale.dtype
    out = torch.empty(*lead, rows, in_features, dtype=dtype, device=packed.device)
    if out.numel() == 0:
        return out
    p2 = packed.reshape(n, packed.shape[-1]).contiguous()
    if scale.numel() == 1:                        # tensor strategy: one scale for all
        s2, stride_s = scale.reshape(1, 1).contiguous(), 0
    else:
        s2 = scale.reshape(n, scale.shape[-1]).contiguous()
        stride_s = s2.stride(0)
    zp_packed = zero_point is not None and zero_point.dtype == torch.int32
    if zp_packed:
        z2 = zero_point.reshape(-1, zero_point.shape[-1]).contiguous()      # [experts * words, groups]
    else:
        z2 = None if zero_point is None else zero_point.reshape(s2.shape).contiguous()
    g = None
    if g_idx is not None:
        narrow = GIDX.endswith("16") and scale.shape[-1] <= 2**15
        g = g_idx.to(device=packed.device, dtype=torch.int16 if narrow else torch.int32).contiguous()
    o2 = out.view(n, in_features)
    per = 32 // num_bits
    if (g is None or GIDX.startswith("flat")) and _dequant_flat(p2, s2, z2, g, o2, num_bits=num_bits,
                                                               in_features=in_features, group_size=group_size,
                                                               rows=rows):
        return out
    if g is not None and _dequant_gidx_rows(p2, s2, z2, g, o2, num_bits=num_bits, in_features=in_features, rows=rows):
        return out
    block_r, block_w, warps = _BLOCKS[num_bits]
    block_k = block_w * per
    row_scale = g is None and (s2.shape[-1] == 1 or group_size % block_k == 0)
    grid = (triton.cdiv(n, block_r), triton.cdiv(in_features, block_k))
    _dequant_kernel[grid](
        p2, _bits_view(s2), z2 if z2 is not None else p2, g if g is not None else p2, _bits_view(o2),
        n, in_features, p2.shape[-1], group_size, rows, -(-rows // per), p2.stride(0), stride_s, z2.stride(0) if z2 is not None else 0,
        o2.stride(0), BITS=num_bits, HAS_ZP=z2 is not None, HAS_GIDX=g is not None, SCALE_KIND=_KIND[s2.dtype],
        OUT_KIND=_KIND[dtype], ROW_SCALE=row_scale, WORD_SCALE=g is None and group_size % per == 0, ZP_PACKED=zp_packed, NATIVE=not _INTERPRET, BLOCK_R=block_r, BLOCK_W=block_w, num_warps=warps)
    return out


# -- Marlin repack (spec §10.2) ------------------------------------------------------------
MARLIN_BLOCK_KT = {4: 8, 8: 4}     # k-tiles per program: 8 x 16 rows of one 64-column stripe


@triton.jit
def _marlin4_kernel(src_ptr, out_ptr, KT, NT, SRC_W, BLOCK_KT: tl.constexpr):
    # One program: BLOCK_KT tiles of 16x64 along K for one 64-column stripe nt of expert e.
    # Word i of a tile is (c, q, w) = (i // 16, i // 4 % 4, i % 4); it gathers rows
    # 16kt + 8rhi + 2q + a of columns 64nt + 16w + 8cb + c, i.e. byte q of CT words
    # (row, 2kt + rhi) for cb, rhi in {0, 1}.
    pid_k, nt, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kt = pid_k * BLOCK_KT + tl.arange(0, BLOCK_KT)[:, None]
    i = tl.arange(0, 128)[None, :]
    c, q, w = i // 16, (i // 4) % 4, i % 4
    mask = (kt < KT) & (i >= 0)
    row = nt * 64 + 16 * w + c
    src = src_ptr + e.to(tl.int64) * NT * 64 * SRC_W + row.to(tl.int64) * SRC_W + 2 * kt
    shift = (8 * q).to(tl.uint32)
    y00 = (tl.load(src, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFF
    y01 = (tl.load(src + 1, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFF
    y10 = (tl.load(src + 8 * SRC_W, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFF
    y11 = (tl.load(src + 8 * SRC_W + 1, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFF
    # nibbles (a, cb, rhi): byte 2a + cb holds rhi = 0 low, rhi = 1 high
    word = ((y00 & 0xF) | ((y01 & 0xF) << 4)) | (((y10 & 0xF) | ((y11 & 0xF) << 4)) << 8) \
        | (((y00 >> 4) | (y01 & 0xF0)) << 16) | (((y10 >> 4) | (y11 & 0xF0)) << 24)
    out = out_ptr + (e.to(tl.int64) * KT * NT + kt * NT + nt) * 128 + i
    tl.store(out, word.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _marlin8_kernel(src_ptr, out_ptr, KT, NT, SRC_W, BLOCK_KT: tl.constexpr):
    # Word i of a tile is (c, q, w, cb) = (i // 32, i // 8 % 4, i // 2 % 4, i % 2); its bytes
    # (a, rhi) are rows 16kt + 8rhi + 2q + a of column 64nt + 16w + 8cb + c: half q % 2 of the
    # CT word (column, 4kt + 2rhi + q // 2).
    pid_k, nt, e = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kt = pid_k * BLOCK_KT + tl.arange(0, BLOCK_KT)[:, None]
    i = tl.arange(0, 256)[None, :]
    c, q, w, cb = i // 32, (i // 8) % 4, (i // 2) % 4, i % 2
    mask = (kt < KT) & (i >= 0)
    row = nt * 64 + 16 * w + 8 * cb + c
    src = src_ptr + e.to(tl.int64) * NT * 64 * SRC_W + row.to(tl.int64) * SRC_W + 4 * kt + q // 2
    shift = (16 * (q % 2)).to(tl.uint32)
    h0 = (tl.load(src, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFFFF
    h1 = (tl.load(src + 2, mask=mask).to(tl.uint32, bitcast=True) >> shift) & 0xFFFF
    word = (h0 & 0xFF) | ((h1 & 0xFF) << 8) | ((h0 >> 8) << 16) | ((h1 >> 8) << 24)
    out = out_ptr + (e.to(tl.int64) * KT * NT + kt * NT + nt) * 256 + i
    tl.store(out, word.to(tl.int32, bitcast=True), mask=mask)


def marlin_repack(weight_packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """CT weight_packed [..., N, K*b/32] -> Marlin B [..., K/16, N*b/2] in one pass (same
    bytes as marlin.repack's torch twin). N % 64 == 0 and K % 16 == 0 are checked by the caller."""
    lead, n = weight_packed.shape[:-2], weight_packed.shape[-2]
    experts = 1
    for d in lead:
        experts *= d
    kt, nt = in_features // 16, n // 64
    src = weight_packed.contiguous()
    out = torch.empty(*lead, kt, n * num_bits // 2, dtype=torch.int32, device=src.device)
    if out.numel() == 0:
        return out
    block = MARLIN_BLOCK_KT[num_bits]
    kernel = _marlin4_kernel if num_bits == 4 else _marlin8_kernel
    kernel[(triton.cdiv(kt, block), nt, experts)](src, out, kt, nt, src.shape[-1], BLOCK_KT=block, num_warps=4)
    return out
