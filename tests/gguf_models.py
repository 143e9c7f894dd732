"""Tiny random models of each architecture GGUF output covers, written twice: dense (bf16, the
names a Hugging Face checkpoint has) and compressed-tensors int4 (ctformat.quant.compress,
whose bits are tested equal to compressed-tensors), plus a tokenizer llama.cpp's converter reads."""
from __future__ import annotations

import io
import json
from pathlib import Path

import torch

from ctformat.writer import save_checkpoint
from ctformat.quant import compress
from ctformat.scheme import QuantScheme

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2}

CONFIGS = {
    "llama": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=64),
    "llama3": dict(BASE, architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=320,
                   rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                    "original_max_position_embeddings": 64}),
    "mistral": dict(BASE, architectures=["MistralForCausalLM"], model_type="mistral", vocab_size=64),
    "mixtral": dict(BASE, architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=64,
                    num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    "mixtral_ct019": dict(BASE, architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=64,
                          num_local_experts=4, num_experts_per_tok=2, intermediate_size=96),
    "qwen2": dict(BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=320),
    "qwen3": dict(BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=320),
    "qwen3_moe": dict(BASE, architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=320,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseek_v3": dict(BASE, architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=320,
                        num_key_value_heads=4, head_dim=None, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                        qk_rope_head_dim=16, v_head_dim=16, n_routed_experts=4, n_shared_experts=1,
                        num_experts_per_tok=2, moe_intermediate_size=64, first_k_dense_replace=1, n_group=2,
                        topk_group=1, scoring_func="sigmoid", routed_scaling_factor=2.5, norm_topk_prob=True,
                        topk_method="noaux_tc"),
}


def _linears(arch: str, c: dict) -> dict[str, tuple[int, int]]:
    """HF module name -> (out, in) of every Linear of one model."""
    h, heads, kvh = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    out: dict[str, tuple[int, int]] = {}
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}"
        if arch == "deepseek_v3":
            qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
            out |= {f"{p}.self_attn.q_a_proj": (c["q_lora_rank"], h),
                    f"{p}.self_attn.q_b_proj": (heads * qk, c["q_lora_rank"]),
                    f"{p}.self_attn.kv_a_proj_with_mqa": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
                    f"{p}.self_attn.kv_b_proj": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
                    f"{p}.self_attn.o_proj": (h, heads * c["v_head_dim"])}
        else:
            d = c["head_dim"]
            out |= {f"{p}.self_attn.q_proj": (heads * d, h), f"{p}.self_attn.k_proj": (kvh * d, h),
                    f"{p}.self_attn.v_proj": (kvh * d, h), f"{p}.self_attn.o_proj": (h, heads * d)}
        moe = arch in ("mixtral", "mixtral_ct019", "qwen3_moe") or (arch == "deepseek_v3" and L >= c["first_k_dense_replace"])
        if not moe:
            i = c["intermediate_size"]
            out |= {f"{p}.mlp.gate_proj": (i, h), f"{p}.mlp.up_proj": (i, h), f"{p}.mlp.down_proj": (h, i)}
            continue
        n = c.get("num_local_experts") or c.get("num_experts") or c["n_routed_experts"]
        i = c.get("moe_intermediate_size") or c["intermediate_size"]
        if arch.startswith("mixtral"):     # the two naming eras (spec ctformat.md §7.2)
            g, u, dn = ("gate_proj", "up_proj", "down_proj") if arch == "mixtral_ct019" else ("w1", "w3", "w2")
            for e in range(n):
                q = f"{p}.block_sparse_moe.experts.{e}"
                out |= {f"{q}.{g}": (i, h), f"{q}.{u}": (i, h), f"{q}.{dn}": (h, i)}
        else:
            for e in range(n):
                q = f"{p}.mlp.experts.{e}"
                out |= {f"{q}.gate_proj": (i, h), f"{q}.up_proj": (i, h), f"{q}.down_proj": (h, i)}
            if arch == "deepseek_v3":
                s = i * c["n_shared_experts"]
                out |= {f"{p}.mlp.shared_experts.gate_proj": (s, h), f"{p}.mlp.shared_experts.up_proj": (s, h),
                        f"{p}.mlp.shared_experts.down_proj": (h, s)}
    return out


