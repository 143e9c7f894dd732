"""GGUF files, read by their headers (spec/gguf.md §8): magic, version, key/values and tensor
infos of one file or a split set, checked for internal consistency (GGUF-01..06).

Plain reads, no mmap, no torch, no numpy, no gguf-py: `inspect` and `validate` of a .gguf read
only its header, as they do for safetensors. The tensor data is never touched here.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CheckpointNotFoundError, GGUFFileError
from .spec import GGML_TYPES, GGUF_ALIGNMENT, GGUF_MAGIC, GGUF_MAX_DIMS, GGUF_SHARD, GGUF_VALUE_TYPES, GGUF_VERSIONS

__all__ = ["GGUFTensorInfo", "GGUFHeader", "GGUFModel", "read_gguf_header", "open_gguf_model", "is_gguf_path",
           "ggml_nbytes", "GGML_BY_NAME"]

GGML_BY_NAME = {name: (tid, block, size) for tid, (name, block, size) in GGML_TYPES.items()}
_SHARD = re.compile(GGUF_SHARD)
_MAX_STRING = 1 << 30          # a key or string longer than this is a broken header, not data
_MAX_COUNT = 1 << 40


def ggml_nbytes(ggml_type: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of logical (torch-order) shape in a ggml type (GGUF-04 if ragged)."""
    _, block, size = GGML_BY_NAME[ggml_type]
    if shape and shape[-1] % block:
        raise ValueError(f"row of {shape[-1]} is not a multiple of {ggml_type}'s block size {block}")
    return prod(shape[:-1]) * (shape[-1] if shape else 1) // block * size


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    ggml_type: str              # GGML_TYPES name, or "type-N" for an unknown id (GGUF-04)
    shape: tuple[int, ...]      # torch order: ne reversed
    file: str
    offset: int                 # absolute byte offset in the file
    nbytes: int                 # 0 when the type is unknown or the row is ragged

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass
class GGUFHeader:
    """One .gguf file's header."""

    file: str                   # the name as reported (file name)
    path: Path
    version: int
    fields: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int
    size: int                   # the file's size in bytes
    problems: list[GGUFFileError] = field(default_factory=list)    # GGUF-03/04/05 found while reading


def is_gguf_path(path: str | os.PathLike) -> bool:
    """A .gguf file, or a folder with .gguf files and no safetensors (one GGUF model)."""
    p = Path(path)
    if p.is_file():
        return p.suffix == ".gguf"
    return p.is_dir() and any(p.glob("*.gguf")) and not any(p.glob("*.safetensors"))


class _Reader:
    def __init__(self, fh: BinaryIO, label: str, size: int) -> None:
        self.fh, self.label, self.size = fh, label, size

    def fail(self, message: str, rule: str = "GGUF-02", where: str | None = None) -> GGUFFileError:
        return GGUFFileError(message, rule=rule, file=self.label, where=where)

    def take(self, n: int, what: str) -> bytes:
        pos = self.fh.tell()
        if n < 0 or pos + n > self.size:
            raise self.fail(f"header is truncated: {what} needs {n} bytes at offset {pos}, the file has {self.size}")
        return self.fh.read(n)

    def scalar(self, fmt: str, what: str):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str) -> int:
        n = self.scalar("<Q", what)
        if n > _MAX_COUNT:
            raise self.fail(f"{what} is {n}, more than any file holds")
        return n

    def string(self, what: str) -> str:
        n = self.count(f"length of {what}")
        if n > _MAX_STRING:
            raise self.fail(f"{what} claims {n} bytes")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, key: str, depth: int = 0) -> Any:
        if vtype not in GGUF_VALUE_TYPES:
            raise self.fail(f"unknown value type {vtype}", where=key)
        name, fmt = GGUF_VALUE_TYPES[vtype]
        if fmt:
            return self.scalar(fmt, f"value of {key}")
        if name == "STRING":
            return self.string(f"value of {key}")
        if depth:
            raise self.fail("array of arrays", where=key)
        etype = self.scalar("<I", f"array type of {key}")
        n = self.count(f"array length of {key}")
        if etype in GGUF_VALUE_TYPES and GGUF_VALUE_TYPES[etype][1]:     # fixed-size items: one read
            efmt = GGUF_VALUE_TYPES[etype][1]
            raw = self.take(n * struct.calcsize(efmt), f"array of {key}")
            return list(struct.unpack(f"<{n}{efmt[1:]}", raw))
        return [self.value(etype, key, depth + 1) for _ in range(n)]


