"""The front door: MODEL as a user gives it (a folder, one .safetensors file, or a Hub repo id)
to an open Checkpoint. The CLI and validate_checkpoint come in here; the reader does not."""
from __future__ import annotations

import re
from pathlib import Path

from .checkpoint import Checkpoint, open_checkpoint
from .hub import open_hub_checkpoint

__all__ = ["open_model", "is_repo_id"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_repo_id(model: str) -> bool:
    return bool(_REPO_ID.match(model)) and ".." not in model


def open_model(model: str, revision: str | None = None, *, strict: bool = True) -> Checkpoint:
    """An existing local path, else a Hub repo id (spec §1.6)."""
    if Path(model).exists() or not is_repo_id(model):
        return open_checkpoint(model, strict=strict)
    return open_hub_checkpoint(model, revision, strict=strict)
