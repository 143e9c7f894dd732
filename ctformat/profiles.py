"""Loader profiles for `validate --target`: what vLLM 0.33 will refuse to load, in vLLM's own
words (spec §6.1), and what transformers silently loads wrong (§6.2). Judged from config and
headers only; one finding per cause, not per module."""
from __future__ import annotations

import re

from .architectures import router_verdict
from .checkpoint import Checkpoint, Module
from .names import expert_parts, loader_name
from .report import Issue, issue, module_issue
from .scheme import QuantGroup, QuantScheme, Strategy
from .spec import DENSE_FORMAT, EXPERT_RENAMES, FUSED_SIBLINGS, MARLIN_GROUP_SIZES, MOE_PARTS, PACK_QUANTIZED

__all__ = ["vllm_issues", "transformers_issues", "LINEAR_KERNELS"]

_GATES = {gate for gate, _, _ in MOE_PARTS}                     # w1, gate_proj
# formats whose weights vLLM reads with activation-quantization schemes (its is_activation_quantization_format)
_ACTIVATION_FORMATS = ("naive-quantized", "int-quantized", "float-quantized", "nvfp4-pack-quantized")
_FP8_WEIGHT_STRATEGIES = (Strategy.TENSOR, Strategy.CHANNEL, Strategy.BLOCK)
_PROJECTIONS = sorted({name for parts in MOE_PARTS for name in parts})

# CUDA WNA16 kernels for Linear layers (vLLM model_executor/kernels/linear/mixed_precision/*):
# name -> predicate over (num_bits, symmetric, group_size or -1 for channel).
LINEAR_KERNELS = {
    "Marlin": lambda num_bits, symmetric, group_size: (
        (num_bits in (4, 8) if symmetric else num_bits == 4) and group_size in MARLIN_GROUP_SIZES),
    "Machete (SM90 only)": lambda num_bits, symmetric, group_size: num_bits in (4, 8) and group_size in (-1, 64, 128),
    "TritonW4A16": lambda num_bits, symmetric, group_size: num_bits == 4 and group_size in (-1, 32, 64, 128, 256),
}


def _issue(rule: str, where: str, message: str) -> Issue:
    """A profile's finding: always a warning, about the config (one per cause, not per module)."""
    return issue(rule, "config.json", where, message)


def vllm_issues(ckpt: Checkpoint) -> list[Issue]:
    if ckpt.marlin is not None:
        return [_marlin_issue(ckpt)]
    if ckpt.gptq is not None:
        return _dedupe(_gptq_issues(ckpt))
    q = ckpt.quant
    if q is None:
        return []
    if q.sparsity is not None:                 # vLLM refuses the config before any layer is built
        return [_issue("VLLM-07", "quantization_config.sparsity_config", "vLLM 0.33: \"Sparsity support has been "
                       "removed from compressed-tensors. Please use a model without sparsity configuration.\" "
                       "(ctformat convert --to dense scatters it)")]
    out: list[Issue] = []
    for g in q.groups:
        if g.weights is not None:
            out += _scheme_issues(q.group_format(g), g, f"quantization_config.config_groups.{g.name}")
    out += _moe_issues(ckpt) + _expert_name_issues(ckpt) + _block_issues(ckpt) + _transform_issues(ckpt)
    out += _kv_issues(q) + _router_issues(ckpt)
    return _dedupe(out)


def _is_nvfp4(a: QuantScheme | None) -> bool:
    return (a is not None and a.is_float and a.num_bits == 4 and a.strategy is Strategy.TENSOR_GROUP
            and a.group_size == 16 and a.symmetric)


def _is_mx(a: QuantScheme | None, bits: int) -> bool:
    """vLLM's _is_mxfp4 / _is_mxfp8 (MXFP8 also needs uint8 scales)."""
    return (a is not None and a.is_float and a.num_bits == bits and a.strategy is Strategy.GROUP and a.group_size == 32
            and a.symmetric and (bits == 4 or a.scale_dtype == "U8"))


def _is_fp8_w8a8(w: QuantScheme, a: QuantScheme | None) -> bool:
    weights_ok = w.is_float and w.symmetric and not w.dynamic and w.strategy in _FP8_WEIGHT_STRATEGIES
    return (a is not None and weights_ok and a.is_float
            and (bool(a.dynamic) or (a.symmetric and a.strategy is Strategy.TENSOR)))


