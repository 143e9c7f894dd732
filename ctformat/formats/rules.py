"""The rules of spec/formats.md §9 as data, and the checks of one module against its format's
tables: header-only (check_module, torch-free) and on tensor values (check_values).

Problems are returned as TensorError (rule, where, message), collected, never raised, so
validate can report them all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import TensorError
from ..scheme import Strategy
from .args import Scheme
from .format import Format
from .sparse import ANY

if TYPE_CHECKING:
    import torch

__all__ = ["RULES", "check_module", "check_values"]

RULES: dict[str, tuple[str, str]] = {
    "FMT-01": ("error", "every group with weights has a known format that fits its args"),
    "FMT-02": ("error", "quantization args are well-formed"),
    "FMT-03": ("warning", "mixed-precision names two or more group formats"),
    "FMT-04": ("warning", "a group's format is the one compressed-tensors infers for its args"),
    "FMT-10": ("error", "a module has every tensor its format and args require"),
    "FMT-11": ("error", "a module has no tensor beyond its format's set and bias"),
    "FMT-12": ("error", "the root tensor has the dtype of its format"),
    "FMT-13": ("error", "the root tensor is 2-D (3-D stacked) with the shape its format implies"),
    "FMT-14": ("error", "weight_scale has the dtype of its format (float, F8_E4M3 or U8 E8M0)"),
    "FMT-15": ("error", "weight_scale has the shape of its strategy"),
    "FMT-16": ("error", "weight_zero_point has zp_dtype and the scale's shape"),
    "FMT-17": ("error", "global scales are F32 [1] ([E, 1] stacked)"),
    "FMT-18": ("error", "static input/output qparams have the activation strategy's dtype and shape"),
    "FMT-19": ("error", "group_size divides in_features for group and tensor_group"),
    "FMT-20": ("warning", "--target vllm: the block width divides in_features"),
    "FMT-21": ("error", "a legacy sparse module has compressed, bitmask, shape (and row_offsets) of the right "
                        "dtypes and shapes"),
    "FMT-22": ("error", "marlin-24 cannot be dequantized: no decompressor exists"),
    "FMT-30": ("error", "weight scales are finite and > 0 (no FP8 NaN, no E8M0 255)"),
    "FMT-31": ("error", "F8_E4M3 weight values are not NaN"),
    "FMT-32": ("error", "global scales and static input scales are finite and > 0"),
    "FMT-33": ("error", "int values and zero points lie in the range of num_bits"),
    "FMT-34": ("error", "a sparse bitmask has as many set bits as values, row_offsets are its running counts"),
    "KV-01": ("error", "kv_cache_scheme is well-formed static tensor or attn_head args"),
    "KV-02": ("error", "every attention module has k_scale and v_scale iff kv_cache_scheme is set"),
    "KV-03": ("error", "k/v scales are float [1] (tensor) or [kv_heads, 1, 1] (attn_head); zero points iff asymmetric"),
    "KV-04": ("error", "k/v scales are finite and > 0"),
    "XFM-01": ("error", "transform_config schemes have a known type and apply entries with a known location"),
    "XFM-02": ("error", "every online transform location has its rotation tensor; offline ones have none"),
    "XFM-03": ("error", "a rotation tensor is square 2-D of the declared size and precision"),
    "XFM-04": ("error", "Hadamard rotations satisfy R R^T = n I; random matrices are invertible"),
    "XFM-05": ("warning", "a dense export of modules with online rotations changes their function"),
}

# Which rule a wrong dtype / shape of a tensor breaks, by suffix.
_DTYPE_RULE = {"weight_scale": "FMT-14", "weight_zero_point": "FMT-16", "weight_global_scale": "FMT-17",
               "input_global_scale": "FMT-17", "output_global_scale": "FMT-17"}
_SHAPE_RULE = {"weight_scale": "FMT-15", "weight_zero_point": "FMT-16", "weight_global_scale": "FMT-17",
               "input_global_scale": "FMT-17", "output_global_scale": "FMT-17"}
_SPARSE = ("compressed", "bitmask", "shape", "row_offsets")


def _rule(suffix: str, fmt: type[Format], table: Mapping[str, str], root_rule: str) -> str:
    if suffix == fmt.root and suffix != "compressed":
        return root_rule
    if suffix in _SPARSE:
        return "FMT-21"
    if suffix.startswith(("input_", "output_")) and suffix not in table:
        return "FMT-18"
    return table.get(suffix, "FMT-18")


def _fits(shape: Sequence[int], allowed: Sequence[Sequence[int]]) -> bool:
    return any(len(a) == len(shape) and all(x == ANY or x == y for x, y in zip(a, shape)) for a in allowed)


def check_module(fmt: type[Format], scheme: Scheme, tensors: Mapping[str, tuple[str, Sequence[int]]], *,
                 where: str) -> list[TensorError]:
    """Header-only checks of one module: `tensors` maps suffix -> (dtype code, shape)."""
    def err(rule: str, msg: str, suffix: str | None = None) -> TensorError:
        return TensorError(msg, rule=rule, where=f"{where}.{suffix}" if suffix else where)

    if not fmt.header_rules:
        return []
    if fmt.root not in tensors:
        return [err("FMT-10", f"no {fmt.root}: a {fmt.names[0]} module stores its weight there")]
    root_shape = tuple(tensors[fmt.root][1])
    if fmt.root != "compressed" and len(root_shape) not in (2, 3):
        return [err("FMT-13", f"{fmt.root} is {len(root_shape)}-D, expected 2-D or 3-D (stacked)", fmt.root)]
    try:
        dense = fmt.dense_shape({k: v[1] for k, v in tensors.items()})
        specs = fmt.tensors(scheme, dense)
    except (KeyError, ValueError) as e:
        return [err("FMT-21" if fmt.root == "compressed" else "FMT-13", f"shapes do not fit {fmt.names[0]}: {e}")]
    problems = []
    w = scheme.weights
    if w is not None and w.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) and dense[-1] % w.group_size:
        problems.append(err("FMT-19", f"in_features {dense[-1]} is not a multiple of group_size {w.group_size}"))
    for suffix, spec in specs.items():
        if spec.required and suffix not in tensors:
            problems.append(err("FMT-10", f"missing {suffix} ({'/'.join(spec.dtypes)} {list(spec.shape)}) that "
                                          f"{fmt.names[0]} with these args stores", suffix))
    for suffix, (dtype, shape) in tensors.items():
        if suffix == "bias":
            continue
        spec = specs.get(suffix)
        if spec is None:
            problems.append(err("FMT-11", f"{suffix} is not part of a {fmt.names[0]} module with these args", suffix))
        elif dtype not in spec.dtypes:
            problems.append(err(_rule(suffix, fmt, _DTYPE_RULE, "FMT-12"),
                                f"dtype {dtype}, expected {' or '.join(spec.dtypes)}", suffix))
        elif not _fits(tuple(shape), spec.shapes):
            problems.append(err(_rule(suffix, fmt, _SHAPE_RULE, "FMT-13"),
                                f"shape {list(shape)}, expected {' or '.join(str(list(s)) for s in spec.shapes)}",
                                suffix))
    return problems


def check_values(fmt: type[Format], scheme: Scheme, tensors: Mapping[str, torch.Tensor], *,
                 where: str) -> list[TensorError]:
    """Checks on tensor values (validate --deep): FMT-30..34."""
    import torch

    from .args import E8M0
    problems: list[TensorError] = []
    w = scheme.weights

    def bad(rule: str, suffix: str, msg: str) -> None:
        problems.append(TensorError(msg, rule=rule, where=f"{where}.{suffix}"))

    s = tensors.get("weight_scale")
    if s is not None and w is not None:
        if s.dtype == torch.uint8 and (w.scale_dtype == E8M0 or fmt.names[0].startswith("mx")):
            if int((s == 255).sum()):
                bad("FMT-30", "weight_scale", f"{int((s == 255).sum())} E8M0 exponents are 255 (NaN in OCP MX)")
        else:
            f = s.float()
            n = int((~torch.isfinite(f) | (f <= 0)).sum())
            if n:
                bad("FMT-30", "weight_scale", f"{n} scales are NaN, infinite, zero or negative")
    q = tensors.get("weight")
    if q is not None and q.dtype == torch.float8_e4m3fn:
        n = int(((q.view(torch.uint8) & 0x7F) == 0x7F).sum())
        if n:
            bad("FMT-31", "weight", f"{n} FP8 values are NaN")
    if q is not None and w is not None and not w.is_float and not q.dtype.is_floating_point:
        lo, hi = w.q_range()
        n = int(((q < lo) | (q > hi)).sum())
        if n:
            bad("FMT-33", "weight", f"{n} values outside [{int(lo)}, {int(hi)}] of {w.num_bits} bits")
    for suffix in ("weight_global_scale", "input_global_scale", "input_scale"):
        t = tensors.get(suffix)
        if t is not None and int((~torch.isfinite(t.float()) | (t.float() <= 0)).sum()):
            bad("FMT-32", suffix, "not finite and > 0")
    if "bitmask" in tensors and "compressed" in tensors:
        mask = (tensors["bitmask"].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
        shape = [int(v) for v in tensors["shape"].flatten().tolist()]
        mask = mask.flatten(-2)[..., : shape[-1]]
        if int(mask.sum()) != tensors["compressed"].numel():
            bad("FMT-34", "bitmask", f"{int(mask.sum())} set bits for {tensors['compressed'].numel()} values")
        ro = tensors.get("row_offsets")
        if ro is not None:
            counts = mask.sum(-1)
            if not torch.equal(ro, torch.cumsum(counts, 0) - counts):
                bad("FMT-34", "row_offsets", "not the running count of set bits per row")
    return problems
