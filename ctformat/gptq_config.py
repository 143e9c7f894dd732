"""GPTQ and AWQ checkpoint configs (spec/gptq-awq.md §4): format facts, parsing with rule IDs,
and the configs a conversion writes. Torch-free, so inspect/validate never import torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from .errors import ConfigError
from .marlin_config import ROLE_DTYPES, SOURCE_ROLES
from .scheme import QuantizationConfig, QuantScheme, Strategy
from .spec import CROSS_WORD, PADDED, QUANTIZE_CONFIG_NAME

__all__ = ["GPTQ_METHOD", "AWQ_METHOD", "GPTQ_V1", "GPTQ_V2", "AWQ_GEMM", "GPTQ_BITS", "AWQ_BITS", "AWQ_ORDER",
           "PROVENANCE_KEY", "CT_VERSION", "ModuleScheme", "Provenance", "GptqConfig", "detect", "read_gptq_config",
           "module_scheme", "ct_scheme", "gptq_config_json", "awq_config_json", "ct_config_json", "exact_pattern"]

GPTQ_METHOD, AWQ_METHOD = "gptq", "awq"
GPTQ_V1, GPTQ_V2 = "gptq", "gptq_v2"          # checkpoint_format / format values (§1.2)
AWQ_GEMM = "gemm"
GPTQ_BITS = (2, 3, 4, 8)                        # 5-7 exist only as GPTQModel's planar gptq_p
AWQ_BITS = (4,)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)            # column 8c + AWQ_ORDER[i] sits in nibble i of word c
PROVENANCE_KEY = "ctformat"                     # quantization_config.ctformat (§4.3)
CT_VERSION = "0.20.0"                           # CT version whose layout a foreign file's reverse follows

_SCHEME_KEYS = ("bits", "group_size", "sym", "desc_act")


@dataclass(frozen=True, slots=True)
class ModuleScheme:
    """What GPTQ/AWQ know of one module: bits, group size (-1 = channel-wise), symmetry, act-order."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool = False

    def num_groups(self, k: int) -> int:
        return 1 if self.group_size == -1 else -(-k // self.group_size)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "sym": self.sym, "desc_act": self.desc_act}


def module_scheme(s: QuantScheme) -> ModuleScheme:
    """The GPTQ view of a CT scheme: channel and tensor strategies are group_size -1."""
    gs = s.group_size if s.strategy is Strategy.GROUP else -1
    return ModuleScheme(s.num_bits, gs, s.symmetric, s.has_g_idx)


def ct_scheme(ms: ModuleScheme) -> QuantScheme:
    """The CT scheme of a GPTQ/AWQ module scheme (group size -1 = channel-wise), as spec §4.4 writes it."""
    grouped = ms.group_size != -1
    return QuantScheme(num_bits=ms.bits, symmetric=ms.sym, strategy=Strategy.GROUP if grouped else Strategy.CHANNEL,
                       group_size=ms.group_size if grouped else None, actorder="group" if ms.desc_act else None)


@dataclass(frozen=True)
class Provenance:
    """quantization_config.ctformat: the CT source, so the reverse restores it bit for bit."""

    source_json: Mapping[str, Any]
    source: QuantizationConfig
    source_dtypes: Mapping[str, str]
    layout: str = CROSS_WORD
    lossy_scales: int = 0
    names: Mapping[str, str] = field(default_factory=dict)   # module-name part written -> part in the source

    @classmethod
    def from_json(cls, obj: Any, *, where: str) -> Provenance:
        def bad(msg: str, key: str = "") -> ConfigError:
            return ConfigError(msg, rule="GPTQ-11", where=f"{where}{'.' + key if key else ''}")
        if not isinstance(obj, Mapping):
            raise bad("is not an object")
        try:
            source = QuantizationConfig.from_json(obj.get("compressed_tensors"), where=f"{where}.compressed_tensors")
        except ConfigError as err:
            raise bad(f"{err.message} [{err.rule}]", "compressed_tensors") from None
        dtypes = obj.get("source_dtypes")
        if (not isinstance(dtypes, Mapping) or "weight_scale" not in dtypes
                or any(not isinstance(dtypes[r], str) or dtypes[r] not in ROLE_DTYPES.get(r, ()) for r in dtypes)):
            raise bad(f"{dtypes!r} is not an object of {', '.join(SOURCE_ROLES)} dtype codes", "source_dtypes")
        layout, lossy, names = obj.get("layout", CROSS_WORD), obj.get("lossy_scales", 0), obj.get("names", {})
        if layout not in (CROSS_WORD, PADDED):
            raise bad(f"{layout!r} is not {CROSS_WORD!r} or {PADDED!r}", "layout")
        if not isinstance(lossy, int) or isinstance(lossy, bool) or lossy < 0:
            raise bad(f"{lossy!r} is not a count", "lossy_scales")
        if not isinstance(names, Mapping) or not all(isinstance(v, str) and v and "." not in v
                                                      for v in (*names, *names.values())):
            raise bad(f"{names!r} is not an object of module-name parts", "names")
        return cls(obj["compressed_tensors"], source, dict(dtypes), layout, lossy, dict(names))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"compressed_tensors": dict(self.source_json), "source_dtypes": dict(self.source_dtypes)}
        if self.layout != CROSS_WORD:
            out["layout"] = self.layout
        if self.lossy_scales:
            out["lossy_scales"] = self.lossy_scales
        if self.names:
            out["names"] = dict(self.names)
        return out


