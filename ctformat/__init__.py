"""ctformat: read, check, dequantize and convert compressed-tensors checkpoints.

`import ctformat` stays light: torch-backed names load on first use (PEP 562), so
inspect and validate of a checkpoint never import torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from ._version import __version__
from .errors import (CheckpointNotFoundError, ConfigError, CtFormatError, HeaderError, OutputExistsError,
                     SpecError, TensorError, UnsupportedError, UsageError, WriterError)
from .extras import MissingDependencyError
from .header import TensorInfo
from .scheme import QuantGroup, QuantizationConfig, QuantScheme, Strategy

# name -> module that defines it, imported on first use
_LAZY = {
    "pack_to_int32": "pack", "unpack_from_int32": "pack", "packed_width": "scheme",
    "quantize": "quant", "dequantize": "quant", "calculate_qparams": "quant", "compress": "codec",
    "decompress": "codec", "format_named": "formats",
    "open_checkpoint": "checkpoint", "Checkpoint": "checkpoint", "Module": "checkpoint",
    "open_model": "source", "open_hub_checkpoint": "hub", "dequantize_module": "dequant",
    "CheckpointWriter": "writer", "save_checkpoint": "writer",
    "validate_checkpoint": "validate", "Report": "report", "Issue": "report",
    "summarize": "summary",
    "convert_to_dense": "convert", "convert_to_marlin": "convert", "convert_to_ct": "convert",
    "dequantize_checkpoint": "convert", "ConvertResult": "pipeline",
    "QuantLinear": "linear", "QuantExperts": "linear", "load_model": "inference", "ReferenceModel": "inference",
}

__all__ = [
    "__version__", "CtFormatError", "SpecError", "ConfigError", "HeaderError", "TensorError", "UnsupportedError",
    "UsageError", "MissingDependencyError",
    "CheckpointNotFoundError", "OutputExistsError", "WriterError", "TensorInfo", "QuantScheme",
    "QuantGroup", "QuantizationConfig", "Strategy", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ctformat' has no attribute {name!r}")
