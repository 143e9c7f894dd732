"""`convert --to gguf` (spec/gguf.md): a compressed-tensors checkpoint as one llama.cpp GGUF file
(or a split set), its quantized modules repacked into ggml blocks without requantizing.

Three phases, as every target: a plan (one pipeline Step per GGUF tensor, in source file order,
names through gguf-py, metadata and vocabulary read), a preflight that reads the small tensors
(g_idx, scales, zero points) and refuses what cannot be written exactly, then
pipeline.run_steps into GGUFOutput, which publishes the file(s) atomically. Everything refusable
is refused before the output exists.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .extras import require
from .checkpoint import Checkpoint, Module
from .dequant import checked_shape
from .dtypes import torch_dtype
from .errors import GGUFRefusal
from .ggml import (BLOCK_TYPES, ScaleCheck, block_type_for, check_fp16, check_g_idx, check_zero_points,
                   encode_module, minimums, refuse, signed_zero_points)
from .gguf_arch import (OUTTYPES, ArchInfo, arch_for, first, hparams, llama3_rope_factors, need, permute_rows,
                        read_vocab, rope_of)
from .gguf_header import ggml_nbytes
from .gguf_writer import FLOAT_TYPES, GGUFOutput
from .pipeline import Buffers, ConvertResult, Step, check_plan, file_order, open_for_convert, run_steps
from .quant import decompress
from .scheme import Strategy
from .spec import EXPERT_MODULE, QUANT_PARAMS

__all__ = ["convert_to_gguf", "gguf_plan", "GGUFPlan"]

Progress = Callable[[int, int], None]

# Expert parts by era, renamed to one spelling before stacking (spec/gguf.md §4.2, ctformat.md §7.2)
_PARTS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj",
          "gate_proj": "gate_proj", "up_proj": "up_proj", "down_proj": "down_proj"}
_EXPERT = re.compile(EXPERT_MODULE)
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Names LC's modify_tensors reads the experts of each arch under, once stacked
_STACKED = {"LLAMA": "layers.{bid}.feed_forward.experts.{w}", "QWEN3MOE": "model.layers.{bid}.mlp.experts.{p}",
            "DEEPSEEK2": "model.layers.{bid}.mlp.experts.{p}"}
_LLAMA_W = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@dataclass
class Repack:
    """One quantized module to be repacked: what the preflight checks and the step encodes."""

    module: Module
    btype: str                              # BLOCK_TYPES key
    shape: tuple[int, ...]
    layout: str


@dataclass
class GGUFPlan:
    arch: str                               # gguf MODEL_ARCH_NAMES value, e.g. "llama"
    steps: list[Step]
    metadata: Callable[[Any], None]         # for GGUFOutput(metadata=...)
    repacks: list[Repack]
    dropped: dict[str, str]                 # source tensor -> why LC (and so this plan) leaves it out
    dequantized: list[str] = field(default_factory=list)      # quantized modules written as floats
    notes: list[str] = field(default_factory=list)
    buffers: Buffers = field(default_factory=Buffers)        # the steps' block buffers, for run_steps

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """The GGUF tensors in order. Consecutive outputs of one name are pieces of one tensor
        along its first axis (an expert stack, one step per expert)."""
        out: list[tuple[str, str, tuple[int, ...]]] = []
        for name, kind, shape in (o for step in self.steps for o in step.outputs):
            if out and out[-1][0] == name:
                out[-1] = (name, kind, (out[-1][2][0] + shape[0], *shape[1:]))
            else:
                out.append((name, kind, shape))
        return out


def convert_to_gguf(model: str | Path, out: str | Path, *, outtype: str = "bf16", int4_asym: str = "q5_0",
                    allow_lossy: bool = False, dequantize_unmappable: bool = False, tokenizer_pre: str | None = None,
                    split_max_size: int = 0, device: str = "auto", force: bool = False,
                    progress: Progress | None = None) -> ConvertResult:
    """Write MODEL as a GGUF file at OUT (a split set when `split_max_size` bytes of tensor
    data would be exceeded); refusals (GCV rules) before any output exists."""
    require("gguf")           # names, vocabulary readers and the file writer are gguf-py's
    src, _, ckpt = open_for_convert(model, out, device)      # the repack is a byte shuffle: always on the CPU
    plan = gguf_plan(ckpt, outtype=outtype, int4_asym=int4_asym, dequantize_unmappable=dequantize_unmappable,
                     tokenizer_pre=tokenizer_pre)
    lossy = preflight(ckpt, plan, allow_lossy)
    check_plan(ckpt, plan.steps, frozenset(QUANT_PARAMS), dropped=frozenset(plan.dropped))
    result = ConvertResult("gguf", "repacked", str(out), "cpu")
    # --resume hook: the plan (names, types, shapes, order) and so every byte offset of every
    # shard is fixed before the first write; a resumable run can compare a partial shard with
    # the same plan's header and restart run_steps at the first tensor it lacks.
    with GGUFOutput(out, plan.arch, plan.entries, plan.metadata, split_max_size=split_max_size, force=force,
                    source=src) as writer:
        run_steps(ckpt, plan.steps, writer, torch.device("cpu"), result, progress, plan.buffers, views=True)
        files = writer.close()
    types: dict[str, int] = {}
    for name, kind, _ in plan.entries:
        types[kind] = types.get(kind, 0) + 1
    result.details.update({
        "files": [str(f) for f in files], "tensors": len(plan.entries), "ggml_types": dict(sorted(types.items())),
        "bytes_written": sum(f.stat().st_size for f in files), "dequantized_modules": plan.dequantized,
        "dropped": plan.dropped, "lossy_scales": lossy.count, "lossy_max_rel_error": lossy.max_rel_error,
        "notes": plan.notes})
    return result


# -- preflight -------------------------------------------------------------------------------
def preflight(ckpt: Checkpoint, plan: GGUFPlan, allow_lossy: bool) -> ScaleCheck:
    """Read every repacked module's scales and zero points (a few percent of the model) and
    refuse what its blocks cannot hold exactly (GCV-04, GCV-07; g_idx, GCV-03, was read by the
    plan); with allow_lossy the fp16 casts are counted instead. Returns the merged scale check
    over the model."""
    total = ScaleCheck(0, 0, None, None, 0.0)
    for r in plan.repacks:
        m, s = r.module, r.module.scheme
        t = {k: ckpt.load(m.tensors[k].name) for k in ("weight_scale", "weight_zero_point") if k in m.tensors}
        t["weight_shape"] = torch.tensor(r.shape)
        z = signed_zero_points(t, s, r.layout)
        if z is not None:
            check_zero_points(z, s, BLOCK_TYPES[r.btype], m.prefix)
        check = check_fp16(t["weight_scale"])
        if r.btype == "Q4_1":
            check = check.merge(check_fp16(minimums(t["weight_scale"], z, s.num_bits)))
        if not check.exact and not allow_lossy:
            raise check.refusal(m.prefix, "scales" if r.btype != "Q4_1" else "scales or minimums")
        total = total.merge(check)
    return total


# -- the plan --------------------------------------------------------------------------------
def gguf_plan(ckpt: Checkpoint, *, outtype: str = "bf16", int4_asym: str = "q5_0", dequantize_unmappable: bool = False,
              tokenizer_pre: str | None = None, model_name: str | None = None) -> GGUFPlan:
    """Every output tensor of the GGUF file as a Step, in source file order, plus its metadata
    and vocabulary (read now, so a tokenizer it cannot write is refused before any output)."""
    import gguf
    if outtype not in OUTTYPES:
        raise refuse("GCV-06", f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}", option="outtype")
    if ckpt.marlin is not None:
        raise refuse("GCV-12", "a Marlin checkpoint; convert it back with --to compressed-tensors first", ckpt.label)
    other = sorted({m.format or "unknown" for m in ckpt.modules().values() if m.quantized and not m.packed})
    if other or any(t.online for t in (ckpt.quant.transforms if ckpt.quant else ())):
        raise refuse("GCV-12", f"{', '.join(other) or 'online-transform'} modules: this target repacks pack-quantized "
                     "codes (convert --to dense first)", ckpt.label)
    config = dict(ckpt.config or {})
    info = arch_for(config)
    arch = gguf.MODEL_ARCH[info.arch]
    names = gguf.get_tensor_name_map(arch, need(config, "num_hidden_layers"))
    buffers = Buffers()
    b = _Builder(ckpt, info, config, names, OUTTYPES[outtype], int4_asym, dequantize_unmappable, buffers)
    steps = b.build()
    folder = ckpt.root
    kvs = hparams(info, config, _file_type(b, OUTTYPES[outtype]))
    vocab = read_vocab(Path(folder), config, tokenizer_pre) if folder is not None else None
    if vocab is None:
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
        if vocab is not None:
            vocab(writer)

    return GGUFPlan(gguf.MODEL_ARCH_NAMES[arch], steps, metadata, b.repacks, b.dropped, b.dequantized, b.notes,
                    buffers)


def _file_type(b: _Builder, outtype: str) -> int:
    """MOSTLY_<type> of the ggml type holding the most repacked weights, else the outtype's."""
    import gguf
    counts: dict[str, int] = {}
    for r in b.repacks:
        counts[r.btype] = counts.get(r.btype, 0) + math.prod(r.shape)
    kind = max(counts, key=counts.get) if counts else outtype
    return int(gguf.LlamaFileType[{"F32": "ALL_F32", "F16": "MOSTLY_F16"}.get(kind, f"MOSTLY_{kind}")])


