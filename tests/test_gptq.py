"""GPTQ v1/v2 and AWQ-GEMM interchange (spec/gptq-awq.md): bit-identical round trips on every
fixture and real checkpoint, an independent closed-form reading of the GPTQ/AWQ tensors,
compressed-tensors' own AutoAWQConverter on ctformat's AWQ output, edge cases and refusals.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import FIXTURES, REAL_FOLDERS
from ctformat.awq import from_awq, to_awq
from ctformat.checkpoint import open_checkpoint
from ctformat.convert import convert
from ctformat.dtypes import dtype_code
from ctformat.errors import SpecError, UnsupportedError
from ctformat.gptq import from_gptq, to_gptq
from ctformat.gptq_config import AWQ_ORDER, GPTQ_V1, GPTQ_V2, module_scheme
from ctformat.pack import pack_to_int32
from ctformat.scheme import QuantScheme
from ctformat.spec import CROSS_WORD, PADDED, QUANTIZE_CONFIG_NAME
from ctformat.writer import save_checkpoint

GOOD = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file() and p.name != "marlin")
REAL_DIRS = [p for p in REAL_FOLDERS if p.name != "dense"]
SOURCES = GOOD + REAL_DIRS
ROLES = ("weight_scale", "weight_shape", "weight_zero_point")
DENSE = CROSS_WORD


def to_format(src, out, target, fmt=None, **kw):
    """convert --to gptq (fmt "v1"/"v2"/None) or --to awq, on the CPU."""
    opts = {"gptq_format": {GPTQ_V1: "v1", GPTQ_V2: "v2"}.get(fmt, fmt)} if target == "gptq" else {}
    return convert(src, out, to=target, device="cpu", **opts, **kw)


def to_ct(src, out, **kw):
    return convert(src, out, to="compressed-tensors", device="cpu", **kw)


# -- an independent reading: bit streams and AWQ nibbles by plain integer arithmetic ----
def stream(words: torch.Tensor, bits: int, count: int, padded: bool = False) -> torch.Tensor:
    """Values [R, count] of int32 words [R, W]: value i at bits [i*b, i*b+b) of the row's
    little-endian stream (padded: 32//b values per word, top bits unused)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    i = torch.arange(count)
    if padded:
        word, shift = i // (32 // bits), (i % (32 // bits)) * bits
        return (w[:, word] >> shift) & ((1 << bits) - 1)
    start = i * bits
    word, shift = start // 32, start % 32
    lo = w[:, word] >> shift
    nxt = torch.clamp(word + 1, max=w.shape[1] - 1)
    hi = torch.where(shift + bits > 32, w[:, nxt] << (32 - shift), torch.zeros_like(lo))
    return (lo | hi) & ((1 << bits) - 1)


def ct_values(t: dict, scheme: QuantScheme, layout: str) -> torch.Tensor:
    """float64 (u - z) * s of a CT module, read with stream()."""
    n, k = (int(v) for v in t["weight_shape"].tolist())
    b, padded = scheme.num_bits, layout == PADDED
    u = stream(t["weight_packed"], b, k, padded)
    off = 1 << (b - 1)
    s = t["weight_scale"].double()
    groups = s.shape[-1] if s.ndim == 2 else 1
    zp = t.get("weight_zero_point")
    if zp is None:
        z = torch.full((n, groups), off)
    elif zp.dtype == torch.int8:
        z = zp.to(torch.int64).reshape(-1, groups if zp.numel() > 1 else 1).expand(n, groups) + off
    else:
        z = stream(zp.T.contiguous(), b, n, padded).T
    gs = k // groups
    g = t["weight_g_idx"].long() if "weight_g_idx" in t else torch.arange(k) // gs
    s = s.reshape(-1, groups).expand(n, groups)
    return s[:, g] * (u - z[:, g])


def gptq_values(g: dict, bits: int, k: int, v1: bool) -> torch.Tensor:
    """float64 W[n, k] = s[g_idx[k], n] * (u[k, n] - z[g_idx[k], n]) of GPTQ tensors."""
    n = g["scales"].shape[-1]
    u = stream(g["qweight"].T.contiguous(), bits, k)            # [N, K]
    z = stream(g["qzeros"], bits, n) + (1 if v1 else 0)          # [G, N]
    gi = g["g_idx"].long()
    return g["scales"].double()[gi].T * (u - z[gi].T)


def awq_values(a: dict) -> torch.Tensor:
    """float64 W[n, k] of AWQ GEMM tensors: column 8c + AWQ_ORDER[i] in nibble i of word c."""
    def cols(words: torch.Tensor) -> torch.Tensor:
        nib = stream(words, 4, words.shape[1] * 8)                # nibble order
        out = torch.empty_like(nib)
        for i, col in enumerate(AWQ_ORDER):
            out[:, col::8] = nib[:, i::8]
        return out
    u, z, s = cols(a["qweight"]), cols(a["qzeros"]), a["scales"].double()
    k, groups = u.shape[0], s.shape[0]
    gi = torch.arange(k) // (k // groups)
    return (s[gi] * (u - z[gi])).T


def modules(src: Path):
    ckpt = open_checkpoint(src)
    for m in ckpt.modules().values():
        if m.quantized:
            t = {k: v for k, v in ckpt.load_module(m).items() if k != "bias"}
            yield m, t, ckpt.word_layout(m, int(t["weight_shape"][-1]))


def _dtypes(t: dict) -> dict:
    return {r: dtype_code(t[r].dtype) for r in ROLES if r in t}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# -- round trips, module by module -------------------------------------------------------
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_gptq_round_trip_and_closed_form(src):
    for m, t, layout in modules(src):
        k = int(t["weight_shape"][-1])
        want = ct_values(t, m.scheme, layout)
        for fmt in (GPTQ_V1, GPTQ_V2):
            g = to_gptq(t, m.scheme, fmt=fmt, layout=layout)
            assert g["scales"].dtype == torch.float16
            assert torch.equal(gptq_values(g, m.scheme.num_bits, k, fmt == GPTQ_V1), want), m.prefix
            _same(from_gptq(g, module_scheme(m.scheme), m.scheme, v1=fmt == GPTQ_V1, k=k, dtypes=_dtypes(t),
                            layout=layout), t)


@pytest.mark.parametrize("src", [p for p in SOURCES if p.name not in ("int3-g32-dense", "int3-g32-padded",
                                 "int8-g32", "mixed-groups", "w8a16-sym-g128", "int4-g32-actorder",
                                 "w4a16-gptq-actorder-group-g128")], ids=lambda p: p.name)
def test_awq_round_trip_and_closed_form(src):
    for m, t, layout in modules(src):
        a = to_awq(t, m.scheme, layout=layout)
        assert torch.equal(awq_values(a), ct_values(t, m.scheme, layout)), m.prefix
        _same(from_awq(a, module_scheme(m.scheme), m.scheme, dtypes=_dtypes(t), layout=layout), t)


def test_gptq_qweight_is_weight_packed_transposed():
    for m, t, layout in modules(FIXTURES / "int8-g32"):
        assert torch.equal(to_gptq(t, m.scheme)["qweight"], t["weight_packed"].T)


# -- whole checkpoints -------------------------------------------------------------------
@pytest.mark.parametrize("src", SOURCES, ids=lambda p: p.name)
def test_checkpoint_round_trip_bit_identical(src, tmp_path):
    targets = [("gptq", GPTQ_V1), ("gptq", GPTQ_V2)]
    ckpt = open_checkpoint(src)
    if all(m.scheme.num_bits == 4 and not m.scheme.has_g_idx for m in ckpt.modules().values() if m.quantized):
        targets.append(("awq", None))
    for target, fmt in targets:
        out = tmp_path / f"{target}-{fmt}"
        to_format(src, out, target, fmt)
        to_ct(out, tmp_path / f"{target}-{fmt}-ct")
        c = open_checkpoint(tmp_path / f"{target}-{fmt}-ct")
        assert c.config == ckpt.config
        assert set(c.tensors) == set(ckpt.tensors)
        for name in ckpt.tensors:
            x, y = ckpt.load(name), c.load(name)
            assert x.dtype == y.dtype and torch.equal(x, y), name
        assert not (tmp_path / f"{target}-{fmt}-ct" / "quantize_config.json").exists()


def test_gptq_output_config_and_tensors(tmp_path):
    out = tmp_path / "g"
    to_format(FIXTURES / "tiny-mixtral", out, "gptq")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == json.loads((out / "quantize_config.json").read_text())
    assert {k: qc[k] for k in ("quant_method", "bits", "group_size", "sym", "desc_act", "checkpoint_format",
                               "format")} == {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": True,
                                              "desc_act": False, "checkpoint_format": "gptq", "format": "gptq"}
    assert list(qc["dynamic"]) == [f"-:^model\\.layers\\.{i}\\.mlp\\.gate$" for i in (0, 1)]     # GPTQModel's names
    ckpt = open_checkpoint(out)
    cfg = ckpt.gptq
    m = ckpt.modules()["model.layers.0.self_attn.q_proj"]
    assert {k: (i.dtype, i.shape) for k, i in m.tensors.items()} == {
        "qweight": ("I32", (8, 64)), "qzeros": ("I32", (2, 8)), "scales": ("F16", (2, 64)), "g_idx": ("I32", (64,))}
    assert (ckpt.load(m.tensors["qzeros"].name) == 0x77777777).all()
    assert cfg.v1 and cfg.scheme_for("model.layers.0.mlp.gate") is None
    assert ckpt.load("model.embed_tokens.weight").dtype == torch.bfloat16       # dense kept as stored


def test_default_format_is_v2_for_asymmetric(tmp_path):
    to_format(FIXTURES / "int4-g32-asym", tmp_path / "g", "gptq")
    assert json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]["format"] == "gptq_v2"


