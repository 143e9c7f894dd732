"""One table of compressed-tensors formats: a format registers where it is declared.

A Format subclass names its wire values (`class Naive(Format, names=("naive-quantized", ...))`)
and says, as data, which tensors a module of that format holds for a scheme and a dense shape
(`tensors`), which dense shape a stored module has (`dense_shape`), and whether it fits a
scheme's args (`misfit`). Its codec (`decompress`, `compress`) imports torch when called; nothing
here does. spec/formats.md is the prose of every table.
"""
from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

from ..errors import ConfigError, UnsupportedError
from ..spec import DTYPE_SIZES, MIXED_PRECISION
from .args import FLOAT_CODES, Scheme

if TYPE_CHECKING:
    import torch

__all__ = ["TensorSpec", "Format", "FORMATS", "format_named", "effective_format", "use_triton", "FLOAT_CODES"]


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


FORMATS: dict[str, type[Format]] = {}


class Format:
    """A compressed-tensors `format`: its tensor set as data, and its codec."""

    names: ClassVar[tuple[str, ...]] = ()
    root: ClassVar[str] = "weight"           # the tensor that marks a module of this format
    decodable: ClassVar[bool] = True
    header_rules: ClassVar[bool] = True       # checked by rules.check_module (pack-quantized: TEN rules)

    def __init_subclass__(cls, *, names: tuple[str, ...] = (), **kw: Any) -> None:
        super().__init_subclass__(**kw)
        cls.names = names
        for name in names:
            if name in FORMATS:
                raise TypeError(f"format {name!r} is registered twice ({FORMATS[name].__name__}, {cls.__name__})")
            FORMATS[name] = cls

    # -- tables -----------------------------------------------------------------------------
    @classmethod
    def misfit(cls, scheme: Scheme) -> str | None:
        """Why the scheme's weight args cannot be stored in this format (FMT-01), or None."""
        return None

    @classmethod
    def tensors(cls, scheme: Scheme, shape: Sequence[int]) -> dict[str, TensorSpec]:
        """Suffix -> spec of every tensor a module of dense `shape` ([out, in] or [E, out, in])
        holds; `required=False` ones may be absent. bias is always allowed and not listed."""
        raise NotImplementedError

    @classmethod
    def dense_shape(cls, shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
        """The dense weight shape implied by a module's stored shapes (suffix -> shape)."""
        return tuple(shapes[cls.root])

    @classmethod
    def bits_per_weight(cls, scheme: Scheme, shape: Sequence[int]) -> float:
        """Stored bits of the weight and its qparams per dense parameter (spec/formats.md §7)."""
        specs = cls.tensors(scheme, shape)
        stored = sum(s.nbytes() for k, s in specs.items()
                     if s.required and not k.startswith(("input_", "output_")))
        return 8 * stored / prod(shape)

    # -- codec ------------------------------------------------------------------------------
    @classmethod
    def decompress(cls, tensors: Mapping[str, torch.Tensor], scheme: Scheme,
                   dtype: torch.dtype | None = None, *, kernel: str = "auto") -> torch.Tensor:
        """Dense weight from a module's tensors (local names), bit-exact with compressed-tensors;
        `dtype` casts its result; `kernel` as use_triton."""
        raise UnsupportedError(f"format {cls.names[0]!r} cannot be dequantized")

    @classmethod
    def compress(cls, weight: torch.Tensor, scheme: Scheme, **qparams: Any) -> dict[str, torch.Tensor]:
        raise UnsupportedError(f"format {cls.names[0]!r} cannot be written")


def format_named(name: str, *, where: str = "format") -> type[Format]:
    """The Format class of a wire name; FMT-01 for names this package does not cover."""
    from . import dense, fp4, naive, packed, sparse  # noqa: F401  (each registers its formats)
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ConfigError(f"format {name!r} is not one ctformat reads (known: {', '.join(sorted(FORMATS))})",
                          rule="FMT-01", where=where) from None


def effective_format(group: Mapping[str, Any], top_format: str | None) -> str | None:
    """A config group's own format, else the top-level one unless that is mixed-precision."""
    own = group.get("format") if isinstance(group, Mapping) else None
    if own is not None:
        return own
    return None if top_format == MIXED_PRECISION else top_format


def use_triton(kernel: str, tensor: torch.Tensor) -> bool:
    """kernel "torch", "triton" (CUDA, or the CPU under TRITON_INTERPRET=1) or "auto" (triton for
    CUDA tensors when it is installed). Both give the same bits."""
    if kernel not in ("auto", "torch", "triton"):
        raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
    if kernel != "auto":
        return kernel == "triton"
    from importlib.util import find_spec
    return tensor.device.type == "cuda" and find_spec("triton") is not None


def leading(shape: Sequence[int]) -> tuple[int, ...]:
    """Expert dimensions in front of [out, in]."""
    return tuple(shape[:-2])


def per_tensor(lead: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Shapes a per-tensor quantity may have: [1]; stacked, [E, 1] or a shared [1]."""
    return ((*lead, 1), (1,)) if lead else ((1,),)
