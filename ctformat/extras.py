"""Optional dependencies: each belongs to an extra of the ctformat package, and a feature that
needs one that is missing says, in one line, which extra to install (exit code 1, no traceback)."""
from __future__ import annotations

from importlib.util import find_spec

from .errors import CtFormatError

__all__ = ["EXTRAS", "MissingDependencyError", "require"]

# importable module -> (pyproject extra that installs it, what it is needed for)
EXTRAS: dict[str, tuple[str, str]] = {
    "transformers": ("inference", "run and compare (reference inference)"),
    "triton": ("gpu", "the GPU kernels (and their CPU interpreter)"),
    "gguf": ("gguf", "convert --to gguf"),
    "ray": ("ray", "conversions on a Ray cluster (convert --ray)"),
}


class MissingDependencyError(CtFormatError, ImportError):
    """An optional dependency a feature needs is not installed."""


def require(module: str) -> None:
    """Raise MissingDependencyError naming the extra when `module` cannot be imported."""
    if find_spec(module) is None:
        extra, purpose = EXTRAS[module]
        raise MissingDependencyError(f"{module} is not installed; {purpose} need it: "
                                     f"pip install 'ctformat[{extra}]'")
