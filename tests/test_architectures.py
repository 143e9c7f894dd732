"""Class targets per MoE family (spec/targets.md): the router table checked against the classes
transformers really builds, and validate's rule (TEN-11, TEN-13, VLLM-11) on one tiny checkpoint
per family."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import FIXTURES, ROOT, pip_target
from ctformat.architectures import ROUTERS, TF4, TF5, router_verdict
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.summary import summarize
from ctformat.validate import validate_checkpoint

MOE = FIXTURES / "moe"
FAMILIES = sorted(p.name for p in MOE.iterdir() if (p / "config.json").is_file())
# transformers 5.x loads Mixtral's block_sparse_moe.* checkpoint names into mlp.* modules
MODEL_PATH = {"block_sparse_moe.gate": "mlp.gate"}

# Prints {model_type: {router path: [class name, is nn.Linear]}} for the MoE layer (layer 1) of
# each fixture's config, built on the meta device by whichever transformers runs it.
PROBE = r"""
import json, sys, torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM
out = {}
for cfg_path, paths in json.loads(sys.argv[1]).items():
    cfg = json.load(open(cfg_path))
    cfg.pop("quantization_config", None)
    mt = cfg["model_type"]
    if mt not in CONFIG_MAPPING:
        continue
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[mt](**cfg))
    found = dict(model.named_modules())
    out[mt] = {p: [type(found[f"model.layers.1.{q}"]).__name__, isinstance(found[f"model.layers.1.{q}"], torch.nn.Linear)]
               for p, q in paths.items() if f"model.layers.1.{q}" in found}
print(json.dumps(out))
"""


def probe(python: str, model_path: dict, env: dict | None = None) -> dict:
    configs = {}
    for fam in FAMILIES:
        cfg = json.loads((MOE / fam / "config.json").read_text())
        paths = {r.path: model_path.get(r.path, r.path) for r in ROUTERS.get(cfg["model_type"], ())}
        configs[str(MOE / fam / "config.json")] = paths
    r = subprocess.run([python, "-c", PROBE, json.dumps(configs)], capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def check_era(seen: dict, era: str) -> int:
    checked = 0
    for model_type, paths in seen.items():
        for r in ROUTERS[model_type]:
            claimed = dict(r.classes).get(era)
            if claimed is None or r.path not in paths:
                continue
            cls, is_linear = paths[r.path]
            assert (cls == claimed or claimed == "Linear" and is_linear), (model_type, r.path, cls, claimed)
            assert is_linear == (era in r.linear), (model_type, r.path, era, is_linear)
            checked += 1
    return checked


def test_router_table_is_what_transformers_5_builds():
    """Each router's class and nn.Linear-ness, as transformers 5.x builds it on the meta device."""
    assert check_era(probe(sys.executable, MODEL_PATH), TF5) >= 9


def test_router_table_is_what_transformers_4_builds():
    """The same on transformers 4.57 (the era of Mixtral-8x22B-v0.1-quantized.w4a16), installed
    from the package index beside this environment's torch."""
    site = pip_target("transformers-4.57.1", ["transformers==4.57.1", "huggingface-hub==0.36.0", "tokenizers==0.22.1"])
    env = dict(os.environ, PYTHONPATH=str(site))
    assert check_era(probe(sys.executable, {}, env), TF4) >= 8


EXPECTED_WARNINGS = {"qwen3-moe": 2, "mixtral-5x": 2}           # TEN-13, one per MoE layer (spec/targets.md §6)


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_validates_with_zero_errors(family):
    """validate resolves the class target per router: no family errors, and only the routers
    that `Linear` matched in some eras warn (TEN-13), with or without --target vllm."""
    for target in (None, "vllm"):
        report = validate_checkpoint(MOE / family, target=target)
        assert report.errors == (), [str(i) for i in report.errors]
        warned = [i for i in report.warnings if i.rule == "TEN-13"]
        assert len(warned) == EXPECTED_WARNINGS.get(family, 0), [str(w) for w in report.warnings]
        assert all(i.rule == "TEN-13" for i in report.warnings), [str(w) for w in report.warnings]


def test_ten_13_says_why_per_era_and_names_the_producer():
    (first, _) = validate_checkpoint(MOE / "qwen3-moe").warnings
    assert first.where == "model.layers.0.mlp.gate.weight"
    assert "transformers 4.x: Linear" in first.message and "transformers 5.x: Qwen3MoeTopKRouter" in first.message
    assert "compressed-tensors 0.20.0" in first.message and "ignore" in first.message


def test_listing_the_router_in_ignore_silences_ten_13(tmp_path):
    path = edited(tmp_path, "qwen3-moe", lambda c: c["quantization_config"]["ignore"].append("re:.*mlp.gate$"))
    assert validate_checkpoint(path).issues == ()


