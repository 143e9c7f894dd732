"""ctformat.quant: scales, zero points, quantize/dequantize and one module's
compress/decompress, bit for bit against compressed-tensors 0.20 (FORMATS.md §5, §8).
"""
from __future__ import annotations

import pytest
import torch

from ctformat.pack import unpack_from_int32
from ctformat.quant import calculate_qparams, compress, decompress, dequantize, quantize
from ctformat.scheme import QuantScheme

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors.base import BaseCompressor  # noqa: E402
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import dequantize as ct_dequantize  # noqa: E402
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams as ct_calculate_qparams  # noqa: E402

CT_PACKED = BaseCompressor.get_value_from_registry("pack-quantized")

BITS = [2, 3, 4, 8]
STRATEGIES = {  # name -> (QuantizationArgs kwargs, weight shape [out, in])
    "group32": (dict(strategy="group", group_size=32), (24, 96)),
    "group128": (dict(strategy="group", group_size=128), (20, 256)),
    "channel": (dict(strategy="channel"), (20, 75)),        # in not a multiple of 8
    "tensor": (dict(strategy="tensor"), (13, 61)),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _args(bits, symmetric, strategy, **extra):
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, **STRATEGIES[strategy][0], **extra)


def _scheme(args: QuantizationArgs) -> QuantScheme:
    return QuantScheme.from_json(args.model_dump(), where="test")


def _weight(shape, dtype, seed=0):
    """Random weight with the edge rows observers care about: all zero, all positive,
    all negative, and one large outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    w[0] = 0
    w[1] = w[1].abs() + 0.01
    w[2] = -w[2].abs() - 0.01
    w[3, -1] = 0.9
    return w.to(dtype)


def _observed_minmax(weight, args):
    """min/max as compressed-tensors' minmax observers reduce them per strategy."""
    if args.strategy == "group":
        x = weight.unflatten(-1, (-1, args.group_size))
        return x.amin(-1), x.amax(-1)
    if args.strategy == "channel":
        return weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
    return weight.amin().reshape(1), weight.amax().reshape(1)


def _ct_qparams(weight, args):
    lo, hi = _observed_minmax(weight, args)
    return ct_calculate_qparams(lo, hi, args)


def _ct_state_dict(weight, args):
    scale, zp = _ct_qparams(weight, args)
    return {"weight": weight, "weight_scale": scale, "weight_zero_point": zp}


CASES = [pytest.param(b, s, st, dt, id=f"int{b}-{'sym' if s else 'asym'}-{st}-{dt}")
         for b in BITS for s in (True, False) for st in STRATEGIES for dt in DTYPES]


@pytest.mark.parametrize("bits,symmetric,strategy,dtype", CASES)
def test_calculate_qparams_matches_compressed_tensors(bits, symmetric, strategy, dtype):
    args = _args(bits, symmetric, strategy)
    weight = _weight(STRATEGIES[strategy][1], DTYPES[dtype], seed=bits)
    ct_scale, ct_zp = _ct_qparams(weight, args)
    scale, zp = calculate_qparams(weight, _scheme(args))
    assert scale.dtype == ct_scale.dtype == DTYPES[dtype]
    assert scale.shape == ct_scale.shape
    assert torch.equal(scale, ct_scale)
    if symmetric:
        assert zp is None
        assert not ct_zp.any()
    else:
        assert zp.dtype == ct_zp.dtype == torch.int8
        assert torch.equal(zp, ct_zp)


@pytest.mark.parametrize("bits,symmetric,strategy,dtype", CASES)
def test_compress_matches_compressed_tensors(bits, symmetric, strategy, dtype):
    args = _args(bits, symmetric, strategy)
    weight = _weight(STRATEGIES[strategy][1], DTYPES[dtype], seed=bits + 1)
    theirs = CT_PACKED.compress(_ct_state_dict(weight, args), QuantizationScheme(targets=["Linear"], weights=args))
    ours = compress(weight, _scheme(args))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name]), name


