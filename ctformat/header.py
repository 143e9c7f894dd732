"""safetensors headers and the shard index, read without touching tensor data (spec §1).

Torch-free on purpose: inspect and validate of a 74 GB checkpoint read only these bytes.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import HeaderError
from .spec import DTYPE_SIZES, HEADER_SIZE_CAP

__all__ = ["TensorInfo", "header_length", "read_header", "parse_header", "parse_index", "check_shard_name"]


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor as its header describes it; no bytes read."""

    name: str
    dtype: str                 # safetensors code: "I32", "BF16", ...
    shape: tuple[int, ...]
    file: str                  # shard file name, relative to the model folder
    start: int                 # absolute byte offset of the data in that file
    nbytes: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


def header_length(prefix: bytes, size: int, file: str) -> int:
    """The header length N from a file's first 8 bytes, checked against the file size (HDR-01)."""
    if size < 8 or len(prefix) < 8:
        raise HeaderError(f"file is {size} bytes, too short for a safetensors header", rule="HDR-01", file=file)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n < 2 or n > HEADER_SIZE_CAP or n > size - 8:
        raise HeaderError(f"header length {n} is impossible for a file of {size} bytes "
                          f"(cap {HEADER_SIZE_CAP})", rule="HDR-01", file=file)
    return n


def read_header(path: Path, file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check one shard's header (HDR-01..06); `file` is the name used in messages."""
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            n = header_length(fh.read(8), size, file)
            raw = fh.read(n)
    except OSError as err:
        raise HeaderError(f"cannot read: {err.strerror or err}", rule="FILE-05", file=file) from err
    return parse_header(raw, size, file)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def parse_header(raw: bytes, file_size: int, file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a header's JSON and its byte accounting against a file of `file_size` bytes."""
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HeaderError(f"header is not UTF-8 JSON: {str(err)[:200]}", rule="HDR-02", file=file) from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object", rule="HDR-02", file=file)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not an object of strings", rule="HDR-03", file=file)
    base = 8 + len(raw)
    tensors = {name: _entry(name, entry, base, file) for name, entry in obj.items()}
    _check_tiling(tensors, base, file_size - base, file)
    return tensors, metadata


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry(name: str, entry: Any, base: int, file: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise HeaderError("entry is not an object", rule="HDR-03", file=file, where=name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"unknown dtype {dtype!r}", rule="HDR-03", file=file, where=name)
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise HeaderError(f"shape {shape!r} is not a list of non-negative integers",
                          rule="HDR-03", file=file, where=name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise HeaderError(f"data_offsets {offsets!r} is not [begin, end] with begin <= end",
                          rule="HDR-03", file=file, where=name)
    begin, end = offsets
    want = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != want:
        raise HeaderError(f"{dtype} {tuple(shape)} needs {want} bytes, data_offsets give {end - begin}",
                          rule="HDR-04", file=file, where=name)
    return TensorInfo(name, dtype, tuple(shape), file, base + begin, end - begin)


def _check_tiling(tensors: dict[str, TensorInfo], base: int, buffer: int, file: str) -> None:
    pos = 0                                   # relative offset the next tensor must start at
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.nbytes)):
        begin = t.start - base
        if begin != pos:
            kind = "overlaps the tensor before it" if begin < pos else "leaves a hole before it"
            raise HeaderError(f"data_offsets begin at {begin}: {kind} (expected {pos})",
                              rule="HDR-05", file=file, where=t.name)
        pos += t.nbytes
    if pos > buffer:
        raise HeaderError(f"file is truncated: tensors need {pos} data bytes, file has {buffer}",
                          rule="HDR-06", file=file)
    if pos < buffer:
        raise HeaderError(f"{buffer - pos} stray bytes after the last tensor", rule="HDR-06", file=file)


def check_shard_name(name: Any, index_file: str) -> str:
    """A shard name must stay inside the model folder (FILE-04); returns it unchanged."""
    if not isinstance(name, str) or not name:
        raise HeaderError(f"shard name {name!r} is not a file name", rule="FILE-03", file=index_file)
    p = PurePosixPath(name)
    if (not p.parts or p.is_absolute() or "\\" in name or ".." in p.parts or name.startswith("~")
            or ":" in p.parts[0] or name.endswith("/")):
        raise HeaderError(f"shard name {name!r} points outside the model folder",
                          rule="FILE-04", file=index_file)
    return name


def parse_index(raw: bytes, file: str) -> dict[str, str]:
    """model.safetensors.index.json -> its weight_map, every shard name checked (FILE-03, FILE-04)."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HeaderError(f"not UTF-8 JSON: {str(err)[:200]}", rule="FILE-03", file=file) from None
    wmap = obj.get("weight_map") if isinstance(obj, dict) else None
    if not isinstance(wmap, dict) or not wmap:
        raise HeaderError("no weight_map object", rule="FILE-03", file=file)
    for name, shard in wmap.items():
        check_shard_name(shard, file)
    return wmap
