"""The legacy sparse formats compressed-tensors <= 0.14 wrote (spec/formats.md §6):
sparse-24-bitmask and sparse-bitmask (values scattered into the set bits of a bitmask), and
marlin-24, which is described but never decoded: no decompressor for it exists anywhere."""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import TensorError, UnsupportedError
from ..scheme import FLOAT_CODES, QuantGroup
from .format import Format, TensorSpec, weights_of
from .naive import Naive

if TYPE_CHECKING:
    import torch

__all__ = ["Sparse24Bitmask", "SparseBitmask", "Marlin24", "ANY"]

ANY = -1          # a dimension whose size the header alone cannot tell (nnz of sparse-bitmask)


class Sparse24Bitmask(Format, family="sparse-24"):
    """Two kept values of every four: `compressed` [out, in/2], `bitmask` U8, `shape` I64 [2, 1]."""

    root = "compressed"
    shape_shape: tuple[int, ...] = (2, 1)

    @classmethod
    def _values_dtypes(cls, group: QuantGroup | None) -> tuple[str, ...]:
        w = weights_of(group)
        return (w.value_dtype,) if w is not None else FLOAT_CODES

    @classmethod
    def _compressed_shape(cls, out: int, inn: int) -> tuple[int, ...]:
        return (out, inn // 2)

    @classmethod
    def tensors(cls, group: QuantGroup | None, shape: Sequence[int]) -> dict[str, TensorSpec]:
        out, inn = shape[-2:]
        specs = {"compressed": TensorSpec(cls._values_dtypes(group), (cls._compressed_shape(out, inn),)),
                 "bitmask": TensorSpec(("U8",), ((out, -(-inn // 8)),)),
                 "shape": TensorSpec(("I64",), (cls.shape_shape,))}
        if weights_of(group) is not None:    # sparse over quantized: the qparams of the naive format
            specs.update({k: v for k, v in Naive.tensors(group, shape).items() if k != "weight"})
        return specs

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """[out, in]; `in` is exact for sparse-24 (2 x compressed columns)."""
        rows, cols = shapes["compressed"]
        return (rows, 2 * cols)

    @classmethod
    def scatter(cls, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The dense weight: `compressed` in row-major order into the set bits, +0 elsewhere."""
        import torch
        shape = tuple(int(v) for v in tensors["shape"].flatten().tolist())
        bits = tensors["bitmask"].to(torch.uint8)
        mask = ((bits.unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)[..., : shape[-1]].bool()
        values = tensors["compressed"].flatten()
        if int(mask.sum()) != values.numel():
            raise TensorError(f"bitmask has {int(mask.sum())} set bits for {values.numel()} values",
                              rule="FMT-34", where="bitmask")
        dense = torch.zeros(shape, dtype=values.dtype)
        if values.dtype == torch.float8_e4m3fn:      # index_put has no fp8 kernel: move the bytes
            dense.view(torch.uint8)[mask] = values.view(torch.uint8)
        else:
            dense[mask] = values
        return dense

    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup | None,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto", legacy_f16: bool = False
                   ) -> torch.Tensor:
        """Scatter, then (sparse over quantized) dequantize as the naive format with the group's
        args: one rounding in the scale dtype, as compressed-tensors 0.20 does for every format.
        legacy_f16=True reproduces compressed-tensors 0.14's model path instead, which held the
        scale of an FP8 weight in float16: bf16(f16(q) * f16(s))."""
        dense = cls.scatter(tensors)
        if weights_of(group) is not None:
            import torch
            qt = {**tensors, "weight": dense}
            if legacy_f16:
                qt["weight_scale"] = tensors["weight_scale"].to(torch.float16)
            out = Naive.decompress(qt, group, kernel="torch" if legacy_f16 else kernel)
            return out if dtype is None else out.to(dtype)
        return dense if dtype is None else dense.to(dtype)

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup | None) -> dict[str, torch.Tensor]:
        """CT 0.14's layout of a dense (or FP8) weight: the two largest |x| of every four kept
        (an FP8 weight is ranked by its int8 bit pattern, as CT 0.14 did)."""
        import torch
        out, inn = weight.shape
        key = weight.view(torch.int8) if weight.dtype == torch.float8_e4m3fn else weight
        quads = key.reshape(-1, 4)
        keep = torch.zeros_like(quads, dtype=torch.bool).scatter_(1, quads.abs().topk(2, dim=1).indices, True)
        keep = keep.reshape(out, inn)
        values = weight.view(torch.uint8)[keep].view(weight.dtype) if weight.dtype == torch.float8_e4m3fn \
            else weight[keep]
        return {"compressed": values.reshape(out, inn // 2), "bitmask": _pack_bits(keep),
                "shape": torch.tensor([out, inn], dtype=torch.int64).reshape(cls.shape_shape)}


class SparseBitmask(Sparse24Bitmask, family="sparse-bitmask"):
    """Any pattern: 1-D `compressed` [nnz], `bitmask`, `shape` I64 [2], `row_offsets` I64 [out]."""

    shape_shape = (2,)

    @classmethod
    def _compressed_shape(cls, out: int, inn: int) -> tuple[int, ...]:
        return (ANY,)

    @classmethod
    def tensors(cls, group: QuantGroup | None, shape: Sequence[int]) -> dict[str, TensorSpec]:
        specs = super().tensors(group, shape)
        specs["row_offsets"] = TensorSpec(("I64",), ((shape[-2],),))
        return specs

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """[out, 8 x bitmask columns]: an upper bound on `in`; `shape` holds the exact value."""
        rows, cols = shapes["bitmask"]
        return (rows, 8 * cols)

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup | None) -> dict[str, torch.Tensor]:
        """Every nonzero kept (CT 0.14 bitmask_compress)."""
        import torch
        keep = weight.view(torch.uint8) != 0 if weight.dtype == torch.float8_e4m3fn else weight != 0
        counts = keep.sum(-1)
        values = weight.view(torch.uint8)[keep].view(weight.dtype) if weight.dtype == torch.float8_e4m3fn \
            else weight[keep]
        return {"compressed": values, "bitmask": _pack_bits(keep),
                "shape": torch.tensor(list(weight.shape), dtype=torch.int64),
                "row_offsets": torch.cumsum(counts, 0) - counts}


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Bool [rows, n] -> U8 [rows, ceil(n/8)], element j at bit j % 8 of byte j // 8."""
    import torch
    pad = -mask.shape[-1] % 8
    m = torch.nn.functional.pad(mask.to(torch.uint8), (0, pad)).unflatten(-1, (-1, 8))
    return (m << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


class Marlin24(Format, family="marlin-24"):
    """2:4-sparse int4 in Marlin's tiles (CT <= 0.14). No decompressor exists, in CT or elsewhere:
    ctformat names the module and refuses to dequantize it (FMT-22)."""

    root = "weight_packed"
    decodable = False

    @classmethod
    def tensors(cls, group: QuantGroup | None, shape: Sequence[int]) -> dict[str, TensorSpec]:
        out, inn = shape[-2:]
        w = weights_of(group)
        gs = w.group_size if w is not None and w.group_size else inn
        return {"weight_packed": TensorSpec(("I32",), ((inn // 32, 2 * out),)),
                "scale_packed": TensorSpec(("F16",), ((-(-inn // gs), out),)),
                "meta": TensorSpec(("I16",), ((inn // 32, 2 * out),))}

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        rows, cols = shapes["weight_packed"]
        return (cols // 2, 32 * rows)

    @classmethod
    def decompress(cls, tensors, group, dtype=None, *, kernel="auto"):
        raise UnsupportedError("marlin-24 cannot be dequantized: no decompressor exists (compressed-tensors "
                               "<= 0.14 says 'Decompression is not implemented for the Marlin24 Compressor')",
                               rule="FMT-22")
