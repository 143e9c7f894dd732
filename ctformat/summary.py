"""What a checkpoint holds, from its headers and config alone: the data behind `inspect`."""
from __future__ import annotations

import re
from collections import defaultdict
from itertools import compress, groupby
from math import prod
from operator import itemgetter
from typing import Any, Iterable

from .checkpoint import Checkpoint, Module, ModuleClass
from .gguf_header import GGUFModel
from .gptq_config import AWQ_METHOD
from .gptq_layout import in_features
from .marlin_config import marlin_dims
from .scheme import QuantScheme, Strategy
from .spec import ACTIVATION_PARAMS, KV_PARAMS, MARLIN_LAYOUT
from .validate_formats import attention_prefixes, dense_dims

__all__ = ["summarize", "fold_names", "tensor_rows", "gguf_summary"]

_ROLES = {"weight_packed": "weights", "weight": "weights", "weight_scale": "scales",
          "weight_zero_point": "zero_points", "weight_g_idx": "g_idx", "weight_shape": "other",
          "B": "weights", "s": "scales", "zp": "zero_points", "g_idx": "g_idx", "perm": "g_idx",
          # the formats of spec/formats.md, kv-cache scales, rotations
          "weight_global_scale": "global_scales", "compressed": "weights", "bitmask": "bitmasks",
          "row_offsets": "bitmasks", "shape": "other", "scale_packed": "scales", "meta": "bitmasks",
          **{k: "activation_scales" for k in ACTIVATION_PARAMS}, **{k: "kv_cache" for k in KV_PARAMS}}
# tensors of a quantized module that are not the weight's storage (spec/formats.md §7)
_NOT_WEIGHT_BYTES = {"weight_shape", "shape", "bias", *ACTIVATION_PARAMS}
_GPTQ_ROLES = {**_ROLES, "qweight": "weights", "qzeros": "zero_points", "scales": "scales"}


# ASCII digits only: str.isdigit() and \d also take '²' (int() refuses it) and '٣' (int() reads 3)
_NUMBER = re.compile(r"([0-9]+)")


def fold_names(names: Iterable[str]) -> list[str]:
    """Fold numeric path parts: layers.0.x, layers.1.x -> layers.{0..1}.x (sorted, stable).

    A number part is a whole dot-separated part of ASCII digits. Names are grouped by their
    template (every ASCII digit read as '0'), found in C for every name; each template is split
    once, and its number parts are sliced out of all its names at the same places (a 1 T
    checkpoint's ~70k expert names have a few hundred templates)."""
    names = list(names)
    templates = _templates(names)
    order = sorted(range(len(names)), key=templates.__getitem__)        # stable: first-seen order inside
    groups: dict[tuple[str, ...], tuple[int, list[set[str]]]] = {}      # text pieces -> (first index, numbers)
    for template, members in groupby(order, key=templates.__getitem__):
        members = list(members)
        numbers, texts, fixed = _template_slices(template)
        group_names = list(map(names.__getitem__, members))
        if not fixed:                                 # the text between number parts has no digit
            parts = [(tuple(template[sl] for sl in texts), members[0], group_names)]
        else:                                         # digits inside a part are text: split by them
            by_text: dict[tuple[str, ...], tuple[int, list[str]]] = {}
            for i, name in zip(members, group_names):
                by_text.setdefault(tuple(name[sl] for sl in texts), (i, []))[1].append(name)
            parts = [(key, i, sub) for key, (i, sub) in by_text.items()]
        for key, first, sub in parts:
            found = groups.get(key)
            if found is None:
                found = groups[key] = (first, [set() for _ in numbers])
            elif first < found[0]:
                groups[key] = found = (first, found[1])
            for column, sl in zip(found[1], numbers):
                column.update(map(itemgetter(sl), sub))
    out = []
    for key, (first, columns) in sorted(groups.items(), key=lambda kv: kv[1][0]):     # first-seen order
        spans = [_span(sorted(set(map(int, column)))) for column in columns]
        out.append("".join(part for pair in zip(key, spans) for part in pair) + key[-1])
    return sorted(out, key=_natural)


_AS_ZERO = bytes.maketrans(b"123456789", b"000000000")    # ASCII digits only (see _NUMBER)


