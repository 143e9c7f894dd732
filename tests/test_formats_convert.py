"""convert --to dense on every compressed-tensors format, end to end: the output of every
fixtures/formats checkpoint holds, for each quantized module, what compressed-tensors 0.20's
own compressor decompresses (the dense format: its fake quantization, or the stored weight with
--keep-originals; legacy sparse-24: compressed-tensors 0.14's scatter; rotations folded in, which
gives compressed-tensors' own transform application's logits), every other tensor unchanged,
and transformers loads it with no missing or unexpected key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import BAD, FORMATS, tree_snapshot
from formats_oracle import BaseCompressor, QuantizationScheme, forward, same
from ctformat.checkpoint import open_checkpoint
from ctformat.convert import convert_to_dense, dequantize_checkpoint
from ctformat.errors import CtFormatError
from ctformat.spec import ACTIVATION_PARAMS, KV_PARAMS

safetensors = pytest.importorskip("safetensors.torch")
transformers = pytest.importorskip("transformers")

FOLDERS = sorted(p for p in FORMATS.iterdir() if (p / "config.json").is_file())
QUANTIZED = [p for p in FOLDERS if p.name != "dense-base"]


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.load_file(path / "model.safetensors")


def _ct_reference(path: Path) -> dict[str, torch.Tensor]:
    """What compressed-tensors 0.20 gives for every quantized module of `path` (its compressor's
    decompress; the dense format's forward fake quantization), keyed `M.weight`."""
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    ckpt = open_checkpoint(path)
    stored = _tensors(path)
    out = {}
    for m in ckpt.modules().values():
        if not m.quantized:
            continue
        raw = qc["config_groups"][m.group.name]
        cs = QuantizationScheme.model_validate(raw)
        ts = {k: stored[f"{m.prefix}.{k}"] for k in m.tensors}
        if raw["format"] == "dense":
            want = forward.fake_quantize(ts["weight"], ts["weight_scale"], ts.get("weight_zero_point"), cs.weights)
        else:
            comp = BaseCompressor.get_value_from_registry(raw["format"])
            want = comp.decompress({k: ts[k] for k in comp.compression_param_names(cs) if k in ts}, cs)["weight"]
        out[f"{m.prefix}.weight"] = want
    return out


@pytest.fixture(scope="module")
def dense_outputs(tmp_path_factory):
    """convert --to dense of every checkpoint, through the CLI's library entry point."""
    root = tmp_path_factory.mktemp("dense")
    return {p.name: (convert_to_dense(p, root / p.name, device="cpu"), root / p.name) for p in FOLDERS}


@pytest.mark.parametrize("path", [p for p in QUANTIZED if p.name not in ("quip-w4a16", "legacy-sparse24-bitmask")],
                         ids=lambda p: p.name)
def test_dense_output_equals_compressed_tensors(path, dense_outputs):
    _, out = dense_outputs[path.name]
    got, src = _tensors(out), _tensors(path)
    want = _ct_reference(path)
    assert len(want) == 14
    for name, w in want.items():
        assert same(got[name], w.to(torch.bfloat16)), name
    ckpt = open_checkpoint(path)
    plain = {i.name for m in ckpt.modules().values() if not m.quantized for i in m.tensors.values()}
    for name in plain:
        assert same(got[name], src[name]), name            # copied byte for byte (kv-cache scales included)
    assert set(got) == set(want) | plain


def test_dense_format_keep_originals_writes_the_stored_weights(tmp_path):
    path = FORMATS / "w4a16-uncompressed"
    got = dequantize_checkpoint(path, device="cpu", originals=True)
    src = _tensors(path)
    for name, t in got.items():
        assert same(t, src[name]), name
    fake = dequantize_checkpoint(path, device="cpu")
    assert not same(fake["model.layers.0.mlp.up_proj.weight"], src["model.layers.0.mlp.up_proj.weight"])


_CT014 = """
import sys
from safetensors.torch import load_file, save_file
from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import sparse24_bitmask_decompress
t = load_file(sys.argv[1]); out = {}
for k in t:
    if k.endswith(".compressed"):
        m = k[: -len(".compressed")]
        out[m + ".weight"] = sparse24_bitmask_decompress(t[k], t[m + ".bitmask"], t[m + ".shape"].flatten().tolist())
save_file(out, sys.argv[2])
"""


def test_legacy_sparse_dense_output_equals_compressed_tensors_014(dense_outputs, tmp_path, ct014):
    path = FORMATS / "legacy-sparse24-bitmask"
    ref = tmp_path / "ref.safetensors"
    subprocess.run([sys.executable, "-c", _CT014, str(path / "model.safetensors"), str(ref)], check=True,
                   env={**os.environ, "PYTHONPATH": str(ct014)}, timeout=300, capture_output=True)
    got = _tensors(dense_outputs[path.name][1])
    want = safetensors.load_file(ref)
    assert len(want) == 14
    for name, w in want.items():
        assert same(got[name], w), name


@pytest.mark.parametrize("path", FOLDERS, ids=lambda p: p.name)
def test_transformers_loads_every_dense_output(path, dense_outputs):
    """No missing key, and no unexpected one but the kv-cache scales, which transformers 5.x with
    compressed-tensors 0.20 reports for the source checkpoints themselves (its attention modules
    take no kv-cache quantization)."""
    from transformers import AutoModelForCausalLM
    out = dense_outputs[path.name][1]
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    kv = {n for n in _tensors(out) if n.rpartition(".")[2] in KV_PARAMS}
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    assert info["unexpected_keys"] == kv
    if kv:
        _, src = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
        assert src["unexpected_keys"] == kv                  # the source: the same keys unexpected


@pytest.mark.parametrize("name", ["fp8-dynamic-kv-fp8", "w4a16-kv-fp8"])
def test_kv_cache_is_kept_with_its_scheme_or_dropped(name, dense_outputs, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from transformers import AutoModelForCausalLM
    from ctformat.validate import validate_checkpoint
    result, out = dense_outputs[name]
    src_q = json.loads((FORMATS / name / "config.json").read_text())["quantization_config"]
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    assert q["kv_cache_scheme"] == src_q["kv_cache_scheme"] and q["config_groups"] == {}
    assert QuantizationConfig.model_validate(q).kv_cache_scheme is not None     # compressed-tensors reads it
    report = validate_checkpoint(out, deep=True)
    assert report.issues == () and report.modules_checked == 0
    dropped = tmp_path / "dropped"
    r = convert_to_dense(FORMATS / name, dropped, device="cpu", drop_kv_cache=True)
    assert "quantization_config" not in json.loads((dropped / "config.json").read_text())
    assert not any(n.endswith(KV_PARAMS) for n in _tensors(dropped)) and r.details["tensors_dropped"] == 4
    _, info = AutoModelForCausalLM.from_pretrained(dropped, output_loading_info=True)
    assert info["unexpected_keys"] == info["missing_keys"] == set()


def test_activation_scales_are_read_and_not_written(dense_outputs):
    result, out = dense_outputs["nvfp4"]
    assert result.details["tensors_dropped"] == 14 and result.modules == 14
    assert not any(n.rpartition(".")[2] in ACTIVATION_PARAMS for n in _tensors(out))


def test_folded_rotations_give_compressed_tensors_transform_logits(dense_outputs):
    """quip-w4a16 as compressed-tensors computes it (its transform application: online u/v
    Hadamards around the dequantized rotated weights) against the folded dense output, at float32."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from transformers import AutoConfig, AutoModelForCausalLM
    from ctformat.dequant import dequantize_module
    path = FORMATS / "quip-w4a16"
    ckpt = open_checkpoint(path)
    cfg = json.loads((path / "config.json").read_text())
    online = {"config_groups": {n: dict(s, apply=[a for a in s["apply"] if a["location"] in ("input", "output")])
                                for n, s in cfg.pop("quantization_config")["transform_config"]["config_groups"].items()}}
    conf = AutoConfig.for_model(**cfg)
    state = {}
    for m in ckpt.modules().values():
        if m.quantized:
            state[f"{m.prefix}.weight"] = dequantize_module(ckpt, m).float()
        elif m.rotation is None:
            state.update({f"{m.prefix}.{k}": ckpt.load(i.name).float() for k, i in m.tensors.items()})
    rotated = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    rotated.load_state_dict(state, strict=True)
    apply_transform_config(rotated, TransformConfig.model_validate(online))
    stored = {m.rotation.tensor_name: ckpt.load(m.tensors["weight"].name) for m in ckpt.modules().values()
              if m.rotation is not None}
    hooked = 0
    for mod in rotated.modules():
        for tname, w in stored.items():
            if hasattr(mod, tname):
                getattr(mod, tname).weight.data.copy_(w)      # the checkpoint's rotations, not new random ones
                hooked += 1
    assert hooked == 28
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    folded = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    folded.load_state_dict(dequantize_checkpoint(path, dtype=torch.float32, device="cpu"), strict=True)
    unfolded = AutoModelForCausalLM.from_config(conf, dtype=torch.float32)
    unfolded.load_state_dict(state, strict=True)
    with torch.no_grad():
        want, got, wrong = rotated(ids).logits, folded(ids).logits, unfolded(ids).logits
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert (wrong - want).abs().max() > 0.1 * want.abs().max()      # the rotations matter
    written = _tensors(dense_outputs["quip-w4a16"][1])
    assert not any("_input" in n or "_output" in n for n in written)
    assert "transform_config" not in json.loads((dense_outputs["quip-w4a16"][1] / "config.json").read_text())


@pytest.mark.parametrize("rule", ["VLLM-08", "FMT-22"])
def test_refused_before_anything_is_written(rule, tmp_path):
    """An attention-side rotation (DCV-01) and marlin-24 (FMT-22) are refused, leaving nothing."""
    before = tree_snapshot(BAD / rule)
    with pytest.raises(CtFormatError) as e:
        convert_to_dense(BAD / rule, tmp_path / "out", device="cpu")
    assert e.value.rule == ("DCV-01" if rule == "VLLM-08" else "FMT-22")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []
    assert tree_snapshot(BAD / rule) == before


def test_folded_and_dropped_tensors_give_the_same_bytes_with_workers(dense_outputs, tmp_path):
    """Rotations are read by the steps that fold them (check_plan's dropped tensors), so worker
    processes, each with its own plan, write the single process's bytes."""
    from ctformat.convert import convert
    out = tmp_path / "w"
    convert(FORMATS / "quip-w4a16", out, to="dense", workers=2)
    single = dense_outputs["quip-w4a16"][1]
    assert (out / "model.safetensors").read_bytes() == (single / "model.safetensors").read_bytes()
