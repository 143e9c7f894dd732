"""Checkpoints, read: config.json, the index and each shard's header, tensors grouped into
modules, one tensor loaded at a time (spec §1, §4). Reading only: judging is validate's job,
dequantizing dequant's, writing writer's.

Opening a checkpoint reads no tensor data; torch is imported only when a tensor is loaded.
"""
from __future__ import annotations

import gc
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import count, repeat
from operator import and_, itemgetter, not_, or_
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .architectures import RouterVerdict, router_verdict
from .errors import CheckpointNotFoundError, ConfigError, HeaderError, SpecError
from .files import FileSource, LocalFiles
from .header import TensorInfo, parse_index
from .gptq_config import AWQ_METHOD, GPTQ_METHOD, GptqConfig, ModuleScheme, detect, read_gptq_config
from .marlin_config import MarlinConfig
from .names import moe_renamed
from .scheme import QuantGroup, QuantizationConfig, QuantScheme, Transform, word_layout
from .spec import (EMBEDDING_NAMES, GPTQ_PARAMS, INDEX_NAME, KV_PARAMS, MARLIN_PARAMS, PACK_QUANTIZED,
                   PICKLE_SUFFIXES, QUANT_PARAMS, QUANT_SETS, QUANTIZE_CONFIG_NAME, SINGLE_NAME)

if TYPE_CHECKING:
    import torch

__all__ = ["Module", "ModuleClass", "Checkpoint", "open_checkpoint", "read_checkpoint", "paused_gc", "CT", "MARLIN", "GPTQ_FAMILIES"]

CT, MARLIN = "compressed-tensors", "marlin"        # checkpoint families, beside GPTQ_METHOD and AWQ_METHOD
GPTQ_FAMILIES = (GPTQ_METHOD, AWQ_METHOD)


@dataclass(frozen=True, slots=True)
class Module:
    """Tensors that share a prefix (`model.layers.0.mlp.down_proj`), keyed by suffix."""

    prefix: str
    tensors: Mapping[str, TensorInfo]
    group: QuantGroup | None = None      # the config group that targets it
    ignored: bool = False                # matched by `ignore`
    format: str | None = None            # the format its weight is stored in (spec/formats.md §1.2)
    rotation: Transform | None = None    # the online transform whose matrix it holds (spec/formats.md §11)
    family: str | None = None            # the checkpoint's family (CT, MARLIN, "gptq", "awq"; None: no config)
    gptq: ModuleScheme | None = None     # GPTQ/AWQ family: the scheme the config gives it (None: left dense)

    @property
    def quantized(self) -> bool:
        """Carries any tensor of a quantization tensor set of any format, complete or not
        (spec §2, spec/formats.md §1.2): such a module is never copied as plain tensors;
        TEN-01 / FMT-10 / MRL-02 / GPTQ-02 say what it lacks. The family decides the set: in a
        GPTQ/AWQ checkpoint qweight, qzeros, scales, g_idx (and stray compressed-tensors names),
        elsewhere the compressed-tensors sets or B."""
        if self.family in GPTQ_FAMILIES:
            return not _GPTQ_KEYS.isdisjoint(self.tensors)
        return not _CT_KEYS.isdisjoint(self.tensors)

    @property
    def params(self) -> tuple[str, ...]:
        """Suffixes of its family's quantization tensor set (what a conversion step reads)."""
        return QUANT_SETS.get(self.family or CT, QUANT_PARAMS)

    @property
    def packed(self) -> bool:
        """Stored pack-quantized (spec/ctformat.md §2; the TEN rules judge it)."""
        return self.format == PACK_QUANTIZED

    @property
    def kv_cache(self) -> bool:
        """Holds kv-cache scales (an attention module, spec/formats.md §10)."""
        return not _KV_KEYS.isdisjoint(self.tensors)

    @property
    def quant_tensor(self) -> str:
        """The first tensor of its quantization set that is present (where issues point)."""
        return next((k for k in (*self.params, *QUANT_PARAMS, *MARLIN_PARAMS) if k in self.tensors),
                    next(iter(self.tensors)))

    @property
    def is_marlin(self) -> bool:
        """Stored in the Marlin layout (spec §10): a Marlin checkpoint's module with any of B, s,
        zp, g_idx, perm (the family decides: GPTQ's scales and g_idx are not Marlin's)."""
        return self.family == MARLIN and any(k in self.tensors for k in MARLIN_PARAMS)

    @property
    def is_gptq(self) -> bool:
        """Stored as GPTQ or AWQ tensors (spec/gptq-awq.md §1, §2)."""
        return self.family in GPTQ_FAMILIES and self.quantized

    @property
    def scheme(self) -> QuantScheme | None:
        return None if self.group is None else self.group.weights

    @property
    def is_linear(self) -> bool:
        """Looks like a Linear layer by tensor names alone (spec §4.3)."""
        if self.quantized:
            return True
        if self.rotation is not None:
            return False                  # a transform's matrix, not a layer of the model
        return _looks_linear(self.prefix, self.tensors)


