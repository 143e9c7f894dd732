"""`convert --to gptq` / `--to awq` and back (`--to compressed-tensors` from a GPTQ or AWQ
checkpoint), spec/gptq-awq.md: codes move, scales are cast to float16 only where that is exact
(or `allow_lossy`), everything the target cannot hold is refused (QCV-01..07) before any output
exists, and the ctformat provenance block lets the reverse restore the source bit for bit."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch

from .awq import from_awq, to_awq
from .checkpoint import CT, Checkpoint, Module
from .dequant import checked_shape
from .errors import UnsupportedError
from .gptq import from_gptq, scale_cast_loss, to_gptq, zero_codes
from .gptq_config import (AWQ_METHOD, GPTQ_METHOD, GPTQ_V1, GPTQ_V2, ModuleScheme, Provenance, awq_config_json,
                          ct_config_json, ct_scheme, gptq_config_json, module_scheme)
from .gptq_layout import awq_shapes, ct_shapes, gptq_shapes, in_features
from .marlin_config import SOURCE_ROLES
from .names import moe_renamed
from .pipeline import (ConvertResult, Step, by_suffix, copy_step, file_order, module_sources, open_for_convert,
                       run_conversion)
from .scheme import QuantizationConfig
from .spec import (GPTQ_PARAMS, GPTQ_REFUSALS, GPTQ_RENAMES, MOE_MODULE, QUANT_PARAMS, QUANTIZE_CONFIG_NAME,
                   CROSS_WORD)
from .validate_gptq import source_scheme

__all__ = ["convert_to_gptq", "convert_to_awq", "gptq_to_ct", "GPTQ_FORMATS"]

Progress = Callable[[int, int], None]
GPTQ_FORMATS = {"v1": GPTQ_V1, "v2": GPTQ_V2}        # --gptq-format -> checkpoint_format


@contextmanager
def _inline_ops(device: torch.device) -> Iterator[None]:
    """On the CPU, torch ops run in the calling thread while a conversion runs: the codecs move
    words (copy-bound), and the pipeline's reader and writer threads need the other cores; torch's
    thread pool took them (its workers spin after each op) and made conversions ~2x slower on a
    2-core CPU (RESULTS.md). The setting is restored afterwards."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _refuse(rule: str, where: str, message: str, option: str | None = None) -> UnsupportedError:
    assert rule in GPTQ_REFUSALS, rule
    return UnsupportedError(message, rule=rule, where=where, option=option)


@dataclass
class _Preflight:
    """What a CT -> GPTQ/AWQ conversion found before writing anything."""

    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)     # module -> (N, K)
    schemes: dict[str, ModuleScheme] = field(default_factory=dict)       # module (written name) -> scheme
    dtypes: dict[str, str] = field(default_factory=dict)                 # tensor role -> source dtype
    layout: str = CROSS_WORD
    lossy: int = 0
    largest_change: float = 0.0
    zero_zero: str | None = None                                         # a module with some z = 0
    names: dict[str, str] = field(default_factory=dict)                  # module -> written name
    inverse: dict[str, str] = field(default_factory=dict)                # written name part -> source part


