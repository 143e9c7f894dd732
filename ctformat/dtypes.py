"""safetensors dtype codes <-> torch dtypes, from the one table in spec.DTYPES."""
from __future__ import annotations

import torch

from .spec import DTYPES, FLOAT_NAMES

__all__ = ["torch_dtype", "dtype_code", "float_dtype", "dtype_name"]

_BY_NAME = {name: code for code, (_, name) in DTYPES.items()}


def torch_dtype(code: str) -> torch.dtype:
    """"BF16" -> torch.bfloat16."""
    return getattr(torch, DTYPES[code][1])


def dtype_code(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "BF16"."""
    code = _BY_NAME.get(dtype_name(dtype))
    if code is None:
        raise ValueError(f"no safetensors dtype for {dtype}")
    return code


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16", as config.json and the command line spell it."""
    return str(dtype).removeprefix("torch.")


def float_dtype(name: str) -> torch.dtype:
    """"bfloat16" or "torch.bfloat16" (an option, a scale_dtype) -> torch.bfloat16."""
    bare = name.removeprefix("torch.")
    if bare not in FLOAT_NAMES:
        raise ValueError(f"{name!r} is not one of {', '.join(FLOAT_NAMES)}")
    return torch_dtype(FLOAT_NAMES[bare])