@pytest.mark.parametrize("bits,symmetric,strategy,dtype", CASES)
def test_decompress_matches_compressed_tensors(bits, symmetric, strategy, dtype):
    args = _args(bits, symmetric, strategy)
    weight = _weight(STRATEGIES[strategy][1], DTYPES[dtype], seed=bits + 2)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    stored = CT_PACKED.compress(_ct_state_dict(weight, args), ct_scheme)
    theirs = CT_PACKED.decompress(stored, ct_scheme)["weight"]
    ours = decompress(stored, _scheme(args))
    assert ours.dtype == theirs.dtype == DTYPES[dtype]
    assert ours.shape == weight.shape
    assert torch.equal(ours, theirs)


def test_compress_raises_when_group_size_does_not_divide_in_features():
    args = QuantizationArgs(num_bits=4, strategy="group", group_size=32)
    with pytest.raises(ValueError):
        compress(_weight((8, 48), torch.bfloat16), _scheme(args))


# -- g_idx (actorder "group", CT 0.6-0.18) ------------------------------------------------

def _g_idx_case(symmetric, dtype, seed=0, out=6, groups=3, gs=8):
    g = torch.Generator().manual_seed(seed)
    in_features = groups * gs
    g_idx = (torch.arange(in_features) // gs)[torch.randperm(in_features, generator=g)].to(torch.int32)
    q = torch.randint(-8, 8, (out, in_features), dtype=torch.int8, generator=g)
    scale = (torch.rand((out, groups), generator=g) * 0.1 + 0.001).to(dtype)
    zp = None if symmetric else torch.randint(-8, 8, (out, groups), dtype=torch.int8, generator=g)
    scheme = QuantScheme.from_json(dict(num_bits=4, symmetric=symmetric, strategy="group", group_size=gs,
                                        actorder="group"), where="test")
    return q, scale, zp, g_idx, scheme


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_with_g_idx_equals_per_column_formula(symmetric, dtype):
    q, scale, zp, g_idx, scheme = _g_idx_case(symmetric, dtype)
    assert not torch.equal(g_idx, torch.arange(q.shape[1]) // 8)     # really permuted
    got = dequantize(q, scale, zp, g_idx, scheme=scheme)
    expect = torch.empty(q.shape, dtype=dtype)
    for j in range(q.shape[1]):
        g = int(g_idx[j])
        col = q[:, j].to(dtype)
        if zp is not None:
            col = col - zp[:, g].to(dtype)
        expect[:, j] = col * scale[:, g]
    assert got.dtype == dtype
    assert torch.equal(got, expect)


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_with_g_idx_matches_compressed_tensors_per_column(symmetric, dtype):
    """CT 0.20 no longer takes g_idx; per-column scales with group_size=1 run its arithmetic."""
    q, scale, zp, g_idx, scheme = _g_idx_case(symmetric, dtype, seed=1)
    idx = g_idx.long()
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=1)
    theirs = ct_dequantize(q, scale[:, idx], None if zp is None else zp[:, idx], args=args)
    ours = dequantize(q, scale, zp, g_idx, scheme=scheme)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_quantize_with_g_idx_matches_compressed_tensors_per_column(symmetric):
    q0, scale, zp, g_idx, scheme = _g_idx_case(symmetric, torch.bfloat16, seed=2)
    weight = dequantize(q0, scale, zp, g_idx, scheme=scheme)
    weight = weight + (torch.randn(weight.shape, generator=torch.Generator().manual_seed(3)) * 1e-3).to(weight.dtype)
    idx = g_idx.long()
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=1)
    theirs = ct_quantize(weight, scale[:, idx], None if zp is None else zp[:, idx], args=args, dtype=torch.int8)
    ours, _, _ = quantize(weight, scheme, scale, zp, g_idx)
    assert torch.equal(ours, theirs)


def test_compress_round_trips_ints_with_g_idx():
    q, scale, zp, g_idx, scheme = _g_idx_case(False, torch.bfloat16, seed=4)
    weight = dequantize(q, scale, zp, g_idx, scheme=scheme)
    stored = compress(weight, scheme, scale=scale, zero_point=zp, g_idx=g_idx)
    assert stored["weight_g_idx"].dtype == torch.int32
    assert torch.equal(stored["weight_g_idx"], g_idx)
    assert torch.equal(unpack_from_int32(stored["weight_packed"], 4, q.shape), q)
    assert torch.equal(decompress(stored, scheme), weight)


