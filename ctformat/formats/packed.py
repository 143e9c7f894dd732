"""pack-quantized in the same table: its tensors and codec are spec/ctformat.md §2-§5 and live in
ctformat.quant / ctformat.pack; this entry lets a per-group lookup (mixed-precision) reach them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..scheme import FLOAT_CODES, QuantGroup, Strategy, packed_width
from .format import Format, TensorSpec, leading
from .naive import activation_specs

if TYPE_CHECKING:
    import torch

__all__ = ["Packed"]


class Packed(Format, family="pack"):
    """Int 1..8-bit values packed into int32 words (spec/ctformat.md)."""

    root = "weight_packed"

    @classmethod
    def tensors(cls, group: QuantGroup, shape: Sequence[int]) -> dict[str, TensorSpec]:
        w, lead, (out, inn) = group.weights, leading(shape), tuple(shape[-2:])
        scale = (*lead, *w.scale_shape(out, inn))
        specs = {"weight_packed": TensorSpec(("I32",), ((*lead, out, packed_width(inn, w.num_bits)),)),
                 "weight_scale": TensorSpec(FLOAT_CODES, (scale,)),
                 "weight_shape": TensorSpec(("I64", "I32"), ((len(shape),),))}
        if not w.symmetric:
            packed_zp = (*lead, packed_width(out, w.num_bits), scale[-1])
            specs["weight_zero_point"] = TensorSpec(("I32", "I8"), (packed_zp, scale) if w.strategy is not
                                                    Strategy.TENSOR else ((1,),))
        return {**specs, **activation_specs(group, shape)}

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """Only weight_shape's values tell `in`; from headers, the width gives an upper bound."""
        packed = tuple(shapes["weight_packed"])
        return (*packed[:-1], 32 * packed[-1])

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        from ..quant import decompress
        return decompress(tensors, group.weights, dtype=dtype, kernel=kernel)

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup, **qparams) -> dict[str, torch.Tensor]:
        from ..quant import compress
        return compress(weight, group.weights, **qparams)
