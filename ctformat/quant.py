"""Scales, zero points and g_idx: quantize and dequantize bit-exactly as compressed-tensors
does (spec §5), plus compress/decompress of one module's pack-quantized tensor set.

All arithmetic happens in torch with the dtypes compressed-tensors uses (the weight dtype
for quantize, the scale dtype for dequantize), so results match it bit for bit on any
device torch runs on.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from .backend import use_triton
from .errors import TensorError, UnsupportedError
from .dtypes import torch_dtype
from .pack import cpu_map, pack_block, pack_to_int32, unpack_block, unpack_from_int32
from .scheme import QuantScheme, Strategy, int_range, packed_width
from .spec import CROSS_WORD, FLOAT_DTYPES

__all__ = ["calculate_qparams", "minmax_qparams", "quantize", "dequantize", "compress", "decompress"]


def _check_supported(scheme: QuantScheme) -> None:
    if scheme.strategy not in (Strategy.GROUP, Strategy.CHANNEL, Strategy.TENSOR):
        raise UnsupportedError(f"strategy {scheme.strategy.value!r} is not supported for pack-quantized weights")
    if scheme.scale_dtype is not None and scheme.scale_dtype not in FLOAT_DTYPES:
        raise UnsupportedError(f"scale_dtype {scheme.scale_dtype} is not a float dtype: pack-quantized scales are "
                               "float16, bfloat16 or float32")


def _grouped(x: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """[..., in] -> [..., groups, group_size] for group strategy; unchanged otherwise."""
    if scheme.strategy is not Strategy.GROUP:
        return x
    if x.shape[-1] % scheme.group_size:
        raise ValueError(f"in_features {x.shape[-1]} is not a multiple of group_size {scheme.group_size}")
    return x.unflatten(-1, (-1, scheme.group_size))


def _per_column(p: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """Scale/zero point [..., groups] -> [..., in]: column j uses group g_idx[j]."""
    return p.index_select(-1, g_idx.to(device=p.device, dtype=torch.long))


def _aligned(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, g_idx: torch.Tensor | None,
             scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x, scale and zero point shaped to broadcast element by element: per column through
    g_idx, else [..., groups, group_size] against [..., groups, 1] for group strategy."""
    if g_idx is not None:
        return x, _per_column(scale, g_idx), None if zero_point is None else _per_column(zero_point, g_idx)
    if scheme.strategy is not Strategy.GROUP:
        return x, scale, zero_point
    return _grouped(x, scheme), scale.unsqueeze(-1), None if zero_point is None else zero_point.unsqueeze(-1)


def calculate_qparams(weight: torch.Tensor, scheme: QuantScheme) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Min-max scale and zero point of a weight, reduced per tensor / row / group as
    llm-compressor's observers do (per tensor: min/max of shape [1]), in the weight dtype."""
    _check_supported(scheme)
    if scheme.strategy is Strategy.TENSOR:
        lo, hi = weight.amin().reshape(1), weight.amax().reshape(1)
    else:
        x = _grouped(weight, scheme)
        keep = scheme.strategy is Strategy.CHANNEL
        lo, hi = x.amin(-1, keepdim=keep), x.amax(-1, keepdim=keep)
    return minmax_qparams(lo, hi, scheme)


