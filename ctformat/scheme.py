"""quantization_config as frozen data: schemes, config groups, targets/ignore matching (spec §4).

Parsing is lenient (unknown keys are kept and reported as CFG-08, every era's spelling is
accepted); values that cannot mean anything raise ConfigError with their rule. Torch-free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping

from .errors import ConfigError
from .spec import (CROSS_WORD, CROSS_WORD_SINCE, EMBEDDING_NAMES, FLOAT_NAMES, MIXED_PRECISION, PACK_QUANTIZED,
                   PADDED, QUANT_METHOD)

__all__ = ["packed_width", "word_layout", "int_range", "Strategy", "QuantScheme", "QuantGroup", "QuantizationConfig",
           "PRESETS", "parse_version"]


def packed_width(n: int, num_bits: int, layout: str = CROSS_WORD) -> int:
    """int32 words that hold n values of num_bits bits in the given layout (spec §3.3)."""
    if not isinstance(num_bits, int) or isinstance(num_bits, bool) or not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be an integer in 1..8, got {num_bits!r}")
    if layout == PADDED:
        return -(-n // (32 // num_bits))
    if layout != CROSS_WORD:
        raise ValueError(f"layout must be {CROSS_WORD!r} or {PADDED!r}, got {layout!r}")
    return -(-n * num_bits // 32)


def word_layout(num_bits: int, width: int, in_features: int, version: str | None) -> str:
    """Word layout of a module's values (spec §3.3): the packed width decides when it fits only
    one layout; otherwise compressed-tensors >= 0.18 (`version`) wrote cross-word, older padded."""
    if 8 % num_bits == 0:
        return CROSS_WORD                     # both layouts are the same bits
    cross, padded = packed_width(in_features, num_bits, CROSS_WORD), packed_width(in_features, num_bits, PADDED)
    if width == cross != padded:
        return CROSS_WORD
    if width == padded != cross:
        return PADDED
    v = parse_version(version)
    return CROSS_WORD if v is not None and v[:2] >= CROSS_WORD_SINCE else PADDED


def int_range(num_bits: int) -> tuple[int, int]:
    """Signed range of num_bits: int4 -> (-8, 7)."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


class Strategy(str, Enum):
    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    BLOCK = "block"
    TOKEN = "token"
    TENSOR_GROUP = "tensor_group"
    ATTN_HEAD = "attn_head"


_ARGS_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
              "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
_GROUP_KEYS = {"targets", "weights", "input_activations", "output_activations", "format"}
_TOP_KEYS = {"config_groups", "format", "global_compression_ratio", "ignore", "kv_cache_scheme",
             "quant_method", "quantization_status", "version", "sparsity_config", "transform_config",
             "moe_sparsity_config", "run_compressed", "dequantize", "use_optimized_inference"}
