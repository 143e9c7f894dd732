"""ggml block codec (spec/gguf.md §1-§2) against gguf-py's own dequantization: every block type's
values equal s * (q - z) in float64 exactly, on the fixtures, the real llm-compressor
checkpoints and random modules of every bit width."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ctformat.checkpoint import open_checkpoint
from ctformat.errors import GGUFRefusal
from ctformat.ggml import (BLOCK_TYPES, block_type_for, check_fp16, check_g_idx, check_zero_points, decode,
                           dequantize_blocks, encode, encode_module, minimums, signed_zero_points)
from ctformat.pack import pack_to_int32
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from gguf_peers import CODECS, codec_arg, ct_dirs, float64_weight, need

gguf = need("gguf")


def peer_dequant(raw: torch.Tensor, name: str) -> np.ndarray:
    return gguf.quants.dequantize(raw.numpy(), gguf.GGMLQuantizationType[name]).astype(np.float64)


def scheme(bits=4, sym=True, strategy="group", gs=32, actorder=None) -> QuantScheme:
    return QuantScheme.from_json({"num_bits": bits, "symmetric": sym, "strategy": strategy,
                                  "group_size": gs if strategy == "group" else (-1 if strategy == "channel" else None),
                                  "actorder": actorder}, where="t")


def test_table_agrees_with_gguf_py():
    for t in BLOCK_TYPES.values():
        qtype = gguf.GGMLQuantizationType[t.name]
        assert int(qtype) == t.type_id
        assert gguf.GGML_QUANT_SIZES[qtype] == (t.block_size, t.type_size)


def test_nibble_order_example():
    """spec/gguf.md §1: codes 0..15 then 15..0 give qs 0xF0, 0xE1, ..., 0x0F; CT's bytes differ."""
    u = torch.tensor([*range(16), *range(15, -1, -1)], dtype=torch.int8)
    ct_bytes = pack_to_int32((u - 8).reshape(1, 32), 4).view(torch.uint8).reshape(-1)
    assert ct_bytes.tolist() == [0x10, 0x32, 0x54, 0x76, 0x98, 0xba, 0xdc, 0xfe,
                                 0xef, 0xcd, 0xab, 0x89, 0x67, 0x45, 0x23, 0x01]
    raw = encode((u - 8).reshape(1, 32), torch.tensor([[0.5]]), BLOCK_TYPES["Q4_0"])
    assert raw.shape == (1, 18)
    assert raw[0, :2].view(torch.float16).item() == 0.5
    assert raw[0, 2:].tolist() == [0xF0 | 0] + [(15 - j) << 4 | j for j in range(1, 16)]
    assert raw[0, 2] == 0xF0 and raw[0, 3] == 0xE1 and raw[0, 17] == 0x0F
    assert peer_dequant(raw, "Q4_0").reshape(-1).tolist() == ((u.double() - 8) * 0.5).tolist()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("folder", ct_dirs(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_checkpoints_exact_in_gguf_py(folder, codec):
    """Every quantized module of every fixture and real checkpoint: repacked blocks read back by
    gguf-py equal float64 s * (q - z), by every codec; act-order that reorders columns is refused (GCV-03)."""
    native = codec_arg(codec)
    ckpt = open_checkpoint(folder)
    seen = 0
    for m in ckpt.modules().values():
        if not m.quantized or m.is_marlin:
            continue
        t = ckpt.load_module(m)
        n_in = int(t["weight_shape"][-1])
        layout = ckpt.word_layout(m, n_in)
        btype = block_type_for(m.scheme, n_in, where=m.prefix)
        if "weight_g_idx" in t and not torch.equal(t["weight_g_idx"].long(), torch.arange(n_in) // m.scheme.group_size):
            with pytest.raises(GGUFRefusal, match=r"GCV-03"):
                check_g_idx(t["weight_g_idx"], m.scheme.group_size, m.prefix)
            continue
        assert check_fp16(t["weight_scale"]).exact
        raw = encode_module(t, m.scheme, btype, layout=layout, native=native)
        want = float64_weight(t, m.scheme, layout)
        assert raw.shape == (*want.shape[:-1], n_in // 32 * btype.type_size)
        assert np.array_equal(peer_dequant(raw, btype.name).reshape(want.shape), want.numpy()), m.prefix
        seen += 1
    assert seen or "actorder" in folder.name


CASES = [(b, sym, strat) for b in range(1, 9) for sym in (True, False) for strat in ("group", "channel", "tensor")
         if sym or b < 8]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bits,sym,strategy", CASES)
def test_every_width_exact(bits, sym, strategy, codec):
    """Random stacked [E, out, in] modules of every width/symmetry/strategy (int8 -128 included),
    by every codec."""
    gen = torch.Generator().manual_seed(bits * 7 + sym)
    s = scheme(bits, sym, strategy, gs=64)
    w = (torch.randn(3, 16, 128, generator=gen) * 0.05).to(torch.bfloat16)
    w[0, 0, 0] = -w.abs().max()             # the extreme code (-2^(b-1) for symmetric)
    t = compress(w, s)
    btype = block_type_for(s, 128)
    assert btype.name == {1: "Q4_0", 2: "Q4_0", 3: "Q4_0", 4: "Q4_0" if sym else "Q5_0", 5: "Q5_0" if sym else "Q8_0",
                          6: "Q8_0", 7: "Q8_0", 8: "Q8_0"}[bits]
    check_zero_points(signed_zero_points(t, s) if not sym else torch.zeros(1), s, btype)
    raw = encode_module(t, s, btype, native=codec_arg(codec))
    want = float64_weight(t, s, "dense")
    assert np.array_equal(peer_dequant(raw, btype.name).reshape(want.shape), want.numpy())
    assert torch.equal(dequantize_blocks(raw, btype), want)          # our reader agrees with gguf-py's
    v, d, _ = decode(raw, btype)
    assert torch.equal(d.double(), t["weight_scale"].double().expand(3, 16, -1)
                       .repeat_interleave(2 if strategy == "group" else 4, -1)[..., :4])
    if bits == 8:
        assert int(v.min()) == -128


@pytest.mark.parametrize("codec", CODECS)
def test_q4_1_exact_where_the_minimum_is(codec):
    """Q4_1 (int4_asym=q4_1): d*u + m, exact in exactly the blocks whose fp16(-s*z_u) is exact;
    GCV-04 without --allow-lossy."""
    s = scheme(4, False, "group", 32)
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(64, 256, generator=gen) * 0.05).to(torch.bfloat16)
    t = compress(w, s)
    btype = block_type_for(s, 256, int4_asym="q4_1")
    assert btype.name == "Q4_1"
    check = check_fp16(minimums(t["weight_scale"], signed_zero_points(t, s), 4))
    assert check.refusal("m").rule == "GCV-04"
    raw = encode_module(t, s, btype, native=codec_arg(codec))
    got = peer_dequant(raw, "Q4_1").reshape(64, 8, 32)
    want = float64_weight(t, s, "dense").numpy().reshape(64, 8, 32)
    z_u = compress(w, s, packed_zero_point=False)["weight_zero_point"].double() + 8
    m_true = -t["weight_scale"].double() * z_u
    m_exact = (m_true.half().double() == m_true).numpy()
    assert check.count == int((~m_exact).sum()) > 0 and 0 < check.max_rel_error < 2 ** -11
    assert np.array_equal(got[m_exact], want[m_exact])
    assert (np.abs(got - want).max(-1)[~m_exact] > 0).all()
    assert np.abs(got - want).max() <= 15 * float(t["weight_scale"].float().max()) * 2 ** -12


def test_refusals():
    w = torch.randn(8, 64).to(torch.bfloat16)
    with pytest.raises(GGUFRefusal, match=r"group_size 16.*GCV-02"):
        block_type_for(scheme(4, True, "group", 16), 64, where="m")
    with pytest.raises(GGUFRefusal, match=r"in_features 48.*GCV-02"):
        block_type_for(scheme(4, True, "channel"), 48)
    with pytest.raises(GGUFRefusal, match=r"asymmetric 8-bit.*GCV-05"):
        block_type_for(scheme(8, False), 64)
    with pytest.raises(GGUFRefusal, match=r"GCV-06"):
        block_type_for(scheme(4, False), 64, int4_asym="q4_k")
    s = scheme(4, True, "group", 32, actorder="group")
    ident = torch.arange(64, dtype=torch.int32) // 32
    t = compress(w, s, g_idx=ident)
    check_g_idx(t["weight_g_idx"], 32, "m")                           # identity act-order is fine
    with pytest.raises(GGUFRefusal, match=r"column 0 in group 1, not 0.*GCV-03"):
        check_g_idx(ident.flip(0).contiguous(), 32, "m")
    s = scheme(4, True, "group", 32)
    t = compress(w, s)
    t["weight_scale"] = t["weight_scale"].clone()
    t["weight_scale"][3, 1] = 2.0 ** -20 * 1.5078125          # bf16 subnormal in fp16, not a multiple of 2^-24
    with pytest.raises(GGUFRefusal, match=r"^m: 1 of 16 scales change in fp16, the first at \[3, 1\] .*\[GCV-04\]$"):
        raise check_fp16(t["weight_scale"]).refusal("m")
    s = scheme(4, False, "group", 32)
    t = compress(w, s, packed_zero_point=False)
    z = t["weight_zero_point"].clone()
    check_zero_points(z, s, BLOCK_TYPES["Q5_0"], "m")
    z[0, 0] = 12                                               # outside int4: q - z leaves Q5_0's range
    with pytest.raises(GGUFRefusal, match=r"^m: zero points span \[.*, 12\].*\[GCV-07\]$"):
        check_zero_points(z, s, BLOCK_TYPES["Q5_0"], "m")


def test_fp16_rule_boundaries():
    """bf16 scales: exact in the fp16 normal range up to 65280, below it only multiples of 2^-24."""
    bf = torch.tensor([2.0 ** -14, 65280.0, 65536.0, 2.0 ** -24 * 3, 2.0 ** -20 * 1.5078125, 1.0 / 3],
                      dtype=torch.bfloat16)
    exact = [check_fp16(x.reshape(1)).exact for x in bf]
    assert exact == [True, True, False, True, False, True]
    c = check_fp16(bf)
    assert c.count == 2 and c.first_index == (2,) and c.max_rel_error == float("inf")
    assert check_fp16(torch.tensor([1 / 3], dtype=torch.float32)).max_rel_error < 2 ** -11


@pytest.mark.parametrize("bits,sym,strategy,asym", [
    (4, True, "group", "q5_0"), (4, True, "channel", "q5_0"), (8, True, "group", "q5_0"), (8, True, "tensor", "q5_0"),
    (4, False, "group", "q5_0"), (4, False, "channel", "q5_0"), (4, False, "group", "q4_1"),
    (3, True, "group", "q5_0"), (3, False, "group", "q5_0"), (2, True, "channel", "q5_0"), (5, True, "group", "q5_0"),
    (6, False, "group", "q5_0"), (7, True, "tensor", "q5_0"), (1, False, "group", "q5_0")])
@pytest.mark.parametrize("codec", CODECS)
def test_byte_path_equals_value_path(bits, sym, strategy, asym, codec):
    """Blocks are built from the packed words directly (lane arithmetic per scheme, numpy or
    compiled); the plain path through unpacked values (module_values, then encode) gives the same bytes."""
    from ctformat.ggml import module_values
    s = scheme(bits, sym, strategy, gs=128)
    w = (torch.randn(2, 24, 256, generator=torch.Generator().manual_seed(bits)) * 0.05).to(torch.bfloat16)
    t = compress(w, s)
    btype = block_type_for(s, 256, int4_asym=asym)
    fast = encode_module(t, s, btype, native=codec_arg(codec))
    v, d, z_u = module_values(t, s)
    if btype.name == "Q4_1":                 # stores u = (q - z) + z_u and m = -s z_u
        u = (v.unflatten(-1, (-1, 32)) + z_u.unsqueeze(-1)).flatten(-2)
        assert torch.equal(fast, encode(u, d, btype, minimums(d, z_u - 8, 4)))
    else:
        assert torch.equal(fast, encode(v, d, btype))


@pytest.mark.parametrize("bits,sym", [(4, True), (8, True), (4, False), (3, True), (3, False), (2, False), (1, True)])
@pytest.mark.parametrize("codec", CODECS[:2])
def test_worker_threads_give_the_serial_bytes(bits, sym, codec, monkeypatch):
    """A module of many chunks goes through the worker threads; the blocks equal the one-thread
    run and gguf-py's reading of them equals s * (q - z)."""
    import ctformat.ggml as ggml
    native = codec_arg(codec)
    s = scheme(bits, sym, "group", gs=128)
    w = (torch.randn(2, 256, 8192, generator=torch.Generator().manual_seed(bits)) * 0.05).to(torch.bfloat16)
    t = compress(w, s)
    btype = block_type_for(s, 8192)
    monkeypatch.setattr(ggml, "_workers", lambda: 3)
    monkeypatch.setattr(ggml, "_NATIVE_CHUNK", 999)      # many calls, each starting inside a scale group
    threaded = encode_module(t, s, btype, native=native)
    monkeypatch.setattr(ggml, "_workers", lambda: 1)
    assert torch.equal(threaded, encode_module(t, s, btype, native=native))
    want = float64_weight(t, s, "dense")
    assert np.array_equal(peer_dequant(threaded, btype.name).reshape(want.shape), want.numpy())


def test_fp16_cast_of_scales_is_torch_s_bit_for_bit():
    """d = fp16(s), cast slice by slice, equals torch's .to(float16) of the whole tensor for every
    bfloat16 value and for float32 bit patterns of every kind (ties, subnormals, overflow, NaN
    payloads), across slice boundaries."""
    from ctformat.ggml import _fp16_bits
    every_bf16 = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    f32 = torch.cat([torch.randint(-2**31, 2**31 - 1, (1 << 20,), generator=gen, dtype=torch.int32),
                     (torch.arange(-4096, 4096, dtype=torch.int32) << 13) + 0x38000000 + 4096,     # fp16 ties
                     torch.arange(0x33000000, 0x33000000 + 65536, 16, dtype=torch.int32)]).view(torch.float32)
    for x in (every_bf16, f32, f32.to(torch.float16)):
        want = x.to(torch.float16).view(torch.int16).numpy().view(np.uint16)
        assert np.array_equal(_fp16_bits(x), want), x.dtype