# -- CT -> GPTQ / AWQ ----------------------------------------------------------------------
def convert_to_gptq(model: str | Path, out: str | Path, *, gptq_format: str | None = None, allow_lossy: bool = False,
                    keep_names: bool = False, device: str = "auto", max_shard_size: int = 5_000_000_000,
                    force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """Write MODEL's quantized modules as GPTQ tensors (v1 or v2, spec/gptq-awq.md §1) at OUT."""
    if gptq_format is not None and gptq_format not in GPTQ_FORMATS:
        raise ValueError(f"gptq_format {gptq_format!r}: use one of {', '.join(GPTQ_FORMATS)}")
    return _forward(model, out, GPTQ_METHOD, GPTQ_FORMATS.get(gptq_format or ""), allow_lossy, keep_names, device,
                    max_shard_size, force, progress)


def convert_to_awq(model: str | Path, out: str | Path, *, allow_lossy: bool = False, keep_names: bool = False,
                   device: str = "auto", max_shard_size: int = 5_000_000_000, force: bool = False,
                   progress: Progress | None = None) -> ConvertResult:
    """Write MODEL's quantized modules as AWQ GEMM tensors (spec/gptq-awq.md §2) at OUT."""
    return _forward(model, out, AWQ_METHOD, None, allow_lossy, keep_names, device, max_shard_size, force, progress)


def _forward(model, out, target: str, fmt: str | None, allow_lossy: bool, keep_names: bool, device: str,
             max_shard_size: int, force: bool, progress: Progress | None) -> ConvertResult:
    src, dev, ckpt = open_for_convert(model, out, device)
    with _inline_ops(dev):
        pre = _preflight(ckpt, target, allow_lossy, keep_names)
        if fmt is None:
            fmt = GPTQ_V1 if all(s.sym for s in pre.schemes.values()) else GPTQ_V2
        if target == GPTQ_METHOD and fmt == GPTQ_V1 and pre.zero_zero:
            raise _refuse("QCV-04", pre.zero_zero, "a zero point of 0, which GPTQ v1 cannot store (z - 1 overflows); "
                          "write --gptq-format v2 or --to awq")
        prov = Provenance(ckpt.config["quantization_config"], ckpt.quant, pre.dtypes, pre.layout, pre.lossy,
                          pre.inverse)
        dense = [pre.names.get(p, p) for p, m in ckpt.modules().items() if not m.quantized and _dense_linear(m)]
        if target == GPTQ_METHOD:
            qc = gptq_config_json(pre.schemes, dense, fmt, prov)
            extra, skip = {QUANTIZE_CONFIG_NAME: qc}, ()
        else:
            qc = awq_config_json(next(iter(pre.schemes.values())), dense, prov)
            extra, skip = {}, (QUANTIZE_CONFIG_NAME,)
        result = run_conversion(ckpt, src, out, _forward_plan(ckpt, pre, target, fmt),
                                dict(ckpt.config, quantization_config=qc), target=target, verb="repacked", device=dev,
                                params=frozenset(QUANT_PARAMS), max_shard_size=max_shard_size, force=force,
                                progress=progress, extra_files=extra, skip_files=skip)
    result.details.update({"format": fmt if target == GPTQ_METHOD else "gemm", "lossy_scales": pre.lossy,
                           "largest_scale_change": pre.largest_change,
                           "renamed_modules": sum(1 for p, n in pre.names.items() if p != n)})
    return result


def _dense_linear(m: Module) -> bool:
    w = m.tensors.get("weight")
    return m.is_linear and w is not None and len(w.shape) == 2


def _preflight(ckpt: Checkpoint, target: str, allow_lossy: bool, keep_names: bool) -> _Preflight:
    """Every QCV refusal but QCV-04's format choice, from headers, weight_shape, scales and zero
    points (the small tensors), before any output exists."""
    if ckpt.family != CT:
        raise _refuse("QCV-07", ckpt.label, f"a {ckpt.family or 'dense'} checkpoint; convert --to {target} reads "
                      "pack-quantized compressed-tensors" + (" (convert it --to compressed-tensors first)"
                                                             if ckpt.family else ""))
    quantized = [m for m in ckpt.modules().values() if m.quantized]
    if not quantized:
        raise _refuse("QCV-07", ckpt.label, "no pack-quantized modules to convert")
    _weight_only(ckpt, quantized)
    pre = _Preflight(dtypes=_one_dtype(ckpt, quantized))
    pre.names, pre.inverse = _renames(ckpt, keep_names)
    layouts = set()
    for m in quantized:
        if len(m.tensors["weight_packed"].shape) != 2:
            raise _refuse("QCV-06", m.prefix, f"stacked module {list(m.tensors['weight_packed'].shape)}; GPTQ and AWQ "
                          "loaders read experts one by one")
        n, k = checked_shape(ckpt, m, ckpt.load(m.tensors["weight_shape"].name))
        pre.shapes[m.prefix] = (n, k)
        ms = module_scheme(m.scheme)
        _check_shape(m.prefix, n, k, ms, target)
        layout = ckpt.word_layout(m, k)
        if 8 % ms.bits:
            layouts.add(layout)
        pre.schemes[pre.names.get(m.prefix, m.prefix)] = ms
        if m.tensors["weight_scale"].dtype != "F16":          # F16 scales are stored as they are
            count, change = scale_cast_loss(ckpt.load(m.tensors["weight_scale"].name))
            pre.lossy, pre.largest_change = pre.lossy + count, max(pre.largest_change, change)
        if "weight_zero_point" in m.tensors and pre.zero_zero is None:
            zp = ckpt.load(m.tensors["weight_zero_point"].name)
            if bool((zero_codes(zp, m.scheme, n, m.scheme.num_groups(k), layout) == 0).any()):
                pre.zero_zero = m.prefix
    if len(layouts) > 1:
        raise _refuse("QCV-07", ckpt.label, "3-bit modules in both the cross-word and the padded layout")
    pre.layout = layouts.pop() if layouts else CROSS_WORD
    if pre.lossy and not allow_lossy:
        raise _refuse("QCV-03", ckpt.label, f"{pre.lossy} scales change in the float16 cast (largest change "
                      f"{pre.largest_change:.3g}); GPTQ and AWQ store float16 scales", option="allow_lossy")
    if target == AWQ_METHOD:
        _check_awq(ckpt, pre)
    return pre


def _weight_only(ckpt: Checkpoint, quantized: list[Module]) -> None:
    """QCV-07: GPTQ and AWQ hold int weights and nothing else: every quantized module
    pack-quantized with weights only, no kv-cache scheme, no transforms (their loaders would
    drop what the checkpoint computes with)."""
    q = ckpt.quant
    for m in quantized:
        if not m.packed:
            raise _refuse("QCV-07", m.prefix, f"stored {m.format}; GPTQ and AWQ hold pack-quantized int weights")
        if m.group is not None and (m.group.input_activations is not None or m.group.output_activations is not None):
            raise _refuse("QCV-07", m.prefix, "activations are quantized too; GPTQ and AWQ are weight-only")
    if q.kv_cache is not None or q.transforms:
        what = "a kv_cache_scheme" if q.kv_cache is not None else "transforms (transform_config)"
        raise _refuse("QCV-07", ckpt.label, f"{what}, which GPTQ and AWQ loaders do not apply")


def _one_dtype(ckpt: Checkpoint, quantized: list[Module]) -> dict[str, str]:
    """The source dtype of each tensor role (recorded for the reverse); several is QCV-07."""
    found = {r: {m.tensors[r].dtype for m in quantized if r in m.tensors} for r in SOURCE_ROLES}
    many = {r: sorted(d) for r, d in found.items() if len(d) > 1}
    if many:
        role, codes = next(iter(many.items()))
        raise _refuse("QCV-07", ckpt.label, f"{role} is stored as {' and '.join(codes)} in different modules; the "
                      "reverse conversion could not restore both")
    return {r: d.pop() for r, d in found.items() if d}


def _renames(ckpt: Checkpoint, keep_names: bool) -> tuple[dict[str, str], dict[str, str]]:
    """module -> written name (the MoE names GPTQModel reads, spec/gptq-awq.md §3.1), and the
    inverse table of name parts the provenance block records. One written part from two source
    parts (a checkpoint with both naming eras) could not be undone: QCV-07."""
    import re
    table = {} if keep_names else GPTQ_RENAMES.get(ckpt.model_type or "", {})
    if not table:
        return {}, {}
    moe = re.compile(MOE_MODULE)
    names, inverse = {}, {}
    for prefix in ckpt.modules():
        hit = moe.match(prefix)
        if hit is None:
            continue
        written = moe_renamed(prefix, table)
        names[prefix] = written
        pairs = [(hit.group(2), written[len(hit.group(1)):].split(".")[0])]
        if hit.group(3) != "gate":
            pairs.append((prefix.rpartition(".")[2], written.rpartition(".")[2]))
        for part, new in pairs:
            if inverse.setdefault(new, part) != part:
                raise _refuse("QCV-07", prefix, f"module names of two eras ({inverse[new]} and {part} both become "
                              f"{new}); keep_names writes them as they are")
    return names, {new: old for new, old in inverse.items() if new != old}


def _check_shape(prefix: str, n: int, k: int, ms: ModuleScheme, target: str) -> None:
    b = ms.bits
    if target == AWQ_METHOD:
        if b != 4:
            raise _refuse("QCV-01", prefix, f"{b}-bit weights; AWQ GEMM stores 4-bit weights")
        if n % 8 or (ms.group_size != -1 and k % ms.group_size):
            raise _refuse("QCV-02", prefix, f"weight [{n}, {k}]; AWQ needs out_features % 8 == 0 and in_features % "
                          "group_size == 0")
        return
    if b not in (2, 3, 4, 8):
        raise _refuse("QCV-01", prefix, f"{b}-bit weights; GPTQ stores 2, 3, 4 or 8 bits")
    if (k * b) % 32 or (n * b) % 32 or (b == 3 and (k % 32 or n % 32)):
        raise _refuse("QCV-02", prefix, f"weight [{n}, {k}] at {b} bits; GPTQ loaders need in_features and "
                      "out_features filling whole words (3-bit: multiples of 32)")


def _check_awq(ckpt: Checkpoint, pre: _Preflight) -> None:
    """QCV-05: AWQ holds one scheme, no g_idx, a dense lm_head, and skips dense modules by substring."""
    kinds = set(pre.schemes.values())
    if len(kinds) > 1:
        raise _refuse("QCV-05", ckpt.label, f"quantized modules with {len(kinds)} different schemes; an AWQ config "
                      "holds one")
    if next(iter(kinds)).desc_act:
        raise _refuse("QCV-05", ckpt.label, "act-order (weight_g_idx): AWQ has no g_idx")
    if "lm_head" in pre.schemes:
        raise _refuse("QCV-05", "lm_head", "a quantized lm_head; AWQ loaders keep it dense")
    for p, m in ckpt.modules().items():
        if m.quantized or not _dense_linear(m) or p == "lm_head":
            continue
        dense = pre.names.get(p, p)
        hit = next((q for q in pre.schemes if dense in q), None)
        if hit is not None:
            raise _refuse("QCV-05", p, f"dense {dense} is a substring of quantized {hit}; AWQ's "
                          "modules_to_not_convert would skip both")


def _forward_plan(ckpt: Checkpoint, pre: _Preflight, target: str, fmt: str) -> list[Step]:
    mods, plan, done = ckpt.modules(), [], set()
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        name = pre.names.get(prefix, prefix)
        if not (m.quantized and suffix in QUANT_PARAMS):
            plan.append(copy_step(ckpt, info.name, f"{name}.{suffix}" if prefix else None))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_repack_step(m, name, pre, target, fmt))
    return plan


