"""What validation finds: Issue (one finding, with its rule of spec §6) and Report (all of them).
The rule IDs' default severities and the error class each maps to live here, in one table."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, GGUFFileError, HeaderError, SpecError, TensorError
from .spec import RULES

if TYPE_CHECKING:
    from .checkpoint import Module

__all__ = ["Issue", "Report", "issue", "module_issue"]

# rule prefix -> the error an operation raises for it
ERROR_CLASS = {"FILE": HeaderError, "HDR": HeaderError, "CFG": ConfigError, "TEN": TensorError, "DATA": TensorError,
               "VLLM": ConfigError, "TRF": ConfigError, "MRL": TensorError, "GGUF": GGUFFileError, "FMT": TensorError,
               "KV": TensorError, "XFM": TensorError}
# rules of those prefixes that judge the config alone
CONFIG_RULES = frozenset({"FMT-01", "FMT-02", "FMT-03", "FMT-04", "FMT-20", "KV-01", "XFM-01"})


@dataclass(frozen=True, slots=True)
class Issue:
    rule: str              # "TEN-04": spec/ctformat.md §6
    severity: str          # "error" or "warning"
    file: str | None       # file the problem is in
    where: str | None      # tensor, module or JSON key
    message: str           # what was expected and what was found

    def as_error(self) -> SpecError:
        cls = ConfigError if self.rule in CONFIG_RULES else ERROR_CLASS[self.rule.split("-")[0]]
        return cls(self.message, rule=self.rule, file=self.file, where=self.where)

    @classmethod
    def from_error(cls, err: SpecError) -> Issue:
        return cls(err.rule, RULES[err.rule][0], err.file, err.where, err.message)

    def __str__(self) -> str:
        return str(self.as_error())


def issue(rule: str, file: str | None, where: str | None, message: str) -> Issue:
    """An Issue with its rule's default severity."""
    return Issue(rule, RULES[rule][0], file, where, message)


def module_issue(rule: str, module: Module, suffix: str | None, message: str) -> Issue:
    """An issue about a module (or one of its tensors), in the file that holds it."""
    t = module.tensors.get(suffix) if suffix else None
    where = f"{module.prefix}.{suffix}" if suffix else module.prefix
    file = t.file if t is not None else next(iter(module.tensors.values())).file
    return issue(rule, file, where, message)


@dataclass(frozen=True, slots=True)
class Report:
    path: str
    issues: tuple[Issue, ...]
    modules_checked: int = 0
    deep: bool = False
    rules_checked: tuple[str, ...] = field(default=tuple(r for r in RULES if not r.startswith("GGUF-")))
    gguf: bool = False           # a GGUF file: modules_checked counts its tensors (headers only)

    @property
    def errors(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "error")

    @property
    def warnings(self) -> tuple[Issue, ...]:
        return tuple(i for i in self.issues if i.severity == "warning")

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        doc = {"schema": "ctformat.validate/1", "path": self.path, "ok": self.ok, "deep": self.deep,
               "modules_checked": self.modules_checked, "errors": len(self.errors),
               "warnings": len(self.warnings), "issues": [asdict(i) for i in self.issues]}
        if self.gguf:
            doc = dict(doc, format="gguf", modules_checked=0, tensors_checked=self.modules_checked)
        return doc
