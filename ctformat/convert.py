"""Conversion of a pack-quantized checkpoint to dense weights (spec §7), streamed module by
module through a three-stage pipeline: a reader thread, the dequantization (GPU or CPU),
and a writer thread. Memory holds a few tensors, never the model; output appears at OUT
only when complete (CheckpointWriter: temporary folder, rename at the end).
"""
from __future__ import annotations

import queue
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, CheckpointWriter, Module, dtype_code, open_checkpoint, torch_dtype
from .errors import CtFormatError, OutputExistsError, UnsupportedError, UsageError
from .marlin import GROUP_SIZES, marlin_dims, marlin_group_size, split_stacked, to_ct, to_marlin
from .scheme import MarlinConfig, Strategy
from .spec import (EXPERT_MODULE, LEGACY_GROUP_SIZES, LEGACY_K_MULTIPLE, LEGACY_N_MULTIPLE, MARLIN_PARAMS,
                   QUANT_PARAMS)
from .validate import check_module

__all__ = ["convert_to_dense", "convert_to_marlin", "convert_to_ct", "dequantize_checkpoint", "dense_plan",
           "resolve_device", "stacked_parts", "Step", "EXPERT_RENAMES", "DTYPES"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# llm-compressor >= 0.12 saves Mixtral experts as gate_proj/up_proj/down_proj; transformers'
# Mixtral reads experts.N.w1/w3/w2 and silently leaves other names at random values. Dense
# output uses the names the architecture's loader reads (spec §7.2); keep_names=True opts out.
EXPERT_RENAMES = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}
_EXPERT = re.compile(r"^(.*\.block_sparse_moe\.experts\.\d+\.)([^.]+)$")
_QUANT_PARAMS = QUANT_PARAMS


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CtFormatError(f"--device {device}: no CUDA device here (torch {torch.__version__}, "
                            f"cuda available: no); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CtFormatError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _rename(prefix: str, model_type: str | None, keep_names: bool) -> str:
    table = EXPERT_RENAMES.get(model_type or "")
    hit = _EXPERT.match(prefix) if table and not keep_names else None
    return hit.group(1) + table.get(hit.group(2), hit.group(2)) if hit else prefix


@dataclass
class Step:
    """One unit of conversion work: read `sources`, compute, write `outputs` in order.
    `work` gets the source tensors by name (on the compute device) and returns one tensor
    per output; without `work` the single source is copied as it is."""

    outputs: list[tuple[str, str, tuple[int, ...]]]
    sources: list[str]
    work: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]] | None = None
    count: str = "tensors_copied"


def _copy(ckpt: Checkpoint, name: str, out_name: str | None = None) -> Step:
    info = ckpt.tensors[name]
    return Step([(out_name or name, info.dtype, info.shape)], [name])


def _local(m: Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {suffix: tensors[info.name] for suffix, info in m.tensors.items()}


def _file_order(ckpt: Checkpoint) -> list:
    return sorted(ckpt.tensors.values(), key=lambda t: (t.file, t.start))


def dense_plan(ckpt: Checkpoint, dtype: torch.dtype, keep_names: bool = False) -> list[Step]:
    """Steps of convert --to dense, in file order."""
    model_type = (ckpt.config or {}).get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    mods, plan, done = ckpt.modules(), [], set()
    for info in _file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if not (m.quantized and suffix in _QUANT_PARAMS + MARLIN_PARAMS):
            plan.append(_copy(ckpt, info.name, f"{_rename(prefix, model_type, keep_names)}.{suffix}" if prefix else None))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_dense_step(ckpt, m, dtype, lambda p: _rename(p, model_type, keep_names)))
    return plan


def _dense_step(ckpt: Checkpoint, m: Module, dtype: torch.dtype, rename) -> Step:
    sources = [i.name for i in m.tensors.values() if i.name.rpartition(".")[2] in _QUANT_PARAMS + MARLIN_PARAMS]
    code = dtype_code(dtype)
    if m.marlin:
        k, n, _, _ = marlin_dims(m.tensors["B"].shape, m.tensors["s"].shape)
        parts = stacked_parts(ckpt, m)
        if parts is not None:          # stacked experts: back to one weight per expert and part
            outs = [(f"{rename(p)}.weight", code, (rows, k)) for p, rows in parts]
            return Step(outs, sources, lambda t: _split_dense(ckpt.decompress_loaded(m, _local(m, t), dtype=dtype),
                                                              [r for _, r in parts]), "modules_dequantized")
        shape = (*m.tensors["B"].shape[:-2], n, k)
    else:
        shape = tuple(int(v) for v in ckpt.load(m.tensors["weight_shape"].name).tolist())
    return Step([(f"{rename(m.prefix)}.weight", code, shape)], sources,
                lambda t: [ckpt.decompress_loaded(m, _local(m, t), dtype=dtype)], "modules_dequantized")