def test_a_router_linear_never_matched_is_not_a_dense_linear_module():
    """inspect lists the Kimi-K2 gates (MoEGate, never Linear) nowhere; the Qwen3 ones (Linear
    in 4.x) stay listed as dense Linear modules."""
    def dense(family):
        return summarize(open_checkpoint(MOE / family))["dense_linear_modules"]
    assert not any(name.endswith(".mlp.gate") for name in dense("kimi-k2"))
    assert "model.layers.{0..1}.mlp.gate" in dense("qwen3-moe")


def edited(tmp_path, family, fn):
    dst = tmp_path / family
    shutil.copytree(MOE / family, dst)
    cfg = json.loads((dst / "config.json").read_text())
    fn(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_a_dense_router_that_linear_always_matched_stays_an_error(tmp_path):
    """Llama4Router subclasses nn.Linear in every era: targeted, dense and not ignored is TEN-11."""
    path = edited(tmp_path, "llama4", lambda c: c["quantization_config"].__setitem__("ignore", ["lm_head"]))
    errors = validate_checkpoint(path).errors
    assert errors and {e.rule for e in errors} == {"TEN-11"} and all(".router." in e.where for e in errors)
    assert all("Linear matched it in every era" in e.message for e in errors)


def test_a_router_targeted_by_name_stays_an_error(tmp_path):
    """The verdict is about the class target: a pattern that names the gate targets it in any era."""
    def target_gate(c):
        c["quantization_config"]["config_groups"]["group_0"]["targets"].append("re:.*mlp.gate$")
    errors = validate_checkpoint(edited(tmp_path, "kimi-k2", target_gate)).errors
    assert errors and all(e.rule == "TEN-11" and e.where.endswith(".mlp.gate.weight") for e in errors)


def test_dense_attention_a_group_targets_stays_an_error(tmp_path):
    path = edited(tmp_path, "kimi-k2", lambda c: c["quantization_config"]["ignore"].remove("re:.*self_attn.*"))
    errors = validate_checkpoint(path).errors
    assert errors and all(".self_attn." in e.where and e.rule == "TEN-11" for e in errors)


def test_unknown_family_router_is_found_by_name_and_expert_count():
    config = {"model_type": "some_new_moe", "num_experts": 8}
    assert router_verdict(config, "model.layers.3.moe.gate", 8).linear == "depends"
    assert router_verdict(config, "model.layers.3.moe.gate", 4096) is None          # not one row per expert
    assert router_verdict(config, "model.layers.3.mlp.gate_proj", 8) is None
    assert router_verdict({"model_type": "qwen3_moe"}, "model.layers.3.mlp.gate_proj", 8) is None
    assert router_verdict({"text_config": {"model_type": "kimi_k2"}, "model_type": "kimi_k25"},
                          "language_model.model.layers.1.mlp.gate", 384).linear == "never"


def test_a_quantized_router_is_an_error_under_target_vllm(tmp_path):
    """vLLM builds every router unquantized (GateLinear / ReplicatedLinear without a
    quant_config): a router stored as weight_packed cannot load there (VLLM-11). The TEN rules
    alone accept it: `Linear` targets it and its tensors are well formed."""
    ckpt = open_checkpoint(MOE / "qwen3-moe")
    tensors = {n: ckpt.load(n) for n in ckpt.tensors}
    gate = tensors.pop("model.layers.1.mlp.gate.weight")
    scheme = QuantScheme.from_json(ckpt.config["quantization_config"]["config_groups"]["group_0"]["weights"], where="w")
    tensors.update({f"model.layers.1.mlp.gate.{k}": v for k, v in compress(gate, scheme).items()})
    out = save_checkpoint(tmp_path / "q", tensors, ckpt.config)
    assert validate_checkpoint(out).errors == ()
    errors = validate_checkpoint(out, target="vllm").errors
    assert [(e.rule, e.where) for e in errors] == [("VLLM-11", "model.layers.1.mlp.gate.weight_packed")]


def test_moe_fixtures_regenerate_byte_for_byte(tmp_path):
    env = dict(os.environ, CTFORMAT_MOE_FIXTURES_OUT=str(tmp_path))
    r = subprocess.run([sys.executable, str(MOE / "make_moe_fixtures.py")], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    for family in FAMILIES:
        for f in (MOE / family).iterdir():
            assert (tmp_path / family / f.name).read_bytes() == f.read_bytes(), (family, f.name)


def test_moe_fixtures_are_tiny():
    assert all(sum(f.stat().st_size for f in (MOE / fam).iterdir()) < 300_000 for fam in FAMILIES)