@dataclass(frozen=True)
class GptqConfig:
    """A GPTQ or AWQ quantization_config as the loaders read it."""

    method: str                          # "gptq" or "awq"
    default: ModuleScheme
    format: str                          # "gptq", "gptq_v2" or "gemm"
    lm_head: bool = False
    dynamic: tuple[tuple[str, bool, Mapping[str, Any]], ...] = ()   # (pattern, skip, overrides), in order
    not_convert: tuple[str, ...] = ()    # AWQ modules_to_not_convert (substrings)
    provenance: Provenance | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    @property
    def v1(self) -> bool:
        return self.format == GPTQ_V1

    def scheme_for(self, module: str) -> ModuleScheme | None:
        """The module's scheme, or None when the config leaves it dense."""
        if self.method == AWQ_METHOD:
            return None if any(n in module for n in self.not_convert) else self.default
        if module == "lm_head" and not self.lm_head:
            return None
        for pattern, skip, overrides in self.dynamic:
            if re.match(pattern, module):
                if skip:
                    return None
                return ModuleScheme(*(overrides.get(k, getattr(self.default, k)) for k in _SCHEME_KEYS))
        return self.default

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "quantization_config") -> GptqConfig:
        if not isinstance(obj, Mapping):
            raise ConfigError("is not an object", rule="GPTQ-01", where=where)
        method = obj.get("quant_method")
        if method == AWQ_METHOD:
            return _awq_from_json(obj, where)
        if method != GPTQ_METHOD:
            raise ConfigError(f"quant_method {method!r} is neither gptq nor awq", rule="GPTQ-01",
                              where=f"{where}.quant_method")
        return _gptq_from_json(obj, where)


def detect(qc: Any) -> str | None:
    """"gptq" or "awq" when a quantization_config is one of those (and not a Marlin tag), else None."""
    if not isinstance(qc, Mapping):
        return None
    method = qc.get("quant_method")
    if method == GPTQ_METHOD and not ("marlin" in qc or qc.get("checkpoint_format") == "marlin"
                                      or qc.get("is_marlin_format") is True):
        return GPTQ_METHOD
    return AWQ_METHOD if method == AWQ_METHOD else None