def _templates(names: list[str]) -> list[str]:
    """Each name with every ASCII digit read as '0', in one C pass over all names joined (UTF-8
    never holds an ASCII byte inside a multi-byte character, so the characters stay in place)."""
    found = "\n".join(names).encode("utf-8", "surrogatepass").translate(_AS_ZERO).decode("utf-8", "surrogatepass")
    found = found.split("\n")
    if len(found) == len(names):
        return found
    return [n.encode("utf-8", "surrogatepass").translate(_AS_ZERO).decode("utf-8", "surrogatepass") for n in names]
_ZERO_RUN = re.compile("0+")


def _template_slices(template: str) -> tuple[list[slice], list[slice], bool]:
    """A template's number parts (runs of '0' that are whole dot-separated parts), the text
    pieces around them, and whether that text holds digits."""
    numbers, texts, fixed, at = [], [], False, 0
    for run in _ZERO_RUN.finditer(template):
        a, b = run.span()
        if (a == 0 or template[a - 1] == ".") and (b == len(template) or template[b] == "."):
            numbers.append(slice(a, b))
            texts.append(slice(at, a))
            at = b
        else:
            fixed = True
    texts.append(slice(at, None))
    return numbers, texts, fixed


def _span(values: list[int]) -> str:
    if len(values) == 1:
        return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
        return f"{{{values[0]}..{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"


def _natural(s: str) -> list:
    return [int(t) if k % 2 else t for k, t in enumerate(_NUMBER.split(s))]


def _params(m: Module) -> int:
    """Weights a quantized module stands for (Marlin: K x N from B and s; spec §10.1)."""
    if m.is_marlin:
        b, s = m.tensors.get("B"), m.tensors.get("s")
        if b is None or s is None:
            return 0                              # an incomplete tensor set (MRL-02): validate says so
        k, n, _, _ = marlin_dims(b.shape, s.shape)
        return prod(b.shape[:-2]) * k * n
    if m.is_gptq:
        s = m.tensors.get("scales")
        k = None if m.gptq is None or s is None else in_features(m.tensors, m.gptq, m.family)
        return 0 if k is None or len(s.shape) < 2 else prod(s.shape[:-2]) * s.shape[-1] * k   # else GPTQ-02/03
    if m.format is not None and not m.packed:
        dims = dense_dims(m)
        return prod(dims) if dims else 0          # an incomplete set (FMT-10): validate says so
    if "weight_packed" not in m.tensors:
        return 0                                  # an incomplete tensor set (TEN-01): validate says so
    return prod(m.tensors["weight_packed"].shape[:-1]) * _in_features(m)


def _in_features(m: Module) -> int:
    """Exact for group strategy; the packed upper bound otherwise (no data is read)."""
    s, packed = m.scheme, m.tensors["weight_packed"]
    if len(packed.shape) < 2:
        return 0                                  # malformed (TEN-04): validate says so
    scale = m.tensors.get("weight_scale")
    if s is not None and s.strategy is Strategy.GROUP and scale is not None and len(scale.shape) >= 2:
        return scale.shape[-1] * s.group_size
    bits = s.num_bits if s is not None else 4     # no group targets it (TEN-10): an int4 guess for the count
    return packed.shape[-1] * 32 // bits


_DTYPE, _SHAPE, _FILE, _NBYTES = itemgetter(1), itemgetter(2), itemgetter(3), itemgetter(5)   # of a TensorInfo


def _layout(m: Module) -> tuple:
    t, is_q = m.tensors, m.quantized
    roles = [(_role(m, k), x.nbytes) for k, x in t.items()]
    dtypes = [(x.dtype, x.nbytes) for x in t.values()]
    # every tensor that is not a quantization tensor, a scale or a rotation (a quantized module's
    # `weight` holds its quantized values, counted as its weights)
    kept = _GPTQ_ROLES if m.is_gptq else _ROLES
    others = 0 if m.rotation is not None else sum(x.numel for k, x in t.items()
                                                  if k not in kept or (k == "weight" and not is_q))
    params = _params(m) if is_q else 0
    weight_bytes = sum(x.nbytes for k, x in t.items() if k not in _NOT_WEIGHT_BYTES) if is_q else 0
    return roles, dtypes, is_q, params, weight_bytes, others


