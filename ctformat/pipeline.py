"""The conversion engine every target shares (spec §7.3): a plan of Steps, each reading some
input tensors and writing some outputs, run through three stages — a reader thread, the
compute in the calling thread (GPU when asked, CPU after an out-of-memory), a writer thread —
with queues of depth one, so memory holds a few tensors, never the model.
"""
from __future__ import annotations

import mmap
import os
import queue
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch

from .checkpoint import Checkpoint, Module, open_checkpoint
from .dtypes import torch_dtype
from .errors import CtFormatError, UsageError
from .header import TensorInfo
from .staging import Staging, identity, source_identity
from .validate import raise_for_errors
from .writer import Piece, PieceWriter, ShardLayout, check_apart, split_pieces

__all__ = ["Step", "ConvertResult", "Writer", "Execution", "EXECUTION", "Job", "resolve_device", "open_for_convert",
           "copy_step", "by_suffix", "file_order", "module_sources", "run_conversion", "run_steps", "run_pieces",
           "compute", "PIECE_SIZE", "Buffers", "SourceRange", "SourceViews"]

Progress = Callable[..., None]        # (bytes done, bytes in all[, note])
PIECE_SIZE = 1 << 30                  # resumable unit: a shard is cut into pieces of about this size


@dataclass
class Step:
    """One unit of conversion work: read `sources`, compute, write `outputs` in order.
    `work` gets the source tensors by name (on the compute device) and returns one tensor
    per output; without `work` the single source is copied as it is. `module` names the
    quantized module a computing step converts (None for a copy, a plain cast, or a step
    that only reads); `dropped` counts the sources it reads and writes nowhere (activation
    scales, rotations)."""

    outputs: list[tuple[str, str, tuple[int, ...]]]
    sources: list[str]
    work: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]] | None = None
    module: str | None = None
    dropped: int = 0


@dataclass(frozen=True, slots=True)
class SourceRange:
    """A source tensor's bytes where they lie (a local shard), in place of the tensor: a step that
    copies bytes as they are hands this to a writer with `copy_range`, which copies them file to
    file in the kernel (os.copy_file_range), so they are never read into memory."""

    path: Path
    start: int
    nbytes: int


def source_range(ckpt: Checkpoint, step: Step, writer: Writer) -> SourceRange | None:
    """The step's source as a SourceRange when it is copied as it is, the writer takes ranges and
    the shard is a local file; else None (read as usual)."""
    root = getattr(ckpt.files, "root", None)
    if step.work is not None or len(step.sources) != 1 or not hasattr(writer, "copy_range") or root is None:
        return None
    info = ckpt.tensors[step.sources[0]]
    return SourceRange(Path(root) / info.file, info.start, info.nbytes) if info.nbytes else None


class SourceViews:
    """Source tensors as views of their local shards, mapped copy-on-write (mmap ACCESS_COPY):
    a step that only reads its sources computes straight from the page cache, with no read into
    a buffer (that copy cost as much CPU as the repack); a write into a view would stay private
    to this process. Each view has its own mapping, unmapped when the view is dropped (after its
    step is written), so resident memory stays what is in flight. The reader thread asks the
    kernel to read each range ahead (MADV_WILLNEED), so a cold file is still read while the
    previous step computes. view() is None where a tensor is not in a local file or not aligned
    to its dtype (the caller reads it)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        self.root = getattr(ckpt.files, "root", None)
        self._files: dict[str, Any] = {}

    def view(self, name: str) -> torch.Tensor | None:
        info = self.ckpt.tensors[name]
        dtype = torch_dtype(info.dtype)
        if self.root is None or not info.nbytes or info.start % dtype.itemsize:
            return None
        fh = self._files.get(info.file)
        if fh is None:
            fh = self._files[info.file] = open(Path(self.root) / info.file, "rb")     # noqa: SIM115 (held)
        at = info.start - info.start % mmap.ALLOCATIONGRANULARITY
        if info.start + info.nbytes > os.fstat(fh.fileno()).st_size:
            return None                      # a truncated shard: ckpt.load says so
        m = mmap.mmap(fh.fileno(), info.start + info.nbytes - at, access=mmap.ACCESS_COPY, offset=at)
        if hasattr(mmap, "MADV_WILLNEED"):
            m.madvise(mmap.MADV_WILLNEED)
        return torch.frombuffer(m, dtype=dtype, count=info.numel, offset=info.start - at).view(info.shape)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()
        self._files.clear()


@dataclass
class ConvertResult:
    """What a conversion did, for the caller to report."""

    target: str                     # "dense", "marlin", "compressed-tensors"
    verb: str                       # what was done to each quantized module: "dequantized", "repacked"
    output: str
    device: str
    modules: int = 0                # quantized modules converted
    tensors_copied: int = 0
    bytes_read: int = 0
    cpu_fallbacks: int = 0          # steps run on the CPU after the GPU ran out of memory
    details: dict[str, Any] = field(default_factory=dict)   # target-specific facts (legacy_format, ...)

    def to_json(self) -> dict[str, Any]:
        return {f"modules_{self.verb}": self.modules, "tensors_copied": self.tensors_copied,
                "bytes_read": self.bytes_read, "cpu_fallbacks": self.cpu_fallbacks, "device": self.device,
                "output": self.output, **self.details}


class Writer(Protocol):
    """Where a conversion's outputs go: a plan up front (constructor), then these two."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...

    def close(self, config: Mapping[str, Any] | None = None) -> Any: ...