# -- compressed-tensors' own AutoAWQConverter on ctformat's AWQ output ----------------------
AWQ_PEER = [FIXTURES / "int4-g32", FIXTURES / "int4-g32-asym", FIXTURES / "tiny-mixtral-ct019",
            *(p for p in REAL_DIRS if p.name in ("w4a16-asym-g128", "w4a16-sym-g128", "w4a16-asym-gptq-g128"))]


@pytest.mark.parametrize("src", AWQ_PEER, ids=lambda p: p.name)
def test_autoawq_converter_gives_source_back(src, tmp_path):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import AutoAWQConverter
    to_format(src, tmp_path / "awq", "awq", keep_names=True)     # the converter keeps names: compare by name
    convert_checkpoint(tmp_path / "awq", tmp_path / "ct", AutoAWQConverter.from_pretrained(str(tmp_path / "awq")),
                       max_workers=1, device="cpu")
    a, c = open_checkpoint(src), open_checkpoint(tmp_path / "ct")
    for m in a.modules().values():
        if not m.quantized:
            for i in m.tensors.values():
                assert torch.equal(a.load(i.name), c.load(i.name)), i.name
            continue
        t, back = a.load_module(m), c.load_module(c.modules()[m.prefix])
        assert torch.equal(back["weight_packed"], t["weight_packed"]), m.prefix
        assert back["weight_scale"].dtype == torch.float16                    # AWQ's scales, kept as stored
        assert torch.equal(back["weight_scale"].to(t["weight_scale"].dtype), t["weight_scale"])
        assert back["weight_shape"].tolist() == t["weight_shape"].tolist()
        if m.scheme.symmetric:                                                # zero_point true: zp 0 everywhere
            assert (back["weight_zero_point"] == pack_to_int32(torch.zeros(1, 8, dtype=torch.int8), 4)[0, 0]).all()
        elif t["weight_zero_point"].dtype == torch.int32:
            assert torch.equal(back["weight_zero_point"], t["weight_zero_point"]), m.prefix
        cm = c.modules()[m.prefix]
        assert torch.equal(ct_values(back, cm.scheme, DENSE), ct_values(t, m.scheme, DENSE)), m.prefix