def _scheme_issues(fmt: str, g: QuantGroup, where: str) -> list[Issue]:
    """What vLLM 0.33's CompressedTensorsConfig._get_scheme_from_parts picks for a Linear layer of
    this group on CUDA, in its order, and what that scheme does on which GPUs (spec §6.1)."""
    w, a = g.weights, g.input_activations
    act = "" if a is None else f" with {a.words()} input activations"
    words = f"{w.words()} weights{act} ({fmt})"
    if _is_nvfp4(w):
        if a is None:
            return []                                         # NVFP4A16: Marlin FP4, SM75+
        if not _is_nvfp4(a):
            return [_issue("VLLM-02", where, f"{words}: vLLM: \"For NVFP4 weights, input quantization must also be "
                           "NVFP4 format, None for NVFP4A16\"")]
        return [_issue("VLLM-04", where, f"{words}: FP4 activations run on Blackwell (SM100+: FlashInfer, CUTLASS "
                       "FP4); on older GPUs vLLM's NVFP4 kernel list falls back to weight-only Marlin FP4 (W4A16)")]
    if _is_mx(w, 4) or _is_mx(w, 8):
        name = f"MXFP{w.num_bits}"
        if a is None:
            return []                                         # weight-only Marlin MX kernels
        return [_issue("VLLM-04", where, f"{words}: {name} activations run on Blackwell (SM100+, FlashInfer); on older "
                       f"GPUs vLLM falls back to weight-only Marlin {name}")]
    if _is_w4afp8(w, a):
        return [_issue("VLLM-02", where, f"{words}: vLLM has CompressedTensorsW4A8Fp8 only on compute capability 9.0 "
                       "(H100/H200); elsewhere: \"No compressed-tensors compatible scheme was found\"")]
    if fmt == PACK_QUANTIZED and _int_weights_static(w) and a is not None and _is_int_dynamic(a):
        # _is_wNaM_int -> CompressedTensorsWNA8Int / WNA4Int: weight kernels of WNA16, activations by Humming only
        return _linear_issues(w, where) + [_issue("VLLM-04", where, f"{words}: vLLM picks CompressedTensorsWNA"
                                                  f"{a.num_bits}Int; only the optional Humming kernel quantizes the "
                                                  "activations, and Marlin or Machete (tried first) run the layer "
                                                  "with 16-bit activations")]
    if fmt == PACK_QUANTIZED and a is None and not w.dynamic:
        return _wna16_issues(w, where)
    if fmt in _ACTIVATION_FORMATS:
        if _is_fp8_w8a8(w, a):
            return [_issue("VLLM-04", where, f"{words}: CompressedTensorsW8A8Fp8 needs compute capability 8.9 (Ada, "
                           "Hopper, Blackwell); below it vLLM runs CompressedTensorsW8A16Fp8 (weight-only FP8 Marlin)")]
        if w.is_float and w.symmetric and not w.dynamic and w.strategy in _FP8_WEIGHT_STRATEGIES:
            return [] if a is None else [_issue("VLLM-04", where, f"{words}: vLLM runs CompressedTensorsW8A16Fp8 "
                                                "(weight-only FP8 Marlin); these activations are not quantized")]
        if _is_int8_w8a8(w, a):
            return []                                         # CompressedTensorsW8A8Int8, SM75+
        if _is_w4a8_int(w, a):
            return [_issue("VLLM-02", where, f"{words}: vLLM picks CompressedTensorsW4A8Int, whose signed int4 weights "
                           "no CUDA kernel but the optional Humming package takes; vLLM: \"Failed to find a kernel "
                           "that can implement the WNA16 linear layer\"")]
    return [_issue("VLLM-02", where, f"{words}: vLLM: \"No compressed-tensors compatible scheme was found\"" + (
        " (vLLM reads neither dense, saved-uncompressed checkpoints nor marlin-24; ctformat convert --to dense "
        "writes a plain model)" if fmt in (DENSE_FORMAT, "marlin-24") else ""))]


