"""How the reader reaches a checkpoint's files: the FileSource protocol (seven calls), and its
local implementation (the Hub one is hub.HubFiles). The reader calls nothing else."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from .header import TensorInfo, read_header

__all__ = ["FileSource", "LocalFiles"]


class FileSource(Protocol):
    """The files of one checkpoint, by name relative to its root (spec §1)."""

    label: str                      # how messages name the checkpoint: a folder, or org/name@commit

    def is_file(self, name: str) -> bool: ...

    def present(self, name: str) -> bool:
        """Something by that name exists, readable or not (a folder, a dangling link)."""

    def names(self) -> list[str]:
        """The regular files at the top level, sorted."""

    def read_bytes(self, name: str) -> bytes: ...

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        """One shard's checked header (spec §1.2) and its __metadata__."""

    def readinto(self, name: str, start: int, buf) -> int:
        """Fill `buf` from byte `start` of the file; the number of bytes read."""

    def prefetch(self, names: list[str]) -> None:
        """Start reading these shards' headers ahead (a remote source fetches them in parallel)."""


class LocalFiles:
    """The files of a checkpoint folder (symlinks followed, as in a Hugging Face cache snapshot)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def is_file(self, name: str) -> bool:
        return (self.root / name).is_file()

    def present(self, name: str) -> bool:
        return os.path.lexists(self.root / name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file())

    def read_bytes(self, name: str) -> bytes:
        return (self.root / name).read_bytes()

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        return read_header(self.root / name, name)

    def readinto(self, name: str, start: int, buf) -> int:
        with open(self.root / name, "rb") as fh:
            fh.seek(start)
            return fh.readinto(buf)

    def prefetch(self, names: list[str]) -> None:
        """Nothing to do: a local header is one read when it is needed."""
