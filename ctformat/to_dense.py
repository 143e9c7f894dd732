"""`convert --to dense` (spec §7): every quantized module M becomes M.weight, dequantized on the
GPU or the CPU (the same bits), every other tensor is copied, names are those the
architecture's loader reads, and quantization_config leaves config.json."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .checkpoint import Checkpoint, Module, open_checkpoint
from .dequant import decompress_loaded
from .dtypes import dtype_code, dtype_name
from .errors import UnsupportedError
from .fold import fold, rotation_matrix
from .marlin_config import marlin_dims
from .names import loader_name
from .pipeline import (ConvertResult, Step, by_suffix, compute, copy_step, file_order, module_sources,
                       open_for_convert, resolve_device, run_conversion)
from .scheme import Transform
from .spec import ACTIVATION_PARAMS, DENSE_REFUSALS, KV_PARAMS, MARLIN_PARAMS, QUANT_METHOD, QUANT_PARAMS, SPARSITY_FORMATS
from .validate import raise_for_errors
from .validate_formats import dense_dims, rotation_for

__all__ = ["convert_to_dense", "dequantize_checkpoint", "dense_plan", "dense_dropped", "fold_plan", "fold_matrices",
           "dense_config"]

# tensors a converted module's step reads (a naive module's `weight` holds its quantized values)
_PARAMS = frozenset(QUANT_PARAMS + MARLIN_PARAMS + ("weight",))


def _refuse(rule: str, where: str, message: str) -> UnsupportedError:
    return UnsupportedError(f"{message}; {DENSE_REFUSALS[rule]}", rule=rule, where=where)


def fold_plan(ckpt: Checkpoint) -> dict[str, dict[str, tuple[Transform, Module]]]:
    """Module prefix -> {"input"/"output": (transform, the module holding its rotation)} for every
    module with online rotations; DCV-01 for a rotation that does not fold into a dense weight."""
    q = ckpt.quant
    if q is None or not any(t.online for t in q.transforms):
        return {}
    for t in q.transforms:
        if t.online and t.location not in ("input", "output"):
            raise _refuse("DCV-01", f"quantization_config.transform_config.config_groups.{t.scheme}",
                          f"online transform at {t.location} acts inside attention, after the rotary embedding")
    out: dict[str, dict[str, tuple[Transform, Module]]] = {}
    for m in ckpt.modules().values():
        ts = ckpt.transforms_of(m)
        if not ts:
            continue
        if not m.is_linear:
            raise _refuse("DCV-01", m.prefix, "online transform on a module that is not a Linear layer")
        for t in ts:
            if t.location in out.get(m.prefix, {}):
                raise _refuse("DCV-01", m.prefix, f"two online transforms at its {t.location}")
            _, holder = rotation_for(ckpt, m, t)
            out.setdefault(m.prefix, {})[t.location] = (t, holder)
    return out


class _Rotations:
    """The rotation tensors a checkpoint's online transforms store, read on first use (tied:
    one tensor serves many modules) and turned into the matrices to fold in."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt, self.cache = ckpt, {}

    def load(self, holder: Module, suffix: str) -> torch.Tensor | None:
        info = holder.tensors.get(suffix)
        if info is None:
            return None
        if info.name not in self.cache:
            self.cache[info.name] = self.ckpt.load(info.name)
        return self.cache[info.name]

    def matrices(self, folds: dict[str, tuple[Transform, Module]]) -> dict[str, torch.Tensor]:
        return {loc: rotation_matrix(t, self.load(h, "weight"), self.load(h, "perm")) for loc, (t, h) in folds.items()}


def fold_matrices(ckpt: Checkpoint) -> dict[str, dict[str, torch.Tensor]]:
    """Module prefix -> {"input"/"output": the float64 matrix to fold in} (fold_plan's, with the
    rotation tensors read; for reference inference, which holds every module at once)."""
    rotations = _Rotations(ckpt)
    return {prefix: rotations.matrices(folds) for prefix, folds in fold_plan(ckpt).items()}


def dense_dropped(ckpt: Checkpoint, *, drop_kv_cache: bool = False) -> frozenset[str]:
    """Tensors a dense output leaves out without reading them through the plan: the rotation
    matrices (folded in, read by the steps that fold them), and with `drop_kv_cache` the
    kv-cache scales."""
    return frozenset(i.name for m in ckpt.modules().values() for k, i in m.tensors.items()
                     if m.rotation is not None or (drop_kv_cache and m.kv_cache and k in KV_PARAMS))


def dense_plan(ckpt: Checkpoint, dtype: torch.dtype, keep_names: bool = False, *, drop_kv_cache: bool = False,
               originals: bool = False) -> list[Step]:
    """Steps of convert --to dense, in file order: a module's tensors become its dense weight
    (folded with its online rotations), activation qparams are read and not written,
    kv-cache scales are copied, everything else is copied; dense_dropped names what the plan
    leaves unread (rotations, kv-cache scales with `drop_kv_cache`)."""
    model_type, mods, plan, done = ckpt.model_type, ckpt.modules(), [], set()
    folds = fold_plan(ckpt)
    rotations = _Rotations(ckpt)
    dropped = dense_dropped(ckpt, drop_kv_cache=drop_kv_cache)

    def rename(prefix: str) -> str:
        return loader_name(prefix, model_type, keep_names)
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if info.name in dropped:
            continue
        computed = (m.quantized and suffix in _PARAMS) or (prefix in folds and (
            suffix == "weight" or (suffix == "bias" and "output" in folds[prefix])))
        if not computed:
            plan.append(copy_step(ckpt, info.name, f"{rename(prefix)}.{suffix}" if prefix else None))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_dense_step(ckpt, m, dtype, rename, folds.get(prefix, {}), rotations, originals))
    return plan