# -- edge cases --------------------------------------------------------------------------
def _module(bits: int, n: int, k: int, *, sym: bool, strategy: str = "group", gs: int = 32, act: bool = False,
            scale_dtype=torch.bfloat16, zeros=None, seed: int = 0, zp_i8: bool = False):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    scheme = QuantScheme.from_json({"num_bits": bits, "symmetric": sym, "strategy": strategy,
                                    "group_size": gs if strategy == "group" else None,
                                    "actorder": "group" if act else None}, where="m")
    groups = -(-k // gs) if strategy == "group" else 1
    q = torch.randint(lo, hi, (n, k), generator=gen, dtype=torch.int8)
    s = (torch.rand(n, groups, generator=gen) * 0.1 + 1e-3).to(torch.float16).to(scale_dtype)
    t = {"weight_packed": pack_to_int32(q, bits), "weight_shape": torch.tensor([n, k])}
    t["weight_scale"] = s[:1, :1].reshape(1) if strategy == "tensor" else s
    if not sym:
        zp = torch.randint(lo, hi, (n, groups), generator=gen, dtype=torch.int8) if zeros is None else zeros
        if strategy == "tensor":
            t["weight_zero_point"] = zp[:1, :1].reshape(1)
        else:
            t["weight_zero_point"] = zp if zp_i8 else pack_to_int32(zp, bits, packed_dim=0)
    if act:
        t["weight_g_idx"] = torch.randint(0, groups, (k,), generator=gen, dtype=torch.int32)
    return t, scheme


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([2, 3, 4, 8]), n=st.integers(1, 40), kw=st.integers(1, 3), sym=st.booleans(),
       strategy=st.sampled_from(["group", "channel", "tensor"]), act=st.booleans(), zp_i8=st.booleans(),
       f16=st.booleans(), seed=st.integers(0, 2**16))