_KV_KEYS = frozenset(KV_PARAMS)
_CT_KEYS = frozenset(QUANT_PARAMS) | {"B"}                 # Module.quantized, by family
_GPTQ_KEYS = frozenset(GPTQ_PARAMS) | frozenset(QUANT_PARAMS)


def _classes(names: list[str], indices: list[int], n: int, first_of) -> tuple:
    """(classes, names, indices) from each module's class index; first_of(k, name) builds class
    k's first member."""
    members: list[list[str]] = [[] for _ in range(n)]
    for name, k in zip(names, indices):
        members[k].append(name)
    return [ModuleClass(first_of(k, m[0]), tuple(m)) for k, m in enumerate(members)], names, indices


def _looks_linear(prefix: str, tensors: Mapping[str, TensorInfo]) -> bool:
    """Module.is_linear of a module that is neither quantized nor a rotation (spec §4.3)."""
    w = tensors.get("weight")
    last = prefix.rpartition(".")[2]
    return w is not None and len(w.shape) in (2, 3) and last not in EMBEDDING_NAMES and not last.endswith("norm")


@dataclass(frozen=True, slots=True)
class ModuleClass:
    """Modules alike but for their names (spec §4.5): the same tensor suffixes in the same
    order, dtypes and shapes, one config group, format, ignore verdict, Linear verdict, GPTQ
    scheme and rotation. What the headers and config say of one member holds for all of them;
    only the names (and the shards that hold them) differ."""

    first: Module                # its first member in module order, built
    members: tuple[str, ...]     # every member's prefix, in module order

    def __len__(self) -> int:
        return len(self.members)


_SUFFIX = itemgetter(2)                                  # of str.rpartition
_INFO_DTYPE, _INFO_SHAPE = itemgetter(1), itemgetter(2)  # of a TensorInfo


