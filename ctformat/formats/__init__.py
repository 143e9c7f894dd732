"""Every compressed-tensors format besides pack-quantized's own codec, one module per family
(spec/formats.md). Importing the package registers the families; nothing imports torch until a
codec runs.

    fmt = format_named("float-quantized")
    specs = fmt.tensors(group, (out, in))        # suffix -> TensorSpec (dtypes, shapes)
    dense = fmt.decompress(tensors, group)       # bit-exact with compressed-tensors 0.20
"""
from __future__ import annotations

from ..errors import ConfigError
from ..spec import FORMATS, SPARSITY_FORMATS
from . import dense, fp4, naive, packed, sparse  # noqa: F401  (registration)
from .format import FAMILIES, Format, TensorSpec

__all__ = ["FAMILIES", "Format", "TensorSpec", "format_named"]


def format_named(name: str, *, where: str = "format") -> type[Format]:
    """The Format class of a wire name (spec.FORMATS, spec.SPARSITY_FORMATS); CFG-03 otherwise."""
    family = (FORMATS.get(name) or SPARSITY_FORMATS.get(name)) if isinstance(name, str) else None
    if family is None:
        raise ConfigError(f"format {name!r} is not one ctformat reads", rule="CFG-03", where=where)
    return FAMILIES[family]
