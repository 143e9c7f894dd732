"""nvfp4- and mxfp4-pack-quantized: two FP4 E2M1 codes per byte in `weight_packed`
(spec/formats.md §4). NVFP4: FP8 E4M3 scales per 16 columns and an F32 global scale; MXFP4:
E8M0 scales per 32 columns."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..backend import use_triton
from ..scheme import E8M0, MX_GROUP, QuantGroup
from .format import Format, TensorSpec, leading, per_tensor
from .naive import _global_scales, activation_specs

if TYPE_CHECKING:
    import torch

__all__ = ["NVFP4", "MXFP4", "NVFP4_GROUP"]

NVFP4_GROUP = 16


class NVFP4(Format, family="nvfp4"):
    """FP4 E2M1 weights, group 16 FP8 scales, per-tensor F32 global scale."""

    root = "weight_packed"
    group_size = NVFP4_GROUP
    default_scale_dtype = "F8_E4M3"

    @classmethod
    def tensors(cls, group: QuantGroup, shape: Sequence[int]) -> dict[str, TensorSpec]:
        w, lead, (out, inn) = group.weights, leading(shape), tuple(shape[-2:])
        specs = {"weight_packed": TensorSpec(("U8",), ((*lead, out, inn // 2),)),
                 "weight_scale": TensorSpec((w.scale_dtype or cls.default_scale_dtype,),
                                            ((*lead, *w.scale_shape(out, inn)),))}
        if w.has_global_scale:
            specs["weight_global_scale"] = TensorSpec(("F32",), per_tensor(lead))
        return {**specs, **activation_specs(group, shape)}

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        packed = tuple(shapes["weight_packed"])
        return (*packed[:-1], 2 * packed[-1])

    # -- codec ------------------------------------------------------------------------------
    @classmethod
    def _float_scale(cls, scale: torch.Tensor) -> torch.Tensor:
        import torch
        return scale.to(torch.bfloat16)

    @classmethod
    def _stored_scale(cls, scale: torch.Tensor, group: QuantGroup) -> torch.Tensor:
        from . import numerics
        return scale.to(numerics.torch_dtype(group.weights.scale_dtype or cls.default_scale_dtype))

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        """BF16 whatever the model dtype (compressed-tensors unpacks to bf16); `dtype` casts it."""
        import torch

        from . import numerics
        g = tensors.get("weight_global_scale") if group.weights.has_global_scale else None
        if use_triton(kernel, tensors["weight_packed"], fits=(g is None) == (cls is MXFP4),
                      what="an NVFP4 module without a global scale"):
            from .kernels_fp import dequantize_fp4
            return dequantize_fp4(tensors["weight_packed"], tensors["weight_scale"], g,
                                  group_size=group.weights.group_size, dtype=dtype)
        values = numerics.unpack_fp4(tensors["weight_packed"], torch.bfloat16)
        dense = numerics.dequantize(values, cls._float_scale(tensors["weight_scale"]), None, group.weights,
                                    global_scale=g, dtype=torch.bfloat16)
        return dense if dtype is None else dense.to(dtype)

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup, *, scale: torch.Tensor | None = None,
                 global_scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Min-max qparams (unless given), quantize to E2M1, pack. `global_scale` may be one
        shared by fused siblings (numerics.global_scale(*weights))."""
        from . import numerics
        w = group.weights
        if w.has_global_scale and global_scale is None:
            global_scale = _global_scales(weight)
        g = global_scale if w.has_global_scale else None
        if scale is None:
            scale, _ = numerics.qparams(weight, w, global_scale=g)
        values = numerics.quantize(weight, scale, None, w, global_scale=g)
        out = {"weight_packed": numerics.pack_fp4(values), "weight_scale": cls._stored_scale(scale, group)}
        if g is not None:
            out["weight_global_scale"] = g
        return out


class MXFP4(NVFP4, family="mxfp4"):
    """FP4 E2M1 weights, group 32, E8M0 power-of-two scales, no global scale."""

    group_size = MX_GROUP
    default_scale_dtype = E8M0

    @classmethod
    def _float_scale(cls, scale: torch.Tensor) -> torch.Tensor:
        from . import numerics
        return numerics.e8m0_to_bf16(scale)

    @classmethod
    def _stored_scale(cls, scale: torch.Tensor, group: QuantGroup) -> torch.Tensor:
        from . import numerics
        return numerics.bf16_to_e8m0(scale)
