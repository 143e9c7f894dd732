"""The checks of one module against its format's tables (spec/formats.md §9; the rule
catalogue is spec.RULES): header-only (check_module, torch-free) and on tensor values
(check_values), on plain {suffix: (dtype, shape)} / {suffix: tensor} maps.

Problems are returned as TensorError (rule, where, message), collected, never raised, so
validate can report them all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Sequence

from ..errors import TensorError
from ..scheme import E8M0, QuantGroup, Strategy
from .format import Format, weights_of
from .sparse import ANY

if TYPE_CHECKING:
    import torch

__all__ = ["check_module", "check_values"]

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


def check_module(fmt: type[Format], group: QuantGroup | None, tensors: Mapping[str, tuple[str, Sequence[int]]], *,
                 where: str, name: str | None = None) -> list[TensorError]:
    """Header-only checks of one module: `tensors` maps suffix -> (dtype code, shape); `name` is
    the format's wire name, for messages."""
    name = name or fmt.family
    def err(rule: str, msg: str, suffix: str | None = None) -> TensorError:
        return TensorError(msg, rule=rule, where=f"{where}.{suffix}" if suffix else where)

    if fmt.family == "pack":
        return []                 # spec/ctformat.md's TEN rules judge it (weight_shape holds `in`)
    if fmt.root not in tensors:
        return [err("FMT-10", f"no {fmt.root}: a {name} module stores its weight there")]
    root_shape = tuple(tensors[fmt.root][1])
    if fmt.root != "compressed" and len(root_shape) not in (2, 3):
        return [err("FMT-13", f"{fmt.root} is {len(root_shape)}-D, expected 2-D or 3-D (stacked)", fmt.root)]
    try:
        dense = fmt.dense_shape({k: v[1] for k, v in tensors.items()})
        specs = fmt.tensors(group, dense)
    except (KeyError, ValueError) as e:
        return [err("FMT-21" if fmt.root == "compressed" else "FMT-13", f"shapes do not fit {name}: {e}")]
    problems = []
    w = weights_of(group)
    if w is not None and w.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) and dense[-1] % w.group_size:
        problems.append(err("FMT-19", f"in_features {dense[-1]} is not a multiple of group_size {w.group_size}"))
    for suffix, spec in specs.items():
        if spec.required and suffix not in tensors:
            problems.append(err("FMT-10", f"missing {suffix} ({'/'.join(spec.dtypes)} {list(spec.shape)}) that "
                                          f"{name} with these args stores", suffix))
    for suffix, (dtype, shape) in tensors.items():
        if suffix == "bias":
            continue
        spec = specs.get(suffix)
        if spec is None:
            problems.append(err("FMT-11", f"{suffix} is not part of a {name} module with these args", suffix))
        elif dtype not in spec.dtypes:
            problems.append(err(_rule(suffix, fmt, _DTYPE_RULE, "FMT-12"),
                                f"dtype {dtype}, expected {' or '.join(spec.dtypes)}", suffix))
        elif not _fits(tuple(shape), spec.shapes):
            problems.append(err(_rule(suffix, fmt, _SHAPE_RULE, "FMT-13"),
                                f"shape {list(shape)}, expected {' or '.join(str(list(s)) for s in spec.shapes)}",
                                suffix))
    return problems


def check_values(fmt: type[Format], group: QuantGroup | None, tensors: Mapping[str, torch.Tensor], *,
                 where: str) -> list[TensorError]:
    """Checks on tensor values (validate --deep): FMT-30..34."""
    import torch
    problems: list[TensorError] = []
    w = weights_of(group)

    def bad(rule: str, suffix: str, msg: str) -> None:
        problems.append(TensorError(msg, rule=rule, where=f"{where}.{suffix}"))

    s = tensors.get("weight_scale")
    if s is not None and w is not None:
        if s.dtype == torch.uint8 and (w.scale_dtype == E8M0 or fmt.family.startswith("mx")):
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