def test_codecs_exact_inverses(bits, n, kw, sym, strategy, act, zp_i8, f16, seed):
    k = 32 * kw                                    # N is free (not a multiple of 8 included)
    t, scheme = _module(bits, n, k, sym=sym, strategy=strategy, act=act and strategy == "group", seed=seed,
                        scale_dtype=torch.float16 if f16 else torch.bfloat16, zp_i8=zp_i8)
    want = ct_values(t, scheme, DENSE)
    for fmt in (GPTQ_V1, GPTQ_V2):
        try:
            g = to_gptq(t, scheme, fmt=fmt)
        except UnsupportedError as err:
            assert fmt == GPTQ_V1 and "QCV-04" in str(err)
            continue
        assert torch.equal(gptq_values(g, bits, k, fmt == GPTQ_V1), want)
        _same(from_gptq(g, module_scheme(scheme), scheme, v1=fmt == GPTQ_V1, k=k, dtypes=_dtypes(t)), t)
    if bits == 4 and n % 8 == 0 and not scheme.has_g_idx:
        a = to_awq(t, scheme)
        assert torch.equal(awq_values(a), want)
        _same(from_awq(a, module_scheme(scheme), scheme, dtypes=_dtypes(t)), t)


@pytest.mark.parametrize("zero", [0, 15])
def test_asymmetric_zero_extremes(zero):
    zeros = torch.full((16, 2), zero - 8, dtype=torch.int8)
    t, scheme = _module(4, 16, 64, sym=False, zeros=zeros)
    v2 = to_gptq(t, scheme, fmt=GPTQ_V2)
    assert (v2["qzeros"] == (0 if zero == 0 else -1)).all()       # 0x00000000 / 0xFFFFFFFF
    if zero == 0:
        with pytest.raises(UnsupportedError, match="QCV-04"):
            to_gptq(t, scheme, fmt=GPTQ_V1)
    else:
        assert (to_gptq(t, scheme, fmt=GPTQ_V1)["qzeros"] == -0x11111112).all()   # 0xEEEEEEEE: 14 = 15 - 1
    assert (to_awq(t, scheme)["qzeros"] == (0 if zero == 0 else -1)).all()


