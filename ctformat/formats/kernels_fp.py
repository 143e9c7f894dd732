"""Triton dequantization of the float formats (spec/formats.md §3.2, §4.2, §8): FP8 E4M3 weights
with tensor, channel, group or block scales, and FP4 E2M1 weights with NVFP4 (FP8 scale / F32
global scale) or MXFP4 (E8M0) group scales. Imported only where it runs: on CUDA, or on the CPU
under TRITON_INTERPRET=1.

Same bits as the torch path (numerics.dequantize), by construction: E4M3 values come from the
hardware conversion (SM89 and newer, exact) or are decoded from their bits with integer
operations (exact), as E2M1 and E8M0 always are; an FP8 value (4 significant bits) times a
BF16/F16 scale (8/11 bits) is exact in F32, so rounding the F32 product once to the scale dtype
is what torch computes; FP4 values (2 bits) times an F32 scale round once in F32, as torch's F32
product does, then once to BF16. NaN payloads are not part of the format: NaNs land on the same
elements, their bits may differ.

Bandwidth: each stored byte is read once and its values written as contiguous runs; scale
positions and experts are worked out once per row (FP8) or per group (FP4), and FP4 scales are
decoded once per group, so no value costs a division.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels import _INTERPRET, _KIND, _bits_view, _round

__all__ = ["dequantize_fp8", "dequantize_fp4"]

FLAT_BLOCK = 2048        # values (FP8) or bytes (FP4) per program


@triton.jit
def _e4m3_to_f32(b):
    """E4M3 byte (int32 0..255) -> its exact F32 value; 0x7F/0xFF -> NaN. The sign is applied by
    negation, not by setting bit 31 of an int32 (a signed overflow compilers may exploit)."""
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    v = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal)        # subnormal: m * 2^-9
    v = tl.where((b & 0x80) != 0, -v, v)
    return tl.where((e == 0xF) & (m == 0x7), float("nan"), v)


@triton.jit
def _load_scale(ptr, idx, mask, KIND: tl.constexpr, NATIVE: tl.constexpr):
    """A BF16/F16/F32 scale as F32 (BF16 arrives as int16 bits in the interpreter)."""
    if KIND == 0 and not NATIVE:
        s = (tl.load(ptr + idx, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(
            tl.float32, bitcast=True)
    else:
        s = tl.load(ptr + idx, mask=mask, other=1).to(tl.float32)
    return s


@triton.jit
def _store(ptr, w, mask, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr):
    if OUT_KIND == 0 and NATIVE:
        tl.store(ptr, w.to(tl.bfloat16), mask=mask, cache_modifier=".cs")
    elif OUT_KIND == 0:
        tl.store(ptr, (w.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    elif OUT_KIND == 1:
        tl.store(ptr, w.to(tl.float16), mask=mask)
    else:
        tl.store(ptr, w, mask=mask)


@triton.jit
def _fp8_rows_kernel(q_ptr, s_ptr, out_ptr, TOTAL, COLS, ROWS, BH, EXP_STRIDE, ROW_STRIDE,
                     CDIV: tl.constexpr, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr,
                     HW: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # one program: BLOCK_C columns of BLOCK_R rows (rows of all experts stacked). Row r is row
    # r % ROWS of expert r // ROWS; its scales start at (r // ROWS) * EXP_STRIDE + (r % ROWS) // BH
    # * ROW_STRIDE and column c adds c // CDIV (group or block width; 0: one scale per row). The
    # divisions run once per row, not per value: a 64-bit division per value cost a flat kernel
    # a fifth of the copy rate.
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < TOTAL
    mask = rmask[:, None] & (c < COLS)[None, :]
    base = (r // ROWS) * EXP_STRIDE + ((r % ROWS) // BH) * ROW_STRIDE
    at = r[:, None] * COLS + c[None, :]
    raw = tl.load(q_ptr + at, mask=mask, other=0, eviction_policy="evict_first")
    if HW:      # the hardware's E4M3 conversion (SM89 and newer): exact, as the bit decode is
        v = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        v = _e4m3_to_f32(raw.to(tl.int32) & 0xFF)
    if CDIV == 0:
        s = _load_scale(s_ptr, base, rmask, SCALE_KIND, NATIVE)[:, None]
    else:
        s = _load_scale(s_ptr, base[:, None] + (c // CDIV)[None, :], mask, SCALE_KIND, NATIVE)
    w = _round(_round(v * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
    _store(out_ptr + at, w, mask, OUT_KIND, NATIVE)


@triton.jit
def _e2m1_to_f32(code):
    """4-bit E2M1 code (int32) -> its exact F32 value; code 8 is -0.0."""
    idx = code & 0x7
    mag = tl.where(idx >= 2, (((idx >> 1) + 126) << 23) | ((idx & 1) << 22), tl.where(idx == 1, 126 << 23, 0))
    v = mag.to(tl.float32, bitcast=True)
    return tl.where((code & 0x8) != 0, -v, v)


@triton.jit
def _fp4_kernel(p_ptr, s_ptr, g_ptr, out_ptr, NG, EXPERT_GROUPS, GB: tl.constexpr, MX: tl.constexpr,
                PER_EXPERT: tl.constexpr, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr, BLOCK_G: tl.constexpr):
    # groups are contiguous in the file, rows holding whole groups: group q is bytes q*GB ..
    # q*GB+GB-1 (2*GB values) and its scale is scale q. A program decodes BLOCK_G scales once
    # each (and the expert of each group: the only division, per group, not per byte) and
    # writes its 2*GB*BLOCK_G values as one run.
    q = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = q < NG
    at = q[:, None] * GB + tl.arange(0, GB)[None, :]
    byte = tl.load(p_ptr + at, mask=gmask[:, None], other=0, eviction_policy="evict_first").to(tl.int32) & 0xFF
    sb = tl.load(s_ptr + q, mask=gmask, other=0).to(tl.int32) & 0xFF
    if MX:      # E8M0: 2^(e-127) exactly (e = 0: 2^-127, e = 255: +inf, as the BF16 decode gives)
        s = tl.where(sb == 0, 1 << 22, sb << 23).to(tl.float32, bitcast=True)
    elif PER_EXPERT:    # FP8 E4M3 scale over the F32 global scale of the group's expert
        s = tl.div_rn(_e4m3_to_f32(sb), tl.load(g_ptr + q // EXPERT_GROUPS, mask=gmask, other=1))
    else:
        s = tl.div_rn(_e4m3_to_f32(sb), tl.load(g_ptr))
    lane = tl.arange(0, 2)
    code = (byte[:, :, None] >> (lane[None, None, :] * 4)) & 0xF            # low nibble first
    w = _round(_round(_e2m1_to_f32(code) * s[:, None, None], 2, NATIVE), 0, NATIVE)   # F32 product, then BF16
    w = _round(w, OUT_KIND, NATIVE)
    _store(out_ptr + at[:, :, None] * 2 + lane[None, None, :], w, gmask[:, None, None], OUT_KIND, NATIVE)


def dequantize_fp8(weight: torch.Tensor, scale: torch.Tensor, *, strategy: str, group_size: int | None = None,
                   block_structure: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense [..., out, in] from F8_E4M3 `weight` and its float scale (tensor: [1] or [E, 1];
    channel [..., out, 1]; group [..., out, G]; block [..., ceil(out/bh), ceil(in/bw)]).
    The result has the scale dtype unless `dtype` is given (then rounded once more)."""
    out_dtype = dtype or scale.dtype
    out = torch.empty(weight.shape, dtype=out_dtype, device=weight.device)
    if out.numel() == 0:
        return out
    q = weight.contiguous().view(torch.uint8)
    s = scale.contiguous()
    rows, cols = weight.shape[-2:]
    total = weight.numel() // cols
    bh, cdiv, exp_stride, row_stride = _fp8_scale_walk(strategy, rows, cols, s, group_size, block_structure)
    block_c = _row_block(cols, FLAT_BLOCK)
    block_r = max(1, FLAT_BLOCK // block_c)
    _fp8_rows_kernel[(triton.cdiv(total, block_r), triton.cdiv(cols, block_c))](
        q, _bits_view(s), _bits_view(out), total, cols, rows, bh, exp_stride, row_stride, CDIV=cdiv,
        SCALE_KIND=_KIND[s.dtype], OUT_KIND=_KIND[out_dtype], NATIVE=not _INTERPRET, HW=_hw_fp8(q.device),
        BLOCK_R=block_r, BLOCK_C=block_c)
    return out


def _fp8_scale_walk(strategy: str, rows: int, cols: int, s: torch.Tensor, group_size: int | None,
                    block_structure: tuple[int, int] | None) -> tuple[int, int, int, int]:
    """(BH, CDIV, EXP_STRIDE, ROW_STRIDE) of _fp8_rows_kernel for a scale layout."""
    if strategy == "block":
        nbr, nbc = s.shape[-2:]
        return block_structure[0], block_structure[1], nbr * nbc, nbc
    if strategy == "group":
        groups = s.shape[-1]
        return 1, group_size, rows * groups, groups
    if strategy == "channel":
        return 1, 0, rows, 1
    return 1, 0, int(s.numel() > 1), 0        # tensor: one scale, or one per expert


def _row_block(n: int, cap: int) -> int:
    """Lanes per program along a row of n: the largest power of two <= cap dividing n (no
    masked tail) if it is at least cap/8, else the power of two covering n, capped."""
    b = min(cap, triton.next_power_of_2(n))
    for d in (b, b // 2, b // 4, b // 8):
        if d >= cap // 8 and n % d == 0:
            return d
    return b


def _hw_fp8(device: torch.device) -> bool:
    return not _INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, *,
                   group_size: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense BF16 [..., out, in] from U8 `weight_packed` [..., out, in/2] and group scales:
    F8_E4M3 with an F32 global scale ([1] or [E, 1]) for NVFP4, U8 E8M0 without one for MXFP4.
    `group_size` is a power of two dividing in; `dtype` casts the BF16 result."""
    if group_size & (group_size - 1) or group_size < 2:
        raise ValueError(f"group_size must be a power of two, got {group_size}")
    if (2 * packed.shape[-1]) % group_size:
        raise ValueError(f"in_features {2 * packed.shape[-1]} is not a multiple of group_size {group_size}")
    out_dtype = dtype or torch.bfloat16
    out = torch.empty(*packed.shape[:-1], 2 * packed.shape[-1], dtype=out_dtype, device=packed.device)
    if out.numel() == 0:
        return out
    p = packed.contiguous()
    s = scale.contiguous().view(torch.uint8)
    mx = global_scale is None
    g = p if mx else global_scale.to(torch.float32).contiguous().reshape(-1)
    gb = group_size // 2
    ng = p.numel() // gb
    per_expert = not mx and g.numel() > 1
    block_g = FLAT_BLOCK // gb
    _fp4_kernel[(triton.cdiv(ng, block_g),)](
        p, s, g, _bits_view(out), ng, ng // g.numel() if per_expert else 1, GB=gb, MX=mx, PER_EXPERT=per_expert,
        OUT_KIND=_KIND[out_dtype], NATIVE=not _INTERPRET, BLOCK_G=block_g)
    return out
