"""Loader profiles for `validate --target`: what vLLM 0.33 will refuse to load, in vLLM's own
words (spec §6.1), and what transformers silently loads wrong (§6.2). Judged from config and
headers only; one finding per cause, not per module."""
from __future__ import annotations

import re

from .checkpoint import Checkpoint, Module
from .names import expert_parts
from .report import Issue, issue
from .scheme import QuantScheme, Strategy
from .spec import EXPERT_RENAMES, MARLIN_GROUP_SIZES, MOE_PARTS

__all__ = ["vllm_issues", "transformers_issues", "LINEAR_KERNELS"]

_GATES = {gate for gate, _, _ in MOE_PARTS}                     # w1, gate_proj
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
    if ckpt.quant is None:
        return []
    out: list[Issue] = []
    for g in ckpt.quant.groups:
        s, where = g.weights, f"quantization_config.config_groups.{g.name}"
        if s is None:
            continue
        if s.dynamic or g.input_activations is not None:
            out.append(_issue("VLLM-04", where, "weights must be static with no input_activations for the "
                              "WNA16 scheme; vLLM: \"No compressed-tensors compatible scheme was found\""))
            continue
        if s.has_g_idx:
            out.append(_issue("VLLM-01", f"{where}.weights.actorder", "vLLM >= 0.30: \"Compressed-tensors "
                              "group/dynamic activation ordering (actorder=group) is no longer supported. Use a "
                              "checkpoint with static/weight activation ordering or without activation ordering.\""))
        out += _linear_issues(s, where)
    out += _moe_issues(ckpt)
    return _dedupe(out)


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
    """VLLM-06: what vLLM 0.33's auto_gptq / auto_awq (AutoGPTQConfig, AutoAWQConfig) make of each
    scheme the file uses (spec/gptq-awq.md §8.1)."""
    cfg, where = ckpt.gptq, "quantization_config"
    schemes = dict.fromkeys([cfg.default, *(m.gptq for m in ckpt.modules().values() if m.quantized and m.gptq)])
    out = []
    for s in schemes:
        if cfg.method == "awq":
            if s.sym or not LINEAR_KERNELS["Marlin"](4, False, s.group_size):
                why = "zero_point false" if s.sym else f"group_size {s.group_size}"
                out.append(_issue("VLLM-06", where, f"AWQ with {why}: vLLM's Marlin kernels do not take it; vLLM: "
                                  "\"Layer '...' is not supported by AutoAWQMarlin. Falling back to unoptimized AWQ "
                                  "kernels.\""))
            continue
        if (s.bits, s.sym) not in ((4, True), (8, True)):
            out.append(_issue("VLLM-06", where, f"vLLM 0.33 reads GPTQ as symmetric 4- or 8-bit only; vLLM: "
                              f"\"Unsupported quantization config: bits={s.bits}, sym={s.sym}\" (keep it "
                              "compressed-tensors, or convert --to awq for asymmetric 4-bit)"))
        elif s.desc_act and s.group_size != -1:
            out.append(_issue("VLLM-06", where, "vLLM >= 0.30: \"GPTQ group activation ordering (desc_act=True) is no "
                              "longer supported\""))
        elif not any(ok(s.bits, True, s.group_size) for ok in LINEAR_KERNELS.values()):
            out.append(_issue("VLLM-06", where, f"int{s.bits} group_size {s.group_size}: vLLM: \"Failed to find a "
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
        if m.quantized and m.scheme is not None and {"weight_packed", "weight_scale"} <= set(m.tensors):
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


def _dedupe(issues: list[Issue]) -> list[Issue]:
    seen, out = set(), []
    for i in issues:
        key = (i.rule, re.sub(r"\d+", "#", i.where or ""), i.message)
        if key not in seen:
            seen.add(key)
            out.append(i)
    return out


def transformers_issues(ckpt: Checkpoint) -> list[Issue]:
    """The --target transformers profile: expert names that load as random values (TRF-01), and
    quantized experts of a GPTQ/AWQ checkpoint, which load as random values (TRF-02)."""
    if ckpt.gptq is not None:
        experts = sum(1 for p, m in ckpt.modules().items() if m.quantized and expert_parts(p))
        if not experts:
            return []
        return [_issue("TRF-02", "quantization_config", f"{experts} quantized MoE expert modules: transformers 5 fuses "
                       "experts into 3-D parameters, which its GPTQ/AWQ path (optimum, gptqmodel) does not quantize, "
                       "so from_pretrained leaves them at random values without an error (\"MISSING "
                       "...experts.gate_up_proj\"); GPTQModel.load reads them")]
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
