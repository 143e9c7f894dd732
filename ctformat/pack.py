"""The pack-quantized bit layout: signed intB values <-> int32 words (spec §3).

Only bits move here; scales and zero points are quant.py's business. Every function runs
on whatever device its tensor is on. Words are built byte by byte and viewed as int32,
which is exact because safetensors, x86 and CUDA are all little-endian.
"""
from __future__ import annotations

import sys

import torch

from .scheme import int_range, packed_width
from .spec import CROSS_WORD, PADDED

__all__ = ["packed_width", "pack_to_int32", "unpack_from_int32"]

if sys.byteorder != "little":  # pragma: no cover - no big-endian torch build in sight
    raise ImportError("ctformat.pack assumes a little-endian host")


def pack_to_int32(value: torch.Tensor, num_bits: int, packed_dim: int = 1, *,
                  layout: str = CROSS_WORD) -> torch.Tensor:
    """Pack int8 values in [-2^(b-1), 2^(b-1)) into int32 words along `packed_dim`.

    `packed_dim` counts within the trailing 2-D matrix, so a stacked [E, out, in] tensor
    packs each expert separately, as compressed-tensors does.
    """
    _check_bits(num_bits)
    if value.dtype != torch.int8:
        raise ValueError(f"pack_to_int32 takes torch.int8 values, got {value.dtype}")
    if value.ndim < 1 or (packed_dim == 0 and value.ndim < 2) or packed_dim not in (0, 1):
        raise ValueError(f"packed_dim must be 0 or 1 of a matrix, got {packed_dim} for ndim {value.ndim}")
    lo, hi = int_range(num_bits)
    if value.numel():
        vmin, vmax = torch.aminmax(value)
        if vmin < lo or vmax > hi:
            raise ValueError(f"values span [{int(vmin)}, {int(vmax)}], outside the int{num_bits} "
                             f"range [{lo}, {hi}]")
    rows = value.transpose(-1, -2) if packed_dim == 0 else value
    if rows.numel() == 0:
        words = torch.zeros(*rows.shape[:-1], packed_width(rows.shape[-1], num_bits, layout), dtype=torch.int32,
                            device=value.device)
        return words.transpose(-1, -2).contiguous() if packed_dim == 0 else words
    words = _pack_rows(_rowmajor(rows).view(torch.uint8), num_bits, layout)
    return (words.transpose(-1, -2) if packed_dim == 0 else words).contiguous()   # savable as it is


def unpack_from_int32(value: torch.Tensor, num_bits: int, shape, packed_dim: int = 1, *,
                      layout: str = CROSS_WORD) -> torch.Tensor:
    """Inverse of pack_to_int32; `shape` is the unpacked shape (weight_shape)."""
    _check_bits(num_bits)
    if value.dtype != torch.int32:
        raise ValueError(f"unpack_from_int32 takes torch.int32 words, got {value.dtype}")
    if packed_dim not in (0, 1) or (packed_dim == 0 and value.ndim < 2):
        raise ValueError(f"packed_dim must be 0 or 1 of a matrix, got {packed_dim} for ndim {value.ndim}")
    shape = tuple(int(s) for s in shape)
    n = shape[-2] if packed_dim == 0 else shape[-1]
    words = value.transpose(-1, -2) if packed_dim == 0 else value
    need = packed_width(n, num_bits, layout)
    if words.shape[-1] != need:
        raise ValueError(f"{n} values of {num_bits} bits need {need} words ({layout} layout), "
                         f"got {words.shape[-1]}")
    if words.numel() == 0 or n == 0:
        q = torch.zeros(*words.shape[:-1], n, dtype=torch.int8, device=value.device)
    else:
        q = _unpack_rows(_rowmajor(words), num_bits, n, layout)
    return (q.transpose(-1, -2) if packed_dim == 0 else q).contiguous()


def _check_bits(num_bits: int) -> None:
    packed_width(0, num_bits)


def _rowmajor(t: torch.Tensor) -> torch.Tensor:
    # contiguous() may leave odd strides on size-1 dims, which byte views refuse
    return t.contiguous().flatten().view(t.shape)


def _pad_last(t: torch.Tensor, multiple: int, value: int = 0) -> torch.Tensor:
    extra = -t.shape[-1] % multiple
    return torch.nn.functional.pad(t, (0, extra), value=value) if extra else t


