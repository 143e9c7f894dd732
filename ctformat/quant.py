"""Scales, zero points and g_idx: quantize and dequantize bit-exactly as compressed-tensors
does (spec §5), plus compress/decompress of one module's pack-quantized tensor set.

All arithmetic happens in torch with the dtypes compressed-tensors uses (the weight dtype
for quantize, the scale dtype for dequantize), so results match it bit for bit on any
device torch runs on.
"""
from __future__ import annotations

from typing import Mapping

import torch

from .backend import use_triton
from .errors import TensorError, UnsupportedError
from .dtypes import torch_dtype
from .pack import pack_to_int32, unpack_from_int32
from .scheme import QuantScheme, Strategy, int_range
from .spec import CROSS_WORD, FLOAT_DTYPES

__all__ = ["calculate_qparams", "quantize", "dequantize", "compress", "decompress"]


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
    """Min-max scale and zero point as compressed-tensors computes them, in the weight dtype."""
    _check_supported(scheme)
    if scheme.strategy is Strategy.TENSOR:
        lo, hi = weight.amin().reshape(1), weight.amax().reshape(1)
    else:
        x = _grouped(weight, scheme)
        keep = scheme.strategy is Strategy.CHANNEL
        lo, hi = x.amin(-1, keepdim=keep), x.amax(-1, keepdim=keep)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)   # 0 must be representable
    qmin, qmax = (torch.tensor(float(v), device=weight.device) for v in int_range(scheme.num_bits))
    bit_range = (qmax - qmin).to(lo.dtype)
    if scheme.symmetric:
        scale = torch.max(lo.abs(), hi.abs()) / (bit_range / 2)
        zero_point = None
    else:
        scale = (hi - lo) / bit_range
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
    return scale, zero_point


def quantize(weight: torch.Tensor, scheme: QuantScheme, scale: torch.Tensor | None = None,
             zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """weight -> (int8 values, scale, zero point), round half to even in the weight dtype."""
    _check_supported(scheme)
    if scale is None:
        scale, zero_point = calculate_qparams(weight, scheme)
    qmin, qmax = (torch.tensor(float(v), device=weight.device) for v in int_range(scheme.num_bits))
    x, s, z = _aligned(weight, scale, zero_point, g_idx, scheme)
    scaled = x / s
    if z is not None:
        scaled += z.to(x.dtype)
    q = torch.round(torch.clamp(scaled, qmin, qmax)).to(torch.int8)
    return q.reshape(weight.shape), scale, zero_point


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
               g_idx: torch.Tensor | None = None, *, scheme: QuantScheme,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zero_point) * scale, computed in the scale dtype, then cast to `dtype`."""
    _check_supported(scheme)
    x, s, z = _aligned(q, scale, zero_point, g_idx, scheme)
    w = x.to(s.dtype)
    if z is not None:
        w -= z.to(s.dtype)
    w *= s
    w = w.reshape(q.shape)
    return w if dtype is None or dtype == w.dtype else w.to(dtype)


def compress(weight: torch.Tensor, scheme: QuantScheme, *, scale: torch.Tensor | None = None,
             zero_point: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
             layout: str = CROSS_WORD, packed_zero_point: bool = True) -> dict[str, torch.Tensor]:
    """One module's pack-quantized tensors, keyed by local name (weight_packed, ...).

    `packed_zero_point=False` writes the pre-0.9.4 form (I8 [out, groups]); `layout` picks
    the word layout of 3/5/6/7-bit values (spec §3.3).
    """
    q, scale, zero_point = quantize(weight, scheme, scale, zero_point, g_idx)
    out = {"weight_packed": pack_to_int32(q, scheme.num_bits, layout=layout),
           "weight_scale": scale,
           "weight_shape": torch.tensor(weight.shape, dtype=torch.int64)}
    if not scheme.symmetric:
        if packed_zero_point and scheme.strategy in (Strategy.GROUP, Strategy.CHANNEL):
            out["weight_zero_point"] = pack_to_int32(zero_point, scheme.num_bits, packed_dim=0, layout=layout)
        else:
            out["weight_zero_point"] = zero_point.to(torch.int8)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32)
    return out


def decompress(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme, *, layout: str = CROSS_WORD,
               dtype: torch.dtype | None = None, kernel: str = "auto") -> torch.Tensor:
    """Dense weight of one module from its pack-quantized tensors (local names).

    kernel: "torch" (any device, the reference), "triton" (the fused kernel: CUDA, or the
    CPU under TRITON_INTERPRET=1), or "auto" (triton for CUDA tensors when it can, else torch).
    Both give the same bits.
    """
    packed, scale = tensors["weight_packed"], tensors["weight_scale"]
    shape = tuple(int(v) for v in tensors["weight_shape"].tolist())
    zp = tensors.get("weight_zero_point")
    if zp is not None and zp.dtype not in (torch.int32, torch.int8):
        raise TensorError(f"weight_zero_point dtype {zp.dtype} is neither int32 nor int8", rule="TEN-06")
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
    rows = packed.numel() // max(packed.shape[-1], 1)
    if packed.device.type != "cpu" or rows * shape[-1] <= _ROW_BLOCK_ELEMENTS or scale.numel() == 1:
        q = unpack_from_int32(packed, scheme.num_bits, shape, layout=layout)
        return dequantize(q, scale, zp, g_idx, scheme=scheme, dtype=dtype)
    # Large CPU tensors go by blocks of rows into one output: temporaries stay small, so
    # peak memory is about the output itself (every row's values are independent).
    p2, s2 = packed.reshape(rows, packed.shape[-1]), scale.reshape(rows, scale.shape[-1])
    z2 = None if zp is None else zp.reshape(rows, zp.shape[-1])
    out = torch.empty(rows, shape[-1], dtype=dtype or scale.dtype)
    step = max(1, _ROW_BLOCK_ELEMENTS // shape[-1])
    for r in range(0, rows, step):
        q = unpack_from_int32(p2[r:r + step], scheme.num_bits, (min(step, rows - r), shape[-1]), layout=layout)
        out[r:r + step] = dequantize(q, s2[r:r + step], None if z2 is None else z2[r:r + step], g_idx,
                                     scheme=scheme, dtype=dtype)
    return out.reshape(shape)


_ROW_BLOCK_ELEMENTS = 1 << 23     # values per row block on the CPU (16 MiB of bf16): 2x fewer thread syncs
# than 1 << 22 for 5% more time when idle, 2.2x less time with the other core busy
