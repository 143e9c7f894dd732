"""Scales and zero points against compressed-tensors 0.20's calculate_qparams on generated
inputs: min/max of rank 0, 1, 2 and 3 (CT's per-tensor path passes 0-d min/max; llm-compressor's
observers pass [1], [out, 1] and [out, groups]), bf16/fp16/fp32, every bit width, symmetric and
asymmetric, with and without scale_dtype. Each example checks a batch (40 0-d pairs, or up to
200 elements), about 30,000 ranges a run. Near-symmetric ranges are drawn on purpose: there the
quotient min / scale sits next to a rounding boundary, and the dtype of each step shows."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ctformat.quant import calculate_qparams, minmax_qparams
from ctformat.scheme import QuantScheme, Strategy

ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.quantization import QuantizationArgs  # noqa: E402
from compressed_tensors.quantization.utils.helpers import calculate_qparams as ct_calculate_qparams  # noqa: E402

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
STRATEGIES = {"tensor": {}, "channel": {}, "group": {"group_size": 4}}
SETTINGS = settings(max_examples=250, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example])


def _args(bits, symmetric, strategy, scale_dtype=None):
    extra = {} if scale_dtype is None else {"scale_dtype": scale_dtype}
    return QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, **STRATEGIES[strategy], **extra)


def _scheme(args: QuantizationArgs) -> QuantScheme:
    return QuantScheme.from_json(args.model_dump(), where="test")


def _outcome(fn, *args):
    try:
        return fn(*args)
    except RuntimeError as e:     # e.g. an fp16 scale clamped to bf16's range: both refuse it
        return type(e)


def _assert_same(ours, theirs, symmetric):
    assert not isinstance(ours, type) or ours is theirs, (ours, theirs)
    if isinstance(ours, type):
        return
    scale, zp = ours
    ct_scale, ct_zp = theirs
    assert scale.dtype == ct_scale.dtype and scale.shape == ct_scale.shape
    bits = _BITS_VIEW[scale.dtype]
    assert torch.equal(scale.view(bits), ct_scale.view(bits))      # bit for bit, NaN included
    if symmetric:
        assert zp is None and not ct_zp.any()
    else:
        assert zp.dtype == ct_zp.dtype == torch.int8 and zp.shape == ct_zp.shape
        assert torch.equal(zp, ct_zp), (zp, ct_zp)


_BITS_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
_SIGN = {torch.int16: -0x8000, torch.int32: -0x80000000}


def _pairs(seed, n, dtype):
    """min/max tensors [n] from a seed: near-symmetric pairs (max = -min moved by a few units in
    the last place of dtype: the quotient min / scale then sits next to -(2^b - 1) / 2 and the
    zero point next to -1/2, a rounding boundary), one-sided, skewed, zero and unrelated ranges,
    over magnitudes 2^-24 to 2^10 with uniform mantissas (hypothesis picks the seed; torch's
    generator keeps the values spread instead of drawn towards simple numbers)."""
    g = torch.Generator().manual_seed(seed)
    m = ((1 + torch.rand(n, generator=g)) * 2.0 ** torch.randint(-24, 11, (n,), generator=g)).to(dtype)
    f = torch.rand(n, generator=g).to(dtype)
    kind = torch.randint(0, 5, (n,), generator=g)
    bits = _BITS_VIEW[dtype]
    mirror = ((-m).view(bits) ^ _SIGN[bits]).to(torch.int64) + torch.randint(-4, 5, (n,), generator=g)
    mirror = mirror.clamp(min=0)                              # stays a positive number
    near = mirror.to(bits).view(dtype)
    lo = torch.where(kind == 3, torch.zeros_like(m), -m)
    lo = torch.where(kind == 1, m * f, lo)                    # all positive
    hi = torch.where(kind <= 1, torch.where(kind == 0, near, m), m * f * 3)
    hi = torch.where(kind == 3, torch.zeros_like(m), hi)
    return lo, hi


def test_zero_point_of_0d_bf16_range_is_computed_in_float32():
    """The case outside testing found: 1-bit asymmetric per-tensor, bf16 0-d min/max. CT's zero
    point is -1 (float32 arithmetic); the same values as [1]-shaped min/max give 0 (bf16)."""
    args = _args(1, False, "tensor")
    lo, hi = torch.tensor(-2.816319465637207e-06, dtype=torch.bfloat16), torch.tensor(2.8312206268310547e-06,
                                                                                      dtype=torch.bfloat16)
    scale, zp = minmax_qparams(lo, hi, _scheme(args))
    assert zp.tolist() == [-1] and scale.shape == (1,)
    _assert_same((scale, zp), ct_calculate_qparams(lo, hi, args), symmetric=False)
    scale1, zp1 = minmax_qparams(lo.reshape(1), hi.reshape(1), _scheme(args))
    assert zp1.tolist() == [0]
    _assert_same((scale1, zp1), ct_calculate_qparams(lo.reshape(1), hi.reshape(1), args), symmetric=False)


@SETTINGS
@given(bits=st.integers(1, 8), symmetric=st.booleans(), dtype=st.sampled_from(DTYPES),
       scale_dtype=st.sampled_from([None, "bfloat16", "float16"]), seed=st.integers(0, 2**32 - 1))
def test_minmax_qparams_match_compressed_tensors_for_0d_inputs(bits, symmetric, dtype, scale_dtype, seed):
    args = _args(bits, symmetric, "tensor", scale_dtype)
    scheme = _scheme(args)
    for lo_t, hi_t in zip(*_pairs(seed, 40, dtype)):
        _assert_same(_outcome(minmax_qparams, lo_t, hi_t, scheme),
                     _outcome(ct_calculate_qparams, lo_t, hi_t, args), symmetric)


@SETTINGS
@given(bits=st.integers(1, 8), symmetric=st.booleans(), dtype=st.sampled_from(DTYPES),
       strategy=st.sampled_from(sorted(STRATEGIES)), scale_dtype=st.sampled_from([None, "bfloat16", "float16"]),
       shape=st.sampled_from([(1,), (200,), (40, 1), (40, 5), (2, 20, 5)]), seed=st.integers(0, 2**32 - 1))
def test_minmax_qparams_match_compressed_tensors_for_tensors(bits, symmetric, dtype, strategy, scale_dtype,
                                                             shape, seed):
    args = _args(bits, symmetric, strategy, scale_dtype)
    n = torch.Size(shape).numel()
    lo, hi = (t.reshape(shape) for t in _pairs(seed, n, dtype))
    _assert_same(_outcome(minmax_qparams, lo, hi, _scheme(args)),
                 _outcome(ct_calculate_qparams, lo, hi, args), symmetric)


@SETTINGS
@given(bits=st.integers(1, 8), symmetric=st.booleans(), dtype=st.sampled_from(DTYPES),
       strategy=st.sampled_from(sorted(STRATEGIES)), rows=st.integers(1, 12), groups=st.integers(1, 6),
       scale=st.floats(1e-6, 10.0), seed=st.integers(0, 2**16))
def test_calculate_qparams_matches_compressed_tensors_on_observer_shapes(bits, symmetric, dtype, strategy, rows,
                                                                         groups, scale, seed):
    """calculate_qparams(weight) reduces as llm-compressor's observers do and then agrees
    with CT given those min/max: [1] per tensor, [rows, 1] per channel, [rows, groups]."""
    args = _args(bits, symmetric, strategy)
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(rows, 4 * groups, generator=g) * scale).to(dtype)
    if strategy == "tensor":
        lo, hi = w.amin().reshape(1), w.amax().reshape(1)
    elif strategy == "channel":
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    else:
        lo, hi = w.unflatten(-1, (-1, 4)).amin(-1), w.unflatten(-1, (-1, 4)).amax(-1)
    _assert_same(calculate_qparams(w, _scheme(args)), ct_calculate_qparams(lo, hi, args), symmetric)


def test_minmax_qparams_accepts_strategy_independent_shapes():
    """The strategy decides only how callers reduce: minmax_qparams takes any shape."""
    s = QuantScheme(num_bits=4, symmetric=False, strategy=Strategy.GROUP, group_size=4)
    lo, hi = -torch.rand(3, 2, 5), torch.rand(3, 2, 5)
    scale, zp = minmax_qparams(lo, hi, s)
    assert scale.shape == zp.shape == (3, 2, 5)
