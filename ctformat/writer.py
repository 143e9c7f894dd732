"""Writing checkpoints: tensors streamed in the order of a plan into size-limited shards, in a
temporary folder published by one rename (spec §1.5). A failed or killed run leaves nothing
at the output path, and the input is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

from .errors import CheckpointNotFoundError, OutputExistsError, ResumableError, WriterError
from .spec import DTYPE_SIZES, INDEX_NAME, PICKLE_SUFFIXES, SINGLE_NAME

if TYPE_CHECKING:
    import torch

__all__ = ["CheckpointWriter", "WriterState", "save_checkpoint", "check_apart", "check_output", "ShardLayout",
           "Piece", "split_pieces", "PieceWriter", "finish_folder", "publish", "fsync_path"]

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


class ShardLayout:
    """Where every planned tensor lies: its shard file and byte range, and each shard's header.

    A pure function of (plan, max_shard_size) (spec §1.5): the single-process writer, every
    worker of a parallel run and a resumed run compute the same bytes from it, so pieces of
    one output can be written by different processes, at different times, into one folder.
    """

    def __init__(self, plan: Iterable[tuple[str, str, tuple[int, ...]]], max_shard_size: int) -> None:
        self.plan: Plan = [(n, d, tuple(s)) for n, d, s in plan]
        self.shard_of: list[int] = []
        shard, used = 0, 0
        for _, d, s in self.plan:
            size = DTYPE_SIZES[d] * prod(s)
            if used and used + size > max_shard_size:
                shard, used = shard + 1, 0
            self.shard_of.append(shard)
            used += size
        n = shard + 1 if self.plan else 0
        self.names = [SINGLE_NAME] if n == 1 else [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)]
        self.index = {name: i for i, (name, _, _) in enumerate(self.plan)}
        members: list[list[int]] = [[] for _ in range(n)]
        for i, k in enumerate(self.shard_of):
            members[k].append(i)
        self._headers: list[bytes] = []
        self.spans: list[tuple[int, int]] = []        # per tensor: [start, end) in its shard file
        for k in range(n):
            header, pos = {"__metadata__": {"format": "pt"}}, 0
            for i in members[k]:
                name, d, s = self.plan[i]
                size = DTYPE_SIZES[d] * prod(s)
                header[name] = {"dtype": d, "shape": list(s), "data_offsets": [pos, pos + size]}
                pos += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)                  # data starts 8-byte aligned
            self._headers.append(len(raw).to_bytes(8, "little") + raw)
        pos = [len(h) for h in self._headers]
        for i, (_, d, s) in enumerate(self.plan):
            k, size = self.shard_of[i], DTYPE_SIZES[d] * prod(s)
            self.spans.append((pos[k], pos[k] + size))
            pos[k] += size
        self.sizes = pos                               # each shard file's size in bytes

    def header(self, shard: int) -> bytes:
        """The first bytes of a shard file: the 8-byte length and the padded header JSON."""
        return self._headers[shard]

    def index_json(self) -> dict[str, Any] | None:
        """model.safetensors.index.json for more than one shard (None for one)."""
        if len(self.names) < 2:
            return None
        return {"metadata": {"total_size": sum(DTYPE_SIZES[d] * prod(s) for _, d, s in self.plan)},
                "weight_map": {n: self.names[k] for (n, _, _), k in zip(self.plan, self.shard_of)}}


@dataclass(frozen=True)
class Piece:
    """A unit of resumable work: tensors [first, stop) of the plan, all in one shard file,
    which occupy bytes [start, end) of it (the first piece of a shard starts at 0: header)."""

    file: str
    first: int
    stop: int
    start: int
    end: int

    def to_json(self) -> list:
        return [self.file, self.first, self.stop, self.start, self.end]


def split_pieces(layout: ShardLayout, step_of: list[int], piece_size: int) -> list[Piece]:
    """Cut each shard into pieces of about `piece_size` bytes, only where a step ends, so one
    shard that dominates the output is still shared among workers, and a step is computed
    twice only where the shard rule (spec §1.5) cuts it."""
    pieces: list[Piece] = []
    i, n = 0, len(layout.plan)
    while i < n:
        k, first = layout.shard_of[i], i
        start = 0 if i == 0 or layout.shard_of[i - 1] != k else layout.spans[i][0]
        while i + 1 < n and layout.shard_of[i + 1] == k and not (
                layout.spans[i][1] - start >= piece_size and step_of[i + 1] != step_of[i]):
            i += 1
        pieces.append(Piece(layout.names[k], first, i + 1, start, layout.spans[i][1]))
        i += 1
    return pieces


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries to the disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PieceWriter:
    """Writes the tensors of some pieces into shard files that exist at their full size in
    `folder`, each at its planned offset (so several processes can share one file), with a
    SHA-256 of each piece computed while writing (beside the write, in a second thread).
    A finished piece is fsynced, then handed to `on_done(piece, digest)`; the pieces not
    asked for are skipped, so a step whose outputs straddle two pieces can be fed whole.
    `progress(nbytes)` is told of every tensor written."""

    def __init__(self, folder: Path, layout: ShardLayout, pieces: Iterable[Piece],
                 on_done: Callable[[Piece, str], None], progress: Callable[[int], None] | None = None) -> None:
        self.folder, self.layout, self.on_done, self.progress = folder, layout, on_done, progress
        self.pieces = list(pieces)
        self._owner = {i: p for p in self.pieces for i in range(p.first, p.stop)}
        self._digest: dict[Piece, Any] = {}
        self._cursor: dict[Piece, int] = {}
        self._left = {p: p.stop - p.first for p in self.pieces}
        self._fds: dict[str, int] = {}
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="ctformat-digest")

    def write(self, name: str, tensor: torch.Tensor) -> None:
        i = self.layout.index.get(name)
        if i is None:
            raise WriterError(f"write({name!r}): not in the plan")
        piece = self._owner.get(i)
        if piece is None:
            return                                     # another piece's tensor, or done already
        from .dtypes import dtype_code
        _, d, s = self.layout.plan[i]
        if (dtype_code(tensor.dtype), tuple(tensor.shape)) != (d, s):
            raise WriterError(f"expected {name} {d} {list(s)}, got {dtype_code(tensor.dtype)} {list(tensor.shape)}")
        if piece not in self._digest:
            self._digest[piece] = hashlib.sha256()
            self._cursor[piece] = piece.start
            if piece.start == 0:
                header = self.layout.header(self.layout.shard_of[i])
                self._put(piece, 0, header)
                if self.progress:
                    self.progress(len(header))
        start, end = self.layout.spans[i]
        if self._cursor[piece] != start:
            raise WriterError(f"write({name!r}) out of plan order")
        if end > start:
            import torch
            self._put(piece, start, tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
        self._left[piece] -= 1
        if self.progress:
            self.progress(end - start)
        if not self._left[piece]:
            self._finish(piece)

    def _fd(self, file: str) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(self.folder / file, os.O_WRONLY)
        return self._fds[file]

    def _put(self, piece: Piece, offset: int, data) -> None:
        view = memoryview(data).cast("B")
        hashed = self._hasher.submit(self._digest[piece].update, view)    # hashing beside the write
        fd, done = self._fd(piece.file), 0
        try:
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
        except OSError as err:
            raise ResumableError(f"{err.strerror or err} while writing; the temporary folder is kept",
                                 file=str(self.folder / piece.file), option="resume") from err
        finally:
            hashed.result()
        self._cursor[piece] = offset + len(view)

    def _finish(self, piece: Piece) -> None:
        try:
            os.fsync(self._fd(piece.file))
        except OSError as err:
            raise ResumableError(f"{err.strerror or err} while writing; the temporary folder is kept",
                                 file=str(self.folder / piece.file), option="resume") from err
        self.on_done(piece, self._digest.pop(piece).hexdigest())
        if not any(self._left[p] for p in self.pieces if p.file == piece.file):
            os.close(self._fds.pop(piece.file))

    def release(self) -> None:
        """Close the files (after success or failure)."""
        self._hasher.shutdown()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def close(self, config: Mapping[str, Any] | None = None) -> None:
        """Check every piece was written whole."""
        del config
        self.release()
        short = [p for p in self.pieces if self._left[p]]
        if short:
            raise WriterError(f"close() with {len(short)} piece(s) unfinished, first {short[0].file} "
                              f"tensors {short[0].first}..{short[0].stop - 1}")


class CheckpointWriter:
    """Write tensors, in the order of a plan given up front, into size-limited shards.

    Knowing every (name, dtype, shape) first lets each shard's header be written before its
    data, so tensors stream straight to disk and memory holds one tensor at a time. All
    files go to a temporary folder beside `out`, renamed to `out` by close(); an exception
    inside the `with` block removes the temporary folder, so a failed run leaves nothing.
    `source` is the input (a folder or a file): its other files are copied when it is a folder.
    """

    def __init__(self, out: str | os.PathLike, plan: Iterable[tuple[str, str, tuple[int, ...]]], *,
                 max_shard_size: int = 5_000_000_000, force: bool = False,
                 source: str | os.PathLike | None = None) -> None:
        self.out = Path(out)
        self.source = None if source is None else Path(source)
        check_output(self.out, self.source, force)
        self.force = force
        self.layout = ShardLayout(plan, max_shard_size)
        self.plan, self.shards = self.layout.plan, self.layout.shard_of
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
        finish_folder(self.tmp, self.layout, config, self.source)
        publish(self.tmp, self.out, self.force)
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
        return self.layout.names or [SINGLE_NAME]

    def _open_shard(self, shard: int) -> None:
        self._close_shard()
        self._fh = open(self.tmp / self._shard_names()[shard], "wb")
        self._fh_shard = shard
        self._fh.write(self.layout.header(shard))

    def _close_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


_WEIGHT_FILES = (".safetensors", ".safetensors.index.json") + PICKLE_SUFFIXES


def _copy_other_files(source: Path, dest: Path) -> None:
    """Tokenizer, generation config, README, sub-folders...: everything that is not weights
    (nor config.json, nor hidden), as regular files (links followed)."""
    skip = shutil.ignore_patterns(".*", *(f"*{s}" for s in _WEIGHT_FILES))
    for p in sorted(source.iterdir()):
        if p.name.startswith(".") or p.name in ("config.json", INDEX_NAME) or p.name.endswith(_WEIGHT_FILES):
            continue
        if p.is_file():
            shutil.copyfile(p, dest / p.name)
        elif p.is_dir():
            shutil.copytree(p, dest / p.name, ignore=skip)


def finish_folder(tmp: Path, layout: ShardLayout, config: Mapping[str, Any] | None, source: Path | None, *,
                  durable: bool = False) -> None:
    """Everything but the shards: the index, the source's other files, config.json; with
    `durable`, each of them (and the folder) flushed to the disk."""
    written = []
    index = layout.index_json()
    if index is not None:
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        written.append(tmp / INDEX_NAME)
    if source is not None and source.is_dir():
        _copy_other_files(source, tmp)
        written += [p for p in tmp.rglob("*") if p.is_file() and not p.name.endswith(".safetensors")]
    if config is not None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        written.append(tmp / "config.json")
    if durable:
        for p in {*written, tmp}:
            fsync_path(p)


def publish(tmp: Path, out: Path, force: bool) -> None:
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
