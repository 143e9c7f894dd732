"""ctformat: read, check, dequantize and convert compressed-tensors checkpoints.

`import ctformat` stays light: torch-backed names load on first use (PEP 562), so
inspect and validate of a checkpoint never import torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .errors import (CheckpointNotFoundError, ConfigError, CtFormatError, HeaderError, OutputExistsError,
                     SpecError, TensorError, UnsupportedError, WriterError)
from .header import TensorInfo
from .scheme import QuantGroup, QuantizationConfig, QuantScheme, Strategy

__version__ = "0.1.0"

_LAZY = {
    "pack_to_int32": "pack", "unpack_from_int32": "pack", "packed_width": "scheme",
    "quantize": "quant", "dequantize": "quant", "calculate_qparams": "quant", "compress": "quant",
    "decompress": "quant",
    "open_checkpoint": "checkpoint", "Checkpoint": "checkpoint", "Module": "checkpoint",
    "CheckpointWriter": "checkpoint", "save_checkpoint": "checkpoint",
    "validate_checkpoint": "validate", "Report": "validate", "Issue": "validate",
    "summarize": "summary", "Summary": "summary",
    "open_hub_checkpoint": "hub", "convert_to_dense": "convert", "dequantize_checkpoint": "convert",
    "QuantLinear": "linear", "QuantExperts": "linear", "load_model": "inference", "ReferenceModel": "inference",
}

__all__ = [
    "CtFormatError", "SpecError", "ConfigError", "HeaderError", "TensorError", "UnsupportedError",
    "CheckpointNotFoundError", "OutputExistsError", "WriterError", "TensorInfo", "QuantScheme",
    "QuantGroup", "QuantizationConfig", "Strategy", *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'ctformat' has no attribute {name!r}")
