"""The one exception hierarchy of ctformat.

Every error raised on purpose is a ``CtFormatError``. Errors about input that breaks a
numbered rule of ``spec/ctformat.md`` carry that rule ID, the file and the tensor or key
they concern, so the CLI, the validator and the tests all speak the same IDs.
"""
from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CtFormatError", "SpecError", "ConfigError", "HeaderError", "TensorError",
    "UsageError", "UnsupportedError", "CheckpointNotFoundError", "OutputExistsError", "WriterError",
]


class CtFormatError(Exception):
    """Base for every error ctformat raises on purpose."""

    exit_code: ClassVar[int] = 1


class SpecError(CtFormatError, ValueError):
    """Input breaks a numbered rule of spec/ctformat.md."""

    def __init__(self, message: str, *, rule: str, file: str | None = None,
                 where: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule      # e.g. "HDR-04"
        self.file = file      # file the problem is in, as the user named it
        self.where = where    # tensor name, module prefix or JSON key path

    def __str__(self) -> str:
        loc = ": ".join(p for p in (self.file, self.where) if p)
        return f"{loc}: {self.message} [{self.rule}]" if loc else f"{self.message} [{self.rule}]"


class ConfigError(SpecError):
    """config.json or its quantization_config breaks a CFG rule."""


class HeaderError(SpecError):
    """A safetensors header or the shard index breaks a FILE or HDR rule."""


class TensorError(SpecError):
    """A tensor's presence, dtype, shape or content breaks a TEN or DATA rule."""


class UsageError(CtFormatError, ValueError):
    """An option or argument the command cannot take (exit code 2, as click's usage errors)."""

    exit_code: ClassVar[int] = 2


class UnsupportedError(CtFormatError, NotImplementedError):
    """Valid in the wild, but not something ctformat reads or writes (yet)."""


class CheckpointNotFoundError(CtFormatError, FileNotFoundError):
    """The model path does not exist or holds no checkpoint."""


class OutputExistsError(CtFormatError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class WriterError(CtFormatError, RuntimeError):
    """The checkpoint writer was used out of order or fed what its plan did not say."""
