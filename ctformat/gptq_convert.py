"""Whole-checkpoint conversion CT -> GPTQ / AWQ and GPTQ / AWQ -> CT (spec/gptq-awq.md).

A plan is made first, from headers, the small tensors (weight_shape, scales, zero points)
and the configs: every refusal happens there, before any output exists. Then each module is
converted on its own (`Plan.steps`, in file order) and written through CheckpointWriter.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from .checkpoint import Checkpoint, CheckpointWriter, Module, dtype_code, open_checkpoint
from .errors import ConfigError, SpecError, TensorError, UnsupportedError
from .gptq import from_gptq, scale_cast_loss, to_gptq, zero_codes
from .awq import from_awq, to_awq
from .gptq_config import (AWQ_METHOD, GPTQ_METHOD, GPTQ_V1, GPTQ_V2, QUANTIZE_CONFIG_NAME, GptqConfig, ModuleScheme,
                          Provenance, awq_config_json, ct_config_json, detect, gptq_config_json, module_scheme,
                          read_gptq_config)
from .gptq_layout import awq_shapes, check_header, ct_shapes, gptq_shapes, in_features
from .scheme import QuantizationConfig, Strategy
from .spec import DENSE, EMBEDDING_NAMES, PADDED, QUANT_PARAMS

__all__ = ["Plan", "Step", "plan_to_gptq", "plan_from_gptq", "write_plan", "convert_to_gptq", "convert_from_gptq",
           "open_gptq"]

Tensors = dict[str, torch.Tensor]


@dataclass
class Step:
    """One unit of work, the shape of pipeline.Step: read `sources` (full names), and write
    `outputs` in order; `work` gets {name: tensor} and returns one tensor per output; without
    `work` the single source is copied. `module` names the quantized module converted."""

    outputs: list[tuple[str, str, tuple[int, ...]]]
    sources: list[str]
    work: Callable[[Tensors], list[torch.Tensor]] | None = None
    module: str | None = None


@dataclass
class Plan:
    steps: list[Step]
    config: dict[str, Any]                            # the whole config.json
    extra_files: dict[str, Any] = field(default_factory=dict)   # more JSON files (quantize_config.json)
    skip_files: tuple[str, ...] = ()                  # source files not to copy
    lossy_scales: tuple[int, float] = (0, 0.0)        # (count, largest change) of the F16 cast


def _is_dense_linear(m: Module) -> bool:
    w = m.tensors.get("weight")
    last = m.prefix.rsplit(".", 1)[-1]
    return (w is not None and len(w.shape) == 2 and last not in EMBEDDING_NAMES and not last.endswith("norm"))


def _copy(m: Module) -> list[Step]:
    return [Step([(i.name, i.dtype, tuple(i.shape))], [i.name]) for i in m.tensors.values()]


def _module_step(m: Module, want: Mapping[str, tuple[str, tuple[int, ...]]], extra: Mapping[str, Any],
                 convert: Callable[[Tensors], Tensors]) -> Step:
    """A quantized module: its tensors in, `want` (then the copied `extra`, e.g. bias) out."""
    outputs = [(f"{m.prefix}.{s}", c, sh) for s, (c, sh) in want.items()]
    outputs += [(i.name, i.dtype, tuple(i.shape)) for i in extra.values()]

    def work(t: Tensors) -> list[torch.Tensor]:
        local = {n.rpartition(".")[2]: v for n, v in t.items()}
        out = convert({s: v for s, v in local.items() if s not in extra})
        return [out[s] for s in want] + [local[s] for s in extra]
    return Step(outputs, [i.name for i in m.tensors.values()], work, m.prefix)


def _one_dtype(ckpt: Checkpoint, mods: list[Module]) -> dict[str, str]:
    """The source dtype of each tensor role; several for one role is GCV-07."""
    found: dict[str, set[str]] = {}
    for m in mods:
        for role in ("weight_scale", "weight_shape", "weight_zero_point"):
            if role in m.tensors:
                found.setdefault(role, set()).add(m.tensors[role].dtype)
    many = {r: sorted(d) for r, d in found.items() if len(d) > 1}
    if many:
        raise UnsupportedError(f"tensor roles stored in several dtypes: {many} [GCV-07]")
    return {r: d.pop() for r, d in found.items()}


# -- CT -> GPTQ / AWQ ----------------------------------------------------------------------
def plan_to_gptq(ckpt: Checkpoint, target: str, *, fmt: str | None = None, allow_lossy: bool = False) -> Plan:
    """Plan CT -> GPTQ (`target` "gptq", `fmt` v1/v2, default v1 when all symmetric) or AWQ ("awq")."""
    from .validate import check_module
    if ckpt.marlin is not None or ckpt.quant is None:
        raise UnsupportedError("the input is not a pack-quantized compressed-tensors checkpoint [GCV-07]")
    mods = list(ckpt.modules().values())
    quant = [m for m in mods if m.quantized]
    if not quant:
        raise UnsupportedError("the input has no quantized module [GCV-07]")
    for m in quant:
        for issue in check_module(ckpt, m):
            if issue.severity == "error":
                raise issue.as_error()
    dtypes = _one_dtype(ckpt, quant)
    shapes, layouts, schemes, lossy, zero0 = {}, set(), {}, [0, 0.0], []
    for m in quant:
        shape = tuple(int(v) for v in ckpt.load(m.tensors["weight_shape"].name).tolist())
        shapes[m.prefix] = shape
        if len(shape) != 2:
            raise UnsupportedError(f"{m.prefix}: stacked module {list(shape)}; GPTQ/AWQ store experts one by one [GCV-06]")
        if 8 % m.scheme.num_bits:
            layouts.add(ckpt.layout(m, shape[-1]))
        schemes[m.prefix] = module_scheme(m.scheme)
        _check_shape(m.prefix, shape, m.scheme.num_bits, target, schemes[m.prefix])
        count, err = scale_cast_loss(ckpt.load(m.tensors["weight_scale"].name))
        lossy[0] += count
        lossy[1] = max(lossy[1], err)
        if "weight_zero_point" in m.tensors:
            t = {k: ckpt.load(i.name) for k, i in m.tensors.items() if k in ("weight_zero_point", "weight_packed")}
            groups = m.scheme.num_groups(shape[-1]) if m.scheme.strategy is Strategy.GROUP else 1
            if bool((zero_codes(t, m.scheme, shape[0], groups, ckpt.layout(m, shape[-1])) == 0).any()):
                zero0.append(m.prefix)
    if len(layouts) > 1:
        raise UnsupportedError("3-bit modules in both the dense and the padded layout [GCV-07]")
    if lossy[0] and not allow_lossy:
        raise UnsupportedError(f"{lossy[0]} scales change in the float16 cast (largest change {lossy[1]:.3g}); "
                               "GPTQ and AWQ store float16 scales (allow_lossy writes them rounded) [GCV-03]")
    if fmt is None:
        fmt = GPTQ_V1 if all(s.sym for s in schemes.values()) else GPTQ_V2
    if target == GPTQ_METHOD and fmt == GPTQ_V1 and zero0:
        raise UnsupportedError(f"{zero0[0]}: a zero point of 0, which GPTQ v1 cannot store (write gptq_v2) [GCV-04]")
    dense_linear = [m.prefix for m in mods if not m.quantized and _is_dense_linear(m)]
    if target == AWQ_METHOD:
        _check_awq(schemes, dense_linear)
    layout = layouts.pop() if layouts else DENSE
    prov = Provenance(ckpt.config["quantization_config"], ckpt.quant, dtypes, layout, lossy[0])
    steps = []
    for m in mods:
        steps += [_quant_step(m, shapes[m.prefix], schemes[m.prefix], target, fmt, layout)] if m.quantized else _copy(m)
    config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
    if target == GPTQ_METHOD:
        qc = gptq_config_json(schemes, dense_linear, fmt, prov)
        return Plan(steps, {**config, "quantization_config": qc}, {QUANTIZE_CONFIG_NAME: qc},
                    lossy_scales=(lossy[0], lossy[1]))
    qc = awq_config_json(next(iter(schemes.values())), dense_linear, prov)
    return Plan(steps, {**config, "quantization_config": qc}, skip_files=(QUANTIZE_CONFIG_NAME,),
                lossy_scales=(lossy[0], lossy[1]))


def _check_shape(prefix: str, shape: tuple[int, ...], bits: int, target: str, ms: ModuleScheme) -> None:
    n, k = shape
    if target == AWQ_METHOD:
        if bits != 4:
            raise UnsupportedError(f"{prefix}: {bits}-bit; AWQ GEMM stores 4-bit weights [GCV-01]")
        if n % 8 or (ms.group_size != -1 and k % ms.group_size):
            raise UnsupportedError(f"{prefix}: [{n}, {k}]; AWQ needs out_features % 8 == 0 and in_features % "
                                   f"group_size == 0 [GCV-02]")
        return
    if bits not in (2, 3, 4, 8):
        raise UnsupportedError(f"{prefix}: {bits}-bit; GPTQ stores 2, 3, 4 or 8 bits [GCV-01]")
    if (k * bits) % 32 or (n * bits) % 32 or (bits == 3 and (k % 32 or n % 32)):
        raise UnsupportedError(f"{prefix}: [{n}, {k}] at {bits} bits; GPTQ loaders need in_features and "
                               f"out_features filling whole words (3-bit: multiples of 32) [GCV-02]")


def _check_awq(schemes: Mapping[str, ModuleScheme], dense: list[str]) -> None:
    if len(set(schemes.values())) > 1:
        raise UnsupportedError(f"modules with {len(set(schemes.values()))} different schemes; an AWQ config holds "
                               "one [GCV-05]")
    s = next(iter(schemes.values()))
    if s.desc_act:
        raise UnsupportedError("act-order (weight_g_idx): AWQ has no g_idx [GCV-05]")
    if "lm_head" in schemes:
        raise UnsupportedError("a quantized lm_head; AWQ loaders keep it dense [GCV-05]")
    for d in dense:
        hit = next((q for q in schemes if d in q), None)
        if hit is not None and d != "lm_head":
            raise UnsupportedError(f"dense {d} is a substring of quantized {hit}; AWQ's modules_to_not_convert "
                                   "would skip both [GCV-05]")


def _quant_step(m: Module, shape, ms: ModuleScheme, target: str, fmt: str, layout: str) -> Step:
    n, k = shape
    want = gptq_shapes(n, k, ms) if target == GPTQ_METHOD else awq_shapes(n, k, ms)
    scheme = m.scheme
    if target == GPTQ_METHOD:
        convert = lambda t: to_gptq(t, scheme, fmt=fmt, layout=layout)   # noqa: E731
    else:
        convert = lambda t: to_awq(t, scheme, layout=layout)             # noqa: E731
    return _module_step(m, want, {s: i for s, i in m.tensors.items() if s not in QUANT_PARAMS}, convert)


# -- GPTQ / AWQ -> CT ----------------------------------------------------------------------
def open_gptq(path: str | os.PathLike) -> tuple[Checkpoint, GptqConfig]:
    """A GPTQ/AWQ checkpoint: its headers (any FILE/HDR problem raised) and the config loaders use."""
    ckpt = open_checkpoint(path, strict=False)
    for p in ckpt.problems:
        if not (p.rule == "CFG-02" and detect((ckpt.config or {}).get("quantization_config"))):
            raise p
    qcj = None
    if ckpt.files.is_file(QUANTIZE_CONFIG_NAME):
        try:
            qcj = json.loads(ckpt.files.read_bytes(QUANTIZE_CONFIG_NAME))
        except ValueError as err:
            raise ConfigError(f"not JSON: {err}", rule="GPTQ-01", file=QUANTIZE_CONFIG_NAME) from None
        if detect(qcj) != GPTQ_METHOD:
            qcj = None                       # an AWQ folder may carry GPTQModel leftovers; config.json decides
    return ckpt, read_gptq_config(ckpt.config, qcj)


def plan_from_gptq(ckpt: Checkpoint, cfg: GptqConfig) -> Plan:
    """Plan GPTQ/AWQ -> CT: with the provenance block the source config and dtypes come back."""
    mods = list(ckpt.modules().values())
    quant = {m.prefix: m for m in mods if "qweight" in m.tensors}
    if not quant:
        raise UnsupportedError("no module carries qweight: nothing to convert [GCV-07]")
    schemes, ks = {}, {}
    for p, m in quant.items():
        ms = cfg.scheme_for(p)
        rule = "AWQ-02" if cfg.method == AWQ_METHOD else "GPTQ-02"
        if ms is None:
            raise TensorError("quantized, but the config leaves this module dense", rule=rule, where=p)
        issues = [i for i in check_header(m.tensors, ms, cfg.method) if i.rule != "GPTQ-10"]
        if issues:
            issues[0].where = f"{p}.{issues[0].where}" if issues[0].where else p
            raise issues[0]
        schemes[p], ks[p] = ms, in_features(m.tensors, ms, cfg.method)
    dense_linear = [m.prefix for m in mods if m.prefix not in quant and _is_dense_linear(m)]
    prov = cfg.provenance
    if prov is None:
        ct_json = ct_config_json(schemes, dense_linear)
        prov = Provenance(ct_json, QuantizationConfig.from_json(ct_json), {"weight_scale": "F16"})
    steps = []
    for m in mods:
        steps += [_ct_step(m, schemes[m.prefix], ks[m.prefix], cfg, prov)] if m.prefix in quant else _copy(m)
    config = {k: v for k, v in (ckpt.config or {}).items() if k != "quantization_config"}
    return Plan(steps, {**config, "quantization_config": dict(prov.source_json)},
                skip_files=(QUANTIZE_CONFIG_NAME,))


def _ct_step(m: Module, ms: ModuleScheme, k: int, cfg: GptqConfig, prov: Provenance):
    group = prov.source.group_for(m.prefix, linear=True)
    scheme = None if group is None or prov.source.is_ignored(m.prefix) else group.weights
    if scheme is None or not _agrees(module_scheme(scheme), ms, cfg.method):
        raise ConfigError(f"the compressed-tensors config gives {None if scheme is None else module_scheme(scheme)}, "
                          f"the {cfg.method} config {ms}", rule="GPTQ-11", where=m.prefix)
    n = m.tensors["scales"].shape[-1]
    want = ct_shapes(n, k, scheme, prov.source_dtypes, prov.layout)
    if cfg.method == AWQ_METHOD:
        convert = lambda t: from_awq(t, ms, scheme, dtypes=prov.source_dtypes, layout=prov.layout)  # noqa: E731
    else:
        convert = lambda t: from_gptq(t, ms, scheme, v1=cfg.v1, k=k, dtypes=prov.source_dtypes,  # noqa: E731
                                      layout=prov.layout)
    extra = {s: i for s, i in m.tensors.items() if s not in ("qweight", "qzeros", "scales", "g_idx")}
    return _module_step(m, want, extra, convert)


def _agrees(ct: ModuleScheme, ms: ModuleScheme, method: str) -> bool:
    # AWQ GEMM always says zero_point true; a symmetric source is stored with every zero 8
    return ct == ms or (method == AWQ_METHOD and not ms.sym and replace(ct, sym=False) == ms)


# -- writing -------------------------------------------------------------------------------
class _Writer(CheckpointWriter):
    """CheckpointWriter plus the files a GPTQ/AWQ target adds or must not inherit."""

    def __init__(self, *args, extra_files: Mapping[str, Any], skip_files: tuple[str, ...], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.extra_files, self.skip_files = extra_files, skip_files

    def close(self, config=None) -> Path:
        from .checkpoint import _copy_other_files
        if self.source is not None:
            _copy_other_files(self.source, self.tmp)
            self.source = None
        for name in self.skip_files:
            (self.tmp / name).unlink(missing_ok=True)
        for name, obj in self.extra_files.items():
            (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        return super().close(config)


def write_plan(ckpt: Checkpoint, plan: Plan, out: str | os.PathLike, *, force: bool = False) -> Path:
    """Run a plan serially (one step's tensors in memory at a time); pipeline.run_steps is the
    threaded equivalent."""
    outputs = [o for step in plan.steps for o in step.outputs]
    with _Writer(out, outputs, force=force, source=ckpt.root, extra_files=plan.extra_files,
                 skip_files=plan.skip_files) as w:
        for step in plan.steps:
            t = {n: ckpt.load(n) for n in step.sources}
            result = list(t.values()) if step.work is None else step.work(t)
            for (name, _, _), v in zip(step.outputs, result, strict=True):
                w.write(name, v)
        return w.close(plan.config)


def convert_to_gptq(src: str | os.PathLike, out: str | os.PathLike, target: str = GPTQ_METHOD, *,
                    fmt: str | None = None, allow_lossy: bool = False, force: bool = False) -> Plan:
    ckpt = open_checkpoint(src)
    plan = plan_to_gptq(ckpt, target, fmt=fmt, allow_lossy=allow_lossy)
    write_plan(ckpt, plan, out, force=force)
    return plan


def convert_from_gptq(src: str | os.PathLike, out: str | os.PathLike, *, force: bool = False) -> Plan:
    ckpt, cfg = open_gptq(src)
    plan = plan_from_gptq(ckpt, cfg)
    write_plan(ckpt, plan, out, force=force)
    return plan