# -- rounding ------------------------------------------------------------------------

def test_quantize_rounds_half_to_even_when_quotient_is_exact_half():
    # row 0 has absmax 7.5, so the symmetric int4 scale is 7.5 / 7.5 = 1 and x/scale == x
    row = [0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, -7.5, 7.5, 6.5]
    weight = torch.tensor([row, [v / 4 for v in row]], dtype=torch.bfloat16)   # row 1: scale 0.25
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    q, scale, zp = quantize(weight, _scheme(args))
    assert scale.flatten().tolist() == [1.0, 0.25]
    assert zp is None
    expected = [0, 0, 2, -2, 2, -2, 4, -8, 7, 6]          # 7.5 clamps to 7 first
    assert q.tolist() == [expected, expected]


def test_quantize_rounds_half_to_even_with_zero_point():
    args = QuantizationArgs(num_bits=4, symmetric=False, strategy="channel")
    weight = torch.tensor([[0.5, 1.5, 2.5, -0.5, -2.5]], dtype=torch.float32)
    scale = torch.tensor([[1.0]])
    zp = torch.tensor([[1]], dtype=torch.int8)
    q, _, _ = quantize(weight, _scheme(args), scale, zp)
    assert q.tolist() == [[2, 2, 4, 0, -2]]    # 1.5, 2.5, 3.5, 0.5, -1.5 half to even


