"""Validation: every rule of spec §6 checked against a checkpoint, collected into a Report.

Static checks read headers and config only; `deep=True` also reads each quantized
module's tensors (one module at a time) for the DATA rules.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from .errors import CheckpointNotFoundError, ConfigError, HeaderError, SpecError, TensorError
from .scheme import Strategy
from .spec import (DENSE, EXPERT_MODULE, FLOAT_DTYPES, FUSED_SIBLINGS, LEGACY_K_MULTIPLE, LEGACY_N_MULTIPLE,
                   MARLIN_PARAMS, RULES)

if TYPE_CHECKING:
    from .checkpoint import Checkpoint, Module

__all__ = ["Issue", "Report", "validate_checkpoint", "check_module", "check_module_data"]

_ERROR_CLASS = {"FILE": HeaderError, "HDR": HeaderError, "CFG": ConfigError, "TEN": TensorError, "DATA": TensorError,
                "VLLM": ConfigError, "TRF": ConfigError, "MRL": TensorError}


@dataclass(frozen=True, slots=True)
class Issue:
    rule: str              # "TEN-04": spec/ctformat.md §6
    severity: str          # "error" or "warning"
    file: str | None       # file the problem is in
    where: str | None      # tensor, module or JSON key
    message: str           # what was expected and what was found

    def as_error(self) -> SpecError:
        cls = _ERROR_CLASS[self.rule.split("-")[0]]
        return cls(self.message, rule=self.rule, file=self.file, where=self.where)

    @classmethod
    def from_error(cls, err: SpecError) -> Issue:
        return cls(err.rule, RULES[err.rule][0], err.file, err.where, err.message)

    def __str__(self) -> str:
        return str(self.as_error())


@dataclass(frozen=True, slots=True)
class Report:
    path: str
    issues: tuple[Issue, ...]
    modules_checked: int = 0
    deep: bool = False
    rules_checked: tuple[str, ...] = field(default=tuple(RULES))

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {"schema": "ctformat.validate/1", "path": self.path, "ok": self.ok, "deep": self.deep,
                "modules_checked": self.modules_checked, "errors": len(self.errors),
                "warnings": len(self.warnings), "issues": [asdict(i) for i in self.issues]}


def validate_checkpoint(path: str | os.PathLike, *, deep: bool = False, revision: str | None = None,
                        target: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Report:
    """Check a checkpoint (local path or Hub repo id) against every rule; never raises for
    what it finds in the files."""
    from .hub import open_model
    try:
        ckpt = open_model(str(path), revision, strict=False)
    except SpecError as err:
        return Report(str(path), (Issue.from_error(err),), deep=deep)
    except CheckpointNotFoundError as err:
        return Report(str(path), (Issue("FILE-01", "error", None, None, str(err).removesuffix(" [FILE-01]")),), deep=deep)
    issues = [Issue.from_error(p) for p in ckpt.problems]
    modules = ckpt.modules()
    quantized = [m for m in modules.values() if m.quantized]
    if any(i.rule.startswith("CFG") or i.rule == "MRL-01" for i in issues):
        return Report(str(path), tuple(issues), len(quantized), deep)   # no usable config: modules unjudgeable
    issues += _config_warnings(ckpt)
    for m in modules.values():
        issues += check_module(ckpt, m)
    issues += _sibling_issues(ckpt)
    if target == "vllm":
        from .profiles import vllm_issues
        issues += vllm_issues(ckpt)
    elif target == "transformers":
        from .profiles import transformers_issues
        issues += transformers_issues(ckpt)
    elif target is not None:
        raise ValueError(f"unknown target {target!r}; known: vllm, transformers")
    if deep:
        bad = {i.where for i in issues if i.severity == "error" and i.where}
        todo = [m for m in quantized if m.scheme is not None
                and not any(w == m.prefix or w.startswith(m.prefix + ".") for w in bad)]
        for k, m in enumerate(todo):
            issues += check_module_data(ckpt, m)
            if progress:
                progress(k + 1, len(todo))
    return Report(str(path), tuple(issues), len(quantized), deep)


def _config_warnings(ckpt: Checkpoint) -> list[Issue]:
    q = ckpt.quant
    if q is None:
        return []
    base = "quantization_config"
    out = [(base, q.unknown)] + [(f"{base}.config_groups.{g.name}", g.unknown) for g in q.groups]
    out += [(f"{base}.config_groups.{g.name}.weights", g.weights.unknown) for g in q.groups if g.weights]
    return [Issue("CFG-08", "warning", "config.json", where, f"unknown keys kept as they are: {', '.join(keys)}")
            for where, keys in out if keys]


def _issue(rule: str, module: Module, suffix: str | None, message: str) -> Issue:
    t = module.tensors.get(suffix) if suffix else None
    where = f"{module.prefix}.{suffix}" if suffix else module.prefix
    file = t.file if t is not None else next(iter(module.tensors.values())).file
    return Issue(rule, RULES[rule][0], file, where, message)


def check_module(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """Static rules TEN-01..11 for one module: names, dtypes and shapes only."""
    scheme = m.scheme
    if ckpt.marlin is not None and m.marlin:
        return list(_marlin_issues(ckpt, m))
    if m.quantized and m.ignored:
        return [_issue("TEN-09", m, m.quant_tensor, "module is matched by ignore but stored quantized")]
    if m.quantized and scheme is None:
        return [_issue("TEN-10", m, m.quant_tensor, "quantized tensors, but no config group targets this module")]
    if not m.quantized:
        if scheme is not None and not m.ignored and m.linear and "weight" in m.tensors:
            return [_issue("TEN-11", m, "weight", f"config group {m.group.name} targets this module, "
                           "but it is stored dense (add it to ignore, or quantize it)")]
        return []
    return list(_tensor_issues(ckpt, m))


def _tensor_issues(ckpt: Checkpoint, m: Module) -> Iterator[Issue]:
    from .scheme import packed_width
    s, t = m.scheme, m.tensors
    need = {"weight_packed", "weight_scale", "weight_shape"}
    need |= {"weight_zero_point"} if not s.symmetric else set()
    need |= {"weight_g_idx"} if s.has_g_idx else set()
    for name in sorted(need - set(t)):
        yield _issue("TEN-01", m, None, f"{name} is missing ({_scheme_words(s)} needs it)")
    extra = set(t) - need - {"bias", "input_global_scale"}
    for name in sorted(extra):
        why = {"weight_zero_point": "a symmetric scheme stores no zero point (vLLM fails with KeyError)",
               "weight_g_idx": f"actorder is {s.actorder!r}, so no g_idx is stored",
               "weight": "a dense weight beside weight_packed"}.get(name, "not part of a pack-quantized module")
        yield _issue("TEN-02", m, name, f"unexpected tensor: {why}")
    if need - set(t):
        return
    packed, scale, shape = t["weight_packed"], t["weight_scale"], t["weight_shape"]
    if shape.dtype not in ("I64", "I32") or len(shape.shape) != 1 or shape.shape[0] not in (2, 3):
        yield _issue("TEN-03", m, "weight_shape", f"expected I64 [2] (or [3]), got {shape.dtype} {list(shape.shape)}")
    if packed.dtype != "I32" or len(packed.shape) not in (2, 3):
        yield _issue("TEN-04", m, "weight_packed", f"expected I32 [out, words], got {packed.dtype} {list(packed.shape)}")
        return
    lead, out, width = packed.shape[:-2], packed.shape[-2], packed.shape[-1]
    b = s.num_bits
    if s.strategy is Strategy.GROUP:
        groups = scale.shape[-1] if len(scale.shape) >= 2 else 0
        in_features = groups * s.group_size
        dense, padded = packed_width(in_features, b, DENSE), packed_width(in_features, b, "padded")
        if width not in (dense, padded):
            yield _width_issue(m, width, groups, in_features)
            return
    else:
        in_features = None
    want_scale = (*lead, *s.scale_shape(out, in_features or 1))
    ok_shapes = {tuple(want_scale)} | ({(1,)} if s.strategy is Strategy.TENSOR else set())   # [1] even stacked
    if scale.dtype not in FLOAT_DTYPES or tuple(scale.shape) not in ok_shapes:
        yield _issue("TEN-05", m, "weight_scale", f"expected a float tensor {list(want_scale)} for strategy "
                     f"{s.strategy.value}, got {scale.dtype} {list(scale.shape)}")
    if "weight_zero_point" in t and not s.symmetric:
        yield from _zero_point_issues(ckpt, m, lead, out, want_scale[-1], in_features)
    if "weight_g_idx" in t and s.has_g_idx:
        g = t["weight_g_idx"]
        ok_len = in_features is None or g.shape[-1] == in_features
        if g.dtype != "I32" or tuple(g.shape[:-1]) != tuple(lead) or not ok_len:
            yield _issue("TEN-07", m, "weight_g_idx", f"expected I32 [{in_features or 'in_features'}], "
                         f"got {g.dtype} {list(g.shape)}")


def marlin_shape(m: Module) -> tuple[int, int, int, int]:
    """(K, N, bits, groups) of a Marlin module from its B and s headers (spec §10.1)."""
    b, sc = m.tensors["B"].shape, m.tensors["s"].shape
    n = sc[-1] if sc else 0
    return (b[-2] * 16 if len(b) >= 2 else 0, n, 2 * b[-1] // n if n and b else 0, sc[-2] if len(sc) >= 2 else 0)


def _marlin_issues(ckpt: Checkpoint, m: Module) -> Iterator[Issue]:
    """MRL-02..06 for one Marlin module: tensor set, dtypes and shapes, and its scheme."""
    t = m.tensors
    for name in sorted({"B", "s"} - set(t)):
        yield _issue("MRL-02", m, None, f"{name} is missing (a Marlin module has B and s)")
    extra = set(t) - set(MARLIN_PARAMS) - {"bias"}
    if ("g_idx" in t) != ("perm" in t):
        extra |= {"g_idx" if "g_idx" in t else "perm"}
    for name in sorted(extra):
        yield _issue("MRL-02", m, name, "unexpected tensor (g_idx and perm come together; nothing else but bias)")
    if {"B", "s"} - set(t) or extra:
        return
    b, sc = t["B"], t["s"]
    lead = tuple(b.shape[:-2])
    k, n, bits, groups = marlin_shape(m)
    if b.dtype != "I32" or len(b.shape) not in (2, 3) or not n or n % 64 or bits not in (4, 8) or b.shape[-1] * 2 != n * bits:
        yield _issue("MRL-03", m, "B", f"expected I32 [K/16, N*bits/2] with bits 4 or 8 and N % 64 == 0 "
                     f"(N = {n} from s), got {b.dtype} {list(b.shape)}")
        return
    if (sc.dtype not in ("F16", "BF16") or len(sc.shape) != len(b.shape) or tuple(sc.shape[:-2]) != lead
            or not (groups == 1 or (groups and k % groups == 0 and k // groups in (32, 64, 128)))):
        yield _issue("MRL-04", m, "s", f"expected F16 or BF16 [G, {n}] with G = 1 or K/G in 32, 64, 128 "
                     f"(K = {k}), got {sc.dtype} {list(sc.shape)}")
        return
    if ckpt.marlin.scale_dtype not in (None, sc.dtype):
        yield _issue("MRL-04", m, "s", f"{sc.dtype}, but quantization_config.marlin.scale_dtype says "
                     f"{ckpt.marlin.scale_dtype}")
    if ckpt.marlin.legacy:
        unmet = [need for need, bad in (
            (f"F16 scales (got {sc.dtype})", sc.dtype != "F16"),
            (f"N % {LEGACY_N_MULTIPLE} == 0 (N = {n})", n % LEGACY_N_MULTIPLE),
            (f"K % {LEGACY_K_MULTIPLE} == 0 (K = {k})", k % LEGACY_K_MULTIPLE),
            ("dense layers (this is an MoE expert)", re.match(EXPERT_MODULE, m.prefix) or lead)) if bad]
        if unmet:
            yield _issue("MRL-08", m, None, f"tagged for the legacy Marlin readers, which need {'; '.join(unmet)}")
    want = {"zp": (*lead, groups, n // 8), "g_idx": (*lead, k), "perm": (*lead, k)}
    for name in ("zp", "g_idx", "perm"):
        if name in t and (t[name].dtype != "I32" or tuple(t[name].shape) != want[name]):
            yield _issue("MRL-05", m, name, f"expected I32 {list(want[name])}, got {t[name].dtype} {list(t[name].shape)}")
            return
    stack = _marlin_stack_issue(ckpt, m, n)
    if stack is not None:
        yield stack
        return
    yield from _marlin_scheme_issues(m, k, bits, groups)


def _marlin_stack_issue(ckpt: Checkpoint, m: Module, n: int) -> Issue | None:
    """MRL-06: a module has a leading expert dim exactly when marlin.stacked_experts lists it
    (P.experts.w13 or .w2), with that many experts and N split into parts of whole tiles."""
    base, _, last = m.prefix.rpartition(".")
    entry = ckpt.marlin.stacked.get(base) if last in ("w13", "w2") else None
    b = m.tensors["B"].shape
    if entry is None:
        if len(b) == 3:
            return _issue("MRL-06", m, "B", f"stacked B {list(b)}, but marlin.stacked_experts lists no {base!r} "
                          "with a w13 or w2 part here")
        return None
    parts = 2 if last == "w13" else 1
    if len(b) != 3 or b[0] != entry["experts"] or n % (64 * parts):
        return _issue("MRL-06", m, "B", f"marlin.stacked_experts says {entry['experts']} experts of {parts} "
                      f"part(s) of whole 64-column tiles, but B is {list(b)} with N = {n}")
    other = ckpt.modules().get(f"{base}.{'w2' if last == 'w13' else 'w13'}")
    if other is not None and {"B", "s"} <= set(other.tensors):
        k, _, _, _ = marlin_shape(m)
        k_o, n_o, _, _ = marlin_shape(other)
        if (last == "w13" and (n_o != k or k_o != n // 2)) or (last == "w2" and (k_o != n or n_o != 2 * k)):
            return _issue("MRL-06", m, "B", f"w13 maps H -> 2I and w2 maps I -> H, but w13 and w2 of {base} "
                          "disagree on H or I (shapes read with the wrong header?)")
    return None


def _marlin_scheme_issues(m: Module, k: int, bits: int, groups: int) -> Iterator[Issue]:
    s = m.scheme
    if s is None or m.ignored:
        why = "is matched by ignore" if m.ignored else "is targeted by no group"
        yield _issue("MRL-06", m, "B", f"stored in the Marlin layout, but {why} in the stored compressed-tensors config")
        return
    source_gs = -1 if s.strategy is not Strategy.GROUP or s.group_size >= k else s.group_size
    stored = (bits, k // groups if groups > 1 else -1, "zp" not in m.tensors, "perm" in m.tensors)
    source = (s.num_bits, source_gs, s.symmetric, s.has_g_idx)
    if stored != source:
        words = "bits {}, group size {}, symmetric {}, act-order {}"
        yield _issue("MRL-06", m, "B", f"shapes say {words.format(*stored)}; the stored config says "
                     f"{words.format(*source)}")


def _width_issue(m: Module, width: int, groups: int, in_features: int) -> Issue:
    """TEN-08 when the packed width fits a ragged last group, else TEN-04."""
    s = m.scheme
    b, gs = s.num_bits, s.group_size
    lo, hi = (width - 1) * 32 // b + 1, width * 32 // b          # in_features the width allows
    if max(lo, in_features - gs + 1) <= min(hi, in_features - 1):
        return _issue("TEN-08", m, "weight_packed", f"{width} words hold {lo}..{hi} columns, {groups} scale "
                      f"groups hold {in_features}: in_features is not a multiple of group_size {gs}")
    return _issue("TEN-04", m, "weight_packed", f"{width} words per row, expected "
                  f"{-(-in_features * b // 32)} = ceil({in_features}*{b}/32) for {groups} groups of {gs}")


def _zero_point_issues(ckpt: Checkpoint, m: Module, lead, out: int, groups: int, in_features) -> Iterator[Issue]:
    from .scheme import packed_width
    zp, s = m.tensors["weight_zero_point"], m.scheme
    if s.strategy is Strategy.TENSOR:
        want = {("I8", (*lead, 1))}
    else:
        layout = ckpt.layout(m, in_features) if in_features else DENSE
        want = {("I32", (*lead, packed_width(out, s.num_bits, layout), groups)), ("I8", (*lead, out, groups))}
    if (zp.dtype, tuple(zp.shape)) not in want:
        expect = " or ".join(f"{d} {list(sh)}" for d, sh in sorted(want))
        yield _issue("TEN-06", m, "weight_zero_point", f"expected {expect}, got {zp.dtype} {list(zp.shape)}")


def _scheme_words(s) -> str:
    sym = "symmetric" if s.symmetric else "asymmetric"
    gs = f" group_size {s.group_size}" if s.group_size else ""
    return f"int{s.num_bits} {sym} {s.strategy.value}{gs}" + (" actorder group" if s.has_g_idx else "")


def _sibling_issues(ckpt: Checkpoint) -> list[Issue]:
    """TEN-12: q/k/v, gate/up and w1/w3 of one block must share a scheme (vLLM fuses them)."""
    mods = ckpt.modules()
    out = []
    for prefix, m in mods.items():
        parent, _, leaf = prefix.rpartition(".")
        for fam in FUSED_SIBLINGS:
            if leaf != fam[0]:
                continue
            sibs = [mods.get(f"{parent}.{x}") for x in fam]
            if any(x is not None and x.quantized and x.scheme is None for x in sibs):
                continue                      # already TEN-10
            kinds = {(x.quantized, x.scheme if x.quantized else None) for x in sibs if x is not None}
            if len(kinds) > 1:
                desc = ", ".join(f"{x.prefix.rpartition('.')[2]}={'int%d' % x.scheme.num_bits if x.quantized and x.scheme else 'dense'}"
                                 for x in sibs if x is not None)
                out.append(_issue("TEN-12", m, None, f"fused siblings differ ({desc}); vLLM requires one scheme"))
    return out


def shape_issue(ckpt: Checkpoint, m: Module, shape: tuple[int, ...]) -> Issue | None:
    """DATA-05 / TEN-08 for the weight_shape values of a module, judged against its headers."""
    from .scheme import packed_width
    s, packed, scale = m.scheme, m.tensors["weight_packed"], m.tensors["weight_scale"]
    in_features = shape[-1] if shape else 0
    groups_ok = s.strategy is not Strategy.GROUP or -(-in_features // s.group_size) == scale.shape[-1]
    if (not shape or shape[:-1] != tuple(packed.shape[:-1]) or not groups_ok
            or packed_width(in_features, s.num_bits, ckpt.layout(m, in_features)) != packed.shape[-1]):
        return _issue("DATA-05", m, "weight_shape", f"says {list(shape)}, but weight_packed is "
                      f"{list(packed.shape)} and weight_scale {list(scale.shape)}")
    if s.strategy is Strategy.GROUP and in_features % s.group_size:
        return _issue("TEN-08", m, "weight_shape", f"in_features {in_features} is not a multiple of "
                      f"group_size {s.group_size}")
    return None


def check_module_data(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """DATA rules: read one module's tensors and check their values."""
    if m.marlin:
        return _marlin_data_issues(ckpt, m)
    import torch
    from .quant import int_range
    s = m.scheme
    t = ckpt.load_module(m)
    out: list[Issue] = []
    shape = tuple(int(v) for v in t["weight_shape"].tolist())
    packed = t["weight_packed"]
    in_features = shape[-1] if shape else 0
    layout = ckpt.layout(m, in_features)
    bad_shape = shape_issue(ckpt, m, shape)
    if bad_shape is not None and bad_shape.rule == "DATA-05":
        return [bad_shape]
    out += [bad_shape] if bad_shape is not None else []
    scale = t["weight_scale"].float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        out.append(_issue("DATA-01", m, "weight_scale", f"{int(bad.sum())} of {scale.numel()} scales are not "
                          f"finite and > 0 (first: {scale[bad][0].item()})"))
    lo, hi = int_range(s.num_bits)
    zp = t.get("weight_zero_point")
    if zp is not None and zp.dtype == torch.int8 and zp.numel() and (zp.min() < lo or zp.max() > hi):
        out.append(_issue("DATA-02", m, "weight_zero_point", f"values span [{int(zp.min())}, {int(zp.max())}], "
                          f"outside int{s.num_bits} [{lo}, {hi}]"))
    if zp is not None and zp.dtype == torch.int32 and not _padding_zero(zp.transpose(-1, -2), shape[-2], s.num_bits, layout):
        out.append(_issue("DATA-04", m, "weight_zero_point", "padding bits after the last zero point are not zero"))
    g = t.get("weight_g_idx")
    groups = t["weight_scale"].shape[-1]
    if g is not None and g.numel() and (g.min() < 0 or g.max() >= groups):
        out.append(_issue("DATA-03", m, "weight_g_idx", f"values span [{int(g.min())}, {int(g.max())}], "
                          f"outside [0, {groups})"))
    if not _padding_zero(packed, in_features, s.num_bits, layout):
        out.append(_issue("DATA-04", m, "weight_packed", "padding bits after the last value of a row are not zero"))
    return out