def _role(m: Module, suffix: str) -> str:
    roles = _GPTQ_ROLES if m.is_gptq else _ROLES
    return "transforms" if m.rotation is not None else roles.get(suffix, "other")


def _args(a: QuantScheme | None) -> dict[str, Any] | None:
    """One set of args as inspect shows them: the scheme's JSON plus its words."""
    return None if a is None else {**a.to_json(), "words": a.words()}


def summarize(ckpt: Checkpoint | GGUFModel) -> dict[str, Any]:
    """The `inspect --json` document (schema ctformat.inspect/1; ctformat.inspect-gguf/1 for a
    GGUF file), from headers and config."""
    if isinstance(ckpt, GGUFModel):
        return gguf_summary(ckpt)
    cfg, q = ckpt.config or {}, ckpt.quant
    classes = ckpt.module_classes()       # counted once per class, times its members (spec §4.5)
    by_role, by_dtype = defaultdict(int), defaultdict(int)
    q_params = q_bytes = other_params = 0
    per_group: dict[int, list[int]] = defaultdict(lambda: [0, 0])      # id(group) -> [params, weight bytes]
    for c in classes:
        m, n = c.first, len(c)
        roles, dtypes, is_q, params, weight_bytes, others = _layout(m)
        for role, nbytes in roles:
            by_role[role] += n * nbytes
        for dtype, nbytes in dtypes:
            by_dtype[dtype] += n * nbytes
        other_params += n * others
        if is_q:
            q_params += n * params
            q_bytes += n * weight_bytes
            tally = per_group[id(m.group)]
            tally[0] += n * params
            tally[1] += n * weight_bytes
    quantized = [c for c in classes if c.first.quantized]
    groups = [] if ckpt.gptq is None else _gptq_groups(ckpt, [m for m in ckpt.modules().values() if m.quantized])
    for g in (q.groups if q else ()):
        members = _members(ckpt, [c for c in quantized if c.first.group is g])
        w = g.weights
        gp, gb = per_group.get(id(g), (0, 0))
        groups.append({"name": g.name, "targets": list(g.targets), "format": q.group_format(g),
                       "num_bits": w.num_bits if w else None, "strategy": w.strategy.value if w else None,
                       "group_size": w.group_size if w else None, "symmetric": w.symmetric if w else None,
                       "actorder": w.actorder if w else None, "modules": len(members),
                       "modules_folded": fold_names(members),
                       "type": w.type if w else None, "block_structure": list(w.block_structure) if w and
                       w.block_structure else None, "dynamic": w.dynamic if w else None,
                       "weights": _args(w), "input_activations": _args(g.input_activations),
                       "output_activations": _args(g.output_activations),
                       "bits_per_weight": round(8 * gb / gp, 3) if gp else None})
    ignored = _members(ckpt, [c for c in classes if c.first.ignored])
    # a router the class Linear never matched is no Linear of the producer's model (spec/targets.md §5)
    dense_linear = [p for p in _members(ckpt, [c for c in classes if not c.first.quantized and c.first.is_linear])
                    if getattr(ckpt.class_router(ckpt.module(p)), "linear", None) != "never"]
    total = sum(map(_NBYTES, ckpt.tensors.values()))
    shard_sizes = defaultdict(int)
    for file, infos in groupby(ckpt.tensors.values(), key=_FILE):     # a shard's tensors sit together
        shard_sizes[file] += sum(map(_NBYTES, infos))
    data = {
        "schema": "ctformat.inspect/1",
        "path": ckpt.label,
        "architecture": (cfg.get("architectures") or [None])[0],
        "model_type": cfg.get("model_type"),
        "quant_method": (cfg.get("quantization_config") or {}).get("quant_method") if ckpt.marlin else
                        "compressed-tensors" if q else ckpt.gptq.method if ckpt.gptq else None,
        "format": "marlin" if ckpt.marlin else q.format if q else ckpt.gptq.format if ckpt.gptq else None,
        "marlin": None if ckpt.marlin is None else {
            "layout": MARLIN_LAYOUT, "legacy_readers": ckpt.marlin.legacy, "stacked_expert_layers": len(ckpt.marlin.stacked),
            "source_format": q.format},
        "producer_version": q.version if q else _gptq_producer(ckpt),
        "quantization_status": q.quantization_status if q else None,
        "config_groups": groups,
        "ignore": list(q.ignore) if q else [],
        "ignored_modules": fold_names(ignored),
        "dense_linear_modules": fold_names(dense_linear),
        "parameters": {"total": q_params + other_params, "quantized": q_params, "dense": other_params},
        "bytes": {"total": total, "by_role": dict(sorted(by_role.items())), "by_dtype": dict(sorted(by_dtype.items()))},
        "bits_per_quantized_weight": round(8 * q_bytes / q_params, 3) if q_params else None,
        "dense_equivalent_bytes": 2 * (q_params + other_params),
        "load_bytes": total,
        "shards": [{"file": f, "bytes": shard_sizes.get(f, 0)} for f in ckpt.shards],
        "tensors": len(ckpt.tensors),
        "modules_quantized": sum(map(len, quantized)),
    }
    if q is not None and ckpt.marlin is None:
        data.update(_beyond_pack(ckpt, quantized))
    if ckpt.gptq is not None:                 # present for GPTQ/AWQ checkpoints only (spec/gptq-awq.md §7.1)
        data["gptq"] = _gptq_block(ckpt)
    return data


