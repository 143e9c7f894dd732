"""The front door: MODEL as a user gives it (a folder, one .safetensors file, a .gguf file or a
folder of one GGUF model, or a Hub repo id) to an open Checkpoint (or GGUFModel). The CLI and
validate_checkpoint come in here; the readers do not."""
from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import Checkpoint, open_checkpoint
from .gguf_header import GGUFModel, is_gguf_path, open_gguf_model
from .hub import open_hub_checkpoint

__all__ = ["open_model", "is_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and ".." not in model


def open_model(model: str, revision: str | None = None, *, strict: bool = True) -> Checkpoint | GGUFModel:
    """An existing local path (GGUF when it is a .gguf file or a folder of .gguf files without
    safetensors, spec/gguf.md §8), else a Hub repo id (spec §1.6)."""
    if is_gguf_path(model):
        return open_gguf_model(model, strict=strict)
    if Path(model).exists() or not is_repo_id(model):
        return open_checkpoint(model, strict=strict)
    return open_hub_checkpoint(model, revision, strict=strict)