def resolve_device(device: str) -> torch.device:
    """"auto" (CUDA when there is one), "cpu", "cuda" or "cuda:N", checked against this machine."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise UsageError(f"device {device!r}: use auto, cpu, cuda or cuda:N")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CtFormatError(f"device {device}: no CUDA device here (torch {torch.__version__}, cuda available: no)",
                            option="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise CtFormatError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def open_for_convert(model: str | Path, out: str | Path, device: str) -> tuple[Path, torch.device, Checkpoint]:
    """The local input, the device and the checkpoint, everything refusable refused first."""
    src = Path(model)
    if not src.exists():
        raise CtFormatError(f"{model}: convert needs a local checkpoint (download a Hub repo first, e.g. "
                            f"`hf download {model}`)")
    dev = resolve_device(device)
    check_apart(Path(out), src)
    ckpt = open_checkpoint(src)
    raise_for_errors(ckpt)
    return src, dev, ckpt


def copy_step(ckpt: Checkpoint, name: str, out_name: str | None = None) -> Step:
    info = ckpt.tensors[name]
    return Step([(out_name or name, info.dtype, info.shape)], [name])


def module_sources(m: Module, params: frozenset[str] | tuple[str, ...]) -> list[str]:
    """The names of a module's tensors that belong to its quantization set: what a step reads."""
    return [info.name for suffix, info in m.tensors.items() if suffix in params]


