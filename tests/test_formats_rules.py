"""The rule catalogue of spec/formats.md §9 and the header checks of ctformat.formats.rules:
every real checkpoint passes with no problem, and each broken header yields exactly its rule."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import FORMATS
from ctformat.formats import format_named
from ctformat.formats.rules import check_module, check_values
from ctformat.header import read_header
from ctformat.scheme import QuantGroup, QuantizationConfig
from ctformat.spec import EMBEDDING_NAMES

REPO = Path(__file__).resolve().parents[1]
ROOT = FORMATS


def test_tables_import_without_torch():
    code = ("import sys, ctformat.formats, ctformat.formats.rules;"
            "from ctformat.formats import format_named;"
            "from ctformat.scheme import QuantGroup;"
            "s = QuantGroup.from_json('g', {'targets': ['Linear'], 'weights': {'num_bits': 8, 'type': 'float'}}, where='x');"
            "format_named('float-quantized').tensors(s, (4, 4));"
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})


def header_modules(path: Path):
    infos, _ = read_header(path / "model.safetensors", "model.safetensors")
    mods: dict[str, dict] = {}
    for name, info in infos.items():
        prefix, _, suffix = name.rpartition(".")
        mods.setdefault(prefix, {})[suffix] = (info.dtype, info.shape)
    return mods


FOLDERS = sorted(p for p in ROOT.glob("*") if (p / "config.json").is_file())


@pytest.mark.parametrize("path", [p for p in FOLDERS if p.name != "dense-base"], ids=lambda p: p.name)
def test_real_checkpoints_have_no_problem(path):
    cfg = QuantizationConfig.from_json(json.loads((path / "config.json").read_text())["quantization_config"])
    checked = 0
    for prefix, ts in header_modules(path).items():
        last = prefix.rsplit(".", 1)[-1]
        linear = last not in EMBEDDING_NAMES and not last.endswith("norm")
        g = None if cfg.is_ignored(prefix) else cfg.group_for(prefix, linear=linear)
        name = cfg.sparsity.format if cfg.sparse_targets(prefix, linear=linear) else (
            cfg.group_format(g) if g is not None else None)
        if name is None or format_named(name).root not in ts:
            continue
        assert check_module(format_named(name), g, ts, where=prefix) == []
        checked += 1
    assert checked == 14


def scheme(weights, inputs=None):
    obj = {"targets": ["Linear"], "weights": weights}
    if inputs is not None:
        obj["input_activations"] = inputs
    return QuantGroup.from_json("t", obj, where="t")


FP8_STATIC = scheme({"num_bits": 8, "type": "float", "strategy": "tensor"},
                    {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False})
NVFP4_W4A4 = scheme({"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                     "scale_dtype": "torch.float8_e4m3fn"},
                    {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                     "dynamic": "local"})
BLOCK = scheme({"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]})
GOOD = {
    "float-quantized": (FP8_STATIC, {"weight": ("F8_E4M3", (64, 256)), "weight_scale": ("BF16", (1,)),
                                     "input_scale": ("BF16", (1,))}),
    "nvfp4-pack-quantized": (NVFP4_W4A4, {"weight_packed": ("U8", (64, 128)), "weight_scale": ("F8_E4M3", (64, 16)),
                                          "weight_global_scale": ("F32", (1,)), "input_global_scale": ("F32", (1,))}),
    "naive-quantized": (BLOCK, {"weight": ("F8_E4M3", (3, 200, 320)), "weight_scale": ("BF16", (3, 2, 3))}),
}
BROKEN = [  # (format, change, expected rule)
    ("float-quantized", lambda t: t.pop("input_scale"), "FMT-10"),
    ("float-quantized", lambda t: t.update(weight_zero_point=("I8", (1,))), "FMT-11"),
    ("float-quantized", lambda t: t.update(weight=("I8", (64, 256))), "FMT-12"),
    ("float-quantized", lambda t: t.update(weight=("F8_E4M3", (64,))), "FMT-13"),
    ("float-quantized", lambda t: t.update(weight_scale=("F8_E4M3", (1,))), "FMT-14"),
    ("float-quantized", lambda t: t.update(weight_scale=("BF16", (64, 1))), "FMT-15"),
    ("float-quantized", lambda t: t.update(input_scale=("BF16", (256,))), "FMT-18"),
    ("nvfp4-pack-quantized", lambda t: t.pop("input_global_scale"), "FMT-10"),   # dynamic "local" still stores it
    ("nvfp4-pack-quantized", lambda t: t.update(weight_global_scale=("BF16", (1,))), "FMT-17"),
    ("nvfp4-pack-quantized", lambda t: t.update(weight_scale=("U8", (64, 16))), "FMT-14"),
    ("nvfp4-pack-quantized", lambda t: t.update(weight_packed=("U8", (64, 124)), weight_scale=("F8_E4M3", (64, 16))),
     "FMT-19"),
    ("naive-quantized", lambda t: t.update(weight_scale=("BF16", (3, 2, 2))), "FMT-15"),
]


@pytest.mark.parametrize("fmt,change,rule", BROKEN, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(BROKEN)])
def test_broken_header_gives_its_rule(fmt, change, rule):
    s, good = GOOD[fmt]
    assert check_module(format_named(fmt), s, good, where="m") == []
    bad = dict(good)
    change(bad)
    problems = check_module(format_named(fmt), s, bad, where="m")
    assert [p.rule for p in problems] == [rule], [str(p) for p in problems]
    assert str(problems[0]).endswith(f"[{rule}]")


def test_value_checks():
    import torch
    s = scheme({"num_bits": 8, "type": "float", "strategy": "channel"})
    q = torch.zeros(4, 8, dtype=torch.uint8)
    q[0, 0] = 0x7F
    t = {"weight": q.view(torch.float8_e4m3fn), "weight_scale": torch.tensor([[1.0], [0.0], [float("nan")], [2.0]])}
    assert [p.rule for p in check_values(format_named("float-quantized"), s, t, where="m")] == ["FMT-30", "FMT-31"]
    w4 = scheme({"num_bits": 4, "type": "int", "strategy": "channel"})
    t = {"weight": torch.tensor([[-8, 7, 8]], dtype=torch.int8), "weight_scale": torch.ones(1, 1)}
    assert [p.rule for p in check_values(format_named("int-quantized"), w4, t, where="m")] == ["FMT-33"]
    mx = scheme({"num_bits": 4, "type": "float", "group_size": 32, "scale_dtype": "torch.uint8"})
    t = {"weight_packed": torch.zeros(1, 16, dtype=torch.uint8),
         "weight_scale": torch.tensor([[255]], dtype=torch.uint8)}
    assert [p.rule for p in check_values(format_named("mxfp4-pack-quantized"), mx, t, where="m")] == ["FMT-30"]


CONFIG_ERRORS = [  # (group, top-level format, rule)
    ({"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 16}}, "float-quantized", "FMT-01"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}, "mixed-precision", "CFG-03"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}, "mxfp6-pack-quantized", "CFG-03"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}, "sparse-24-bitmask", "CFG-03"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"}}, "awq-packed", "CFG-03"),
    ({"targets": ["Linear"], "weights": {"num_bits": 6, "type": "float", "group_size": 32}}, "mxfp6-pack-quantized",
     "CFG-05"),
    ({"targets": ["Linear"], "weights": {"num_bits": 4, "type": "int", "group_size": 128,
                                         "scale_dtype": "torch.float8_e4m3fn"}}, "pack-quantized", "FMT-01"),
    ({"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float", "group_size": 16, "symmetric": False}},
     "nvfp4-pack-quantized", "FMT-01"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "group_size": 32}}, "mxfp8-quantized",
     "FMT-01"),
    ({"targets": ["Linear"], "weights": {"num_bits": 5, "type": "float"}}, "float-quantized", "CFG-05"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": "block"}}, "float-quantized",
     "FMT-02"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "dynamic": "local"}}, "float-quantized",
     "FMT-02"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "scale_dtype": "torch.nope"}},
     "float-quantized", "CFG-06"),
    ({"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float"},
      "input_activations": {"num_bits": 8, "type": "float", "strategy": "channel"}}, "float-quantized", "FMT-02"),
]


@pytest.mark.parametrize("group,top,rule", CONFIG_ERRORS, ids=[f"{r}-{i}" for i, (_, _, r) in enumerate(CONFIG_ERRORS)])
def test_config_errors_carry_their_rule(group, top, rule):
    from ctformat.errors import ConfigError
    with pytest.raises(ConfigError) as e:
        QuantizationConfig.from_json({"quant_method": "compressed-tensors", "format": top,
                                      "config_groups": {"g": group}})
    assert e.value.rule == rule and str(e.value).endswith(f"[{rule}]")


def test_mixed_precision_looks_up_each_groups_format():
    cfg = QuantizationConfig.from_json({
            "quant_method": "compressed-tensors", "format": "mixed-precision", "config_groups": {
                "a": {"targets": ["re:.*self_attn"], "format": "float-quantized",
                      "weights": {"num_bits": 8, "type": "float", "strategy": "channel"}},
                "b": {"targets": ["re:.*mlp"], "format": "nvfp4-pack-quantized",
                      "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                                  "scale_dtype": "torch.float8_e4m3fn"}},
                "c": {"targets": ["lm_head"], "format": "pack-quantized",
                      "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}}}})
    names = {m: cfg.group_format(cfg.group_for(m, linear=True))
             for m in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj", "lm_head")}
    assert names == {"model.layers.0.self_attn.q_proj": "float-quantized",
                     "model.layers.0.mlp.up_proj": "nvfp4-pack-quantized", "lm_head": "pack-quantized"}


BITS = [  # (format, weights, bits per weight at [4096, 4096]) as spec/formats.md §7 states them
    ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "channel"}, 8 + 16 / 4096),
    ("float-quantized", {"num_bits": 8, "type": "float", "strategy": "block", "block_structure": [128, 128]},
     8 + 16 / 128 ** 2),
    ("int-quantized", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, 8.125),
    ("nvfp4-pack-quantized", {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16,
                              "scale_dtype": "torch.float8_e4m3fn"}, 4.5 + 32 / 4096 ** 2),
    ("mxfp4-pack-quantized", MX := {"num_bits": 4, "type": "float", "group_size": 32, "scale_dtype": "torch.uint8"},
     4.25),
    ("mxfp8-quantized", {**MX, "num_bits": 8}, 8.25),
    ("dense", {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128}, 16.125),
]


@pytest.mark.parametrize("fmt,weights,want", BITS, ids=[f"{b[0]}-{i}" for i, b in enumerate(BITS)])
def test_bits_per_weight(fmt, weights, want):
    assert format_named(fmt).bits_per_weight(scheme(weights), (4096, 4096)) == pytest.approx(want, rel=1e-12)
