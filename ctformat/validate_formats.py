"""The rules of spec/formats.md §9 against a checkpoint: each module stored in a format other
than pack-quantized against its format's tables (FMT-10..21; deep FMT-30..34), the config
warnings (FMT-03/04), marlin-24 (FMT-22), the kv-cache scales (KV-02..04) and the online
rotations (XFM-02..04). Header and config only, except the deep checks."""
from __future__ import annotations

from collections import defaultdict
from itertools import compress, repeat
from operator import itemgetter
from typing import Iterator

from .checkpoint import Checkpoint, Module
from .errors import TensorError
from .formats import format_named
from .formats.rules import check_module, check_values
from .report import Issue, issue, module_issue
from .scheme import Strategy, Transform, inferred_format
from .spec import DENSE_FORMAT, FLOAT_DTYPES, KV_PARAMS, MIXED_PRECISION, TRANSFORM_TYPES

__all__ = ["format_issues", "format_data_issues", "config_issues", "checkpoint_issues", "checkpoint_data_issues",
           "dense_dims", "attention_prefixes", "rotation_tensors", "rotation_for"]


def _issue(m: Module, err: TensorError) -> Issue:
    suffix = err.where[len(m.prefix) + 1:] if err.where and err.where.startswith(m.prefix + ".") else None
    return module_issue(err.rule, m, suffix, err.message)


