"""Module names as the architecture's loader reads them (spec §7.2): llm-compressor >= 0.12
writes Mixtral experts as gate_proj/up_proj/down_proj, transformers' Mixtral reads w1/w3/w2
and leaves any other name at random values. Torch-free."""
from __future__ import annotations

import re

from .spec import EXPERT_MODULE, EXPERT_RENAMES

__all__ = ["loader_name", "expert_parts"]

_EXPERT = re.compile(EXPERT_MODULE)


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