def _members(ckpt: Checkpoint, classes: list[ModuleClass]) -> list[str]:
    """The prefixes of these classes' members, in module order."""
    if len(classes) <= 1:
        return list(classes[0].members) if classes else []
    wanted = {id(c) for c in classes}
    every = ckpt.module_classes()
    return list(compress(ckpt.module_names(), map(wanted.__contains__, map(id, map(every.__getitem__,
                                                                                  ckpt.class_indices())))))


def _beyond_pack(ckpt: Checkpoint, quantized: list[ModuleClass]) -> dict[str, Any]:
    """The keys of spec/formats.md's features: module formats, kv-cache, transforms, sparsity."""
    q = ckpt.quant
    formats = defaultdict(int)
    for c in quantized:
        formats[c.first.format or "unknown"] += len(c)
    mods = ckpt.modules() if q.transforms else {}         # (transforms: every Module is built anyway)
    rotations = [m for m in mods.values() if m.rotation is not None]
    transforms = []
    for t in q.transforms:
        targeted = [m.prefix for m in mods.values() if t in ckpt.transforms_of(m)
                    or (not t.online and t in q.transforms_of(m.prefix, linear=m.is_linear))]
        transforms.append({"scheme": t.scheme, "type": t.type, "location": t.location, "inverse": t.inverse,
                           "online": t.online, "head_dim": t.head_dim, "precision": t.precision,
                           "modules": len(targeted),
                           "rotation_tensors": [f"{m.prefix}.weight" for m in rotations if m.rotation == t]})
    s = q.sparsity
    return {
        "module_formats": dict(sorted(formats.items())),
        "kv_cache_scheme": _args(q.kv_cache),
        "kv_cache_modules": fold_names(_members(ckpt, [c for c in ckpt.module_classes() if c.first.kv_cache])),
        "attention_modules": len(attention_prefixes(ckpt)),
        "transforms": transforms,
        "sparsity": None if s is None else {"format": s.format, "targets": list(s.targets), "ignore": list(s.ignore),
                                            "modules": sum(len(c) for c in quantized if c.first.format == s.format)},
    }


def _gptq_groups(ckpt: Checkpoint, quantized: list[Module]) -> list[dict[str, Any]]:
    """A GPTQ/AWQ file's schemes as config groups: the default one, then each per-module override."""
    cfg = ckpt.gptq
    by_scheme: dict[Any, list[str]] = {cfg.default: []}
    for m in quantized:
        if m.gptq is not None:
            by_scheme.setdefault(m.gptq, []).append(m.prefix)
    out = []
    for i, (ms, members) in enumerate(by_scheme.items()):
        if i and not members:
            continue
        out.append({"name": "default" if ms == cfg.default else f"dynamic_{i}", "targets": ["Linear"] if i == 0 else
                    members, "format": cfg.format, "num_bits": ms.bits,
                    "strategy": "channel" if ms.group_size == -1 else "group",
                    "group_size": None if ms.group_size == -1 else ms.group_size, "symmetric": ms.sym,
                    "actorder": "group" if ms.desc_act else None, "modules": len(members),
                    "modules_folded": fold_names(members)})
    return out


