"""Which implementation runs a tensor operation: a Triton kernel (on CUDA, or on the CPU under
TRITON_INTERPRET=1) or its torch twin. Both give the same bits (spec §5.1); `kernel` is
"auto" (Triton for CUDA tensors when Triton is installed), "torch" or "triton"."""
from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING

from .errors import UnsupportedError
from .extras import require

if TYPE_CHECKING:
    import torch

__all__ = ["KERNELS", "use_triton"]

KERNELS = ("auto", "torch", "triton")


def use_triton(kernel: str, tensor: torch.Tensor, *, fits: bool = True, what: str = "this kernel") -> bool:
    """Whether to run the Triton kernel; `fits` says whether it handles this case at all
    (asked for explicitly when it does not: an error naming `what` it lacks)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be auto, torch or triton, got {kernel!r}")
    if kernel == "triton":
        if not fits:
            raise UnsupportedError(f"the triton kernel does not handle {what}")
        require("triton")
        return True
    return kernel == "auto" and fits and tensor.device.type == "cuda" and find_spec("triton") is not None
