"""`convert`: one entry point over the conversion targets, each a module of its own (spec §7,
§10, spec/gptq-awq.md). Every target streams through pipeline.run_steps and publishes its
output atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .checkpoint import GPTQ_FAMILIES, open_checkpoint
from .errors import CtFormatError
from .pipeline import ConvertResult, resolve_device
from .to_dense import convert_to_dense, dense_plan, dequantize_checkpoint
from .to_gptq import convert_to_awq, convert_to_gptq, gptq_to_ct
from .to_marlin import convert_to_ct as marlin_to_ct
from .to_marlin import convert_to_marlin

__all__ = ["TARGETS", "convert", "convert_to_dense", "convert_to_marlin", "convert_to_ct", "convert_to_gptq",
           "convert_to_awq", "dequantize_checkpoint", "dense_plan", "resolve_device", "ConvertResult"]


def convert_to_ct(model: str | Path, out: str | Path, **options: Any) -> ConvertResult:
    """Back to pack-quantized compressed-tensors from the layout the input's family names:
    Marlin (spec §10.10) or GPTQ/AWQ (spec/gptq-awq.md §1.4, §2)."""
    return (gptq_to_ct if _family(model) in GPTQ_FAMILIES else marlin_to_ct)(model, out, **options)


def _family(model: str | Path) -> str | None:
    try:
        return open_checkpoint(model, strict=False).family
    except CtFormatError:
        return None                    # the Marlin path opens it again and says what is wrong


# --to value -> the function that writes it; each takes (model, out, **options)
TARGETS: dict[str, Callable[..., ConvertResult]] = {
    "dense": convert_to_dense,
    "marlin": convert_to_marlin,
    "gptq": convert_to_gptq,
    "awq": convert_to_awq,
    "compressed-tensors": convert_to_ct,
}


def convert(model: str | Path, out: str | Path, *, to: str, **options: Any) -> ConvertResult:
    """Convert MODEL to the layout `to` at OUT; options are the target function's keywords."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; known: {', '.join(TARGETS)}")
    return TARGETS[to](model, out, **options)
