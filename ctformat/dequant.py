"""One module of a checkpoint to its dense weight, whatever layout it is stored in: checked
against its scheme first (validate's static rules and weight_shape, spec §6), then decompressed
(pack-quantized: quant, spec §5; Marlin: back through the inverse layout, spec §10.10; every
other format: its family's codec, spec/formats.md §3-§6, on CUDA through the Triton kernels of
formats/kernels_fp.py)."""
from __future__ import annotations

from typing import Mapping

import torch

from .checkpoint import Checkpoint, Module
from .errors import ConfigError, TensorError
from .formats import format_named
from .marlin import to_ct
from .marlin_config import scheme_of
from .quant import decompress
from .spec import DENSE_FORMAT, SPARSITY_FORMATS
from .validate import check_module, shape_issue

__all__ = ["dequantize_module", "decompress_loaded", "checked_shape", "decompress_marlin"]


def dequantize_module(ckpt: Checkpoint, module: Module, tensors: Mapping[str, torch.Tensor] | None = None, *,
                      dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                      originals: bool = False) -> torch.Tensor:
    """The dense weight of one quantized module, checked against its scheme first; `tensors`
    (its tensors by suffix, on any device) when already loaded, else read from the files.
    A `dense`-format module gives the weight its quantization computes with (fake-quantized),
    or with `originals` the stored weight."""
    if module.format is None and not module.is_marlin:
        raise ConfigError("no config group targets this module", rule="TEN-10", where=module.prefix)
    for found in check_module(ckpt, module):
        if found.severity == "error":
            raise found.as_error()
    if tensors is None:
        tensors = ckpt.load_module(module, device)
    return decompress_loaded(ckpt, module, tensors, dtype=dtype, originals=originals)


def decompress_loaded(ckpt: Checkpoint, module: Module, tensors: Mapping[str, torch.Tensor], *,
                      dtype: torch.dtype | None = None, originals: bool = False) -> torch.Tensor:
    """Dense weight from a module's loaded tensors (any device) whose static rules already
    hold; its weight_shape values are checked against the headers (DATA-05, TEN-08)."""
    if module.is_marlin:
        return decompress_marlin(tensors, dtype=dtype)
    if not module.packed:
        return _decompress_format(module, tensors, dtype, originals)
    shape = checked_shape(ckpt, module, tensors["weight_shape"])
    return decompress(tensors, module.scheme, layout=ckpt.word_layout(module, shape[-1]), dtype=dtype)


def _decompress_format(module: Module, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype | None,
                       originals: bool) -> torch.Tensor:
    """A module of spec/formats.md through its family's codec (bit-exact with compressed-tensors)."""
    fmt = format_named(module.format)
    if module.format == DENSE_FORMAT and not originals:
        w = fmt.fake_quantize(tensors, module.group)
        return w if dtype is None else w.to(dtype)
    if module.format in SPARSITY_FORMATS:
        shape = tuple(int(v) for v in tensors["shape"].flatten().tolist())
        bits = tensors["bitmask"].shape
        if len(shape) != 2 or shape[0] != bits[0] or not 8 * (bits[1] - 1) < shape[1] <= 8 * bits[1]:
            raise TensorError(f"shape says {list(shape)}, but bitmask is {list(bits)}", rule="FMT-21",
                              where=f"{module.prefix}.shape")
    return fmt.decompress(tensors, module.group, dtype)


def checked_shape(ckpt: Checkpoint, module: Module, weight_shape: torch.Tensor) -> tuple[int, ...]:
    """A module's loaded weight_shape, checked against the headers (DATA-05, TEN-08)."""
    shape = tuple(int(v) for v in weight_shape.tolist())
    bad = shape_issue(ckpt, module, shape)
    if bad is not None:
        raise bad.as_error()
    return shape


def decompress_marlin(tensors: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense weight [..., N, K] of a Marlin module (through the inverse layout, then §5)."""
    ct = to_ct(tensors)
    scheme = scheme_of(tensors["B"].shape, tensors["s"].shape, "zp" in tensors, "perm" in tensors)
    ct["weight_shape"] = ct["weight_shape"].to(tensors["B"].device)
    return decompress(ct, scheme, dtype=dtype)