def test_quantize_divides_in_weight_dtype_for_bf16():
    """bf16 / bf16 rounds the quotient to bf16 before the integer rounding, as CT does on CPU."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.5]], dtype=torch.bfloat16) * 0.0123
    w = w.to(torch.bfloat16)
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel")
    q, scale, _ = quantize(w, _scheme(args))
    assert scale.dtype == torch.bfloat16
    assert torch.equal(q, torch.round(torch.clamp(w / scale, -8, 7)).to(torch.int8))
    ct_q = ct_quantize(w, scale, None, args=args, dtype=torch.int8)
    assert torch.equal(q, ct_q)


# -- stacked experts -----------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["group32", "channel"])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [3, 4])
def test_compress_stacked_experts_equals_per_expert(bits, symmetric, strategy):
    args = _args(bits, symmetric, strategy)
    scheme = _scheme(args)
    out, inn = STRATEGIES[strategy][1]
    experts = torch.stack([_weight((out, inn), torch.bfloat16, seed=e) for e in range(3)])
    stacked = compress(experts, scheme)
    per = [compress(experts[e], scheme) for e in range(3)]
    for name in ("weight_packed", "weight_scale") + (() if symmetric else ("weight_zero_point",)):
        assert torch.equal(stacked[name], torch.stack([p[name] for p in per])), name
    assert stacked["weight_shape"].tolist() == [3, out, inn]
    whole = decompress(stacked, scheme)
    assert whole.shape == experts.shape
    for e in range(3):
        assert torch.equal(whole[e], decompress(per[e], scheme))


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_compress_stacked_experts_matches_compressed_tensors(symmetric):
    args = _args(4, symmetric, "group32")
    experts = torch.stack([_weight((24, 96), torch.bfloat16, seed=e + 10) for e in range(2)])
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    theirs = CT_PACKED.compress(_ct_state_dict(experts, args), ct_scheme)
    ours = compress(experts, _scheme(args))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype and torch.equal(ours[name], theirs[name]), name
    assert torch.equal(decompress(theirs, _scheme(args)), CT_PACKED.decompress(theirs, ct_scheme)["weight"])


# -- output dtype ------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_dequantize_equals_bf16_result_cast_when_dtype_float32(symmetric):
    args = _args(4, symmetric, "group32")
    scheme = _scheme(args)
    q, scale, zp = quantize(_weight((24, 96), torch.bfloat16, seed=7), scheme)
    as_bf16 = dequantize(q, scale, zp, scheme=scheme)
    as_f32 = dequantize(q, scale, zp, scheme=scheme, dtype=torch.float32)
    assert as_bf16.dtype == torch.bfloat16
    assert as_f32.dtype == torch.float32
    assert torch.equal(as_f32, as_bf16.to(torch.float32))
    # the cast happens after the bf16 arithmetic, not instead of it
    exact = q.float() * scale.float().repeat_interleave(32, -1) if zp is None else \
        (q.float() - zp.float().repeat_interleave(32, -1)) * scale.float().repeat_interleave(32, -1)
    assert not torch.equal(as_f32, exact)
    stored = compress(_weight((24, 96), torch.bfloat16, seed=7), scheme)
    assert torch.equal(decompress(stored, scheme, dtype=torch.float32), decompress(stored, scheme).float())


def test_decompress_reads_int8_zero_points_when_legacy():
    """Before CT 0.9.4 asymmetric zero points were stored unpacked, I8 [out, groups]."""
    args = _args(4, False, "group32")
    scheme = _scheme(args)
    weight = _weight((24, 96), torch.bfloat16, seed=8)
    modern = compress(weight, scheme)
    legacy = compress(weight, scheme, packed_zero_point=False)
    assert legacy["weight_zero_point"].dtype == torch.int8
    assert legacy["weight_zero_point"].shape == (24, 3)
    assert torch.equal(decompress(legacy, scheme), decompress(modern, scheme))


# -- scale_dtype ---------------------------------------------------------------------
# CT 0.20 rounds (and clamps) the scale through scale_dtype but keeps it in the weight
# dtype, which is also the dtype of the weight_scale parameter it initializes.

SCALE_DTYPE_CASES = [pytest.param(wd, sd, sym, id=f"{wn}-scale_{sn}-{'sym' if sym else 'asym'}")
                     for wn, wd in (("bf16", torch.bfloat16), ("fp32", torch.float32))
                     for sn, sd in (("fp16", torch.float16), ("bf16", torch.bfloat16))
                     for sym in (True, False)]


@pytest.mark.parametrize("weight_dtype,scale_dtype,symmetric", SCALE_DTYPE_CASES)
def test_calculate_qparams_matches_compressed_tensors_when_scale_dtype_set(weight_dtype, scale_dtype, symmetric):
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=32,
                            scale_dtype=scale_dtype)
    weight = _weight((24, 96), weight_dtype, seed=20)
    ct_scale, ct_zp = _ct_qparams(weight, args)
    scale, zp = calculate_qparams(weight, _scheme(args))
    assert scale.dtype == ct_scale.dtype == weight_dtype
    assert torch.equal(scale, ct_scale)
    if not symmetric:
        assert torch.equal(zp, ct_zp)


@pytest.mark.parametrize("weight_dtype,scale_dtype,symmetric", SCALE_DTYPE_CASES)
def test_compress_matches_compressed_tensors_when_scale_dtype_set(weight_dtype, scale_dtype, symmetric):
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=32,
                            scale_dtype=scale_dtype)
    weight = _weight((64, 256), weight_dtype, seed=21)
    ct_scheme = QuantizationScheme(targets=["Linear"], weights=args)
    theirs = CT_PACKED.compress(_ct_state_dict(weight, args), ct_scheme)
    ours = compress(weight, _scheme(args))
    assert set(ours) == set(theirs)
    for name in theirs:
        assert ours[name].dtype == theirs[name].dtype, name
        assert torch.equal(ours[name], theirs[name]), name
    assert torch.equal(decompress(theirs, _scheme(args)), CT_PACKED.decompress(theirs, ct_scheme)["weight"])


def test_calculate_qparams_clamps_scale_to_scale_dtype_range():
    # 1e6 / 7.5 overflows fp16: CT clamps to 65504 before rounding instead of giving inf
    args = QuantizationArgs(num_bits=4, symmetric=True, strategy="channel", scale_dtype=torch.float16)
    weight = torch.full((2, 32), 1e6)
    ct_scale, _ = _ct_qparams(weight, args)
    scale, _ = calculate_qparams(weight, _scheme(args))
    assert ct_scale.flatten().tolist() == [65504.0, 65504.0]
    assert scale.dtype == ct_scale.dtype
    assert torch.equal(scale, ct_scale)
