"""Full-size checkpoint layouts written as sparse files: real config.json, index and shard
headers, tensor data never written (seek + truncate), so a 594 GB checkpoint costs ~25 MB of disk.

    python benchmarks/make_frontier.py kimi DIR       # Kimi-K2-Thinking: 62 shards, 1.03 T parameters
    python benchmarks/make_frontier.py mixtral DIR    # Mixtral-8x22B-v0.1-quantized.w4a16: 56 layers, g128

Deterministic: the same arguments give the same bytes.

Kimi-K2-Thinking (moonshotai, Nov 2025) is the DeepSeek-V3 architecture (`architectures`
DeepseekV3ForCausalLM, `model_type` kimi_k2, remote code modeling_deepseek.py): MLA attention
(q_a_proj / q_a_layernorm / q_b_proj / kv_a_proj_with_mqa / kv_a_layernorm / kv_b_proj / o_proj),
a dense MLP in layer 0 (`first_k_dense_replace` = 1), then 60 MoE layers of 384 routed experts,
one shared expert and a router `mlp.gate` (weight [384, 7168] and `e_score_correction_bias`).
The routed experts are compressed-tensors pack-quantized int4, symmetric, group 32 with bf16
scales; everything else is bf16. Shards are named `model-0000k-of-000062.safetensors` (six digits
after "of", as the repository names them). Shard 1 holds the embedding, final norm and lm_head and
shards 2..62 one decoder layer each (a whole MoE layer is ~9.7 GB); the repository has 62 shards
and its last shard holds attention and expert tensors, which this grouping reproduces, but the
exact split is inferred, not copied. Headers are laid out as the safetensors library writes them:
compact JSON, tensors ordered by dtype (I64, F32, I32, BF16) then name, padded to 8 bytes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import struct
from math import prod
from pathlib import Path

Plan = list[tuple[str, str, list[int]]]          # (name, dtype code, shape)

_SIZE = {"I64": 8, "F32": 4, "I32": 4, "BF16": 2}
_WRITE_ORDER = {"I64": 0, "F32": 1, "I32": 2, "BF16": 3}   # safetensors: larger dtypes first, then name


def _int4(prefix: str, out: int, inp: int, gs: int) -> Plan:
    return [(f"{prefix}.weight_packed", "I32", [out, inp // 8]), (f"{prefix}.weight_scale", "BF16", [out, inp // gs]),
            (f"{prefix}.weight_shape", "I64", [2])]


def _bf16(prefix: str, *shape: int) -> Plan:
    return [(f"{prefix}.weight", "BF16", list(shape))]


# -- Kimi-K2-Thinking ------------------------------------------------------------------
KIMI_QUANT = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 32, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized",
    "ignore": ["lm_head", "re:.*self_attn.*", "re:.*shared_experts.*", "re:.*mlp\\.(gate|up|gate_up|down)_proj.*"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}

KIMI_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                 "AutoModel": "modeling_deepseek.DeepseekV3Model",
                 "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
    "aux_loss_alpha": 0.001, "bos_token_id": 163584, "eos_token_id": 163586, "ep_size": 1,
    "first_k_dense_replace": 1, "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 262144, "model_type": "kimi_k2",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 384,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 64, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 64, "num_nextn_predict_layers": 0, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "quantization_config": KIMI_QUANT,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 1.0, "beta_slow": 1.0, "factor": 64.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 50000.0, "routed_scaling_factor": 2.827, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.56.2", "use_cache": True, "v_head_dim": 128, "vocab_size": 163840,
}


def kimi_shards(c: dict = KIMI_CONFIG) -> list[Plan]:
    """The tensors of each shard: [embedding, norm, lm_head], then one decoder layer per shard."""
    h, heads, gs = c["hidden_size"], c["num_attention_heads"], c["quantization_config"]["config_groups"][
        "group_0"]["weights"]["group_size"]
    nope, rope, v, kv_rank, q_rank = (c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"],
                                      c["kv_lora_rank"], c["q_lora_rank"])
    shards = [_bf16("model.embed_tokens", c["vocab_size"], h) + [("model.norm.weight", "BF16", [h])]
              + _bf16("lm_head", c["vocab_size"], h)]
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        t = (_bf16(f"{p}.self_attn.q_a_proj", q_rank, h) + [(f"{p}.self_attn.q_a_layernorm.weight", "BF16", [q_rank])]
             + _bf16(f"{p}.self_attn.q_b_proj", heads * (nope + rope), q_rank)
             + _bf16(f"{p}.self_attn.kv_a_proj_with_mqa", kv_rank + rope, h)
             + [(f"{p}.self_attn.kv_a_layernorm.weight", "BF16", [kv_rank])]
             + _bf16(f"{p}.self_attn.kv_b_proj", heads * (nope + v), kv_rank)
             + _bf16(f"{p}.self_attn.o_proj", h, heads * v))
        if layer < c["first_k_dense_replace"]:
            i = c["intermediate_size"]
            t += _bf16(f"{p}.mlp.gate_proj", i, h) + _bf16(f"{p}.mlp.up_proj", i, h) + _bf16(f"{p}.mlp.down_proj", h, i)
        else:
            i, e = c["moe_intermediate_size"], c["n_routed_experts"]
            for k in range(e):
                q = f"{p}.mlp.experts.{k}"
                t += (_int4(f"{q}.gate_proj", i, h, gs) + _int4(f"{q}.up_proj", i, h, gs)
                      + _int4(f"{q}.down_proj", h, i, gs))
            t += _bf16(f"{p}.mlp.gate", e, h) + [(f"{p}.mlp.gate.e_score_correction_bias", "F32", [e])]
            si = i * c["n_shared_experts"]
            t += (_bf16(f"{p}.mlp.shared_experts.gate_proj", si, h) + _bf16(f"{p}.mlp.shared_experts.up_proj", si, h)
                  + _bf16(f"{p}.mlp.shared_experts.down_proj", h, si))
        t += [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h])]
        shards.append(t)
    return shards


def kimi_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:06d}.safetensors"


# -- Mixtral-8x22B-v0.1-quantized.w4a16 ---------------------------------------------------
MIXTRAL_QUANT = {
    "config_groups": {"group_0": {
        "input_activations": None, "output_activations": None, "targets": ["Linear"],
        "weights": {"actorder": None, "block_structure": None, "dynamic": False, "group_size": 128, "num_bits": 4,
                    "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True,
                    "type": "int"}}},
    "format": "pack-quantized", "global_compression_ratio": None, "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
    "kv_cache_scheme": None, "quant_method": "compressed-tensors", "quantization_status": "compressed",
}

MIXTRAL_CONFIG = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "hidden_act": "silu", "hidden_size": 6144, "initializer_range": 0.02, "intermediate_size": 16384,
    "max_position_embeddings": 65536, "model_type": "mixtral", "num_attention_heads": 48, "num_experts_per_tok": 2,
    "num_hidden_layers": 56, "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "quantization_config": MIXTRAL_QUANT, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "use_cache": True, "vocab_size": 32000,
}
MIXTRAL_SHARD_BYTES = 5_000_000_000          # transformers' default max_shard_size when it was saved


def mixtral_plan(c: dict = MIXTRAL_CONFIG) -> Plan:
    h, i, gs = c["hidden_size"], c["intermediate_size"], 128
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    t = _bf16("model.embed_tokens", c["vocab_size"], h)
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for proj, out in (("q_proj", h), ("k_proj", kv), ("v_proj", kv), ("o_proj", h)):
            t += _int4(f"{p}.self_attn.{proj}", out, h, gs)
        t += _bf16(f"{p}.block_sparse_moe.gate", c["num_local_experts"], h)
        for e in range(c["num_local_experts"]):
            for name, out, inp in (("w1", i, h), ("w2", h, i), ("w3", i, h)):
                t += _int4(f"{p}.block_sparse_moe.experts.{e}.{name}", out, inp, gs)
        t += [(f"{p}.input_layernorm.weight", "BF16", [h]), (f"{p}.post_attention_layernorm.weight", "BF16", [h])]
    return t + [("model.norm.weight", "BF16", [h])] + _bf16("lm_head", c["vocab_size"], h)


def split_by_size(plan: Plan, max_bytes: int) -> list[Plan]:
    """transformers' greedy sharding: a tensor opens a new shard when it would overflow this one."""
    shards, cur, used = [], [], 0
    for t in plan:
        n = _SIZE[t[1]] * prod(t[2])
        if cur and used + n > max_bytes:
            shards.append(cur)
            cur, used = [], 0
        cur.append(t)
        used += n
    return shards + [cur]