def format_issues(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """FMT-10..21 for one module stored in a format of spec/formats.md (header only)."""
    shapes = {k: (t.dtype, t.shape) for k, t in m.tensors.items()}
    return [_issue(m, e) for e in check_module(format_named(m.format), m.group, shapes, where=m.prefix, name=m.format)]


def format_data_issues(ckpt: Checkpoint, m: Module) -> list[Issue]:
    """FMT-30..34: one module's tensor values (validate --deep)."""
    tensors = ckpt.load_module(m)
    return [_issue(m, e) for e in check_values(format_named(m.format), m.group, tensors, where=m.prefix)]


def dense_dims(m: Module) -> tuple[int, ...] | None:
    """The dense weight shape a module's headers imply ([..., out, in]); `in` of a pack-quantized
    module that is not group-wise is the packed upper bound (only weight_shape holds it)."""
    t = m.tensors
    if m.format is None or m.packed:
        w = t.get("weight") if m.format is None else None
        if w is not None:
            return tuple(w.shape)
        packed, scale = t.get("weight_packed"), t.get("weight_scale")
        if packed is None or len(packed.shape) < 2 or m.scheme is None:
            return None
        s = m.scheme
        if s.strategy is Strategy.GROUP and scale is not None and len(scale.shape) >= 2:
            return (*packed.shape[:-1], scale.shape[-1] * s.group_size)
        return (*packed.shape[:-1], packed.shape[-1] * 32 // s.num_bits)
    try:
        return tuple(format_named(m.format).dense_shape({k: v.shape for k, v in t.items()}))
    except (KeyError, ValueError):
        return None


# -- config -------------------------------------------------------------------------------
def config_issues(ckpt: Checkpoint) -> list[Issue]:
    """FMT-03 (the top-level format summarizes the groups') and FMT-04 (each group's format is
    the one compressed-tensors infers for its args; `dense` and `marlin-24` are explicit choices)."""
    q = ckpt.quant
    if q is None or ckpt.marlin is not None:
        return []
    out = []
    with_weights = [g for g in q.groups if g.weights is not None]
    formats = {q.group_format(g) for g in with_weights}
    if q.format == MIXED_PRECISION and len(formats) < 2:
        out.append(issue("FMT-03", "config.json", "quantization_config.format", f"mixed-precision, but the groups "
                         f"name {len(formats)} format(s) ({', '.join(sorted(formats)) or 'none'})"))
    elif q.format != MIXED_PRECISION and q.format is not None and formats - {q.format}:
        out.append(issue("FMT-03", "config.json", "quantization_config.format", f"{q.format}, but the groups name "
                         f"{', '.join(sorted(formats))}: a checkpoint of several formats says mixed-precision"))
    for g in with_weights:
        fmt, want = q.group_format(g), inferred_format(g)
        if fmt not in (DENSE_FORMAT, "marlin-24") and want is not None and fmt != want:
            out.append(issue("FMT-04", "config.json", f"quantization_config.config_groups.{g.name}.format",
                             f"{fmt}, but compressed-tensors writes {want} for {g.weights.words()} weights"
                             f"{' with input activations' if g.input_activations else ''}: read as {fmt}"))
    return out


# -- checkpoint-wide: marlin-24, kv cache, transforms ----------------------------------------
def checkpoint_issues(ckpt: Checkpoint) -> list[Issue]:
    """Static rules that look at several modules at once: FMT-22, KV-02/03, XFM-02/03."""
    if ckpt.quant is None or ckpt.marlin is not None:
        return []
    out = []
    marlin24 = [c for c in ckpt.module_classes() if c.first.format == "marlin-24" and c.first.quantized]
    if marlin24:       # (classes come in the order of their first members: marlin24[0] holds the first)
        out.append(module_issue("FMT-22", marlin24[0].first, None, f"{sum(map(len, marlin24))} marlin-24 module(s): no "
                                "decompressor exists (compressed-tensors <= 0.14: \"Decompression is not "
                                "implemented for the Marlin24 Compressor\"; vLLM removed marlin-24 in 2026)"))
    return out + list(_kv_issues(ckpt)) + list(_transform_issues(ckpt))


def attention_prefixes(ckpt: Checkpoint) -> list[str]:
    """Modules that hold attention projections (`P.k_proj` and `P.v_proj`, or `P.qkv_proj`):
    where kv-cache scales live, model-free."""
    names = ckpt.module_names()

    def parents(leaf: str) -> set[str]:       # P of every module named P.leaf
        return set(map(itemgetter(slice(None, -len(leaf) - 1)), compress(names, map(str.endswith, names,
                                                                                      repeat("." + leaf)))))
    return sorted(parents("k_proj") & parents("v_proj") | parents("qkv_proj"))


def _kv_heads(ckpt: Checkpoint) -> int | None:
    cfg = ckpt.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    value = text.get("num_key_value_heads", text.get("num_attention_heads"))
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _kv_issues(ckpt: Checkpoint) -> Iterator[Issue]:
    kv, module = ckpt.quant.kv_cache, ckpt.module
    kv_classes = {k for k, c in enumerate(ckpt.module_classes()) if c.first.kv_cache}
    holders = [module(p) for p in compress(ckpt.module_names(), map(kv_classes.__contains__, ckpt.class_indices()))]
    if kv is None:
        for m in holders:
            yield module_issue("KV-02", m, next(k for k in KV_PARAMS if k in m.tensors),
                               "kv-cache scales, but quantization_config has no kv_cache_scheme")
        return
    need = ("k_scale", "v_scale") + (() if kv.symmetric else ("k_zero_point", "v_zero_point"))
    heads = _kv_heads(ckpt)
    shape = (1,) if kv.strategy is Strategy.TENSOR else (heads, 1, 1)
    attention = attention_prefixes(ckpt)
    for prefix in attention:
        m = module(prefix)
        missing = [k for k in need if m is None or k not in m.tensors]
        if missing:
            holder = m or module(f"{prefix}.k_proj") or module(f"{prefix}.qkv_proj")
            yield issue("KV-02", next(iter(holder.tensors.values())).file, prefix,
                        f"kv_cache_scheme is set, but this attention module lacks {', '.join(missing)}")
    for m in holders:
        if m.prefix not in attention:
            yield module_issue("KV-02", m, None, "kv-cache scales on a module that holds no k_proj/v_proj")
        for k in sorted(set(m.tensors) & set(KV_PARAMS)):
            t = m.tensors[k]
            zp = k.endswith("zero_point")
            if zp and kv.symmetric:
                yield module_issue("KV-03", m, k, "a symmetric kv_cache_scheme stores no zero point")
                continue
            dtypes = (kv.zero_point_dtype,) if zp else tuple(FLOAT_DTYPES)
            if t.dtype not in dtypes or (None not in shape and tuple(t.shape) != shape):
                yield module_issue("KV-03", m, k, f"expected {' or '.join(sorted(dtypes))} {list(shape)} for "
                                   f"{kv.words()}, got {t.dtype} {list(t.shape)}")


def rotation_tensors(ckpt: Checkpoint) -> dict[tuple[str, str], dict[int, Module]]:
    """(scheme, location) -> {size: the module holding that rotation}: tied rotations are stored
    once per size, under the first module they apply to."""
    out: dict[tuple[str, str], dict[int, Module]] = defaultdict(dict)
    for m in ckpt.modules().values():
        w = m.tensors.get("weight")
        if m.rotation is not None and w is not None and len(w.shape) == 2:
            out[(m.rotation.scheme, m.rotation.location)].setdefault(w.shape[0], m)
    return out


def rotation_for(ckpt: Checkpoint, m: Module, t: Transform) -> tuple[int | None, Module | None]:
    """(the size transform `t` has on module `m`, the module holding that rotation, or None)."""
    dims = dense_dims(m)
    if dims is None:
        return None, None
    size = t.head_dim or (dims[-1] if t.location == "input" else dims[-2])
    return size, rotation_tensors(ckpt).get((t.scheme, t.location), {}).get(size)


def _transform_issues(ckpt: Checkpoint) -> Iterator[Issue]:
    q = ckpt.quant
    if not q.transforms:
        return
    mods = ckpt.modules()
    needed: dict[tuple[str, str], set[int]] = defaultdict(set)
    missing_seen = set()
    for m in mods.values():
        for t in ckpt.transforms_of(m):
            if t.location not in ("input", "output"):
                continue                          # attention locations: XFM-03 checks their size below
            size, holder = rotation_for(ckpt, m, t)
            if size is None:
                continue
            needed[(t.scheme, t.location)].add(size)
            if holder is None and (t.tensor_name, size) not in missing_seen:
                missing_seen.add((t.tensor_name, size))
                yield module_issue("XFM-02", m, None, f"transform {t.scheme} applies online at its {t.location} "
                                   f"(size {size}), but no {t.tensor_name}.weight of that size is stored")
    for m in mods.values():
        r = m.rotation
        if r is None:
            continue
        if not r.online:
            yield module_issue("XFM-02", m, None, f"location {r.location} is fused into the stored weights "
                               "offline: no rotation tensor is stored for it")
            continue
        w = m.tensors.get("weight")
        size = w.shape[0] if w is not None and len(w.shape) == 2 else None
        wrong = (w is None or len(w.shape) != 2 or w.shape[0] != w.shape[1] or w.dtype != r.precision
                 or (r.head_dim is not None and size != r.head_dim)
                 or (r.location in ("input", "output") and size not in needed[(r.scheme, r.location)]))
        extra = sorted(set(m.tensors) - {"weight", "perm"})
        if wrong or extra:
            want = f"{r.head_dim}" if r.head_dim else " or ".join(map(str, sorted(needed[(r.scheme, r.location)])))
            got = "no weight" if w is None else f"{w.dtype} {list(w.shape)}"
            yield module_issue("XFM-03", m, "weight", f"expected a square {r.precision} rotation of size "
                               f"{want or 'its targets need'}{', nothing beside weight and perm' if extra else ''}, "
                               f"got {got}{' and ' + ', '.join(extra) if extra else ''}")


def checkpoint_data_issues(ckpt: Checkpoint) -> list[Issue]:
    """KV-04 and XFM-04: the values of kv-cache scales and rotations (validate --deep)."""
    import torch
    if ckpt.quant is None or ckpt.marlin is not None:
        return []
    out = []
    for m in ckpt.modules().values():
        for k in ("k_scale", "v_scale"):
            if k in m.tensors:
                v = ckpt.load(m.tensors[k].name).float()
                bad = int((~torch.isfinite(v) | (v <= 0)).sum())
                if bad:
                    out.append(module_issue("KV-04", m, k, f"{bad} of {v.numel()} scales are not finite and > 0"))
        if m.rotation is not None and m.rotation.online and "weight" in m.tensors:
            why = _rotation_problem(ckpt, m)
            if why:
                out.append(module_issue("XFM-04", m, "weight", why))
    return out


def _rotation_problem(ckpt: Checkpoint, m: Module) -> str | None:
    import torch
    r = ckpt.load(m.tensors["weight"].name)
    if r.ndim != 2 or r.shape[0] != r.shape[1]:
        return None                               # XFM-03's
    n, x = r.shape[0], r.to(torch.float64)
    if not torch.isfinite(x).all():
        return "the rotation holds NaN or infinite values"
    if m.rotation.type == TRANSFORM_TYPES[2]:     # random-matrix: any invertible matrix
        return None if int(torch.linalg.matrix_rank(x)) == n else "a random-matrix rotation that is not invertible"
    tol = 1e-6 if r.dtype in (torch.float64, torch.float32) else 1e-2
    if not bool((x.abs() == 1).all()):
        return f"a {m.rotation.type} rotation has entries other than +-1"
    err = float((x @ x.T / n - torch.eye(n, dtype=torch.float64)).abs().max())
    return None if err <= tol else f"R R^T / n is not the identity (max deviation {err:.3g} > {tol:g})"

