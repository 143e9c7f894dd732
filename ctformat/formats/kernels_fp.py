"""Triton dequantization of the float formats (spec/formats.md §3.2, §4.2): FP8 E4M3 weights with
tensor/channel/group scales (flat kernel) or block scales (tiled kernel), and FP4 E2M1 weights
with NVFP4 (FP8 scale / F32 global scale) or MXFP4 (E8M0) group scales. Imported only where it
runs: on CUDA, or on the CPU under TRITON_INTERPRET=1.

Same bits as the torch path (numerics.dequantize), by construction: E4M3, E2M1 and E8M0 values
are decoded from their bits with integer operations (exact); an FP8 value (4 significant bits)
times a BF16/F16 scale (8/11 bits) is exact in F32, so rounding the F32 product once to the
scale dtype is what torch computes; FP4 values (2 bits) times an F32 scale round once in F32, as
torch's F32 product does, then once to BF16. NaN payloads are not part of the format: NaNs land
on the same elements, their bits may differ.

Bandwidth: every program reads each stored byte once (contiguous, vectorizable) and writes the
values it expands to as contiguous runs; scale indices come from the flat index by one shift or
division, so scales stay in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..kernels import _INTERPRET, _KIND, _bits_view, _round

__all__ = ["dequantize_fp8", "dequantize_fp4"]

FLAT_BLOCK = 2048        # values (FP8) or bytes (FP4) per program of the flat kernels
TILE = (16, 256)         # rows x columns per program of the FP8 block kernel


@triton.jit
def _e4m3_to_f32(b):
    """E4M3 byte (int32 0..255) -> its exact F32 value; 0x7F/0xFF -> NaN."""
    sign = (b >> 7) << 31
    e = (b >> 3) & 0xF
    m = b & 0x7
    normal = (sign | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125                      # m * 2^-9
    sub = tl.where(sign != 0, -sub, sub)
    v = tl.where(e == 0, sub, normal)
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
def _fp8_flat_kernel(q_ptr, s_ptr, out_ptr, N, SPAN, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                     NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    # value i uses scale i // SPAN: SPAN = in (channel), group_size (group), out*in (tensor,
    # per expert) or everything (one scale)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < N
    b = tl.load(q_ptr + i, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFF
    s = _load_scale(s_ptr, i // SPAN, mask, SCALE_KIND, NATIVE)
    w = _round(_round(_e4m3_to_f32(b) * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
    _store(out_ptr + i, w, mask, OUT_KIND, NATIVE)


@triton.jit
def _fp8_block_kernel(q_ptr, s_ptr, out_ptr, ROWS, COLS, TOTAL_ROWS, NBR, NBC,
                      BH: tl.constexpr, BW: tl.constexpr, SCALE_KIND: tl.constexpr, OUT_KIND: tl.constexpr,
                      NATIVE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    # rows of all experts stacked; row r is row r % ROWS of expert r // ROWS, whose scales are
    # [NBR, NBC]; blocks at the right and bottom edges may be partial
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r < TOTAL_ROWS)[:, None] & (c < COLS)[None, :]
    at = r[:, None] * COLS + c[None, :]
    b = tl.load(q_ptr + at, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFF
    srow = (r // ROWS) * NBR + (r % ROWS) // BH
    s = _load_scale(s_ptr, srow[:, None] * NBC + (c // BW)[None, :], mask, SCALE_KIND, NATIVE)
    w = _round(_round(_e4m3_to_f32(b) * s, SCALE_KIND, NATIVE), OUT_KIND, NATIVE)
    _store(out_ptr + at, w, mask, OUT_KIND, NATIVE)


@triton.jit
def _e2m1_to_f32(code):
    """4-bit E2M1 code (int32) -> its exact F32 value; code 8 is -0.0."""
    idx = code & 0x7
    mag = tl.where(idx >= 2, (((idx >> 1) + 126) << 23) | ((idx & 1) << 22), tl.where(idx == 1, 126 << 23, 0))
    return (mag | ((code >> 3) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _fp4_kernel(p_ptr, s_ptr, g_ptr, out_ptr, NB, GSHIFT, EXPERT_BYTES, G_STRIDE,
                MX: tl.constexpr, OUT_KIND: tl.constexpr, NATIVE: tl.constexpr, BLOCK: tl.constexpr):
    # byte i holds values 2i (low nibble) and 2i+1; a group of 2**(GSHIFT+1) values shares scale
    # i >> GSHIFT (rows hold whole groups). A program writes its 2*BLOCK values as one run.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < NB
    byte = tl.load(p_ptr + i, mask=mask, other=0, eviction_policy="evict_first").to(tl.int32) & 0xFF
    sb = tl.load(s_ptr + (i >> GSHIFT), mask=mask, other=0).to(tl.int32) & 0xFF
    if MX:      # E8M0: 2^(e-127) exactly (e = 0: 2^-127, e = 255: +inf, as the BF16 decode gives)
        s = tl.where(sb == 0, 1 << 22, sb << 23).to(tl.float32, bitcast=True)
    else:       # FP8 E4M3 scale over the F32 global scale of its expert
        g = tl.load(g_ptr + (i // EXPERT_BYTES) * G_STRIDE, mask=mask, other=1)
        s = tl.div_rn(_e4m3_to_f32(sb), g)
    lane = tl.arange(0, 2)
    code = (byte[:, None] >> (lane[None, :] * 4)) & 0xF
    w = _round(_round(_e2m1_to_f32(code) * s[:, None], 2, NATIVE), 0, NATIVE)     # F32 product, then BF16
    w = _round(w, OUT_KIND, NATIVE)
    _store(out_ptr + i[:, None] * 2 + lane[None, :], w, mask[:, None], OUT_KIND, NATIVE)


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
    kinds = dict(SCALE_KIND=_KIND[s.dtype], OUT_KIND=_KIND[out_dtype], NATIVE=not _INTERPRET)
    if strategy == "block":
        bh, bw = block_structure
        total = weight.numel() // cols
        grid = (triton.cdiv(total, TILE[0]), triton.cdiv(cols, TILE[1]))
        _fp8_block_kernel[grid](q, _bits_view(s), _bits_view(out), rows, cols, total, -(-rows // bh), -(-cols // bw),
                                BH=bh, BW=bw, BLOCK_R=TILE[0], BLOCK_C=TILE[1], **kinds)
        return out
    span = {"channel": cols, "group": group_size, "tensor": rows * cols if s.numel() > 1 else weight.numel()}[strategy]
    n = weight.numel()
    _fp8_flat_kernel[(triton.cdiv(n, FLAT_BLOCK),)](q, _bits_view(s), _bits_view(out), n, span, BLOCK=FLAT_BLOCK,
                                                    **kinds)
    return out


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
    nb = p.numel()
    per_expert = nb if mx or g.numel() == 1 else nb // g.numel()
    _fp4_kernel[(triton.cdiv(nb, FLAT_BLOCK),)](
        p, s, g, _bits_view(out), nb, (group_size // 2).bit_length() - 1, per_expert, 0 if mx or g.numel() == 1 else 1,
        MX=mx, OUT_KIND=_KIND[out_dtype], NATIVE=not _INTERPRET, BLOCK=FLAT_BLOCK)
    return out
