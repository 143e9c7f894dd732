"""The compiled GGUF codec (spec/gguf.md §2.1): the same bytes as the numpy codec for every bit
width, scheme, group size and layout, in both builds (SSE2 and portable), at any chunk
boundary; its build cache (digest names, reuse, atomic publication) and the silent fallback to
numpy (CTFORMAT_NATIVE=0, a compiler that fails, no compiler at all). The gguf-py proofs that
the blocks dequantize to s * (q - z) run for every codec in test_gguf_blocks.py."""
from __future__ import annotations

import os
import platform
import re
import threading

import pytest
import torch

import ctformat.ggml as ggml
from ctformat import native
from ctformat.ggml import block_type_for, encode_module
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.spec import CROSS_WORD, PADDED
from gguf_peers import need_native


def scheme(bits, sym, strategy, gs=None) -> QuantScheme:
    return QuantScheme.from_json({"num_bits": bits, "symmetric": sym, "strategy": strategy,
                                  "group_size": gs if strategy == "group" else (-1 if strategy == "channel" else None)},
                                 where="t")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty build cache and no decision taken yet in this process (restored afterwards)."""
    monkeypatch.setenv("CTFORMAT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CTFORMAT_NATIVE", raising=False)
    native._forget()
    yield tmp_path / "cache"
    native._forget()


CASES = [(b, sym, strat, gs, asym) for b in range(1, 9) for sym in (True, False) if sym or b < 8
         for strat, gs in (("group", 32), ("group", 64), ("group", 128), ("channel", None), ("tensor", None))
         for asym in (("q5_0", "q4_1") if (b, sym) == (4, False) else ("q5_0",))]


@pytest.mark.parametrize("variant", ["auto", "scalar"])
@pytest.mark.parametrize("bits,sym,strategy,gs,asym", CASES)
def test_compiled_equals_numpy(bits, sym, strategy, gs, asym, variant, monkeypatch):
    """Stacked [E, out, in] modules, rows of 7 blocks at g32 (ragged against every group size and
    chunk), extreme codes included, chunks of 5 blocks: each call starts inside a scale group."""
    need_native(variant)
    gen = torch.Generator().manual_seed(bits * 31 + sym * 7 + (gs or 0))
    n_in = 384 if strategy == "group" and gs == 128 else 224 if gs in (32, None) else 192
    w = (torch.randn(3, 13, n_in, generator=gen) * 0.05).to(torch.bfloat16)
    w[0, 0, :5] = torch.tensor([-1.0, 1.0, -0.5, 0.5, 0.0]) * w.abs().max()
    s = scheme(bits, sym, strategy, gs)
    t = compress(w, s)
    btype = block_type_for(s, n_in, int4_asym=asym)
    want = encode_module(t, s, btype, native=False)
    assert torch.equal(encode_module(t, s, btype, native=variant), want)
    monkeypatch.setattr(ggml, "_NATIVE_CHUNK", 5)
    assert torch.equal(encode_module(t, s, btype, native=variant), want)


@pytest.mark.parametrize("variant", ["auto", "scalar"])
@pytest.mark.parametrize("bits", range(1, 9))
def test_padded_layout(bits, variant):
    """CT before 0.18 (padded words): 1, 2, 4 and 8 bits are the dense bytes, which the compiled
    codec reads; 3, 5, 6 and 7 bits take the numpy path. Either way the bytes equal numpy's."""
    need_native(variant)
    s = scheme(bits, True, "group", 64)
    w = (torch.randn(2, 9, 320, generator=torch.Generator().manual_seed(bits)) * 0.05).to(torch.bfloat16)
    t = compress(w, s, layout=PADDED)
    btype = block_type_for(s, 320)
    assert ggml._native_maps(bits, btype, PADDED) == (8 % bits == 0)
    assert ggml._native_maps(bits, btype, CROSS_WORD)
    want = encode_module(t, s, btype, layout=PADDED, native=False)
    assert torch.equal(encode_module(t, s, btype, layout=PADDED, native=variant), want)


