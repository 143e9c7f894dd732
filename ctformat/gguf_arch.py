"""GGUF architecture facts (spec/gguf.md §3-§5): which architectures map to which GGUF arch,
the hyperparameter keys LC's converter writes for each, the row transforms it applies, and the
vocabulary (read through gguf-py's readers). to_gguf builds the conversion plan from these.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .ggml import refuse

__all__ = ["ArchInfo", "ARCHS", "arch_for", "hparams", "read_vocab", "tokenizer_pre", "PRE_TOKENIZERS", "OUTTYPES",
           "need", "first", "rope_of", "llama3_rope_factors", "permute_rows"]

OUTTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}


@dataclass(frozen=True)
class ArchInfo:
    arch: str                     # gguf.MODEL_ARCH member name
    permute_qk: bool = False      # LC's LlamaModel.permute of q_proj / k_proj rows
    moe: bool = False
    mla: bool = False


# spec/gguf.md §4.1: architectures[0] -> GGUF arch (LC's converter class for that name)
ARCHS: dict[str, ArchInfo] = {
    "LlamaForCausalLM": ArchInfo("LLAMA", permute_qk=True),
    "MistralForCausalLM": ArchInfo("LLAMA", permute_qk=True),
    "MixtralForCausalLM": ArchInfo("LLAMA", permute_qk=True, moe=True),
    "Qwen2ForCausalLM": ArchInfo("QWEN2"),
    "Qwen3ForCausalLM": ArchInfo("QWEN3"),
    "Qwen3MoeForCausalLM": ArchInfo("QWEN3MOE", moe=True),
    "DeepseekV3ForCausalLM": ArchInfo("DEEPSEEK2", moe=True, mla=True),
}

def arch_for(config: dict[str, Any]) -> ArchInfo:
    names = config.get("architectures") or [None]
    info = ARCHS.get(names[0])
    if info is None:
        raise refuse("GCV-01", f"architecture {names[0]!r} is not one ctformat writes to GGUF "
                     f"({', '.join(sorted(ARCHS))})", "config.json")
    return info


# -- hyperparameters --------------------------------------------------------------------------
KV = tuple[str, tuple]     # (GGUFWriter.add_* method, arguments)


def need(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise refuse("GCV-09", f"config.json has no {key!r}, which the GGUF architecture needs", "config.json")
    return config[key]


def first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def rope_of(config: dict[str, Any]) -> dict[str, Any]:
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    if "rope_theta" not in rope and config.get("rope_theta") is not None:
        rope["rope_theta"] = config["rope_theta"]
    return rope


def hparams(info: ArchInfo, config: dict[str, Any], file_type: int) -> list[KV]:
    """The key/values LC's set_gguf_parameters writes for the arch, from config.json."""
    c = dict(config)
    if info.mla:                       # MLA is written as MQA (LC deepseek.py)
        c["num_key_value_heads"] = 1
        c.setdefault("rms_norm_eps", 1e-6)
    kv: list[KV] = [("add_block_count", (need(c, "num_hidden_layers"),))]
    for method, keys in (("add_context_length", ("max_position_embeddings",)), ("add_embedding_length", ("hidden_size",)),
                         ("add_feed_forward_length", ("intermediate_size",)),
                         ("add_head_count", ("num_attention_heads",)), ("add_head_count_kv", ("num_key_value_heads",))):
        if (v := first(c, *keys)) is not None:
            kv.append((method, (v,)))
    kv += _rope_kv(rope_of(c))
    if (v := first(c, "rms_norm_eps")) is not None:
        kv.append(("add_layer_norm_rms_eps", (v,)))
    if (v := first(c, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
        kv.append(("add_expert_count", (v,)))
    if (v := first(c, "num_experts_per_tok")) is not None:
        kv.append(("add_expert_used_count", (v,)))
    for method, key in (("add_expert_group_count", "n_group"), ("add_expert_group_used_count", "topk_group")):
        if c.get(key) is not None:
            kv.append((method, (c[key],)))
    if (v := first(c, "scoring_func", "score_function")) is not None:
        import gguf
        gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
        if v not in gating:
            raise refuse("GCV-09", f"scoring_func {v!r} is not sigmoid or softmax", "config.json")
        kv.append(("add_expert_gating_func", (gating[v],)))
    if c.get("head_dim") is not None:
        kv += [("add_key_length", (c["head_dim"],)), ("add_value_length", (c["head_dim"],))]
    kv.append(("add_file_type", (file_type,)))
    if info.arch == "LLAMA":
        kv.append(("add_vocab_size", (need(c, "vocab_size"),)))
        kv.append(("add_rope_dimension_count", (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],)))
    elif info.arch == "QWEN3MOE":
        if c.get("moe_intermediate_size") is not None:
            kv.append(("add_expert_feed_forward_length", (c["moe_intermediate_size"],)))
        if c.get("shared_expert_intermediate_size") is not None:
            kv.append(("add_expert_shared_feed_forward_length", (c["shared_expert_intermediate_size"],)))
    elif info.mla:
        kv += _mla_kv(c)
    return kv


def _rope_kv(rope: dict[str, Any]) -> list[KV]:
    import gguf
    kv: list[KV] = []
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        kv += [("add_rope_scaling_type", (gguf.RopeScalingType.LINEAR,)), ("add_rope_scaling_factor", (factor,))]
    elif kind == "yarn" and factor is not None:
        kv += [("add_rope_scaling_type", (gguf.RopeScalingType.YARN,)), ("add_rope_scaling_factor", (factor,)),
               ("add_rope_scaling_orig_ctx_len", (rope["original_max_position_embeddings"],))]
        for method, keys in (("add_rope_scaling_yarn_ext_factor", ("extrapolation_factor",)),
                             ("add_rope_scaling_yarn_attn_factor", ("attention_factor", "attn_factor")),
                             ("add_rope_scaling_yarn_beta_fast", ("beta_fast",)),
                             ("add_rope_scaling_yarn_beta_slow", ("beta_slow",))):
            if (v := first(rope, *keys)) is not None:
                kv.append((method, (v,)))
    elif kind not in (None, "default", "llama3"):
        raise refuse("GCV-09", f"rope_type {kind!r} is not one ctformat writes (default, linear, yarn, llama3)",
                     "config.json")
    if rope.get("rope_theta") is not None:
        kv.append(("add_rope_freq_base", (rope["rope_theta"],)))
    return kv


def _mla_kv(c: dict[str, Any]) -> list[KV]:
    moe = c.get("n_routed_experts") is not None
    first_dense = c.get("first_k_dense_replace")
    kv: list[KV] = [("add_leading_dense_block_count",
                     (first_dense if first_dense is not None else (0 if moe else c["num_hidden_layers"]),)),
                    ("add_vocab_size", (need(c, "vocab_size"),))]
    if c.get("q_lora_rank") is not None:
        kv.append(("add_q_lora_rank", (c["q_lora_rank"],)))
    rank = c.get("kv_lora_rank", 512)
    kv += [("add_kv_lora_rank", (rank,)), ("add_key_length", (rank + need(c, "qk_rope_head_dim"),)),
           ("add_value_length", (rank,)),
           ("add_key_length_mla", (need(c, "qk_nope_head_dim") + c["qk_rope_head_dim"],)),
           ("add_value_length_mla", (need(c, "v_head_dim"),)),
           ("add_expert_feed_forward_length", (first(c, "moe_intermediate_size", "intermediate_size"),))]
    kv.append(("add_expert_shared_count", (c.get("n_shared_experts", 0),)))
    if c.get("routed_scaling_factor") is not None:
        kv.append(("add_expert_weights_scale", (c["routed_scaling_factor"],)))
    if c.get("norm_topk_prob"):
        kv.append(("add_expert_weights_norm", (True,)))
    kv.append(("add_rope_dimension_count", (c["qk_rope_head_dim"],)))
    if (m := rope_of(c).get("mscale_all_dim")) is not None:
        kv.append(("add_rope_scaling_yarn_log_mul", (0.1 * m,)))
    return kv


def llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> torch.Tensor:
    """Per-frequency RoPE divisors of rope_type llama3 (LC llama.py generate_extra_tensors)."""
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, lo, hi = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    out = []
    for f in freqs:            # float32 0-d tensors: LC's arithmetic, so the factors agree to the bit
        wavelen = 2 * math.pi / f
        if wavelen < old / hi:
            out.append(1.0)
        elif wavelen > old / lo:
            out.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            out.append(float(1 / ((1 - smooth) / factor + smooth)))
    return torch.tensor(out, dtype=torch.float32)


def permute_rows(t: torch.Tensor, heads: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """LC's LlamaModel.permute on the leading (row) axis: rows [heads, 2, n/heads/2] -> swap 1 and 2.
    With `out` (uint8 blocks, t's shape) the rows are copied there by numpy (one thread, whole rows)."""
    n = t.shape[0]
    split = (heads, 2, n // heads // 2, *t.shape[1:])
    if out is None:
        return t.reshape(split).swapaxes(1, 2).reshape(t.shape)
    dest = out.numpy().reshape(heads, n // heads // 2, 2, *t.shape[1:])
    dest[...] = t.numpy().reshape(split).swapaxes(1, 2)
    return out


# -- vocabulary (spec/gguf.md §5) --------------------------------------------------------------
# The pre-tokenizer Split regex each family's tokenizer.json declares -> llama.cpp's name for it.
PRE_TOKENIZERS: dict[str, str] = {
    # Llama 3 (tiktoken-style, numbers in groups of 3)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "llama-bpe",
    # Qwen2 / Qwen2.5 / Qwen3 (single digits)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
}


def tokenizer_pre(folder: Path) -> str | None:
    """llama.cpp's pre-tokenizer name for a BPE tokenizer.json, from its declared Split regex(es)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    pre = json.loads(path.read_text(encoding="utf-8")).get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [s["pattern"].get("Regex") for s in steps if s.get("type") == "Split" and isinstance(s.get("pattern"), dict)]
    for r in regexes:
        if r in PRE_TOKENIZERS:
            return PRE_TOKENIZERS[r]
    return None


def read_vocab(folder: Path, config: dict[str, Any], pre: str | None) -> Callable[[Any], None] | None:
    """The tokenizer.* keys, read now through gguf-py's vocab readers (GCV-11 if none fits), as a
    function that adds them to a GGUFWriter; None when the folder has no tokenizer."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab
    if (folder / "tokenizer.model").is_file():
        vocab, model = SentencePieceVocab(folder), "llama"
    elif (folder / "tokenizer.json").is_file():
        try:
            vocab, model = LlamaHfVocab(folder), "llama"
        except (TypeError, FileNotFoundError, ValueError):
            try:
                vocab, model = BpeVocab(folder), "gpt2"
            except (FileNotFoundError, ValueError, KeyError) as err:
                raise refuse("GCV-11", f"neither SentencePiece-style nor byte-level BPE ({err})",
                             "tokenizer.json") from None
    elif (folder / "tiktoken.model").is_file():
        raise refuse("GCV-11", "a tiktoken tokenizer, which gguf-py's vocab readers do not take", "tiktoken.model")
    else:
        return None
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    n_vocab = config.get("vocab_size")
    if n_vocab is not None and len(tokens) < n_vocab:      # LC pads to the model's vocab_size
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
    _mark_added(folder, tokens, types)
    if model == "gpt2":
        pre = pre or tokenizer_pre(folder)
        if pre is None:
            raise refuse("GCV-11", "BPE tokenizer whose pre-tokenizer regex is not one ctformat knows; pass "
                         "--tokenizer-pre NAME (llama.cpp's name for it)", "tokenizer.json")
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))

    def add(writer) -> None:
        writer.add_tokenizer_model(model)
        writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        if model == "llama":
            writer.add_token_scores(scores)
        writer.add_token_types(types)
        special.add_to_gguf(writer)
    return add


def _mark_added(folder: Path, tokens: list[bytes], types: list) -> None:
    """Added tokens: CONTROL when special (or shaped <|...|>), else USER_DEFINED, as LC's
    get_vocab_base and _create_vocab_sentencepiece mark them (gguf-py's readers do not)."""
    import gguf
    added: dict[int, dict[str, Any]] = {}
    for name, key in (("tokenizer.json", "added_tokens"), ("tokenizer_config.json", "added_tokens_decoder")):
        path = folder / name
        if path.is_file():
            found = json.loads(path.read_text(encoding="utf-8")).get(key) or []
            items = found.items() if isinstance(found, dict) else ((t.get("id"), t) for t in found)
            added |= {int(i): t for i, t in items if isinstance(t, dict) and "content" in t}
    for i, t in added.items():
        if 0 <= i < len(tokens):
            text = t["content"]
            special = t.get("special") or (text.startswith("<|") and text.endswith("|>"))
            types[i] = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
            tokens[i] = text.encode("utf-8")