class _Builder:
    """Walks the checkpoint once, in file order, and emits one Step per GGUF tensor."""

    def __init__(self, ckpt: Checkpoint, info: ArchInfo, config: dict, names, outtype: str, int4_asym: str,
                 dequantize_unmappable: bool, buffers: Buffers) -> None:
        self.ckpt, self.info, self.config, self.names, self.buffers = ckpt, info, config, names, buffers
        self.outtype, self.int4_asym, self.dequantize_unmappable = outtype, int4_asym, dequantize_unmappable
        self.notes: list[str] = []
        self.repacks: list[Repack] = []
        self.dequantized: list[str] = []
        self.dropped: dict[str, str] = {}
        self.out: list[Step | list[Step] | None] = []      # a stack is a list: one step per expert

    def build(self) -> list[Step]:
        mods = self.ckpt.modules()
        stacks: dict[tuple[str, str], dict[int, Module]] = {}
        slots: dict[tuple[str, str], int] = {}      # a stack goes where its first expert was
        done: set[str] = set()
        for t in file_order(self.ckpt):
            prefix, _, suffix = t.name.rpartition(".")
            m = mods[prefix]
            why = self._dropped(t.name)
            if why:
                self.dropped[t.name] = why
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
                    self.out.append(self._quantized(m))
                continue
            self.out.append(self._dense(t.name, prefix))
        for key, experts in stacks.items():
            self.out[slots[key]] = self._stack(key, experts)
        self.out.extend(self._extra())
        return [s for group in self.out if group is not None for s in (group if isinstance(group, list) else [group])]

    # -- names and types --
    def _dropped(self, name: str) -> str | None:
        """Why LC's converter leaves a source tensor out, or None (spec/gguf.md §4.2)."""
        if name.endswith(".rotary_emb.inv_freq"):
            return "rotary inv_freq (llama.cpp computes it)"
        if self.config.get("tie_word_embeddings") and name in ("lm_head.weight", "model.lm_head.weight"):
            return "tied lm_head (the output reuses token_embd)"
        hit = _LAYER.search(name)
        if self.info.mla and hit and int(hit.group(1)) >= self.config["num_hidden_layers"]:
            return "multi-token-prediction layer (llama.cpp does not run it)"
        return None

    def _gguf_name(self, hf_name: str) -> str:
        hf_name = hf_name.replace("e_score_correction_bias", "e_score_correction.bias")
        new = self.names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise refuse("GCV-08", f"gguf-py has no {self.info.arch.lower()} tensor name for it", hf_name)
        return new

    def _float_type(self, gguf_name: str, ndim: int) -> str:
        """spec/gguf.md §3 (LC's prepare_tensors rule)."""
        import gguf
        f32 = (ndim <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight")
               or _tensor_kind(gguf_name) in (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP))
        return "F32" if f32 else self.outtype

    def _permute(self, hf_name: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
        if not self.info.permute_qk:
            return None
        heads = self.config["num_attention_heads"]
        if re.search(r"\.q_proj\.(weight|bias)$", hf_name):
            return lambda t, out=None: permute_rows(t, heads, out)
        if re.search(r"\.k_proj\.(weight|bias)$", hf_name):
            return lambda t, out=None: permute_rows(t, self.config.get("num_key_value_heads") or heads, out)
        return None

    # -- emitters --
    def _dense(self, name: str, prefix: str) -> Step:
        info = self.ckpt.tensors[name]
        if self.info.mla and name.endswith("kv_b_proj.weight"):
            return self._kv_b(prefix, [name], lambda t: t[name], None)
        gname = self._gguf_name(name)
        ggml_type = self._float_type(gname, len(info.shape))
        perm = self._permute(name)
        if perm is None and FLOAT_TYPES[ggml_type] == torch_dtype(info.dtype):
            return Step([(gname, ggml_type, tuple(info.shape))], [name])          # bytes as they are

        def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            x = t[name]
            return [_as_float(perm(x) if perm else x, ggml_type)]
        return Step([(gname, ggml_type, tuple(info.shape))], [name], work)

    def _shape(self, m: Module) -> tuple[int, ...]:
        return checked_shape(self.ckpt, m, self.ckpt.load(m.tensors["weight_shape"].name))

    def _quantized(self, m: Module, gname: str | None = None) -> Step:
        """A quantized module as repacked blocks (`gname` given for an expert, whose own name is never written)."""
        if m.scheme is None:
            raise refuse("GCV-10", "quantized, but no config group describes it", m.prefix)
        sources = [i.name for s, i in m.tensors.items() if s in QUANT_PARAMS]
        shape = self._shape(m)
        wname = f"{m.prefix}.weight"
        if self.info.mla and m.prefix.endswith("kv_b_proj"):
            self.dequantized.append(m.prefix)
            self.notes.append(f"{m.prefix}: quantized kv_b_proj dequantized (attn_k_b is transposed)")
            return self._kv_b(m.prefix, sources, lambda t: self._dequant(m, t), m.prefix)
        gname = gname or self._gguf_name(wname)
        try:
            btype = block_type_for(m.scheme, shape[-1], int4_asym=self.int4_asym, where=m.prefix)
            if "weight_g_idx" in m.tensors:       # one int per input column: read now, so it plans
                if m.scheme.strategy is not Strategy.GROUP:
                    raise refuse("GCV-03", f"weight_g_idx with strategy {m.scheme.strategy.value}", m.prefix)
                check_g_idx(self.ckpt.load(m.tensors["weight_g_idx"].name), m.scheme.group_size, m.prefix)
        except GGUFRefusal as err:
            if not (self.dequantize_unmappable and err.rule in ("GCV-02", "GCV-03", "GCV-05")):
                raise
            return self._as_f32(m, gname, sources, shape)
        layout = self.ckpt.word_layout(m, shape[-1])
        self.repacks.append(Repack(m, btype.name, shape, layout))
        perm = self._permute(wname)
        scheme, pool, nbytes = m.scheme, self.buffers, ggml_nbytes(btype.name, shape)

        def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
            raw = encode_module(_local(m, t), scheme, btype, layout=layout, out=pool.take(nbytes).numpy())
            if perm is None:
                return [raw]
            rows = perm(raw, pool.take(nbytes).view(raw.shape))
            pool.give([raw])                  # the unpermuted blocks were this function's alone
            return [rows]
        return Step([(gname, btype.name, shape)], sources, work, m.prefix)

    def _as_f32(self, m: Module, gname: str, sources: list[str], shape) -> Step:
        self.dequantized.append(m.prefix)
        self.notes.append(f"{m.prefix}: no exact ggml block type, written dequantized as F32")
        perm = self._permute(f"{m.prefix}.weight")

        def work(t):
            w = self._dequant(m, t)
            return [perm(w) if perm else w]
        return Step([(gname, "F32", shape)], sources, work, m.prefix)

    def _dequant(self, m: Module, t: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 s * (q - z): exact (q - z and s are exact in float32, one rounding of the product)."""
        local = _local(m, t)
        local["weight_scale"] = local["weight_scale"].to(torch.float32)
        shape = checked_shape(self.ckpt, m, local["weight_shape"])
        return decompress(local, m.scheme, layout=self.ckpt.word_layout(m, shape[-1]), dtype=torch.float32,
                          kernel="torch")

    def _kv_b(self, prefix: str, sources: list[str], weight, module: str | None) -> Step:
        """LC deepseek.py: kv_b [heads*(nope+v), rank] -> k_b [heads, rank, nope] (transposed), v_b [heads, v, rank]."""
        c = self.config
        heads, nope, vdim = c["num_key_value_heads"], need(c, "qk_nope_head_dim"), need(c, "v_head_dim")
        rank = c.get("kv_lora_rank", 512)
        k_name = self._gguf_name(f"{prefix.replace('kv_b_proj', 'k_b_proj')}.weight")
        v_name = self._gguf_name(f"{prefix.replace('kv_b_proj', 'v_b_proj')}.weight")
        out = self.outtype

        def work(t):
            w = weight(t)
            if tuple(w.shape) != (heads * (nope + vdim), rank):
                raise refuse("GCV-09", f"kv_b_proj is {list(w.shape)}, not [{heads}*({nope}+{vdim}), {rank}]", prefix)
            k, v = torch.split(w.reshape(heads, nope + vdim, rank), [nope, vdim], dim=1)
            return [_as_float(k.transpose(1, 2), out), _as_float(v, out)]
        return Step([(k_name, out, (heads, rank, nope)), (v_name, out, (heads, vdim, rank))], sources, work, module)

    def _stack(self, key: tuple[str, str], experts: dict[int, Module]) -> list[Step]:
        """One GGUF tensor [E, out, in] written expert by expert: a step per expert, each reading
        that expert only and writing its [1, out, in] piece (memory: one expert, not the stack)."""
        base, part = key
        n = len(experts)
        want = first(self.config, "num_local_experts", "num_experts", "n_routed_experts") or n
        where = f"{base}.*.{part}"
        if sorted(experts) != list(range(want)):
            raise refuse("GCV-10", f"experts {sorted(experts)} are not 0..{want - 1} (config.json says {want})", where)
        mods = [experts[e] for e in range(n)]
        bid = int(_LAYER.search(base + ".").group(1))
        gname = self._gguf_name(f"{_STACKED[self.info.arch].format(bid=bid, p=part, w=_LLAMA_W[part])}.weight")
        if all(not m.quantized for m in mods):
            shapes = {tuple(m.tensors["weight"].shape) for m in mods if "weight" in m.tensors}
            if len(shapes) != 1 or any("weight" not in m.tensors for m in mods):
                raise refuse("GCV-10", f"experts have shapes {sorted(shapes)}", where)
            ggml_type, shape = self._float_type(gname, 3), shapes.pop()
            return [_piece(gname, ggml_type, shape, [m.tensors["weight"].name], None,
                           lambda t, x=m.tensors["weight"].name: _as_float(t[x], ggml_type)) for m in mods]
        if any(not m.quantized for m in mods) or len({m.scheme for m in mods}) != 1:
            raise refuse("GCV-10", "experts differ in scheme (or some are not quantized)", where)
        parts = [self._quantized(m, gname) for m in mods]
        kinds = {p.outputs[0][1:] for p in parts}
        if len(kinds) != 1:
            raise refuse("GCV-10", f"experts differ in type or shape: {sorted(map(str, kinds))}", where)
        ggml_type, shape = kinds.pop()
        return [_piece(gname, ggml_type, shape, p.sources, p.module, lambda t, w=p.work: w(t)[0]) for p in parts]

    def _extra(self) -> list[Step]:
        """Tensors LC generates from the config: Llama 3 RoPE frequency factors (rope_freqs)."""
        rope = rope_of(self.config)
        if self.info.arch != "LLAMA" or str(rope.get("rope_type", "")).lower() != "llama3":
            return []
        factors = llama3_rope_factors(self.config, rope)
        return [Step([("rope_freqs.weight", "F32", tuple(factors.shape))], [], lambda t: [factors])]


def _piece(gname: str, ggml_type: str, shape: tuple[int, ...], sources: list[str], module: str | None,
           work: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> Step:
    """One expert's step of a stack: its [out, in] tensor as the piece [1, out, in] of `gname`."""
    return Step([(gname, ggml_type, (1, *shape))], sources, lambda t: [work(t).unsqueeze(0)], module)


def _local(m: Module, t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {s: t[i.name] for s, i in m.tensors.items() if s in QUANT_PARAMS and i.name in t}


def _tensor_kind(gguf_name: str):
    import gguf
    base = re.sub(r"\.(weight|bias)$", "", gguf_name)
    generic = re.sub(r"^blk\.\d+\.", "blk.{bid}.", base)
    return next((k for k, v in gguf.TENSOR_NAMES.items() if v == generic), None)


def _as_float(x: torch.Tensor, ggml_type: str) -> torch.Tensor:
    """Bit copy when the dtype already matches, else round to nearest even (exact for widening)."""
    dtype = FLOAT_TYPES[ggml_type]
    return x.contiguous() if x.dtype == dtype else x.to(dtype)

