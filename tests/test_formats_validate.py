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


# -- inspect ---------------------------------------------------------------------------
# bits per weight of the 14 quantized modules (7 shapes per layer, spec/formats.md §7): the
# stored bytes of every weight tensor, scale, global scale, zero point and bitmask
BITS = {"fp8-dynamic": 8.104, "fp8-static": 8.0, "fp8-block": 8.001, "fp8-weight-only": 8.104, "w8a8-int8": 8.104,
        "w4a8-int": 8.125, "w4afp8": 8.125, "nvfp4a16": 4.501, "nvfp4": 4.501, "mxfp4a16": 4.25, "mxfp8a16": 8.25,
        "w4a16-uncompressed": 16.188, "legacy-sparse24-bitmask": 9.0, "quip-w4a16": 4.125, "w4a16-kv-fp8": 4.125}


@pytest.mark.parametrize("path", [p for p in FOLDERS if p.name != "dense-base"], ids=lambda p: p.name)
def test_inspect_counts_true_parameters_and_honest_bits(path):
    d = summarize(open_checkpoint(path))
    base = summarize(open_checkpoint(FORMATS / "dense-base"))["parameters"]["total"]
    assert d["parameters"]["total"] == base == 459392         # every format, the dense model's count
    assert d["parameters"]["quantized"] == 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 384 * 128)   # 7 Linear x 2 layers
    if path.name in BITS:
        assert d["bits_per_quantized_weight"] == pytest.approx(BITS[path.name], abs=1e-3)
    assert d["modules_quantized"] == 14 and sum(d["module_formats"].values()) == 14


def test_inspect_describes_inputs_kv_cache_transforms_and_sparsity():
    fp8 = summarize(open_checkpoint(FORMATS / "fp8-static"))
    [g] = fp8["config_groups"]
    assert g["type"] == "float" and g["input_activations"]["words"] == "float8 tensor" and not g["dynamic"]
    kv = summarize(open_checkpoint(FORMATS / "fp8-dynamic-kv-fp8"))
    assert kv["kv_cache_scheme"]["words"] == "float8 tensor" and kv["kv_cache_modules"] == [
        "model.layers.{0..1}.self_attn"] and kv["bytes"]["by_role"]["kv_cache"] == 8
    quip = summarize(open_checkpoint(FORMATS / "quip-w4a16"))
    online = [t for t in quip["transforms"] if t["online"]]
    assert [(t["scheme"], t["location"], len(t["rotation_tensors"])) for t in online] == [("u", "output", 1),
                                                                                      ("v", "input", 1)]
    sp = summarize(open_checkpoint(FORMATS / "legacy-sparse24-bitmask"))
    assert sp["sparsity"] == {"format": "sparse-24-bitmask", "targets": ["Linear"], "ignore": ["lm_head"],
                              "modules": 14}
    nv = summarize(open_checkpoint(FORMATS / "nvfp4"))
    assert nv["config_groups"][0]["input_activations"]["dynamic"] == "local"
    assert nv["bytes"]["by_role"]["activation_scales"] == 14 * 4 and nv["bytes"]["by_role"]["global_scales"] == 14 * 4


def test_vllm_mixtral_expert_names_both_ways(tmp_path):
    """Experts stored quantized under gate_proj/up_proj/down_proj and targeted by a pattern on
    those names: vLLM looks for w1/w3/w2, builds the experts dense, and the packed weights do not
    load. Targeting `Linear` (as llm-compressor does) is fine: vLLM maps it to its fused experts."""
    from conftest import FIXTURES
    src = FIXTURES / "tiny-mixtral-ct019"
    assert not [i for i in validate_checkpoint(src, target="vllm").issues if i.rule == "VLLM-06"]
    dst = tmp_path / "m"
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["targets"] = [
        "re:.*self_attn.*", "re:.*experts.*(gate|up|down)_proj$"]
    (dst / "config.json").write_text(json.dumps(cfg))
    found = [i for i in validate_checkpoint(dst, target="vllm").issues if i.rule == "VLLM-06"]
    assert found and "does not target" in found[0].message and "experts.0.w1" in found[0].message
    dense = validate_checkpoint(FIXTURES / "bad" / "VLLM-06", target="vllm").issues
    assert {i.rule for i in dense} == {"VLLM-06"} and "does not ignore" in dense[0].message
