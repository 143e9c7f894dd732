"""dense: saved uncompressed (`quantization_status: frozen`). The file holds the original weight
and the qparams beside it (spec/formats.md §5): decompressing is the identity, and
fake_quantize gives the weight compressed-tensors computes with at run time."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..scheme import FLOAT_CODES, QuantGroup
from .format import Format, TensorSpec
from .naive import _global_scales, activation_specs, weight_tensors

if TYPE_CHECKING:
    import torch

__all__ = ["Dense"]


class Dense(Format, family="dense"):
    """The original float weight plus its qparams (a zero point even when symmetric)."""

    root = "weight"

    @classmethod
    def tensors(cls, group: QuantGroup, shape: Sequence[int]) -> dict[str, TensorSpec]:
        specs = activation_specs(group, shape, zero_point_always=True)
        if group.weights is None:
            return {"weight": TensorSpec(FLOAT_CODES, (tuple(shape),)), **specs}
        return {**weight_tensors(group.weights, shape, value_dtypes=FLOAT_CODES, scale_dtypes=FLOAT_CODES,
                                 zero_point_always=True), **specs}

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        """The stored weight, unchanged (compressed-tensors' DenseCompressor)."""
        w = tensors["weight"]
        return w if dtype is None or w.dtype == dtype else w.to(dtype)

    @classmethod
    def fake_quantize(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup) -> torch.Tensor:
        """What compressed-tensors' forward uses for the weight of a frozen module: quantize and
        dequantize with the stored scale, zero point (when stored, even all zero) and global scale."""
        from . import numerics
        if group.weights is None:
            return tensors["weight"]
        return numerics.fake_quantize(tensors["weight"], tensors["weight_scale"], tensors.get("weight_zero_point"),
                                      group.weights, global_scale=tensors.get("weight_global_scale"))

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup, *, global_scale: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """The tensors an uncompressed save writes: the weight as given, min-max qparams in the
        weight dtype, a zero point (zeros when symmetric) and the global scale for tensor_group."""
        from . import numerics
        w = group.weights
        if w.has_global_scale and global_scale is None:
            global_scale = _global_scales(weight)
        g = global_scale if w.has_global_scale else None
        scale, zero_point = numerics.qparams(weight, w, global_scale=g)
        out = {"weight": weight, "weight_scale": scale, "weight_zero_point": zero_point}
        if g is not None:
            out["weight_global_scale"] = g
        return out
