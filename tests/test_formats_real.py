"""ctformat.formats on every real checkpoint of shared/format-checkpoints (written by
llm-compressor 0.14 + compressed-tensors 0.19): decompress equals compressed-tensors 0.20's own
compressor on every quantized module, and compress of the unquantized base model reproduces the
stored tensors byte for byte."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ctformat
from conftest import FORMATS
from formats_oracle import BaseCompressor, QuantizationScheme, forward, same
from ctformat.formats import format_named, numerics
from ctformat.scheme import QuantGroup, QuantizationConfig
from ctformat.formats.dense import Dense
from ctformat.formats.sparse import Sparse24Bitmask
from ctformat.spec import EMBEDDING_NAMES

safetensors = pytest.importorskip("safetensors.torch")

ROOT = FORMATS
FOLDERS = sorted(p for p in ROOT.glob("*") if (p / "config.json").is_file())
QUANTIZED = [p for p in FOLDERS if "config_groups" in (json.loads((p / "config.json").read_text())
                                                       .get("quantization_config") or {})]
# Fused siblings share one NVFP4 global scale (llm-compressor's fused observers).
FUSED = {"q_proj": ("q_proj", "k_proj", "v_proj"), "k_proj": ("q_proj", "k_proj", "v_proj"),
         "v_proj": ("q_proj", "k_proj", "v_proj"), "gate_proj": ("gate_proj", "up_proj"),
         "up_proj": ("gate_proj", "up_proj")}



def modules(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in safetensors.load_file(path / "model.safetensors").items():
        prefix, _, suffix = name.rpartition(".")
        out.setdefault(prefix, {})[suffix] = t
    return out


def quantized(path: Path):
    """(prefix, tensors, group, the group's JSON) of every quantized Linear module."""
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    cfg = QuantizationConfig.from_json(qc)
    for prefix, ts in modules(path).items():
        last = prefix.rsplit(".", 1)[-1]
        if cfg.is_ignored(prefix) or last in EMBEDDING_NAMES or last.endswith("norm"):
            continue
        g = cfg.group_for(prefix, linear=True)
        fmt = None if g is None else format_named(cfg.group_format(g))
        if fmt is not None and fmt.root in ts:
            yield prefix, ts, g, fmt, qc["config_groups"][g.name]


@pytest.mark.parametrize("path", QUANTIZED, ids=lambda p: p.name)
def test_decompress_equals_ct_on_every_module(path):
    n = 0
    for prefix, ts, g, fmt, raw in quantized(path):
        cs = QuantizationScheme.model_validate(raw)
        comp = BaseCompressor.get_value_from_registry(raw["format"])
        want = comp.decompress({k: ts[k] for k in comp.compression_param_names(cs) if k in ts}, cs)["weight"]
        assert same(fmt.decompress(ts, g), want), prefix
        assert same(ctformat.decompress(ts, g), want), prefix           # the public API's dispatch
        n += 1
    assert n == 14


@pytest.mark.parametrize("path", [p for p in QUANTIZED if p.name != "quip-w4a16"],
                         ids=lambda p: p.name)
def test_compress_of_base_equals_stored_tensors(path):
    """ctformat.compress (dispatching on the group's format) of dense-base's weights gives the
    stored tensors byte for byte: min-max qparams as llm-compressor's observers compute them."""
    base = {p: t["weight"] for p, t in modules(ROOT / "dense-base").items() if "weight" in t}
    for prefix, ts, g, fmt, _ in quantized(path):
        kw = {}
        if g.weights.has_global_scale:
            parent, last = prefix.rsplit(".", 1)
            kw["global_scale"] = numerics.global_scale(*(base[f"{parent}.{s}"] for s in FUSED.get(last, (last,))))
        got = ctformat.compress(base[prefix], g, **kw)
        stored = {k: v for k, v in ts.items() if not k.startswith("input_")}
        assert set(got) == set(stored), prefix
        for k, v in got.items():
            assert same(v, stored[k]), f"{prefix}.{k}"


def test_dense_checkpoint_fake_quantizes_like_ct():
    path = ROOT / "w4a16-uncompressed"
    for prefix, ts, g, _, raw in quantized(path):
        cs = QuantizationScheme.model_validate(raw)
        assert same(Dense.decompress(ts, g), ts["weight"])
        want = forward.fake_quantize(ts["weight"], ts["weight_scale"], ts["weight_zero_point"], cs.weights)
        assert same(Dense.fake_quantize(ts, g), want), prefix


def test_tensor_sets_match_the_tables():
    """Every stored module holds exactly the tensors its format's table lists, with their dtypes
    and shapes (required ones all present)."""
    from ctformat.dtypes import torch_dtype
    for path in QUANTIZED:
        for prefix, ts, g, fmt, _ in quantized(path):
            specs = fmt.tensors(g, fmt.dense_shape({k: tuple(v.shape) for k, v in ts.items()})
                                if fmt.root != "weight_packed" or "weight_shape" not in ts
                                else tuple(ts["weight_shape"].tolist()))
            assert set(ts) <= set(specs), (path.name, prefix, set(ts) - set(specs))
            assert {k for k, s in specs.items() if s.required} <= set(ts), (path.name, prefix)
            for k, t in ts.items():
                assert t.dtype in [torch_dtype(d) for d in specs[k].dtypes], (path.name, prefix, k)
                assert tuple(t.shape) in specs[k].shapes, (path.name, prefix, k, tuple(t.shape))


# -- legacy sparse-24 (compressed-tensors 0.14) --------------------------------------------
_CT014_SCRIPT = """
import sys, torch
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_decompress
t = load_file(sys.argv[1]); out = {}
for k in t:
    if k.endswith(".compressed"):
        m = k[: -len(".compressed")]
        out[m] = sparse24_bitmask_decompress(t[k], t[m + ".bitmask"], t[m + ".shape"].flatten().tolist())
save_file(out, sys.argv[2])
"""


def test_legacy_sparse24_scatter_equals_ct_014(tmp_path, ct014):
    path = ROOT / "legacy-sparse24-bitmask"
    out = tmp_path / "ref.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ct014)}
    subprocess.run([sys.executable, "-c", _CT014_SCRIPT, str(path / "model.safetensors"), str(out)], check=True,
                   env=env, timeout=300, capture_output=True)
    ref = safetensors.load_file(out)
    mods = modules(path)
    assert len(ref) == 14
    for prefix, want in ref.items():
        got = format_named("sparse-24-bitmask").decompress(mods[prefix], None)
        assert same(got, want), prefix


def test_legacy_sparse24_independent_reading():
    """numpy's little-endian unpackbits (an independent reading of the bit order) and a 2:4
    pattern: at most two values kept in every four."""
    import numpy as np
    mods = modules(ROOT / "legacy-sparse24-bitmask")
    seen = 0
    for prefix, ts in mods.items():
        if "compressed" not in ts:
            continue
        shape = ts["shape"].flatten().tolist()
        mask = np.unpackbits(ts["bitmask"].numpy(), axis=-1, count=shape[1], bitorder="little").astype(bool)
        dense = Sparse24Bitmask.scatter(ts)
        assert torch.equal(dense[torch.from_numpy(mask)], ts["compressed"].flatten())
        assert not dense[~torch.from_numpy(mask)].any() and mask.reshape(-1, 4).sum(1).max() <= 2
        seen += 1
    assert seen == 14


_CT014_F16 = """
import sys, torch
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.initialize import initialize_module_for_quantization
from compressed_tensors.quantization.lifecycle.forward import dequantize
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
lin = torch.nn.Linear(t["q"].shape[1], t["q"].shape[0], bias=False)
lin.weight = torch.nn.Parameter(t["q"], requires_grad=False)
scheme = QuantizationScheme(targets=["Linear"], weights={"num_bits": 8, "type": "float", "strategy": "tensor"})
initialize_module_for_quantization(lin, scheme)      # an FP8 weight: the scale param is float16
lin.weight_scale.data.copy_(t["s"])                  # as the loader copies the stored BF16 scale
out = dequantize(lin.weight, lin.weight_scale, None, scheme.weights).to(torch.bfloat16)
save_file({"w": out, "f16": torch.tensor([lin.weight_scale.dtype == torch.float16])}, sys.argv[2])
"""


def test_sparse24_over_fp8_legacy_f16_equals_ct_014_model_path(tmp_path, ct014):
    """CT 0.14 dequantized sparse-24 FP8 through a model whose weight_scale parameter is F16
    (initialize_qparams: an FP8 weight is not a float dtype): legacy_f16=True gives its bits;
    the default gives CT 0.20's single rounding, and the two differ."""
    s = QuantGroup.from_json("t", {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                      "strategy": "tensor"}}, where="t")
    q = (torch.randn(64, 128, generator=torch.Generator().manual_seed(0)) * 30).to(torch.float8_e4m3fn)
    scale = torch.tensor([3.1e-5], dtype=torch.bfloat16)
    t = {**Sparse24Bitmask.compress(q, s), "weight_scale": scale}
    safetensors.save_file({"q": Sparse24Bitmask.scatter(t), "s": scale}, tmp_path / "in.safetensors")
    subprocess.run([sys.executable, "-c", _CT014_F16, str(tmp_path / "in.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, env={**os.environ, "PYTHONPATH": str(ct014)},
                   timeout=300, capture_output=True)
    ref = safetensors.load_file(tmp_path / "out.safetensors")
    assert bool(ref["f16"])
    legacy = Sparse24Bitmask.decompress(t, s, torch.bfloat16, legacy_f16=True)
    assert same(legacy, ref["w"])
    single = Sparse24Bitmask.decompress(t, s)
    assert same(single, format_named("float-quantized").decompress({"weight": Sparse24Bitmask.scatter(t),
                                                                     "weight_scale": scale}, s))
    assert int((single.view(torch.int16) != legacy.view(torch.int16)).sum()) > 0
