"""Checkpoint folders: read headers, group tensors into modules, load one tensor at a time;
write sharded checkpoints atomically (spec §1, §4).

Opening a checkpoint reads config.json, the index and each shard's header, nothing more.
torch is imported only when tensor data is loaded or written.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass
from enum import Enum
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import (CheckpointNotFoundError, ConfigError, HeaderError, OutputExistsError, SpecError,
                     WriterError)
from .header import TensorInfo, parse_index, read_header
from .scheme import MarlinConfig, QuantGroup, QuantizationConfig, QuantScheme
from .spec import (DENSE, DTYPE_SIZES, EMBEDDING_NAMES, INDEX_NAME, MARLIN_PARAMS, PADDED, PICKLE_SUFFIXES,
                   QUANT_PARAMS, SINGLE_NAME)

if TYPE_CHECKING:
    import torch

__all__ = ["Module", "Checkpoint", "LocalFiles", "open_checkpoint", "read_checkpoint", "CheckpointWriter", "save_checkpoint",
           "torch_dtype", "dtype_code"]


@dataclass(frozen=True, slots=True)
class Module:
    """Tensors that share a prefix (`model.layers.0.mlp.down_proj`), keyed by suffix."""

    prefix: str
    tensors: Mapping[str, TensorInfo]
    group: QuantGroup | None = None      # the config group that targets it
    ignored: bool = False                # matched by `ignore`

    @property
    def quantized(self) -> bool:
        """Carries any tensor of a quantization tensor set, complete or not (spec §2.2): such a
        module is never copied as plain tensors; TEN-01 / MRL-02 say what it lacks."""
        return any(k in QUANT_PARAMS for k in self.tensors) or "B" in self.tensors

    @property
    def quant_tensor(self) -> str:
        """The first tensor of its quantization set that is present (where issues point)."""
        return next((k for k in (*QUANT_PARAMS, *MARLIN_PARAMS) if k in self.tensors), next(iter(self.tensors)))

    @property
    def marlin(self) -> bool:
        """Stored in the Marlin layout (spec §10): has any of B, s, zp, g_idx, perm."""
        return any(k in self.tensors for k in MARLIN_PARAMS)

    @property
    def scheme(self) -> QuantScheme | None:
        return None if self.group is None else self.group.weights

    @property
    def linear(self) -> bool:
        """Looks like a Linear layer by tensor names alone (spec §4.3)."""
        if self.quantized:
            return True
        w = self.tensors.get("weight")
        last = self.prefix.rsplit(".", 1)[-1]
        return (w is not None and len(w.shape) in (2, 3) and last not in EMBEDDING_NAMES
                and not last.endswith("norm"))


class LocalFiles:
    """The files of a checkpoint folder (symlinks followed, as in a Hugging Face cache snapshot)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.label = str(root)

    def is_file(self, name: str) -> bool:
        return (self.root / name).is_file()

    def present(self, name: str) -> bool:
        """Something by that name exists, readable or not (a folder, a dangling link)."""
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


