"""quantization_config read for every format: config groups with their own format, the legacy
sparsity_config, kv_cache_scheme and transform_config (spec/formats.md §1). Torch-free.

Targets and ignore are matched exactly as for pack-quantized (ctformat.scheme, spec §4.3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ConfigError
from ..scheme import _match
from ..spec import MIXED_PRECISION, QUANT_METHOD
from .args import QuantArgs, Scheme
from .format import Format, effective_format, format_named

__all__ = ["FormatGroup", "FormatConfig"]


@dataclass(frozen=True, slots=True)
class FormatGroup:
    """One config group (or the legacy sparsity block): targets, args and its own format."""

    name: str
    targets: tuple[str, ...]
    scheme: Scheme
    format: type[Format]
    format_name: str = ""               # the wire name (float-quantized and naive-quantized share a class)
    ignore: tuple[str, ...] = ()        # a sparsity block's own ignore list


@dataclass(frozen=True)
class FormatConfig:
    groups: tuple[FormatGroup, ...]
    ignore: tuple[str, ...] = ()
    sparsity: FormatGroup | None = None          # legacy sparse-bitmask / sparse-24-bitmask
    kv_cache: QuantArgs | None = None
    transforms: Mapping[str, Any] = field(default_factory=dict)
    top_format: str | None = None

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "quantization_config") -> FormatConfig:
        if not isinstance(obj, Mapping) or obj.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"quant_method is not {QUANT_METHOD!r}", rule="CFG-02", where=f"{where}.quant_method")
        top = obj.get("format")
        groups = []
        for name, g in (obj.get("config_groups") or {}).items():
            gw = f"{where}.config_groups.{name}"
            if not isinstance(g, Mapping) or not isinstance(g.get("targets"), list):
                raise ConfigError("a config group is an object with a list of targets", rule="CFG-04", where=gw)
            scheme = Scheme.from_json(g, where=gw)
            fmt_name = effective_format(g, top)
            if fmt_name is None or fmt_name == MIXED_PRECISION:
                raise ConfigError(f"no format for this group (top-level format {top!r})", rule="FMT-01",
                                  where=f"{gw}.format")
            fmt = format_named(fmt_name, where=f"{gw}.format")
            why = fmt.misfit(scheme) if scheme.weights is not None else None
            if why:
                raise ConfigError(f"format {fmt_name!r}: {why}", rule="FMT-01", where=f"{gw}.format")
            groups.append(FormatGroup(name, tuple(g["targets"]), scheme, fmt, fmt_name))
        kv = obj.get("kv_cache_scheme")
        return cls(tuple(groups), tuple(obj.get("ignore") or ()), _sparsity(obj.get("sparsity_config"), where),
                   None if kv is None else QuantArgs.from_json(kv, where=f"{where}.kv_cache_scheme"),
                   obj.get("transform_config") or {}, top)

    def is_ignored(self, module: str) -> bool:
        return any(_match(module, pat, linear=False) for pat in self.ignore)

    def group_for(self, module: str, *, linear: bool) -> FormatGroup | None:
        """The group that targets `module` (exact beats re: beats class; then file order), or,
        for a checkpoint with only a sparsity_config, that block."""
        best, rank_best = None, 9
        for g in self.groups:
            for t in g.targets:
                rank = _match(module, t, linear=linear)
                if rank and rank < rank_best:
                    best, rank_best = g, rank
        return best

    def sparse_for(self, module: str, *, linear: bool) -> FormatGroup | None:
        """The legacy sparsity block, when it targets `module` and its ignore does not."""
        s = self.sparsity
        if s is None or any(_match(module, p, linear=False) for p in s.ignore):
            return None
        return s if any(_match(module, t, linear=linear) for t in s.targets) else None


def _sparsity(obj: Any, where: str) -> FormatGroup | None:
    if not obj or not isinstance(obj, Mapping) or obj.get("format") in (None, "dense"):
        return None
    fmt = format_named(obj["format"], where=f"{where}.sparsity_config.format")
    return FormatGroup("sparsity_config", tuple(obj.get("targets") or ()), Scheme(), fmt, obj["format"],
                       tuple(obj.get("ignore") or ()))
