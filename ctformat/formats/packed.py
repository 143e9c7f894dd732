"""pack-quantized in the same table: its tensors and codec are spec/ctformat.md §2-§5 and live in
ctformat.quant / ctformat.pack; this entry lets a per-group lookup (mixed-precision) reach them."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..scheme import QuantScheme, Strategy, packed_width
from .args import FLOAT_CODES, Scheme
from .format import Format, TensorSpec, leading
from .naive import activation_specs

if TYPE_CHECKING:
    import torch

__all__ = ["Packed"]


def _int_scheme(scheme: Scheme) -> QuantScheme:
    return QuantScheme.from_json(scheme.weights.to_json(), where="weights")


class Packed(Format, names=("pack-quantized",)):
    """Int 1..8-bit values packed into int32 words (spec/ctformat.md)."""

    root = "weight_packed"
    header_rules = False        # spec/ctformat.md's TEN rules judge it (weight_shape holds `in`)

    @classmethod
    def misfit(cls, scheme: Scheme) -> str | None:
        w = scheme.weights
        if w is None or w.is_float:
            return "pack-quantized stores int weights"
        if w.strategy not in (Strategy.TENSOR, Strategy.CHANNEL, Strategy.GROUP):
            return f"strategy {w.strategy.value} is not read for pack-quantized weights"
        return None

    @classmethod
    def tensors(cls, scheme: Scheme, shape: Sequence[int]) -> dict[str, TensorSpec]:
        w, lead, (out, inn) = scheme.weights, leading(shape), tuple(shape[-2:])
        scale = (*lead, *w.scale_shape(out, inn))
        specs = {"weight_packed": TensorSpec(("I32",), ((*lead, out, packed_width(inn, w.num_bits)),)),
                 "weight_scale": TensorSpec(FLOAT_CODES, (scale,)),
                 "weight_shape": TensorSpec(("I64", "I32"), ((len(shape),),))}
        if not w.symmetric:
            packed_zp = (*lead, packed_width(out, w.num_bits), scale[-1])
            specs["weight_zero_point"] = TensorSpec(("I32", "I8"), (packed_zp, scale) if w.strategy is not
                                                    Strategy.TENSOR else ((1,),))
        return {**specs, **activation_specs(scheme, shape)}

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """Only weight_shape's values tell `in`; from headers, the width gives an upper bound."""
        packed = tuple(shapes["weight_packed"])
        return (*packed[:-1], 32 * packed[-1])

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], scheme: Scheme,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        from ..quant import decompress
        return decompress(tensors, _int_scheme(scheme), dtype=dtype, kernel=kernel)

    @classmethod
    def compress(cls, weight: torch.Tensor, scheme: Scheme, **qparams) -> dict[str, torch.Tensor]:
        from ..quant import compress
        return compress(weight, _int_scheme(scheme), **qparams)