def by_suffix(m: Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A step's source tensors (full names) -> one module's tensors by suffix."""
    return {suffix: tensors[info.name] for suffix, info in m.tensors.items() if info.name in tensors}


def file_order(ckpt: Checkpoint) -> list[TensorInfo]:
    """Tensors in the order they lie on disk: plans follow it, so reading is sequential."""
    return sorted(ckpt.tensors.values(), key=lambda t: (t.file, t.start))


def check_plan(ckpt: Checkpoint, plan: list[Step], params: frozenset[str], dropped: frozenset[str] = frozenset()) -> None:
    """Every input tensor is read by exactly one step, and no tensor of a quantized module's
    set (`params`) is copied as it is: a plan that would drop or duplicate data is a bug,
    stopped before anything is written (spec §7.1). `dropped` names the tensors a target leaves
    out on purpose (GGUF: rotary inv_freq, a tied lm_head, MTP layers); they must exist and
    must not be read."""
    read = [n for step in plan for n in step.sources]
    copied = {step.sources[0] for step in plan if step.work is None}
    lost = set(ckpt.tensors) - set(read) - dropped
    mods = ckpt.modules()
    stray = sorted(n for n in copied if n.rpartition(".")[2] in params and mods[n.rpartition(".")[0]].quantized)
    odd = sorted((dropped - set(ckpt.tensors)) | (dropped & set(read)))
    if lost or len(read) != len(set(read)) or stray or odd:
        raise RuntimeError(f"conversion plan loses {sorted(lost)[:3]}, reads a tensor twice, copies "
                           f"quantized tensors as they are ({stray[:3]}), or drops what it reads or lacks ({odd[:3]})")


@dataclass(frozen=True)
class Execution:
    """How run_conversion runs a plan; nothing here changes the output bytes. `runner(job,
    staging)` writes the pending pieces (None: this process, in order); `worker(job)` is set
    inside a worker process, which writes pieces into a folder its driver owns; `options`
    are the target's own, part of the temporary folder's key."""

    resume: bool = False
    runner: Callable[[Job, Staging], None] | None = None
    worker: Callable[[Job], ConvertResult] | None = None
    options: Mapping[str, Any] | None = None
    piece_size: int = PIECE_SIZE


EXECUTION: ContextVar[Execution] = ContextVar("ctformat_execution", default=Execution())


@dataclass
class Job:
    """A planned conversion, ready to write pieces of its output."""

    ckpt: Checkpoint
    plan: list[Step]
    layout: ShardLayout
    pieces: list[Piece]
    device: torch.device
    result: ConvertResult
    ident: dict[str, Any]
    progress: Progress | None = None


def run_conversion(ckpt: Checkpoint, src: Path, out: str | Path, plan: list[Step], config: Mapping[str, Any], *,
                   target: str, verb: str, device: torch.device, params: frozenset[str], max_shard_size: int,
                   force: bool, progress: Progress | None = None, dropped: frozenset[str] = frozenset(),
                   extra_files: Mapping[str, Any] | None = None, skip_files: tuple[str, ...] = ()) -> ConvertResult:
    """Write `plan`'s output in pieces into a resumable temporary folder beside `out`, published
    by one rename (spec §1.5, §1.7), and say what was done. `dropped`: tensors the plan leaves
    unread on purpose (check_plan); `extra_files` (a target's own JSON files) and `skip_files`
    (source files not to copy) as writer.finish_folder takes them."""
    check_plan(ckpt, plan, params, dropped)
    ex = EXECUTION.get()
    result = ConvertResult(target, verb, str(out), str(device))
    layout = ShardLayout([o for step in plan for o in step.outputs], max_shard_size)
    step_of = [k for k, step in enumerate(plan) for _ in step.outputs]
    ident = identity(source=source_identity(src, ckpt.shards), target=target, options=ex.options, layout=layout,
                     sources=[step.sources for step in plan], config=config, piece_size=ex.piece_size)
    job = Job(ckpt, plan, layout, split_pieces(layout, step_of, ex.piece_size), device, result, ident, progress)
    if ex.worker is not None:
        return ex.worker(job)
    staging = Staging.open(Path(out), src, layout=layout, pieces=job.pieces, ident=ident, resume=ex.resume,
                           force=force)
    try:
        (ex.runner or run_here)(job, staging)
        staging.publish(config, src, force, extra_files=extra_files, skip_files=skip_files)
    except BaseException as exc:
        staging.abandon(exc)
        raise
    result.modules = sum(step.work is not None for step in plan)
    result.tensors_copied = len(plan) - result.modules
    unwritten = len(dropped) + sum(step.dropped for step in plan)
    if unwritten:
        result.details["tensors_dropped"] = unwritten
    if ex.resume:
        result.details.update(pieces=len(job.pieces), pieces_resumed=staging.resumed, pieces_failed_check=staging.redone)
    return result


def run_here(job: Job, staging: Staging) -> None:
    """Every pending piece in this process, in plan order, through one pipeline."""
    total = sum(p.end - p.start for p in job.pieces)
    done = [total - sum(job.pieces[i].end - job.pieces[i].start for i in staging.pending)]

    def advance(nbytes: int) -> None:
        done[0] += nbytes
        if job.progress:
            job.progress(done[0], total)
    if job.progress:
        job.progress(done[0], total)
    run_pieces(job, staging.tmp, staging.pending, lambda i, digest: staging.record(i, digest), advance)


def run_pieces(job: Job, folder: Path, indexes: list[int], on_done: Callable[[int, str], None],
               progress: Callable[[int], None] | None = None) -> None:
    """Write pieces `indexes` of the job's output into `folder`: the steps with an output in
    them, in plan order, through run_steps; a piece is recorded (on_done) once on disk."""
    pieces = {job.pieces[i]: i for i in indexes}
    wanted = {k for p in pieces for k in range(p.first, p.stop)}
    names = job.layout.index
    steps = [step for step in job.plan if any(names[o[0]] in wanted for o in step.outputs)]
    writer = PieceWriter(folder, job.layout, pieces, lambda p, digest: on_done(pieces[p], digest), progress)
    try:
        run_steps(job.ckpt, steps, writer, job.device, job.result)
    finally:
        writer.release()
    writer.close()


class Buffers:
    """Byte buffers handed out again once a step is written, so the reader and the compute write
    into memory already mapped (a fresh buffer costs a page fault per 4 KiB, as much as a copy).
    Only a buffer this pool issued comes back (a step's output may be a view of anything); one
    never given back is held until the pool is dropped. The free list holds at most `span` times
    the largest buffer taken, oldest dropped first: about what the pipeline holds in flight, so
    the peak stays that of fresh buffers (which the allocator keeps mapped as well)."""

    def __init__(self, span: int = 8) -> None:
        self.span = span
        self._free: dict[int, list[torch.Tensor]] = {}
        self._order: list[tuple[int, int]] = []         # (nbytes, data_ptr) of the free buffers, oldest first
        self._issued: dict[int, torch.Tensor] = {}      # data_ptr -> buffer, until given back
        self._held = self._largest = 0                  # bytes on the free list; largest buffer taken
        self._lock = threading.Lock()

    def take(self, nbytes: int) -> torch.Tensor:
        """A flat uint8 buffer of `nbytes` (its old contents, or nothing, in it)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                buf = free.pop()
                self._order.remove((nbytes, buf.data_ptr()))
                self._held -= nbytes
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8)
            if nbytes:
                self._issued[buf.data_ptr()] = buf
                self._largest = max(self._largest, nbytes)
            return buf

    def give(self, tensors) -> None:
        """Hand back every tensor that is one of this pool's buffers, whole; others are left alone."""
        with self._lock:
            for t in tensors:
                buf = self._issued.get(t.data_ptr()) if t.device.type == "cpu" else None
                if buf is None or t.untyped_storage().nbytes() != buf.nbytes:
                    continue
                del self._issued[t.data_ptr()]
                self._free.setdefault(buf.nbytes, []).append(buf)
                self._order.append((buf.nbytes, buf.data_ptr()))
                self._held += buf.nbytes
            while self._held > self.span * self._largest:
                nbytes, ptr = self._order.pop(0)
                free = self._free[nbytes]
                free.pop(next(i for i, b in enumerate(free) if b.data_ptr() == ptr))
                self._held -= nbytes


def run_steps(ckpt: Checkpoint, plan: list[Step], writer: Writer, device: torch.device, result: ConvertResult,
              progress: Progress | None = None, buffers: Buffers | None = None, *, views: bool = False) -> None:
    """read (thread) -> compute (this thread) -> write (thread); queues of one bound memory.
    With `buffers`, sources are read into them and, once a step is written, its sources and
    outputs go back (the writer must be done with a tensor when write() returns). With `views`,
    the sources of computing steps are SourceViews of the mapped shards instead (the steps must
    only read them); a step copying bytes as they are goes to the writer's copy_range when it has one."""
    mapped = SourceViews(ckpt) if views else None
    total = sum(ckpt.tensors[n].nbytes for step in plan for n in step.sources)
    loaded: queue.Queue = queue.Queue(maxsize=1)      # one step read ahead
    computed: queue.Queue = queue.Queue(maxsize=1)    # one result waiting while another is written
    errors: list[BaseException] = []
    stop = threading.Event()
    writer_done = threading.Event()                   # a dead writer takes no end marker

    def source(step: Step, name: str) -> torch.Tensor:
        t = mapped.view(name) if mapped is not None and step.work is not None else None
        if t is None:
            t = ckpt.load(name, buffer=buffers.take(ckpt.tensors[name].nbytes) if buffers else None)
        return t

    def read() -> None:
        try:
            for step in plan:
                if stop.is_set():
                    return
                ranged = source_range(ckpt, step, writer)
                _put(loaded, (step, {step.sources[0]: ranged} if ranged else
                              {n: source(step, n) for n in step.sources}), stop)
        except BaseException as err:  # handed to the main thread, which raises it
            errors.append(err)
        finally:
            _put(loaded, None, stop)

    def write() -> None:
        done = 0
        try:
            while (item := computed.get()) is not None:
                step, tensors, nbytes, inputs = item
                for (name, _, _), t in zip(step.outputs, tensors):
                    if isinstance(t, SourceRange):
                        writer.copy_range(name, t)
                    else:
                        writer.write(name, t)
                if buffers:
                    buffers.give([t for t in (*tensors, *inputs) if isinstance(t, torch.Tensor)])
                done += nbytes
                if progress:
                    progress(done, total)
        except BaseException as err:
            errors.append(err)
            stop.set()
        finally:
            writer_done.set()

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=write, daemon=True)]
    for t in threads:
        t.start()
    try:
        while (item := loaded.get()) is not None and not errors:
            step, tensors = item
            nbytes = sum(t.nbytes for t in tensors.values())
            result.bytes_read += nbytes
            out = compute(step, tensors, device, result)
            if step.module is not None:
                result.modules += 1
            elif step.outputs:               # a copy, or a cast of a tensor that is not a quantized module
                result.tensors_copied += 1
            _put(computed, (step, out, nbytes, list(tensors.values()) if buffers else []), stop)
    finally:
        # Order matters: a failure anywhere stops the reader first; the writer then gets its end
        # marker (or is already dead: writer_done), is joined, and only then is the reader's queue
        # drained, so a reader blocked on a full queue can see `stop` and end.
        if errors:
            stop.set()
        _put(computed, None, writer_done)
        threads[1].join()
        stop.set()
        _drain(loaded)
        threads[0].join()
        if mapped is not None:
            mapped.close()                   # the files; each mapping goes with its last view
    if errors:
        raise errors[0]


def compute(step: Step, tensors: dict[str, torch.Tensor], device: torch.device,
            result: ConvertResult) -> list[torch.Tensor]:
    """A step's outputs on the CPU; on CUDA, an out-of-memory reruns the step on the CPU."""
    if step.work is None:
        return [tensors[step.sources[0]]]
    if device.type == "cuda":
        try:
            on_dev = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            return [t.cpu() for t in step.work(on_dev)]
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            result.cpu_fallbacks += 1          # this step on the CPU: same bits, slower
    return step.work(tensors)


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