# scale_dtype as compressed-tensors writes it: "torch.bfloat16", or the bare name
_SCALE_DTYPES = {None, *FLOAT_NAMES, *(f"torch.{name}" for name in FLOAT_NAMES)}
# True and "dynamic" are the spellings of "group" older compressed-tensors wrote (g_idx stored)
_ACTORDER = {None: None, False: None, "weight": "weight", "static": "static", "group": "group", True: "group",
             "dynamic": "group"}


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """The `weights` arguments of one config group."""

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: Strategy = Strategy.TENSOR
    group_size: int | None = None
    actorder: str | None = None          # None, "weight", "static" or "group" (g_idx stored)
    dynamic: bool = False
    scale_dtype: str | None = None
    zp_dtype: str | None = None
    observer: str | None = None
    unknown: tuple[str, ...] = field(default=(), compare=False)   # keys kept for CFG-08

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> QuantScheme:
        if not isinstance(obj, Mapping):
            raise ConfigError(f"expected an object, got {type(obj).__name__}", rule="CFG-04", where=where)
        num_bits, typ = obj.get("num_bits", 8), obj.get("type", "int")
        if typ != "int" or not isinstance(num_bits, int) or isinstance(num_bits, bool) or not 1 <= num_bits <= 8:
            raise ConfigError(f"type {typ!r} with num_bits {num_bits!r}: pack-quantized stores int 1..8 bits",
                              rule="CFG-05", where=where)
        strategy, group_size = _strategy(obj, where)
        actorder = obj.get("actorder")
        if not isinstance(actorder, (str, bool, type(None))) or actorder not in _ACTORDER:
            raise ConfigError(f"actorder {actorder!r} is not null, false, weight, static, group (or true/dynamic)",
                              rule="CFG-07", where=f"{where}.actorder")
        for key in ("observer", "scale_dtype", "zp_dtype"):
            if not isinstance(obj.get(key), (str, type(None))):
                raise ConfigError(f"{key} {obj.get(key)!r} is not a string or null", rule="CFG-06",
                                  where=f"{where}.{key}")
        if obj.get("scale_dtype") not in _SCALE_DTYPES:
            raise ConfigError(f"scale_dtype {obj.get('scale_dtype')!r}: pack-quantized scales that ctformat reads "
                              "are float16, bfloat16 or float32", rule="CFG-06", where=f"{where}.scale_dtype")
        if obj.get("dynamic", False) not in (False, True, "local"):
            raise ConfigError(f"dynamic {obj.get('dynamic')!r} is not false, true or local", rule="CFG-06",
                              where=f"{where}.dynamic")
        symmetric = obj.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise ConfigError(f"symmetric {symmetric!r} is not a boolean", rule="CFG-06", where=f"{where}.symmetric")
        return cls(num_bits=num_bits, type=typ, symmetric=symmetric, strategy=strategy,
                   group_size=group_size, actorder=_ACTORDER[actorder], dynamic=obj.get("dynamic", False),
                   scale_dtype=obj.get("scale_dtype"), zp_dtype=obj.get("zp_dtype"),
                   observer=obj.get("observer"), unknown=tuple(sorted(set(obj) - _ARGS_KEYS)))

    def to_json(self) -> dict[str, Any]:
        """The args as compressed-tensors >= 0.18 writes them (nulls dropped)."""
        out: dict[str, Any] = {"dynamic": self.dynamic, "group_size": self.group_size, "num_bits": self.num_bits,
                               "strategy": self.strategy.value, "symmetric": self.symmetric, "type": self.type}
        for key in ("actorder", "scale_dtype", "zp_dtype", "observer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return dict(sorted(out.items()))

    @property
    def has_g_idx(self) -> bool:
        return self.actorder == "group"

    def num_groups(self, in_features: int) -> int:
        if self.strategy is Strategy.GROUP:
            return -(-in_features // self.group_size)
        return 1

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        if self.strategy is Strategy.TENSOR:
            return (1,)
        return (out_features, self.num_groups(in_features))


def _strategy(obj: Mapping[str, Any], where: str) -> tuple[Strategy, int | None]:
    """Resolve strategy/group_size the way compressed-tensors infers them (CFG-06)."""
    raw, gs = obj.get("strategy"), obj.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs == 0 or gs < -1):
        raise ConfigError(f"group_size {gs!r} is not a positive integer, -1 or null", rule="CFG-06",
                          where=f"{where}.group_size")
    if raw is None:
        raw = "tensor" if gs is None else "channel" if gs == -1 else "group"
    try:
        strategy = Strategy(raw)
    except ValueError:
        raise ConfigError(f"unknown strategy {raw!r}", rule="CFG-06", where=f"{where}.strategy") from None
    if strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) and (gs is None or gs < 1):
        raise ConfigError(f"strategy {raw} needs a positive group_size, got {gs!r}", rule="CFG-06",
                          where=f"{where}.group_size")
    if gs is not None and gs > 0 and strategy not in (Strategy.GROUP, Strategy.TENSOR_GROUP):
        raise ConfigError(f"group_size {gs} needs strategy group, got {raw}", rule="CFG-06",
                          where=f"{where}.strategy")
    return strategy, gs if strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) else None


# Preset names compressed-tensors accepts as `config_groups` values ({"W4A16": ["Linear"]}).
PRESETS: dict[str, dict[str, Any]] = {
    "W4A16": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128},
    "W4A16_ASYM": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
    "W8A16": {"num_bits": 8, "symmetric": True, "strategy": "channel"},
}


