"""The tensor data of a GGUF file or split set (spec/gguf.md §6): the values a ggml reader
computes from each tensor, for reading a conversion back. Headers come from gguf_header."""
from __future__ import annotations

import os
from typing import Any

import torch

from .ggml import BLOCK_TYPES, decode, dequantize_blocks
from .gguf_header import GGUFModel, GGUFTensorInfo, open_gguf_model

__all__ = ["GGUFFile", "open_gguf"]

_FLOATS = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class GGUFFile:
    """All shards of one GGUF model: key/values of the first, tensors of every shard."""

    def __init__(self, model: GGUFModel) -> None:
        self.model = model
        self.files = model.files
        self.fields: dict[str, Any] = model.fields
        self.tensors: dict[str, GGUFTensorInfo] = model.tensors
        self._paths = {h.file: h.path for h in model.headers}

    @property
    def arch(self) -> str:
        return self.fields.get("general.architecture", "")

    def raw(self, name: str) -> torch.Tensor:
        """A tensor's bytes as stored (uint8 [..., row bytes])."""
        info = self.tensors[name]
        out = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(self._paths[info.file], "rb") as fh:
            fh.seek(info.offset)
            fh.readinto(out.numpy())
        return out.reshape(*info.shape[:-1], -1)

    def values(self, name: str, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """A tensor's values as a ggml reader computes them (float64 by default: exact)."""
        info, raw = self.tensors[name], self.raw(name)
        if info.ggml_type in BLOCK_TYPES:
            return dequantize_blocks(raw, BLOCK_TYPES[info.ggml_type], dtype)
        if info.ggml_type not in _FLOATS:
            raise NotImplementedError(f"{name}: reading {info.ggml_type} values")
        return raw.reshape(-1).view(_FLOATS[info.ggml_type]).reshape(info.shape).to(dtype)

    def codes(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(stored values, d, m) of a repacked tensor (ggml.decode), for reading GGUF back into CT."""
        return decode(self.raw(name), BLOCK_TYPES[self.tensors[name].ggml_type])


def open_gguf(path: str | os.PathLike) -> GGUFFile:
    """Open one .gguf file, or a split set through any of its shards; GGUF rules on bad structure."""
    return GGUFFile(open_gguf_model(path))