def minmax_qparams(min_vals: torch.Tensor, max_vals: torch.Tensor, scheme: QuantScheme
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point from observed min/max values of any shape, step for step as
    compressed-tensors' calculate_qparams: every step runs in the min/max dtype, except that
    0-d min/max (CT's own per-tensor path) give a 0-d quotient that torch promotes against the
    0-d float32 q_min, so the zero point is computed in float32 (spec §5). 0-d results come
    back with shape [1], as in CT."""
    _check_supported(scheme)
    lo = torch.min(min_vals, torch.zeros_like(min_vals))     # 0 must be representable
    hi = torch.max(max_vals, torch.zeros_like(max_vals))
    qmin, qmax = (torch.tensor(float(v), device=lo.device) for v in int_range(scheme.num_bits))
    bit_range = qmax - qmin
    if scheme.symmetric:
        absmax = torch.max(torch.abs(lo), torch.abs(hi))
        scale = absmax / (bit_range.to(absmax.dtype) / 2)
        zero_point = None
    else:
        scale = (hi - lo) / bit_range.to(hi.dtype)
        zero_point = torch.clamp(qmin - lo / scale, qmin, qmax)
    eps_dtype = scale.dtype
    if scheme.scale_dtype is not None:   # rounded through scale_dtype, kept in the weight dtype
        eps_dtype = torch_dtype(scheme.scale_dtype)
        info = torch.finfo(eps_dtype)
        scale = torch.clamp(scale, info.min, info.max).to(eps_dtype).to(scale.dtype)
    scale = torch.where(scale == 0, torch.tensor(torch.finfo(eps_dtype).eps, dtype=scale.dtype,
                                                 device=scale.device), scale)
    if zero_point is not None:
        zero_point = torch.round(torch.clamp(zero_point, -128, 127)).to(torch.int8)
    if scale.ndim == 0:
        scale = scale.reshape(1)
        zero_point = None if zero_point is None else zero_point.reshape(1)
    return scale.contiguous(), None if zero_point is None else zero_point.contiguous()


def quantize(weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor | None = None,
             zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight -> (int8 values, scale, zero point), round half to even in the weight dtype."""
    _check_supported(scheme)
    if scale is None:
        scale, zero_point = calculate_qparams(weight, scheme)
    if _by_rows(weight, scale, zero_point):
        q = torch.empty(weight.shape, dtype=torch.int8)
        _row_blocks(lambda x, s, z, out: out.copy_(_quantized(x, s, z, g_idx, scheme)), weight, scale, zero_point, q)
    else:
        q = _quantized(weight, scale, zero_point, g_idx, scheme).to(torch.int8)
    # contiguous: a transposed weight would otherwise give views (safetensors refuses them)
    return q.contiguous(), scale.contiguous(), None if zero_point is None else zero_point.contiguous()


def _quantized(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
               g_idx: torch.Tensor | None, scheme: QuantScheme) -> torch.Tensor:
    """round(clamp(weight / scale + zero point)) in the weight dtype, shaped as weight."""
    qmin, qmax = (torch.tensor(float(v), device=weight.device) for v in int_range(scheme.num_bits))
    x, s, z = _aligned(weight, scale, zero_point, g_idx, scheme)
    scaled = x / s
    if z is not None:
        scaled += z.to(x.dtype)
    return torch.round(torch.clamp(scaled, qmin, qmax)).reshape(weight.shape)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               g_idx: torch.Tensor | None = None, *, scheme: QuantScheme,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zero_point) * scale, computed in the scale dtype, then cast to `dtype`."""
    _check_supported(scheme)
    if _by_rows(q, scale, zero_point):
        w = torch.empty(q.shape, dtype=dtype or scale.dtype)
        _row_blocks(lambda x, s, z, out: _dequantized(x, s, z, g_idx, scheme, out), q, scale, zero_point, w)
        return w
    w = _dequantized(q, scale, zero_point, g_idx, scheme)
    return (w if dtype is None or dtype == w.dtype else w.to(dtype)).contiguous()


def _dequantized(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 g_idx: torch.Tensor | None, scheme: QuantScheme, out: torch.Tensor | None = None) -> torch.Tensor:
    """(q - zero point) * scale in the scale dtype, shaped as q; written into `out` (a
    contiguous tensor of q's shape) when given, through a temporary unless it has the scale dtype."""
    x, s, z = _aligned(q, scale, zero_point, g_idx, scheme)
    direct = out is not None and out.dtype == s.dtype
    w = out.view(x.shape).copy_(x) if direct else x.to(s.dtype)
    if z is not None:
        w -= z.to(s.dtype)
    w *= s
    if out is None:
        return w.reshape(q.shape)
    if not direct:
        out.copy_(w.view(out.shape))
    return out


# -- CPU row blocks --------------------------------------------------------------------------
# On the CPU every value's result depends only on its row's scale and zero point, so the work
# goes by blocks of whole rows (about _ROW_BLOCK_ELEMENTS values, a core's L2 cache) on
# pack.cpu_map's workers, each running torch on one thread: the same ops on fewer values, so
# the same bits, without whole-tensor temporaries or thread barriers (pack.py, "the CPU path").

def _by_rows(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
    """Whether x goes by row blocks: a CPU tensor (no autograd) whose scale and zero point
    hold one row per row of x, or one value for the whole tensor."""
    return x.device.type == "cpu" and not x.requires_grad and _row_params(x.shape, scale, zero_point)


def _row_params(shape: tuple[int, ...], scale: torch.Tensor, zero_point: torch.Tensor | None) -> bool:
    if len(shape) < 2 or 0 in shape:
        return False
    return all(p is None or (not p.requires_grad and (p.numel() == 1 or (p.ndim == len(shape) and
                                                                        p.shape[:-1] == tuple(shape[:-1]))))
               for p in (scale, zero_point))


def _row_blocks(fn, x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                out: torch.Tensor, n: int | None = None) -> None:
    """fn(x rows, scale rows, zero point rows, out rows) for every block of rows of x, whose
    rows hold n values each (x's own row length unless given)."""
    x2 = x.reshape(-1, x.shape[-1])
    out2 = out.view(x2.shape[0], -1)
    s2, z2 = (p if p is None or p.numel() == 1 else p.reshape(x2.shape[0], -1) for p in (scale, zero_point))
    step = max(1, _ROW_BLOCK_ELEMENTS // (n or x.shape[-1]))

    def rows(p, r):
        return p if p is None or p.numel() == 1 else p[r:r + step]

    cpu_map(lambda r: fn(x2[r:r + step], rows(s2, r), rows(z2, r), out2[r:r + step]),
            range(0, x2.shape[0], step), torch_ops=True)


def compress(weight: torch.Tensor, scheme: QuantScheme, *, scale: torch.Tensor | None = None,
             zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
             layout: str = CROSS_WORD, packed_zero_point: bool = True) -> dict[str, torch.Tensor]:
    """One module's pack-quantized tensors, keyed by local name (weight_packed, ...).

    `packed_zero_point=False` writes the pre-0.9.4 form (I8 [out, groups]); `layout` picks
    the word layout of 3/5/6/7-bit values (spec §3.3).
    """
    _check_supported(scheme)
    if scale is None:
        scale, zero_point = calculate_qparams(weight, scheme)
    if _by_rows(weight, scale, zero_point):      # quantize and pack each block while it is in cache
        packed = _compress_rows(weight, scale, zero_point, g_idx, scheme, layout)
    else:
        q, scale, zero_point = quantize(weight, scheme, scale, zero_point, g_idx)
        packed = pack_to_int32(q, scheme.num_bits, layout=layout)
    scale = scale.contiguous()
    zero_point = None if zero_point is None else zero_point.contiguous()
    out = {"weight_packed": packed,
           "weight_scale": scale,
           "weight_shape": torch.tensor(weight.shape, dtype=torch.int64)}
    if not scheme.symmetric:
        if packed_zero_point and scheme.strategy in (Strategy.GROUP, Strategy.CHANNEL):
            out["weight_zero_point"] = pack_to_int32(zero_point, scheme.num_bits, packed_dim=0, layout=layout)
        else:
            out["weight_zero_point"] = zero_point.to(torch.int8).contiguous()
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def decompress(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = CROSS_WORD,
               dtype: torch.dtype | None = None, kernel: str = "auto") -> torch.Tensor:
    """Dense weight of one module from its pack-quantized tensors (local names).

    kernel: "torch" (any device, the reference), "triton" (the fused kernel: CUDA, or the
    CPU under TRITON_INTERPRET=1), or "auto" (triton for CUDA tensors when it can, else torch).
    Both give the same bits. Meta tensors give an empty meta weight of the shape and dtype
    compressed-tensors gives (`_meta_shape`).
    """
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    zp = tensors.get("weight_zero_point")
    if zp is not None and zp.dtype not in (torch.int32, torch.int8):
        raise TensorError(f"weight_zero_point dtype {zp.dtype} is neither int32 nor int8", rule="TEN-06")
    if packed.device.type == "meta":     # a model built without memory: shape and dtype only
        _check_supported(scheme)
        shape = _meta_shape(packed, scale, tensors["weight_shape"], scheme, layout)
        return torch.empty(shape, dtype=dtype or scale.dtype, device="meta")
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    g_idx = tensors.get("weight_g_idx")
    if g_idx is not None and g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= scale.shape[-1]):
        raise TensorError(f"weight_g_idx spans [{int(g_idx.min())}, {int(g_idx.max())}], outside "
                          f"[0, {scale.shape[-1]})", rule="DATA-03", where="weight_g_idx")
    if use_triton(kernel, packed, fits=scheme.num_bits in (1, 2, 4, 8), what=f"{scheme.num_bits}-bit values"):
        # the kernel reads packed zero points itself
        from .kernels import dequantize_packed
        _check_supported(scheme)
        gs = scheme.group_size if scheme.strategy is Strategy.GROUP else shape[-1]
        if scheme.strategy is Strategy.GROUP and shape[-1] % gs:
            raise ValueError(f"in_features {shape[-1]} is not a multiple of group_size {gs}")
        return dequantize_packed(packed, scale, zp, g_idx, num_bits=scheme.num_bits, in_features=shape[-1],
                                 group_size=gs, dtype=dtype)
    if zp is not None and zp.dtype == torch.int32:     # packed along dim 0 (CT >= 0.9.4)
        zp = unpack_from_int32(zp, scheme.num_bits, (*shape[:-1], scale.shape[-1]), packed_dim=0, layout=layout)
    if packed.device.type == "cpu" and _row_params((*packed.shape[:-1], shape[-1]), scale, zp):
        return _decompress_rows(packed, scale, zp, g_idx, scheme, layout, dtype, shape)
    q = unpack_from_int32(packed, scheme.num_bits, shape, layout=layout)
    return dequantize(q, scale, zp, g_idx, scheme=scheme, dtype=dtype)


def _compress_rows(weight: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                   g_idx: torch.Tensor | None, scheme: QuantScheme, layout: str) -> torch.Tensor:
    """weight_packed of a CPU weight, quantized and packed block by block."""
    words = packed_width(weight.shape[-1], scheme.num_bits, layout)
    packed = torch.empty(*weight.shape[:-1], words, dtype=torch.int32)

    def block(x, s, z, out):
        q = _quantized(x, s, z, g_idx, scheme).to(torch.int8)     # in range: clamped to it
        pack_block(q.numpy(), out.numpy().view(np.uint8), scheme.num_bits, layout)

    _row_blocks(block, weight, scale, zero_point, packed)
    return packed


def _decompress_rows(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                     g_idx: torch.Tensor | None, scheme: QuantScheme, layout: str, dtype: torch.dtype | None,
                     shape: tuple[int, ...]) -> torch.Tensor:
    """The dense weight of CPU tensors, unpacked and dequantized block by block."""
    n = shape[-1]
    out = torch.empty(*packed.shape[:-1], n, dtype=dtype or scale.dtype)

    def block(words, s, z, out_rows):
        q = np.empty((words.shape[0], n), dtype=np.int8)
        unpack_block(words.numpy().view(np.uint8), q, scheme.num_bits, layout)
        _dequantized(torch.from_numpy(q), s, z, g_idx, scheme, out_rows)

    _row_blocks(block, packed, scale, zero_point, out, n=n)
    return out.reshape(shape)


def _meta_shape(packed: torch.Tensor, scale: torch.Tensor, weight_shape: torch.Tensor, scheme: QuantScheme,
                layout: str) -> tuple[int, ...]:
    """The dense shape of meta tensors: weight_shape when it has data; else as compressed-tensors
    works it out, in_features = groups x group_size, or (channel, tensor) the most values the
    packed width holds, which exceeds the true in_features by less than one word's worth."""
    if weight_shape.device.type != "meta":
        return tuple(int(v) for v in weight_shape.tolist())
    words = packed.shape[-1]
    if scheme.strategy is Strategy.GROUP:
        n = scale.shape[-1] * scheme.group_size
    elif layout == CROSS_WORD:
        n = words * 32 // scheme.num_bits
    else:
        n = words * (32 // scheme.num_bits)
    return (*packed.shape[:-1], n)


_ROW_BLOCK_ELEMENTS = 1 << 18     # values per CPU row block (512 KiB of bf16): within a core's L2 cache