def _int(obj: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    return next((obj[k] for k in keys if k in obj), default)


def _check_scheme(bits: Any, gs: Any, allowed: tuple[int, ...], rule: str, where: str) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or bits not in allowed:
        raise ConfigError(f"bits {bits!r} is not one of {', '.join(map(str, allowed))}", rule=rule, where=f"{where}.bits")
    if not isinstance(gs, int) or isinstance(gs, bool) or (gs < 1 and gs != -1):
        raise ConfigError(f"group_size {gs!r} is not -1 or a positive integer", rule=rule, where=f"{where}.group_size")


def _bool(obj: Mapping[str, Any], key: str, default: bool, rule: str, where: str) -> bool:
    v = obj.get(key, default)
    if not isinstance(v, bool):
        raise ConfigError(f"{key} {v!r} is not a boolean", rule=rule, where=f"{where}.{key}")
    return v


def _provenance(obj: Mapping[str, Any], where: str) -> Provenance | None:
    block = obj.get(PROVENANCE_KEY)
    return None if block is None else Provenance.from_json(block, where=f"{where}.{PROVENANCE_KEY}")


def _gptq_from_json(obj: Mapping[str, Any], where: str) -> GptqConfig:
    bits, gs = obj.get("bits"), obj.get("group_size", 128)
    _check_scheme(bits, gs, GPTQ_BITS, "GPTQ-01", where)
    default = ModuleScheme(bits, gs, _bool(obj, "sym", True, "GPTQ-01", where),
                           _bool(obj, "desc_act", False, "GPTQ-01", where))
    fmts = {obj[k] for k in ("format", "checkpoint_format") if obj.get(k) is not None}
    if len(fmts) > 1 or not fmts <= {GPTQ_V1, GPTQ_V2}:
        raise ConfigError(f"format/checkpoint_format {sorted(map(str, fmts))} is not one of gptq, gptq_v2 "
                          "(the same in both keys)", rule="GPTQ-01", where=f"{where}.checkpoint_format")
    dynamic = obj.get("dynamic") or {}
    if not isinstance(dynamic, Mapping):
        raise ConfigError("dynamic is not an object", rule="GPTQ-01", where=f"{where}.dynamic")
    rules = []
    for key, over in dynamic.items():
        skip, pattern = key.startswith("-:"), key[2:] if key.startswith(("-:", "+:")) else key
        try:
            re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"pattern {key!r} does not compile: {err}", rule="GPTQ-01", where=f"{where}.dynamic") from None
        if not isinstance(over, Mapping):
            raise ConfigError(f"{key!r} maps to {over!r}, not an object", rule="GPTQ-01", where=f"{where}.dynamic")
        over = {k: over[k] for k in _SCHEME_KEYS if k in over}
        _check_scheme(over.get("bits", bits), over.get("group_size", gs), GPTQ_BITS, "GPTQ-01", f"{where}.dynamic.{key}")
        rules.append((pattern, skip, over))
    return GptqConfig(GPTQ_METHOD, default, fmts.pop() if fmts else GPTQ_V1,
                      _bool(obj, "lm_head", False, "GPTQ-01", where), tuple(rules), (), _provenance(obj, where), obj)


def _awq_from_json(obj: Mapping[str, Any], where: str) -> GptqConfig:
    bits, gs = _int(obj, ("bits", "w_bit"), 4), _int(obj, ("group_size", "q_group_size"), 128)
    _check_scheme(bits, gs, AWQ_BITS, "AWQ-01", where)
    version = _int(obj, ("version", "format"), AWQ_GEMM)
    if not isinstance(version, str) or version.lower() != AWQ_GEMM:
        raise ConfigError(f"version {version!r}: ctformat reads the gemm layout only", rule="AWQ-01",
                          where=f"{where}.version")
    skip = obj.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
        raise ConfigError(f"modules_to_not_convert {skip!r} is not a list of strings", rule="AWQ-01",
                          where=f"{where}.modules_to_not_convert")
    zero_point = _bool(obj, "zero_point", True, "AWQ-01", where)
    return GptqConfig(AWQ_METHOD, ModuleScheme(bits, gs, not zero_point), AWQ_GEMM, False, (), tuple(skip),
                      _provenance(obj, where), obj)


