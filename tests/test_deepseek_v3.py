"""A DeepSeek-V3-layout checkpoint (Kimi-K2-Thinking's architecture) end to end: MLA attention, a
dense first layer, shared experts and noaux_tc router gates kept dense, the routed experts
int4 symmetric group 32 under Kimi-K2-Thinking's own quantization_config (spec/targets.md §3).
validate finds no error (the gates are MoEGate / DeepseekV3TopkRouter, never Linear), and
`run` / `compare` give transformers' logits on `convert --to dense`'s output, bit for bit."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_in_process
from ctformat.checkpoint import open_checkpoint
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.validate import validate_checkpoint
from ctformat.writer import save_checkpoint

transformers = pytest.importorskip("transformers")

WEIGHTS = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
           "actorder": None, "dynamic": False, "observer": "minmax", "observer_kwargs": {}, "block_structure": None}
KIMI_QUANT = {   # Kimi-K2-Thinking's config.json, but for the sizes
    "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": WEIGHTS, "input_activations": None,
                                  "output_activations": None}},
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "global_compression_ratio": None}
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    """(quantized checkpoint, its `convert --to dense` output, transformers' logits on that output)."""
    root = tmp_path_factory.mktemp("deepseek-v3")
    cfg = transformers.DeepseekV3Config(
        vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        first_k_dense_replace=1, n_group=2, topk_group=1, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():       # a router bias that changes the expert choice, as a trained one does
        model.model.layers[1].mlp.gate.e_score_correction_bias.copy_(torch.randn(4) * 0.1)
    model.save_pretrained(root / "dense")
    src = open_checkpoint(root / "dense")
    scheme = QuantScheme.from_json(WEIGHTS, where="weights")
    tensors, experts = {}, 0
    for name in src.tensors:
        w = src.load(name)
        if ".mlp.experts." in name:
            experts += 1
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v for k, v in compress(w, scheme).items()})
        else:
            tensors[name] = w
    assert experts == 12                   # 4 routed experts x gate/up/down, in layer 1 only
    config = dict(src.config, quantization_config=KIMI_QUANT)
    quantized = save_checkpoint(root / "q", tensors, config)
    r = cli_in_process("convert", quantized, root / "d", "--to", "dense", "--dtype", "float32")
    assert r.returncode == 0, r.stderr
    hf = transformers.AutoModelForCausalLM.from_pretrained(root / "d", dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(IDS, use_cache=False).logits
    (root / "ids.json").write_text(json.dumps(IDS.tolist()))
    return quantized, root / "d", logits, root / "ids.json"


def test_validate_finds_no_error_and_keeps_the_gates_out_of_dense_linear(deepseek):
    quantized, _, _, _ = deepseek
    for target in (None, "vllm", "transformers"):
        report = validate_checkpoint(quantized, deep=True, target=target)
        assert report.errors == () and report.modules_checked == 12, [str(i) for i in report.issues]
    doc = json.loads(cli_in_process("inspect", quantized, "--json").stdout)
    assert "model.layers.1.mlp.gate" not in doc["dense_linear_modules"]


def test_run_gives_transformers_logits_on_the_dense_output(deepseek):
    quantized, _, logits, ids = deepseek
    r = cli_in_process("run", quantized, "--input-ids", ids, "--dtype", "float32", "--device", "cpu", "--json",
                       "--top-k", "96")
    assert r.returncode == 0, r.stderr
    probs = torch.softmax(logits[:, -1].double(), dim=-1)
    got = json.loads(r.stdout)["next_token"]
    for row, p in zip(got, probs):
        assert [t["id"] for t in row] == torch.topk(p, 96).indices.tolist()
        assert torch.equal(torch.tensor([t["prob"] for t in row], dtype=torch.float64), torch.topk(p, 96).values)


def test_compare_with_the_dense_output_is_exact(deepseek):
    quantized, dense, _, ids = deepseek
    r = cli_in_process("compare", quantized, dense, "--input-ids", ids, "--dtype", "float32", "--device", "cpu",
                       "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["kl_max"] == 0.0 and doc["top1_agreement"] == 1.0 and doc["positions"] == IDS.numel()
    assert doc["weights"]["max"] == 0.0
