"""The base of the format families: each family class registers under the family name that
spec.FORMATS (and SPARSITY_FORMATS) give its wire names (ctformat.formats.format_named).

A Format says, as data, which tensors a module of that format holds for a config group and a
dense shape (`tensors`) and which dense shape a stored module has (`dense_shape`). Its codec
(`decompress`, `compress`) imports torch when called; nothing here does. Which args a format can
hold is the config's business (scheme.format_misfit). spec/formats.md is the prose of every table.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from ..errors import UnsupportedError
from ..scheme import QuantGroup, QuantScheme
from ..spec import DTYPE_SIZES

if TYPE_CHECKING:
    import torch

__all__ = ["TensorSpec", "Format", "FAMILIES", "leading", "per_tensor", "weights_of"]


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """What one tensor of a module must be: one of `dtypes`, one of `shapes`."""

    dtypes: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    required: bool = True

    @property
    def shape(self) -> tuple[int, ...]:
        return self.shapes[0]

    def nbytes(self) -> int:
        return DTYPE_SIZES[self.dtypes[0]] * prod(self.shape)


FAMILIES: dict[str, type[Format]] = {}      # family name of spec.FORMATS -> its class


class Format:
    """A compressed-tensors format family: its tensor set as data, and its codec."""

    family: ClassVar[str] = ""
    root: ClassVar[str] = "weight"           # the tensor that holds the weight's values
    decodable: ClassVar[bool] = True

    def __init_subclass__(cls, *, family: str = "", **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.family = family
        if family:
            if family in FAMILIES:
                raise TypeError(f"family {family!r} is registered twice")
            FAMILIES[family] = cls

    # -- tables -----------------------------------------------------------------------------
    @classmethod
    def tensors(cls, group: QuantGroup | None, shape: Sequence[int]) -> dict[str, TensorSpec]:
        """Suffix -> spec of every tensor a module of dense `shape` ([out, in] or [E, out, in])
        holds; `required=False` ones may be absent. bias is always allowed and not listed."""
        raise NotImplementedError

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """The dense weight shape implied by a module's stored shapes (suffix -> shape)."""
        return tuple(shapes[cls.root])

    @classmethod
    def bits_per_weight(cls, group: QuantGroup, shape: Sequence[int]) -> float:
        """Stored bits of the weight and its qparams per dense parameter (spec/formats.md §7)."""
        specs = cls.tensors(group, shape)
        stored = sum(s.nbytes() for k, s in specs.items()
                     if s.required and not k.startswith(("input_", "output_")))
        return 8 * stored / prod(shape)

    # -- codec ------------------------------------------------------------------------------
    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], group: QuantGroup | None,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        """Dense weight from a module's tensors (local names), bit-exact with compressed-tensors;
        `dtype` casts its result; `kernel` as backend.use_triton."""
        raise UnsupportedError(f"format family {cls.family!r} cannot be dequantized")

    @classmethod
    def compress(cls, weight: torch.Tensor, group: QuantGroup, **qparams: Any) -> dict[str, torch.Tensor]:
        raise UnsupportedError(f"format family {cls.family!r} cannot be written")


def weights_of(group: QuantGroup | None) -> QuantScheme | None:
    return None if group is None else group.weights


def leading(shape: Sequence[int]) -> tuple[int, ...]:
    """Expert dimensions in front of [out, in]."""
    return tuple(shape[:-2])


def per_tensor(lead: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Shapes a per-tensor quantity may have: [1]; stacked, [E, 1] or a shared [1]."""
    return ((*lead, 1), (1,)) if lead else ((1,),)
