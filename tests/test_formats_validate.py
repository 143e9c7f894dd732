"""validate on every compressed-tensors format: the real checkpoints of fixtures/formats are
clean (deep), modules are told apart by their format's tensor set, rotation matrices are not
layers, and --target vllm says what vLLM 0.33 does with each format."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import FORMATS
from ctformat.checkpoint import open_checkpoint
from ctformat.errors import CtFormatError
from ctformat.summary import summarize
from ctformat.validate import raise_for_errors, validate_checkpoint

FOLDERS = sorted(p for p in FORMATS.iterdir() if (p / "config.json").is_file())


@pytest.mark.parametrize("path", FOLDERS, ids=lambda p: p.name)
def test_real_checkpoints_validate_clean_deep(path):
    report = validate_checkpoint(path, deep=True)
    assert report.issues == ()
    assert report.modules_checked == (0 if path.name == "dense-base" else 14)


# What vLLM 0.33 does with each real checkpoint (spec/ctformat.md §6.1), by rule.
VLLM = {"fp8-block": {"VLLM-04", "FMT-20"}, "fp8-dynamic": {"VLLM-04"}, "fp8-dynamic-kv-fp8": {"VLLM-04"},
        "fp8-static": {"VLLM-04"}, "mixed-fp8-nvfp4": {"VLLM-04"}, "nvfp4": {"VLLM-04"},
        "legacy-sparse24-bitmask": {"VLLM-07"}, "quip-w4a16": {"VLLM-08"}, "w4a16-uncompressed": {"VLLM-02"},
        "w4a8-int": {"VLLM-02"}, "w4afp8": {"VLLM-02"}}


@pytest.mark.parametrize("path", FOLDERS, ids=lambda p: p.name)
def test_vllm_profile_of_every_format(path):
    report = validate_checkpoint(path, target="vllm")
    assert {i.rule for i in report.issues} == VLLM.get(path.name, set()), [str(i) for i in report.issues]
    assert report.ok


def test_vllm_fp8_block_names_the_fused_part_vllm_refuses():
    [block] = [i for i in validate_checkpoint(FORMATS / "fp8-block", target="vllm").issues if i.rule == "FMT-20"]
    assert block.where == "model.layers.0.self_attn.k_proj" and "block_n = 128" in block.message   # k: 64 rows


def _edit(tmp_path, name, edit):
    dst = tmp_path / name
    shutil.copytree(FORMATS / name, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_vllm_int8_inputs_of_pack_quantized_run_weight_only_unless_humming(tmp_path):
    """vLLM 0.33 picks CompressedTensorsWNA8Int for pack-quantized weights with int8 dynamic
    inputs (it does find a scheme); only Humming quantizes the activations."""
    inputs = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    path = _edit(tmp_path, "w4a16-kv-fp8",
                 lambda q: q["config_groups"]["group_0"].__setitem__("input_activations", inputs))
    found = {i.rule: i.message for i in validate_checkpoint(path, target="vllm").issues}
    assert set(found) == {"VLLM-04", "FMT-04"} and "CompressedTensorsWNA8Int" in found["VLLM-04"]


def test_vllm_int8_w8a8_loads_without_a_warning():
    assert validate_checkpoint(FORMATS / "w8a8-int8", target="vllm").issues == ()


def test_rotation_matrices_are_not_linear_modules():
    ckpt = open_checkpoint(FORMATS / "quip-w4a16")
    rotations = [m for m in ckpt.modules().values() if m.rotation is not None]
    assert sorted(m.prefix.rsplit(".", 1)[1] for m in rotations) == ["u_output", "v_input"]
    assert not any(m.is_linear or m.group is not None for m in rotations)
    assert summarize(ckpt)["dense_linear_modules"] == ["lm_head"]


def test_kv_scales_and_transforms_are_found_on_the_real_checkpoints():
    kv = open_checkpoint(FORMATS / "w4a16-kv-fp8")
    assert sorted(m.prefix for m in kv.modules().values() if m.kv_cache) == [
        "model.layers.0.self_attn", "model.layers.1.self_attn"]
    quip = open_checkpoint(FORMATS / "quip-w4a16")
    q = quip.modules()["model.layers.1.mlp.down_proj"]
    assert [(t.scheme, t.location) for t in quip.transforms_of(q)] == [("u", "output"), ("v", "input")]


@pytest.mark.parametrize("suffix", ["weight_scale", "input_global_scale"])
def test_a_module_with_any_quantization_tensor_is_quantized(tmp_path, suffix):
    """A `weight` beside one tensor of a format's set is a quantized module with missing tensors
    (FMT-10), never a dense module: convert refuses it."""
    from safetensors.torch import load_file, save_file
    dst = tmp_path / "m"
    shutil.copytree(FORMATS / "nvfp4", dst)
    t = load_file(dst / "model.safetensors")
    p = "model.layers.0.mlp.up_proj"
    keep = {k: v for k, v in t.items() if not k.startswith(p + ".")}
    keep[f"{p}.weight"] = t["model.layers.0.mlp.up_proj.weight_packed"]
    keep[f"{p}.{suffix}"] = t[f"{p}.{suffix}"]
    save_file(keep, dst / "model.safetensors", metadata={"format": "pt"})
    ckpt = open_checkpoint(dst)
    assert ckpt.modules()[p].quantized
    report = validate_checkpoint(dst)
    assert [i.rule for i in report.issues] == ["FMT-10"] and "weight_packed" in report.issues[0].message
    with pytest.raises(CtFormatError):
        raise_for_errors(ckpt)
