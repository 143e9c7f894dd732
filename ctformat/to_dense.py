"""`convert --to dense` (spec §7): every quantized module M becomes M.weight, dequantized on the
GPU or the CPU (the same bits), every other tensor is copied, names are those the
architecture's loader reads, and quantization_config leaves config.json."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .checkpoint import GPTQ_FAMILIES, Checkpoint, Module, open_checkpoint
from .dequant import decompress_loaded
from .dtypes import dtype_code, dtype_name
from .gptq_layout import in_features
from .marlin_config import marlin_dims
from .names import loader_name
from .pipeline import (ConvertResult, Step, by_suffix, compute, copy_step, file_order, module_sources,
                       open_for_convert, resolve_device, run_conversion)
from .spec import GPTQ_PARAMS, MARLIN_PARAMS, QUANT_PARAMS, QUANTIZE_CONFIG_NAME
from .validate import raise_for_errors

__all__ = ["convert_to_dense", "dequantize_checkpoint", "dense_plan"]

_PARAMS = frozenset(QUANT_PARAMS + MARLIN_PARAMS + GPTQ_PARAMS)


def dense_plan(ckpt: Checkpoint, dtype: torch.dtype, keep_names: bool = False) -> list[Step]:
    """Steps of convert --to dense, in file order."""
    model_type, mods, plan, done = ckpt.model_type, ckpt.modules(), [], set()

    def rename(prefix: str) -> str:
        return prefix if keep_names else loader_name(ckpt.source_name(prefix), model_type)
    for info in file_order(ckpt):
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if not (m.quantized and suffix in _PARAMS):
            plan.append(copy_step(ckpt, info.name, f"{rename(prefix)}.{suffix}" if prefix else None))
        elif prefix not in done:
            done.add(prefix)
            plan.append(_dense_step(ckpt, m, dtype, rename))
    return plan


def _dense_step(ckpt: Checkpoint, m: Module, dtype: torch.dtype, rename: Callable[[str], str]) -> Step:
    sources = module_sources(m, _PARAMS)
    code = dtype_code(dtype)
    if m.is_marlin:
        k, n, _, _ = marlin_dims(m.tensors["B"].shape, m.tensors["s"].shape)
        parts = ckpt.marlin.stacked_parts(m.prefix, n)
        if parts is not None:          # stacked experts: back to one weight per expert and part
            outs = [(f"{rename(p)}.weight", code, (rows, k)) for p, rows in parts]
            return Step(outs, sources, lambda t: _split_dense(
                decompress_loaded(ckpt, m, by_suffix(m, t), dtype=dtype), [r for _, r in parts]), m.prefix)
        shape = (*m.tensors["B"].shape[:-2], n, k)
    elif m.is_gptq:
        scales = m.tensors["scales"].shape
        shape = (*scales[:-2], scales[-1], in_features(m.tensors, m.gptq, ckpt.gptq.method))
    else:
        shape = tuple(int(v) for v in ckpt.load(m.tensors["weight_shape"].name).tolist())
    return Step([(f"{rename(m.prefix)}.weight", code, shape)], sources,
                lambda t: [decompress_loaded(ckpt, m, by_suffix(m, t), dtype=dtype)], m.prefix)


def _split_dense(w: torch.Tensor, rows: list[int]) -> list[torch.Tensor]:
    per = len(rows) // w.shape[0]
    return [part for expert in w for part in expert.split(rows[:per], dim=0)]


def convert_to_dense(model: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     device: str = "auto", max_shard_size: int = 5_000_000_000, force: bool = False,
                     keep_names: bool = False, progress: Callable[[int, int], None] | None = None) -> ConvertResult:
    """Write MODEL's weights, dequantized, as a plain safetensors checkpoint at OUT."""
    src, dev, ckpt = open_for_convert(model, out, device)
    config = dict(ckpt.config or {})
    config.pop("quantization_config", None)
    # transformers < 4.56 reads torch_dtype, newer ones dtype: name the output dtype in both
    # (torch_dtype always, dtype where the source has it)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = dtype_name(dtype)
    # GPTQModel reads quantize_config.json before config.json: dense output must not carry one
    skip = (QUANTIZE_CONFIG_NAME,) if ckpt.family in GPTQ_FAMILIES else ()
    return run_conversion(ckpt, src, out, dense_plan(ckpt, dtype, keep_names), config, target="dense",
                          verb="dequantized", device=dev, params=_PARAMS, max_shard_size=max_shard_size,
                          force=force, progress=progress, skip_files=skip)


def dequantize_checkpoint(model: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "auto",
                          keep_names: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict of a (small) checkpoint in memory, on `device`: the same tensors,
    names and bits convert_to_dense writes. For large models use convert_to_dense."""
    dev = resolve_device(device)
    ckpt = open_checkpoint(model)
    raise_for_errors(ckpt)
    result = ConvertResult("dense", "dequantized", "", str(dev))
    out = {}
    for step in dense_plan(ckpt, dtype, keep_names):
        tensors = {n: ckpt.load(n) for n in step.sources}
        for (name, _, _), t in zip(step.outputs, compute(step, tensors, dev, result)):
            out[name] = t.to(dev)
    return out