def _int_weights_static(w: QuantScheme) -> bool:
    return not w.is_float and not w.dynamic and w.strategy in (Strategy.CHANNEL, Strategy.GROUP)


def _is_int_dynamic(a: QuantScheme) -> bool:
    return (not a.is_float and a.symmetric and bool(a.dynamic) and a.strategy in (Strategy.TOKEN, Strategy.GROUP)
            and a.num_bits in (4, 8))


def _is_w4afp8(w: QuantScheme, a: QuantScheme | None) -> bool:
    return (a is not None and not w.is_float and w.num_bits == 4 and w.strategy is Strategy.GROUP and w.symmetric
            and not w.dynamic and a.is_float and a.num_bits == 8 and a.strategy is Strategy.TOKEN and a.symmetric
            and bool(a.dynamic))


def _is_int8_w8a8(w: QuantScheme, a: QuantScheme | None) -> bool:
    if a is None or w.num_bits != 8 or a.num_bits != 8 or w.is_float or not w.symmetric or w.dynamic:
        return False
    if w.strategy not in (Strategy.TENSOR, Strategy.CHANNEL):
        return False
    return (a.strategy is Strategy.TENSOR and not a.dynamic) or (a.strategy is Strategy.TOKEN and bool(a.dynamic))


def _is_w4a8_int(w: QuantScheme, a: QuantScheme | None) -> bool:
    return (a is not None and not w.is_float and not a.is_float and w.num_bits == 4 and a.num_bits == 8
            and w.strategy in (Strategy.GROUP, Strategy.CHANNEL) and a.strategy is Strategy.TOKEN and w.symmetric
            and not w.dynamic and bool(a.dynamic))


def _wna16_issues(s: QuantScheme, where: str) -> list[Issue]:
    out = []
    if s.has_g_idx:
        out.append(_issue("VLLM-01", f"{where}.weights.actorder", "vLLM >= 0.30: \"Compressed-tensors "
                          "group/dynamic activation ordering (actorder=group) is no longer supported. Use a "
                          "checkpoint with static/weight activation ordering or without activation ordering.\""))
    return out + _linear_issues(s, where)


def _marlin_issue(ckpt: Checkpoint) -> Issue:
    said = ("vLLM 0.33 reads quant_method gptq as GPTQ tensors (qweight, scales, qzeros) and ignores "
            "checkpoint_format: the B/s tensors fail to load" if ckpt.marlin.legacy else
            "vLLM: \"Unknown quantization method: ctformat-marlin\"")
    return _issue("VLLM-05", "quantization_config.quant_method", f"a pre-repacked Marlin checkpoint: {said}; vLLM "
                  "repacks the compressed-tensors source itself (ctformat convert --to compressed-tensors)")


def _linear_issues(s: QuantScheme, where: str) -> list[Issue]:
    if s.strategy not in (Strategy.GROUP, Strategy.CHANNEL):
        return [_issue("VLLM-02", where, "vLLM: \"Pack-quantized format requires group quantization or channelwise "
                       "quantization, but found no group size and strategy is not channelwise.\"")]
    if not 2 <= s.num_bits <= 8:
        return [_issue("VLLM-02", where, f"vLLM: \"Unsupported num_bits = {s.num_bits}. Supported num_bits = "
                       "[2, 3, 4, 5, 6, 7, 8]\"")]
    g = s.group_size or -1
    kernels = [k for k, ok in LINEAR_KERNELS.items() if ok(s.num_bits, s.symmetric, g)]
    sym = "symmetric" if s.symmetric else "asymmetric"
    if not kernels:
        return [_issue("VLLM-02", where, f"int{s.num_bits} {sym} group_size {g}: no CUDA kernel but the optional "
                       "Humming package; vLLM: \"Failed to find a kernel that can implement the WNA16 linear layer\"")]
    if kernels == ["Machete (SM90 only)"]:
        return [_issue("VLLM-02", where, f"int{s.num_bits} {sym} group_size {g}: only the Machete kernel, "
                       "so only on H100/H200 (SM90)")]
    return []


