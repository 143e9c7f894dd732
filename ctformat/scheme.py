"""quantization_config as frozen data: schemes, config groups, targets/ignore matching (spec §4).

Parsing is lenient (unknown keys are kept and reported as CFG-08, every era's spelling is
accepted); values that cannot mean anything raise ConfigError with their rule. Torch-free.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache
from itertools import repeat
from operator import itemgetter, or_
from typing import Any, Mapping, Sequence

from .errors import ConfigError
from .spec import (CROSS_WORD, CROSS_WORD_SINCE, DENSE_FORMAT, DTYPES, EMBEDDING_NAMES, FLOAT_DTYPES, FORMATS,
                   MIXED_PRECISION, OFFLINE_LOCATIONS, ONLINE_LOCATIONS, PACK_QUANTIZED, PADDED, QUANT_METHOD,
                   SPARSITY_FORMATS, TRANSFORM_TYPES, UNREAD_FORMATS)

__all__ = ["packed_width", "word_layout", "int_range", "Strategy", "QuantScheme", "QuantGroup", "QuantizationConfig",
           "Transform", "Sparsity", "PRESETS", "parse_version", "format_misfit", "inferred_format", "MX_GROUP", "E8M0",
           "FLOAT_CODES"]


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
# torch dtype names compressed-tensors writes for scale_dtype / zp_dtype ("torch.float8_e4m3fn",
# or the bare name) -> safetensors code
_DTYPE_CODES = {name: code for code, (_, name) in DTYPES.items()} | {"half": "F16", "float": "F32", "double": "F64"}
# True and "dynamic" are the spellings of "group" older compressed-tensors wrote (g_idx stored)
_ACTORDER = {None: None, False: None, "weight": "weight", "static": "static", "group": "group", True: "group",
             "dynamic": "group"}
_DYNAMIC_OK = (Strategy.TOKEN, Strategy.TENSOR, Strategy.TENSOR_GROUP, Strategy.GROUP)
_ACTIVATION_ROLES = ("input_activations", "output_activations", "kv_cache_scheme")
MX_GROUP = 32                   # group size of the MX formats (E8M0 scales)
E8M0 = "U8"                     # MX scales: biased exponents in bytes
FLOAT_CODES = tuple(sorted(FLOAT_DTYPES, key=("F16", "BF16", "F32", "F64").index))


def _fmt02(msg: str, where: str) -> ConfigError:
    return ConfigError(msg, rule="FMT-02", where=where)


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """One set of quantization args: a group's `weights`, `input_activations` or
    `output_activations`, or the `kv_cache_scheme` (spec §4.1, spec/formats.md §1.3)."""

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: Strategy = Strategy.TENSOR
    group_size: int | None = None
    actorder: str | None = None          # None, "weight", "static" or "group" (g_idx stored)
    dynamic: bool | str = False          # False, True or "local"
    scale_dtype: str | None = None       # safetensors code ("BF16", "F8_E4M3", "U8"), as scale_dtype names it
    zp_dtype: str | None = None          # safetensors code, as written; zero_point_dtype has the default
    observer: str | None = None
    block_structure: tuple[int, int] | None = None
    unknown: tuple[str, ...] = field(default=(), compare=False)   # keys kept for CFG-08

    @classmethod
    def from_json(cls, obj: Any, *, where: str, role: str = "weights") -> QuantScheme:
        """Args as compressed-tensors' quant_args.py reads them; `role` is the key they sit
        under (activation args may be token-dynamic, weight args may not)."""
        if not isinstance(obj, Mapping):
            raise ConfigError(f"expected an object, got {type(obj).__name__}", rule="CFG-04", where=where)
        num_bits, typ = obj.get("num_bits", 8), obj.get("type", "int")
        typ = typ.lower() if isinstance(typ, str) else typ
        bits_ok = isinstance(num_bits, int) and not isinstance(num_bits, bool)
        if not bits_ok or not (typ == "int" and 1 <= num_bits <= 8 or typ == "float" and num_bits in (4, 8)):
            why = (" (MXFP6 and other 6-bit floats are not read)" if typ == "float" and num_bits == 6 else "")
            raise ConfigError(f"type {obj.get('type', 'int')!r} with num_bits {num_bits!r}: ctformat reads int 1..8 "
                              f"and float 4 or 8 bits{why}", rule="CFG-05", where=where)
        strategy, group_size = _strategy(obj, where)
        actorder = obj.get("actorder")
        if not isinstance(actorder, (str, bool, type(None))) or actorder not in _ACTORDER:
            raise ConfigError(f"actorder {actorder!r} is not null, false, weight, static, group (or true/dynamic)",
                              rule="CFG-07", where=f"{where}.actorder")
        for key in ("observer", "scale_dtype", "zp_dtype"):
            if not isinstance(obj.get(key), (str, type(None))):
                raise ConfigError(f"{key} {obj.get(key)!r} is not a string or null", rule="CFG-06",
                                  where=f"{where}.{key}")
        dynamic = obj.get("dynamic", False)
        dynamic = dynamic.lower() if isinstance(dynamic, str) else dynamic
        if dynamic not in (False, True, "local"):
            raise ConfigError(f"dynamic {obj.get('dynamic')!r} is not false, true or local", rule="CFG-06",
                              where=f"{where}.dynamic")
        symmetric = obj.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise ConfigError(f"symmetric {symmetric!r} is not a boolean", rule="CFG-06", where=f"{where}.symmetric")
        block = _block(obj.get("block_structure"), f"{where}.block_structure")
        _check_fields(strategy, block, dynamic, role, where)
        observer = obj.get("observer")
        return cls(num_bits=num_bits, type=typ, symmetric=symmetric, strategy=strategy,
                   group_size=group_size, actorder=_ACTORDER[actorder], dynamic=dynamic,
                   scale_dtype=_dtype_code(obj.get("scale_dtype"), f"{where}.scale_dtype"),
                   zp_dtype=_dtype_code(obj.get("zp_dtype"), f"{where}.zp_dtype"), observer=observer,
                   block_structure=block, unknown=tuple(sorted(set(obj) - _ARGS_KEYS)))

    def to_json(self) -> dict[str, Any]:
        """The args as compressed-tensors >= 0.18 writes them (nulls dropped, torch dtype names)."""
        out: dict[str, Any] = {"dynamic": self.dynamic, "group_size": self.group_size, "num_bits": self.num_bits,
                               "strategy": self.strategy.value, "symmetric": self.symmetric, "type": self.type}
        for key in ("actorder", "observer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        for key in ("scale_dtype", "zp_dtype"):
            if getattr(self, key) is not None:
                out[key] = f"torch.{DTYPES[getattr(self, key)][1]}"
        if self.block_structure is not None:
            out["block_structure"] = list(self.block_structure)
        return dict(sorted(out.items()))

    # -- what the args imply (spec/formats.md §1.3) ---------------------------------------
    @property
    def has_g_idx(self) -> bool:
        return self.actorder == "group"

    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def is_mx(self) -> bool:
        """MX args: E8M0 power-of-two scales (compressed-tensors should_generate_mx_scales)."""
        return self.is_float and self.group_size == MX_GROUP and self.scale_dtype == E8M0

    @property
    def value_dtype(self) -> str:
        """Dtype of unpacked values (compressed-tensors pytorch_dtype): F8_E4M3 or I8."""
        return "F8_E4M3" if self.is_float else "I8"

    @property
    def zero_point_dtype(self) -> str:
        """zp_dtype, or the default compressed-tensors fills in."""
        if self.zp_dtype is not None:
            return self.zp_dtype
        return "F8_E4M3" if self.is_float and self.num_bits == 4 else self.value_dtype

    @property
    def has_global_scale(self) -> bool:
        return self.strategy is Strategy.TENSOR_GROUP and self.dynamic is not True

    @property
    def has_static_scale(self) -> bool:
        return self.dynamic is False

    def q_range(self) -> tuple[float, float]:
        """(q_min, q_max): the int range, or the float type's finite range."""
        if not self.is_float:
            lo, hi = int_range(self.num_bits)
            return float(lo), float(hi)
        top = {4: 6.0, 8: 448.0}[self.num_bits]
        return -top, top

    def num_groups(self, in_features: int) -> int:
        if self.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP):
            return -(-in_features // self.group_size)
        return 1

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """weight_scale shape of a 2-D [out, in] weight (spec §2, spec/formats.md §3.1)."""
        if self.strategy is Strategy.TENSOR:
            return (1,)
        if self.strategy is Strategy.BLOCK:
            bh, bw = self.block_structure
            return (-(-out_features // bh), -(-in_features // bw))
        if self.strategy in (Strategy.TOKEN, Strategy.ATTN_HEAD):
            raise ValueError(f"strategy {self.strategy.value} has no weight scale")
        return (out_features, self.num_groups(in_features))

    def activation_shape(self, in_features: int) -> tuple[int, ...]:
        """input_scale shape over [in] for static activations (spec/formats.md §1.3)."""
        if self.strategy is Strategy.TENSOR:
            return (1,)
        if self.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP):
            return (-(-in_features // self.group_size),)
        raise ValueError(f"strategy {self.strategy.value} has no static activation scale")

    def words(self) -> str:
        """"int4 symmetric group 128", "float8 channel dynamic": for messages and inspect."""
        sym = "" if self.is_float else " symmetric" if self.symmetric else " asymmetric"
        size = (f" {self.group_size}" if self.group_size else
                f" {self.block_structure[0]}x{self.block_structure[1]}" if self.block_structure else "")
        dyn = {True: " dynamic", "local": " dynamic local", False: ""}[self.dynamic]
        return f"{self.type}{self.num_bits}{sym} {self.strategy.value}{size}{dyn}"


def _dtype_code(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    code = _DTYPE_CODES.get(value.removeprefix("torch."))
    if code is None:
        raise ConfigError(f"{value!r} is not a torch dtype name", rule="CFG-06", where=where)
    return code


def _block(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):          # the "128x128" spelling compressed-tensors accepts
        try:
            value = [int(v) for v in value.split("x")]
        except ValueError:
            raise _fmt02(f"block_structure {value!r} is not BHxBW", where) from None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _fmt02(f"block_structure {value!r} is not two positive integers", where)
    return int(value[0]), int(value[1])


def _check_fields(strategy: Strategy, block, dynamic, role: str, where: str) -> None:
    """The fields the formats besides pack-quantized use, checked together (FMT-02)."""
    if (block is None) != (strategy is not Strategy.BLOCK):
        raise _fmt02(f"block_structure {list(block) if block else None} with strategy {strategy.value}: one needs "
                     "the other", f"{where}.block_structure")
    if dynamic and strategy not in _DYNAMIC_OK or dynamic == "local" and strategy is not Strategy.TENSOR_GROUP:
        raise _fmt02(f"dynamic {dynamic!r} with strategy {strategy.value}", f"{where}.dynamic")
    if strategy is Strategy.TOKEN and not dynamic:
        raise _fmt02("strategy token is dynamic only", f"{where}.dynamic")
    if role == "weights" and strategy in (Strategy.TOKEN, Strategy.ATTN_HEAD):
        raise _fmt02(f"strategy {strategy.value} applies to activations, not weights", f"{where}.strategy")
    if role in _ACTIVATION_ROLES[:2] and strategy in (Strategy.CHANNEL, Strategy.BLOCK):
        raise _fmt02(f"strategy {strategy.value} is not allowed for activations", f"{where}.strategy")


def _strategy(obj: Mapping[str, Any], where: str) -> tuple[Strategy, int | None]:
    """Resolve strategy/group_size the way compressed-tensors infers them (CFG-06)."""
    raw, gs = obj.get("strategy"), obj.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs == 0 or gs < -1):
        raise ConfigError(f"group_size {gs!r} is not a positive integer, -1 or null", rule="CFG-06",
                          where=f"{where}.group_size")
    if raw is None:
        raw = "tensor" if gs is None else "channel" if gs == -1 else "group"
    try:
        strategy = Strategy(raw.lower() if isinstance(raw, str) else raw)
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
    """One entry of config_groups: which modules, which weight and activation args, which format."""

    name: str
    targets: tuple[str, ...]
    weights: QuantScheme | None
    format: str | None = None
    input_activations: QuantScheme | None = None
    output_activations: QuantScheme | None = None
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

        def args(key: str) -> QuantScheme | None:
            value = obj.get(key)
            return None if value is None else QuantScheme.from_json(value, where=f"{where}.{key}", role=key)
        fmt = obj.get("format")
        if not isinstance(fmt, (str, type(None))):
            raise ConfigError(f"format {fmt!r} is not a string", rule="CFG-03", where=f"{where}.format")
        return cls(name, targets, args("weights"), fmt, args("input_activations"), args("output_activations"),
                   tuple(sorted(set(obj) - _GROUP_KEYS)))


@dataclass(frozen=True, slots=True)
class Transform:
    """One apply entry of a transform scheme (spec/formats.md §11)."""

    scheme: str
    type: str                            # hadamard, random-hadamard, random-matrix
    location: str                        # input, output, k_cache, q_attn, weight_input, weight_output
    inverse: bool
    targets: tuple[str, ...]
    ignore: tuple[str, ...]
    head_dim: int | None
    precision: str                       # dtype code of an online rotation tensor

    @property
    def online(self) -> bool:
        return self.location in ONLINE_LOCATIONS

    @property
    def tensor_name(self) -> str:
        """The submodule compressed-tensors registers on a target: `<scheme>_<location>`."""
        return f"{self.scheme}_{self.location}"


def _transforms(obj: Any, where: str) -> tuple[Transform, ...]:
    """transform_config -> its apply entries (XFM-01); {} or null -> none."""
    if not obj:
        return ()
    groups = obj.get("config_groups") if isinstance(obj, Mapping) else None
    if not isinstance(groups, Mapping):
        raise ConfigError("transform_config has no config_groups object", rule="XFM-01", where=where)
    out = []
    for name, sch in groups.items():
        w = f"{where}.config_groups.{name}"
        if not isinstance(sch, Mapping) or sch.get("type") not in TRANSFORM_TYPES:
            raise ConfigError(f"type {sch.get('type') if isinstance(sch, Mapping) else sch!r} is not one of "
                              f"{', '.join(TRANSFORM_TYPES)}", rule="XFM-01", where=f"{w}.type")
        head_dim = sch.get("head_dim")
        if head_dim is not None and (not isinstance(head_dim, int) or isinstance(head_dim, bool) or head_dim < 1):
            raise ConfigError(f"head_dim {head_dim!r} is not a positive integer", rule="XFM-01", where=f"{w}.head_dim")
        precision = sch.get("precision", "torch.float32")
        code = _DTYPE_CODES.get(precision.removeprefix("torch.")) if isinstance(precision, str) else None
        if code not in FLOAT_DTYPES:
            raise ConfigError(f"precision {precision!r} is not a float dtype", rule="XFM-01", where=f"{w}.precision")
        apply = sch.get("apply")
        if not isinstance(apply, list) or not apply:
            raise ConfigError("apply is not a non-empty list", rule="XFM-01", where=f"{w}.apply")
        for k, a in enumerate(apply):
            aw = f"{w}.apply.{k}"
            loc = a.get("location") if isinstance(a, Mapping) else None
            if loc not in ONLINE_LOCATIONS + OFFLINE_LOCATIONS:
                raise ConfigError(f"location {loc!r} is not one of {', '.join(ONLINE_LOCATIONS + OFFLINE_LOCATIONS)}",
                                  rule="XFM-01", where=f"{aw}.location")
            targets = _strings(a.get("targets"), f"{aw}.targets", rule="XFM-01")
            if not targets or not isinstance(a.get("inverse", False), bool):
                raise ConfigError("an apply entry needs targets and a boolean inverse", rule="XFM-01", where=aw)
            out.append(Transform(name, sch["type"], loc, a.get("inverse", False), targets,
                                 _strings(a.get("ignore", []) or [], f"{aw}.ignore", rule="XFM-01"), head_dim, code))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Sparsity:
    """A legacy sparsity_config (compressed-tensors <= 0.14, spec/formats.md §6)."""

    format: str
    targets: tuple[str, ...]
    ignore: tuple[str, ...]


def _sparsity(obj: Any, where: str) -> Sparsity | None:
    if not obj:
        return None
    fmt = obj.get("format") if isinstance(obj, Mapping) else None
    if fmt in (None, DENSE_FORMAT):
        return None
    if fmt not in SPARSITY_FORMATS:
        raise ConfigError(f"sparsity format {fmt!r} is not one ctformat reads ({', '.join(SPARSITY_FORMATS)})",
                          rule="CFG-03", where=f"{where}.format")
    return Sparsity(fmt, _strings(obj.get("targets") or [], f"{where}.targets"),
                    _strings(obj.get("ignore") or [], f"{where}.ignore"))


def format_misfit(fmt: str, w: QuantScheme) -> str | None:
    """Why weight args `w` cannot be stored in format `fmt` (FMT-01), or None (spec/formats.md §1.2)."""
    family = FORMATS[fmt]
    float_scale = w.scale_dtype is None or w.scale_dtype in FLOAT_DTYPES
    if family in ("pack", "marlin-24"):
        if w.is_float:
            return f"{fmt} stores int weights"
        if w.strategy not in (Strategy.TENSOR, Strategy.CHANNEL, Strategy.GROUP):
            return f"strategy {w.strategy.value} is not read for {fmt} weights"
        return None if float_scale else f"{fmt} scales are float16, bfloat16 or float32, not {w.scale_dtype}"
    if family == "naive":
        if w.is_float and w.num_bits != 8:
            return f"float {w.num_bits}-bit weights are packed (nvfp4/mxfp4-pack-quantized), not one per byte"
        return None if float_scale else f"{fmt} scales are float, not {w.scale_dtype}"
    if family == "mxfp8":
        ok = w.is_float and w.num_bits == 8 and w.group_size == MX_GROUP and w.scale_dtype == E8M0
        return None if ok else "mxfp8-quantized needs float 8-bit weights, group_size 32, scale_dtype uint8"
    if family in ("nvfp4", "mxfp4"):
        gs = 16 if family == "nvfp4" else MX_GROUP
        if not (w.is_float and w.num_bits == 4 and w.group_size == gs):
            return f"{fmt} needs float 4-bit weights with group_size {gs}"
        if not w.symmetric:
            return "asymmetric FP4 is not supported (compressed-tensors calculate_qparams refuses it)"
        scale = "F8_E4M3" if family == "nvfp4" else E8M0
        if w.scale_dtype not in (None, scale):
            return f"{fmt} scales are {scale}, not {w.scale_dtype}"
        return None
    return None                                     # dense: any args


def inferred_format(group: QuantGroup) -> str | None:
    """The format compressed-tensors would write for a group's args (compressors/format.py, first
    match wins; spec/formats.md §1.2)."""
    w = group.weights
    if w is None:
        return None
    if w.is_float and w.num_bits == 4:
        return "mxfp4-pack-quantized" if w.group_size == MX_GROUP else "nvfp4-pack-quantized"
    if w.is_mx and w.num_bits == 8:
        return "mxfp8-quantized"
    if not w.is_float:
        return "int-quantized" if group.input_activations is not None else PACK_QUANTIZED
    return "float-quantized" if group.input_activations is not None else "naive-quantized"


def _strings(obj: Any, where: str, *, rule: str = "CFG-09") -> tuple[str, ...]:
    if not isinstance(obj, list) or not all(isinstance(s, str) for s in obj):
        raise ConfigError(f"expected a list of strings, got {obj!r}", rule=rule, where=where)
    for s in obj:
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as err:
                raise ConfigError(f"pattern {s!r} does not compile: {err}", rule=rule, where=where) from None
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

    format: str | None
    groups: tuple[QuantGroup, ...]
    ignore: tuple[str, ...] = ()
    version: str | None = None
    quantization_status: str | None = None
    unknown: tuple[str, ...] = field(default=(), compare=False)
    kv_cache: QuantScheme | None = None            # kv_cache_scheme (k_scale / v_scale on attention modules)
    transforms: tuple[Transform, ...] = ()          # transform_config's apply entries
    sparsity: Sparsity | None = None                # a legacy sparsity_config
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)   # the object as read

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "quantization_config") -> QuantizationConfig:
        if not isinstance(obj, Mapping):
            raise ConfigError("quantization_config is not an object", rule="CFG-02", where=where)
        method = obj.get("quant_method")
        if method != QUANT_METHOD:
            raise ConfigError(f"quant_method is {method!r}, not {QUANT_METHOD!r}", rule="CFG-02",
                              where=f"{where}.quant_method")
        sparsity = _sparsity(obj.get("sparsity_config"), f"{where}.sparsity_config")
        kv = _kv_cache(obj.get("kv_cache_scheme"), f"{where}.kv_cache_scheme")
        groups_obj = obj.get("config_groups")
        if groups_obj in (None, {}) and (sparsity is not None or kv is not None):
            groups_obj = {}                 # a legacy sparse checkpoint, or kv-cache scales alone
        elif not isinstance(groups_obj, Mapping) or not groups_obj:
            raise ConfigError("config_groups is missing or empty", rule="CFG-04", where=f"{where}.config_groups")
        groups = tuple(QuantGroup.from_json(k, v, where=f"{where}.config_groups.{k}") for k, v in groups_obj.items())
        fmt = obj.get("format")
        cfg = cls(fmt, groups, _strings(obj.get("ignore", []) or [], f"{where}.ignore"), obj.get("version"),
                  obj.get("quantization_status"), tuple(sorted(set(obj) - _TOP_KEYS)), kv,
                  _transforms(obj.get("transform_config"), f"{where}.transform_config"), sparsity, dict(obj))
        for g in groups:
            if g.weights is not None:
                _check_format(cfg.group_format(g), g, fmt, f"{where}.config_groups.{g.name}")
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
        return _targets(self.ignore).rank(module, False) > 0

    def group_for(self, module: str, *, linear: bool) -> QuantGroup | None:
        """The config group that targets `module`: exact name beats regex beats class name,
        then the first group in file order (spec §4.3)."""
        best, best_rank = None, 9
        for g in self.groups:
            rank = _targets(g.targets).rank(module, linear)
            if rank and rank < best_rank:
                best, best_rank = g, rank
        return best

    def groups_for(self, modules: Sequence[str], linear: Sequence[bool]) -> list[QuantGroup | None]:
        """group_for of each module (linear: each one's Linear verdict), by C-level passes over
        the names: one per exact-name set, one per regex, one per class name and group."""
        lasts = list(map(_LAST, map(str.rpartition, modules, repeat("."))))
        n, size = len(self.groups), len(modules)
        codes = []                            # rank * n + group index (9 * n: no match): min() picks
        for k, g in enumerate(self.groups):   # the best rank, then the first group in file order
            table = (9 * n, n + k, 2 * n + k, 3 * n + k)
            codes.append(list(map(table.__getitem__, _targets(g.targets).ranks(modules, linear, lasts))))
        if not codes:
            return [None] * size
        best = codes[0] if n == 1 else list(map(min, *codes))
        decode = {9 * n: None, **{r * n + k: g for k, g in enumerate(self.groups) for r in (1, 2, 3)}}
        return list(map(decode.__getitem__, best))

    def ignored_all(self, modules: Sequence[str]) -> list[bool]:
        """is_ignored of each module, by C-level passes over the names."""
        lasts = list(map(_LAST, map(str.rpartition, modules, repeat("."))))
        return list(map(bool, _targets(self.ignore).ranks(modules, repeat(False), lasts)))

    def sparse_targets(self, module: str, *, linear: bool) -> bool:
        """The legacy sparsity_config targets `module` (and its own ignore does not)."""
        s = self.sparsity
        return (s is not None and not any(_match(module, p, linear=False) for p in s.ignore)
                and any(_match(module, t, linear=linear) for t in s.targets))

    def transforms_of(self, module: str, *, linear: bool) -> tuple[Transform, ...]:
        """The apply entries whose targets match `module` (and whose ignore does not)."""
        return tuple(t for t in self.transforms if not any(_match(module, p, linear=False) for p in t.ignore)
                     and any(_match(module, p, linear=linear) for p in t.targets))

    def rotation_of(self, prefix: str) -> Transform | None:
        """The online transform whose matrix a module named `…<scheme>_<location>` holds."""
        last = prefix.rsplit(".", 1)[-1]
        return next((t for t in self.transforms if t.online and t.tensor_name == last), None)


def _kv_cache(obj: Any, where: str) -> QuantScheme | None:
    """kv_cache_scheme: static args of strategy tensor or attn_head (KV-01)."""
    if obj is None:
        return None
    try:
        kv = QuantScheme.from_json(obj, where=where, role="kv_cache_scheme")
    except ConfigError as err:
        raise ConfigError(err.message, rule="KV-01", where=err.where) from None
    if kv.strategy not in (Strategy.TENSOR, Strategy.ATTN_HEAD) or kv.dynamic is not False:
        raise ConfigError(f"{kv.words()}: kv-cache scales are static, per tensor or per attention head",
                          rule="KV-01", where=where)
    return kv


def _check_format(fmt: str | None, group: QuantGroup, top: str | None, where: str) -> None:
    """A group with weights has a format ctformat reads (CFG-03) that fits its args (FMT-01)."""
    why = (f"no format (the top level says {top!r} and the group names none)" if fmt is None else
           "mixed-precision is a top-level summary, not a group's format" if fmt == MIXED_PRECISION else
           f"{fmt} is a sparsity format (named by sparsity_config), not a group's" if fmt in SPARSITY_FORMATS else
           f"{fmt}: {UNREAD_FORMATS[fmt]}" if fmt in UNREAD_FORMATS else
           f"format {fmt!r} is not a compressed-tensors format ctformat knows" if fmt not in FORMATS else None)
    if why is not None:
        raise ConfigError(why, rule="CFG-03", where=f"{where}.format")
    misfit = format_misfit(fmt, group.weights)
    if misfit is not None:
        raise ConfigError(f"format {fmt!r} with {group.weights.words()} weights: {misfit}", rule="FMT-01",
                          where=f"{where}.format")


# a pattern that refers to its own groups cannot join others in one regex (its numbers would move)
_SELF_REFERENCE = re.compile(r"\\[1-9]|\(\?P=|\(\?\(")


@dataclass(frozen=True, slots=True)
class _Targets:
    """One list of targets (or ignore entries) compiled once: rank() is the best _match over
    the list. The re: patterns join into one regex where they can (re.match of `(?:a)|(?:b)`
    matches exactly when re.match of a or of b does): a 1 T checkpoint has ~70k modules."""

    exact: frozenset[str]
    regexes: tuple[re.Pattern, ...]
    linear: bool
    embedding: bool

    def rank(self, module: str, linear: bool) -> int:
        if module in self.exact:
            return 1
        for rx in self.regexes:
            if rx.match(module):
                return 2
        if (self.linear and linear) or (self.embedding and module.rpartition(".")[2] in EMBEDDING_NAMES):
            return 3
        return 0

    def ranks(self, modules: Sequence[str], linear, lasts: Sequence[str]) -> list[int]:
        """rank() of each module (linear: its Linear verdicts, lasts: its names' last parts),
        each test a C-level pass over all names."""
        size = len(modules)
        exact = list(map(self.exact.__contains__, modules)) if self.exact else [False] * size
        matched = [False] * size
        for rx in self.regexes:
            matched = list(map(or_, matched, map(bool, map(rx.match, modules))))
        by_class = [False] * size
        if self.linear:
            by_class = list(map(bool, linear))
        if self.embedding:
            by_class = list(map(or_, by_class, map(EMBEDDING_NAMES.__contains__, lasts)))
        return list(map(_RANKS.__getitem__, zip(exact, matched, by_class)))


_LAST = itemgetter(2)                        # of str.rpartition
# (exact name, regex, class name) -> rank(): exact beats regex beats class
_RANKS = {(e, r, c): 1 if e else 2 if r else 3 if c else 0 for e in (False, True) for r in (False, True)
          for c in (False, True)}


@lru_cache(maxsize=256)
def _targets(targets: tuple[str, ...]) -> _Targets:
    pats = [t[3:] for t in targets if t.startswith("re:")]
    regexes = tuple(re.compile(p) for p in pats)
    if len(pats) > 1 and not any(_SELF_REFERENCE.search(p) for p in pats):
        try:
            regexes = (re.compile("|".join(f"(?:{p})" for p in pats)),)
        except re.error:                  # a group name used twice, a global flag past the start
            pass
    plain = frozenset(t for t in targets if not t.startswith("re:"))
    return _Targets(plain, regexes, "Linear" in plain, "Embedding" in plain)


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