def mixtral_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


# -- writing -------------------------------------------------------------------------------
def write_layout(root: Path, shards: list[Plan], config: dict, name=mixtral_name) -> dict:
    """Write config.json, the index and sparse shards; returns counts for a report."""
    root.mkdir(parents=True)
    weight_map, total, header_bytes = {}, 0, 0
    for k, plan in enumerate(shards):
        fname = name(k, len(shards))
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for tname, dtype, shape in sorted(plan, key=lambda t: (_WRITE_ORDER[t[1]], t[0])):
            n = _SIZE[dtype] * prod(shape)
            header[tname] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
            weight_map[tname] = fname
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + pos)            # sparse: the data is never written
        total += pos
        header_bytes += 8 + len(raw)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (root / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"shards": len(shards), "tensors": len(weight_map), "data_bytes": total, "header_bytes": header_bytes}


def make_kimi(root: Path) -> dict:
    return write_layout(root, kimi_shards(), KIMI_CONFIG, kimi_name)


def make_mixtral(root: Path) -> dict:
    return write_layout(root, split_by_size(mixtral_plan(), MIXTRAL_SHARD_BYTES), MIXTRAL_CONFIG, mixtral_name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("layout", choices=["kimi", "mixtral"])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--force", action="store_true", help="replace DIR if it exists")
    a = ap.parse_args()
    if a.dir.exists():
        if not a.force:
            raise SystemExit(f"{a.dir}: exists (use --force)")
        shutil.rmtree(a.dir)
    stats = (make_kimi if a.layout == "kimi" else make_mixtral)(a.dir)
    print(json.dumps(stats))


if __name__ == "__main__":
    main()