def stacked_parts(ckpt: Checkpoint, m: Module) -> list[tuple[str, int]] | None:
    """(part module name, out_features) in stacking order, for a stacked Marlin module."""
    base, _, last = m.prefix.rpartition(".")
    entry = (ckpt.marlin.stacked if ckpt.marlin is not None else {}).get(base)
    if entry is None or last not in ("w13", "w2"):
        return None
    n = m.tensors["s"].shape[-1]
    names = entry["w13"] if last == "w13" else [entry["w2"]]
    return [(f"{base}.{e}.{name}", n // len(names)) for e in range(entry["experts"]) for name in names]


def _split_dense(w: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    per = len(rows) // w.shape[0]
    return [part for expert in w for part in expert.split(rows[:per], dim=0)]


def _check_apart(src: Path, out: Path) -> None:
    """OUT may not be, contain, or lie inside the input (a single file's folder may hold OUT)."""
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents or (src.is_dir() and s in o.parents):
        raise OutputExistsError(f"{out}: overlaps the input {src}; the input is never touched")


def _preflight(ckpt: Checkpoint) -> None:
    """Everything that can be refused is refused before any output exists."""
    if ckpt.problems:
        raise ckpt.problems[0]
    for m in ckpt.modules().values():
        for issue in check_module(ckpt, m):
            if issue.severity == "error":
                raise issue.as_error()
        if m.quantized and m.scheme is None:
            raise UnsupportedError(f"{m.prefix}: quantized, but no config group describes it")


def convert_to_dense(model: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     device: str = "auto", max_shard_size: int = 5_000_000_000, force: bool = False,
                     keep_names: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write MODEL's weights, dequantized, as a plain safetensors checkpoint at OUT.

    Returns counts for the caller to report: modules dequantized, tensors copied, bytes read,
    modules that fell back to the CPU after running out of GPU memory.
    """
    src, dev, ckpt = _open_for_convert(model, out, device)
    _preflight(ckpt)
    config = dict(ckpt.config or {})
    config.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = str(dtype).removeprefix("torch.")
    return _run(ckpt, src, out, dense_plan(ckpt, dtype, keep_names), config, dev, max_shard_size, force, progress,
                {"modules_dequantized": 0})


def dequantize_checkpoint(model: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "auto",
                          keep_names: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict of a (small) checkpoint in memory, on `device`: the same tensors,
    names and bits convert_to_dense writes. For large models use convert_to_dense."""
    dev = resolve_device(device)
    ckpt = open_checkpoint(model)
    _preflight(ckpt)
    out = {}
    for step in dense_plan(ckpt, dtype, keep_names):
        tensors = {n: ckpt.load(n) for n in step.sources}
        for (name, _, _), t in zip(step.outputs, _compute(step, tensors, dev, {"cpu_fallbacks": 0})):
            out[name] = t.to(dev)
    return out


def _open_for_convert(model: str | Path, out: str | Path, device: str) -> tuple[Path, torch.device, Checkpoint]:
    src = Path(model)
    if not src.exists():
        raise CtFormatError(f"{model}: convert needs a local checkpoint (download a Hub repo first, e.g. "
                            f"`hf download {model}`)")
    dev = resolve_device(device)
    _check_apart(src, Path(out))
    return src, dev, open_checkpoint(src)


def _run(ckpt: Checkpoint, src: Path, out, plan: list[Step], config: dict, dev: torch.device, max_shard_size: int,
         force: bool, progress, counts: dict[str, int]) -> dict[str, Any]:
    _check_plan(ckpt, plan)
    total = sum(ckpt.tensors[n].nbytes for step in plan for n in step.sources)
    stats = {**counts, "tensors_copied": 0, "bytes_read": 0, "cpu_fallbacks": 0, "device": str(dev),
             "output": str(out)}
    with CheckpointWriter(out, [o for step in plan for o in step.outputs], max_shard_size=max_shard_size,
                          force=force, source=ckpt.root if src.is_dir() else None) as writer:
        _pipeline(ckpt, plan, writer, dev, stats, progress, total)
        writer.close(config)
    return stats


def _check_plan(ckpt: Checkpoint, plan: list[Step]) -> None:
    """Every input tensor is read by exactly one step, and every quantized module is computed,
    not copied: a plan that would drop or duplicate data is a bug, stopped before writing."""
    read = [n for step in plan for n in step.sources]
    copied = {step.sources[0] for step in plan if step.work is None}
    lost = set(ckpt.tensors) - set(read)
    params = set(QUANT_PARAMS + MARLIN_PARAMS)
    stray = sorted(n for n in copied if ckpt.modules()[n.rpartition(".")[0]].quantized
                   and n.rpartition(".")[2] in params)
    if lost or len(read) != len(set(read)) or stray:
        raise RuntimeError(f"conversion plan loses {sorted(lost)[:3]}, reads a tensor twice, or copies "
                           f"quantized tensors as they are ({stray[:3]})")


# -- Marlin (spec §10) ---------------------------------------------------------------------
_EXPERTS = re.compile(EXPERT_MODULE)
_MOE_PARTS = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def convert_to_marlin(model: str | Path, out: str | Path, *, scale_dtype: torch.dtype | None = None,
                      allow_lossy_scales: bool = False, stack_experts: bool = False, device: str = "auto",
                      max_shard_size: int = 5_000_000_000, force: bool = False,
                      progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write MODEL's quantized modules in vLLM's Marlin layout at OUT (spec §10); everything
    that cannot be represented is refused before any output exists."""
    src, dev, ckpt = _open_for_convert(model, out, device)
    _preflight(ckpt)
    quantized = _marlin_preflight(ckpt)
    if scale_dtype is not None and not allow_lossy_scales:
        _check_scales_exact(ckpt, quantized, scale_dtype)
    stacks = _stacks(ckpt, quantized) if stack_experts else {}
    plan = _marlin_plan(ckpt, stacks, scale_dtype)
    roles = {role: {m.tensors[role].dtype for m in quantized if role in m.tensors}
             for role in ("weight_scale", "weight_shape", "weight_zero_point")}
    legacy = _legacy(quantized, scale_dtype)
    marlin = MarlinConfig(ckpt.quant, ckpt.config["quantization_config"], {r: d.pop() for r, d in roles.items() if d},
                          {base: entry for base, entry in stacks.items()}, legacy, _scale_code(quantized[0], scale_dtype))
    config = dict(ckpt.config, quantization_config=marlin.to_json())
    stats = _run(ckpt, src, out, plan, config, dev, max_shard_size, force, progress, {"modules_repacked": 0})
    stats["legacy_format"] = legacy
    return stats


def _refuse(rule: str, where: str, message: str) -> UnsupportedError:
    return UnsupportedError(f"{where}: {message} [{rule}]")


def _marlin_preflight(ckpt: Checkpoint) -> list[Module]:
    """The quantized modules, each checked against the Marlin limits (MCV-01..04, 07)."""
    if ckpt.marlin is not None:
        raise _refuse("MCV-07", ckpt.label, "already in the Marlin layout")
    quantized = [m for m in ckpt.modules().values() if m.quantized]
    if not quantized:
        raise _refuse("MCV-07", ckpt.label, "no pack-quantized modules to convert")
    for role in ("weight_scale", "weight_shape", "weight_zero_point"):
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
        if gs not in GROUP_SIZES:
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
            raise _refuse("MCV-05", m.prefix, f"{s.dtype} scales change value in {dtype} (pass "
                          "--allow-lossy-scales to convert anyway)")


def _stacks(ckpt: Checkpoint, quantized: list[Module]) -> dict[str, dict[str, Any]]:
    """experts prefix -> {experts, w13: [gate, up], w2: down}, for every MoE layer (MCV-06)."""
    found: dict[str, dict[int, dict[str, Module]]] = {}
    for m in quantized:
        hit = _EXPERTS.match(m.prefix)
        if hit:
            found.setdefault(hit.group(1), {}).setdefault(int(hit.group(2)), {})[hit.group(3)] = m
    out = {}
    for base, experts in found.items():
        names = next((p for p in _MOE_PARTS if set(p) == set(experts.get(0, {}))), None)
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
    """Whether the output fits every legacy Marlin reader (spec §10.7): dense layers only (no
    vLLM <= 0.10.1 MoE method, so no experts, stacked or not), and AutoGPTQ's and IST-DASLab's
    shape limits."""
    sizes = {m.scheme.group_size if m.scheme.strategy is Strategy.GROUP else -1 for m in quantized}
    scale_f16 = (scale_dtype == torch.float16 if scale_dtype is not None
                 else all(m.tensors["weight_scale"].dtype == "F16" for m in quantized))
    return (scale_f16 and len(sizes) == 1 and sizes <= set(LEGACY_GROUP_SIZES)
            and all(m.scheme.num_bits == 4 and m.scheme.symmetric and "weight_g_idx" not in m.tensors
                    and not _EXPERTS.match(m.prefix) and len(m.tensors["weight_packed"].shape) == 2
                    and m.tensors["weight_packed"].shape[0] % LEGACY_N_MULTIPLE == 0
                    and m.tensors["weight_packed"].shape[1] * 8 % LEGACY_K_MULTIPLE == 0 for m in quantized))


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
    for info in _file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        hit = _EXPERTS.match(prefix) if m.quantized else None
        if not (m.quantized and suffix in _QUANT_PARAMS):
            plan.append(_copy(ckpt, info.name))
        elif hit and hit.group(1) in stacks:
            base, entry = hit.group(1), stacks[hit.group(1)]
            for key, names in (("w13", entry["w13"]), ("w2", [entry["w2"]])):
                if f"{base}.{key}" not in done:
                    done.add(f"{base}.{key}")
                    plan.append(_stack_step(ckpt, base, key, names, entry["experts"], scale_dtype))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_marlin_step(ckpt, m, scale_dtype))
    return plan


def _scale_code(m: Module, scale_dtype: torch.dtype | None) -> str:
    return m.tensors["weight_scale"].dtype if scale_dtype is None else dtype_code(scale_dtype)


def _marlin_step(ckpt: Checkpoint, m: Module, scale_dtype: torch.dtype | None) -> Step:
    outs = _marlin_outputs(m.prefix, m, _scale_code(m, scale_dtype))
    keys = [o[0].rpartition(".")[2] for o in outs]

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        got = to_marlin(_local(m, t), m.scheme.num_bits, m.scheme.group_size, scale_dtype=scale_dtype)
        return [got[k] for k in keys]
    return Step(outs, [i.name for i in m.tensors.values() if i.name.rpartition(".")[2] in _QUANT_PARAMS], work,
                "modules_repacked")


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
            got = [to_marlin(_local(m, t), m.scheme.num_bits, m.scheme.group_size, scale_dtype=scale_dtype) for m in row]
            per_expert.append({k: torch.cat([g[k] for g in got], dim=-1) for k in keys})
        return [torch.stack([p[k] for p in per_expert]) for k in keys]
    sources = [i.name for row in parts for m in row for i in m.tensors.values()
               if i.name.rpartition(".")[2] in _QUANT_PARAMS]
    return Step(outs, sources, work, "modules_repacked")


# -- back to compressed-tensors ------------------------------------------------------------
def convert_to_ct(model: str | Path, out: str | Path, *, device: str = "auto", max_shard_size: int = 5_000_000_000,
                  force: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Restore a Marlin checkpoint ctformat wrote to its pack-quantized source, bit for bit."""
    src, dev, ckpt = _open_for_convert(model, out, device)
    _preflight(ckpt)
    if ckpt.marlin is None:
        raise _refuse("MCV-07", ckpt.label, "not a Marlin checkpoint; nothing to convert back")
    dtypes = ckpt.marlin.source_dtypes
    mods, plan, done = ckpt.modules(), [], set()
    for info in _file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if not (m.marlin and suffix in MARLIN_PARAMS):
            plan.append(_copy(ckpt, info.name))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_ct_step(ckpt, m, dtypes))
    config = dict(ckpt.config, quantization_config=ckpt.marlin.source_json)
    return _run(ckpt, src, out, plan, config, dev, max_shard_size, force, progress, {"modules_restored": 0})


def _ct_outputs(prefix: str, n: int, k: int, bits: int, groups: int, suffixes: set[str], dtypes) -> list[tuple]:
    outs = [(f"{prefix}.weight_packed", "I32", (n, k * bits // 32)),
            (f"{prefix}.weight_scale", dtypes["weight_scale"], (n, groups))]
    if "zp" in suffixes:
        zp_i8 = dtypes.get("weight_zero_point") == "I8"
        outs.append((f"{prefix}.weight_zero_point", "I8" if zp_i8 else "I32", (n, groups) if zp_i8 else (-(-n // 8), groups)))
    if "perm" in suffixes:
        outs.append((f"{prefix}.weight_g_idx", "I32", (k,)))
    outs.append((f"{prefix}.weight_shape", dtypes.get("weight_shape", "I64"), (2,)))
    return outs


def _ct_step(ckpt: Checkpoint, m: Module, dtypes: dict[str, str]) -> Step:
    k, n, bits, groups = marlin_dims(m.tensors["B"].shape, m.tensors["s"].shape)
    parts = stacked_parts(ckpt, m) or [(m.prefix, n)]
    per = len(parts) // (m.tensors["B"].shape[0] if len(m.tensors["B"].shape) == 3 else 1)
    outs = [o for name, rows in parts for o in _ct_outputs(name, rows, k, bits, groups, set(m.tensors), dtypes)]
    scale_dtype, shape_dtype = torch_dtype(dtypes["weight_scale"]), torch_dtype(dtypes.get("weight_shape", "I64"))

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = _local(m, t)
        result = []
        for part in [local] if len(parts) == 1 else split_stacked(local, per):   # w13 -> gate, up
            ct = to_ct(part, scale_dtype=scale_dtype, zero_point_dtype=dtypes.get("weight_zero_point", "I32"),
                       shape_dtype=shape_dtype)
            result += [ct[o.rpartition(".")[2]] for o, _, _ in _ct_outputs("x", 0, 0, 0, 0, set(local), dtypes)]
        return result
    return Step(outs, [i.name for i in m.tensors.values() if i.name.rpartition(".")[2] in MARLIN_PARAMS], work,
                "modules_restored")


def _pipeline(ckpt, plan, writer, dev, stats, progress, total) -> None:
    """read (thread) -> compute (this thread) -> write (thread); queues bound memory."""
    loaded: queue.Queue = queue.Queue(maxsize=1)      # one step read ahead
    computed: queue.Queue = queue.Queue(maxsize=1)    # one result waiting while another is written
    errors: list[BaseException] = []
    stop = threading.Event()
    writer_done = threading.Event()                   # a dead writer takes no end marker

    def read() -> None:
        try:
            for step in plan:
                if stop.is_set():
                    return
                _put(loaded, (step, {n: ckpt.load(n) for n in step.sources}), stop)
        except BaseException as err:  # handed to the main thread, which raises it
            errors.append(err)
        finally:
            _put(loaded, None, stop)

    def write() -> None:
        done = 0
        try:
            while (item := computed.get()) is not None:
                step, tensors, nbytes = item
                for (name, _, _), t in zip(step.outputs, tensors):
                    writer.write(name, t)
                done += nbytes
                if progress:
                    progress(done, total)
        except BaseException as err:
            errors.append(err)
            stop.set()
        finally:
            writer_done.set()

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=write, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := loaded.get()) is not None and not errors:
            step, tensors = item
            nbytes = sum(t.nbytes for t in tensors.values())
            stats["bytes_read"] += nbytes
            out = _compute(step, tensors, dev, stats)
            stats[step.count] += 1
            _put(computed, (step, out, nbytes), stop)
    finally:
        stop.set() if errors else None
        _put(computed, None, writer_done)
        threads[1].join()
        stop.set()
        _drain(loaded)
        threads[0].join()
    if errors:
        raise errors[0]


def _compute(step: Step, tensors: dict[str, torch.Tensor], dev: torch.device, stats: dict) -> list[torch.Tensor]:
    if step.work is None:
        return [tensors[step.sources[0]]]
    if dev.type == "cuda":
        try:
            on_dev = {k: v.to(dev, non_blocking=True) for k, v in tensors.items()}
            return [t.cpu() for t in step.work(on_dev)]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            stats["cpu_fallbacks"] += 1          # this step on the CPU: same bits, slower
    return step.work(tensors)


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                return


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
