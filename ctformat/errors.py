"""The one exception hierarchy of ctformat.

Every error raised on purpose is a ``CtFormatError``. An error that concerns a numbered rule
of ``spec/ctformat.md`` (a broken input, or a valid input a target cannot hold) carries that
rule ID, the file and the tensor or key it concerns, so the CLI, the validator and the tests
all speak the same IDs and nobody parses them out of a message.
"""
from __future__ import annotations

from typing import ClassVar

__all__ = [
    "CtFormatError", "SpecError", "ConfigError", "HeaderError", "TensorError",
    "UsageError", "UnsupportedError", "CheckpointNotFoundError", "OutputExistsError", "WriterError",
    "GGUFRefusal", "GGUFFileError",
    "ResumableError",
]


class CtFormatError(Exception):
    """Base for every error ctformat raises on purpose; `rule` is set when a spec rule applies."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, rule: str | None = None, file: str | None = None,
                 where: str | None = None, option: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.rule = rule      # e.g. "HDR-04", "MCV-03"
        self.file = file      # file the problem is in, as the user named it
        self.where = where    # tensor name, module prefix or JSON key path
        self.option = option  # the keyword argument that would allow it (force, allow_lossy_scales)

    def __str__(self) -> str:
        return self.render()

    def render(self, note: str | None = None) -> str:
        """file: where: message (note) [rule], each part where present."""
        loc = ": ".join(p for p in (self.file, self.where) if p)
        text = f"{loc}: {self.message}" if loc else self.message
        text += f" ({note})" if note else ""
        return f"{text} [{self.rule}]" if self.rule else text

    def __reduce__(self):
        # keyword-only fields survive pickling (a worker process hands its error to the driver)
        return _restore, (type(self), self.args, self.__dict__)


def _restore(cls: type, args: tuple, state: dict) -> CtFormatError:
    err = cls.__new__(cls)
    err.args = args
    err.__dict__.update(state)
    return err


class SpecError(CtFormatError, ValueError):
    """Input breaks a numbered rule of spec/ctformat.md (the rule is required)."""

    def __init__(self, message: str, *, rule: str, file: str | None = None, where: str | None = None) -> None:
        super().__init__(message, rule=rule, file=file, where=where)


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
    """Valid in the wild, but not something ctformat (or the chosen target) reads or writes;
    refusals of a conversion carry their rule (MCV-..)."""


class GGUFRefusal(UnsupportedError):
    """A model or module `convert --to gguf` cannot write exactly (spec/gguf.md §7); carries a
    GCV rule of spec.GGUF_REFUSALS."""

    def __init__(self, message: str, *, rule: str, where: str | None = None, option: str | None = None) -> None:
        super().__init__(message, rule=rule, where=where, option=option)


class GGUFFileError(SpecError):
    """A .gguf file that breaks a GGUF rule of spec/gguf.md §8 (reading)."""


class CheckpointNotFoundError(CtFormatError, FileNotFoundError):
    """The model path does not exist or holds no checkpoint (FILE-01 for a model path)."""


class OutputExistsError(CtFormatError, FileExistsError):
    """The output path exists and overwriting was not asked for."""


class WriterError(CtFormatError, RuntimeError):
    """The checkpoint writer was used out of order or fed what its plan did not say."""


class ResumableError(CtFormatError, OSError):
    """The run stopped for a reason outside the input (no space left, an I/O error, workers
    that kept dying): the pieces finished so far stay in the temporary folder for --resume."""
