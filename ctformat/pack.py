"""The pack-quantized bit layout: signed intB values <-> int32 words (spec §3).

Only bits move here; scales and zero points are quant.py's business. Every function runs
on whatever device its tensor is on: CPU tensors by blocks on worker threads with numpy (the
CPU path, below), other devices (CUDA, meta) with torch ops on the whole tensor. Words are
built byte by byte and viewed as int32, which is exact because safetensors, x86 and CUDA are
all little-endian.
"""
from __future__ import annotations

import ctypes
import sys
import threading
from typing import Callable

import numpy as np
import torch

from .scheme import int_range, packed_width
from .spec import CROSS_WORD, PADDED

__all__ = ["packed_width", "pack_to_int32", "unpack_from_int32", "cpu_map", "pack_block", "unpack_block"]

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
    packed_width(0, num_bits, layout)
    cpu = value.device.type == "cpu"
    if value.numel() and not cpu:            # the CPU path checks its blocks as it packs them
        _check_range(*torch.aminmax(value), num_bits)
    rows = value.transpose(-1, -2) if packed_dim == 0 else value
    if rows.numel() == 0:
        words = torch.zeros(*rows.shape[:-1], packed_width(rows.shape[-1], num_bits, layout), dtype=torch.int32,
                            device=value.device)
        return words.transpose(-1, -2).contiguous() if packed_dim == 0 else words
    if cpu:
        words = _pack_cpu(_rowmajor(rows), num_bits, layout)
    else:
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
    elif value.device.type == "cpu":
        q = _unpack_cpu(_rowmajor(words), num_bits, n, layout)
    else:
        q = _unpack_rows(_rowmajor(words), num_bits, n, layout)
    return (q.transpose(-1, -2) if packed_dim == 0 else q).contiguous()


def _check_bits(num_bits: int) -> None:
    packed_width(0, num_bits)


def _check_range(vmin, vmax, num_bits: int) -> None:
    lo, hi = int_range(num_bits)
    if vmin < lo or vmax > hi:
        raise ValueError(f"values span [{int(vmin)}, {int(vmax)}], outside the int{num_bits} "
                         f"range [{lo}, {hi}]")


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


def _pack4(x: torch.Tensor) -> torch.Tensor:
    """Bytes [..., 8k] -> int32 [..., k]: byte j holds codes 2j (low nibble) and 2j+1."""
    byte = x[..., 0::2] & 0x0F
    byte |= x[..., 1::2] << 4
    return (byte ^ 0x88).view(torch.int32)      # +8 on both nibbles


def _unpack4(w: torch.Tensor) -> torch.Tensor:
    """int32 [..., k] -> int8 [..., 8k], two values per byte, low nibble first."""
    x = w.view(torch.uint8).to(torch.int16)     # one int16 per packed byte: (low value, high value)
    x |= x << 4
    x &= 0x0F0F
    x += 0x7878                                 # per byte: (u + 120) ^ 128 == u - 8
    x ^= -0x7F80                                # -0x7F80 == 0x8080 as int16
    return x.view(torch.int8)


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


# -- the CPU path ---------------------------------------------------------------------------
# CPU tensors are packed by blocks of about _CPU_STEP values, each small enough for one core's
# L2 cache, taken one at a time by torch.get_num_threads() worker threads (numpy ufuncs, which
# run on the calling thread and release the GIL). Whole-tensor torch ops, and torch ops on
# blocks, both fared badly on a shared machine: every torch op is an OpenMP region split evenly
# between the threads, so one thread descheduled by another process stalls each region, and
# block temporaries kept in the shared L3 are evicted by a process streaming memory. Here a
# descheduled worker holds up only its own block while the others take the rest, and temporaries
# stay in L2 (NOTES.md, "CPU under load").
_CPU_STEP = 1 << 18       # values per block: of 2^15..2^19, 2^18 was about the fastest, idle and loaded


def _omp_setter():
    """omp_set_num_threads of the OpenMP runtime torch loaded (into the global namespace), or None."""
    if sys.platform == "win32":
        return None
    try:
        return getattr(ctypes.CDLL(None), "omp_set_num_threads", None)
    except OSError:
        return None


# OpenMP's team size is per thread: a worker that sets its own to 1 runs torch ops on itself
# alone. torch sets a thread's size on its first use there, hence get_num_threads() first.
_omp_set_num_threads = _omp_setter()


def _serial_worker() -> None:
    torch.get_num_threads()
    _omp_set_num_threads(1)


def _workers() -> int:
    return torch.get_num_threads()        # the caller's choice (OMP_NUM_THREADS, set_num_threads)


