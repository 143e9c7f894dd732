"""Module names as the architecture's loader reads them (spec §7.2): llm-compressor >= 0.12
writes Mixtral experts as gate_proj/up_proj/down_proj, transformers' Mixtral reads w1/w3/w2
and leaves any other name at random values. Torch-free."""
from __future__ import annotations

import re

from typing import Mapping

from .spec import EXPERT_MODULE, EXPERT_RENAMES, MOE_MODULE

__all__ = ["loader_name", "expert_parts", "moe_renamed"]

_EXPERT = re.compile(EXPERT_MODULE)
_MOE = re.compile(MOE_MODULE)


def loader_name(prefix: str, model_type: str | None, keep_names: bool = False) -> str:
    """`prefix` renamed as the loader of `model_type` reads it (unchanged when keep_names)."""
    table = None if keep_names else EXPERT_RENAMES.get(model_type or "")
    hit = _EXPERT.match(prefix) if table else None
    if hit is None or hit.group(3) not in table:
        return prefix
    return f"{hit.group(1)}.{hit.group(2)}.{table[hit.group(3)]}"


def expert_parts(prefix: str) -> tuple[str, int, str] | None:
    """(prefix of the experts list, expert index, part name) of a per-expert module, else None."""
    hit = _EXPERT.match(prefix)
    return None if hit is None else (hit.group(1), int(hit.group(2)), hit.group(3))


def moe_renamed(prefix: str, table: Mapping[str, str]) -> str:
    """`prefix` with the name of its MoE block and of its expert part mapped by `table` (the
    router `<block>.gate` and `<block>.experts.N.<part>`; spec/gptq-awq.md §3.1); others unchanged."""
    hit = _MOE.match(prefix) if table else None
    if hit is None:
        return prefix
    head, block, tail = hit.groups()
    if tail != "gate":
        experts, _, part = tail.rpartition(".")
        tail = f"{experts}.{table.get(part, part)}"
    return f"{head}{table.get(block, block)}.{tail}"