@dataclass(frozen=True, slots=True)
class QuantGroup:
    """One entry of config_groups: which modules, which weight scheme, which format."""

    name: str
    targets: tuple[str, ...]
    weights: QuantScheme | None
    format: str | None = None
    input_activations: Any = None
    unknown: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_json(cls, name: str, obj: Any, *, where: str) -> QuantGroup:
        if isinstance(obj, list) and name in PRESETS:       # {"W4A16": ["Linear"]}
            return cls(name, _strings(obj, f"{where}"), QuantScheme.from_json(PRESETS[name], where=where))
        if not isinstance(obj, Mapping):
            raise ConfigError(f"scheme is a {type(obj).__name__}, not an object", rule="CFG-04", where=where)
        targets = _strings(obj.get("targets"), f"{where}.targets")
        if not targets:
            raise ConfigError("targets is empty", rule="CFG-04", where=f"{where}.targets")
        weights = obj.get("weights")
        return cls(name, targets, None if weights is None else QuantScheme.from_json(weights, where=f"{where}.weights"),
                   obj.get("format"), obj.get("input_activations"), tuple(sorted(set(obj) - _GROUP_KEYS)))


def _strings(obj: Any, where: str) -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise ConfigError(f"expected a list of strings, got {obj!r}", rule="CFG-09", where=where)
    for s in obj:
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as err:
                raise ConfigError(f"pattern {s!r} does not compile: {err}", rule="CFG-09", where=where) from None
    return tuple(obj)


def parse_version(version: Any) -> tuple[int, ...] | None:
    """'0.6.0.20240926' -> (0, 6, 0, 20240926); None when absent or not a version."""
    if not isinstance(version, str):
        return None
    parts = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(p) for p in parts) or None


@dataclass(frozen=True, slots=True)
class QuantizationConfig:
    """config.json["quantization_config"] of a compressed-tensors checkpoint."""

    format: str
    groups: tuple[QuantGroup, ...]
    ignore: tuple[str, ...] = ()
    version: str | None = None
    quantization_status: str | None = None
    unknown: tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "quantization_config") -> QuantizationConfig:
        if not isinstance(obj, Mapping):
            raise ConfigError("quantization_config is not an object", rule="CFG-02", where=where)
        method = obj.get("quant_method")
        if method != QUANT_METHOD:
            raise ConfigError(f"quant_method is {method!r}, not {QUANT_METHOD!r}", rule="CFG-02",
                              where=f"{where}.quant_method")
        groups_obj = obj.get("config_groups")
        if not isinstance(groups_obj, Mapping) or not groups_obj:
            raise ConfigError("config_groups is missing or empty", rule="CFG-04", where=f"{where}.config_groups")
        groups = tuple(QuantGroup.from_json(k, v, where=f"{where}.config_groups.{k}") for k, v in groups_obj.items())
        fmt = obj.get("format")
        cfg = cls(fmt, groups, _strings(obj.get("ignore", []) or [], f"{where}.ignore"), obj.get("version"),
                  obj.get("quantization_status"), tuple(sorted(set(obj) - _TOP_KEYS)))
        for g in groups:
            gfmt = cfg.group_format(g)
            if g.weights is not None and gfmt != PACK_QUANTIZED:
                raise ConfigError(f"format {gfmt!r}: ctformat reads pack-quantized", rule="CFG-03",
                                  where=f"{where}.config_groups.{g.name}.format")
        return cfg

    def group_format(self, group: QuantGroup) -> str | None:
        if group.format is not None:
            return group.format
        return None if self.format == MIXED_PRECISION else self.format

    @property
    def version_tuple(self) -> tuple[int, ...] | None:
        return parse_version(self.version)

    # -- targets and ignore -------------------------------------------------------------
    def is_ignored(self, module: str) -> bool:
        return any(_match(module, pat, linear=False) for pat in self.ignore)

    def group_for(self, module: str, *, linear: bool) -> QuantGroup | None:
        """The config group that targets `module`: exact name beats regex beats class name,
        then the first group in file order (spec §4.3)."""
        best, best_rank = None, 9
        for g in self.groups:
            for t in g.targets:
                rank = _match(module, t, linear=linear)
                if rank and rank < best_rank:
                    best, best_rank = g, rank
        return best


def _match(module: str, target: str, *, linear: bool) -> int:
    """0 when no match, else 1 (exact name), 2 (re: pattern, re.match) or 3 (class name)."""
    if target.startswith("re:"):
        return 2 if re.match(target[3:], module) else 0
    if target == module:
        return 1
    if target == "Linear":
        return 3 if linear else 0
    if target == "Embedding":
        return 3 if module.rsplit(".", 1)[-1] in EMBEDDING_NAMES else 0
    return 0