def _repack_step(m: Module, name: str, pre: _Preflight, target: str, fmt: str) -> Step:
    (n, k), ms, scheme = pre.shapes[m.prefix], pre.schemes[name], m.scheme
    want = gptq_shapes(n, k, ms) if target == GPTQ_METHOD else awq_shapes(n, k, ms)

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = by_suffix(m, t)
        got = (to_gptq(local, scheme, fmt=fmt, layout=pre.layout) if target == GPTQ_METHOD
               else to_awq(local, scheme, layout=pre.layout))
        return [got[s] for s in want]
    return Step([(f"{name}.{s}", code, shape) for s, (code, shape) in want.items()],
                module_sources(m, QUANT_PARAMS), work, m.prefix)


# -- GPTQ / AWQ -> CT ----------------------------------------------------------------------
def gptq_to_ct(model: str | Path, out: str | Path, *, device: str = "auto", max_shard_size: int = 5_000_000_000,
               force: bool = False, progress: Progress | None = None) -> ConvertResult:
    """A GPTQ or AWQ checkpoint as pack-quantized compressed-tensors: with ctformat's provenance
    block the source comes back bit for bit (names, config, dtypes); without it (another
    tool's file) the config is built from the GPTQ/AWQ one (spec/gptq-awq.md §4.4)."""
    src, dev, ckpt = open_for_convert(model, out, device)
    cfg, mods = ckpt.gptq, ckpt.modules()
    quant = {p: m for p, m in mods.items() if m.quantized}
    if not quant:
        raise _refuse("QCV-07", ckpt.label, f"a {cfg.method} config, but no module carries qweight")
    prov = cfg.provenance
    if prov is None:
        dense = [p for p, m in mods.items() if not m.quantized and _dense_linear(m)]
        ct_json = ct_config_json({p: m.gptq for p, m in quant.items()}, dense)
        prov = Provenance(ct_json, QuantizationConfig.from_json(ct_json), {"weight_scale": "F16"})
    plan, done = [], set()
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        name = moe_renamed(prefix, prov.names)
        if not (m.quantized and suffix in GPTQ_PARAMS):
            plan.append(copy_step(ckpt, info.name, f"{name}.{suffix}" if prefix else None))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_restore_step(ckpt, m, name, prov))
    config = dict(ckpt.config or {}, quantization_config=dict(prov.source_json))
    with _inline_ops(dev):
        return run_conversion(ckpt, src, out, plan, config, target="compressed-tensors", verb="restored",
                              device=dev, params=frozenset(GPTQ_PARAMS), max_shard_size=max_shard_size, force=force,
                              progress=progress, skip_files=(QUANTIZE_CONFIG_NAME,))


def _restore_step(ckpt: Checkpoint, m: Module, name: str, prov: Provenance) -> Step:
    cfg, ms = ckpt.gptq, m.gptq
    k = in_features(m.tensors, ms, cfg.method)
    scheme = source_scheme(ckpt, m) if cfg.provenance is not None else ct_scheme(ms)
    n = m.tensors["scales"].shape[-1]
    want = ct_shapes(n, k, scheme, prov.source_dtypes, prov.layout)

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = by_suffix(m, t)
        if cfg.method == AWQ_METHOD:
            got = from_awq(local, ms, scheme, dtypes=prov.source_dtypes, layout=prov.layout)
        else:
            got = from_gptq(local, ms, scheme, v1=cfg.v1, k=k, dtypes=prov.source_dtypes, layout=prov.layout)
        return [got[s] for s in want]
    return Step([(f"{name}.{s}", code, shape) for s, (code, shape) in want.items()],
                module_sources(m, GPTQ_PARAMS), work, m.prefix)
