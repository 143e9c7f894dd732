"""The Triton dequantization kernel gives the same bits as the torch path (itself proven
equal to compressed-tensors). On a CPU machine the kernel runs in Triton's interpreter;
on a GPU machine the same tests run it on CUDA."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, FIXTURES, REAL_FOLDERS
from ctformat.checkpoint import open_checkpoint
from ctformat.quant import compress, decompress
from ctformat.scheme import QuantScheme

pytest.importorskip("triton")

CASES = [(b, sym, strat) for b in (1, 2, 4, 8) for sym in (True, False) for strat in ("group", "channel", "tensor")
         if not (strat == "tensor" and not sym)]


def scheme(bits, sym, strat, **kw):
    return QuantScheme.from_json({"num_bits": bits, "symmetric": sym, "strategy": strat,
                                  "group_size": 32 if strat == "group" else None, **kw}, where="test")


def both(tensors, s, dtype=None):
    t = {k: v.to(DEVICE) for k, v in tensors.items()}
    return decompress(t, s, dtype=dtype, kernel="triton").cpu(), decompress(tensors, s, dtype=dtype, kernel="torch")


@pytest.mark.parametrize("bits,sym,strat", CASES)
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_equals_torch_path(bits, sym, strat, wdtype):
    w = (torch.randn(2, 48, 96, generator=torch.Generator().manual_seed(bits)) * 0.02).to(wdtype)
    s = scheme(bits, sym, strat)
    got, want = both(compress(w, s), s)
    assert got.dtype == want.dtype == wdtype and torch.equal(got, want)


@pytest.mark.parametrize("out", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
def test_kernel_output_dtypes_round_like_torch(out, wdtype):
    w = (torch.randn(40, 64, generator=torch.Generator().manual_seed(1)) * 3).to(wdtype)
    s = scheme(4, False, "group")
    got, want = both(compress(w, s), s, dtype=out)
    assert got.dtype == out and torch.equal(got, want)


def test_kernel_applies_g_idx_and_ragged_rows():
    w = (torch.randn(37, 96, generator=torch.Generator().manual_seed(2)) * 0.02).to(torch.bfloat16)
    s = scheme(4, False, "group", actorder="group")
    g_idx = torch.randperm(96, generator=torch.Generator().manual_seed(3)) % 3
    got, want = both(compress(w, s, g_idx=g_idx.int()), s)
    assert torch.equal(got, want)


def test_kernel_keeps_nan_scales_nan():
    s = scheme(4, True, "group")
    t = compress(torch.randn(16, 64).to(torch.bfloat16), s)
    t["weight_scale"][0, 0] = float("nan")
    got, want = both(t, s)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("name", ["tiny-mixtral", "int4-g32-asym", "int4-g32-asym-i8zp", "int4-g32-actorder",
                                  "int8-g32", "int4-channel", "mixed-groups"])
def test_kernel_on_fixture_checkpoints(name):
    ckpt = open_checkpoint(FIXTURES / name)
    for m in ckpt.modules().values():
        if m.quantized:
            t = ckpt.load_module(m)
            got, want = both(t, m.scheme)
            assert torch.equal(got, want), m.prefix


@pytest.mark.parametrize("path", REAL_FOLDERS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_kernel_on_real_checkpoints(path):
    ckpt = open_checkpoint(path)
    mods = [m for m in ckpt.modules().values() if m.quantized]
    if DEVICE == "cpu":         # the interpreter is slow: attention and experts of layer 0
        mods = mods[:6]
    for m in mods:
        got, want = both(ckpt.load_module(m), m.scheme)
        assert torch.equal(got, want), m.prefix


class _Refuse:
    """Stands in for the tiled kernel where a case must take the flat one."""
    def __getitem__(self, grid):
        raise AssertionError("tiled kernel used where the flat kernel applies")


def _expect_flat_kernel(monkeypatch):
    """Symmetric group cases must take the flat kernel: a silent fall-back to the slower tiled
    kernel fails the test."""
    from ctformat import kernels
    monkeypatch.setattr(kernels, "_dequant_kernel", _Refuse())


@pytest.mark.parametrize("rows", [64, 65])           # 1024 words (no mask) and a ragged last block
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_flat_kernel_full_and_ragged_blocks(bits, rows, monkeypatch):
    _expect_flat_kernel(monkeypatch)
    per = 32 // bits
    w = (torch.randn(rows, 16 * per, generator=torch.Generator().manual_seed(bits)) * 0.02).to(torch.bfloat16)
    s = scheme(bits, True, "group")
    s = QuantScheme.from_json({**s.to_json(), "group_size": 8 * per}, where="test")
    got, want = both(compress(w, s), s)
    assert torch.equal(got, want)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("sdtype", [torch.bfloat16, torch.float16])
def test_flat_kernel_every_scale_bit_pattern(sdtype, bits, monkeypatch):
    """All 65536 16-bit scales (zeros, subnormals, infinities, NaNs), each times every q value
    of its bit width (on the GPU): the kernel's fp32 product, rounded once to the 16-bit
    dtype, must give exactly the bits torch computes. NaNs must land on the same elements;
    their payloads are not part of the format (torch on the CPU canonicalizes them, the
    interpreter and the GPU do not)."""
    _expect_flat_kernel(monkeypatch)
    per = 32 // bits
    # q values per group: all of them, in whole words (for 8 bits in Triton's interpreter, 16
    # of them per group and all across groups: every pair would take a minute there)
    n = 16 if bits == 8 and DEVICE == "cpu" else max(1 << bits, 2 * per)
    scale = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(sdtype).reshape(-1, 2)
    rows = scale.shape[0]         # two groups per row, each seeing every q value
    q = (torch.arange(rows)[:, None] + torch.arange(2 * n)).remainder(1 << bits).reshape(rows, -1, per)
    words = (q << (torch.arange(per) * bits)).sum(-1)
    words = (words - (words >= 2**31) * 2**32).to(torch.int32)
    s = QuantScheme.from_json({"num_bits": bits, "symmetric": True, "strategy": "group",
                               "group_size": n}, where="test")
    t = {"weight_packed": words, "weight_scale": scale, "weight_shape": torch.tensor([rows, 2 * n])}
    got, want = both(t, s)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan) and nan.sum() > 0
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])
