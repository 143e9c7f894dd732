"""naive-, int-, float- and mxfp8-quantized: one unpacked value per weight in `weight`
(spec/formats.md §3). FP8 E4M3 per tensor, channel, group and block (ragged edges included),
int8 W8A8, int4-in-int8 W4A8/W4AFP8, MXFP8 with E8M0 scales."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..backend import use_triton
from ..scheme import E8M0, FLOAT_CODES, QuantGroup, QuantScheme, Strategy
from .format import Format, TensorSpec, leading, per_tensor

if TYPE_CHECKING:
    import torch

__all__ = ["Naive", "MXFP8", "weight_tensors", "activation_specs"]


def weight_tensors(w: QuantScheme, shape: Sequence[int], *, value_dtypes: tuple[str, ...],
                   scale_dtypes: tuple[str, ...], zero_point_always: bool = False) -> dict[str, TensorSpec]:
    """weight, weight_scale, weight_zero_point, weight_global_scale of an unpacked weight."""
    lead, (out, inn) = leading(shape), tuple(shape[-2:])
    sshape = w.scale_shape(out, inn)
    sshapes = per_tensor(lead) if w.strategy is Strategy.TENSOR else ((*lead, *sshape),)
    specs = {"weight": TensorSpec(value_dtypes, (tuple(shape),)),
             "weight_scale": TensorSpec(scale_dtypes, sshapes)}
    if not w.symmetric or zero_point_always:
        specs["weight_zero_point"] = TensorSpec((w.zero_point_dtype,), sshapes, required=not w.symmetric)
    if w.has_global_scale:
        specs["weight_global_scale"] = TensorSpec(("F32",), per_tensor(lead))
    return specs


def activation_specs(group: QuantGroup | None, shape: Sequence[int], *, zero_point_always: bool = False
                     ) -> dict[str, TensorSpec]:
    """input_/output_ qparams the module stores (spec/formats.md §1.3)."""
    lead, inn = leading(shape), shape[-1]
    specs: dict[str, TensorSpec] = {}
    if group is None:
        return specs
    a = group.input_activations
    if a is not None:
        if a.has_global_scale:
            specs["input_global_scale"] = TensorSpec(("F32",), per_tensor(lead))
        if a.has_static_scale:
            ashape = a.activation_shape(inn)
            shapes = per_tensor(lead) if ashape == (1,) else ((*lead, *ashape), ashape)
            specs["input_scale"] = TensorSpec(FLOAT_CODES, shapes)
            if not a.symmetric or zero_point_always:
                specs["input_zero_point"] = TensorSpec((a.zero_point_dtype,), shapes, required=not a.symmetric)
    o = group.output_activations
    if o is not None and o.has_global_scale:
        specs["output_global_scale"] = TensorSpec(("F32",), per_tensor(lead))
    if o is not None and o.has_static_scale and o.strategy is Strategy.TENSOR:
        specs["output_scale"] = TensorSpec(FLOAT_CODES, per_tensor(lead))
        if not o.symmetric:
            specs["output_zero_point"] = TensorSpec((o.zero_point_dtype,), per_tensor(lead))
    return specs


class Naive(Format, family="naive"):
    """The weight quantized in place: I8 for int, F8_E4M3 for float 8-bit."""

    root = "weight"

    @classmethod
    def _scale_dtypes(cls, w: QuantScheme) -> tuple[str, ...]:
        # the scale is held in the model dtype whatever scale_dtype says (initialize_qparams)
        return FLOAT_CODES

    @classmethod
    def tensors(cls, group: QuantGroup, shape: Sequence[int]) -> dict[str, TensorSpec]:
        w = group.weights
        return {**weight_tensors(w, shape, value_dtypes=(w.value_dtype,), scale_dtypes=cls._scale_dtypes(w)),
                **activation_specs(group, shape)}

    # -- codec ------------------------------------------------------------------------------
    @classmethod
    def _float_scale(cls, scale: torch.Tensor) -> torch.Tensor:
        return scale

    @classmethod
    def _stored_scale(cls, scale: torch.Tensor, w: QuantScheme) -> torch.Tensor:
        return scale

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        from . import numerics
        w = group.weights
        q, scale = tensors["weight"], cls._float_scale(tensors["weight_scale"])
        fits = w.is_float and w.symmetric and w.strategy is not Strategy.TENSOR_GROUP
        if use_triton(kernel, q, fits=fits, what="int or asymmetric weights (it takes symmetric FP8)"):
            from .kernels_fp import dequantize_fp8
            return dequantize_fp8(q, scale, strategy=w.strategy.value, group_size=w.group_size,
                                  block_structure=w.block_structure, dtype=dtype)
        zp = None if w.symmetric else tensors["weight_zero_point"]
        dense = numerics.dequantize(q, scale, zp, w)
        return dense if dtype is None else dense.to(dtype)

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup, *, scale: torch.Tensor | None = None,
                 zero_point: torch.Tensor | None = None, global_scale: torch.Tensor | None = None
                 ) -> dict[str, torch.Tensor]:
        """The module's tensors as llm-compressor + compressed-tensors write them: min-max
        qparams in the weight dtype (unless given), quantize, then compress. The zero point a
        symmetric module holds (all zero) takes part in quantizing, as it does in
        compressed-tensors, and is dropped afterwards."""
        import torch

        from . import numerics
        w = group.weights
        if w.has_global_scale and global_scale is None:
            global_scale = _global_scales(weight)
        if scale is None:
            scale, zero_point = numerics.qparams(weight, w, global_scale=global_scale if w.has_global_scale else None)
        if zero_point is None:
            zero_point = torch.zeros(scale.shape, dtype=numerics.torch_dtype(w.zero_point_dtype))
        q = numerics.quantize(weight, scale, zero_point, w, dtype=numerics.torch_dtype(w.value_dtype))
        out = {"weight": q, "weight_scale": cls._stored_scale(scale, w)}
        if not w.symmetric:
            out["weight_zero_point"] = zero_point
        if w.has_global_scale:
            out["weight_global_scale"] = global_scale
        return out


class MXFP8(Naive, family="mxfp8"):
    """FP8 E4M3 values with E8M0 power-of-two scales per 32 columns."""

    @classmethod
    def _scale_dtypes(cls, w: QuantScheme) -> tuple[str, ...]:
        return (E8M0,)

    @classmethod
    def _float_scale(cls, scale: torch.Tensor) -> torch.Tensor:
        from . import numerics
        return numerics.e8m0_to_bf16(scale)

    @classmethod
    def _stored_scale(cls, scale: torch.Tensor, w: QuantScheme) -> torch.Tensor:
        from . import numerics
        return numerics.bf16_to_e8m0(scale)


def _global_scales(weight: torch.Tensor) -> torch.Tensor:
    """One global scale per 2-D weight: [1], or [E, 1] for a stack."""
    import torch

    from . import numerics
    if weight.ndim == 2:
        return numerics.global_scale(weight)
    flat = weight.reshape(-1, *weight.shape[-2:])
    return torch.cat([numerics.global_scale(w) for w in flat]).reshape(*weight.shape[:-2], 1)