# The symmetric qzeros words of spec §1.2, by hand: z = 2^(b-1), v1 stores z - 1.
SYM_WORDS = {2: ([0x55555555], [0xAAAAAAAA]), 4: ([0x77777777], [0x88888888]), 8: ([0x7F7F7F7F], [0x80808080]),
             3: ([0xDB6DB6DB, 0xB6DB6DB6, 0x6DB6DB6D], [0x24924924, 0x49249249, 0x92492492])}


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_qzeros_words(bits):
    t, scheme = _module(bits, 32, 64, sym=True)
    for fmt, words in zip((GPTQ_V1, GPTQ_V2), SYM_WORDS[bits]):
        got = to_gptq(t, scheme, fmt=fmt)["qzeros"][0].tolist()
        want = [w - (1 << 32) if w >= 1 << 31 else w for w in words] * (len(got) // len(words))
        assert got == want, (fmt, [hex(w & 0xFFFFFFFF) for w in got])


def test_awq_word_order_by_hand():
    # codes u = 0..7 in columns 0..7 of input row 0: word nibbles hold columns 0,2,4,6,1,3,5,7
    q = (torch.arange(8, dtype=torch.int8) - 8).reshape(8, 1).expand(8, 32).contiguous()
    t = {"weight_packed": pack_to_int32(q, 4), "weight_shape": torch.tensor([8, 32]),
         "weight_scale": torch.ones(8, 1, dtype=torch.float16)}
    scheme = QuantScheme.from_json({"num_bits": 4, "strategy": "group", "group_size": 32}, where="m")
    a = to_awq(t, scheme)
    assert a["qweight"][0, 0].item() == 0x75316420
    assert a["qzeros"][0, 0].item() == -0x77777778                                 # 0x88888888


def test_padded_three_bit_repacked_dense():
    for m, t, layout in modules(FIXTURES / "int3-g32-padded"):
        assert layout == PADDED
        g = to_gptq(t, m.scheme, layout=layout)
        assert g["qweight"].shape[0] == 64 * 3 // 32
        _same(from_gptq(g, module_scheme(m.scheme), m.scheme, v1=True, k=64, dtypes=_dtypes(t), layout=PADDED), t)


def test_stacked_experts_codec():
    parts = [_module(4, 16, 64, sym=False, seed=i) for i in range(3)]
    scheme = parts[0][1]
    t = {k: torch.stack([p[0][k] for p in parts]) for k in ("weight_packed", "weight_scale", "weight_zero_point")}
    t["weight_shape"] = torch.tensor([3, 16, 64])
    g = to_gptq(t, scheme, fmt=GPTQ_V2)
    for e, (pe, _) in enumerate(parts):
        one = to_gptq(pe, scheme, fmt=GPTQ_V2)
        assert all(torch.equal(g[k][e], one[k]) for k in one)
    back = from_gptq(g, module_scheme(scheme), scheme, v1=False, k=64, dtypes=_dtypes(parts[0][0]))
    assert all(torch.equal(back[k], t[k]) for k in t)
    a = to_awq(t, scheme)
    assert torch.equal(a["qweight"][1], to_awq(parts[1][0], scheme)["qweight"])


# -- refusals and rules ---------------------------------------------------------------------
def _write_ct(path: Path, t: dict, scheme_json: dict, prefix="model.layers.0.mlp.down_proj") -> Path:
    qc = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.20.0", "ignore": [],
          "config_groups": {"g": {"targets": ["Linear"], "weights": scheme_json}}}
    save_checkpoint(path, {f"{prefix}.{k}": v for k, v in t.items()}, {"model_type": "llama", "quantization_config": qc})
    return path


def test_lossy_scales_refused_then_counted(tmp_path):
    t, _ = _module(4, 16, 64, sym=True)
    t["weight_scale"][0, 0] = 1.5e-6            # a bf16 value below fp16's normal range, not a multiple of 2^-24
    t["weight_scale"][3, 1] = 70000.0           # beyond fp16's largest finite value
    src = _write_ct(tmp_path / "src", t, {"num_bits": 4, "strategy": "group", "group_size": 32})
    with pytest.raises(UnsupportedError, match=r"2 scales change") as err:
        to_format(src, tmp_path / "out", "gptq")
    assert err.value.rule == "QCV-03" and err.value.option == "allow_lossy"
    assert not (tmp_path / "out").exists()
    result = to_format(src, tmp_path / "out", "gptq", allow_lossy=True)
    assert result.details["lossy_scales"] == 2 and result.details["largest_scale_change"] == float("inf")
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["ctformat"]["lossy_scales"] == 2


@pytest.mark.parametrize("case,target,rule", [
    ("actorder", "awq", "QCV-05"), ("int8", "awq", "QCV-01"), ("n12", "gptq", "QCV-02"), ("n12", "awq", "QCV-02"),
    ("zero0", "gptq-v1", "QCV-04"), ("stacked", "gptq", "QCV-06"), ("dense", "gptq", "QCV-07")])