def _gptq_block(ckpt: Checkpoint) -> dict[str, Any]:
    cfg = ckpt.gptq
    return {"method": cfg.method, "format": cfg.format, "provenance": cfg.provenance is not None,
            "lm_head": cfg.lm_head, "dynamic_rules": len(cfg.dynamic),
            "modules_to_not_convert": list(cfg.not_convert) if cfg.method == AWQ_METHOD else None,
            "renamed_parts": dict(cfg.provenance.names) if cfg.provenance is not None else {}}


def _gptq_producer(ckpt: Checkpoint) -> str | None:
    """ctformat (from which compressed-tensors), or GPTQModel's meta.quantizer, when the file says."""
    cfg = ckpt.gptq
    if cfg is None:
        return None
    if cfg.provenance is not None:
        return f"ctformat, from compressed-tensors {cfg.provenance.source.version or '(no version key)'}"
    meta = cfg.raw.get("meta")
    quantizer = meta.get("quantizer") if isinstance(meta, dict) else None
    if isinstance(quantizer, list):
        return ", ".join(map(str, quantizer))
    return quantizer if isinstance(quantizer, str) else None


_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")
_SCALAR_ARRAYS = 16          # arrays up to this length are shown whole; longer ones by length


def gguf_summary(model: GGUFModel) -> dict[str, Any]:
    """The `inspect --json` document of a GGUF file or split set (schema ctformat.inspect-gguf/1)."""
    f = model.fields
    tensors = model.tensors.values()
    by_type: dict[str, dict[str, int]] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for t in tensors:
        row = by_type[t.ggml_type]
        row["tensors"] += 1
        row["parameters"] += t.numel
        row["bytes"] += t.nbytes
    params = sum(t.numel for t in tensors)
    total = sum(t.nbytes for t in tensors)
    q = [t for t in tensors if t.ggml_type not in _FLOAT_TYPES and not t.ggml_type.startswith("I")]
    q_params, q_bytes = sum(t.numel for t in q), sum(t.nbytes for t in q)
    meta = {k: (v if not isinstance(v, list) or len(v) <= _SCALAR_ARRAYS else f"[{len(v)} items]")
            for k, v in sorted(f.items()) if not k.startswith("tokenizer.ggml.")}
    arch = f.get("general.architecture")
    return {
        "schema": "ctformat.inspect-gguf/1",
        "path": model.label,
        "format": "gguf",
        "version": model.headers[0].version if model.headers else None,
        "architecture": arch,
        "name": f.get("general.name"),
        "file_type": f.get("general.file_type"),
        "block_count": f.get(f"{arch}.block_count"),
        "context_length": f.get(f"{arch}.context_length"),
        "tokenizer": None if "tokenizer.ggml.model" not in f else {
            "model": f["tokenizer.ggml.model"], "pre": f.get("tokenizer.ggml.pre"),
            "tokens": len(f.get("tokenizer.ggml.tokens") or ())},
        "parameters": {"total": params, "quantized": q_params, "float": params - q_params},
        "bytes": {"total": total, "by_type": {k: v["bytes"] for k, v in sorted(by_type.items())}},
        "ggml_types": {k: dict(v, bits_per_weight=round(8 * v["bytes"] / v["parameters"], 3) if v["parameters"] else None)
                       for k, v in sorted(by_type.items())},
        "bits_per_weight": round(8 * total / params, 3) if params else None,
        "bits_per_quantized_weight": round(8 * q_bytes / q_params, 3) if q_params else None,
        "files": [{"file": h.file, "bytes": h.size, "tensors": len(h.tensors)} for h in model.headers],
        "tensors": len(model.tensors),
        "metadata": meta,
    }


def tensor_rows(ckpt: Checkpoint | GGUFModel, pattern: str | None) -> list[dict[str, Any]]:
    rx = re.compile(pattern) if pattern else None
    if isinstance(ckpt, GGUFModel):
        return [{"name": t.name, "dtype": t.ggml_type, "shape": list(t.shape), "bytes": t.nbytes, "file": t.file}
                for t in sorted(ckpt.tensors.values(), key=lambda t: _natural(t.name))
                if rx is None or rx.search(t.name)]
    return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes, "file": t.file}
            for t in sorted(ckpt.tensors.values(), key=lambda t: _natural(t.name)) if rx is None or rx.search(t.name)]

