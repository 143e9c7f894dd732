"""Every compressed-tensors format besides pack-quantized, one module per family
(spec/formats.md). Importing the package registers them in FORMATS; nothing imports torch
until a codec runs.

    fmt = format_named("float-quantized")
    specs = fmt.tensors(scheme, (out, in))       # suffix -> TensorSpec (dtypes, shapes)
    dense = fmt.decompress(tensors, scheme)      # bit-exact with compressed-tensors 0.20
"""
from __future__ import annotations

from . import dense, fp4, naive, packed, sparse  # noqa: F401  (registration)
from .args import QuantArgs, Scheme
from .format import FORMATS, Format, TensorSpec, effective_format, format_named

__all__ = ["FORMATS", "Format", "TensorSpec", "QuantArgs", "Scheme", "format_named", "effective_format"]