def test_refusals(tmp_path, case, target, rule):
    kw = {"act": True} if case == "actorder" else {}
    bits, n = (8 if case == "int8" else 4), (12 if case == "n12" else 16)
    zeros = torch.full((n, 2), -8, dtype=torch.int8) if case == "zero0" else None
    t, scheme = _module(bits, n, 64, sym=case != "zero0", zeros=zeros, **kw)
    sj = {"num_bits": bits, "strategy": "group", "group_size": 32, "symmetric": case != "zero0",
          "actorder": "group" if case == "actorder" else None}
    if case == "stacked":
        t = {k: v.unsqueeze(0) for k, v in t.items() if k != "weight_shape"} | {"weight_shape": torch.tensor([1, n, 64])}
    if case == "dense":
        save_checkpoint(tmp_path / "src", {"lm_head.weight": torch.zeros(4, 4)}, {"model_type": "llama"})
        src = tmp_path / "src"
    else:
        src = _write_ct(tmp_path / "src", t, sj)
    with pytest.raises((UnsupportedError, SpecError)) as err:
        to_format(src, tmp_path / "out", "awq" if target == "awq" else "gptq", GPTQ_V1 if target == "gptq-v1" else None)
    assert err.value.rule == rule and str(err.value).endswith(f"[{rule}]")
    assert not (tmp_path / "out").exists()


def _gptq_folder(tmp_path: Path, edit, target: str = "gptq", src=FIXTURES / "int4-g32") -> Path:
    """A converted folder with edit(tensors, quantization_config) applied (to quantize_config.json too)."""
    to_format(src, tmp_path / "g", target)
    ckpt = open_checkpoint(tmp_path / "g", strict=False)
    tensors = {n: ckpt.load(n) for n in ckpt.tensors}
    config = json.loads((tmp_path / "g" / "config.json").read_text())
    edit(tensors, config["quantization_config"])
    save_checkpoint(tmp_path / "bad", tensors, config)
    if target == "gptq":
        (tmp_path / "bad" / QUANTIZE_CONFIG_NAME).write_text(json.dumps(config["quantization_config"]))
    return tmp_path / "bad"


P = "model.layers.0.self_attn.q_proj"


def _drop_provenance(t, qc):
    del qc["ctformat"]


@pytest.mark.parametrize("rule,edit", [
    ("GPTQ-08", lambda t, qc: t.__setitem__(f"{P}.qzeros", torch.full_like(t[f"{P}.qzeros"], -1))),
    ("GPTQ-08", lambda t, qc: t.__setitem__(f"{P}.qzeros", torch.full_like(t[f"{P}.qzeros"], 0x66666666))),
    ("GPTQ-07", lambda t, qc: t[f"{P}.g_idx"].__setitem__(0, 1)),
    ("GPTQ-01", lambda t, qc: qc.__setitem__("bits", 5)),
    ("GPTQ-01", lambda t, qc: qc.__setitem__("format", "gptq_v2")),
    ("GPTQ-03", lambda t, qc: t.__setitem__(f"{P}.qweight", t[f"{P}.qweight"][:, :32].contiguous())),
    ("GPTQ-02", lambda t, qc: t.pop(f"{P}.qzeros")),
    ("GPTQ-11", lambda t, qc: qc.__setitem__("sym", False)),         # the provenance says symmetric
])
def test_gptq_read_rules(tmp_path, rule, edit):
    with pytest.raises(SpecError) as err:
        to_ct(_gptq_folder(tmp_path, edit), tmp_path / "ct")
    assert err.value.rule == rule
    assert not (tmp_path / "ct").exists()


def test_foreign_gptq_reads_as_ct_with_f16_scales(tmp_path):
    src = _gptq_folder(tmp_path, _drop_provenance)
    to_ct(src, tmp_path / "ct")
    a, c = open_checkpoint(FIXTURES / "int4-g32"), open_checkpoint(tmp_path / "ct")
    assert c.config["quantization_config"]["version"] == "0.20.0"
    assert set(c.config["quantization_config"]["ignore"]) == {"lm_head", "model.layers.0.mlp.gate"}
    for m in a.modules().values():
        if m.quantized:
            back = c.load_module(c.modules()[m.prefix])
            assert back["weight_scale"].dtype == torch.float16
            assert torch.equal(ct_values(back, c.modules()[m.prefix].scheme, DENSE),
                               ct_values(a.load_module(m), m.scheme, DENSE)), m.prefix


def test_awq_zero_point_false_needs_zeros_of_eight(tmp_path):
    def edit(t, qc):
        del qc["ctformat"]
        qc["zero_point"] = False
    with pytest.raises(SpecError) as err:
        to_ct(_gptq_folder(tmp_path, edit, "awq", FIXTURES / "int4-g32-asym"), tmp_path / "ct")
    assert err.value.rule == "AWQ-06"
    assert not (tmp_path / "ct").exists()