def cpu_map(job: Callable[[int], None], starts: range, *, torch_ops: bool = False) -> None:
    """job(start) for every start, on torch.get_num_threads() threads that each take the next
    start when done with theirs. torch_ops: jobs call torch, which then runs single-threaded in
    each worker (in the calling thread, one start after another, where that cannot be set)."""
    workers = min(_workers(), len(starts))
    if workers <= 1 or (torch_ops and _omp_set_num_threads is None):
        for s in starts:
            job(s)
        return
    todo, lock, errors = iter(starts), threading.Lock(), []
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()   # thread-local modes

    def work() -> None:
        if _omp_set_num_threads is not None:
            _serial_worker()
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            while not errors:
                with lock:
                    s = next(todo, None)
                if s is None:
                    return
                try:
                    job(s)
                except BaseException as e:  # noqa: BLE001 - re-raised in the calling thread
                    errors.append(e)

    threads = [threading.Thread(target=work, name=f"ctformat-cpu-{i}", daemon=True) for i in range(workers)]
    for t in threads:
        t.start()
    try:
        for t in threads:
            t.join()
    except BaseException:           # KeyboardInterrupt: the workers stop at their next block
        errors.append(None)
        raise
    if errors:
        raise errors[0]


def _unit(num_bits: int, layout: str) -> int:
    """Values in the shortest run that fills whole words: rows of a multiple of it pack as
    one stream (no padding between them)."""
    return 32 // num_bits if layout == PADDED or 8 % num_bits == 0 else 32


def _pack_cpu(x: torch.Tensor, num_bits: int, layout: str) -> torch.Tensor:
    """int8 [..., n] (contiguous) -> int32 [..., words], by blocks on the worker threads."""
    n = x.shape[-1]
    words = packed_width(n, num_bits, layout)
    out = torch.empty(*x.shape[:-1], words, dtype=torch.int32)
    spans = []

    def block(values: np.ndarray, word_bytes: np.ndarray) -> None:
        spans.append((int(values.min()), int(values.max())))
        pack_block(values, word_bytes, num_bits, layout)

    _cpu_blocks(x.numpy().reshape(-1, n), out.numpy().view(np.uint8).reshape(-1, 4 * words), num_bits, layout,
                block)
    _check_range(min(s[0] for s in spans), max(s[1] for s in spans), num_bits)
    return out


def _unpack_cpu(w: torch.Tensor, num_bits: int, n: int, layout: str) -> torch.Tensor:
    """int32 [..., words] (contiguous) -> int8 [..., n], by blocks on the worker threads."""
    out = torch.empty(*w.shape[:-1], n, dtype=torch.int8)
    _cpu_blocks(out.numpy().reshape(-1, n), w.numpy().view(np.uint8).reshape(-1, 4 * w.shape[-1]), num_bits,
                layout, lambda values, word_bytes: unpack_block(word_bytes, values, num_bits, layout))
    return out


