"""Streaming GGUF output (spec/gguf.md §6): plan and metadata up front, then one tensor at a
time in plan order, into a temporary folder whose files are renamed into place at close().

gguf-py's GGUFWriter does the byte layout (header, key/values, tensor infos, alignment,
split naming); this class adds the plan check, the streaming order and atomic publication.
"""
from __future__ import annotations

import errno
import os
import shutil
import uuid
from enum import Enum
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .errors import OutputExistsError, WriterError
from .gguf_header import ggml_nbytes
from .writer import check_output

__all__ = ["GGUFOutput", "FLOAT_TYPES"]

# ggml float types and the torch dtype a tensor of that type is handed in as
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _State(Enum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class GGUFOutput:
    """Write a GGUF file (or split set) from a plan of (name, ggml type, torch-order shape).

    `metadata(writer)` adds the key/values to the gguf.GGUFWriter after the tensor infos are
    known (so parameter counts can be derived from them). Tensors are then passed to write()
    in plan order: quantized types as uint8 block bytes [..., rows, in/block * type_size], float
    types as torch tensors of that dtype. A tensor of rank >= 2 may also come in pieces along its
    first axis, in order (a stack of experts, expert by expert): memory then holds one piece.
    """

    def __init__(self, out: str | os.PathLike, arch: str, plan: Iterable[tuple[str, str, tuple[int, ...]]],
                 metadata: Callable[[Any], None] | None = None, *, split_max_size: int = 0,
                 force: bool = False, source: str | os.PathLike | None = None) -> None:
        import gguf
        self.out = Path(out)
        check_output(self.out, None if source is None else Path(source), force)
        self.plan = [(n, t, tuple(int(v) for v in s)) for n, t, s in plan]
        self.force = force
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir()
        self.state = _State.OPEN
        try:
            self._w = gguf.GGUFWriter(self.tmp / self.out.name, arch, split_max_size=split_max_size)
            for name, ggml_type, shape in self.plan:
                qtype = gguf.GGMLQuantizationType[ggml_type]
                self._w.add_tensor_info(name, shape, np.dtype(np.float32), ggml_nbytes(ggml_type, shape),
                                        raw_dtype=qtype)
            self.files = [Path(p).name for p in self._w.format_shard_names(self.tmp / self.out.name)]
            self.targets = [self.out.parent / f for f in self.files]
            taken = [t for t in self.targets if t.exists() or t.is_symlink()]
            if taken and not force:
                raise OutputExistsError(f"{taken[0]}: already exists", option="force")
            if metadata is not None:
                metadata(self._w)
            self._w.write_header_to_file()
            self._w.write_kv_data_to_file()
            self._w.write_ti_data_to_file()
        except BaseException:
            self.abort()
            raise
        self._next = 0
        self._rows = 0                        # leading rows of the current tensor written (in pieces)
        self._open: _Deferred | None = None

    def __enter__(self) -> GGUFOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state is _State.OPEN:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.state is not _State.OPEN:
            raise WriterError(f"write({name!r}) on a GGUF output in state {self.state.value}")
        if self._next >= len(self.plan):
            raise WriterError(f"write({name!r}) after the last planned tensor")
        want_name, ggml_type, shape = self.plan[self._next]
        want = (shape, FLOAT_TYPES[ggml_type]) if ggml_type in FLOAT_TYPES else (
            (*shape[:-1], ggml_nbytes(ggml_type, shape[-1:])), torch.uint8)
        got = (tuple(tensor.shape), tensor.dtype)
        whole = got == want and not self._rows
        same_rows = got[1] == want[1] and len(got[0]) == len(want[0]) >= 2 and got[0][1:] == want[0][1:]
        lead = got[0][0] if same_rows else 0
        piece = not whole and 0 < lead and self._rows + lead <= want[0][0]
        if name != want_name or not (whole or piece):
            raise WriterError(f"expected {want_name} {ggml_type} {list(want[0])} {want[1]}"
                              f"{f' (rows {self._rows}..)' if self._rows else ''}, got {name} {list(got[0])} {got[1]}")
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if whole:
            self._w.write_tensor_data(data)
            self._next += 1
            return
        if not self._rows:           # gguf-py places the tensor (shard, alignment); its bytes follow here
            self._open = _Deferred(ggml_nbytes(ggml_type, shape))
            self._w.write_tensor_data(self._open)
            self._open.fout.seek(self._open.start)
        data.tofile(self._open.fout)
        self._rows += lead
        if self._rows == want[0][0]:
            self._w.write_padding(self._open.fout, self._open.nbytes)
            self._open, self._rows = None, 0
            self._next += 1

    def copy_range(self, name: str, src) -> None:
        """The next planned tensor, whole, from bytes of a file (a pipeline.SourceRange: a source
        tensor whose bytes are the output's): copied in the kernel, never through memory."""
        if self.state is not _State.OPEN:
            raise WriterError(f"copy_range({name!r}) on a GGUF output in state {self.state.value}")
        if self._next >= len(self.plan) or self._rows:
            raise WriterError(f"copy_range({name!r}) after the last planned tensor or inside one written in pieces")
        want_name, ggml_type, shape = self.plan[self._next]
        nbytes = ggml_nbytes(ggml_type, shape)
        if name != want_name or src.nbytes != nbytes:
            raise WriterError(f"expected {want_name} {ggml_type} {list(shape)} ({nbytes} bytes), got {name} "
                              f"({src.nbytes} bytes)")
        spot = _Deferred(nbytes)
        self._w.write_tensor_data(spot)
        spot.fout.seek(spot.start)             # flushes gguf-py's buffered bytes before the kernel writes
        _copy_file_range(src.path, src.start, spot.fout.fileno(), spot.start, nbytes)
        spot.fout.seek(spot.start + nbytes)
        self._w.write_padding(spot.fout, nbytes)
        self._next += 1

    def close(self, config: Any = None) -> list[Path]:
        """Finish every shard and rename it into place; `config` is accepted for the pipeline's
        writer protocol and ignored (metadata went in at the start)."""
        del config
        if self.state is not _State.OPEN:
            raise WriterError(f"close() on a GGUF output in state {self.state.value}")
        if self._next != len(self.plan):
            raise WriterError(f"close() after {self._next} of {len(self.plan)} planned tensors")
        self._w.close()
        for name, target in zip(self.files, self.targets):
            if (target.exists() or target.is_symlink()) and not self.force:
                self.abort()
                raise OutputExistsError(f"{target}: appeared while writing; nothing was written there")
            os.replace(self.tmp / name, target)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.state = _State.CLOSED
        return self.targets

    def abort(self) -> None:
        w = getattr(self, "_w", None)
        if w is not None:
            w.close()
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.state = _State.FAILED


class _Deferred:
    """Stands in for a tensor written in pieces: gguf-py's write_tensor_data pops its tensor info,
    pads the shard to the alignment and calls tofile, which only records where the data starts
    (write_tensor_data's own trailing padding lands there and is overwritten by the pieces)."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes
        self.fout = None
        self.start = 0

    def tofile(self, fout) -> None:
        self.fout, self.start = fout, fout.tell()


def _copy_file_range(path: Path, start: int, fd_out: int, at: int, nbytes: int) -> None:
    """nbytes of `path` from `start` to `fd_out` at `at`: os.copy_file_range (Linux; a reflink or
    an in-kernel copy), else pread/pwrite in 8 MiB steps where the call is missing or refused
    (another kernel, a filesystem that does not take it)."""
    with open(path, "rb") as src:
        fd_in, done = src.fileno(), 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(fd_in, fd_out, nbytes - done, start + done, at + done)
                    if n <= 0:
                        break                  # the source ended early: reported below
                    done += n
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
        while done < nbytes:
            chunk = os.pread(fd_in, min(nbytes - done, 8 << 20), start + done)
            if not chunk:
                raise WriterError(f"{path.name}: ended {nbytes - done} bytes before the tensor copied from it")
            done += os.pwrite(fd_out, chunk, at + done)
