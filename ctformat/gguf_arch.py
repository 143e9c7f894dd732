"""From a CT checkpoint to a GGUF plan (spec/gguf.md §3-§5): architecture, hyperparameters,
tensor names (through gguf-py's name map), row transforms, stacking, vocabulary.

`gguf_plan(ckpt, ...)` returns everything a writer needs: the arch, a metadata function for
GGUFOutput, and one GGUFTensor per output tensor, each with the source tensors it reads and
a function from those (loaded) tensors to the bytes to write. It reads no tensor data itself
except `weight_shape` (16 bytes a module), so it fits a pipeline that streams module by module.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, Module
from .ggml import GGUFRefusal, ScaleCheck, block_type_for, encode_module
from .gguf_writer import FLOAT_TYPES
from .quant import decompress
from .spec import QUANT_PARAMS

__all__ = ["ArchInfo", "ARCHS", "GGUFTensor", "GGUFPlan", "gguf_plan", "arch_for", "hparams", "add_vocab",
           "tokenizer_pre", "PRE_TOKENIZERS", "OUTTYPES"]

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

# Expert parts by era, renamed to one spelling before stacking (spec/gguf.md §4.2, ctformat.md §7.2)
_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
          "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.([^.]+)$")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Names LC's modify_tensors reads the experts of each arch under, once stacked
_STACKED = {"LLAMA": "layers.{bid}.feed_forward.experts.{w}", "QWEN3MOE": "model.layers.{bid}.mlp.experts.{p}",
            "DEEPSEEK2": "model.layers.{bid}.mlp.experts.{p}"}
_LLAMA_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def arch_for(config: dict[str, Any]) -> ArchInfo:
    names = config.get("architectures") or [None]
    info = ARCHS.get(names[0])
    if info is None:
        raise GGUFRefusal(f"architecture {names[0]!r} is not one ctformat writes to GGUF "
                          f"({', '.join(sorted(ARCHS))})", rule="GGUF-01", where="config.json")
    return info


# -- hyperparameters --------------------------------------------------------------------------
KV = tuple[str, tuple]     # (GGUFWriter.add_* method, arguments)


def _need(config: dict[str, Any], key: str) -> Any:
    if config.get(key) is None:
        raise GGUFRefusal(f"config.json has no {key!r}, which the GGUF architecture needs", rule="GGUF-09",
                          where="config.json")
    return config[key]


def _first(config: dict[str, Any], *keys: str) -> Any:
    return next((config[k] for k in keys if config.get(k) is not None), None)


def _rope(config: dict[str, Any]) -> dict[str, Any]:
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
    kv: list[KV] = [("add_block_count", (_need(c, "num_hidden_layers"),))]
    for method, keys in (("add_context_length", ("max_position_embeddings",)), ("add_embedding_length", ("hidden_size",)),
                         ("add_feed_forward_length", ("intermediate_size",)),
                         ("add_head_count", ("num_attention_heads",)), ("add_head_count_kv", ("num_key_value_heads",))):
        if (v := _first(c, *keys)) is not None:
            kv.append((method, (v,)))
    kv += _rope_kv(_rope(c))
    if (v := _first(c, "rms_norm_eps")) is not None:
        kv.append(("add_layer_norm_rms_eps", (v,)))
    if (v := _first(c, "num_local_experts", "num_experts", "n_routed_experts")) is not None:
        kv.append(("add_expert_count", (v,)))
    if (v := _first(c, "num_experts_per_tok")) is not None:
        kv.append(("add_expert_used_count", (v,)))
    for method, key in (("add_expert_group_count", "n_group"), ("add_expert_group_used_count", "topk_group")):
        if c.get(key) is not None:
            kv.append((method, (c[key],)))
    if (v := _first(c, "scoring_func", "score_function")) is not None:
        import gguf
        gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX}
        if v not in gating:
            raise GGUFRefusal(f"scoring_func {v!r} is not sigmoid or softmax", rule="GGUF-09", where="config.json")
        kv.append(("add_expert_gating_func", (gating[v],)))
    if c.get("head_dim") is not None:
        kv += [("add_key_length", (c["head_dim"],)), ("add_value_length", (c["head_dim"],))]
    kv.append(("add_file_type", (file_type,)))
    if info.arch == "LLAMA":
        kv.append(("add_vocab_size", (_need(c, "vocab_size"),)))
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
            if (v := _first(rope, *keys)) is not None:
                kv.append((method, (v,)))
    elif kind not in (None, "default", "llama3"):
        raise GGUFRefusal(f"rope_type {kind!r} is not one ctformat writes (default, linear, yarn, llama3)",
                          rule="GGUF-09", where="config.json")
    if rope.get("rope_theta") is not None:
        kv.append(("add_rope_freq_base", (rope["rope_theta"],)))
    return kv


def _mla_kv(c: dict[str, Any]) -> list[KV]:
    moe = c.get("n_routed_experts") is not None
    first_dense = c.get("first_k_dense_replace")
    kv: list[KV] = [("add_leading_dense_block_count",
                     (first_dense if first_dense is not None else (0 if moe else c["num_hidden_layers"]),)),
                    ("add_vocab_size", (_need(c, "vocab_size"),))]
    if c.get("q_lora_rank") is not None:
        kv.append(("add_q_lora_rank", (c["q_lora_rank"],)))
    rank = c.get("kv_lora_rank", 512)
    kv += [("add_kv_lora_rank", (rank,)), ("add_key_length", (rank + _need(c, "qk_rope_head_dim"),)),
           ("add_value_length", (rank,)),
           ("add_key_length_mla", (_need(c, "qk_nope_head_dim") + c["qk_rope_head_dim"],)),
           ("add_value_length_mla", (_need(c, "v_head_dim"),)),
           ("add_expert_feed_forward_length", (_first(c, "moe_intermediate_size", "intermediate_size"),))]
    kv.append(("add_expert_shared_count", (c.get("n_shared_experts", 0),)))
    if c.get("routed_scaling_factor") is not None:
        kv.append(("add_expert_weights_scale", (c["routed_scaling_factor"],)))
    if c.get("norm_topk_prob"):
        kv.append(("add_expert_weights_norm", (True,)))
    kv.append(("add_rope_dimension_count", (c["qk_rope_head_dim"],)))
    if (m := _rope(c).get("mscale_all_dim")) is not None:
        kv.append(("add_rope_scaling_yarn_log_mul", (0.1 * m,)))
    return kv


# -- tensors ----------------------------------------------------------------------------------
@dataclass
class GGUFTensor:
    """One output tensor: `work(loaded sources by name)` returns what GGUFOutput.write takes."""

    name: str
    ggml_type: str
    shape: tuple[int, ...]                  # torch order, logical (elements, not bytes)
    sources: list[str]
    work: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    quantized: bool = False                 # written as repacked blocks
    dequantized: bool = False               # a quantized module written as floats (kv_b_proj, unmappable)


@dataclass
class GGUFPlan:
    arch: str                               # gguf MODEL_ARCH_NAMES value, e.g. "llama"
    tensors: list[GGUFTensor]
    metadata: Callable[[Any], None]         # for GGUFOutput(metadata=...)
    notes: list[str] = field(default_factory=list)
    checks: dict[str, ScaleCheck] = field(default_factory=dict)   # fp16 cast per repacked module, filled by work()

    @property
    def lossy(self) -> tuple[int, float]:
        """(scales changed by the fp16 cast, largest relative change) over the modules written so far."""
        bad = [c for c in self.checks.values() if not c.exact]
        return sum(c.count for c in bad), max((c.max_rel_error for c in bad), default=0.0)

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.name, t.ggml_type, t.shape) for t in self.tensors]


def gguf_plan(ckpt: Checkpoint, *, outtype: str = "bf16", int4_asym: str = "q5_0", allow_lossy: bool = False,
              dequantize_unmappable: bool = False, tokenizer_pre: str | None = None,
              model_name: str | None = None) -> GGUFPlan:
    """Every output tensor of the GGUF file, in source file order, plus its metadata (spec/gguf.md)."""
    import gguf
    if outtype not in OUTTYPES:
        raise GGUFRefusal(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}", rule="GGUF-06")
    config = dict(ckpt.config or {})
    info = arch_for(config)
    arch = gguf.MODEL_ARCH[info.arch]
    n_layers = _need(config, "num_hidden_layers")
    names = gguf.get_tensor_name_map(arch, n_layers)
    b = _Builder(ckpt, info, config, names, OUTTYPES[outtype], int4_asym, allow_lossy, dequantize_unmappable)
    tensors = b.build()
    file_type = _file_type(tensors, OUTTYPES[outtype])
    folder = ckpt.root
    kvs = hparams(info, config, file_type)
    if folder is None or not any((Path(folder) / f).is_file() for f in ("tokenizer.model", "tokenizer.json",
                                                                         "tiktoken.model")):
        b.notes.append("no tokenizer in the model folder: the file has no tokenizer.* keys")

    def metadata(writer) -> None:
        total, shared, expert, count = writer.get_total_parameter_count()
        meta = gguf.Metadata.load(None, folder, model_name, total)
        if meta.name is None and folder is not None:
            meta.name = Path(folder).name
        if meta.size_label is None and total > 0:
            meta.size_label = gguf.size_label(total, shared, expert, count)
        writer.add_type(gguf.GGUFType.MODEL)
        meta.set_gguf_meta_model(writer)
        for method, args in kvs:
            getattr(writer, method)(*args)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if folder is not None:
            add_vocab(writer, Path(folder), config, arch, tokenizer_pre)

    return GGUFPlan(gguf.MODEL_ARCH_NAMES[arch], tensors, metadata, b.notes, b.checks)


def _file_type(tensors: list[GGUFTensor], outtype: str) -> int:
    import gguf
    counts: dict[str, int] = {}
    for t in tensors:
        if t.quantized:
            counts[t.ggml_type] = counts.get(t.ggml_type, 0) + math.prod(t.shape)
    kind = max(counts, key=counts.get) if counts else outtype
    return int(gguf.LlamaFileType[{"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(kind, f"MOSTLY_{kind}")])


class _Builder:
    """Walks the checkpoint once, in file order, and emits GGUFTensors."""

    def __init__(self, ckpt, info, config, names, outtype, int4_asym, allow_lossy, dequantize_unmappable):
        self.ckpt, self.info, self.config, self.names = ckpt, info, config, names
        self.outtype, self.int4_asym = outtype, int4_asym
        self.allow_lossy, self.dequantize_unmappable = allow_lossy, dequantize_unmappable
        self.notes: list[str] = []
        self.checks: dict[str, ScaleCheck] = {}
        self.out: list[GGUFTensor] = []

    def build(self) -> list[GGUFTensor]:
        mods = self.ckpt.modules()
        order = sorted(self.ckpt.tensors.values(), key=lambda t: (t.file, t.start))
        stacks: dict[tuple[str, str], dict[int, Module]] = {}
        slots: dict[tuple[str, str], int] = {}      # a stack goes where its first expert was
        done: set[str] = set()
        for info in order:
            prefix, _, suffix = info.name.rpartition(".")
            m = mods[prefix]
            if self._dropped(info.name):
                continue
            hit = _EXPERT.match(prefix)
            if hit and hit.group(3) in _PARTS and (suffix in QUANT_PARAMS or suffix == "weight"):
                key = (hit.group(1), _PARTS[hit.group(3)])
                if key not in stacks:
                    stacks[key], slots[key] = {}, len(self.out)
                    self.out.append(None)
                stacks[key][int(hit.group(2))] = m
                continue
            if m.quantized and suffix in QUANT_PARAMS:
                if prefix not in done:
                    done.add(prefix)
                    self.out.extend(self._quantized(m))
                continue
            self.out.extend(self._dense(info.name, prefix, suffix))
        for key, experts in stacks.items():
            self.out[slots[key]] = self._stack(key, experts)
        self.out.extend(self._extra())
        return self.out

    # -- names and types --
    def _dropped(self, name: str) -> bool:
        if name.endswith(".rotary_emb.inv_freq"):
            return True
        if self.config.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
            return True
        hit = _LAYER.search(name)
        return bool(self.info.mla and hit and int(hit.group(1)) >= self.config["num_hidden_layers"])

    def _gguf_name(self, hf_name: str) -> str:
        hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        new = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise GGUFRefusal(f"gguf-py has no {self.info.arch.lower()} tensor name for {hf_name}", rule="GGUF-08",
                              where=hf_name)
        return new

    def _float_type(self, gguf_name: str, ndim: int) -> str:
        """spec/gguf.md §3 (LC's prepare_tensors rule)."""
        import gguf
        f32 = (ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
               or self._tensor_kind(gguf_name) in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP))
        return "F32" if f32 else self.outtype

    @staticmethod
    def _tensor_kind(gguf_name: str):
        import gguf
        base = re.sub(r"\.(weight|bias)$", "", gguf_name)
        generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", base)
        return next((k for k, v in gguf.TENSOR_NAMES.items() if v == generic), None)

    def _permute(self, hf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.info.permute_qk:
            return None
        heads = self.config["num_attention_heads"]
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            return lambda t: _permute_rows(t, heads)
        if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            return lambda t: _permute_rows(t, self.config.get("num_key_value_heads") or heads)
        return None

    # -- emitters --
    def _dense(self, name: str, prefix: str, suffix: str) -> list[GGUFTensor]:
        info = self.ckpt.tensors[name]
        gname = self._gguf_name(name)
        if self.info.mla and name.endswith("kv_b_proj.weight"):
            return self._kv_b(prefix, [name], lambda t: t[name])
        ggml_type = self._float_type(gname, len(info.shape))
        perm = self._permute(name)

        def work(t: dict[str, torch.Tensor]) -> torch.Tensor:
            x = t[name]
            x = perm(x) if perm else x
            return _as_float(x, ggml_type)
        return [GGUFTensor(gname, ggml_type, tuple(info.shape), [name], work)]

    def _quantized(self, m: Module, gname: str | None = None) -> list[GGUFTensor]:
        """A quantized module as repacked blocks (`gname` given for an expert, whose own name is never written)."""
        if m.scheme is None:
            raise GGUFRefusal("quantized, but no config group describes it", rule="TEN-10", where=m.prefix)
        sources = [i.name for s, i in m.tensors.items() if s in QUANT_PARAMS]
        shape = self._shape(m)
        wname = f"{m.prefix}.weight"
        if self.info.mla and m.prefix.endswith("kv_b_proj"):
            self.notes.append(f"{m.prefix}: quantized kv_b_proj dequantized (attn_k_b is transposed)")
            return self._kv_b(m.prefix, sources, lambda t: self._dequant(m, t))
        gname = gname or self._gguf_name(wname)
        try:       # a non-identity g_idx (GGUF-03) is refused by encode_module when it is read
            btype = block_type_for(m.scheme, shape[-1], int4_asym=self.int4_asym, where=m.prefix)
        except GGUFRefusal as err:
            if not (self.dequantize_unmappable and err.rule in ("GGUF-02", "GGUF-05")):
                raise
            return [self._as_f32(m, gname, sources, shape)]
        perm = self._permute(wname)
        layout = self.ckpt.layout(m, shape[-1])
        allow, scheme, where = self.allow_lossy, m.scheme, m.prefix
        ckpt, checks = self.ckpt, self.checks

        def work(t: dict[str, torch.Tensor]) -> torch.Tensor:
            local = {s: t[i.name] for s, i in m.tensors.items() if s in QUANT_PARAMS}
            ckpt.checked_shape(m, local["weight_shape"])
            raw, checks[where] = encode_module(local, scheme, btype, layout=layout, allow_lossy=allow, where=where)
            return perm(raw) if perm else raw
        return [GGUFTensor(gname, btype.name, shape, sources, work, quantized=True)]

    def _as_f32(self, m: Module, gname: str, sources: list[str], shape) -> GGUFTensor:
        self.notes.append(f"{m.prefix}: no exact ggml block type, written dequantized as F32")
        perm = self._permute(f"{m.prefix}.weight")

        def work(t):
            w = self._dequant(m, t)
            return perm(w) if perm else w
        return GGUFTensor(gname, "F32", shape, sources, work, dequantized=True)

    def _dequant(self, m: Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        local = {s: t[i.name] for s, i in m.tensors.items() if s in QUANT_PARAMS}
        local["weight_scale"] = local["weight_scale"].to(torch.float32)    # float32: exact
        shape = self.ckpt.checked_shape(m, local["weight_shape"])
        return decompress(local, m.scheme, layout=self.ckpt.layout(m, shape[-1]), dtype=torch.float32, kernel="torch")

    def _shape(self, m: Module) -> tuple[int, ...]:
        return tuple(int(v) for v in self.ckpt.load(m.tensors["weight_shape"].name).tolist())

    def _kv_b(self, prefix: str, sources: list[str], weight) -> list[GGUFTensor]:
        """LC deepseek.py: kv_b [heads*(nope+v), rank] -> k_b [heads, rank, nope] (transposed), v_b [heads, v, rank]."""
        c = self.config
        heads, nope, vdim = c["num_key_value_heads"], c["qk_nope_head_dim"], c["v_head_dim"]
        rank = c.get("kv_lora_rank", 512)
        k_name = self._gguf_name(f"{prefix.replace('kv_b_proj', 'k_b_proj')}.weight")
        v_name = self._gguf_name(f"{prefix.replace('kv_b_proj', 'v_b_proj')}.weight")
        out = self.outtype

        def split(t):
            w = weight(t)
            if w.shape != (heads * (nope + vdim), rank):
                raise GGUFRefusal(f"kv_b_proj is {list(w.shape)}, not [{heads}*({nope}+{vdim}), {rank}]",
                                  rule="GGUF-09", where=prefix)
            return torch.split(w.reshape(heads, nope + vdim, rank), [nope, vdim], dim=1)
        return [GGUFTensor(k_name, out, (heads, rank, nope), sources,
                           lambda t: _as_float(split(t)[0].transpose(1, 2), out), dequantized=True),
                GGUFTensor(v_name, out, (heads, vdim, rank), sources,
                           lambda t: _as_float(split(t)[1], out), dequantized=True)]

    def _stack(self, key: tuple[str, str], experts: dict[int, Module]) -> GGUFTensor:
        base, part = key
        n = len(experts)
        want = _first(self.config, "num_local_experts", "num_experts", "n_routed_experts") or n
        if sorted(experts) != list(range(want)):
            raise GGUFRefusal(f"experts {sorted(experts)} are not 0..{want - 1} (config.json says {want})",
                              rule="GGUF-10", where=f"{base}.*.{part}")
        mods = [experts[e] for e in range(n)]
        bid = int(_LAYER.search(base + ".").group(1))
        stacked = _STACKED[self.info.arch].format(bid=bid, p=part, w=_LLAMA_W[part])
        gname = self._gguf_name(f"{stacked}.weight")
        if all(not m.quantized for m in mods):
            shapes = {tuple(m.tensors["weight"].shape) for m in mods}
            if len(shapes) != 1:
                raise GGUFRefusal(f"experts have shapes {sorted(shapes)}", rule="GGUF-10", where=f"{base}.*.{part}")
            names = [m.tensors["weight"].name for m in mods]
            ggml_type = self._float_type(gname, 3)
            return GGUFTensor(gname, ggml_type, (n, *shapes.pop()), names,
                              lambda t: _as_float(torch.stack([t[x] for x in names]), ggml_type))
        parts = [self._quantized(m, gname)[0] for m in mods]
        kinds = {(p.ggml_type, p.shape) for p in parts}
        schemes = {m.scheme for m in mods}
        if len(kinds) != 1 or len(schemes) != 1 or any(not m.quantized for m in mods):
            raise GGUFRefusal(f"experts differ in type, shape or scheme: {sorted(map(str, kinds))}", rule="GGUF-10",
                              where=f"{base}.*.{part}")
        ggml_type, shape = kinds.pop()
        sources = [s for p in parts for s in p.sources]
        return GGUFTensor(gname, ggml_type, (n, *shape), sources, lambda t: torch.stack([p.work(t) for p in parts]),
                          quantized=parts[0].quantized, dequantized=parts[0].dequantized)

    def _extra(self) -> list[GGUFTensor]:
        """Tensors LC generates from the config: Llama 3 RoPE frequency factors (rope_freqs)."""
        rope = _rope(self.config)
        if self.info.arch != "LLAMA" or str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        factors = _llama3_rope_factors(self.config, rope)
        return [GGUFTensor("rope_freqs.weight", "F32", tuple(factors.shape), [], lambda t: factors)]


def _llama3_rope_factors(config: dict[str, Any], rope: dict[str, Any]) -> torch.Tensor:
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


def _permute_rows(t: torch.Tensor, heads: int) -> torch.Tensor:
    """LC's LlamaModel.permute on the leading (row) axis: rows [heads, 2, n/heads/2] -> swap 1 and 2."""
    n = t.shape[0]
    return t.reshape(heads, 2, n // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _as_float(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Bit copy when the dtype already matches, else round to nearest even (exact for widening)."""
    dtype = FLOAT_TYPES[ggml_type]
    return x.contiguous() if x.dtype == dtype else x.to(dtype)


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


def add_vocab(writer, folder: Path, config: dict[str, Any], arch, pre: str | None) -> None:
    """tokenizer.* keys through gguf-py's vocab readers; nothing when the folder has no tokenizer."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab
    n_vocab = config.get("vocab_size")
    if (folder / "tokenizer.model").is_file():
        vocab, model = SentencePieceVocab(folder), "llama"
    elif (folder / "tokenizer.json").is_file():
        try:
            vocab, model = LlamaHfVocab(folder), "llama"
        except (TypeError, FileNotFoundError, ValueError):
            try:
                vocab, model = BpeVocab(folder), "gpt2"
            except (FileNotFoundError, ValueError, KeyError) as err:
                raise GGUFRefusal(f"tokenizer.json is neither SentencePiece-style nor byte-level BPE ({err})",
                                  rule="GGUF-11", where="tokenizer.json") from None
    elif (folder / "tiktoken.model").is_file():
        raise GGUFRefusal("a tiktoken tokenizer (tiktoken.model), which gguf-py's vocab readers do not take",
                          rule="GGUF-11", where="tiktoken.model")
    else:
        return
    tokens, scores, types = [], [], []
    for text, score, ttype in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(ttype)
    if n_vocab is not None and len(tokens) < n_vocab:      # LC pads to the model's vocab_size
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-10000.0)
            types.append(gguf.TokenType.UNUSED)
    _mark_added(folder, tokens, types)
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        name = pre or tokenizer_pre(folder)
        if name is None:
            raise GGUFRefusal("BPE tokenizer whose pre-tokenizer regex is not one ctformat knows; pass "
                              "--tokenizer-pre NAME (llama.cpp's name for it)", rule="GGUF-11", where="tokenizer.json")
        writer.add_tokenizer_pre(name)
    else:
        writer.add_tokenizer_pre(pre or "default")
    writer.add_token_list(tokens)
    if model == "llama":
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    special.add_to_gguf(writer)


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