def test_into_a_given_buffer():
    """`out=` (one expert's slice of a stack, a reused pipeline buffer): the codec writes exactly
    that slice."""
    need_native()
    s = scheme(4, False, "group", 32)
    t = compress((torch.randn(16, 256) * 0.05).to(torch.bfloat16), s)
    btype = block_type_for(s, 256)
    want = encode_module(t, s, btype, native=False).numpy().reshape(-1)
    whole = torch.full((3 * want.size,), 0xAA, dtype=torch.uint8).numpy()
    encode_module(t, s, btype, out=whole[want.size:2 * want.size], native=True)
    assert (whole[:want.size] == 0xAA).all() and (whole[2 * want.size:] == 0xAA).all()
    assert (whole[want.size:2 * want.size] == want).all()


def test_both_builds_are_what_they_say():
    """The SSE2 build is taken on x86-64 (its baseline) and the portable one is another library."""
    auto, scalar = native.codec(need_native("auto")), native.codec(need_native("scalar"))
    assert scalar.ctf_variant() == 1
    assert auto.ctf_variant() == (2 if platform.machine().lower() in ("x86_64", "amd64") else 1)
    assert native.library_path("auto") != native.library_path("scalar")
    assert auto.ctf_encode(None, None, 0, 0, 8, 0, None, None, None, 1, 1) == -1     # 8-bit Q4_0: not a pair


def test_cache_name_reuse_and_atomic_build(fresh, monkeypatch, tmp_path):
    need_native()
    path = native.build()
    assert path.parent == fresh
    assert re.fullmatch(r"ggml_native-auto-[0-9a-f]{16}\.so", path.name)
    stamp = path.stat().st_mtime_ns
    with monkeypatch.context() as m:                    # a cached build is reused: no compiler runs
        m.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("compiled again"))
        assert native.build() == path and path.stat().st_mtime_ns == stamp
    monkeypatch.setenv("CC", "gcc")                     # another compiler is another file
    assert native.library_path() != path
    monkeypatch.delenv("CC")
    changed = tmp_path / "ggml_native.c"                # another source is another file
    changed.write_text(native.SOURCE.read_text() + "\n/* changed */\n")
    monkeypatch.setattr(native, "SOURCE", changed)
    assert native.library_path() != path and native.library_path().parent == fresh
    monkeypatch.undo()
    monkeypatch.setenv("CTFORMAT_CACHE", str(tmp_path / "cache2"))
    got, errors = [], []

    def builder() -> None:
        try:
            got.append(native.build())
        except Exception as e:          # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=builder) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and len(set(got)) == 1
    assert sorted(os.listdir(tmp_path / "cache2")) == [got[0].name]         # no temporary file left
    assert native._load(got[0]).ctf_variant() in (1, 2)


def test_disabled_by_environment(fresh, monkeypatch):
    monkeypatch.setenv("CTFORMAT_NATIVE", "0")
    assert native.codec() is None
    s = scheme(4, True, "group", 32)
    t = compress((torch.randn(4, 64) * 0.05).to(torch.bfloat16), s)
    btype = block_type_for(s, 64)
    assert torch.equal(encode_module(t, s, btype), encode_module(t, s, btype, native=False))
    with pytest.raises(RuntimeError, match="compiled GGUF codec"):
        encode_module(t, s, btype, native=True)
    assert not fresh.exists()                           # nothing was built


@pytest.mark.parametrize("how", ["failing compiler", "no compiler"])
def test_falls_back_to_numpy_silently(fresh, monkeypatch, tmp_path, how):
    if how == "failing compiler":
        monkeypatch.setenv("CC", "false")
    else:
        monkeypatch.delenv("CC", raising=False)
        empty = tmp_path / "bin"
        empty.mkdir()
        monkeypatch.setenv("PATH", str(empty))
    s = scheme(3, False, "group", 64)
    t = compress((torch.randn(4, 128) * 0.05).to(torch.bfloat16), s)
    btype = block_type_for(s, 128)
    assert native.codec() is None
    assert torch.equal(encode_module(t, s, btype), encode_module(t, s, btype, native=False))
    assert not any(fresh.glob("*")) if fresh.exists() else True     # no library, no temporary file
