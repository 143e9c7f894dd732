"""safetensors headers and the shard index, read without touching tensor data (spec §1).

Torch-free on purpose: inspect and validate of a 74 GB checkpoint read only these bytes.
"""
from __future__ import annotations

import json
import os
import re
import struct
from functools import partial
from itertools import accumulate, chain, repeat
from math import prod
from operator import itemgetter, mul, sub
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

from .errors import HeaderError
from .spec import DTYPE_SIZES, HEADER_SIZE_CAP

__all__ = ["TensorInfo", "header_length", "read_header", "parse_header", "parse_index", "check_shard_name"]


class TensorInfo(NamedTuple):
    """One tensor as its header describes it; no bytes read. A NamedTuple, like gguf-py's
    records read from a file: a checkpoint holds ~200k of them and a tuple is built in C."""

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


def parse_header(raw: bytes, file_size: int, file: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Check a header's JSON and its byte accounting against a file of `file_size` bytes.

    Three readings, each exact: the safetensors library's own compact layout by one regex pass;
    any other JSON checked column by column; and, where either finds a problem, entry by entry,
    which finds and words the first one.
    """
    found = _compact_header(raw, file_size, file)
    if found is not None:
        return found
    obj = _header_json(raw, file)
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object", rule="HDR-02", file=file)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not an object of strings", rule="HDR-03", file=file)
    base = 8 + len(raw)
    tensors = _by_columns(obj, base, file_size - base, file)
    if tensors is None:                   # something is off: the per-entry checks say what
        tensors = {name: _entry(name, entry, base, file) for name, entry in obj.items()}
        _check_tiling(tensors, base, file_size - base, file)
    return tensors, metadata


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
    try:      # each distinct name once, in first-seen order: the first bad entry is still found first
        shards = dict.fromkeys(wmap.values())
    except TypeError:                             # an unhashable value: check every entry in order
        shards = wmap.values()
    for shard in shards:
        check_shard_name(shard, file)
    # (its ~200k shard strings are kept as parsed: sharing one per shard saves ~14 MB for as
    # long as the index lives, while the headers are read, and costs ~50 ms)
    return wmap

# -- reading 1: the safetensors library's own layout, one regex pass -------------------------------
# The header exactly as the safetensors library writes it (serde_json, compact, tensors in data
# order): {"__metadata__":{"k":"v",...},"name":{"dtype":"X","shape":[d,...],"data_offsets":[b,e]},...}
# Strings without escapes or control characters and integers as JSON spells them, so that a text
# this grammar covers reads as json.loads reads it. Anything else takes the general path.
_STR, _INT = r'[^"\\\x00-\x1f]*', r"(?:0|[1-9][0-9]*)"
_METADATA = re.compile(r'\{"__metadata__":(\{(?:"%s":"%s"(?:,"%s":"%s")*)?\})' % ((_STR,) * 4))
_ENTRY = re.compile(r'([{,])"(%s)":\{"dtype":"([A-Z0-9_]+)","shape":\[(%s(?:,%s)*)?\],"data_offsets":\[(%s),(%s)\]\}'
                    r"|(.)" % (_STR, _INT, _INT, _INT, _INT), re.DOTALL)      # (.): any text outside it
_CODES = {code: code for code in DTYPE_SIZES}          # one str object per dtype code
_new_info = partial(tuple.__new__, TensorInfo)    # TensorInfo from a 6-tuple, without a Python call


def _compact_header(raw: bytes, file_size: int, file: str) -> tuple[dict[str, TensorInfo], dict[str, str]] | None:
    """parse_header for the safetensors library's layout, in bulk; None when the text is not in
    it or breaks any rule (the other readings then judge it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    head = _METADATA.match(text)
    rows = _ENTRY.findall(text, head.end() if head else 0)
    if not rows:
        return None
    seps, names, dtypes, shapes, begins, ends, others = zip(*rows)     # the columns, in one pass
    rest = "".join(others)                # what the grammar left: must be the closing } alone
    n = len(rows) - len(rest)
    if not n or rest.rstrip(" \t\n\r") != "}":
        return None
    if n < len(rows):                     # the entries, each with its separator: { or , then , , ...
        seps, names, dtypes, shapes, begins, ends = (c[:n] for c in (seps, names, dtypes, shapes, begins, ends))
    if "".join(seps) != ("," if head else "{") + "," * (n - 1):
        return None                       # (text the grammar skipped in between has no separator)
    if begins[0] != "0" or begins[1:] != ends[:-1] or len(set(names)) != n or "__metadata__" in names:
        return None                       # not in data order, a duplicate name, or a tensor called __metadata__
    try:
        codes = list(map(_CODES.__getitem__, dtypes))
    except KeyError:
        return None
    tuples = {s: tuple(map(int, s.split(","))) if s else () for s in set(shapes)}
    shapes = list(map(tuples.__getitem__, shapes))
    nbytes = list(map(mul, map(prod, shapes), map(DTYPE_SIZES.__getitem__, codes)))
    ends = list(map(int, ends))
    base = 8 + len(raw)
    if ends != list(accumulate(nbytes)) or ends[-1] != file_size - base:
        return None                       # HDR-04, HDR-06
    try:
        metadata = _strict_loads(head.group(1)) if head else {}
    except ValueError:                    # a duplicate key in __metadata__
        return None
    nbytes = list(map(tuples.setdefault, nbytes, nbytes))      # equal sizes share one int
    starts = [base, *map(base.__add__, ends[:-1])]
    return dict(zip(names, map(_new_info, zip(names, codes, shapes, repeat(file), starts, nbytes)))), metadata


# -- reading 2: any JSON, checked column by column -------------------------------------------------

def _header_json(raw: bytes, file: str) -> Any:
    """The parsed header, duplicate keys refused at any depth (HDR-02). The plain C parse
    serves when _keys_unique proves no key was dropped; otherwise, and for every error, the
    strict parse decides and words the message."""
    try:
        obj = json.loads(raw.decode("utf-8"))
        if _keys_unique(raw, obj):
            return obj
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    try:
        return _strict_loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HeaderError(f"header is not UTF-8 JSON: {str(err)[:200]}", rule="HDR-02", file=file) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _strict_loads(text: str) -> Any:
    """JSON that refuses duplicate keys at any depth (HDR-02); the exact but slower parse."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


# A key's closing quote, then whitespace, then its colon: the one spelling the fast duplicate
# proof cannot count (json.dumps and the safetensors library never write it).
_SPACED_COLON = re.compile(rb'"[ \t\n\r]+:')


def _keys_unique(raw: bytes, obj: Any) -> bool:
    """True when `obj` (parsed from `raw`) provably lost no duplicate key; False means "unknown".

    Every key in the text ends in `":` (given no `"<whitespace>:`), so raw.count(b'":') bounds
    the number of keys in the text from above. The parsed objects hold at most that many keys,
    and fewer exactly when a duplicate was dropped: equality proves there was none.
    """
    if type(obj) is not dict or _SPACED_COLON.search(raw):
        return False
    values = obj.values()
    if set(map(type, values)) - {dict}:
        return False                      # a non-object entry: let the exact parse judge the text
    return raw.count(b'":') == len(obj) + sum(map(len, values))


_DTYPE, _SHAPE, _OFFSETS = itemgetter("dtype"), itemgetter("shape"), itemgetter("data_offsets")
_FIRST, _SECOND = itemgetter(0), itemgetter(1)


def _by_columns(obj: dict[str, Any], base: int, buffer: int, file: str) -> dict[str, TensorInfo] | None:
    """Every entry checked in bulk (HDR-03..06) with C-level passes over whole columns; None
    when any check fails, so that _entry and _check_tiling find and word the first problem."""
    entries = list(obj.values())
    if set(map(type, entries)) - {dict}:
        return None
    try:
        codes = list(map(_CODES.__getitem__, map(_DTYPE, entries)))
        shapes, offsets = list(map(_SHAPE, entries)), list(map(_OFFSETS, entries))
    except (KeyError, TypeError):        # a missing key, an unknown or unhashable dtype
        return None
    if set(map(type, shapes)) - {list} or set(map(type, offsets)) - {list} or set(map(len, offsets)) - {2}:
        return None
    begins, ends = list(map(_FIRST, offsets)), list(map(_SECOND, offsets))
    numbers = list(chain(chain.from_iterable(shapes), begins, ends))
    if set(map(type, numbers)) - {int} or min(numbers, default=0) < 0:
        return None                       # JSON integers only (a bool is not one), none negative
    shared: dict = {}                    # equal shapes and sizes share one object (~200k tensors)
    shapes = [shared.setdefault(t, t) for t in map(tuple, shapes)]
    nbytes = list(map(mul, map(prod, shapes), map(DTYPE_SIZES.__getitem__, codes)))
    if nbytes != list(map(sub, ends, begins)):
        return None                       # HDR-03 (begin > end) or HDR-04
    if not _tiles(begins, nbytes, buffer):
        return None                       # HDR-05, HDR-06
    nbytes = list(map(shared.setdefault, nbytes, nbytes))
    starts = list(map(base.__add__, begins))
    return dict(zip(obj, map(_new_info, zip(obj, codes, shapes, repeat(file), starts, nbytes))))


def _tiles(begins: list[int], nbytes: list[int], buffer: int) -> bool:
    """The byte ranges tile [0, buffer) in the order of _check_tiling (begin, then size).
    Headers list tensors in data order, so header order is tried first: when it tiles, the
    sorted order (which only moves empty tensors sharing a begin) tiles too."""
    ends = list(accumulate(nbytes, initial=0))
    if begins == ends[:-1]:
        return ends[-1] == buffer
    order = sorted(zip(begins, nbytes))
    ends = list(accumulate(map(_SECOND, order), initial=0))
    return list(map(_FIRST, order)) == ends[:-1] and ends[-1] == buffer


# -- reading 3: entry by entry, wording the first problem ------------------------------------------

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