def _dense_shape(ckpt: Checkpoint, m: Module) -> tuple[int, ...]:
    if m.packed:
        return tuple(int(v) for v in ckpt.load(m.tensors["weight_shape"].name).tolist())
    if m.format in SPARSITY_FORMATS and m.tensors["shape"].shape != (2, 1):    # sparse-bitmask: `in` is in `shape`
        return tuple(int(v) for v in ckpt.load(m.tensors["shape"].name).flatten().tolist())
    return dense_dims(m) if m.quantized else tuple(m.tensors["weight"].shape)


def _dense_step(ckpt: Checkpoint, m: Module, dtype: torch.dtype, rename: Callable[[str], str],
                folds: dict[str, tuple[Transform, Module]], rotations: _Rotations, originals: bool) -> Step:
    sources = module_sources(m, _PARAMS | ({"bias"} if "output" in folds else set()))
    code = dtype_code(dtype)
    if m.is_marlin:
        k, n, _, _ = marlin_dims(m.tensors["B"].shape, m.tensors["s"].shape)
        parts = ckpt.marlin.stacked_parts(m.prefix, n)
        if parts is not None:          # stacked experts: back to one weight per expert and part
            outs = [(f"{rename(p)}.weight", code, (rows, k)) for p, rows in parts]
            return Step(outs, sources, lambda t: _split_dense(
                decompress_loaded(ckpt, m, by_suffix(m, t), dtype=dtype), [r for _, r in parts]), m.prefix)
        shape = (*m.tensors["B"].shape[:-2], n, k)
    else:
        shape = _dense_shape(ckpt, m)
    outs = [(f"{rename(m.prefix)}.weight", code, shape)]
    bias = m.tensors.get("bias") if "output" in folds else None
    if bias is not None:
        outs.append((f"{rename(m.prefix)}.bias", bias.dtype, tuple(bias.shape)))
    dropped = sum(1 for k in m.tensors if k in ACTIVATION_PARAMS)      # not weights (spec/formats.md §12)
    if not folds:
        return Step(outs, sources, lambda t: [decompress_loaded(ckpt, m, by_suffix(m, t), dtype=dtype,
                                                                originals=originals)], m.prefix, dropped)

    def work(t: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        local = by_suffix(m, t)
        w = decompress_loaded(ckpt, m, local, originals=originals) if m.quantized else local["weight"]
        mats = rotations.matrices(folds)
        w, b = fold(w, local.get("bias") if bias is not None else None, mats.get("input"), mats.get("output"))
        return [w.to(dtype)] + ([b.to(local["bias"].dtype)] if bias is not None else [])
    return Step(outs, sources, work, m.prefix, dropped)


def _split_dense(w: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    per = len(rows) // w.shape[0]
    return [part for expert in w for part in expert.split(rows[:per], dim=0)]


def dense_config(ckpt: Checkpoint, dtype: torch.dtype, *, drop_kv_cache: bool = False) -> dict:
    """config.json of the dense output: no quantization_config, or only the kv_cache_scheme when
    its k/v scales are kept (spec/formats.md §12); torch_dtype (and dtype) name the output dtype."""
    config = dict(ckpt.config or {})
    config.pop("quantization_config", None)
    q = ckpt.quant
    if q is not None and q.kv_cache is not None and not drop_kv_cache:
        config["quantization_config"] = {"config_groups": {}, "format": "dense", "ignore": [],
                                         "kv_cache_scheme": q.raw["kv_cache_scheme"], "quant_method": QUANT_METHOD,
                                         "quantization_status": "frozen", **({"version": q.version} if q.version
                                                                             else {})}
    # transformers < 4.56 reads torch_dtype, newer ones dtype: name the output dtype in both
    # (torch_dtype always, dtype where the source has it)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = dtype_name(dtype)
    return config


def convert_to_dense(model: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     device: str = "auto", max_shard_size: int = 5_000_000_000, force: bool = False,
                     keep_names: bool = False, drop_kv_cache: bool = False, originals: bool = False,
                     progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Write MODEL's weights, dequantized (rotations folded in), as a plain safetensors checkpoint
    at OUT. `originals`: a `dense`-format checkpoint's stored weights as they are, not the weights
    its quantization gives; `drop_kv_cache`: no kv-cache scales and no quantization_config."""
    src, dev, ckpt = open_for_convert(model, out, device)
    plan = dense_plan(ckpt, dtype, keep_names, drop_kv_cache=drop_kv_cache, originals=originals)
    return run_conversion(ckpt, src, out, plan, dense_config(ckpt, dtype, drop_kv_cache=drop_kv_cache),
                          target="dense", verb="dequantized", device=dev, params=_PARAMS,
                          max_shard_size=max_shard_size, force=force, progress=progress,
                          dropped=dense_dropped(ckpt, drop_kv_cache=drop_kv_cache))


def dequantize_checkpoint(model: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "auto",
                          keep_names: bool = False, drop_kv_cache: bool = False,
                          originals: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict of a (small) checkpoint in memory, on `device`: the same tensors,
    names and bits convert_to_dense writes. For large models use convert_to_dense."""
    dev = resolve_device(device)
    ckpt = open_checkpoint(model)
    raise_for_errors(ckpt)
    result = ConvertResult("dense", "dequantized", "", str(dev))
    out = {}
    for step in dense_plan(ckpt, dtype, keep_names, drop_kv_cache=drop_kv_cache, originals=originals):
        tensors = {n: ckpt.load(n) for n in step.sources}
        for (name, _, _), t in zip(step.outputs, compute(step, tensors, dev, result)):
            out[name] = t.to(dev)
    return out
