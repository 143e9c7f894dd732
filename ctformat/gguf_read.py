"""Reading a GGUF file or split set back (spec/gguf.md §6, GGUF-12): structure checks and the
values of each tensor, for inspect/validate and for tests. Parsing is gguf-py's GGUFReader."""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SpecError
from .ggml import BLOCK_TYPES, decode

__all__ = ["GGUFTensorInfo", "GGUFFile", "open_gguf"]

_SHARD = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


class GGUFError(SpecError):
    """A .gguf file that breaks GGUF-12."""


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: str
    shape: tuple[int, ...]      # torch order (ne reversed)
    file: str
    nbytes: int


class GGUFFile:
    """All shards of one GGUF model: key/values of the first, tensors of every shard."""

    def __init__(self, readers: list[Any], files: list[Path]) -> None:
        self._readers, self.files = readers, files
        self.fields: dict[str, Any] = {k: f.contents() for k, f in readers[0].fields.items()
                                       if not k.startswith("GGUF.")}
        self.tensors: dict[str, GGUFTensorInfo] = {}
        self._data: dict[str, Any] = {}
        for reader, path in zip(readers, files):
            for t in reader.tensors:
                shape = tuple(int(v) for v in reversed(t.shape.tolist()))
                self.tensors[t.name] = GGUFTensorInfo(t.name, t.tensor_type.name, shape, path.name, int(t.n_bytes))
                self._data[t.name] = t

    @property
    def arch(self) -> str:
        return self.fields.get("general.architecture", "")

    def values(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor's values as a ggml reader computes them (float64 by default: exact)."""
        import gguf
        t, info = self._data[name], self.tensors[name]
        raw = np.asarray(t.data)
        if info.ggml_type in BLOCK_TYPES:
            from .ggml import dequantize_blocks
            blocks = torch.from_numpy(raw.copy()).reshape(*info.shape[:-1], -1)
            return dequantize_blocks(blocks, BLOCK_TYPES[info.ggml_type], dtype)
        qtype = gguf.GGMLQuantizationType[info.ggml_type]
        return torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float64)).reshape(info.shape).to(dtype)

    def codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(stored values, d, m) of a repacked tensor (ggml.decode), for reading GGUF back into CT."""
        t, info = self._data[name], self.tensors[name]
        blocks = torch.from_numpy(np.asarray(t.data).copy()).reshape(*info.shape[:-1], -1)
        return decode(blocks, BLOCK_TYPES[info.ggml_type])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open one .gguf file, or a split set through any of its shards; GGUF-12 on bad structure."""
    import gguf
    path = Path(path)
    hit = _SHARD.match(path.name)
    files = [path]
    if hit:
        n = int(hit["n"])
        files = [path.with_name(f"{hit['stem']}-{k:05d}-of-{n:05d}.gguf") for k in range(1, n + 1)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise GGUFError(f"split set of {n} lacks {', '.join(missing)}", rule="GGUF-12", file=path.name)
    readers = []
    for f in files:
        try:
            readers.append(gguf.GGUFReader(f))
        except (ValueError, OSError, IndexError, KeyError, struct.error) as err:
            raise GGUFError(f"not a readable GGUF file: {err}", rule="GGUF-12", file=f.name) from None
    if hit:
        _check_split(readers, files)
    out = GGUFFile(readers, files)
    for t in out.tensors.values():
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[t.ggml_type]][0]
        if t.shape and t.shape[-1] % block:
            raise GGUFError(f"ne[0] = {t.shape[-1]} is not a multiple of {t.ggml_type}'s block size {block}",
                            rule="GGUF-12", file=t.file, where=t.name)
    return out


def _check_split(readers, files) -> None:
    n, total = len(readers), sum(len(r.tensors) for r in readers)
    for k, (r, f) in enumerate(zip(readers, files)):
        got = {key: r.fields[key].contents() if key in r.fields else None
               for key in ("split.no", "split.count", "split.tensors.count")}
        if got != {"split.no": k, "split.count": n, "split.tensors.count": total}:
            raise GGUFError(f"split keys {got} disagree with shard {k} of {n} holding {total} tensors in all",
                            rule="GGUF-12", file=f.name)