def _gptq_issues(ckpt: Checkpoint) -> list[Issue]:
    """VLLM-10: what vLLM 0.33's auto_gptq / auto_awq (AutoGPTQConfig, AutoAWQConfig) make of each
    scheme the file uses (spec/gptq-awq.md §8.1)."""
    cfg, where = ckpt.gptq, "quantization_config"
    schemes = dict.fromkeys([cfg.default, *(m.gptq for m in ckpt.modules().values() if m.quantized and m.gptq)])
    out = []
    for s in schemes:
        if cfg.method == "awq":
            if s.sym or not LINEAR_KERNELS["Marlin"](4, False, s.group_size):
                why = "zero_point false" if s.sym else f"group_size {s.group_size}"
                out.append(_issue("VLLM-10", where, f"AWQ with {why}: vLLM's Marlin kernels do not take it; vLLM: "
                                  "\"Layer '...' is not supported by AutoAWQMarlin. Falling back to unoptimized AWQ "
                                  "kernels.\""))
            continue
        if (s.bits, s.sym) not in ((4, True), (8, True)):
            out.append(_issue("VLLM-10", where, f"vLLM 0.33 reads GPTQ as symmetric 4- or 8-bit only; vLLM: "
                              f"\"Unsupported quantization config: bits={s.bits}, sym={s.sym}\" (keep it "
                              "compressed-tensors, or convert --to awq for asymmetric 4-bit)"))
        elif s.desc_act and s.group_size != -1:
            out.append(_issue("VLLM-10", where, "vLLM >= 0.30: \"GPTQ group activation ordering (desc_act=True) is no "
                              "longer supported\""))
        elif not any(ok(s.bits, True, s.group_size) for ok in LINEAR_KERNELS.values()):
            out.append(_issue("VLLM-10", where, f"int{s.bits} group_size {s.group_size}: vLLM: \"Failed to find a "
                              "kernel that can implement the WNA16 linear layer\""))
    return out


def _moe_issues(ckpt: Checkpoint) -> list[Issue]:
    """vLLM resolves the scheme of expert 0's projections and picks one fused-MoE backend."""
    mods = ckpt.modules()
    out = []
    for prefix, m in mods.items():
        hit = expert_parts(prefix)
        if hit is None or hit[1] != 0 or hit[2] not in _GATES:
            continue
        base = f"{hit[0]}.0"
        projs = [mods[f"{base}.{n}"] for n in _PROJECTIONS if f"{base}.{n}" in mods]
        kinds = {(p.quantized, p.scheme) for p in projs}
        if len(kinds) > 1:
            out.append(_issue("VLLM-03", base, "vLLM: \"All MoE projections need to have same quantization scheme "
                              "but found multiple\""))
            continue
        if m.packed and m.scheme is not None and {"weight_packed", "weight_scale"} <= set(m.tensors):
            out += _moe_backend(m, hit[0])     # an incomplete set is TEN-01's, not a backend question
    return out


