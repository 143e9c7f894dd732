"""ctformat.formats against compressed-tensors 0.20 on generated edge cases, both directions:
every FP8 byte, every FP4 code, every E8M0 exponent, zero/huge/subnormal/inf/NaN scales, ragged
blocks, stacked experts, fp16/bf16/fp32 scales."""
from __future__ import annotations

import pytest
import torch

from formats_oracle import (ct_compress, ct_decompress, ct_qparams, forward, generate_gparam, same, scheme)
from ctformat.formats import format_named, numerics
from ctformat.formats.dense import Dense

FP8 = {"num_bits": 8, "type": "float", "symmetric": True}
INT8 = {"num_bits": 8, "type": "int", "symmetric": True}
NVFP4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
         "scale_dtype": "torch.float8_e4m3fn", "symmetric": True}
MXFP4 = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8"}
MXFP8 = {**MXFP4, "num_bits": 8}
STRATEGIES = {"tensor": {"strategy": "tensor"}, "channel": {"strategy": "channel"},
              "group": {"strategy": "group", "group_size": 32},
              "block": {"strategy": "block", "block_structure": [32, 48]}}


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def all_fp8(rows: int) -> torch.Tensor:
    """Every E4M3 byte (NaNs 0x7F/0xFF included) in each row, rows x 256."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(rows, 1).view(torch.float8_e4m3fn)


def odd_scales(shape, dtype) -> torch.Tensor:
    """Scales with zeros, subnormals, huge values, inf and NaN mixed into ordinary ones."""
    s = torch.rand(shape, generator=_gen(7)).to(dtype) + 0.01
    flat = s.view(-1)
    info = torch.finfo(dtype)
    special = [0.0, info.tiny / 4, info.tiny, info.max, float("inf"), float("nan"), -1.0, 2.0 ** -20]
    for i, v in enumerate(special[: flat.numel()]):
        flat[i * 3 % flat.numel()] = v
    return s


# -- naive family: decompress ----------------------------------------------------------------
@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strategy", ["tensor", "channel", "group", "block"])
def test_fp8_every_byte_decompresses_like_ct(strategy, sdtype):
    s, cs = scheme({**FP8, **STRATEGIES[strategy]}, "float-quantized", {"num_bits": 8, "type": "float",
                                                                        "strategy": "token", "dynamic": True})
    q = all_fp8(40)[:, :250]                         # 40 x 250: ragged against the 32 x 48 blocks
    t = {"weight": q, "weight_scale": odd_scales(s.weights.scale_shape(40, 250 if strategy != "group" else 224),
                                                 sdtype)}
    if strategy == "group":
        t["weight"] = q[:, :224]
    got = format_named("float-quantized").decompress(t, s)
    assert same(got, ct_decompress("float-quantized", t, cs))


@pytest.mark.parametrize("bits_, sym", [(8, True), (8, False), (4, True), (4, False)])
def test_int_values_decompress_like_ct(bits_, sym):
    lo, hi = -(1 << (bits_ - 1)), (1 << (bits_ - 1)) - 1
    s, cs = scheme({"num_bits": bits_, "type": "int", "symmetric": sym, "strategy": "group", "group_size": 128},
                   "int-quantized", {**INT8, "strategy": "token", "dynamic": True})
    q = torch.randint(lo, hi + 1, (64, 256), generator=_gen(1), dtype=torch.int8)
    t = {"weight": q, "weight_scale": odd_scales((64, 2), torch.bfloat16)}
    if not sym:
        t["weight_zero_point"] = torch.randint(lo, hi + 1, (64, 2), generator=_gen(2), dtype=torch.int8)
    got = format_named("int-quantized").decompress(t, s)
    assert same(got, ct_decompress("int-quantized", t, cs))


def test_stacked_experts_decompress_like_ct_per_expert():
    s, cs = scheme({**FP8, **STRATEGIES["block"]}, "naive-quantized")
    q = torch.randn(3, 40, 100, generator=_gen(3)).to(torch.float8_e4m3fn)
    t = {"weight": q, "weight_scale": torch.rand(3, 2, 3, generator=_gen(4)).to(torch.bfloat16)}
    assert same(format_named("naive-quantized").decompress(t, s), ct_decompress("naive-quantized", t, cs))


def test_mxfp8_every_exponent_and_byte_decompresses_like_ct():
    s, cs = scheme(MXFP8, "mxfp8-quantized")
    q = all_fp8(256)[:, :224]                        # 7 groups of 32 per row
    e = (torch.arange(256)[:, None] + torch.arange(7)).remainder(256).to(torch.uint8)
    t = {"weight": q, "weight_scale": e}
    got = format_named("mxfp8-quantized").decompress(t, s)
    assert got.dtype == torch.bfloat16 and same(got, ct_decompress("mxfp8-quantized", t, cs))


# -- naive family: compress ------------------------------------------------------------------
def weights(shape, dtype, seed=5) -> torch.Tensor:
    """Random weights with exact zeros, -0.0, an all-zero row and one outlier."""
    w = torch.randn(shape, generator=_gen(seed)) * 0.05
    w[..., 0, :7] = 0.0
    w[..., 1, :5] = -0.0
    w[..., 2, :] = 0.0
    w[..., 3, 3] = 40.0
    return w.to(dtype)


def _observed(x, args_s):
    return numerics.observe(x, args_s)


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("strategy", ["tensor", "channel", "group", "block"])
@pytest.mark.parametrize("base,fmt", [(FP8, "float-quantized"), (INT8, "int-quantized"),
                                      ({**INT8, "num_bits": 4}, "int-quantized"),
                                      ({**INT8, "symmetric": False}, "int-quantized")])
def test_naive_compress_like_ct(base, fmt, strategy, wdtype):
    s, cs = scheme({**base, **STRATEGIES[strategy]}, fmt, {**INT8, "strategy": "token", "dynamic": True})
    x = weights((40, 224), wdtype)
    got = format_named(fmt).compress(x, s)
    lo, hi = _observed(x, s.weights)        # llm-compressor's min/max reduction
    scale, zp = ct_qparams(x, cs, lo, hi)
    want = ct_compress(fmt, x, scale, zp, None, cs)
    assert set(got) == set(want)
    for k in got:
        assert same(got[k], want[k]), k


def test_mxfp8_compress_like_ct():
    s, cs = scheme(MXFP8, "mxfp8-quantized")
    x = weights((48, 256), torch.bfloat16)
    got = format_named("mxfp8-quantized").compress(x, s)
    lo, hi = _observed(x, s.weights)
    scale, zp = ct_qparams(x, cs, lo, hi)
    want = ct_compress("mxfp8-quantized", x, scale, zp, None, cs)
    assert set(got) == set(want) and all(same(got[k], want[k]) for k in got)


# -- fp4 family -------------------------------------------------------------------------------
def all_fp4_bytes(rows: int) -> torch.Tensor:
    """Every pair of FP4 codes (all 256 bytes) in each row: rows x 256 bytes = 512 values."""
    return torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(rows, 1)


def test_fp4_pack_unpack_every_code_like_ct():
    from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8
    packed = all_fp4_bytes(2)
    values = numerics.unpack_fp4(packed)
    assert same(values, unpack_fp4_from_uint8(packed, 2, 512))
    assert same(numerics.pack_fp4(values), pack_fp4_to_uint8(values)) and same(numerics.pack_fp4(values), packed)


def test_nvfp4_every_code_and_scale_byte_decompresses_like_ct():
    s, cs = scheme(NVFP4, "nvfp4-pack-quantized")
    packed = all_fp4_bytes(256)                                  # 512 values = 32 groups per row
    scale = (torch.arange(256)[:, None] + torch.arange(32)).remainder(256).to(torch.uint8).view(torch.float8_e4m3fn)
    for g in (1.0, 2688.0 / 0.02, 3.0e38, 1e-30, float("inf"), float("nan"), 0.0):
        t = {"weight_packed": packed, "weight_scale": scale, "weight_global_scale": torch.tensor([g])}
        got = format_named("nvfp4-pack-quantized").decompress(t, s)
        assert got.dtype == torch.bfloat16 and same(got, ct_decompress("nvfp4-pack-quantized", t, cs)), g


def test_mxfp4_every_code_and_exponent_decompresses_like_ct():
    s, cs = scheme(MXFP4, "mxfp4-pack-quantized")
    packed = all_fp4_bytes(256)                                  # 16 groups of 32 per row
    e = (torch.arange(256)[:, None] + torch.arange(16)).remainder(256).to(torch.uint8)
    t = {"weight_packed": packed, "weight_scale": e}
    assert same(format_named("mxfp4-pack-quantized").decompress(t, s), ct_decompress("mxfp4-pack-quantized", t, cs))


@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_nvfp4_compress_like_ct(wdtype):
    s, cs = scheme(NVFP4, "nvfp4-pack-quantized")
    x = weights((32, 256), wdtype)
    g = numerics.global_scale(x)
    assert same(g, generate_gparam(x.amin(), x.amax()))
    got = format_named("nvfp4-pack-quantized").compress(x, s)
    lo, hi = _observed(x, s.weights)
    scale, _ = ct_qparams(x, cs, lo, hi, global_scale=g)
    want = ct_compress("nvfp4-pack-quantized", x, scale, None, g, cs)
    assert set(got) == set(want) and all(same(got[k], want[k]) for k in got)


def test_mxfp4_compress_like_ct_including_exact_e2m1_values():
    s, cs = scheme(MXFP4, "mxfp4-pack-quantized")
    x = weights((32, 256), torch.bfloat16)
    x[4] = torch.tensor(numerics.E2M1 + tuple(-v for v in numerics.E2M1)).repeat(16) * 0.25   # every code, exact
    got = format_named("mxfp4-pack-quantized").compress(x, s)
    lo, hi = _observed(x, s.weights)
    scale, _ = ct_qparams(x, cs, lo, hi)
    want = ct_compress("mxfp4-pack-quantized", x, scale, None, None, cs)
    assert set(got) == set(want) and all(same(got[k], want[k]) for k in got)


def test_e8m0_every_exponent_like_ct():
    from compressed_tensors.compressors.mx_utils import compress_mx_scale, decompress_mx_scale
    e = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    f = numerics.e8m0_to_bf16(e)
    assert same(f, decompress_mx_scale(e))
    finite = f[:255]
    assert same(numerics.bf16_to_e8m0(finite), compress_mx_scale(finite, torch.uint8)) and same(
        numerics.bf16_to_e8m0(finite), e[:255])


# -- dense: fake quantization -----------------------------------------------------------------
@pytest.mark.parametrize("args", [{**INT8, "num_bits": 4, "strategy": "group", "group_size": 32},
                                  {**INT8, "num_bits": 4, "symmetric": False, "strategy": "channel"},
                                  {**FP8, "strategy": "block", "block_structure": [32, 48]},
                                  {**FP8, "strategy": "tensor"}, NVFP4, MXFP4, MXFP8])
def test_dense_fake_quantize_like_ct(args):
    s, cs = scheme(args, "dense")
    x = weights((40, 224), torch.bfloat16)
    t = Dense.compress(x, s)
    assert same(Dense.decompress(t, s), x)
    want = forward.fake_quantize(x, t["weight_scale"], t["weight_zero_point"], cs.weights,
                                 global_scale=t.get("weight_global_scale"))
    assert same(Dense.fake_quantize(t, s), want)


def test_sparse24_compress_keeps_two_of_four_and_scatters_back():
    from ctformat.formats.sparse import Sparse24Bitmask
    s, _ = scheme({**FP8, "strategy": "channel"}, "float-quantized")
    x = torch.randn(8, 64, generator=_gen(9)).to(torch.bfloat16)
    t = Sparse24Bitmask.compress(x, s)
    dense = Sparse24Bitmask.scatter(t)
    keep = dense != 0
    assert keep.reshape(-1, 4).sum(-1).max() <= 2 and torch.equal(dense[keep], x[keep])
    top = x.abs().reshape(-1, 4).topk(2, dim=1).values
    assert torch.equal(dense.abs().reshape(-1, 4).sort(dim=1, descending=True).values[:, :2], top)
