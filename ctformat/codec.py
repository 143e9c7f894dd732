"""compress / decompress of one module's weight in any compressed-tensors format, dispatching
on the scheme's format: `pack-quantized` through quant (spec §5), every other format through its
family in ctformat.formats (spec/formats.md §3-§6). Bit-exact with compressed-tensors 0.20 in
both directions; `ctformat.compress` and `ctformat.decompress` are these."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from . import quant
from .formats import format_named
from .scheme import QuantGroup, QuantScheme, inferred_format
from .spec import CROSS_WORD, PACK_QUANTIZED

__all__ = ["compress", "decompress", "group_of"]


def group_of(scheme: QuantScheme | QuantGroup, format: str | None = None) -> tuple[QuantGroup, str]:
    """(the config group, its format): a QuantGroup's own format, else `format`, else the one
    compressed-tensors writes for the args (int weights alone: pack-quantized)."""
    group = scheme if isinstance(scheme, QuantGroup) else QuantGroup("weights", ("Linear",), scheme)
    fmt = format or group.format or inferred_format(group)
    if fmt is None:
        raise ValueError("the scheme quantizes no weights")
    format_named(fmt)                     # CFG-03 for a name ctformat does not read
    return group, fmt


def compress(weight: torch.Tensor, scheme: QuantScheme | QuantGroup, *, format: str | None = None,
             **options: Any) -> dict[str, torch.Tensor]:
    """One module's tensors, keyed by local name, as compressed-tensors writes them for `scheme`
    (its weight args, or a whole config group with input activations) in `format`. Options:
    pack-quantized takes scale, zero_point, g_idx, layout, packed_zero_point (quant.compress);
    the naive family scale, zero_point, global_scale; FP4 scale, global_scale (one shared by
    fused siblings: formats.numerics.global_scale(*weights))."""
    group, fmt = group_of(scheme, format)
    if fmt == PACK_QUANTIZED:
        return quant.compress(weight, group.weights, **options)
    return format_named(fmt).compress(weight, group, **options)


def decompress(tensors: Mapping[str, torch.Tensor], scheme: QuantScheme | QuantGroup, *, format: str | None = None,
               dtype: torch.dtype | None = None, kernel: str = "auto", layout: str = CROSS_WORD) -> torch.Tensor:
    """The dense weight of one module's tensors (local names), as compressed-tensors decompresses
    them: in the format's dtype (the scale dtype; BF16 for FP4 and MX), then cast to `dtype`.
    kernel: "triton" (CUDA, or TRITON_INTERPRET=1), "torch", or "auto" (Triton for CUDA tensors);
    the same bits. `layout` is pack-quantized's 3/5/6/7-bit word layout. The `dense` format gives
    the stored weight, as compressed-tensors does (formats.dense.Dense.fake_quantize gives the
    weight its quantization computes with)."""
    group, fmt = group_of(scheme, format)
    if fmt == PACK_QUANTIZED:
        return quant.decompress(tensors, group.weights, layout=layout, dtype=dtype, kernel=kernel)
    return format_named(fmt).decompress(tensors, group, dtype, kernel=kernel)