class Checkpoint:
    """A checkpoint opened by its headers. Use open_checkpoint() (or source.open_model())."""

    def __init__(self, files: FileSource, *, shards: list[str], config: dict[str, Any] | None,
                 quant: QuantizationConfig | None, tensors: dict[str, TensorInfo], problems: list[SpecError],
                 marlin: MarlinConfig | None = None, gptq: GptqConfig | None = None) -> None:
        self.files, self.shards, self.config, self.quant = files, shards, config, quant
        self.marlin = marlin           # set for a Marlin checkpoint; quant is then its source config
        self.gptq = gptq               # set for a GPTQ or AWQ checkpoint (quant is then None)
        self.tensors, self.problems = tensors, problems
        self.root: Path | None = getattr(files, "root", None)     # None for a Hub repo
        self.label = files.label
        self._modules: dict[str, Module] | None = None
        # module_classes(): (classes, module names in module order, each one's class index,
        # name -> class index, each module's tensors by suffix; {} when every Module is built)
        self._classes: tuple[list[ModuleClass], list[str], list[int], dict[str, int], dict] | None = None

    def __repr__(self) -> str:
        return f"Checkpoint({self.label!r}, {len(self.shards)} shards, {len(self.tensors)} tensors)"

    @property
    def family(self) -> str | None:
        """CT, MARLIN, "gptq" or "awq" by the quantization config; None without one (dense)."""
        if self.gptq is not None:
            return self.gptq.method
        return MARLIN if self.marlin is not None else CT if self.quant is not None else None

    @property
    def model_type(self) -> str | None:
        """config.json's model_type, when it is a string."""
        value = (self.config or {}).get("model_type")
        return value if isinstance(value, str) else None

    def modules(self) -> dict[str, Module]:
        """Every module, by prefix, with the config group that targets it."""
        if self._modules is None:
            with paused_gc():
                if self._classes is not None and self._classes[4]:
                    self._modules = {name: self.module(name) for name in self._classes[1]}
                else:
                    self._modules = self._build_modules()
        return self._modules

    # -- classes of modules alike but for their names (spec §4.5) --------------------------
    def module_classes(self) -> list[ModuleClass]:
        """Every module, as classes of modules alike but for their names, in the order of each
        class's first member (a 1 T MoE checkpoint's ~70k modules fall into ~50 classes)."""
        if self._classes is None:
            with paused_gc():
                self._classes = self._plain_classes() or self._classes_of_modules()
        return self._classes[0]

    def module_names(self) -> list[str]:
        """Every module's prefix, in module order (the order of modules())."""
        self.module_classes()
        return self._classes[1]

    def class_indices(self) -> list[int]:
        """Each module's class (its index in module_classes()), aligned with module_names()."""
        self.module_classes()
        return self._classes[2]

    def module(self, prefix: str) -> Module | None:
        """One module by prefix, built when asked for (None: no module has that prefix)."""
        if self._modules is not None:
            return self._modules.get(prefix)
        self.module_classes()
        classes, _, _, index, by_prefix = self._classes
        k = index.get(prefix)
        if k is None:
            return None
        first = classes[k].first
        if prefix == first.prefix:
            return first
        return Module(prefix, by_prefix[prefix], first.group, first.ignored, first.format, family=first.family)

    def _classes_of_modules(self) -> tuple:
        """module_classes() from every Module built (GPTQ/AWQ, Marlin, transforms, legacy
        sparsity, no config: the configurations _plain_classes leaves to _module)."""
        keys: dict[tuple, int] = {}
        indices: list[int] = []
        for m in self.modules().values():
            infos = m.tensors.values()       # one flat tuple (names, then dtypes, then shapes): no tuple per tensor
            key = (id(m.group), m.format, id(m.gptq), id(m.rotation), m.ignored, m.is_linear, *m.tensors,
                   *map(_INFO_DTYPE, infos), *map(_INFO_SHAPE, infos))
            indices.append(keys.setdefault(key, len(keys)))
        names, mods = list(self.modules()), self.modules()
        return *_classes(names, indices, len(keys), lambda k, name: mods[name]), dict(zip(names, indices)), {}

    def _plain_classes(self) -> tuple | None:
        """module_classes() for a compressed-tensors config without transforms or legacy sparsity
        (each module's group, format and ignore verdict alone: _plain_modules), without a Module
        per module: the tests of Module.is_linear run once per layout (suffixes, dtypes,
        shapes) and by C-level passes over the names. None for the other configurations."""
        q = self.quant
        if q is None or self.gptq is not None or self.marlin is not None or q.transforms or q.sparsity is not None:
            return None
        by_prefix = self._by_prefix()
        names = list(by_prefix)
        layout_ids: dict[tuple, int] = {}
        lids = [layout_ids.setdefault((*t, *map(_INFO_DTYPE, t.values()), *map(_INFO_SHAPE, t.values())),
                                      len(layout_ids)) for t in by_prefix.values()]
        quantized, two_or_three_d = [False] * len(layout_ids), [False] * len(layout_ids)
        for lid, tensors in dict(zip(reversed(lids), reversed(by_prefix.values()))).items():   # one per layout
            w = tensors.get("weight")
            quantized[lid] = not _CT_KEYS.isdisjoint(tensors)
            two_or_three_d[lid] = w is not None and len(w.shape) in (2, 3)
        lasts = list(map(_SUFFIX, map(str.rpartition, names, repeat("."))))
        named_linear = map(and_, map(not_, map(EMBEDDING_NAMES.__contains__, lasts)),
                           map(not_, map(str.endswith, lasts, repeat("norm"))))
        linear = list(map(or_, map(quantized.__getitem__, lids),
                          map(and_, map(two_or_three_d.__getitem__, lids), named_linear)))
        groups, ignored = q.groups_for(names, linear), q.ignored_all(names)
        class_ids: dict[tuple, int] = {}
        indices = list(map(class_ids.setdefault, zip(lids, map(id, groups), ignored, linear), count()))
        renumber = {k: i for i, k in enumerate(dict.fromkeys(indices))}
        indices = list(map(renumber.__getitem__, indices))
        family, formats = self.family, {}
        firsts_at = dict(zip(reversed(indices), range(len(indices) - 1, -1, -1)))    # class -> its first module

        def first_module(k: int, prefix: str) -> Module:
            i = firsts_at[k]
            group = groups[i]
            if group is None or group.weights is None:
                fmt = None
            elif (fmt := formats.get(id(group), formats)) is formats:
                fmt = formats[id(group)] = q.group_format(group)
            return Module(prefix, by_prefix[prefix], group, ignored[i], fmt, family=family)

        return (*_classes(names, indices, len(renumber), first_module), dict(zip(names, indices)), by_prefix)

    def _by_prefix(self) -> dict[str, dict[str, TensorInfo]]:
        """Each module's tensors by suffix, modules in the order their first tensor comes."""
        by_prefix: dict[str, dict[str, TensorInfo]] = {}
        suffixes: dict[str, str] = {}         # one str object per distinct suffix, not per tensor
        for name, info in self.tensors.items():
            prefix, _, suffix = name.rpartition(".")
            found = by_prefix.get(prefix)
            if found is None:
                by_prefix[prefix] = {suffixes.setdefault(suffix, suffix): info}
            else:
                found[suffixes.setdefault(suffix, suffix)] = info
        return by_prefix

    def _build_modules(self) -> dict[str, Module]:
        by_prefix = self._by_prefix()
        q = self.quant
        if q is not None and self.gptq is None and self.marlin is None and not q.transforms and q.sparsity is None:
            return self._plain_modules(by_prefix, q)
        return dict(zip(by_prefix, map(self._module, by_prefix, by_prefix.values())))

    def _plain_modules(self, by_prefix: dict[str, dict[str, TensorInfo]], q: QuantizationConfig) -> dict[str, Module]:
        """_module for a compressed-tensors config without transforms or legacy sparsity (no
        rotation, no sparse format: group, format and ignore alone), each lookup hoisted out of
        the loop over ~70k modules."""
        family, group_for, is_ignored, formats = self.family, q.group_for, q.is_ignored, {}
        ct_keys, looks_linear = _CT_KEYS, _looks_linear
        out: dict[str, Module] = {}
        for prefix, tensors in by_prefix.items():
            group = group_for(prefix, linear=not ct_keys.isdisjoint(tensors) or looks_linear(prefix, tensors))
            if group is None:
                fmt = None
            elif (fmt := formats.get(id(group), formats)) is formats:
                fmt = formats[id(group)] = q.group_format(group) if group.weights is not None else None
            out[prefix] = Module(prefix, tensors, group, is_ignored(prefix), fmt, family=family)
        return out

    def _module(self, prefix: str, tensors: dict[str, TensorInfo]) -> Module:
        family = self.family
        if self.gptq is not None:
            return Module(prefix, tensors, family=family, gptq=self.gptq.scheme_for(prefix))
        q = self.quant
        if q is None:
            return Module(prefix, tensors, family=family)
        rotation = None if self.marlin is not None else q.rotation_of(prefix)
        if rotation is not None:              # never targeted by quantization (CT's internal module)
            return Module(prefix, tensors, rotation=rotation, family=family)
        # Module(prefix, tensors).is_linear (no family: the compressed-tensors sets), without building it
        linear = not _CT_KEYS.isdisjoint(tensors) or _looks_linear(prefix, tensors)
        name = self.marlin.part_name(prefix) if self.marlin is not None else prefix
        group = q.group_for(name, linear=linear)
        if q.sparse_targets(name, linear=linear) and "compressed" in tensors:
            fmt = q.sparsity.format           # legacy sparse; its group (if any) says how to dequantize
        else:
            fmt = q.group_format(group) if group is not None and group.weights is not None else None
        return Module(prefix, tensors, group, q.is_ignored(name), fmt, family=family)

    def class_router(self, module: Module) -> RouterVerdict | None:
        """For a dense module that a config group targets by the class `Linear` alone (no name,
        no pattern), its verdict as an MoE router (spec/targets.md §5); None for any other."""
        q, w = self.quant, module.tensors.get("weight")
        if q is None or module.group is None or module.quantized or w is None or not w.shape:
            return None
        name = self.marlin.part_name(module.prefix) if self.marlin is not None else module.prefix
        if q.group_for(name, linear=False) is not None:
            return None
        return router_verdict(self.config, module.prefix, w.shape[0])

    def transforms_of(self, module: Module) -> tuple[Transform, ...]:
        """The online transforms applied to a module (spec/formats.md §11)."""
        if self.quant is None or not self.quant.transforms or module.rotation is not None:
            return ()
        return tuple(t for t in self.quant.transforms_of(module.prefix, linear=module.is_linear) if t.online)

    def source_name(self, prefix: str) -> str:
        """A module's name in the checkpoint it was converted from: a GPTQ/AWQ file ctformat wrote
        renames MoE modules for GPTQModel and records how (spec/gptq-awq.md §3.1); else `prefix`."""
        prov = None if self.gptq is None else self.gptq.provenance
        return prefix if prov is None else moe_renamed(prefix, prov.names)

    def word_layout(self, module: Module, in_features: int) -> str:
        """Word layout of a pack-quantized module's values (spec §3.3)."""
        return word_layout(module.scheme.num_bits, module.tensors["weight_packed"].shape[-1], in_features,
                           self.quant.version)

    # -- data ------------------------------------------------------------------------
    def load(self, name: str, device: str | None = None, *, buffer: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read from its shard into fresh memory, or into `buffer` (flat uint8 of
        its byte size), nothing else touched."""
        from .dtypes import torch_dtype
        import torch
        info = self.tensors[name]
        if buffer is not None and info.nbytes:
            out = buffer.view(torch_dtype(info.dtype)).view(info.shape)
        else:
            out = torch.empty(info.shape, dtype=torch_dtype(info.dtype))
        if info.nbytes:
            got = self.files.readinto(info.file, info.start, out.reshape(-1).view(torch.uint8).numpy())
            if got != info.nbytes:
                raise HeaderError(f"file is truncated: read {got} of {info.nbytes} bytes", rule="HDR-06",
                                  file=info.file, where=name)
        return out if device is None else out.to(device)

    def load_module(self, module: Module, device: str | None = None) -> dict[str, torch.Tensor]:
        """A module's tensors by suffix."""
        return {suffix: self.load(info.name, device) for suffix, info in module.tensors.items()}


def open_checkpoint(path: str | os.PathLike, *, strict: bool = True) -> Checkpoint:
    """Open a model folder or one .safetensors file by reading headers only.

    With strict=False, rule violations in the index and shard headers are collected in
    `.problems` (for validate) instead of raised; an unreadable shard is then skipped.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such file or folder", rule="FILE-01")
    if path.is_file():
        if not path.name.endswith(".safetensors"):
            rule = "FILE-02" if path.name.endswith(PICKLE_SUFFIXES) else "FILE-01"
            raise HeaderError("not a .safetensors file" + (" (pickle files are never read)" if rule == "FILE-02"
                                                             else ""), rule=rule, file=path.name)
        return read_checkpoint(LocalFiles(path.parent), strict=strict, single=path.name)
    return read_checkpoint(LocalFiles(path), strict=strict)


def read_checkpoint(files: FileSource, *, strict: bool = True, single: str | None = None) -> Checkpoint:
    """Open a checkpoint through a FileSource (LocalFiles, or hub.HubFiles)."""
    problems: list[SpecError] = []

    def fail(err: SpecError) -> None:
        if strict:
            raise err
        problems.append(err)

    config = _config(files, fail)
    quant, marlin, gptq = _quantization(config, _quantize_config(files, fail), fail)
    with paused_gc():
        shards, index = ([single], None) if single else _find_shards(files)
        tensors = _headers(files, shards, index, fail)
    unread = {p.file for p in problems if p.rule.startswith(("HDR", "FILE-05"))}
    for name, shard in (index or {}).items() if index is not None and not index.keys() <= tensors.keys() else ():
        if name not in tensors and shard not in unread:
            fail(HeaderError(f"the index places this tensor in {shard}, whose header lacks it", rule="FILE-06",
                             file=INDEX_NAME, where=name))
    return Checkpoint(files, shards=shards, config=config, quant=quant, tensors=tensors, problems=problems,
                      marlin=marlin, gptq=gptq)


@contextmanager
def paused_gc(pause: bool = True):
    """The cycle collector paused (when `pause`) while ~200k records that hold no cycles are
    built: otherwise each of its passes walks every object made so far, and a 1 T checkpoint's
    headers cost twice as long."""
    was = gc.isenabled()
    if pause:
        gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def _config(files: FileSource, fail) -> dict[str, Any] | None:
    """config.json as an object, or None when there is none (CFG-01 when it cannot be read)."""
    if files.is_file("config.json"):
        try:
            return _parse_config(files.read_bytes("config.json"))
        except ConfigError as err:
            fail(err)
        except OSError as err:
            fail(ConfigError(f"cannot read: {err.strerror or err}", rule="CFG-01", file="config.json"))
    elif files.present("config.json"):
        fail(ConfigError("is not a readable file (a folder, or a link that leads nowhere)", rule="CFG-01",
                         file="config.json"))
    return None


def _parse_config(raw: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ConfigError(f"not UTF-8 JSON: {str(err)[:200]}", rule="CFG-01", file="config.json") from None
    if not isinstance(obj, dict):
        raise ConfigError("not a JSON object", rule="CFG-01", file="config.json")
    return obj


def _quantize_config(files: FileSource, fail) -> dict[str, Any] | None:
    """quantize_config.json when it is a GPTQ config (GPTQModel reads it first, spec/gptq-awq.md
    §4.1); an AWQ folder's leftovers or another tool's file are not, and config.json decides."""
    if not files.is_file(QUANTIZE_CONFIG_NAME):
        return None
    try:
        obj = json.loads(files.read_bytes(QUANTIZE_CONFIG_NAME).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError, OSError) as err:
        fail(ConfigError(f"not UTF-8 JSON: {str(err)[:200]}", rule="GPTQ-01", file=QUANTIZE_CONFIG_NAME))
        return None
    return obj if detect(obj) == GPTQ_METHOD else None


def _quantization(config: dict[str, Any] | None, quantize_config: dict[str, Any] | None, fail
                  ) -> tuple[QuantizationConfig | None, MarlinConfig | None, GptqConfig | None]:
    """The compressed-tensors config (for a Marlin checkpoint: its source config), the Marlin
    one, or the GPTQ/AWQ one, by what config.json's quantization_config (or a GPTQ
    quantize_config.json beside it) says."""
    qc = None if config is None else config.get("quantization_config")
    if qc is None and quantize_config is None:
        return None, None, None
    try:
        if MarlinConfig.detect(qc):
            marlin = MarlinConfig.from_json(qc)
            return marlin.source, marlin, None
        if detect(qc) or qc is None:
            return None, None, read_gptq_config(config, quantize_config)
        return QuantizationConfig.from_json(qc), None, None
    except ConfigError as err:
        err.file = err.file or "config.json"
        fail(err)
        return None, None, None


def _find_shards(files: FileSource) -> tuple[list[str], dict[str, str] | None]:
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


def _headers(files: FileSource, shards: list[str], index: dict[str, str] | None, fail) -> dict[str, TensorInfo]:
    """Every shard's tensors, each once and where the index says (FILE-05, FILE-06, HDR)."""
    tensors: dict[str, TensorInfo] = {}
    files.prefetch([s for s in shards if files.is_file(s)])
    for shard in shards:
        if not files.is_file(shard):
            fail(HeaderError("shard named by the index does not exist", rule="FILE-05", file=shard))
            continue
        try:
            found, _ = files.header(shard)
        except HeaderError as err:
            fail(err)
            continue
        if (list(map(index.get, found)).count(shard) == len(found) if index is not None
                else tensors.keys().isdisjoint(found)):
            tensors.update(found)         # the common case, checked in C (the loop below words a problem)
            continue
        for name, info in found.items():
            if name in tensors:
                fail(HeaderError(f"tensor also stored in {tensors[name].file}", rule="FILE-06", file=shard, where=name))
            elif index is not None and index.get(name) != shard:
                where = "not in the index" if name not in index else f"the index places it in {index[name]}"
                fail(HeaderError(f"tensor in this shard but {where}", rule="FILE-06", file=shard, where=name))
            else:
                tensors[name] = info
    return tensors
