"""Validation: every rule of spec §6 checked against a checkpoint, collected into a Report.

Static checks read headers and config only; `deep=True` also reads each quantized
module's tensors (one module at a time) for the DATA rules. The Marlin rules are
validate_marlin's, the GPTQ/AWQ rules validate_gptq's; the loader profiles (--target) are profiles'.
"""
from __future__ import annotations

import os
from itertools import compress, count, repeat
from operator import add, itemgetter, or_
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from .checkpoint import Checkpoint, Module
from .errors import CheckpointNotFoundError, SpecError
from .formats.naive import activation_specs
from .gguf_header import GGUFModel
from .profiles import transformers_issues, vllm_issues
from .report import Issue, Report, module_issue
from .scheme import Strategy, int_range, packed_width
from .source import open_model
from .spec import CROSS_WORD, FLOAT_DTYPES, FUSED_SIBLINGS, PADDED, RULES
from .validate_formats import (checkpoint_data_issues, checkpoint_issues, config_issues, format_data_issues,
                               format_issues)
from .validate_gptq import gptq_data_issues, gptq_issues
from .validate_marlin import marlin_data_issues, marlin_issues

if TYPE_CHECKING:
    import torch

__all__ = ["validate", "validate_checkpoint", "validate_gguf", "check_module", "check_module_data", "shape_issue",
           "raise_for_errors"]

PROFILES = {"vllm": vllm_issues, "transformers": transformers_issues}
# Config problems raised while parsing: with any of them the modules cannot be judged
_CONFIG_RULES = ("CFG-", "FMT-01", "FMT-02", "KV-01", "XFM-01", "MRL-01", "GPTQ-01", "AWQ-01", "GPTQ-11")


def validate_checkpoint(path: str | os.PathLike, *, deep: bool = False, revision: str | None = None,
                        target: str | None = None,
                        progress: Callable[[int, int], None] | None = None) -> Report:
    """Check a checkpoint (local path or Hub repo id) against every rule; never raises for
    what it finds in the files."""
    if target is not None and target not in PROFILES:
        raise ValueError(f"unknown target {target!r}; known: {', '.join(PROFILES)}")
    try:
        ckpt = open_model(str(path), revision, strict=False)
    except SpecError as err:
        return Report(str(path), (Issue.from_error(err),), deep=deep)
    except CheckpointNotFoundError as err:
        return Report(str(path), (Issue("FILE-01", "error", err.file, err.where, err.message),), deep=deep)
    if isinstance(ckpt, GGUFModel):
        return validate_gguf(ckpt, path=str(path))
    return validate(ckpt, deep=deep, target=target, progress=progress, path=str(path))


def validate_gguf(model: GGUFModel, *, path: str | None = None) -> Report:
    """The GGUF rules (spec/gguf.md §8) against a file or split set opened with strict=False:
    headers only, so --deep and --target add nothing here."""
    issues = tuple(Issue.from_error(p) for p in model.problems)
    return Report(path or model.label, issues, len(model.tensors), False,
                  tuple(r for r in RULES if r.startswith("GGUF-")), gguf=True)


def validate(ckpt: Checkpoint, *, deep: bool = False, target: str | None = None,
             progress: Callable[[int, int], None] | None = None, path: str | None = None) -> Report:
    """Every rule against an open checkpoint (opened with strict=False to see its file problems)."""
    path = ckpt.label if path is None else path
    issues = [Issue.from_error(p) for p in ckpt.problems]
    checked = sum(len(c) for c in ckpt.module_classes() if c.first.quantized)
    if any(i.rule.startswith(_CONFIG_RULES) for i in issues):
        return Report(path, tuple(issues), checked, deep)   # no usable config: modules unjudgeable
    issues += _config_warnings(ckpt) + config_issues(ckpt)
    for found in _static_issues(ckpt):
        issues += found
    issues += checkpoint_issues(ckpt)
    issues += _sibling_issues(ckpt)
    if target is not None:
        issues += PROFILES[target](ckpt)
    if deep:
        quantized = [m for m in ckpt.modules().values() if m.quantized]
        bad = {i.where for i in issues if i.severity == "error" and i.where}
        todo = [m for m in quantized if (m.format is not None or m.is_marlin or m.gptq is not None)
                and m.format != "marlin-24"
                and not any(w == m.prefix or w.startswith(m.prefix + ".") for w in bad)]
        for k, m in enumerate(todo):
            issues += check_module_data(ckpt, m)
            if progress:
                progress(k + 1, len(todo))
        issues += checkpoint_data_issues(ckpt)
    return Report(path, tuple(issues), checked, deep)


