"""Writing checkpoints: tensors streamed in the order of a plan into size-limited shards, in a
temporary folder published by one rename (spec §1.5). A failed or killed run leaves nothing
at the output path, and the input is never touched.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from enum import Enum
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import CheckpointNotFoundError, OutputExistsError, WriterError
from .spec import DTYPE_SIZES, INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointWriter", "WriterState", "save_checkpoint", "check_apart", "check_output"]

Plan = list[tuple[str, str, tuple[int, ...]]]      # (tensor name, dtype code, shape) in write order


class WriterState(Enum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


def check_apart(out: Path, source: Path | None) -> None:
    """OUT may not be, contain, or lie inside the input; a single input file's folder may hold OUT."""
    if source is None:
        return
    s, o = source.resolve(), out.resolve()
    if o == s or o in s.parents or (source.is_dir() and s in o.parents):
        raise OutputExistsError(f"{out}: overlaps the input {source}; the input is never touched")


def check_output(out: Path, source: Path | None, force: bool) -> None:
    """Everything that makes OUT unwritable, before anything is written."""
    if out.is_symlink():
        raise OutputExistsError(f"{out}: is a symbolic link; ctformat never writes through links")
    check_apart(out, source)
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists", option="force")
    if not out.parent.is_dir():
        raise CheckpointNotFoundError(f"{out.parent}: output folder's parent does not exist")


class CheckpointWriter:
    """Write tensors, in the order of a plan given up front, into size-limited shards.

    Knowing every (name, dtype, shape) first lets each shard's header be written before its
    data, so tensors stream straight to disk and memory holds one tensor at a time. All
    files go to a temporary folder beside `out`, renamed to `out` by close(); an exception
    inside the `with` block removes the temporary folder, so a failed run leaves nothing.
    `source` is the input (a folder or a file): its other files are copied when it is a folder,
    except those named in `skip_files`; `extra_files` (name -> JSON object) are written beside
    config.json (a target's own config files, such as GPTQ's quantize_config.json).
    """

    def __init__(self, out: str | os.PathLike, plan: Iterable[tuple[str, str, tuple[int, ...]]], *,
                 max_shard_size: int = 5_000_000_000, force: bool = False,
                 source: str | os.PathLike | None = None, extra_files: Mapping[str, Any] | None = None,
                 skip_files: Iterable[str] = ()) -> None:
        self.out = Path(out)
        self.source = None if source is None else Path(source)
        check_output(self.out, self.source, force)
        self.force = force
        self.extra_files, self.skip_files = dict(extra_files or {}), frozenset(skip_files)
        self.plan: Plan = [(n, d, tuple(s)) for n, d, s in plan]
        self.shards = _assign_shards(self.plan, max_shard_size)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=False)
        self.state = WriterState.OPEN
        self._next = 0
        self._fh = None
        self._fh_shard = -1

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state is WriterState.OPEN:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        from .dtypes import dtype_code
        if self.state is not WriterState.OPEN:
            raise WriterError(f"write({name!r}) on a writer in state {self.state.value}")
        if self._next >= len(self.plan):
            raise WriterError(f"write({name!r}) after the last planned tensor")
        want = self.plan[self._next]
        got = (name, dtype_code(tensor.dtype), tuple(tensor.shape))
        if got != want:
            raise WriterError(f"expected {want[0]} {want[1]} {list(want[2])}, got {got[0]} {got[1]} {list(got[2])}")
        shard = self.shards[self._next]
        if self._fh is None or self._fh_shard != shard:
            self._open_shard(shard)
        if tensor.numel():
            import torch
            self._fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._next += 1

    def close(self, config: Mapping[str, Any] | None = None) -> Path:
        """Write config.json and the index, copy the source's other files, publish `out`."""
        if self.state is not WriterState.OPEN:
            raise WriterError(f"close() on a writer in state {self.state.value}")
        if self._next != len(self.plan):
            raise WriterError(f"close() after {self._next} of {len(self.plan)} planned tensors")
        self._close_shard()
        names = self._shard_names()
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(DTYPE_SIZES[d] * prod(s) for _, d, s in self.plan)},
                     "weight_map": {n: names[k] for (n, _, _), k in zip(self.plan, self.shards)}}
            (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        if self.source is not None and self.source.is_dir():
            _copy_other_files(self.source, self.tmp, self.skip_files | set(self.extra_files))
        for name, obj in self.extra_files.items():
            (self.tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
        if config is not None:
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _publish(self.tmp, self.out, self.force)
        self.state = WriterState.CLOSED
        return self.out

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.state = WriterState.FAILED

    # -- shards --
    def _shard_names(self) -> list[str]:
        n = (self.shards[-1] + 1) if self.shards else 1
        return [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]

    def _open_shard(self, shard: int) -> None:
        self._close_shard()
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for (n, d, s), k in zip(self.plan, self.shards):
            if k == shard:
                size = DTYPE_SIZES[d] * prod(s)
                header[n] = {"dtype": d, "shape": list(s), "data_offsets": [pos, pos + size]}
                pos += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)                  # data starts 8-byte aligned
        self._fh = open(self.tmp / self._shard_names()[shard], "wb")
        self._fh_shard = shard
        self._fh.write(len(raw).to_bytes(8, "little") + raw)

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _assign_shards(plan: Plan, max_bytes: int) -> list[int]:
    out, shard, used = [], 0, 0
    for _, d, s in plan:
        size = DTYPE_SIZES[d] * prod(s)
        if used and used + size > max_bytes:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out


_WEIGHT_FILES = (".safetensors", ".safetensors.index.json") + PICKLE_SUFFIXES


def _copy_other_files(source: Path, dest: Path, skip_files: Iterable[str] = ()) -> None:
    """Tokenizer, generation config, README, sub-folders...: everything that is not weights
    (nor config.json, nor hidden, nor named in skip_files), as regular files (links followed)."""
    skip = shutil.ignore_patterns(".*", *(f"*{s}" for s in _WEIGHT_FILES))
    names = {"config.json", INDEX_NAME, *skip_files}
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or p.name in names or p.name.endswith(_WEIGHT_FILES):
            continue
        if p.is_file():
            shutil.copyfile(p, dest / p.name)
        elif p.is_dir():
            shutil.copytree(p, dest / p.name, ignore=skip)


def _publish(tmp: Path, out: Path, force: bool) -> None:
    """Rename `tmp` to `out`; an existing `out` (with force) is renamed away first and removed
    after, so at every moment `out` is either the old output or the complete new one."""
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        return
    if not force:
        raise OutputExistsError(f"{out}: appeared while writing; nothing was written there")
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    os.rename(tmp, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def save_checkpoint(out: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write a dict of tensors as a (sharded) checkpoint; kwargs go to CheckpointWriter."""
    from .dtypes import dtype_code
    plan = [(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with CheckpointWriter(out, plan, **kwargs) as w:
        for n, t in tensors.items():
            w.write(n, t)
        return w.close(config)