def _cpu_blocks(values: np.ndarray, word_bytes: np.ndarray, num_bits: int, layout: str,
                fn: Callable[[np.ndarray, np.ndarray], None]) -> None:
    """fn(values block, its words as bytes) over blocks of about _CPU_STEP values on cpu_map's
    workers: whole rows of values [rows, n], or, when rows end on a word with no padding, cuts of
    the one stream the rows then form (rows shorter than a block cost no extra calls)."""
    n = values.shape[1]
    unit = _unit(num_bits, layout)
    if n % unit:
        step = max(1, _CPU_STEP // n)
        cpu_map(lambda r: fn(values[r:r + step], word_bytes[r:r + step]), range(0, values.shape[0], step))
        return
    v, w = values.reshape(1, -1), word_bytes.reshape(1, -1)
    step = max(unit, _CPU_STEP // unit * unit)
    unit_bytes = 4 * packed_width(unit, num_bits, layout)
    cpu_map(lambda s: fn(v[:, s:s + step], w[:, s // unit * unit_bytes:(s + step) // unit * unit_bytes]),
            range(0, v.shape[1], step))


def pack_block(src: np.ndarray, dst: np.ndarray, num_bits: int, layout: str = CROSS_WORD) -> None:
    """Rows of int8 values [r, m] -> their packed words as bytes, dst [r, 4 * packed_width(m)]
    (numpy, on the calling thread; values must be in range). Padding bits are zero."""
    if num_bits == 8:
        m = src.shape[1]
        np.bitwise_xor(src.view(np.uint8), 0x80, out=dst[:, :m])
        dst[:, m:] = 0
    elif num_bits == 4:
        _pack4_block(src, dst)
    elif layout == PADDED and 8 % num_bits:
        _pack_words_block(src, dst, num_bits)
    else:
        _pack_bytes_block(src, dst, num_bits)


def unpack_block(src: np.ndarray, dst: np.ndarray, num_bits: int, layout: str = CROSS_WORD) -> None:
    """Inverse of pack_block: bytes of packed words [r, 4 * words] -> int8 values dst [r, m]."""
    if num_bits == 8:
        np.bitwise_xor(src[:, :dst.shape[1]], 0x80, out=dst.view(np.uint8))
    elif num_bits == 4:
        _unpack4_block(src, dst)
    elif layout == PADDED and 8 % num_bits:
        _unpack_words_block(src, dst, num_bits)
    else:
        _unpack_bytes_block(src, dst, num_bits)


def _padded(src: np.ndarray, width: int, fill: int) -> np.ndarray:
    if src.shape[1] == width:
        return src
    out = np.full((src.shape[0], width), fill, dtype=src.dtype)
    out[:, :src.shape[1]] = src
    return out


def _pack4_block(src: np.ndarray, dst: np.ndarray) -> None:
    # one uint16 per pair of values (low byte first): byte = low nibble | high nibble << 4, + 8 each
    v = _padded(src, 2 * dst.shape[1], -8).view(np.uint16)     # -8 encodes as code 0
    t = v >> 4
    t &= 0xF0
    lo = v & 0x0F
    t |= lo
    t ^= 0x88
    np.copyto(dst, t, casting="unsafe")


def _unpack4_block(src: np.ndarray, dst: np.ndarray) -> None:
    # one int16 per packed byte: (low value, high value); per byte (u + 120) ^ 128 == u - 8
    m = dst.shape[1]
    x = dst.view(np.int16) if m == 2 * src.shape[1] else np.empty(src.shape, dtype=np.int16)
    np.copyto(x, src)
    t = x << 4
    x |= t
    x &= 0x0F0F
    x += 0x7878
    x ^= -0x7F80                                    # 0x8080 as int16
    if m != 2 * src.shape[1]:
        dst[:] = x.view(np.int8)[:, :m]


def _pack_bytes_block(src: np.ndarray, dst: np.ndarray, b: int) -> None:
    """Cross-word (and 1/2-bit) layout: every 8 values are b bytes of one uint64, value k at
    bits [k*b, k*b + b); the row's bytes are those of its groups, cut or zero-filled to words."""
    r, m = src.shape
    groups = -(-m // 8)
    u = np.zeros((r, 8 * groups), dtype=np.uint8)
    np.add(src.view(np.uint8), 1 << (b - 1), out=u[:, :m])     # offset code q + 2^(b-1), mod 256
    acc = u[:, 0::8].astype(np.uint64)
    t = np.empty_like(acc)
    for k in range(1, 8):
        np.left_shift(u[:, k::8], np.uint64(k * b), out=t, dtype=np.uint64)
        acc |= t
    full = acc.view(np.uint8).reshape(r, groups, 8)[:, :, :b].reshape(r, groups * b)
    keep = min(dst.shape[1], groups * b)             # bytes past the words hold only padding
    dst[:, :keep] = full[:, :keep]
    dst[:, keep:] = 0


def _unpack_bytes_block(src: np.ndarray, dst: np.ndarray, b: int) -> None:
    r, m = dst.shape
    groups = -(-m // 8)
    acc = np.zeros((r, groups), dtype=np.uint64)
    keep = min(src.shape[1], groups * b)
    whole = _padded(src[:, :keep], groups * b, 0).reshape(r, groups, b)
    acc.view(np.uint8).reshape(r, groups, 8)[:, :, :b] = whole
    u = np.empty((r, 8 * groups), dtype=np.uint8)
    t = np.empty_like(acc)
    for k in range(8):
        np.right_shift(acc, np.uint64(k * b), out=t)
        t &= np.uint64((1 << b) - 1)
        np.copyto(u[:, k::8], t, casting="unsafe")
    np.subtract(u[:, :m], 1 << (b - 1), out=dst.view(np.uint8))   # mod 256: the signed value


def _pack_words_block(src: np.ndarray, dst: np.ndarray, b: int) -> None:
    """Padded layout: 32 // b values per word, low bits first, the top bits zero."""
    per = 32 // b
    r, m = src.shape
    words = dst.shape[1] // 4
    u = np.zeros((r, words * per), dtype=np.uint8)
    np.add(src.view(np.uint8), 1 << (b - 1), out=u[:, :m])
    acc = dst.view(np.uint32)
    np.copyto(acc, u[:, 0::per])
    t = np.empty_like(acc)
    for k in range(1, per):
        np.left_shift(u[:, k::per], np.uint32(k * b), out=t, dtype=np.uint32)
        acc |= t


def _unpack_words_block(src: np.ndarray, dst: np.ndarray, b: int) -> None:
    per = 32 // b
    r, m = dst.shape
    w = src.view(np.uint32)
    u = np.empty((r, w.shape[1] * per), dtype=np.uint8)
    t = np.empty_like(w)
    for k in range(per):
        np.right_shift(w, np.uint32(k * b), out=t)
        t &= np.uint32((1 << b) - 1)
        np.copyto(u[:, k::per], t, casting="unsafe")
    np.subtract(u[:, :m], 1 << (b - 1), out=dst.view(np.uint8))