def read_gguf_header(path: str | os.PathLike, label: str | None = None) -> GGUFHeader:
    """Parse one file's header; GGUF-01/02 raise (nothing after them can be read), GGUF-03/04/05
    are collected in `.problems`."""
    path = Path(path)
    label = label or path.name
    size = path.stat().st_size
    with open(path, "rb") as fh:
        r = _Reader(fh, label, size)
        magic = fh.read(4)
        if magic != GGUF_MAGIC:
            raise GGUFFileError(f"magic is {magic!r}, not {GGUF_MAGIC!r}: not a GGUF file", rule="GGUF-01", file=label)
        version = r.scalar("<I", "version") if size >= 8 else None
        if version not in GGUF_VERSIONS:
            raise GGUFFileError(f"version {version}; ctformat reads GGUF versions "
                                f"{', '.join(map(str, GGUF_VERSIONS))}", rule="GGUF-01", file=label)
        n_tensors, n_kv = r.count("tensor count"), r.count("key/value count")
        fields: dict[str, Any] = {}
        problems: list[GGUFFileError] = []
        for _ in range(n_kv):
            key = r.string("key")
            value = r.value(r.scalar("<I", f"type of {key}"), key)
            if key in fields:
                problems.append(r.fail("key appears twice", "GGUF-03", key))
            fields[key] = value
        raw_infos = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            n_dims = r.scalar("<I", f"dimension count of {name}")
            if n_dims > 64:
                raise r.fail(f"{n_dims} dimensions", where=name)
            ne = tuple(r.scalar("<Q", f"shape of {name}") for _ in range(n_dims))
            raw_infos.append((name, ne, r.scalar("<I", f"type of {name}"), r.scalar("<Q", f"offset of {name}")))
        header_end = fh.tell()
    alignment = fields.get("general.alignment", GGUF_ALIGNMENT)
    if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0 or alignment & (alignment - 1):
        problems.append(GGUFFileError(f"general.alignment is {alignment!r}, not a power of two", rule="GGUF-03",
                                      file=label, where="general.alignment"))
        alignment = GGUF_ALIGNMENT
    data_start = -(-header_end // alignment) * alignment
    arch = fields.get("general.architecture")
    if "split.no" not in fields or fields.get("split.no") == 0:       # later shards carry no model keys
        if not isinstance(arch, str) or not arch:
            problems.append(GGUFFileError(f"general.architecture is {arch!r}, not a name", rule="GGUF-03",
                                          file=label, where="general.architecture"))
    tensors = [_tensor(label, name, ne, tid, data_start + off, problems) for name, ne, tid, off in raw_infos]
    problems += _layout_problems(label, tensors, [off for *_, off in raw_infos], alignment, data_start, size)
    return GGUFHeader(label, path, version, fields, tensors, alignment, data_start, size, problems)


def _tensor(label: str, name: str, ne: tuple[int, ...], tid: int, offset: int,
            problems: list[GGUFFileError]) -> GGUFTensorInfo:
    shape = tuple(reversed(ne))

    def bad(message: str) -> GGUFTensorInfo:
        problems.append(GGUFFileError(message, rule="GGUF-04", file=label, where=name))
        return GGUFTensorInfo(name, GGML_TYPES.get(tid, (f"type-{tid}",))[0], shape, label, offset, 0)
    if tid not in GGML_TYPES:
        return bad(f"unknown ggml type {tid}")
    if not 1 <= len(ne) <= GGUF_MAX_DIMS:
        return bad(f"{len(ne)} dimensions; ggml tensors have 1 to {GGUF_MAX_DIMS}")
    type_name, block, _ = GGML_TYPES[tid]
    if ne[0] % block:
        return bad(f"ne[0] = {ne[0]} is not a multiple of {type_name}'s block size {block}")
    return GGUFTensorInfo(name, type_name, shape, label, offset, ggml_nbytes(type_name, shape))


def _layout_problems(label: str, tensors: list[GGUFTensorInfo], rel: list[int], alignment: int, data_start: int,
                     size: int) -> list[GGUFFileError]:
    out = []
    seen: set[str] = set()
    for t in tensors:
        if t.name in seen:
            out.append(GGUFFileError("tensor name appears twice", rule="GGUF-04", file=label, where=t.name))
        seen.add(t.name)
    spans = []
    for t, off in zip(tensors, rel):
        if off % alignment:
            out.append(GGUFFileError(f"data offset {off} is not a multiple of the alignment {alignment}",
                                     rule="GGUF-05", file=label, where=t.name))
        elif t.offset + t.nbytes > size:
            out.append(GGUFFileError(f"data [{t.offset}, {t.offset + t.nbytes}) lies past the end of the file "
                                     f"({size} bytes)", rule="GGUF-05", file=label, where=t.name))
        spans.append((t.offset, t.offset + t.nbytes, t.name))
    spans.sort()
    for (a0, a1, a), (b0, _, b) in zip(spans, spans[1:]):
        if b0 < a1:
            out.append(GGUFFileError(f"data overlaps {a}'s", rule="GGUF-05", file=label, where=b))
    return out


@dataclass
class GGUFModel:
    """One GGUF model: a single file or every shard of a split set (spec/gguf.md §6)."""

    label: str
    headers: list[GGUFHeader]
    problems: list[GGUFFileError]

    @property
    def fields(self) -> dict[str, Any]:
        return self.headers[0].fields if self.headers else {}

    @property
    def tensors(self) -> dict[str, GGUFTensorInfo]:
        return {t.name: t for h in self.headers for t in h.tensors}

    @property
    def files(self) -> list[Path]:
        return [h.path for h in self.headers]


def open_gguf_model(path: str | os.PathLike, *, strict: bool = True) -> GGUFModel:
    """A .gguf file, one shard of a split set (all shards are read), or a folder holding one
    model's .gguf file(s). strict: raise the first problem; else collect them (validate)."""
    p = Path(path)
    files = _model_files(p)
    problems: list[GGUFFileError] = []
    headers = []
    for f in files:
        if not f.is_file():
            problems.append(GGUFFileError(f"shard {f.name} of the split set is missing", rule="GGUF-06", file=f.name))
            continue
        try:
            h = read_gguf_header(f)
        except GGUFFileError as err:
            if strict:
                raise
            problems.append(err)
            continue
        headers.append(h)
        problems += h.problems
    if len(files) > 1 or (headers and "split.count" in headers[0].fields):
        problems += _split_problems(files, headers)
    if strict and problems:
        raise problems[0]
    return GGUFModel(str(path), headers, problems)


def _model_files(p: Path) -> list[Path]:
    if p.is_dir():
        found = sorted(p.glob("*.gguf"))
        stems = {(_SHARD.match(f.name) or {"stem": f.stem})["stem"] for f in found}
        if len(stems) != 1:
            raise CheckpointNotFoundError(f"{p}: holds {len(found)} .gguf files of {len(stems)} models; name one file",
                                          rule="FILE-01", file=str(p))
        p = found[0]
    if not p.is_file():
        raise CheckpointNotFoundError(f"{p}: no such file", rule="FILE-01", file=str(p))
    hit = _SHARD.match(p.name)
    if not hit:
        return [p]
    n = int(hit["n"])
    return [p.with_name(f"{hit['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]


def _split_problems(files: list[Path], headers: list[GGUFHeader]) -> list[GGUFFileError]:
    total = sum(len(h.tensors) for h in headers)
    out = []
    names: dict[str, str] = {}
    for h in headers:
        k = next(i for i, f in enumerate(files) if f == h.path)
        got = {key: h.fields.get(key) for key in ("split.no", "split.count", "split.tensors.count")}
        want = {"split.no": k, "split.count": len(files), "split.tensors.count": total}
        if len(headers) == len(files) and got != want:
            out.append(GGUFFileError(f"split keys {got}; shard {k + 1} of {len(files)} holding {total} tensors in all "
                                     f"needs {want}", rule="GGUF-06", file=h.file))
        for t in h.tensors:
            if t.name in names:
                out.append(GGUFFileError(f"tensor also in {names[t.name]}", rule="GGUF-06", file=h.file, where=t.name))
            names[t.name] = h.file
    return out