def _padding_zero(words, n: int, bits: int, layout: str) -> bool:
    """True when every bit that holds no value (after value n-1, or atop padded words) is zero."""
    import torch
    from .spec import PADDED
    w = words.to(torch.int64) & 0xFFFFFFFF
    if layout == PADDED:
        per = 32 // bits
        last_used = (n - (w.shape[-1] - 1) * per) * bits
        if ((w[..., :-1] >> (per * bits)) != 0).any():
            return False
    else:
        last_used = n * bits - (w.shape[-1] - 1) * 32
    return last_used >= 32 or not bool((w[..., -1] >> last_used).any())


def _marlin_data_issues(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """DATA-01 for Marlin scales, MRL-07 for act-order perm and g_idx."""
    import torch
    out = []
    s = ckpt.load(m.tensors["s"].name).float()
    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
        out.append(_issue("DATA-01", m, "s", "scales must be finite and > 0"))
    if "perm" in m.tensors:
        perm, g = ckpt.load(m.tensors["perm"].name).long(), ckpt.load(m.tensors["g_idx"].name).long()
        k, groups = perm.shape[-1], m.tensors["s"].shape[-2]
        if not torch.equal(perm.sort(dim=-1).values, torch.arange(k).expand_as(perm)):
            out.append(_issue("MRL-07", m, "perm", f"not a permutation of 0..{k - 1}"))
        if bool((g[..., 1:] < g[..., :-1]).any()) or int(g.min()) < 0 or int(g.max()) >= groups:
            out.append(_issue("MRL-07", m, "g_idx", f"not sorted within [0, {groups})"))
    return out
