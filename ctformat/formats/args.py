"""Quantization args of every compressed-tensors format, as frozen data (spec/formats.md §1.3).

QuantScheme (ctformat.scheme) knows the int args pack-quantized uses; QuantArgs adds what the
other formats need: float types, block structure, tensor_group, dynamic "local", float8/uint8
scale and zero-point dtypes. Parsing follows compressed-tensors' quant_args.py; what cannot mean
anything raises ConfigError FMT-02. Torch-free: dtypes are safetensors codes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..errors import ConfigError
from ..scheme import Strategy

__all__ = ["QuantArgs", "Scheme", "DTYPE_NAMES", "FLOAT_CODES", "MX_GROUP", "E8M0"]

# torch dtype names compressed-tensors writes (`torch.float8_e4m3fn`) -> safetensors codes.
DTYPE_NAMES: dict[str, str] = {
    "float16": "F16", "half": "F16", "bfloat16": "BF16", "float32": "F32", "float": "F32",
    "float64": "F64", "double": "F64", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
    "float8_e8m0fnu": "F8_E8M0", "uint8": "U8", "int8": "I8", "int16": "I16", "int32": "I32",
    "int64": "I64", "uint16": "U16", "uint32": "U32",
}
FLOAT_CODES = ("F16", "BF16", "F32", "F64")        # what a "float" scale may be stored as
MX_GROUP = 32                                      # group size of the MX formats
E8M0 = "U8"                                        # MX scales: biased exponents in bytes

_KEYS = {"num_bits", "type", "symmetric", "group_size", "strategy", "block_structure", "dynamic",
         "actorder", "scale_dtype", "zp_dtype", "observer", "observer_kwargs"}
_DYNAMIC_OK = (Strategy.TOKEN, Strategy.TENSOR, Strategy.TENSOR_GROUP, Strategy.GROUP)


def _bad(msg: str, where: str) -> ConfigError:
    return ConfigError(msg, rule="FMT-02", where=where)


def _dtype(value: Any, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPE_NAMES:
        raise _bad(f"{value!r} is not a torch dtype name", where)
    return DTYPE_NAMES[name]


@dataclass(frozen=True, slots=True)
class QuantArgs:
    """One `weights`/`input_activations`/`output_activations`/`kv_cache_scheme` object."""

    num_bits: int = 8
    type: str = "int"
    symmetric: bool = True
    strategy: Strategy = Strategy.TENSOR
    group_size: int | None = None
    block_structure: tuple[int, int] | None = None
    dynamic: bool | str = False            # False, True or "local"
    actorder: str | None = None
    scale_dtype: str | None = None         # safetensors code, e.g. "F8_E4M3", "U8"
    zp_dtype: str | None = None            # as written; see zero_point_dtype for the default
    observer: str | None = None

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> QuantArgs:
        if not isinstance(obj, Mapping):
            raise _bad(f"expected an object, got {type(obj).__name__}", where)
        typ = obj.get("type", "int")
        typ = typ.lower() if isinstance(typ, str) else typ
        bits = obj.get("num_bits", 8)
        if typ not in ("int", "float") or not isinstance(bits, int) or isinstance(bits, bool):
            raise _bad(f"type {obj.get('type')!r} with num_bits {bits!r}", where)
        if (typ == "int" and not 1 <= bits <= 8) or (typ == "float" and bits not in (4, 6, 8)):
            raise _bad(f"{typ} weights of {bits} bits: int takes 1..8, float 4, 6 or 8", f"{where}.num_bits")
        strategy, group_size = _strategy(obj, where)
        block = _block(obj.get("block_structure"), f"{where}.block_structure")
        if (block is None) != (strategy is not Strategy.BLOCK):
            raise _bad(f"block_structure {obj.get('block_structure')!r} with strategy {strategy.value}: "
                       "one needs the other", f"{where}.block_structure")
        dynamic = obj.get("dynamic", False)
        dynamic = dynamic.lower() if isinstance(dynamic, str) else dynamic
        if dynamic not in (False, True, "local") or (dynamic and strategy not in _DYNAMIC_OK) \
                or (dynamic == "local" and strategy is not Strategy.TENSOR_GROUP):
            raise _bad(f"dynamic {obj.get('dynamic')!r} with strategy {strategy.value}", f"{where}.dynamic")
        if strategy is Strategy.TOKEN and not dynamic:
            raise _bad("strategy token is dynamic only", f"{where}.dynamic")
        symmetric = obj.get("symmetric", True)
        if not isinstance(symmetric, bool):
            raise _bad(f"symmetric {symmetric!r} is not a boolean", f"{where}.symmetric")
        actorder = obj.get("actorder")
        if actorder is not None and actorder is not False and not isinstance(actorder, (str, bool)):
            raise _bad(f"actorder {actorder!r}", f"{where}.actorder")
        observer = obj.get("observer")
        return cls(num_bits=bits, type=typ, symmetric=symmetric, strategy=strategy, group_size=group_size,
                   block_structure=block, dynamic=dynamic, actorder=actorder or None,
                   scale_dtype=_dtype(obj.get("scale_dtype"), f"{where}.scale_dtype"),
                   zp_dtype=_dtype(obj.get("zp_dtype"), f"{where}.zp_dtype"),
                   observer=observer if isinstance(observer, str) else None)

    # -- what the args imply ---------------------------------------------------------------
    @property
    def is_float(self) -> bool:
        return self.type == "float"

    @property
    def is_mx(self) -> bool:
        """MX args: E8M0 power-of-two scales (compressed-tensors should_generate_mx_scales)."""
        return (self.is_float and self.num_bits in (4, 6, 8) and self.group_size == MX_GROUP
                and self.scale_dtype == E8M0)

    @property
    def value_dtype(self) -> str:
        """Dtype of unpacked values (compressed-tensors pytorch_dtype): F8_E4M3 or I8."""
        if self.is_float:
            return "F8_E4M3"
        return "I8" if self.num_bits <= 8 else "I16"

    @property
    def zero_point_dtype(self) -> str:
        """zp_dtype, or the default compressed-tensors fills in."""
        if self.zp_dtype is not None:
            return self.zp_dtype
        return "F8_E4M3" if self.is_float and self.num_bits in (4, 6) else self.value_dtype

    @property
    def has_global_scale(self) -> bool:
        return self.strategy is Strategy.TENSOR_GROUP and self.dynamic is not True

    @property
    def has_static_scale(self) -> bool:
        return self.dynamic is False

    def q_range(self) -> tuple[float, float]:
        """(q_min, q_max): int range, or the float type's finite range."""
        if not self.is_float:
            return float(-(1 << (self.num_bits - 1))), float((1 << (self.num_bits - 1)) - 1)
        top = {4: 6.0, 6: 7.5, 8: 448.0}[self.num_bits]
        return -top, top

    def scale_shape(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """weight_scale shape for a 2-D [out, in] weight (spec/formats.md §3.1)."""
        s = self.strategy
        if s is Strategy.TENSOR:
            return (1,)
        if s is Strategy.CHANNEL:
            return (out_features, 1)
        if s in (Strategy.GROUP, Strategy.TENSOR_GROUP):
            return (out_features, -(-in_features // self.group_size))
        if s is Strategy.BLOCK:
            bh, bw = self.block_structure
            return (-(-out_features // bh), -(-in_features // bw))
        raise ValueError(f"strategy {s.value} has no weight scale")

    def activation_shape(self, in_features: int) -> tuple[int, ...]:
        """input_scale shape over [in] for static activations (spec/formats.md §1.3)."""
        if self.strategy is Strategy.TENSOR:
            return (1,)
        if self.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP):
            return (-(-in_features // self.group_size),)
        raise ValueError(f"strategy {self.strategy.value} has no static activation scale")

    def to_json(self) -> dict[str, Any]:
        """As compressed-tensors writes args (sorted keys, torch dtype names)."""
        names = {v: k for k, v in reversed(list(DTYPE_NAMES.items()))}
        out: dict[str, Any] = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
                               "strategy": self.strategy.value, "group_size": self.group_size,
                               "dynamic": self.dynamic}
        if self.block_structure is not None:
            out["block_structure"] = list(self.block_structure)
        for key in ("scale_dtype", "zp_dtype"):
            if getattr(self, key) is not None:
                out[key] = f"torch.{names[getattr(self, key)]}"
        for key in ("actorder", "observer"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return dict(sorted(out.items()))


def _strategy(obj: Mapping[str, Any], where: str) -> tuple[Strategy, int | None]:
    raw, gs = obj.get("strategy"), obj.get("group_size")
    if gs is not None and (not isinstance(gs, int) or isinstance(gs, bool) or gs == 0 or gs < -1):
        raise _bad(f"group_size {gs!r} is not a positive integer, -1 or null", f"{where}.group_size")
    if raw is None:
        raw = "tensor" if gs is None else "channel" if gs == -1 else "group"
    try:
        strategy = Strategy(raw.lower() if isinstance(raw, str) else raw)
    except ValueError:
        raise _bad(f"unknown strategy {raw!r}", f"{where}.strategy") from None
    grouped = strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP)
    if grouped and (gs is None or gs < 1):
        raise _bad(f"strategy {strategy.value} needs a positive group_size, got {gs!r}", f"{where}.group_size")
    if not grouped and gs is not None and gs > 0:
        raise _bad(f"group_size {gs} needs strategy group or tensor_group, got {strategy.value}",
                   f"{where}.strategy")
    return strategy, gs if grouped else None


def _block(value: Any, where: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if isinstance(value, str):          # the "128x128" spelling compressed-tensors accepts
        try:
            value = [int(v) for v in value.split("x")]
        except ValueError:
            raise _bad(f"block_structure {value!r} is not BHxBW", where) from None
    if (not isinstance(value, (list, tuple)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)):
        raise _bad(f"block_structure {value!r} is not two positive integers", where)
    return int(value[0]), int(value[1])


@dataclass(frozen=True, slots=True)
class Scheme:
    """One config group's args: what its modules store and how they decompress."""

    weights: QuantArgs | None = None
    input_activations: QuantArgs | None = None
    output_activations: QuantArgs | None = None
    format: str | None = None           # the group's own `format`, as written

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Scheme:
        if not isinstance(obj, Mapping):
            raise _bad(f"scheme is a {type(obj).__name__}, not an object", where)

        def args(key: str) -> QuantArgs | None:
            value = obj.get(key)
            return None if value is None else QuantArgs.from_json(value, where=f"{where}.{key}")

        scheme = cls(args("weights"), args("input_activations"), args("output_activations"), obj.get("format"))
        for key, a in (("input_activations", scheme.input_activations),
                       ("output_activations", scheme.output_activations)):
            if a is not None and a.strategy in (Strategy.CHANNEL, Strategy.BLOCK):
                raise _bad(f"strategy {a.strategy.value} is not allowed for activations", f"{where}.{key}.strategy")
        return scheme

    def activation_tensors(self, in_features: int) -> dict[str, tuple[tuple[int, ...], tuple[str, ...]]]:
        """Input/output qparams the module stores: suffix -> (shape, allowed dtypes) (§1.3)."""
        out: dict[str, tuple[tuple[int, ...], tuple[str, ...]]] = {}
        for base, a in (("input", self.input_activations), ("output", self.output_activations)):
            if a is None:
                continue
            if a.has_global_scale:
                out[f"{base}_global_scale"] = ((1,), ("F32",))
            if a.has_static_scale and base == "input":
                shape = a.activation_shape(in_features)
                out[f"{base}_scale"] = (shape, FLOAT_CODES)
                if not a.symmetric:
                    out[f"{base}_zero_point"] = (shape, (a.zero_point_dtype,))
        return out