def raise_for_errors(ckpt: Checkpoint) -> None:
    """Everything that can be refused from headers and config, refused before any output
    exists: the checkpoint's file problems, then every module's static errors."""
    if ckpt.problems:
        raise ckpt.problems[0]
    for issues in _static_issues(ckpt):
        for found in issues:
            if found.severity == "error":
                raise found.as_error()
    for found in checkpoint_issues(ckpt):
        if found.severity == "error":
            raise found.as_error()


def _config_warnings(ckpt: Checkpoint) -> list[Issue]:
    q = ckpt.quant
    if q is None:
        return []
    base = "quantization_config"
    out = [(base, q.unknown)] + [(f"{base}.config_groups.{g.name}", g.unknown) for g in q.groups]
    out += [(f"{base}.config_groups.{g.name}.{key}", args.unknown) for g in q.groups
            for key, args in (("weights", g.weights), ("input_activations", g.input_activations),
                              ("output_activations", g.output_activations)) if args]
    out += [(f"{base}.kv_cache_scheme", q.kv_cache.unknown)] if q.kv_cache else []
    return [Issue("CFG-08", "warning", "config.json", where, f"unknown keys kept as they are: {', '.join(keys)}")
            for where, keys in out if keys]


def check_module(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """Static rules for one module: names, dtypes and shapes only (TEN-01..11, MRL-02..08;
    FMT-10..21 for the formats of spec/formats.md; GPTQ-02..11, AWQ-02..05 for GPTQ/AWQ)."""
    if m.is_gptq:
        return list(gptq_issues(ckpt, m))
    scheme = m.scheme
    if ckpt.marlin is not None and m.is_marlin:
        return list(marlin_issues(ckpt, m))
    if m.quantized and m.ignored:
        return [module_issue("TEN-09", m, m.quant_tensor, "module is matched by ignore but stored quantized")]
    if m.quantized and m.format is None:
        return [module_issue("TEN-10", m, m.quant_tensor, "quantized tensors, but no config group targets this module")]
    if not m.quantized:
        if scheme is not None and not m.ignored and m.is_linear and "weight" in m.tensors:
            return _dense_targeted(ckpt, m)
        return []
    if not m.packed:
        return format_issues(ckpt, m)
    return list(_tensor_issues(ckpt, m))


def _static_issues(ckpt: Checkpoint) -> Iterator[list[Issue]]:
    """check_module of every module that has issues, in module order, judged once per class
    (spec §4.5): a class whose first member is clean, and whose verdict depends on headers and
    config alone, is clean in every member; the other classes are judged member by member."""
    classes = ckpt.module_classes()
    by_member = {k for k, c in enumerate(classes) if _named_verdict(ckpt, c.first) or check_module(ckpt, c.first)}
    if not by_member:
        return
    module = ckpt.module
    for name in compress(ckpt.module_names(), map(by_member.__contains__, ckpt.class_indices())):
        yield check_module(ckpt, module(name))


def _named_verdict(ckpt: Checkpoint, m: Module) -> bool:
    """check_module of a module like `m` may depend on its name (spec §4.5): GPTQ/AWQ and Marlin
    checkpoints (dynamic rules, part names), and a dense module a group targets (the router
    verdict of spec/targets.md §5 reads its name)."""
    if ckpt.gptq is not None or ckpt.marlin is not None:
        return True
    return (not m.quantized and m.scheme is not None and not m.ignored and m.is_linear
            and "weight" in m.tensors)


_DTYPE, _SHAPE = itemgetter(1), itemgetter(2)           # of a TensorInfo


def _dense_targeted(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """TEN-11, or for a router the class `Linear` alone targets, what its producer's model built
    (spec/targets.md §5): nothing when `Linear` never matched it, TEN-13 when only some eras did."""
    router = ckpt.class_router(m)
    if router is None or router.linear == "linear":
        why = "" if router is None else f" ({router.why}: Linear matched it in every era)"
        return [module_issue("TEN-11", m, "weight", f"config group {m.group.name} targets this module{why}, "
                             "but it is stored dense (add it to ignore, or quantize it)")]
    if router.linear == "never":
        return []
    version = ckpt.quant.version
    made = f"; quantization_config.version says compressed-tensors {version} wrote it" if version else ""
    return [module_issue("TEN-13", m, "weight", f"config group {m.group.name} targets this dense MoE router only by "
                         f"the class Linear, which matched it in some eras and not others ({router.why}){made}: "
                         "add it to ignore to state the intent")]


def _tensor_issues(ckpt: Checkpoint, m: Module) -> Iterator[Issue]:
    s, t = m.scheme, m.tensors
    need = {"weight_packed", "weight_scale", "weight_shape"}
    need |= {"weight_zero_point"} if not s.symmetric else set()
    need |= {"weight_g_idx"} if s.has_g_idx else set()
    for name in sorted(need - set(t)):
        yield module_issue("TEN-01", m, None, f"{name} is missing ({_scheme_words(s)} needs it)")
    # activation qparams the group's args imply (spec/formats.md §1.3) may sit beside the weight's
    extra = set(t) - need - {"bias", "input_global_scale"} - set(activation_specs(m.group, (1, 1)))
    for name in sorted(extra):
        why = {"weight_zero_point": "a symmetric scheme stores no zero point (vLLM fails with KeyError)",
               "weight_g_idx": f"actorder is {s.actorder!r}, so no g_idx is stored",
               "weight": "a dense weight beside weight_packed"}.get(name, "not part of a pack-quantized module")
        yield module_issue("TEN-02", m, name, f"unexpected tensor: {why}")
    if need - set(t):
        return
    packed, scale, shape = t["weight_packed"], t["weight_scale"], t["weight_shape"]
    if shape.dtype not in ("I64", "I32") or len(shape.shape) != 1 or shape.shape[0] not in (2, 3):
        yield module_issue("TEN-03", m, "weight_shape", f"expected I64 [2] (or [3]), got {shape.dtype} {list(shape.shape)}")
    if packed.dtype != "I32" or len(packed.shape) not in (2, 3):
        yield module_issue("TEN-04", m, "weight_packed", f"expected I32 [out, words], got {packed.dtype} {list(packed.shape)}")
        return
    lead, out, width = packed.shape[:-2], packed.shape[-2], packed.shape[-1]
    b = s.num_bits
    if s.strategy is Strategy.GROUP:
        groups = scale.shape[-1] if len(scale.shape) >= 2 else 0
        in_features = groups * s.group_size
        if width not in (packed_width(in_features, b, CROSS_WORD), packed_width(in_features, b, PADDED)):
            yield _width_issue(m, width, groups, in_features)
            return
    else:
        in_features = None
    want_scale = (*lead, *s.scale_shape(out, in_features or 1))
    ok_shapes = {tuple(want_scale)} | ({(1,)} if s.strategy is Strategy.TENSOR else set())   # [1] even stacked
    if scale.dtype not in FLOAT_DTYPES or tuple(scale.shape) not in ok_shapes:
        yield module_issue("TEN-05", m, "weight_scale", f"expected a float tensor {list(want_scale)} for strategy "
                     f"{s.strategy.value}, got {scale.dtype} {list(scale.shape)}")
    if "weight_zero_point" in t and not s.symmetric:
        yield from _zero_point_issues(ckpt, m, lead, out, want_scale[-1], in_features)
    if "weight_g_idx" in t and s.has_g_idx:
        g = t["weight_g_idx"]
        ok_len = in_features is None or g.shape[-1] == in_features
        if g.dtype != "I32" or tuple(g.shape[:-1]) != tuple(lead) or not ok_len:
            yield module_issue("TEN-07", m, "weight_g_idx", f"expected I32 [{in_features or 'in_features'}], "
                         f"got {g.dtype} {list(g.shape)}")


def _width_issue(m: Module, width: int, groups: int, in_features: int) -> Issue:
    """TEN-08 when the packed width fits a ragged last group, else TEN-04."""
    s = m.scheme
    b, gs = s.num_bits, s.group_size
    lo, hi = (width - 1) * 32 // b + 1, width * 32 // b          # in_features the width allows
    if max(lo, in_features - gs + 1) <= min(hi, in_features - 1):
        return module_issue("TEN-08", m, "weight_packed", f"{width} words hold {lo}..{hi} columns, {groups} scale "
                      f"groups hold {in_features}: in_features is not a multiple of group_size {gs}")
    return module_issue("TEN-04", m, "weight_packed", f"{width} words per row, expected "
                  f"{-(-in_features * b // 32)} = ceil({in_features}*{b}/32) for {groups} groups of {gs}")


def _zero_point_issues(ckpt: Checkpoint, m: Module, lead, out: int, groups: int, in_features) -> Iterator[Issue]:
    zp, s = m.tensors["weight_zero_point"], m.scheme
    if s.strategy is Strategy.TENSOR:
        want = {("I8", (*lead, 1))}
    else:
        layout = ckpt.word_layout(m, in_features) if in_features else CROSS_WORD
        want = {("I32", (*lead, packed_width(out, s.num_bits, layout), groups)), ("I8", (*lead, out, groups))}
    if (zp.dtype, tuple(zp.shape)) not in want:
        expect = " or ".join(f"{d} {list(sh)}" for d, sh in sorted(want))
        yield module_issue("TEN-06", m, "weight_zero_point", f"expected {expect}, got {zp.dtype} {list(zp.shape)}")


def _scheme_words(s) -> str:
    sym = "symmetric" if s.symmetric else "asymmetric"
    gs = f" group_size {s.group_size}" if s.group_size else ""
    return f"int{s.num_bits} {sym} {s.strategy.value}{gs}" + (" actorder group" if s.has_g_idx else "")


def _sibling_issues(ckpt: Checkpoint) -> list[Issue]:
    """TEN-12: q/k/v, gate/up and w1/w3 of one block must share a scheme (vLLM fuses them).
    The verdict and its words depend on which classes the siblings belong to (spec §4.5): each
    combination of classes is judged once, the siblings of every module found by C-level
    passes over the names."""
    names, classes = ckpt.module_names(), ckpt.module_classes()
    index = dict(zip(names, ckpt.class_indices()))
    found = []                                # (module, its family's place, prefix, message)
    for leaf, families in _FIRST_SIBLING.items():
        # a module named `…<sep>leaf` (or `leaf` alone: its parent is "", as rpartition gives)
        cut = len(leaf) + 1
        prefixes = list(compress(names, map(or_, map(str.endswith, names, repeat("." + leaf)),
                                            map(leaf.__eq__, names))))
        parents = list(map(itemgetter(slice(None, -cut)), prefixes))
        for place, family in enumerate(families):
            keys = list(zip(*[map(index.get, map(add, parents, repeat("." + name))) for name in family]))
            verdicts = {k: _sibling_verdict(family, [None if c is None else classes[c].first for c in k])
                        for k in set(keys)}
            for prefix, key in compress(zip(prefixes, keys), map(verdicts.__getitem__, keys)):
                found.append((prefix, place, verdicts[key]))
    if not found:
        return []
    position = dict(zip(names, count()))
    found.sort(key=lambda f: (position[f[0]], f[1]))
    return [module_issue("TEN-12", ckpt.module(prefix), None, message) for prefix, _, message in found]


def _sibling_verdict(family: tuple[str, ...], found: list[Module | None]) -> str | None:
    """TEN-12's message for the siblings `family` named like these modules (None: absent; each
    a module of the sibling's class, so its own name is not the sibling's), or None when they
    agree."""
    sibs = [(name, x) for name, x in zip(family, found) if x is not None]
    kinds = [x.scheme if x.quantized else None for _, x in sibs]     # None: dense
    if any(k is None and x.quantized for k, (_, x) in zip(kinds, sibs)):
        return None                           # already TEN-10
    if any(k is not kinds[0] and k != kinds[0] for k in kinds):      # (no scheme is hashed)
        desc = ", ".join(f"{name}={_precision(x)}" for name, x in sibs)
        return f"fused siblings differ ({desc}); vLLM requires one scheme"
    return None


_LAST = itemgetter(2)                                    # of str.rpartition
_FIRST_SIBLING = {f[0]: tuple(g for g in FUSED_SIBLINGS if g[0] == f[0]) for f in FUSED_SIBLINGS}


def _precision(m: Module) -> str:
    return f"{m.scheme.type}{m.scheme.num_bits}" if m.quantized and m.scheme else "dense"


def shape_issue(ckpt: Checkpoint, m: Module, shape: tuple[int, ...]) -> Issue | None:
    """DATA-05 / TEN-08 for the weight_shape values of a module, judged against its headers."""
    s, packed, scale = m.scheme, m.tensors["weight_packed"], m.tensors["weight_scale"]
    in_features = shape[-1] if shape else 0
    groups_ok = s.strategy is not Strategy.GROUP or -(-in_features // s.group_size) == scale.shape[-1]
    if (not shape or shape[:-1] != tuple(packed.shape[:-1]) or not groups_ok
            or packed_width(in_features, s.num_bits, ckpt.word_layout(m, in_features)) != packed.shape[-1]):
        return module_issue("DATA-05", m, "weight_shape", f"says {list(shape)}, but weight_packed is "
                      f"{list(packed.shape)} and weight_scale {list(scale.shape)}")
    if s.strategy is Strategy.GROUP and in_features % s.group_size:
        return module_issue("TEN-08", m, "weight_shape", f"in_features {in_features} is not a multiple of "
                      f"group_size {s.group_size}")
    return None


def check_module_data(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """DATA rules: read one module's tensors and check their values."""
    if m.is_marlin:
        return marlin_data_issues(ckpt, m)
    if m.is_gptq:
        return gptq_data_issues(ckpt, m)
    if not m.packed:
        return format_data_issues(ckpt, m)
    import torch
    s = m.scheme
    t = ckpt.load_module(m)
    shape = tuple(int(v) for v in t["weight_shape"].tolist())
    in_features = shape[-1] if shape else 0
    bad_shape = shape_issue(ckpt, m, shape)
    if bad_shape is not None and bad_shape.rule == "DATA-05":
        return [bad_shape]
    out: list[Issue] = [] if bad_shape is None else [bad_shape]
    layout = ckpt.word_layout(m, in_features)
    scale = t["weight_scale"].float()
    bad = ~(torch.isfinite(scale) & (scale > 0))
    if bad.any():
        out.append(module_issue("DATA-01", m, "weight_scale", f"{int(bad.sum())} of {scale.numel()} scales are not "
                          f"finite and > 0 (first: {scale[bad][0].item()})"))
    lo, hi = int_range(s.num_bits)
    zp = t.get("weight_zero_point")
    if zp is not None and zp.dtype == torch.int8 and zp.numel() and (zp.min() < lo or zp.max() > hi):
        out.append(module_issue("DATA-02", m, "weight_zero_point", f"values span [{int(zp.min())}, {int(zp.max())}], "
                          f"outside int{s.num_bits} [{lo}, {hi}]"))
    if zp is not None and zp.dtype == torch.int32 and not _padding_zero(zp.transpose(-1, -2), shape[-2],
                                                                        s.num_bits, layout):
        out.append(module_issue("DATA-04", m, "weight_zero_point", "padding bits after the last zero point are not zero"))
    g = t.get("weight_g_idx")
    groups = t["weight_scale"].shape[-1]
    if g is not None and g.numel() and (g.min() < 0 or g.max() >= groups):
        out.append(module_issue("DATA-03", m, "weight_g_idx", f"values span [{int(g.min())}, {int(g.max())}], "
                          f"outside [0, {groups})"))
    if not _padding_zero(t["weight_packed"], in_features, s.num_bits, layout):
        out.append(module_issue("DATA-04", m, "weight_packed", "padding bits after the last value of a row are not zero"))
    return out


def _padding_zero(words: torch.Tensor, n: int, bits: int, layout: str) -> bool:
    """True when every bit that holds no value (after value n-1, or atop padded words) is zero."""
    import torch
    w = words.to(torch.int64) & 0xFFFFFFFF
    if layout == PADDED:
        per = 32 // bits
        last_used = (n - (w.shape[-1] - 1) * per) * bits
        if ((w[..., :-1] >> (per * bits)) != 0).any():
            return False
    else:
        last_used = n * bits - (w.shape[-1] - 1) * 32
    return last_used >= 32 or not bool((w[..., -1] >> last_used).any())
