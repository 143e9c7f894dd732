"""`convert`: one entry point over the conversion targets, each a module of its own (spec §7,
§10). Every target streams through pipeline.run_steps and publishes its output atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .pipeline import ConvertResult, resolve_device
from .to_dense import convert_to_dense, dense_plan, dequantize_checkpoint
from .to_gguf import convert_to_gguf
from .to_marlin import convert_to_ct, convert_to_marlin

__all__ = ["TARGETS", "convert", "convert_to_dense", "convert_to_marlin", "convert_to_ct", "convert_to_gguf",
           "dequantize_checkpoint",
           "dense_plan", "resolve_device", "ConvertResult"]

# --to value -> the function that writes it; each takes (model, out, **options)
TARGETS: dict[str, Callable[..., ConvertResult]] = {
    "dense": convert_to_dense,
    "marlin": convert_to_marlin,
    "compressed-tensors": convert_to_ct,
    "gguf": convert_to_gguf,
}


def convert(model: str | Path, out: str | Path, *, to: str, **options: Any) -> ConvertResult:
    """Convert MODEL to the layout `to` at OUT; options are the target function's keywords."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; known: {', '.join(TARGETS)}")
    return TARGETS[to](model, out, **options)