def read_gptq_config(config: Mapping[str, Any] | None, quantize_config: Mapping[str, Any] | None) -> GptqConfig:
    """The config GPTQModel would use: quantize_config.json first, else config.json's
    quantization_config; both present must agree on the scheme and format (GPTQ-01)."""
    qc = None if config is None else config.get("quantization_config")
    if quantize_config is None:
        if qc is None:
            raise ConfigError("no quantization_config and no quantize_config.json", rule="GPTQ-01", file="config.json")
        return GptqConfig.from_json(qc)
    try:
        cfg = GptqConfig.from_json(quantize_config, where="")
    except ConfigError as err:
        err.file, err.where = QUANTIZE_CONFIG_NAME, (err.where or "").lstrip(".") or None
        raise
    if qc is not None and detect(qc) == GPTQ_METHOD:
        other = GptqConfig.from_json(qc)
        if (other.default, other.format) != (cfg.default, cfg.format):
            raise ConfigError(f"{QUANTIZE_CONFIG_NAME} says {cfg.default} {cfg.format}, config.json "
                              f"{other.default} {other.format}", rule="GPTQ-01", file="config.json",
                              where="quantization_config")
    return cfg


# -- configs a conversion writes (§4) ---------------------------------------------------
def exact_pattern(module: str) -> str:
    """A regex matching exactly one module name (as GPTQModel and vLLM match: re.match)."""
    return f"^{re.escape(module)}$"


def _majority(schemes: Mapping[str, ModuleScheme]) -> ModuleScheme:
    counts: dict[ModuleScheme, int] = {}
    for s in schemes.values():
        counts[s] = counts.get(s, 0) + 1
    return max(counts, key=counts.__getitem__)     # first in file order on a tie (dicts keep order)


def gptq_config_json(schemes: Mapping[str, ModuleScheme], dense_linear: list[str], fmt: str,
                     provenance: Provenance) -> dict[str, Any]:
    """quantization_config (and quantize_config.json) of a GPTQ output, §4.1."""
    default = _majority(schemes)
    dynamic: dict[str, Any] = {f"+:{exact_pattern(m)}": s.to_json() for m, s in schemes.items() if s != default}
    dynamic.update({f"-:{exact_pattern(m)}": {} for m in dense_linear if m != "lm_head"})
    out: dict[str, Any] = {"quant_method": GPTQ_METHOD, "method": GPTQ_METHOD, **default.to_json(),
                           "checkpoint_format": fmt, "format": fmt, "pack_dtype": "int32",
                           "lm_head": "lm_head" in schemes, "static_groups": False, "true_sequential": True,
                           "damp_percent": 0.01}
    if dynamic:
        out["dynamic"] = dynamic
    out[PROVENANCE_KEY] = provenance.to_json()
    return out


def awq_config_json(scheme: ModuleScheme, dense_linear: list[str], provenance: Provenance) -> dict[str, Any]:
    """quantization_config of an AWQ GEMM output, §4.2."""
    skip = [m for m in dense_linear if m != "lm_head"]
    return {"quant_method": AWQ_METHOD, "bits": scheme.bits, "group_size": scheme.group_size, "zero_point": True,
            "version": AWQ_GEMM, "modules_to_not_convert": skip or None, PROVENANCE_KEY: provenance.to_json()}


def ct_config_json(schemes: Mapping[str, ModuleScheme], dense_linear: list[str]) -> dict[str, Any]:
    """The CT quantization_config of a GPTQ/AWQ file without provenance (§4.4)."""
    default = _majority(schemes)
    distinct = [default] + [s for s in dict.fromkeys(schemes.values()) if s != default]
    groups = {}
    for i, s in enumerate(distinct):
        targets = ["Linear"] if s == default else [m for m, ms in schemes.items() if ms == s]
        weights = {"num_bits": s.bits, "type": "int", "symmetric": s.sym, "dynamic": False,
                   "strategy": "channel" if s.group_size == -1 else "group",
                   "group_size": None if s.group_size == -1 else s.group_size,
                   "actorder": "group" if s.desc_act else None}
        groups[f"group_{i}"] = {"targets": targets, "weights": weights, "format": "pack-quantized",
                                "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": groups,
            "ignore": list(dense_linear), "quantization_status": "compressed", "version": CT_VERSION}