def _pack_rows(x: torch.Tensor, b: int, layout: str) -> torch.Tensor:
    """Two's-complement bytes [..., n] -> int32 words [..., packed_width(n)], padding bits zero."""
    n = x.shape[-1]
    if b == 4:
        return _pack4(_pad_last(x, 8, value=0xF8))    # 0xF8 = -8 encodes as code 0
    if b == 8:
        return _pad_last(x ^ 0x80, 4).view(torch.int32)
    # offset-binary code u = q + 2^(b-1), i.e. the sign bit flipped within b bits
    u = (x & ((1 << b) - 1)) ^ (1 << (b - 1))
    if 8 % b == 0:                       # 1, 2, 4, 8 bits: whole values per byte, both layouts
        per = 8 // b
        g = _pad_last(u, 32 // b).unflatten(-1, (-1, per))       # [..., bytes, per]
        byte = g[..., 0].clone()
        for j in range(1, per):
            byte |= g[..., j] << (j * b)
        return byte.view(torch.int32)
    if layout == PADDED:                 # 32//b values per word, low bits first
        per = 32 // b
        g = _pad_last(u, per).unflatten(-1, (-1, per)).to(torch.int32)  # [..., words, per]
        word = g[..., 0].clone()
        for j in range(1, per):
            word |= g[..., j] << (j * b)  # at most 30 bits used: never touches the sign bit
        return word
    # dense: one bit stream per row, value i at bits [i*b, i*b+b)
    shifts = torch.arange(b, device=u.device, dtype=torch.uint8)
    bits = ((_pad_last(u, 32).unsqueeze(-1) >> shifts) & 1).flatten(-2)  # [..., n32*b]
    g = bits.unflatten(-1, (-1, 8))
    byte = g[..., 0].clone()
    for j in range(1, 8):
        byte |= g[..., j] << j
    return byte.view(torch.int32)[..., : packed_width(n, b)]


# Bytes of packed data per step of the 4-bit loops. Steps keep temporaries near the cache
# (whole-tensor passes are 1.3-2x slower), and 4 MiB steps are few enough that a busy second
# core does not stall every step's thread sync (256 KiB steps ran 5-10x slower under load).
# On GPUs one step covers the tensor.
_CHUNK = 1 << 22


def _steps(numel: int, device: torch.device) -> tuple[range, int]:
    step = _CHUNK if device.type == "cpu" else max(numel, 1)
    return range(0, numel, step), step


def _pack4(x: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 8k] -> int32 [..., k]: byte j holds codes 2j (low nibble) and 2j+1."""
    flat = x.reshape(-1)
    out = torch.empty(flat.numel() // 2, dtype=torch.uint8, device=x.device)
    starts, step = _steps(out.numel(), x.device)
    for s in starts:
        pair = flat[2 * s: 2 * (s + step)]
        byte = pair[0::2] & 0x0F
        byte |= pair[1::2] << 4
        torch.bitwise_xor(byte, 0x88, out=out[s: s + step])    # +8 on both nibbles
    return out.view(torch.int32).view(*x.shape[:-1], -1)


def _unpack4(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., k] -> int8 [..., 8k], two values per byte, low nibble first."""
    flat = w.view(torch.uint8).reshape(-1)
    out = torch.empty(flat.numel() * 2, dtype=torch.int8, device=w.device)
    out16 = out.view(torch.int16)   # one int16 per packed byte: (low value, high value)
    starts, step = _steps(flat.numel(), w.device)
    for s in starts:
        x = flat[s: s + step].to(torch.int16)
        hi = x & 0xF0
        hi <<= 4
        x &= 0x0F
        x |= hi
        x += 0x7878                               # per byte: (u + 120) ^ 128 == u - 8
        torch.bitwise_xor(x, -0x7F80, out=out16[s: s + step])   # -0x7F80 == 0x8080 as int16
    return out.view(*w.shape[:-1], -1)


def _unpack_rows(w: torch.Tensor, b: int, n: int, layout: str) -> torch.Tensor:
    """int32 words [..., words] -> int8 values [..., n]."""
    offset = 1 << (b - 1)
    if b == 8:
        return (w.view(torch.uint8)[..., :n] ^ 0x80).view(torch.int8)
    if b == 4:
        q = _unpack4(w)
        return q if q.shape[-1] == n else q[..., :n].contiguous()
    mask = (1 << b) - 1
    if 8 % b == 0:
        byte = w.view(torch.uint8)
        parts = [(byte >> (j * b)) & mask for j in range(8 // b)]
        q = torch.stack(parts, dim=-1).flatten(-2)[..., :n]
        return (q.view(torch.int8) - offset)
    if layout == PADDED:
        per = 32 // b
        shifts = torch.arange(0, per * b, b, device=w.device, dtype=torch.int32)
        q = ((w.unsqueeze(-1) >> shifts) & mask).flatten(-2)[..., :n]
        return (q - offset).to(torch.int8)
    shifts = torch.arange(8, device=w.device, dtype=torch.uint8)
    bits = ((w.view(torch.uint8).unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., : n * b]
    g = bits.unflatten(-1, (n, b))
    q = g[..., 0].clone()
    for j in range(1, b):
        q |= g[..., j] << j
    return (q.view(torch.int8) - offset)