def _moe_backend(m: Module, where: str) -> list[Issue]:
    s = m.scheme
    inter = m.tensors["weight_packed"].shape[-2]                                   # I: out of w1/gate_proj
    hidden = (m.tensors["weight_scale"].shape[-1] * s.group_size if s.strategy is Strategy.GROUP
              else m.tensors["weight_packed"].shape[-1] * 32 // s.num_bits)       # H: in of w1/gate_proj
    gs = s.group_size or -1
    if s.strategy is Strategy.GROUP and hidden % gs:
        return [_issue("VLLM-03", where, "vLLM: \"CompressedTensors WNA16 MoE requires hidden_size (H) to be "
                       f"divisible by group_size (G).\" (H={hidden}, G={gs})")]
    if s.strategy is Strategy.GROUP and inter % gs:
        return [_issue("VLLM-03", where, "vLLM: \"CompressedTensors WNA16 MoE requires the MoE intermediate size "
                       f"per tensor-parallel partition (I) to be divisible by group_size (G)\" (I={inter}, G={gs})")]
    kinds_ok = s.num_bits == 4 or (s.num_bits == 8 and s.symmetric)
    # vLLM marlin_utils.check_moe_marlin_supports_layer: w13 is (n, k) = (2I, H), w2 is (H, I), and
    # "moe marlin requires n % 128 == 0 and k % 64 == 0", hence H % 128 == 0
    marlin = kinds_ok and gs in MARLIN_GROUP_SIZES and hidden % 128 == 0 and (gs < 0 or inter % gs == 0)
    triton = kinds_ok and s.strategy is Strategy.GROUP
    if not (marlin or triton):
        return [_issue("VLLM-03", where, f"int{s.num_bits} {'sym' if s.symmetric else 'asym'} {s.strategy.value} "
                       f"(H={hidden}, I={inter}): neither Marlin nor Triton fused MoE fits; vLLM: \"No WNA16 MoE "
                       "backend supports the deployment configuration.\"")]
    return []


def _expert_name_issues(ckpt: Checkpoint) -> list[Issue]:
    """VLLM-06: vLLM's Mixtral looks up `ignore` and `targets` for its experts under the names
    w1/w3/w2 (FusedMoE ckpt_names); its weight mapper renames tensors, but an exact name or a
    pattern written for gate_proj/up_proj/down_proj in the config does not follow."""
    renames = EXPERT_RENAMES.get(ckpt.model_type or "")
    q, out = ckpt.quant, []
    if not renames:
        return out
    for prefix, m in ckpt.modules().items():
        hit = expert_parts(prefix)
        if hit is None or hit[1] != 0 or hit[2] not in renames:
            continue
        seen = loader_name(prefix, ckpt.model_type)
        stored = "quantized" if m.quantized else "dense"
        vllm_quantized = not q.is_ignored(seen) and q.group_for(seen, linear=True) is not None
        if m.quantized != vllm_quantized:
            out.append(_issue("VLLM-06", "quantization_config.ignore" if not m.quantized else
                              "quantization_config.config_groups", f"{prefix} is stored {stored}, but vLLM looks "
                              f"its experts up as {seen.rpartition('.')[2]} ({seen}), which the config "
                              f"{'does not ignore' if not m.quantized else 'does not target'}: vLLM builds the "
                              f"experts {'quantized' if vllm_quantized else 'dense'} and the weights do not load; "
                              "list both names (or a pattern matching both)"))
    return out


def _router_issues(ckpt: Checkpoint) -> list[Issue]:
    """VLLM-11 (an error): vLLM builds every MoE router unquantized (GateLinear, or
    ReplicatedLinear without a quant_config), so a router stored quantized cannot load
    (spec/targets.md §4). One finding, at the first such router."""
    found = []
    for prefix, m in ckpt.modules().items():
        rows = next((m.tensors[k].shape[0] for k in ("weight_packed", "weight") if k in m.tensors
                     and m.tensors[k].shape), None)
        if m.quantized and router_verdict(ckpt.config, prefix, rows) is not None:
            found.append(m)
    if not found:
        return []
    more = f" (and {len(found) - 1} more routers)" if len(found) > 1 else ""
    return [module_issue("VLLM-11", found[0], found[0].quant_tensor, f"an MoE router stored quantized{more}: vLLM "
                         "builds every router unquantized (GateLinear / ReplicatedLinear without a quant_config) and "
                         "has no parameter to load it into; keep routers dense and list them in ignore")]


def _block_issues(ckpt: Checkpoint) -> list[Issue]:
    """FMT-20: FP8 blocks vLLM's block kernels cannot run (validate_fp8_block_shape at load, the
    per-token-group activation quantization at the first forward)."""
    out, mods = [], ckpt.modules()
    for prefix, m in mods.items():
        w = m.scheme
        if not m.quantized or w is None or w.strategy is not Strategy.BLOCK or "weight" not in m.tensors:
            continue
        bh, bw = w.block_structure
        out_f, in_f = m.tensors["weight"].shape[-2:]
        if m.group.input_activations is not None and in_f % bw:
            out.append(_issue("FMT-20", prefix, f"in_features {in_f} with blocks {bh}x{bw}: vLLM quantizes the "
                              f"activations per {bw} columns: \"the last dimension of `x` {in_f} must be divisible "
                              f"by `group_size` {bw}\""))
        parent, _, leaf = prefix.rpartition(".")
        for family in FUSED_SIBLINGS:
            if leaf in family[:-1] and all(f"{parent}.{x}" in mods for x in family) and out_f % bh:
                out.append(_issue("FMT-20", prefix, f"{leaf} ({out_f} rows) is fused with {'/'.join(family)} and "
                                  f"not the last part: vLLM: \"Weight output_partition_size = {out_f} is not "
                                  f"divisible by weight quantization block_n = {bh}.\""))
    return out


def _transform_issues(ckpt: Checkpoint) -> list[Issue]:
    """VLLM-08: vLLM 0.33 runs online transforms at the input or output of Linear layers only
    (CompressedTensorsLinearTransformMethod), at tensor-parallel size 1."""
    online = [t for t in ckpt.quant.transforms if t.online]
    out = [_issue("VLLM-08", f"quantization_config.transform_config.config_groups.{t.scheme}",
                  f"an online transform at {t.location}: vLLM: \"Cannot apply `{t.location}` transform to `...`\"")
           for t in online if t.location not in ("input", "output")]
    if online:
        out.append(_issue("VLLM-08", "quantization_config.transform_config", "online transforms: vLLM runs them only "
                          "at tensor-parallel size 1: \"Online transforms with tensor parallelism is not supported\""))
    return out


def _kv_issues(q) -> list[Issue]:
    """VLLM-09: CompressedTensorsKVCacheMethod.validate_kv_cache_scheme."""
    kv = q.kv_cache
    if kv is None:
        return []
    if not kv.is_float or kv.num_bits != 8:
        why = ("\"Currently supported kv cache quantization is num_bits=8, type=float, however received "
               f"num_bits={kv.num_bits}, type={kv.type}\"")
    elif not kv.symmetric:
        why = "\"Only support symmetric scaling factor for compressed-tensors KV cache.\""
    else:
        return []
    return [_issue("VLLM-09", "quantization_config.kv_cache_scheme", f"vLLM 0.33: {why}")]


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen, out = set(), []
    for i in issues:
        key = (i.rule, re.sub(r"\d+", "#", i.where or ""), i.message)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def transformers_issues(ckpt: Checkpoint) -> list[Issue]:
    """The --target transformers profile: what loads without an error and computes something
    else: expert names that load as random values (TRF-01), online transforms it does not apply
    (TRF-02), quantized experts of a GPTQ/AWQ checkpoint, which load as random values (TRF-03)."""
    if ckpt.gptq is not None:
        return _gptq_expert_issues(ckpt)
    return _expert_issues(ckpt) + _trf_transform_issues(ckpt)


def _gptq_expert_issues(ckpt: Checkpoint) -> list[Issue]:
    experts = sum(1 for p, m in ckpt.modules().items() if m.quantized and expert_parts(p))
    if not experts:
        return []
    return [_issue("TRF-03", "quantization_config", f"{experts} quantized MoE expert modules: transformers 5 fuses "
                   "experts into 3-D parameters, which its GPTQ/AWQ path (optimum, gptqmodel) does not quantize, so "
                   "from_pretrained leaves them at random values without an error (\"MISSING "
                   "...experts.gate_up_proj\"); GPTQModel.load reads them")]


def _trf_transform_issues(ckpt: Checkpoint) -> list[Issue]:
    online = sorted({t.scheme for t in (ckpt.quant.transforms if ckpt.quant else ()) if t.online})
    if not online:
        return []
    return [_issue("TRF-02", "quantization_config.transform_config", f"online transforms ({', '.join(online)}): "
                   "transformers 5.x loads the rotated weights but applies no transform_config, so the model "
                   "computes a different function without an error; `ctformat convert --to dense` folds them")]


def _expert_issues(ckpt: Checkpoint) -> list[Issue]:
    model_type = ckpt.model_type
    renames = EXPERT_RENAMES.get(model_type or "")
    if not renames:
        return []
    names = set(renames.values())               # what transformers' model reads
    parts = [hit[2] for p in ckpt.modules() if (hit := expert_parts(p))]
    odd = sorted({part for part in parts if part not in names})
    if not odd:
        return []
    count = sum(1 for part in parts if part in odd)
    return [_issue("TRF-01", "model_type", f"{model_type} experts are stored as "
                  f"{'/'.join(odd)} ({count} modules); transformers' {model_type} reads only "
                  f"{'/'.join(sorted(names))} and leaves these experts at random values without an error. "
                  "`ctformat convert --to dense` writes the names it reads")]
