"""Conversion of a pack-quantized checkpoint to dense weights (spec §7), streamed module by
module through a three-stage pipeline: a reader thread, the dequantization (GPU or CPU),
and a writer thread. Memory holds a few tensors, never the model; output appears at OUT
only when complete (CheckpointWriter: temporary folder, rename at the end).
"""
from __future__ import annotations

import queue
import re
import threading
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import Checkpoint, CheckpointWriter, Module, dtype_code, open_checkpoint
from .errors import CtFormatError, OutputExistsError, UnsupportedError, UsageError
from .validate import check_module

__all__ = ["convert_to_dense", "dequantize_checkpoint", "dense_plan", "resolve_device", "EXPERT_RENAMES", "DTYPES"]

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# llm-compressor >= 0.12 saves Mixtral experts as gate_proj/up_proj/down_proj; transformers'
# Mixtral reads experts.N.w1/w3/w2 and silently leaves other names at random values. Dense
# output uses the names the architecture's loader reads (spec §7.2); keep_names=True opts out.
EXPERT_RENAMES = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}
_EXPERT = re.compile(r"^(.*\.block_sparse_moe\.experts\.\d+\.)([^.]+)$")
_QUANT_PARAMS = {"weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CtFormatError(f"--device {device}: no CUDA device here (torch {torch.__version__}, "
                            f"cuda available: no); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CtFormatError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _rename(prefix: str, model_type: str | None, keep_names: bool) -> str:
    table = EXPERT_RENAMES.get(model_type or "")
    hit = _EXPERT.match(prefix) if table and not keep_names else None
    return hit.group(1) + table.get(hit.group(2), hit.group(2)) if hit else prefix


def dense_plan(ckpt: Checkpoint, dtype: torch.dtype, keep_names: bool = False) -> list[tuple]:
    """(output name, dtype code, shape, module or None, source tensor name) in read order."""
    model_type = (ckpt.config or {}).get("model_type")
    model_type = model_type if isinstance(model_type, str) else None
    mods = ckpt.modules()
    order = sorted(ckpt.tensors.values(), key=lambda t: (t.file, t.start))
    plan, done = [], set()
    for info in order:
        prefix, _, suffix = info.name.rpartition(".")
        m = mods[prefix]
        if m.quantized and suffix in _QUANT_PARAMS:
            if prefix in done:
                continue
            done.add(prefix)
            shape = tuple(int(v) for v in ckpt.load(m.tensors["weight_shape"].name).tolist())
            plan.append((f"{_rename(prefix, model_type, keep_names)}.weight", dtype_code(dtype), shape, m, None))
        else:
            name = f"{_rename(prefix, model_type, keep_names)}.{suffix}" if prefix else suffix
            plan.append((name, info.dtype, info.shape, None, info.name))
    return plan


def _check_apart(src: Path, out: Path) -> None:
    """OUT may not be, contain, or lie inside the input (a single file's folder may hold OUT)."""
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents or (src.is_dir() and s in o.parents):
        raise OutputExistsError(f"{out}: overlaps the input {src}; the input is never touched")


def _preflight(ckpt: Checkpoint) -> None:
    """Everything that can be refused is refused before any output exists."""
    if ckpt.problems:
        raise ckpt.problems[0]
    for m in ckpt.modules().values():
        for issue in check_module(ckpt, m):
            if issue.severity == "error":
                raise issue.as_error()
        if m.quantized and m.scheme is None:
            raise UnsupportedError(f"{m.prefix}: quantized, but no config group describes it")


def convert_to_dense(model: str | Path, out: str | Path, *, dtype: torch.dtype = torch.bfloat16,
                     device: str = "auto", max_shard_size: int = 5_000_000_000, force: bool = False,
                     keep_names: bool = False, progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Write MODEL's weights, dequantized, as a plain safetensors checkpoint at OUT.

    Returns counts for the caller to report: modules dequantized, tensors copied, bytes read,
    modules that fell back to the CPU after running out of GPU memory.
    """
    src = Path(model)
    if not src.exists():
        raise CtFormatError(f"{model}: convert needs a local checkpoint (download a Hub repo first, e.g. "
                            f"`hf download {model}`)")
    dev = resolve_device(device)
    _check_apart(src, Path(out))
    ckpt = open_checkpoint(src)
    _preflight(ckpt)
    plan = dense_plan(ckpt, dtype, keep_names)
    config = dict(ckpt.config or {})
    config.pop("quantization_config", None)
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = str(dtype).removeprefix("torch.")
    total = sum(t.nbytes for t in ckpt.tensors.values())
    stats = {"modules_dequantized": 0, "tensors_copied": 0, "bytes_read": 0, "cpu_fallbacks": 0,
             "device": str(dev), "output": str(out)}
    with CheckpointWriter(out, [(n, d, s) for n, d, s, _, _ in plan], max_shard_size=max_shard_size,
                          force=force, source=ckpt.root if src.is_dir() else None) as writer:
        _pipeline(ckpt, plan, writer, dev, dtype, stats, progress, total)
        writer.close(config)
    return stats


def dequantize_checkpoint(model: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str = "auto",
                          keep_names: bool = False) -> dict[str, torch.Tensor]:
    """The dense state dict of a (small) checkpoint in memory, on `device`: the same tensors,
    names and bits convert_to_dense writes. For large models use convert_to_dense."""
    dev = resolve_device(device)
    ckpt = open_checkpoint(model)
    _preflight(ckpt)
    out = {}
    for name, _, _, m, source in dense_plan(ckpt, dtype, keep_names):
        if m is None:
            out[name] = ckpt.load(source).to(dev)
        else:
            out[name] = _dequantize(ckpt, m, ckpt.load_module(m), dev, dtype, {"cpu_fallbacks": 0}).to(dev)
    return out


def _pipeline(ckpt, plan, writer, dev, dtype, stats, progress, total) -> None:
    """read (thread) -> dequantize (this thread) -> write (thread); queues bound memory."""
    loaded: queue.Queue = queue.Queue(maxsize=1)      # one module read ahead
    computed: queue.Queue = queue.Queue(maxsize=1)    # one result waiting while another is written
    errors: list[BaseException] = []
    stop = threading.Event()

    def read() -> None:
        try:
            for name, _, _, m, source in plan:
                if stop.is_set():
                    return
                tensors = ckpt.load_module(m) if m is not None else {None: ckpt.load(source)}
                _put(loaded, (name, m, tensors), stop)
        except BaseException as err:  # handed to the main thread, which raises it
            errors.append(err)
        finally:
            _put(loaded, None, stop)

    def write() -> None:
        done = 0
        try:
            while (item := computed.get()) is not None:
                name, tensor, nbytes = item
                writer.write(name, tensor)
                done += nbytes
                if progress:
                    progress(done, total)
        except BaseException as err:
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=write, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := loaded.get()) is not None and not errors:
            name, m, tensors = item
            nbytes = sum(t.nbytes for t in tensors.values())
            stats["bytes_read"] += nbytes
            if m is None:
                out = tensors[None]
                stats["tensors_copied"] += 1
            else:
                out = _dequantize(ckpt, m, tensors, dev, dtype, stats)
                stats["modules_dequantized"] += 1
            _put(computed, (name, out, nbytes), stop)
    finally:
        stop.set() if errors else None
        _put(computed, None, threading.Event())
        threads[1].join()
        stop.set()
        _drain(loaded)
        threads[0].join()
    if errors:
        raise errors[0]


def _dequantize(ckpt: Checkpoint, m: Module, tensors: dict, dev: torch.device, dtype: torch.dtype,
                stats: dict) -> torch.Tensor:
    if dev.type == "cuda":
        try:
            on_dev = {k: v.to(dev, non_blocking=True) for k, v in tensors.items()}
            return ckpt.decompress_loaded(m, on_dev, dtype=dtype).cpu()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            stats["cpu_fallbacks"] += 1          # this module on the CPU: same bits, slower
    return ckpt.decompress_loaded(m, tensors, dtype=dtype)


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while True:
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            if stop.is_set():
                return


def _drain(q: queue.Queue) -> None:
    try:
        while True:
            q.get_nowait()
    except queue.Empty:
        pass
