"""Marlin facts that need no tensor data (spec §10): the quantization_config of a Marlin
checkpoint, the dimensions a module's B and s headers imply, the legacy subset, and the parts
of a stacked expert module. Torch-free, so inspect and validate of a Marlin checkpoint read
only headers.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .scheme import QuantizationConfig, QuantScheme, Strategy
from .spec import EXPERT_MODULE, LEGACY_MARLIN, MARLIN_LAYOUT, MARLIN_METHOD, MARLIN_TILE

__all__ = ["SOURCE_ROLES", "ROLE_DTYPES", "MarlinConfig", "marlin_dims", "marlin_group_size", "legacy_unmet", "is_expert", "scheme_of"]

# CT tensors whose dtype a Marlin checkpoint records, so the reverse restores it
SOURCE_ROLES = ("weight_scale", "weight_shape", "weight_zero_point")
ROLE_DTYPES = {"weight_scale": ("F16", "BF16", "F32"), "weight_shape": ("I64", "I32"), "weight_zero_point": ("I32", "I8")}
_EXPERT = re.compile(EXPERT_MODULE)


def marlin_dims(b_shape, s_shape) -> tuple[int, int, int, int]:
    """(K, N, bits, groups) of a Marlin module from its B and s shapes (as the kernel does)."""
    k = b_shape[-2] * MARLIN_TILE[0] if len(b_shape) >= 2 else 0
    n = s_shape[-1] if s_shape else 0
    groups = s_shape[-2] if len(s_shape) >= 2 else 0
    bits = 2 * b_shape[-1] // n if n and b_shape else 0
    return k, n, bits, groups


def marlin_group_size(group_size: int | None, k: int) -> int:
    """The Marlin group size of a CT scheme: -1 for channel-wise or one group spanning K."""
    return -1 if group_size is None or group_size >= k else group_size


def scheme_of(b_shape, s_shape, has_zp: bool, has_perm: bool) -> QuantScheme:
    """The CT scheme a Marlin module's shapes imply (for dequantization and MRL-06)."""
    k, _, bits, groups = marlin_dims(b_shape, s_shape)
    grouped = groups > 1
    return QuantScheme(num_bits=bits, symmetric=not has_zp, strategy=Strategy.GROUP if grouped else Strategy.CHANNEL,
                       group_size=k // groups if grouped else None, actorder="group" if has_perm else None)


def legacy_unmet(*, num_bits: int, symmetric: bool, group_size: int, act_order: bool, expert: bool,
                 scale_dtype: str | None = None, n: int | None = None, k: int | None = None) -> list[str]:
    """What a module lacks for every legacy Marlin reader (spec §10.7), as phrases; [] when it
    fits. `group_size` is -1 for channel-wise; unknown scale dtype or shape is not judged."""
    need = LEGACY_MARLIN
    checks = (
        (f"{need['num_bits']}-bit weights (got {num_bits})", num_bits != need["num_bits"]),
        ("symmetric weights", not symmetric),
        (f"group size {' or '.join(map(str, need['group_sizes']))} (got {group_size})",
         group_size not in need["group_sizes"]),
        ("no act-order", act_order),
        (f"F16 scales (got {scale_dtype})", scale_dtype is not None and scale_dtype != need["scale_dtype"]),
        (f"N % {need['n_multiple']} == 0 (N = {n})", n is not None and n % need["n_multiple"] != 0),
        (f"K % {need['k_multiple']} == 0 (K = {k})", k is not None and k % need["k_multiple"] != 0),
        ("dense layers (this is an MoE expert)", expert),
    )
    return [phrase for phrase, unmet in checks if unmet]


def is_expert(prefix: str) -> bool:
    return _EXPERT.match(prefix) is not None


@dataclass(frozen=True)
class MarlinConfig:
    """config.json["quantization_config"] of a Marlin checkpoint ctformat wrote: the source
    compressed-tensors config (kept whole, for the reverse) plus what the layout changed."""

    source: QuantizationConfig
    source_json: Mapping[str, Any]
    source_dtypes: Mapping[str, str]
    stacked: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    legacy: bool = False
    scale_dtype: str | None = None       # dtype code of every `s` (absent before it was recorded)

    @staticmethod
    def detect(obj: Any) -> bool:
        """Whether a quantization_config says Marlin (ctformat's, or the legacy tags)."""
        if not isinstance(obj, Mapping):
            return False
        return obj.get("quant_method") == MARLIN_METHOD or (
            obj.get("quant_method") == "gptq" and ("marlin" in obj or obj.get("checkpoint_format") == "marlin"
                                                   or obj.get("is_marlin_format") is True))

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], *, where: str = "quantization_config") -> MarlinConfig:
        def bad(msg: str, key: str = "marlin") -> ConfigError:
            return ConfigError(msg, rule="MRL-01", where=f"{where}.{key}")
        block = obj.get("marlin")
        if not isinstance(block, Mapping):
            raise bad("no `marlin` object: a legacy Marlin checkpoint from another tool (AutoGPTQ), which "
                      "ctformat does not read")
        if block.get("layout") != MARLIN_LAYOUT:
            raise bad(f"layout {block.get('layout')!r}, expected {MARLIN_LAYOUT!r}", "marlin.layout")
        try:
            source = QuantizationConfig.from_json(block.get("compressed_tensors"), where=f"{where}.marlin.compressed_tensors")
        except ConfigError as err:
            raise bad(f"compressed_tensors: {err.message} [{err.rule}]", "marlin.compressed_tensors") from None
        dtypes, stacked = block.get("source_dtypes"), block.get("stacked_experts", {})
        if not isinstance(dtypes, Mapping) or not set(dtypes) <= set(SOURCE_ROLES) or "weight_scale" not in dtypes:
            raise bad(f"source_dtypes {dtypes!r} is not an object of {', '.join(SOURCE_ROLES)}", "marlin.source_dtypes")
        for role, code in dtypes.items():
            if not isinstance(code, str) or code not in ROLE_DTYPES[role]:
                raise bad(f"{role} dtype {code!r} is not one of {', '.join(ROLE_DTYPES[role])}",
                          f"marlin.source_dtypes.{role}")
        if not isinstance(stacked, Mapping) or not all(_stack_entry_ok(v) for v in stacked.values()):
            raise bad("stacked_experts is not an object of {experts, w13: [gate, up], w2}", "marlin.stacked_experts")
        scale_dtype = block.get("scale_dtype")
        if scale_dtype is not None and scale_dtype not in ("F16", "BF16"):
            raise bad(f"scale_dtype {scale_dtype!r} is not F16 or BF16", "marlin.scale_dtype")
        cfg = cls(source, block["compressed_tensors"], dict(dtypes), dict(stacked), obj.get("quant_method") == "gptq",
                  scale_dtype)
        if cfg.legacy:
            cfg._check_legacy(obj, bad)
        return cfg

    def _check_legacy(self, obj: Mapping[str, Any], bad) -> None:
        schemes = {g.weights for g in self.source.groups if g.weights is not None}
        sizes = {s.group_size if s.strategy is Strategy.GROUP else -1 for s in schemes}
        fits = len(sizes) == 1 and not self.stacked and not any(
            legacy_unmet(num_bits=s.num_bits, symmetric=s.symmetric, act_order=s.has_g_idx, expert=False,
                         group_size=s.group_size if s.strategy is Strategy.GROUP else -1) for s in schemes)
        if not fits:
            raise bad("quant_method gptq (the legacy Marlin tags) on a checkpoint outside the legacy subset "
                      "(4-bit, symmetric, group 128 or channel, no act-order, no stacked experts)", "quant_method")
        want = {"bits": 4, "group_size": sizes.pop(), "sym": True, "desc_act": False}
        for key, value in want.items():
            if obj.get(key) != value:
                raise bad(f"{key} is {obj.get(key)!r}, but the modules say {value!r}", key)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"quant_method": MARLIN_METHOD}
        if self.legacy:
            s = next(g.weights for g in self.source.groups if g.weights is not None)
            out = {"quant_method": "gptq", "checkpoint_format": "marlin", "is_marlin_format": True, "bits": 4,
                   "group_size": s.group_size if s.strategy is Strategy.GROUP else -1, "desc_act": False,
                   "sym": True, "lm_head": False}
        out["marlin"] = {"layout": MARLIN_LAYOUT, "compressed_tensors": dict(self.source_json),
                         "source_dtypes": dict(self.source_dtypes), "stacked_experts": dict(self.stacked)}
        if self.scale_dtype is not None:
            out["marlin"]["scale_dtype"] = self.scale_dtype
        return out

    def stack_entry(self, prefix: str) -> tuple[Mapping[str, Any], str] | None:
        """(stacked_experts entry, "w13" or "w2") when `prefix` is a stacked module, else None."""
        base, _, last = prefix.rpartition(".")
        entry = self.stacked.get(base)
        return (entry, last) if entry is not None and last in ("w13", "w2") else None

    def stacked_parts(self, prefix: str, n: int) -> list[tuple[str, int]] | None:
        """(part module name, out_features) in stacking order for a stacked module with N = n,
        else None: w13 holds gate then up of each expert, w2 its down."""
        found = self.stack_entry(prefix)
        if found is None:
            return None
        entry, last = found
        base = prefix.rpartition(".")[0]
        names = entry["w13"] if last == "w13" else [entry["w2"]]
        return [(f"{base}.{e}.{name}", n // len(names)) for e in range(entry["experts"]) for name in names]

    def part_name(self, prefix: str) -> str:
        """The module name the source config matches for `prefix` (a stacked module: its first part)."""
        found = self.stack_entry(prefix)
        if found is None:
            return prefix
        entry, last = found
        part = entry["w13"][0] if last == "w13" else entry["w2"]
        return f"{prefix.rpartition('.')[0]}.0.{part}"


def _stack_entry_ok(v: Any) -> bool:
    """{experts: E > 0, w13: [gate, up], w2: down}: three distinct plain module names."""
    if not (isinstance(v, Mapping) and isinstance(v.get("experts"), int) and not isinstance(v["experts"], bool)
            and v["experts"] > 0 and isinstance(v.get("w13"), list) and len(v["w13"]) == 2):
        return False
    names = [*v["w13"], v.get("w2")]
    return all(isinstance(x, str) and x and "." not in x for x in names) and len(set(names)) == 3
