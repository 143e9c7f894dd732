"""`convert --to marlin` and back (`--to compressed-tensors`), spec §10: quantized modules in
vLLM's Marlin layout, everything the layout cannot hold refused (MCV-01..07) before any output
exists; the reverse restores the pack-quantized source bit for bit."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, Module
from .dtypes import dtype_code, torch_dtype
from .errors import UnsupportedError
from .marlin import split_experts, to_ct, to_marlin
from .marlin_config import SOURCE_ROLES, MarlinConfig, legacy_unmet, marlin_dims, marlin_group_size
from .names import expert_parts
from .pipeline import (ConvertResult, Step, by_suffix, copy_step, file_order, module_sources, open_for_convert,
                       run_conversion)
from .scheme import Strategy
from .spec import MARLIN_GROUP_SIZES, MARLIN_PARAMS, MARLIN_REFUSALS, MOE_PARTS, QUANT_PARAMS

__all__ = ["convert_to_marlin", "convert_to_ct"]

Progress = Callable[[int, int], None]


def _refuse(rule: str, where: str, message: str, option: str | None = None) -> UnsupportedError:
    assert rule in MARLIN_REFUSALS, rule
    return UnsupportedError(message, rule=rule, where=where, option=option)


def convert_to_marlin(model: str | Path, out: str | Path, *, scale_dtype: torch.dtype | None = None,
                      allow_lossy_scales: bool = False, stack_experts: bool = False, device: str = "auto",
                      max_shard_size: int = 5_000_000_000, force: bool = False,
                      progress: Progress | None = None) -> ConvertResult:
    """Write MODEL's quantized modules in vLLM's Marlin layout at OUT (spec §10); everything
    that cannot be represented is refused before any output exists."""
    src, dev, ckpt = open_for_convert(model, out, device)
    quantized = _marlin_preflight(ckpt)
    if scale_dtype is not None and not allow_lossy_scales:
        _check_scales_exact(ckpt, quantized, scale_dtype)
    stacks = _stacks(ckpt, quantized) if stack_experts else {}
    plan = _marlin_plan(ckpt, stacks, scale_dtype)
    roles = {role: {m.tensors[role].dtype for m in quantized if role in m.tensors} for role in SOURCE_ROLES}
    legacy = _legacy(quantized, scale_dtype)
    marlin = MarlinConfig(ckpt.quant, ckpt.config["quantization_config"], {r: d.pop() for r, d in roles.items() if d},
                          dict(stacks), legacy, _scale_code(quantized[0], scale_dtype))
    config = dict(ckpt.config, quantization_config=marlin.to_json())
    result = run_conversion(ckpt, src, out, plan, config, target="marlin", verb="repacked", device=dev,
                            params=frozenset(QUANT_PARAMS), max_shard_size=max_shard_size, force=force,
                            progress=progress)
    result.details["legacy_format"] = legacy
    return result


def _marlin_preflight(ckpt: Checkpoint) -> list[Module]:
    """The quantized modules, each checked against the Marlin limits (MCV-01..04, 07)."""
    if ckpt.marlin is not None:
        raise _refuse("MCV-07", ckpt.label, "already in the Marlin layout")
    quantized = [m for m in ckpt.modules().values() if m.quantized]
    if not quantized:
        raise _refuse("MCV-07", ckpt.label, "no pack-quantized modules to convert")
    other = sorted({m.format or "unknown" for m in quantized if not m.packed})
    if other:
        raise _refuse("MCV-07", ckpt.label, f"{', '.join(other)} modules: the Marlin layout holds pack-quantized int "
                      "weights (convert --to dense reads every format)")
    if any(t.online for t in (ckpt.quant.transforms if ckpt.quant else ())):
        raise _refuse("MCV-07", ckpt.label, "online transforms (transform_config): Marlin modules would lose them "
                      "(convert --to dense folds them)")
    for role in SOURCE_ROLES:
        dtypes = {m.tensors[role].dtype for m in quantized if role in m.tensors}
        if len(dtypes) > 1:
            raise _refuse("MCV-07", ckpt.label, f"{role} is stored as {' and '.join(sorted(dtypes))} in different "
                          "modules; the reverse conversion could not restore both")
    for m in quantized:
        s = m.scheme
        n, width = m.tensors["weight_packed"].shape[-2:]
        if s.num_bits not in (4, 8):
            raise _refuse("MCV-01", m.prefix, f"{s.num_bits}-bit weights; Marlin stores 4 and 8 bits")
        k = width * 32 // s.num_bits
        gs = marlin_group_size(s.group_size, k) if s.strategy in (Strategy.GROUP, Strategy.CHANNEL) else None
        if gs not in MARLIN_GROUP_SIZES:
            raise _refuse("MCV-02", m.prefix, f"{s.strategy.value} strategy with group size {s.group_size}; Marlin "
                          "takes group sizes 32, 64, 128 or channel-wise")
        if n % 64 or k % 16 or not ((n % 64 == 0 and k % 128 == 0) or (n % 128 == 0 and k % 64 == 0)):
            raise _refuse("MCV-03", m.prefix, f"weight [{n}, {k}]: Marlin needs N % 64 == 0 and K % 16 == 0, and "
                          "(N % 64, K % 128) or (N % 128, K % 64) both zero")
        if not s.symmetric and s.num_bits != 4:
            raise _refuse("MCV-04", m.prefix, "asymmetric 8-bit; Marlin takes zero points with 4-bit only")
    return quantized


def _check_scales_exact(ckpt: Checkpoint, quantized: list[Module], dtype: torch.dtype) -> None:
    for m in quantized:
        s = ckpt.load(m.tensors["weight_scale"].name)
        if s.dtype != dtype and not torch.equal(s.to(dtype).to(s.dtype), s):
            raise _refuse("MCV-05", m.prefix, f"{s.dtype} scales change value in {dtype}", "allow_lossy_scales")


def _stacks(ckpt: Checkpoint, quantized: list[Module]) -> dict[str, dict[str, Any]]:
    """experts prefix -> {experts, w13: [gate, up], w2: down}, for every MoE layer (MCV-06)."""
    found: dict[str, dict[int, dict[str, Module]]] = {}
    for m in quantized:
        hit = expert_parts(m.prefix)
        if hit:
            found.setdefault(hit[0], {}).setdefault(hit[1], {})[hit[2]] = m
    out = {}
    for base, experts in found.items():
        names = next((p for p in MOE_PARTS if set(p) == set(experts.get(0, {}))), None)
        if names is None or sorted(experts) != list(range(len(experts))):
            raise _refuse("MCV-06", base, "experts are not a complete set 0..E-1 of gate/up/down (w1/w3/w2) modules")
        for part in names:
            mods = [experts[e].get(part) for e in experts]
            keys = {(None if x is None else (x.scheme, x.tensors["weight_packed"].shape)) for x in mods}
            if len(keys) != 1 or None in keys or any("weight_g_idx" in x.tensors for x in mods):
                raise _refuse("MCV-06", f"{base}.*.{part}", "experts differ in scheme or shape, or carry g_idx")
        out[base] = {"experts": len(experts), "w13": [names[0], names[1]], "w2": names[2]}
    return out


def _legacy(quantized: list[Module], scale_dtype: torch.dtype | None) -> bool:
    """Whether the output fits every legacy Marlin reader (spec §10.7): one group size, and
    every module in the legacy subset (legacy_unmet), stacked experts included (none is)."""
    def fits(m: Module) -> bool:
        s, packed = m.scheme, m.tensors["weight_packed"]
        return not legacy_unmet(
            num_bits=s.num_bits, symmetric=s.symmetric, act_order="weight_g_idx" in m.tensors,
            group_size=s.group_size if s.strategy is Strategy.GROUP else -1,
            scale_dtype=_scale_code(m, scale_dtype), n=packed.shape[-2], k=packed.shape[-1] * 32 // s.num_bits,
            expert=expert_parts(m.prefix) is not None or len(packed.shape) != 2)
    sizes = {m.scheme.group_size if m.scheme.strategy is Strategy.GROUP else -1 for m in quantized}
    return len(sizes) == 1 and all(fits(m) for m in quantized)


def _scale_code(m: Module, scale_dtype: torch.dtype | None) -> str:
    return m.tensors["weight_scale"].dtype if scale_dtype is None else dtype_code(scale_dtype)


def _marlin_outputs(prefix: str, m: Module, scale_code: str, experts: int = 0, parts: int = 1) -> list[tuple]:
    s = m.scheme
    n, width = m.tensors["weight_packed"].shape[-2:]
    k = width * 32 // s.num_bits
    groups = m.tensors["weight_scale"].shape[-1]
    lead = (experts,) if experts else ()
    n *= parts
    outs = [(f"{prefix}.B", "I32", (*lead, k // 16, n * s.num_bits // 2)), (f"{prefix}.s", scale_code, (*lead, groups, n))]
    if "weight_zero_point" in m.tensors:
        outs.append((f"{prefix}.zp", "I32", (*lead, groups, n // 8)))
    if "weight_g_idx" in m.tensors:
        outs += [(f"{prefix}.g_idx", "I32", (k,)), (f"{prefix}.perm", "I32", (k,))]
    return outs


def _marlin_plan(ckpt: Checkpoint, stacks: dict, scale_dtype: torch.dtype | None) -> list[Step]:
    mods, plan, done = ckpt.modules(), [], set()
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        hit = expert_parts(prefix) if m.quantized else None
        if not (m.quantized and suffix in QUANT_PARAMS):
            plan.append(copy_step(ckpt, info.name))
        elif hit and hit[0] in stacks:
            base, entry = hit[0], stacks[hit[0]]
            for key, names in (("w13", entry["w13"]), ("w2", [entry["w2"]])):
                if f"{base}.{key}" not in done:
                    done.add(f"{base}.{key}")
                    plan.append(_stack_step(ckpt, base, key, names, entry["experts"], scale_dtype))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_marlin_step(m, scale_dtype))
    return plan


def _marlin_step(m: Module, scale_dtype: torch.dtype | None) -> Step:
    outs = _marlin_outputs(m.prefix, m, _scale_code(m, scale_dtype))
    keys = [o[0].rpartition(".")[2] for o in outs]

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        got = to_marlin(by_suffix(m, t), m.scheme.num_bits, m.scheme.group_size, scale_dtype=scale_dtype)
        return [got[k] for k in keys]
    return Step(outs, module_sources(m, QUANT_PARAMS), work, m.prefix)


def _stack_step(ckpt: Checkpoint, base: str, key: str, names: list[str], experts: int,
                scale_dtype: torch.dtype | None) -> Step:
    mods = ckpt.modules()
    parts = [[mods[f"{base}.{e}.{name}"] for name in names] for e in range(experts)]
    first = parts[0][0]
    outs = _marlin_outputs(f"{base}.{key}", first, _scale_code(first, scale_dtype), experts, len(names))
    keys = [o[0].rpartition(".")[2] for o in outs]

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        per_expert = []
        for row in parts:      # gate then up, concatenated along N (tile-local, spec §10.6)
            got = [to_marlin(by_suffix(m, t), m.scheme.num_bits, m.scheme.group_size, scale_dtype=scale_dtype)
                   for m in row]
            per_expert.append({k: torch.cat([g[k] for g in got], dim=-1) for k in keys})
        return [torch.stack([p[k] for p in per_expert]) for k in keys]
    sources = [n for row in parts for m in row for n in module_sources(m, QUANT_PARAMS)]
    return Step(outs, sources, work, f"{base}.{key}")


# -- back to compressed-tensors ------------------------------------------------------------
def convert_to_ct(model: str | Path, out: str | Path, *, device: str = "auto", max_shard_size: int = 5_000_000_000,
                  force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """Restore a Marlin checkpoint ctformat wrote to its pack-quantized source, bit for bit."""
    src, dev, ckpt = open_for_convert(model, out, device)
    if ckpt.marlin is None:
        raise _refuse("MCV-07", ckpt.label, "not a Marlin checkpoint; nothing to convert back")
    dtypes = ckpt.marlin.source_dtypes
    mods, plan, done = ckpt.modules(), [], set()
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if not (m.is_marlin and suffix in MARLIN_PARAMS):
            plan.append(copy_step(ckpt, info.name))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_ct_step(ckpt, m, dtypes))
    config = dict(ckpt.config, quantization_config=ckpt.marlin.source_json)
    return run_conversion(ckpt, src, out, plan, config, target="compressed-tensors", verb="restored", device=dev,
                          params=frozenset(MARLIN_PARAMS), max_shard_size=max_shard_size, force=force,
                          progress=progress)


def _ct_outputs(prefix: str, n: int, k: int, bits: int, groups: int, suffixes: set[str], dtypes) -> list[tuple]:
    outs = [(f"{prefix}.weight_packed", "I32", (n, k * bits // 32)),
            (f"{prefix}.weight_scale", dtypes["weight_scale"], (n, groups))]
    if "zp" in suffixes:
        zp_i8 = dtypes.get("weight_zero_point") == "I8"
        outs.append((f"{prefix}.weight_zero_point", "I8" if zp_i8 else "I32",
                     (n, groups) if zp_i8 else (-(-n // 8), groups)))
    if "perm" in suffixes:
        outs.append((f"{prefix}.weight_g_idx", "I32", (k,)))
    outs.append((f"{prefix}.weight_shape", dtypes.get("weight_shape", "I64"), (2,)))
    return outs


def _ct_step(ckpt: Checkpoint, m: Module, dtypes: dict[str, str]) -> Step:
    k, n, bits, groups = marlin_dims(m.tensors["B"].shape, m.tensors["s"].shape)
    parts = ckpt.marlin.stacked_parts(m.prefix, n) or [(m.prefix, n)]
    per = len(parts) // (m.tensors["B"].shape[0] if len(m.tensors["B"].shape) == 3 else 1)
    outs = [o for name, rows in parts for o in _ct_outputs(name, rows, k, bits, groups, set(m.tensors), dtypes)]
    suffixes = [o.rpartition(".")[2] for o, _, _ in _ct_outputs("", 0, 0, 0, 0, set(m.tensors), dtypes)]
    scale_dtype, shape_dtype = torch_dtype(dtypes["weight_scale"]), torch_dtype(dtypes.get("weight_shape", "I64"))

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = by_suffix(m, t)
        result = []
        for part in [local] if len(parts) == 1 else split_experts(local, per):   # w13 -> gate, up
            ct = to_ct(part, scale_dtype=scale_dtype, zero_point_dtype=dtypes.get("weight_zero_point", "I32"),
                       shape_dtype=shape_dtype)
            result += [ct[s] for s in suffixes]
        return result
    return Step(outs, module_sources(m, MARLIN_PARAMS), work, m.prefix)