class Checkpoint:
    """A checkpoint opened by its headers. Use open_checkpoint()."""

    def __init__(self, files, shards: list[str], config: dict[str, Any] | None,
                 quant: QuantizationConfig | None, tensors: dict[str, TensorInfo],
                 problems: list[SpecError], index: dict[str, str] | None,
                 marlin: MarlinConfig | None = None) -> None:
        self.files, self.shards, self.config, self.quant = files, shards, config, quant
        self.marlin = marlin           # set for a Marlin checkpoint; quant is then its source config
        self.tensors, self.problems, self.index = tensors, problems, index
        self.root = getattr(files, "root", None)     # None for a Hub repo
        self.label = files.label
        self._modules: dict[str, Module] | None = None

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.shards)} shards, {len(self.tensors)} tensors)"

    def modules(self) -> dict[str, Module]:
        """Every module, by prefix, with the config group that targets it."""
        if self._modules is None:
            by_prefix: dict[str, dict[str, TensorInfo]] = {}
            for name, info in self.tensors.items():
                prefix, _, suffix = name.rpartition(".")
                by_prefix.setdefault(prefix, {})[suffix] = info
            self._modules = {p: self._module(p, t) for p, t in by_prefix.items()}
        return self._modules

    def _module(self, prefix: str, tensors: dict[str, TensorInfo]) -> Module:
        m = Module(prefix, tensors)
        if self.quant is None:
            return m
        name = self.marlin.part_name(prefix) if self.marlin is not None else prefix
        return Module(prefix, tensors, self.quant.group_for(name, linear=m.linear), self.quant.is_ignored(name))

    def layout(self, module: Module, in_features: int) -> str:
        """Word layout of a module's values: the packed width decides, else the version (spec §3.3)."""
        from .scheme import packed_width
        bits = module.scheme.num_bits
        if 8 % bits == 0:
            return DENSE                      # both layouts are the same bits
        width = module.tensors["weight_packed"].shape[-1]
        dense, padded = packed_width(in_features, bits, DENSE), packed_width(in_features, bits, PADDED)
        if width == dense != padded:
            return DENSE
        if width == padded != dense:
            return PADDED
        return self.quant.layout() if self.quant is not None else DENSE

    # -- data ------------------------------------------------------------------------
    def load(self, name: str, device: str | None = None) -> torch.Tensor:
        """One tensor, read from its shard into fresh memory (nothing else is touched)."""
        import torch
        info = self.tensors[name]
        out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            got = self.files.readinto(info.file, info.start, out.reshape(-1).view(torch.uint8).numpy())
            if got != info.nbytes:
                raise HeaderError(f"file is truncated: read {got} of {info.nbytes} bytes", rule="HDR-06",
                                  file=info.file, where=name)
        return out if device is None else out.to(device)

    def load_module(self, module: Module, device: str | None = None) -> dict[str, torch.Tensor]:
        return {suffix: self.load(info.name, device) for suffix, info in module.tensors.items()}

    def dequantize(self, module: Module, *, dtype: torch.dtype | None = None,
                   device: str | None = None) -> torch.Tensor:
        """The dense weight of one quantized module, checked against its scheme first."""
        from .validate import check_module
        if module.scheme is None:
            raise ConfigError("no config group targets this module", rule="TEN-10", where=module.prefix)
        for issue in check_module(self, module):
            if issue.severity == "error":
                raise issue.as_error()
        return self.decompress_loaded(module, self.load_module(module, device), dtype=dtype)

    def decompress_loaded(self, module: Module, tensors: Mapping[str, torch.Tensor], *,
                          dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight from a module's already loaded tensors (any device), after checking
        its weight_shape against the headers (DATA-05, TEN-08)."""
        if module.marlin:
            from .marlin import decompress as marlin_decompress
            return marlin_decompress(tensors, dtype=dtype)
        from .quant import decompress
        shape = self.checked_shape(module, tensors["weight_shape"])
        return decompress(tensors, module.scheme, layout=self.layout(module, shape[-1]), dtype=dtype)

    def checked_shape(self, module: Module, weight_shape: torch.Tensor) -> tuple[int, ...]:
        """A module's loaded weight_shape, checked against the headers (DATA-05, TEN-08)."""
        from .validate import shape_issue
        shape = tuple(int(v) for v in weight_shape.tolist())
        bad = shape_issue(self, module, shape)
        if bad is not None:
            raise bad.as_error()
        return shape


def open_checkpoint(path: str | os.PathLike, *, strict: bool = True) -> Checkpoint:
    """Open a model folder or one .safetensors file by reading headers only.

    With strict=False, rule violations in the index and shard headers are collected in
    `.problems` (for validate) instead of raised; an unreadable shard is then skipped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder [FILE-01]")
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            rule = "FILE-02" if path.name.endswith(PICKLE_SUFFIXES) else "FILE-01"
            raise HeaderError("not a .safetensors file" + (" (pickle files are never read)" if rule == "FILE-02"
                                                             else ""), rule=rule, file=path.name)
        return read_checkpoint(LocalFiles(path.parent), strict=strict, single=path.name)
    return read_checkpoint(LocalFiles(path), strict=strict)


def read_checkpoint(files, *, strict: bool = True, single: str | None = None) -> Checkpoint:
    """Open a checkpoint through a file-access object (LocalFiles, or hub.HubFiles)."""
    problems: list[SpecError] = []

    def fail(err: SpecError) -> None:
        if strict:
            raise err
        problems.append(err)

    config = None
    if files.is_file("config.json"):
        try:
            config = _read_config(files.read_bytes("config.json"))
        except ConfigError as err:
            fail(err)
        except OSError as err:
            fail(ConfigError(f"cannot read: {err.strerror or err}", rule="CFG-01", file="config.json"))
    elif files.present("config.json"):
        fail(ConfigError("is not a readable file (a folder, or a link that leads nowhere)", rule="CFG-01",
                         file="config.json"))
    quant = marlin = None
    qc = None if config is None else config.get("quantization_config")
    if MarlinConfig.detect(qc):
        try:
            marlin = MarlinConfig.from_json(qc)
            quant = marlin.source
        except ConfigError as err:
            err.file = "config.json"
            fail(err)
    elif qc is not None:
        try:
            quant = QuantizationConfig.from_json(config["quantization_config"])
        except ConfigError as err:
            err.file = "config.json"
            fail(err)
    shards, index = ([single], None) if single else _find_shards(files)
    tensors: dict[str, TensorInfo] = {}
    for shard in shards:
        if not files.is_file(shard):
            fail(HeaderError("shard named by the index does not exist", rule="FILE-05", file=shard))
            continue
        try:
            found, _ = files.header(shard)
        except HeaderError as err:
            fail(err)
            continue
        for name, info in found.items():
            if name in tensors:
                fail(HeaderError(f"tensor also stored in {tensors[name].file}", rule="FILE-06", file=shard, where=name))
            elif index is not None and index.get(name) != shard:
                where = "not in the index" if name not in index else f"the index places it in {index[name]}"
                fail(HeaderError(f"tensor in this shard but {where}", rule="FILE-06", file=shard, where=name))
            else:
                tensors[name] = info
    unread = {p.file for p in problems if p.rule.startswith(("HDR", "FILE-05"))}
    for name, shard in (index or {}).items():
        if name not in tensors and shard not in unread:
            fail(HeaderError(f"the index places this tensor in {shard}, whose header lacks it", rule="FILE-06",
                             file=INDEX_NAME, where=name))
    return Checkpoint(files, shards, config, quant, tensors, problems, index, marlin)


def _read_config(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"not UTF-8 JSON: {str(err)[:200]}", rule="CFG-01", file="config.json") from None
    if not isinstance(obj, dict):
        raise ConfigError("not a JSON object", rule="CFG-01", file="config.json")
    return obj


def _find_shards(files) -> tuple[list[str], dict[str, str] | None]:
    if files.is_file(INDEX_NAME):
        index = parse_index(files.read_bytes(INDEX_NAME), INDEX_NAME)
        return sorted(set(index.values())), index
    if files.is_file(SINGLE_NAME):
        return [SINGLE_NAME], None
    names = files.names()
    found = [n for n in names if n.endswith(".safetensors")]
    if found:
        return found, None
    if any(n.endswith(PICKLE_SUFFIXES) for n in names):
        raise HeaderError("only pickle weights found; ctformat never unpickles (convert them to safetensors "
                          "with a trusted tool first)", rule="FILE-02", file=files.label)
    raise HeaderError("no safetensors weights here", rule="FILE-01", file=files.label)


# -- dtypes ------------------------------------------------------------------------------
_TORCH_NAMES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16", "F16": "float16",
                "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32", "I64": "int64",
                "U64": "uint64", "F64": "float64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
                "F8_E8M0": "float8_e8m0fnu"}


def torch_dtype(code: str) -> torch.dtype:
    import torch
    return getattr(torch, _TORCH_NAMES[code])


def dtype_code(dtype: torch.dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    for code, tname in _TORCH_NAMES.items():
        if tname == name:
            return code
    raise ValueError(f"no safetensors dtype for {dtype}")


# -- writing -----------------------------------------------------------------------------
class WriterState(Enum):
    OPEN = "open"
    CLOSED = "closed"
    FAILED = "failed"


class CheckpointWriter:
    """Write tensors, in the order of a plan given up front, into size-limited shards.

    Knowing every (name, dtype, shape) first lets each shard's header be written before its
    data, so tensors stream straight to disk and memory holds one tensor at a time. All
    files go to a temporary folder beside `out`, renamed to `out` by close(); an exception
    inside the `with` block removes the temporary folder, so a failed run leaves nothing.
    """

    def __init__(self, out: str | os.PathLike, plan: Iterable[tuple[str, str, tuple[int, ...]]], *,
                 max_shard_size: int = 5_000_000_000, force: bool = False,
                 source: str | os.PathLike | None = None) -> None:
        self.out = Path(out)
        self.source = None if source is None else Path(source)
        _check_output(self.out, self.source, force)
        self.force = force
        self.plan = [(n, d, tuple(s)) for n, d, s in plan]
        self.shards = _assign_shards(self.plan, max_shard_size)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{uuid.uuid4().hex[:8]}"
        self.tmp.mkdir(parents=False)
        self.state = WriterState.OPEN
        self._next = 0
        self._fh = None

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self.state is WriterState.OPEN:
            self.abort()

    def write(self, name: str, tensor: torch.Tensor) -> None:
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
        if self.source is not None:
            _copy_other_files(self.source, self.tmp)
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


def _assign_shards(plan: list[tuple[str, str, tuple[int, ...]]], max_bytes: int) -> list[int]:
    out, shard, used = [], 0, 0
    for _, d, s in plan:
        size = DTYPE_SIZES[d] * prod(s)
        if used and used + size > max_bytes:
            shard, used = shard + 1, 0
        out.append(shard)
        used += size
    return out


def _check_output(out: Path, source: Path | None, force: bool) -> None:
    if out.is_symlink():
        raise OutputExistsError(f"{out}: is a symbolic link; ctformat never writes through links")
    if source is not None:
        src = source.resolve()
        if out.resolve() == src or src in out.resolve().parents or out.resolve() in src.parents:
            raise OutputExistsError(f"{out}: overlaps the input {source}; the input is never touched")
    if out.exists() and not force:
        raise OutputExistsError(f"{out}: already exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise CheckpointNotFoundError(f"{out.parent}: output folder's parent does not exist")


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


def _publish(tmp: Path, out: Path, force: bool) -> None:
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExistsError(f"{out}: appeared while writing; nothing was written there")
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old) if old.is_dir() and not old.is_symlink() else old.unlink()
    else:
        os.rename(tmp, out)


def save_checkpoint(out: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                    config: Mapping[str, Any] | None = None, **kwargs: Any) -> Path:
    """Write a dict of tensors as a (sharded) checkpoint; kwargs go to CheckpointWriter."""
    plan = [(n, dtype_code(t.dtype), tuple(t.shape)) for n, t in tensors.items()]
    with CheckpointWriter(out, plan, **kwargs) as w:
        for n, t in tensors.items():
            w.write(n, t)
        return w.close(config)