def dense_tensors(arch: str, seed: int = 0, config: dict | None = None) -> dict[str, torch.Tensor]:
    c = config or CONFIGS[arch]
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.05):
        return (torch.randn(*shape, generator=gen) * scale).to(torch.bfloat16)

    h, v = c["hidden_size"], c["vocab_size"]
    t = {"model.embed_tokens.weight": rnd(v, h, scale=0.5)}
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}"
        t[f"{p}.input_layernorm.weight"] = (1 + rnd(h, scale=0.1).float()).to(torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = (1 + rnd(h, scale=0.1).float()).to(torch.bfloat16)
        if arch == "qwen3" or arch == "qwen3_moe":
            t[f"{p}.self_attn.q_norm.weight"] = (1 + rnd(c["head_dim"], scale=0.1).float()).to(torch.bfloat16)
            t[f"{p}.self_attn.k_norm.weight"] = (1 + rnd(c["head_dim"], scale=0.1).float()).to(torch.bfloat16)
        if arch == "deepseek_v3":
            t[f"{p}.self_attn.q_a_layernorm.weight"] = torch.ones(c["q_lora_rank"], dtype=torch.bfloat16)
            t[f"{p}.self_attn.kv_a_layernorm.weight"] = torch.ones(c["kv_lora_rank"], dtype=torch.bfloat16)
    for name, (o, i) in _linears(arch, c).items():
        t[f"{name}.weight"] = rnd(o, i)
        if arch == "qwen2" and name.endswith(("q_proj", "k_proj", "v_proj")):
            t[f"{name}.bias"] = rnd(o)
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}"
        n = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts")
        if arch.startswith("mixtral"):
            t[f"{p}.block_sparse_moe.gate.weight"] = rnd(n, h)
        elif arch == "qwen3_moe" or (arch == "deepseek_v3" and L >= c["first_k_dense_replace"]):
            t[f"{p}.mlp.gate.weight"] = rnd(n, h)
            if arch == "deepseek_v3":
                t[f"{p}.mlp.gate.e_score_correction_bias"] = rnd(n).float()
    t["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    t["lm_head.weight"] = rnd(v, h)
    return t


def write_model(arch: str, folder: Path, *, quantized: bool, scheme_json: dict | None = None, seed: int = 0,
                tokenizer: bool = True, **config) -> Path:
    """A model folder: config.json, tokenizer, model.safetensors (dense, or CT int4 g32 by default);
    `config` overrides entries of the arch's config (sizes, expert count)."""
    c = dict(CONFIGS[arch], **config)
    tensors = dense_tensors(arch, seed, c)
    linears = set(_linears(arch, c))
    if quantized:
        sj = scheme_json or {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32}
        scheme = QuantScheme.from_json(sj, where="t")
        out = {}
        for name, x in tensors.items():
            prefix = name.rpartition(".")[0]
            if prefix in linears and name.endswith(".weight"):
                out |= {f"{prefix}.{k}": v for k, v in compress(x, scheme).items()}
            else:
                out[name] = x
        tensors = out
        c["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                    "config_groups": {"group_0": {"targets": ["Linear"], "weights": sj}},
                                    "ignore": ["lm_head", "re:.*gate$"], "quantization_status": "compressed",
                                    "version": "0.20.0"}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.st"
    save_checkpoint(tmp, tensors, c)
    for p in tmp.iterdir():
        p.rename(folder / p.name)
    tmp.rmdir()
    if tokenizer:
        write_tokenizer(folder, c, "llama-bpe" if arch == "llama3" else "qwen2")
    return folder


def write_tokenizer(folder: Path, config: dict, pre: str = "qwen2") -> None:
    """SPM (tokenizer.model) for the llama family below 256 tokens, else byte-level BPE
    (tokenizer.json) splitting with the regex of llama.cpp's pre-tokenizer `pre`."""
    text = ("the quick brown fox jumps over the lazy dog 0123456789 hello world tokens of a tiny model "
            "quantized weights repacked into blocks ") * 20
    if config["model_type"] in ("llama", "mistral", "mixtral") and config["vocab_size"] < 256:
        import sentencepiece as spm
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(text.split(" tiny")), model_writer=buf,
                                       vocab_size=config["vocab_size"], model_type="bpe", bos_id=1, eos_id=2,
                                       unk_id=0, pad_id=-1, hard_vocab_limit=True, minloglevel=2)
        (folder / "tokenizer.model").write_bytes(buf.getvalue())
        return
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from ctformat.gguf_arch import PRE_TOKENIZERS
    regex = next(r for r, n in PRE_TOKENIZERS.items() if n == pre)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), "isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=config["vocab_size"], special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "bos_token": None,
         "model_max_length": 256}))
