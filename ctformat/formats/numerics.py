"""The arithmetic of every non-packed compressed-tensors format (spec/formats.md §2-§5), in torch.

Each function follows the dtypes compressed-tensors 0.20's eager path uses (its
quantization/lifecycle/forward*.py, quantization/utils/helpers.py), so results match it bit for
bit; tensors may carry leading (expert) dimensions. The format modules call these; nothing here
knows tensor names.
"""
from __future__ import annotations

import torch

from ..dtypes import torch_dtype
from ..scheme import QuantScheme, Strategy

__all__ = ["E2M1", "dequantize", "quantize", "fake_quantize", "qparams", "global_scale",
           "round_fp4", "pack_fp4", "unpack_fp4", "e8m0_to_bf16", "bf16_to_e8m0", "observe"]

# E2M1 magnitudes by 3-bit index (spec/formats.md §2.2).
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
FP8_MAX, FP4_MAX = 448.0, 6.0
_MX_OFFSET = {4: 2, 6: 2, 8: 8}      # floor(log2(max of the element type))


# -- broadcasting: scales against values, per strategy --------------------------------------
def _per_tensor(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A per-tensor quantity ([1], or [E, 1] for stacked experts) shaped to broadcast against x."""
    lead = t.numel()
    if lead == 1:
        return t.reshape(1)
    return t.reshape(lead, *([1] * (x.ndim - 1)))


def _blocked(x: torch.Tensor, args: QuantScheme) -> torch.Tensor:
    """[..., rows, cols] zero-padded to whole blocks, viewed [..., nbr, bh, nbc, bw]."""
    bh, bw = args.block_structure
    rows, cols = x.shape[-2:]
    pr, pc = -rows % bh, -cols % bw
    if pr or pc:
        x = torch.nn.functional.pad(x, (0, pc, 0, pr))
    return x.unflatten(-1, (-1, bw)).unflatten(-3, (-1, bh))


def _unblocked(y: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    y = y.flatten(-2).flatten(-3, -2)
    return y[..., : shape[-2], : shape[-1]]


def _apply(x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, args: QuantScheme, op,
           out_dtype: torch.dtype | None) -> torch.Tensor:
    """Run op(x', scale', zp') on views where scales broadcast element by element, as
    compressed-tensors' _process_quantization lays them out, and restore x's shape."""
    s = args.strategy
    if s is Strategy.BLOCK:
        y = op(_blocked(x, args), scale.unsqueeze(-1).unsqueeze(-3),
               None if zp is None else zp.unsqueeze(-1).unsqueeze(-3))
        return _unblocked(y, x.shape)
    if s in (Strategy.GROUP, Strategy.TENSOR_GROUP):
        if x.shape[-1] % args.group_size:
            raise ValueError(f"in_features {x.shape[-1]} is not a multiple of group_size {args.group_size}")
        if scale.ndim < 2:
            scale = scale.unsqueeze(1)
            zp = None if zp is None else zp.unsqueeze(1)
        y = op(x.unflatten(-1, (-1, args.group_size)), scale.unsqueeze(-1), None if zp is None else zp.unsqueeze(-1))
        return y.flatten(-2).to(out_dtype or x.dtype)
    if s is Strategy.TENSOR:
        scale = _per_tensor(scale, x)
        zp = None if zp is None else _per_tensor(zp, x)
    return op(x, scale, zp)


def _effective(scale: torch.Tensor, gscale: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """scale / global_scale (F32 after promotion), the global scale broadcast per expert."""
    if gscale is None:
        return scale
    g = gscale.reshape(gscale.numel(), *([1] * (scale.ndim - 1))) if gscale.numel() > 1 else gscale.reshape(1)
    return scale / g


# -- dequantize, quantize, fake quantize ----------------------------------------------------
def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantScheme, *,
               global_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(q - zp) * (scale / global_scale), computed in that scale's dtype (forward.dequantize).
    `dtype` is the group strategies' output cast (default: the scale dtype)."""
    def op(xq, s, z):
        s = _effective(s, global_scale, xq)
        w = xq.to(s.dtype, copy=True)           # a fresh tensor, so the arithmetic runs in place
        if z is not None:
            w.sub_(z.to(s.dtype))
        return w.mul_(s)
    return _apply(q, scale, zero_point, args, op, dtype or scale.dtype)


def _round_values(t: torch.Tensor, args: QuantScheme) -> torch.Tensor:
    """Clamp to the type's range and round onto its grid, staying in t's dtype."""
    lo, hi = args.q_range()
    t = torch.clamp(t, lo, hi)
    if not args.is_float:
        return torch.round(t)
    if args.num_bits == 8:
        return t.to(torch.float8_e4m3fn).to(t.dtype)
    if args.num_bits == 4:
        return round_fp4(t)
    raise NotImplementedError("FP6 values are not supported")


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantScheme, *,
             global_scale: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x -> values on the type's grid (forward.quantize); cast to `dtype` if given."""
    def op(xv, s, z):
        s = _effective(s, global_scale, xv)
        t = xv / s
        if z is not None:
            t = t + z.to(xv.dtype)
        return _round_values(t, args)
    q = _apply(x, scale, zero_point, args, op, None)
    return q if dtype is None else q.to(dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, args: QuantScheme, *,
                  global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize in one pass, as compressed-tensors' forward does at run time
    (forward_helpers._quantize_dequantize): a zero point is applied even when all zero."""
    def op(xv, s, z):
        s = _effective(s, global_scale, xv)
        t = xv / s
        if z is not None:
            t = t + z.to(xv.dtype)
        w = _round_values(t, args).to(s.dtype)
        if z is not None:
            w = w - z.to(s.dtype)
        return w * s
    return _apply(x, scale, zero_point, args, op, None)


# -- qparams (calculate_qparams, generate_gparam) ------------------------------------------
def observe(x: torch.Tensor, args: QuantScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max per scale: whole tensor (per expert), row, group or zero-padded block."""
    s = args.strategy
    if s is Strategy.TENSOR:
        flat = x.flatten(-2) if x.ndim > 2 else x.reshape(-1)
        shape = (*x.shape[:-2], 1)
        return flat.amin(-1).reshape(shape), flat.amax(-1).reshape(shape)
    if s is Strategy.CHANNEL:
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    if s in (Strategy.GROUP, Strategy.TENSOR_GROUP):
        g = x.unflatten(-1, (-1, args.group_size))
        return g.amin(-1), g.amax(-1)
    if s is Strategy.BLOCK:
        b = _blocked(x, args)
        return b.amin((-3, -1)), b.amax((-3, -1))
    raise ValueError(f"strategy {s.value} has no weight qparams")


def _round_to_dtype(t: torch.Tensor, dtype: torch.dtype, back: bool = True) -> torch.Tensor:
    """Clamp to dtype's range and cast (ints rounded half to even), optionally back."""
    if dtype.is_floating_point:
        info = torch.finfo(dtype)
        r = torch.clamp(t, info.min, info.max).to(dtype)
    else:
        info = torch.iinfo(dtype)
        r = torch.round(torch.clamp(t, info.min, info.max)).to(dtype)
    return r.to(t.dtype) if back else r


def _eps(dtype: torch.dtype) -> float:
    if dtype == torch.float8_e4m3fn:
        return 0.125
    return torch.finfo(dtype).eps if dtype.is_floating_point else 1.0


def _pow2_floor(p: torch.Tensor) -> torch.Tensor:
    """Non-negative p with its mantissa rounded to one bit, on its bits (mxfp_utils.round_to_power_2
    with E2M1's mantissa): add half of the kept bit's weight, then keep only the exponent."""
    ity, mant, expo = {torch.bfloat16: (torch.int16, 7, 8), torch.float16: (torch.int16, 10, 5),
                       torch.float32: (torch.int32, 23, 8), torch.float64: (torch.int64, 52, 11)}[p.dtype]
    v = (p.view(ity) + (1 << (mant - 2))) & (((1 << expo) - 1) << mant)
    return v.view(p.dtype)


def qparams(x: torch.Tensor, args: QuantScheme, *, global_scale: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and zero point (calculate_qparams), returned as the module holds them:
    the scale in x's dtype, the zero point in zp_dtype."""
    lo, hi = observe(x, args)
    lo, hi = torch.clamp(lo, max=0), torch.clamp(hi, min=0)
    q_min, q_max = args.q_range()
    bit_range = torch.tensor(q_max - q_min, dtype=torch.float32)
    if args.symmetric:
        p = torch.max(lo.abs(), hi.abs())
        if args.is_mx:
            scales = 127 + torch.floor(torch.log2(_pow2_floor(p))) - _MX_OFFSET[args.num_bits]
        else:
            scales = p / (bit_range.to(p.dtype) / 2)
        zp = torch.zeros(scales.shape, dtype=lo.dtype)
    else:
        if args.is_float and args.num_bits in (4, 6):
            raise NotImplementedError("asymmetric FP4/FP6 is not supported")
        scales = (hi - lo) / bit_range.to(hi.dtype)
        zp = torch.clamp(q_min - lo / scales, q_min, q_max)
    if global_scale is not None:
        scales = _per_tensor_like(global_scale, scales) * scales
    sdtype = torch_dtype(args.scale_dtype) if args.scale_dtype is not None else None
    if sdtype is not None:
        scales = _round_to_dtype(scales, sdtype)
    if args.is_mx:
        scales = (2.0 ** (scales.to(torch.int32) - 127).to(torch.float)).to(scales.dtype)
    eps = torch.tensor(_eps(sdtype if sdtype is not None else scales.dtype), dtype=scales.dtype)
    scales = torch.where(scales == 0, eps, scales)
    zp = _round_to_dtype(zp, torch_dtype(args.zero_point_dtype), back=False)
    return scales.to(x.dtype), zp


def _per_tensor_like(g: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return g.reshape(g.numel(), *([1] * (scales.ndim - 1))) if g.numel() > 1 else g.reshape(1)


def global_scale(*weights: torch.Tensor) -> torch.Tensor:
    """NVFP4 weight_global_scale of one weight, or of fused siblings together (generate_gparam):
    448 * 6 / absmax in the weight dtype, then F32 [1]; NaN or Inf give 1."""
    lo = torch.stack([w.amin() for w in weights]).amin()
    hi = torch.stack([w.amax() for w in weights]).amax()
    p = torch.max(torch.clamp(lo, max=0).abs(), torch.clamp(hi, min=0).abs())
    p = torch.clamp(p, min=torch.finfo(p.dtype).tiny)
    g = FP8_MAX * FP4_MAX / p
    return torch.nan_to_num(g, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


# -- FP4 E2M1 and E8M0 ----------------------------------------------------------------------
def round_fp4(t: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 value, ties to even, sign from torch.sign (fp4_utils.cast_to_fp4)."""
    a = t.abs()
    idx = ((a > 0.25).to(torch.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75) + (a > 2.5) + (a >= 3.5) + (a > 5.0))
    mag = torch.tensor(E2M1, dtype=t.dtype, device=t.device)[idx.long()]
    return mag * torch.sign(t)


def pack_fp4(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values [..., n] (n even) -> U8 [..., n/2], column 2k in the low nibble of byte k."""
    if values.shape[-1] % 2:
        raise ValueError(f"FP4 packing needs an even number of columns, got {values.shape[-1]}")
    code = torch.signbit(values).to(torch.uint8) << 3
    code |= torch.bucketize(values.abs().float(), torch.tensor(E2M1[1:], device=values.device) - 0.25).to(torch.uint8)
    pair = code.unflatten(-1, (-1, 2))
    return pair[..., 0] | (pair[..., 1] << 4)


def unpack_fp4(packed: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """U8 [..., n/2] -> E2M1 values [..., n] in dtype; code 8 is -0.0."""
    lut = torch.tensor(E2M1 + tuple(-v for v in E2M1), dtype=torch.float32, device=packed.device).to(dtype)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return lut[codes.long()]


def e8m0_to_bf16(e: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> 2^(e-127) as BF16 (mx_utils.decompress_mx_scale): exact, 255 is +inf."""
    e = e.to(torch.int32)
    bits = torch.where(e == 0, torch.tensor(0x0040, dtype=torch.int32, device=e.device), e << 7)
    return bits.to(torch.int16).view(torch.bfloat16)


def bf16_to_e8m0(scale: torch.Tensor) -> torch.Tensor:
    """Float scale -> E8M0 byte 127 + floor(log2(s)) (mx_utils.compress_mx_scale)."""
    return (127 + torch.floor(torch.log2(scale)).to(torch.int32)).to(torch.uint8)
